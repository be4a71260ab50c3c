//! The `consul` adapter: one Consul datacenter's catalog and health, read
//! through one agent's HTTP API with blocking queries, as one registry
//! source.
//!
//! # Layout
//!
//! - `convert`: pure, one health answer → one service declaration and one
//!   endpoint shard per instance (hostname template, ports and protocol,
//!   tags and meta → labels, health and weight as Consul's own xDS server
//!   computes them; see its docs).
//! - `client`: the two HTTP queries, the ACL token header and why this is
//!   not a client crate.
//! - `watch`: the I/O. One blocking query on `/v1/catalog/services`, one
//!   per service on `/v1/health/service/<name>`, the index rules, the
//!   backoff, what was sent, and the updates.
//!
//! # Behaviour
//!
//! - Once the catalog and every service's first answer are in, one
//!   [`Update::Reset`] with every object; then each answer whose index
//!   moved becomes one [`Update::Patch`] holding only the instances that
//!   changed (a health flip of one instance costs one shard of one
//!   service). A service gone from the catalog is withdrawn.
//! - Blocking queries follow Consul's rules: the index goes back to 0
//!   when it goes backwards, is never below 1 otherwise, and each query
//!   loop is rate-limited (a token bucket, burst 2, one token per 250 ms),
//!   so an agent that answers at once with an unchanged index is not spun
//!   on. At most `max_concurrent_queries` queries are in flight (one per
//!   service is the steady state: each holds one connection to the agent,
//!   whose `limits.http_max_conns_per_client` must allow them).
//! - The agent unreachable or erroring: the source is reported stale once
//!   per outage with the reason, its last state kept; queries are retried
//!   with exponential backoff (0.5 s to 30 s, full jitter). The first
//!   answer afterwards re-sends the state (`Reset`).
//! - An instance that cannot be converted is logged and counted
//!   (`invalid`); the others are unaffected.
//! - The ACL token is sent as the `X-Consul-Token` header, never logged;
//!   it is read from a file or an environment variable, and read again
//!   after a `403`.

mod client;
mod convert;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use meshreg_registry::{SourceId, SourceKind, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::metrics::Metrics;

/// The hostname template unless configured: Consul's DNS name.
pub const DEFAULT_HOSTNAME: &str = "{service}.service.consul";

/// Where the ACL token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// No token (the agent's default token applies).
    None,
    /// A file holding the token (surrounding whitespace ignored).
    File(PathBuf),
    /// An environment variable holding the token.
    Env(String),
}

/// Configuration of one [`ConsulAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The agent's HTTP API, `http://host:port`.
    pub address: String,
    /// The datacenter to read (`?dc=`); empty: the agent's own. It is the
    /// endpoints' cluster id and locality region (each node's own
    /// datacenter when empty).
    pub datacenter: String,
    /// The ACL token.
    pub token: Token,
    /// The hostname template: `{service}` and `{datacenter}` are replaced.
    /// Default: [`DEFAULT_HOSTNAME`].
    pub hostname: String,
    /// The registry namespace of the services. Default `default` (Istio's
    /// former Consul adapter's).
    pub namespace: String,
    /// The endpoints' network (empty: the default).
    pub network: String,
    /// Whether an instance with a warning check stays in the healthy set
    /// (Consul's xDS server keeps it unless `OnlyPassing`). Default true.
    pub warning_is_healthy: bool,
    /// The node meta key holding the zone. Default `zone`.
    pub zone_node_meta: String,
    /// How long one blocking query waits for a change (at most 10 min,
    /// Consul's limit). Default 5 min.
    pub wait: Duration,
    /// Queries in flight at once, at least 1. Default 150: one blocking
    /// query per service holds one connection, and the agent accepts 200
    /// per client address by default (`limits.http_max_conns_per_client`),
    /// which the catalog query and other clients on the host share. With
    /// more services, the queries take turns (see `watch`).
    pub max_concurrent_queries: usize,
}

impl Config {
    /// The configuration with every default for the agent at `address`.
    pub fn new(address: impl Into<String>) -> Config {
        Config {
            address: address.into(),
            datacenter: String::new(),
            token: Token::None,
            hostname: DEFAULT_HOSTNAME.into(),
            namespace: "default".into(),
            network: String::new(),
            warning_is_healthy: true,
            zone_node_meta: "zone".into(),
            wait: Duration::from_secs(300),
            max_concurrent_queries: 150,
        }
    }

    /// Checks what [`ConsulAdapter::run`] would refuse (see there).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        watch::validate(self)
    }

    /// The source's name: the datacenter when set, else the address.
    pub fn source_name(&self) -> String {
        if self.datacenter.is_empty() {
            self.address.clone()
        } else {
            format!("{}@{}", self.datacenter, self.address)
        }
    }
}

/// Watches one Consul datacenter's catalog and health and sends the
/// registry its state once, then what changes.
#[derive(Debug)]
pub struct ConsulAdapter {
    config: Config,
    metrics: Metrics,
    source: SourceId,
}

// === impl ConsulAdapter ===

impl ConsulAdapter {
    /// An adapter for `config`, reporting into `metrics`. Nothing is read
    /// until [`ConsulAdapter::run`].
    pub fn new(config: Config, metrics: Metrics) -> Self {
        let source = SourceId::new(SourceKind::Consul, config.source_name());
        ConsulAdapter {
            config,
            metrics,
            source,
        }
    }

    /// The registry source this adapter sends as: kind `consul`, named
    /// `<datacenter>@<address>` (or the address alone).
    pub fn source_id(&self) -> SourceId {
        self.source.clone()
    }

    /// Queries the agent until `shutdown` is cancelled or `sink` is closed
    /// (both return `Ok`).
    ///
    /// # Errors
    ///
    /// Only configuration errors: an address that is not `http://host:port`,
    /// an empty hostname template or namespace, a wait of zero or above
    /// 10 min, `max_concurrent_queries` 0. An unreachable agent is a source
    /// problem: reported stale, logged, counted and retried.
    pub async fn run(self, sink: mpsc::Sender<Update>, shutdown: CancellationToken) -> Result<()> {
        watch::run(self.config, self.metrics, self.source, sink, shutdown).await
    }
}
