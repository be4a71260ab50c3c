//! LEDS with a real Envoy (issue 13): a 10,000-endpoint service (a
//! ServiceEntry selecting 10,000 WorkloadEntries) reaches a
//! delta Envoy through LEDS collections and a SotW Envoy and an opted-out
//! delta Envoy as plain EDS; one endpoint's weight change reaches all
//! three, and the bytes each received for it (the xDS cluster's
//! `upstream_cx_rx_bytes_total`) show LEDS sending one endpoint where EDS
//! sends the whole assignment.

use std::fmt::Write as _;
use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, eventually, write_atomic};

const BIG: &str = "outbound|80||big.test";
const ENDPOINTS: usize = 10_000;

/// A ServiceEntry selecting its endpoints (its own list may hold at most
/// 4096: the CRD's limit).
const SERVICE_ENTRY: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
    metadata: {name: big, namespace: default}\nspec:\n  hosts: [big.test]\n  \
    location: MESH_INTERNAL\n  resolution: STATIC\n  \
    ports: [{number: 80, name: http, protocol: HTTP}]\n  \
    workloadSelector: {labels: {app: big}}\n";

/// WorkloadEntries `from..to` of the service, the 7th with `weight`.
fn workload_entries(from: usize, to: usize, weight: Option<u32>) -> String {
    let mut text = String::new();
    for i in from..to {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        let weight = match weight {
            Some(w) if i == 6 => format!(", weight: {w}"),
            _ => String::new(),
        };
        writeln!(
            text,
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{name: big-{i}, namespace: default}}\n\
             spec: {{address: {ip}, labels: {{app: big}}{weight}}}"
        )
        .unwrap();
    }
    text
}

/// How many hosts of `BIG` Envoy has, and the weight of `10.1.0.7:80`.
async fn big(envoy: &Envoy) -> (usize, Option<String>) {
    let text = envoy.admin("/clusters").await;
    let hosts = text
        .lines()
        .filter(|l| l.starts_with(BIG) && l.contains("::health_flags::"))
        .count();
    let weight = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{BIG}::10.1.0.7:80::weight::")))
        .map(str::to_string);
    (hosts, weight)
}

/// Bytes Envoy has received from meshreg.
async fn rx_bytes(envoy: &Envoy) -> u64 {
    let text = envoy
        .admin("/stats?filter=^cluster\\.meshreg\\.upstream_cx_rx_bytes_total$")
        .await;
    text.lines()
        .find_map(|l| l.strip_prefix("cluster.meshreg.upstream_cx_rx_bytes_total: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rx bytes stat in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_change_of_a_large_service_sends_one_endpoint_through_leds() {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("big.yaml"), SERVICE_ENTRY);
    for f in 0..4 {
        let (from, to) = (f * ENDPOINTS / 4, (f + 1) * ENDPOINTS / 4);
        let text = workload_entries(from, to, None);
        write_atomic(&dir.path().join(format!("we-{f}.yaml")), &text);
    }
    let path = dir.path().join("we-0.yaml");
    let daemon = Daemon::start(dir.path()).await;
    let leds = Envoy::start(daemon.xds, Ads::Delta, "leds", &[]).await;
    let plain = Envoy::start_node(
        daemon.xds,
        Ads::Delta,
        "{id: plain, cluster: e2e, metadata: {LEDS: \"false\"}}",
        &[],
    )
    .await;
    let sotw = Envoy::start(daemon.xds, Ads::Sotw, "sotw", &[]).await;
    let envoys = [
        ("leds", &leds),
        ("delta without LEDS", &plain),
        ("sotw", &sotw),
    ];
    for (what, envoy) in envoys {
        eventually(
            &format!("{ENDPOINTS} hosts in the {what} Envoy"),
            Duration::from_secs(60),
            || async { (big(envoy).await == (ENDPOINTS, Some("1".into()))).then_some(()) },
        )
        .await;
    }
    // Only the LEDS Envoy subscribed to collections (Envoy's per-cluster
    // LEDS stats).
    let leds_updates = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("cluster.{BIG}.leds.update_success: ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(leds_updates(leds.admin("/stats?filter=leds").await) > 0);
    assert_eq!(leds_updates(plain.admin("/stats?filter=leds").await), 0);
    assert_eq!(leds_updates(sotw.admin("/stats?filter=leds").await), 0);
    assert!(
        daemon.metric("pilot_xds_pushes", &["type=\"leds\""]).await >= 1.0,
        "LEDS responses are counted"
    );

    let mut before = Vec::new();
    for (_, envoy) in envoys {
        before.push(rx_bytes(envoy).await);
    }
    write_atomic(&path, &workload_entries(0, ENDPOINTS / 4, Some(5)));
    for (what, envoy) in envoys {
        eventually(
            &format!("the new weight in the {what} Envoy"),
            Duration::from_secs(20),
            || async { (big(envoy).await == (ENDPOINTS, Some("5".into()))).then_some(()) },
        )
        .await;
    }
    let mut cost = Vec::new();
    for ((_, envoy), before) in envoys.iter().zip(before) {
        cost.push(rx_bytes(envoy).await - before);
    }
    eprintln!(
        "bytes received for one weight change: LEDS {}, delta EDS {}, SotW EDS {}",
        cost[0], cost[1], cost[2]
    );
    assert!(cost[0] < 1024, "LEDS: {} bytes for one endpoint", cost[0]);
    assert!(
        cost[1] > 10 * cost[0],
        "plain delta EDS resends the assignment: {cost:?}"
    );
    assert!(
        cost[2] > 10 * cost[0],
        "SotW EDS resends the assignment: {cost:?}"
    );
    for (what, envoy) in envoys {
        assert_eq!(envoy.warming_clusters().await, 0, "{what}: {}", envoy.log());
    }
    // A change of the cluster itself (its protocol) replaces it in Envoy:
    // the new cluster subscribes to collections Envoy already has, so the
    // members must be sent again or it warms until its initial fetch
    // timeout and then serves no endpoint (a new user's trial).
    let cds_updates = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("cluster_manager.cds.update_success: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cds_before = cds_updates(leds.admin("/stats?filter=cds.update_success").await);
    let big_yaml = dir.path().join("big.yaml");
    write_atomic(
        &big_yaml,
        &SERVICE_ENTRY.replace("protocol: HTTP}", "protocol: HTTP2}"),
    );
    eventually(
        "the replaced cluster active with every host, well before Envoy's 15 s fetch timeout",
        Duration::from_secs(10),
        || async {
            let updated = cds_updates(leds.admin("/stats?filter=cds.update_success").await);
            (updated > cds_before
                && leds.warming_clusters().await == 0
                && big(&leds).await.0 == ENDPOINTS)
                .then_some(())
        },
    )
    .await;

    // The operator's view of the LEDS Envoy: its endpoints come from the
    // members it holds.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshreg"))
        .args(["ctl", "--addr", &daemon.http.to_string()])
        .args(["proxy-config", "endpoints", "leds", "--cluster", BIG])
        .output()
        .await
        .expect("meshreg runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(BIG)).count(),
        ENDPOINTS,
        "ctl lists every member"
    );
    assert!(
        !daemon.log().contains("NACK"),
        "no Envoy rejected anything: {}",
        daemon.log()
    );

    // meshreg restarts on the same port while a quarter of the endpoints
    // go: Envoy re-subscribes to its collections without their members'
    // versions, and must still lose the members that went.
    let (xds, mut daemon) = (daemon.xds, daemon);
    daemon.signal("KILL");
    eventually("the daemon to exit", Duration::from_secs(10), || {
        let alive = daemon.alive();
        async move { (!alive).then_some(()) }
    })
    .await;
    drop(daemon);
    std::fs::remove_file(dir.path().join("we-3.yaml")).unwrap();
    let text = Daemon::config_text(&[dir.path()], "")
        .replace("listen: 127.0.0.1:0,", &format!("listen: {xds},"))
        .replacen(
            "xds: {listen: 127.0.0.1:0}",
            &format!("xds: {{listen: {xds}}}"),
            1,
        );
    let _daemon = Daemon::start_config(&text).await;
    for (what, envoy) in envoys {
        eventually(
            &format!("the {what} Envoy with the endpoints left after a restart"),
            Duration::from_secs(60),
            || async { (big(envoy).await.0 == ENDPOINTS * 3 / 4).then_some(()) },
        )
        .await;
    }

    // A DestinationRule with outlier detection (Istio's locality failover)
    // gives the proxies a scope of their own: LEDS still serves it.
    write_atomic(
        &dir.path().join("rule.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: big, namespace: default}\nspec:\n  host: big.test\n  \
         trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}\n",
    );
    eventually(
        "the rule's cluster active in the LEDS Envoy with every host",
        Duration::from_secs(10),
        || async {
            let dump = leds
                .admin("/config_dump?resource=dynamic_active_clusters")
                .await;
            (dump.contains("outlier_detection")
                && leds.warming_clusters().await == 0
                && big(&leds).await.0 == ENDPOINTS * 3 / 4)
                .then_some(())
        },
    )
    .await;
    let before = rx_bytes(&leds).await;
    write_atomic(&path, &workload_entries(0, ENDPOINTS / 4, Some(7)));
    eventually(
        "the new weight under the rule",
        Duration::from_secs(20),
        || async { (big(&leds).await.1.as_deref() == Some("7")).then_some(()) },
    )
    .await;
    let cost = rx_bytes(&leds).await - before;
    assert!(
        cost < 1024,
        "LEDS under a scope: {cost} bytes for one endpoint"
    );
}
