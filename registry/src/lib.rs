//! The merged, versioned view of every service meshreg knows about.
//!
//! Adapters send [`Update`]s; the single [`Writer`] applies them, merges the
//! contributions of every source into one [`MergedService`] per hostname, and
//! publishes a new immutable [`View`] together with a [`Change`] that names
//! exactly which hostnames changed and whether only their endpoints did.
//! Readers ([`Reader`], cheap to clone) get the latest view and can ask it for
//! the changes since a version they have already seen.
//!
//! # Layout
//!
//! - `model`: [`Service`], [`Endpoint`] and their parts.
//! - `source`: [`SourceId`], who contributed a piece of state.
//! - `update`: [`Update`], the closed set of things an adapter can say.
//! - `merge`: how contributions for one hostname become one [`MergedService`].
//! - `change`: [`Change`] and [`ChangeKind`].
//! - `store`: [`Writer`], [`Reader`], [`View`] and the [`run`] loop.
//!
//! This crate does no I/O and knows nothing about Kubernetes, Consul, files
//! or Envoy: platform types stay in `meshreg-adapters`, xDS types in
//! `meshreg-xds`.

mod change;
mod error;
mod merge;
mod model;
mod source;
mod store;
mod update;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use change::{Change, ChangeKind};
pub use error::{Error, Result};
pub use merge::MergedService;
pub use model::{
    Address, Endpoint, Health, Hostname, Locality, Location, Port, Protocol, Resolution, Service,
    TlsMode,
};
pub use source::{SourceId, SourceKind};
pub use store::{Reader, SourceStatus, View, Writer, new, run};
pub use update::{Contribution, Update};
