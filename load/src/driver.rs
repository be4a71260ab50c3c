//! The benchmark driver: meshreg's registry and xDS server in this process
//! (the same library code the daemon runs), a proxy fleet in a child
//! process, and the scenarios. Changes go straight into the registry
//! writer, so a change's clock starts when it enters the registry; the CPU
//! and memory of this process are the server's (the fleet's are reported
//! apart).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use meshreg_registry::{
    Address, Contribution, Endpoint, Location, Port, Protocol, Resolution, Service, SourceId,
    SourceKind, Update, Writer,
};
use meshreg_xds::{AdsService, Debounce, Generator, Metrics, Snapshot, TypeUrl};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Command, Reply};
use crate::procfs;
use crate::report::{Percentiles, Row};
use meshreg_load::clock::now_ns;
use meshreg_load::proxy::Mode;

/// A workload size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Profile {
    pub(crate) name: &'static str,
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    pub(crate) proxies: usize,
}

/// The named profiles.
pub(crate) const PROFILES: &[Profile] = &[
    Profile {
        name: "small",
        services: 100,
        endpoints: 5,
        proxies: 100,
    },
    Profile {
        name: "standard",
        services: 1_000,
        endpoints: 10,
        proxies: 1_000,
    },
    Profile {
        name: "large",
        services: 10_000,
        endpoints: 10,
        proxies: 2_000,
    },
    Profile {
        name: "large-wide",
        services: 1_000,
        endpoints: 100,
        proxies: 2_000,
    },
];

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) profile: Profile,
    pub(crate) mode: Mode,
    pub(crate) debounce: Debounce,
    /// Seconds each churn rate runs.
    pub(crate) churn_seconds: f64,
    pub(crate) churn_rates: Vec<u32>,
    /// Fail (exit non-zero) on any correctness violation.
    pub(crate) check: bool,
    /// Stop after the initial sync and the churn (the scale curve).
    pub(crate) churn_only: bool,
}

const CHURN_PROBE: u32 = 0;

/// How long the server is watched after a proxy's NACK.
const NACK_IDLE_SECONDS: u64 = 5;
const BURST_SERVICES: usize = 100;
const BURST_CHANGES: usize = 1_000;
const ADD_REMOVE_OPS: usize = 10;
const RECONNECT_CHANGES: usize = 10;

pub(crate) fn source() -> SourceId {
    SourceId::new(SourceKind::ServiceEntry, "meshreg-load")
}

fn hostname(i: usize) -> String {
    format!("svc-{i}.load.svc.cluster.local")
}

pub(crate) fn cluster(i: usize) -> String {
    meshreg_xds::cluster_name(8080, "", &hostname(i))
}

/// Service `i` with `endpoints` endpoints; `stamp` goes into the first
/// endpoint's weight, so a proxy can tell which change it holds.
pub(crate) fn contribution(i: usize, endpoints: usize, stamp: u32) -> Contribution {
    let src = source();
    Contribution {
        service: Service {
            hostname: hostname(i).into(),
            namespace: "load".into(),
            ports: vec![Port {
                name: "http".into(),
                number: 8080,
                protocol: Protocol::Http,
                target_port: None,
            }],
            resolution: Resolution::Static,
            location: Location::MeshInternal,
            labels: Default::default(),
            export_to: Vec::new(),
            addresses: Default::default(),
            workload_selector: None,
            source: src.clone(),
        },
        endpoints: (0..endpoints)
            .map(|j| Endpoint {
                weight: if j == 0 { stamp } else { 0 },
                ..Endpoint::new(Address::Ip(endpoint_ip(i, j).into()), src.clone())
            })
            .collect(),
    }
}

/// Endpoint `j` of service `i`: 10.0.0.0 + 256·i + j + 1, so every
/// service has its own /24 (profiles use at most 100 endpoints).
pub(crate) fn endpoint_ip(i: usize, j: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from_be_bytes([10, 0, 0, 0]) + (i as u32) * 256 + j as u32 + 1)
}

/// meshreg's registry and xDS server, on a runtime of their own.
pub(crate) struct Server {
    writer: Writer,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(crate) addr: SocketAddr,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Runtime,
}

impl Server {
    pub(crate) fn start(plan: &Plan) -> anyhow::Result<Server> {
        let p = plan.profile;
        Server::start_with(
            (0..p.services).map(|i| contribution(i, p.endpoints, 0)),
            plan.debounce,
        )
    }

    /// A server holding `services`, generating after `debounce`.
    pub(crate) fn start_with(
        services: impl Iterator<Item = Contribution>,
        debounce: Debounce,
    ) -> anyhow::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meshreg-server")
            .enable_all()
            .build()?;
        let (mut writer, reader) = meshreg_registry::new([source()]);
        let applied = writer.apply(Update::Reset {
            source: source(),
            objects: services.flat_map(Contribution::into_objects).collect(),
        });
        if let Some(e) = applied.rejected.first() {
            bail!("the registry refused {e}");
        }
        let generator = Generator::new();
        let snapshots = generator.subscribe();
        let metrics = Metrics::unregistered();
        let shutdown = CancellationToken::new();
        runtime.spawn(meshreg_xds::run_pusher(
            reader,
            generator,
            debounce,
            metrics.clone(),
            shutdown.clone(),
        ));
        let listener = {
            // Register the socket with the server's runtime, not the driver's.
            let _guard = runtime.enter();
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            // A connection storm of thousands must not overflow the backlog.
            socket.listen(4096)?
        };
        let addr = listener.local_addr()?;
        // Every simulated proxy connects from 127.0.0.1: the per-address
        // limits (1,000 connections by default) are the whole fleet's.
        let limits = meshreg_xds::Limits {
            max_connections_per_ip: meshreg_xds::Limits::default().max_connections,
            max_buffered_bytes_per_ip: meshreg_xds::Limits::default().max_buffered_bytes,
            ..meshreg_xds::Limits::default()
        };
        let service =
            AdsService::new(snapshots.clone(), metrics, shutdown.clone()).with_limits(limits);
        let token = shutdown.clone();
        runtime.spawn(async move {
            meshreg_xds::serve(service, listener, token.cancelled_owned()).await;
        });
        Ok(Server {
            writer,
            snapshots,
            addr,
            shutdown,
            runtime,
        })
    }

    /// Applies an update; returns the registry version it produced.
    pub(crate) fn apply(&mut self, update: Update) -> anyhow::Result<u64> {
        if let Some(e) = self.writer.apply(update).rejected.first() {
            bail!("the registry refused {e}");
        }
        Ok(self.writer.view().version())
    }

    /// The digests of the first snapshot that reflects registry `version`.
    async fn digests_at(&mut self, version: u64) -> anyhow::Result<(u64, u64)> {
        let snap = tokio::time::timeout(
            Duration::from_secs(60),
            self.snapshots
                .wait_for(|s| s.registry_version() >= version && s.is_ready()),
        )
        .await
        .context("the server did not generate in 60 s")??
        .clone();
        Ok(digests(&snap))
    }

    pub(crate) fn stop(self) {
        self.shutdown.cancel();
        // Called from the driver's runtime, where blocking is not allowed.
        self.runtime.shutdown_background();
    }
}

/// A snapshot's (CDS, EDS) digests: what a proxy holding exactly it has.
pub(crate) fn digests(snap: &Snapshot) -> (u64, u64) {
    (
        snap.digest(TypeUrl::Cluster),
        snap.digest(TypeUrl::ClusterLoadAssignment),
    )
}

/// The fleet child process.
pub(crate) struct Fleet {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    pid: String,
}

impl Fleet {
    pub(crate) async fn spawn(xds: SocketAddr, count: usize, mode: Mode) -> anyhow::Result<Fleet> {
        Fleet::spawn_in(xds, count, mode, 0).await
    }

    /// [`Fleet::spawn`] with the proxies spread over `namespaces`
    /// namespaces (see `Shared::namespaces`).
    pub(crate) async fn spawn_in(
        xds: SocketAddr,
        count: usize,
        mode: Mode,
        namespaces: usize,
    ) -> anyhow::Result<Fleet> {
        Fleet::spawn_with(xds, count, mode, namespaces, false).await
    }

    /// [`Fleet::spawn_in`]; with `leds`, the proxies take LEDS (see
    /// `Shared::leds`).
    pub(crate) async fn spawn_with(
        xds: SocketAddr,
        count: usize,
        mode: Mode,
        namespaces: usize,
        leds: bool,
    ) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe()?;
        let mode = match mode {
            Mode::Delta => "delta",
            Mode::Sotw => "sotw",
        };
        let mut child = Process::new(exe)
            .args([
                "proxies",
                "--xds",
                &xds.to_string(),
                "--count",
                &count.to_string(),
            ])
            .args(["--mode", mode])
            .args(["--namespaces", &namespaces.to_string()])
            .args(leds.then_some("--leds"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
        let stdin = child.stdin.take().context("fleet stdin")?;
        let stdout = child.stdout.take().context("fleet stdout")?;
        Ok(Fleet {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            pid,
        })
    }

    pub(crate) async fn call(&mut self, cmd: &Command) -> anyhow::Result<Reply> {
        let mut text = serde_json::to_string(cmd)?;
        text.push('\n');
        self.stdin.write_all(text.as_bytes()).await?;
        self.stdin.flush().await?;
        let line = self.lines.next_line().await?.context("the fleet exited")?;
        Ok(serde_json::from_str(&line)?)
    }

    pub(crate) async fn wait_view(
        &mut self,
        digests: (u64, u64),
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        self.call(&Command::WaitView {
            cds: digests.0,
            eds: digests.1,
            timeout_ms: timeout.as_millis() as u64,
        })
        .await
    }

    pub(crate) fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(&self.pid)
    }

    pub(crate) async fn exit(mut self) {
        let _ = self.call(&Command::Exit).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Resource use over one scenario.
struct Meter {
    cpu: f64,
    fleet_cpu: f64,
    counters: Reply,
    start_ns: u64,
}

impl Meter {
    async fn start(fleet: &mut Fleet) -> anyhow::Result<Meter> {
        procfs::reset_peak_rss();
        Ok(Meter {
            cpu: procfs::cpu_seconds("self"),
            fleet_cpu: fleet.cpu_seconds(),
            counters: fleet.call(&Command::Counters).await?,
            start_ns: now_ns(),
        })
    }

    async fn finish(&self, fleet: &mut Fleet, row: &mut Row) -> anyhow::Result<Reply> {
        let c = fleet.call(&Command::Counters).await?;
        row.server_cpu_s = procfs::cpu_seconds("self") - self.cpu;
        row.fleet_cpu_s = fleet.cpu_seconds() - self.fleet_cpu;
        row.peak_rss_mb = procfs::rss_bytes("self").1 as f64 / 1e6;
        row.wall_s = (now_ns() - self.start_ns) as f64 / 1e9;
        let mut diff = Reply::default();
        for t in 0..2 {
            diff.bytes[t] = c.bytes[t] - self.counters.bytes[t];
            diff.responses[t] = c.responses[t] - self.counters.responses[t];
            diff.resources[t] = c.resources[t] - self.counters.resources[t];
        }
        diff.errors = c.errors - self.counters.errors;
        Ok(diff)
    }
}

/// Runs every scenario of `plan`; returns the rows and whether every
/// correctness check passed.
pub(crate) async fn run(plan: &Plan) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let p = plan.profile;
    let n = p.proxies as f64;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut fail = |what: String| {
        eprintln!("CHECK FAILED: {what}");
        failures.push(what);
    };
    let sync_timeout = Duration::from_secs(300);
    let mut server = Server::start(plan)?;
    let mut version = server.writer.view().version();
    let mut seq: u32 = 0;

    // --- initial sync ---------------------------------------------------
    let mut row = Row::new("initial sync", plan);
    procfs::reset_peak_rss();
    let cpu0 = procfs::cpu_seconds("self");
    let t0 = now_ns();
    let mut fleet = Fleet::spawn(server.addr, p.proxies, plan.mode).await?;
    let target = server.digests_at(version).await?;
    let r = fleet.wait_view(target, sync_timeout).await?;
    row.server_cpu_s = procfs::cpu_seconds("self") - cpu0;
    row.fleet_cpu_s = fleet.cpu_seconds();
    row.peak_rss_mb = procfs::rss_bytes("self").1 as f64 / 1e6;
    row.wall_s = (now_ns() - t0) as f64 / 1e9;
    if !r.ok {
        fail(format!(
            "initial sync: {} of {} proxies synced",
            r.matching, p.proxies
        ));
    }
    row.latency = Some(Percentiles::single(
        (r.last_ns.saturating_sub(t0)) as f64 / 1e6,
    ));
    let c = fleet.call(&Command::Counters).await?;
    row.bytes_per_proxy = (c.bytes[0] + c.bytes[1]) as f64 / n;
    row.responses_per_proxy = (c.responses[0] + c.responses[1]) as f64 / n;
    row.note = format!("{} clusters + {} assignments each", p.services, p.services);
    eprintln!("{row}");
    rows.push(row);

    fleet
        .call(&Command::Probes {
            names: (0..BURST_SERVICES.min(p.services)).map(cluster).collect(),
        })
        .await?;

    // --- endpoint churn ----------------------------------------------------
    for &rate in &plan.churn_rates {
        let count = ((rate as f64 * plan.churn_seconds).ceil() as usize).max(1);
        let mut row = Row::new(&format!("churn {rate}/s"), plan);
        let meter = Meter::start(&mut fleet).await?;
        let mut changes = Vec::with_capacity(count);
        let mut starts = Vec::with_capacity(count);
        let begin = tokio::time::Instant::now();
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        for k in 0..count {
            tokio::time::sleep_until(begin + period * k as u32).await;
            seq += 1;
            starts.push(now_ns());
            version = server.apply(Update::contribution(
                source(),
                contribution(0, p.endpoints, seq),
            ))?;
            changes.push((CHURN_PROBE, seq));
        }
        let target = server.digests_at(version).await?;
        let view = fleet.wait_view(target, sync_timeout).await?;
        let conv = fleet
            .call(&Command::Convergence {
                changes: changes.clone(),
            })
            .await?;
        let diff = meter.finish(&mut fleet, &mut row).await?;
        if !view.ok || conv.missing > 0 || conv.out_of_order > 0 {
            fail(format!(
                "churn {rate}/s: {} proxies in sync, {} change arrivals missing, {} out of order",
                view.matching, conv.missing, conv.out_of_order
            ));
        }
        row.latency = Some(Percentiles::of_arrivals(&conv.arrivals_ns, &starts));
        row.bytes_per_proxy = (diff.bytes[0] + diff.bytes[1]) as f64 / n / count as f64;
        row.responses_per_proxy = (diff.responses[0] + diff.responses[1]) as f64 / n / count as f64;
        row.note = format!(
            "{count} changes; per proxy per change: {:.2} CDS + {:.2} EDS resources",
            diff.resources[0] as f64 / n / count as f64,
            diff.resources[1] as f64 / n / count as f64
        );
        eprintln!("{row}");
        rows.push(row);
    }

    if plan.churn_only {
        fleet.exit().await;
        server.stop();
        if plan.check && !failures.is_empty() {
            bail!("{} correctness checks failed", failures.len());
        }
        return Ok((rows, failures));
    }

    // --- service add / remove ------------------------------------------------
    let mut row = Row::new("service add+remove", plan);
    let meter = Meter::start(&mut fleet).await?;
    let mut lat = Vec::new();
    for k in 0..ADD_REMOVE_OPS * 2 {
        let i = p.services + k % ADD_REMOVE_OPS;
        let update = if k < ADD_REMOVE_OPS {
            Update::contribution(source(), contribution(i, p.endpoints, 0))
        } else {
            Update::withdraw(source(), "load", hostname(i).into())
        };
        let t0 = now_ns();
        version = server.apply(update)?;
        let target = server.digests_at(version).await?;
        let r = fleet.wait_view(target, sync_timeout).await?;
        if !r.ok {
            fail(format!(
                "service add/remove op {k}: {} proxies in sync",
                r.matching
            ));
        }
        lat.push(r.last_ns.saturating_sub(t0) as f64 / 1e6);
    }
    let diff = meter.finish(&mut fleet, &mut row).await?;
    let ops = (ADD_REMOVE_OPS * 2) as f64;
    row.latency = Some(Percentiles::of(lat));
    row.bytes_per_proxy = (diff.bytes[0] + diff.bytes[1]) as f64 / n / ops;
    row.responses_per_proxy = (diff.responses[0] + diff.responses[1]) as f64 / n / ops;
    row.note = format!(
        "{ADD_REMOVE_OPS} adds then {ADD_REMOVE_OPS} removes, one at a time; CDS bytes/proxy/op {:.0}",
        diff.bytes[0] as f64 / n / ops
    );
    eprintln!("{row}");
    rows.push(row);

    // --- burst ---------------------------------------------------------------
    let burst_services = BURST_SERVICES.min(p.services);
    let mut row = Row::new("burst", plan);
    let meter = Meter::start(&mut fleet).await?;
    let t0 = now_ns();
    let mut finals = Vec::new();
    for k in 0..BURST_CHANGES {
        let i = k % burst_services;
        seq += 1;
        version = server.apply(Update::contribution(
            source(),
            contribution(i, p.endpoints, seq),
        ))?;
        if k + burst_services >= BURST_CHANGES {
            finals.push((i as u32, seq));
        }
    }
    let burst_ms = (now_ns() - t0) as f64 / 1e6;
    let target = server.digests_at(version).await?;
    let view = fleet.wait_view(target, sync_timeout).await?;
    let conv = fleet
        .call(&Command::Convergence { changes: finals })
        .await?;
    let diff = meter.finish(&mut fleet, &mut row).await?;
    if !view.ok || conv.missing > 0 || conv.out_of_order > 0 {
        fail(format!(
            "burst: {} proxies equal to the registry, {} final versions missing, {} out of order",
            view.matching, conv.missing, conv.out_of_order
        ));
    }
    row.latency = Some(Percentiles::single(
        view.last_ns.saturating_sub(t0) as f64 / 1e6,
    ));
    row.bytes_per_proxy = (diff.bytes[0] + diff.bytes[1]) as f64 / n;
    row.responses_per_proxy = (diff.responses[0] + diff.responses[1]) as f64 / n;
    row.note = format!(
        "{BURST_CHANGES} changes over {burst_services} services applied in {burst_ms:.1} ms; views equal, {} out of order",
        conv.out_of_order
    );
    eprintln!("{row}");
    rows.push(row);

    // --- reconnect storm --------------------------------------------------------
    let mut row = Row::new("reconnect storm", plan);
    let down = fleet.call(&Command::Disconnect).await?;
    if !down.ok {
        fail(format!(
            "reconnect: only {} proxies disconnected",
            down.matching
        ));
    }
    let changed = RECONNECT_CHANGES.min(p.services);
    for k in 0..changed {
        let i = p.services - 1 - k;
        seq += 1;
        version = server.apply(Update::contribution(
            source(),
            contribution(i, p.endpoints, seq),
        ))?;
    }
    let target = server.digests_at(version).await?;
    let meter = Meter::start(&mut fleet).await?;
    let t0 = now_ns();
    fleet.call(&Command::Connect).await?;
    let r = fleet.wait_view(target, sync_timeout).await?;
    let diff = meter.finish(&mut fleet, &mut row).await?;
    if !r.ok {
        fail(format!(
            "reconnect: {} of {} proxies resynced",
            r.matching, p.proxies
        ));
    }
    let per_proxy = [diff.resources[0] as f64 / n, diff.resources[1] as f64 / n];
    if plan.mode == Mode::Delta && (per_proxy[0] != 0.0 || per_proxy[1] != changed as f64) {
        fail(format!(
            "reconnect (delta) resent {:.2} clusters and {:.2} assignments per proxy; only the {changed} changed assignments should be",
            per_proxy[0], per_proxy[1]
        ));
    }
    row.latency = Some(Percentiles::single(
        r.last_ns.saturating_sub(t0) as f64 / 1e6,
    ));
    row.bytes_per_proxy = (diff.bytes[0] + diff.bytes[1]) as f64 / n;
    row.responses_per_proxy = (diff.responses[0] + diff.responses[1]) as f64 / n;
    row.note = format!(
        "{changed} services changed while away; resent per proxy: {:.1} clusters, {:.1} assignments",
        per_proxy[0], per_proxy[1]
    );
    eprintln!("{row}");
    rows.push(row);

    // --- one proxy rejects a resource ----------------------------------------
    // Proxy 0 NACKs every response carrying service 0's cluster or
    // assignment; the change is a shape change (CDS and EDS). The NACKs
    // must not be answered: the proxy gets nothing more, and the server
    // idles, while every other proxy converges.
    let mut row = Row::new("one proxy NACKs", plan);
    let bad = cluster(0);
    fleet
        .call(&Command::Reject {
            name: Some(bad.clone()),
        })
        .await?;
    let before = fleet.call(&Command::Counters).await?;
    seq += 1;
    let mut c = contribution(0, p.endpoints, seq);
    c.service.ports[0].protocol = Protocol::Http2;
    version = server.apply(Update::contribution(source(), c))?;
    let target = server.digests_at(version).await?;
    let t0 = now_ns();
    let others = fleet.wait_view(target, Duration::from_secs(10)).await?;
    if others.matching + 1 != p.proxies {
        fail(format!(
            "one proxy NACKs: {} of the other {} proxies converged",
            others.matching,
            p.proxies - 1
        ));
    }
    let nacked = fleet.call(&Command::Counters).await?;
    let meter = Meter::start(&mut fleet).await?;
    tokio::time::sleep(Duration::from_secs(NACK_IDLE_SECONDS)).await;
    let diff = meter.finish(&mut fleet, &mut row).await?;
    let after = fleet.call(&Command::Counters).await?;
    let nacks = after.nacks - before.nacks;
    let idle_responses: u64 = (0..2)
        .map(|t| after.first_responses[t] - nacked.first_responses[t])
        .sum();
    // The proxy may reject a batch and then the bad resource alone.
    if nacks == 0 || nacks > 4 || after.nacks != nacked.nacks || idle_responses > 0 {
        fail(format!(
            "one proxy NACKs: {nacks} NACKs, {} while idle, {idle_responses} responses to it while idle",
            after.nacks - nacked.nacks
        ));
    }
    row.latency = Some(Percentiles::single(
        others.last_ns.saturating_sub(t0) as f64 / 1e6,
    ));
    row.bytes_per_proxy = (diff.bytes[0] + diff.bytes[1]) as f64 / n;
    row.responses_per_proxy = (diff.responses[0] + diff.responses[1]) as f64 / n;
    row.note = format!(
        "proxy 0 rejects {bad}: {nacks} NACKs in all; over the next {NACK_IDLE_SECONDS} s it got {idle_responses} responses (server CPU is for those {NACK_IDLE_SECONDS} s)"
    );
    eprintln!("{row}");
    rows.push(row);
    fleet.call(&Command::Reject { name: None }).await?;

    let errors = fleet.call(&Command::Counters).await?.errors;
    if errors > 0 {
        fail(format!("{errors} proxy streams failed"));
    }
    fleet.exit().await;
    server.stop();
    if plan.check && !failures.is_empty() {
        bail!("{} correctness checks failed", failures.len());
    }
    Ok((rows, failures))
}

/// One figure of the file-edit benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FileRow {
    /// ServiceEntry files in the directory.
    pub(crate) files: usize,
    pub(crate) mode: Mode,
    pub(crate) proxies: usize,
    /// Time from the write of one file to the last proxy holding the change.
    pub(crate) latency: Percentiles,
    /// Time from the write to the served snapshot holding it (the source,
    /// the registry, the debounce and generation).
    pub(crate) to_snapshot: Percentiles,
    /// Server CPU (adapter, registry, xDS) per edit, seconds.
    pub(crate) cpu_per_edit_s: f64,
    /// Server CPU over an idle window (rescans included), in cores.
    pub(crate) idle_cores: f64,
    /// Time from the adapter's start to every proxy synced.
    pub(crate) initial_sync_s: f64,
    pub(crate) peak_rss_mb: f64,
}

/// How long a change took ([`InProcess::converge`]), in ms from its
/// start.
pub(crate) struct Converged {
    /// Until the served snapshot held it.
    pub(crate) snapshot_ms: f64,
    /// Until the last proxy held it.
    pub(crate) last_proxy_ms: f64,
}

/// meshreg as the binary wires it (`meshreg::App`), in this process on a
/// runtime of its own, from a config text.
pub(crate) struct InProcess {
    pub(crate) xds: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<meshreg::Result<()>>,
    runtime: tokio::runtime::Runtime,
    config_path: std::path::PathBuf,
}

impl InProcess {
    /// Writes `config` to a temporary file named after `name`, binds and
    /// runs the daemon.
    pub(crate) async fn start(config: &str, name: &str) -> anyhow::Result<InProcess> {
        let config_path =
            std::env::temp_dir().join(format!("meshreg-load-{name}-{}.yaml", std::process::id()));
        std::fs::write(&config_path, config)?;
        let config =
            meshreg::Config::load(Some(&config_path)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meshreg-server")
            .enable_all()
            .build()?;
        let app = runtime
            .spawn(meshreg::App::bind(config, Some(config_path.clone())))
            .await??;
        let (xds, http, snapshots) = (app.xds_addr(), app.http_addr(), app.snapshots());
        let shutdown = CancellationToken::new();
        let (_reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let running = runtime.spawn(app.run(shutdown.clone(), reload_rx));
        Ok(InProcess {
            xds,
            http,
            snapshots,
            shutdown,
            running,
            runtime,
            config_path,
        })
    }

    /// Waits until the daemon is ready and serves `n` clusters.
    pub(crate) async fn wait_clusters(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Snapshot>> {
        Ok(tokio::time::timeout(
            timeout,
            self.snapshots
                .wait_for(|s| s.is_ready() && s.len(TypeUrl::Cluster) == n),
        )
        .await
        .with_context(|| format!("{n} clusters not served within {timeout:?}"))??
        .clone())
    }

    /// Makes a change (`change`) to the assignment `name` and times it:
    /// until the served snapshot holds it (the source, the registry and
    /// generation, before any send), and until every proxy of `fleet`
    /// holds that snapshot; `what` names the change in errors.
    pub(crate) async fn converge(
        &mut self,
        fleet: &mut Fleet,
        name: &str,
        what: &str,
        change: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Converged> {
        let before = self
            .snapshots
            .borrow()
            .get(TypeUrl::ClusterLoadAssignment, name)
            .map(|r| r.version.clone());
        let start = now_ns();
        change.await?;
        let snap = tokio::time::timeout(
            Duration::from_secs(30),
            self.snapshots.wait_for(|s| {
                s.get(TypeUrl::ClusterLoadAssignment, name)
                    .map(|r| r.version.clone())
                    != before
            }),
        )
        .await
        .with_context(|| format!("{what} did not reach the snapshot in 30 s"))??
        .clone();
        let snapshot_ms = now_ns().saturating_sub(start) as f64 / 1e6;
        let r = fleet
            .wait_view(digests(&snap), Duration::from_secs(30))
            .await?;
        if !r.ok {
            bail!("{what}: {} proxies converged", r.matching);
        }
        Ok(Converged {
            snapshot_ms,
            last_proxy_ms: r.last_ns.saturating_sub(start) as f64 / 1e6,
        })
    }

    /// Stops the daemon and removes its config file.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.running.await;
        self.runtime.shutdown_background();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// `files` one-service ServiceEntry files, then `edits` edits of one file
/// each, through the daemon itself ([`meshreg::App`]: the ServiceEntry
/// source, the registry thread, the xDS server) to `proxies` simulated
/// proxies.
pub(crate) async fn run_files(
    files: usize,
    proxies: usize,
    edits: usize,
    mode: Mode,
    debounce: Debounce,
) -> anyhow::Result<FileRow> {
    let dir =
        std::env::temp_dir().join(format!("meshreg-load-files-{}-{files}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // An edit changes the endpoint's weight: a change that removes
    // nothing, applied at once (one that removes an endpoint, a port or a
    // host waits for the source's 1 s removal grace).
    let entry = |i: usize, weight: usize| {
        let ip = endpoint_ip(i, 0);
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: f{i}, namespace: load}}\n\
             spec:\n  hosts: [f{i}.files.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
             \x20 ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  endpoints: [{{address: {ip}, weight: {weight}}}]\n"
        )
    };
    for i in 0..files {
        std::fs::write(dir.join(format!("f{i}.yaml")), entry(i, 1))?;
    }
    let config = format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: {}ms, max: {}ms}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        debounce.after.as_millis(),
        debounce.max.as_millis(),
        dir.display()
    );
    procfs::reset_peak_rss();
    let t0 = now_ns();
    let mut meshreg = InProcess::start(&config, &format!("files-{files}")).await?;
    let snap = meshreg
        .wait_clusters(files, Duration::from_secs(300))
        .await
        .context("the files were not all served")?;
    let addr = meshreg.xds;
    let mut fleet = Fleet::spawn(addr, proxies, mode).await?;
    let synced = fleet
        .wait_view(digests(&snap), Duration::from_secs(300))
        .await?;
    if !synced.ok {
        bail!("files: {} of {proxies} proxies synced", synced.matching);
    }
    let initial_sync_s = (synced.last_ns.saturating_sub(t0)) as f64 / 1e9;

    let mut latencies = Vec::new();
    let mut to_snapshot = Vec::new();
    let cpu0 = procfs::cpu_seconds("self");
    for k in 0..edits {
        let i = (k * 7919) % files;
        let name = format!("outbound|8080||f{i}.files.test");
        let path = dir.join(format!("f{i}.yaml"));
        let tmp = dir.join(format!(".f{i}.tmp"));
        std::fs::write(&tmp, entry(i, 2 + k % 50))?;
        let what = format!("files: edit {k}");
        let rename = async { Ok(std::fs::rename(&tmp, &path)?) };
        let c = meshreg.converge(&mut fleet, &name, &what, rename).await?;
        latencies.push(c.last_proxy_ms);
        to_snapshot.push(c.snapshot_ms);
    }
    let cpu_per_edit_s = (procfs::cpu_seconds("self") - cpu0) / edits.max(1) as f64;
    // Idle: longer than the default 5 s rescan interval.
    let idle = Duration::from_secs(6);
    let cpu1 = procfs::cpu_seconds("self");
    tokio::time::sleep(idle).await;
    let idle_cores = (procfs::cpu_seconds("self") - cpu1) / idle.as_secs_f64();
    let peak_rss_mb = procfs::rss_bytes("self").1 as f64 / 1e6;
    fleet.exit().await;
    meshreg.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(FileRow {
        files,
        mode,
        proxies,
        latency: Percentiles::of(latencies),
        to_snapshot: Percentiles::of(to_snapshot),
        cpu_per_edit_s,
        idle_cores,
        initial_sync_s,
        peak_rss_mb,
    })
}

/// One group of the LEDS scenario (see [`run_leds`]).
#[derive(Debug)]
pub(crate) struct LedsRow {
    pub(crate) group: &'static str,
    pub(crate) proxies: usize,
    pub(crate) endpoints: usize,
    /// Time for every proxy to hold the large service, from the fleet's
    /// start.
    pub(crate) sync_s: f64,
    /// Bytes each proxy received per change of one endpoint.
    pub(crate) bytes_per_proxy: f64,
    /// Resources each proxy received per change.
    pub(crate) resources_per_proxy: f64,
    /// From the change entering the registry to the last proxy.
    pub(crate) latency: Percentiles,
    /// Server CPU per change (generation and sends), ms.
    pub(crate) server_cpu_ms: f64,
}

/// Stamps `seq` into the large service of [`run_leds`] (service 0, of
/// `endpoints`) and waits up to `timeout_ms` until every proxy has it.
async fn stamp(
    server: &mut Server,
    fleet: &mut Fleet,
    endpoints: usize,
    seq: u32,
    timeout_ms: u64,
) -> anyhow::Result<bool> {
    server.apply(Update::contribution(
        source(),
        contribution(0, endpoints, seq),
    ))?;
    let r = fleet
        .call(&Command::WaitStamp {
            probe: 0,
            seq,
            timeout_ms,
        })
        .await?;
    Ok(r.ok)
}

/// One service of `endpoints` endpoints and `small` services of ten, each
/// group of `proxies` proxies in turn (delta taking LEDS, delta without,
/// SotW) on a fresh server: the weight of one endpoint changed `changes`
/// times, each waited for at every proxy.
pub(crate) async fn run_leds(
    endpoints: usize,
    small: usize,
    proxies: usize,
    changes: u32,
) -> anyhow::Result<Vec<LedsRow>> {
    // Service 0 is the large one; the small ones start past its addresses.
    let first_small = endpoints.div_ceil(256) + 1;
    let services = || {
        std::iter::once(contribution(0, endpoints, 0))
            .chain((first_small..first_small + small).map(|i| contribution(i, 10, 0)))
    };
    let groups: [(&'static str, Mode, bool); 3] = [
        ("delta, LEDS", Mode::Delta, true),
        ("delta, EDS", Mode::Delta, false),
        ("SotW, EDS", Mode::Sotw, false),
    ];
    let mut rows = Vec::new();
    for (group, mode, leds) in groups {
        let debounce = Debounce {
            after: Duration::ZERO,
            ..Debounce::default()
        };
        let mut server = Server::start_with(services(), debounce)?;
        let t0 = now_ns();
        let mut fleet = Fleet::spawn_with(server.addr, proxies, mode, 0, leds).await?;
        fleet
            .call(&Command::Probes {
                names: vec![cluster(0)],
            })
            .await?;
        // Every proxy holds the large service once it has its first stamp.
        let mut seq = 1;
        if !stamp(&mut server, &mut fleet, endpoints, seq, 300_000).await? {
            bail!("{group}: the fleet did not sync");
        }
        // LEDS: every member too, before anything is measured.
        let r = fleet
            .call(&Command::WaitHeld {
                clusters: 1 + small,
                assignments: 1 + small,
                members: if leds { endpoints } else { 0 },
                timeout_ms: 300_000,
            })
            .await?;
        if !r.ok {
            bail!("{group}: the fleet did not hold every resource");
        }
        let sync_s = (now_ns() - t0) as f64 / 1e9;
        let before = fleet.call(&Command::Counters).await?;
        let cpu0 = procfs::cpu_seconds("self");
        let mut starts = Vec::new();
        let mut waited = Vec::new();
        for _ in 0..changes {
            seq += 1;
            starts.push(now_ns());
            if !stamp(&mut server, &mut fleet, endpoints, seq, 60_000).await? {
                bail!("{group}: change {seq} did not reach every proxy");
            }
            waited.push((0, seq));
        }
        let server_cpu = procfs::cpu_seconds("self") - cpu0;
        let after = fleet.call(&Command::Counters).await?;
        let arrivals = fleet
            .call(&Command::Convergence { changes: waited })
            .await?;
        let per = (proxies as f64) * f64::from(changes);
        let bytes: u64 = (0..2).map(|t| after.bytes[t] - before.bytes[t]).sum();
        let resources: u64 = (0..2)
            .map(|t| after.resources[t] - before.resources[t])
            .sum();
        rows.push(LedsRow {
            group,
            proxies,
            endpoints,
            sync_s,
            bytes_per_proxy: bytes as f64 / per,
            resources_per_proxy: resources as f64 / per,
            latency: Percentiles::of_arrivals(&arrivals.arrivals_ns, &starts),
            server_cpu_ms: server_cpu * 1e3 / f64::from(changes),
        });
        fleet.exit().await;
        server.stop();
    }
    Ok(rows)
}
