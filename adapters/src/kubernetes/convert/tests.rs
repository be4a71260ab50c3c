//! Conversion tests on real Kubernetes objects (`adapters/tests/fixtures`:
//! bookinfo from Istio, objects from k9s and a watch event captured from a
//! real cluster) and on the rules istiod follows, each written beside its
//! case.

use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshreg_registry::{Address, Health, Object, Protocol, Resolution, SourceId, SourceKind};
use serde::Deserialize as _;

use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

fn fixture(rel: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}{rel}")).expect("fixture")
}

fn cluster() -> Cluster {
    Cluster {
        id: "cluster-1".into(),
        network: "net-1".into(),
        domain: "cluster.local".into(),
    }
}

fn source() -> SourceId {
    SourceId::new(SourceKind::Kubernetes, "cluster-1")
}

fn declared(obj: Option<Object>) -> Service {
    match obj {
        Some(Object::Service { service, .. }) => service,
        other => panic!("expected a service declaration, got {other:?}"),
    }
}

fn sharded(obj: Option<Object>) -> EndpointShard {
    match obj {
        Some(Object::Endpoints(shard)) => shard,
        other => panic!("expected an endpoint shard, got {other:?}"),
    }
}

#[test]
fn a_cluster_ip_service_from_k9s() {
    let svc: KubeService = serde_json::from_str(&fixture("kubernetes/svc.json")).unwrap();
    let s = declared(service(&svc, &cluster(), &source()).unwrap());
    assert_eq!(s.hostname.as_str(), "dictionary1.default.svc.cluster.local");
    assert_eq!(s.namespace, "default");
    assert_eq!(s.resolution, Resolution::Static);
    assert_eq!(s.ports.len(), 1);
    assert_eq!(
        (
            s.ports[0].name.as_str(),
            s.ports[0].number,
            s.ports[0].protocol
        ),
        ("http", 4001, Protocol::Http)
    );
    // The named targetPort is resolved by the slice, not here.
    assert_eq!(s.ports[0].target_port, None);
    assert_eq!(
        s.addresses.get("cluster-1").map(Vec::as_slice),
        Some(&["10.47.248.116".to_string()][..])
    );
}

#[test]
fn bookinfo_services_from_istio() {
    let text = fixture("istio/istio/samples/bookinfo/platform/kube/bookinfo.yaml");
    let mut hosts = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if value.get("kind").and_then(|k| k.as_str()) != Some("Service") {
            continue;
        }
        let mut svc: KubeService = serde_yaml_ng::from_value(value).unwrap();
        // bookinfo.yaml names no namespace; kubectl applies it to one.
        svc.metadata.namespace = Some("default".into());
        let s = declared(service(&svc, &cluster(), &source()).unwrap());
        assert_eq!(s.ports.len(), 1, "{}", s.hostname);
        assert_eq!(
            (s.ports[0].number, s.ports[0].protocol),
            (9080, Protocol::Http)
        );
        hosts.push(s.hostname.to_string());
    }
    hosts.sort();
    assert_eq!(
        hosts,
        [
            "details.default.svc.cluster.local",
            "productpage.default.svc.cluster.local",
            "ratings.default.svc.cluster.local",
            "reviews.default.svc.cluster.local",
        ]
    );
}

fn svc_json(spec: serde_json::Value) -> KubeService {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "prod",
                     "labels": {"app": "db"},
                     "annotations": {"networking.istio.io/exportTo": "prod, ."}},
        "spec": spec,
    }))
    .unwrap()
}

#[test]
fn headless_is_passthrough_external_name_is_no_declaration() {
    // istiod: `clusterIP: None` → Passthrough, no VIP.
    let s = declared(
        service(
            &svc_json(serde_json::json!({"clusterIP": "None", "ports": [{"port": 5432}]})),
            &cluster(),
            &source(),
        )
        .unwrap(),
    );
    assert_eq!(s.resolution, Resolution::None);
    assert!(s.addresses.is_empty());
    assert_eq!(s.export_to, ["prod", "."]);
    assert_eq!(s.labels.get("app").map(String::as_str), Some("db"));
    // istiod: ExternalName → an alias with no cluster of its own.
    let alias =
        svc_json(serde_json::json!({"type": "ExternalName", "externalName": "db.example.com"}));
    assert_eq!(service(&alias, &cluster(), &source()).unwrap(), None);
    // Dual stack: every cluster IP is a VIP in this cluster.
    let dual = declared(
        service(
            &svc_json(serde_json::json!({"clusterIP": "10.0.0.1",
                "clusterIPs": ["10.0.0.1", "fd00::1"], "ports": [{"port": 80}]})),
            &cluster(),
            &source(),
        )
        .unwrap(),
    );
    assert_eq!(dual.addresses["cluster-1"], ["10.0.0.1", "fd00::1"]);
}

#[test]
fn bad_port_and_missing_names_are_typed_errors() {
    let bad = svc_json(serde_json::json!({"ports": [{"port": 70000}]}));
    assert!(matches!(
        service(&bad, &cluster(), &source()),
        Err(ConvertError::BadPort { value: 70000, .. })
    ));
    let mut unnamed = svc_json(serde_json::json!({}));
    unnamed.metadata.name = None;
    assert_eq!(
        service(&unnamed, &cluster(), &source()),
        Err(ConvertError::Unnamed {
            kind: "Service",
            field: "name"
        })
    );
}

#[test]
fn port_protocols_follow_istio() {
    // (name, appProtocol, protocol, port) → what kube.ConvertProtocol gives.
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, i32, Protocol);
    let cases: &[Case<'_>] = &[
        ("http", None, None, 80, Protocol::Http),
        ("http-web", None, None, 80, Protocol::Http),
        ("http2-api", None, None, 80, Protocol::Http2),
        ("grpc", None, None, 80, Protocol::Grpc),
        ("grpc-web-ui", None, None, 80, Protocol::Grpc),
        ("tcp-db", None, None, 80, Protocol::Tcp),
        ("tls-x", None, None, 443, Protocol::Tls),
        ("mongo-x", None, None, 1, Protocol::Mongo),
        ("redis", None, None, 6379, Protocol::Redis),
        ("web", None, None, 80, Protocol::Unspecified),
        // Well-known ports are TCP when nothing else says.
        ("", None, None, 3306, Protocol::Tcp),
        ("db", None, None, 27017, Protocol::Tcp),
        // appProtocol wins over the name.
        ("tcp", Some("http"), None, 80, Protocol::Http),
        ("x", Some("kubernetes.io/h2c"), None, 80, Protocol::Http2),
        ("x", Some("kubernetes.io/wss"), None, 80, Protocol::Https),
        // UDP from the port's protocol, whatever the name.
        ("http", None, Some("UDP"), 53, Protocol::Udp),
    ];
    for &(name, app, proto, number, want) in cases {
        let p = ServicePort {
            name: (!name.is_empty()).then(|| name.to_string()),
            app_protocol: app.map(str::to_string),
            protocol: proto.map(str::to_string),
            port: number,
            ..Default::default()
        };
        assert_eq!(protocol(&p), want, "{name:?} {app:?} {proto:?} {number}");
    }
}

#[test]
fn a_slice_without_its_service_label_is_skipped_then_joins_with_it() {
    let mut slice: EndpointSlice = serde_json::from_str(&fixture("kubernetes/eps.json")).unwrap();
    assert_eq!(
        shard(&slice, &cluster(), &source(), &Nothing).unwrap(),
        None
    );
    slice.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), "fred".to_string())].into());
    let s = sharded(shard(&slice, &cluster(), &source(), &Nothing).unwrap());
    assert_eq!(s.hostname.as_str(), "fred.blee.svc.cluster.local");
    assert_eq!(s.name, "fred");
    let ips: Vec<String> = s
        .endpoints
        .iter()
        .map(|e| match &e.address {
            Address::Ip(ip) => ip.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ips, ["172.20.0.2", "172.20.0.3"]);
    for e in &s.endpoints {
        assert_eq!(e.ports.get("peer-service"), Some(&4244));
        assert_eq!(e.health, Health::Healthy);
        assert_eq!(e.workload_name, "zorg");
        assert_eq!((&*e.cluster_id, &*e.network), ("cluster-1", "net-1"));
    }
}

#[test]
fn a_slice_from_a_real_watch_event() {
    let line = fixture("kubernetes/cache_test.TestWatchDecode.endpointslice-added.ndjson");
    let event: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let slice: EndpointSlice = serde_json::from_value(event["object"].clone()).unwrap();
    let s = sharded(shard(&slice, &cluster(), &source(), &Nothing).unwrap());
    assert_eq!(
        s.hostname.as_str(),
        "externalnode-proxy.kube-system.svc.cluster.local"
    );
    assert_eq!(s.endpoints.len(), 1);
    let e = &s.endpoints[0];
    assert_eq!(e.locality.zone, "540001");
    assert_eq!(
        e.ports,
        [("tcp-80".to_string(), 80), ("tcp-443".to_string(), 443)].into()
    );
    assert_eq!(e.workload_name, "externalnode-proxy-56c4d977d8-zxknh");
}

#[test]
fn conditions_become_health_as_istio_maps_them() {
    // (ready, serving, terminating) → health.
    let cases = [
        (None, None, None, Health::Healthy),
        (Some(true), Some(true), Some(false), Health::Healthy),
        (Some(false), Some(true), Some(true), Health::Draining),
        (Some(false), Some(false), Some(true), Health::Unhealthy),
        (Some(false), None, None, Health::Unhealthy),
    ];
    for (ready, serving, terminating, want) in cases {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s", "namespace": "n",
                         "labels": {"kubernetes.io/service-name": "svc"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::5"],
                           "conditions": {"ready": ready, "serving": serving,
                                          "terminating": terminating}}],
        }))
        .unwrap();
        let s = sharded(shard(&slice, &cluster(), &source(), &Nothing).unwrap());
        assert_eq!(
            s.endpoints[0].health, want,
            "{ready:?} {serving:?} {terminating:?}"
        );
    }
}

#[test]
fn fqdn_slices_are_skipped() {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "s", "namespace": "n",
                     "labels": {"kubernetes.io/service-name": "svc"}},
        "addressType": "FQDN",
        "endpoints": [{"addresses": ["db.example.com"]}],
    }))
    .unwrap();
    assert_eq!(
        shard(&slice, &cluster(), &source(), &Nothing).unwrap(),
        None
    );
}

/// Pods, Nodes and Namespaces for [`Lookup`].
#[derive(Default)]
struct Known {
    pods: std::collections::HashMap<(String, String), PodInfo>,
    nodes: std::collections::HashMap<String, Locality>,
    networks: std::collections::HashMap<String, String>,
}

impl Lookup for Known {
    fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }
    fn node(&self, name: &str) -> Option<&Locality> {
        self.nodes.get(name)
    }
    fn namespace_network(&self, name: &str) -> &str {
        self.networks.get(name).map_or("", String::as_str)
    }
}

#[test]
fn endpoints_join_their_pod_node_and_namespace_as_istiod_does() {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-x", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.1.0.1"], "nodeName": "node-a", "zone": "slice-zone",
             "targetRef": {"kind": "Pod", "name": "reviews-v1", "namespace": "default"}},
            {"addresses": ["10.1.0.2"], "nodeName": "node-a",
             "targetRef": {"kind": "Pod", "name": "reviews-v2", "namespace": "default"}},
            {"addresses": ["10.1.0.3"], "zone": "slice-zone"},
        ],
        "ports": [{"name": "http", "port": 9080}],
    }))
    .unwrap();
    let pod = |version: &str, extra: &[(&str, &str)]| -> Pod {
        let mut labels: BTreeMap<String, String> = [
            ("app".to_string(), "reviews".to_string()),
            ("version".to_string(), version.to_string()),
        ]
        .into();
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("reviews-{version}"), "namespace": "default", "labels": labels},
            "spec": {"containers": [], "serviceAccountName": "bookinfo-reviews", "nodeName": "node-a"},
        }))
        .unwrap()
    };
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {
            "topology.kubernetes.io/region": "us-east1",
            "topology.kubernetes.io/zone": "us-east1-b",
            "topology.istio.io/subzone": "rack-7"}},
    }))
    .unwrap();
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"topology.istio.io/network": "ns-net"}},
    }))
    .unwrap();
    let mut known = Known::default();
    known.pods.insert(
        ("default".into(), "reviews-v1".into()),
        pod_info(&pod("v1", &[])),
    );
    known.pods.insert(
        ("default".into(), "reviews-v2".into()),
        pod_info(&pod(
            "v2",
            &[
                ("istio-locality", "eu-west1.eu-west1-a"),
                ("topology.istio.io/network", "pod-net"),
            ],
        )),
    );
    known.nodes.insert("node-a".into(), node_locality(&node));
    // The pods' own namespace's label is not read (istiod reads only the
    // system namespace's): "ns-net" stays unused.
    known
        .networks
        .insert("default".into(), namespace_network(&ns));
    let system: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "istio-system", "labels": {"topology.istio.io/network": "sys-net"}},
    }))
    .unwrap();
    known
        .networks
        .insert("istio-system".into(), namespace_network(&system));
    let s = sharded(shard(&slice, &cluster(), &source(), &known).unwrap());
    let by_ip = |ip: &str| {
        s.endpoints
            .iter()
            .find(|e| e.address == Address::Ip(ip.parse().unwrap()))
            .unwrap()
    };
    // v1: its pod's labels and account, its node's locality, the system
    // namespace's network.
    let v1 = by_ip("10.1.0.1");
    assert_eq!(v1.labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(&*v1.service_account, "bookinfo-reviews");
    assert_eq!(*v1.locality, Locality::parse("us-east1/us-east1-b/rack-7"));
    assert_eq!(&*v1.network, "sys-net");
    // v2: the pod's own locality label and network win.
    let v2 = by_ip("10.1.0.2");
    assert_eq!(*v2.locality, Locality::parse("eu-west1/eu-west1-a"));
    assert_eq!(&*v2.network, "pod-net");
    // No pod, no node: the slice's zone, the system namespace's network.
    let bare = by_ip("10.1.0.3");
    assert!(bare.labels.is_empty());
    assert_eq!(bare.locality.zone, "slice-zone");
    assert_eq!(&*bare.network, "sys-net");
}

#[test]
fn udp_ports_are_left_out_so_kube_dns_declares_port_53_once() {
    // kube-dns: 53 over UDP and TCP, and 9153 (metrics) over TCP.
    let dns = svc_json(serde_json::json!({"clusterIP": "10.96.0.10", "ports": [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        {"name": "metrics", "port": 9153, "protocol": "TCP"},
    ]}));
    let s = declared(service(&dns, &cluster(), &source()).unwrap());
    let ports: Vec<(&str, u16)> = s
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.number))
        .collect();
    assert_eq!(ports, [("dns-tcp", 53), ("metrics", 9153)]);
}

#[test]
fn a_slice_endpoint_serves_only_the_ports_its_slice_names() {
    // istiod keeps a slice's endpoint only for the service ports the slice
    // lists: a Service with http and metrics, a slice listing http only.
    let svc = declared(
        service(
            &svc_json(serde_json::json!({"ports": [
                {"name": "http", "port": 80}, {"name": "metrics", "port": 9090}]})),
            &cluster(),
            &source(),
        )
        .unwrap(),
    );
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "s", "namespace": "prod",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"]}],
        "ports": [{"name": "http", "port": 8080}],
    }))
    .unwrap();
    let s = sharded(shard(&slice, &cluster(), &source(), &Nothing).unwrap());
    let e = &s.endpoints[0];
    assert_eq!(e.port_for(&svc.ports[0]), Some(8080));
    assert_eq!(e.port_for(&svc.ports[1]), None);
}

#[test]
fn deleted_and_finished_pods_are_no_workloads_as_istiod_leaves_them_out() {
    let pod = |metadata: serde_json::Value, phase: &str| -> PodInfo {
        let mut meta = serde_json::json!({"name": "web-1", "namespace": "default"});
        if let (Some(m), Some(extra)) = (meta.as_object_mut(), metadata.as_object()) {
            m.extend(extra.clone());
        }
        pod_info(
            &serde_json::from_value::<Pod>(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"containers": []},
                "status": {"phase": phase, "podIP": "10.2.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        )
    };
    let workload = |p: &PodInfo| super::workload("default", "web-1", p, &cluster(), &Nothing);
    assert!(workload(&pod(serde_json::json!({}), "Running")).is_some());
    let deleting = pod(
        serde_json::json!({"deletionTimestamp": "2026-12-03T10:00:00Z", "finalizers": ["x"]}),
        "Running",
    );
    assert!(
        workload(&deleting).is_none(),
        "a deleted pod stays a workload"
    );
    assert!(workload(&pod(serde_json::json!({}), "Failed")).is_none());
    assert!(workload(&pod(serde_json::json!({}), "Succeeded")).is_none());
}
