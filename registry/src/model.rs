//! The registry's model: services and the endpoints (workload instances)
//! behind them, independent of the platform they came from.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use crate::source::SourceId;

/// A fully qualified service hostname, e.g. `reviews.default.svc.cluster.local`.
///
/// Cheap to clone; compares and hashes as the string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hostname(Arc<str>);

impl Hostname {
    /// The hostname as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Hostname {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<String> for Hostname {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl Borrow<str> for Hostname {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The application protocol of a port, as Istio names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP/1.1 (may be upgraded).
    Http,
    /// HTTP/2 without TLS.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// HTTPS: TLS carrying HTTP, opaque to the proxy.
    Https,
    /// TLS, opaque to the proxy.
    Tls,
    /// Opaque TCP.
    Tcp,
    /// UDP.
    Udp,
    /// MongoDB.
    Mongo,
    /// Redis.
    Redis,
    /// MySQL.
    Mysql,
    /// Not declared or not recognised: treated as TCP with protocol sniffing.
    Unspecified,
}

impl Protocol {
    /// Parses Istio's protocol names (case-insensitive, e.g. `HTTP`,
    /// `grpc-web` counts as gRPC, `http2`). Unknown names give
    /// [`Protocol::Unspecified`].
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "GRPC" | "GRPC-WEB" => Protocol::Grpc,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "MONGO" => Protocol::Mongo,
            "REDIS" => Protocol::Redis,
            "MYSQL" => Protocol::Mysql,
            _ => Protocol::Unspecified,
        }
    }

    /// Whether upstream connections must speak HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Port {
    /// The port's name, unique within the service (endpoints map their own
    /// port numbers by this name).
    pub name: String,
    /// The port number clients connect to.
    pub number: u16,
    /// The application protocol.
    pub protocol: Protocol,
    /// The port on endpoints when an endpoint does not name one
    /// (ServiceEntry `targetPort`, Kubernetes `targetPort`); `None` means the
    /// same as [`Port::number`].
    pub target_port: Option<u16>,
}

/// How the proxy finds the instances of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// The registry knows the endpoint addresses (EDS).
    Static,
    /// The proxy resolves the endpoints' (or the host's) DNS names and
    /// balances over every address (Envoy `STRICT_DNS`).
    Dns,
    /// The proxy resolves one name and connects to the first address it
    /// gets, re-resolving per connection (Istio `DNS_ROUND_ROBIN`, Envoy
    /// `LOGICAL_DNS`): for large services behind DNS.
    DnsRoundRobin,
    /// Passthrough: the proxy forwards to the original destination.
    None,
}

/// Whether a service is part of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Inside the mesh (workloads run a sidecar or are mesh-aware).
    MeshInternal,
    /// Outside the mesh.
    MeshExternal,
}

/// A service: a hostname with ports, reached through its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    /// The fully qualified hostname.
    pub hostname: Hostname,
    /// The namespace (or equivalent) the service was declared in.
    pub namespace: String,
    /// The ports, in declaration order.
    pub ports: Vec<Port>,
    /// How endpoints are found.
    pub resolution: Resolution,
    /// Whether the service is in the mesh.
    pub location: Location,
    /// Labels of the service object itself.
    pub labels: BTreeMap<String, String>,
    /// Namespaces the service is visible to (`*` for all, `.` for its own);
    /// empty means all.
    pub export_to: Vec<String>,
    /// Virtual IPs or CIDR ranges of the service per cluster id (the empty
    /// key holds addresses that apply everywhere).
    pub addresses: BTreeMap<String, Vec<String>>,
    /// Labels of the workloads of its namespace that are its endpoints
    /// (ServiceEntry `workloadSelector`); `None` selects none.
    pub workload_selector: Option<BTreeMap<String, String>>,
    /// The source that declared it (stamped by the registry's writer).
    pub source: SourceId,
}

impl Service {
    /// Whether `other` has the same shape: every field but the declaring
    /// source (which does not change what proxies are sent).
    pub fn same_shape(&self, other: &Service) -> bool {
        self.hostname == other.hostname
            && self.namespace == other.namespace
            && self.ports == other.ports
            && self.resolution == other.resolution
            && self.location == other.location
            && self.labels == other.labels
            && self.export_to == other.export_to
            && self.addresses == other.addresses
            && self.workload_selector == other.workload_selector
    }

    /// The port with this number, if any.
    pub fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }
}

/// Where an endpoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A Unix domain socket path (`unix:///path` in Istio's syntax, without
    /// the scheme).
    Unix(String),
    /// A DNS name the proxy resolves (only meaningful for DNS resolution).
    Dns(String),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(ip) => write!(f, "{ip}"),
            Address::Unix(path) => write!(f, "unix://{path}"),
            Address::Dns(name) => f.write_str(name),
        }
    }
}

/// Where a workload runs: region, zone and sub-zone (each may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    /// The region, e.g. `us-central1`.
    pub region: String,
    /// The zone, e.g. `us-central1-a`.
    pub zone: String,
    /// The sub-zone (rack, host group).
    pub subzone: String,
}

impl Locality {
    /// Parses Istio's `region/zone/subzone` form (missing parts are empty).
    pub fn parse(s: &str) -> Self {
        let mut parts = s.splitn(3, '/');
        let mut next = || parts.next().unwrap_or_default().to_string();
        Locality {
            region: next(),
            zone: next(),
            subzone: next(),
        }
    }
}

impl fmt::Display for Locality {
    /// Istio's `region/zone/subzone` form, the inverse of
    /// [`Locality::parse`]: empty trailing parts are left out (`us/a`,
    /// `us`, or nothing for an empty locality).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = format!("{}/{}/{}", self.region, self.zone, self.subzone);
        f.write_str(whole.trim_end_matches('/'))
    }
}

/// Health of an endpoint as its platform reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Ready to serve.
    #[default]
    Healthy,
    /// Failing its checks.
    Unhealthy,
    /// Shutting down: finish in-flight requests, send no new ones.
    Draining,
    /// The platform does not say.
    Unknown,
}

/// Whether the workload accepts Istio mutual TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsMode {
    /// The workload has a sidecar that accepts Istio mTLS.
    Istio,
    /// Plain text (or the application's own TLS).
    #[default]
    Disabled,
}

/// `s` as an [`Endpoint`]'s shared string (cluster id, network, service
/// account); the empty string is one process-wide copy, so endpoints that
/// do not set them allocate nothing for them.
pub fn shared_str(s: &str) -> Arc<str> {
    static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
    if s.is_empty() {
        EMPTY.clone()
    } else {
        Arc::from(s)
    }
}

/// `locality` as an [`Endpoint`]'s shared locality; the empty locality is
/// one process-wide copy, like the empty string of [`shared_str`].
pub fn shared_locality(locality: Locality) -> Arc<Locality> {
    static NONE: LazyLock<Arc<Locality>> = LazyLock::new(Arc::default);
    if locality == Locality::default() {
        NONE.clone()
    } else {
        Arc::new(locality)
    }
}

/// One workload instance behind a service.
///
/// Its locality and its cluster id, network and service account are
/// shared pointers (8 and 16 bytes instead of 72 and 24): most endpoints
/// of a shard have the same ones, and the registry makes equal values
/// share one copy when it stores a shard. 184 bytes inline.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Where the workload is reached.
    pub address: Address,
    /// The workload's port per service port name; a service port not listed
    /// here uses its target port (see [`Endpoint::port_for`]).
    pub ports: BTreeMap<String, u16>,
    /// Workload labels (they select subsets).
    pub labels: BTreeMap<String, String>,
    /// Where the workload runs (shared: the endpoints of a shard in one
    /// locality hold one copy).
    pub locality: Arc<Locality>,
    /// The cluster the workload runs in (empty if not clustered).
    pub cluster_id: Arc<str>,
    /// The network the address is reachable on (empty: the default network).
    pub network: Arc<str>,
    /// Health as reported by the platform.
    pub health: Health,
    /// Load-balancing weight; 0 means unset (the proxy's default of 1).
    pub weight: u32,
    /// Failover priority, 0 the highest: traffic goes to priority 1 only
    /// when priority 0 is not healthy enough (Envoy's
    /// `LocalityLbEndpoints.priority`; DNS SRV priorities, ranked).
    pub priority: u32,
    /// The workload's identity (service account).
    pub service_account: Arc<str>,
    /// Whether the workload speaks Istio mTLS.
    pub tls_mode: TlsMode,
    /// The workload's name (pod name, WorkloadEntry name, node name).
    pub workload_name: String,
    /// Whether the endpoint serves only the ports named in
    /// [`Endpoint::ports`], as a Kubernetes EndpointSlice's endpoints do
    /// (istiod keeps a slice's endpoint only for the service ports the slice
    /// names); `false`: every port of its service, as a ServiceEntry's.
    pub listed_ports_only: bool,
    /// The source that reported the endpoint (stamped by the registry's
    /// writer).
    pub source: SourceId,
}

/// The canonical endpoint order: locality, then address, then ports, then
/// everything else, so the same endpoints give the same order (and the same
/// resource versions) whatever order they arrived in.
pub(crate) fn canonical_order(a: &Endpoint, b: &Endpoint) -> std::cmp::Ordering {
    (&a.locality, &a.address, &a.ports, &a.labels)
        .cmp(&(&b.locality, &b.address, &b.ports, &b.labels))
        .then_with(|| {
            (&a.cluster_id, &a.network, a.health, a.weight, a.priority).cmp(&(
                &b.cluster_id,
                &b.network,
                b.health,
                b.weight,
                b.priority,
            ))
        })
        .then_with(|| {
            (&a.service_account, a.tls_mode, &a.workload_name, &a.source).cmp(&(
                &b.service_account,
                b.tls_mode,
                &b.workload_name,
                &b.source,
            ))
        })
}

/// Makes the endpoints of `endpoints` hold one copy of each distinct
/// locality, cluster id, network and service account among them (a shard
/// or a merged list has few: one per zone, cluster or workload identity).
/// The last [`SHARED_DISTINCT`] distinct values of each are remembered;
/// a value seen earlier than that keeps its own copy.
pub(crate) fn share_equal_values(endpoints: &mut [Endpoint]) {
    fn share<T: PartialEq + ?Sized>(mine: &mut Arc<T>, seen: &mut Vec<Arc<T>>) {
        match seen.iter().position(|s| **s == **mine) {
            Some(i) => *mine = seen[i].clone(),
            None => {
                if seen.len() == SHARED_DISTINCT {
                    seen.remove(0);
                }
                seen.push(mine.clone());
            }
        }
    }
    let (mut localities, mut clusters, mut networks, mut accounts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in endpoints {
        share(&mut e.locality, &mut localities);
        share(&mut e.cluster_id, &mut clusters);
        share(&mut e.network, &mut networks);
        share(&mut e.service_account, &mut accounts);
    }
}

/// How many distinct values of each shared field [`share_equal_values`]
/// remembers (a linear scan each: a few comparisons per endpoint).
const SHARED_DISTINCT: usize = 8;

impl Endpoint {
    /// A healthy endpoint at `address` reported by `source`, with nothing
    /// else set: no labels, default locality and network, unset weight,
    /// plain text.
    pub fn new(address: Address, source: SourceId) -> Self {
        Endpoint {
            address,
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
            locality: shared_locality(Locality::default()),
            cluster_id: shared_str(""),
            network: shared_str(""),
            health: Health::Healthy,
            weight: 0,
            priority: 0,
            service_account: shared_str(""),
            tls_mode: TlsMode::Disabled,
            workload_name: String::new(),
            listed_ports_only: false,
            source,
        }
    }

    /// The port to reach this endpoint on for `port` of its service: the
    /// endpoint's own mapping by port name, else the service's target port,
    /// else the service port number; `None` when the endpoint serves only
    /// its listed ports and `port` is not one of them.
    pub fn port_for(&self, port: &Port) -> Option<u16> {
        match self.ports.get(&port.name) {
            Some(p) => Some(*p),
            None if self.listed_ports_only => None,
            None => Some(port.target_port.unwrap_or(port.number)),
        }
    }
}
