use super::*;
use meshreg_registry::test_util::{contribution, test_source};
use meshreg_registry::{Update, new};

fn upsert(c: meshreg_registry::Contribution) -> Update {
    Update::contribution(test_source(), c)
}

const A: &str = "outbound|80||a.test";

fn long_pipe() -> meshreg_registry::Address {
    meshreg_registry::Address::Unix(format!("/tmp/{}.sock", "x".repeat(150)))
}
const B: &str = "outbound|80||b.test";

#[test]
fn generates_only_what_changed_and_remembers_names() {
    let (mut w, _r) = new([]);
    let mut g = Generator::new();
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    w.apply(upsert(contribution("b.test", &["10.0.0.2"])));
    let s = g.apply(w.view());
    assert_eq!((s.clusters_changed, s.assignments_changed), (2, 2));
    let snap1 = g.snapshot().clone();
    assert_eq!(snap1.len(TypeUrl::Cluster), 2);
    let a_cluster_version = snap1.get(TypeUrl::Cluster, A).unwrap().version.clone();

    w.apply(upsert(contribution("a.test", &["10.0.0.1", "10.0.0.3"])));
    let s = g.apply(w.view());
    assert_eq!((s.clusters_changed, s.assignments_changed), (0, 1));
    let snap2 = g.snapshot().clone();
    assert_eq!(
        snap2.get(TypeUrl::Cluster, A).unwrap().version,
        a_cluster_version
    );
    assert_ne!(
        snap2
            .get(TypeUrl::ClusterLoadAssignment, A)
            .unwrap()
            .version,
        snap1
            .get(TypeUrl::ClusterLoadAssignment, A)
            .unwrap()
            .version
    );
    assert_eq!(
        snap2.digest(TypeUrl::Cluster),
        snap1.digest(TypeUrl::Cluster)
    );
    match snap2
        .changed_since(TypeUrl::ClusterLoadAssignment, snap1.generation())
        .0
    {
        Catchup::Names(n) => assert_eq!(n.into_iter().collect::<Vec<_>>(), vec![Arc::from(A)]),
        Catchup::Everything => panic!("history should reach back one generation"),
    }
    match snap2.changed_since(TypeUrl::Cluster, snap1.generation()).0 {
        Catchup::Names(n) => assert!(n.is_empty()),
        Catchup::Everything => panic!("history should reach back one generation"),
    }
}

#[test]
fn removal_drops_resources_and_is_recorded() {
    let (mut w, _r) = new([]);
    let mut g = Generator::new();
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    w.apply(upsert(contribution("b.test", &["10.0.0.2"])));
    g.apply(w.view());
    let before = g.snapshot().clone();
    w.apply(Update::withdraw(test_source(), "default", "b.test".into()));
    g.apply(w.view());
    let after = g.snapshot().clone();
    assert!(after.get(TypeUrl::Cluster, B).is_none());
    assert!(after.get(TypeUrl::ClusterLoadAssignment, B).is_none());
    assert_ne!(
        after.digest(TypeUrl::Cluster),
        before.digest(TypeUrl::Cluster)
    );
    match after.changed_since(TypeUrl::Cluster, before.generation()).0 {
        Catchup::Names(n) => assert!(n.iter().any(|x| &**x == B)),
        Catchup::Everything => panic!(),
    }
}

#[test]
fn same_content_gives_same_versions_in_another_generator() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    let mut g1 = Generator::new();
    let mut g2 = Generator::new();
    g1.apply(w.view());
    w.apply(upsert(contribution("a.test", &["10.0.0.9"])));
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    g2.apply(w.view());
    g1.apply(w.view());
    for t in TypeUrl::ALL {
        assert_eq!(g1.snapshot().digest(t), g2.snapshot().digest(t));
    }
}

#[test]
fn not_ready_until_the_registry_is() {
    let (mut w, _r) = new([test_source()]);
    let mut g = Generator::new();
    g.apply(w.view());
    assert!(!g.snapshot().is_ready());
    w.apply(meshreg_registry::test_util::reset_of(test_source(), vec![]));
    assert!(g.apply(w.view()).published);
    assert!(g.snapshot().is_ready());
    assert!(g.snapshot().is_empty());
}

#[test]
fn a_reader_far_behind_compares_everything() {
    let (mut w, _r) = new([]);
    let mut g = Generator::new();
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    g.apply(w.view());
    for i in 0..(HISTORY_LEN + 2) {
        w.apply(upsert(contribution(
            "a.test",
            &[&format!("10.1.{}.{}", i / 200, i % 200 + 1)],
        )));
        g.apply(w.view());
    }
    assert!(matches!(
        g.snapshot()
            .changed_since(TypeUrl::ClusterLoadAssignment, 1)
            .0,
        Catchup::Everything
    ));
}

#[test]
fn a_resource_envoy_would_reject_is_withheld_and_the_last_good_one_served() {
    let (mut w, _r) = new([]);
    let mut g = Generator::new();
    w.apply(upsert(contribution("a.test", &["10.0.0.1", "10.0.0.2"])));
    g.apply(w.view());
    let good = g
        .snapshot()
        .get(TypeUrl::ClusterLoadAssignment, A)
        .unwrap()
        .clone();
    // A Unix socket path longer than Envoy accepts.
    let mut bad = contribution("a.test", &["10.0.0.1", "10.0.0.2"]);
    bad.endpoints[0].address = long_pipe();
    w.apply(upsert(bad));
    let s = g.apply(w.view());
    assert_eq!(s.invalid, [0, 1, 0, 0, 0, 0]);
    assert_eq!(s.assignments_changed, 0);
    assert_eq!(
        g.snapshot().get(TypeUrl::ClusterLoadAssignment, A),
        Some(&good),
        "the last good version stays"
    );
    assert_eq!(g.withheld(TypeUrl::ClusterLoadAssignment), 1);
    // The same content again (another host changed) is not reported again.
    w.apply(upsert(contribution("b.test", &["10.0.0.3"])));
    let s = g.apply(w.view());
    assert_eq!(s.invalid, [0; 6]);
    // Fixed: served, and no longer withheld.
    w.apply(upsert(contribution("a.test", &["10.0.0.9"])));
    let s = g.apply(w.view());
    assert_eq!((s.invalid, s.assignments_changed), ([0; 6], 1));
    assert_eq!(g.withheld(TypeUrl::ClusterLoadAssignment), 0);
}

#[test]
fn a_new_invalid_cluster_is_not_served_at_all() {
    let (mut w, _r) = new([]);
    let mut g = Generator::new();
    let mut c = contribution("dns.test", &["10.0.0.1"]);
    c.service.resolution = Resolution::Dns;
    c.endpoints[0].address = meshreg_registry::Address::Dns(String::new());
    w.apply(upsert(c));
    let s = g.apply(w.view());
    assert_eq!(s.invalid, [1, 0, 0, 0, 0, 0]);
    assert_eq!(g.snapshot().len(TypeUrl::Cluster), 0);
    // A new static host whose endpoints are invalid gets an empty
    // assignment, so its cluster does not wait for one.
    let mut heavy = contribution("heavy.test", &["10.0.0.1", "10.0.0.2"]);
    heavy.endpoints[1].address = long_pipe();
    w.apply(upsert(heavy));
    let s = g.apply(w.view());
    assert_eq!(s.invalid, [0, 1, 0, 0, 0, 0]);
    let cla = g
        .snapshot()
        .get(TypeUrl::ClusterLoadAssignment, "outbound|80||heavy.test")
        .unwrap();
    assert_eq!(
        cla.version,
        Resource::encode(
            TypeUrl::ClusterLoadAssignment,
            "outbound|80||heavy.test",
            &eds::empty_assignment("outbound|80||heavy.test")
        )
        .version
    );
    assert_eq!(g.withheld(TypeUrl::Cluster), 1);
    // Removing the host forgets it.
    w.apply(Update::withdraw(
        test_source(),
        "default",
        "dns.test".into(),
    ));
    g.apply(w.view());
    assert_eq!(g.withheld(TypeUrl::Cluster), 0);
}

#[test]
fn the_same_objects_in_another_order_give_the_same_versions() {
    // Issue 9: versions must not depend on arrival order.
    use meshreg_registry::{SourceId, SourceKind};
    let sources = [
        SourceId::new(SourceKind::Kubernetes, "c1"),
        SourceId::new(SourceKind::ServiceEntry, "files"),
        SourceId::new(SourceKind::Dns, "resolver"),
    ];
    let mut updates = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        for h in 0..4 {
            let ips: Vec<String> = (0..3).map(|k| format!("10.{h}.{i}.{}", 9 - k)).collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            let mut c = contribution(&format!("h{h}.test"), &ips);
            c.endpoints[0].locality =
                meshreg_registry::Locality::parse(&format!("r{}/z", 2 - i)).into();
            updates.push(Update::contribution(src.clone(), c));
        }
    }
    let versions = |order: Vec<usize>| {
        let (mut w, _r) = new([]);
        for i in order {
            w.apply(updates[i].clone());
        }
        let mut g = Generator::new();
        // A proxyless gRPC client's scope too (its listeners and routes).
        let sub = grpc_scope(&g, "default");
        g.apply(w.view());
        g.apply(w.view());
        let grpc = sub.snapshots.borrow().clone();
        [g.snapshot().clone(), grpc]
            .iter()
            .flat_map(|snap| {
                TypeUrl::SERVED
                    .iter()
                    .flat_map(|t| {
                        snap.resources(*t)
                            .map(|r| (r.name.to_string(), r.version.to_string()))
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let forward: Vec<usize> = (0..updates.len()).collect();
    let mut other = forward.clone();
    other.reverse();
    other.swap(1, 7);
    let a = versions(forward);
    // Per host: a cluster and its assignment; in the gRPC scope also a
    // listener and its routes.
    assert_eq!(a.len(), 8 + 16);
    assert_eq!(a, versions(other));
}

#[test]
fn a_change_that_alters_no_resource_wakes_no_stream() {
    let (mut w, _r) = new([test_source()]);
    let mut g = Generator::new();
    w.apply(meshreg_registry::test_util::reset(vec![contribution(
        "a.test",
        &["10.0.0.1"],
    )]));
    g.apply(w.view());
    let mut rx = g.subscribe();
    rx.mark_unchanged();
    // A new registry version whose resources are the same: the source is
    // reported stale (it keeps serving its last state).
    let before = w.view().version();
    w.apply(Update::Stale {
        source: test_source(),
        error: "platform unreachable".into(),
    });
    let version = w.view().version();
    assert_eq!(version, before + 1, "the registry changed");
    let s = g.apply(w.view());
    assert!(!s.published);
    assert!(!rx.has_changed().unwrap(), "nobody is woken");
    assert_eq!(g.snapshot().registry_version(), version);
}

mod scopes {
    use super::*;
    use crate::ScopeRequest;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::google::protobuf::Any;
    use meshreg_registry::{EgressHost, EgressNamespace, Object, ObjectKey, Sidecar};
    use prost::Message;

    /// A ServiceEntry-like declaration of `host` in `ns` with its own shard.
    fn entry(ns: &str, host: &str, ips: &[&str]) -> Vec<Object> {
        meshreg_registry::test_util::entry_objects(ns, host, host, ips, &[])
    }

    fn own_namespace_only(ns: &str) -> Object {
        Object::Sidecar(Box::new(Sidecar {
            name: "default".into(),
            namespace: ns.into(),
            workload_selector: None,
            egress_hosts: Some(vec![EgressHost {
                namespace: EgressNamespace::Named(ns.into()),
                host: "*".into(),
            }]),
        }))
    }

    fn patch(apply: Vec<Object>) -> Update {
        Update::Patch {
            source: test_source(),
            apply,
            delete: Vec::new(),
        }
    }

    fn clusters(s: &Snapshot) -> Vec<String> {
        s.resources(TypeUrl::Cluster)
            .map(|r| r.name.to_string())
            .collect()
    }

    fn addresses(s: &Snapshot, name: &str) -> Vec<String> {
        let r = s.get(TypeUrl::ClusterLoadAssignment, name).unwrap();
        let any = Any::decode(r.any.clone()).unwrap();
        let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
        use envoy_types::pb::envoy::config::core::v3::address::Address as A;
        use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .filter_map(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => {
                    match ep.address.as_ref()?.address.as_ref()? {
                        A::SocketAddress(s) => Some(s.address.clone()),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect()
    }

    const INVENTORY: &str = "outbound|80||inventory.shared.test";

    #[test]
    fn each_namespace_sees_its_own_and_what_its_sidecar_imports() {
        let (mut w, _r) = new([]);
        let mut objects = entry("a", "a.test", &["10.0.0.1"]);
        objects.extend(entry("b", "b.test", &["10.0.0.2"]));
        objects.extend(entry("ns-a", "inventory.shared.test", &["127.0.0.91"]));
        objects.extend(entry("ns-b", "inventory.shared.test", &["127.0.0.92"]));
        objects.push(own_namespace_only("a"));
        w.apply(patch(objects));
        let mut g = Generator::new();
        let scopes = g.scopes().clone();
        g.apply(w.view());
        let a = scopes
            .subscribe(&ScopeRequest::namespace("a"))
            .unwrap()
            .unwrap();
        let b = scopes
            .subscribe(&ScopeRequest::namespace("ns-b"))
            .unwrap()
            .unwrap();
        let c = scopes
            .subscribe(&ScopeRequest::namespace("c"))
            .unwrap()
            .unwrap();
        assert_eq!(a.key.sidecar, Some(("a".into(), "default".into())));
        assert!(!a.snapshots.borrow().is_ready(), "not generated yet");
        g.apply(w.view());
        let (sa, sb, sc) = (
            a.snapshots.borrow().clone(),
            b.snapshots.borrow().clone(),
            c.snapshots.borrow().clone(),
        );
        assert!(sa.is_ready());
        assert_eq!(clusters(&sa), ["outbound|80||a.test"]);
        assert_eq!(clusters(&sb).len(), 3);
        assert_eq!(addresses(&sb, INVENTORY), ["127.0.0.92"]);
        assert_eq!(
            addresses(&sc, INVENTORY),
            ["127.0.0.91"],
            "the first declaration"
        );
        assert_eq!(
            addresses(g.snapshot(), INVENTORY),
            ["127.0.0.91", "127.0.0.92"],
            "unscoped: the union"
        );
        // A host every scope sees alike is the unscoped snapshot's own
        // encoding, shared.
        assert!(Arc::ptr_eq(
            sb.get(TypeUrl::Cluster, B).unwrap(),
            g.snapshot().get(TypeUrl::Cluster, B).unwrap()
        ));
        assert_eq!(g.scopes().len(), 3);

        // An endpoint of b.test changes: only the scopes that see it move.
        let (ga, gb) = (sa.generation(), sb.generation());
        w.apply(patch(entry("b", "b.test", &["10.0.0.3"])));
        g.apply(w.view());
        assert_eq!(a.snapshots.borrow().generation(), ga);
        assert_eq!(b.snapshots.borrow().generation(), gb + 1);
        match b
            .snapshots
            .borrow()
            .changed_since(TypeUrl::ClusterLoadAssignment, gb)
            .0
        {
            Catchup::Names(n) => assert_eq!(n, vec![Arc::<str>::from(B)]),
            Catchup::Everything => panic!("one generation behind"),
        }

        // The Sidecar goes: streams are told to pick their scope again.
        let epoch = a.snapshots.borrow().epoch;
        w.apply(Update::delete(
            test_source(),
            ObjectKey::Sidecar {
                namespace: "a".into(),
                name: "default".into(),
            },
        ));
        g.apply(w.view());
        assert!(a.snapshots.borrow().epoch > epoch);
        let again = scopes
            .subscribe(&ScopeRequest::namespace("a"))
            .unwrap()
            .unwrap();
        assert_eq!(again.key.sidecar, None);
        g.apply(w.view());
        assert_eq!(clusters(&again.snapshots.borrow()).len(), 3);

        // Scopes nobody watches go.
        drop((a, b, c));
        g.apply(w.view());
        assert_eq!(g.scopes().len(), 1);
    }

    #[test]
    fn the_ip_family_is_istiod_s() {
        use crate::IpFamily;
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(IpFamily::of(&[]), IpFamily::V4);
        assert_eq!(IpFamily::of(&[ip("10.0.0.1")]), IpFamily::V4);
        assert_eq!(IpFamily::of(&[ip("fd00::1")]), IpFamily::V6);
        assert_eq!(
            IpFamily::of(&[ip("fd00::1"), ip("10.0.0.1")]),
            IpFamily::V4,
            "dual stack off"
        );
    }

    #[test]
    fn an_unscoped_proxy_gets_no_scope() {
        let scopes = Generator::new().scopes().clone();
        assert!(
            scopes
                .subscribe(&ScopeRequest::namespace(""))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_proxy_moving_to_another_scope_compares_everything() {
        let a = Snapshot::lineage(1);
        let b = Snapshot::lineage(2);
        assert!(matches!(
            a.changed_since(TypeUrl::Cluster, b.generation()).0,
            Catchup::Everything
        ));
        assert!(matches!(
            b.changed_since(TypeUrl::Cluster, a.generation()).0,
            Catchup::Everything
        ));
    }
}

/// Issue 10, "only what is affected": an endpoint change reaches the
/// base cluster's assignment and the assignments of the subsets whose
/// labels it has, and nothing else.
#[test]
fn an_endpoint_change_touches_only_the_subsets_it_is_in() {
    use meshreg_registry::{DestinationRule, Object, Subset};
    let (mut w, _r) = new([]);
    let labelled = |ips: &[(&str, &str)]| {
        let mut c = contribution("a.test", &[]);
        for (ip, version) in ips {
            let mut ep = meshreg_registry::test_util::endpoint(ip, &test_source());
            ep.labels.insert("version".into(), version.to_string());
            c.endpoints.push(ep);
        }
        c
    };
    w.apply(upsert(labelled(&[("10.0.0.1", "v1"), ("10.0.0.2", "v2")])));
    let subset = |name: &str| Subset {
        name: name.into(),
        labels: [("version".to_string(), name.to_string())].into(),
        traffic_policy: None,
    };
    w.apply(Update::apply(
        test_source(),
        Object::DestinationRule(Box::new(DestinationRule {
            name: "a".into(),
            namespace: "default".into(),
            host: "a.test".into(),
            traffic_policy: None,
            subsets: vec![subset("v1"), subset("v2")],
            export_to: Vec::new(),
            workload_selector: None,
        })),
    ));
    let mut g = Generator::new();
    g.apply(w.view());
    let before = g.snapshot().generation();
    // The v1 endpoint moves.
    w.apply(upsert(labelled(&[("10.0.0.3", "v1"), ("10.0.0.2", "v2")])));
    let stats = g.apply(w.view());
    assert_eq!((stats.clusters_changed, stats.assignments_changed), (0, 2));
    match g
        .snapshot()
        .changed_since(TypeUrl::ClusterLoadAssignment, before)
        .0
    {
        Catchup::Names(mut n) => {
            n.sort();
            assert_eq!(n, [Arc::<str>::from("outbound|80|v1|a.test"), Arc::from(A)]);
        }
        Catchup::Everything => panic!("one generation behind"),
    }
}

#[test]
fn a_full_scope_table_drops_the_scopes_nobody_watches() {
    use crate::{MAX_SCOPES, ScopeRequest};
    let scopes = Generator::new().scopes().clone();
    let mut held = Vec::new();
    for i in 0..MAX_SCOPES {
        let sub = scopes
            .subscribe(&ScopeRequest::namespace(&format!("ns-{i}")))
            .unwrap()
            .unwrap();
        if i == 0 {
            held.push(sub);
        }
    }
    let new = scopes.subscribe(&ScopeRequest::namespace("new"));
    assert!(matches!(new, Ok(Some(_))), "room was made");
    assert_eq!(scopes.len(), 2, "the held scope and the new one");
    drop(held);
}

#[test]
fn a_grpc_scope_gets_listeners_only_for_services_it_has_clusters_for() {
    // A DNS-resolved service has no gRPC cluster: serving its listener
    // left the client waiting out its deadline (a new user's trial).
    let (mut w, _r) = new([test_source()]);
    let mut dns = contribution("dns.test", &["10.0.0.9"]);
    dns.service.resolution = meshreg_registry::Resolution::Dns;
    w.apply(Update::contribution(
        test_source(),
        contribution("a.test", &["10.0.0.1"]),
    ));
    w.apply(Update::contribution(test_source(), dns));
    let mut g = Generator::new();
    let sub = grpc_scope(&g, "default");
    g.apply(w.view());
    let snap = sub.snapshots.borrow().clone();
    let names = |t| {
        snap.resources(t)
            .map(|r| r.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(TypeUrl::Listener), ["a.test:80"]);
    assert_eq!(names(TypeUrl::RouteConfiguration), ["outbound|80||a.test"]);
    assert_eq!(names(TypeUrl::Cluster), ["outbound|80||a.test"]);
}

/// The scope of a proxyless gRPC client of `namespace`, subscribed.
fn grpc_scope(g: &Generator, namespace: &str) -> crate::scope::Subscription {
    let grpc = crate::ScopeRequest {
        proxyless: true,
        ..crate::ScopeRequest::namespace(namespace)
    };
    g.scopes().subscribe(&grpc).unwrap().unwrap()
}

/// The route configuration the listener `name` of `snap` names.
fn route_of(snap: &Snapshot, name: &str) -> Option<String> {
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;
    let r = snap.get(TypeUrl::Listener, name)?;
    let any = Any::decode(r.any.clone()).unwrap();
    let listener = Listener::decode(any.value.as_slice()).unwrap();
    let api = listener.api_listener?.api_listener?;
    let hcm = HttpConnectionManager::decode(api.value.as_slice()).unwrap();
    match hcm.route_specifier? {
        RouteSpecifier::Rds(rds) => Some(rds.route_config_name),
        _ => None,
    }
}

#[test]
fn a_short_listener_name_that_is_another_host_goes_to_that_host_in_any_order() {
    // A new user's trial: `echo.grpc.svc.zz` took over `echo.grpc:50051`,
    // and removing a colliding entry withdrew the other's short names.
    let fqdn = "echo.default.svc.cluster.local";
    let scope_of = |order: &[&str]| {
        let (mut w, _r) = new([test_source()]);
        for host in order {
            w.apply(Update::contribution(
                test_source(),
                contribution(host, &["10.0.0.1"]),
            ));
        }
        let mut g = Generator::new();
        let sub = grpc_scope(&g, "default");
        g.apply(w.view());
        // Another domain than the cluster's gets no short names.
        w.apply(Update::contribution(
            test_source(),
            contribution("echo.default.svc.zz", &["10.0.0.2"]),
        ));
        g.apply(w.view());
        (w, g, sub)
    };
    let short = "echo.default:80";
    let exact = Some("outbound|80||echo.default".to_string());
    let (_w, _g, first) = scope_of(&[fqdn, "echo.default"]);
    let (mut w, mut g, second) = scope_of(&["echo.default", fqdn]);
    for sub in [&first, &second] {
        let snap = sub.snapshots.borrow().clone();
        assert_eq!(route_of(&snap, short), exact, "the exact host wins");
        assert_eq!(
            route_of(&snap, "echo:80"),
            Some(format!("outbound|80||{fqdn}")),
            "the other short forms stay the FQDN's"
        );
    }
    // The exact host goes: the FQDN's short form comes back.
    w.apply(Update::withdraw(
        test_source(),
        "default",
        "echo.default".into(),
    ));
    g.apply(w.view());
    let after = second.snapshots.borrow().clone();
    assert_eq!(
        route_of(&after, short),
        Some(format!("outbound|80||{fqdn}"))
    );
}
