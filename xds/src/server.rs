//! The ADS gRPC service: a thin loop per stream around the sans-IO
//! [`DeltaConnection`] and [`SotwConnection`].
//!
//! Each stream owns its protocol state and shares the newest [`Snapshot`]
//! through a `watch` channel. At most one response is built ahead of what
//! the transport accepts (the outbound channel holds two), so a slow proxy
//! costs one pending response, never a queue: it skips snapshots it was too
//! slow for and gets the newest version of each changed resource once.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::ack::Received;
use crate::cache::Snapshot;
use crate::codec::{AdsCodec, EncodedResponse};
use crate::delta::{DeltaConnection, Outgoing};
use crate::metrics::Metrics;
use crate::sotw::SotwConnection;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses buffered per stream beyond the one being built.
const OUTBOUND_BUFFER: usize = 2;

/// Requests larger than this are refused (Envoy's are a few KiB).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The `AggregatedDiscoveryService` (SotW and delta) as a tonic service.
#[derive(Debug, Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
    shutdown: CancellationToken,
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
            }),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(AdsCodec::<DiscoveryRequest>::default())
                    .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                Ok(grpc
                    .streaming(Stream::<SotwConnection>::new(shared), req)
                    .await)
            }),
            DELTA_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(AdsCodec::<DeltaDiscoveryRequest>::default())
                    .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                Ok(grpc
                    .streaming(Stream::<DeltaConnection>::new(shared), req)
                    .await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

/// What the stream loop needs from a protocol's connection state.
trait Protocol: Default + Send + 'static {
    type Request: Message + Default + Send + 'static;
    const MODE: &'static str;
    fn node(req: &Self::Request) -> Option<&Node>;
    fn handle_request(&mut self, req: Self::Request) -> Received;
    fn next_response(&mut self, snap: &Snapshot) -> Option<Outgoing>;
}

impl Protocol for DeltaConnection {
    type Request = DeltaDiscoveryRequest;
    const MODE: &'static str = "delta";
    fn node(req: &Self::Request) -> Option<&Node> {
        req.node.as_ref()
    }
    fn handle_request(&mut self, req: Self::Request) -> Received {
        DeltaConnection::handle_request(self, req)
    }
    fn next_response(&mut self, snap: &Snapshot) -> Option<Outgoing> {
        DeltaConnection::next_response(self, snap)
    }
}

impl Protocol for SotwConnection {
    type Request = DiscoveryRequest;
    const MODE: &'static str = "sotw";
    fn node(req: &Self::Request) -> Option<&Node> {
        req.node.as_ref()
    }
    fn handle_request(&mut self, req: Self::Request) -> Received {
        SotwConnection::handle_request(self, req)
    }
    fn next_response(&mut self, snap: &Snapshot) -> Option<Outgoing> {
        SotwConnection::next_response(self, snap)
    }
}

struct Stream<P> {
    shared: Arc<Shared>,
    _protocol: std::marker::PhantomData<fn() -> P>,
}

impl<P> Stream<P> {
    fn new(shared: Arc<Shared>) -> Self {
        Stream {
            shared,
            _protocol: std::marker::PhantomData,
        }
    }
}

type ResponseStream = ReceiverStream<Result<EncodedResponse, Status>>;

impl<P: Protocol> StreamingService<P::Request> for Stream<P> {
    type Response = EncodedResponse;
    type ResponseStream = ResponseStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<P::Request>>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let peer = request.remote_addr();
            let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
            let span = tracing::info_span!("xds", mode = P::MODE, node_id = tracing::field::Empty, peer = ?peer);
            tokio::spawn(serve::<P>(shared, request.into_inner(), tx).instrument(span));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Counts a connected proxy for as long as it lives.
struct ConnectedGuard(prometheus::IntGauge);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve<P: Protocol>(
    shared: Arc<Shared>,
    mut inbound: Streaming<P::Request>,
    tx: mpsc::Sender<Result<EncodedResponse, Status>>,
) {
    let metrics = &shared.metrics;
    metrics.connected.inc();
    let _guard = ConnectedGuard(metrics.connected.clone());
    let mut snapshots = shared.snapshots.clone();
    let mut snap = snapshots.borrow_and_update().clone();
    let mut conn = P::default();
    let mut pending: Option<Outgoing> = None;
    let mut node_known = false;
    tracing::debug!("stream opened");
    loop {
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
            _ = shared.shutdown.cancelled() => break,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if !node_known
                        && let Some(node) = P::node(&req) {
                            tracing::Span::current().record("node_id", node.id.as_str());
                            node_known = true;
                        }
                    on_received(conn.handle_request(req), metrics);
                }
                Ok(None) => {
                    tracing::debug!("stream closed by proxy");
                    break;
                }
                Err(status) => {
                    tracing::debug!(%status, "stream failed");
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                snap = snapshots.borrow_and_update().clone();
            }
            permit = tx.reserve(), if pending.is_some() => {
                let (Ok(permit), Some(out)) = (permit, pending.take()) else { break };
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
                permit.send(Ok(out.response));
            }
        }
    }
}

fn on_received(received: Received, metrics: &Metrics) {
    match received {
        Received::Nack {
            type_name,
            nonce,
            message,
        } => {
            metrics.rejects.with_label_values(&[type_name]).inc();
            tracing::warn!(type_url = type_name, %nonce, error = %message, "proxy rejected a response (NACK); it keeps its last accepted version");
        }
        Received::Ignored(what) => tracing::debug!(%what, "request ignored"),
        Received::Ack | Received::Subscription => {}
    }
}
