use super::*;
use crate::source::SourceKind;
use crate::test_util::{contribution, endpoint, test_source};

fn upsert(c: Contribution) -> Update {
    Update::Upsert {
        source: test_source(),
        contribution: c,
    }
}

#[test]
fn endpoint_only_change_is_eds_only() {
    let (mut w, _r) = new([]);
    let c1 = w
        .apply(upsert(contribution("a.test", &["10.0.0.1"])))
        .unwrap()
        .unwrap();
    assert_eq!(c1.services.get("a.test"), Some(&ChangeKind::Service));
    let c2 = w
        .apply(upsert(contribution("a.test", &["10.0.0.1", "10.0.0.2"])))
        .unwrap()
        .unwrap();
    assert_eq!(c2.services.get("a.test"), Some(&ChangeKind::Endpoints));
    assert_eq!(c2.version, 2);
    assert_eq!(w.view().endpoint_count(), 2);
}

#[test]
fn identical_update_changes_nothing() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])))
        .unwrap();
    assert!(
        w.apply(upsert(contribution("a.test", &["10.0.0.1"])))
            .unwrap()
            .is_none()
    );
    assert_eq!(w.view().version(), 1);
}

#[test]
fn shape_change_is_service_change() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])))
        .unwrap();
    let mut c = contribution("a.test", &["10.0.0.1"]);
    c.service.ports[0].number = 8080;
    let ch = w.apply(upsert(c)).unwrap().unwrap();
    assert_eq!(ch.services.get("a.test"), Some(&ChangeKind::Service));
}

#[test]
fn reset_replaces_a_source_atomically_and_removes_missing_hosts() {
    let src = test_source();
    let (mut w, r) = new([src.clone()]);
    assert!(!r.view().is_ready());
    w.apply(Update::Reset {
        source: src.clone(),
        services: vec![
            contribution("a.test", &["10.0.0.1"]),
            contribution("b.test", &["10.0.0.2"]),
        ],
    })
    .unwrap();
    assert!(r.view().is_ready());
    let ch = w
        .apply(Update::Reset {
            source: src.clone(),
            services: vec![contribution("b.test", &["10.0.0.3"])],
        })
        .unwrap()
        .unwrap();
    assert_eq!(ch.services.get("a.test"), Some(&ChangeKind::Removed));
    assert_eq!(ch.services.get("b.test"), Some(&ChangeKind::Endpoints));
    let v = r.view();
    assert!(v.service("a.test").is_none());
    assert_eq!(v.service_count(), 1);
}

#[test]
fn same_host_from_two_clusters_is_one_service_with_union_of_endpoints() {
    let c1 = SourceId::new(SourceKind::Kubernetes, "cluster-1");
    let c2 = SourceId::new(SourceKind::Kubernetes, "cluster-2");
    let (mut w, _r) = new([]);
    for (src, ip) in [(&c1, "10.0.0.1"), (&c2, "10.1.0.1")] {
        let mut c = contribution("reviews.default.svc.cluster.local", &[]);
        c.endpoints.push(endpoint(ip, src));
        w.apply(Update::Upsert {
            source: src.clone(),
            contribution: c,
        })
        .unwrap();
    }
    let v = w.view().clone();
    let m = v.service("reviews.default.svc.cluster.local").unwrap();
    assert_eq!(m.endpoints.len(), 2);
    assert_eq!(m.contributors, vec![c1.clone(), c2.clone()]);
    // Deleting one cluster's contribution keeps the other's.
    let ch = w
        .apply(Update::Delete {
            source: c1,
            hostname: "reviews.default.svc.cluster.local".into(),
        })
        .unwrap()
        .unwrap();
    assert_eq!(
        ch.services.get("reviews.default.svc.cluster.local"),
        Some(&ChangeKind::Endpoints)
    );
    assert_eq!(w.view().endpoint_count(), 1);
}

#[test]
fn invalid_update_is_refused_and_changes_nothing() {
    let (mut w, _r) = new([]);
    let mut c = contribution("a.test", &["10.0.0.1"]);
    c.service.ports.push(c.service.ports[0].clone());
    assert!(matches!(w.apply(upsert(c)), Err(Error::Invalid { .. })));
    assert_eq!(w.view().version(), 0);
    assert_eq!(w.view().service_count(), 0);
}

#[test]
fn changes_since_folds_the_log_and_says_when_it_is_too_short() {
    let (mut w, _r) = new([]);
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])))
        .unwrap();
    w.apply(upsert(contribution("b.test", &["10.0.0.1"])))
        .unwrap();
    w.apply(upsert(contribution("a.test", &["10.0.0.2"])))
        .unwrap();
    let v = w.view().clone();
    let since1 = v.changes_since(1).unwrap();
    assert_eq!(since1.services.len(), 2);
    assert_eq!(since1.services.get("a.test"), Some(&ChangeKind::Endpoints));
    let since0 = v.changes_since(0).unwrap();
    assert_eq!(since0.services.get("a.test"), Some(&ChangeKind::Service));
    assert!(v.changes_since(3).unwrap().services.is_empty());
    for i in 0..(CHANGE_LOG_LEN + 5) {
        w.apply(upsert(contribution(
            "c.test",
            &[&format!("10.0.{}.{}", i / 250, i % 250 + 1)],
        )))
        .unwrap();
    }
    assert!(w.view().changes_since(1).is_none());
}

#[tokio::test]
async fn readers_wait_until_ready() {
    let src = test_source();
    let (mut w, mut r) = new([src.clone()]);
    let waiter = tokio::spawn(async move { r.wait_until_ready().await.map(|v| v.service_count()) });
    w.apply(upsert(contribution("a.test", &["10.0.0.1"])))
        .unwrap();
    w.apply(Update::Reset {
        source: src,
        services: vec![contribution("a.test", &["10.0.0.1"])],
    })
    .unwrap();
    assert_eq!(waiter.await.unwrap(), Some(1));
}
