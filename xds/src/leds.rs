//! LEDS (Locality Endpoint Discovery Service): a large cluster's endpoints
//! as one resource each, so one endpoint change sends one `LbEndpoint`
//! instead of the whole `ClusterLoadAssignment` (issue 13; Istio resends
//! the whole assignment, its known scaling cost for large services).
//!
//! For an assignment with at least the configured number of endpoints
//! ([`split`]), each `LocalityLbEndpoints` keeps its locality, priority and
//! weight but, instead of `lb_endpoints`, names a glob collection through
//! `leds_cluster_locality_config`:
//!
//! ```text
//! xdstp://meshreg/envoy.config.endpoint.v3.LbEndpoint/<cluster>/<locality>/*
//! ```
//!
//! with `leds_config: {ads: {}}`, so Envoy subscribes to it on its delta
//! ADS stream. Each endpoint is the collection member `…/<locality>/<id>`.
//! Envoy's rules followed here (`source/extensions/clusters/eds`,
//! `source/common/config/xds_resource.cc`, `watch_map.cc`):
//! - collections are served only over delta xDS (Envoy's
//!   `ads_collection` subscription); SotW and gRPC clients keep plain EDS;
//! - a locality lists either LEDS or endpoints, never both;
//! - a member matches its collection when the id up to its last `/`
//!   equals the collection's, so ids here never contain `/`;
//! - Envoy percent-encodes `%:?#[]`, `~` and non-printable characters of
//!   ids and compares encoded names: the names here use none of them (a
//!   cluster name that would is replaced by its hash), so the name Envoy
//!   subscribes to is the one written in the assignment.
//!
//! Owns naming and splitting; the generator (`cache`) decides which
//! assignments are split and stores both forms.

use envoy_types::pb::envoy::config::core::v3::{ApiVersion, ConfigSource, address, config_source};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, LedsClusterLocalityConfig, lb_endpoint,
    locality_lb_endpoints,
};
use xxhash_rust::xxh3::xxh3_64;

/// The authority of meshreg's collections.
pub const AUTHORITY: &str = "meshreg";

/// The prefix of every LEDS resource name.
pub const PREFIX: &str = "xdstp://meshreg/envoy.config.endpoint.v3.LbEndpoint/";

/// The default size from which an assignment is served through LEDS.
pub const DEFAULT_THRESHOLD: usize = 1000;

/// Whether `c` passes through Envoy's percent-encoding of ids unchanged
/// and is not a path separator.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '|' | '=' | '+' | ',' | '@')
}

/// `s` if every character is plain, else `h` and its hash.
fn component(s: &str) -> String {
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("h{:016x}", xxh3_64(s.as_bytes()))
    }
}

/// The collection prefix (ending in `/`) of one locality of `cluster`.
fn collection_prefix(cluster: &str, priority: u32, locality: Option<&str>) -> String {
    let place = locality.map_or(0, |l| xxh3_64(l.as_bytes()));
    format!("{}p{priority}-{place:016x}/", cluster_prefix(cluster))
}

/// The prefix (ending in `/`) of every collection of `cluster`.
pub(crate) fn cluster_prefix(cluster: &str) -> String {
    format!("{PREFIX}{}/", component(cluster))
}

/// The id of an endpoint within its collection: `<address>_<port>` with
/// IPv6 colons written as `-`, or a hash for other addresses.
fn member_id(ep: &LbEndpoint) -> String {
    let socket = match &ep.host_identifier {
        Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e.address.as_ref(),
        _ => None,
    }
    .and_then(|a| match &a.address {
        Some(address::Address::SocketAddress(s)) => Some(s),
        _ => None,
    });
    match socket {
        Some(s) => {
            let port = match s.port_specifier {
                Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                        p,
                    ),
                ) => p,
                _ => 0,
            };
            component(&format!("{}_{port}", s.address.replace(':', "-")))
        }
        None => {
            use prost::Message;
            format!("h{:016x}", xxh3_64(&ep.encode_to_vec()))
        }
    }
}

/// The LEDS form of `cla`: the assignment whose localities name
/// collections, and every endpoint with its resource name, in the
/// assignment's order. Of two endpoints with the same address and port in
/// one locality only the first is kept, as Envoy keeps the first over EDS
/// (its LEDS map would keep either); ids that still collide (a hashed
/// address) are told apart by a `-<n>` suffix.
pub fn split(cla: &ClusterLoadAssignment) -> (ClusterLoadAssignment, Vec<(String, LbEndpoint)>) {
    let mut members = Vec::with_capacity(cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum());
    let mut seen = std::collections::HashSet::new();
    let endpoints = cla
        .endpoints
        .iter()
        .map(|l| {
            let locality = l
                .locality
                .as_ref()
                .map(|x| format!("{}\0{}\0{}", x.region, x.zone, x.sub_zone));
            let prefix = collection_prefix(&cla.cluster_name, l.priority, locality.as_deref());
            let mut addresses = std::collections::HashSet::new();
            for ep in &l.lb_endpoints {
                if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier
                    && let Some(a) = &e.address
                    && !addresses.insert(a.clone())
                {
                    continue;
                }
                let id = member_id(ep);
                let mut name = format!("{prefix}{id}");
                let mut n = 1;
                while !seen.insert(name.clone()) {
                    n += 1;
                    name = format!("{prefix}{id}-{n}");
                }
                members.push((name, ep.clone()));
            }
            let mut l = l.clone();
            l.lb_endpoints = Vec::new();
            l.lb_config = Some(locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(
                LedsClusterLocalityConfig {
                    leds_config: Some(ConfigSource {
                        resource_api_version: ApiVersion::V3 as i32,
                        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                            Default::default(),
                        )),
                        ..Default::default()
                    }),
                    leds_collection_name: format!("{prefix}*"),
                },
            ));
            l
        })
        .collect();
    let assignment = ClusterLoadAssignment {
        endpoints,
        ..cla.clone()
    };
    (assignment, members)
}

/// The glob collection `name` is a member of (`…/*`), if it is an
/// `xdstp://` name.
pub(crate) fn collection_of(name: &str) -> Option<String> {
    if !name.starts_with("xdstp://") {
        return None;
    }
    let slash = name.rfind('/')?;
    Some(format!("{}*", &name[..=slash]))
}

/// The prefix shared by the members of the glob collection `glob`, if it
/// is one (`xdstp://…/*`).
pub(crate) fn glob_prefix(glob: &str) -> Option<&str> {
    glob.strip_prefix("xdstp://")?;
    glob.strip_suffix('*').filter(|p| p.ends_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{self as core, SocketAddress, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LocalityLbEndpoints};

    fn ep(ip: &str, port: u32) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(core::Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn localities_name_collections_and_endpoints_are_members() {
        let cla = ClusterLoadAssignment {
            cluster_name: "outbound|80||big.test".into(),
            endpoints: vec![
                LocalityLbEndpoints {
                    locality: Some(core::Locality {
                        region: "r1".into(),
                        ..Default::default()
                    }),
                    lb_endpoints: vec![ep("10.0.0.1", 80), ep("fd00::1", 80), ep("10.0.0.1", 80)],
                    // (The second 10.0.0.1:80 is dropped, as Envoy drops it
                    // over EDS.)
                    ..Default::default()
                },
                LocalityLbEndpoints {
                    priority: 1,
                    lb_endpoints: vec![ep("10.0.0.2", 8080)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let (leds, members) = split(&cla);
        assert_eq!(leds.endpoints.len(), 2);
        let globs: Vec<String> = leds
            .endpoints
            .iter()
            .map(|l| {
                assert!(l.lb_endpoints.is_empty(), "LEDS or endpoints, never both");
                match &l.lb_config {
                    Some(locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(c)) => {
                        c.leds_collection_name.clone()
                    }
                    other => panic!("no LEDS config: {other:?}"),
                }
            })
            .collect();
        assert!(globs[0].starts_with(&format!("{PREFIX}outbound|80||big.test/p0-")));
        assert!(globs[1].starts_with(&format!("{PREFIX}outbound|80||big.test/p1-")));
        let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 3);
        assert!(names[0].ends_with("/10.0.0.1_80"));
        assert!(names[1].ends_with("/fd00--1_80"));
        assert!(names[2].ends_with("/10.0.0.2_8080"));
        for (name, _) in &members {
            let glob = collection_of(name).unwrap();
            assert!(
                globs.contains(&glob),
                "{name} is in a collection of the assignment"
            );
            assert!(name.starts_with(glob_prefix(&glob).unwrap()));
            assert!(
                !name.contains([':', '?', '#', '[', ']', '%', '~']) || name.starts_with("xdstp:"),
                "{name}"
            );
            assert!(!name["xdstp:".len()..].contains([':', '?', '#', '[', ']', '%', '~']));
        }
    }

    #[test]
    fn a_cluster_name_envoy_would_encode_is_hashed() {
        assert_eq!(component("outbound|80|v1|a.test"), "outbound|80|v1|a.test");
        assert!(component("outbound|80|a:b|a.test").starts_with('h'));
        assert!(component("a/b").starts_with('h'));
        assert_eq!(glob_prefix("http://x/*"), None);
        assert_eq!(collection_of("outbound|80||a"), None);
    }
}
