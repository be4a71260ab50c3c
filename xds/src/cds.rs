//! CDS: one Envoy `Cluster` per service port.
//!
//! Names follow Istio: `outbound|<port>|<subset>|<hostname>`. Resolution
//! decides the discovery type: Static → EDS (endpoints come as a
//! ClusterLoadAssignment of the same name), DNS → STRICT_DNS with the
//! endpoints' names inline, DNS_ROUND_ROBIN → LOGICAL_DNS (one name, as
//! Istio), None → ORIGINAL_DST. A DNS service with no endpoint gets no
//! cluster, as in Istio.
//!
//! Defaults follow istiod's cluster builder, checked field by field against
//! a real istiod in the differential test (`tests/e2e/istiod.rs`): connect
//! timeout 10 s, LEAST_REQUEST (CLUSTER_PROVIDED for ORIGINAL_DST), circuit
//! breaker thresholds at their maximum.

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use meshreg_registry::{MergedService, Port, Resolution, Subset, TrafficPolicy};

use crate::eds;
use crate::policy;

/// The connect timeout Istio uses by default.
const CONNECT_TIMEOUT_SECS: i64 = 10;

/// Istio's default mesh `dnsRefreshRate`.
const DNS_REFRESH_SECS: i64 = 60;

/// The DNS lookup family istiod gives a proxy of `family` (see
/// [`IpFamily`](crate::IpFamily)), as the `dns_lookup_family` field.
pub(crate) fn lookup_family(family: crate::IpFamily) -> i32 {
    match family {
        crate::IpFamily::V4 => cluster::DnsLookupFamily::V4Only as i32,
        crate::IpFamily::V6 => cluster::DnsLookupFamily::V6Only as i32,
    }
}

/// The cluster name for `port` of `hostname` and `subset` (empty for all
/// endpoints), e.g. `outbound|9080||reviews.default.svc.cluster.local`.
pub fn cluster_name(port: u16, subset: &str, hostname: &str) -> String {
    format!("outbound|{port}|{subset}|{hostname}")
}

/// The traffic policy of the cluster for `port` of `svc` (and `subset`):
/// `None` without a destination rule.
pub(crate) fn policy_for(
    svc: &MergedService,
    port: &Port,
    subset: Option<&Subset>,
) -> Option<TrafficPolicy> {
    let rule = svc.destination_rule.as_ref()?;
    Some(TrafficPolicy::for_port(
        rule.traffic_policy.as_ref(),
        subset.and_then(|s| s.traffic_policy.as_ref()),
        port.number,
    ))
}

/// The cluster a proxyless gRPC client gets for `name`, as istiod's gRPC
/// generator builds it (`grpcgen/cds.go`, `edsCluster`): EDS over ADS and
/// nothing else, so round robin (gRPC refuses Envoy's default
/// `LEAST_REQUEST`: "LB policy is not supported"), and no mTLS (istiod sets
/// TLS for gRPC only on an explicit `ISTIO_MUTUAL`, which meshreg leaves
/// out). `None` for a service gRPC cannot reach by EDS (DNS-resolved or
/// passthrough).
pub(crate) fn grpc_cluster(name: &str, svc: &MergedService) -> Option<Cluster> {
    use cluster::{ClusterDiscoveryType, DiscoveryType};
    if svc.service.resolution != Resolution::Static {
        return None;
    }
    Some(Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: name.to_string(),
        }),
        ..Default::default()
    })
}

/// The cluster for `port` of `svc` (of its `subset` of a destination rule,
/// if any), named `name`. Static services get EDS clusters whose load
/// assignment has the same name. `None` for a DNS service without an
/// endpoint to resolve: Istio generates no cluster then. The service's
/// destination rule, if any, applies (see `policy`).
pub(crate) fn cluster(
    name: &str,
    svc: &MergedService,
    port: &Port,
    subset: Option<&Subset>,
) -> Option<Cluster> {
    use cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let name = name.to_string();
    let mut c = Cluster {
        connect_timeout: Some(Duration {
            seconds: CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        // Istio's default load balancer (pilot's `defaultLBAlgorithm`).
        lb_policy: LbPolicy::LeastRequest as i32,
        circuit_breakers: Some(default_circuit_breakers()),
        ..Default::default()
    };
    match svc.service.resolution {
        Resolution::Static => {
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
            c.eds_cluster_config = Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                service_name: name.clone(),
            });
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let kind = if svc.service.resolution == Resolution::Dns {
                DiscoveryType::StrictDns
            } else {
                DiscoveryType::LogicalDns
            };
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(kind as i32));
            c.dns_lookup_family = cluster::DnsLookupFamily::V4Preferred as i32;
            // istiod's: the mesh's DNS refresh rate (default 60 s), and the
            // records' TTLs respected. Deprecated in favour of the
            // `envoy.clusters.dns` extension, which Envoy 1.40 still maps
            // them to; istiod sends these fields, and so does meshreg until
            // istiod moves.
            #[allow(deprecated)]
            {
                c.dns_refresh_rate = Some(Duration {
                    seconds: DNS_REFRESH_SECS,
                    nanos: 0,
                });
                c.respect_dns_ttl = true;
            }
            c.load_assignment = Some(eds::dns_load_assignment(&name, svc, port, subset)?);
        }
        Resolution::None => {
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            ));
            c.lb_policy = LbPolicy::ClusterProvided as i32;
        }
    }
    // Unhealthy endpoints are sent (Istio's default,
    // PILOT_AUTO_SEND_UNHEALTHY_ENDPOINTS), so the panic threshold is off,
    // as istiod sets it on every outbound cluster: in panic mode Envoy would
    // route to endpoints known to be unready.
    c.common_lb_config = Some(cluster::CommonLbConfig {
        healthy_panic_threshold: Some(Percent { value: 0.0 }),
        ..Default::default()
    });
    let mut http = policy::HttpOptions {
        http2: port.protocol.is_http2(),
        ..Default::default()
    };
    if let Some(traffic) = policy_for(svc, port, subset) {
        policy::apply(&mut c, &traffic, port, &mut http);
        crate::locality::apply_cluster(&mut c, &traffic);
        if let Some(tls) = &traffic.tls {
            c.name.clone_from(&name);
            crate::tls::apply(&mut c, tls, &mut http);
        }
    }
    c.typed_extension_protocol_options = http.encode();
    c.name = name;
    Some(c)
}

/// Istio's default thresholds (pilot's `getDefaultCircuitBreakerThresholds`):
/// every limit at its maximum, so Envoy's own defaults (1,024 connections,
/// pending and active requests, 3 retries) never shed traffic the mesh
/// did not ask to shed; remaining-capacity stats off, as istiod's default.
fn default_circuit_breakers() -> CircuitBreakers {
    let max = Some(UInt32Value { value: u32::MAX });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: max,
            max_pending_requests: max,
            max_requests: max,
            max_retries: max,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// EDS over the same ADS stream.
fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        // istiod's: no initial fetch timeout, so a cluster waits for its
        // assignment instead of starting empty after Envoy's 15 s default.
        initial_fetch_timeout: Some(Duration {
            seconds: 0,
            nanos: 0,
        }),
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshreg_registry::test_util::{contribution, merged, service, test_source};
    use meshreg_registry::{Address, Protocol};

    struct Generated {
        cluster: Cluster,
        uses_eds: bool,
    }

    fn clusters(svc: &MergedService) -> Vec<Generated> {
        svc.service
            .ports
            .iter()
            .filter_map(|p| {
                let name = cluster_name(p.number, "", svc.service.hostname.as_str());
                let cluster = cluster(&name, svc, p, None)?;
                let uses_eds = cluster.eds_cluster_config.is_some();
                Some(Generated { cluster, uses_eds })
            })
            .collect()
    }

    #[test]
    fn static_service_gives_eds_clusters_named_like_istio() {
        let mut c = contribution("reviews.default.svc.cluster.local", &["127.0.0.1"]);
        c.service.ports[0].number = 9080;
        let out = clusters(&merged(c));
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].cluster.name,
            "outbound|9080||reviews.default.svc.cluster.local"
        );
        assert!(out[0].uses_eds);
        let eds = out[0].cluster.eds_cluster_config.as_ref().unwrap();
        assert_eq!(eds.service_name, out[0].cluster.name);
    }

    #[test]
    fn dns_service_is_strict_dns_with_inline_endpoints() {
        let mut svc = service("httpbin.org", &[(80, Protocol::Http)]);
        svc.resolution = Resolution::Dns;
        let mut ep = meshreg_registry::test_util::endpoint("127.0.0.1", &test_source());
        ep.address = Address::Dns("us.httpbin.org".into());
        ep.ports.insert("p80".into(), 8080);
        let out = clusters(&merged(meshreg_registry::Contribution {
            service: svc,
            endpoints: vec![ep],
        }));
        assert!(!out[0].uses_eds);
        assert_eq!(
            out[0].cluster.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32
            ))
        );
        let la = out[0].cluster.load_assignment.as_ref().unwrap();
        let text = format!("{la:?}");
        assert!(
            text.contains("us.httpbin.org") && text.contains("8080"),
            "{text}"
        );
    }

    fn dns(host: &str, resolution: Resolution, addresses: &[&str]) -> MergedService {
        let mut svc = service(host, &[(443, Protocol::Tls)]);
        svc.resolution = resolution;
        let source = test_source();
        merged(meshreg_registry::Contribution {
            service: svc,
            endpoints: addresses
                .iter()
                .map(|a| {
                    let mut ep = meshreg_registry::test_util::endpoint("127.0.0.1", &source);
                    ep.address = match a.strip_prefix("unix://") {
                        Some(path) => Address::Unix(path.into()),
                        None => Address::Dns(a.to_string()),
                    };
                    ep
                })
                .collect(),
        })
    }

    #[test]
    fn dns_round_robin_is_logical_dns() {
        let out = clusters(&dns(
            "big.example.com",
            Resolution::DnsRoundRobin,
            &["big.example.com"],
        ));
        assert_eq!(
            out[0].cluster.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::LogicalDns as i32
            ))
        );
        assert!(format!("{:?}", out[0].cluster.load_assignment).contains("big.example.com"));
        // istiod's DNS settings: the mesh's refresh rate, TTLs respected.
        #[allow(deprecated)]
        let (refresh, ttl) = (
            out[0].cluster.dns_refresh_rate,
            out[0].cluster.respect_dns_ttl,
        );
        assert_eq!(refresh.map(|d| d.seconds), Some(60));
        assert!(ttl);
    }

    #[test]
    fn dns_service_without_endpoints_has_no_cluster_as_in_istio() {
        // Istio's cluster builder: "cluster without endpoints" → none.
        for resolution in [Resolution::Dns, Resolution::DnsRoundRobin] {
            assert!(clusters(&dns("api.example.com", resolution, &[])).is_empty());
            // Unix sockets cannot be resolved: the same.
            let unix = dns("api.example.com", resolution, &["unix:///var/run/a.sock"]);
            assert!(clusters(&unix).is_empty());
        }
    }

    #[test]
    fn passthrough_is_original_dst_and_grpc_gets_http2() {
        let mut svc = service("db.example.com", &[(9000, Protocol::Grpc)]);
        svc.resolution = Resolution::None;
        let out = clusters(&merged(meshreg_registry::Contribution {
            service: svc,
            endpoints: vec![],
        }));
        let c = &out[0].cluster;
        assert_eq!(c.lb_policy, cluster::LbPolicy::ClusterProvided as i32);
        assert!(
            c.typed_extension_protocol_options
                .contains_key(crate::policy::HTTP_PROTOCOL_OPTIONS)
        );
    }

    #[test]
    fn istio_defaults_least_request_and_open_circuit_breakers() {
        let out = clusters(&contribution_of_static());
        let c = &out[0].cluster;
        assert_eq!(c.lb_policy, cluster::LbPolicy::LeastRequest as i32);
        let t = &c
            .circuit_breakers
            .as_ref()
            .expect("circuit breakers")
            .thresholds;
        assert_eq!(t.len(), 1);
        let max = Some(UInt32Value { value: u32::MAX });
        assert_eq!(
            (
                t[0].max_connections,
                t[0].max_pending_requests,
                t[0].max_requests,
                t[0].max_retries
            ),
            (max, max, max, max)
        );
        assert!(!t[0].track_remaining);
        let panic = c
            .common_lb_config
            .as_ref()
            .and_then(|l| l.healthy_panic_threshold.as_ref());
        assert_eq!(panic, Some(&Percent { value: 0.0 }));
    }

    fn contribution_of_static() -> MergedService {
        merged(contribution("a.example.com", &["10.0.0.1"]))
    }

    #[test]
    fn a_destination_rules_policy_and_subsets_shape_the_clusters() {
        use meshreg_registry::{
            ConnectionPool, DestinationRule, HashRing, LoadBalancer, OutlierDetection, SimpleLb,
            Subset,
        };
        use std::time::Duration as Std;
        let mut svc = contribution_of_static();
        let policy = TrafficPolicy {
            load_balancer: Some(LoadBalancer::Simple {
                algorithm: SimpleLb::RoundRobin,
                warmup: None,
            }),
            connection_pool: Some(ConnectionPool {
                max_connections: 1,
                http1_max_pending_requests: 1,
                connect_timeout: Some(Std::from_millis(250)),
                max_requests_per_connection: 1,
                ..ConnectionPool::default()
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: Some(1),
                interval: Some(Std::from_secs(1)),
                base_ejection_time: Some(Std::from_secs(180)),
                max_ejection_percent: 100,
                ..OutlierDetection::default()
            }),
            ..TrafficPolicy::default()
        };
        svc.destination_rule = Some(std::sync::Arc::new(DestinationRule {
            name: "r".into(),
            namespace: "default".into(),
            host: "a.example.com".into(),
            traffic_policy: Some(policy),
            subsets: vec![Subset {
                name: "v1".into(),
                labels: [("version".to_string(), "v1".to_string())].into(),
                traffic_policy: Some(TrafficPolicy {
                    load_balancer: Some(LoadBalancer::ConsistentHash(HashRing::Maglev {
                        table_size: 65537,
                    })),
                    ..TrafficPolicy::default()
                }),
            }],
            export_to: Vec::new(),
            workload_selector: None,
        }));
        let port = svc.service.ports[0].clone();
        let base = cluster("outbound|80||a.example.com", &svc, &port, None).unwrap();
        use cluster::LbPolicy;
        assert_eq!(base.lb_policy, LbPolicy::RoundRobin as i32);
        assert_eq!(
            base.connect_timeout,
            Some(Duration {
                seconds: 0,
                nanos: 250_000_000
            })
        );
        let t = &base.circuit_breakers.as_ref().unwrap().thresholds[0];
        assert_eq!(t.max_connections, Some(UInt32Value { value: 1 }));
        assert_eq!(t.max_pending_requests, Some(UInt32Value { value: 1 }));
        assert_eq!(t.max_requests, Some(UInt32Value { value: u32::MAX }));
        let od = base.outlier_detection.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx, Some(UInt32Value { value: 1 }));
        assert_eq!(
            od.enforcing_consecutive_5xx,
            Some(UInt32Value { value: 100 })
        );
        assert_eq!(od.enforcing_success_rate, Some(UInt32Value { value: 0 }));
        assert_eq!(
            od.base_ejection_time,
            Some(Duration {
                seconds: 180,
                nanos: 0
            })
        );
        // maxRequestsPerConnection is an upstream HTTP option.
        assert!(
            base.typed_extension_protocol_options
                .contains_key(crate::policy::HTTP_PROTOCOL_OPTIONS)
        );
        // The subset's load balancer overrides; the rest is the rule's.
        let sub = &svc.destination_rule.as_ref().unwrap().subsets[0];
        let v1 = cluster("outbound|80|v1|a.example.com", &svc, &port, Some(sub)).unwrap();
        assert_eq!(v1.lb_policy, LbPolicy::Maglev as i32);
        assert_eq!(
            v1.eds_cluster_config.as_ref().unwrap().service_name,
            "outbound|80|v1|a.example.com"
        );
        assert!(v1.outlier_detection.is_some());
        // The subset's assignment holds only its endpoints.
        let mut labelled = svc.clone();
        let mut eps: Vec<meshreg_registry::Endpoint> = labelled.endpoints.to_vec();
        let mut v2 = eps[0].clone();
        v2.address = Address::Ip("10.0.0.2".parse().unwrap());
        v2.labels.insert("version".into(), "v2".into());
        eps[0].labels.insert("version".into(), "v1".into());
        eps.push(v2);
        labelled.endpoints = eps.into();
        let cla = eds::load_assignment("outbound|80|v1|a.example.com", &labelled, &port, Some(sub));
        let hosts: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
        assert_eq!(hosts, 1);
        let all = eds::load_assignment("outbound|80||a.example.com", &labelled, &port, None);
        assert_eq!(
            all.endpoints
                .iter()
                .map(|l| l.lb_endpoints.len())
                .sum::<usize>(),
            2
        );
    }
}
