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

mod error;
mod metrics;
pub mod serviceentry;

pub use error::{Error, Result};
pub use metrics::Metrics;
