//! Scoping with real Envoys whose nodes name their namespace, as Istio's
//! sidecars do: a Sidecar limits what its namespace's proxies get, and
//! only theirs; `exportTo: ["."]` hides an entry from other namespaces; a
//! host declared in two namespaces gives each namespace its own endpoints
//! and a third one the first declaration's (the issue's `inventory`
//! report), with real traffic to tell them apart.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, eventually, http_get, write_atomic};

fn entry(ns: &str, name: &str, host: &str, ip: &str, port: u16, export_to: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{{number: {port}, name: http, protocol: HTTP}}]\n\
         \x20 endpoints: [{{address: {ip}}}]\n{export_to}---\n"
    )
}

const SIDECAR: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\n\
    metadata: {name: default, namespace: a}\n\
    spec:\n  egress:\n  - hosts: [\"./*\"]\n";

/// An Istio-style node of a pod in `ns`.
fn node(ns: &str) -> String {
    format!(
        "{{id: \"sidecar~127.0.0.10~app-1.{ns}~{ns}.svc.cluster.local\", cluster: e2e, \
         metadata: {{NAMESPACE: {ns}, LABELS: {{app: app}}}}}}"
    )
}

fn outbound(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

async fn cds_updates(envoy: &Envoy) -> u64 {
    envoy
        .admin("/stats?filter=cluster_manager.cds.update_success")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("cluster_manager.cds.update_success: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_see_what_sidecars_and_export_to_allow() {
    let port = crate::support::backend("127.0.0.91", "inventory of ns-a").await;
    crate::support::backend_at("127.0.0.92", port, "inventory of ns-b").await;
    let dir = tempfile::tempdir().unwrap();
    let entries = [
        entry(
            "a",
            "web",
            "web.a.svc.cluster.local",
            "127.0.0.81",
            port,
            "",
        ),
        entry(
            "b",
            "api",
            "api.b.svc.cluster.local",
            "127.0.0.82",
            port,
            "",
        ),
        entry(
            "team-x",
            "private",
            "private.example.com",
            "127.0.0.83",
            port,
            "  exportTo: [\".\"]\n",
        ),
        entry(
            "ns-a",
            "inventory",
            "inventory.shared.test",
            "127.0.0.91",
            port,
            "",
        ),
        entry(
            "ns-b",
            "inventory",
            "inventory.shared.test",
            "127.0.0.92",
            port,
            "",
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("entries.yaml"), &entries).unwrap();
    std::fs::write(dir.path().join("sidecar.yaml"), SIDECAR).unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let inventory = outbound(port, "inventory.shared.test");
    let routes = [("inventory", inventory.as_str())];
    let in_a = Envoy::start_node(daemon.xds, Ads::Delta, &node("a"), &routes).await;
    let in_b = Envoy::start_node(daemon.xds, Ads::Delta, &node("ns-b"), &routes).await;
    let in_c = Envoy::start_node(daemon.xds, Ads::Sotw, &node("default"), &routes).await;
    let plain = Envoy::start(daemon.xds, Ads::Delta, "plain", &[]).await;

    let set =
        |hosts: &[&str]| -> BTreeSet<String> { hosts.iter().map(|h| outbound(port, h)).collect() };
    let everything_exported = set(&[
        "api.b.svc.cluster.local",
        "inventory.shared.test",
        "web.a.svc.cluster.local",
    ]);
    for (envoy, want, what) in [
        (
            &in_a,
            set(&["web.a.svc.cluster.local"]),
            "a: its own namespace only",
        ),
        (
            &in_b,
            everything_exported.clone(),
            "ns-b: all but team-x's private entry",
        ),
        (
            &in_c,
            everything_exported.clone(),
            "default (SotW): the same",
        ),
        (
            &plain,
            set(&[
                "api.b.svc.cluster.local",
                "inventory.shared.test",
                "private.example.com",
                "web.a.svc.cluster.local",
            ]),
            "a node without a namespace: everything",
        ),
    ] {
        eventually(what, Duration::from_secs(20), || async {
            (envoy.clusters().await == want).then_some(())
        })
        .await;
    }
    // ns-b gets its own declaration's endpoint, a third namespace the
    // first declaration's; real traffic lands there.
    for (envoy, ip, body) in [
        (&in_b, "127.0.0.92", "inventory of ns-b"),
        (&in_c, "127.0.0.91", "inventory of ns-a"),
    ] {
        let want: BTreeSet<String> = [format!("{ip}:{port}")].into();
        eventually(
            "the namespace's own inventory endpoint",
            Duration::from_secs(20),
            || async { (envoy.hosts(&inventory).await == want).then_some(()) },
        )
        .await;
        let listener = envoy.listener().await;
        for _ in 0..5 {
            let (status, got) = http_get(listener, "/", "inventory").await.unwrap();
            assert_eq!((status, got.as_str()), (200, body));
        }
    }
    let proxies = http_get(daemon.http, "/debug/proxies", "meshreg")
        .await
        .unwrap()
        .1;
    assert!(proxies.contains("scope=a+sidecar:a/default"), "{proxies}");
    assert!(proxies.contains("scope=ns-b "), "{proxies}");
    assert!(proxies.contains("scope=all"), "{proxies}");

    // The Sidecar goes: proxies of `a` get the rest; the others get no
    // CDS push at all.
    let before = cds_updates(&in_b).await;
    std::fs::remove_file(dir.path().join("sidecar.yaml")).unwrap();
    eventually(
        "a sees every exported host",
        Duration::from_secs(20),
        || async { (in_a.clusters().await == everything_exported).then_some(()) },
    )
    .await;
    // An endpoint change afterwards is a later push to everyone who sees
    // the host; waiting for it shows the Sidecar's removal was processed
    // everywhere before it.
    write_atomic(
        &dir.path().join("entries.yaml"),
        &entries.replace("127.0.0.82", "127.0.0.84"),
    );
    let api = outbound(port, "api.b.svc.cluster.local");
    let moved: BTreeSet<String> = [format!("127.0.0.84:{port}")].into();
    eventually(
        "ns-b gets the moved endpoint",
        Duration::from_secs(20),
        || async { (in_b.hosts(&api).await == moved).then_some(()) },
    )
    .await;
    assert_eq!(cds_updates(&in_b).await, before, "no CDS push to ns-b");
    let metrics = daemon.metrics().await;
    assert!(
        crate::support::metric_value(&metrics, "meshreg_xds_scopes", &[]) >= 3.0,
        "{metrics}"
    );
}
