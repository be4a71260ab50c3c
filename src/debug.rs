//! The JSON documents of the debug endpoints (`/debug/syncz`,
//! `/debug/config_dump`, `/debug/registryz`, `/debug/endpointz`,
//! `/debug/sourcez`, `/debug/push_status`), shared by the daemon that
//! writes them and `meshreg ctl` that reads them, so the two cannot drift.
//!
//! Their shapes are stable: fields are only ever added. Times are RFC 3339
//! (UTC, seconds), durations are milliseconds.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// RFC 3339, UTC, to the second.
pub(crate) fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One connected proxy and where it stands per type (`/debug/syncz`, a
/// list of these ordered by node id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyStatus {
    /// The node id.
    pub proxy: String,
    /// The proxy's namespace (empty for a plain Envoy without one).
    pub namespace: String,
    /// `delta` or `sotw`.
    pub mode: String,
    /// The peer address.
    pub peer: String,
    /// When the stream first named its node.
    pub connected_since: String,
    /// `ISTIO_VERSION` of its node.
    pub istio_version: String,
    /// Its scope (`all`: unscoped, every service).
    pub scope: String,
    /// Per type (`cds`, `eds`), in the order the server sends them.
    pub types: Vec<TypeStatus>,
}

/// What one proxy was sent of one type and what it answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TypeStatus {
    /// `cds` or `eds`.
    #[serde(rename = "type")]
    pub type_short: String,
    /// `SYNCED`, `STALE` (sent, not answered), `NACKED` or `NOT SENT`.
    pub state: String,
    /// The version of the last response sent.
    pub sent_version: Option<String>,
    /// Its nonce.
    pub sent_nonce: Option<String>,
    /// When it was sent.
    pub sent_at: Option<String>,
    /// The version of the last response the proxy accepted.
    pub acked_version: Option<String>,
    /// When it accepted it.
    pub acked_at: Option<String>,
    /// Responses sent.
    pub responses: u64,
    /// Responses rejected.
    pub nacks: u64,
    /// Resources it rejected that are still current (it keeps an older
    /// version of each): while there are any, the type is `NACKED`.
    pub rejected: usize,
    /// The last rejection's error message.
    pub last_nack: Option<String>,
    /// The version it rejected.
    pub last_nack_version: Option<String>,
    /// When.
    pub last_nack_at: Option<String>,
}

impl ProxyStatus {
    /// From a connected proxy.
    pub(crate) fn from_connected(c: &meshreg_xds::Connected) -> Self {
        ProxyStatus {
            proxy: c.proxy.id.clone(),
            namespace: c.proxy.namespace.clone(),
            mode: c.mode.to_string(),
            peer: c.peer.map(|a| a.to_string()).unwrap_or_default(),
            connected_since: time(c.since),
            istio_version: c.proxy.istio_version.clone(),
            scope: c
                .scope
                .as_ref()
                .map_or_else(|| "all".to_string(), ToString::to_string),
            types: c
                .sync
                .iter()
                // The LEDS assignment table is EDS on the wire.
                .filter(|s| s.type_url.wire() == s.type_url)
                .map(|s| TypeStatus {
                    type_short: s.type_url.short().to_string(),
                    state: s.state().as_str().to_string(),
                    sent_version: s.sent.as_ref().map(|r| r.version.to_string()),
                    sent_nonce: s.sent.as_ref().map(|r| r.nonce.to_string()),
                    sent_at: s.sent.as_ref().map(|r| time(r.at)),
                    acked_version: s.acked.as_ref().map(|r| r.version.to_string()),
                    acked_at: s.acked.as_ref().map(|r| time(r.at)),
                    responses: s.responses,
                    nacks: s.nacks,
                    rejected: s.rejected,
                    last_nack: s.nacked.as_ref().map(|n| n.message.clone()),
                    last_nack_version: s.nacked.as_ref().map(|n| n.response.version.to_string()),
                    last_nack_at: s.nacked.as_ref().map(|n| time(n.response.at)),
                })
                .collect(),
        }
    }
}

/// What one proxy holds (`/debug/config_dump?proxyID=<node id>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigDump {
    /// The node id.
    pub proxy: String,
    /// `delta` or `sotw`: several streams may share a node id, and the
    /// newest is the one shown.
    pub mode: String,
    /// The peer address of that stream.
    pub peer: String,
    /// Per type the proxy asked for.
    pub types: Vec<TypeDump>,
}

/// What one proxy holds of one type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TypeDump {
    /// `cds` or `eds`.
    #[serde(rename = "type")]
    pub type_short: String,
    /// The full type URL.
    pub type_url: String,
    /// Whether it subscribed to every resource of the type.
    pub wildcard: bool,
    /// Names it subscribed to (0 for a wildcard subscription).
    pub subscribed: usize,
    /// The resources it holds, ordered by name.
    pub resources: Vec<HeldResource>,
    /// Resources it rejected whose rejected version is still current (it
    /// holds an older version of each, or none).
    pub rejected: Vec<RejectedResource>,
}

/// A resource a proxy rejected.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RejectedResource {
    /// Its name.
    pub name: String,
    /// The version it rejected.
    pub version: String,
}

/// One resource a proxy holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldResource {
    /// Its name.
    pub name: String,
    /// Its version (a hash of its content).
    pub version: String,
    /// The `google.protobuf.Any` exactly as sent, base64 (standard
    /// alphabet, padded); absent when the proxy holds an older version than
    /// the server still has (e.g. after rejecting a newer one).
    pub any: Option<String>,
}

impl ConfigDump {
    /// From what a stream reported.
    pub(crate) fn from_dump(d: &meshreg_xds::ConfigDump) -> Self {
        use base64::Engine as _;
        ConfigDump {
            proxy: d.node_id.clone(),
            mode: d.mode.to_string(),
            peer: d.peer.map(|p| p.to_string()).unwrap_or_default(),
            types: d
                .types
                .iter()
                .map(|t| TypeDump {
                    type_short: t.type_url.short().to_string(),
                    type_url: t.type_url.as_str().to_string(),
                    wildcard: t.wildcard,
                    subscribed: t.subscribed,
                    resources: t
                        .resources
                        .iter()
                        .map(|r| HeldResource {
                            name: r.name.to_string(),
                            version: r.version.to_string(),
                            any: r.resource.as_ref().map(|res| {
                                base64::engine::general_purpose::STANDARD.encode(&res.any)
                            }),
                        })
                        .collect(),
                    rejected: t
                        .rejected
                        .iter()
                        .map(|(name, version)| RejectedResource {
                            name: name.to_string(),
                            version: version.to_string(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// A source and its status (`/debug/sourcez`, a list ordered by source).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    /// The source (`kind/name`).
    pub source: String,
    /// `syncing`, `synced` or `stale`.
    pub state: String,
    /// Since when it is stale.
    pub stale_since: Option<String>,
    /// Objects it holds.
    pub objects: usize,
    /// The last error it reported (kept after it recovers).
    pub last_error: Option<String>,
    /// When it last sent its complete state (initial list, relist, rescan).
    pub last_sync: Option<String>,
    /// When it last sent any update.
    pub last_update: Option<String>,
    /// Updates it sent.
    pub updates: u64,
    /// Errors counted for it (`meshreg_source_errors_total`, every reason).
    pub errors: u64,
    /// Objects it refuses now (`/debug/rejected`).
    pub rejected: usize,
}

impl SourceStatus {
    pub(crate) fn from_registry(
        id: &meshreg_registry::SourceId,
        s: &meshreg_registry::SourceStatus,
    ) -> Self {
        use meshreg_registry::SourceState;
        let (state, stale_since) = match s.state {
            SourceState::Syncing => ("syncing", None),
            SourceState::Synced => ("synced", None),
            SourceState::Stale { since } => ("stale", Some(time(since))),
            _ => ("unknown", None),
        };
        SourceStatus {
            source: id.to_string(),
            state: state.to_string(),
            stale_since,
            objects: s.objects,
            last_error: s.last_error.clone(),
            last_sync: None,
            last_update: None,
            updates: 0,
            errors: 0,
            rejected: 0,
        }
    }
}

/// One service of the merged registry (`/debug/registryz`, a list ordered
/// by hostname).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Service {
    /// Its hostname.
    pub hostname: String,
    /// `STATIC`, `DNS`, `DNS_ROUND_ROBIN` or `NONE` (passthrough).
    pub resolution: String,
    /// Its ports.
    pub ports: Vec<Port>,
    /// Every declaration, by source.
    pub declarations: Vec<Declaration>,
    /// The DestinationRules that may apply (`namespace/name`).
    pub destination_rules: Vec<String>,
    /// Disagreements between declarations, as the merge settled them.
    pub conflicts: Vec<String>,
    /// Its endpoints.
    pub endpoints: usize,
}

/// A service port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Port {
    /// The number.
    pub number: u16,
    /// Its name.
    pub name: String,
    /// Its protocol (Istio's names: HTTP, GRPC, TCP …).
    pub protocol: String,
}

/// One source's declaration of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Declaration {
    /// The source.
    pub source: String,
    /// The namespace it declares the service in.
    pub namespace: String,
    /// The object (file path, `kind/namespace/name`, Consul service …).
    pub origin: String,
    /// Its `exportTo`.
    pub export_to: Vec<String>,
}

/// One endpoint of a service (`/debug/endpointz`, a list ordered by
/// hostname, then as the registry orders them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Endpoint {
    /// The service.
    pub hostname: String,
    /// The address (IP, Unix socket path or DNS name).
    pub address: String,
    /// Port name to number.
    pub ports: std::collections::BTreeMap<String, u16>,
    /// `HEALTHY`, `UNHEALTHY`, `DRAINING` or `UNKNOWN`.
    pub health: String,
    /// The source it came from.
    pub source: String,
    /// Its cluster id.
    pub cluster: String,
    /// Its network.
    pub network: String,
    /// `region/zone/subzone`.
    pub locality: String,
    /// Its weight (0: unset).
    pub weight: u32,
    /// The workload (pod, WorkloadEntry) it belongs to.
    pub workload: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The whole registry's services.
pub(crate) fn services(view: &meshreg_registry::View) -> Vec<Service> {
    view.services()
        .map(|(host, svc)| Service {
            hostname: host.to_string(),
            resolution: match svc.service.resolution {
                meshreg_registry::Resolution::Static => "STATIC",
                meshreg_registry::Resolution::Dns => "DNS",
                meshreg_registry::Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
                _ => "NONE",
            }
            .to_string(),
            ports: svc
                .service
                .ports
                .iter()
                .map(|p| Port {
                    number: p.number,
                    name: p.name.clone(),
                    protocol: format!("{:?}", p.protocol).to_uppercase(),
                })
                .collect(),
            declarations: svc
                .declared
                .iter()
                .map(|d| Declaration {
                    source: d.source.to_string(),
                    namespace: d.namespace.clone(),
                    origin: d.origin.clone(),
                    export_to: d.export_to.clone(),
                })
                .collect(),
            destination_rules: svc
                .rules
                .iter()
                .chain(&svc.selector_rules)
                .map(|r| format!("{}/{}", r.namespace, r.name))
                .collect(),
            conflicts: svc.conflicts.iter().map(ToString::to_string).collect(),
            endpoints: svc.endpoints.len(),
        })
        .collect()
}

/// Every endpoint of every service.
pub(crate) fn endpoints(view: &meshreg_registry::View) -> Vec<Endpoint> {
    use meshreg_registry::{Address, Health};
    let mut out = Vec::with_capacity(view.endpoint_count());
    for (host, svc) in view.services() {
        for ep in svc.endpoints.iter() {
            let address = match &ep.address {
                Address::Ip(ip) => ip.to_string(),
                Address::Unix(p) => format!("unix://{p}"),
                Address::Dns(n) => n.clone(),
            };
            let health = match ep.health {
                Health::Healthy => "HEALTHY",
                Health::Unhealthy => "UNHEALTHY",
                Health::Draining => "DRAINING",
                _ => "UNKNOWN",
            };
            let l = &ep.locality;
            let locality = [l.region.as_str(), &l.zone, &l.subzone]
                .join("/")
                .trim_end_matches('/')
                .to_string();
            out.push(Endpoint {
                hostname: host.to_string(),
                address,
                ports: ep.ports.clone(),
                health: health.to_string(),
                source: ep.source.to_string(),
                cluster: ep.cluster_id.to_string(),
                network: ep.network.to_string(),
                locality,
                weight: ep.weight,
                workload: ep.workload_name.clone(),
                labels: ep.labels.clone(),
            });
        }
    }
    out
}

/// An object a source refuses now (`/debug/rejected`, ordered by source
/// and object); it leaves the list when accepted again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rejected {
    /// The source.
    pub source: String,
    /// The object: a file path, `Kind namespace/name` (Kubernetes), or
    /// `registry: <key>` for one the registry refused.
    pub object: String,
    /// When it was last refused.
    pub at: String,
    /// Why.
    pub problems: Vec<Problem>,
}

/// One problem with a refused object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// The document of a multi-document file (0-based).
    pub document: Option<usize>,
    /// The field path (empty: the whole object).
    pub field: String,
    /// Short reason, as `meshreg_source_errors_total{reason}`.
    pub reason: String,
    /// What is wrong, and the Istio rule where there is one.
    pub message: String,
}

impl Rejected {
    pub(crate) fn from_adapters(r: &meshreg_adapters::Rejected) -> Self {
        Rejected {
            source: r.source.clone(),
            object: r.object.clone(),
            at: time(r.at),
            problems: r
                .problems
                .iter()
                .map(|p| Problem {
                    document: p.document,
                    field: p.field.clone(),
                    reason: p.reason.clone(),
                    message: p.message.clone(),
                })
                .collect(),
        }
    }
}

/// One generation of resources (`/debug/push_status`, oldest first).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Push {
    /// When it finished.
    pub at: String,
    /// The registry version it reflects.
    pub registry_version: u64,
    /// The snapshot generation it published.
    pub generation: u64,
    /// Whether it went out to the proxies (false: nothing changed).
    pub published: bool,
    /// What caused it, by Istio's trigger type (`endpoint`, `service`,
    /// `config`, `global`): hosts (or 1 for config and global).
    pub triggers: std::collections::BTreeMap<String, usize>,
    /// Clusters added, changed or removed.
    pub clusters_changed: usize,
    /// ClusterLoadAssignments added, changed or removed.
    pub assignments_changed: usize,
    /// Proxies connected when it went out.
    pub proxies: i64,
    /// Milliseconds to generate it.
    pub duration_ms: f64,
    /// Milliseconds from the first registry event of its batch.
    pub since_event_ms: Option<f64>,
}

impl Push {
    pub(crate) fn from_push(p: &meshreg_xds::Push) -> Self {
        Push {
            at: time(p.at),
            registry_version: p.registry_version,
            generation: p.generation,
            published: p.published,
            triggers: p
                .triggers
                .by_type()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(t, n)| (t.to_string(), n))
                .collect(),
            clusters_changed: p.clusters_changed,
            assignments_changed: p.assignments_changed,
            proxies: p.proxies,
            duration_ms: millis(p.duration),
            since_event_ms: p.since_event.map(millis),
        }
    }
}
