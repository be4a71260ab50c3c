//! Issue 14: a real proxyless gRPC client (Python `grpcio`, installed by
//! scripts/test.sh into .venv) resolves `xds:///<host>:<port>` through
//! meshreg: LDS (an API listener), RDS, CDS and EDS over SotW ADS, as
//! gRPC speaks it. It dials the full name and short forms istiod accepts,
//! calls servers started by the test on loopback addresses
//! registered through a ServiceEntry, and follows edits of the endpoints.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::support::{Daemon, repo, write_atomic};

const HOST: &str = "echo.grpc.svc.cluster.local";

fn service_entry(port: u16, ips: &[&str]) -> String {
    let endpoints: Vec<String> = ips.iter().map(|ip| format!("{{address: {ip}}}")).collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: grpc}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {port}, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints: [{}]
",
        endpoints.join(", ")
    )
}

/// The Python client and its servers.
struct Client {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Client {
    /// Makes `n` calls per target; calls answered per server, and errors.
    async fn call(&mut self, n: usize) -> BTreeMap<String, serde_json::Value> {
        self.stdin
            .write_all(format!("call {n}\n").as_bytes())
            .await
            .unwrap();
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .expect("the client answered in time")
            .unwrap()
            .expect("the client is running");
        serde_json::from_str(&line).unwrap()
    }
}

fn answered(counts: &BTreeMap<String, serde_json::Value>, server: &str) -> u64 {
    counts.get(server).and_then(|v| v.as_u64()).unwrap_or(0)
}

#[tokio::test]
async fn a_grpc_client_resolves_and_follows_a_service_through_meshreg() {
    let python = repo().join(".venv/bin/python");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let servers: Vec<String> = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
        .iter()
        .map(|ip| format!("{ip}:{port}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echo.yaml");
    write_atomic(&file, &service_entry(port, &["127.0.0.21", "127.0.0.22"]));
    let daemon = Daemon::start(dir.path()).await;

    let bootstrap = dir.path().join("..bootstrap.json");
    std::fs::write(
        &bootstrap,
        serde_json::json!({
            "xds_servers": [{
                "server_uri": daemon.xds.to_string(),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "grpc-client~127.0.0.1~echo.grpc~grpc.svc.cluster.local",
                     "metadata": {"NAMESPACE": "grpc"}},
        })
        .to_string(),
    )
    .unwrap();
    // The full name, and two short forms istiod accepts from a client of
    // the service's namespace.
    let targets = format!("xds:///{HOST}:{port},xds:///echo.grpc:{port},xds:///echo:{port}");
    let mut child = Command::new(&python)
        .arg(repo().join("examples/grpc/echo.py"))
        .args(["--servers", &servers.join(","), "--targets", &targets])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python with grpcio in .venv (scripts/test.sh installs it)");
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("the client started in time")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));
    let mut client = Client {
        _child: child,
        stdin,
        stdout,
    };

    // Calls succeed on both targets and are spread over both endpoints.
    let counts = client.call(40).await;
    assert_eq!(counts["errors"], 0, "{counts:?}\n{}", daemon.log());
    assert!(answered(&counts, &servers[0]) > 0, "{counts:?}");
    assert!(answered(&counts, &servers[1]) > 0, "{counts:?}");
    assert_eq!(answered(&counts, &servers[2]), 0, "{counts:?}");

    // One endpoint removed, another added: traffic follows.
    write_atomic(&file, &service_entry(port, &["127.0.0.21", "127.0.0.23"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts = client.call(10).await;
        if answered(&counts, &servers[1]) == 0 && answered(&counts, &servers[2]) > 0 {
            break counts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "traffic did not follow the edit: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(counts["errors"], 0, "{counts:?}");
    let counts = client.call(40).await;
    assert_eq!(counts["errors"], 0, "{counts:?}");
    assert_eq!(answered(&counts, &servers[1]), 0, "{counts:?}");
    assert!(answered(&counts, &servers[0]) > 0 && answered(&counts, &servers[2]) > 0);

    // `meshreg ctl proxy-config routes` shows the client's route
    // configuration (that of the newest of its streams, one per target).
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_meshreg"))
        .args([
            "ctl",
            "--addr",
            &daemon.http.to_string(),
            "proxy-config",
            "routes",
        ])
        .arg("grpc-client~127.0.0.1~echo.grpc~grpc.svc.cluster.local")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&ctl.stdout);
    assert!(
        table.contains(&format!("outbound|{port}||{HOST}")),
        "{table}"
    );

    // meshreg served it over SotW, with no NACK.
    assert_eq!(daemon.metric("pilot_total_xds_rejects", &[]).await, 0.0);
    let pushes = daemon.metric("pilot_xds_pushes", &["type=\"lds\""]).await;
    assert!(pushes >= 1.0, "no LDS push counted");
}

/// The version and bytes of the one resource of type `type_url` named
/// `name`, as a gRPC client of namespace `grpc` gets it from `daemon` over
/// SotW.
async fn served(daemon: &Daemon, type_url: &str, name: &str) -> (String, Vec<u8>) {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use futures::StreamExt;

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .unwrap();
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let node = Node {
        id: "grpc-versions".into(),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_string(), string("grpc")),
                ("GENERATOR".to_string(), string("grpc")),
            ]
            .into(),
        }),
        ..Default::default()
    };
    let ask = DiscoveryRequest {
        node: Some(node),
        type_url: type_url.into(),
        resource_names: vec![name.into()],
        ..Default::default()
    };
    let mut answers = client
        .stream_aggregated_resources(
            futures::stream::iter(vec![ask]).chain(futures::stream::pending()),
        )
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("a response");
    assert_eq!(r.resources.len(), 1, "{type_url} {name}: {r:?}");
    (r.version_info, r.resources[0].value.clone())
}

#[tokio::test]
async fn two_processes_serve_the_same_listener_and_route_versions() {
    // Issue 14 item 4: versions come from the encoded bytes, so encoding
    // must not depend on a process's hash-map order.
    let dir = tempfile::tempdir().unwrap();
    write_atomic(
        &dir.path().join("echo.yaml"),
        &service_entry(50051, &["127.0.0.21", "127.0.0.22"]),
    );
    let (a, b) = (
        Daemon::start(dir.path()).await,
        Daemon::start(dir.path()).await,
    );
    let listener = format!("{HOST}:50051");
    let route = format!("outbound|50051||{HOST}");
    for (type_url, name) in [
        (
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            listener.as_str(),
        ),
        (
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            route.as_str(),
        ),
        (
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            route.as_str(),
        ),
    ] {
        let (va, ra) = served(&a, type_url, name).await;
        let (vb, rb) = served(&b, type_url, name).await;
        assert_eq!(ra, rb, "{type_url} {name}: the same bytes");
        if type_url.ends_with("Listener") || type_url.ends_with("Cluster") {
            // Full-state types: the version is a digest of the content.
            assert_eq!(va, vb, "{type_url} {name}");
        }
    }
}
