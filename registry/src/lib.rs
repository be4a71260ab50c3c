//! The merged, versioned view of every service meshreg knows about.
//!
//! Sources send [`Update`]s over keyed [`Object`]s (service declarations,
//! endpoint shards, workloads); the single [`Writer`] diffs them per object,
//! joins workloads to the declarations that select them, merges every
//! source's objects into one [`MergedService`] per hostname, and publishes a
//! new immutable [`View`] together with a [`Change`] that names exactly
//! which hostnames changed and whether only their endpoints did. It also
//! owns each source's status (syncing, synced, stale).
//! Readers ([`Reader`], cheap to clone) get the latest view and can ask it for
//! the changes since a version they have already seen.
//!
//! # Layout
//!
//! - `model`: [`Service`], [`Endpoint`] and their parts.
//! - `source`: [`SourceId`], who contributed a piece of state.
//! - `object`: [`Object`] and [`ObjectKey`]: what a source sends.
//! - `policy`: [`DestinationRule`] and its traffic policy.
//! - `group`: [`WorkloadGroup`], the template of registered workloads.
//! - `update`: [`Update`], the closed set of things a source can say.
//! - `merge`: how the objects for one hostname become one [`MergedService`].
//! - `change`: [`Change`] and [`ChangeKind`].
//! - `store`: [`Writer`], [`Reader`], [`View`] and the [`run`] loop.
//!
//! This crate does no I/O and knows nothing about Kubernetes, Consul, files
//! or Envoy: platform types stay in `meshreg-adapters`, xDS types in
//! `meshreg-xds`.

mod change;
mod error;
mod group;
mod merge;
mod model;
mod object;
mod policy;
mod source;
mod store;
mod update;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use change::{Change, ChangeKind};
pub use error::{Error, Result};
pub use group::{GroupTemplate, HealthCheck, ReadinessProbe, WorkloadGroup};
pub use merge::{Conflict, ConflictKind, Declared, MergedService, ROOT_NAMESPACE};
pub use model::{
    Address, Endpoint, Health, Hostname, Locality, Location, Port, Protocol, Resolution, Service,
    TlsMode, shared_locality, shared_str,
};
pub use object::{EndpointShard, Object, ObjectKey, Workload};
pub use policy::{
    ClientTls, ConnectionPool, DestinationRule, EgressHost, EgressNamespace, H2Upgrade, HashRing,
    LoadBalancer, LocalityDistribute, LocalityFailover, LocalityLbSetting, OutlierDetection,
    Sidecar, SimpleLb, Subset, TcpKeepalive, TlsSetting, TrafficPolicy, exported_to,
};
pub use source::{SourceId, SourceKind};
pub use store::{Applied, Reader, SourceState, SourceStatus, View, Writer, new, run};
pub use update::{Contribution, Update};
