//! The daemon's configuration file: one YAML document, validated before
//! anything binds. Unknown fields are errors, so a typo never silently
//! falls back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The embedded default: the bookinfo example, served on loopback.
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/bookinfo/meshreg.yaml");

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The xDS (gRPC ADS) server. Default: listen on `0.0.0.0:15010`.
    #[serde(default)]
    pub xds: XdsConfig,
    /// The HTTP server for `/metrics`, `/ready`, `/healthz` and `/debug`.
    /// Default: listen on `0.0.0.0:15014`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Batching of registry changes before pushing. Default: 100 ms quiet
    /// time, at most 150 ms.
    #[serde(default)]
    pub debounce: DebounceConfig,
    /// How long shutdown waits for streams and tasks to finish. Default: 5 s.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// VM auto-registration (proxies naming a WorkloadGroup in
    /// `AUTO_REGISTER_GROUP`). Default: on, 10 s grace period.
    #[serde(default)]
    pub autoregistration: AutoRegistrationConfig,
    /// The etcd store VM registrations are shared through by replicas.
    /// Default: none (each replica serves its own registrations).
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    /// Services shared with the daemons of other clusters through etcd
    /// (needs `etcd`). Default: none.
    #[serde(default)]
    pub federation: Option<FederationConfig>,
    /// The east-west gateways of each network, as Istio's `meshNetworks`
    /// lists them: a proxy reaches endpoints of another network through
    /// them (split horizon). Default: none (every endpoint directly).
    #[serde(default)]
    pub networks: std::collections::BTreeMap<String, NetworkConfig>,
    /// Where services come from. At least one.
    pub sources: Vec<SourceConfig>,
}

/// The xDS server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// Listen address. Default: `0.0.0.0:15010` (Istio's plaintext xDS port).
    #[serde(default = "default_xds_listen")]
    pub listen: SocketAddr,
    /// Check every generated cluster and load assignment against Envoy's
    /// invariants before serving it; one that breaks them is withheld
    /// (logged, counted in `meshreg_xds_invalid_resources_total`) and its
    /// last good version stays. Default: `true`. Turn it off only to work
    /// around a check that refuses what your Envoy accepts: proxies' NACKs
    /// are then the only guard.
    #[serde(default = "default_true")]
    pub check_resources: bool,
    /// Serve a ClusterLoadAssignment with at least this many endpoints
    /// through LEDS (one resource per endpoint, in `xdstp://` collections)
    /// to Envoys on delta xDS; SotW and gRPC clients keep plain EDS.
    /// `0` turns LEDS off. Default: 1000.
    #[serde(default = "default_leds_threshold")]
    pub leds_threshold: usize,
    /// What one peer may make the server hold; each field defaults to
    /// [`meshreg_xds::Limits::default`].
    #[serde(default)]
    pub limits: LimitsConfig,
    /// A second xDS listener over TLS (mTLS with `client_ca_file`), as
    /// istiod's 15012. Default: none (plaintext only).
    #[serde(default)]
    pub tls: Option<XdsTlsConfig>,
}

/// `xds.tls`: the TLS xDS listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsTlsConfig {
    /// Listen address. Default: `0.0.0.0:15012` (istiod's xDS over TLS).
    #[serde(default = "default_xds_tls_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain (relative to the config file); re-read when
    /// it changes.
    pub cert_file: PathBuf,
    /// PEM private key (relative to the config file).
    pub key_file: PathBuf,
    /// PEM CA bundle for client certificates: mTLS. Default: none.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse clients without a certificate.
    /// Default: `true`.
    #[serde(default = "default_true")]
    pub require_client_cert: bool,
    /// SPIFFE IDs that may claim any namespace (tools, gateways). Everyone
    /// else with a certificate must claim the namespace it names.
    #[serde(default)]
    pub trusted_identities: Vec<String>,
}

fn default_leds_threshold() -> usize {
    meshreg_xds::leds::DEFAULT_THRESHOLD
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            listen: default_xds_listen(),
            check_resources: true,
            leds_threshold: default_leds_threshold(),
            limits: LimitsConfig::default(),
            tls: None,
        }
    }
}

/// `xds.limits`: see [`meshreg_xds::Limits`] for each field's meaning.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections in all.
    pub max_connections: Option<usize>,
    /// Open connections from one IP address.
    pub max_connections_per_ip: Option<usize>,
    /// Time to the HTTP/2 preface.
    #[serde(default, deserialize_with = "optional_duration")]
    pub preface_timeout: Option<Duration>,
    /// Time to a stream's first complete request.
    #[serde(default, deserialize_with = "optional_duration")]
    pub first_request_timeout: Option<Duration>,
    /// Concurrent streams per connection.
    pub max_streams_per_connection: Option<u32>,
    /// Resource names one stream may subscribe to, per type.
    pub max_names_per_stream: Option<usize>,
    /// Size of one request message, in bytes.
    pub max_request_bytes: Option<usize>,
    /// Bytes buffered for incomplete requests, all streams together.
    pub max_buffered_bytes: Option<usize>,
    /// Bytes buffered for incomplete requests of one peer address.
    pub max_buffered_bytes_per_ip: Option<usize>,
    /// Requests per second one stream may send.
    pub max_requests_per_second: Option<u32>,
}

impl LimitsConfig {
    /// The limits, defaults filled in.
    pub fn limits(&self) -> meshreg_xds::Limits {
        let d = meshreg_xds::Limits::default();
        meshreg_xds::Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            preface_timeout: self.preface_timeout.unwrap_or(d.preface_timeout),
            first_request_timeout: self
                .first_request_timeout
                .unwrap_or(d.first_request_timeout),
            max_streams_per_connection: self
                .max_streams_per_connection
                .unwrap_or(d.max_streams_per_connection),
            max_names_per_stream: self.max_names_per_stream.unwrap_or(d.max_names_per_stream),
            max_request_bytes: self.max_request_bytes.unwrap_or(d.max_request_bytes),
            max_buffered_bytes: self.max_buffered_bytes.unwrap_or(d.max_buffered_bytes),
            max_buffered_bytes_per_ip: self
                .max_buffered_bytes_per_ip
                .unwrap_or(d.max_buffered_bytes_per_ip),
            max_requests_per_second: self
                .max_requests_per_second
                .unwrap_or(d.max_requests_per_second),
        }
    }
}

/// The HTTP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address. Default: `0.0.0.0:15014` (Istio's monitoring port).
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Who may read `/debug/*` (the whole registry, every proxy's
    /// configuration, file paths). Default: [`DebugAccess::Local`], as
    /// istiod answers its debug endpoints without authentication only on
    /// localhost. `/metrics`, `/ready` and `/healthz` stay open.
    #[serde(default)]
    pub debug: DebugAccess,
    /// A file holding a bearer token: a request with `Authorization: Bearer
    /// <token>` may read `/debug/*` from any address (relative paths are
    /// relative to the config file; read at start and on reload's restart).
    #[serde(default)]
    pub debug_token_file: Option<PathBuf>,
}

/// Who may read `/debug/*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DebugAccess {
    /// Loopback peers only (and bearer-token holders).
    #[default]
    Local,
    /// Anyone who reaches the port.
    Any,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            debug: DebugAccess::default(),
            debug_token_file: None,
        }
    }
}

/// VM auto-registration, as Istio's (`PILOT_ENABLE_WORKLOAD_ENTRY_AUTOREGISTRATION`,
/// `PILOT_WORKLOAD_ENTRY_GRACE_PERIOD`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRegistrationConfig {
    /// Register proxies that name a WorkloadGroup. Default: `true`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a VM's workload stays after its last stream closed.
    /// Default: `10s`.
    #[serde(
        default = "default_autoregistration_grace",
        deserialize_with = "duration"
    )]
    pub grace: Duration,
}

impl Default for AutoRegistrationConfig {
    fn default() -> Self {
        AutoRegistrationConfig {
            enabled: true,
            grace: default_autoregistration_grace(),
        }
    }
}

fn default_autoregistration_grace() -> Duration {
    crate::vm::DEFAULT_GRACE
}

/// The etcd store of VM registrations (see `meshreg_adapters::etcd`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`. At least one.
    pub endpoints: Vec<String>,
    /// The prefix of every key meshreg writes. Default: `/meshreg`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// The TTL of this replica's lease: how long its registrations outlive
    /// it. Default: `10s` (at least 2 s).
    #[serde(default = "default_etcd_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    /// The adapters' form, for the replicas of `cluster` (the federation
    /// cluster id, or `default`).
    pub fn store(&self, cluster: &str) -> meshreg_adapters::etcd::Config {
        meshreg_adapters::etcd::Config {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.trim_end_matches('/').to_string(),
            lease_ttl: self.lease_ttl,
            cluster: cluster.to_string(),
        }
    }
}

impl Config {
    /// The etcd store of this daemon's cluster, when `etcd` is set: VM
    /// registrations are shared by the replicas of one cluster (its
    /// federation cluster id, else `default`).
    pub fn etcd_store(&self) -> Option<meshreg_adapters::etcd::Config> {
        let cluster = self
            .federation
            .as_ref()
            .map_or("default", |f| f.cluster_id.as_str());
        self.etcd.as_ref().map(|e| e.store(cluster))
    }
}

/// Federation through etcd: what this cluster exports, as whom, and
/// whether it imports the others'.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// This cluster's id, carried by its exported endpoints. Required.
    pub cluster_id: String,
    /// This cluster's network, carried by its exported endpoints whose own
    /// network is empty. Default: empty.
    #[serde(default)]
    pub network: String,
    /// Which services this cluster exports. Default: none.
    #[serde(default)]
    pub export: ExportConfig,
    /// Serve the services other clusters export. Default: `true`.
    #[serde(default = "default_true")]
    pub import: bool,
}

/// One network's gateways.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Its east-west gateways.
    #[serde(default)]
    pub gateways: Vec<GatewayConfig>,
}

/// An east-west gateway: the address and port other networks reach it at.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Its IP address.
    pub address: std::net::IpAddr,
    /// Its port. Default: `15443` (Istio's).
    #[serde(default = "default_gateway_port")]
    pub port: u16,
}

fn default_gateway_port() -> u16 {
    15443
}

impl Config {
    /// The Kubernetes DNS domain proxyless gRPC clients' short names expand
    /// to: the first Kubernetes source's `domain`, else `cluster.local`.
    pub fn cluster_domain(&self) -> &str {
        self.sources
            .iter()
            .find_map(|s| match s {
                SourceConfig::Kubernetes { domain, .. }
                | SourceConfig::KubernetesClusters { domain, .. } => Some(domain.as_str()),
                _ => None,
            })
            .unwrap_or("cluster.local")
    }

    /// The xDS server's form of [`Config::networks`].
    pub fn network_gateways(&self) -> meshreg_xds::NetworkGateways {
        self.networks
            .iter()
            .map(|(name, n)| {
                let gateways = n
                    .gateways
                    .iter()
                    .map(|g| meshreg_xds::NetworkGateway {
                        address: g.address,
                        port: g.port,
                    })
                    .collect();
                (name.clone(), gateways)
            })
            .collect()
    }
}

/// Which services a cluster exports: listed hostnames, and those whose
/// labels include every one of `labels`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Hostnames exported.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Labels that export a service carrying all of them (empty: none).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_etcd_prefix() -> String {
    "/meshreg".into()
}

fn default_etcd_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Debounce settings, as durations such as `100ms` or `1s`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebounceConfig {
    /// Quiet time after the last change. Default: `100ms`; `0s` pushes at once.
    #[serde(default = "default_debounce_after", deserialize_with = "duration")]
    pub after: Duration,
    /// Longest delay of a batch. Default: `150ms`, so that steady churn
    /// still reaches proxies within ~200 ms (see BENCHMARKS.md).
    #[serde(default = "default_debounce_max", deserialize_with = "duration")]
    pub max: Duration,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        DebounceConfig {
            after: default_debounce_after(),
            max: default_debounce_max(),
        }
    }
}

/// One source of services.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory of Istio ServiceEntry/WorkloadEntry YAML files.
    Serviceentry {
        /// The directory (relative paths are relative to the config file).
        dir: PathBuf,
        /// Namespace of objects that name none. Default: `default`.
        #[serde(default = "default_namespace")]
        default_namespace: String,
        /// Full rescan interval, a safety net under file notifications.
        /// Default: `5s`.
        #[serde(default = "default_rescan", deserialize_with = "duration")]
        rescan_interval: Duration,
        /// Hosts of `resolution: DNS`/`DNS_ROUND_ROBIN` entries that meshreg
        /// resolves itself and serves as EDS endpoints. Default: none (the
        /// proxies resolve them, as with istiod).
        #[serde(default)]
        resolve_dns: Option<ResolveDnsConfig>,
    },
    /// A Kubernetes cluster's Services and EndpointSlices.
    Kubernetes {
        /// The kubeconfig file; its current context is used (relative paths
        /// are relative to the config file). Absent: the in-cluster
        /// credentials of the Pod meshreg runs in.
        #[serde(default)]
        kubeconfig: Option<PathBuf>,
        /// The cluster's id: endpoints and VIPs carry it, and the source is
        /// named after it. One source per cluster id.
        cluster_id: String,
        /// The network of the cluster's endpoints. Default: none.
        #[serde(default)]
        network: String,
        /// The Services' DNS domain. Default: `cluster.local`.
        #[serde(default = "default_domain")]
        domain: String,
    },
    /// Kubernetes clusters from a directory of kubeconfig files, one per
    /// cluster, named after the cluster id (like Istio's remote secrets);
    /// files added, removed or rotated take effect without a restart.
    #[serde(rename = "kubernetes-clusters")]
    KubernetesClusters {
        /// The directory (relative paths are relative to the config file).
        dir: PathBuf,
        /// The network of every cluster's endpoints. Default: none.
        #[serde(default)]
        network: String,
        /// The Services' DNS domain. Default: `cluster.local`.
        #[serde(default = "default_domain")]
        domain: String,
        /// How often the directory is read. Default: `5s`.
        #[serde(default = "default_rescan", deserialize_with = "duration")]
        rescan_interval: Duration,
    },
    /// A Consul datacenter's catalog and health, through an agent.
    Consul(ConsulSource),
    /// Services found by DNS lookups meshreg makes (SRV, A/AAAA).
    Dns(DnsSource),
}

/// A source's DNS-resolved hosts that meshreg resolves itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveDnsConfig {
    /// Host patterns: `*`, `*.example.com`, or exact hostnames.
    pub hosts: Vec<String>,
    /// Name servers, `ip` or `ip:port`. Default: the system's.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// See the `dns` source. Default: `5s`.
    #[serde(default = "default_ttl_floor", deserialize_with = "duration")]
    pub ttl_floor: Duration,
    /// See the `dns` source. Default: `5m`.
    #[serde(default = "default_ttl_ceiling", deserialize_with = "duration")]
    pub ttl_ceiling: Duration,
    /// See the `dns` source. Default: `5m`.
    #[serde(default = "default_stale_for", deserialize_with = "duration")]
    pub stale_for: Duration,
}

impl ResolveDnsConfig {
    /// The adapters' configuration.
    ///
    /// # Errors
    ///
    /// No host pattern, a pattern that is not `*`, `*.<domain>` or a host
    /// name, a name server that is not an address, a zero floor or a
    /// ceiling below it.
    pub fn adapter_config(&self) -> Result<meshreg_adapters::dns::ResolveConfig, String> {
        if self.hosts.is_empty() {
            return Err("resolve_dns.hosts: at least one host pattern is needed".into());
        }
        for h in &self.hosts {
            let name = h.strip_prefix("*.").unwrap_or(h);
            if h != "*" && (name.is_empty() || name.contains('*')) {
                return Err(format!(
                    "resolve_dns.hosts: {h:?} is not *, *.<domain> or a host name"
                ));
            }
        }
        if self.ttl_floor.is_zero() || self.ttl_ceiling < self.ttl_floor {
            return Err(
                "resolve_dns: ttl_floor must be above zero and ttl_ceiling at least ttl_floor"
                    .into(),
            );
        }
        Ok(meshreg_adapters::dns::ResolveConfig {
            hosts: self.hosts.clone(),
            resolver: meshreg_adapters::dns::ResolverConfig {
                nameservers: parse_nameservers(&self.nameservers)
                    .map_err(|e| format!("resolve_dns.{e}"))?,
                ttl_floor: self.ttl_floor,
                ttl_ceiling: self.ttl_ceiling,
                stale_for: self.stale_for,
            },
        })
    }
}

/// Refuses a protocol name Istio does not know (it would silently become
/// "unspecified").
fn known_protocol(name: &str) -> Result<(), String> {
    if meshreg_registry::Protocol::parse(name) == meshreg_registry::Protocol::Unspecified {
        return Err(format!(
            "{name:?} is not a protocol (HTTP, HTTP2, GRPC, HTTPS, TLS, TCP, MONGO, REDIS, MYSQL)"
        ));
    }
    Ok(())
}

/// `ip` or `ip:port` (port 53 by default).
fn parse_nameservers(list: &[String]) -> Result<Vec<SocketAddr>, String> {
    list.iter()
        .map(|ns| {
            ns.parse::<SocketAddr>()
                .or_else(|_| {
                    ns.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| format!("nameservers: {ns:?} is not ip or ip:port"))
        })
        .collect()
}

/// A `dns` source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSource {
    /// The source's name (`dns/<name>`). Default: `dns`.
    #[serde(default = "default_dns_name")]
    pub name: String,
    /// Name servers, `ip` or `ip:port` (`[v6]:port`). Default: the
    /// system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// The shortest time an answer is kept (and the retry interval after
    /// a failure). Default: `5s`.
    #[serde(default = "default_ttl_floor", deserialize_with = "duration")]
    pub ttl_floor: Duration,
    /// The longest time an answer is kept. Default: `5m`.
    #[serde(default = "default_ttl_ceiling", deserialize_with = "duration")]
    pub ttl_ceiling: Duration,
    /// How long a name that stopped existing keeps its last answer.
    /// Default: `5m`.
    #[serde(default = "default_stale_for", deserialize_with = "duration")]
    pub stale_for: Duration,
    /// The registry namespace of the services. Default: `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// `MESH_EXTERNAL` (default, as a ServiceEntry's) or `MESH_INTERNAL`.
    #[serde(default = "default_location")]
    pub location: String,
    /// The services: each an `srv` name or a `host` name with `ports`.
    pub services: Vec<DnsServiceConfig>,
}

/// One service of a `dns` source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsServiceConfig {
    /// An SRV name, e.g. `_http._tcp.api.example.internal`.
    #[serde(default)]
    pub srv: Option<String>,
    /// A host name whose A/AAAA records are the endpoints.
    #[serde(default)]
    pub host: Option<String>,
    /// The hostname of an `srv` service. Default: the SRV name without
    /// its `_service._proto` labels.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The protocol of an `srv` service's ports. Default: `TCP`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The ports of a `host` service.
    #[serde(default)]
    pub ports: Vec<DnsPortConfig>,
}

/// A port of a `host` service of a `dns` source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsPortConfig {
    /// The port clients connect to.
    pub number: u16,
    /// Its name, unique within the service.
    pub name: String,
    /// Istio's protocol name. Default: `TCP`.
    #[serde(default = "default_tcp")]
    pub protocol: String,
    /// The endpoints' port. Default: `number`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl DnsSource {
    /// The adapter's configuration.
    ///
    /// # Errors
    ///
    /// A message naming the field: a name server that is not an address, a
    /// service that is neither or both of `srv` and `host`, an unknown
    /// `location`, and what the adapter refuses.
    pub fn adapter_config(&self) -> Result<meshreg_adapters::dns::Config, String> {
        use meshreg_adapters::dns::{Config, Lookup, ResolverConfig};
        let nameservers = parse_nameservers(&self.nameservers)?;
        let location = match self.location.as_str() {
            "MESH_EXTERNAL" => meshreg_registry::Location::MeshExternal,
            "MESH_INTERNAL" => meshreg_registry::Location::MeshInternal,
            other => {
                return Err(format!(
                    "location: {other:?} is not MESH_EXTERNAL or MESH_INTERNAL"
                ));
            }
        };
        let mut lookups = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            let lookup = match (&s.srv, &s.host) {
                (Some(name), None) => {
                    if !s.ports.is_empty() {
                        return Err(format!(
                            "services[{i}].ports: an srv service's ports come from its records"
                        ));
                    }
                    let protocol = s.protocol.clone().unwrap_or_else(default_tcp);
                    known_protocol(&protocol)
                        .map_err(|e| format!("services[{i}].protocol: {e}"))?;
                    Lookup::Srv {
                        name: name.clone(),
                        hostname: s.hostname.clone(),
                        protocol,
                    }
                }
                (None, Some(name)) => {
                    if s.hostname.is_some() || s.protocol.is_some() {
                        return Err(format!(
                            "services[{i}]: hostname and protocol are for srv services (a host's ports name their protocol)"
                        ));
                    }
                    for p in &s.ports {
                        known_protocol(&p.protocol)
                            .map_err(|e| format!("services[{i}].ports: {e}"))?;
                    }
                    Lookup::Host {
                        name: name.clone(),
                        ports: s
                            .ports
                            .iter()
                            .map(|p| meshreg_registry::Port {
                                name: p.name.clone(),
                                number: p.number,
                                protocol: meshreg_registry::Protocol::parse(&p.protocol),
                                target_port: p.target_port,
                            })
                            .collect(),
                    }
                }
                _ => return Err(format!("services[{i}]: set one of srv and host")),
            };
            lookups.push(lookup);
        }
        let config = Config {
            name: self.name.clone(),
            resolver: ResolverConfig {
                nameservers,
                ttl_floor: self.ttl_floor,
                ttl_ceiling: self.ttl_ceiling,
                stale_for: self.stale_for,
            },
            lookups,
            namespace: self.namespace.clone(),
            location,
        };
        meshreg_adapters::dns::DnsAdapter::validate(&config).map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// A `consul` source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSource {
    /// The agent's HTTP API, `http://host:port`.
    pub address: String,
    /// The datacenter read; the endpoints' cluster id and region.
    /// Default: the agent's own.
    #[serde(default)]
    pub datacenter: String,
    /// A file holding the ACL token (relative paths are relative to
    /// the config file). At most one of `token_file` and `token_env`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the ACL token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The hostname template, with `{service}` and `{datacenter}`.
    /// Default: `{service}.service.consul`.
    #[serde(default = "default_consul_hostname")]
    pub hostname: String,
    /// The registry namespace of the services. Default: `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The network of the endpoints. Default: none.
    #[serde(default)]
    pub network: String,
    /// Whether a warning check keeps an instance healthy. Default: true.
    #[serde(default = "default_true")]
    pub warning_is_healthy: bool,
    /// The node meta key holding the zone. Default: `zone`.
    #[serde(default = "default_zone_node_meta")]
    pub zone_node_meta: String,
    /// How long a blocking query waits. Default: `5m` (at most `10m`).
    #[serde(default = "default_consul_wait", deserialize_with = "duration")]
    pub wait: Duration,
    /// Queries in flight at once (one per service when idle).
    /// Default: 150.
    #[serde(default = "default_consul_queries")]
    pub max_concurrent_queries: usize,
}

impl ConsulSource {
    /// The adapter's configuration.
    pub fn adapter_config(&self) -> meshreg_adapters::consul::Config {
        use meshreg_adapters::consul::{Config, Token};
        let token = match (&self.token_file, &self.token_env) {
            (Some(file), _) => Token::File(file.clone()),
            (None, Some(var)) => Token::Env(var.clone()),
            (None, None) => Token::None,
        };
        Config {
            address: self.address.clone(),
            datacenter: self.datacenter.clone(),
            token,
            hostname: self.hostname.clone(),
            namespace: self.namespace.clone(),
            network: self.network.clone(),
            warning_is_healthy: self.warning_is_healthy,
            zone_node_meta: self.zone_node_meta.clone(),
            wait: self.wait,
            max_concurrent_queries: self.max_concurrent_queries,
        }
    }
}

/// Why a configuration was refused: the file, the field path and the
/// reason, as one message.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates `text`; relative source paths are resolved
    /// against `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(de)
            .map_err(|e| ConfigError(format!("{origin}: {}: {}", e.path(), e.inner())))?;
        if config.sources.is_empty() {
            return Err(ConfigError(format!(
                "{origin}: sources: at least one source is needed"
            )));
        }
        if let Some(etcd) = &config.etcd {
            if etcd.endpoints.is_empty() {
                return Err(ConfigError(format!(
                    "{origin}: etcd.endpoints: at least one endpoint is needed"
                )));
            }
            if let Some(bad) = etcd
                .endpoints
                .iter()
                .find(|e| e.strip_prefix("http://").is_none_or(str::is_empty))
            {
                return Err(ConfigError(format!(
                    "{origin}: etcd.endpoints: {bad:?} is not an http:// URL (TLS to etcd is not supported yet)"
                )));
            }
            if !etcd.prefix.starts_with('/') || etcd.prefix.trim_end_matches('/').is_empty() {
                return Err(ConfigError(format!(
                    "{origin}: etcd.prefix: {:?} must start with / and name something",
                    etcd.prefix
                )));
            }
            if etcd.lease_ttl < Duration::from_secs(2) {
                return Err(ConfigError(format!(
                    "{origin}: etcd.lease_ttl: at least 2s"
                )));
            }
        }
        for (name, network) in &config.networks {
            if network.gateways.iter().any(|g| g.port == 0) {
                return Err(ConfigError(format!(
                    "{origin}: networks.{name}.gateways: port 0"
                )));
            }
        }
        if let Some(federation) = &config.federation {
            if config.etcd.is_none() {
                return Err(ConfigError(format!(
                    "{origin}: federation: needs an etcd section (the store clusters share)"
                )));
            }
            if federation.cluster_id.is_empty() || federation.cluster_id.contains('/') {
                return Err(ConfigError(format!(
                    "{origin}: federation.cluster_id: {:?} must be a non-empty name without /",
                    federation.cluster_id
                )));
            }
        }
        let limits = config.xds.limits.limits();
        for (field, zero) in [
            ("max_connections", limits.max_connections == 0),
            ("max_connections_per_ip", limits.max_connections_per_ip == 0),
            ("preface_timeout", limits.preface_timeout.is_zero()),
            (
                "first_request_timeout",
                limits.first_request_timeout.is_zero(),
            ),
            (
                "max_streams_per_connection",
                limits.max_streams_per_connection == 0,
            ),
            ("max_names_per_stream", limits.max_names_per_stream == 0),
            ("max_request_bytes", limits.max_request_bytes == 0),
            (
                "max_buffered_bytes",
                limits.max_buffered_bytes < limits.max_request_bytes,
            ),
            (
                "max_buffered_bytes_per_ip",
                limits.max_buffered_bytes_per_ip < limits.max_request_bytes,
            ),
            (
                "max_requests_per_second",
                limits.max_requests_per_second == 0,
            ),
        ] {
            if zero {
                return Err(ConfigError(format!(
                    "{origin}: xds.limits.{field}: must be greater than zero (max_buffered_bytes and max_buffered_bytes_per_ip: at least max_request_bytes)"
                )));
            }
        }
        if let Some(tls) = &mut config.xds.tls {
            for (field, path) in [
                ("cert_file", Some(&mut tls.cert_file)),
                ("key_file", Some(&mut tls.key_file)),
                ("client_ca_file", tls.client_ca_file.as_mut()),
            ] {
                let Some(path) = path else { continue };
                if path.as_os_str().is_empty() {
                    return Err(ConfigError(format!(
                        "{origin}: xds.tls.{field}: must not be empty"
                    )));
                }
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
            if tls.listen == config.xds.listen && tls.listen.port() != 0 {
                return Err(ConfigError(format!(
                    "{origin}: xds.tls.listen: must differ from xds.listen (plaintext stays on its own listener)"
                )));
            }
        }
        if config.http.listen == config.xds.listen && config.http.listen.port() != 0 {
            return Err(ConfigError(format!(
                "{origin}: http.listen: must differ from xds.listen ({})",
                config.xds.listen
            )));
        }
        if let Some(path) = &mut config.http.debug_token_file {
            if path.as_os_str().is_empty() {
                return Err(ConfigError(format!(
                    "{origin}: http.debug_token_file: must not be empty"
                )));
            }
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if config.debounce.max < config.debounce.after {
            return Err(ConfigError(format!(
                "{origin}: debounce.max ({:?}) is shorter than debounce.after ({:?})",
                config.debounce.max, config.debounce.after
            )));
        }
        for (i, source) in config.sources.iter_mut().enumerate() {
            let bad = |field: &str, why: &str| {
                ConfigError(format!("{origin}: sources[{i}].{field}: {why}"))
            };
            // A path set in the file: not empty, and relative to the file.
            let resolve = |path: &mut PathBuf, field: &str| -> Result<(), ConfigError> {
                if path.as_os_str().is_empty() {
                    return Err(bad(field, "must not be empty"));
                }
                if path.is_relative() {
                    *path = base.join(&*path);
                }
                Ok(())
            };
            // Absolute too: a directory names its source, and filesystem
            // events name absolute paths.
            let resolve_dir = |dir: &mut PathBuf| -> Result<(), ConfigError> {
                resolve(dir, "dir")?;
                *dir = std::path::absolute(&*dir)
                    .map_err(|e| bad("dir", &format!("{}: {e}", dir.display())))?;
                Ok(())
            };
            let not_empty = |field: &str, value: &str| -> Result<(), ConfigError> {
                if value.is_empty() {
                    return Err(bad(field, "must not be empty"));
                }
                Ok(())
            };
            let not_zero = |field: &str, value: &Duration| -> Result<(), ConfigError> {
                if value.is_zero() {
                    return Err(bad(field, "must be greater than zero"));
                }
                Ok(())
            };
            match source {
                SourceConfig::Serviceentry {
                    dir,
                    rescan_interval,
                    default_namespace,
                    resolve_dns,
                } => {
                    if let Some(Err(e)) = resolve_dns.as_ref().map(ResolveDnsConfig::adapter_config)
                    {
                        return Err(ConfigError(format!("{origin}: sources[{i}].{e}")));
                    }
                    resolve_dir(dir)?;
                    not_zero("rescan_interval", rescan_interval)?;
                    not_empty("default_namespace", default_namespace)?;
                    // A missing directory is a source error (retried, the
                    // source not ready); one that is a file is a mistake.
                    if dir.exists() && !dir.is_dir() {
                        return Err(bad("dir", &format!("{} is not a directory", dir.display())));
                    }
                }
                SourceConfig::Kubernetes {
                    kubeconfig,
                    cluster_id,
                    domain,
                    ..
                } => {
                    if let Some(kubeconfig) = kubeconfig {
                        resolve(kubeconfig, "kubeconfig")?;
                    }
                    not_empty("cluster_id", cluster_id)?;
                    not_empty("domain", domain)?;
                }
                SourceConfig::KubernetesClusters {
                    dir,
                    domain,
                    rescan_interval,
                    ..
                } => {
                    resolve_dir(dir)?;
                    not_empty("domain", domain)?;
                    not_zero("rescan_interval", rescan_interval)?;
                }
                SourceConfig::Dns(dns) => {
                    if let Err(e) = dns.adapter_config() {
                        return Err(ConfigError(format!("{origin}: sources[{i}]: {e}")));
                    }
                }
                SourceConfig::Consul(consul) => {
                    if let Some(file) = &mut consul.token_file {
                        resolve(file, "token_file")?;
                    }
                    if consul.token_file.is_some() && consul.token_env.is_some() {
                        return Err(bad("token_env", "set token_file or token_env, not both"));
                    }
                    if let Err(e) = consul.adapter_config().validate() {
                        return Err(ConfigError(format!("{origin}: sources[{i}]: {e}")));
                    }
                }
            }
        }
        // One source per cluster id (the id names the source).
        let mut ids: Vec<&str> = config
            .sources
            .iter()
            .filter_map(|s| match s {
                SourceConfig::Kubernetes { cluster_id, .. } => Some(cluster_id.as_str()),
                SourceConfig::Serviceentry { .. }
                | SourceConfig::KubernetesClusters { .. }
                | SourceConfig::Consul(_)
                | SourceConfig::Dns(_) => None,
            })
            .collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError(format!(
                "{origin}: sources: cluster_id {} is configured twice (one source per cluster)",
                w[0]
            )));
        }
        // The same directory under two spellings (`se/../se`, a symlink)
        // is still one directory: compare real paths where they exist.
        let mut dirs: Vec<PathBuf> = config
            .sources
            .iter()
            .filter_map(|s| match s {
                SourceConfig::Serviceentry { dir, .. } => {
                    Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
                }
                SourceConfig::KubernetesClusters { dir, .. } => {
                    Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
                }
                SourceConfig::Kubernetes { .. }
                | SourceConfig::Consul(_)
                | SourceConfig::Dns(_) => None,
            })
            .collect();
        dirs.sort();
        if let Some(w) = dirs.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError(format!(
                "{origin}: sources: {} is configured twice (one source per directory)",
                w[0].display()
            )));
        }
        // One source per Consul datacenter and agent, one per DNS source
        // name (they name the source).
        let mut consuls: Vec<String> = config
            .sources
            .iter()
            .filter_map(|s| match s {
                SourceConfig::Consul(c) => Some(format!(
                    "Consul source {}",
                    c.adapter_config().source_name()
                )),
                SourceConfig::Dns(d) => Some(format!("DNS source {}", d.name)),
                _ => None,
            })
            .collect();
        consuls.sort_unstable();
        if let Some(w) = consuls.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError(format!(
                "{origin}: sources: {} is configured twice",
                w[0]
            )));
        }
        Ok(config)
    }

    /// The cluster ids of the configured `kubernetes` sources.
    pub fn cluster_ids(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                SourceConfig::Kubernetes { cluster_id, .. } => Some(cluster_id.clone()),
                _ => None,
            })
            .collect()
    }

    /// Reads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
                let base = path.parent().unwrap_or(Path::new("."));
                Config::parse(&text, &path.display().to_string(), base)
            }
            None => {
                // The embedded default names files under examples/bookinfo:
                // from the working directory if it is a checkout, else from
                // the checkout the binary was built in.
                let local = Path::new("examples/bookinfo");
                let base = if local.join("config").is_dir() {
                    local.to_path_buf()
                } else {
                    write_embedded_example()?
                };
                Config::parse(EMBEDDED_DEFAULT, "embedded default config", &base)
            }
        }
    }
}

/// The bookinfo ServiceEntries, embedded so the default config works from
/// any working directory and for a binary copied anywhere.
const EMBEDDED_FILES: &[(&str, &str)] = &[
    (
        "details.yaml",
        include_str!("../examples/bookinfo/config/details.yaml"),
    ),
    (
        "productpage.yaml",
        include_str!("../examples/bookinfo/config/productpage.yaml"),
    ),
    (
        "ratings.yaml",
        include_str!("../examples/bookinfo/config/ratings.yaml"),
    ),
    (
        "reviews.yaml",
        include_str!("../examples/bookinfo/config/reviews.yaml"),
    ),
];

/// Writes the embedded example into this user's private directory under
/// the system temporary directory, `meshreg-bookinfo-<uid>` (mode 0700),
/// and returns the base the default config's relative `dir: config`
/// resolves against. At the first load of a process the `config`
/// directory is emptied and the files written, so a run starts from the
/// embedded example; on a reload it is left alone, so edits made meanwhile
/// (files added or removed too) stay.
///
/// # Errors
///
/// When the directory cannot be written, or exists and is not a directory
/// of this user that others cannot open (another user could otherwise
/// decide what the daemon serves).
fn write_embedded_example() -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The files were written by this process.
    static WRITTEN: AtomicBool = AtomicBool::new(false);

    // SAFETY: geteuid has no preconditions, cannot fail and touches no
    // memory of ours.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::geteuid() };
    let base = std::env::temp_dir().join(format!("meshreg-bookinfo-{uid}"));
    let dir = base.join("config");
    let fail = |e: std::io::Error| {
        ConfigError(format!(
            "writing the embedded example to {}: {e}",
            dir.display()
        ))
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&base) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(fail(e)),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(&base).map_err(fail)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(ConfigError(format!(
            "{} is not a private directory of this user (a directory owned by uid {uid} with mode 0700): remove it, or run with --config",
            base.display()
        )));
    }
    if WRITTEN.swap(true, Ordering::SeqCst) {
        // A reload: the files as they are now (edited, added or removed).
        return Ok(base);
    }
    // A start: exactly the embedded files (an earlier run's edits and
    // additions go).
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
        _ => {}
    }
    std::fs::create_dir_all(&dir).map_err(fail)?;
    for (name, text) in EMBEDDED_FILES {
        std::fs::write(dir.join(name), text).map_err(fail)?;
    }
    Ok(base)
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

fn default_true() -> bool {
    true
}

fn default_xds_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15010))
}
fn default_xds_tls_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15012))
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15014))
}
fn default_debounce_after() -> Duration {
    Duration::from_millis(100)
}
fn default_debounce_max() -> Duration {
    Duration::from_millis(150)
}
fn default_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_namespace() -> String {
    "default".into()
}
fn default_domain() -> String {
    meshreg_adapters::kubernetes::DEFAULT_DOMAIN.into()
}
fn default_consul_hostname() -> String {
    meshreg_adapters::consul::DEFAULT_HOSTNAME.into()
}
fn default_zone_node_meta() -> String {
    "zone".into()
}
fn default_consul_wait() -> Duration {
    Duration::from_secs(300)
}
fn default_consul_queries() -> usize {
    150
}
fn default_dns_name() -> String {
    "dns".into()
}
fn default_ttl_floor() -> Duration {
    Duration::from_secs(5)
}
fn default_ttl_ceiling() -> Duration {
    Duration::from_secs(300)
}
fn default_stale_for() -> Duration {
    Duration::from_secs(300)
}
fn default_location() -> String {
    "MESH_EXTERNAL".into()
}
fn default_tcp() -> String {
    "TCP".into()
}
fn default_rescan() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse(EMBEDDED_DEFAULT, "embedded", Path::new("/x")).unwrap();
        assert_eq!(c.sources.len(), 1);
        let SourceConfig::Serviceentry { dir, .. } = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        assert!(dir.starts_with("/x"));
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(
            "sources: [{kind: serviceentry, dir: d}]",
            "t",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.xds.listen.port(), 15010);
        assert_eq!(c.http.listen.port(), 15014);
        assert_eq!(c.debounce.after, Duration::from_millis(100));
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse(
            "debounce: {after: soon}\nsources: [{kind: serviceentry, dir: d}]",
            "t.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("debounce.after"), "{e}");
        let e = Config::parse(
            "sources: [{kind: serviceentry, dri: d}]",
            "t.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("dri"), "{e}");
        let e = Config::parse("sources: []", "t.yaml", Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("at least one"), "{e}");
    }

    #[test]
    fn etcd_and_autoregistration_are_checked() {
        let parse = |extra: &str| {
            Config::parse(
                &format!("{extra}\nsources: [{{kind: serviceentry, dir: d}}]"),
                "t.yaml",
                Path::new("."),
            )
        };
        let ok = parse("etcd: {endpoints: [\"http://127.0.0.1:2379\"]}").unwrap();
        let store = ok.etcd_store().unwrap();
        assert_eq!(
            (
                store.prefix.as_str(),
                store.lease_ttl,
                store.cluster.as_str()
            ),
            ("/meshreg", Duration::from_secs(10), "default")
        );
        assert!(ok.autoregistration.enabled);
        assert_eq!(ok.autoregistration.grace, Duration::from_secs(10));
        for (bad, why) in [
            ("etcd: {endpoints: []}", "at least one endpoint"),
            ("etcd: {endpoints: [\"127.0.0.1:2379\"]}", "not an http://"),
            ("etcd: {endpoints: [\"https://e:2379\"]}", "not an http://"),
            ("etcd: {endpoints: [\"http://\"]}", "not an http://"),
            (
                "etcd: {endpoints: [\"http://e\"], prefix: meshreg}",
                "must start with /",
            ),
            (
                "etcd: {endpoints: [\"http://e\"], prefix: /}",
                "must start with /",
            ),
            (
                "etcd: {endpoints: [\"http://e\"], lease_ttl: 1s}",
                "at least 2s",
            ),
            ("autoregistration: {grace: soon}", "autoregistration.grace"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_same_directory_under_two_spellings_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let se = tmp.path().join("se");
        std::fs::create_dir(&se).unwrap();
        std::os::unix::fs::symlink(&se, tmp.path().join("link")).unwrap();
        for other in ["se/../se", "link"] {
            let e = Config::parse(
                &format!(
                    "sources: [{{kind: serviceentry, dir: se}}, {{kind: serviceentry, dir: {other}, default_namespace: x}}]"
                ),
                "t.yaml",
                tmp.path(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("twice"), "{other}: {e}");
        }
    }

    #[test]
    fn one_source_per_directory_and_no_empty_dir() {
        let e = Config::parse(
            "sources: [{kind: serviceentry, dir: /a/b}, {kind: serviceentry, dir: /a/./b, default_namespace: x}]",
            "t.yaml",
            Path::new("."),
        );
        // `absolute` keeps `.` components on some platforms; compare what
        // it gives.
        if let Err(e) = e {
            assert!(e.to_string().contains("twice"), "{e}");
        }
        let e = Config::parse(
            "sources: [{kind: serviceentry, dir: /a/b}, {kind: serviceentry, dir: /a/b, default_namespace: x}]",
            "t.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = Config::parse(
            "sources: [{kind: serviceentry, dir: ''}]",
            "t.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sources[0].dir"), "{e}");
        let c = Config::parse(
            "sources: [{kind: serviceentry, dir: rel}]",
            "t.yaml",
            Path::new("base"),
        )
        .unwrap();
        let SourceConfig::Serviceentry { dir, .. } = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        assert!(
            dir.is_absolute() && dir.ends_with("base/rel"),
            "{}",
            dir.display()
        );
    }

    #[test]
    fn source_settings_are_checked_before_anything_binds() {
        // Issue 9: both passed `--check` and failed after binding.
        let e = Config::parse(
            "sources: [{kind: serviceentry, dir: d, rescan_interval: 0s}]",
            "t.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sources[0].rescan_interval"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = Config::parse(
            &format!(
                "sources: [{{kind: serviceentry, dir: {}}}]",
                file.path().display()
            ),
            "t.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        // A missing directory is not a config error (the source waits).
        Config::parse(
            "sources: [{kind: serviceentry, dir: /nonexistent/meshreg}]",
            "t.yaml",
            Path::new("."),
        )
        .unwrap();
    }

    #[test]
    fn the_http_and_xds_ports_differ() {
        let err = Config::parse(
            "xds: {listen: 127.0.0.1:15010}\nhttp: {listen: 127.0.0.1:15010}\nsources: [{kind: serviceentry, dir: d}]",
            "t.yaml",
            Path::new("/base"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("http.listen: must differ from xds.listen"),
            "{err}"
        );
        // Port 0 picks two free ports.
        Config::parse(
            "xds: {listen: 127.0.0.1:0}\nhttp: {listen: 127.0.0.1:0}\nsources: [{kind: serviceentry, dir: d}]",
            "t.yaml",
            Path::new("/base"),
        )
        .unwrap();
    }

    #[test]
    fn the_embedded_example_works_from_anywhere() {
        use std::os::unix::fs::PermissionsExt;

        let base = write_embedded_example().unwrap();
        for (name, text) in EMBEDDED_FILES {
            assert_eq!(
                std::fs::read_to_string(base.join("config").join(name)).unwrap(),
                *text
            );
        }
        // A fresh user's report: it was one fixed directory for every user.
        let mode = std::fs::metadata(&base).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}: {mode:o}", base.display());
    }

    #[test]
    fn kubernetes_sources_resolve_their_kubeconfig_and_need_unique_cluster_ids() {
        let c = Config::parse(
            "sources: [{kind: kubernetes, kubeconfig: kube/c1.yaml, cluster_id: c1}]",
            "t.yaml",
            Path::new("/base"),
        )
        .unwrap();
        let SourceConfig::Kubernetes {
            kubeconfig,
            cluster_id,
            network,
            domain,
        } = &c.sources[0]
        else {
            panic!("{:?}", c.sources[0]);
        };
        assert_eq!(kubeconfig.as_deref(), Some(Path::new("/base/kube/c1.yaml")));
        assert_eq!(
            (cluster_id.as_str(), network.as_str(), domain.as_str()),
            ("c1", "", "cluster.local")
        );
        let twice = Config::parse(
            "sources: [{kind: kubernetes, kubeconfig: a, cluster_id: c1},\n\
             {kind: kubernetes, kubeconfig: b, cluster_id: c1}]",
            "t.yaml",
            Path::new("/base"),
        )
        .unwrap_err();
        assert!(
            twice
                .to_string()
                .contains("cluster_id c1 is configured twice"),
            "{twice}"
        );
        let empty = Config::parse(
            "sources: [{kind: kubernetes, kubeconfig: a, cluster_id: ''}]",
            "t.yaml",
            Path::new("/base"),
        )
        .unwrap_err();
        assert!(
            empty
                .to_string()
                .contains("sources[0].cluster_id: must not be empty"),
            "{empty}"
        );
    }

    #[test]
    fn the_kubernetes_examples_are_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kubernetes"));
        for file in ["meshreg.yaml", "meshreg-multicluster.yaml"] {
            let c = Config::load(Some(&dir.join(file))).unwrap();
            assert_eq!(c.sources.len(), 1, "{file}");
        }
    }

    #[test]
    fn a_relative_kubeconfig_directory_is_made_absolute() {
        let c = Config::parse(
            "sources: [{kind: kubernetes-clusters, dir: remotes}]",
            "t.yaml",
            Path::new("rel/base"),
        )
        .unwrap();
        let SourceConfig::KubernetesClusters { dir, .. } = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        assert!(
            dir.is_absolute() && dir.ends_with("rel/base/remotes"),
            "{}",
            dir.display()
        );
    }

    #[test]
    fn consul_sources_take_defaults_and_refuse_what_cannot_work() {
        let c = Config::parse(
            "sources: [{kind: consul, address: 'http://127.0.0.1:8500', token_file: tok}]",
            "t.yaml",
            Path::new("/base"),
        )
        .unwrap();
        let SourceConfig::Consul(consul) = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        let a = consul.adapter_config();
        assert_eq!(
            a.token,
            meshreg_adapters::consul::Token::File("/base/tok".into())
        );
        assert_eq!(a.hostname, "{service}.service.consul");
        assert_eq!(a.namespace, "default");
        assert!(a.warning_is_healthy);
        assert_eq!(a.wait, Duration::from_secs(300));
        for (text, why) in [
            (
                "{kind: consul, address: '127.0.0.1:8500'}",
                "is not http://host:port",
            ),
            (
                "{kind: consul, address: 'http://a:1', token_file: f, token_env: V}",
                "sources[0].token_env: set token_file or token_env, not both",
            ),
            (
                "{kind: consul, address: 'http://a:1', hostname: fixed.local}",
                "does not contain {service}",
            ),
            ("{kind: consul, address: 'http://a:1', wait: 11m}", "wait"),
            (
                "{kind: consul, address: 'http://a:1', tags: x}",
                "unknown field `tags`",
            ),
        ] {
            let e = Config::parse(&format!("sources: [{text}]"), "t.yaml", Path::new("/b"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        let twice = Config::parse(
            "sources: [{kind: consul, address: 'http://a:1', datacenter: x},\n\
             {kind: consul, address: 'http://a:1', datacenter: x}]",
            "t.yaml",
            Path::new("/b"),
        )
        .unwrap_err();
        assert!(
            twice
                .to_string()
                .contains("x@http://a:1 is configured twice"),
            "{twice}"
        );
    }

    #[test]
    fn the_consul_examples_are_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/consul"));
        for (file, sources) in [("meshreg.yaml", 1), ("meshreg-two-datacenters.yaml", 3)] {
            let c = Config::load(Some(&dir.join(file))).unwrap();
            assert_eq!(c.sources.len(), sources, "{file}");
        }
    }

    #[test]
    fn the_vm_example_is_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vm"));
        let c = Config::load(Some(&dir.join("meshreg.yaml"))).unwrap();
        assert_eq!(c.sources.len(), 1);
        assert!(c.etcd.is_some() && c.autoregistration.enabled);
    }

    #[test]
    fn dns_sources_build_their_lookups_and_refuse_what_cannot_work() {
        let c = Config::parse(
            "sources: [{kind: dns, nameservers: ['127.0.0.1:5353', '::1'], services: [\n\
             {srv: _http._tcp.api.example.internal, protocol: HTTP},\n\
             {host: db.example.internal, ports: [{number: 5432, name: pg}]}]}]",
            "t.yaml",
            Path::new("/b"),
        )
        .unwrap();
        let SourceConfig::Dns(d) = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        let a = d.adapter_config().unwrap();
        assert_eq!(
            a.resolver.nameservers,
            [
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(a.lookups[0].hostname(), "api.example.internal");
        assert_eq!(a.lookups[1].hostname(), "db.example.internal");
        assert_eq!(a.resolver.ttl_floor, Duration::from_secs(5));
        for (text, why) in [
            ("{kind: dns, services: []}", "at least one service"),
            (
                "{kind: dns, services: [{srv: _a._tcp.x.test, host: x.test}]}",
                "set one of srv and host",
            ),
            (
                "{kind: dns, services: [{host: x.test}]}",
                "a host needs ports",
            ),
            (
                "{kind: dns, nameservers: [nope], services: [{srv: _a._tcp.x.test}]}",
                "is not ip or ip:port",
            ),
            (
                "{kind: dns, location: OUTSIDE, services: [{srv: _a._tcp.x.test}]}",
                "location",
            ),
            (
                "{kind: dns, ttl_floor: 10s, ttl_ceiling: 1s, services: [{srv: _a._tcp.x.test}]}",
                "below ttl_floor",
            ),
        ] {
            let e = Config::parse(&format!("sources: [{text}]"), "t.yaml", Path::new("/b"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        let twice = Config::parse(
            "sources: [{kind: dns, services: [{srv: _a._tcp.x.test}]},\n\
             {kind: dns, services: [{srv: _a._tcp.y.test}]}]",
            "t.yaml",
            Path::new("/b"),
        )
        .unwrap_err();
        assert!(
            twice
                .to_string()
                .contains("DNS source dns is configured twice"),
            "{twice}"
        );
    }

    #[test]
    fn the_dns_example_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/dns/meshreg.yaml"
        ));
        let c = Config::load(Some(path)).unwrap();
        let SourceConfig::Dns(d) = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        assert_eq!(d.adapter_config().unwrap().lookups.len(), 2);
    }

    #[test]
    fn resolve_dns_on_a_service_entry_source_is_checked() {
        let c = Config::parse(
            "sources: [{kind: serviceentry, dir: se, resolve_dns: {hosts: ['*.example.internal'], nameservers: ['10.0.0.2']}}]",
            "t.yaml",
            Path::new("/b"),
        )
        .unwrap();
        let SourceConfig::Serviceentry { resolve_dns, .. } = &c.sources[0] else {
            panic!("{:?}", c.sources[0]);
        };
        let r = resolve_dns.as_ref().unwrap().adapter_config().unwrap();
        assert!(r.matches("db.example.internal") && !r.matches("db.example.org"));
        assert_eq!(
            r.resolver.nameservers,
            ["10.0.0.2:53".parse::<SocketAddr>().unwrap()]
        );
        for (text, why) in [
            ("resolve_dns: {hosts: []}", "at least one host pattern"),
            (
                "resolve_dns: {hosts: ['a*b']}",
                "is not *, *.<domain> or a host name",
            ),
            (
                "resolve_dns: {hosts: ['*'], nameservers: [x]}",
                "resolve_dns.nameservers",
            ),
        ] {
            let e = Config::parse(
                &format!("sources: [{{kind: serviceentry, dir: se, {text}}}]"),
                "t.yaml",
                Path::new("/b"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}

/// The README's configuration reference is tested against these types, so
/// the two cannot drift: the reference parses as a valid config, and every
/// field each section accepts (as serde reports it for an unknown field)
/// appears in the reference's text for that section.
#[cfg(test)]
mod reference {
    use super::*;

    const README: &str = include_str!("../README.md");

    /// The first ```yaml block after "## Configuration reference".
    fn reference() -> &'static str {
        let from = README
            .find("## Configuration reference")
            .expect("README has a configuration reference");
        let rest = &README[from..];
        let start = rest.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
        let len = rest[start..].find("```").expect("the block ends");
        &rest[start..start + len]
    }

    /// The fields serde accepts where `yaml` puts the key `__probe__`.
    fn fields(yaml: &str) -> Vec<String> {
        let err = Config::parse(yaml, "probe", Path::new("/")).expect_err("the probe is refused");
        let text = err.to_string();
        assert!(text.contains("unknown field `__probe__`"), "{text}");
        let list = text
            .split_once("expected one of ")
            .or_else(|| text.split_once("expected "))
            .map(|(_, l)| l)
            .unwrap_or_else(|| panic!("{text}"));
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The part of the reference for the source item `- kind: <kind>`.
    fn source_item(kind: &str) -> &'static str {
        let text = reference();
        let marker = format!("- kind: {kind} ");
        let start = text
            .find(&marker)
            .or_else(|| text.find(&format!("- kind: {kind}\n")))
            .unwrap_or_else(|| panic!("the reference has no `- kind: {kind}` source"));
        let end = text[start + 2..]
            .find("\n  - kind: ")
            .map_or(text.len(), |e| start + 2 + e);
        &text[start..end]
    }

    fn assert_documented(section: &str, text: &str, fields: &[String]) {
        for f in fields {
            if f == "kind" {
                continue;
            }
            assert!(
                text.contains(&format!("{f}:")),
                "README's configuration reference does not show `{f}` of {section}"
            );
        }
    }

    #[test]
    fn the_reference_parses_as_a_config() {
        let config = Config::parse(reference(), "README", Path::new("/etc/meshreg"))
            .unwrap_or_else(|e| panic!("README's configuration reference: {e}"));
        assert!(config.sources.len() >= 5);
    }

    #[test]
    fn the_reference_shows_every_field() {
        let source = "sources: [{kind: serviceentry, dir: x}]";
        let all = reference();
        for (section, probe) in [
            ("the top level", format!("__probe__: 1\n{source}")),
            ("xds", format!("xds: {{__probe__: 1}}\n{source}")),
            ("http", format!("http: {{__probe__: 1}}\n{source}")),
            ("debounce", format!("debounce: {{__probe__: 1}}\n{source}")),
            (
                "xds.limits",
                format!("xds: {{limits: {{__probe__: 1}}}}\n{source}"),
            ),
            (
                "xds.tls",
                format!("xds: {{tls: {{cert_file: c, key_file: k, __probe__: 1}}}}\n{source}"),
            ),
        ] {
            assert_documented(section, all, &fields(&probe));
        }
        for (kind, required) in [
            ("serviceentry", "dir: x"),
            ("kubernetes", "cluster_id: c"),
            ("kubernetes-clusters", "dir: x"),
            ("consul", "address: http://127.0.0.1:8500"),
            ("dns", "services: []"),
        ] {
            let probe = format!("sources: [{{kind: {kind}, {required}, __probe__: 1}}]");
            assert_documented(kind, source_item(kind), &fields(&probe));
        }
        let nested = [
            (
                "serviceentry's resolve_dns",
                "sources: [{kind: serviceentry, dir: x, resolve_dns: {hosts: [a], __probe__: 1}}]",
                source_item("serviceentry"),
            ),
            (
                "a dns service",
                "sources: [{kind: dns, services: [{host: a, __probe__: 1}]}]",
                source_item("dns"),
            ),
            (
                "a dns service port",
                "sources: [{kind: dns, services: [{host: a, ports: [{number: 1, __probe__: 1}]}]}]",
                source_item("dns"),
            ),
        ];
        for (section, probe, text) in nested {
            assert_documented(section, text, &fields(probe));
        }
    }
}
