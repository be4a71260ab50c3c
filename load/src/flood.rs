//! `meshreg-load flood`: what a bounded local flood does to a daemon with
//! its default limits (issue 18), measured, not asserted.
//!
//! meshreg runs in this process as the binary wires it ([`InProcess`]: a
//! ServiceEntry directory of one service, default `xds.limits` and HTTP
//! limits), a real Envoy follows it over delta ADS, and a child process
//! (`meshreg-load flood-client`) floods both ports from loopback:
//!
//! - idle TCP connections to the xDS port that never send the HTTP/2
//!   preface, spread over source addresses `127.0.0.2…` below the per-IP
//!   limit, plus some over it from one address;
//! - HTTP/2 streams that each send a 4 MiB request minus its last 100 bytes
//!   (the shared buffer for incomplete requests is what bounds them);
//! - gRPC streams (from `127.0.0.1`, like the Envoy) that send NACKs with
//!   invented nonces as fast as they can, reconnecting whenever the server
//!   closes them;
//! - idle connections to the HTTP port from one address.
//!
//! Reported: the edit latency the real Envoy sees (a file rewritten with a
//! new endpoint weight, until Envoy's `/clusters` shows it) before and
//! during the flood, the time `/metrics` takes to answer during it, this
//! process's RSS (the server; Envoy and the flood are child processes)
//! before, at its peak and after, and `meshreg_xds_limit_hits_total` and
//! the HTTP port's refusals per limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command as Process};

use crate::driver::InProcess;
use crate::procfs;
use crate::report::Percentiles;

/// The flood's shape (arguments of `flood` and of `flood-client`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct Shape {
    /// Idle xDS connections (900 per loopback source address).
    #[arg(long, default_value_t = 5000)]
    pub(crate) idle: usize,
    /// Idle xDS connections over the per-IP limit, from one address.
    #[arg(long, default_value_t = 500)]
    pub(crate) over_ip: usize,
    /// Streams that each half-send a 4 MiB request.
    #[arg(long, default_value_t = 100)]
    pub(crate) half_sent: usize,
    /// Source addresses the half-sent streams come from (8 streams per
    /// connection, connections spread over them).
    #[arg(long, default_value_t = 1)]
    pub(crate) half_sent_addresses: usize,
    /// Streams flooding NACKs with invented nonces.
    #[arg(long, default_value_t = 10)]
    pub(crate) nack_streams: usize,
    /// Idle connections to the HTTP port, from one address.
    #[arg(long, default_value_t = 1000)]
    pub(crate) http_idle: usize,
}

/// Connections per source address for the spread idle ones: below the
/// default `max_connections_per_ip` (1,000).
const PER_ADDRESS: usize = 900;

/// One run's figures.
#[derive(Debug)]
pub(crate) struct FloodRow {
    pub(crate) shape: Shape,
    pub(crate) opened: String,
    pub(crate) edit_before: Percentiles,
    pub(crate) edit_during: Percentiles,
    pub(crate) metrics_during_ms: Percentiles,
    pub(crate) rss_before_mb: f64,
    pub(crate) rss_peak_mb: f64,
    pub(crate) rss_after_mb: f64,
    pub(crate) hits: Vec<(String, f64)>,
}

const HOST: &str = "flood.example";

/// The least time the flood lasts while edits are measured.
const FLOOD_FOR: Duration = Duration::from_secs(15);

fn service_entry(weight: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: flood, namespace: default}}\n\
         spec:\n  hosts: [{HOST}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{{number: 80, name: http, protocol: HTTP}}]\n\
         \x20 endpoints: [{{address: 10.0.0.1, weight: {weight}}}]\n"
    )
}

/// Runs the flood scenario: `edits` edits before and as many during the
/// flood.
pub(crate) async fn run(shape: Shape, edits: usize, envoy_bin: &Path) -> anyhow::Result<FloodRow> {
    raise_fd_limit();
    let dir = tempfile_dir("flood")?;
    let file = dir.join("flood.yaml");
    std::fs::write(&file, service_entry(1))?;
    let config = format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         sources:\n- kind: serviceentry\n  dir: {}\n",
        dir.display()
    );
    let mut server = InProcess::start(&config, "flood").await?;
    let envoy_dir = tempfile_dir("flood-envoy")?;
    // The server is stopped whatever happens: dropping it inside this
    // runtime would panic and hide the error.
    let measured = measure(&mut server, shape, edits, envoy_bin, &file, &envoy_dir).await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&envoy_dir);
    measured
}

/// The measurements of [`run`] against the started `server`.
async fn measure(
    server: &mut InProcess,
    shape: Shape,
    edits: usize,
    envoy_bin: &Path,
    file: &Path,
    envoy_dir: &Path,
) -> anyhow::Result<FloodRow> {
    server.wait_clusters(1, Duration::from_secs(30)).await?;
    let envoy = Envoy::start(envoy_bin, server.xds, envoy_dir).await?;
    let cluster = format!("outbound|80||{HOST}");
    envoy
        .wait_weight(&cluster, 1, Duration::from_secs(30))
        .await
        .context("Envoy never got the cluster")?;

    let mut weight = 1;
    let edit = async |weight: &mut u32| -> anyhow::Result<f64> {
        *weight += 1;
        let started = Instant::now();
        write_atomic(file, &service_entry(*weight))?;
        envoy
            .wait_weight(&cluster, *weight, Duration::from_secs(30))
            .await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(ms)
    };
    let mut before = Vec::with_capacity(edits);
    for _ in 0..edits {
        before.push(edit(&mut weight).await?);
    }
    let rss_before = procfs::rss_bytes("self").0;
    procfs::reset_peak_rss();

    let mut flood = spawn_client(shape, server.xds, server.http)?;
    let opened = wait_line(&mut flood, Duration::from_secs(120)).await?;
    // Edits through the flood, for at least `FLOOD_FOR` (past the
    // server's 10 s preface timeout, so those closes are in the figures).
    let flooding = Instant::now();
    let mut during = Vec::with_capacity(edits);
    let mut metrics_ms = Vec::with_capacity(edits);
    while during.len() < edits || flooding.elapsed() < FLOOD_FOR {
        during.push(edit(&mut weight).await?);
        let started = Instant::now();
        http_get(server.http, "/metrics").await?;
        metrics_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let rss_peak = procfs::rss_bytes("self").1;
    flood.kill().await.ok();
    // The server closes what the client left half-open (its preface and
    // first-request timeouts, 10 s and 30 s by default).
    tokio::time::sleep(Duration::from_secs(35)).await;
    let rss_after = procfs::rss_bytes("self").0;
    let metrics = http_get(server.http, "/metrics").await?;
    let hits = metrics
        .lines()
        .filter(|l| {
            (l.starts_with("meshreg_xds_limit_hits_total{")
                || l.starts_with("meshreg_http_refused_total{"))
                && !l.ends_with(" 0")
        })
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect();
    drop(envoy);
    let mb = |b: u64| b as f64 / 1_048_576.0;
    Ok(FloodRow {
        shape,
        opened,
        edit_before: Percentiles::of(before),
        edit_during: Percentiles::of(during),
        metrics_during_ms: Percentiles::of(metrics_ms),
        rss_before_mb: mb(rss_before),
        rss_peak_mb: mb(rss_peak),
        rss_after_mb: mb(rss_after),
        hits,
    })
}

/// The file-descriptor limit raised to its hard limit, as the daemon does
/// at start (the flood needs thousands of sockets on both sides).
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

fn tempfile_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshreg-load-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A minimal HTTP/1.1 GET (`Connection: close`); the body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .with_context(|| format!("GET {path} timed out"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// A real Envoy on delta ADS, killed on drop.
struct Envoy {
    _child: Child,
    admin: SocketAddr,
}

impl Envoy {
    async fn start(bin: &Path, xds: SocketAddr, dir: &Path) -> anyhow::Result<Envoy> {
        let bootstrap = dir.join("envoy.yaml");
        let admin_path = dir.join("envoy-admin");
        std::fs::write(
            &bootstrap,
            format!(
                "node: {{id: flood-envoy, cluster: flood}}\n\
                 admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}\n\
                 dynamic_resources:\n\
                 \x20 ads_config: {{api_type: DELTA_GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}\n\
                 \x20 cds_config: {{ads: {{}}, resource_api_version: V3}}\n\
                 static_resources:\n\
                 \x20 clusters:\n\
                 \x20 - name: xds\n\
                 \x20   type: STATIC\n\
                 \x20   typed_extension_protocol_options:\n\
                 \x20     envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n\
                 \x20       \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n\
                 \x20       explicit_http_config: {{http2_protocol_options: {{}}}}\n\
                 \x20   load_assignment:\n\
                 \x20     cluster_name: xds\n\
                 \x20     endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]\n",
                xds.ip(),
                xds.port()
            ),
        )?;
        let child = Process::new(bin)
            .arg("-c")
            .arg(&bootstrap)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--use-dynamic-base-id")
            .arg("-l")
            .arg("warning")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run Envoy {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Some(a) = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break a;
            }
            if Instant::now() > deadline {
                bail!("Envoy wrote no admin address");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Envoy {
            _child: child,
            admin,
        })
    }

    /// Polls `/clusters` (every 2 ms) until `cluster`'s endpoint has
    /// `weight`.
    async fn wait_weight(
        &self,
        cluster: &str,
        weight: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let want = format!("{cluster}::10.0.0.1:80::weight::{weight}");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(body) = http_get(self.admin, "/clusters").await
                && body.lines().any(|l| l == want)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Envoy did not show weight {weight} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn spawn_client(shape: Shape, xds: SocketAddr, http: SocketAddr) -> anyhow::Result<Child> {
    Ok(Process::new(std::env::current_exe()?)
        .arg("flood-client")
        .args(["--xds", &xds.to_string(), "--http", &http.to_string()])
        .args(["--idle", &shape.idle.to_string()])
        .args(["--over-ip", &shape.over_ip.to_string()])
        .args(["--half-sent", &shape.half_sent.to_string()])
        .args([
            "--half-sent-addresses",
            &shape.half_sent_addresses.to_string(),
        ])
        .args(["--nack-streams", &shape.nack_streams.to_string()])
        .args(["--http-idle", &shape.http_idle.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

/// The first line `child` prints (what it opened).
async fn wait_line(child: &mut Child, timeout: Duration) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .context("the flood client did not start in time")??
        .context("the flood client exited")?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(line)
}

/// `127.0.0.<n>`.
fn loopback(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, (n / 250) as u8, (n % 250 + 2) as u8))
}

/// A TCP connection to `to` from `from`; `None` if refused or reset.
async fn connect_from(from: IpAddr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    socket.connect(to).await.ok()
}

/// The flood client (`meshreg-load flood-client`): opens what `shape` says,
/// prints one line of what it got, and keeps flooding until killed.
pub(crate) async fn client(shape: Shape, xds: SocketAddr, http: SocketAddr) -> anyhow::Result<()> {
    raise_fd_limit();
    // Idle xDS connections, `PER_ADDRESS` per source address.
    let mut held = Vec::with_capacity(shape.idle + shape.over_ip + shape.http_idle);
    let mut idle = 0;
    for i in 0..shape.idle {
        if let Some(s) = connect_from(loopback(i / PER_ADDRESS), xds).await {
            held.push(s);
            idle += 1;
        }
    }
    // Over the per-IP limit from the first address (refused at accept:
    // the connect succeeds, the server closes it at once).
    let mut over = 0;
    for _ in 0..shape.over_ip {
        if let Some(s) = connect_from(loopback(0), xds).await {
            held.push(s);
            over += 1;
        }
    }
    let mut http_idle = 0;
    let http_from = loopback(shape.idle / PER_ADDRESS + 1);
    // (half-sent streams use the addresses after it)
    for _ in 0..shape.http_idle {
        if let Some(s) = connect_from(http_from, http).await {
            held.push(s);
            http_idle += 1;
        }
    }
    // Half-sent 4 MiB requests, 8 streams per connection, the connections
    // spread over `half_sent_addresses` addresses.
    let mut half = Vec::new();
    let mut remaining = shape.half_sent;
    let mut connection = 0;
    while remaining > 0 {
        let n = remaining.min(8);
        remaining -= n;
        let from =
            loopback(shape.idle / PER_ADDRESS + 2 + connection % shape.half_sent_addresses.max(1));
        connection += 1;
        let Some(tcp) = connect_from(from, xds).await else {
            continue;
        };
        let Ok((h2, conn)) = h2::client::handshake(tcp).await else {
            continue;
        };
        tokio::spawn(conn);
        for _ in 0..n {
            let Ok(mut h2) = h2.clone().ready().await else {
                break;
            };
            let req = http::Request::post(format!(
                "http://{xds}/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
            let Ok((_resp, mut body)) = h2.send_request(req, false) else {
                break;
            };
            // A gRPC frame header announcing 4 MiB, then all but 100 bytes.
            let len: u32 = 4 * 1024 * 1024;
            let mut data = Vec::with_capacity(len as usize + 5);
            data.push(0);
            data.extend_from_slice(&len.to_be_bytes());
            data.resize(len as usize + 5 - 100, 0);
            body.reserve_capacity(data.len());
            let _ = body.send_data(Bytes::from(data), false);
            half.push(body);
        }
    }
    println!(
        "{idle} idle xDS connections, {over} over the per-IP limit, {http_idle} idle HTTP connections, {} half-sent streams opened",
        half.len()
    );
    // NACK floods, reconnecting whenever closed.
    for _ in 0..shape.nack_streams {
        tokio::spawn(nack_flood(xds));
    }
    std::future::pending::<()>().await;
    drop((held, half));
    Ok(())
}

/// One stream of NACKs with invented nonces, as fast as the server takes
/// them; a new stream whenever the server closes it.
async fn nack_flood(xds: SocketAddr) {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    let mut nonce = 0u64;
    loop {
        let Ok(mut client) =
            AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let first = DiscoveryRequest {
            type_url: CDS.into(),
            node: Some(envoy_types::pb::envoy::config::core::v3::Node {
                id: format!("flood-nack-{nonce}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        if tx.send(first).await.is_err() {
            continue;
        }
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        // Reads the answers until the server ends the stream, which drops
        // the request stream and so stops the loop below.
        let call = tokio::spawn(async move {
            if let Ok(answers) = client.stream_aggregated_resources(requests).await {
                let mut answers = answers.into_inner();
                while let Ok(Some(_)) = answers.message().await {}
            }
        });
        loop {
            nonce += 1;
            let nack = DiscoveryRequest {
                type_url: CDS.into(),
                response_nonce: format!("invented-{nonce}"),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: "invented\nWARN forged line".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            if tx.send(nack).await.is_err() || call.is_finished() {
                break;
            }
        }
        call.abort();
    }
}
