//! Daemon-side resolution of DNS-resolved services: a layer between one
//! source's adapter and the registry that makes meshreg, not Envoy,
//! resolve the hosts of `resolution: DNS` / `DNS_ROUND_ROBIN` services
//! whose hostname matches a configured pattern.
//!
//! For such a host the layer rewrites what the adapter sends:
//!
//! - its declaration becomes EDS-resolved (`STATIC`), so the proxies get
//!   an EDS cluster (which proxyless gRPC clients can use) instead of a
//!   `STRICT_DNS` or `LOGICAL_DNS` one. `DNS_ROUND_ROBIN`'s one-address
//!   rule does not apply any more: every address is an endpoint;
//! - each endpoint named by a host name (a ServiceEntry endpoint
//!   `address: db.example.com`, or the host itself for an entry without
//!   endpoints) becomes one endpoint per A/AAAA address of that name,
//!   with its ports, labels, locality and weight; a name not resolved
//!   (yet, or any more) gives none.
//!
//! Names are resolved as the `dns` source resolves them (TTL within a
//! floor and ceiling, last answer kept through failures and for
//! `stale_for` after NXDOMAIN). The first state is held back until every
//! name has an answer, for at most [`FIRST_ANSWERS`], so proxies do not
//! see the services without endpoints at startup; a name still without an
//! answer then (its server does not answer) leaves the shards using it as
//! the registry holds them ([`Update::ResetKeeping`]), so a restart of the
//! source never withdraws them. A workload selected by
//! such a service whose address is a host name no longer joins it (a
//! registry workload has one address); its own IP-addressed peers do.
//!
//! Everything else passes through unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshreg_registry::{Address, EndpointShard, Object, ObjectKey, Resolution, SourceId, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ResolverConfig;
use super::convert::{NameState, Records};
use super::resolve::Resolver;
use crate::metrics::Metrics;

/// How long the first state waits for every name's first answer.
pub const FIRST_ANSWERS: Duration = Duration::from_secs(5);

/// Which hosts meshreg resolves, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveConfig {
    /// Host patterns: `*` (every DNS-resolved host), `*.example.com` (a
    /// suffix, as Istio's wildcard hosts) or an exact hostname.
    pub hosts: Vec<String>,
    /// How names are resolved.
    pub resolver: ResolverConfig,
}

impl ResolveConfig {
    /// Whether `host` matches one of the patterns.
    pub fn matches(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| match p.strip_prefix('*') {
            Some("") => true,
            Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
            None => p == host,
        })
    }
}

/// One name being resolved.
struct Name {
    ips: Option<Vec<IpAddr>>,
    answered: bool,
    cancel: CancellationToken,
}

/// The layer's state: the adapter's objects as it sent them, and the
/// names they use.
struct Layer {
    config: ResolveConfig,
    source: SourceId,
    /// The adapter's objects, unrewritten.
    originals: BTreeMap<ObjectKey, Object>,
    names: HashMap<String, Name>,
    /// The shards that use each name.
    uses: HashMap<String, BTreeSet<ObjectKey>>,
    /// A Reset waiting for first answers, until this instant.
    pending_reset: Option<Instant>,
}

impl Layer {
    /// Whether `object` is one the layer rewrites.
    fn resolved_here(&self, object: &Object) -> bool {
        match object {
            Object::Service { service, .. } => {
                matches!(
                    service.resolution,
                    Resolution::Dns | Resolution::DnsRoundRobin
                ) && self.config.matches(service.hostname.as_str())
            }
            Object::Endpoints(shard) => self.config.matches(shard.hostname.as_str()),
            _ => false,
        }
    }

    /// The names `object` needs resolved.
    fn names_of(&self, object: &Object) -> Vec<String> {
        match object {
            Object::Endpoints(shard) if self.resolved_here(object) => shard
                .endpoints
                .iter()
                .filter_map(|e| match &e.address {
                    Address::Dns(name) => Some(name.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// `object` as the registry gets it.
    fn rewrite(&self, object: &Object) -> Object {
        if !self.resolved_here(object) {
            return object.clone();
        }
        match object {
            Object::Service { origin, service } => {
                let mut service = service.clone();
                service.resolution = Resolution::Static;
                Object::Service {
                    origin: origin.clone(),
                    service,
                }
            }
            Object::Endpoints(shard) => {
                let mut endpoints = Vec::new();
                for e in &shard.endpoints {
                    match &e.address {
                        Address::Dns(name) => {
                            let ips = self.names.get(name).and_then(|n| n.ips.as_ref());
                            for ip in ips.into_iter().flatten() {
                                let mut resolved = e.clone();
                                resolved.address = Address::Ip(*ip);
                                endpoints.push(resolved);
                            }
                        }
                        _ => endpoints.push(e.clone()),
                    }
                }
                Object::Endpoints(EndpointShard {
                    hostname: shard.hostname.clone(),
                    name: shard.name.clone(),
                    endpoints,
                })
            }
            other => other.clone(),
        }
    }

    /// Records which names `key` uses (none when `object` is `None`).
    fn set_uses(&mut self, key: &ObjectKey, object: Option<&Object>) {
        for shards in self.uses.values_mut() {
            shards.remove(key);
        }
        if let Some(object) = object {
            for name in self.names_of(object) {
                self.uses.entry(name).or_default().insert(key.clone());
            }
        }
        self.uses.retain(|_, shards| !shards.is_empty());
    }

    fn all_answered(&self) -> bool {
        self.names.values().all(|n| n.answered)
    }

    /// The source's whole state. A shard using a name with no answer yet
    /// (its server does not answer) is left as the registry holds it, so
    /// a restarted source (a reload) never withdraws endpoints it cannot
    /// resolve now.
    fn reset(&self) -> Update {
        let waiting: BTreeSet<&ObjectKey> = self
            .names
            .iter()
            .filter(|(_, n)| !n.answered)
            .filter_map(|(name, _)| self.uses.get(name))
            .flatten()
            .collect();
        let objects = self
            .originals
            .iter()
            .filter(|(k, _)| !waiting.contains(k))
            .map(|(_, o)| self.rewrite(o))
            .collect();
        // With nothing to keep, this is a plain reset.
        Update::ResetKeeping {
            source: self.source.clone(),
            objects,
            keep: waiting.into_iter().cloned().collect(),
        }
    }
}

/// One name, resolved until `cancel`; reports its address set when it
/// changes (and the first outcome).
async fn resolve_name(
    name: String,
    resolver: Resolver,
    config: ResolverConfig,
    source: SourceId,
    metrics: Metrics,
    answers: mpsc::Sender<(String, Option<Vec<IpAddr>>)>,
    cancel: CancellationToken,
) {
    let mut state = NameState::default();
    let mut first = true;
    let mut missing = false;
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            o = resolver.ips(&name) => o,
        };
        let was_failing = state.failing;
        let failed = matches!(outcome, super::resolve::Outcome::Failed(_));
        let not_found = matches!(outcome, super::resolve::Outcome::NotFound);
        if not_found && !missing {
            tracing::warn!(source = %source, "{name} does not exist (NXDOMAIN or no records); endpoints named by it are left out once its last answer expires");
            metrics.error(&source, "not_found");
        }
        missing = not_found;
        if let super::resolve::Outcome::Failed(why) = &outcome
            && !was_failing
        {
            tracing::warn!(source = %source, "resolving {name} failed; keeping its last answer: {why}");
            metrics.error(&source, "lookup");
        }
        let (changed, next) = state.apply(outcome.map(Records::Ips), Instant::now(), &config);
        if was_failing && !state.failing && !not_found {
            tracing::info!(source = %source, "{name} resolves again");
        }
        // The first report waits for an answer (a failure is no answer:
        // the shards using the name are kept as they were meanwhile).
        if changed || (first && !failed) {
            first = false;
            let ips = match &state.records {
                Some(Records::Ips(ips)) => Some(ips.clone()),
                _ => None,
            };
            if answers.send((name.clone(), ips)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Runs the layer: `input` from the adapter, `output` to the registry,
/// until `shutdown` or either channel closes.
pub(crate) async fn run(
    config: ResolveConfig,
    metrics: Metrics,
    source: SourceId,
    mut input: mpsc::Receiver<Update>,
    output: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) {
    let resolver = loop {
        match Resolver::new(&config.resolver) {
            Ok(r) => break r,
            Err(why) => {
                tracing::warn!(source = %source, "{why}; DNS-resolved hosts wait for it");
                metrics.error(&source, "resolver_config");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(config.resolver.ttl_floor) => {}
                }
            }
        }
    };
    let tasks = shutdown.child_token();
    let _stop = tasks.clone().drop_guard();
    let (answers_tx, mut answers) = mpsc::channel(64);
    let mut layer = Layer {
        config: config.clone(),
        source: source.clone(),
        originals: BTreeMap::new(),
        names: HashMap::new(),
        uses: HashMap::new(),
        pending_reset: None,
    };
    loop {
        let deadline = layer.pending_reset;
        let mut out = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            update = input.recv() => {
                let Some(update) = update else { return };
                match update {
                    Update::Reset { objects, .. } => {
                        layer.originals = objects.into_iter().map(|o| (o.key(), o)).collect();
                        layer.uses.clear();
                        let all: Vec<(ObjectKey, Object)> =
                            layer.originals.iter().map(|(k, o)| (k.clone(), o.clone())).collect();
                        for (key, object) in &all {
                            layer.set_uses(key, Some(object));
                        }
                        layer.pending_reset = Some(Instant::now() + FIRST_ANSWERS);
                    }
                    Update::Patch { apply, delete, .. } => {
                        for key in &delete {
                            layer.originals.remove(key);
                            layer.set_uses(key, None);
                        }
                        for object in &apply {
                            let key = object.key();
                            layer.set_uses(&key, Some(object));
                            layer.originals.insert(key, object.clone());
                        }
                        if layer.pending_reset.is_none() {
                            out.push(Update::Patch {
                                source: source.clone(),
                                apply: apply.iter().map(|o| layer.rewrite(o)).collect(),
                                delete,
                            });
                        }
                    }
                    Update::Forget { .. } => {
                        layer.originals.clear();
                        layer.uses.clear();
                        layer.pending_reset = None;
                        out.push(update);
                    }
                    other => out.push(other),
                }
                // Start the names now used, stop the others.
                let used: Vec<String> = layer.uses.keys().cloned().collect();
                for name in used {
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        layer.names.entry(name.clone())
                    {
                        let cancel = tasks.child_token();
                        tokio::spawn(resolve_name(
                            name,
                            resolver.clone(),
                            config.resolver.clone(),
                            source.clone(),
                            metrics.clone(),
                            answers_tx.clone(),
                            cancel.clone(),
                        ));
                        slot.insert(Name {
                            ips: None,
                            answered: false,
                            cancel,
                        });
                    }
                }
                let uses = &layer.uses;
                layer.names.retain(|name, n| {
                    let keep = uses.contains_key(name);
                    if !keep {
                        n.cancel.cancel();
                    }
                    keep
                });
            }
            Some((name, ips)) = answers.recv() => {
                if let Some(n) = layer.names.get_mut(&name) {
                    n.ips = ips;
                    n.answered = true;
                    if layer.pending_reset.is_none() {
                        let keys = layer.uses.get(&name).cloned().unwrap_or_default();
                        let apply: Vec<Object> = keys
                            .iter()
                            .filter_map(|k| layer.originals.get(k))
                            .map(|o| layer.rewrite(o))
                            .collect();
                        if !apply.is_empty() {
                            out.push(Update::Patch { source: source.clone(), apply, delete: Vec::new() });
                        }
                    }
                }
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::warn!(
                    source = %source,
                    "some DNS-resolved hosts have no answer after {FIRST_ANSWERS:?}; serving without them"
                );
                layer.pending_reset = None;
                out.push(layer.reset());
            }
        }
        if layer.pending_reset.is_some() && layer.all_answered() {
            layer.pending_reset = None;
            out.push(layer.reset());
        }
        for update in out {
            if output.send(update).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_are_exact_suffix_or_everything() {
        let config = |hosts: &[&str]| ResolveConfig {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            resolver: ResolverConfig::default(),
        };
        assert!(config(&["*"]).matches("a.example.com"));
        let suffix = config(&["*.example.com"]);
        assert!(suffix.matches("a.example.com"));
        assert!(!suffix.matches("example.com"));
        assert!(!suffix.matches("a.example.org"));
        let exact = config(&["db.internal"]);
        assert!(exact.matches("db.internal") && !exact.matches("x.db.internal"));
    }
}
