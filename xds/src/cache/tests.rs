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
    assert_eq!(s.invalid, [0, 1]);
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
    assert_eq!(s.invalid, [0, 0]);
    // Fixed: served, and no longer withheld.
    w.apply(upsert(contribution("a.test", &["10.0.0.9"])));
    let s = g.apply(w.view());
    assert_eq!((s.invalid, s.assignments_changed), ([0, 0], 1));
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
    assert_eq!(s.invalid, [1, 0]);
    assert_eq!(g.snapshot().len(TypeUrl::Cluster), 0);
    // A new static host whose endpoints are invalid gets an empty
    // assignment, so its cluster does not wait for one.
    let mut heavy = contribution("heavy.test", &["10.0.0.1", "10.0.0.2"]);
    heavy.endpoints[1].address = long_pipe();
    w.apply(upsert(heavy));
    let s = g.apply(w.view());
    assert_eq!(s.invalid, [0, 1]);
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
            c.endpoints[0].locality = meshreg_registry::Locality::parse(&format!("r{}/z", 2 - i));
            updates.push(Update::contribution(src.clone(), c));
        }
    }
    let versions = |order: Vec<usize>| {
        let (mut w, _r) = new([]);
        for i in order {
            w.apply(updates[i].clone());
        }
        let mut g = Generator::new();
        g.apply(w.view());
        let snap = g.snapshot().clone();
        TypeUrl::ALL
            .iter()
            .flat_map(|t| {
                snap.resources(*t)
                    .map(|r| (r.name.to_string(), r.version.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let forward: Vec<usize> = (0..updates.len()).collect();
    let mut other = forward.clone();
    other.reverse();
    other.swap(1, 7);
    let a = versions(forward);
    assert_eq!(a.len(), 8);
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
