//! Pure: DNS answers → registry objects, and what a lookup's outcome does
//! to a name's last answer.
//!
//! - A **host** lookup's addresses are one shard of endpoints that serve
//!   every configured port (their `target_port`, else the port number).
//! - An **SRV** lookup's targets are endpoints on their own ports; each
//!   distinct port is a service port (the first port of the protocol is
//!   named after it, others `<protocol>-<port>`); SRV priorities are ranked
//!   into Envoy priorities per port (lowest SRV priority of the port → 0,
//!   the next → 1, …, so each cluster's are contiguous, as Envoy and gRPC
//!   expect) and an SRV weight is
//!   the endpoint's weight (0, which RFC 2782 allows, becomes 1: Envoy's
//!   minimum). A target with several addresses gives one endpoint each.
//! - Every service is one declaration (origin: the name looked up) and
//!   one shard (named after it) in the source's namespace, EDS-resolved.
//!
//! The name's state ([`NameState`]): an answer replaces what was kept; a
//! failure keeps it (never empties an endpoint set); "does not exist"
//! keeps it for `stale_for` after the last answer, then empties it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meshreg_registry::{
    Address, Endpoint, EndpointShard, Hostname, Location, Object, Port, Resolution, Service,
    SourceId,
};

use super::Lookup;
use super::resolve::{Outcome, Target};

/// The hostname of an SRV name: without its leading `_service._proto`
/// labels (`_http._tcp.api.example.internal` → `api.example.internal`).
pub(crate) fn srv_hostname(name: &str) -> String {
    name.trim_end_matches('.')
        .split('.')
        .skip_while(|l| l.starts_with('_'))
        .collect::<Vec<_>>()
        .join(".")
}

/// What the objects need besides the answer.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) namespace: String,
    pub(crate) location: Location,
    pub(crate) source: SourceId,
}

/// The records kept for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Records {
    Ips(Vec<std::net::IpAddr>),
    Srv(Vec<Target>),
}

/// The declaration and shard of `lookup` with `records` (none: the
/// declaration with no endpoints).
pub(crate) fn objects(lookup: &Lookup, records: Option<&Records>, cx: &Context) -> Vec<Object> {
    let hostname = Hostname::from(lookup.hostname());
    let (ports, endpoints) = match (lookup, records) {
        (Lookup::Host { ports, .. }, Some(Records::Ips(ips))) => (
            ports.clone(),
            ips.iter()
                .map(|ip| Endpoint::new(Address::Ip(*ip), cx.source.clone()))
                .collect(),
        ),
        (Lookup::Host { ports, .. }, _) => (ports.clone(), Vec::new()),
        (Lookup::Srv { protocol, .. }, Some(Records::Srv(targets))) => {
            srv_endpoints(targets, protocol, &cx.source)
        }
        (Lookup::Srv { .. }, _) => (Vec::new(), Vec::new()),
    };
    let mut objects = vec![Object::Endpoints(EndpointShard {
        hostname: hostname.clone(),
        name: lookup.name().to_string(),
        endpoints,
    })];
    // An SRV name with no answer has no ports yet: no declaration (a
    // service needs one), only the empty shard.
    if !ports.is_empty() {
        objects.insert(
            0,
            Object::Service {
                origin: lookup.name().to_string(),
                service: Service {
                    hostname,
                    namespace: cx.namespace.clone(),
                    ports,
                    resolution: Resolution::Static,
                    location: cx.location,
                    labels: BTreeMap::new(),
                    export_to: Vec::new(),
                    addresses: BTreeMap::new(),
                    workload_selector: None,
                    source: cx.source.clone(),
                },
            },
        );
    }
    objects
}

fn srv_endpoints(
    targets: &[Target],
    protocol: &str,
    source: &SourceId,
) -> (Vec<Port>, Vec<Endpoint>) {
    let mut ports = Vec::new();
    for t in targets {
        crate::ports::add(&mut ports, t.port, protocol);
    }
    crate::ports::finish(&mut ports);
    // Ranked per port: each port is its own cluster, whose priorities must
    // start at 0 and be contiguous (gRPC refuses a missing priority 0).
    let rank = |port: u16, p: u16| {
        let ranks: BTreeSet<u16> = targets
            .iter()
            .filter(|t| t.port == port)
            .map(|t| t.priority)
            .collect();
        u32::try_from(ranks.range(..p).count()).unwrap_or(u32::MAX)
    };
    let mut endpoints = Vec::new();
    for t in targets {
        let Some(port_name) = crate::ports::name_of(&ports, t.port) else {
            continue;
        };
        for ip in &t.ips {
            let mut e = Endpoint::new(Address::Ip(*ip), source.clone());
            e.ports.insert(port_name.clone(), t.port);
            e.listed_ports_only = true;
            e.weight = u32::from(t.weight.max(1));
            e.priority = rank(t.port, t.priority);
            e.workload_name.clone_from(&t.name);
            endpoints.push(e);
        }
    }
    (ports, endpoints)
}

/// A name's state between lookups.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameState {
    /// The records kept (what the shard holds).
    pub(crate) records: Option<Records>,
    /// When it was last answered.
    pub(crate) answered_at: Option<Instant>,
    /// Whether the last lookup failed.
    pub(crate) failing: bool,
}

impl NameState {
    /// Applies `outcome` at `now`: whether the kept records changed, and
    /// when to ask again (an answer's TTL within the floor and ceiling;
    /// the floor after a failure or a missing name).
    pub(crate) fn apply(
        &mut self,
        outcome: Outcome<Records>,
        now: Instant,
        config: &super::ResolverConfig,
    ) -> (bool, Duration) {
        match outcome {
            Outcome::Answer(records, ttl) => {
                self.failing = false;
                self.answered_at = Some(now);
                let changed = self.records.as_ref() != Some(&records);
                self.records = Some(records);
                (changed, ttl.clamp(config.ttl_floor, config.ttl_ceiling))
            }
            // Never empties what was kept.
            Outcome::Failed(_) => {
                self.failing = true;
                (false, config.ttl_floor)
            }
            Outcome::NotFound => {
                self.failing = false;
                let expired = self
                    .answered_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= config.stale_for);
                let changed = expired && self.records.take().is_some();
                (changed, config.ttl_floor)
            }
        }
    }
}

#[cfg(test)]
mod tests;
