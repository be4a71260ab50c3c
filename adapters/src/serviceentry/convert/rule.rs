//! `DestinationRule`: its YAML schema, Istio's validation of it
//! (`ValidateDestinationRule`), and the registry's form.
//!
//! Fields meshreg does not map (`tunnel`,
//! `proxyProtocol`, a consistent hash's key, which is a route setting) are
//! accepted and dropped, as the API server prunes fields of a structural
//! schema; the deprecated `outlierDetection.consecutiveErrors` is accepted
//! and ignored with a warning, as current istiod ignores it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use meshreg_registry::{
    ClientTls, ConnectionPool, DestinationRule, H2Upgrade, HashRing, Hostname, LoadBalancer,
    LocalityDistribute, LocalityFailover, LocalityLbSetting, OutlierDetection, SimpleLb, Subset,
    TcpKeepalive, TlsSetting, TrafficPolicy,
};
use serde::Deserialize;

use super::validate::{Findings, Issue};

/// The DNS domain short hosts are resolved in (Istio's default).
const DOMAIN: &str = "cluster.local";

/// `DestinationRule.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DestinationRuleSpec {
    #[serde(default)]
    host: String,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    subsets: Option<Vec<SubsetSpec>>,
    #[serde(default)]
    export_to: Option<Vec<String>>,
    #[serde(default)]
    workload_selector: Option<SelectorSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubsetSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrafficPolicySpec {
    #[serde(default)]
    load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    tls: Option<TlsSpec>,
    #[serde(default)]
    port_level_settings: Option<Vec<PortPolicySpec>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortPolicySpec {
    #[serde(default)]
    port: Option<PortSelector>,
    #[serde(default)]
    load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    tls: Option<TlsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct PortSelector {
    #[serde(default)]
    number: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancerSpec {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<ConsistentHashSpec>,
    #[serde(default)]
    warmup_duration_secs: Option<String>,
    #[serde(default)]
    locality_lb_setting: Option<LocalityLbSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalityLbSpec {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    distribute: Option<Vec<DistributeSpec>>,
    #[serde(default)]
    failover: Option<Vec<FailoverSpec>>,
    #[serde(default)]
    failover_priority: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DistributeSpec {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FailoverSpec {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsistentHashSpec {
    #[serde(default)]
    ring_hash: Option<RingHashSpec>,
    #[serde(default)]
    maglev: Option<MaglevSpec>,
    #[serde(default)]
    minimum_ring_size: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RingHashSpec {
    #[serde(default)]
    minimum_ring_size: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MaglevSpec {
    #[serde(default)]
    table_size: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionPoolSpec {
    #[serde(default)]
    tcp: Option<TcpSpec>,
    #[serde(default)]
    http: Option<HttpSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcpSpec {
    #[serde(default)]
    max_connections: i64,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    tcp_keepalive: Option<KeepaliveSpec>,
    #[serde(default)]
    max_connection_duration: Option<String>,
    #[serde(default)]
    idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeepaliveSpec {
    #[serde(default)]
    probes: i64,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpSpec {
    #[serde(default)]
    http1_max_pending_requests: i64,
    #[serde(default)]
    http2_max_requests: i64,
    #[serde(default)]
    max_requests_per_connection: i64,
    #[serde(default)]
    max_retries: i64,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    h2_upgrade_policy: Option<String>,
    #[serde(default)]
    use_client_protocol: bool,
    #[serde(default)]
    max_concurrent_streams: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutlierSpec {
    #[serde(default)]
    consecutive_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    split_external_local_origin_errors: bool,
    #[serde(default)]
    consecutive_local_origin_failures: Option<i64>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: i64,
    #[serde(default)]
    min_health_percent: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TlsSpec {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    client_certificate: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    ca_certificates: String,
    #[serde(default)]
    credential_name: String,
    #[serde(default)]
    subject_alt_names: Option<Vec<String>>,
    #[serde(default)]
    sni: String,
    #[serde(default)]
    insecure_skip_verify: Option<bool>,
}

/// Parses a Go duration (`300ms`, `1.5s`, `3m`, `1h30m`), as Istio's API
/// accepts them. Hand-written: `humantime` takes neither fractions nor
/// Go's `us`/`µs` spellings.
pub(crate) fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|n| *n > 0)?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Collects validation findings with field paths.
struct Check {
    findings: Findings,
}

impl Check {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.findings.errors.push(Issue {
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.findings.warnings.push(Issue {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// A duration field: parsed, and at least 1 ms (Istio's
    /// `ValidateDuration`).
    fn duration(&mut self, path: &str, value: &Option<String>) -> Option<Duration> {
        let v = value.as_ref()?;
        match go_duration(v) {
            Some(d) if d >= Duration::from_millis(1) => Some(d),
            Some(_) => {
                self.error(path, "duration must be at least 1ms");
                None
            }
            None => {
                self.error(
                    path,
                    format!("{v:?} is not a duration (e.g. 300ms, 1s, 5m)"),
                );
                None
            }
        }
    }

    /// A count that must not be negative.
    fn count(&mut self, path: &str, value: i64) -> u32 {
        if value < 0 {
            self.error(path, "must not be negative");
            return 0;
        }
        u32::try_from(value).unwrap_or(u32::MAX)
    }

    fn policy(&mut self, path: &str, p: &TrafficPolicySpec) -> TrafficPolicy {
        if p.load_balancer.is_none()
            && p.connection_pool.is_none()
            && p.outlier_detection.is_none()
            && p.tls.is_none()
            && p.port_level_settings.as_ref().is_none_or(Vec::is_empty)
        {
            self.error(path, "traffic policy must have at least one field");
        }
        let mut out = self.components(
            path,
            &p.load_balancer,
            &p.connection_pool,
            &p.outlier_detection,
            &p.tls,
        );
        let mut seen = HashSet::new();
        for (i, level) in p.port_level_settings.iter().flatten().enumerate() {
            let at = format!("{path}.portLevelSettings[{i}]");
            let number = level.port.as_ref().map_or(0, |p| p.number);
            let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else {
                self.error(&format!("{at}.port.number"), "port must be set, 1-65535");
                continue;
            };
            if !seen.insert(number) {
                self.error(
                    &format!("{at}.port.number"),
                    format!("port {number} is set twice"),
                );
            }
            let policy = self.components(
                &at,
                &level.load_balancer,
                &level.connection_pool,
                &level.outlier_detection,
                &level.tls,
            );
            out.port_level_settings.push((number, policy));
        }
        out
    }

    fn components(
        &mut self,
        path: &str,
        lb: &Option<LoadBalancerSpec>,
        pool: &Option<ConnectionPoolSpec>,
        outlier: &Option<OutlierSpec>,
        tls: &Option<TlsSpec>,
    ) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: lb
                .as_ref()
                .and_then(|lb| self.load_balancer(&format!("{path}.loadBalancer"), lb)),
            connection_pool: pool
                .as_ref()
                .map(|p| self.connection_pool(&format!("{path}.connectionPool"), p)),
            outlier_detection: outlier
                .as_ref()
                .map(|o| self.outlier(&format!("{path}.outlierDetection"), o)),
            tls: tls.as_ref().map(|t| self.tls(&format!("{path}.tls"), t)),
            locality_lb: lb
                .as_ref()
                .and_then(|lb| lb.locality_lb_setting.as_ref())
                .map(|l| {
                    self.locality(
                        &format!("{path}.loadBalancer.localityLbSetting"),
                        l,
                        outlier.is_some(),
                    )
                }),
            port_level_settings: Vec::new(),
        }
    }

    /// Istio's `validateLocalityLbSetting`.
    fn locality(&mut self, path: &str, l: &LocalityLbSpec, outlier: bool) -> LocalityLbSetting {
        let distribute = l.distribute.as_deref().unwrap_or_default();
        let failover = l.failover.as_deref().unwrap_or_default();
        let priority = l.failover_priority.as_deref().unwrap_or_default();
        if !distribute.is_empty() && !failover.is_empty() {
            self.error(
                path,
                "can not simultaneously specify 'distribute' and 'failover'",
            );
        }
        const TOPOLOGY: [&str; 3] = [
            "topology.kubernetes.io/region",
            "topology.kubernetes.io/zone",
            "topology.istio.io/subzone",
        ];
        if !failover.is_empty()
            && let Some(label) = priority.iter().find(|p| TOPOLOGY.contains(&p.as_str()))
        {
            self.error(
                &format!("{path}.failoverPriority"),
                format!("can not simultaneously set 'failover' and topology label '{label}' in 'failover_priority'"),
            );
        }
        let wildcard_ok = |loc: &str| {
            let n = loc.matches('*').count();
            n == 0 || (n == 1 && loc.ends_with('*'))
        };
        let mut out = LocalityLbSetting {
            enabled: l.enabled,
            failover_priority: priority.to_vec(),
            ..LocalityLbSetting::default()
        };
        let mut sources: Vec<&str> = Vec::new();
        for (i, d) in distribute.iter().enumerate() {
            let at = format!("{path}.distribute[{i}]");
            if let Some(why) = overlap(&sources, &d.from) {
                self.error(&format!("{at}.from"), why);
            }
            sources.push(&d.from);
            let targets: Vec<&str> = d.to.keys().map(String::as_str).collect();
            for (j, t) in targets.iter().enumerate() {
                if let Some(why) = overlap(&targets[..j], t) {
                    self.error(&format!("{at}.to"), why);
                }
            }
            let mut total: i64 = 0;
            let mut to = Vec::new();
            for (loc, weight) in &d.to {
                if !(1..=100).contains(weight) {
                    self.error(
                        &format!("{at}.to"),
                        "locality weight must be in range [1, 100]",
                    );
                }
                if !wildcard_ok(loc) {
                    self.error(
                        &format!("{at}.to"),
                        format!("locality {loc} wildcard '*' number can not exceed 1 and must be in the end"),
                    );
                }
                total += weight;
                to.push((loc.clone(), u32::try_from(*weight).unwrap_or(0)));
            }
            if total != 100 {
                self.error(
                    &format!("{at}.to"),
                    format!("total locality weight {total} != 100"),
                );
            }
            if !wildcard_ok(&d.from) {
                self.error(
                    &format!("{at}.from"),
                    format!(
                        "locality {} wildcard '*' number can not exceed 1 and must be in the end",
                        d.from
                    ),
                );
            }
            out.distribute.push(LocalityDistribute {
                from: d.from.clone(),
                to,
            });
        }
        if (!failover.is_empty() || !priority.is_empty()) && !outlier {
            self.warn(
                path,
                "outlier detection policy must be provided for failover",
            );
        }
        for (i, f) in failover.iter().enumerate() {
            let at = format!("{path}.failover[{i}]");
            if f.from == f.to {
                self.error(
                    &at,
                    "locality lb failover settings must specify different regions",
                );
            }
            if f.from.contains('/') || f.to.contains('/') {
                self.error(&at, "locality lb failover only specify region");
            }
            if f.from.contains('*') || f.to.contains('*') {
                self.error(
                    &at,
                    "locality lb failover region should not contain '*' wildcard",
                );
            }
            out.failover.push(LocalityFailover {
                from: f.from.clone(),
                to: f.to.clone(),
            });
        }
        out
    }

    fn load_balancer(&mut self, path: &str, lb: &LoadBalancerSpec) -> Option<LoadBalancer> {
        let warmup = self.duration(
            &format!("{path}.warmupDurationSecs"),
            &lb.warmup_duration_secs,
        );
        match (&lb.simple, &lb.consistent_hash) {
            (Some(_), Some(_)) => {
                self.error(path, "set one of simple and consistentHash");
                None
            }
            (Some(simple), None) => {
                let algorithm = match simple.as_str() {
                    "UNSPECIFIED" => SimpleLb::Unspecified,
                    "LEAST_CONN" | "LEAST_REQUEST" => SimpleLb::LeastRequest,
                    "RANDOM" => SimpleLb::Random,
                    "ROUND_ROBIN" => SimpleLb::RoundRobin,
                    "PASSTHROUGH" => SimpleLb::Passthrough,
                    other => {
                        self.error(
                            &format!("{path}.simple"),
                            format!("unknown load balancer {other:?} (ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH)"),
                        );
                        return None;
                    }
                };
                Some(LoadBalancer::Simple { algorithm, warmup })
            }
            (None, Some(hash)) => {
                let size = |me: &mut Check, p: &str, v: i64| -> u64 {
                    if v < 0 {
                        me.error(p, "must not be negative");
                    }
                    u64::try_from(v).unwrap_or(0)
                };
                let ring = match (&hash.ring_hash, &hash.maglev) {
                    (Some(_), Some(_)) => {
                        self.error(
                            &format!("{path}.consistentHash"),
                            "set one of ringHash and maglev",
                        );
                        return None;
                    }
                    (_, Some(m)) => HashRing::Maglev {
                        table_size: size(
                            self,
                            &format!("{path}.consistentHash.maglev.tableSize"),
                            m.table_size,
                        ),
                    },
                    (Some(r), None) => HashRing::RingHash {
                        minimum_ring_size: size(
                            self,
                            &format!("{path}.consistentHash.ringHash.minimumRingSize"),
                            r.minimum_ring_size,
                        ),
                    },
                    // The deprecated top-level size; Envoy's default
                    // (1024) when unset, as istiod sends it.
                    (None, None) => HashRing::RingHash {
                        minimum_ring_size: match size(
                            self,
                            &format!("{path}.consistentHash.minimumRingSize"),
                            hash.minimum_ring_size,
                        ) {
                            0 => 1024,
                            n => n,
                        },
                    },
                };
                Some(LoadBalancer::ConsistentHash(ring))
            }
            // Only locality settings (not mapped): the default balancer.
            (None, None) => None,
        }
    }

    fn connection_pool(&mut self, path: &str, p: &ConnectionPoolSpec) -> ConnectionPool {
        if p.tcp.is_none() && p.http.is_none() {
            self.error(path, "must have at least one field");
        }
        let mut out = ConnectionPool::default();
        if let Some(tcp) = &p.tcp {
            out.max_connections =
                self.count(&format!("{path}.tcp.maxConnections"), tcp.max_connections);
            out.connect_timeout =
                self.duration(&format!("{path}.tcp.connectTimeout"), &tcp.connect_timeout);
            out.max_connection_duration = self.duration(
                &format!("{path}.tcp.maxConnectionDuration"),
                &tcp.max_connection_duration,
            );
            out.tcp_idle_timeout =
                self.duration(&format!("{path}.tcp.idleTimeout"), &tcp.idle_timeout);
            if let Some(k) = &tcp.tcp_keepalive {
                out.tcp_keepalive = Some(TcpKeepalive {
                    probes: self.count(&format!("{path}.tcp.tcpKeepalive.probes"), k.probes),
                    time: self.duration(&format!("{path}.tcp.tcpKeepalive.time"), &k.time),
                    interval: self
                        .duration(&format!("{path}.tcp.tcpKeepalive.interval"), &k.interval),
                });
            }
        }
        if let Some(http) = &p.http {
            let at = |f: &str| format!("{path}.http.{f}");
            out.http1_max_pending_requests = self.count(
                &at("http1MaxPendingRequests"),
                http.http1_max_pending_requests,
            );
            out.http2_max_requests = self.count(&at("http2MaxRequests"), http.http2_max_requests);
            out.max_requests_per_connection = self.count(
                &at("maxRequestsPerConnection"),
                http.max_requests_per_connection,
            );
            out.max_retries = self.count(&at("maxRetries"), http.max_retries);
            out.max_concurrent_streams =
                self.count(&at("maxConcurrentStreams"), http.max_concurrent_streams);
            out.idle_timeout = self.duration(&at("idleTimeout"), &http.idle_timeout);
            out.use_client_protocol = http.use_client_protocol;
            out.h2_upgrade = match http.h2_upgrade_policy.as_deref() {
                None | Some("DEFAULT") => H2Upgrade::Default,
                Some("DO_NOT_UPGRADE") => H2Upgrade::DoNotUpgrade,
                Some("UPGRADE") => H2Upgrade::Upgrade,
                Some(other) => {
                    self.error(&at("h2UpgradePolicy"), format!("unknown policy {other:?}"));
                    H2Upgrade::Default
                }
            };
        }
        out
    }

    fn outlier(&mut self, path: &str, o: &OutlierSpec) -> OutlierDetection {
        let at = |f: &str| format!("{path}.{f}");
        if o.consecutive_errors.is_some() {
            self.warn(
                &at("consecutiveErrors"),
                "deprecated and ignored (as by istiod): use consecutiveGatewayErrors or consecutive5xxErrors",
            );
        }
        let percent = |me: &mut Check, f: &str, v: i64| -> u32 {
            if !(0..=100).contains(&v) {
                me.error(&at(f), "must be between 0 and 100");
                return 0;
            }
            u32::try_from(v).unwrap_or(0)
        };
        OutlierDetection {
            consecutive_5xx_errors: o
                .consecutive_5xx_errors
                .map(|v| self.count(&at("consecutive5xxErrors"), v)),
            consecutive_gateway_errors: o
                .consecutive_gateway_errors
                .map(|v| self.count(&at("consecutiveGatewayErrors"), v)),
            split_external_local_origin_errors: o.split_external_local_origin_errors,
            consecutive_local_origin_failures: o
                .consecutive_local_origin_failures
                .map(|v| self.count(&at("consecutiveLocalOriginFailures"), v)),
            interval: self.duration(&at("interval"), &o.interval),
            base_ejection_time: self.duration(&at("baseEjectionTime"), &o.base_ejection_time),
            max_ejection_percent: percent(self, "maxEjectionPercent", o.max_ejection_percent),
            min_health_percent: percent(self, "minHealthPercent", o.min_health_percent),
        }
    }

    fn tls(&mut self, path: &str, t: &TlsSpec) -> ClientTls {
        let mode = match t.mode.as_deref() {
            None | Some("DISABLE") => TlsSetting::Disable,
            Some("SIMPLE") => TlsSetting::Simple,
            Some("MUTUAL") => TlsSetting::Mutual,
            Some("ISTIO_MUTUAL") => TlsSetting::IstioMutual,
            Some(other) => {
                self.error(
                    &format!("{path}.mode"),
                    format!("unknown TLS mode {other:?}"),
                );
                TlsSetting::Disable
            }
        };
        if mode == TlsSetting::Mutual
            && t.credential_name.is_empty()
            && (t.client_certificate.is_empty() || t.private_key.is_empty())
        {
            self.error(
                path,
                "MUTUAL needs clientCertificate and privateKey (or credentialName)",
            );
        }
        if !t.credential_name.is_empty() {
            self.warn(
                &format!("{path}.credentialName"),
                "credentialName needs Istio's secret discovery: as istiod does for sidecars, no TLS is originated with SIMPLE or MUTUAL and a credentialName (set the certificate files instead)",
            );
        }
        ClientTls {
            mode,
            client_certificate: t.client_certificate.clone(),
            private_key: t.private_key.clone(),
            ca_certificates: t.ca_certificates.clone(),
            sni: t.sni.clone(),
            subject_alt_names: t.subject_alt_names.clone().unwrap_or_default(),
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
            credential_name: t.credential_name.clone(),
        }
    }
}

/// Istio's `validateLocalities`, for `loc` after `earlier`: not empty, and
/// not covering or covered by an earlier one (`*` covers everything,
/// `us/*` covers `us/zone`).
fn overlap(earlier: &[&str], loc: &str) -> Option<String> {
    if loc.is_empty() {
        return Some("locality must not be empty".into());
    }
    let prefix = |l: &str| l.strip_suffix('*').map(|p| p.to_string());
    let covers = |a: &str, b: &str| match prefix(a) {
        Some(p) => b.starts_with(&p),
        None => a == b,
    };
    earlier
        .iter()
        .find(|e| covers(e, loc) || covers(loc, e))
        .map(|e| format!("locality {loc} overlap with previous specified ones ({e})"))
}

/// The host a rule names, fully qualified: a name without a dot is
/// `<name>.<namespace>.svc.cluster.local` (Istio's `ResolveShortnameToFQDN`).
pub(crate) fn resolve_host(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') || host.parse::<std::net::IpAddr>().is_ok() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{DOMAIN}")
    }
}

/// Validates `spec` of rule `name` in `namespace`; the registry's rule and
/// Istio's warnings, or its errors.
pub(crate) fn validate_and_convert(
    spec: &DestinationRuleSpec,
    name: &str,
    namespace: &str,
) -> (Option<DestinationRule>, Findings) {
    let mut c = Check {
        findings: Findings::default(),
    };
    if spec.host.is_empty() {
        c.error("spec.host", "host must be set");
    } else if spec.host.contains('*') && !(spec.host == "*" || spec.host.starts_with("*.")) {
        c.error(
            "spec.host",
            format!("{:?}: a wildcard must be the whole first label", spec.host),
        );
    }
    let traffic_policy = spec
        .traffic_policy
        .as_ref()
        .map(|p| c.policy("spec.trafficPolicy", p));
    let mut names = HashSet::new();
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().flatten().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            c.error(&format!("{at}.name"), "subset name must be set");
        } else if !super::validate::is_dns1123_label(&s.name) {
            // Istio's validateSubsetName.
            c.error(
                &format!("{at}.name"),
                format!("subset name is invalid: {} (not a DNS-1123 label)", s.name),
            );
        } else if !names.insert(s.name.clone()) {
            c.error(
                &format!("{at}.name"),
                format!("duplicate subset name {:?}", s.name),
            );
        }
        let labels = s.labels.clone().unwrap_or_default();
        if labels.is_empty() {
            c.error(
                &format!("{at}.labels"),
                "a subset needs labels (without them it would select every endpoint)",
            );
        }
        let traffic_policy = s
            .traffic_policy
            .as_ref()
            .map(|p| c.policy(&format!("{at}.trafficPolicy"), p));
        subsets.push(Subset {
            name: s.name.clone(),
            labels,
            traffic_policy,
        });
    }
    for (i, e) in spec.export_to.iter().flatten().enumerate() {
        if e.is_empty()
            || !(e == "."
                || e == "*"
                || e.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        {
            c.error(
                &format!("spec.exportTo[{i}]"),
                format!("{e:?} is not ., * or a namespace"),
            );
        }
    }
    if !c.findings.errors.is_empty() {
        return (None, c.findings);
    }
    let rule = DestinationRule {
        name: name.to_string(),
        namespace: namespace.to_string(),
        host: Hostname::from(resolve_host(&spec.host, namespace)),
        traffic_policy,
        subsets,
        export_to: spec.export_to.clone().unwrap_or_default(),
        workload_selector: spec
            .workload_selector
            .as_ref()
            .map(|w| w.match_labels.clone().unwrap_or_default()),
    };
    (Some(rule), c.findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("3m"), Some(Duration::from_secs(180)));
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("10"), None);
        assert_eq!(go_duration("1d"), None);
        assert_eq!(go_duration(""), None);
    }

    #[test]
    fn locality_settings_are_validated_as_istio_does() {
        let errors = |lb: &str| {
            let yaml = format!(
                "host: a.test\ntrafficPolicy:\n  outlierDetection: {{consecutive5xxErrors: 1}}\n  loadBalancer: {{localityLbSetting: {lb}}}\n"
            );
            let spec: DestinationRuleSpec = serde_yaml_ng::from_str(&yaml).unwrap();
            let (rule, f) = validate_and_convert(&spec, "r", "default");
            assert_eq!(rule.is_some(), f.errors.is_empty());
            f.errors
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
        };
        assert!(errors("{distribute: [{from: us/*, to: {us/*: 80, eu/*: 20}}]}").is_empty());
        assert!(errors("{failover: [{from: us, to: eu}]}").is_empty());
        for (bad, why) in [
            (
                "{distribute: [{from: us/*, to: {us/*: 80, eu/*: 10}}]}",
                "!= 100",
            ),
            (
                "{distribute: [{from: us/*, to: {us/*: 100}}, {from: us/*, to: {eu/*: 100}}]}",
                "overlap",
            ),
            (
                "{distribute: [{from: '*', to: {us/*: 100}}, {from: us/a, to: {eu/*: 100}}]}",
                "overlap",
            ),
            ("{distribute: [{from: '', to: {us/*: 100}}]}", "empty"),
            ("{failover: [{from: us, to: us}]}", "different regions"),
            ("{failover: [{from: us/a, to: eu}]}", "only specify region"),
            (
                "{distribute: [{from: us/*, to: {us/*: 100}}], failover: [{from: us, to: eu}]}",
                "simultaneously",
            ),
        ] {
            let e = errors(bad);
            assert!(e.iter().any(|m| m.contains(why)), "{bad}: {e:?}");
        }
    }

    #[test]
    fn short_hosts_are_resolved_in_the_rules_namespace() {
        assert_eq!(
            resolve_host("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(resolve_host("reviews.prod", "default"), "reviews.prod");
        assert_eq!(resolve_host("*.example.com", "default"), "*.example.com");
    }
}
