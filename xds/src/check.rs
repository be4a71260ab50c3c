//! Envoy's invariants on the resources this crate generates, checked before
//! a resource enters a snapshot.
//!
//! A resource that breaks one would be NACKed by every proxy that gets it:
//! the cluster (or its endpoints) would be missing from all of them until
//! the input is fixed. The [`Generator`](crate::Generator) therefore keeps
//! the last good version of such a resource (or none, if it never had one),
//! logs the reason once per content, and counts it. Each rule names the
//! Envoy check it mirrors (`source/common/upstream/*` and the
//! `protoc-gen-validate` rules of `envoy.config.{cluster,endpoint}.v3`), so
//! the set can be compared with Envoy's as it changes.
//!
//! This module only inspects generated protobufs; it knows nothing about
//! the registry or about proxies.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};

/// Why Envoy would reject a generated resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// Envoy's `LogicalDnsCluster`: "LOGICAL_DNS clusters must have a single
    /// locality_lb_endpoint and a single lb_endpoint".
    #[error(
        "LOGICAL_DNS cluster has {localities} localities and {endpoints} endpoints; Envoy requires exactly one of each"
    )]
    LogicalDnsEndpoints {
        /// `LocalityLbEndpoints` in the load assignment.
        localities: usize,
        /// `LbEndpoint`s over all localities.
        endpoints: usize,
    },
    /// Envoy's `OriginalDstCluster`: "ORIGINAL_DST clusters must have no
    /// load assignment configured", and its LB policy must be
    /// `CLUSTER_PROVIDED`.
    #[error("ORIGINAL_DST cluster {0}")]
    OriginalDst(&'static str),
    /// An EDS cluster must name the ClusterLoadAssignment it waits for, and
    /// this server names each after its cluster; anything else leaves the
    /// cluster warming forever.
    #[error("EDS cluster waits for assignment {service_name:?}, which this server never sends")]
    EdsServiceName {
        /// The `eds_cluster_config.service_name` generated.
        service_name: String,
    },
    /// Envoy resolves DNS clusters' endpoints by name and port: a pipe (Unix
    /// socket) or an empty name cannot be resolved ("unexpected address
    /// type" in Envoy's DNS cluster factory).
    #[error("DNS cluster endpoint {0:?} is not a host name or IP with a port")]
    DnsEndpoint(String),
    /// EDS and static endpoints are connected to as given: the address must
    /// be an IP literal (Envoy: "malformed IP address").
    #[error("endpoint address {0:?} is not an IP address")]
    NotAnIp(String),
    /// An endpoint without an address, or a pipe without a path (PGV
    /// `address: required`, `path: min_len 1`).
    #[error("endpoint has no address")]
    MissingAddress,
    /// `LbEndpoint.load_balancing_weight` must be at least 1 (PGV
    /// `gte: 1`).
    #[error("endpoint weight 0 (Envoy requires at least 1)")]
    ZeroWeight,
    /// Envoy's `PipeInstance`: 'Path "…" exceeds maximum UNIX domain socket
    /// path size of 108' (`sizeof(sockaddr_un.sun_path)` on Linux, room for
    /// the terminating NUL included). Istio's `ValidateUnixAddress` has no
    /// such limit, so istiod sends these and every Envoy NACKs them.
    #[error("Unix socket path of {0} bytes; Envoy's limit is 107")]
    PipePathTooLong(usize),
    /// The cluster or assignment has no name (PGV `min_len: 1`).
    #[error("resource has an empty name")]
    EmptyName,
}

/// Checks a generated `Cluster`.
///
/// # Errors
///
/// The first [`Invalid`] rule the cluster breaks.
pub(crate) fn cluster(c: &Cluster) -> Result<(), Invalid> {
    use cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    if c.name.is_empty() {
        return Err(Invalid::EmptyName);
    }
    let kind = match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(t).ok(),
        _ => None,
    };
    match kind {
        Some(DiscoveryType::Eds) => {
            let service_name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.as_str())
                .unwrap_or_default();
            if service_name != c.name {
                return Err(Invalid::EdsServiceName {
                    service_name: service_name.to_string(),
                });
            }
        }
        Some(DiscoveryType::OriginalDst) => {
            if c.load_assignment.is_some() {
                return Err(Invalid::OriginalDst("has a load assignment"));
            }
            if c.lb_policy != LbPolicy::ClusterProvided as i32 {
                return Err(Invalid::OriginalDst("LB policy is not CLUSTER_PROVIDED"));
            }
        }
        Some(kind @ (DiscoveryType::StrictDns | DiscoveryType::LogicalDns)) => {
            let la = c.load_assignment.as_ref();
            let localities = la.map_or(0, |la| la.endpoints.len());
            let endpoints = la.map_or(0, |la| {
                la.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
            });
            if kind == DiscoveryType::LogicalDns && (localities != 1 || endpoints != 1) {
                return Err(Invalid::LogicalDnsEndpoints {
                    localities,
                    endpoints,
                });
            }
            if let Some(la) = la {
                endpoints_of(la, Resolve::Dns)?;
            }
        }
        Some(DiscoveryType::Static) => {
            if let Some(la) = &c.load_assignment {
                endpoints_of(la, Resolve::Ip)?;
            }
        }
        None => {}
    }
    Ok(())
}

/// Checks a generated `ClusterLoadAssignment` (sent over EDS).
///
/// # Errors
///
/// The first [`Invalid`] rule the assignment breaks.
pub(crate) fn assignment(cla: &ClusterLoadAssignment) -> Result<(), Invalid> {
    if cla.cluster_name.is_empty() {
        return Err(Invalid::EmptyName);
    }
    endpoints_of(cla, Resolve::Ip)
}

/// How a cluster's endpoints are reached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resolve {
    /// As given: IP literals or pipes.
    Ip,
    /// Resolved by name: host names or IPs, never pipes.
    Dns,
}

fn endpoints_of(la: &ClusterLoadAssignment, resolve: Resolve) -> Result<(), Invalid> {
    for locality in &la.endpoints {
        for ep in &locality.lb_endpoints {
            if ep
                .load_balancing_weight
                .as_ref()
                .is_some_and(|w| w.value == 0)
            {
                return Err(Invalid::ZeroWeight);
            }
            let addr = match &ep.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => {
                    e.address.as_ref().and_then(|a| a.address.as_ref())
                }
                _ => None,
            };
            match (addr, resolve) {
                (None, _) => return Err(Invalid::MissingAddress),
                (Some(address::Address::Pipe(p)), Resolve::Ip) if p.path.is_empty() => {
                    return Err(Invalid::MissingAddress);
                }
                (Some(address::Address::Pipe(p)), Resolve::Ip) if p.path.len() >= SUN_PATH => {
                    return Err(Invalid::PipePathTooLong(p.path.len()));
                }
                (Some(address::Address::Pipe(_)), Resolve::Ip) => {}
                (Some(address::Address::SocketAddress(s)), resolve) => {
                    let has_port = matches!(
                        s.port_specifier,
                        Some(socket_address::PortSpecifier::PortValue(_))
                    );
                    match resolve {
                        Resolve::Ip if !looks_like_ip(&s.address) => {
                            return Err(Invalid::NotAnIp(s.address.clone()));
                        }
                        Resolve::Dns if s.address.is_empty() || !has_port => {
                            return Err(Invalid::DnsEndpoint(s.address.clone()));
                        }
                        _ => {}
                    }
                }
                (Some(other), _) => return Err(Invalid::DnsEndpoint(format!("{other:?}"))),
            }
        }
    }
    Ok(())
}

/// Whether `address` is written in an IP literal's alphabet (digits, hex
/// letters, `.` and `:`). Not a full parse, on purpose: the EDS generator
/// writes every address from an `IpAddr`, and parsing each one again cost
/// about a fifth of generating a 1,000-endpoint assignment (measured with
/// `cargo bench -p meshreg-xds -- generate/1000`); this catches what a
/// generator bug would let through, a host name, at a fraction of that.
fn looks_like_ip(address: &str) -> bool {
    !address.is_empty()
        && address
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':')
        && address.bytes().any(|b| b.is_ascii_digit())
}

/// `sizeof(sockaddr_un.sun_path)` on Linux.
const SUN_PATH: usize = 108;

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Address, Pipe, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints};
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn socket(host: &str, port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: host.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn pipe(path: &str) -> Address {
        Address {
            address: Some(address::Address::Pipe(Pipe {
                path: path.into(),
                mode: 0,
            })),
        }
    }

    fn ep(addr: Address, weight: Option<u32>) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(addr),
                ..Default::default()
            })),
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            ..Default::default()
        }
    }

    fn cla(localities: Vec<Vec<LbEndpoint>>) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: localities
                .into_iter()
                .map(|lb_endpoints| LocalityLbEndpoints {
                    lb_endpoints,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn typed(kind: cluster::DiscoveryType, la: Option<ClusterLoadAssignment>) -> Cluster {
        Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
            load_assignment: la,
            ..Default::default()
        }
    }

    #[test]
    fn logical_dns_needs_exactly_one_endpoint() {
        use cluster::DiscoveryType::LogicalDns;
        let one = cla(vec![vec![ep(socket("lb1.partner.test", 8080), None)]]);
        assert_eq!(cluster(&typed(LogicalDns, Some(one))), Ok(()));
        // The input of issue 8: two WorkloadEntries behind DNS_ROUND_ROBIN.
        let two = cla(vec![vec![
            ep(socket("lb1.partner.test", 8080), None),
            ep(socket("lb2.partner.test", 8080), None),
        ]]);
        assert_eq!(
            cluster(&typed(LogicalDns, Some(two))),
            Err(Invalid::LogicalDnsEndpoints {
                localities: 1,
                endpoints: 2
            })
        );
        assert!(cluster(&typed(LogicalDns, None)).is_err());
    }

    #[test]
    fn dns_endpoints_are_names_with_ports_never_pipes() {
        use cluster::DiscoveryType::StrictDns;
        let ok = cla(vec![vec![
            ep(socket("a.example.com", 80), None),
            ep(socket("10.0.0.1", 80), Some(3)),
        ]]);
        assert_eq!(cluster(&typed(StrictDns, Some(ok))), Ok(()));
        let unix = cla(vec![vec![ep(pipe("/var/run/a.sock"), None)]]);
        assert!(matches!(
            cluster(&typed(StrictDns, Some(unix))),
            Err(Invalid::DnsEndpoint(_))
        ));
    }

    #[test]
    fn original_dst_has_no_endpoints_and_cluster_provided_lb() {
        use cluster::{DiscoveryType::OriginalDst, LbPolicy};
        let mut c = typed(OriginalDst, None);
        assert!(cluster(&c).is_err(), "default LB policy is ROUND_ROBIN");
        c.lb_policy = LbPolicy::ClusterProvided as i32;
        assert_eq!(cluster(&c), Ok(()));
        c.load_assignment = Some(cla(vec![vec![ep(socket("10.0.0.1", 80), None)]]));
        assert!(cluster(&c).is_err());
    }

    #[test]
    fn eds_cluster_names_its_own_assignment() {
        let mut c = typed(cluster::DiscoveryType::Eds, None);
        assert!(cluster(&c).is_err());
        c.eds_cluster_config = Some(cluster::EdsClusterConfig {
            service_name: "c".into(),
            ..Default::default()
        });
        assert_eq!(cluster(&c), Ok(()));
    }

    #[test]
    fn assignments_need_ips_positive_weights_and_short_pipe_paths() {
        let ok = cla(vec![vec![
            ep(socket("10.0.0.1", 80), Some(1)),
            ep(socket("fd00::1", 80), None),
            ep(pipe("/var/run/a.sock"), None),
            ep(pipe(&format!("/{}", "x".repeat(106))), None),
        ]]);
        assert_eq!(assignment(&ok), Ok(()));
        let name = cla(vec![vec![ep(socket("a.example.com", 80), None)]]);
        assert!(matches!(assignment(&name), Err(Invalid::NotAnIp(_))));
        let zero = cla(vec![vec![ep(socket("10.0.0.1", 80), Some(0))]]);
        assert_eq!(assignment(&zero), Err(Invalid::ZeroWeight));
        // Envoy 1.40 NACKs this (seen in tests/e2e/nacks.rs).
        let long = cla(vec![vec![ep(pipe(&format!("/{}", "x".repeat(107))), None)]]);
        assert_eq!(assignment(&long), Err(Invalid::PipePathTooLong(108)));
        // Weights whose sum passes 2^32-1 are accepted by Envoy 1.40.
        let big = cla(vec![vec![
            ep(socket("10.0.0.1", 80), Some(u32::MAX)),
            ep(socket("10.0.0.2", 80), Some(u32::MAX)),
        ]]);
        assert_eq!(assignment(&big), Ok(()));
    }
}
