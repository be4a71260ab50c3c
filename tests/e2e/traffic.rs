//! Real HTTP through an Envoy listener reaches a real local backend through
//! a cluster that meshreg pushed, over both ADS flavours.

use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, backend, eventually, http_get};

async fn traffic_over(ads: Ads, ip: &str) {
    let port = backend(ip, "hello from the backend").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("backend.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: backend, namespace: e2e}}\n\
             spec:\n  hosts: [backend.e2e.svc.cluster.local]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
             \x20 ports: [{{number: 8080, name: http, protocol: HTTP}}]\n\
             \x20 endpoints: [{{address: {ip}, ports: {{http: {port}}}}}]\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let cluster = "outbound|8080||backend.e2e.svc.cluster.local";
    let envoy = Envoy::start(daemon.xds, ads, "traffic", &[("backend", cluster)]).await;
    let listener = envoy.listener().await;
    let body = eventually(
        "a response through Envoy",
        Duration::from_secs(20),
        || async {
            match http_get(listener, "/", "backend").await {
                Ok((200, body)) => Some(body),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(body, "hello from the backend", "{}", envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reaches_backend_over_delta() {
    traffic_over(Ads::Delta, "127.0.0.21").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reaches_backend_over_sotw() {
    traffic_over(Ads::Sotw, "127.0.0.22").await;
}
