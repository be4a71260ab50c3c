//! The `kubernetes` adapter: one Kubernetes cluster's Services and
//! EndpointSlices as one registry source, joined with its Pods, Nodes and
//! Namespaces, with its Istio ServiceEntries and WorkloadEntries, read with the `kube` crate's watchers (list, then watch,
//! relist on `410 Gone`, with backoff).
//!
//! # Layout
//!
//! - `convert`: pure functions, istiod's Kubernetes registry rules: a
//!   Service → a service declaration of `<name>.<namespace>.svc.<domain>`,
//!   an EndpointSlice → one endpoint shard of that host, its endpoints
//!   joined with their Pod (labels, service account, network, locality
//!   label), Node (locality) and Namespace (network) (see its docs).
//! - `watch`: the I/O. A client from the configured kubeconfig, one watcher
//!   per kind, the objects kept (Services and slices whole, Pods, Nodes and
//!   Namespaces reduced to what endpoints take), what was sent, and the
//!   updates: a Pod, Node or Namespace event re-converts only the slices
//!   that point to it.
//!
//! # Behaviour
//!
//! - Once both kinds are listed, one [`Update::Reset`] with every object;
//!   then each watch event becomes one [`Update::Patch`] of that object
//!   alone (an edit of one EndpointSlice costs that shard). A relist (after
//!   `410 Gone` or a restart of the watch) ends in a `Reset`, which the
//!   registry diffs, so endpoints never vanish in between.
//! - The API server unreachable, refusing or erroring: the source is
//!   reported stale with the reason (`Update::Stale`), its last state kept,
//!   and the watch retried with the `kube` crate's default backoff; the
//!   failure is logged and counted once per outage, not per retry. The
//!   first successful event afterwards re-sends the state (`Reset`).
//! - An object that cannot be converted (a port out of range) is logged
//!   and counted, and contributes nothing; the others are unaffected.
//! - Credentials from the kubeconfig are never logged.
//!
//! A Pod with an IP is also a registry workload, which ServiceEntry
//! `workloadSelector`s of its namespace select.
//!
//! Istio `ServiceEntry` and `WorkloadEntry` objects are read with the file
//! source's parser (`serviceentry::registry_objects`); a kind whose CRD is
//! not installed is simply empty. Several clusters: see
//! [`ClustersAdapter`].

mod clusters;
mod convert;
mod watch;

use std::path::PathBuf;

use meshreg_registry::{SourceId, SourceKind, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::metrics::Metrics;

/// The DNS domain of Services, unless configured.
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// Configuration of one [`KubernetesAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The kubeconfig file (its current context is used); `None`: the
    /// in-cluster credentials of the Pod meshreg runs in (its service
    /// account token and CA, `KUBERNETES_SERVICE_HOST`).
    pub kubeconfig: Option<PathBuf>,
    /// The cluster's id: endpoints and VIPs carry it, and the source is
    /// named after it. Must not be empty.
    pub cluster_id: String,
    /// The network the cluster's endpoints are on (empty: the default).
    pub network: String,
    /// The Services' DNS domain. Default: [`DEFAULT_DOMAIN`].
    pub domain: String,
}

/// Watches one cluster's Services, EndpointSlices, Pods, Nodes and
/// Namespaces and sends the registry their state once, then what changes.
#[derive(Debug)]
pub struct KubernetesAdapter {
    config: Config,
    metrics: Metrics,
    source: SourceId,
}

// === impl KubernetesAdapter ===

impl KubernetesAdapter {
    /// An adapter for `config`, reporting into `metrics`. Nothing is read
    /// until [`KubernetesAdapter::run`].
    pub fn new(config: Config, metrics: Metrics) -> Self {
        let source = SourceId::new(SourceKind::Kubernetes, config.cluster_id.clone());
        KubernetesAdapter {
            config,
            metrics,
            source,
        }
    }

    /// The registry source this adapter sends as: kind `kubernetes`, named
    /// after the cluster id.
    pub fn source_id(&self) -> SourceId {
        self.source.clone()
    }

    /// Connects, lists and watches until `shutdown` is cancelled or `sink`
    /// is closed (both return `Ok`).
    ///
    /// # Errors
    ///
    /// Only configuration errors: an empty `cluster_id` or `domain`. An
    /// unreadable kubeconfig or an unreachable API server is a source
    /// problem: reported stale, logged, counted and retried.
    pub async fn run(self, sink: mpsc::Sender<Update>, shutdown: CancellationToken) -> Result<()> {
        watch::run(self.config, self.metrics, self.source, sink, shutdown, None).await
    }

    /// [`KubernetesAdapter::run`], firing `first` once the cluster has sent
    /// its first update (its state, or that it cannot read the cluster).
    pub(crate) async fn run_reporting(
        self,
        sink: mpsc::Sender<Update>,
        shutdown: CancellationToken,
        first: tokio::sync::oneshot::Sender<()>,
    ) -> Result<()> {
        watch::run(
            self.config,
            self.metrics,
            self.source,
            sink,
            shutdown,
            Some(first),
        )
        .await
    }
}

/// Configuration of a [`ClustersAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClustersConfig {
    /// The directory of kubeconfig files, one per cluster, named
    /// `<cluster id>` or `<cluster id>.yaml` (like Istio's remote secrets,
    /// keyed by cluster id). Hidden files and files with another extension
    /// are ignored.
    pub dir: PathBuf,
    /// The network of every cluster's endpoints (empty: the default).
    pub network: String,
    /// The Services' DNS domain.
    pub domain: String,
    /// How often the directory is read for added, removed or rotated
    /// files. Must not be zero.
    pub rescan_interval: std::time::Duration,
    /// Cluster ids other sources already use (configured `kubernetes`
    /// sources): a file named after one is refused, and logged, rather than
    /// taking that cluster over.
    pub reserved: Vec<String>,
}

/// Several clusters from a directory of kubeconfig files: one
/// [`KubernetesAdapter`] (one source, `kubernetes/<cluster id>`) per file.
/// A file added starts its cluster; one removed stops it and withdraws
/// exactly its objects (`Update::Forget`); one whose content changes
/// (rotated credentials, a new server address) restarts its cluster
/// without withdrawing anything: the new connection's first state replaces
/// the old one object by object, so proxies see no gap. All without a
/// restart of the daemon.
#[derive(Debug)]
pub struct ClustersAdapter {
    config: ClustersConfig,
    metrics: Metrics,
    source: SourceId,
}

impl ClustersAdapter {
    /// An adapter for `config`, reporting into `metrics`.
    pub fn new(config: ClustersConfig, metrics: Metrics) -> Self {
        let source = SourceId::new(
            SourceKind::Kubernetes,
            format!("dir:{}", config.dir.display()),
        );
        ClustersAdapter {
            config,
            metrics,
            source,
        }
    }

    /// The directory's own source: it contributes no object, and is synced
    /// once the directory has been read (each cluster is a source of its
    /// own, `kubernetes/<cluster id>`).
    pub fn source_id(&self) -> SourceId {
        self.source.clone()
    }

    /// Reads the directory every `rescan_interval` and runs one cluster per
    /// file until `shutdown` or a closed `sink`.
    ///
    /// # Errors
    ///
    /// Configuration errors: an empty `dir` or `domain`, a zero
    /// `rescan_interval`.
    pub async fn run(self, sink: mpsc::Sender<Update>, shutdown: CancellationToken) -> Result<()> {
        clusters::run(self.config, self.metrics, self.source, sink, shutdown).await
    }
}
