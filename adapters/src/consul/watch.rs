//! The I/O side of the `consul` adapter: the blocking-query loops, the
//! state they feed, and the updates.
//!
//! One task runs the catalog query and one task per service runs its
//! health query; each sends what it learns over one bounded channel to
//! the adapter's loop, which alone owns the state (what was sent) and the
//! registry sink. A task sends an answer only when its index moved (or
//! after a failure), and a failure only when it starts failing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshreg_registry::{Object, ObjectKey, SourceId, Update};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Answer, Client, QueryError};
use super::convert::{self, Context, HealthEntry};
use super::{Config, Token};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// Consul's longest blocking wait.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Token bucket of each query loop: burst, and one token per interval.
const LIMIT_BURST: u32 = 2;
const LIMIT_INTERVAL: Duration = Duration::from_millis(250);
/// Backoff after a failed query: from, to (doubling, with jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What a query task tells the adapter's loop.
#[derive(Debug)]
enum Event {
    /// The catalog's service names.
    Catalog(BTreeSet<String>),
    /// A service's instances (task `generation` of `name`).
    Health {
        name: String,
        generation: u64,
        entries: Vec<HealthEntry>,
    },
    /// A task started failing (`name` `None`: the catalog's).
    Failed {
        name: Option<(String, u64)>,
        error: QueryError,
    },
}

/// The next index to block on after an answer with `new` (Consul's rules:
/// back to 0 when it went backwards, never below 1 otherwise).
fn next_index(old: u64, new: u64) -> u64 {
    if new < old { 0 } else { new.max(1) }
}

/// A token bucket (as a theoretical arrival time): `LIMIT_BURST` queries
/// at once, then one per `LIMIT_INTERVAL`.
struct Limiter {
    tat: Instant,
}

impl Limiter {
    fn new() -> Limiter {
        Limiter {
            tat: Instant::now(),
        }
    }

    /// Waits until a query may start.
    async fn take(&mut self) {
        let now = Instant::now();
        let tat = self.tat.max(now);
        let allowed = tat
            .checked_sub(LIMIT_INTERVAL * (LIMIT_BURST - 1))
            .unwrap_or(now);
        if allowed > now {
            tokio::time::sleep_until(allowed).await;
        }
        self.tat = tat + LIMIT_INTERVAL;
    }
}

/// Exponential backoff with jitter: each delay is half the current step
/// plus a random part of the other half.
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { step: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }

    fn next(&mut self) -> Duration {
        let half = self.step / 2;
        let jitter = half.mul_f64(fastrand::f64());
        self.step = (self.step * 2).min(BACKOFF_MAX);
        half + jitter
    }
}

/// Reads the ACL token; `Err` says why (never the token).
fn read_token(token: &Token) -> std::result::Result<Option<String>, String> {
    match token {
        Token::None => Ok(None),
        Token::File(path) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("reading the ACL token file {}: {e}", path.display())),
        Token::Env(var) => std::env::var(var)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("reading the ACL token from ${var}: {e}")),
    }
}

/// What every query loop shares.
#[derive(Clone)]
struct Shared {
    client: Client,
    permits: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    wait: Duration,
    token: Token,
    metrics: Metrics,
    source: SourceId,
    /// `max_concurrent_queries`.
    cap: usize,
    /// How many services are watched now.
    watched: Arc<AtomicUsize>,
}

impl Shared {
    /// The blocking wait of one query: the configured one while every
    /// service's query fits in `max_concurrent_queries`; with more
    /// services, shorter in proportion (at least 1 s), so the queries take
    /// turns and a change of a waiting service is seen within about one
    /// configured `wait` rather than never.
    fn wait(&self) -> Duration {
        let watched = self.watched.load(Ordering::Relaxed);
        if watched < self.cap {
            return self.wait;
        }
        let ratio = self.cap as f64 / (watched + 1) as f64;
        self.wait.mul_f64(ratio).max(Duration::from_secs(1))
    }

    /// Reads the token again (after a `403`: it may have been rotated).
    fn reload_token(&self) {
        match read_token(&self.token) {
            Ok(t) => self.client.set_token(t),
            Err(why) => {
                tracing::warn!(source = %self.source, "{why}");
                self.metrics.error(&self.source, "token");
            }
        }
    }
}

/// One blocking-query loop until `cancel`: `query(index, wait)`, then
/// `answer` for a moved index, `failed` when failing starts.
async fn poll<T, Q, F>(
    shared: Shared,
    cancel: CancellationToken,
    query: Q,
    answer: impl Fn(T) -> Event,
    failed: impl Fn(QueryError) -> Event,
) where
    Q: Fn(u64, Duration) -> F,
    F: Future<Output = std::result::Result<Answer<T>, QueryError>>,
{
    let mut index = 0;
    let mut seen: Option<u64> = None;
    let mut failing = false;
    let mut limiter = Limiter::new();
    let mut backoff = Backoff::new();
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = async {
                limiter.take().await;
                let _permit = shared.permits.acquire().await;
                shared.metrics.request(&shared.source);
                query(index, shared.wait()).await
            } => r,
        };
        let event = match result {
            Ok(a) => {
                backoff.reset();
                let moved = failing || seen != Some(a.index);
                failing = false;
                seen = Some(a.index);
                index = next_index(index, a.index);
                moved.then(|| answer(a.body))
            }
            Err(e) => {
                if e.reason() == "forbidden" {
                    shared.reload_token();
                }
                // Read afresh when it answers again: a restarted agent's
                // index may be below ours, and blocking on ours would
                // wait out the whole `wait`.
                index = 0;
                seen = None;
                let first = !failing;
                failing = true;
                let delay = backoff.next();
                if first && shared.events.send(failed(e)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                None
            }
        };
        if let Some(event) = event
            && shared.events.send(event).await.is_err()
        {
            return;
        }
    }
}

/// The objects sent and the bookkeeping of the sync.
struct State {
    source: SourceId,
    metrics: Metrics,
    cx: Context,
    /// The catalog's names, once listed.
    catalog: Option<BTreeSet<String>>,
    /// Services with a running task, and its generation.
    watched: HashMap<String, u64>,
    next_generation: u64,
    /// Services that answered (or failed) since their task started.
    answered: HashSet<String>,
    /// The objects sent per service.
    sent: HashMap<String, Vec<Object>>,
    /// Conversion problems reported per service (each is logged once).
    reported: HashMap<String, Vec<String>>,
    /// Whether the registry has our state.
    synced: bool,
    /// The queries failing now (`None`: the catalog's): the source is
    /// stale while any is, and recovers when none is.
    failing: HashSet<Option<String>>,
    /// Whether the registry was told the source is stale.
    stale: bool,
}

/// What the loop must do after an event.
#[derive(Debug, Default)]
struct Actions {
    update: Option<Update>,
    start: Vec<(String, u64)>,
    stop: Vec<String>,
}

impl State {
    fn new(source: SourceId, metrics: Metrics, cx: Context) -> State {
        State {
            source,
            metrics,
            cx,
            catalog: None,
            watched: HashMap::new(),
            next_generation: 0,
            answered: HashSet::new(),
            sent: HashMap::new(),
            reported: HashMap::new(),
            synced: false,
            failing: HashSet::new(),
            stale: false,
        }
    }

    fn on(&mut self, event: Event) -> Actions {
        let mut actions = Actions::default();
        let mut apply = Vec::new();
        let mut delete = Vec::new();
        match event {
            Event::Catalog(names) => {
                for name in self.watched.keys() {
                    if !names.contains(name) {
                        actions.stop.push(name.clone());
                    }
                }
                self.failing.remove(&None);
                for name in &actions.stop {
                    self.failing.remove(&Some(name.clone()));
                    self.watched.remove(name);
                    self.answered.remove(name);
                    self.reported.remove(name);
                    delete.extend(
                        self.sent
                            .remove(name)
                            .unwrap_or_default()
                            .iter()
                            .map(Object::key),
                    );
                }
                for name in &names {
                    if !self.watched.contains_key(name) {
                        self.next_generation += 1;
                        self.watched.insert(name.clone(), self.next_generation);
                        actions.start.push((name.clone(), self.next_generation));
                    }
                }
                self.catalog = Some(names);
            }
            Event::Health {
                name,
                generation,
                entries,
            } => {
                if self.watched.get(&name) != Some(&generation) {
                    return actions;
                }
                self.failing.remove(&Some(name.clone()));
                let (objects, errors) = convert::service(&name, &entries, &self.cx);
                self.report(&name, &errors);
                let old = self.sent.remove(&name).unwrap_or_default();
                let (a, d) = diff(&old, &objects);
                apply = a;
                delete = d;
                if !objects.is_empty() {
                    self.sent.insert(name.clone(), objects);
                }
                self.answered.insert(name);
            }
            Event::Failed { name, error } => {
                if let Some((name, generation)) = &name {
                    if self.watched.get(name) != Some(generation) {
                        return actions;
                    }
                    self.answered.insert(name.clone());
                }
                self.metrics.error(&self.source, error.reason());
                self.failing.insert(name.map(|(n, _)| n));
                if !self.stale {
                    self.stale = true;
                    tracing::warn!(
                        source = %self.source,
                        "Consul agent query failed; keeping the last state and retrying: {error}"
                    );
                    actions.update = Some(Update::Stale {
                        source: self.source.clone(),
                        error: error.to_string(),
                    });
                }
                self.count();
                return actions;
            }
        }
        let recovered = self.stale && self.failing.is_empty();
        if recovered {
            self.stale = false;
            tracing::info!(source = %self.source, "Consul agent answers again");
        }
        let complete =
            self.catalog.is_some() && self.watched.keys().all(|n| self.answered.contains(n));
        if (!self.synced && complete) || (self.synced && recovered) {
            self.synced = true;
            actions.update = Some(Update::Reset {
                source: self.source.clone(),
                objects: self.sent.values().flatten().cloned().collect(),
            });
        } else if self.synced && !(apply.is_empty() && delete.is_empty()) {
            actions.update = Some(Update::Patch {
                source: self.source.clone(),
                apply,
                delete,
            });
        }
        self.count();
        actions
    }

    /// Logs and counts the problems of `name` not reported before.
    fn report(&mut self, name: &str, errors: &[convert::ConvertError]) {
        let now: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let before = self.reported.remove(name).unwrap_or_default();
        for (e, text) in errors.iter().zip(&now) {
            if !before.contains(text) {
                tracing::warn!(source = %self.source, "{text}; the instance is left out");
                self.metrics.error(&self.source, e.reason());
            }
        }
        if !now.is_empty() {
            self.reported.insert(name.to_string(), now);
        }
    }

    fn count(&self) {
        let instances = self.sent.values().map(|o| o.len().saturating_sub(1)).sum();
        self.metrics
            .objects(&self.source, "service", self.sent.len());
        self.metrics.objects(&self.source, "instance", instances);
    }
}

/// What turns `old` into `new`: objects added or changed, keys removed.
fn diff(old: &[Object], new: &[Object]) -> (Vec<Object>, Vec<ObjectKey>) {
    let before: HashMap<ObjectKey, &Object> = old.iter().map(|o| (o.key(), o)).collect();
    let keys: HashSet<ObjectKey> = new.iter().map(Object::key).collect();
    let apply = new
        .iter()
        .filter(|o| before.get(&o.key()) != Some(o))
        .cloned()
        .collect();
    let delete = before.into_keys().filter(|k| !keys.contains(k)).collect();
    (apply, delete)
}

pub(super) fn validate(config: &Config) -> Result<()> {
    let bad = |field: &'static str, reason: String| Error::Config {
        adapter: "consul",
        field,
        reason,
    };
    let uri: http::Uri = config
        .address
        .parse()
        .map_err(|e| bad("address", format!("{:?}: {e}", config.address)))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@'))
        || uri.query().is_some()
        || !matches!(uri.path(), "" | "/")
    {
        return Err(bad(
            "address",
            "only http://host:port (no credentials, path or query; the token goes in token_file or token_env)"
                .into(),
        ));
    }
    match uri.scheme_str() {
        Some("http") if uri.authority().is_some() => {}
        Some("https") => {
            return Err(bad(
                "address",
                "https agents are not supported yet: use the agent's http address".into(),
            ));
        }
        _ => {
            return Err(bad(
                "address",
                format!("{:?} is not http://host:port", config.address),
            ));
        }
    }
    if !config.hostname.contains("{service}") {
        return Err(bad(
            "hostname",
            format!("{:?} does not contain {{service}}", config.hostname),
        ));
    }
    if config.namespace.is_empty() {
        return Err(bad("namespace", "must not be empty".into()));
    }
    if config.wait.is_zero() || config.wait > MAX_WAIT {
        return Err(bad(
            "wait",
            format!("{:?} is not within 1ms..10m", config.wait),
        ));
    }
    if config.max_concurrent_queries == 0 {
        return Err(bad("max_concurrent_queries", "must be at least 1".into()));
    }
    Ok(())
}

/// Runs the adapter (see the module docs of `consul`).
pub(super) async fn run(
    config: Config,
    metrics: Metrics,
    source: SourceId,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
) -> Result<()> {
    validate(&config)?;
    metrics.unsynced(&source);
    // A configured token that cannot be read: no query goes out without
    // it (an agent denying anonymous reads answers an empty catalog, which
    // would withdraw every service); the source is stale and it is read
    // again until it can be.
    let Some(token) = crate::retry::until_ok(
        || read_token(&config.token),
        "no query is made until it can be read",
        "token",
        BACKOFF_MAX / 6,
        (&source, &metrics),
        &sink,
        &shutdown,
    )
    .await
    else {
        return Ok(());
    };
    let (events, mut rx) = mpsc::channel(256);
    let shared = Shared {
        client: Client::new(&config.address, &config.datacenter, token),
        permits: Arc::new(Semaphore::new(config.max_concurrent_queries)),
        events,
        wait: config.wait,
        token: config.token.clone(),
        metrics: metrics.clone(),
        source: source.clone(),
        cap: config.max_concurrent_queries,
        watched: Arc::new(AtomicUsize::new(0)),
    };
    let cx = Context {
        hostname: config.hostname.clone(),
        datacenter: config.datacenter.clone(),
        namespace: config.namespace.clone(),
        network: config.network.clone(),
        warning_is_healthy: config.warning_is_healthy,
        zone_node_meta: config.zone_node_meta.clone(),
        source: source.clone(),
    };
    // Every task stops with the adapter, whichever way it ends.
    let tasks = shutdown.child_token();
    let _stop_tasks = tasks.clone().drop_guard();
    let catalog = shared.clone();
    tokio::spawn(poll(
        shared.clone(),
        tasks.child_token(),
        move |index, wait| {
            let client = catalog.client.clone();
            async move { client.services(index, wait).await }
        },
        |names| Event::Catalog(names.into_keys().collect()),
        |error| Event::Failed { name: None, error },
    ));
    let mut state = State::new(source.clone(), metrics.clone(), cx);
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let mut warned_cap = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            e = rx.recv() => e,
        };
        let Some(event) = event else { return Ok(()) };
        let actions = state.on(event);
        for name in actions.stop {
            if let Some(cancel) = running.remove(&name) {
                cancel.cancel();
            }
        }
        for (name, generation) in actions.start {
            let cancel = tasks.child_token();
            if let Some(old) = running.insert(name.clone(), cancel.clone()) {
                old.cancel();
            }
            let client = shared.client.clone();
            let service = name.clone();
            let failed = name.clone();
            tokio::spawn(poll(
                shared.clone(),
                cancel,
                move |index, wait| {
                    let client = client.clone();
                    let service = service.clone();
                    async move { client.health(&service, index, wait).await }
                },
                move |entries| Event::Health {
                    name: name.clone(),
                    generation,
                    entries,
                },
                move |error| Event::Failed {
                    name: Some((failed.clone(), generation)),
                    error,
                },
            ));
        }
        if !warned_cap && running.len() + 1 > config.max_concurrent_queries {
            warned_cap = true;
            tracing::warn!(
                source = %source,
                services = running.len(),
                max_concurrent_queries = config.max_concurrent_queries,
                "more services than concurrent queries: a change of a service waiting for a \
                 free query is seen late (raise max_concurrent_queries, and the agent's \
                 limits.http_max_conns_per_client)"
            );
        }
        shared.watched.store(running.len(), Ordering::Relaxed);
        if let Some(update) = actions.update {
            if sink.send(update).await.is_err() {
                return Ok(());
            }
            metrics.update_sent(&source);
        }
    }
}

#[cfg(test)]
mod tests;
