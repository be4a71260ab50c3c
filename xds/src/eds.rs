//! EDS: one `ClusterLoadAssignment` per EDS cluster, endpoints grouped by
//! priority and locality, with health and weights from the registry.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    self as core, HealthStatus, Pipe, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as LbHost, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value};
use meshreg_registry::{
    Address, Endpoint, Health, Locality, MergedService, Port, Resolution, Subset, TlsMode,
};

/// The load assignment of an EDS cluster: every endpoint with an IP or Unix
/// socket address. Endpoints with a DNS name cannot be sent over EDS and are
/// left out (the service should use DNS resolution).
pub(crate) fn load_assignment(
    cluster_name: &str,
    svc: &MergedService,
    port: &Port,
    subset: Option<&Subset>,
) -> ClusterLoadAssignment {
    load_assignment_ranked(cluster_name, svc, port, subset, &|ep: &Endpoint| {
        ep.priority
    })
}

/// [`load_assignment`] with each endpoint's priority given by `rank` (a
/// DestinationRule's `failoverPriority` for one proxy: see
/// `locality::failover_ranks`) instead of its own.
pub(crate) fn load_assignment_ranked(
    cluster_name: &str,
    svc: &MergedService,
    port: &Port,
    subset: Option<&Subset>,
    rank: &dyn Fn(&Endpoint) -> u32,
) -> ClusterLoadAssignment {
    let endpoints = svc
        .endpoints
        .iter()
        .filter(|ep| in_subset(ep, subset))
        .filter(|ep| !matches!(ep.address, Address::Dns(_)))
        .filter_map(|ep| Some((ep, ep.port_for(port)?)));
    assignment(cluster_name, endpoints, false, rank)
}

/// An assignment with no endpoints, served for a cluster whose generated
/// assignment is withheld and that has no earlier one.
pub(crate) fn empty_assignment(cluster_name: &str) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        ..Default::default()
    }
}

/// The inline load assignment of a STRICT_DNS or LOGICAL_DNS cluster: the
/// endpoints' addresses (names or IPs); `None` when no endpoint can be
/// resolved by name (Unix sockets cannot), as Istio's cluster builder
/// returns no cluster then ("cluster without endpoints"). A ServiceEntry
/// without endpoints or selector contributes its host name as the endpoint
/// (the adapter does that, as Istio's `convertServiceEntryToInstances`).
///
/// A LOGICAL_DNS cluster (DNS_ROUND_ROBIN) gets only the first endpoint:
/// Envoy accepts exactly one, and Istio keeps the first instance per service
/// port (`mergeServiceInstances` in pilot's serviceentry controller).
/// Istio's "first" is the oldest ServiceEntry's, then by workload UID; the
/// registry has no creation times, so here it is the first in the
/// registry's canonical endpoint order, the same whatever the arrival order.
pub(crate) fn dns_load_assignment(
    cluster_name: &str,
    svc: &MergedService,
    port: &Port,
    subset: Option<&Subset>,
) -> Option<ClusterLoadAssignment> {
    let keep = match svc.service.resolution {
        Resolution::DnsRoundRobin => 1,
        _ => usize::MAX,
    };
    let mut endpoints = svc
        .endpoints
        .iter()
        .filter(|ep| !matches!(ep.address, Address::Unix(_)))
        .filter(|ep| in_subset(ep, subset))
        .take(keep)
        .filter_map(|ep| Some((ep, ep.port_for(port)?)))
        .peekable();
    endpoints.peek()?;
    Some(assignment(
        cluster_name,
        endpoints,
        true,
        &|ep: &Endpoint| ep.priority,
    ))
}

/// Whether `ep` belongs to `subset`: its labels include the subset's
/// (every endpoint without a subset).
pub(crate) fn in_subset(ep: &Endpoint, subset: Option<&Subset>) -> bool {
    subset.is_none_or(|s| {
        s.labels
            .iter()
            .all(|(k, v)| ep.labels.get(k).is_some_and(|l| l == v))
    })
}

fn assignment<'a>(
    cluster_name: &str,
    endpoints: impl Iterator<Item = (&'a Endpoint, u16)>,
    dns: bool,
    priority: &dyn Fn(&Endpoint) -> u32,
) -> ClusterLoadAssignment {
    // BTreeMap: deterministic locality order, so equal content encodes to
    // equal bytes (and versions).
    let mut by_locality: BTreeMap<(u32, &Locality), (Vec<LbEndpoint>, u32)> = BTreeMap::new();
    for (ep, port) in endpoints {
        let addr = match &ep.address {
            Address::Ip(ip) => socket(&ip_string(*ip), port),
            Address::Dns(name) => socket(name, port),
            Address::Unix(path) => core::Address {
                address: Some(address::Address::Pipe(Pipe {
                    path: path.clone(),
                    mode: 0,
                })),
            },
        };
        // istiod leaves a DNS cluster's healthy endpoints without a status
        // (UNKNOWN, which Envoy treats as healthy): seen with a real istiod
        // in the differential test.
        let health = match ep.health {
            Health::Healthy if dns => Health::Unknown,
            health => health,
        };
        let entry = by_locality.entry((priority(ep), &ep.locality)).or_default();
        entry
            .0
            .push(lb_endpoint(addr, health, ep.weight, ep.tls_mode));
        entry.1 = entry.1.saturating_add(ep.weight.max(1));
    }
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(
                |((priority, loc), (lb_endpoints, weight))| LocalityLbEndpoints {
                    // Always present, empty for the default locality, as istiod
                    // sends it: Envoy drops the weight of a locality-less group
                    // (seen in its config dump in the differential test).
                    locality: Some(core::Locality {
                        region: loc.region.clone(),
                        zone: loc.zone.clone(),
                        sub_zone: loc.subzone.clone(),
                    }),
                    lb_endpoints,
                    load_balancing_weight: Some(UInt32Value { value: weight }),
                    priority,
                    ..Default::default()
                },
            )
            .collect(),
        ..Default::default()
    }
}

/// `ip` as text. IPv4 is written by hand: `Display` goes through the
/// formatting machinery and was the largest cost of building a large
/// load assignment.
fn ip_string(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
            out
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

fn socket(address: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

/// One endpoint. One that accepts Istio mTLS carries istiod's
/// `envoy.transport_socket_match: {tlsMode: istio}` metadata, which a
/// cluster's `tlsMode-istio` transport socket match selects.
fn lb_endpoint(address: core::Address, health: Health, weight: u32, tls: TlsMode) -> LbEndpoint {
    let health_status = match health {
        Health::Healthy => HealthStatus::Healthy,
        Health::Unhealthy => HealthStatus::Unhealthy,
        Health::Draining => HealthStatus::Draining,
        Health::Unknown => HealthStatus::Unknown,
    };
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(LbHost {
            address: Some(address),
            ..Default::default()
        })),
        health_status: health_status as i32,
        load_balancing_weight: (weight > 0).then_some(UInt32Value { value: weight }),
        metadata: (tls == TlsMode::Istio).then(istio_tls_metadata),
    }
}

fn istio_tls_metadata() -> core::Metadata {
    let mode = Struct {
        fields: [(
            "tlsMode".to_string(),
            Value {
                kind: Some(value::Kind::StringValue("istio".into())),
            },
        )]
        .into(),
    };
    core::Metadata {
        filter_metadata: [("envoy.transport_socket_match".to_string(), mode)].into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshreg_registry::test_util::{contribution, merged};

    #[test]
    fn groups_by_locality_with_weights_and_port_remap() {
        let mut c = contribution("a.test", &["10.0.0.1", "10.0.0.2", "::1"]);
        c.endpoints[0].locality = Locality::parse("us-east/zone-a").into();
        c.endpoints[0].weight = 3;
        c.endpoints[1].locality = Locality::parse("us-east/zone-a").into();
        c.endpoints[2].ports.insert("p80".into(), 8080);
        c.endpoints[2].health = Health::Unhealthy;
        let svc = merged(c);
        let cla = load_assignment("outbound|80||a.test", &svc, &svc.service.ports[0], None);
        assert_eq!(cla.cluster_name, "outbound|80||a.test");
        assert_eq!(cla.endpoints.len(), 2);
        // The default (empty) locality sorts first, present and empty.
        let default = &cla.endpoints[0];
        assert_eq!(default.locality, Some(core::Locality::default()));
        let text = format!("{default:?}");
        assert!(text.contains("\"::1\"") && text.contains("8080"), "{text}");
        assert_eq!(
            default.lb_endpoints[0].health_status,
            HealthStatus::Unhealthy as i32
        );
        let zone_a = &cla.endpoints[1];
        assert_eq!(zone_a.locality.as_ref().unwrap().zone, "zone-a");
        assert_eq!(zone_a.lb_endpoints.len(), 2);
        assert_eq!(zone_a.load_balancing_weight, Some(UInt32Value { value: 4 }));
        assert_eq!(
            zone_a.lb_endpoints[0].load_balancing_weight,
            Some(UInt32Value { value: 3 })
        );
    }

    #[test]
    fn ipv4_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.100",
            "255.255.255.255",
            "1.20.199.9",
        ] {
            let addr: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_string(addr), ip);
        }
        let v6: std::net::IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip_string(v6), "fd00::1");
    }

    #[test]
    fn unix_sockets_become_pipes() {
        let mut c = contribution("a.test", &["10.0.0.1"]);
        c.endpoints[0].address = Address::Unix("/var/run/a.sock".into());
        let svc = merged(c);
        let cla = load_assignment("x", &svc, &svc.service.ports[0], None);
        assert!(format!("{cla:?}").contains("/var/run/a.sock"));
    }

    #[test]
    fn priorities_are_groups_of_their_own() {
        let mut c = contribution("a.test", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        c.endpoints[1].priority = 1;
        c.endpoints[2].priority = 1;
        c.endpoints[2].locality = Locality::parse("r/z").into();
        let svc = merged(c);
        let cla = load_assignment("x", &svc, &svc.service.ports[0], None);
        let groups: Vec<(u32, String, usize)> = cla
            .endpoints
            .iter()
            .map(|g| {
                (
                    g.priority,
                    g.locality.as_ref().unwrap().zone.clone(),
                    g.lb_endpoints.len(),
                )
            })
            .collect();
        assert_eq!(
            groups,
            [
                (0, String::new(), 1),
                (1, String::new(), 1),
                (1, "z".into(), 1)
            ]
        );
    }
}
