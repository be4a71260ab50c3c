//! The Kubernetes source against a real kube-apiserver (with etcd 3.6, both
//! built from their Go modules): bookinfo's `reviews` Service and an
//! EndpointSlice for its pods are written through the API, as the
//! EndpointSlice controller would, and a real Envoy gets them from meshreg;
//! a pod turning not ready, a terminating pod and a deleted slice follow.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

use crate::peers::{KubeApiserver, MESHREG_SA_TOKEN, NOBODY_TOKEN};
use crate::support::{Ads, Daemon, Envoy, eventually, repo};

const CLUSTER: &str = "outbound|9080||reviews.default.svc.cluster.local";

/// bookinfo's `reviews` Service, from Istio's bookinfo.yaml.
fn reviews_service() -> Service {
    use serde::Deserialize as _;
    let text =
        std::fs::read_to_string(repo().join(
            "adapters/tests/fixtures/istio/istio/samples/bookinfo/platform/kube/bookinfo.yaml",
        ))
        .unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if value.get("kind").and_then(|k| k.as_str()) == Some("Service")
            && value["metadata"]["name"].as_str() == Some("reviews")
        {
            return serde_yaml_ng::from_value(value).unwrap();
        }
    }
    panic!("no reviews Service in bookinfo.yaml");
}

/// The EndpointSlice the controller would write for `reviews` with these
/// pods: (pod name, IP, ready, serving, terminating).
fn reviews_slice(pods: &[(&str, &str, bool, bool, bool)]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = pods
        .iter()
        .map(|(pod, ip, ready, serving, terminating)| {
            serde_json::json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
                "zone": "zone-a",
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "reviews-abc12",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "reviews",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
    }))
    .unwrap()
}

/// Envoy's hosts of the reviews cluster with their health flags.
async fn hosts(envoy: &Envoy) -> BTreeSet<String> {
    let text = envoy.admin("/clusters").await;
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{CLUSTER}::")))
        .filter_map(|l| {
            let (host, flags) = l.split_once("::health_flags::")?;
            Some(format!("{host} {flags}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_from_a_real_api_server_reaches_envoy() {
    let mut kube = KubeApiserver::start().await;
    eprintln!("API server: {}", kube.version);
    let client = kube.client().await;
    let services: kube::Api<Service> = kube::Api::namespaced(client.clone(), "default");
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    // The slice first: it waits in the registry until its Service comes.
    slices
        .create(
            &PostParams::default(),
            &reviews_slice(&[
                ("reviews-v1-a", "10.1.0.1", true, true, false),
                ("reviews-v2-b", "10.1.0.2", true, true, false),
                ("reviews-v3-c", "10.1.0.3", true, true, false),
            ]),
        )
        .await
        .expect("create the reviews EndpointSlice");
    services
        .create(&PostParams::default(), &reviews_service())
        .await
        .expect("create the reviews Service");

    // The pods behind the slice (bookinfo's reviews Deployments' labels),
    // on a node with topology labels. No kubelet runs: they stay Pending,
    // which is all the source reads.
    let client = kube.client().await;
    kube::Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-a", "labels": {
                    "topology.kubernetes.io/region": "us-east1",
                    "topology.kubernetes.io/zone": "us-east1-b"}},
            }))
            .unwrap(),
        )
        .await
        .expect("create the node");
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    for (name, version) in [
        ("reviews-v1-a", "v1"),
        ("reviews-v2-b", "v2"),
        ("reviews-v3-c", "v3"),
    ] {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default",
                             "labels": {"app": "reviews", "version": version}},
                "spec": {"nodeName": "node-a", "serviceAccountName": "bookinfo-reviews",
                         "containers": [{"name": "reviews", "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.3"}]},
            }))
            .unwrap(),
        )
        .await
        .expect("create a pod");
    }

    // The kubelet would report their IPs and readiness; the test does.
    for (name, ip) in [
        ("reviews-v1-a", "10.1.0.1"),
        ("reviews-v2-b", "10.1.0.2"),
        ("reviews-v3-c", "10.1.0.3"),
    ] {
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .expect("set a pod's status");
    }
    // A ServiceEntry in a file that selects the cluster's reviews pods, as
    // istiod's ServiceEntry controller selects Pods.
    let entries = tempfile::tempdir().unwrap();
    std::fs::write(
        entries.path().join("reviews-mesh.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: reviews-mesh, namespace: default}\n\
         spec:\n  hosts: [reviews.mesh.example]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  \
         ports: [{number: 9080, name: http, protocol: HTTP}]\n  \
         workloadSelector: {labels: {app: reviews}}\n",
    )
    .unwrap();

    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: kubernetes\n  kubeconfig: {}\n  cluster_id: cluster-1\n  network: net-1\n\
         - kind: serviceentry\n  dir: {}\n",
        kube.kubeconfig.display(),
        entries.path().display()
    ))
    .await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "kube-e2e", &[]).await;
    let healthy = |ips: &[&str]| -> BTreeSet<String> {
        ips.iter().map(|ip| format!("{ip}:9080 healthy")).collect()
    };
    eventually(
        "the pods' IPs in Envoy",
        Duration::from_secs(30),
        || async {
            (hosts(&envoy).await == healthy(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])).then_some(())
        },
    )
    .await;
    // The ServiceEntry's cluster has the same pods, selected by label.
    eventually(
        "the selected pods in Envoy",
        Duration::from_secs(30),
        || async {
            let selected = envoy.hosts("outbound|9080||reviews.mesh.example").await;
            let want: BTreeSet<String> = ["10.1.0.1:9080", "10.1.0.2:9080", "10.1.0.3:9080"]
                .into_iter()
                .map(str::to_string)
                .collect();
            (selected == want).then_some(())
        },
    )
    .await;

    // v2's pod turns not ready; v3's is terminating but still serving. The
    // controller rewrites the slice; Envoy sees v2 unhealthy, v3 draining.
    let mut slice = slices.get("reviews-abc12").await.unwrap();
    let fresh = reviews_slice(&[
        ("reviews-v1-a", "10.1.0.1", true, true, false),
        ("reviews-v2-b", "10.1.0.2", false, false, false),
        ("reviews-v3-c", "10.1.0.3", false, true, true),
    ]);
    slice.endpoints = fresh.endpoints;
    slices
        .replace("reviews-abc12", &PostParams::default(), &slice)
        .await
        .expect("replace the slice");
    let want: BTreeSet<String> = [
        "10.1.0.1:9080 healthy".to_string(),
        "10.1.0.2:9080 /failed_eds_health".to_string(),
        "10.1.0.3:9080 /eds_status_draining".to_string(),
    ]
    .into();
    eventually("readiness in Envoy", Duration::from_secs(30), || async {
        let got = hosts(&envoy).await;
        (got == want).then_some(())
    })
    .await;

    // Endpoints carry the cluster, network and pod (the registry's view)
    // and their node's locality (in Envoy's EDS).
    let registry = crate::support::http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        registry.contains(
            "10.1.0.1 {\"http\": 9080} Healthy cluster=cluster-1 network=net-1 \
             locality=us-east1/us-east1-b workload=reviews-v1-a"
        ),
        "{registry}"
    );
    let dump = envoy.admin("/config_dump?include_eds").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let localities: Vec<&serde_json::Value> = dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c["dynamic_endpoint_configs"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .filter(|e| e["endpoint_config"]["cluster_name"] == CLUSTER)
        .flat_map(|e| {
            e["endpoint_config"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .map(|l| &l["locality"])
        .collect();
    assert_eq!(
        localities,
        [&serde_json::json!({"region": "us-east1", "zone": "us-east1-b"})],
        "{dump}"
    );

    // The API server goes away: Envoy keeps the endpoints, and the source
    // is reported stale.
    kube.stop().await;
    wait_state(&daemon, "stale", Duration::from_secs(30)).await;
    assert_eq!(
        daemon
            .metric(
                "meshreg_source_state",
                &["source=\"kubernetes/cluster-1\"", "state=\"stale\""]
            )
            .await,
        1.0
    );
    assert_eq!(
        hosts(&envoy).await,
        want,
        "endpoints changed during the outage"
    );

    // Back: the source recovers and follows changes again.
    kube.restart().await;
    let client = kube.client().await;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    wait_state(&daemon, "synced", Duration::from_secs(60)).await;

    // The slice deleted: the cluster stays, with no endpoint.
    slices
        .delete("reviews-abc12", &DeleteParams::default())
        .await
        .expect("delete the slice");
    eventually("no endpoint in Envoy", Duration::from_secs(30), || async {
        hosts(&envoy).await.is_empty().then_some(())
    })
    .await;
    assert!(envoy.clusters().await.contains(CLUSTER));
}

/// The ClusterRole and ClusterRoleBinding of `deploy/kubernetes.yaml`.
fn deploy_rbac() -> (ClusterRole, ClusterRoleBinding) {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes.yaml")).unwrap();
    let (mut role, mut binding) = (None, None);
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("ClusterRole") => role = Some(serde_yaml_ng::from_value(value).unwrap()),
            Some("ClusterRoleBinding") => binding = Some(serde_yaml_ng::from_value(value).unwrap()),
            _ => {}
        }
    }
    (
        role.expect("a ClusterRole in deploy/kubernetes.yaml"),
        binding.expect("a ClusterRoleBinding in deploy/kubernetes.yaml"),
    )
}

/// `/ready`'s line for the source.
async fn ready_line(daemon: &Daemon) -> String {
    crate::support::http_get(daemon.http, "/ready", "meshreg")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("kubernetes/cluster-1:"))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_manifests_rbac_is_enough_and_needed() {
    let kube = KubeApiserver::start().await;
    // With Istio's CRDs served, their list and watch need RBAC too.
    kube.apply_istio_crds().await;
    let client = kube.client().await;
    let (role, binding) = deploy_rbac();
    kube::Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("create the ClusterRole");
    kube::Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the ClusterRoleBinding");
    kube::Api::<Service>::namespaced(client, "default")
        .create(&PostParams::default(), &reviews_service())
        .await
        .expect("create the reviews Service");
    let config = |kubeconfig: &std::path::Path| {
        format!(
            "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
             sources:\n- kind: kubernetes\n  kubeconfig: {}\n  cluster_id: cluster-1\n",
            kubeconfig.display()
        )
    };

    // As meshreg's service account, bound by the manifest: synced.
    let daemon = Daemon::start_config(&config(&kube.kubeconfig_for(MESHREG_SA_TOKEN))).await;
    eventually(
        "synced with the manifest's RBAC",
        Duration::from_secs(30),
        || async { ready_line(&daemon).await.contains(": synced").then_some(()) },
    )
    .await;
    let registry = crate::support::http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        registry.contains("reviews.default.svc.cluster.local"),
        "{registry}"
    );

    // As a user with no role: never synced, and /ready says why.
    let denied = Daemon::start_config(&config(&kube.kubeconfig_for(NOBODY_TOKEN))).await;
    eventually("refused without RBAC", Duration::from_secs(30), || async {
        let line = ready_line(&denied).await;
        (line.contains(": syncing") && line.contains("forbidden")).then_some(())
    })
    .await;
}

/// Writes `kubeconfig` into `dir` as cluster `id`, the way a mounted
/// Secret or config management does (a hidden temporary, renamed).
fn place(dir: &std::path::Path, id: &str, kubeconfig: &std::path::Path) {
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::copy(kubeconfig, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(id)).unwrap();
}

/// Starts an API server holding `reviews` with one endpoint at `ip`.
async fn cluster_with_reviews_at(ip: &str) -> KubeApiserver {
    let kube = KubeApiserver::start().await;
    let client = kube.client().await;
    kube::Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &reviews_service())
        .await
        .expect("create the reviews Service");
    let mut slice = reviews_slice(&[("reviews-v1", ip, true, true, false)]);
    slice.metadata.name = Some(format!("reviews-{}", ip.replace('.', "-")));
    kube::Api::<EndpointSlice>::namespaced(client, "default")
        .create(&PostParams::default(), &slice)
        .await
        .expect("create the reviews EndpointSlice");
    kube
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_come_and_go_with_their_kubeconfig_files() {
    let one = cluster_with_reviews_at("10.1.0.1").await;
    let two = cluster_with_reviews_at("10.2.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    place(dir.path(), "cluster-1", &one.kubeconfig);
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: kubernetes-clusters\n  dir: {}\n  rescan_interval: 200ms\n",
        dir.path().display()
    ))
    .await;
    // Ready only once the directory's clusters have sent their state: a
    // restarted daemon must not serve an empty configuration first.
    daemon.ready().await;
    let (_, registry) = crate::support::http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .unwrap();
    assert!(
        registry.contains("10.1.0.1"),
        "ready before cluster-1 synced:\n{registry}"
    );
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "clusters-e2e", &[]).await;
    let ips = |list: &[&str]| -> BTreeSet<String> {
        list.iter().map(|ip| format!("{ip}:9080 healthy")).collect()
    };
    eventually("cluster-1's endpoint", Duration::from_secs(30), || async {
        (hosts(&envoy).await == ips(&["10.1.0.1"])).then_some(())
    })
    .await;

    // A second cluster's kubeconfig appears: the same Service from both
    // clusters is one service with the union of their endpoints.
    place(dir.path(), "cluster-2", &two.kubeconfig);
    eventually(
        "both clusters' endpoints",
        Duration::from_secs(30),
        || async { (hosts(&envoy).await == ips(&["10.1.0.1", "10.2.0.1"])).then_some(()) },
    )
    .await;

    // cluster-2's credentials rotate: its endpoint never leaves Envoy.
    place(
        dir.path(),
        "cluster-2",
        &two.kubeconfig_for(crate::peers::ROTATED_ADMIN_TOKEN),
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert_eq!(
            hosts(&envoy).await,
            ips(&["10.1.0.1", "10.2.0.1"]),
            "a gap while cluster-2's kubeconfig rotated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = daemon.log();
    assert!(log.contains("kubeconfig changed; reconnecting"), "{log}");
    assert!(
        !log.contains(crate::peers::ROTATED_ADMIN_TOKEN),
        "a token was logged"
    );

    // cluster-1's file is removed: exactly its endpoint goes, and its
    // source with it.
    std::fs::remove_file(dir.path().join("cluster-1")).unwrap();
    eventually(
        "only cluster-2's endpoint",
        Duration::from_secs(30),
        || async { (hosts(&envoy).await == ips(&["10.2.0.1"])).then_some(()) },
    )
    .await;
    let ready = crate::support::http_get(daemon.http, "/ready", "meshreg")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(!ready.contains("kubernetes/cluster-1"), "{ready}");
    assert!(ready.contains("kubernetes/cluster-2: synced"), "{ready}");
    // Its metric series went too (they kept their last values).
    let metrics = daemon.metrics().await;
    assert!(
        !metrics.contains("source=\"kubernetes/cluster-1\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "meshreg_source_objects{kind=\"EndpointSlice\",source=\"kubernetes/cluster-2\"}"
        ),
        "{metrics}"
    );
}

/// The ServiceEntry document of an Istio fixture, in namespace `default`.
fn fixture_service_entry(rel: &str) -> serde_json::Value {
    use serde::Deserialize as _;
    let text =
        std::fs::read_to_string(repo().join("adapters/tests/fixtures/istio").join(rel)).unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if value.get("kind").and_then(|k| k.as_str()) == Some("ServiceEntry") {
            let mut json: serde_json::Value = serde_json::to_value(value).unwrap();
            json["metadata"]["namespace"] = "default".into();
            return json;
        }
    }
    panic!("no ServiceEntry in {rel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_service_entries_from_the_api_server_reach_envoy() {
    let kube = KubeApiserver::start().await;
    kube.apply_istio_crds().await;
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
    ));
    let entries: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(kube.client().await, "default", &resource);
    let mongo =
        fixture_service_entry("api/service_entry.proto-examples/02-mongocluster-static-vip.yaml");
    entries
        .create(
            &PostParams::default(),
            &serde_json::from_value(mongo.clone()).unwrap(),
        )
        .await
        .expect("create the ServiceEntry");
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: kubernetes\n  kubeconfig: {}\n  cluster_id: cluster-1\n",
        kube.kubeconfig.display()
    ))
    .await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "istio-crs-e2e", &[]).await;
    let cluster = "outbound|27018||mymongodb.somedomain";
    let want =
        |ips: &[&str]| -> BTreeSet<String> { ips.iter().map(|ip| format!("{ip}:27018")).collect() };
    eventually(
        "the ServiceEntry's endpoints in Envoy",
        Duration::from_secs(30),
        || async { (envoy.hosts(cluster).await == want(&["2.2.2.2", "3.3.3.3"])).then_some(()) },
    )
    .await;
    // Edited through the API: Envoy follows.
    let mut edited = entries.get("external-svc-mongocluster").await.unwrap();
    edited.data["spec"]["endpoints"][1]["address"] = "4.4.4.4".into();
    entries
        .replace("external-svc-mongocluster", &PostParams::default(), &edited)
        .await
        .expect("replace the ServiceEntry");
    eventually("the edit in Envoy", Duration::from_secs(30), || async {
        (envoy.hosts(cluster).await == want(&["2.2.2.2", "4.4.4.4"])).then_some(())
    })
    .await;
    // Deleted: the cluster goes.
    entries
        .delete("external-svc-mongocluster", &DeleteParams::default())
        .await
        .expect("delete the ServiceEntry");
    eventually(
        "the cluster gone from Envoy",
        Duration::from_secs(30),
        || async { (!envoy.clusters().await.contains(cluster)).then_some(()) },
    )
    .await;

    // A WorkloadGroup (Istio's own validation fixture) is read from the API
    // server by the file source's parser and kept in the registry for VM
    // registration; it declares no service.
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "networking.istio.io",
        "v1",
        "WorkloadGroup",
    ));
    let groups: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(kube.client().await, "default", &resource);
    let mut full = fixture_document(
        "istio/pkg/config/validation/testdata/crds/workloadgroup-valid.yaml",
        "WorkloadGroup",
    );
    full["apiVersion"] = "networking.istio.io/v1".into();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(full).unwrap(),
        )
        .await
        .expect("create the WorkloadGroup");
    let registry = || async {
        crate::support::http_get(daemon.http, "/debug/registry", "meshreg")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    eventually("the group in the registry", Duration::from_secs(30), || async {
        registry()
            .await
            .lines()
            .any(|l| {
                l.starts_with("workloadgroup default/full serviceAccount=sa network=net locality=foo/bar/baz")
                    && l.contains("probe=[httpGet https://bar:8080/bar every 1s")
            })
            .then_some(())
    })
    .await;
    groups
        .delete("full", &DeleteParams::default())
        .await
        .expect("delete the WorkloadGroup");
    eventually("the group gone", Duration::from_secs(30), || async {
        (!registry().await.contains("workloadgroup default/full")).then_some(())
    })
    .await;
}

/// The first document of `kind` in an Istio fixture file, as JSON.
fn fixture_document(rel: &str, kind: &str) -> serde_json::Value {
    use serde::Deserialize as _;
    let path = repo().join("adapters/tests/fixtures/istio").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if value.get("kind").and_then(|k| k.as_str()) == Some(kind) {
            return serde_json::to_value(value).unwrap();
        }
    }
    panic!("no {kind} in {rel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_and_failing_lists_lose_nothing() {
    use meshreg_testkit::fake_kube::FakeKube;
    let fake = FakeKube::start().await;
    fake.apply("/api/v1/namespaces", serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    fake.apply(
        "/api/v1/services",
        serde_json::to_value(reviews_service())
            .map(|mut v| {
                v["metadata"]["namespace"] = "default".into();
                v
            })
            .unwrap(),
    );
    let slice = |ips: &[&str]| {
        let pods: Vec<(String, &str)> = ips
            .iter()
            .map(|ip| (format!("reviews-{ip}"), *ip))
            .collect();
        let pods: Vec<(&str, &str, bool, bool, bool)> = pods
            .iter()
            .map(|(p, ip)| (p.as_str(), *ip, true, true, false))
            .collect();
        serde_json::to_value(reviews_slice(&pods)).unwrap()
    };
    fake.apply(
        "/apis/discovery.k8s.io/v1/endpointslices",
        slice(&["10.1.0.1"]),
    );
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: kubernetes\n  kubeconfig: {}\n  cluster_id: cluster-1\n",
        fake.kubeconfig.display()
    ))
    .await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "fake-kube-e2e", &[]).await;
    let ips = |list: &[&str]| -> BTreeSet<String> {
        list.iter().map(|ip| format!("{ip}:9080 healthy")).collect()
    };
    eventually("the first endpoint", Duration::from_secs(30), || async {
        (hosts(&envoy).await == ips(&["10.1.0.1"])).then_some(())
    })
    .await;

    // The watch expires while the slice changes: the client gets 410 Gone,
    // lists again, and Envoy converges with no moment without endpoints.
    let lists = fake.lists();
    fake.apply_unseen(
        "/apis/discovery.k8s.io/v1/endpointslices",
        slice(&["10.1.0.2", "10.1.0.3"]),
    );
    fake.expire_watches();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = hosts(&envoy).await;
        assert!(
            !now.is_empty(),
            "a moment with no endpoint during the relist"
        );
        if now == ips(&["10.1.0.2", "10.1.0.3"]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence after 410: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fake.lists() > lists,
        "the client did not list again after 410 Gone"
    );

    // Lists then fail with 500 for a while: the last state stays, the
    // source is stale, and it recovers by itself.
    fake.fail_lists(6);
    fake.expire_watches();
    wait_state(&daemon, "stale", Duration::from_secs(30)).await;
    assert_eq!(hosts(&envoy).await, ips(&["10.1.0.2", "10.1.0.3"]));
    wait_state(&daemon, "synced", Duration::from_secs(60)).await;
    // The outage was logged once, not per retry.
    let warnings = daemon.log().matches("cannot watch the API server").count();
    assert_eq!(warnings, 1, "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_recovers_when_its_watches_resume_with_nothing_changed() {
    use meshreg_testkit::fake_kube::FakeKube;
    let fake = FakeKube::start().await;
    fake.apply("/api/v1/namespaces", serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         sources:\n- kind: kubernetes\n  kubeconfig: {}\n  cluster_id: cluster-1\n",
        fake.kubeconfig.display()
    ))
    .await;
    wait_state(&daemon, "synced", Duration::from_secs(30)).await;
    // The watches drop and cannot be opened again for a while, then can,
    // with nothing changed. A watch resumed from its resourceVersion
    // yields no event, and the fake never ends a watch by itself: the
    // source recovers only because the failed watchers list again.
    fake.fail_watches(5);
    fake.drop_watches();
    wait_state(&daemon, "stale", Duration::from_secs(30)).await;
    wait_state(&daemon, "synced", Duration::from_secs(30)).await;
    assert!(
        daemon.log().contains("the API server answers again"),
        "{}",
        daemon.log()
    );
}

/// Waits until `/ready` reports the source `kubernetes/cluster-1` in
/// `state` (`synced`, `stale`, `syncing`).
async fn wait_state(daemon: &Daemon, state: &str, timeout: Duration) {
    let what = format!("the source {state}");
    eventually(&what, timeout, || async {
        ready_line(daemon)
            .await
            .contains(&format!(": {state}"))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_are_honoured_and_deleted_slices_leave() {
    use meshreg_testkit::fake_kube::FakeKube;
    let fake = FakeKube::start().await;
    let namespace = |name: &str| serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    fake.apply("/api/v1/namespaces", namespace("default"));
    fake.apply(
        "/api/v1/services",
        serde_json::to_value(reviews_service())
            .map(|mut v| {
                v["metadata"]["namespace"] = "default".into();
                v
            })
            .unwrap(),
    );
    fake.apply(
        "/apis/discovery.k8s.io/v1/endpointslices",
        serde_json::to_value(reviews_slice(&[(
            "reviews-1",
            "10.1.0.1",
            true,
            true,
            false,
        )]))
        .unwrap(),
    );
    let daemon = Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         sources:\n- kind: kubernetes\n  kubeconfig: {}\n  cluster_id: cluster-1\n",
        fake.kubeconfig.display()
    ))
    .await;
    wait_state(&daemon, "synced", Duration::from_secs(30)).await;
    eventually("the endpoint", Duration::from_secs(30), || async {
        (daemon.metric("meshreg_endpoints", &[]).await == 1.0).then_some(())
    })
    .await;

    // A change only the Namespace watch sees, then a BOOKMARK to every
    // watch: each now knows the newest resourceVersion. The history
    // before it is compacted and the watches drop: a client that honours
    // bookmarks watches again from there; one that did not would watch
    // from an older version, get 410 Gone and list everything again.
    fake.apply("/api/v1/namespaces", namespace("other"));
    fake.bookmark();
    let served = 5; // Services, EndpointSlices, Pods, Nodes, Namespaces
    eventually("bookmarks written", Duration::from_secs(30), || async {
        (fake.watch_counts().2 >= served).then_some(())
    })
    .await;
    let (watches, gone, _) = fake.watch_counts();
    let lists = fake.lists();
    fake.compact();
    fake.drop_watches();
    eventually("the watches back", Duration::from_secs(30), || async {
        (fake.watch_counts().0 >= watches + served).then_some(())
    })
    .await;
    assert_eq!(
        fake.watch_counts().1,
        gone,
        "a watch resumed from before its bookmark"
    );
    assert_eq!(fake.lists(), lists, "a watch listed again after a bookmark");

    // The slice deleted: a DELETED event takes its endpoint away.
    fake.delete(
        "/apis/discovery.k8s.io/v1/endpointslices",
        "default",
        "reviews-abc12",
    );
    eventually("no endpoint", Duration::from_secs(30), || async {
        (daemon.metric("meshreg_endpoints", &[]).await == 0.0).then_some(())
    })
    .await;
    wait_state(&daemon, "synced", Duration::from_secs(30)).await;
}
