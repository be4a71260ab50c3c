//! The I/O side of the `dns` adapter: one task per configured name, the
//! sync, the source's staleness, and the updates.
//!
//! Each task owns its name's state ([`NameState`]) and reports to the
//! adapter's loop only when something changed: new objects, the start of
//! a failure, a recovery. The loop owns what was sent and the sink.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use meshreg_registry::{Object, ObjectKey, SourceId, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::convert::{self, Context, NameState, Records};
use super::resolve::{Outcome, Resolver};
use super::{Config, Lookup};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How long to wait before building the resolver again when the system
/// configuration cannot be read.
const CONFIG_RETRY: Duration = Duration::from_secs(5);

/// What a name's task tells the loop.
#[derive(Debug)]
enum Report {
    /// The name's objects (first lookup, or the kept records changed).
    Objects(Vec<Object>),
    /// Lookups started failing (the last answer is kept).
    Failed(String),
    /// Lookups answer again, with nothing changed.
    Recovered,
}

pub(super) fn validate(config: &Config) -> Result<()> {
    let bad = |field: &'static str, reason: String| Error::Config {
        adapter: "dns",
        field,
        reason,
    };
    if config.name.is_empty() {
        return Err(bad("name", "must not be empty".into()));
    }
    if config.namespace.is_empty()
        || !config
            .namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad(
            "namespace",
            format!("{:?} is not a namespace name", config.namespace),
        ));
    }
    let r = &config.resolver;
    if r.ttl_floor.is_zero() {
        return Err(bad("ttl_floor", "must be greater than zero".into()));
    }
    if r.ttl_ceiling < r.ttl_floor {
        return Err(bad(
            "ttl_ceiling",
            format!("{:?} is below ttl_floor {:?}", r.ttl_ceiling, r.ttl_floor),
        ));
    }
    if config.lookups.is_empty() {
        return Err(bad("services", "at least one service is needed".into()));
    }
    let mut hostnames = HashSet::new();
    for lookup in &config.lookups {
        if !is_dns_name(lookup.name()) {
            return Err(bad(
                "services",
                format!("{:?} is not a DNS name", lookup.name()),
            ));
        }
        let hostname = lookup.hostname();
        if !is_dns_name(&hostname) || hostname.starts_with('_') {
            return Err(bad(
                "services",
                format!(
                    "hostname {hostname:?} of {} is not a host name",
                    lookup.name()
                ),
            ));
        }
        if !hostnames.insert(hostname.clone()) {
            return Err(bad(
                "services",
                format!("{hostname} is declared twice (one lookup per hostname)"),
            ));
        }
        if let Lookup::Host { name, ports } = lookup {
            if name.parse::<std::net::IpAddr>().is_ok() {
                return Err(bad(
                    "services",
                    format!("{name}: an IP address is not a name to resolve (use a ServiceEntry)"),
                ));
            }
            if ports.is_empty() {
                return Err(bad("services", format!("{name}: a host needs ports")));
            }
            let mut seen = HashSet::new();
            let mut names = HashSet::new();
            for p in ports {
                let valid_name = p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if p.number == 0
                    || p.target_port == Some(0)
                    || p.name.is_empty()
                    || !valid_name
                    || !seen.insert(p.number)
                    || !names.insert(p.name.as_str())
                {
                    return Err(bad(
                        "services",
                        format!(
                            "{name}: port {} {:?}: a number or target port of 0, a missing or invalid name, or a repeated number or name",
                            p.number, p.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Letters, digits, `-`, `_` and dots, non-empty labels.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// What every name's task shares.
#[derive(Clone)]
struct Shared {
    resolver: Resolver,
    config: Config,
    cx: Context,
    metrics: Metrics,
    reports: mpsc::Sender<(usize, Report)>,
}

/// Name `index`, looked up until `cancel`.
async fn resolve_name(index: usize, lookup: Lookup, shared: Shared, cancel: CancellationToken) {
    let Shared {
        resolver,
        config,
        cx,
        metrics,
        reports,
    } = shared;
    let mut state = NameState::default();
    let mut sent = false;
    let mut declaration: Option<Object> = None;
    let mut missing = false;
    let name = lookup.name().to_string();
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            o = async {
                match &lookup {
                    Lookup::Host { .. } => resolver.ips(&name).await.map(Records::Ips),
                    Lookup::Srv { .. } => resolver.srv(&name).await.map(Records::Srv),
                }
            } => o,
        };
        let was_failing = state.failing;
        let failure = match &outcome {
            Outcome::Failed(why) => Some(why.clone()),
            _ => None,
        };
        // "Does not exist" is logged when it starts, not on every lookup.
        let not_found = matches!(outcome, Outcome::NotFound);
        if not_found && !missing {
            if state.records.is_some() {
                tracing::warn!(
                    source = %cx.source,
                    "{name} does not exist (NXDOMAIN or no records); its last answer is kept for {:?}",
                    config.resolver.stale_for
                );
            } else {
                tracing::warn!(
                    source = %cx.source,
                    "{name} does not exist (NXDOMAIN or no records); it has no endpoints"
                );
            }
            metrics.error(&cx.source, "not_found");
        }
        missing = not_found;
        let (changed, next) = state.apply(outcome, Instant::now(), &config.resolver);
        let report = if let Some(why) = failure {
            (!was_failing).then(|| {
                metrics.error(&cx.source, "lookup");
                tracing::warn!(source = %cx.source, "looking up {name} failed; keeping its last answer: {why}");
                Report::Failed(format!("{name}: {why}"))
            })
        } else if changed || !sent {
            sent = true;
            let mut objects = convert::objects(&lookup, state.records.as_ref(), &cx);
            // An SRV name without records has no ports: its last
            // declaration stays, so its clusters stay (empty).
            match objects.iter().find(|o| matches!(o, Object::Service { .. })) {
                Some(d) => declaration = Some(d.clone()),
                None => objects.extend(declaration.clone()),
            }
            Some(Report::Objects(objects))
        } else {
            was_failing.then_some(Report::Recovered)
        };
        if was_failing && !state.failing && !not_found {
            tracing::info!(source = %cx.source, "{name} resolves again");
        }
        if let Some(report) = report
            && reports.send((index, report)).await.is_err()
        {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// What was sent and the bookkeeping of the sync.
struct State {
    source: SourceId,
    metrics: Metrics,
    /// The objects sent per name (by index).
    sent: Vec<Vec<Object>>,
    /// Names that reported at least once.
    reported: HashSet<usize>,
    /// Names whose lookups fail.
    failing: HashSet<usize>,
    synced: bool,
    /// Whether the registry was told the source is stale.
    stale: bool,
    /// The latest failure (the reason `/ready` shows).
    last_error: String,
    /// Names that answered at least once (the others' objects, if a
    /// previous run of the source sent them, are kept on sync).
    answered: HashSet<usize>,
    /// The registry keys of each name's objects.
    keys: Vec<Vec<ObjectKey>>,
}

impl State {
    /// The updates a report makes: a patch, the sync's or a recovery's
    /// reset, a stale report (after a reset when names still fail).
    fn on(&mut self, index: usize, report: Report) -> Vec<Update> {
        self.reported.insert(index);
        let mut patch = None;
        match report {
            Report::Objects(objects) => {
                self.failing.remove(&index);
                self.answered.insert(index);
                let keys: HashSet<ObjectKey> = objects.iter().map(Object::key).collect();
                let delete = self.sent[index]
                    .iter()
                    .map(Object::key)
                    .filter(|k| !keys.contains(k))
                    .collect();
                patch = Some((objects.clone(), delete));
                self.sent[index] = objects;
            }
            Report::Recovered => {
                self.failing.remove(&index);
            }
            Report::Failed(error) => {
                self.failing.insert(index);
                self.last_error = error;
            }
        }
        self.count();
        let mut updates = Vec::new();
        let complete = self.reported.len() == self.sent.len();
        let recovered = self.stale && self.failing.is_empty();
        if (!self.synced && complete) || (self.synced && recovered) {
            self.synced = true;
            self.stale = false;
            let objects = self.sent.iter().flatten().cloned().collect();
            // A name that never answered since this run started (its server
            // is down) keeps what an earlier run sent for it: a restart
            // (a reload) never empties it.
            let keep: Vec<ObjectKey> = (0..self.sent.len())
                .filter(|i| !self.answered.contains(i))
                .flat_map(|i| self.keys.get(i).into_iter().flatten().cloned())
                .collect();
            updates.push(Update::ResetKeeping {
                source: self.source.clone(),
                objects,
                keep,
            });
        } else if let Some((apply, delete)) = patch
            && self.synced
        {
            updates.push(Update::Patch {
                source: self.source.clone(),
                apply,
                delete,
            });
        }
        if !self.stale && !self.failing.is_empty() {
            self.stale = true;
            updates.push(Update::Stale {
                source: self.source.clone(),
                error: self.last_error.clone(),
            });
        }
        updates
    }

    fn count(&self) {
        let services = self
            .sent
            .iter()
            .filter(|o| o.iter().any(|o| matches!(o, Object::Service { .. })))
            .count();
        let endpoints = self
            .sent
            .iter()
            .flatten()
            .map(|o| match o {
                Object::Endpoints(s) => s.endpoints.len(),
                _ => 0,
            })
            .sum();
        self.metrics.objects(&self.source, "service", services);
        self.metrics.objects(&self.source, "endpoint", endpoints);
    }
}

/// Runs the adapter (see the module docs of `dns`).
pub(super) async fn run(
    config: Config,
    metrics: Metrics,
    source: SourceId,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
    validate(&config)?;
    metrics.unsynced(&source);
    // The system configuration may be missing at first: retried.
    let Some(resolver) = crate::retry::until_ok(
        || Resolver::new(&config.resolver),
        "retrying",
        "resolver_config",
        CONFIG_RETRY,
        (&source, &metrics),
        &sink,
        &shutdown,
    )
    .await
    else {
        return Ok(());
    };
    let cx = Context {
        namespace: config.namespace.clone(),
        location: config.location,
        source: source.clone(),
    };
    let tasks = shutdown.child_token();
    let _stop_tasks = tasks.clone().drop_guard();
    let (tx, mut rx) = mpsc::channel(64);
    let shared = Shared {
        resolver,
        config: config.clone(),
        cx,
        metrics: metrics.clone(),
        reports: tx,
    };
    for (index, lookup) in config.lookups.iter().enumerate() {
        tokio::spawn(resolve_name(
            index,
            lookup.clone(),
            shared.clone(),
            tasks.clone(),
        ));
    }
    drop(shared);
    let mut state = State {
        source,
        metrics,
        sent: vec![Vec::new(); config.lookups.len()],
        reported: HashSet::new(),
        failing: HashSet::new(),
        synced: false,
        stale: false,
        last_error: String::new(),
        answered: HashSet::new(),
        keys: config
            .lookups
            .iter()
            .map(|l| {
                let hostname = meshreg_registry::Hostname::from(l.hostname());
                vec![
                    ObjectKey::Service {
                        namespace: config.namespace.clone(),
                        hostname: hostname.clone(),
                        origin: l.name().to_string(),
                    },
                    ObjectKey::Endpoints {
                        hostname,
                        shard: l.name().to_string(),
                    },
                ]
            })
            .collect(),
    };
    loop {
        let report = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = rx.recv() => r,
        };
        let Some((index, report)) = report else {
            return Ok(());
        };
        for update in state.on(index, report) {
            if sink.send(update).await.is_err() {
                return Ok(());
            }
            state.metrics.update_sent(&state.source);
        }
    }
}

#[cfg(test)]
mod tests;
