//! Answers to objects, and what outcomes do to a name's records.

use std::net::IpAddr;

use super::*;
use crate::dns::ResolverConfig;
use meshreg_registry::{Protocol, SourceKind};

fn cx() -> Context {
    Context {
        namespace: "default".into(),
        location: Location::MeshExternal,
        source: SourceId::new(SourceKind::Dns, "dns"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn target(priority: u16, weight: u16, port: u16, name: &str, ips: &[&str]) -> Target {
    Target {
        priority,
        weight,
        port,
        name: name.into(),
        ips: ips.iter().map(|s| ip(s)).collect(),
    }
}

fn srv() -> Lookup {
    Lookup::Srv {
        name: "_http._tcp.api.example.internal".into(),
        hostname: None,
        protocol: "HTTP".into(),
    }
}

#[test]
fn srv_names_lose_their_service_and_protocol_labels() {
    assert_eq!(
        srv_hostname("_http._tcp.api.example.internal."),
        "api.example.internal"
    );
    assert_eq!(srv_hostname("api.example.internal"), "api.example.internal");
}

#[test]
fn srv_targets_become_endpoints_with_ranked_priorities_and_weights() {
    let records = Records::Srv(vec![
        target(10, 60, 8080, "a.example.internal", &["10.0.0.1", "fd00::1"]),
        target(10, 0, 8080, "b.example.internal", &["10.0.0.2"]),
        target(30, 5, 9090, "c.example.internal", &["10.0.0.3"]),
        target(40, 7, 8080, "d.example.internal", &["10.0.0.4"]),
    ]);
    let objects = objects(&srv(), Some(&records), &cx());
    let Object::Service { service, origin } = &objects[0] else {
        panic!("{objects:?}")
    };
    assert_eq!(origin, "_http._tcp.api.example.internal");
    assert_eq!(service.hostname.as_str(), "api.example.internal");
    assert_eq!(service.resolution, Resolution::Static);
    assert_eq!(service.location, Location::MeshExternal);
    let ports: Vec<_> = service
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.number, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            ("http", 8080, Protocol::Http),
            ("http-9090", 9090, Protocol::Http)
        ]
    );
    let Object::Endpoints(shard) = &objects[1] else {
        panic!("{objects:?}")
    };
    assert_eq!(shard.name, "_http._tcp.api.example.internal");
    let eps: Vec<_> = shard
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.priority, e.weight, e.ports.clone()))
        .collect();
    let port = |n: &str, p: u16| BTreeMap::from([(n.to_string(), p)]);
    assert_eq!(
        eps,
        [
            ("10.0.0.1".into(), 0, 60, port("http", 8080)),
            ("fd00::1".into(), 0, 60, port("http", 8080)),
            // SRV weight 0 is Envoy's minimum, 1.
            ("10.0.0.2".into(), 0, 1, port("http", 8080)),
            // Priority 30 is the first rank of its port (its own cluster).
            ("10.0.0.3".into(), 0, 5, port("http-9090", 9090)),
            // Priority 40 is the second rank of port 8080.
            ("10.0.0.4".into(), 1, 7, port("http", 8080)),
        ]
    );
    assert!(shard.endpoints.iter().all(|e| e.listed_ports_only));
}

#[test]
fn host_addresses_serve_every_port_and_no_answer_leaves_the_declaration() {
    let lookup = Lookup::Host {
        name: "db.example.internal".into(),
        ports: vec![Port {
            name: "tcp".into(),
            number: 5432,
            protocol: Protocol::Tcp,
            target_port: None,
        }],
    };
    let records = Records::Ips(vec![ip("10.1.0.1"), ip("10.1.0.2")]);
    let with = objects(&lookup, Some(&records), &cx());
    assert_eq!(with.len(), 2);
    let Object::Endpoints(shard) = &with[1] else {
        panic!()
    };
    assert_eq!(shard.endpoints.len(), 2);
    assert!(!shard.endpoints[0].listed_ports_only);
    let without = objects(&lookup, None, &cx());
    let Object::Endpoints(empty) = &without[1] else {
        panic!()
    };
    assert!(empty.endpoints.is_empty());
    // An SRV name never answered has no ports yet: only the empty shard.
    assert_eq!(objects(&srv(), None, &cx()).len(), 1);
}

#[test]
fn failures_keep_the_last_answer_and_a_missing_name_is_dropped_after_stale_for() {
    let config = ResolverConfig {
        nameservers: Vec::new(),
        ttl_floor: Duration::from_secs(1),
        ttl_ceiling: Duration::from_secs(60),
        stale_for: Duration::from_secs(30),
    };
    let t0 = Instant::now();
    let answer = |ips: &[&str], ttl: u64| {
        Outcome::Answer(
            Records::Ips(ips.iter().map(|s| ip(s)).collect()),
            Duration::from_secs(ttl),
        )
    };
    let mut s = NameState::default();
    // TTLs are clamped to the floor and the ceiling.
    assert_eq!(
        s.apply(answer(&["10.0.0.1"], 0), t0, &config),
        (true, Duration::from_secs(1))
    );
    assert_eq!(
        s.apply(answer(&["10.0.0.1"], 3600), t0, &config),
        (false, Duration::from_secs(60))
    );
    // A failure keeps everything, for any time.
    let later = t0 + Duration::from_secs(3600);
    assert_eq!(
        s.apply(Outcome::Failed("timeout".into()), later, &config),
        (false, Duration::from_secs(1))
    );
    assert!(s.failing && s.records.is_some());
    // Not found: kept within stale_for of the last answer …
    let t1 = t0 + Duration::from_secs(10);
    s.apply(answer(&["10.0.0.2"], 5), t1, &config);
    assert!(!s.failing);
    assert!(
        !s.apply(Outcome::NotFound, t1 + Duration::from_secs(29), &config)
            .0
    );
    assert!(s.records.is_some());
    // … and dropped after it.
    assert!(
        s.apply(Outcome::NotFound, t1 + Duration::from_secs(30), &config)
            .0
    );
    assert!(s.records.is_none());
    assert!(
        !s.apply(Outcome::NotFound, t1 + Duration::from_secs(40), &config)
            .0
    );
}
