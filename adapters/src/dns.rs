//! The `dns` adapter: services discovered by DNS lookups meshreg makes
//! itself (with `hickory-resolver`), as one registry source: SRV names
//! whose targets and ports are the endpoints, and host names whose A and
//! AAAA records are. The proxies then get EDS clusters, which proxyless
//! gRPC clients (that resolve no DNS clusters) can use too.
//!
//! # Layout
//!
//! - `resolve`: the resolver (system configuration or explicit name
//!   servers), one lookup of a name, its TTL and how it failed.
//! - `convert`: pure, one answer → one service declaration and one
//!   endpoint shard; the per-name state that decides what a failed lookup
//!   keeps (see its docs).
//! - `watch`: one task per configured name, re-resolving when its TTL runs
//!   out (within the configured floor and ceiling), and the updates.
//! - `layer`: the same resolution for another source's DNS-resolved
//!   services ([`ResolveConfig`]): between that source's adapter and the
//!   registry, it turns their host names into EDS endpoints.
//!
//! # Behaviour
//!
//! - Once every name has been looked up once, one [`Update::Reset`]; then
//!   each answer that differs replaces that name's shard ([`Update::Patch`]).
//! - A lookup that fails (timeout, refused, server failure, no server)
//!   keeps the last good answer: a failure never empties an endpoint set.
//!   The source is reported stale once per outage, and the failure logged
//!   and counted once per change of state; the name is retried after the
//!   TTL floor.
//! - A name that does not exist (NXDOMAIN) or has no records keeps its
//!   last answer for `stale_for`, then its endpoints are removed (the
//!   declaration stays, with no endpoints).

mod convert;
mod layer;
mod resolve;
mod watch;

pub use layer::{FIRST_ANSWERS, ResolveConfig};

use std::net::SocketAddr;
use std::time::Duration;

use meshreg_registry::{Location, Port, SourceId, SourceKind, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::metrics::Metrics;

/// How names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Name servers to ask (UDP, then TCP); empty: the system's
    /// (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// The shortest time an answer is kept before it is asked again (a TTL
    /// of 0 is common for local records), and the retry interval after a
    /// failure. Default 5 s.
    pub ttl_floor: Duration,
    /// The longest time an answer is kept, whatever its TTL. Default 5 min.
    pub ttl_ceiling: Duration,
    /// How long a name that stopped existing (NXDOMAIN, no records) keeps
    /// its last answer before its endpoints are removed. Default 5 min.
    pub stale_for: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            ttl_floor: Duration::from_secs(5),
            ttl_ceiling: Duration::from_secs(300),
            stale_for: Duration::from_secs(300),
        }
    }
}

/// One service found by DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// An SRV name (e.g. `_http._tcp.api.example.internal`): each target
    /// is an endpoint (its A/AAAA addresses) on the target's port; each
    /// distinct port is a service port with `protocol`; SRV priorities
    /// become Envoy priorities (ranked: the lowest SRV priority is 0) and
    /// SRV weights load-balancing weights.
    Srv {
        /// The SRV name.
        name: String,
        /// The service's hostname. Default: the SRV name without its
        /// leading `_service._proto` labels.
        hostname: Option<String>,
        /// The ports' protocol (Istio's names). Default `TCP`.
        protocol: String,
    },
    /// A host name whose A and AAAA records are the endpoints, each on
    /// every port of `ports`.
    Host {
        /// The name looked up, and the service's hostname.
        name: String,
        /// The service ports (a `target_port` is the endpoints' port).
        ports: Vec<Port>,
    },
}

impl Lookup {
    /// The name looked up.
    pub fn name(&self) -> &str {
        match self {
            Lookup::Srv { name, .. } | Lookup::Host { name, .. } => name,
        }
    }

    /// The hostname of the service.
    pub fn hostname(&self) -> String {
        match self {
            Lookup::Srv { name, hostname, .. } => hostname
                .clone()
                .unwrap_or_else(|| convert::srv_hostname(name)),
            Lookup::Host { name, .. } => name.trim_end_matches('.').to_string(),
        }
    }
}

/// Configuration of one [`DnsAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The source's name (`dns/<name>`). Default `dns`.
    pub name: String,
    /// How names are resolved.
    pub resolver: ResolverConfig,
    /// The services.
    pub lookups: Vec<Lookup>,
    /// The registry namespace of the services. Default `default`.
    pub namespace: String,
    /// Whether the services are in the mesh. Default `MESH_EXTERNAL` (as a
    /// ServiceEntry's).
    pub location: Location,
}

/// Resolves the configured names and sends the registry their services,
/// then each changed answer.
#[derive(Debug)]
pub struct DnsAdapter {
    config: Config,
    metrics: Metrics,
    source: SourceId,
    /// Why the configuration was refused before the adapter was built.
    refused: Option<String>,
}

// === impl DnsAdapter ===

impl DnsAdapter {
    /// An adapter for `config`, reporting into `metrics`.
    pub fn new(config: Config, metrics: Metrics) -> Self {
        let source = SourceId::new(SourceKind::Dns, config.name.clone());
        DnsAdapter {
            config,
            metrics,
            source,
            refused: None,
        }
    }

    /// An adapter for a configuration that could not be built (`reason`):
    /// it is named `name` and its `run` ends with that configuration
    /// error at once.
    pub fn refused(name: &str, reason: String, metrics: Metrics) -> Self {
        let config = Config {
            name: name.to_string(),
            resolver: ResolverConfig::default(),
            lookups: Vec::new(),
            namespace: String::new(),
            location: Location::MeshExternal,
        };
        DnsAdapter {
            refused: Some(reason),
            ..DnsAdapter::new(config, metrics)
        }
    }

    /// The registry source: kind `dns`, named after `name`.
    pub fn source_id(&self) -> SourceId {
        self.source.clone()
    }

    /// Checks what [`DnsAdapter::run`] would refuse.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Config`]: no lookups, a name or hostname that is not
    /// a DNS name, a host lookup without ports, two lookups for one
    /// hostname, a zero TTL floor or a ceiling below it.
    pub fn validate(config: &Config) -> Result<()> {
        watch::validate(config)
    }

    /// Resolves until `shutdown` or a closed `sink`.
    ///
    /// # Errors
    ///
    /// Configuration errors (see [`DnsAdapter::validate`]). An unreadable
    /// system configuration or unreachable name servers are source
    /// problems: stale, logged, counted, retried.
    pub async fn run(self, sink: mpsc::Sender<Update>, shutdown: CancellationToken) -> Result<()> {
        if let Some(reason) = self.refused {
            return Err(crate::Error::Config {
                adapter: "dns",
                field: "config",
                reason,
            });
        }
        watch::run(self.config, self.metrics, self.source, sink, shutdown).await
    }
}

/// Runs `inner` with its DNS-resolved hosts resolved by meshreg (see
/// [`ResolveConfig`]): its updates go through the resolving layer to
/// `sink`.
pub(crate) async fn run_resolving(
    inner: crate::Adapter,
    config: ResolveConfig,
    metrics: Metrics,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
    let source = inner.source_id();
    let (tx, rx) = mpsc::channel(64);
    let (result, ()) = tokio::join!(
        inner.run(tx, shutdown.clone()),
        layer::run(config, metrics, source, rx, sink, shutdown)
    );
    result
}
