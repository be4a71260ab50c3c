//! [`App`]: the one place that wires the daemon. The binary, `meshreg-load`
//! and tests build it from a [`Config`] and run it until their shutdown.
//!
//! [`App::bind`] binds the listeners (so a taken port fails before anything
//! starts) and builds the registry, the sources and the xDS generator;
//! [`App::run`] spawns them under one shutdown token, applies reloads of
//! the sources, and drains within the configured grace period.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshreg_adapters::serviceentry::{self, ServiceEntryAdapter};
use meshreg_adapters::{Adapter, consul, dns, kubernetes};
use meshreg_registry::{SourceId, Update};
use meshreg_xds::{AdsService, Debounce, Generator, Snapshot};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, SourceConfig};
use crate::{http, store};

/// How many updates sources may queue ahead of the registry before they
/// wait (backpressure instead of an unbounded queue).
const UPDATE_QUEUE: usize = 1024;

/// The task name of an adapter stopped by a reload (not a failure).
const RELOADED: &str = "adapter removed by reload";

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be bound.
    #[error("binding {what} on {addr}")]
    Bind {
        /// `xDS` or `HTTP`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A metric could not be registered (a name registered twice).
    #[error("registering metrics")]
    Metrics(#[from] prometheus::Error),
    /// The registry thread could not be started.
    #[error("starting the registry thread")]
    Thread(#[source] std::io::Error),
    /// A component ended before shutdown was asked for.
    #[error("{0} stopped unexpectedly")]
    Stopped(&'static str),
    /// A source failed (a configuration error it found).
    #[error("a source failed")]
    Source(#[from] meshreg_adapters::Error),
    /// A task panicked.
    #[error("a task panicked: {0}")]
    Panicked(String),
    /// The xDS TLS credentials cannot be used.
    #[error("xds.tls")]
    Tls(#[from] meshreg_xds::TlsError),
    /// The debug token file cannot be read, or holds no token.
    #[error("reading http.debug_token_file {path}: {reason}")]
    DebugToken {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

type Tasks = JoinSet<(&'static str, Result<()>)>;

/// A built daemon, listeners bound, not yet running.
pub struct App {
    config: Config,
    config_path: Option<PathBuf>,
    prometheus: prometheus::Registry,
    adapter_metrics: meshreg_adapters::Metrics,
    xds_metrics: meshreg_xds::Metrics,
    adapters: Vec<(SourceConfig, Adapter)>,
    writer: meshreg_registry::Writer,
    reader: meshreg_registry::Reader,
    generator: Generator,
    xds_listener: TcpListener,
    /// The TLS xDS listener and its credentials, when configured.
    xds_tls: Option<(TcpListener, Arc<meshreg_xds::Acceptor>, SocketAddr)>,
    http_listener: TcpListener,
    xds_addr: SocketAddr,
    http_addr: SocketAddr,
    debug_guard: http::DebugGuard,
}

/// A running source: its config, identity and own stop token.
struct Running {
    config: SourceConfig,
    source: SourceId,
    token: CancellationToken,
}

// === impl App ===

impl App {
    /// Builds the daemon for `config` and binds its listeners.
    /// `config_path` is re-read on [`App::run`]'s reloads (`None`: the
    /// embedded default).
    ///
    /// # Errors
    ///
    /// [`Error::Bind`] when a listener cannot be bound, [`Error::Metrics`]
    /// on a metric registered twice.
    pub async fn bind(config: Config, config_path: Option<PathBuf>) -> Result<App> {
        let prometheus = prometheus::Registry::new();
        register_process_metrics(&prometheus)?;
        let adapter_metrics = meshreg_adapters::Metrics::register(&prometheus)?;
        let xds_metrics = meshreg_xds::Metrics::register(&prometheus)?;
        let adapters: Vec<(SourceConfig, Adapter)> = config
            .sources
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    adapter_for(s, &config.cluster_ids(), &adapter_metrics),
                )
            })
            .collect();
        let (writer, reader) = meshreg_registry::new(adapters.iter().map(|(_, a)| a.source_id()));
        let xds_listener = bind_xds(config.xds.listen).map_err(|source| Error::Bind {
            what: "xDS",
            addr: config.xds.listen,
            source,
        })?;
        let http_listener = TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| Error::Bind {
                what: "HTTP",
                addr: config.http.listen,
                source,
            })?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let xds_addr = local(&xds_listener, "xDS", config.xds.listen)?;
        let xds_tls = match &config.xds.tls {
            None => None,
            Some(t) => {
                let acceptor = meshreg_xds::Acceptor::new(meshreg_xds::TlsSettings {
                    cert_file: t.cert_file.clone(),
                    key_file: t.key_file.clone(),
                    client_ca_file: t.client_ca_file.clone(),
                    require_client_cert: t.require_client_cert,
                })?;
                let listener = bind_xds(t.listen).map_err(|source| Error::Bind {
                    what: "xDS TLS",
                    addr: t.listen,
                    source,
                })?;
                let addr = local(&listener, "xDS TLS", t.listen)?;
                Some((listener, Arc::new(acceptor), addr))
            }
        };
        let http_addr = local(&http_listener, "HTTP", config.http.listen)?;
        let generator = Generator::new()
            .check_resources(config.xds.check_resources)
            .with_leds_threshold(Some(config.xds.leds_threshold).filter(|n| *n > 0))
            .with_cluster_domain(config.cluster_domain())
            .with_network_gateways(config.network_gateways());
        let token = match &config.http.debug_token_file {
            None => None,
            Some(path) => {
                let bad = |reason: String| Error::DebugToken {
                    path: path.clone(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(bad("the file is empty".into()));
                }
                Some(Arc::from(token))
            }
        };
        let debug_guard = http::DebugGuard {
            access: config.http.debug,
            token,
        };
        Ok(App {
            config,
            config_path,
            prometheus,
            adapter_metrics,
            xds_metrics,
            adapters,
            writer,
            reader,
            generator,
            xds_listener,
            xds_tls,
            http_listener,
            xds_addr,
            http_addr,
            debug_guard,
        })
    }

    /// The bound xDS TLS address, when `xds.tls` is configured.
    pub fn xds_tls_addr(&self) -> Option<SocketAddr> {
        self.xds_tls.as_ref().map(|(_, _, a)| *a)
    }

    /// The bound xDS address (useful with port 0).
    pub fn xds_addr(&self) -> SocketAddr {
        self.xds_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Every snapshot the xDS server will serve (for benchmarks and tests).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.generator.subscribe()
    }

    /// The registry's latest state.
    pub fn registry(&self) -> meshreg_registry::Reader {
        self.reader.clone()
    }

    /// Runs until `shutdown` is cancelled (then drains within the config's
    /// grace period), applying a reload of the sources for every message on
    /// `reloads` (see [`reload`]).
    ///
    /// # Errors
    ///
    /// When a component stops before `shutdown` ([`Error::Stopped`],
    /// [`Error::Source`], [`Error::Panicked`]), or the
    /// registry thread cannot start ([`Error::Thread`]).
    pub async fn run(
        self,
        shutdown: CancellationToken,
        mut reloads: mpsc::Receiver<()>,
    ) -> Result<()> {
        let App {
            config,
            config_path,
            prometheus,
            adapter_metrics,
            xds_metrics,
            adapters,
            writer,
            reader,
            generator,
            xds_listener,
            xds_tls,
            http_listener,
            xds_addr,
            http_addr,
            debug_guard,
        } = self;
        let mut tasks: Tasks = JoinSet::new();
        let (updates_tx, updates_rx) = mpsc::channel(UPDATE_QUEUE);
        let store_metrics = store::Metrics::register(&prometheus, adapter_metrics.clone())?;
        let activity = store_metrics.activity.clone();
        let registry_done =
            store::spawn(writer, updates_rx, store_metrics).map_err(Error::Thread)?;
        tasks.spawn(async move {
            let _ = registry_done.await;
            ("registry", Ok(()))
        });
        let mut running: Vec<Running> = adapters
            .into_iter()
            .map(|(sc, adapter)| spawn_adapter(&mut tasks, sc, adapter, &updates_tx, &shutdown))
            .collect();

        let snapshots = generator.subscribe();
        let (reader_for_startup, snapshots_for_startup) = (reader.clone(), snapshots.clone());
        let scopes = generator.scopes().clone();
        let history = generator.push_history().clone();
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
        let mut service = AdsService::new(snapshots, xds_metrics, shutdown.clone());
        let etcd_store = config.etcd_store();
        if let Some(store) = etcd_store.clone() {
            // Every replica serves what any replica registered.
            let metrics = adapter_metrics.clone();
            let (updates, token) = (updates_tx.clone(), shutdown.clone());
            let source = meshreg_registry::SourceId::new(meshreg_registry::SourceKind::Vm, "etcd");
            tasks.spawn(
                async move {
                    meshreg_adapters::etcd::run(store, source, metrics, updates, token).await;
                    ("etcd", Ok(()))
                }
                .instrument(tracing::info_span!("etcd")),
            );
        }
        if let (Some(store), Some(fed)) = (&etcd_store, &config.federation) {
            let exports = crate::federation::Exports {
                cluster_id: fed.cluster_id.clone(),
                network: fed.network.clone(),
                hosts: fed.export.hosts.iter().cloned().collect(),
                labels: fed.export.labels.clone(),
            };
            if !exports.hosts.is_empty() || !exports.labels.is_empty() {
                let writer =
                    meshreg_adapters::etcd::Writer::new(store.clone(), crate::vm::controller_id());
                let (reader, token) = (reader.clone(), shutdown.clone());
                tasks.spawn(
                    async move {
                        crate::federation::run(exports, reader, writer, token).await;
                        ("federation_export", Ok(()))
                    }
                    .instrument(tracing::info_span!("federation_export")),
                );
            }
            if fed.import {
                let (store, metrics) = (store.clone(), adapter_metrics.clone());
                let (updates, token) = (updates_tx.clone(), shutdown.clone());
                let own = fed.cluster_id.clone();
                let source = meshreg_registry::SourceId::new(
                    meshreg_registry::SourceKind::Federation,
                    "etcd",
                );
                tasks.spawn(
                    async move {
                        meshreg_adapters::etcd::run_imports(
                            store, own, source, metrics, updates, token,
                        )
                        .await;
                        ("federation_import", Ok(()))
                    }
                    .instrument(tracing::info_span!("federation_import")),
                );
            }
        }
        if config.autoregistration.enabled {
            let registrar = crate::vm::Registrar::new(
                reader.clone(),
                config.autoregistration.grace,
                &prometheus,
            )?;
            service = service.with_connect_hook(Arc::new(registrar.clone()));
            let sink = match &etcd_store {
                Some(store) => crate::vm::Sink::Etcd(Box::new(
                    meshreg_adapters::etcd::Writer::new(store.clone(), crate::vm::controller_id()),
                )),
                None => crate::vm::Sink::Registry(updates_tx.clone()),
            };
            let token = shutdown.clone();
            tasks.spawn(
                async move {
                    registrar.run(sink, token).await;
                    ("autoregistration", Ok(()))
                }
                .instrument(tracing::info_span!("autoregistration")),
            );
        }
        let service = service
            .with_limits(config.xds.limits.limits())
            .with_trusted_identities(
                config
                    .xds
                    .tls
                    .as_ref()
                    .map(|t| t.trusted_identities.clone())
                    .unwrap_or_default(),
            )
            .scoped(scopes)
            .with_push_history(history);
        let ads = service.clone();
        if let Some((listener, acceptor, _)) = xds_tls {
            let (service, token) = (service.clone(), shutdown.clone());
            tasks.spawn(
                async move {
                    meshreg_xds::serve_tls(service, listener, acceptor, token.cancelled_owned())
                        .await;
                    ("xds_tls", Ok(()))
                }
                .instrument(tracing::info_span!("xds_tls_server")),
            );
        }
        {
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
            let refused = http::Refused::register(&prometheus);
            let app = http::router(
                prometheus,
                reader,
                ads,
                http::Sources {
                    adapters: adapter_metrics.clone(),
                    activity,
                },
                debug_guard,
            );
            let token = shutdown.clone();
            tasks.spawn(async move {
                http::serve(http_listener, app, refused, token.cancelled_owned()).await;
                ("http", Ok(()))
            });
        }
        tracing::info!(%xds_addr, %http_addr, "meshreg listening; waiting for every source to sync");
        tokio::spawn(announce_ready(
            reader_for_startup,
            snapshots_for_startup,
            shutdown.clone(),
        ));

        let failed = loop {
            tokio::select! {
                // Shutdown first: once it is asked for, tasks that end are
                // stopping, not failing.
                biased;
                () = shutdown.cancelled() => break None,
                Some(()) = reloads.recv() => {
                    notify(&[sd_notify::NotifyState::Reloading]);
                    reload(
                        config_path.as_deref(),
                        &mut running,
                        &mut tasks,
                        &updates_tx,
                        &adapter_metrics,
                        &shutdown,
                    )
                    .await;
                    notify(&[sd_notify::NotifyState::Ready]);
                }
                Some(done) = tasks.join_next() => {
                    let (name, result) = match done {
                        Ok(r) => r,
                        Err(e) => break Some(Error::Panicked(e.to_string())),
                    };
                    if name == RELOADED {
                        if let Err(error) = result {
                            tracing::debug!(%error, "a removed source stopped");
                        }
                        continue;
                    }
                    if shutdown.is_cancelled() {
                        break None;
                    }
                    // A component ended before shutdown was asked for: fatal.
                    break Some(match result {
                        Ok(()) => Error::Stopped(name),
                        Err(e) => e,
                    });
                }
            }
        };
        shutdown.cancel();
        notify(&[sd_notify::NotifyState::Stopping]);
        // The registry thread ends once every sender is gone.
        drop(updates_tx);
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                match done {
                    Ok((name, Ok(()))) => tracing::debug!(task = name, "stopped"),
                    Ok((name, Err(error))) => {
                        tracing::warn!(task = name, %error, "stopped with an error")
                    }
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
}

/// Validates every source's objects as `istioctl validate` would; returns
/// one message per refused document (empty when all are valid) and Istio's
/// warnings on the accepted ones.
pub fn check_sources(config: &Config) -> serviceentry::Validation {
    let mut out = serviceentry::Validation::default();
    for source in &config.sources {
        match source {
            SourceConfig::Serviceentry {
                dir,
                default_namespace,
                ..
            } => match serviceentry::validate_dir(dir, default_namespace) {
                Ok(v) => {
                    out.problems.extend(v.problems);
                    out.warnings.extend(v.warnings);
                }
                Err(e) => out
                    .problems
                    .push(format!("{}: cannot list: {e}", dir.display())),
            },
            // Objects in an API server were validated by it.
            SourceConfig::Kubernetes { .. }
            | SourceConfig::KubernetesClusters { .. }
            | SourceConfig::Consul(_)
            | SourceConfig::Dns(_) => {}
        }
    }
    out
}

/// Binds the xDS listener with a deep accept backlog: after a restart
/// thousands of proxies reconnect at once, and an overflowing backlog costs
/// each dropped one a SYN retry (a second or more).
/// How often startup progress is logged until every source has synced.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Tells the service manager `state` (systemd's `sd_notify`: `READY=1`
/// once every source has synced and xDS serves it, `RELOADING=1` and
/// `READY=1` around a SIGHUP reload, `STOPPING=1`); nothing without
/// `$NOTIFY_SOCKET`.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(false, state) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// Logs startup progress per source every [`PROGRESS_EVERY`] until the
/// first snapshot built from every source is published, then one line
/// saying so (with what is served and how long it took) and `READY=1`.
/// Then it gives what the first sync freed back to the system
/// (`memory::release_freed`).
async fn announce_ready(
    reader: meshreg_registry::Reader,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
) {
    let started = std::time::Instant::now();
    let mut progress =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    while !snapshots.borrow_and_update().is_ready() {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = progress.tick() => {
                let view = reader.view();
                for (source, status) in view.sources() {
                    let state = match status.state {
                        meshreg_registry::SourceState::Syncing => "syncing",
                        meshreg_registry::SourceState::Synced => "synced",
                        _ => "stale",
                    };
                    tracing::info!(
                        %source,
                        state,
                        objects = status.objects,
                        last_error = status.last_error.as_deref().unwrap_or(""),
                        "starting"
                    );
                }
            }
        }
    }
    let view = reader.view();
    let status = format!(
        "serving {} services, {} endpoints from {} sources",
        view.service_count(),
        view.endpoint_count(),
        view.sources().count()
    );
    tracing::info!(
        services = view.service_count(),
        endpoints = view.endpoint_count(),
        sources = view.sources().count(),
        after_ms = started.elapsed().as_millis() as u64,
        "every source synced; xDS serving"
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    crate::memory::release_freed();
}

/// The commit the binary was built from (`build.rs`).
pub(crate) const COMMIT: &str = env!("MESHREG_COMMIT");

/// Registers what every Prometheus-scraped process shows (`process_*`: CPU
/// seconds, resident and virtual memory, open and maximum file
/// descriptors, start time; Linux only) and the build: `meshreg_build_info
/// {version, commit}` and Istio's `istio_build{component="pilot", tag}`, so
/// dashboards that show istiod's version show meshreg's. Both are 1.
fn register_process_metrics(registry: &prometheus::Registry) -> Result<()> {
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let version = env!("CARGO_PKG_VERSION");
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "meshreg_build_info",
            "1, labelled with the version and commit meshreg was built from.",
        ),
        &["version", "commit"],
    )?;
    info.with_label_values(&[version, COMMIT]).set(1);
    registry.register(Box::new(info))?;
    let istio = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "istio_build",
            "1, labelled as istiod labels its build (component pilot, tag: the version).",
        ),
        &["component", "tag"],
    )?;
    istio.with_label_values(&["pilot", version]).set(1);
    registry.register(Box::new(istio))?;
    Ok(())
}

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

/// The adapter for one source config; `reserved` are the cluster ids of the
/// configured `kubernetes` sources.
fn adapter_for(
    source: &SourceConfig,
    reserved: &[String],
    metrics: &meshreg_adapters::Metrics,
) -> Adapter {
    match source {
        SourceConfig::Serviceentry {
            dir,
            default_namespace,
            rescan_interval,
            resolve_dns,
        } => {
            let adapter = Adapter::ServiceEntry(ServiceEntryAdapter::new(
                serviceentry::Config {
                    dir: dir.clone(),
                    default_namespace: default_namespace.clone(),
                    rescan_interval: *rescan_interval,
                    ..serviceentry::Config::new(dir)
                },
                metrics.clone(),
            ));
            // Config::parse has checked it.
            match resolve_dns.as_ref().map(|r| r.adapter_config()) {
                Some(Ok(resolve)) => adapter.resolving_dns(resolve, metrics.clone()),
                _ => adapter,
            }
        }
        SourceConfig::Kubernetes {
            kubeconfig,
            cluster_id,
            network,
            domain,
        } => Adapter::Kubernetes(kubernetes::KubernetesAdapter::new(
            kubernetes::Config {
                kubeconfig: kubeconfig.clone(),
                cluster_id: cluster_id.clone(),
                network: network.clone(),
                domain: domain.clone(),
            },
            metrics.clone(),
        )),
        SourceConfig::KubernetesClusters {
            dir,
            network,
            domain,
            rescan_interval,
        } => Adapter::KubernetesClusters(kubernetes::ClustersAdapter::new(
            kubernetes::ClustersConfig {
                dir: dir.clone(),
                network: network.clone(),
                domain: domain.clone(),
                rescan_interval: *rescan_interval,
                reserved: reserved.to_vec(),
            },
            metrics.clone(),
        )),
        // Config::parse has checked it; a Config built otherwise gets a
        // source whose run reports the error.
        SourceConfig::Dns(d) => Adapter::Dns(match d.adapter_config() {
            Ok(config) => dns::DnsAdapter::new(config, metrics.clone()),
            Err(e) => dns::DnsAdapter::refused(&d.name, e, metrics.clone()),
        }),
        SourceConfig::Consul(c) => Adapter::Consul(consul::ConsulAdapter::new(
            c.adapter_config(),
            metrics.clone(),
        )),
    }
}

/// Spawns `adapter` under a child of `root`, so a reload can stop it alone.
fn spawn_adapter(
    tasks: &mut Tasks,
    config: SourceConfig,
    adapter: Adapter,
    updates: &mpsc::Sender<Update>,
    root: &CancellationToken,
) -> Running {
    let token = root.child_token();
    let source = adapter.source_id();
    let (tx, t, root) = (updates.clone(), token.clone(), root.clone());
    // Each adapter's run() opens its own `adapter{kind, source}` span.
    tasks.spawn(async move {
        let result = adapter.run(tx, t.clone()).await.map_err(Error::Source);
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
    path: Option<&Path>,
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
    let before: Vec<SourceId> = running.iter().map(|r| r.source.clone()).collect();
    for r in running.drain(..) {
        if config.sources.contains(&r.config) {
            kept.push(r);
            continue;
        }
        r.token.cancel();
        let same_source = config
            .sources
            .iter()
            .any(|sc| adapter_for(sc, &config.cluster_ids(), metrics).source_id() == r.source);
        if same_source {
            // Only its settings changed: the new adapter's first state
            // replaces the old one object by object; nothing is withdrawn.
            tracing::info!(source = %r.source, "reload: source settings changed; restarting it");
            continue;
        }
        tracing::info!(source = %r.source, "reload: source removed");
        if let SourceConfig::Serviceentry { dir, .. } = &r.config {
            // Added back later, it starts as a new source.
            meshreg_adapters::serviceentry::forget_directory(dir);
        }
        // Its state leaves the registry (after anything it already queued),
        // and its metric series with it.
        let _ = updates.send(Update::Forget { source: r.source }).await;
    }
    // Sources stopped above whose id is still configured: restarted, not
    // added (logged once, above).
    let restarted: Vec<SourceId> = before
        .into_iter()
        .filter(|s| !kept.iter().any(|k| k.source == *s))
        .collect();
    *running = kept;
    for sc in &config.sources {
        if running.iter().any(|r| r.config == *sc) {
            continue;
        }
        let adapter = adapter_for(sc, &config.cluster_ids(), metrics);
        if !restarted.contains(&adapter.source_id()) {
            tracing::info!(source = %adapter.source_id(), "reload: source added");
        }
        running.push(spawn_adapter(tasks, sc.clone(), adapter, updates, root));
    }
}
