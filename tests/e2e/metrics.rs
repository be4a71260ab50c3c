//! `/metrics` shows a connected proxy, pushes by type, a non-empty
//! convergence histogram, response sizes, push triggers, process and build
//! metrics; `/ready` and `/healthz` answer.

use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, http_get, repo, write_atomic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_proxies_pushes_and_latency() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    // Ready once the ServiceEntry directory has been read.
    let body = eventually("/ready to say 200", Duration::from_secs(10), || async {
        match http_get(daemon.http, "/ready", "meshreg").await {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(body.contains(": synced"), "{body}");
    assert_eq!(
        http_get(daemon.http, "/healthz", "meshreg")
            .await
            .unwrap()
            .0,
        200
    );

    let envoy = Envoy::start(daemon.xds, Ads::Delta, "metrics", &[]).await;
    eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
        (envoy.endpoints().await.len() == 6).then_some(())
    })
    .await;
    // A change after the initial sync is what convergence time measures.
    let path = dir.path().join("ratings.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.16", "127.0.0.116"));
    eventually(
        "the ratings change in Envoy",
        Duration::from_secs(5),
        || async {
            envoy
                .hosts("outbound|9080||ratings.default.svc.cluster.local")
                .await
                .contains("127.0.0.116:9080")
                .then_some(())
        },
    )
    .await;

    let text = eventually("a convergence sample", Duration::from_secs(5), || async {
        let text = daemon.metrics().await;
        (crate::support::metric_value(&text, "pilot_proxy_convergence_time_count", &[]) >= 1.0)
            .then_some(text)
    })
    .await;
    let m = |name: &str, labels: &[&str]| crate::support::metric_value(&text, name, labels);
    assert_eq!(m("pilot_xds", &[]), 1.0, "{text}");
    assert!(m("pilot_xds_pushes", &["type=\"cds\""]) >= 1.0, "{text}");
    assert!(m("pilot_xds_pushes", &["type=\"eds\""]) >= 2.0, "{text}");
    assert!(
        m("meshreg_xds_bytes_sent_total", &["type=\"eds\""]) > 0.0,
        "{text}"
    );
    assert_eq!(m("pilot_services", &[]), 4.0, "{text}");
    assert_eq!(m("meshreg_endpoints", &[]), 6.0, "{text}");
    assert_eq!(m("pilot_total_xds_rejects", &[]), 0.0, "{text}");
    assert!(m("meshreg_source_synced", &[]) >= 1.0, "{text}");
    assert!(text.contains("pilot_debounce_time_count"), "{text}");
    // What Istio's control-plane dashboard and operators' alerts query.
    assert_eq!(m("pilot_xds", &["version=\"unknown\""]), 1.0, "{text}");
    assert!(
        m("pilot_xds_config_size_bytes_count", &["type=\"eds\""]) >= 2.0,
        "{text}"
    );
    assert!(
        m("pilot_xds_config_size_bytes_sum", &["type=\"cds\""]) > 0.0,
        "{text}"
    );
    assert!(
        m("pilot_push_triggers", &["type=\"endpoint\""]) >= 1.0,
        "{text}"
    );
    assert!(
        m("pilot_push_triggers", &["type=\"global\""]) >= 1.0,
        "{text}"
    );
    assert_eq!(m("pilot_total_xds_internal_errors", &[]), 0.0, "{text}");
    assert!(m("process_resident_memory_bytes", &[]) > 1e6, "{text}");
    assert!(m("process_open_fds", &[]) > 0.0, "{text}");
    // Whole seconds: a fresh daemon may show 0.
    assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
    assert_eq!(m("meshreg_build_info", &["version=\""]), 1.0, "{text}");
    assert_eq!(
        m("istio_build", &["component=\"pilot\"", "tag=\""]),
        1.0,
        "{text}"
    );

    drop(envoy);
    eventually(
        "the proxy to be counted as gone",
        Duration::from_secs(10),
        || async { (daemon.metric("pilot_xds", &[]).await == 0.0).then_some(()) },
    )
    .await;
}
