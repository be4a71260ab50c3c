//! VM workloads (issue 12): WorkloadEntries whose health the VM reports.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt as _;

use crate::support::{Ads, Daemon, Envoy, eventually, write_atomic};

const VM: &str = "outbound|8080||vm.example.test";

/// Envoy's hosts of `cluster` with their health flags.
async fn hosts(envoy: &Envoy, cluster: &str) -> BTreeSet<String> {
    host_stat(envoy, cluster, "health_flags").await
}

/// Envoy's hosts of `cluster` with their `stat` (`health_flags`, `weight`,
/// `priority` …) from `/clusters`: `host value` each.
async fn host_stat(envoy: &Envoy, cluster: &str, stat: &str) -> BTreeSet<String> {
    let text = envoy.admin("/clusters").await;
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{cluster}::")))
        .filter_map(|l| {
            let (host, value) = l.split_once(&format!("::{stat}::"))?;
            Some(format!("{host} {value}"))
        })
        .collect()
}

/// A WorkloadEntry with Istio's `proxy.istio.io/health-checks-enabled`
/// annotation is healthy only while its `Healthy` condition is `True`
/// (istiod's `isHealthy`); without a condition it is not healthy yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_checked_workload_entry_is_healthy_only_while_its_condition_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vm-se.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: vm, namespace: vm}\n\
         spec:\n  hosts: [vm.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 workloadSelector: {labels: {app: vm}}\n",
    )
    .unwrap();
    let entry = |status: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata:\n  name: vm-1\n  namespace: vm\n  labels: {{app: vm}}\n\
             \x20 annotations: {{proxy.istio.io/health-checks-enabled: \"true\"}}\n\
             spec: {{address: 127.0.0.52}}\n{status}"
        )
    };
    let condition =
        |s: &str| format!("status:\n  conditions:\n  - {{type: Healthy, status: \"{s}\"}}\n");
    write_atomic(&dir.path().join("vm-we.yaml"), &entry(""));
    let daemon = Daemon::start(dir.path()).await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "vm-health", &[]).await;
    let want = |flags: &str| -> BTreeSet<String> {
        [format!("127.0.0.52:8080 {flags}")].into_iter().collect()
    };
    eventually(
        "not healthy before any report",
        Duration::from_secs(20),
        || async { (hosts(&envoy, VM).await == want("/failed_eds_health")).then_some(()) },
    )
    .await;
    write_atomic(&dir.path().join("vm-we.yaml"), &entry(&condition("True")));
    eventually("healthy once reported", Duration::from_secs(20), || async {
        (hosts(&envoy, VM).await == want("healthy")).then_some(())
    })
    .await;
    write_atomic(&dir.path().join("vm-we.yaml"), &entry(&condition("False")));
    eventually("unhealthy again", Duration::from_secs(20), || async {
        (hosts(&envoy, VM).await == want("/failed_eds_health")).then_some(())
    })
    .await;
}

const RATINGS: &str = "outbound|8080||ratings.vm.example.test";

/// A ServiceEntry selecting `app: ratings` in namespace `vm`, and the
/// WorkloadGroup `ratings` VMs register through (with a probe if `probe`).
fn ratings_dir(probe: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ratings-se.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: ratings, namespace: vm}\n\
         spec:\n  hosts: [ratings.vm.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 workloadSelector: {labels: {app: ratings}}\n",
    )
    .unwrap();
    let probe = if probe {
        "  probe: {httpGet: {port: 9080, path: /ready}}\n"
    } else {
        ""
    };
    std::fs::write(
        dir.path().join("ratings-wg.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\n\
             metadata: {{name: ratings, namespace: vm}}\n\
             spec:\n  metadata: {{labels: {{app: ratings}}}}\n\
             \x20 template: {{serviceAccount: ratings, ports: {{http: 9080}}}}\n{probe}"
        ),
    )
    .unwrap();
    dir
}

/// Issue 12: a VM proxy (a real Envoy whose node names the group) is
/// registered from the WorkloadGroup's template as `<group>-<ip>`, joins
/// the ServiceEntry that selects it, and leaves once its stream has been
/// closed for the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_proxy_is_registered_from_its_group_and_removed_after_the_grace_period() {
    let dir = ratings_dir(false);
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nautoregistration: {{grace: 1s}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        dir.path().display()
    ))
    .await;
    let client = Envoy::start(daemon.xds, Ads::Delta, "client", &[]).await;
    eventually("the ratings cluster", Duration::from_secs(20), || async {
        client.clusters().await.contains(RATINGS).then_some(())
    })
    .await;
    assert!(hosts(&client, RATINGS).await.is_empty());

    let vm = Envoy::start_node(
        daemon.xds,
        Ads::Sotw,
        "{id: \"sidecar~127.0.0.61~ratings-vm.vm~vm.svc.cluster.local\", cluster: ratings, \
         locality: {region: eu, zone: eu-1}, \
         metadata: {AUTO_REGISTER_GROUP: ratings, NAMESPACE: vm, INSTANCE_IPS: \"127.0.0.61\", \
         LABELS: {version: v1}}}",
        &[],
    )
    .await;
    let registered: BTreeSet<String> = ["127.0.0.61:9080 healthy".to_string()].into();
    eventually("the VM as an endpoint", Duration::from_secs(20), || async {
        (hosts(&client, RATINGS).await == registered).then_some(())
    })
    .await;
    let (_, registry) = crate::support::http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .unwrap();
    let line = registry
        .lines()
        .find(|l| l.contains("127.0.0.61"))
        .unwrap_or_else(|| panic!("{registry}"));
    for part in [
        "workload=ratings-127.0.0.61",
        "locality=eu/eu-1",
        "version=v1",
        "app=ratings",
    ] {
        assert!(line.contains(part), "{part} not in {line:?}");
    }
    assert_eq!(
        daemon
            .metric(
                "meshreg_vm_autoregistration_total",
                &["result=\"registered\""]
            )
            .await,
        1.0
    );

    // Its group is deleted: the VM is no endpoint any more (istiod's
    // entries go with their group); the group back, it is again, while
    // its proxy stays connected.
    let group = std::fs::read_to_string(dir.path().join("ratings-wg.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("ratings-wg.yaml")).unwrap();
    eventually("gone with its group", Duration::from_secs(20), || async {
        hosts(&client, RATINGS).await.is_empty().then_some(())
    })
    .await;
    write_atomic(&dir.path().join("ratings-wg.yaml"), &group);
    eventually("back with its group", Duration::from_secs(20), || async {
        (hosts(&client, RATINGS).await == registered).then_some(())
    })
    .await;

    // The VM goes: its workload stays for the grace period, then leaves.
    drop(vm);
    eventually(
        "the VM's workload gone",
        Duration::from_secs(20),
        || async { hosts(&client, RATINGS).await.is_empty().then_some(()) },
    )
    .await;
    assert_eq!(
        daemon
            .metric("meshreg_vm_autoregistration_total", &["result=\"deleted\""])
            .await,
        1.0
    );
    assert_eq!(daemon.metric("meshreg_vm_registered", &[]).await, 0.0);
}

/// A node naming a WorkloadGroup, as Istio's agent sends it.
fn vm_node(group: &str, ip: &str) -> envoy_types::pb::envoy::config::core::v3::Node {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let fields = [
        ("AUTO_REGISTER_GROUP", s(group)),
        ("NAMESPACE", s("vm")),
        ("INSTANCE_IPS", s(ip)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    envoy_types::pb::envoy::config::core::v3::Node {
        id: format!("sidecar~{ip}~vm.vm~vm.svc.cluster.local"),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// Issue 12: a group with a probe makes its VM unhealthy until the VM
/// reports otherwise on its stream (Istio's `HealthInformation` requests);
/// a proxy naming a group that does not exist is refused with
/// `FAILED_PRECONDITION`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_decide_a_probed_vm_s_health_and_unknown_groups_are_refused() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    let dir = ratings_dir(true);
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        dir.path().display()
    ))
    .await;
    let client = Envoy::start(daemon.xds, Ads::Delta, "client", &[]).await;
    eventually("the ratings cluster", Duration::from_secs(20), || async {
        client.clusters().await.contains(RATINGS).then_some(())
    })
    .await;
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .unwrap();

    // An unknown group: refused.
    let refused = ads
        .stream_aggregated_resources(
            futures::stream::iter(vec![DiscoveryRequest {
                node: Some(vm_node("nope", "127.0.0.62")),
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                ..Default::default()
            }])
            .chain(futures::stream::pending()),
        )
        .await;
    let status = match refused {
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("cannot find WorkloadGroup vm/nope"),
        "{status:?}"
    );

    // The group with a probe: registered unhealthy, then as reported.
    let (tx, _stream) = vm_stream(&mut ads, "127.0.0.63").await;
    let want = |flags: &str| -> BTreeSet<String> {
        [format!("127.0.0.63:9080 {flags}")].into_iter().collect()
    };
    eventually(
        "registered, not healthy yet",
        Duration::from_secs(20),
        || async { (hosts(&client, RATINGS).await == want("/failed_eds_health")).then_some(()) },
    )
    .await;
    let report = |error: Option<&str>| DiscoveryRequest {
        type_url: meshreg_xds_health_type().into(),
        error_detail: error.map(|m| RpcStatus {
            code: 2,
            message: m.into(),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    tx.send(report(None)).await.unwrap();
    eventually("healthy once reported", Duration::from_secs(20), || async {
        (hosts(&client, RATINGS).await == want("healthy")).then_some(())
    })
    .await;
    tx.send(report(Some("readiness probe failed: 503")))
        .await
        .unwrap();
    eventually(
        "unhealthy once reported",
        Duration::from_secs(20),
        || async { (hosts(&client, RATINGS).await == want("/failed_eds_health")).then_some(()) },
    )
    .await;
}

/// The ADS stream of a VM at `ip` registering through group `ratings`
/// (its first request names the node), and the sender of its next
/// requests; dropping both ends the stream.
async fn vm_stream(
    ads: &mut envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    ip: &str,
) -> (
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(vm_node("ratings", ip)),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// Istio's health report type.
fn meshreg_xds_health_type() -> &'static str {
    "type.googleapis.com/istio.v1.HealthInformation"
}

/// `/ready`'s line for `source`.
async fn ready_line(daemon: &Daemon, source: &str) -> String {
    let (_, body) = crate::support::http_get(daemon.http, "/ready", "meshreg")
        .await
        .unwrap_or_default();
    body.lines()
        .find(|l| l.contains(source))
        .unwrap_or_default()
        .to_string()
}

/// Issue 12: with etcd, a VM registered through one daemon is served by
/// every daemon on the same etcd; an etcd outage keeps the endpoints and
/// marks the `vm/etcd` source stale until etcd is back; the VM leaving
/// takes it away everywhere after the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_registrations_are_shared_through_etcd() {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mut etcd = crate::peers::Etcd::start().await;
    let dir = ratings_dir(false);
    let config = format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nautoregistration: {{grace: 1s}}\n\
         etcd: {{endpoints: [\"{}\"], lease_ttl: 3s}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        etcd.url,
        dir.path().display()
    );
    let a = Daemon::start_config(&config).await;
    let b = Daemon::start_config(&config).await;
    let client = Envoy::start(b.xds, Ads::Delta, "client-of-b", &[]).await;
    eventually("the ratings cluster", Duration::from_secs(20), || async {
        client.clusters().await.contains(RATINGS).then_some(())
    })
    .await;
    eventually("vm/etcd synced on b", Duration::from_secs(20), || async {
        ready_line(&b, "vm/etcd")
            .await
            .contains("synced")
            .then_some(())
    })
    .await;

    // A VM connects to a; b's proxies get it.
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{}", a.xds))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (tx, vm) = vm_stream(&mut ads, "127.0.0.64").await;
    let want: BTreeSet<String> = ["127.0.0.64:9080 healthy".to_string()].into();
    eventually(
        "b's proxy gets the VM registered on a",
        Duration::from_secs(10),
        || async { (hosts(&client, RATINGS).await == want).then_some(()) },
    )
    .await;
    eprintln!(
        "registered on a, in b's Envoy after {:?}",
        started.elapsed()
    );

    // etcd goes away: b keeps serving the VM, its source is stale.
    etcd.stop().await;
    eventually("vm/etcd stale on b", Duration::from_secs(30), || async {
        ready_line(&b, "vm/etcd")
            .await
            .contains("stale")
            .then_some(())
    })
    .await;
    assert_eq!(
        hosts(&client, RATINGS).await,
        want,
        "the outage dropped the VM"
    );
    etcd.restart().await;
    eventually(
        "vm/etcd synced again on b",
        Duration::from_secs(60),
        || async {
            ready_line(&b, "vm/etcd")
                .await
                .contains("synced")
                .then_some(())
        },
    )
    .await;
    // Longer than the lease TTL after the restart: a's registration is
    // still there (its lease is kept alive, or renewed and rewritten).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        hosts(&client, RATINGS).await,
        want,
        "the VM was lost after the outage"
    );

    // A second VM on a: both are served by b.
    let (tx2, vm2) = vm_stream(&mut ads, "127.0.0.65").await;
    let both: BTreeSet<String> = ["127.0.0.64:9080 healthy", "127.0.0.65:9080 healthy"]
        .map(String::from)
        .into();
    eventually("both VMs in b's Envoy", Duration::from_secs(10), || async {
        (hosts(&client, RATINGS).await == both).then_some(())
    })
    .await;

    // A third VM hops a → b → a, each time within the grace period: the
    // replica holding its stream owns its record, so b's grace period
    // ending does not delete it while the VM is connected to a.
    let mut ads_b = AggregatedDiscoveryServiceClient::connect(format!("http://{}", b.xds))
        .await
        .unwrap();
    let three: BTreeSet<String> = [
        "127.0.0.64:9080 healthy",
        "127.0.0.65:9080 healthy",
        "127.0.0.66:9080 healthy",
    ]
    .map(String::from)
    .into();
    for hop in 0..3 {
        let ads = if hop == 1 { &mut ads_b } else { &mut ads };
        let (tx3, vm3) = vm_stream(ads, "127.0.0.66").await;
        eventually(
            "the hopping VM in b's Envoy",
            Duration::from_secs(10),
            || async { (hosts(&client, RATINGS).await == three).then_some(()) },
        )
        .await;
        if hop < 2 {
            drop((tx3, vm3));
        } else {
            // Twice the grace period: b's expiry of its own connection has
            // passed; the VM, still on a, stays.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert_eq!(
                hosts(&client, RATINGS).await,
                three,
                "a connected VM was deleted"
            );
            drop((tx3, vm3));
        }
    }
    eventually(
        "the hopping VM gone after it left",
        Duration::from_secs(30),
        || async { (hosts(&client, RATINGS).await == both).then_some(()) },
    )
    .await;

    // The second VM leaves: a deletes its record after the grace period.
    drop(tx2);
    drop(vm2);
    eventually(
        "the second VM gone from b",
        Duration::from_secs(30),
        || async { (hosts(&client, RATINGS).await == want).then_some(()) },
    )
    .await;

    // a is killed (SIGKILL) with the first VM still connected to it: its
    // lease expires and the VM's record with it.
    drop(a);
    eventually(
        "a's VM gone from b with a's lease",
        Duration::from_secs(30),
        || async { hosts(&client, RATINGS).await.is_empty().then_some(()) },
    )
    .await;
    drop((tx, vm));
}

/// A ServiceEntry of `reviews.fed.example.test` with static endpoints.
fn reviews_entry(ips: &[&str]) -> String {
    // Sidecar-injected workloads (Istio mTLS): they can be reached through
    // an east-west gateway.
    let endpoints: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{address: {ip}, labels: {{security.istio.io/tlsMode: istio}}}}"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: reviews, namespace: fed}}\n\
         spec:\n  hosts: [reviews.fed.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{{number: 9080, name: http, protocol: HTTP}}]\n  endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// Issue 12: a daemon exports a service to etcd with its cluster id and
/// network; a daemon of another cluster serves its endpoints merged with
/// its own of the same hostname, follows its changes, and drops them when
/// the exporting daemon is gone (its lease expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_federated_between_clusters_through_etcd() {
    const REVIEWS: &str = "outbound|9080||reviews.fed.example.test";
    let etcd = crate::peers::Etcd::start().await;
    let (east_dir, west_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_atomic(
        &east_dir.path().join("reviews.yaml"),
        &reviews_entry(&["127.0.0.71"]),
    );
    write_atomic(
        &west_dir.path().join("reviews.yaml"),
        &reviews_entry(&["127.0.0.72"]),
    );
    let config = |dir: &std::path::Path, federation: &str| {
        format!(
            "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
             debounce: {{after: 10ms, max: 50ms}}\n\
             etcd: {{endpoints: [\"{}\"], lease_ttl: 2s}}\nfederation: {federation}\n\
             sources: [{{kind: serviceentry, dir: {}}}]\n",
            etcd.url,
            dir.display()
        )
    };
    let east = Daemon::start_config(&config(
        east_dir.path(),
        "{cluster_id: east, network: net-east, export: {hosts: [reviews.fed.example.test]}}",
    ))
    .await;
    let west = Daemon::start_config(&format!(
        "{}networks: {{net-east: {{gateways: [{{address: 127.0.0.98}}]}}}}\n",
        config(west_dir.path(), "{cluster_id: west, network: net-west}")
    ))
    .await;
    let client = Envoy::start(west.xds, Ads::Delta, "client-in-west", &[]).await;
    let set = |ips: &[&str]| -> BTreeSet<String> {
        ips.iter().map(|ip| format!("{ip}:9080 healthy")).collect()
    };
    eventually(
        "east's endpoint merged in west",
        Duration::from_secs(20),
        || async {
            (hosts(&client, REVIEWS).await == set(&["127.0.0.71", "127.0.0.72"])).then_some(())
        },
    )
    .await;
    let (_, registry) = crate::support::http_get(west.http, "/debug/registry", "meshreg")
        .await
        .unwrap();
    let line = registry
        .lines()
        .find(|l| l.contains("127.0.0.71"))
        .unwrap_or_else(|| panic!("{registry}"));
    assert!(
        line.contains("cluster=east") && line.contains("network=net-east"),
        "{line}"
    );
    // A proxy of west's network (scoped: it names its namespace) reaches
    // east's endpoints through east's gateway, which west knows.
    let scoped = Envoy::start_node(
        west.xds,
        Ads::Delta,
        "{id: \"sidecar~127.0.0.8~client.fed~fed.svc.cluster.local\", cluster: client, \
         metadata: {NAMESPACE: fed, NETWORK: net-west}}",
        &[],
    )
    .await;
    let through: BTreeSet<String> = ["127.0.0.72:9080 healthy", "127.0.0.98:15443 healthy"]
        .map(String::from)
        .into();
    eventually(
        "east's endpoint as east's gateway",
        Duration::from_secs(20),
        || async { (hosts(&scoped, REVIEWS).await == through).then_some(()) },
    )
    .await;

    // East's service changes: west follows.
    write_atomic(
        &east_dir.path().join("reviews.yaml"),
        &reviews_entry(&["127.0.0.71", "127.0.0.73"]),
    );
    eventually(
        "east's new endpoint in west",
        Duration::from_secs(20),
        || async {
            (hosts(&client, REVIEWS).await == set(&["127.0.0.71", "127.0.0.72", "127.0.0.73"]))
                .then_some(())
        },
    )
    .await;

    // East goes away: its lease expires and west keeps only its own.
    drop(east);
    eventually(
        "east's endpoints gone from west",
        Duration::from_secs(30),
        || async { (hosts(&client, REVIEWS).await == set(&["127.0.0.72"])).then_some(()) },
    )
    .await;
}

/// Issue 12 (split horizon): a proxy reaches endpoints of its own network
/// directly and those of a network with an east-west gateway through the
/// gateway, weighted by how many endpoints it stands for, as istiod's
/// `EndpointsByNetworkFilter` does; a proxy on that other network reaches
/// them directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_on_another_network_are_reached_through_its_gateway() {
    const REVIEWS: &str = "outbound|9080||reviews.fed.example.test";
    let dir = tempfile::tempdir().unwrap();
    write_atomic(
        &dir.path().join("reviews.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: reviews, namespace: fed}\n\
         spec:\n  hosts: [reviews.fed.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 9080, name: http, protocol: HTTP}]\n  endpoints:\n\
         \x20 - {address: 127.0.0.81, network: net-west, labels: {security.istio.io/tlsMode: istio}}\n\
         \x20 - {address: 127.0.0.82, network: net-east, labels: {security.istio.io/tlsMode: istio}}\n\
         \x20 - {address: 127.0.0.83, network: net-east, labels: {security.istio.io/tlsMode: istio}}\n",
    );
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\n\
         networks: {{net-east: {{gateways: [{{address: 127.0.0.99, port: 15443}}]}}}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        dir.path().display()
    ))
    .await;
    let node = |network: &str, ip: &str| {
        format!(
            "{{id: \"sidecar~{ip}~client.fed~fed.svc.cluster.local\", cluster: client, \
             metadata: {{NAMESPACE: fed, NETWORK: {network}}}}}"
        )
    };
    let west = Envoy::start_node(daemon.xds, Ads::Delta, &node("net-west", "127.0.0.5"), &[]).await;
    let east = Envoy::start_node(daemon.xds, Ads::Delta, &node("net-east", "127.0.0.6"), &[]).await;
    // Envoy's hosts of REVIEWS with their weights.
    let weights = |envoy| host_stat(envoy, REVIEWS, "weight");
    let want_west: BTreeSet<String> = ["127.0.0.81:9080 1", "127.0.0.99:15443 2"]
        .map(String::from)
        .into();
    eventually(
        "west reaches east through the gateway",
        Duration::from_secs(20),
        || async { (weights(&west).await == want_west).then_some(()) },
    )
    .await;
    let want_east: BTreeSet<String> = [
        "127.0.0.81:9080 1",
        "127.0.0.82:9080 1",
        "127.0.0.83:9080 1",
    ]
    .map(String::from)
    .into();
    eventually(
        "east reaches everything directly",
        Duration::from_secs(20),
        || async { (weights(&east).await == want_east).then_some(()) },
    )
    .await;
}

/// Issue 12 (locality-aware EDS): three endpoints in three zones; a proxy
/// in zone `a` of region `r1`, under a rule with outlier detection
/// (locality failover on, as the mesh default), gets priority 0 for its
/// zone's endpoint, then its region's, then the other region's, as
/// istiod's proximity ranks them (renumbered without gaps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_its_own_zone_s_endpoints_first() {
    const CLUSTER: &str = "outbound|9080||zones.fed.example.test";
    let dir = tempfile::tempdir().unwrap();
    write_atomic(
        &dir.path().join("zones.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: zones, namespace: fed}\n\
         spec:\n  hosts: [zones.fed.example.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 9080, name: http, protocol: HTTP}]\n  endpoints:\n\
         \x20 - {address: 127.0.0.91, locality: r1/a}\n\
         \x20 - {address: 127.0.0.92, locality: r1/b}\n\
         \x20 - {address: 127.0.0.93, locality: r2/c}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: zones, namespace: fed}\n\
         spec:\n  host: zones.fed.example.test\n\
         \x20 trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5, interval: 10s}}\n",
    );
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\n\
         sources: [{{kind: serviceentry, dir: {}}}]\n",
        dir.path().display()
    ))
    .await;
    let envoy = Envoy::start_node(
        daemon.xds,
        Ads::Delta,
        "{id: \"sidecar~127.0.0.7~client.fed~fed.svc.cluster.local\", cluster: client, \
         locality: {region: r1, zone: a}, metadata: {NAMESPACE: fed}}",
        &[],
    )
    .await;
    let priorities = || host_stat(&envoy, CLUSTER, "priority");
    let want: BTreeSet<String> = [
        "127.0.0.91:9080 0",
        "127.0.0.92:9080 1",
        "127.0.0.93:9080 2",
    ]
    .map(String::from)
    .into();
    eventually(
        "priorities by proximity",
        Duration::from_secs(20),
        || async { (priorities().await == want).then_some(()) },
    )
    .await;
}
