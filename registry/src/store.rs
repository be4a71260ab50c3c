//! The store: one [`Writer`] applies updates and publishes immutable
//! [`View`]s; any number of [`Reader`]s watch them.
//!
//! Every write goes through [`Writer::apply`], which diffs per object,
//! merges the hosts it touched, bumps the version, records the [`Change`]
//! and publishes the new view in one step, so a version bump or a
//! notification cannot be forgotten. Views share structure (persistent
//! maps), so publishing one costs O(changed hosts × log n), not O(n).
//!
//! Each object is held once, in the index that serves it: declarations and
//! shards by hostname, workloads by namespace; a source keeps only the keys
//! it sent. The writer stamps provenance (`Service::source`,
//! `Endpoint::source`) from the update's source, so it cannot disagree.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use imbl::{OrdMap, Vector};
use tokio::sync::{mpsc, watch};

use crate::change::{Change, ChangeKind};
use crate::error::Error;
use crate::group::WorkloadGroup;
use crate::merge::ROOT_NAMESPACE;
use crate::merge::{
    DeclKey, Inputs, MergedService, PerHost, RuleKey, ShardKey, StoredShard, merge,
};
use crate::model::{Hostname, Service, canonical_order, share_equal_values};
use crate::object::{Object, ObjectKey, Workload};
use crate::policy::{DestinationRule, Sidecar};
use crate::source::SourceId;
use crate::update::Update;

/// How many past changes a view remembers, so a reader that fell behind by
/// fewer versions than this can catch up without a full comparison.
const CHANGE_LOG_LEN: usize = 1024;

/// Where a source is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SourceState {
    /// Not synced yet: nothing it sent is complete.
    #[default]
    Syncing,
    /// Its complete state is applied.
    Synced,
    /// It had synced, then lost its platform: its last state is still
    /// served.
    Stale {
        /// Since when.
        since: SystemTime,
    },
}

/// The status of one source, as `/ready` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceStatus {
    /// Where it is.
    pub state: SourceState,
    /// The last error it reported (kept after it recovers, for operators).
    pub last_error: Option<String>,
    /// Objects it holds.
    pub objects: usize,
}

impl SourceStatus {
    /// Whether its state counts for readiness: synced, or stale (its last
    /// state is served).
    pub fn is_serving(&self) -> bool {
        matches!(self.state, SourceState::Synced | SourceState::Stale { .. })
    }
}

/// An immutable snapshot of the registry. Cheap to clone and to hold.
#[derive(Debug, Clone)]
pub struct View {
    version: u64,
    services: OrdMap<Hostname, Arc<MergedService>>,
    sources: OrdMap<SourceId, SourceStatus>,
    log: Vector<Arc<Change>>,
    endpoint_count: usize,
    conflict_count: usize,
    sidecars: OrdMap<SidecarKey, Arc<Sidecar>>,
    /// Every `WorkloadGroup`, by (namespace, name, source).
    workload_groups: OrdMap<SidecarKey, Arc<WorkloadGroup>>,
    /// The workload selector of each DestinationRule that has one.
    rule_selectors: OrdMap<SidecarKey, Arc<BTreeMap<String, String>>>,
    /// The `failoverPriority` entries of each DestinationRule that has
    /// some (at any level: rule, port, subset), as written.
    rule_failover_priorities: OrdMap<SidecarKey, Arc<Vec<String>>>,
}

/// Orders Sidecars and rules: (namespace, name, source).
type SidecarKey = (String, String, SourceId);

impl View {
    /// The registry version; it grows by one per applied change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The merged service for `hostname`.
    pub fn service(&self, hostname: &str) -> Option<&Arc<MergedService>> {
        self.services.get(hostname)
    }

    /// All services, ordered by hostname.
    pub fn services(&self) -> impl Iterator<Item = (&Hostname, &Arc<MergedService>)> {
        self.services.iter()
    }

    /// The number of services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The number of endpoints over all services.
    pub fn endpoint_count(&self) -> usize {
        self.endpoint_count
    }

    /// The number of conflicts the merge rule settles now.
    pub fn conflict_count(&self) -> usize {
        self.conflict_count
    }

    /// Every known source with its status.
    pub fn sources(&self) -> impl Iterator<Item = (&SourceId, &SourceStatus)> {
        self.sources.iter()
    }

    /// Every `WorkloadGroup`, ordered by (namespace, name, source).
    pub fn workload_groups(&self) -> impl Iterator<Item = &Arc<WorkloadGroup>> {
        self.workload_groups.values()
    }

    /// The `WorkloadGroup` `namespace/name`; when several sources declare
    /// it, the first by source id.
    pub fn workload_group(&self, namespace: &str, name: &str) -> Option<&Arc<WorkloadGroup>> {
        self.workload_groups
            .iter()
            .find(|((ns, n, _), _)| ns == namespace && n == name)
            .map(|(_, g)| g)
    }

    /// Every `Sidecar`, ordered by (namespace, name, source).
    pub fn sidecars(&self) -> impl Iterator<Item = &Arc<Sidecar>> {
        self.sidecars.values()
    }

    /// The `Sidecar` that applies to a proxy of `namespace` with `labels`
    /// (Istio's `getSidecarScope`): the first of its namespace whose
    /// workload selector matches its labels, else its namespace's one
    /// without a selector, else the root namespace's one without a
    /// selector; `None` when none applies (the proxy sees every service
    /// exported to its namespace). Istio takes the oldest where several
    /// qualify; names stand in for creation time.
    pub fn sidecar_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<&Arc<Sidecar>> {
        let first = |ns: &str, pick: &dyn Fn(&Sidecar) -> bool| {
            self.sidecars
                .iter()
                .find(|((n, _, _), s)| n == ns && pick(s))
                .map(|(_, s)| s)
        };
        first(namespace, &|s| s.selects(labels))
            .or_else(|| first(namespace, &|s| s.workload_selector.is_none()))
            .or_else(|| first(ROOT_NAMESPACE, &|s| s.workload_selector.is_none()))
    }

    /// Every DestinationRule with a workload selector: ((namespace, name),
    /// selector), ordered by namespace and name.
    pub fn rule_selectors(
        &self,
    ) -> impl Iterator<Item = ((&String, &String), &BTreeMap<String, String>)> {
        self.rule_selectors
            .iter()
            .map(|((ns, name, _), sel)| ((ns, name), &**sel))
    }

    /// The label names some DestinationRule's `failoverPriority` ranks
    /// endpoints by, compared with the proxy's own value (an entry
    /// `label=value` names its value and is left out), sorted and unique:
    /// what a proxy's labels must be known for to build its endpoints.
    pub fn failover_priority_labels(&self) -> BTreeSet<&str> {
        self.rule_failover_priorities
            .values()
            .flat_map(|entries| entries.iter())
            .filter(|e| !e.contains('='))
            .map(String::as_str)
            .collect()
    }

    /// The `DestinationRule`s with a workload selector that apply to a
    /// proxy of `namespace` with `labels`, as (namespace, name): those of
    /// its namespace whose selector its labels include (istiod's
    /// `SidecarScope.DestinationRule`; a selector never reaches across
    /// namespaces). Ordered by name.
    pub fn rules_selecting(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .rule_selectors
            .iter()
            .filter(|((ns, _, _), sel)| {
                ns == namespace && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|((ns, name, _), _)| (ns.clone(), name.clone()))
            .collect();
        out.dedup();
        out
    }

    /// True once every known source serves (synced, or stale with its last
    /// state).
    pub fn is_ready(&self) -> bool {
        self.sources.values().all(SourceStatus::is_serving)
    }

    /// Everything that changed after version `since`, folded into one
    /// [`Change`]; `None` when the log no longer reaches back that far (the
    /// caller must compare everything). An up-to-date caller gets an empty
    /// change.
    pub fn changes_since(&self, since: u64) -> Option<Change> {
        let mut out = Change {
            version: self.version,
            at: Instant::now(),
            source: None,
            keys: Vec::new(),
            services: BTreeMap::new(),
            proxy_selectors: false,
        };
        if since >= self.version {
            return Some(out);
        }
        // Versions in the log are consecutive, so the changes after `since`
        // are its last `version - since` entries: no scan of the whole log.
        let wanted = usize::try_from(self.version - since).ok()?;
        if wanted > self.log.len() {
            return None;
        }
        let mut first = true;
        for i in self.log.len() - wanted..self.log.len() {
            if let Some(c) = self.log.get(i) {
                if first {
                    out.at = c.at;
                    out.source = c.source.clone();
                    first = false;
                }
                out.merge(c);
            }
        }
        Some(out)
    }
}

/// What one [`Writer::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The change it published, if anything changed.
    pub change: Option<Arc<Change>>,
    /// Objects it refused (the rest was applied).
    pub rejected: Vec<Error>,
}

/// The single writer of the registry. Not `Clone`: sources send
/// [`Update`]s to the task that owns it (see [`run`]).
#[derive(Debug)]
pub struct Writer {
    /// The keys each source holds.
    keys: HashMap<SourceId, HashSet<ObjectKey>>,
    declarations: HashMap<Hostname, PerHost<DeclKey, Arc<Service>>>,
    shards: HashMap<Hostname, PerHost<ShardKey, StoredShard>>,
    workloads: HashMap<String, BTreeMap<(SourceId, String), Arc<Workload>>>,
    /// Per namespace, the hosts with a declaration that selects workloads
    /// (and how many such declarations).
    selecting: HashMap<String, BTreeMap<Hostname, usize>>,
    /// Destination rules by exact host, keyed by (source, namespace, name).
    rules: HashMap<Hostname, BTreeMap<RuleKey, Arc<DestinationRule>>>,
    /// Destination rules for wildcard hosts (`*.suffix`).
    wildcard_rules: BTreeMap<(Hostname, RuleKey), Arc<DestinationRule>>,
    /// Whether a Sidecar or a rule selector changed in the update being
    /// applied.
    selectors_changed: bool,
    /// Whether a WorkloadGroup changed in the update being applied (a new
    /// view is published although no host changed).
    groups_changed: bool,
    view: Arc<View>,
    tx: watch::Sender<Arc<View>>,
}

/// A read handle: the latest [`View`] and notification of new ones.
#[derive(Debug, Clone)]
pub struct Reader {
    rx: watch::Receiver<Arc<View>>,
}

/// Creates an empty registry that is ready once each of `expected` sources
/// has sent its first [`Update::Reset`]. Other sources join when they first
/// reset or report an error.
pub fn new(expected: impl IntoIterator<Item = SourceId>) -> (Writer, Reader) {
    let view = Arc::new(View {
        version: 0,
        services: OrdMap::new(),
        sources: expected
            .into_iter()
            .map(|s| (s, SourceStatus::default()))
            .collect(),
        log: Vector::new(),
        endpoint_count: 0,
        conflict_count: 0,
        sidecars: OrdMap::new(),
        workload_groups: OrdMap::new(),
        rule_selectors: OrdMap::new(),
        rule_failover_priorities: OrdMap::new(),
    });
    let (tx, rx) = watch::channel(view.clone());
    let writer = Writer {
        keys: HashMap::new(),
        declarations: HashMap::new(),
        shards: HashMap::new(),
        workloads: HashMap::new(),
        selecting: HashMap::new(),
        rules: HashMap::new(),
        wildcard_rules: BTreeMap::new(),
        selectors_changed: false,
        groups_changed: false,
        view,
        tx,
    };
    (writer, Reader { rx })
}

/// Applies updates from `updates` until every sender is gone. Refused
/// objects are logged and skipped.
pub async fn run(mut writer: Writer, mut updates: mpsc::Receiver<Update>) {
    while let Some(update) = updates.recv().await {
        for error in writer.apply(update).rejected {
            tracing::warn!(%error, "registry refused an object");
        }
    }
}

// === impl Writer ===

impl Writer {
    /// A new reader of this registry.
    pub fn reader(&self) -> Reader {
        Reader {
            rx: self.tx.subscribe(),
        }
    }

    /// The current view.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Applies one update: diffs its objects against what the source holds,
    /// merges the touched hosts, publishes the new view and returns what
    /// changed and what was refused. An invalid object is refused alone.
    pub fn apply(&mut self, update: Update) -> Applied {
        let at = Instant::now();
        let source = update.source().clone();
        let mut touched = BTreeSet::new();
        let mut keys = Vec::new();
        let mut rejected = Vec::new();
        let mut status = self.view.sources.get(&source).cloned();
        let (update, keep) = match update {
            Update::ResetKeeping {
                source,
                objects,
                keep,
            } => (Update::Reset { source, objects }, keep),
            other => (other, Vec::new()),
        };
        match update {
            Update::Reset { objects, .. } => {
                let mut incoming: BTreeMap<ObjectKey, Object> = BTreeMap::new();
                for o in objects {
                    match validate(&source, &o) {
                        Ok(()) => {
                            incoming.insert(o.key(), o);
                        }
                        Err(e) => rejected.push(e),
                    }
                }
                let held: Vec<ObjectKey> = self
                    .keys
                    .get(&source)
                    .map(|k| {
                        k.iter()
                            .filter(|k| !incoming.contains_key(*k) && !keep.contains(k))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for key in held {
                    if self.remove(&source, &key, &mut touched) {
                        keys.push(key);
                    }
                }
                for (key, o) in incoming {
                    keys.extend(self.put(&source, key, o, &mut touched));
                }
                let s = status.get_or_insert_with(SourceStatus::default);
                s.state = SourceState::Synced;
            }
            Update::Patch { apply, delete, .. } => {
                for key in delete {
                    if self.remove(&source, &key, &mut touched) {
                        keys.push(key);
                    }
                }
                for o in apply {
                    if let Err(e) = validate(&source, &o) {
                        rejected.push(e);
                        continue;
                    }
                    let key = o.key();
                    keys.extend(self.put(&source, key, o, &mut touched));
                }
            }
            Update::Forget { .. } => {
                let held: Vec<ObjectKey> = self
                    .keys
                    .get(&source)
                    .map(|k| k.iter().cloned().collect())
                    .unwrap_or_default();
                for key in held {
                    if self.remove(&source, &key, &mut touched) {
                        keys.push(key);
                    }
                }
                self.keys.remove(&source);
                status = None;
            }
            // Turned into a `Reset` above.
            Update::ResetKeeping { .. } => {}
            Update::Stale { error, .. } => {
                let s = status.get_or_insert_with(SourceStatus::default);
                if s.state == SourceState::Synced {
                    s.state = SourceState::Stale {
                        since: SystemTime::now(),
                    };
                }
                s.last_error = Some(error);
            }
        }
        if let Some(s) = &mut status {
            s.objects = self.keys.get(&source).map_or(0, HashSet::len);
        }
        let change = self.publish(touched, &source, status, keys, at);
        Applied { change, rejected }
    }

    /// Adds or replaces one object (`key` is its key); returns the key if
    /// the object differed from what the source held.
    fn put(
        &mut self,
        source: &SourceId,
        key: ObjectKey,
        object: Object,
        touched: &mut BTreeSet<Hostname>,
    ) -> Option<ObjectKey> {
        let changed = match object {
            Object::Service {
                origin,
                mut service,
            } => {
                service.source = source.clone();
                let host = service.hostname.clone();
                let ns = service.namespace.clone();
                let decls = self
                    .declarations
                    .entry(host.clone())
                    .or_insert_with(|| PerHost::with_capacity(1));
                let k = (source.clone(), ns.clone(), origin);
                if decls.get(&k).is_some_and(|old| **old == service) {
                    false
                } else {
                    let selects = service.workload_selector.is_some();
                    let old = decls.insert(k, Arc::new(service));
                    let selected = old.is_some_and(|o| o.workload_selector.is_some());
                    self.count_selecting(&ns, &host, selected, selects);
                    touched.insert(host);
                    true
                }
            }
            Object::Endpoints(shard) => {
                let host = shard.hostname.clone();
                let shards = self
                    .shards
                    .entry(host.clone())
                    .or_insert_with(|| PerHost::with_capacity(1));
                let k = (source.clone(), shard.name);
                let mut endpoints = shard.endpoints;
                for ep in &mut endpoints {
                    ep.source = source.clone();
                }
                endpoints.sort_by(canonical_order);
                endpoints.dedup();
                share_equal_values(&mut endpoints);
                if shards.get(&k).is_some_and(|old| **old == *endpoints) {
                    false
                } else {
                    shards.insert(k, endpoints.into());
                    touched.insert(host);
                    true
                }
            }
            Object::Workload(w) => {
                let ns = w.namespace.clone();
                let list = self.workloads.entry(ns.clone()).or_default();
                let k = (source.clone(), w.name.clone());
                if list.get(&k).is_some_and(|old| **old == w) {
                    false
                } else {
                    list.insert(k, Arc::new(w));
                    self.touch_selecting(&ns, touched);
                    true
                }
            }
            Object::DestinationRule(rule) => {
                self.set_rule_selector(source, &rule);
                let k = (source.clone(), rule.namespace.clone(), rule.name.clone());
                let host = rule.host.clone();
                if rule.is_wildcard() {
                    let wk = (host, k);
                    if self
                        .wildcard_rules
                        .get(&wk)
                        .is_some_and(|old| **old == *rule)
                    {
                        false
                    } else {
                        self.touch_matching(&rule, touched);
                        self.wildcard_rules.insert(wk, Arc::new(*rule));
                        true
                    }
                } else {
                    let rules = self.rules.entry(host.clone()).or_default();
                    if rules.get(&k).is_some_and(|old| **old == *rule) {
                        false
                    } else {
                        rules.insert(k, Arc::new(*rule));
                        touched.insert(host);
                        true
                    }
                }
            }
            Object::Sidecar(sidecar) => {
                let k = (
                    sidecar.namespace.clone(),
                    sidecar.name.clone(),
                    source.clone(),
                );
                let mut sidecars = self.view.sidecars.clone();
                if sidecars.get(&k).is_some_and(|old| **old == *sidecar) {
                    false
                } else {
                    sidecars.insert(k, Arc::new(*sidecar));
                    self.set_sidecars(sidecars);
                    true
                }
            }
            Object::WorkloadGroup(group) => {
                let k = (group.namespace.clone(), group.name.clone(), source.clone());
                if self
                    .view
                    .workload_groups
                    .get(&k)
                    .is_some_and(|old| **old == *group)
                {
                    false
                } else {
                    let mut view = (*self.view).clone();
                    view.workload_groups.insert(k, Arc::new(*group));
                    self.view = Arc::new(view);
                    self.groups_changed = true;
                    true
                }
            }
        };
        let held = match self.keys.get_mut(source) {
            Some(held) => held,
            None => self.keys.entry(source.clone()).or_default(),
        };
        // Updates of an object the source holds (the common case) store
        // nothing new.
        if !held.contains(&key) {
            held.insert(key.clone());
        }
        changed.then_some(key)
    }

    /// Removes one object; returns whether it existed.
    fn remove(
        &mut self,
        source: &SourceId,
        key: &ObjectKey,
        touched: &mut BTreeSet<Hostname>,
    ) -> bool {
        if let Some(keys) = self.keys.get_mut(source) {
            keys.remove(key);
        }
        match key {
            ObjectKey::Service {
                namespace,
                hostname,
                origin,
            } => {
                let Some(decls) = self.declarations.get_mut(hostname) else {
                    return false;
                };
                let Some(old) = decls.remove(&(source.clone(), namespace.clone(), origin.clone()))
                else {
                    return false;
                };
                if decls.is_empty() {
                    self.declarations.remove(hostname);
                }
                self.count_selecting(namespace, hostname, old.workload_selector.is_some(), false);
                touched.insert(hostname.clone());
                true
            }
            ObjectKey::Endpoints { hostname, shard } => {
                let Some(shards) = self.shards.get_mut(hostname) else {
                    return false;
                };
                if shards.remove(&(source.clone(), shard.clone())).is_none() {
                    return false;
                }
                if shards.is_empty() {
                    self.shards.remove(hostname);
                }
                touched.insert(hostname.clone());
                true
            }
            ObjectKey::Workload { namespace, name } => {
                let Some(list) = self.workloads.get_mut(namespace) else {
                    return false;
                };
                if list.remove(&(source.clone(), name.clone())).is_none() {
                    return false;
                }
                if list.is_empty() {
                    self.workloads.remove(namespace);
                }
                self.touch_selecting(namespace, touched);
                true
            }
            ObjectKey::DestinationRule {
                namespace,
                name,
                hostname,
            } => {
                let sk = (namespace.clone(), name.clone(), source.clone());
                if self.view.rule_selectors.contains_key(&sk)
                    || self.view.rule_failover_priorities.contains_key(&sk)
                {
                    let mut view = (*self.view).clone();
                    view.rule_selectors.remove(&sk);
                    view.rule_failover_priorities.remove(&sk);
                    self.view = Arc::new(view);
                    self.selectors_changed = true;
                }
                let k = (source.clone(), namespace.clone(), name.clone());
                if hostname.as_str().starts_with('*') {
                    let Some(old) = self.wildcard_rules.remove(&(hostname.clone(), k)) else {
                        return false;
                    };
                    self.touch_matching(&old, touched);
                    return true;
                }
                let Some(rules) = self.rules.get_mut(hostname) else {
                    return false;
                };
                if rules.remove(&k).is_none() {
                    return false;
                }
                if rules.is_empty() {
                    self.rules.remove(hostname);
                }
                touched.insert(hostname.clone());
                true
            }
            ObjectKey::Sidecar { namespace, name } => {
                let mut sidecars = self.view.sidecars.clone();
                if sidecars
                    .remove(&(namespace.clone(), name.clone(), source.clone()))
                    .is_none()
                {
                    return false;
                }
                self.set_sidecars(sidecars);
                true
            }
            ObjectKey::WorkloadGroup { namespace, name } => {
                let k = (namespace.clone(), name.clone(), source.clone());
                if !self.view.workload_groups.contains_key(&k) {
                    return false;
                }
                let mut view = (*self.view).clone();
                view.workload_groups.remove(&k);
                self.view = Arc::new(view);
                self.groups_changed = true;
                true
            }
        }
    }

    /// Keeps the view's rule selectors and failover priority labels in
    /// step with `rule` from `source`.
    fn set_rule_selector(&mut self, source: &SourceId, rule: &DestinationRule) {
        let k = (rule.namespace.clone(), rule.name.clone(), source.clone());
        let priorities = failover_priorities(rule);
        let old = self.view.rule_selectors.get(&k).map(|s| &**s);
        let old_priorities = self
            .view
            .rule_failover_priorities
            .get(&k)
            .map_or(&[][..], |p| &p[..]);
        if old == rule.workload_selector.as_ref() && old_priorities == &priorities[..] {
            return;
        }
        let mut view = (*self.view).clone();
        match &rule.workload_selector {
            Some(sel) => {
                view.rule_selectors.insert(k.clone(), Arc::new(sel.clone()));
            }
            None => {
                view.rule_selectors.remove(&k);
            }
        }
        if priorities.is_empty() {
            view.rule_failover_priorities.remove(&k);
        } else {
            view.rule_failover_priorities
                .insert(k, Arc::new(priorities));
        }
        self.view = Arc::new(view);
        self.selectors_changed = true;
    }

    /// Replaces the Sidecars of the current view (published with the
    /// update being applied).
    fn set_sidecars(&mut self, sidecars: OrdMap<SidecarKey, Arc<Sidecar>>) {
        let mut view = (*self.view).clone();
        view.sidecars = sidecars;
        self.view = Arc::new(view);
        self.selectors_changed = true;
    }

    /// A wildcard rule changed: every declared host it matches may change.
    fn touch_matching(&self, rule: &DestinationRule, touched: &mut BTreeSet<Hostname>) {
        touched.extend(
            self.declarations
                .keys()
                .filter(|h| rule.matches(h.as_str()))
                .cloned(),
        );
    }

    /// The rules that may apply to `host`: per namespace, its exact ones,
    /// else the wildcard ones with the longest matching suffix (Istio: the
    /// most specific host of each namespace's rules wins).
    fn rules_for(&self, host: &Hostname) -> Vec<(&RuleKey, &Arc<DestinationRule>)> {
        let mut all: Vec<(&RuleKey, &Arc<DestinationRule>)> = self
            .rules
            .get(host)
            .into_iter()
            .flatten()
            .chain(
                self.wildcard_rules
                    .iter()
                    .filter(|(_, r)| r.matches(host.as_str()))
                    .map(|((_, k), r)| (k, r)),
            )
            .collect();
        if all.len() < 2 {
            return all;
        }
        // Specificity: an exact host beats any wildcard, a longer wildcard
        // a shorter one.
        let rank = |r: &DestinationRule| {
            if r.is_wildcard() {
                r.host.as_str().len()
            } else {
                usize::MAX
            }
        };
        let best = |ns: &str, all: &[(&RuleKey, &Arc<DestinationRule>)]| {
            all.iter()
                .filter(|(k, _)| k.1 == ns)
                .map(|(_, r)| rank(r))
                .max()
                .unwrap_or(0)
        };
        let keep: Vec<bool> = all
            .iter()
            .map(|(k, r)| rank(r) == best(&k.1, &all))
            .collect();
        let mut keep = keep.into_iter();
        all.retain(|_| keep.next().unwrap_or(false));
        all
    }

    /// Keeps `selecting` in step with a declaration that selected
    /// (`before`) and selects (`after`).
    fn count_selecting(&mut self, ns: &str, host: &Hostname, before: bool, after: bool) {
        if before == after {
            return;
        }
        let hosts = self.selecting.entry(ns.to_string()).or_default();
        let n = hosts.entry(host.clone()).or_default();
        if after {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                hosts.remove(host);
            }
        }
        if hosts.is_empty() {
            self.selecting.remove(ns);
        }
    }

    /// A workload of `ns` changed: every host selecting in `ns` may change.
    fn touch_selecting(&self, ns: &str, touched: &mut BTreeSet<Hostname>) {
        if let Some(hosts) = self.selecting.get(ns) {
            touched.extend(hosts.keys().cloned());
        }
    }

    fn merged(&self, host: &Hostname) -> Option<MergedService> {
        let declarations = self.declarations.get(host)?;
        let workloads = |ns: &str| {
            self.workloads
                .get(ns)
                .into_iter()
                .flatten()
                .map(|((source, _), w)| (source, w))
        };
        let rules = self.rules_for(host);
        merge(
            host,
            Inputs {
                declarations,
                shards: self.shards.get(host),
                workloads,
                rules: &rules,
            },
        )
    }

    fn publish(
        &mut self,
        touched: BTreeSet<Hostname>,
        source: &SourceId,
        status: Option<SourceStatus>,
        keys: Vec<ObjectKey>,
        at: Instant,
    ) -> Option<Arc<Change>> {
        let mut services = self.view.services.clone();
        let mut endpoint_count = self.view.endpoint_count;
        let mut conflict_count = self.view.conflict_count;
        let mut changed = BTreeMap::new();
        for host in touched {
            let new = self.merged(&host);
            let old = services.get(&host);
            let kind = match (old, &new) {
                (None, None) => None,
                (Some(_), None) => Some(ChangeKind::Removed),
                (None, Some(_)) => Some(ChangeKind::Service),
                (Some(o), Some(n))
                    if !o.service.same_shape(&n.service)
                        || o.destination_rule != n.destination_rule
                        || o.rules != n.rules
                        || o.selector_rules != n.selector_rules
                        || o.by_namespace != n.by_namespace =>
                {
                    Some(ChangeKind::Service)
                }
                (Some(o), Some(n))
                    if !Arc::ptr_eq(&o.endpoints, &n.endpoints) && o.endpoints != n.endpoints =>
                {
                    Some(ChangeKind::Endpoints)
                }
                (Some(o), Some(n)) if **o != *n => Some(ChangeKind::Endpoints),
                (Some(_), Some(_)) => None,
            };
            let Some(kind) = kind else { continue };
            let no_conflicts = Vec::new();
            let before = old.map_or(&no_conflicts, |o| &o.conflicts);
            let after = new.as_ref().map_or(&no_conflicts, |n| &n.conflicts);
            // Logged when they appear and when they clear, never per publish.
            for c in after.iter().filter(|c| !before.contains(c)) {
                tracing::warn!(hostname = %host, conflict = %c, "declarations disagree");
            }
            for c in before.iter().filter(|c| !after.contains(c)) {
                tracing::info!(hostname = %host, conflict = %c, "disagreement resolved");
            }
            conflict_count = conflict_count + after.len() - before.len();
            if let Some(o) = old {
                endpoint_count -= o.endpoints.len();
            }
            match new {
                Some(n) => {
                    endpoint_count += n.endpoints.len();
                    services.insert(host.clone(), Arc::new(n));
                }
                None => {
                    services.remove(&host);
                }
            }
            changed.insert(host, kind);
        }
        let status_changed = self.view.sources.get(source) != status.as_ref();
        let proxy_selectors = std::mem::take(&mut self.selectors_changed);
        let groups = std::mem::take(&mut self.groups_changed);
        if changed.is_empty() && !status_changed && !proxy_selectors && !groups {
            return None;
        }
        let mut sources = self.view.sources.clone();
        match status {
            Some(s) => {
                sources.insert(source.clone(), s);
            }
            None => {
                sources.remove(source);
            }
        }
        let version = self.view.version + 1;
        let change = Arc::new(Change {
            version,
            at,
            source: Some(source.clone()),
            keys,
            services: changed,
            proxy_selectors,
        });
        // The log keeps what a reader catching up folds (hostnames; a fold
        // has no keys): the keys are the update's caller's only. A first
        // sync of 10,000 files names 20,000 keys, 2.4 MB a log entry would
        // keep until 1,024 more changes.
        let logged = if change.keys.is_empty() {
            change.clone()
        } else {
            Arc::new(Change {
                keys: Vec::new(),
                services: change.services.clone(),
                source: change.source.clone(),
                ..*change
            })
        };
        let mut log = self.view.log.clone();
        log.push_back(logged);
        while log.len() > CHANGE_LOG_LEN {
            log.pop_front();
        }
        self.view = Arc::new(View {
            version,
            services,
            sources,
            log,
            endpoint_count,
            conflict_count,
            sidecars: self.view.sidecars.clone(),
            workload_groups: self.view.workload_groups.clone(),
            rule_selectors: self.view.rule_selectors.clone(),
            rule_failover_priorities: self.view.rule_failover_priorities.clone(),
        });
        // Receivers may all be gone (e.g. during shutdown); the view is still
        // kept for `Writer::view`.
        self.tx.send_replace(self.view.clone());
        Some(change)
    }
}

/// The registry's own checks (sources validate their platform's rules).
fn validate(source: &SourceId, object: &Object) -> Result<(), Error> {
    let invalid = |reason: String| Error::Invalid {
        source_id: source.clone(),
        key: object.key(),
        reason,
    };
    match object {
        Object::Service { service, .. } => {
            if service.hostname.as_str().is_empty() {
                return Err(invalid("empty hostname".into()));
            }
            let mut numbers = BTreeSet::new();
            for p in &service.ports {
                if p.number == 0 {
                    return Err(invalid("port 0".into()));
                }
                if !numbers.insert(p.number) {
                    return Err(invalid(format!("port {} declared twice", p.number)));
                }
            }
        }
        Object::Endpoints(shard) => {
            if shard.hostname.as_str().is_empty() {
                return Err(invalid("empty hostname".into()));
            }
        }
        Object::Workload(w) => {
            if w.name.is_empty() {
                return Err(invalid("empty name".into()));
            }
        }
        Object::DestinationRule(r) => {
            if r.name.is_empty() || r.host.as_str().is_empty() {
                return Err(invalid("a destination rule needs a name and a host".into()));
            }
            let mut names = BTreeSet::new();
            for subset in &r.subsets {
                if subset.name.is_empty() || !names.insert(subset.name.as_str()) {
                    return Err(invalid(format!(
                        "subset {:?} is unnamed or declared twice",
                        subset.name
                    )));
                }
            }
        }
        Object::Sidecar(s) => {
            if s.name.is_empty() || s.namespace.is_empty() {
                return Err(invalid("a sidecar needs a name and a namespace".into()));
            }
        }
        Object::WorkloadGroup(g) => {
            if g.name.is_empty() || g.namespace.is_empty() {
                return Err(invalid(
                    "a workload group needs a name and a namespace".into(),
                ));
            }
        }
    }
    Ok(())
}

// === impl Reader ===

impl Reader {
    /// The latest view.
    pub fn view(&self) -> Arc<View> {
        self.rx.borrow().clone()
    }

    /// Waits for a view newer than the last one this reader returned from
    /// `changed`; `None` once the writer is gone.
    pub async fn changed(&mut self) -> Option<Arc<View>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }

    /// Waits until every known source serves; returns that view, or `None`
    /// if the writer went away first.
    pub async fn wait_until_ready(&mut self) -> Option<Arc<View>> {
        self.rx
            .wait_for(|v| v.is_ready())
            .await
            .ok()
            .map(|v| v.clone())
    }
}

/// Every `failoverPriority` entry of `rule` (rule, port and subset
/// levels), sorted and unique.
fn failover_priorities(rule: &DestinationRule) -> Vec<String> {
    let mut out: Vec<String> = rule
        .traffic_policy
        .iter()
        .chain(
            rule.subsets
                .iter()
                .filter_map(|s| s.traffic_policy.as_ref()),
        )
        .flat_map(|p| std::iter::once(p).chain(p.port_level_settings.iter().map(|(_, l)| l)))
        .filter_map(|p| p.locality_lb.as_ref())
        .flat_map(|l| l.failover_priority.iter().cloned())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests;
