//! Builders for tests of this crate and of the crates above it.

use std::collections::BTreeMap;

use crate::merge::MergedService;
use crate::model::{Address, Endpoint, Location, Port, Protocol, Resolution, Service};
use crate::source::{SourceId, SourceKind};
use crate::update::{Contribution, Update};

/// The source used by builders when a test does not care.
pub fn test_source() -> SourceId {
    SourceId::new(SourceKind::ServiceEntry, "test")
}

/// A static, mesh-internal service with ports named `p<number>`.
pub fn service(host: &str, ports: &[(u16, Protocol)]) -> Service {
    Service {
        hostname: host.into(),
        namespace: "default".into(),
        ports: ports
            .iter()
            .map(|&(number, protocol)| Port {
                name: format!("p{number}"),
                number,
                protocol,
                target_port: None,
            })
            .collect(),
        resolution: Resolution::Static,
        location: Location::MeshInternal,
        labels: BTreeMap::new(),
        export_to: Vec::new(),
        addresses: BTreeMap::new(),
        workload_selector: None,
        source: test_source(),
    }
}

/// A healthy endpoint at `ip` (IPv4 or IPv6) from `source`.
///
/// # Panics
///
/// If `ip` is not an IP address (tests only).
pub fn endpoint(ip: &str, source: &SourceId) -> Endpoint {
    Endpoint::new(Address::Ip(ip.parse().expect("test ip")), source.clone())
}

/// A contribution for `host` with one HTTP port 80 and endpoints at `ips`.
pub fn contribution(host: &str, ips: &[&str]) -> Contribution {
    let source = test_source();
    Contribution {
        service: service(host, &[(80, Protocol::Http)]),
        endpoints: ips.iter().map(|ip| endpoint(ip, &source)).collect(),
    }
}

/// `c` as the registry would merge it when it is the only contribution
/// (endpoints in the order given).
pub fn merged(c: Contribution) -> MergedService {
    MergedService {
        contributors: vec![c.service.source.clone()],
        declared: vec![crate::merge::Declared {
            source: c.service.source.clone(),
            namespace: c.service.namespace.clone(),
            origin: String::new(),
            export_to: c.service.export_to.clone(),
        }],
        service: c.service,
        endpoints: c.endpoints.into(),
        conflicts: Vec::new(),
        destination_rule: None,
        rules: Vec::new(),
        selector_rules: Vec::new(),
        by_namespace: Vec::new(),
    }
}

/// Adds or replaces `c` from [`test_source`].
pub fn upsert(c: Contribution) -> Update {
    Update::contribution(test_source(), c)
}

/// Removes what [`upsert`] added for `host` (namespace `default`).
pub fn delete(host: &str) -> Update {
    Update::withdraw(test_source(), "default", host.into())
}

/// The complete state of [`test_source`]: `contributions`.
pub fn reset(contributions: Vec<Contribution>) -> Update {
    reset_of(test_source(), contributions)
}

/// The complete state of `source`: `contributions`.
pub fn reset_of(source: SourceId, contributions: Vec<Contribution>) -> Update {
    Update::Reset {
        source,
        objects: contributions
            .into_iter()
            .flat_map(Contribution::into_objects)
            .collect(),
    }
}

/// What the ServiceEntry source sends for an entry `ns/name` of `host`
/// with inline endpoints `ips` and `export_to`: a declaration (origin
/// `ns/name`) and its own shard, from [`test_source`].
pub fn entry_objects(
    ns: &str,
    name: &str,
    host: &str,
    ips: &[&str],
    export_to: &[&str],
) -> Vec<crate::Object> {
    let source = test_source();
    let mut s = service(host, &[(80, Protocol::Http)]);
    s.namespace = ns.into();
    s.export_to = export_to.iter().map(|e| e.to_string()).collect();
    let origin = format!("{ns}/{name}");
    vec![
        crate::Object::Service {
            origin: origin.clone(),
            service: s,
        },
        crate::Object::Endpoints(crate::EndpointShard {
            hostname: host.into(),
            name: origin,
            endpoints: ips.iter().map(|ip| endpoint(ip, &source)).collect(),
        }),
    ]
}
