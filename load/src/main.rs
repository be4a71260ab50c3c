//! `meshreg-load`: N simulated Envoy proxies against an ADS server, and a
//! benchmark driver for meshreg.
//!
//! - `meshreg-load run --profile small|standard|large|large-wide` runs
//!   meshreg's registry and xDS server in this process, a proxy fleet in a
//!   child process, and every scenario (initial sync, endpoint churn,
//!   service add/remove, burst, reconnect storm); it prints a Markdown
//!   table and, with `--json`, writes the rows.
//! - `meshreg-load compare --profile standard` runs initial sync and
//!   endpoint churn against meshreg and against a go-control-plane server
//!   (LinearCache and SnapshotCache; built by `scripts/peers.sh`) in one
//!   run, with the same fleet, and prints both and their ratios.
//! - `meshreg-load consul --services 1000 --proxies 1000` runs meshreg
//!   with a Consul source against a real Consul agent (built by
//!   `scripts/peers.sh`): health flip to last proxy, idle requests/s.
//! - `meshreg-load kubernetes --services 1000 --pods 10 --proxies 1000`
//!   runs meshreg with a Kubernetes source against the fake API server of
//!   `meshreg-testkit`: one pod's readiness flip to the last proxy, bytes
//!   per proxy, against the same change through ServiceEntry files.
//! - `meshreg-load flood` runs meshreg with its default limits, a real
//!   Envoy following it, and a child process flooding both ports from
//!   loopback (idle connections, half-sent requests, NACK floods): edit
//!   latency seen by Envoy before and during, RSS, limits hit.
//! - `meshreg-load proxies --xds ADDR --count N --mode delta|sotw` runs just
//!   the fleet against any ADS server (standard Envoy v3 protocol), steered
//!   by JSON commands on stdin (see `fleet::Command`), or with `--watch S`
//!   printing its state every second for S seconds.
//!
//! Everything stays on loopback and every wait is bounded.

mod compare;
mod consul;
mod driver;
mod fleet;
mod flood;
mod kube;
mod procfs;
mod report;
mod sidecars;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::driver::{PROFILES, Plan};
use crate::report::Row;
use meshreg_load::proxy::Mode;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load and benchmarks for ADS servers (delta and SotW)"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the benchmark scenarios against an in-process meshreg.
    Run {
        /// Workload: small (100 services × 5 endpoints, 100 proxies),
        /// standard (1,000 × 10, 1,000), large (10,000 × 10, 2,000),
        /// large-wide (1,000 × 100, 2,000).
        #[arg(long, default_value = "small")]
        profile: String,
        /// Proxy flavour; `both` runs delta then SotW.
        #[arg(long, default_value = "both")]
        mode: ModeArg,
        /// Debounce quiet time in ms (0 = push at once).
        #[arg(long, default_value_t = 100)]
        debounce_ms: u64,
        /// Debounce maximum delay in ms.
        #[arg(long, default_value_t = 150)]
        debounce_max_ms: u64,
        /// Endpoint churn rates (changes per second), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        churn_rates: Vec<u32>,
        /// Seconds each churn rate runs.
        #[arg(long, default_value_t = 5.0)]
        churn_seconds: f64,
        /// Override the profile's proxy count.
        #[arg(long)]
        proxies: Option<usize>,
        /// Exit non-zero if any correctness check fails (every proxy synced,
        /// every change arrived, in order, views equal the registry).
        #[arg(long)]
        check: bool,
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The scale curve: the initial sync and one endpoint change a second
    /// (debounce 0) at each number of proxies (with 1,000 services) and
    /// at each number of services (with 1,000 proxies), 10 endpoints a
    /// service; one table of how the cost grows with the work.
    Curve {
        /// Numbers of proxies (at 1,000 services), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        proxies: Vec<usize>,
        /// Numbers of services of 10 endpoints (at 1,000 proxies),
        /// comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        services: Vec<usize>,
        /// Proxy flavour; `both` runs delta then SotW.
        #[arg(long, default_value = "delta")]
        mode: ModeArg,
        /// Seconds of churn (one change a second) per point.
        #[arg(long, default_value_t = 10.0)]
        churn_seconds: f64,
    },
    /// One ServiceEntry file edited among N: the real file source
    /// (watcher, parser), registry and xDS server, in this process, to a
    /// simulated fleet. Reports the time from the write to the last proxy,
    /// the server CPU per edit, and idle CPU, per N.
    Files {
        /// Numbers of one-service files, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        counts: Vec<usize>,
        /// Simulated proxies.
        #[arg(long, default_value_t = 100)]
        proxies: usize,
        /// Edits per count.
        #[arg(long, default_value_t = 10)]
        edits: usize,
        /// Proxy flavour.
        #[arg(long, default_value = "delta")]
        mode: Mode,
        /// Push debounce (quiet time), ms; the maximum is 1.5 times it.
        /// Default: the daemon's (100 ms).
        #[arg(long)]
        debounce_ms: Option<u64>,
    },
    /// Sidecar scoping: N services and P proxies over K namespaces, without
    /// and with one Sidecar per namespace (`./*`, `istio-system/*`): time
    /// to sync, RSS, and how many proxies one endpoint change reaches.
    Sidecars {
        /// Services (ServiceEntry files), spread over the namespaces.
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Namespaces.
        #[arg(long, default_value_t = 20)]
        namespaces: usize,
        /// Simulated proxies, spread over the namespaces.
        #[arg(long, default_value_t = 1000)]
        proxies: usize,
        /// Proxy flavour.
        #[arg(long, default_value = "delta")]
        mode: Mode,
        /// Run one case here (`with` or `without` Sidecars) and print its
        /// row as JSON (how the command runs each case in a process of
        /// its own).
        #[arg(long, hide = true)]
        only: Option<String>,
    },
    /// The same workload against meshreg and go-control-plane, side by side.
    Compare {
        /// Workload (see `run`).
        #[arg(long, default_value = "standard")]
        profile: String,
        /// Proxy flavour; `both` runs delta then SotW.
        #[arg(long, default_value = "delta")]
        mode: ModeArg,
        /// meshreg's debounce quiet time in ms (go-control-plane's caches
        /// push at once; 0 does the same).
        #[arg(long, default_value_t = 0)]
        debounce_ms: u64,
        /// Endpoint changes per second on one service.
        #[arg(long, default_value_t = 10)]
        churn_rate: u32,
        /// Seconds the churn runs.
        #[arg(long, default_value_t = 5.0)]
        churn_seconds: f64,
        /// Override the profile's proxy count.
        #[arg(long)]
        proxies: Option<usize>,
        /// go-control-plane caches to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "linear,snapshot")]
        caches: Vec<String>,
        /// The go-control-plane server (default: $MESHREG_PEER_GO_CONTROL_PLANE,
        /// which scripts/peers.sh writes to target/peers.env).
        #[arg(long)]
        peer: Option<PathBuf>,
    },
    /// The Consul source against a real Consul agent: N services of one
    /// instance, a health flip to the last proxy, idle requests/s.
    Consul {
        /// Consul services (one instance each).
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Simulated proxies.
        #[arg(long, default_value_t = 1000)]
        proxies: usize,
        /// Health flips measured.
        #[arg(long, default_value_t = 10)]
        flips: usize,
        /// Proxy flavour.
        #[arg(long, default_value = "delta")]
        mode: Mode,
        /// Seconds of idle time over which requests to the agent are counted.
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
        /// meshreg's debounce quiet time in ms.
        #[arg(long, default_value_t = 0)]
        debounce_ms: u64,
        /// The Consul binary (default: $MESHREG_PEER_CONSUL, which
        /// scripts/peers.sh writes to target/peers.env).
        #[arg(long)]
        peer: Option<PathBuf>,
    },
    /// The Kubernetes source with N Services of P pods (fake API server),
    /// one pod's readiness flip to the last proxy, against the same change
    /// through ServiceEntry files, each case in a process of its own.
    Kubernetes {
        /// Services (one EndpointSlice each).
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Pods per Service.
        #[arg(long, default_value_t = 10)]
        pods: usize,
        /// Simulated proxies.
        #[arg(long, default_value_t = 1000)]
        proxies: usize,
        /// Readiness flips measured.
        #[arg(long, default_value_t = 20)]
        flips: usize,
        /// Proxy flavour.
        #[arg(long, default_value = "delta")]
        mode: Mode,
        /// meshreg's debounce quiet time in ms.
        #[arg(long, default_value_t = 0)]
        debounce_ms: u64,
        /// Run one case here (`kubernetes` or `serviceentry`) and print its
        /// row as JSON.
        #[arg(long, hide = true)]
        only: Option<String>,
        /// The API server's kubeconfig (with `--only kubernetes`).
        #[arg(long, hide = true)]
        kubeconfig: Option<PathBuf>,
        /// The API server's address (with `--only kubernetes`).
        #[arg(long, hide = true)]
        kube_addr: Option<SocketAddr>,
    },
    /// meshreg with its default limits under a bounded local flood, a real
    /// Envoy following it: edit latency before and during, RSS, limits hit.
    Flood {
        #[command(flatten)]
        shape: flood::Shape,
        /// Edits measured before and during the flood.
        #[arg(long, default_value_t = 20)]
        edits: usize,
        /// The Envoy binary (default: $ENVOY_BIN, else .venv/bin/envoy).
        #[arg(long)]
        envoy: Option<PathBuf>,
    },
    /// The flood itself (run by `flood`, in its own process).
    #[command(hide = true)]
    FloodClient {
        #[arg(long)]
        xds: SocketAddr,
        #[arg(long)]
        http: SocketAddr,
        #[command(flatten)]
        shape: flood::Shape,
    },
    /// Run only the proxy fleet against an ADS server.
    Proxies {
        /// The ADS server.
        #[arg(long)]
        xds: SocketAddr,
        /// How many proxies.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Delta or SotW.
        #[arg(long, default_value = "delta")]
        mode: Mode,
        /// Spread the proxies over this many namespaces (`ns-0`, …) in
        /// their node ids; 0 puts every one in `load`.
        #[arg(long, default_value_t = 0)]
        namespaces: usize,
        /// Instead of taking driver commands on stdin, print the fleet's
        /// state every second for this many seconds (to measure any ADS
        /// server by hand: time to sync, bytes, whether views agree).
        #[arg(long)]
        watch: Option<u64>,
        /// Say `user_agent_name: envoy`: meshreg serves large assignments
        /// through LEDS to delta proxies, which subscribe to their
        /// collections as Envoy does.
        #[arg(long)]
        leds: bool,
    },
    /// LEDS against plain EDS: one service of N endpoints (and some small
    /// ones) to P proxies taking LEDS over delta, then P over delta
    /// without it, then P over SotW, each on a fresh server; one
    /// endpoint's weight changed repeatedly. Reports bytes per proxy per
    /// change, convergence and server CPU.
    Leds {
        /// Endpoints of the large service.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        endpoints: Vec<usize>,
        /// Small services (ten endpoints each) beside it.
        #[arg(long, default_value_t = 100)]
        small: usize,
        /// Proxies per group.
        #[arg(long, default_value_t = 100)]
        proxies: usize,
        /// Changes measured per group.
        #[arg(long, default_value_t = 20)]
        changes: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ModeArg {
    Delta,
    Sotw,
    Both,
}

/// A named profile, with its proxy count overridden.
fn find_profile(name: &str, proxies: Option<usize>) -> anyhow::Result<driver::Profile> {
    let mut profile = *PROFILES
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("unknown profile {name:?}"))?;
    if let Some(n) = proxies {
        profile.proxies = n;
    }
    Ok(profile)
}

fn modes(mode: ModeArg) -> Vec<Mode> {
    match mode {
        ModeArg::Delta => vec![Mode::Delta],
        ModeArg::Sotw => vec![Mode::Sotw],
        ModeArg::Both => vec![Mode::Delta, Mode::Sotw],
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Cmd::Proxies {
            xds,
            count,
            mode,
            namespaces,
            watch,
            leds,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(fleet::run(
                xds,
                count,
                mode,
                namespaces,
                leds,
                watch.map(Duration::from_secs),
            )),
        Cmd::Leds {
            endpoints,
            small,
            proxies,
            changes,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            println!(
                "| endpoints | proxies | group | sync s | bytes/proxy/change | resources/proxy/change | p50 ms | p99 ms | server CPU ms/change |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|"
            );
            for n in endpoints {
                for r in rt.block_on(driver::run_leds(n, small, proxies, changes))? {
                    println!(
                        "| {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                        r.endpoints,
                        r.proxies,
                        r.group,
                        r.sync_s,
                        r.bytes_per_proxy,
                        r.resources_per_proxy,
                        r.latency.p50,
                        r.latency.p99,
                        r.server_cpu_ms
                    );
                }
            }
            Ok(())
        }
        Cmd::Sidecars {
            services,
            namespaces,
            proxies,
            mode,
            only,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if let Some(case) = only {
                let row = rt.block_on(sidecars::run_case(
                    case == "with",
                    services,
                    namespaces,
                    proxies,
                    mode,
                ))?;
                println!("{}", serde_json::to_string(&row)?);
                return Ok(());
            }
            let rows = rt.block_on(sidecars::run(services, namespaces, proxies, mode))?;
            println!(
                "| Sidecars | services | namespaces | proxies | mode | clusters per proxy | scopes | initial sync s | RSS before fleet MB | RSS synced MB | EDS responses for 1 change | change to last ms |\n|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in rows {
                println!(
                    "| {} | {} | {} | {} | {:?} | {} | {} | {:.2} | {:.0} | {:.0} | {} | {:.0} |",
                    if r.sidecars { "yes" } else { "no" },
                    r.services,
                    r.namespaces,
                    r.proxies,
                    r.mode,
                    r.held,
                    r.scopes,
                    r.initial_sync_s,
                    r.rss_before_mb,
                    r.rss_after_mb,
                    r.eds_responses,
                    r.change_ms
                );
            }
            Ok(())
        }
        Cmd::Files {
            counts,
            proxies,
            edits,
            mode,
            debounce_ms,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let debounce = debounce_ms.map_or_else(meshreg_xds::Debounce::default, |ms| {
                meshreg_xds::Debounce {
                    after: Duration::from_millis(ms),
                    max: Duration::from_millis(ms * 3 / 2),
                }
            });
            println!(
                "| files | mode | proxies | debounce ms | initial sync s | to snapshot p50 ms | to snapshot max ms | edit p50 ms | edit max ms | server CPU ms/edit | idle cores | peak RSS MB |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for n in counts {
                let r = rt.block_on(driver::run_files(n, proxies, edits, mode, debounce))?;
                println!(
                    "| {} | {:?} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.0} |",
                    r.files,
                    r.mode,
                    r.proxies,
                    debounce.after.as_millis(),
                    r.initial_sync_s,
                    r.to_snapshot.p50,
                    r.to_snapshot.max,
                    r.latency.p50,
                    r.latency.max,
                    r.cpu_per_edit_s * 1e3,
                    r.idle_cores,
                    r.peak_rss_mb
                );
            }
            Ok(())
        }
        Cmd::Kubernetes {
            services,
            pods,
            proxies,
            flips,
            mode,
            debounce_ms,
            only,
            kubeconfig,
            kube_addr,
        } => {
            let shape = kube::Shape {
                services,
                pods,
                proxies,
                flips,
                mode,
                debounce: meshreg_xds::Debounce {
                    after: Duration::from_millis(debounce_ms),
                    max: Duration::from_millis(debounce_ms.max(1)),
                },
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if let Some(case) = only {
                let api = kubeconfig.as_deref().zip(kube_addr);
                let row = rt.block_on(kube::run_case(&case, shape, api))?;
                println!("{}", serde_json::to_string(&row)?);
                return Ok(());
            }
            let rows = rt.block_on(kube::run(shape))?;
            println!(
                "| source | services × pods | mode | proxies | initial sync s | flip p50 ms | flip p99 ms | flip max ms | bytes/proxy/flip | server CPU ms/flip | peak RSS MB |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in rows {
                println!(
                    "| {} | {} × {} | {:?} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} |",
                    r.source,
                    r.services,
                    r.pods,
                    r.mode,
                    r.proxies,
                    r.initial_sync_s,
                    r.flip.p50,
                    r.flip.p99,
                    r.flip.max,
                    r.bytes_per_proxy,
                    r.cpu_ms_per_flip,
                    r.peak_rss_mb
                );
            }
            Ok(())
        }
        Cmd::Consul {
            services,
            proxies,
            flips,
            mode,
            idle_seconds,
            debounce_ms,
            peer,
        } => {
            let Some(peer) =
                peer.or_else(|| std::env::var_os("MESHREG_PEER_CONSUL").map(PathBuf::from))
            else {
                anyhow::bail!(
                    "no Consul binary: pass --peer, or run scripts/peers.sh and export target/peers.env"
                );
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(consul::run_consul(
                services,
                proxies,
                flips,
                mode,
                peer,
                Duration::from_secs(idle_seconds),
                meshreg_xds::Debounce {
                    after: Duration::from_millis(debounce_ms),
                    max: Duration::from_millis(debounce_ms.max(1)),
                },
            ))?;
            println!(
                "| Consul | services | mode | proxies | initial sync s | flip p50 ms | flip p99 ms | flip max ms | idle requests/s | peak RSS MB |\n\
                 |---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n\
                 | {} | {} | {:?} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} |",
                r.agent,
                r.services,
                r.mode,
                r.proxies,
                r.initial_sync_s,
                r.flip.p50,
                r.flip.p99,
                r.flip.max,
                r.idle_requests_per_s,
                r.peak_rss_mb
            );
            Ok(())
        }
        Cmd::Flood {
            shape,
            edits,
            envoy,
        } => {
            let envoy = envoy
                .or_else(|| std::env::var_os("ENVOY_BIN").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(".venv/bin/envoy"));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(flood::run(shape, edits, &envoy))?;
            println!(
                "flood: {} (half-sent streams from {} addresses)",
                r.opened, r.shape.half_sent_addresses
            );
            println!(
                "| | edit to Envoy p50 ms | p99 ms | max ms | /metrics p50 ms | /metrics max ms | RSS MB |\n|---|---:|---:|---:|---:|---:|---:|\n\
                 | before the flood | {:.0} | {:.0} | {:.0} | | | {:.0} |\n\
                 | during the flood | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} (peak) |\n\
                 | 35 s after it ended | | | | | | {:.0} |",
                r.edit_before.p50,
                r.edit_before.p99,
                r.edit_before.max,
                r.rss_before_mb,
                r.edit_during.p50,
                r.edit_during.p99,
                r.edit_during.max,
                r.metrics_during_ms.p50,
                r.metrics_during_ms.max,
                r.rss_peak_mb,
                r.rss_after_mb,
            );
            println!("\n| limit hit | count |\n|---|---:|");
            for (series, n) in &r.hits {
                println!("| `{series}` | {n} |");
            }
            Ok(())
        }
        Cmd::FloodClient { xds, http, shape } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(flood::client(shape, xds, http)),
        Cmd::Compare {
            profile,
            mode,
            debounce_ms,
            churn_rate,
            churn_seconds,
            proxies,
            caches,
            peer,
        } => {
            let profile = find_profile(&profile, proxies)?;
            let peer = match peer
                .or_else(|| std::env::var_os("MESHREG_PEER_GO_CONTROL_PLANE").map(PathBuf::from))
            {
                Some(p) => p,
                None => anyhow::bail!(
                    "no go-control-plane server: pass --peer, or run scripts/peers.sh and export target/peers.env"
                ),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut rows = Vec::new();
            for mode in modes(mode) {
                let comparison = compare::Comparison {
                    plan: Plan {
                        profile,
                        mode,
                        debounce: meshreg_xds::Debounce {
                            after: Duration::from_millis(debounce_ms),
                            max: Duration::from_millis(debounce_ms.max(1)),
                        },
                        churn_seconds,
                        churn_rates: vec![churn_rate],
                        check: true,
                        churn_only: false,
                    },
                    peer: peer.clone(),
                    caches: caches.clone(),
                    churn_rate,
                };
                rows.extend(rt.block_on(compare::run(&comparison))?);
            }
            println!(
                "\nprofile {} ({} services × {} endpoints, {} proxies), meshreg debounce {} ms, {} cores; server in notes\n",
                profile.name,
                profile.services,
                profile.endpoints,
                profile.proxies,
                debounce_ms,
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            );
            println!("{}", Row::header());
            for r in &rows {
                println!("{r}");
            }
            println!();
            for line in compare::ratios(&rows) {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Curve {
            proxies,
            services,
            mode,
            churn_seconds,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut points: Vec<(usize, usize)> = proxies
                .iter()
                .map(|&p| (p, 1000))
                .chain(services.iter().map(|&s| (1000, s)))
                .collect();
            points.sort_unstable();
            points.dedup();
            println!(
                "| mode | proxies | services | endpoints | initial sync s | sync CPU s: server + fleet | MB/proxy synced | change p50 ms | change p99 ms | B/proxy/change | CPU ms/change: server + fleet | server CPU µs/proxy/change | peak RSS MB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            let mut failures = Vec::new();
            for mode in modes(mode) {
                for &(proxies, services) in &points {
                    let plan = Plan {
                        profile: driver::Profile {
                            name: "curve",
                            services,
                            endpoints: 10,
                            proxies,
                        },
                        mode,
                        debounce: meshreg_xds::Debounce {
                            after: Duration::ZERO,
                            max: Duration::ZERO,
                        },
                        churn_seconds,
                        churn_rates: vec![1],
                        check: false,
                        churn_only: true,
                    };
                    let (rows, f) = rt.block_on(driver::run(&plan))?;
                    failures.extend(f);
                    let (Some(sync), Some(churn)) = (rows.first(), rows.get(1)) else {
                        anyhow::bail!(
                            "curve: {proxies} proxies × {services} services gave no rows"
                        );
                    };
                    let (Some(s), Some(c)) = (&sync.latency, &churn.latency) else {
                        anyhow::bail!("curve: no latency measured");
                    };
                    let changes = churn_seconds.ceil().max(1.0);
                    let cpu_ms = churn.server_cpu_s * 1e3 / changes;
                    // The fleet's CPU too: both share the machine's cores,
                    // so their sum over the cores bounds the wall time.
                    let fleet_ms = churn.fleet_cpu_s * 1e3 / changes;
                    println!(
                        "| {mode:?} | {proxies} | {services} | {} | {:.2} | {:.2} + {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.1} + {:.1} | {:.1} | {:.0} |",
                        services * 10,
                        s.p50 / 1e3,
                        sync.server_cpu_s,
                        sync.fleet_cpu_s,
                        sync.bytes_per_proxy / 1e6,
                        c.p50,
                        c.p99,
                        churn.bytes_per_proxy,
                        cpu_ms,
                        fleet_ms,
                        cpu_ms * 1e3 / proxies as f64,
                        sync.peak_rss_mb.max(churn.peak_rss_mb),
                    );
                }
            }
            if failures.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("correctness checks failed: {failures:#?}")
            }
        }
        Cmd::Run {
            profile,
            mode,
            debounce_ms,
            debounce_max_ms,
            churn_rates,
            churn_seconds,
            proxies,
            check,
            json,
        } => {
            let profile = find_profile(&profile, proxies)?;
            // The driver's own work (applying updates, talking to the
            // fleet) runs on one thread; the server has its own runtime.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut rows: Vec<Row> = Vec::new();
            let mut failures = Vec::new();
            for mode in modes(mode) {
                let plan = Plan {
                    profile,
                    mode,
                    debounce: meshreg_xds::Debounce {
                        after: Duration::from_millis(debounce_ms),
                        max: Duration::from_millis(debounce_max_ms.max(debounce_ms)),
                    },
                    churn_seconds,
                    churn_rates: churn_rates.clone(),
                    check,
                    churn_only: false,
                };
                let (r, f) = rt.block_on(driver::run(&plan))?;
                rows.extend(r);
                failures.extend(f);
            }
            println!(
                "\nprofile {} ({} services × {} endpoints, {} proxies), debounce {} ms, {} cores\n",
                profile.name,
                profile.services,
                profile.endpoints,
                profile.proxies,
                debounce_ms,
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            );
            println!("{}", Row::header());
            for r in &rows {
                println!("{r}");
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
            }
            if failures.is_empty() {
                println!("\nall correctness checks passed");
                Ok(())
            } else {
                anyhow::bail!("correctness checks failed: {failures:#?}")
            }
        }
    }
}
