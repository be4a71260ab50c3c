//! The monitoring HTTP server: `/metrics` (Prometheus text), `/ready` (every
//! source synced), `/healthz` (the process runs) and `/debug/registry` (the
//! merged registry as text).

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use meshreg_registry::{Reader, SourceState};
use prometheus::{Encoder, TextEncoder};

#[derive(Clone)]
struct AppState {
    metrics: prometheus::Registry,
    registry: Reader,
    ads: meshreg_xds::AdsService,
}

/// The router of the monitoring server.
pub(crate) fn router(
    metrics: prometheus::Registry,
    registry: Reader,
    ads: meshreg_xds::AdsService,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/ready", get(ready))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/debug/proxies", get(debug_proxies))
        .route("/debug/registry", get(debug_registry))
        .with_state(AppState {
            metrics,
            registry,
            ads,
        })
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

/// The connected proxies, one line each: node id, protocol, peer, and
/// what their node says (kind, namespace, workload, IPs, cluster,
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
        let _ = write!(
            out,
            "{} {} peer={peer} since={since} kind={:?}",
            p.id, c.mode, p.kind
        );
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let locality = [&p.locality.0, &p.locality.1, &p.locality.2]
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("/");
        for (key, value) in [
            ("namespace", p.namespace.as_str()),
            ("workload", p.workload.as_str()),
            ("ips", &ips.join(",")),
            ("cluster", p.cluster_id.as_str()),
            ("network", p.network.as_str()),
            ("locality", locality.trim_matches('/')),
            ("istio", p.istio_version.as_str()),
            ("labels", &labels.join(",")),
        ] {
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
        if let Some(rule) = &svc.destination_rule {
            let subsets: Vec<&str> = rule.subsets.iter().map(|s| s.name.as_str()).collect();
            let _ = writeln!(
                out,
                "  destination rule {}/{} subsets=[{}]{}",
                rule.namespace,
                rule.name,
                subsets.join(","),
                if rule.traffic_policy.is_some() {
                    " with a traffic policy"
                } else {
                    ""
                }
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
                ("cluster", ep.cluster_id.as_str()),
                ("network", ep.network.as_str()),
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
    out
}
