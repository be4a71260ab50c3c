//! Side by side: the same workload, fleet and changes against meshreg (in
//! this process, as `run` does) and against a go-control-plane server (the
//! peer built by `scripts/peers.sh` from envoyproxy/go-control-plane, with
//! its LinearCache or its SnapshotCache), in one run, so the ratios compare
//! measurements taken on the same machine at the same time.
//!
//! Both servers are measured the same way, from the proxies' side: initial
//! sync ends when every proxy holds every cluster and assignment; a change
//! is the first endpoint's weight stamp of service 0 (the peer serves
//! resources equal field for field to meshreg's, see
//! `peers/go-control-plane/main.go`), and its latency is the time from the
//! moment the driver hands it to the server until the last proxy has it.
//! Server CPU and peak RSS come from /proc: this process for meshreg (its
//! registry and xDS server run here), the child process for the peer.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use meshreg_registry::Update;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};

use crate::driver::{Fleet, Plan, Server, cluster, contribution, source};
use crate::fleet::Command;
use crate::procfs;
use crate::report::{Percentiles, Row};
use meshreg_load::clock::now_ns;

/// What `compare` runs.
#[derive(Debug, Clone)]
pub(crate) struct Comparison {
    pub(crate) plan: Plan,
    /// The go-control-plane peer binary.
    pub(crate) peer: PathBuf,
    /// Its caches to measure ("linear", "snapshot").
    pub(crate) caches: Vec<String>,
    /// Endpoint changes per second, and for how long.
    pub(crate) churn_rate: u32,
}

/// A server under test.
enum Target {
    Meshreg(Server),
    Peer {
        child: Child,
        stdin: ChildStdin,
        lines: Lines<BufReader<ChildStdout>>,
        pid: String,
    },
}

impl Target {
    async fn peer(bin: &PathBuf, cache: &str, plan: &Plan) -> anyhow::Result<(Target, String)> {
        let mut child = Process::new(bin)
            .args(["-cache", cache])
            .args(["-services", &plan.profile.services.to_string()])
            .args(["-endpoints", &plan.profile.endpoints.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
        let stdin = child.stdin.take().context("peer stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("peer stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the peer did not start in 60 s")??
            .context("the peer exited")?;
        let addr = first
            .strip_prefix("listening ")
            .with_context(|| format!("unexpected first line from the peer: {first:?}"))?
            .to_string();
        Ok((
            Target::Peer {
                child,
                stdin,
                lines,
                pid,
            },
            addr,
        ))
    }

    /// Service `i`'s first endpoint gets weight `stamp`.
    async fn stamp(&mut self, i: usize, endpoints: usize, stamp: u32) -> anyhow::Result<()> {
        match self {
            Target::Meshreg(server) => {
                server.apply(Update::contribution(
                    source(),
                    contribution(i, endpoints, stamp),
                ))?;
            }
            Target::Peer { stdin, lines, .. } => {
                let line = format!("{{\"op\":\"stamp\",\"service\":{i},\"stamp\":{stamp}}}\n");
                stdin.write_all(line.as_bytes()).await?;
                stdin.flush().await?;
                let answer = lines.next_line().await?.context("the peer exited")?;
                if answer != "ok" {
                    bail!("the peer answered {answer:?}");
                }
            }
        }
        Ok(())
    }

    fn pid(&self) -> &str {
        match self {
            Target::Meshreg(_) => "self",
            Target::Peer { pid, .. } => pid,
        }
    }

    fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    async fn stop(self) {
        match self {
            Target::Meshreg(server) => server.stop(),
            Target::Peer { mut child, .. } => {
                let _ = child.kill().await;
            }
        }
    }
}

/// Runs the comparison; returns one row per server and scenario, the
/// server's name in `note`.
pub(crate) async fn run(c: &Comparison) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut targets: Vec<String> = vec!["meshreg".into()];
    targets.extend(c.caches.iter().map(|k| format!("go-control-plane {k}")));
    for name in targets {
        rows.extend(measure(c, &name).await?);
    }
    Ok(rows)
}

async fn measure(c: &Comparison, name: &str) -> anyhow::Result<Vec<Row>> {
    let plan = &c.plan;
    let p = plan.profile;
    let n = p.proxies as f64;
    let timeout_ms = 300_000;
    let (mut target, addr) = match name.strip_prefix("go-control-plane ") {
        None => {
            let server = Server::start(plan)?;
            let addr = server.addr.to_string();
            (Target::Meshreg(server), addr)
        }
        Some(cache) => Target::peer(&c.peer, cache, plan).await?,
    };
    let mut rows = Vec::new();

    // --- initial sync ---------------------------------------------------
    let mut row = Row::new("initial sync", plan);
    target.reset_peak_rss();
    let cpu0 = procfs::cpu_seconds(target.pid());
    let t0 = now_ns();
    let mut fleet = Fleet::spawn(addr.parse()?, p.proxies, plan.mode).await?;
    let r = fleet
        .call(&Command::WaitHeld {
            clusters: p.services,
            assignments: p.services,
            members: 0,
            timeout_ms,
        })
        .await?;
    if !r.ok {
        bail!(
            "{name}: only {} of {} proxies synced",
            r.matching,
            p.proxies
        );
    }
    row.latency = Some(Percentiles::single(
        r.last_ns.saturating_sub(t0) as f64 / 1e6,
    ));
    row.wall_s = (now_ns() - t0) as f64 / 1e9;
    row.server_cpu_s = procfs::cpu_seconds(target.pid()) - cpu0;
    row.fleet_cpu_s = fleet.cpu_seconds();
    row.peak_rss_mb = procfs::rss_bytes(target.pid()).1 as f64 / 1e6;
    let counters = fleet.call(&Command::Counters).await?;
    row.bytes_per_proxy = (counters.bytes[0] + counters.bytes[1]) as f64 / n;
    row.responses_per_proxy = (counters.responses[0] + counters.responses[1]) as f64 / n;
    row.note = name.to_string();
    eprintln!("{row}");
    rows.push(row);

    // --- endpoint churn on one service -------------------------------------
    fleet
        .call(&Command::Probes {
            names: vec![cluster(0)],
        })
        .await?;
    let count = ((c.churn_rate as f64 * plan.churn_seconds).ceil() as usize).max(1);
    let mut row = Row::new(&format!("churn {}/s", c.churn_rate), plan);
    target.reset_peak_rss();
    let cpu0 = procfs::cpu_seconds(target.pid());
    let fleet_cpu0 = fleet.cpu_seconds();
    let before = fleet.call(&Command::Counters).await?;
    let begin = tokio::time::Instant::now();
    let t0 = now_ns();
    let period = Duration::from_secs_f64(1.0 / c.churn_rate as f64);
    let mut starts = Vec::with_capacity(count);
    let mut changes = Vec::with_capacity(count);
    for k in 0..count {
        tokio::time::sleep_until(begin + period * k as u32).await;
        let seq = k as u32 + 1;
        starts.push(now_ns());
        target.stamp(0, p.endpoints, seq).await?;
        changes.push((0, seq));
    }
    let last = fleet
        .call(&Command::WaitStamp {
            probe: 0,
            seq: count as u32,
            timeout_ms,
        })
        .await?;
    if !last.ok {
        bail!(
            "{name}: the last change reached {} of {} proxies",
            last.matching,
            p.proxies
        );
    }
    let conv = fleet.call(&Command::Convergence { changes }).await?;
    let after = fleet.call(&Command::Counters).await?;
    row.wall_s = (now_ns() - t0) as f64 / 1e9;
    row.server_cpu_s = procfs::cpu_seconds(target.pid()) - cpu0;
    row.fleet_cpu_s = fleet.cpu_seconds() - fleet_cpu0;
    row.peak_rss_mb = procfs::rss_bytes(target.pid()).1 as f64 / 1e6;
    row.latency = Some(Percentiles::of_arrivals(&conv.arrivals_ns, &starts));
    let per_change = n * count as f64;
    row.bytes_per_proxy =
        (after.bytes[0] + after.bytes[1] - before.bytes[0] - before.bytes[1]) as f64 / per_change;
    row.responses_per_proxy = (after.responses[0] + after.responses[1]
        - before.responses[0]
        - before.responses[1]) as f64
        / per_change;
    // A proxy that got a later change first counts the earlier one as
    // arrived then (coalesced: fewer than one response per change).
    row.note = format!("{name}; {count} changes");
    if conv.out_of_order > 0 {
        row.note += &format!(", {} stamps arrived out of order", conv.out_of_order);
    }
    eprintln!("{row}");
    rows.push(row);

    fleet.exit().await;
    target.stop().await;
    Ok(rows)
}

/// Ratio lines: each peer's figures over meshreg's, per scenario.
pub(crate) fn ratios(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for base in rows.iter().filter(|r| r.note.starts_with("meshreg")) {
        for other in rows.iter().filter(|r| {
            r.scenario == base.scenario && r.mode == base.mode && !r.note.starts_with("meshreg")
        }) {
            let (Some(a), Some(b)) = (&base.latency, &other.latency) else {
                continue;
            };
            let ratio = |x: f64, y: f64| if x > 0.0 { y / x } else { f64::NAN };
            let peer = other.note.split(';').next().unwrap_or_default();
            out.push(format!(
                "{} ({:?}): {peer} / meshreg: p50 {:.1}x, p99 {:.1}x, server CPU {:.1}x, peak RSS {:.1}x, bytes/proxy {:.2}x",
                base.scenario,
                base.mode,
                ratio(a.p50, b.p50),
                ratio(a.p99, b.p99),
                ratio(base.server_cpu_s, other.server_cpu_s),
                ratio(base.peak_rss_mb, other.peak_rss_mb),
                ratio(base.bytes_per_proxy, other.bytes_per_proxy),
            ));
        }
    }
    out
}
