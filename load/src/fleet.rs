//! The proxy fleet: N simulated proxies in one process, steered by
//! line-delimited JSON commands on stdin, answering on stdout. The driver
//! (`meshreg-load run`) spawns it as a child process, so the fleet's CPU
//! and memory never count as the server's; it can also be pointed at any
//! ADS server by hand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use meshreg_load::clock::now_ns;
use meshreg_load::proxy::{self, Mode, Phase, Shared, View};

/// A command from the driver.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Command {
    /// Track weight stamps of these assignment names (index = probe id).
    Probes { names: Vec<String> },
    /// Wait until every proxy's view digests equal these.
    WaitView { cds: u64, eds: u64, timeout_ms: u64 },
    /// Totals so far.
    Counters,
    /// For each (probe, seq): when the last proxy had it (or a later seq).
    Convergence { changes: Vec<(u32, u32)> },
    /// Drop every stream and wait until all are down.
    Disconnect,
    /// Reconnect every proxy (all at once).
    Connect,
    /// Wait until every proxy holds exactly this many clusters and
    /// assignments (for servers whose versions the driver cannot predict).
    WaitHeld {
        clusters: usize,
        assignments: usize,
        /// LEDS members too, when not zero.
        #[serde(default)]
        members: usize,
        timeout_ms: u64,
    },
    /// Wait until every proxy has had probe `probe` at sequence `seq` or later.
    WaitStamp {
        probe: u32,
        seq: u32,
        timeout_ms: u64,
    },
    /// Proxy 0 rejects every response carrying this resource name (`None`:
    /// it accepts everything again).
    Reject { name: Option<String> },
    /// End the fleet.
    Exit,
}

/// The answer to a command.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    /// WaitView: when the last proxy's view became equal.
    #[serde(default)]
    pub(crate) last_ns: u64,
    /// WaitView: proxies whose view matched at the end.
    #[serde(default)]
    pub(crate) matching: usize,
    /// Counters, per type (cds, eds).
    #[serde(default)]
    pub(crate) bytes: [u64; 2],
    #[serde(default)]
    pub(crate) responses: [u64; 2],
    #[serde(default)]
    pub(crate) resources: [u64; 2],
    #[serde(default)]
    pub(crate) errors: u64,
    #[serde(default)]
    pub(crate) out_of_order: u64,
    /// Convergence: per change, when the last proxy had it (0 = some proxy never did).
    #[serde(default)]
    pub(crate) arrivals_ns: Vec<u64>,
    #[serde(default)]
    pub(crate) missing: usize,
    /// Counters: NACKs sent by the fleet.
    #[serde(default)]
    pub(crate) nacks: u64,
    /// Counters: responses proxy 0 received, per type.
    #[serde(default)]
    pub(crate) first_responses: [u64; 2],
}

/// Runs `count` proxies against `xds` and serves commands until `Exit` or
/// end of input; with `watch`, prints the fleet's state every second for
/// that long instead.
pub(crate) async fn run(
    xds: SocketAddr,
    count: usize,
    mode: Mode,
    namespaces: usize,
    leds: bool,
    watch: Option<Duration>,
) -> anyhow::Result<()> {
    let mut shared = Shared::new(xds, mode);
    shared.namespaces = namespaces;
    shared.leds = leds;
    let shared = Arc::new(shared);
    let (views, phase_tx) = proxy::spawn(&shared, 0..count);
    if let Some(duration) = watch {
        return watch_fleet(&views, duration).await;
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let cmd: Command = serde_json::from_str(&line)?;
        let reply = match cmd {
            Command::Exit => break,
            Command::Probes { names } => {
                let mut p = shared.probes.write().unwrap_or_else(|p| p.into_inner());
                *p = names.into_iter().zip(0..).collect();
                Reply {
                    ok: true,
                    ..Default::default()
                }
            }
            Command::WaitView {
                cds,
                eds,
                timeout_ms,
            } => wait_view(&views, [cds, eds], Duration::from_millis(timeout_ms)).await,
            Command::Counters => counters(&views),
            Command::Convergence { changes } => convergence(&views, &changes),
            Command::Disconnect => {
                phase_tx.send_replace(Phase::Disconnected);
                wait_all(&views, |v| !v.connected, Duration::from_secs(30)).await
            }
            Command::Reject { name } => {
                *shared.reject.write().unwrap_or_else(|p| p.into_inner()) = name;
                Reply {
                    ok: true,
                    ..Default::default()
                }
            }
            Command::WaitHeld {
                clusters,
                assignments,
                members,
                timeout_ms,
            } => {
                wait_all(
                    &views,
                    |v| {
                        v.held[0].len() == clusters
                            && v.held[1].len() == assignments
                            && (members == 0 || v.members.len() == members)
                    },
                    Duration::from_millis(timeout_ms),
                )
                .await
            }
            Command::WaitStamp {
                probe,
                seq,
                timeout_ms,
            } => {
                wait_all(
                    &views,
                    |v| v.stamps.iter().any(|s| s.probe == probe && s.seq >= seq),
                    Duration::from_millis(timeout_ms),
                )
                .await
            }
            Command::Connect => {
                phase_tx.send_replace(Phase::Connected);
                Reply {
                    ok: true,
                    ..Default::default()
                }
            }
        };
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        stdout.write_all(text.as_bytes()).await?;
        stdout.flush().await?;
    }
    phase_tx.send_replace(Phase::Disconnected);
    Ok(())
}

/// Prints, every second: connected proxies, the range of resources held,
/// whether all views agree, and totals received.
async fn watch_fleet(views: &[Arc<Mutex<View>>], duration: Duration) -> anyhow::Result<()> {
    let start = now_ns();
    let mut synced_at = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while now_ns() - start < duration.as_nanos() as u64 {
        tick.tick().await;
        let (mut connected, mut min, mut max) = (0, [usize::MAX; 2], [0; 2]);
        let mut digests = std::collections::HashSet::new();
        let mut last_change = 0;
        for v in views {
            let v = lock(v);
            connected += usize::from(v.connected);
            for t in 0..2 {
                min[t] = min[t].min(v.held[t].len());
                max[t] = max[t].max(v.held[t].len());
            }
            digests.insert(v.digest);
            last_change = last_change.max(v.digest_changed_ns);
        }
        let c = counters(views);
        let agree = digests.len() == 1 && max[0] > 0;
        if agree && synced_at.is_none() {
            synced_at = Some(last_change.saturating_sub(start) as f64 / 1e9);
        }
        println!(
            "t={:.0}s connected={connected}/{} clusters={}..{} assignments={}..{} views_agree={agree} \
             synced_after={} MB_received={:.1} responses={}",
            (now_ns() - start) as f64 / 1e9,
            views.len(),
            min[0],
            max[0],
            min[1],
            max[1],
            synced_at
                .map(|s| format!("{s:.3}s"))
                .unwrap_or_else(|| "-".into()),
            (c.bytes[0] + c.bytes[1]) as f64 / 1e6,
            c.responses[0] + c.responses[1],
        );
    }
    Ok(())
}

fn lock(v: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

async fn wait_view(views: &[Arc<Mutex<View>>], want: [u64; 2], timeout: Duration) -> Reply {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut matching = 0;
        let mut last_ns = 0;
        for v in views {
            let v = lock(v);
            if v.digest == want {
                matching += 1;
                last_ns = last_ns.max(v.digest_changed_ns);
            }
        }
        if matching == views.len() || tokio::time::Instant::now() >= deadline {
            return Reply {
                ok: matching == views.len(),
                last_ns,
                matching,
                ..Default::default()
            };
        }
        // The answer's time comes from the proxies' own clocks, so the
        // polling period does not blur it.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_all(
    views: &[Arc<Mutex<View>>],
    f: impl Fn(&View) -> bool,
    timeout: Duration,
) -> Reply {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (mut matching, mut last_ns) = (0, 0);
        for v in views {
            let v = lock(v);
            if f(&v) {
                matching += 1;
                last_ns = last_ns.max(v.digest_changed_ns);
            }
        }
        if matching == views.len() || tokio::time::Instant::now() >= deadline {
            return Reply {
                ok: matching == views.len(),
                matching,
                // When the last proxy's view last changed (from the
                // proxies' own clocks, not this poll's).
                last_ns,
                ..Default::default()
            };
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn counters(views: &[Arc<Mutex<View>>]) -> Reply {
    let mut r = Reply {
        ok: true,
        ..Default::default()
    };
    for v in views {
        let v = lock(v);
        for t in 0..2 {
            r.bytes[t] += v.bytes[t];
            r.responses[t] += v.responses[t];
            r.resources[t] += v.resources[t];
        }
        r.errors += v.errors;
        r.out_of_order += v.out_of_order;
        r.nacks += v.nacks;
    }
    if let Some(first) = views.first() {
        r.first_responses = lock(first).responses;
    }
    r
}

fn convergence(views: &[Arc<Mutex<View>>], changes: &[(u32, u32)]) -> Reply {
    let mut arrivals = vec![0u64; changes.len()];
    let mut missing = 0;
    let mut out_of_order = 0;
    for v in views {
        let v = lock(v);
        out_of_order += v.out_of_order;
        // Stamps are in arrival order and increase per probe: the first one
        // at or past `seq` is when this proxy had the change.
        let mut by_probe: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        for s in &v.stamps {
            by_probe.entry(s.probe).or_default().push((s.seq, s.at_ns));
        }
        for (i, &(probe, seq)) in changes.iter().enumerate() {
            let stamps = by_probe.get(&probe).map(Vec::as_slice).unwrap_or_default();
            let at = stamps.partition_point(|&(s, _)| s < seq);
            match stamps.get(at) {
                Some(&(_, at_ns)) => arrivals[i] = arrivals[i].max(at_ns),
                None => missing += 1,
            }
        }
    }
    Reply {
        ok: missing == 0 && out_of_order == 0,
        arrivals_ns: arrivals,
        missing,
        out_of_order,
        ..Default::default()
    }
}
