//! meshreg's xDS server: turns the registry's view into Envoy CDS and EDS
//! resources and serves them over ADS, state-of-the-world and delta.
//!
//! # Layout
//!
//! - `resource`: an encoded resource ([`Resource`]) and the [`TypeUrl`]s
//!   served; each version is encoded once and shared.
//! - `cds`, `eds`: generators from a `MergedService` to `Cluster` and
//!   `ClusterLoadAssignment`.
//! - `cache`: the [`Generator`] and its immutable [`Snapshot`]s with the
//!   history of changed names.
//! - `debounce`: batching of registry changes ([`Debounce`]) and the push
//!   loop ([`run_pusher`]).
//! - `delta`, `sotw`: per-stream protocol state, sans-IO; `ack`: what is in
//!   flight, for NACKs.
//! - `codec`: writing responses from shared bytes; `server`: the tonic
//!   service ([`AdsService`]) and the per-stream loop.
//! - `metrics`: [`Metrics`], pilot-compatible names.
//!
//! This crate reads the registry through `meshreg_registry::Reader` only.
//! It knows nothing about Kubernetes, Consul, files or DNS.

mod ack;
mod cache;
mod cds;
mod codec;
mod debounce;
mod delta;
mod eds;
mod error;
mod metrics;
mod resource;
mod server;
mod sotw;

use std::future::Future;
use std::net::SocketAddr;

pub use cache::{GenerateStats, Generator, Snapshot};
pub use cds::cluster_name;
pub use codec::EncodedResponse;
pub use debounce::{Debounce, run as run_pusher};
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use resource::{Resource, TypeUrl};
pub use server::AdsService;

/// Serves `service` on `listener` until `shutdown` completes.
///
/// # Errors
///
/// [`Error::Transport`] when serving fails.
pub async fn serve(
    service: AdsService,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(Error::Transport)
}

/// The address a listener is bound to, for logs (helper for callers that
/// bind port 0).
pub fn local_addr(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
