//! The monitoring HTTP server: `/metrics` (Prometheus text), `/ready` (every
//! source synced), `/healthz` (the process runs), and the debug endpoints:
//! `/debug/registry` and `/debug/proxies` (text, for people), and the JSON
//! ones `meshreg ctl` reads (shapes in [`crate::debug`]): `/debug/syncz`,
//! `/debug/config_dump?proxyID=<node id>`, `/debug/registryz`,
//! `/debug/endpointz`, `/debug/sourcez`, `/debug/push_status`. `/debug`
//! lists them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::get;
use meshreg_registry::{Reader, SourceState};
use prometheus::{Encoder, TextEncoder};

#[derive(Clone)]
struct AppState {
    metrics: prometheus::Registry,
    registry: Reader,
    ads: meshreg_xds::AdsService,
    sources: Sources,
    debug_guard: DebugGuard,
    debug_refused: prometheus::IntCounter,
}

/// Connections the HTTP port holds at most (in all, and from one
/// address): Prometheus, probes and operators need a handful.
const MAX_CONNECTIONS: usize = 1_000;
const MAX_CONNECTIONS_PER_IP: usize = 100;

/// Time a client has to send a request's headers, on a new connection and
/// between requests on a kept-alive one: an idle or slowloris connection is
/// closed after it.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` completes, with bounds
/// axum's own `serve` does not set: at most [`MAX_CONNECTIONS`] connections
/// ([`MAX_CONNECTIONS_PER_IP`] from one address; further ones are closed at
/// once), and [`HEADER_READ_TIMEOUT`] to send each request's headers (HTTP/1;
/// an idle keep-alive connection is closed then too). Accept errors are
/// logged and retried.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    refused: Refused,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // HTTP/1 only: what Prometheus, probes and ctl speak; hyper's
    // version detection would wait for a first byte without a timeout.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open: Arc<std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>> =
        Arc::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "HTTP accept failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        {
            let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
            let from_ip = o.1.get(&peer.ip()).copied().unwrap_or(0);
            if o.0 >= MAX_CONNECTIONS {
                refused.hit("connections", peer);
                continue;
            }
            if from_ip >= MAX_CONNECTIONS_PER_IP {
                refused.hit("connections_per_ip", peer);
                continue;
            }
            o.0 += 1;
            *o.1.entry(peer.ip()).or_insert(0) += 1;
        }
        let svc = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(ConnectInfo(peer))),
        );
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "HTTP connection ended");
            }
            let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
            o.0 -= 1;
            if let Some(n) = o.1.get_mut(&peer.ip()) {
                *n -= 1;
                if *n == 0 {
                    o.1.remove(&peer.ip());
                }
            }
        });
    }
    graceful.shutdown().await;
}

/// Connections the HTTP port refused at accept, counted in
/// `meshreg_http_refused_total{limit}` (`connections`,
/// `connections_per_ip`) and logged at most once a minute per limit with
/// the count since the last line, so a flood cannot flood the log.
#[derive(Clone)]
pub(crate) struct Refused {
    counter: prometheus::IntCounterVec,
    last_log: Arc<std::sync::Mutex<RefusedLog>>,
}

/// Per limit: when a refusal was last logged, and how many since.
type RefusedLog = std::collections::HashMap<&'static str, (Option<std::time::Instant>, u64)>;

/// How often refusals of one limit are logged at most.
const REFUSED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Refused {
    /// The counter, registered in `metrics` (a second registration, in
    /// tests, reuses the name).
    pub(crate) fn register(metrics: &prometheus::Registry) -> Self {
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "meshreg_http_refused_total",
                "Connections the HTTP port closed at accept, by the limit they hit.",
            ),
            &["limit"],
        )
        .expect("a valid metric");
        for limit in ["connections", "connections_per_ip"] {
            counter.with_label_values(&[limit]);
        }
        let _ = metrics.register(Box::new(counter.clone()));
        Refused {
            counter,
            last_log: Arc::default(),
        }
    }

    fn hit(&self, limit: &'static str, peer: SocketAddr) {
        self.counter.with_label_values(&[limit]).inc();
        let mut logs = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let entry = logs.entry(limit).or_insert((None, 0));
        entry.1 += 1;
        if entry
            .0
            .is_none_or(|at| now.duration_since(at) >= REFUSED_LOG_EVERY)
        {
            tracing::warn!(
                %peer,
                limit,
                times = entry.1,
                "HTTP connection refused: too many open (logged at most once a minute)"
            );
            *entry = (Some(now), 0);
        }
    }
}

/// Who may read `/debug/*`: loopback peers (with [`DebugAccess::Local`]),
/// anyone (with `Any`), and holders of the bearer token.
///
/// [`DebugAccess::Local`]: crate::config::DebugAccess::Local
#[derive(Clone, Debug)]
pub(crate) struct DebugGuard {
    pub(crate) access: crate::config::DebugAccess,
    pub(crate) token: Option<Arc<str>>,
}

impl DebugGuard {
    /// Whether a request from `peer` with `authorization` (the header's
    /// value) may read `/debug/*`.
    fn allows(&self, peer: SocketAddr, authorization: Option<&[u8]>) -> bool {
        let local = match peer.ip() {
            std::net::IpAddr::V4(ip) => ip.is_loopback(),
            std::net::IpAddr::V6(ip) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
        if local || self.access == crate::config::DebugAccess::Any {
            return true;
        }
        let (Some(token), Some(header)) = (&self.token, authorization) else {
            return false;
        };
        // The scheme is case-insensitive (RFC 9110, 11.1).
        header.len() > 7
            && header[..7].eq_ignore_ascii_case(b"bearer ")
            && constant_time_eq(&header[7..], token.as_bytes())
    }
}

/// Compares without returning early on the first differing byte, so the
/// time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn guard_debug(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> axum::response::Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if s.debug_guard.allows(peer, authorization) {
        return next.run(req).await;
    }
    s.debug_refused.inc();
    json_error(
        StatusCode::FORBIDDEN,
        "/debug/* answers loopback peers only (http.debug: local), or a bearer token from http.debug_token_file".into(),
    )
}

/// What the debug endpoints show of sources beyond the registry's status.
#[derive(Clone)]
pub(crate) struct Sources {
    /// Their error counts and refused objects.
    pub(crate) adapters: meshreg_adapters::Metrics,
    /// When they last sent updates.
    pub(crate) activity: crate::store::Activity,
}

/// The router of the monitoring server.
pub(crate) fn router(
    metrics: prometheus::Registry,
    registry: Reader,
    ads: meshreg_xds::AdsService,
    sources: Sources,
    debug_guard: DebugGuard,
) -> Router {
    let debug_refused = prometheus::IntCounter::new(
        "meshreg_http_debug_refused_total",
        "Requests to /debug/* refused: not from loopback and without the bearer token.",
    )
    .expect("a valid metric");
    // Registered once per router; a second router (tests) reuses the name.
    let _ = metrics.register(Box::new(debug_refused.clone()));
    let state = AppState {
        metrics,
        registry,
        ads,
        sources,
        debug_guard,
        debug_refused,
    };
    let open = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/ready", get(ready))
        .route("/healthz", get(|| async { "ok\n" }));
    let debug = Router::new()
        .route("/debug", get(debug_index))
        .route("/debug/proxies", get(debug_proxies))
        .route("/debug/registry", get(debug_registry))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug/registryz", get(registryz))
        .route("/debug/endpointz", get(endpointz))
        .route("/debug/sourcez", get(sourcez))
        .route("/debug/push_status", get(push_status))
        .route("/debug/rejected", get(rejected))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_debug,
        ));
    open.merge(debug).with_state(state)
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    match encoder.encode(&s.metrics.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            buf,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        ),
    }
}

/// The debug endpoints, one per line with what it shows.
const DEBUG_INDEX: &str = "\
/metrics                       Prometheus text (open to all)
/ready, /healthz               readiness (every source serving) and liveness (open to all)
/debug/syncz                   JSON: every connected proxy, per type what was sent and acked (ctl proxy-status)
/debug/config_dump?proxyID=ID  JSON: what one proxy holds, each resource as sent (ctl proxy-config)
/debug/registryz               JSON: services with their declarations per source (ctl registry)
/debug/endpointz               JSON: every endpoint with source, cluster, network, locality, health
/debug/sourcez                 JSON: each source's status, objects and last error (ctl sources)
/debug/push_status             JSON: the last pushes: triggers, what changed, proxies, duration
/debug/rejected                JSON: objects the sources refuse now: file or object, document, field, reason (ctl rejected)
/debug/registry                text: the merged registry
/debug/proxies                 text: the connected proxies and their scopes
";

async fn debug_index() -> &'static str {
    DEBUG_INDEX
}

/// A JSON error body: `{"error": "..."}`.
fn json_error(status: StatusCode, message: String) -> axum::response::Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn syncz(State(s): State<AppState>) -> Json<Vec<crate::debug::ProxyStatus>> {
    Json(
        s.ads
            .proxies()
            .iter()
            .map(crate::debug::ProxyStatus::from_connected)
            .collect(),
    )
}

#[derive(serde::Deserialize)]
struct DumpQuery {
    #[serde(rename = "proxyID")]
    proxy_id: Option<String>,
}

async fn config_dump(
    State(s): State<AppState>,
    Query(q): Query<DumpQuery>,
) -> axum::response::Response {
    let Some(id) = q.proxy_id.filter(|id| !id.is_empty()) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "proxyID is required: /debug/config_dump?proxyID=<node id>".into(),
        );
    };
    match s.ads.config_dump(&id).await {
        Some(dump) => Json(crate::debug::ConfigDump::from_dump(&dump)).into_response(),
        None => json_error(
            StatusCode::NOT_FOUND,
            format!("no connected proxy has node id {id:?}"),
        ),
    }
}

async fn registryz(State(s): State<AppState>) -> Json<Vec<crate::debug::Service>> {
    Json(crate::debug::services(&s.registry.view()))
}

async fn endpointz(State(s): State<AppState>) -> Json<Vec<crate::debug::Endpoint>> {
    Json(crate::debug::endpoints(&s.registry.view()))
}

async fn sourcez(State(s): State<AppState>) -> Json<Vec<crate::debug::SourceStatus>> {
    let view = s.registry.view();
    let rejected = s.sources.adapters.rejections().list();
    Json(
        view.sources()
            .map(|(id, st)| {
                let mut out = crate::debug::SourceStatus::from_registry(id, st);
                if let Some(a) = s.sources.activity.get(id) {
                    out.last_update = Some(crate::debug::time(a.last_update));
                    out.last_sync = a.last_sync.map(crate::debug::time);
                    out.updates = a.updates;
                }
                out.errors = s.sources.adapters.error_count(id);
                out.rejected = rejected.iter().filter(|r| r.source == out.source).count();
                out
            })
            .collect(),
    )
}

async fn rejected(State(s): State<AppState>) -> Json<Vec<crate::debug::Rejected>> {
    Json(
        s.sources
            .adapters
            .rejections()
            .list()
            .iter()
            .map(crate::debug::Rejected::from_adapters)
            .collect(),
    )
}

async fn push_status(State(s): State<AppState>) -> Json<Vec<crate::debug::Push>> {
    Json(
        s.ads
            .push_history()
            .iter()
            .map(crate::debug::Push::from_push)
            .collect(),
    )
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    let view = s.registry.view();
    let mut body = String::new();
    for (source, status) in view.sources() {
        let state = match status.state {
            SourceState::Syncing => "syncing".to_string(),
            SourceState::Synced => "synced".to_string(),
            SourceState::Stale { since } => format!(
                "stale for {}s (serving its last state)",
                since.elapsed().map_or(0, |d| d.as_secs())
            ),
            _ => "unknown".to_string(),
        };
        let _ = write!(body, "{source}: {state}, {} objects", status.objects);
        if let Some(e) = &status.last_error {
            let when = if status.state == SourceState::Synced {
                "last error (recovered since)"
            } else {
                "error"
            };
            let _ = write!(body, "; {when}: {e}");
        }
        body.push('\n');
    }
    if view.is_ready() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// The connected proxies, one line each: node id, protocol, peer, scope
/// (`all` for an unscoped proxy, else its namespace and the Sidecar that
/// applies to it), and what their node says (kind, namespace, workload, IPs, cluster,
/// network, locality, Istio version, labels).
async fn debug_proxies(State(s): State<AppState>) -> String {
    let proxies = s.ads.proxies();
    let mut out = format!("proxies {}\n", proxies.len());
    for c in proxies {
        let p = &c.proxy;
        let since = c
            .since
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let peer = c.peer.map(|a| a.to_string()).unwrap_or_default();
        // What the proxy sent is written escaped (`escape_debug`): a node
        // id or label must not put control characters on an operator's
        // terminal.
        let _ = write!(
            out,
            "{} {} peer={peer} since={since} kind={:?}",
            p.id.escape_debug(),
            c.mode,
            p.kind
        );
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let labels: Vec<String> = p
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", k.escape_debug(), v.escape_debug()))
            .collect();
        // All three parts, empty ones included (`/zone/sub` has no region).
        let locality = if [&p.locality.0, &p.locality.1, &p.locality.2]
            .iter()
            .all(|s| s.is_empty())
        {
            String::new()
        } else {
            format!("{}/{}/{}", p.locality.0, p.locality.1, p.locality.2)
                .escape_debug()
                .to_string()
        };
        let scope = c
            .scope
            .as_ref()
            .map_or_else(|| "all".to_string(), ToString::to_string);
        let _ = write!(out, " scope={scope}");
        for (key, value) in [
            ("namespace", p.namespace.as_str()),
            ("workload", p.workload.as_str()),
            ("ips", &ips.join(",")),
            ("cluster", p.cluster_id.as_str()),
            ("network", p.network.as_str()),
            ("istio", p.istio_version.as_str()),
        ] {
            if !value.is_empty() {
                let _ = write!(out, " {key}={}", value.escape_debug());
            }
        }
        for (key, value) in [("locality", &locality), ("labels", &labels.join(","))] {
            if !value.is_empty() {
                let _ = write!(out, " {key}={value}");
            }
        }
        out.push('\n');
    }
    out
}

async fn debug_registry(State(s): State<AppState>) -> String {
    let view = s.registry.view();
    let mut out = format!(
        "version {} services {} endpoints {}\n",
        view.version(),
        view.service_count(),
        view.endpoint_count()
    );
    for (host, svc) in view.services() {
        let ports: Vec<String> = svc
            .service
            .ports
            .iter()
            .map(|p| format!("{}/{:?}", p.number, p.protocol))
            .collect();
        let _ = writeln!(
            out,
            "{host} {:?} ports=[{}] sources=[{}]",
            svc.service.resolution,
            ports.join(","),
            svc.contributors
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        for d in &svc.declared {
            let _ = writeln!(
                out,
                "  declared by {} in {} ({}) exportTo={:?}",
                d.source, d.namespace, d.origin, d.export_to
            );
        }
        // Every rule that may apply; which one a proxy gets depends on its
        // namespace and labels (see its scope on /debug/proxies).
        for rule in svc.rules.iter().chain(&svc.selector_rules) {
            let subsets: Vec<&str> = rule.subsets.iter().map(|s| s.name.as_str()).collect();
            let selector = rule
                .workload_selector
                .as_ref()
                .map(|sel| {
                    let labels: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!(" selector=[{}]", labels.join(","))
                })
                .unwrap_or_default();
            let unscoped = svc
                .destination_rule
                .as_ref()
                .is_some_and(|d| std::sync::Arc::ptr_eq(d, rule));
            let _ = writeln!(
                out,
                "  destination rule {}/{} subsets=[{}]{}{}{}",
                rule.namespace,
                rule.name,
                subsets.join(","),
                if rule.traffic_policy.is_some() {
                    " with a traffic policy"
                } else {
                    ""
                },
                selector,
                if unscoped { " (unscoped proxies)" } else { "" }
            );
        }
        for (ns, variant) in &svc.by_namespace {
            let _ = writeln!(
                out,
                "  as {ns} declares it: {} endpoints",
                variant.endpoints.len()
            );
        }
        for c in &svc.conflicts {
            let _ = writeln!(out, "  conflict: {c}");
        }
        for ep in svc.endpoints.iter() {
            let locality = [&ep.locality.region, &ep.locality.zone, &ep.locality.subzone]
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("/");
            let labels = ep
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let weight = if ep.weight == 0 {
                String::new()
            } else {
                ep.weight.to_string()
            };
            let _ = write!(out, "  {} {:?} {:?}", ep.address, ep.ports, ep.health);
            for (key, value) in [
                ("cluster", &*ep.cluster_id),
                ("network", &*ep.network),
                ("locality", locality.trim_matches('/')),
                ("workload", ep.workload_name.as_str()),
                ("weight", &weight),
                ("labels", labels.as_str()),
            ] {
                if !value.is_empty() {
                    let _ = write!(out, " {key}={value}");
                }
            }
            out.push('\n');
        }
    }
    for sc in view.sidecars() {
        let hosts = match &sc.egress_hosts {
            None => "everything".to_string(),
            Some(h) => h
                .iter()
                .map(|e| {
                    let ns = match &e.namespace {
                        meshreg_registry::EgressNamespace::Any => "*",
                        meshreg_registry::EgressNamespace::Own => ".",
                        meshreg_registry::EgressNamespace::Named(n) => n.as_str(),
                    };
                    format!("{ns}/{}", e.host)
                })
                .collect::<Vec<_>>()
                .join(","),
        };
        let _ = writeln!(
            out,
            "sidecar {}/{} selector={:?} imports=[{hosts}]",
            sc.namespace, sc.name, sc.workload_selector
        );
    }
    for g in view.workload_groups() {
        let t = &g.template;
        let _ = write!(out, "workloadgroup {}/{}", g.namespace, g.name);
        for (key, value) in [
            ("serviceAccount", t.service_account.clone()),
            ("network", t.network.clone()),
            ("locality", t.locality.to_string()),
            ("ports", format!("{:?}", t.ports)),
            ("labels", format!("{:?}", t.labels)),
        ] {
            if !value.is_empty() && value != "{}" {
                let _ = write!(out, " {key}={value}");
            }
        }
        if let Some(p) = &g.probe {
            let _ = write!(
                out,
                " probe=[{} every {:?}, timeout {:?}, {} up / {} down]",
                p.check, p.period, p.timeout, p.success_threshold, p.failure_threshold
            );
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DebugAccess;

    #[test]
    fn debug_access_is_loopback_or_the_bearer_token() {
        let local = DebugGuard {
            access: DebugAccess::Local,
            token: Some(Arc::from("s3cret")),
        };
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 40000);
        assert!(local.allows(at("127.0.0.1"), None));
        assert!(local.allows(at("::1"), None));
        assert!(local.allows(at("::ffff:127.0.0.1"), None));
        assert!(!local.allows(at("10.0.0.1"), None));
        assert!(!local.allows(at("::ffff:10.0.0.1"), None));
        assert!(local.allows(at("10.0.0.1"), Some(b"Bearer s3cret")));
        assert!(local.allows(at("10.0.0.1"), Some(b"bearer s3cret")));
        assert!(!local.allows(at("10.0.0.1"), Some(b"Bearer s3cre")));
        assert!(!local.allows(at("10.0.0.1"), Some(b"Bearer s3cret ")));
        assert!(!local.allows(at("10.0.0.1"), Some(b"s3cret")));
        let no_token = DebugGuard {
            access: DebugAccess::Local,
            token: None,
        };
        assert!(!no_token.allows(at("10.0.0.1"), Some(b"Bearer ")));
        let any = DebugGuard {
            access: DebugAccess::Any,
            token: None,
        };
        assert!(any.allows(at("10.0.0.1"), None));
    }
}
