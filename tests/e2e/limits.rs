//! Issue 18: limits on every peer of the xDS port. With small limits, a
//! flood of idle connections, a stream that never sends a request, one
//! that subscribes to too many names, one that floods NACKs with invented
//! nonces and a newline in the error, and streams that half-send large
//! requests are each refused or closed (counted in
//! `meshreg_xds_limit_hits_total{limit}`), while a real Envoy connected
//! throughout still receives a ServiceEntry edit. The daemon runs under an
//! address-space limit, and its peak resident set is checked at the end.

use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, repo, write_atomic};

/// The daemon's address space limit in this test.
const MEMORY_LIMIT: u64 = 2 << 30;
/// What the daemon's peak resident set must stay under through the flood
/// (with this test's limits, the buffers it may hold are 1 MB; it peaked
/// at 32 MB, and at 508 MB of address space, when this was written).
const PEAK_RSS: u64 = 100 << 20;

const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const RATINGS: &str = "outbound|9080||ratings.default.svc.cluster.local";

/// Reads until the peer closes; true when it does within `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The status a response stream ends with (responses before it skipped).
async fn final_status<T>(answers: &mut tonic::Streaming<T>) -> tonic::Status {
    loop {
        match answers.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => return status,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_refuses_only_the_peer_that_hits_it() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let limits = "limits: {max_connections_per_ip: 8, preface_timeout: 1s, \
                  first_request_timeout: 1s, max_names_per_stream: 50, \
                  max_requests_per_second: 5, max_request_bytes: 400000, \
                  max_buffered_bytes: 1000000, max_buffered_bytes_per_ip: 600000}";
    let mut daemon = Daemon::start_with(dir.path(), limits).await;
    // Under a memory limit: an allocation past it aborts the daemon, and
    // the test fails (the flood of issue 18 aborted it under 800 MB).
    daemon.limit_memory(MEMORY_LIMIT);
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "limits", &[]).await;
    eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
        (envoy.endpoints().await.len() == 6).then_some(())
    })
    .await;
    let hits = |limit: &'static str| {
        let daemon = &daemon;
        async move {
            daemon
                .metric(
                    "meshreg_xds_limit_hits_total",
                    &[&format!("limit=\"{limit}\"")],
                )
                .await
        }
    };

    // Idle connections: past 8 from one address they are closed at once;
    // the others when the preface does not come within a second.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(tokio::net::TcpStream::connect(daemon.xds).await.unwrap());
    }
    for s in &mut idle {
        assert!(closed_within(s, Duration::from_secs(5)).await);
    }
    assert!(hits("connections_per_ip").await >= 5.0);
    assert!(hits("preface_timeout").await >= 6.0);

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .unwrap();

    // A stream that never sends a request ends after a second.
    let silent = client
        .delta_aggregated_resources(futures::stream::pending::<DeltaDiscoveryRequest>())
        .await;
    let status = match silent {
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(hits("first_request_timeout").await, 1.0);

    // More names than allowed.
    let names: Vec<String> = (0..51).map(|i| format!("outbound|80||s{i}.test")).collect();
    let too_many = DeltaDiscoveryRequest {
        type_url: CLA.into(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    let mut answers = client
        .delta_aggregated_resources(
            futures::stream::iter(vec![too_many]).chain(futures::stream::pending()),
        )
        .await
        .unwrap()
        .into_inner();
    let status = final_status(&mut answers).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("more than 50"), "{status:?}");

    // A NACK flood with invented nonces: nothing counted as a reject,
    // nothing logged at warn, and the stream is closed for its rate.
    let flood: Vec<DiscoveryRequest> = (0..200)
        .map(|i| DiscoveryRequest {
            type_url: CLA.into(),
            response_nonce: format!("{}", 1_000_000 + i),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad\nWARN meshreg: forged line".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let mut answers = client
        .stream_aggregated_resources(futures::stream::iter(flood).chain(futures::stream::pending()))
        .await
        .unwrap()
        .into_inner();
    let status = final_status(&mut answers).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(hits("requests_per_second").await >= 1.0);
    assert_eq!(daemon.metric("pilot_total_xds_rejects", &[]).await, 0.0);
    assert!(!daemon.log().contains("forged line"), "{}", daemon.log());

    // Half-sent large requests on raw HTTP/2 streams from 127.0.0.2: once
    // that address holds its share of the buffer (600 kB of 1 MB), its
    // next streams are refused, and a stream from 127.0.0.3 still has room
    // (it ends only by the first-request timeout).
    let half_sent = |from: &'static str| {
        let xds = daemon.xds;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let tcp = socket.connect(xds).await.unwrap();
            let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            h2
        }
    };
    let send = |mut h2: h2::client::SendRequest<Bytes>| async move {
        let req = http::Request::post(format!(
            "http://{}/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            daemon.xds
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        h2 = h2.ready().await.unwrap();
        let (resp, mut body) = h2.send_request(req, false).unwrap();
        // A message header announcing 390,000 bytes, then 300,000 of them.
        let mut chunk = vec![0u8, 0, 0x05, 0xf3, 0x70];
        chunk.extend(std::iter::repeat_n(0u8, 300_000));
        body.reserve_capacity(chunk.len());
        let _ = body.send_data(Bytes::from(chunk), false);
        (h2, resp, body)
    };
    // The status and message a half-sent stream ends with.
    let ended = |resp: h2::client::ResponseFuture| async move {
        let r = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer")
            .expect("a response");
        let header =
            |h: &http::HeaderMap, k: &str| h.get(k).map(|v| v.to_str().unwrap().to_string());
        let (code, message) = (
            header(r.headers(), "grpc-status"),
            header(r.headers(), "grpc-message"),
        );
        if code.is_some() {
            return (code, message.unwrap_or_default());
        }
        let mut body = r.into_body();
        let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
        (
            header(&trailers, "grpc-status"),
            header(&trailers, "grpc-message").unwrap_or_default(),
        )
    };
    let mut h2 = half_sent("127.0.0.2").await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let (next, resp, body) = send(h2).await;
        h2 = next;
        held.push((resp, body));
    }
    let (_, other, _other_body) = send(half_sent("127.0.0.3").await).await;
    let mut refused = 0;
    for (resp, _body) in held {
        let (code, message) = ended(resp).await;
        if code.as_deref() == Some("8") && message.contains("buffer") {
            refused += 1;
        }
    }
    assert!(refused >= 3, "{refused} of 5 refused for the buffer");
    assert!(hits("buffered_bytes").await >= 3.0);
    let (code, message) = ended(other).await;
    assert_eq!(code.as_deref(), Some("8"));
    assert!(
        message.contains("no request within"),
        "another address had room: {message}"
    );

    // A hostile file (200 KB of nested flow sequences) is refused at once,
    // before parsing, and does not hold up the edit that follows.
    let depth = 100_000;
    write_atomic(
        &dir.path().join("nested.yaml"),
        &format!("a: {}{}", "[".repeat(depth), "]".repeat(depth)),
    );
    // The HTTP port: past 100 connections from one address, the next is
    // closed at once; idle and slowloris ones are closed after 10 s without
    // complete headers; /metrics answers throughout.
    use tokio::io::AsyncWriteExt;
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = tokio::net::TcpStream::connect(daemon.http).await.unwrap();
        if i % 2 == 0 {
            // Slowloris: half a request.
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(daemon.http).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    for s in &mut idle {
        assert!(closed_within(s, Duration::from_secs(20)).await);
    }
    assert!(daemon.metrics().await.contains("pilot_xds"));
    assert_eq!(
        daemon
            .metric(
                "meshreg_http_refused_total",
                &["limit=\"connections_per_ip\""]
            )
            .await,
        1.0
    );

    // Throughout, the real Envoy was served: an edit still reaches it.
    let path = dir.path().join("ratings.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.16", "127.0.0.116"));
    eventually("the edit in Envoy", Duration::from_secs(5), || async {
        envoy
            .hosts(RATINGS)
            .await
            .contains("127.0.0.116:9080")
            .then_some(())
    })
    .await;
    let (_, body) = crate::support::http_get(daemon.http, "/debug/rejected", "m")
        .await
        .unwrap();
    assert!(
        body.contains("nested.yaml") && body.contains("nested deeper than 64"),
        "{body}"
    );
    assert!(daemon.alive(), "meshreg died: {}", daemon.log());
    let (peak, peak_vm) = (daemon.vm("VmHWM"), daemon.vm("VmPeak"));
    eprintln!(
        "meshreg peak RSS {} MB, peak address space {} MB",
        peak >> 20,
        peak_vm >> 20
    );
    assert!(peak < PEAK_RSS, "peak RSS {peak} bytes, bound {PEAK_RSS}");
}
