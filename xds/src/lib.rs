//! meshreg's xDS server: turns the registry's view into Envoy CDS and EDS
//! resources and serves them over ADS, state-of-the-world and delta.
//!
//! # Layout
//!
//! - `resource`: an encoded resource ([`Resource`]) and the [`TypeUrl`]s
//!   served; each version is encoded once and shared.
//! - `cds`, `eds`: generators from a `MergedService` to `Cluster` and
//!   `ClusterLoadAssignment` (one per port and per destination-rule
//!   subset); `policy`: a rule's traffic policy on a cluster; `tls`: its
//!   upstream TLS; `locality`: its locality load balancing; `check`:
//!   Envoy's invariants on what they generate ([`Invalid`]), checked
//!   before a resource is served.
//! - `scope`: what each proxy sees ([`ScopeKey`], [`Scopes`]): namespaces,
//!   `exportTo`, Sidecars, per-namespace rules, IP family and locality.
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
//! - `metrics`: [`Metrics`], pilot-compatible names; `limits`: what one
//!   peer may make the server hold ([`Limits`]).
//! - `status`: what operators ask: per stream and type what was sent and
//!   answered ([`TypeSync`]), what a proxy holds ([`ConfigDump`]), the
//!   last pushes ([`PushHistory`]); `csds`: the same over Envoy's Client
//!   Status Discovery Service on the xDS port.
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
mod csds;
mod debounce;
mod delta;
mod eds;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod held;
mod hook;
pub mod leds;
mod limits;
mod locality;
mod metrics;
mod network;
mod policy;
mod proxy;
mod proxyless;
mod resource;
mod scope;
mod server;
#[cfg(test)]
mod simulation;
mod sotw;
mod status;
mod tls;
mod tls_listener;
mod tracker;
mod transport;

pub use ack::Received;
pub use cache::{GenerateStats, Generator, Snapshot};
pub use cds::cluster_name;
pub use check::Invalid;
pub use codec::EncodedResponse;
pub use debounce::{Debounce, run as run_pusher};
pub use delta::{DeltaConnection, Outgoing};
pub use grpc::ResponseBody;
pub use hook::{ConnectHook, HEALTH_INFORMATION, Refusal, Tracked};
pub use limits::Limits;
pub use metrics::Metrics;
pub use network::{NetworkGateway, NetworkGateways};
pub use proxy::{Connected, Proxy, ProxyKind};
pub use resource::{Resource, TypeUrl};
pub use scope::{IpFamily, MAX_SCOPES, ScopeKey, ScopeRequest, Scopes, TooManyScopes};
pub use server::AdsService;
pub use status::{
    ConfigDump, HeldResource, Nack, PUSH_HISTORY, Push, PushHistory, Response, SyncState, Triggers,
    TypeDump, TypeSync,
};
pub use tls_listener::{Acceptor, PeerIdentity, TlsError, TlsSettings};
pub use transport::{serve, serve_tls};
