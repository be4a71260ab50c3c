//! `meshreg-load consul`: the Consul source against a real Consul agent
//! (`consul agent -dev`, built by `scripts/peers.sh`) with N services of
//! one instance each, to a simulated fleet. Reports the time from a health
//! flip (a TTL check failed through the agent's API) to the last proxy
//! holding the new assignment, and the requests per second the source
//! makes against the agent while nothing changes.
//!
//! meshreg runs in this process as the binary wires it (`meshreg::App`
//! with a `consul` source); the agent and the fleet are child processes.
//! The agent's `limits.http_max_conns_per_client` is raised to hold one
//! blocking query per service (its default, 200, would refuse the rest).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use meshreg_xds::Debounce;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command as Process};

use crate::driver::{InProcess, digests, endpoint_ip};
use crate::procfs;
use crate::report::Percentiles;
use meshreg_load::clock::now_ns;
use meshreg_load::proxy::Mode;

/// One run's figures.
#[derive(Debug)]
pub(crate) struct ConsulRow {
    pub(crate) services: usize,
    pub(crate) proxies: usize,
    pub(crate) mode: Mode,
    pub(crate) agent: String,
    pub(crate) initial_sync_s: f64,
    pub(crate) flip: Percentiles,
    pub(crate) idle_requests_per_s: f64,
    pub(crate) peak_rss_mb: f64,
}

/// One HTTP/1.1 request; returns the status and the body.
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .context("no answer in 30 s")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A free loopback port.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The agent, killed (and its directory removed) on drop.
struct Agent {
    _child: Child,
    http: SocketAddr,
    dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    async fn start(bin: &Path, services: usize) -> anyhow::Result<Agent> {
        let dir = std::env::temp_dir().join(format!("meshreg-load-consul-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = std::fs::File::create(dir.join("consul.log"))?;
        let child = Process::new(bin)
            .args(["agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn"])
            .arg(format!("-http-port={}", addr.port()))
            .arg("-dns-port=-1")
            .arg(format!("-serf-lan-port={}", free_port()?))
            .arg(format!("-serf-wan-port={}", free_port()?))
            .arg(format!("-server-port={}", free_port()?))
            .arg(format!(
                "-hcl=ports {{ grpc = -1 grpc_tls = -1 }} limits {{ http_max_conns_per_client = {} }}",
                services * 2 + 100
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let agent = Agent {
            _child: child,
            http: addr,
            dir,
        };
        let deadline = now_ns() + 60_000_000_000;
        loop {
            if let Ok((200, body)) = http(agent.http, "GET", "/v1/status/leader", "").await
                && body.contains(':')
            {
                return Ok(agent);
            }
            if now_ns() > deadline {
                bail!("the Consul agent has no leader after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn put(&self, path: &str, body: &str) -> anyhow::Result<()> {
        match http(self.http, "PUT", path, body).await? {
            (200, _) => Ok(()),
            (status, body) => bail!("PUT {path}: {status} {body}"),
        }
    }
}

/// The total of `meshreg_source_requests_total` on meshreg's `/metrics`.
async fn requests(http_addr: SocketAddr) -> anyhow::Result<f64> {
    let (_, text) = http(http_addr, "GET", "/metrics", "").await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("meshreg_source_requests_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// Runs the benchmark (see the module docs).
pub(crate) async fn run_consul(
    services: usize,
    proxies: usize,
    flips: usize,
    mode: Mode,
    peer: PathBuf,
    idle: Duration,
    debounce: Debounce,
) -> anyhow::Result<ConsulRow> {
    let agent = Agent::start(&peer, services).await?;
    // `Consul v1.14.11` (the first line of `consul version`).
    let version = Process::new(&peer)
        .arg("version")
        .output()
        .await
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_default();
    // Registered 32 at a time.
    for chunk in (0..services).collect::<Vec<_>>().chunks(32) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let addr = agent.http;
            let body = serde_json::json!({
                "ID": format!("s{i}"), "Name": format!("s{i}"),
                "Address": endpoint_ip(i, 0).to_string(), "Port": 8080,
                "Check": {"CheckID": format!("s{i}-ttl"), "TTL": "1h", "Status": "passing"},
            })
            .to_string();
            set.spawn(async move { http(addr, "PUT", "/v1/agent/service/register", &body).await });
        }
        while let Some(r) = set.join_next().await {
            let (status, body) = r??;
            if status != 200 {
                bail!("registering a service: {status} {body}");
            }
        }
    }
    let config = format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: {}ms, max: {}ms}}\n\
         sources: [{{kind: consul, address: 'http://{}', wait: 5m, max_concurrent_queries: {}}}]\n",
        debounce.after.as_millis(),
        debounce.max.as_millis(),
        agent.http,
        // One blocking query per service, as the agent's raised limit allows.
        services + 10
    );
    procfs::reset_peak_rss();
    let t0 = now_ns();
    // Consul's own `consul` service is one more.
    let mut meshreg = InProcess::start(&config, "consul").await?;
    let snap = meshreg
        .wait_clusters(services + 1, Duration::from_secs(300))
        .await?;
    let mut fleet = crate::driver::Fleet::spawn(meshreg.xds, proxies, mode).await?;
    let synced = fleet
        .wait_view(digests(&snap), Duration::from_secs(300))
        .await?;
    if !synced.ok {
        bail!("consul: {} of {proxies} proxies synced", synced.matching);
    }
    let initial_sync_s = synced.last_ns.saturating_sub(t0) as f64 / 1e9;

    // Idle: nothing changes; only blocking queries whose wait ran out.
    let r0 = requests(meshreg.http).await?;
    tokio::time::sleep(idle).await;
    let idle_requests_per_s = (requests(meshreg.http).await? - r0) / idle.as_secs_f64();

    let mut latencies = Vec::new();
    for k in 0..flips {
        let i = (k * 7919) % services;
        let name = format!("outbound|8080||s{i}.service.consul");
        let path = format!("/v1/agent/check/fail/s{i}-ttl");
        let flip = agent.put(&path, "");
        let what = format!("consul: flip {k}");
        latencies.push(
            meshreg
                .converge(&mut fleet, &name, &what, flip)
                .await?
                .last_proxy_ms,
        );
    }
    let peak_rss_mb = procfs::rss_bytes("self").1 as f64 / 1e6;
    fleet.exit().await;
    meshreg.stop().await;
    Ok(ConsulRow {
        services,
        proxies,
        mode,
        agent: version,
        initial_sync_s,
        flip: Percentiles::of(latencies),
        idle_requests_per_s,
        peak_rss_mb,
    })
}
