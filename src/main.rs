//! `meshreg`: discovers services from the configured sources, merges them
//! into one registry and serves them to Envoy and proxyless gRPC over xDS.
//!
//! `main` parses flags and the config (exit 64 on a bad one), builds every
//! component, spawns them under one shutdown token, waits for SIGTERM or
//! SIGINT, then drains within the configured grace period. SIGHUP reloads
//! the config's sources: removed ones stop and their state is forgotten,
//! new ones start; an invalid config is reported and the running one kept.

mod config;
mod http;
mod signal;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use meshreg_adapters::serviceentry::{self, ServiceEntryAdapter};
use meshreg_registry::{SourceId, Update};
use meshreg_xds::{AdsService, Debounce, Generator};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, SourceConfig};

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Exit code of `--check` when a source's objects are invalid (EX_DATAERR).
const EXIT_DATA: u8 = 65;

/// How many updates adapters may queue ahead of the registry before they
/// wait (backpressure instead of an unbounded queue).
const UPDATE_QUEUE: usize = 1024;

/// Multi-registry service discovery with a delta/SotW xDS server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (YAML). Without it, the embedded bookinfo example runs.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Override `xds.listen` (e.g. 127.0.0.1:0 for any free port).
    #[arg(long)]
    xds_listen: Option<SocketAddr>,
    /// Override `http.listen`.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Log filter (tracing `EnvFilter` syntax); RUST_LOG also works.
    #[arg(long, default_value = "info")]
    log: String,
    /// Validate the config and every source's objects (like `istioctl
    /// validate`), then exit: 0 valid, 64 bad config, 65 invalid objects.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text for journald and files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(a) = args.xds_listen {
        config.xds.listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http.listen = a;
    }
    if args.check {
        return check_sources(&config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check`: the config is valid (or we would not be here); validates
/// every source's objects as `istioctl validate` would. Exit 0 when all are
/// valid, 65 (EX_DATAERR) when some are refused.
fn check_sources(config: &Config) -> ExitCode {
    let mut problems = 0;
    for source in &config.sources {
        match source {
            SourceConfig::Serviceentry {
                dir,
                default_namespace,
                ..
            } => match serviceentry::validate_dir(dir, default_namespace) {
                Ok(errors) => {
                    for e in &errors {
                        println!("{e}");
                    }
                    problems += errors.len();
                }
                Err(e) => {
                    println!("{}: cannot list: {e}", dir.display());
                    problems += 1;
                }
            },
        }
    }
    if problems == 0 {
        println!("configuration ok; every source's objects are valid");
        ExitCode::SUCCESS
    } else {
        println!("configuration ok; {problems} object problems");
        ExitCode::from(EXIT_DATA)
    }
}

/// Binds the xDS listener with a deep accept backlog: after a restart
/// thousands of proxies reconnect at once, and an overflowing backlog costs
/// each dropped one a SYN retry (a second or more).
fn bind_xds(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The task name of an adapter stopped by a reload (not a failure).
const RELOADED: &str = "adapter removed by reload";

/// The adapter for one source config.
fn adapter_for(source: &SourceConfig, metrics: &meshreg_adapters::Metrics) -> ServiceEntryAdapter {
    match source {
        SourceConfig::Serviceentry {
            dir,
            default_namespace,
            rescan_interval,
        } => ServiceEntryAdapter::new(
            serviceentry::Config {
                dir: dir.clone(),
                default_namespace: default_namespace.clone(),
                rescan_interval: *rescan_interval,
            },
            metrics.clone(),
        ),
    }
}

type Tasks = JoinSet<(&'static str, anyhow::Result<()>)>;

/// A running source: its config, identity and own stop token.
struct Running {
    config: SourceConfig,
    source: SourceId,
    token: CancellationToken,
}

/// Spawns `adapter` under a child of `root`, so a reload can stop it alone.
fn spawn_adapter(
    tasks: &mut Tasks,
    config: SourceConfig,
    adapter: ServiceEntryAdapter,
    updates: &mpsc::Sender<Update>,
    root: &CancellationToken,
) -> Running {
    let token = root.child_token();
    let source = adapter.source_id();
    let (tx, t, root) = (updates.clone(), token.clone(), root.clone());
    // Each adapter's run() opens its own `adapter{kind, source}` span.
    tasks.spawn(async move {
        let result = adapter.run(tx, t.clone()).await.map_err(Into::into);
        let name = if t.is_cancelled() && !root.is_cancelled() {
            RELOADED
        } else {
            "adapter"
        };
        (name, result)
    });
    Running {
        config,
        source,
        token,
    }
}

/// Applies the sources of the config at `path` (SIGHUP): stops and forgets
/// the removed ones, starts the new ones; an invalid config is reported and
/// the running one kept. Settings other than `sources` need a restart.
async fn reload(
    path: Option<&std::path::Path>,
    running: &mut Vec<Running>,
    tasks: &mut Tasks,
    updates: &mpsc::Sender<Update>,
    metrics: &meshreg_adapters::Metrics,
    root: &CancellationToken,
) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "reload: invalid configuration; keeping the running one");
            return;
        }
    };
    let mut kept = Vec::new();
    for r in running.drain(..) {
        if config.sources.contains(&r.config) {
            kept.push(r);
            continue;
        }
        tracing::info!(source = %r.source, "reload: source removed");
        r.token.cancel();
        // Its state leaves the registry (after anything it already queued).
        let _ = updates.send(Update::Forget { source: r.source }).await;
    }
    *running = kept;
    for sc in &config.sources {
        if running.iter().any(|r| r.config == *sc) {
            continue;
        }
        let adapter = adapter_for(sc, metrics);
        tracing::info!(source = %adapter.source_id(), "reload: source added");
        running.push(spawn_adapter(tasks, sc.clone(), adapter, updates, root));
    }
}

async fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let prometheus = prometheus::Registry::new();
    let adapter_metrics = meshreg_adapters::Metrics::register(&prometheus)?;
    let xds_metrics = meshreg_xds::Metrics::register(&prometheus)?;

    let adapters: Vec<(SourceConfig, ServiceEntryAdapter)> = config
        .sources
        .iter()
        .map(|s| (s.clone(), adapter_for(s, &adapter_metrics)))
        .collect();
    let (writer, reader) = meshreg_registry::new(adapters.iter().map(|(_, a)| a.source_id()));

    // Bind before spawning anything, so a taken port fails fast.
    let xds_listener = bind_xds(config.xds.listen)
        .with_context(|| format!("binding xDS on {}", config.xds.listen))?;
    let http_listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http.listen))?;
    let xds_addr = xds_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let shutdown = CancellationToken::new();
    let mut tasks: Tasks = JoinSet::new();

    let (updates_tx, updates_rx) = mpsc::channel(UPDATE_QUEUE);
    let store_metrics = store::Metrics::register(&prometheus, adapter_metrics.clone())?;
    let registry_done =
        store::spawn(writer, updates_rx, store_metrics).context("starting the registry thread")?;
    tasks.spawn(async move {
        let _ = registry_done.await;
        ("registry", Ok(()))
    });
    let mut running: Vec<Running> = adapters
        .into_iter()
        .map(|(sc, adapter)| spawn_adapter(&mut tasks, sc, adapter, &updates_tx, &shutdown))
        .collect();

    let generator = Generator::new().check_resources(config.xds.check_resources);
    let snapshots = generator.subscribe();
    let debounce = Debounce {
        after: config.debounce.after,
        max: config.debounce.max,
    };
    {
        let (reader, metrics, token) = (reader.clone(), xds_metrics.clone(), shutdown.clone());
        tasks.spawn(
            async move {
                meshreg_xds::run_pusher(reader, generator, debounce, metrics, token).await;
                ("pusher", Ok(()))
            }
            .instrument(tracing::info_span!("pusher")),
        );
    }
    {
        let service = AdsService::new(snapshots, xds_metrics, shutdown.clone());
        let token = shutdown.clone();
        tasks.spawn(
            async move {
                meshreg_xds::serve(service, xds_listener, token.cancelled_owned()).await;
                ("xds", Ok(()))
            }
            .instrument(tracing::info_span!("xds_server")),
        );
    }
    {
        let app = http::router(prometheus, reader);
        let token = shutdown.clone();
        tasks.spawn(async move {
            let r = axum::serve(http_listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
            ("http", r.map_err(Into::into))
        });
    }
    tracing::info!(%xds_addr, %http_addr, "meshreg serving");
    // One machine-readable line for scripts and tests that bind port 0.
    println!("meshreg listening xds={xds_addr} http={http_addr}");

    let stop = signal::shutdown();
    tokio::pin!(stop);
    let mut reloads = signal::Reload::new();
    let failed = loop {
        tokio::select! {
            () = &mut stop => break None,
            () = reloads.next() => {
                reload(
                    config_path.as_deref(),
                    &mut running,
                    &mut tasks,
                    &updates_tx,
                    &adapter_metrics,
                    &shutdown,
                )
                .await;
            }
            Some(done) = tasks.join_next() => {
                let (name, result) = done.context("a task panicked")?;
                if name == RELOADED {
                    if let Err(error) = result {
                        tracing::debug!("a removed source stopped with {error:#}");
                    }
                    continue;
                }
                // A component ended before shutdown was asked for: fatal.
                break Some(match result {
                    Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly"),
                    Err(e) => e.context(format!("{name} failed")),
                });
            }
        }
    };
    shutdown.cancel();
    // The registry thread ends once every sender is gone.
    drop(updates_tx);
    let drain = async {
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((name, Ok(()))) => tracing::debug!(task = name, "stopped"),
                Ok((name, Err(error))) => tracing::warn!(task = name, "stopped with {error:#}"),
                Err(error) => tracing::warn!(%error, "task panicked"),
            }
        }
    };
    if tokio::time::timeout(config.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.shutdown_grace, "shutdown grace period over; exiting anyway");
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
