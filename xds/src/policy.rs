//! A `DestinationRule`'s traffic policy applied to a generated `Cluster`,
//! as istiod's cluster builder applies it (pilot's
//! `cluster_traffic_policy.go`: `applyConnectionPool`, `applyH2Upgrade`,
//! `applyOutlierDetection`, `applyLoadBalancer`), with the subset's and
//! port's settings already merged ([`TrafficPolicy::for_port`]).
//!
//! `tls` is the `tls` module's, `localityLbSetting` the `locality`
//! module's.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlier, UpstreamConnectionOptions,
    circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CommonHttpOptions,
    TcpKeepalive, UpstreamHttpProtocolOptions,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value, UInt64Value};
use meshreg_registry::{
    ConnectionPool, H2Upgrade, HashRing, LoadBalancer, OutlierDetection, Port, SimpleLb,
    TrafficPolicy,
};
use prost::Message;

pub(crate) const HTTP_PROTOCOL_OPTIONS: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

fn pb(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// The upstream HTTP options a cluster carries, built up by the steps
/// below and encoded once at the end.
#[derive(Default)]
pub(crate) struct HttpOptions {
    pub(crate) http2: bool,
    pub(crate) use_downstream: bool,
    pub(crate) common: Option<CommonHttpOptions>,
    pub(crate) max_concurrent_streams: u32,
    /// `upstream_http_protocol_options.auto_sni` (see `tls`).
    pub(crate) auto_sni: bool,
    /// `upstream_http_protocol_options.auto_san_validation`.
    pub(crate) auto_san_validation: bool,
}

impl HttpOptions {
    /// The `typed_extension_protocol_options` map (empty when nothing is
    /// set). One entry, so the encoding is deterministic.
    pub(crate) fn encode(self) -> HashMap<String, Any> {
        use http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig,
            explicit_http_config::ProtocolConfig,
        };
        if !self.http2 && !self.use_downstream && self.common.is_none() && !self.auto_sni {
            return HashMap::new();
        }
        let http2 = Http2ProtocolOptions {
            max_concurrent_streams: (self.max_concurrent_streams > 0).then_some(UInt32Value {
                value: self.max_concurrent_streams,
            }),
            ..Default::default()
        };
        let upstream = if self.use_downstream {
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                UseDownstreamHttpConfig {
                    http2_protocol_options: Some(http2),
                    ..Default::default()
                },
            ))
        } else if self.http2 {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(http2)),
                },
            ))
        } else {
            // Envoy requires the upstream protocol: HTTP/1.1, as istiod
            // sends it for an HTTP/1.1 cluster with common options.
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::HttpProtocolOptions(
                        Http1ProtocolOptions::default(),
                    )),
                },
            ))
        };
        let options = HttpProtocolOptions {
            common_http_protocol_options: self.common,
            upstream_protocol_options: upstream,
            upstream_http_protocol_options: self.auto_sni.then_some(UpstreamHttpProtocolOptions {
                auto_sni: true,
                auto_san_validation: self.auto_san_validation,
                ..Default::default()
            }),
            ..Default::default()
        };
        HashMap::from([(
            HTTP_PROTOCOL_OPTIONS.to_string(),
            Any {
                type_url: format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}"),
                value: options.encode_to_vec(),
            },
        )])
    }
}

/// Applies `policy` to `c` (a cluster for `port`); `http` collects the
/// upstream HTTP options.
pub(crate) fn apply(c: &mut Cluster, policy: &TrafficPolicy, port: &Port, http: &mut HttpOptions) {
    if let Some(pool) = &policy.connection_pool {
        connection_pool(c, pool, http);
        match pool.h2_upgrade {
            H2Upgrade::Upgrade => http.http2 = true,
            H2Upgrade::DoNotUpgrade => http.http2 = port.protocol.is_http2(),
            H2Upgrade::Default => {}
        }
    }
    if let Some(o) = &policy.outlier_detection {
        outlier_detection(c, o);
    }
    if let Some(lb) = &policy.load_balancer {
        load_balancer(c, lb);
    }
}

/// istiod's `applyConnectionPool`: zero means unset.
fn connection_pool(c: &mut Cluster, pool: &ConnectionPool, http: &mut HttpOptions) {
    let max = u32v(u32::MAX);
    let mut t = circuit_breakers::Thresholds {
        max_connections: max,
        max_pending_requests: max,
        max_requests: max,
        max_retries: max,
        ..Default::default()
    };
    if pool.http2_max_requests > 0 {
        t.max_requests = u32v(pool.http2_max_requests);
    }
    if pool.http1_max_pending_requests > 0 {
        t.max_pending_requests = u32v(pool.http1_max_pending_requests);
    }
    if pool.max_retries > 0 {
        t.max_retries = u32v(pool.max_retries);
    }
    if pool.max_connections > 0 {
        t.max_connections = u32v(pool.max_connections);
    }
    if let Some(timeout) = pool.connect_timeout {
        c.connect_timeout = Some(pb(timeout));
    }
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![t],
        ..Default::default()
    });
    if let Some(k) = &pool.tcp_keepalive {
        c.upstream_connection_options = Some(UpstreamConnectionOptions {
            tcp_keepalive: Some(TcpKeepalive {
                keepalive_probes: (k.probes > 0).then_some(UInt32Value { value: k.probes }),
                keepalive_time: k.time.map(|d| UInt32Value {
                    value: u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
                }),
                keepalive_interval: k.interval.map(|d| UInt32Value {
                    value: u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
                }),
            }),
            ..Default::default()
        });
    }
    let idle = pool.idle_timeout.or(pool.tcp_idle_timeout);
    if idle.is_some()
        || pool.max_requests_per_connection > 0
        || pool.max_connection_duration.is_some()
    {
        http.common = Some(CommonHttpOptions {
            idle_timeout: idle.map(pb),
            max_requests_per_connection: (pool.max_requests_per_connection > 0).then_some({
                UInt32Value {
                    value: pool.max_requests_per_connection,
                }
            }),
            max_connection_duration: pool.max_connection_duration.map(pb),
            ..Default::default()
        });
    }
    http.max_concurrent_streams = pool.max_concurrent_streams;
    http.use_downstream = pool.use_client_protocol;
}

/// istiod's `applyOutlierDetection`.
fn outlier_detection(c: &mut Cluster, o: &OutlierDetection) {
    let enforce = |v: u32| u32v(if v > 0 { 100 } else { 0 });
    let mut out = EnvoyOutlier {
        enforcing_success_rate: u32v(0),
        ..Default::default()
    };
    if let Some(v) = o.consecutive_5xx_errors {
        out.consecutive_5xx = u32v(v);
        out.enforcing_consecutive_5xx = enforce(v);
    }
    if let Some(v) = o.consecutive_gateway_errors {
        out.consecutive_gateway_failure = u32v(v);
        out.enforcing_consecutive_gateway_failure = enforce(v);
    }
    out.interval = o.interval.map(pb);
    out.base_ejection_time = o.base_ejection_time.map(pb);
    if o.max_ejection_percent > 0 {
        out.max_ejection_percent = u32v(o.max_ejection_percent);
    }
    if o.split_external_local_origin_errors {
        out.split_external_local_origin_errors = true;
        if let Some(v) = o.consecutive_local_origin_failures.filter(|v| *v > 0) {
            out.consecutive_local_origin_failure = u32v(v);
            out.enforcing_consecutive_local_origin_failure = u32v(100);
        }
        out.enforcing_local_origin_success_rate = u32v(0);
    }
    c.outlier_detection = Some(out);
    // The panic threshold stays 0: unhealthy endpoints are sent
    // (PILOT_AUTO_SEND_UNHEALTHY_ENDPOINTS), whatever minHealthPercent says.
}

/// istiod's `applyLoadBalancer` (without locality settings).
fn load_balancer(c: &mut Cluster, lb: &LoadBalancer) {
    use cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy};
    if c.cluster_discovery_type
        == Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        ))
    {
        c.lb_policy = LbPolicy::ClusterProvided as i32;
        return;
    }
    match lb {
        LoadBalancer::Simple { algorithm, warmup } => {
            let slow_start = warmup.map(|w| cluster::SlowStartConfig {
                slow_start_window: Some(pb(w)),
                ..Default::default()
            });
            match algorithm {
                SimpleLb::RoundRobin => {
                    c.lb_policy = LbPolicy::RoundRobin as i32;
                    if slow_start.is_some() {
                        c.lb_config =
                            Some(LbConfig::RoundRobinLbConfig(cluster::RoundRobinLbConfig {
                                slow_start_config: slow_start,
                            }));
                    }
                }
                SimpleLb::Random => c.lb_policy = LbPolicy::Random as i32,
                SimpleLb::Passthrough => {
                    c.lb_policy = LbPolicy::ClusterProvided as i32;
                    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
                        DiscoveryType::OriginalDst as i32,
                    ));
                    c.eds_cluster_config = None;
                    c.load_assignment = None;
                }
                SimpleLb::LeastRequest | SimpleLb::Unspecified => {
                    c.lb_policy = LbPolicy::LeastRequest as i32;
                    if slow_start.is_some() {
                        c.lb_config = Some(LbConfig::LeastRequestLbConfig(
                            cluster::LeastRequestLbConfig {
                                slow_start_config: slow_start,
                                ..Default::default()
                            },
                        ));
                    }
                }
            }
        }
        LoadBalancer::ConsistentHash(HashRing::Maglev { table_size }) => {
            c.lb_policy = LbPolicy::Maglev as i32;
            if *table_size > 0 {
                c.lb_config = Some(LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                    table_size: Some(UInt64Value { value: *table_size }),
                }));
            }
        }
        LoadBalancer::ConsistentHash(HashRing::RingHash { minimum_ring_size }) => {
            c.lb_policy = LbPolicy::RingHash as i32;
            if *minimum_ring_size > 0 {
                c.lb_config = Some(LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
                    minimum_ring_size: Some(UInt64Value {
                        value: *minimum_ring_size,
                    }),
                    ..Default::default()
                }));
            }
        }
    }
}
