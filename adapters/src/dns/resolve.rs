//! The resolver: `hickory-resolver` with the system configuration or
//! explicit name servers, and the two lookups the adapter makes.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use super::ResolverConfig;

/// What one lookup gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome<T> {
    /// Records, and how long they may be kept (the answer's TTL).
    Answer(T, Duration),
    /// The name does not exist, or has no records of the type.
    NotFound,
    /// The lookup failed (no answer, a server failure, no server).
    Failed(String),
}

impl<T> Outcome<T> {
    /// The same outcome with the records mapped.
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Answer(t, ttl) => Outcome::Answer(f(t), ttl),
            Outcome::NotFound => Outcome::NotFound,
            Outcome::Failed(why) => Outcome::Failed(why),
        }
    }
}

/// One SRV target with its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) priority: u16,
    pub(crate) weight: u16,
    pub(crate) port: u16,
    /// The target's name, without the final dot.
    pub(crate) name: String,
    pub(crate) ips: Vec<IpAddr>,
}

/// A resolver for the adapter's lookups.
#[derive(Clone)]
pub(crate) struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// A resolver for `config`: its name servers, else the system's.
    ///
    /// # Errors
    ///
    /// The system configuration cannot be read (text for the log).
    pub(crate) fn new(config: &ResolverConfig) -> Result<Resolver, String> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("reading the system resolver configuration: {e}"))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                HickoryConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            )
        };
        // The resolver's cache never keeps an answer longer than the
        // adapter would (it asks again at the TTL, within the bounds).
        let options = builder.options_mut();
        options.positive_max_ttl = Some(config.ttl_ceiling);
        options.negative_max_ttl = Some(config.ttl_floor);
        // Both families, always (the default asks AAAA only without A).
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        let inner = builder
            .build()
            .map_err(|e| format!("building the resolver: {e}"))?;
        Ok(Resolver { inner })
    }

    /// The A and AAAA records of `name`.
    pub(crate) async fn ips(&self, name: &str) -> Outcome<Vec<IpAddr>> {
        match self.inner.lookup_ip(absolute(name)).await {
            Ok(lookup) => {
                let ttl = remaining(lookup.valid_until());
                let mut ips: Vec<IpAddr> = lookup.iter().collect();
                ips.sort_unstable();
                ips.dedup();
                if ips.is_empty() {
                    Outcome::NotFound
                } else {
                    Outcome::Answer(ips, ttl)
                }
            }
            Err(e) => failure(&e),
        }
    }

    /// The SRV records of `name`, each target resolved (a target without
    /// addresses is left out; the TTL is the shortest of all answers).
    pub(crate) async fn srv(&self, name: &str) -> Outcome<Vec<Target>> {
        let lookup = match self.inner.srv_lookup(absolute(name)).await {
            Ok(l) => l,
            Err(e) => return failure(&e),
        };
        let mut ttl = remaining(lookup.valid_until());
        let mut targets = Vec::new();
        for record in lookup.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            let target = srv.target.to_ascii();
            let target = target.trim_end_matches('.').to_string();
            // "." means the service is decidedly not available (RFC 2782).
            if target.is_empty() {
                continue;
            }
            // Port 0 cannot be connected to: that target is left out.
            if srv.port == 0 {
                continue;
            }
            // A target without an address (yet, or for a moment) makes the
            // whole answer a failure, so the last good one is kept rather
            // than losing that target's endpoints at once.
            let ips = match self.ips(&target).await {
                Outcome::Answer(ips, t) => {
                    ttl = ttl.min(t);
                    ips
                }
                Outcome::NotFound => {
                    return Outcome::Failed(format!("SRV target {target} has no address"));
                }
                Outcome::Failed(why) => return Outcome::Failed(format!("{target}: {why}")),
            };
            targets.push(Target {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                name: target,
                ips,
            });
        }
        if targets.is_empty() {
            return Outcome::NotFound;
        }
        targets.sort_by(|a, b| (a.priority, &a.name, a.port).cmp(&(b.priority, &b.name, b.port)));
        Outcome::Answer(targets, ttl)
    }
}

/// `name.` (absolute: no search domains, one query).
fn absolute(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn remaining(until: std::time::Instant) -> Duration {
    until.saturating_duration_since(std::time::Instant::now())
}

fn failure<T>(e: &NetError) -> Outcome<T> {
    if e.is_nx_domain() || e.is_no_records_found() {
        Outcome::NotFound
    } else {
        Outcome::Failed(e.to_string())
    }
}
