//! Traffic policy for a host: Istio's `DestinationRule`, as sources send
//! it, in the registry's own terms (no YAML or Envoy types).
//!
//! A rule is a keyed object like a service declaration: the registry stores
//! the rules of every source per host and gives each merged service the
//! rule that applies ([`MergedService::destination_rule`]), so a rule's
//! change is a change of its host and regenerates only that host's
//! clusters. Which rule applies when several name one host is written in
//! `merge` (`pick_rule`).
//!
//! [`MergedService::destination_rule`]: crate::MergedService::destination_rule

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::Hostname;

/// A `DestinationRule`: subsets of a host's endpoints and the policy for
/// traffic to them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DestinationRule {
    /// The rule's name.
    pub name: String,
    /// The rule's namespace.
    pub namespace: String,
    /// The host it applies to, fully qualified (a short name is resolved
    /// against the rule's namespace by the source, as Istio does), or a
    /// wildcard `*.suffix` (every host ending in `.suffix`).
    pub host: Hostname,
    /// The policy for all of the host's traffic.
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets, in declaration order.
    pub subsets: Vec<Subset>,
    /// Namespaces the rule is visible to (empty: all).
    pub export_to: Vec<String>,
    /// The client workloads it applies to (`None`: all).
    pub workload_selector: Option<BTreeMap<String, String>>,
}

/// A subset: the endpoints whose labels include `labels`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subset {
    /// Its name (the cluster `outbound|<port>|<name>|<host>`).
    pub name: String,
    /// The labels an endpoint must have.
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy, component by component.
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Istio's `TrafficPolicy`. `None` components are unset (the level above,
/// or the defaults, apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TrafficPolicy {
    /// The load balancer.
    pub load_balancer: Option<LoadBalancer>,
    /// Connection limits and timeouts.
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS to the endpoints.
    pub tls: Option<ClientTls>,
    /// `loadBalancer.localityLbSetting`: part of the load balancer
    /// component (a level that sets either replaces both).
    pub locality_lb: Option<LocalityLbSetting>,
    /// Per-port policies: for that port, each replaces the whole policy
    /// (Istio: port-level settings do not inherit).
    pub port_level_settings: Vec<(u16, TrafficPolicy)>,
}

impl TrafficPolicy {
    /// The policy for `port`, with a subset's policy over it (Istio's
    /// `MergeTrafficPolicy`): the rule's top-level components, replaced by
    /// the rule's settings for the port when it has some; then each
    /// component the subset sets, then the subset's settings for the port.
    pub fn for_port(
        rule: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u16,
    ) -> TrafficPolicy {
        let at_port = |p: &TrafficPolicy| -> TrafficPolicy {
            match p.port_level_settings.iter().find(|(n, _)| *n == port) {
                Some((_, level)) => TrafficPolicy {
                    port_level_settings: Vec::new(),
                    ..level.clone()
                },
                None => TrafficPolicy {
                    port_level_settings: Vec::new(),
                    ..p.clone()
                },
            }
        };
        let mut out = rule.map(at_port).unwrap_or_default();
        if let Some(s) = subset {
            if s.load_balancer.is_some() || s.locality_lb.is_some() {
                out.load_balancer.clone_from(&s.load_balancer);
                out.locality_lb.clone_from(&s.locality_lb);
            }
            if s.connection_pool.is_some() {
                out.connection_pool.clone_from(&s.connection_pool);
            }
            if s.outlier_detection.is_some() {
                out.outlier_detection.clone_from(&s.outlier_detection);
            }
            if s.tls.is_some() {
                out.tls.clone_from(&s.tls);
            }
            if let Some((_, level)) = s.port_level_settings.iter().find(|(n, _)| *n == port) {
                out = TrafficPolicy {
                    port_level_settings: Vec::new(),
                    ..level.clone()
                };
            }
        }
        out
    }
}

/// Istio's `LocalityLoadBalancerSetting`: how a proxy spreads traffic
/// over the localities of a service's endpoints, relative to its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LocalityLbSetting {
    /// `enabled` (`None`: unset, which is enabled).
    pub enabled: Option<bool>,
    /// `distribute`: weights per destination locality for proxies of a
    /// source locality.
    pub distribute: Vec<LocalityDistribute>,
    /// `failover`: the region to fail over to from a region.
    pub failover: Vec<LocalityFailover>,
    /// `failoverPriority`: the labels endpoints are ranked by, compared
    /// with the proxy's (`label=value`: with that value), as written.
    pub failover_priority: Vec<String>,
}

/// One `distribute` entry: proxies of locality `from` (`region/zone/sub`,
/// `*` wildcards) send each locality of `to` its weight in percent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalityDistribute {
    /// The proxies' locality pattern.
    pub from: String,
    /// (locality pattern, weight in percent), ordered by pattern.
    pub to: Vec<(String, u32)>,
}

/// One `failover` entry: from region `from` to region `to`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalityFailover {
    /// The proxies' region.
    pub from: String,
    /// The region they fail over to.
    pub to: String,
}

/// A load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LoadBalancer {
    /// A simple policy, with an optional slow-start window.
    Simple {
        /// The algorithm.
        algorithm: SimpleLb,
        /// `warmupDurationSecs`: Envoy's slow start window.
        warmup: Option<Duration>,
    },
    /// Consistent hashing (the hash key itself is a route setting).
    ConsistentHash(HashRing),
}

/// Istio's simple load balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimpleLb {
    /// `UNSPECIFIED`: Istio's default (least request).
    Unspecified,
    /// `LEAST_REQUEST` (and the deprecated `LEAST_CONN`).
    LeastRequest,
    /// `RANDOM`.
    Random,
    /// `ROUND_ROBIN`.
    RoundRobin,
    /// `PASSTHROUGH`: to the original destination.
    Passthrough,
}

/// The ring of a consistent hash load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashRing {
    /// A ring hash with at least this many entries (0: Envoy's default).
    RingHash {
        /// `minimumRingSize`.
        minimum_ring_size: u64,
    },
    /// Maglev with this table size (0: Envoy's default).
    Maglev {
        /// `tableSize`.
        table_size: u64,
    },
}

/// Istio's `ConnectionPoolSettings` (0 means unset, as in Istio).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`.
    pub max_connections: u32,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive`: probes, time, interval.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `tcp.maxConnectionDuration`.
    pub max_connection_duration: Option<Duration>,
    /// `tcp.idleTimeout` (used when `http.idleTimeout` is unset).
    pub tcp_idle_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`.
    pub http1_max_pending_requests: u32,
    /// `http.http2MaxRequests`.
    pub http2_max_requests: u32,
    /// `http.maxRequestsPerConnection`.
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`.
    pub max_retries: u32,
    /// `http.idleTimeout`.
    pub idle_timeout: Option<Duration>,
    /// `http.h2UpgradePolicy`.
    pub h2_upgrade: H2Upgrade,
    /// `http.useClientProtocol`.
    pub use_client_protocol: bool,
    /// `http.maxConcurrentStreams`.
    pub max_concurrent_streams: u32,
}

/// TCP keepalive settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpKeepalive {
    /// `probes`.
    pub probes: u32,
    /// `time`.
    pub time: Option<Duration>,
    /// `interval`.
    pub interval: Option<Duration>,
}

/// Istio's `H2UpgradePolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum H2Upgrade {
    /// The mesh's default.
    #[default]
    Default,
    /// Never upgrade.
    DoNotUpgrade,
    /// Upgrade HTTP/1.1 to HTTP/2.
    Upgrade,
}

/// Istio's `OutlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors` (the deprecated `consecutiveErrors` maps
    /// here, as Istio's validation converts it).
    pub consecutive_5xx_errors: Option<u32>,
    /// `consecutiveGatewayErrors`.
    pub consecutive_gateway_errors: Option<u32>,
    /// `splitExternalLocalOriginErrors`.
    pub split_external_local_origin_errors: bool,
    /// `consecutiveLocalOriginFailures`.
    pub consecutive_local_origin_failures: Option<u32>,
    /// `interval`.
    pub interval: Option<Duration>,
    /// `baseEjectionTime`.
    pub base_ejection_time: Option<Duration>,
    /// `maxEjectionPercent` (0: unset).
    pub max_ejection_percent: u32,
    /// `minHealthPercent`.
    pub min_health_percent: u32,
}

/// Istio's `ClientTLSSettings`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientTls {
    /// The mode.
    pub mode: TlsSetting,
    /// `clientCertificate` (MUTUAL).
    pub client_certificate: String,
    /// `privateKey` (MUTUAL).
    pub private_key: String,
    /// `caCertificates` (empty: the system's).
    pub ca_certificates: String,
    /// `sni`.
    pub sni: String,
    /// `subjectAltNames`.
    pub subject_alt_names: Vec<String>,
    /// `insecureSkipVerify`.
    pub insecure_skip_verify: bool,
    /// `credentialName` (a secret delivered over SDS).
    pub credential_name: String,
}

/// Istio's TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsSetting {
    /// Plain text.
    Disable,
    /// TLS, the server verified.
    Simple,
    /// TLS with a client certificate.
    Mutual,
    /// Istio's mTLS with the mesh's certificates (which meshreg does not
    /// issue).
    IstioMutual,
}

/// An Istio `Sidecar`: which services the proxies it selects see
/// (its egress hosts). Ingress and outbound traffic policy are not modelled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sidecar {
    /// Its name.
    pub name: String,
    /// Its namespace: it applies to proxies of this namespace (or, in the
    /// root namespace [`ROOT_NAMESPACE`] and without a selector, to every
    /// namespace that has none of its own).
    ///
    /// [`ROOT_NAMESPACE`]: crate::ROOT_NAMESPACE
    pub namespace: String,
    /// The proxies it applies to, by label (`None`: every proxy of its
    /// namespace).
    pub workload_selector: Option<BTreeMap<String, String>>,
    /// The hosts it imports: the union of its egress listeners' `hosts`.
    /// `None`: no `egress` section, which imports everything (Istio's
    /// default egress listener, `*/*`).
    pub egress_hosts: Option<Vec<EgressHost>>,
}

/// One `<namespace>/<dnsName>` egress host of a [`Sidecar`] (`~` entries
/// are dropped: they import nothing).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressHost {
    /// The namespace a service must be declared in.
    pub namespace: EgressNamespace,
    /// `*`, `*.suffix` or an exact hostname.
    pub host: String,
}

/// The namespace part of an egress host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EgressNamespace {
    /// `*`: any namespace.
    Any,
    /// `.`: the proxy's own namespace (Istio reads it so even in a root
    /// namespace Sidecar that is every namespace's default: `./*` there
    /// means each proxy's own namespace, not the root's).
    Own,
    /// A namespace by name.
    Named(String),
}

impl Sidecar {
    /// Whether a proxy with `labels` is selected by the Sidecar's
    /// selector (a Sidecar without one selects no proxy by label).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.workload_selector
            .as_ref()
            .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Whether the Sidecar imports, for a proxy of namespace `client`,
    /// `host` declared in `namespace` (Istio's egress `hosts` rule: the
    /// namespace part is `*`, `.` and the proxy's, or equal; the DNS part
    /// `*`, a `*.suffix` wildcard or the exact name).
    pub fn imports(&self, host: &str, namespace: &str, client: &str) -> bool {
        let Some(hosts) = &self.egress_hosts else {
            return true;
        };
        hosts.iter().any(|e| {
            let ns_ok = match &e.namespace {
                EgressNamespace::Any => true,
                EgressNamespace::Own => namespace == client,
                EgressNamespace::Named(ns) => ns == namespace,
            };
            ns_ok && host_matches(&e.host, host)
        })
    }
}

/// Whether `pattern` (`*`, `*.suffix` or exact) matches `host`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

/// Whether an object of `namespace` with `export_to` is visible to
/// `client` (Istio's `exportTo`: empty or `*` is every namespace, `.` the
/// object's own, `~` none, otherwise the names listed).
pub fn exported_to(export_to: &[String], namespace: &str, client: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == client || (e == "." && namespace == client))
}

impl DestinationRule {
    /// Whether the rule's host is `host`, or a wildcard that matches it.
    pub fn matches(&self, host: &str) -> bool {
        host_matches(self.host.as_str(), host)
    }

    /// Whether the host is a wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.host.as_str().starts_with('*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max: u32) -> Option<ConnectionPool> {
        Some(ConnectionPool {
            max_connections: max,
            ..ConnectionPool::default()
        })
    }

    #[test]
    fn subsets_override_by_component_and_port_settings_replace_everything() {
        let rule = TrafficPolicy {
            load_balancer: Some(LoadBalancer::Simple {
                algorithm: SimpleLb::RoundRobin,
                warmup: None,
            }),
            connection_pool: pool(10),
            port_level_settings: vec![(
                9080,
                TrafficPolicy {
                    connection_pool: pool(5),
                    ..TrafficPolicy::default()
                },
            )],
            ..TrafficPolicy::default()
        };
        let subset = TrafficPolicy {
            connection_pool: pool(1),
            ..TrafficPolicy::default()
        };
        // Another port: the rule's top level.
        let p = TrafficPolicy::for_port(Some(&rule), None, 80);
        assert_eq!(p.connection_pool, pool(10));
        assert!(p.load_balancer.is_some());
        // The rule's port level replaces the whole policy for its port.
        let p = TrafficPolicy::for_port(Some(&rule), None, 9080);
        assert_eq!(p.connection_pool, pool(5));
        assert_eq!(p.load_balancer, None);
        // A subset's component overrides; the others stay.
        let p = TrafficPolicy::for_port(Some(&rule), Some(&subset), 80);
        assert_eq!(p.connection_pool, pool(1));
        assert!(p.load_balancer.is_some());
    }

    #[test]
    fn wildcard_hosts_match_by_suffix() {
        let rule = |host: &str| DestinationRule {
            name: "r".into(),
            namespace: "default".into(),
            host: host.into(),
            traffic_policy: None,
            subsets: Vec::new(),
            export_to: Vec::new(),
            workload_selector: None,
        };
        assert!(rule("*.example.com").matches("a.example.com"));
        assert!(!rule("*.example.com").matches("example.com"));
        assert!(rule("a.example.com").matches("a.example.com"));
        assert!(rule("*").matches("anything"));
    }

    #[test]
    fn export_to_and_egress_hosts() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&e(&["*"]), "a", "b"));
        assert!(exported_to(&e(&["."]), "a", "a"));
        assert!(!exported_to(&e(&["."]), "a", "b"));
        assert!(exported_to(&e(&["b"]), "a", "b"));
        assert!(!exported_to(&e(&["~"]), "a", "a"));
        let sidecar = Sidecar {
            name: "default".into(),
            namespace: "a".into(),
            workload_selector: None,
            egress_hosts: Some(vec![
                EgressHost {
                    namespace: EgressNamespace::Named("a".into()),
                    host: "*".into(),
                },
                EgressHost {
                    namespace: EgressNamespace::Any,
                    host: "*.example.com".into(),
                },
            ]),
        };
        assert!(sidecar.imports("x.a.svc.cluster.local", "a", "a"));
        assert!(!sidecar.imports("x.b.svc.cluster.local", "b", "a"));
        assert!(sidecar.imports("api.example.com", "b", "a"));
        let own = Sidecar {
            namespace: "istio-system".into(),
            egress_hosts: Some(vec![EgressHost {
                namespace: EgressNamespace::Own,
                host: "*".into(),
            }]),
            ..sidecar.clone()
        };
        assert!(
            own.imports("x.b.svc.cluster.local", "b", "b"),
            "the proxy's own"
        );
        assert!(!own.imports("x.b.svc.cluster.local", "b", "c"));
        assert!(
            !sidecar.selects(&BTreeMap::new()),
            "no selector selects no proxy by label"
        );
        let all = Sidecar {
            egress_hosts: None,
            ..sidecar
        };
        assert!(all.imports("anything", "any", "other"));
    }
}
