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

use envoy_types::pb::envoy::config::core::v3::Node;
use http::{Request, Response};
use http_body::{Body, Frame};
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ack::Received;
use crate::cache::Snapshot;
use crate::codec::{EncodedResponse, empty_response};
use crate::delta::{DeltaConnection, DeltaRequest, Outgoing};
use crate::grpc::{self, Code, RequestStream, ResponseBody, Status};
use crate::limits::{Budget, HitLog, Limits, RateLimit};
use crate::metrics::Metrics;
use crate::proxy::{Connected, Proxies, Proxy};
use crate::resource::TypeUrl;
use crate::scope::{ScopeKey, ScopeRequest, Scopes};
use crate::sotw::{SotwConnection, SotwRequest};
use crate::status::{ConfigDump, PushHistory, StreamSync, TypeDump};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses queued per stream beyond the one being built.
const OUTBOUND_BUFFER: usize = 1;

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
    /// `None`: every proxy is unscoped.
    scopes: Option<Scopes>,
    pushes: PushHistory,
    limits: Limits,
    /// Bytes buffered for incomplete requests, all streams together.
    budget: Budget,
    /// One per [`crate::limits::NAMES`].
    hit_logs: Vec<HitLog>,
    /// SPIFFE IDs that may claim any namespace (tools, gateways).
    trusted: Vec<String>,
    /// Refusals on the TLS listener, logged at most once a minute each.
    auth_logs: [HitLog; 3],
    /// Told of every stream that names its node (VM auto-registration).
    hook: Option<Arc<dyn crate::ConnectHook>>,
}

impl Shared {
    /// Counts (and logs at most once a minute) a refusal: 0 handshake, 1
    /// namespace, 2 identity.
    fn auth_refused(&self, which: usize, detail: &dyn std::fmt::Display) {
        let log = &self.auth_logs[which];
        self.metrics
            .auth_refused
            .with_label_values(&[["handshake", "namespace", "identity"][which]])
            .inc();
        log.note(detail);
    }

    /// Counts (and now and then logs) a peer hitting `limit`.
    fn hit(&self, limit: &'static str, detail: &dyn std::fmt::Display) {
        if let Some(log) = crate::limits::NAMES
            .iter()
            .position(|n| *n == limit)
            .and_then(|i| self.hit_logs.get(i))
        {
            log.hit(&self.metrics, detail);
        }
    }
}

/// How long [`AdsService::config_dump`] waits for a stream to answer.
const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
                scopes: None,
                pushes: PushHistory::default(),
                limits: Limits::default(),
                budget: Budget::new(
                    Limits::default().max_buffered_bytes,
                    Limits::default().max_buffered_bytes_per_ip,
                ),
                hit_logs: crate::limits::NAMES.into_iter().map(HitLog::new).collect(),
                trusted: Vec::new(),
                auth_logs: [
                    HitLog::new("handshake"),
                    HitLog::new("namespace"),
                    HitLog::new("identity"),
                ],
                hook: None,
            }),
        }
    }

    /// Applies `limits` to every peer of this service (and of [`serve`]'s
    /// listener that serves it).
    ///
    /// [`serve`]: crate::serve
    ///
    /// # Panics
    ///
    /// When streams were already served (call it right after `new`).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        let shared =
            Arc::get_mut(&mut self.shared).expect("with_limits() before the service is shared");
        shared.limits = limits;
        shared.budget = Budget::new(limits.max_buffered_bytes, limits.max_buffered_bytes_per_ip);
        self
    }

    /// Lets proxies whose client certificate names one of `ids` (SPIFFE IDs)
    /// claim any namespace, as tools and gateways need; everyone else must
    /// claim the namespace their certificate names.
    ///
    /// # Panics
    ///
    /// When streams were already served (call it right after `new`).
    pub fn with_trusted_identities(mut self, ids: Vec<String>) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("with_trusted_identities() before the service is shared")
            .trusted = ids;
        self
    }

    /// Tells `hook` of every stream that names its node; it may refuse the
    /// stream and tracks what it accepts (see [`crate::ConnectHook`]).
    ///
    /// # Panics
    ///
    /// If the service was already cloned (call it while building).
    pub fn with_connect_hook(mut self, hook: Arc<dyn crate::ConnectHook>) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("with_connect_hook() before the service is shared")
            .hook = Some(hook);
        self
    }

    /// Counts (and now and then logs) a failed TLS handshake.
    pub(crate) fn tls_refused(&self, detail: &dyn std::fmt::Display) {
        self.shared.auth_refused(0, detail);
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// Counts (and now and then logs) a peer hitting `limit` (one of
    /// [`crate::limits::NAMES`]).
    pub(crate) fn limit_hit(&self, limit: &'static str, detail: &dyn std::fmt::Display) {
        self.shared.hit(limit, detail);
    }

    /// Shows `history` (the pusher's, see [`run_pusher`](crate::run_pusher))
    /// on [`AdsService::push_history`].
    ///
    /// # Panics
    ///
    /// When streams were already served (call it right after `new`).
    pub fn with_push_history(mut self, history: PushHistory) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("with_push_history() before the service is shared")
            .pushes = history;
        self
    }

    /// The last pushes, oldest first.
    pub fn push_history(&self) -> Vec<crate::Push> {
        self.shared.pushes.list()
    }

    /// What the proxy with node id `node_id` holds, asked of its stream (the
    /// newest, if several streams share the id). `None` when no stream of
    /// that id is connected or it does not answer within 5 s.
    pub async fn config_dump(&self, node_id: &str) -> Option<ConfigDump> {
        let channel = self.shared.proxies.dump_channel(node_id)?;
        self.dump_from(node_id, channel).await
    }

    /// What stream `c` (as [`Proxies::list`](crate::proxy) gave it) holds:
    /// CSDS answers per stream, as istiod does.
    pub(crate) async fn config_dump_of(&self, c: &Connected) -> Option<ConfigDump> {
        let channel = self.shared.proxies.dump_channel_of(c.stream)?;
        self.dump_from(&c.proxy.id, channel).await
    }

    async fn dump_from(
        &self,
        node_id: &str,
        (ask, mode, peer): (
            crate::proxy::DumpRequests,
            &'static str,
            Option<std::net::SocketAddr>,
        ),
    ) -> Option<ConfigDump> {
        let (tx, rx) = oneshot::channel();
        ask.send(tx).await.ok()?;
        let types = tokio::time::timeout(DUMP_TIMEOUT, rx).await.ok()?.ok()?;
        Some(ConfigDump {
            node_id: node_id.to_string(),
            mode,
            peer,
            types,
        })
    }

    /// Serves a proxy whose node names a namespace the snapshots of its
    /// scope from `scopes` (which a [`Generator`](crate::Generator) must
    /// keep up to date: its [`Generator::scopes`](crate::Generator::scopes));
    /// without it, every proxy gets everything.
    ///
    /// # Panics
    ///
    /// When streams were already served (call it right after `new`).
    pub fn scoped(mut self, scopes: Scopes) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("scoped() before the service is shared")
            .scopes = Some(scopes);
        self
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
        let deadline = grpc::timeout(req.headers());
        let identity = req.extensions().get::<crate::PeerIdentity>().cloned();
        match req.uri().path() {
            SOTW_PATH => self.open::<SotwConnection, B>(req.into_body(), peer, deadline, identity),
            DELTA_PATH => {
                self.open::<DeltaConnection, B>(req.into_body(), peer, deadline, identity)
            }
            crate::csds::FETCH_PATH => crate::csds::serve(self.clone(), req.into_body(), true),
            crate::csds::STREAM_PATH => crate::csds::serve(self.clone(), req.into_body(), false),
            path => grpc::error_response(&Status::new(
                Code::Unimplemented,
                format!("unknown method {path}"),
            )),
        }
    }

    fn open<P: Protocol, B>(
        &self,
        body: B,
        peer: Option<SocketAddr>,
        deadline: Option<std::time::Duration>,
        identity: Option<crate::PeerIdentity>,
    ) -> Response<ResponseBody>
    where
        B: Body + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
        B::Data: Send,
    {
        let (tx, resp) = grpc::streaming_response(OUTBOUND_BUFFER);
        let span = tracing::info_span!("xds", mode = P::MODE, node_id = tracing::field::Empty, peer = %peer.map(|p| p.to_string()).unwrap_or_default());
        let inbound = RequestStream::new(body, self.shared.limits.max_request_bytes)
            .keep_large(P::REPEATS_SUBSCRIPTION)
            .with_budget(self.shared.budget.clone(), peer.map(|p| p.ip()));
        tokio::spawn(
            serve::<P, B>(self.shared.clone(), inbound, tx, peer, deadline, identity)
                .instrument(span),
        );
        resp
    }
}

/// What the stream loop needs from a protocol's connection state.
trait Protocol: Default + Send + 'static {
    type Request: Message + Default + Send + 'static;
    const MODE: &'static str;
    /// Every request names the whole subscription (SotW), so large
    /// requests keep coming: their receive buffer is kept.
    const REPEATS_SUBSCRIPTION: bool;
    fn set_max_names(&mut self, max: usize);
    /// Whether the proxy takes LEDS ([`Proxy::leds`]); delta only.
    fn set_leds(&mut self, _on: bool) {}
    fn node(req: &Self::Request) -> Option<&Node>;
    /// A health report ([`crate::HEALTH_INFORMATION`]): `Some(None)`
    /// healthy, `Some(Some(message))` unhealthy; `None` for other requests.
    fn health(req: &Self::Request) -> Option<Option<&str>>;
    /// The response a request answers: type, nonce, and the error of a NACK.
    fn answer(req: &Self::Request) -> Option<(TypeUrl, String, Option<String>)>;
    fn dump(&self, snap: &Snapshot) -> Vec<TypeDump>;
    fn rejected_counts(&self, snap: &Snapshot) -> Vec<(TypeUrl, usize)>;
    fn handle_request(&mut self, req: Self::Request, snap: &Arc<Snapshot>) -> Received;
    fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing>;
}

impl Protocol for DeltaConnection {
    type Request = DeltaRequest;
    const MODE: &'static str = "delta";
    const REPEATS_SUBSCRIPTION: bool = false;
    fn set_max_names(&mut self, max: usize) {
        DeltaConnection::set_max_names(self, max);
    }
    fn set_leds(&mut self, on: bool) {
        DeltaConnection::set_leds(self, on);
    }
    fn node(req: &Self::Request) -> Option<&Node> {
        req.node.as_ref()
    }
    fn health(req: &Self::Request) -> Option<Option<&str>> {
        (req.type_url == crate::HEALTH_INFORMATION)
            .then(|| req.error_detail.as_ref().map(|e| e.message.as_str()))
    }
    fn answer(req: &Self::Request) -> Option<(TypeUrl, String, Option<String>)> {
        answer(
            &req.type_url,
            &req.response_nonce,
            req.error_detail.as_ref(),
        )
    }
    fn dump(&self, snap: &Snapshot) -> Vec<TypeDump> {
        DeltaConnection::dump(self, snap)
    }
    fn rejected_counts(&self, snap: &Snapshot) -> Vec<(TypeUrl, usize)> {
        DeltaConnection::rejected_counts(self, snap)
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
    const REPEATS_SUBSCRIPTION: bool = true;
    fn set_max_names(&mut self, max: usize) {
        SotwConnection::set_max_names(self, max);
    }
    fn node(req: &Self::Request) -> Option<&Node> {
        req.node.as_ref()
    }
    fn health(req: &Self::Request) -> Option<Option<&str>> {
        (req.type_url == crate::HEALTH_INFORMATION)
            .then(|| req.error_detail.as_ref().map(|e| e.message.as_str()))
    }
    fn answer(req: &Self::Request) -> Option<(TypeUrl, String, Option<String>)> {
        answer(
            &req.type_url,
            &req.response_nonce,
            req.error_detail.as_ref(),
        )
    }
    fn dump(&self, snap: &Snapshot) -> Vec<TypeDump> {
        SotwConnection::dump(self, snap)
    }
    fn rejected_counts(&self, snap: &Snapshot) -> Vec<(TypeUrl, usize)> {
        SotwConnection::rejected_counts(self, snap)
    }
    fn handle_request(&mut self, req: Self::Request, snap: &Arc<Snapshot>) -> Received {
        SotwConnection::handle_request(self, req, snap)
    }
    fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing> {
        SotwConnection::next_response(self, snap)
    }
}

fn answer(
    type_url: &str,
    nonce: &str,
    error: Option<&envoy_types::pb::google::rpc::Status>,
) -> Option<(TypeUrl, String, Option<String>)> {
    if nonce.is_empty() {
        return None;
    }
    Some((
        TypeUrl::parse(type_url)?,
        nonce.to_string(),
        error.map(|e| e.message.clone()),
    ))
}

/// Counts a connected proxy for as long as it lives.
struct ConnectedGuard(prometheus::IntGauge);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type Outbound = mpsc::Sender<Result<Frame<grpc::Chunks>, Infallible>>;

async fn serve<P: Protocol, B>(
    shared: Arc<Shared>,
    mut inbound: RequestStream<B, P::Request>,
    tx: Outbound,
    peer: Option<SocketAddr>,
    deadline: Option<std::time::Duration>,
    peer_identity: Option<crate::PeerIdentity>,
) where
    B: Body + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
    B::Data: Send,
{
    let metrics = &shared.metrics;
    // Counted once the stream names its node (its version is a label).
    let mut _counted: Option<ConnectedGuard> = None;
    let mut snapshots = shared.snapshots.clone();
    let mut snap = snapshots.borrow_and_update().clone();
    let mut conn = P::default();
    conn.set_max_names(shared.limits.max_names_per_stream);
    let mut rate = RateLimit::new(shared.limits.max_requests_per_second);
    // A stream must send a complete request soon after it opens.
    let first_request = tokio::time::sleep(shared.limits.first_request_timeout);
    tokio::pin!(first_request);
    let mut requested = false;
    // The client's `grpc-timeout`, if it set one (Envoy does not for ADS).
    let until_deadline =
        tokio::time::sleep(deadline.unwrap_or(std::time::Duration::from_secs(365 * 86_400)));
    tokio::pin!(until_deadline);
    let mut pending: Option<Outgoing> = None;
    // Empty answers to requests for types not served here.
    let mut unserved = Unserved::default();
    // The proxy, once the stream names its node (the first request does).
    let mut registration = None;
    // What the connect hook tracks for this stream (dropped with it).
    let mut tracked: Option<Box<dyn crate::Tracked>> = None;
    // Its scope, and the epoch in which it was picked.
    let mut scope: Option<(ScopeKey, u64)> = None;
    // What picks the proxy's scope, to pick it again.
    let mut identity: Option<ScopeRequest> = None;
    // What was sent and answered, and requests for what the proxy holds
    // (debug endpoints).
    let sync = StreamSync::default();
    let (dump_tx, mut dumps) = mpsc::channel::<oneshot::Sender<Vec<TypeDump>>>(1);
    tracing::debug!("stream opened");
    // A token of the stream's own, its future made once: polling the
    // token shared by every stream locks it, and a future made on every
    // turn of the loop registers with it and leaves it (perf: about 2% of
    // the server's CPU per endpoint change at 1,000 proxies).
    let token = shared.shutdown.child_token();
    let shutdown = token.cancelled();
    tokio::pin!(shutdown);
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
            () = &mut shutdown => {
                break Status::new(Code::Unavailable, "server shutting down");
            }
            () = &mut until_deadline, if deadline.is_some() => {
                break Status::new(Code::DeadlineExceeded, "the stream's grpc-timeout passed");
            }
            () = &mut first_request, if !requested => {
                break Status::limit(
                    "first_request_timeout",
                    format!("no request within {:?} of opening the stream", shared.limits.first_request_timeout),
                );
            }
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    requested = true;
                    if !rate.take(Instant::now()) {
                        break Status::limit(
                            "requests_per_second",
                            format!("more than {} requests a second", shared.limits.max_requests_per_second),
                        );
                    }
                    if registration.is_none() && let Some(node) = P::node(&req) {
                        // Escaped (Debug): a node id is the client's text.
                        tracing::Span::current().record("node_id", tracing::field::debug(&node.id));
                        let proxy = Proxy::from_node(node);
                        conn.set_leds(proxy.leds);
                        // istiod's rule on 15012: the namespace a proxy
                        // claims is the one its certificate names, unless
                        // the identity is trusted with everything.
                        if let Some(id) = &peer_identity
                            && !shared.trusted.contains(&id.spiffe_id)
                        {
                            match &id.namespace {
                                None => {
                                    let why = format!("{} names no namespace", id.spiffe_id);
                                    shared.auth_refused(2, &format_args!("{why} ({})", peer.map(|p| p.to_string()).unwrap_or_default()));
                                    break Status::new(Code::PermissionDenied, why);
                                }
                                Some(ns) if *ns != proxy.namespace => {
                                    let why = format!(
                                        "the certificate's identity {} may not claim namespace {:?}",
                                        id.spiffe_id, proxy.namespace
                                    );
                                    shared.auth_refused(1, &format_args!("{why} (node {:?})", node.id));
                                    break Status::new(Code::PermissionDenied, why);
                                }
                                Some(_) => {}
                            }
                        }
                        if let Some(hook) = &shared.hook {
                            match hook.connect(&proxy) {
                                Ok(t) => tracked = t,
                                Err(refusal) => {
                                    tracing::warn!(reason = refusal.message(), "stream refused");
                                    let code = match refusal {
                                        crate::Refusal::FailedPrecondition(_) => Code::FailedPrecondition,
                                        crate::Refusal::PermissionDenied(_) => Code::PermissionDenied,
                                    };
                                    break Status::new(code, refusal.message());
                                }
                            }
                        }
                        let version = metrics.version_label(&proxy.istio_version);
                        let gauge = metrics.connected.with_label_values(&[version.as_str()]);
                        gauge.inc();
                        _counted = Some(ConnectedGuard(gauge));
                        if let Some(scopes) = &shared.scopes {
                            let req = ScopeRequest::of(&proxy);
                            match scopes.subscribe(&req) {
                                Ok(Some(sub)) => {
                                    tracing::debug!(scope = ?sub.key.to_string(), "scoped");
                                    snapshots = sub.snapshots;
                                    snap = snapshots.borrow_and_update().clone();
                                    scope = Some((sub.key, sub.epoch));
                                    identity = Some(req);
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "stream refused");
                                    break Status::new(Code::ResourceExhausted, e.to_string());
                                }
                            }
                        }
                        registration = Some(shared.proxies.register(
                            Connected {
                                proxy,
                                mode: P::MODE,
                                peer,
                                since: std::time::SystemTime::now(),
                                scope: scope.as_ref().map(|(k, _)| k.clone()),
                                sync: Vec::new(),
                                stream: 0,
                            },
                            sync.clone(),
                            dump_tx.clone(),
                        ));
                    }
                    if let Some(report) = P::health(&req) {
                        // Never answered; ignored from untracked proxies,
                        // as istiod ignores them.
                        if let Some(t) = &tracked {
                            t.health(report.map_or(Ok(()), Err));
                        }
                        continue;
                    }
                    let answer = P::answer(&req);
                    if let Some((t, nonce, error)) = &answer {
                        sync.answered(*t, nonce, error.as_deref());
                    }
                    let received = conn.handle_request(req, &snap);
                    if let Received::Unserved { type_url, answer } = &received {
                        unserved.asked(type_url, *answer);
                    }
                    if let Some(refused) = on_received(received, metrics) {
                        break Status::limit("names_per_stream", refused);
                    }
                    if answer.is_some() {
                        sync.set_rejected(&conn.rejected_counts(&snap));
                    }
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
                if let (Some(scopes), Some((key, epoch)), Some(req)) =
                    (&shared.scopes, &mut scope, &identity)
                    && snap.epoch > *epoch
                {
                    // Which Sidecar applies may have changed.
                    match scopes.subscribe(req) {
                        Ok(Some(sub)) => {
                            *epoch = sub.epoch;
                            if sub.key != *key {
                                tracing::debug!(from = ?key.to_string(), to = ?sub.key.to_string(), "scope changed");
                                *key = sub.key;
                                snapshots = sub.snapshots;
                                snap = snapshots.borrow_and_update().clone();
                                if let Some(r) = &registration {
                                    r.set_scope(Some(key.clone()));
                                }
                            }
                        }
                        Ok(None) => {}
                        // The table is full: keep the scope it has.
                        Err(e) => {
                            *epoch = snap.epoch;
                            tracing::warn!(error = %e, "scope kept: no room for the new one");
                        }
                    }
                }
            }
            Some(reply) = dumps.recv() => {
                let _ = reply.send(conn.dump(&snap));
            }
            permit = tx.reserve(), if !unserved.replies.is_empty() => {
                let (Ok(permit), Some(reply)) = (permit, unserved.replies.pop_front()) else {
                    return;
                };
                permit.send(Ok(reply.to_frame()));
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
                metrics
                    .config_size
                    .with_label_values(&[t])
                    .observe(out.response.len() as f64);
                if let Some(at) = out.event_at {
                    metrics.convergence.observe(at.elapsed().as_secs_f64());
                }
                tracing::debug!(type_url = t, resources = out.resources, bytes = out.response.len(), "push");
                sync.sent(out.type_url, out.nonce, out.version);
                permit.send(Ok(out.response.to_frame()));
            }
        }
    };
    if let Some(limit) = status.limit {
        let who = peer.map(|p| p.to_string()).unwrap_or_default();
        shared.hit(limit, &format_args!("{} ({who})", status.message));
    }
    // Best effort: a proxy that stopped reading does not get its trailers.
    let _ = tx.try_send(Ok(Frame::trailers(status.to_headers())));
}

/// Requests of one stream for types this server does not generate, and
/// the empty responses that answer them (see [`Received::Unserved`]).
#[derive(Default)]
struct Unserved {
    /// Types already logged on this stream (at most [`Unserved::MAX`]).
    logged: Vec<String>,
    /// Responses waiting to be sent (at most [`Unserved::MAX`]).
    replies: std::collections::VecDeque<EncodedResponse>,
    nonce: u64,
}

impl Unserved {
    /// Types logged, and answers queued, per stream at most: a client
    /// inventing type URLs gets no more (and its requests are rate limited).
    const MAX: usize = 8;

    fn asked(&mut self, type_url: &str, answer: bool) {
        if !self.logged.iter().any(|t| t == type_url) && self.logged.len() < Self::MAX {
            // Escaped (Debug): the type URL is the client's text.
            tracing::info!(type_url = ?type_url, "the proxy asked for a type meshreg does not serve; it is answered with an empty response");
            self.logged.push(type_url.to_string());
        }
        if answer && self.replies.len() < Self::MAX {
            self.nonce += 1;
            // Apart from the connections' nonces (1, 2, 3 …).
            let nonce = format!("unserved-{}", self.nonce);
            self.replies.push_back(empty_response(type_url, &nonce));
        }
    }
}

/// Logs and counts what a request did; the message of a refusal.
fn on_received(received: Received, metrics: &Metrics) -> Option<String> {
    match received {
        Received::Refused(message) => return Some(message),
        // Client-supplied text (nonces, error details, type URLs) is logged
        // escaped (Debug), so it cannot forge log lines.
        Received::Nack {
            known: false,
            type_name,
            nonce,
            ..
        } => {
            tracing::debug!(type_url = type_name, nonce = ?nonce, "NACK of a response never sent; ignored");
        }
        Received::Nack {
            type_name,
            nonce,
            message,
            first,
            known: true,
        } => {
            metrics.rejects.with_label_values(&[type_name]).inc();
            if first {
                tracing::warn!(type_url = type_name, nonce = ?nonce, error = ?message, "proxy rejected a response (NACK); it keeps its last accepted version, and nothing is re-sent until the resource changes");
            } else {
                tracing::debug!(type_url = type_name, nonce = ?nonce, error = ?message, "repeated NACK");
            }
        }
        Received::Ignored(what) => tracing::debug!(what = ?what, "request ignored"),
        Received::Unserved { .. } => {}
        Received::Ack | Received::Subscription => {}
    }
    None
}
