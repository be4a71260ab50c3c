//! Changes in the ServiceEntry directory reach Envoy: an edited endpoint
//! within 2 s, a deleted ServiceEntry removes its cluster, and a malformed
//! file changes nothing in Envoy but raises the error metric.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, repo, write_atomic};

const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
const DETAILS: &str = "outbound|9080||details.default.svc.cluster.local";

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn edit_and_delete_over(ads: Ads) {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    let envoy = Envoy::start(daemon.xds, ads, "edits", &[]).await;
    let want = set(&["127.0.0.13:9080", "127.0.0.14:9080", "127.0.0.15:9080"]);
    eventually(
        "reviews endpoints in Envoy",
        Duration::from_secs(20),
        || async { (envoy.hosts(REVIEWS).await == want).then_some(()) },
    )
    .await;

    // Move reviews-v3 to another address.
    let path = dir.path().join("reviews.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.15", "127.0.0.115"));
    let want = set(&["127.0.0.13:9080", "127.0.0.14:9080", "127.0.0.115:9080"]);
    eventually(
        "the edited endpoint in Envoy",
        Duration::from_secs(2),
        || async { (envoy.hosts(REVIEWS).await == want).then_some(()) },
    )
    .await;

    // Delete a ServiceEntry: its cluster goes away, the others stay.
    std::fs::remove_file(dir.path().join("details.yaml")).unwrap();
    let clusters = eventually(
        "details' cluster to be removed",
        Duration::from_secs(5),
        || async {
            let c = envoy.clusters().await;
            (!c.contains(DETAILS)).then_some(c)
        },
    )
    .await;
    assert!(clusters.contains(REVIEWS), "{clusters:?}");
    assert_eq!(envoy.warming_clusters().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_reach_envoy_over_delta() {
    edit_and_delete_over(Ads::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_reach_envoy_over_sotw() {
    edit_and_delete_over(Ads::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_file_changes_nothing_and_is_counted() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "malformed", &[]).await;
    let before = eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
        let e = envoy.endpoints().await;
        (e.len() == 6).then_some(e)
    })
    .await;
    let errors_before = daemon.metric("meshreg_source_errors_total", &[]).await;

    // A bad document in a new file, and a bad edit of an existing one.
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: broken}\n\
         spec:\n  hosts: [broken.example.com]\n  ports: \"not a list\"\n",
    )
    .unwrap();
    write_atomic(
        &dir.path().join("ratings.yaml"),
        "kind: ServiceEntry\nspec: [\n",
    );
    eventually(
        "the error metric to rise",
        Duration::from_secs(5),
        || async {
            let now = daemon.metric("meshreg_source_errors_total", &[]).await;
            (now >= errors_before + 2.0).then_some(())
        },
    )
    .await;
    // Then a valid change, so we know the adapter has moved past the bad files.
    let path = dir.path().join("reviews.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.15", "127.0.0.115"));
    let after = eventually(
        "the valid edit in Envoy",
        Duration::from_secs(5),
        || async {
            let e = envoy.endpoints().await;
            e.contains(&(REVIEWS.to_string(), "127.0.0.115:9080".to_string()))
                .then_some(e)
        },
    )
    .await;
    let mut expected = before.clone();
    expected.remove(&(REVIEWS.to_string(), "127.0.0.15:9080".to_string()));
    expected.insert((REVIEWS.to_string(), "127.0.0.115:9080".to_string()));
    assert_eq!(
        after, expected,
        "ratings kept its last good state; nothing else moved"
    );
    assert!(
        daemon.log().contains("broken.yaml"),
        "the log names the bad file:\n{}",
        daemon.log()
    );
}

/// Issue 9: a WorkloadEntry in its own file joins the ServiceEntry that
/// selects it (the join is the registry's), and deleting the ServiceEntry's
/// file removes exactly its clusters.
async fn workload_entry_file_joins_over(ads: Ads) {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    std::fs::write(
        dir.path().join("vm-se.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: vm, namespace: default}\n\
         spec:\n  hosts: [vm.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]\n\
         \x20 workloadSelector: {labels: {app: vm}}\n",
    )
    .unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let envoy = Envoy::start(daemon.xds, ads, "join", &[]).await;
    const VM: &str = "outbound|8080||vm.example.test";
    const VM_GRPC: &str = "outbound|9090||vm.example.test";
    let before = eventually("the vm clusters", Duration::from_secs(20), || async {
        let c = envoy.clusters().await;
        (c.contains(VM) && c.contains(VM_GRPC) && c.contains(REVIEWS)).then_some(c)
    })
    .await;
    assert!(envoy.hosts(VM).await.is_empty());

    std::fs::write(
        dir.path().join("vm-we.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
         metadata: {name: vm-1, namespace: default, labels: {app: vm}}\n\
         spec: {address: 127.0.0.51, ports: {http: 18080}}\n",
    )
    .unwrap();
    eventually(
        "the WorkloadEntry as an endpoint",
        Duration::from_secs(5),
        || async { (envoy.hosts(VM).await == set(&["127.0.0.51:18080"])).then_some(()) },
    )
    .await;
    assert_eq!(envoy.hosts(VM_GRPC).await, set(&["127.0.0.51:9090"]));

    std::fs::remove_file(dir.path().join("vm-se.yaml")).unwrap();
    let after = eventually("the vm clusters to go", Duration::from_secs(5), || async {
        let c = envoy.clusters().await;
        (!c.contains(VM)).then_some(c)
    })
    .await;
    let mut expected = before;
    expected.remove(VM);
    expected.remove(VM_GRPC);
    assert_eq!(after, expected, "exactly the ServiceEntry's clusters went");
    assert_eq!(envoy.warming_clusters().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_entry_file_joins_its_service_entry_over_delta() {
    workload_entry_file_joins_over(Ads::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_entry_file_joins_its_service_entry_over_sotw() {
    workload_entry_file_joins_over(Ads::Sotw).await;
}
