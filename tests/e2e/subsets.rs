//! DestinationRules from files: bookinfo's rules give one cluster per
//! subset, each subset's EDS holds only its version's endpoints, traffic
//! routed to a subset reaches only that version, and a circuit-breaker
//! rule is in Envoy's config and actually trips.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, eventually, http_get, repo};

/// A ServiceEntry `reviews.default.svc.cluster.local` on `port`, selecting
/// three WorkloadEntries labelled v1, v2, v3 at 127.0.0.71-73.
fn reviews(port: u16) -> String {
    let mut text = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: reviews, namespace: default}}\n\
         spec:\n  hosts: [reviews.default.svc.cluster.local]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n\
         \x20 workloadSelector: {{labels: {{app: reviews}}}}\n"
    );
    for (i, v) in ["v1", "v2", "v3"].iter().enumerate() {
        text.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{name: reviews-{v}, namespace: default}}\n\
             spec:\n  address: 127.0.0.{}\n  labels: {{app: reviews, version: {v}}}\n",
            71 + i
        ));
    }
    text
}

/// Envoy's hosts of each outbound cluster.
async fn hosts_by_cluster(envoy: &Envoy) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let mut out: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for (cluster, host) in envoy.endpoints().await {
        out.entry(cluster).or_default().insert(host);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_subsets_are_clusters_and_traffic_reaches_only_the_subset() {
    let port = crate::support::backend("127.0.0.71", "v1").await;
    crate::support::backend_at("127.0.0.72", port, "v2").await;
    crate::support::backend_at("127.0.0.73", port, "v3").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("reviews.yaml"), reviews(port)).unwrap();
    std::fs::copy(
        repo().join(
            "adapters/tests/fixtures/istio/istio/samples/bookinfo/networking/destination-rule-all.yaml",
        ),
        dir.path().join("destination-rule-all.yaml"),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let host = "reviews.default.svc.cluster.local";
    let v2 = format!("outbound|{port}|v2|{host}");
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "subsets", &[("reviews", &v2)]).await;
    let want: std::collections::BTreeMap<String, BTreeSet<String>> = [
        ("", vec!["127.0.0.71", "127.0.0.72", "127.0.0.73"]),
        ("v1", vec!["127.0.0.71"]),
        ("v2", vec!["127.0.0.72"]),
        ("v3", vec!["127.0.0.73"]),
    ]
    .into_iter()
    .map(|(subset, ips)| {
        (
            format!("outbound|{port}|{subset}|{host}"),
            ips.into_iter().map(|ip| format!("{ip}:{port}")).collect(),
        )
    })
    .collect();
    eventually(
        "one cluster per subset, each with its version",
        Duration::from_secs(20),
        || async {
            let got: std::collections::BTreeMap<_, _> = hosts_by_cluster(&envoy)
                .await
                .into_iter()
                .filter(|(c, _)| c.ends_with(host))
                .collect();
            (got == want).then_some(())
        },
    )
    .await;
    let listener = envoy.listener().await;
    for _ in 0..10 {
        assert_eq!(
            http_get(listener, "/", "reviews").await.unwrap(),
            (200, "v2".to_string())
        );
    }
    // The connected proxy is listed with its node.
    let proxies = http_get(daemon.http, "/debug/proxies", "meshreg")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        proxies.starts_with("proxies 1\nsubsets delta peer=127.0.0.1:"),
        "{proxies}"
    );
    // The registry shows the rule.
    let registry = http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        registry.contains("destination rule default/reviews subsets=[v1,v2,v3]"),
        "{registry}"
    );
    // Removing the rule removes the subset clusters.
    std::fs::remove_file(dir.path().join("destination-rule-all.yaml")).unwrap();
    eventually(
        "the subset clusters gone",
        Duration::from_secs(20),
        || async {
            let clusters = envoy.clusters().await;
            let mine: Vec<_> = clusters.iter().filter(|c| c.ends_with(host)).collect();
            (mine == [&format!("outbound|{port}||{host}")]).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_breaker_rule_is_in_envoy_and_trips() {
    let port =
        crate::support::backend_after("127.0.0.74", 0, "slow", Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("httpbin.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: httpbin, namespace: default}}\n\
             spec:\n  hosts: [httpbin.default.svc.cluster.local]\n  location: MESH_INTERNAL\n\
             \x20 resolution: STATIC\n  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n\
             \x20 endpoints: [{{address: 127.0.0.74}}]\n\
             ---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: httpbin, namespace: default}}\n\
             spec:\n  host: httpbin\n  trafficPolicy:\n\
             \x20   connectionPool:\n      tcp: {{maxConnections: 1}}\n\
             \x20     http: {{http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}\n\
             \x20   outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}}\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let cluster = format!("outbound|{port}||httpbin.default.svc.cluster.local");
    let envoy = Envoy::start(daemon.xds, Ads::Sotw, "breaker", &[("httpbin", &cluster)]).await;
    let dumped = eventually(
        "the thresholds in the config dump",
        Duration::from_secs(20),
        || async {
            let dump: serde_json::Value = serde_json::from_str(
                &envoy
                    .admin("/config_dump?resource=dynamic_active_clusters")
                    .await,
            )
            .ok()?;
            dump["configs"]
                .as_array()?
                .iter()
                .find(|c| c["cluster"]["name"] == cluster.as_str())
                .map(|c| c["cluster"].clone())
        },
    )
    .await;
    let t = &dumped["circuit_breakers"]["thresholds"][0];
    assert_eq!(t["max_connections"], 1, "{dumped}");
    assert_eq!(t["max_pending_requests"], 1, "{dumped}");
    let od = &dumped["outlier_detection"];
    assert_eq!(od["consecutive_5xx"], 1, "{dumped}");
    assert_eq!(od["base_ejection_time"], "180s", "{dumped}");
    assert_eq!(od["max_ejection_percent"], 100, "{dumped}");
    // Ten requests at once against one connection and one pending slot:
    // Envoy sheds the rest (503) and counts the overflow.
    let listener = envoy.listener().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        tasks.spawn(async move { http_get(listener, "/", "httpbin").await.map(|r| r.0) });
    }
    let mut statuses = Vec::new();
    while let Some(r) = tasks.join_next().await {
        statuses.push(r.unwrap().unwrap_or(0));
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&503), "{statuses:?}");
    let stats = envoy
        .admin("/stats?filter=upstream_rq_pending_overflow")
        .await;
    let overflow: u64 = stats
        .lines()
        .filter(|l| l.starts_with(&format!("cluster.{cluster}.upstream_rq_pending_overflow")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(overflow > 0, "{stats}");
}
