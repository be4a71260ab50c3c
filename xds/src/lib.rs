//! meshreg's xDS server: turns the registry's view into Envoy CDS and EDS
//! resources and serves them over ADS, state-of-the-world and delta.
//!
//! # Layout
//!
//! - `resource`: an encoded resource ([`Resource`]) and the [`TypeUrl`]s
//!   served; each version is encoded once and shared.
//! - `cds`, `eds`: generators from a `MergedService` to `Cluster` and
//!   `ClusterLoadAssignment` (one per port and per destination-rule
//!   subset); `policy`: a rule's traffic policy on a cluster; `check`: Envoy's invariants on what they
//!   generate ([`Invalid`]), checked before a resource is served.
//! - `cache`: the [`Generator`] and its immutable [`Snapshot`]s with the
//!   history of changed names.
//! - `debounce`: batching of registry changes ([`Debounce`]) and the push
//!   loop ([`run_pusher`]).
//! - `delta`, `sotw`: per-stream protocol state, sans-IO; `held`: what a
//!   proxy holds, as a difference from a shared snapshot; `ack`: what is in
//!   flight, for NACKs; `batch`: large responses sent in chunks.
//! - `codec`: writing responses from shared bytes; `grpc`: gRPC framing
//!   and status over hyper; `server`: the ADS service ([`AdsService`]) and
//!   the per-stream loop; `transport`: the HTTP/2 server ([`serve`]), with
//!   bounded send buffers.
//! - `metrics`: [`Metrics`], pilot-compatible names.
//! - `proxy`: the model of a connected proxy ([`Proxy`], parsed from its
//!   node once per stream) and the list of connected ones.
//!
//! This crate reads the registry through `meshreg_registry::Reader` only.
//! It knows nothing about Kubernetes, Consul, files or DNS.

mod ack;
mod batch;
mod cache;
mod cds;
mod check;
mod codec;
mod debounce;
mod delta;
mod eds;
mod grpc;
mod held;
mod metrics;
mod policy;
mod proxy;
mod resource;
mod server;
mod sotw;
mod transport;

pub use ack::Received;
pub use cache::{GenerateStats, Generator, Snapshot};
pub use cds::cluster_name;
pub use check::Invalid;
pub use codec::EncodedResponse;
pub use debounce::{Debounce, run as run_pusher};
pub use delta::{DeltaConnection, Outgoing};
pub use grpc::ResponseBody;
pub use metrics::Metrics;
pub use proxy::{Connected, Proxy, ProxyKind};
pub use resource::{Resource, TypeUrl};
pub use server::AdsService;
pub use transport::serve;
