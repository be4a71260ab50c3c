use super::*;
use crate::model::{Address, Resolution};
use crate::object::EndpointShard;
use crate::source::SourceKind;
use crate::test_util::{contribution, delete, endpoint, reset, service, test_source, upsert};
use crate::update::Contribution;

fn change(w: &mut Writer, u: Update) -> Arc<Change> {
    let applied = w.apply(u);
    assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    applied.change.expect("a change")
}

fn workload(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Object {
    Object::Workload(Workload {
        namespace: ns.into(),
        name: name.into(),
        address: Some(Address::Ip(ip.parse().unwrap())),
        ports: BTreeMap::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        locality: Default::default(),
        cluster_id: String::new(),
        network: String::new(),
        health: Default::default(),
        weight: 0,
        service_account: String::new(),
        tls_mode: Default::default(),
    })
}

/// A declaration of `host` in `ns` by object `origin`, selecting `app`.
fn selecting(ns: &str, host: &str, origin: &str, app: &str) -> Object {
    let mut s = service(host, &[(80, crate::Protocol::Http)]);
    s.namespace = ns.into();
    s.workload_selector = Some(BTreeMap::from([("app".to_string(), app.to_string())]));
    Object::Service {
        origin: origin.into(),
        service: s,
    }
}

fn ips(w: &Writer, host: &str) -> Vec<String> {
    w.view()
        .service(host)
        .map(|m| m.endpoints.iter().map(|e| e.address.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn endpoint_only_change_is_eds_only() {
    let (mut w, _r) = new([]);
    let c1 = change(&mut w, upsert(contribution("a.test", &["10.0.0.1"])));
    assert_eq!(c1.services.get("a.test"), Some(&ChangeKind::Service));
    assert_eq!(c1.source, Some(test_source()));
    assert_eq!(c1.keys.len(), 2, "the declaration and the shard");
    let c2 = change(
        &mut w,
        upsert(contribution("a.test", &["10.0.0.1", "10.0.0.2"])),
    );
    assert_eq!(c2.services.get("a.test"), Some(&ChangeKind::Endpoints));
    assert_eq!(c2.keys.len(), 1, "only the shard changed");
    assert_eq!(c2.version, 2);
    assert_eq!(w.view().endpoint_count(), 2);
}

/// The view's change log keeps the hostnames a reader catching up folds,
/// not the keys of each update (a first sync's are megabytes): those are
/// the caller's, in `Applied::change`.
#[test]
fn the_change_log_keeps_hostnames_not_keys() {
    let (mut w, _r) = new([]);
    let c = change(&mut w, upsert(contribution("a.test", &["10.0.0.1"])));
    assert_eq!(c.keys.len(), 2);
    let view = w.view();
    let logged = view.log.back().expect("logged");
    assert!(logged.keys.is_empty(), "{:?}", logged.keys);
    assert_eq!(logged.services, c.services);
    assert_eq!((logged.version, logged.at), (c.version, c.at));
    assert_eq!(logged.source, c.source);
    let folded = view.changes_since(0).expect("in the log");
    assert_eq!(folded.services.get("a.test"), Some(&ChangeKind::Service));
}

/// A shard's endpoints with equal localities, networks, cluster ids and
/// service accounts (each built on its own, as a source does) hold one copy
/// of each once stored, neighbours or not; different ones keep their own.
#[test]
fn a_shards_equal_strings_are_stored_once() {
    let (mut w, _r) = new([]);
    let mut c = contribution("a.test", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    for (i, e) in c.endpoints.iter_mut().enumerate() {
        let zone = if i == 2 { "z2" } else { "z1" };
        e.locality = Arc::new(crate::Locality::parse(&format!("r/{zone}")));
        // The middle one (by address) on another network: the first and
        // the last still share theirs.
        e.network = Arc::from(if i == 1 { "net-b" } else { "net-a" });
        e.cluster_id = Arc::from("c1");
        e.service_account = Arc::from("sa");
    }
    change(&mut w, upsert(c));
    let view = w.view();
    let eps = &view.service("a.test").expect("served").endpoints;
    let [a, b, c] = &eps[..] else {
        panic!("{eps:?}")
    };
    assert_eq!(
        (a.locality.zone.as_str(), c.locality.zone.as_str()),
        ("z1", "z2")
    );
    assert!(Arc::ptr_eq(&a.locality, &b.locality));
    assert!(!Arc::ptr_eq(&b.locality, &c.locality));
    assert!(Arc::ptr_eq(&a.network, &c.network));
    assert_eq!(&*b.network, "net-b");
    for e in [b, c] {
        assert!(Arc::ptr_eq(&a.cluster_id, &e.cluster_id));
        assert!(Arc::ptr_eq(&a.service_account, &e.service_account));
    }
    assert!(
        std::mem::size_of::<crate::Endpoint>() <= 184,
        "{}",
        std::mem::size_of::<crate::Endpoint>()
    );
}

#[test]
fn identical_update_changes_nothing() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    assert!(
        w.apply(upsert(contribution("a.test", &["10.0.0.1"])))
            .change
            .is_none()
    );
    assert_eq!(w.view().version(), 1);
}

#[test]
fn shape_change_is_service_change() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    let mut c = contribution("a.test", &["10.0.0.1"]);
    c.service.ports[0].number = 8080;
    let ch = change(&mut w, upsert(c));
    assert_eq!(ch.services.get("a.test"), Some(&ChangeKind::Service));
}

#[test]
fn reset_diffs_per_object_and_removes_what_is_gone() {
    let src = test_source();
    let (mut w, r) = new([src.clone()]);
    assert!(!r.view().is_ready());
    w.apply(reset(vec![
        contribution("a.test", &["10.0.0.1"]),
        contribution("b.test", &["10.0.0.2"]),
    ]));
    assert!(r.view().is_ready());
    let ch = change(&mut w, reset(vec![contribution("b.test", &["10.0.0.3"])]));
    assert_eq!(ch.services.get("a.test"), Some(&ChangeKind::Removed));
    assert_eq!(ch.services.get("b.test"), Some(&ChangeKind::Endpoints));
    // Only what changed is named: a's two objects, b's shard.
    assert_eq!(ch.keys.len(), 3, "{:?}", ch.keys);
    let v = r.view();
    assert!(v.service("a.test").is_none());
    assert_eq!(v.service_count(), 1);
    // The same reset again changes nothing and publishes nothing.
    assert!(
        w.apply(reset(vec![contribution("b.test", &["10.0.0.3"])]))
            .change
            .is_none()
    );
}

#[test]
fn a_reset_with_an_invalid_object_applies_the_rest_and_syncs() {
    let src = test_source();
    let (mut w, r) = new([src.clone()]);
    let mut bad = contribution("bad.test", &["10.0.0.9"]);
    bad.service.ports.push(bad.service.ports[0].clone());
    let applied = w.apply(reset(vec![contribution("a.test", &["10.0.0.1"]), bad]));
    assert_eq!(applied.rejected.len(), 1);
    let Error::Invalid { key, reason, .. } = &applied.rejected[0];
    assert!(reason.contains("port 80 declared twice"), "{reason}");
    assert!(matches!(key, ObjectKey::Service { hostname, .. } if hostname.as_str() == "bad.test"));
    let v = r.view();
    assert!(v.is_ready(), "the source synced");
    assert!(v.service("a.test").is_some());
    // The shard of the refused declaration is held but is no service.
    assert!(v.service("bad.test").is_none());
}

#[test]
fn same_host_from_two_clusters_is_one_service_with_union_of_endpoints() {
    let c1 = SourceId::new(SourceKind::Kubernetes, "cluster-1");
    let c2 = SourceId::new(SourceKind::Kubernetes, "cluster-2");
    let (mut w, _r) = new([]);
    for (src, ip) in [(&c1, "10.0.0.1"), (&c2, "10.1.0.1")] {
        let mut c = contribution("reviews.default.svc.cluster.local", &[]);
        c.endpoints.push(endpoint(ip, src));
        w.apply(Update::contribution(src.clone(), c));
    }
    let v = w.view().clone();
    let m = v.service("reviews.default.svc.cluster.local").unwrap();
    assert_eq!(m.endpoints.len(), 2);
    assert_eq!(m.contributors, vec![c1.clone(), c2.clone()]);
    assert_eq!(m.endpoints[1].source, c2, "the writer stamps provenance");
    // Withdrawing one cluster's objects keeps the other's.
    let ch = change(
        &mut w,
        Update::withdraw(c1, "default", "reviews.default.svc.cluster.local".into()),
    );
    assert_eq!(
        ch.services.get("reviews.default.svc.cluster.local"),
        Some(&ChangeKind::Endpoints)
    );
    assert_eq!(w.view().endpoint_count(), 1);
}

#[test]
fn a_shard_adds_endpoints_to_a_host_another_source_declares() {
    let dns = SourceId::new(SourceKind::Dns, "resolver");
    let (mut w, _r) = new([]);
    // Endpoints alone are no service.
    w.apply(Update::apply(
        dns.clone(),
        Object::Endpoints(EndpointShard {
            hostname: "api.example.com".into(),
            name: "answer".into(),
            endpoints: vec![endpoint("192.0.2.7", &dns)],
        }),
    ));
    assert!(w.view().service("api.example.com").is_none());
    w.apply(upsert(contribution("api.example.com", &["192.0.2.1"])));
    assert_eq!(ips(&w, "api.example.com"), vec!["192.0.2.1", "192.0.2.7"]);
    let m = w.view().service("api.example.com").unwrap().clone();
    assert_eq!(m.contributors, vec![test_source(), dns.clone()]);
    assert!(m.conflicts.is_empty(), "a shard takes no part in conflicts");
}

#[test]
fn workloads_join_declarations_of_their_namespace_by_selector() {
    let (mut w, _r) = new([]);
    let files = SourceId::new(SourceKind::ServiceEntry, "files");
    let vms = SourceId::new(SourceKind::Vm, "etcd");
    // A declaration in one "file", workloads from another source.
    w.apply(Update::apply(
        files.clone(),
        selecting("ns1", "vm.test", "se", "vm"),
    ));
    w.apply(Update::Patch {
        source: vms.clone(),
        apply: vec![
            workload("ns1", "a", "10.0.0.1", &[("app", "vm")]),
            workload("ns1", "b", "10.0.0.2", &[("app", "other")]),
            workload("ns2", "c", "10.0.0.3", &[("app", "vm")]),
        ],
        delete: vec![],
    });
    assert_eq!(
        ips(&w, "vm.test"),
        vec!["10.0.0.1"],
        "same namespace, matching labels"
    );
    let m = w.view().service("vm.test").unwrap().clone();
    assert_eq!(m.endpoints[0].workload_name, "a");
    assert_eq!(m.endpoints[0].source, vms);
    // Labels change: b joins, a leaves.
    let ch = change(
        &mut w,
        Update::Patch {
            source: vms.clone(),
            apply: vec![
                workload("ns1", "a", "10.0.0.1", &[("app", "gone")]),
                workload("ns1", "b", "10.0.0.2", &[("app", "vm")]),
            ],
            delete: vec![],
        },
    );
    assert_eq!(ch.services.get("vm.test"), Some(&ChangeKind::Endpoints));
    assert_eq!(ips(&w, "vm.test"), vec!["10.0.0.2"]);
    // The workload goes: so does its endpoint.
    w.apply(Update::delete(
        vms,
        ObjectKey::Workload {
            namespace: "ns1".into(),
            name: "b".into(),
        },
    ));
    assert!(ips(&w, "vm.test").is_empty());
    // The declaration goes: the host goes.
    let ch = change(
        &mut w,
        Update::delete(
            files,
            ObjectKey::Service {
                namespace: "ns1".into(),
                hostname: "vm.test".into(),
                origin: "se".into(),
            },
        ),
    );
    assert_eq!(ch.services.get("vm.test"), Some(&ChangeKind::Removed));
}

#[test]
fn a_named_workload_joins_only_dns_services() {
    let (mut w, _r) = new([]);
    let src = test_source();
    let mut named = workload("ns1", "n", "10.0.0.1", &[("app", "x")]);
    if let Object::Workload(wl) = &mut named {
        wl.address = Some(Address::Dns("vm.example.com".into()));
    }
    w.apply(Update::Patch {
        source: src.clone(),
        apply: vec![selecting("ns1", "static.test", "s", "x"), named],
        delete: vec![],
    });
    assert!(ips(&w, "static.test").is_empty());
    let Object::Service { mut service, .. } = selecting("ns1", "dns.test", "d", "x") else {
        unreachable!()
    };
    service.resolution = Resolution::Dns;
    w.apply(Update::apply(
        src,
        Object::Service {
            origin: "d".into(),
            service,
        },
    ));
    assert_eq!(ips(&w, "dns.test"), vec!["vm.example.com"]);
}

#[test]
fn one_host_declared_in_two_namespaces_keeps_both_declarations() {
    let (mut w, _r) = new([]);
    let src = test_source();
    let mut a = service("shared.test", &[(80, crate::Protocol::Http)]);
    a.namespace = "b-ns".into();
    a.export_to = vec![".".into()];
    let mut b = a.clone();
    b.namespace = "a-ns".into();
    b.export_to = vec!["*".into()];
    b.ports[0].protocol = crate::Protocol::Tcp;
    w.apply(Update::Patch {
        source: src,
        apply: vec![
            Object::Service {
                origin: "x".into(),
                service: a,
            },
            Object::Service {
                origin: "y".into(),
                service: b,
            },
        ],
        delete: vec![],
    });
    let m = w.view().service("shared.test").unwrap().clone();
    let namespaces: Vec<&str> = m.declared.iter().map(|d| d.namespace.as_str()).collect();
    assert_eq!(namespaces, vec!["a-ns", "b-ns"], "namespace order decides");
    assert_eq!(m.declared[1].export_to, vec![".".to_string()]);
    assert_eq!(m.service.namespace, "a-ns");
    assert_eq!(m.service.ports[0].protocol, crate::Protocol::Tcp);
    assert_eq!(m.conflicts.len(), 1);
    assert_eq!(m.conflicts[0].kind, crate::ConflictKind::Port(80));
    assert_eq!(w.view().conflict_count(), 1);
}

#[test]
fn the_same_objects_in_any_order_give_the_same_view() {
    let sources = [
        SourceId::new(SourceKind::Kubernetes, "c1"),
        SourceId::new(SourceKind::ServiceEntry, "files"),
        SourceId::new(SourceKind::Vm, "etcd"),
    ];
    let mut updates: Vec<Update> = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let mut c = contribution("h.test", &[]);
        c.service.ports[0].protocol = [crate::Protocol::Http, crate::Protocol::Tcp][i % 2];
        c.endpoints = (0..3)
            .map(|k| endpoint(&format!("10.{i}.0.{}", 3 - k), src))
            .collect();
        updates.push(Update::contribution(src.clone(), c));
        updates.push(Update::apply(
            src.clone(),
            selecting("default", "h2.test", &format!("o{i}"), "x"),
        ));
        updates.push(Update::apply(
            src.clone(),
            workload(
                "default",
                &format!("w{i}"),
                &format!("10.9.0.{}", 9 - i),
                &[("app", "x")],
            ),
        ));
    }
    let view = |order: &[usize]| {
        let (mut w, _r) = new([]);
        for &i in order {
            w.apply(updates[i].clone());
        }
        w.view()
            .services()
            .map(|(h, m)| (h.clone(), (**m).clone()))
            .collect::<Vec<_>>()
    };
    let forward: Vec<usize> = (0..updates.len()).collect();
    let backward: Vec<usize> = forward.iter().rev().copied().collect();
    let a = view(&forward);
    assert_eq!(a, view(&backward));
    let mut shuffled = forward.clone();
    shuffled.rotate_left(4);
    shuffled.swap(0, 5);
    assert_eq!(a, view(&shuffled));
    let h = &a.iter().find(|(h, _)| h.as_str() == "h.test").unwrap().1;
    assert_eq!(h.endpoints.len(), 9);
    assert!(h.endpoints.windows(2).all(|p| p[0].address <= p[1].address));
}

#[test]
fn forget_drops_a_source_and_its_status() {
    let c1 = SourceId::new(SourceKind::Kubernetes, "c1");
    let (mut w, r) = new([c1.clone()]);
    w.apply(Update::Reset {
        source: c1.clone(),
        objects: contribution("a.test", &["10.0.0.1"])
            .into_objects()
            .to_vec(),
    });
    w.apply(upsert(contribution("a.test", &["10.0.0.2"])));
    assert_eq!(ips(&w, "a.test").len(), 2);
    let ch = change(&mut w, Update::Forget { source: c1.clone() });
    assert_eq!(ch.services.get("a.test"), Some(&ChangeKind::Endpoints));
    assert_eq!(ips(&w, "a.test"), vec!["10.0.0.2"]);
    assert!(r.view().sources().all(|(s, _)| *s != c1));
}

#[test]
fn stale_keeps_serving_and_a_source_that_never_synced_is_not_ready() {
    let src = test_source();
    let other = SourceId::new(SourceKind::Consul, "dc1");
    let (mut w, r) = new([src.clone(), other.clone()]);
    w.apply(reset(vec![contribution("a.test", &["10.0.0.1"])]));
    // `other` cannot reach its platform at start: not ready, with the reason.
    w.apply(Update::Stale {
        source: other.clone(),
        error: "connection refused".into(),
    });
    let v = r.view();
    assert!(!v.is_ready());
    let (_, st) = v.sources().find(|(s, _)| **s == other).unwrap();
    assert_eq!(st.state, SourceState::Syncing);
    assert_eq!(st.last_error.as_deref(), Some("connection refused"));
    // `src` loses its platform after syncing: still served, reported stale.
    w.apply(Update::Stale {
        source: src.clone(),
        error: "directory vanished".into(),
    });
    let v = r.view();
    let (_, st) = v.sources().find(|(s, _)| **s == src).unwrap();
    assert!(matches!(st.state, SourceState::Stale { .. }));
    assert_eq!(st.objects, 2);
    assert!(v.service("a.test").is_some());
    // A reset recovers it.
    w.apply(reset(vec![contribution("a.test", &["10.0.0.1"])]));
    let (_, st) = r
        .view()
        .sources()
        .find(|(s, _)| **s == src)
        .map(|(s, st)| (s.clone(), st.clone()))
        .unwrap();
    assert_eq!(st.state, SourceState::Synced);
}

#[test]
fn dns_round_robin_uses_the_first_declarations_endpoints() {
    let (mut w, _r) = new([]);
    let src = test_source();
    let decl = |origin: &str| {
        let mut s = service("rr.test", &[(80, crate::Protocol::Http)]);
        s.resolution = Resolution::DnsRoundRobin;
        Object::Service {
            origin: origin.into(),
            service: s,
        }
    };
    let shard = |name: &str, ip: &str| {
        Object::Endpoints(EndpointShard {
            hostname: "rr.test".into(),
            name: name.into(),
            endpoints: vec![endpoint(ip, &src)],
        })
    };
    w.apply(Update::Patch {
        source: src.clone(),
        apply: vec![
            decl("b"),
            shard("b", "10.0.0.1"),
            decl("a"),
            shard("a", "10.0.0.9"),
        ],
        delete: vec![],
    });
    assert_eq!(
        ips(&w, "rr.test"),
        vec!["10.0.0.9"],
        "declaration a is first"
    );
}

#[test]
fn changes_since_folds_the_log_and_says_when_it_is_too_short() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    w.apply(upsert(contribution("b.test", &["10.0.0.1"])));
    w.apply(upsert(contribution("a.test", &["10.0.0.2"])));
    let v = w.view().clone();
    let since1 = v.changes_since(1).unwrap();
    assert_eq!(since1.services.len(), 2);
    assert_eq!(since1.services.get("a.test"), Some(&ChangeKind::Endpoints));
    assert_eq!(since1.source, Some(test_source()));
    let since0 = v.changes_since(0).unwrap();
    assert_eq!(since0.services.get("a.test"), Some(&ChangeKind::Service));
    assert!(v.changes_since(3).unwrap().services.is_empty());
    for i in 0..(CHANGE_LOG_LEN + 5) {
        w.apply(upsert(contribution(
            "c.test",
            &[&format!("10.0.{}.{}", i / 250, i % 250 + 1)],
        )));
    }
    assert!(w.view().changes_since(1).is_none());
    w.apply(delete("c.test"));
    assert!(w.view().service("c.test").is_none());
}

#[tokio::test]
async fn readers_wait_until_ready() {
    let src = test_source();
    let (mut w, mut r) = new([src.clone()]);
    let waiter = tokio::spawn(async move { r.wait_until_ready().await.map(|v| v.service_count()) });
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])));
    w.apply(reset(vec![contribution("a.test", &["10.0.0.1"])]));
    assert_eq!(waiter.await.unwrap(), Some(1));
}

#[test]
fn contributions_round_trip() {
    let c = contribution("a.test", &["10.0.0.1"]);
    let [decl, shard] = c.clone().into_objects();
    assert!(matches!(decl, Object::Service { .. }));
    assert!(matches!(shard, Object::Endpoints(ref s) if s.endpoints == c.endpoints));
    let _: Contribution = c;
}

fn rule(ns: &str, name: &str, host: &str, subsets: &[&str]) -> Object {
    Object::DestinationRule(Box::new(crate::policy::DestinationRule {
        name: name.into(),
        namespace: ns.into(),
        host: host.into(),
        traffic_policy: None,
        subsets: subsets
            .iter()
            .map(|s| crate::policy::Subset {
                name: s.to_string(),
                labels: BTreeMap::from([("version".to_string(), s.to_string())]),
                traffic_policy: None,
            })
            .collect(),
        export_to: Vec::new(),
        workload_selector: None,
    }))
}

fn subsets(w: &Writer, host: &str) -> Vec<String> {
    w.view()
        .service(host)
        .and_then(|m| m.destination_rule.clone())
        .map(|r| r.subsets.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn destination_rules_join_their_host_and_a_rule_change_is_a_service_change() {
    let (mut w, _r) = new([]);
    change(&mut w, upsert(contribution("a.test", &["10.0.0.1"])));
    let c = change(
        &mut w,
        Update::apply(test_source(), rule("default", "r", "a.test", &["v1"])),
    );
    assert_eq!(c.services.get("a.test"), Some(&ChangeKind::Service));
    assert_eq!(subsets(&w, "a.test"), ["v1"]);
    // Two rules of the service's namespace merge; another namespace's is
    // a conflict, and the root namespace's comes after the service's.
    change(
        &mut w,
        Update::apply(test_source(), rule("default", "s", "a.test", &["v1", "v2"])),
    );
    change(
        &mut w,
        Update::apply(test_source(), rule("istio-system", "t", "a.test", &["v9"])),
    );
    assert_eq!(subsets(&w, "a.test"), ["v1", "v2"]);
    let conflicts = &w.view().service("a.test").unwrap().conflicts;
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    // Removing the service's rules leaves the root namespace's.
    for name in ["r", "s"] {
        change(
            &mut w,
            Update::delete(
                test_source(),
                ObjectKey::DestinationRule {
                    namespace: "default".into(),
                    name: name.into(),
                    hostname: "a.test".into(),
                },
            ),
        );
    }
    assert_eq!(subsets(&w, "a.test"), ["v9"]);
}

#[test]
fn a_wildcard_rule_applies_to_matching_hosts_unless_an_exact_one_exists() {
    let (mut w, _r) = new([]);
    change(&mut w, upsert(contribution("a.example.com", &["10.0.0.1"])));
    change(&mut w, upsert(contribution("b.example.com", &["10.0.0.2"])));
    change(&mut w, upsert(contribution("c.other.org", &["10.0.0.3"])));
    let c = change(
        &mut w,
        Update::apply(test_source(), rule("default", "w", "*.example.com", &["w"])),
    );
    assert_eq!(c.services.len(), 2, "{:?}", c.services);
    change(
        &mut w,
        Update::apply(test_source(), rule("default", "e", "a.example.com", &["e"])),
    );
    assert_eq!(subsets(&w, "a.example.com"), ["e"]);
    assert_eq!(subsets(&w, "b.example.com"), ["w"]);
    assert!(subsets(&w, "c.other.org").is_empty());
}

#[test]
fn a_rule_with_a_repeated_subset_is_refused() {
    let (mut w, _r) = new([]);
    let applied = w.apply(Update::apply(
        test_source(),
        rule("default", "r", "a.test", &["v1", "v1"]),
    ));
    assert_eq!(applied.rejected.len(), 1);
}

#[test]
fn a_reset_keeping_leaves_the_named_objects_as_held() {
    let (mut w, _r) = new([]);
    change(&mut w, upsert(contribution("a.test", &["10.0.0.1"])));
    change(&mut w, upsert(contribution("b.test", &["10.0.0.2"])));
    let keep: Vec<ObjectKey> = contribution("b.test", &[])
        .into_objects()
        .iter()
        .map(Object::key)
        .collect();
    // A restart that cannot read b.test yet: a.test changes, b.test stays.
    change(
        &mut w,
        Update::ResetKeeping {
            source: test_source(),
            objects: contribution("a.test", &["10.0.0.3"])
                .into_objects()
                .to_vec(),
            keep,
        },
    );
    assert_eq!(ips(&w, "a.test"), ["10.0.0.3"]);
    assert_eq!(ips(&w, "b.test"), ["10.0.0.2"]);
    // A plain reset without it removes it.
    change(&mut w, reset(vec![contribution("a.test", &["10.0.0.3"])]));
    assert!(w.view().service("b.test").is_none());
}

fn entry(ns: &str, name: &str, host: &str, ips: &[&str], export_to: &[&str]) -> Vec<Object> {
    crate::test_util::entry_objects(ns, name, host, ips, export_to)
}

fn seen_by(w: &Writer, host: &str, client: &str) -> Option<Vec<String>> {
    let view = w.view();
    let m = view.service(host)?.for_namespace(client)?;
    Some(m.endpoints.iter().map(|e| e.address.to_string()).collect())
}

#[test]
fn a_host_declared_in_two_namespaces_is_each_namespace_s_own() {
    // The issue's report: ns-a and ns-b both declare inventory.shared.test.
    let (mut w, _r) = new([]);
    let mut objects = entry(
        "ns-a",
        "inventory",
        "inventory.shared.test",
        &["127.0.0.91"],
        &[],
    );
    objects.extend(entry(
        "ns-b",
        "inventory",
        "inventory.shared.test",
        &["127.0.0.92"],
        &[],
    ));
    change(&mut w, patch(test_source(), objects));
    let host = "inventory.shared.test";
    assert_eq!(seen_by(&w, host, "ns-b").unwrap(), ["127.0.0.92"]);
    assert_eq!(seen_by(&w, host, "ns-a").unwrap(), ["127.0.0.91"]);
    // A third namespace gets the first declaration (by precedence) only.
    assert_eq!(seen_by(&w, host, "ns-c").unwrap(), ["127.0.0.91"]);
    // Outside any namespace: the union, as before.
    assert_eq!(ips(&w, host), ["127.0.0.91", "127.0.0.92"]);
    // A Sidecar that imports only ns-b's services picks ns-b's declaration.
    let view = w.view();
    let m = view.service(host).unwrap();
    let seen = m.for_namespace_where("ns-c", |ns| ns == "ns-b").unwrap();
    assert_eq!(seen.service.namespace, "ns-b");
    assert!(m.for_namespace_where("ns-c", |ns| ns == "ns-z").is_none());
}

#[test]
fn another_namespace_cannot_inject_endpoints_into_a_service() {
    // A Kubernetes-like declaration with a separate slice, and a
    // ServiceEntry of another namespace declaring the same host.
    let (mut w, _r) = new([]);
    let host = "details.default.svc.cluster.local";
    let k8s = SourceId::new(SourceKind::Kubernetes, "k8s");
    let mut decl = service(host, &[(80, crate::Protocol::Http)]);
    decl.namespace = "default".into();
    change(
        &mut w,
        patch(
            k8s.clone(),
            vec![
                Object::Service {
                    origin: "details".into(),
                    service: decl,
                },
                Object::Endpoints(EndpointShard {
                    hostname: host.into(),
                    name: "details-abcde".into(),
                    endpoints: vec![endpoint("10.0.0.1", &k8s)],
                }),
            ],
        ),
    );
    change(
        &mut w,
        patch(
            test_source(),
            entry("attacker", "details", host, &["10.6.6.6"], &[]),
        ),
    );
    assert_eq!(seen_by(&w, host, "default").unwrap(), ["10.0.0.1"]);
    assert_eq!(
        seen_by(&w, host, "bookinfo").unwrap(),
        ["10.0.0.1"],
        "Kubernetes first"
    );
    assert_eq!(seen_by(&w, host, "attacker").unwrap(), ["10.6.6.6"]);
}

#[test]
fn export_to_hides_declarations_from_other_namespaces() {
    let (mut w, _r) = new([]);
    let mut objects = entry("team-x", "a", "a.example.com", &["10.0.0.1"], &["."]);
    objects.extend(entry(
        "team-x",
        "b",
        "b.example.com",
        &["10.0.0.2"],
        &["team-y"],
    ));
    objects.extend(entry("team-x", "c", "c.example.com", &["10.0.0.3"], &["~"]));
    change(&mut w, patch(test_source(), objects));
    for host in ["a.example.com", "b.example.com", "c.example.com"] {
        assert_eq!(seen_by(&w, host, "default"), None, "{host}");
    }
    assert!(seen_by(&w, "a.example.com", "team-x").is_some());
    assert!(seen_by(&w, "b.example.com", "team-y").is_some());
    assert_eq!(seen_by(&w, "b.example.com", "team-x"), None, "not listed");
    assert_eq!(seen_by(&w, "c.example.com", "team-x"), None);
}

#[test]
fn a_client_s_own_namespace_rule_comes_first() {
    let (mut w, _r) = new([]);
    change(&mut w, upsert(contribution("a.test", &["10.0.0.1"])));
    let mut objects = vec![
        rule("default", "svc", "a.test", &["v1"]),
        rule("istio-system", "root", "a.test", &["v9"]),
        rule("client", "mine", "a.test", &["v2"]),
    ];
    // A rule that hides itself from other namespaces.
    if let Object::DestinationRule(r) = &mut objects[0] {
        r.export_to = vec![".".into()];
    }
    change(&mut w, patch(test_source(), objects));
    let view = w.view();
    let m = view.service("a.test").unwrap();
    let names = |client: &str| m.rule_for(client, "default").map(|r| r.name.clone());
    assert_eq!(names("client").as_deref(), Some("mine"));
    assert_eq!(names("default").as_deref(), Some("svc"));
    assert_eq!(
        names("other").as_deref(),
        Some("root"),
        "svc is not exported"
    );
    // Outside any namespace: the service's namespace's.
    assert_eq!(m.destination_rule.as_ref().unwrap().name, "svc");
}

#[test]
fn sidecars_are_picked_by_selector_then_namespace_then_root() {
    let sidecar = |ns: &str, name: &str, app: Option<&str>| {
        Object::Sidecar(Box::new(crate::policy::Sidecar {
            name: name.into(),
            namespace: ns.into(),
            workload_selector: app.map(|a| BTreeMap::from([("app".to_string(), a.to_string())])),
            egress_hosts: None,
        }))
    };
    let (mut w, _r) = new([]);
    let c = change(
        &mut w,
        patch(
            test_source(),
            vec![
                sidecar("a", "default", None),
                sidecar("a", "ratings", Some("ratings")),
                sidecar("istio-system", "default", None),
                sidecar("istio-system", "selective", Some("x")),
            ],
        ),
    );
    assert!(c.proxy_selectors && c.services.is_empty());
    let view = w.view();
    let pick = |ns: &str, app: &str| {
        let labels = BTreeMap::from([("app".to_string(), app.to_string())]);
        view.sidecar_for(ns, &labels)
            .map(|s| format!("{}/{}", s.namespace, s.name))
    };
    assert_eq!(pick("a", "ratings").as_deref(), Some("a/ratings"));
    assert_eq!(pick("a", "reviews").as_deref(), Some("a/default"));
    assert_eq!(pick("b", "x").as_deref(), Some("istio-system/default"));
    let c = change(
        &mut w,
        Update::delete(
            test_source(),
            ObjectKey::Sidecar {
                namespace: "istio-system".into(),
                name: "default".into(),
            },
        ),
    );
    assert!(c.proxy_selectors);
    assert_eq!(w.view().sidecar_for("b", &BTreeMap::new()), None);
}

fn patch(source: SourceId, apply: Vec<Object>) -> Update {
    Update::Patch {
        source,
        apply,
        delete: Vec::new(),
    }
}

#[test]
fn a_rule_with_a_workload_selector_is_kept_apart_and_selects_by_label() {
    let (mut w, _r) = new([]);
    change(&mut w, upsert(contribution("a.test", &["10.0.0.1"])));
    let mut selective = rule("default", "for-ratings", "a.test", &["v2"]);
    if let Object::DestinationRule(r) = &mut selective {
        r.workload_selector = Some(BTreeMap::from([("app".to_string(), "ratings".to_string())]));
    }
    let c = change(
        &mut w,
        patch(
            test_source(),
            vec![rule("default", "all", "a.test", &["v1"]), selective],
        ),
    );
    assert!(c.proxy_selectors);
    let view = w.view();
    let m = view.service("a.test").unwrap();
    // Not merged into the namespace's rule, and not what an unselected
    // client gets.
    assert_eq!(subsets(&w, "a.test"), ["v1"]);
    assert_eq!(m.selector_rules.len(), 1);
    assert_eq!(m.selector_rules[0].name, "for-ratings");
    let labels = |app: &str| BTreeMap::from([("app".to_string(), app.to_string())]);
    assert_eq!(
        view.rules_selecting("default", &labels("ratings")),
        [("default".to_string(), "for-ratings".to_string())]
    );
    assert!(
        view.rules_selecting("default", &labels("reviews"))
            .is_empty()
    );
    assert!(
        view.rules_selecting("other", &labels("ratings")).is_empty(),
        "not across namespaces"
    );
    // Removing it is a selector change too.
    let c = change(
        &mut w,
        Update::delete(
            test_source(),
            ObjectKey::DestinationRule {
                namespace: "default".into(),
                name: "for-ratings".into(),
                hostname: "a.test".into(),
            },
        ),
    );
    assert!(c.proxy_selectors);
    assert!(
        w.view()
            .rules_selecting("default", &labels("ratings"))
            .is_empty()
    );
}

fn group(ns: &str, name: &str, sa: &str) -> Object {
    Object::WorkloadGroup(Box::new(crate::group::WorkloadGroup {
        name: name.into(),
        namespace: ns.into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        template: crate::group::GroupTemplate {
            service_account: sa.into(),
            ..Default::default()
        },
        probe: None,
    }))
}

#[test]
fn workload_groups_are_stored_listed_replaced_and_removed_without_touching_hosts() {
    let (mut w, _r) = new([]);
    let c = change(
        &mut w,
        Update::apply(test_source(), group("vm", "reviews", "sa-1")),
    );
    assert!(c.services.is_empty(), "a group touches no host");
    let sa = |w: &Writer| {
        w.view()
            .workload_group("vm", "reviews")
            .map(|g| g.template.service_account.clone())
    };
    assert_eq!(sa(&w).as_deref(), Some("sa-1"));
    // The same group again: nothing.
    assert!(
        w.apply(Update::apply(test_source(), group("vm", "reviews", "sa-1")))
            .change
            .is_none()
    );
    // Changed: a new view although no host changed.
    let version = w.view().version();
    change(
        &mut w,
        Update::apply(test_source(), group("vm", "reviews", "sa-2")),
    );
    assert_eq!(w.view().version(), version + 1);
    assert_eq!(sa(&w).as_deref(), Some("sa-2"));
    assert_eq!(w.view().workload_groups().count(), 1);
    assert!(w.view().workload_group("other", "reviews").is_none());
    change(
        &mut w,
        Update::Patch {
            source: test_source(),
            apply: Vec::new(),
            delete: vec![ObjectKey::WorkloadGroup {
                namespace: "vm".into(),
                name: "reviews".into(),
            }],
        },
    );
    assert_eq!(w.view().workload_groups().count(), 0);
    // Unnamed: refused.
    let applied = w.apply(Update::apply(test_source(), group("vm", "", "sa")));
    assert_eq!(applied.rejected.len(), 1);
}
