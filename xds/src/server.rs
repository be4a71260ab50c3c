//! The ADS gRPC service: a thin loop per stream around the sans-IO
//! [`DeltaConnection`] and [`SotwConnection`].
//!
//! Each stream owns its protocol state and shares the newest [`Snapshot`]
//! through a `watch` channel. At most one response is built ahead of what
//! the transport accepts (the outbound channel holds two), so a slow proxy
//! costs one pending response, never a queue: it skips snapshots it was too
//! slow for and gets the newest version of each changed resource once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use http::{Request, Response};
use http_body::{Body, Frame};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ack::Received;
use crate::cache::Snapshot;
use crate::delta::{DeltaConnection, DeltaRequest, Outgoing};
use crate::grpc::{self, Code, RequestStream, ResponseBody, Status};
use crate::metrics::Metrics;
use crate::proxy::{Connected, Proxies, Proxy};
use crate::sotw::{SotwConnection, SotwRequest};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses queued per stream beyond the one being built.
const OUTBOUND_BUFFER: usize = 1;

/// Requests larger than this are refused (Envoy's are a few KiB; a first
/// EDS subscription naming 10,000 clusters is under 1 MiB).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The `AggregatedDiscoveryService` (SotW and delta).
#[derive(Debug, Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
    shutdown: CancellationToken,
    proxies: Proxies,
}

impl AdsService {
    /// A service that serves the snapshots `snapshots` publishes; streams
    /// end when `shutdown` is cancelled.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        AdsService {
            shared: Arc::new(Shared {
                snapshots,
                metrics,
                shutdown,
                proxies: Proxies::default(),
            }),
        }
    }

    /// The proxies connected now (those whose stream named its node),
    /// ordered by node id.
    pub fn proxies(&self) -> Vec<Connected> {
        self.shared.proxies.list()
    }

    /// Answers one HTTP/2 request: opens an ADS stream, or a gRPC error
    /// for anything else.
    pub(crate) fn handle<B>(
        &self,
        req: Request<B>,
        peer: Option<SocketAddr>,
    ) -> Response<ResponseBody>
    where
        B: Body + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
        B::Data: Send,
    {
        match req.uri().path() {
            SOTW_PATH => self.open::<SotwConnection, B>(req.into_body(), peer),
            DELTA_PATH => self.open::<DeltaConnection, B>(req.into_body(), peer),
            path => grpc::error_response(&Status::new(
                Code::Unimplemented,
                format!("unknown method {path}"),
            )),
        }
    }

    fn open<P: Protocol, B>(&self, body: B, peer: Option<SocketAddr>) -> Response<ResponseBody>
    where
        B: Body + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
        B::Data: Send,
    {
        let (tx, resp) = grpc::streaming_response(OUTBOUND_BUFFER);
        let span = tracing::info_span!("xds", mode = P::MODE, node_id = tracing::field::Empty, peer = ?peer);
        let inbound = RequestStream::new(body, MAX_REQUEST_BYTES);
        tokio::spawn(serve::<P, B>(self.shared.clone(), inbound, tx, peer).instrument(span));
        resp
    }
}

/// What the stream loop needs from a protocol's connection state.
trait Protocol: Default + Send + 'static {
    type Request: Message + Default + Send + 'static;
    const MODE: &'static str;
    fn node(req: &Self::Request) -> Option<&Node>;
    fn handle_request(&mut self, req: Self::Request, snap: &Arc<Snapshot>) -> Received;
    fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing>;
}

impl Protocol for DeltaConnection {
    type Request = DeltaRequest;
    const MODE: &'static str = "delta";
    fn node(req: &Self::Request) -> Option<&Node> {
        req.node.as_ref()
    }
    fn handle_request(&mut self, req: Self::Request, snap: &Arc<Snapshot>) -> Received {
        DeltaConnection::handle_decoded(self, req, snap)
    }
    fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing> {
        DeltaConnection::next_response(self, snap)
    }
}

impl Protocol for SotwConnection {
    type Request = SotwRequest;
    const MODE: &'static str = "sotw";
    fn node(req: &Self::Request) -> Option<&Node> {
        req.node.as_ref()
    }
    fn handle_request(&mut self, req: Self::Request, snap: &Arc<Snapshot>) -> Received {
        SotwConnection::handle_request(self, req, snap)
    }
    fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing> {
        SotwConnection::next_response(self, snap)
    }
}

/// Counts a connected proxy for as long as it lives.
struct ConnectedGuard(prometheus::IntGauge);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type Outbound = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

async fn serve<P: Protocol, B>(
    shared: Arc<Shared>,
    mut inbound: RequestStream<B, P::Request>,
    tx: Outbound,
    peer: Option<SocketAddr>,
) where
    B: Body + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
    B::Data: Send,
{
    let metrics = &shared.metrics;
    metrics.connected.inc();
    let _guard = ConnectedGuard(metrics.connected.clone());
    let mut snapshots = shared.snapshots.clone();
    let mut snap = snapshots.borrow_and_update().clone();
    let mut conn = P::default();
    let mut pending: Option<Outgoing> = None;
    // The proxy, once the stream names its node (the first request does).
    let mut registration = None;
    tracing::debug!("stream opened");
    let status = loop {
        if pending.is_none() {
            let started = Instant::now();
            pending = conn.next_response(&snap);
            if let Some(o) = &pending {
                metrics
                    .push_time
                    .with_label_values(&[o.type_url.short()])
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => {
                break Status::new(Code::Unavailable, "server shutting down");
            }
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if registration.is_none() && let Some(node) = P::node(&req) {
                        tracing::Span::current().record("node_id", node.id.as_str());
                        registration = Some(shared.proxies.register(Connected {
                            proxy: Proxy::from_node(node),
                            mode: P::MODE,
                            peer,
                            since: std::time::SystemTime::now(),
                        }));
                    }
                    on_received(conn.handle_request(req, &snap), metrics);
                }
                Ok(None) => {
                    tracing::debug!("stream closed by proxy");
                    break Status::new(Code::Ok, "");
                }
                Err(status) => {
                    tracing::debug!(%status, "stream failed");
                    break status;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break Status::new(Code::Unavailable, "server shutting down");
                }
                snap = snapshots.borrow_and_update().clone();
            }
            permit = tx.reserve(), if pending.is_some() => {
                let (Ok(permit), Some(out)) = (permit, pending.take()) else {
                    // The proxy went away.
                    return;
                };
                let t = out.type_url.short();
                metrics.pushes.with_label_values(&[t]).inc();
                metrics
                    .bytes_sent
                    .with_label_values(&[t])
                    .inc_by(out.response.len() as u64);
                if let Some(at) = out.event_at {
                    metrics.convergence.observe(at.elapsed().as_secs_f64());
                }
                tracing::debug!(type_url = t, resources = out.resources, bytes = out.response.len(), "push");
                permit.send(Ok(out.response.to_frame()));
            }
        }
    };
    // Best effort: a proxy that stopped reading does not get its trailers.
    let _ = tx.try_send(Ok(Frame::trailers(status.to_headers())));
}

fn on_received(received: Received, metrics: &Metrics) {
    match received {
        Received::Nack {
            type_name,
            nonce,
            message,
            first,
        } => {
            metrics.rejects.with_label_values(&[type_name]).inc();
            if first {
                tracing::warn!(type_url = type_name, %nonce, error = %message, "proxy rejected a response (NACK); it keeps its last accepted version, and nothing is re-sent until the resource changes");
            } else {
                tracing::debug!(type_url = type_name, %nonce, error = %message, "repeated NACK");
            }
        }
        Received::Ignored(what) => tracing::debug!(%what, "request ignored"),
        Received::Ack | Received::Subscription => {}
    }
}
