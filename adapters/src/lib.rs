//! meshreg's platform adapters: each adapter owns one source (a directory
//! of Istio files, a Kubernetes cluster, a Consul datacenter …), translates
//! that platform's objects into the registry's model and sends
//! [`meshreg_registry::Update`]s to the registry.
//!
//! # Layout
//!
//! - `error`: [`Error`], the few ways an adapter can fail for good.
//! - `metrics`: [`Metrics`], per-source sync state, updates, objects and
//!   errors.
//! - [`serviceentry`]: Istio `ServiceEntry`/`WorkloadEntry` YAML files in a
//!   directory (`convert` is pure, `watch` does the I/O).
//! - [`kubernetes`]: one Kubernetes cluster's Services and EndpointSlices,
//!   through the `kube` crate's watchers (`convert` is pure, `watch` does
//!   the I/O).
//! - [`consul`]: one Consul datacenter's catalog and health, through an
//!   agent's HTTP API with blocking queries (`convert` is pure, `client`
//!   and `watch` do the I/O).
//! - [`dns`]: services found by DNS lookups meshreg makes (SRV names,
//!   A/AAAA host names), with `hickory-resolver`.
//! - [`etcd`]: the store of VM registrations shared by replicas (a writer
//!   for the registrar, and the `vm/etcd` source every replica runs).
//! - [`Adapter`]: any of them, as the daemon runs them.
//!
//! Each platform is a public module (`serviceentry::Config`,
//! `serviceentry::ServiceEntryAdapter`) rather than flat re-exports, because
//! every adapter has its own `Config` and the names would collide; inside a
//! platform module everything is private with `pub use` of its API.
//!
//! Adapters run as `run(self, sink, shutdown)` futures. Source errors (a bad
//! file, a missing directory, an unreachable API) are logged, counted in
//! [`Metrics`] and retried; only configuration errors end `run` with an
//! [`Error`].
//!
//! This crate does not build xDS resources, does not merge sources (the
//! registry does) and holds no global state: metrics are registered into the
//! [`prometheus::Registry`] the binary passes in.

pub mod consul;
pub mod dns;
mod error;
pub mod etcd;
pub mod kubernetes;
mod metrics;
mod ports;
mod retry;
pub mod serviceentry;

pub use error::{Error, Result};
pub use metrics::{MAX_REJECTED, Metrics, Problem, Rejected, Rejections};

use meshreg_registry::{SourceId, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One source's adapter, whatever its platform.
#[derive(Debug)]
#[non_exhaustive]
pub enum Adapter {
    /// A directory of Istio files.
    ServiceEntry(serviceentry::ServiceEntryAdapter),
    /// A Kubernetes cluster.
    Kubernetes(kubernetes::KubernetesAdapter),
    /// Kubernetes clusters from a directory of kubeconfig files.
    KubernetesClusters(kubernetes::ClustersAdapter),
    /// A Consul datacenter.
    Consul(consul::ConsulAdapter),
    /// DNS lookups.
    Dns(dns::DnsAdapter),
    /// Another adapter whose DNS-resolved hosts meshreg resolves itself.
    ResolvingDns(Box<(Adapter, dns::ResolveConfig, Metrics)>),
}

impl Adapter {
    /// This adapter with the hosts of its DNS-resolved services that match
    /// `config` resolved by meshreg (EDS) rather than by the proxies (see
    /// [`dns::ResolveConfig`]).
    pub fn resolving_dns(self, config: dns::ResolveConfig, metrics: Metrics) -> Adapter {
        Adapter::ResolvingDns(Box::new((self, config, metrics)))
    }

    /// The registry source the adapter sends as.
    pub fn source_id(&self) -> SourceId {
        match self {
            Adapter::ServiceEntry(a) => a.source_id(),
            Adapter::Kubernetes(a) => a.source_id(),
            Adapter::KubernetesClusters(a) => a.source_id(),
            Adapter::Consul(a) => a.source_id(),
            Adapter::Dns(a) => a.source_id(),
            Adapter::ResolvingDns(r) => r.0.source_id(),
        }
    }

    /// Runs the adapter until `shutdown` or a closed `sink` (see each
    /// adapter's `run`).
    ///
    /// # Errors
    ///
    /// The adapter's configuration errors.
    pub async fn run(self, sink: mpsc::Sender<Update>, shutdown: CancellationToken) -> Result<()> {
        match self {
            Adapter::ServiceEntry(a) => a.run(sink, shutdown).await,
            Adapter::Kubernetes(a) => a.run(sink, shutdown).await,
            Adapter::KubernetesClusters(a) => a.run(sink, shutdown).await,
            Adapter::Consul(a) => a.run(sink, shutdown).await,
            Adapter::Dns(a) => a.run(sink, shutdown).await,
            Adapter::ResolvingDns(r) => {
                let (inner, config, metrics) = *r;
                Box::pin(dns::run_resolving(inner, config, metrics, sink, shutdown)).await
            }
        }
    }
}
