//! The adapter's loop without I/O, and the configuration checks.

use super::*;
use meshreg_registry::{Location, Port, Protocol, SourceKind};

fn state(names: usize) -> State {
    State {
        source: SourceId::new(SourceKind::Dns, "dns"),
        metrics: Metrics::register(&prometheus::Registry::new()).unwrap(),
        sent: vec![Vec::new(); names],
        reported: HashSet::new(),
        failing: HashSet::new(),
        synced: false,
        stale: false,
        last_error: String::new(),
        answered: HashSet::new(),
        keys: (0..names)
            .map(|i| {
                vec![ObjectKey::Endpoints {
                    hostname: format!("n{i}.test").into(),
                    shard: format!("n{i}.test"),
                }]
            })
            .collect(),
    }
}

fn host(name: &str) -> Lookup {
    Lookup::Host {
        name: name.into(),
        ports: vec![Port {
            name: "http".into(),
            number: 80,
            protocol: Protocol::Http,
            target_port: None,
        }],
    }
}

fn objects(name: &str, ips: &[&str]) -> Report {
    let cx = Context {
        namespace: "default".into(),
        location: Location::MeshExternal,
        source: SourceId::new(SourceKind::Dns, "dns"),
    };
    let records = Records::Ips(ips.iter().map(|s| s.parse().unwrap()).collect());
    Report::Objects(convert::objects(&host(name), Some(&records), &cx))
}

fn kinds(updates: &[Update]) -> Vec<&'static str> {
    updates
        .iter()
        .map(|u| match u {
            Update::Reset { .. } | Update::ResetKeeping { .. } => "reset",
            Update::Patch { .. } => "patch",
            Update::Stale { .. } => "stale",
            _ => "other",
        })
        .collect()
}

#[test]
fn one_reset_once_every_name_reported_then_patches() {
    let mut s = state(2);
    assert!(s.on(0, objects("a.test", &["10.0.0.1"])).is_empty());
    assert_eq!(kinds(&s.on(1, objects("b.test", &["10.0.0.2"]))), ["reset"]);
    let updates = s.on(0, objects("a.test", &["10.0.0.3"]));
    assert_eq!(kinds(&updates), ["patch"]);
}

#[test]
fn a_failing_name_makes_the_source_stale_once_and_its_answer_clears_it() {
    let mut s = state(2);
    s.on(0, objects("a.test", &["10.0.0.1"]));
    // The second name fails from the start: the sync still happens, then
    // the source is stale.
    // What an earlier run sent for it is kept (a reload never empties it).
    let updates = s.on(1, Report::Failed("b.test: timeout".into()));
    assert_eq!(kinds(&updates), ["reset", "stale"]);
    assert!(
        matches!(&updates[0], Update::ResetKeeping { keep, .. } if keep.len() == 1),
        "{updates:?}"
    );
    assert!(s.on(0, Report::Failed("a.test: timeout".into())).is_empty());
    // One recovers: still stale (the other fails).
    assert!(s.on(0, Report::Recovered).is_empty());
    // The other answers: the state is sent again, no longer stale.
    assert_eq!(kinds(&s.on(1, objects("b.test", &["10.0.0.2"]))), ["reset"]);
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    let ok = Config {
        name: "dns".into(),
        resolver: super::super::ResolverConfig::default(),
        lookups: vec![
            host("db.example.internal"),
            Lookup::Srv {
                name: "_http._tcp.api.example.internal".into(),
                hostname: None,
                protocol: "HTTP".into(),
            },
        ],
        namespace: "default".into(),
        location: Location::MeshExternal,
    };
    assert!(validate(&ok).is_ok());
    let with = |f: &dyn Fn(&mut Config)| {
        let mut c = ok.clone();
        f(&mut c);
        validate(&c).unwrap_err().to_string()
    };
    assert!(with(&|c| c.lookups.clear()).contains("at least one service"));
    assert!(with(&|c| c.lookups.push(host("db.example.internal"))).contains("declared twice"));
    assert!(with(&|c| c.lookups.push(host("bad name"))).contains("not a DNS name"));
    assert!(
        with(&|c| c.lookups.push(Lookup::Host {
            name: "x.test".into(),
            ports: vec![]
        }))
        .contains("needs ports")
    );
    assert!(with(&|c| c.resolver.ttl_floor = Duration::ZERO).contains("ttl_floor"));
    assert!(
        with(&|c| c.resolver.ttl_ceiling = Duration::from_millis(1)).contains("below ttl_floor")
    );
}
