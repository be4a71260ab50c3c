//! The resource cache: the encoded CDS and EDS resources for the whole
//! registry, kept as immutable [`Snapshot`]s that connections share.
//!
//! The [`Generator`] turns registry changes into new snapshots, regenerating
//! only the hosts a [`Change`](meshreg_registry::Change) names and keeping a
//! resource whose regenerated version is unchanged. Each snapshot remembers
//! which resource names changed in its last generations, so a connection
//! that is one or a hundred generations behind computes its update from the
//! names alone, not by comparing everything; one that fell further behind
//! than the history compares everything (still correct, just slower).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use imbl::{OrdMap, Vector};
use std::collections::BTreeMap;

use meshreg_registry::{
    ChangeKind, Hostname, Locality, MergedService, Port, Resolution, Sidecar, Subset, View,
};
use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

use crate::cds;
use crate::check;
use crate::codec;
use crate::eds;
use crate::locality;
use crate::proxyless;
use crate::resource::{Resource, TypeUrl};
use crate::scope::{IpFamily, ScopeKey, Scopes};

/// How many generations of changed names a snapshot remembers.
const HISTORY_LEN: usize = 256;

/// All resources of one type in one snapshot.
#[derive(Debug, Clone, Default)]
struct TypeResources {
    map: OrdMap<Arc<str>, Arc<Resource>>,
    /// XOR of a hash of every (name, version): the SotW version of the
    /// whole set, maintained in O(changes) and equal on every replica that
    /// holds the same resources.
    digest: u64,
}

impl TypeResources {
    fn entry_hash(r: &Resource) -> u64 {
        xxh3_64(format!("{}\0{}", r.name, r.version).as_bytes())
    }

    /// Inserts `r`; returns true when it is new or its version changed.
    fn upsert(&mut self, r: Resource) -> bool {
        self.upsert_shared(Arc::new(r))
    }

    /// Inserts `r`, shared with other snapshots; returns true when it is
    /// new or its version changed.
    fn upsert_shared(&mut self, r: Arc<Resource>) -> bool {
        if let Some(old) = self.map.get(&r.name) {
            if old.version == r.version {
                return false;
            }
            self.digest ^= Self::entry_hash(old);
        }
        self.digest ^= Self::entry_hash(&r);
        self.map.insert(r.name.clone(), r);
        true
    }

    fn remove(&mut self, name: &str) -> bool {
        match self.map.remove(name) {
            Some(old) => {
                self.digest ^= Self::entry_hash(&old);
                true
            }
            None => false,
        }
    }
}

/// The names that changed (updated, added or removed) in one generation.
#[derive(Debug)]
struct GenerationChange {
    generation: u64,
    at: Option<Instant>,
    names: Names,
}

/// An immutable, shareable view of every generated resource.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    generation: u64,
    registry_version: u64,
    ready: bool,
    types: [TypeResources; TypeUrl::COUNT],
    history: Vector<Arc<GenerationChange>>,
    /// Per full-state type (CDS), every resource as one encoded
    /// `resources` field: a SotW CDS response is the full set, the same for
    /// every wildcard proxy, so it is built once per snapshot (on first
    /// use) rather than once per proxy.
    sotw_full: [OnceLock<Bytes>; TypeUrl::COUNT],
    /// The scope epoch this snapshot was published in (see `scope`).
    pub(crate) epoch: u64,
}

/// Generations of the snapshots of scope lineage `n` start at `n << 40`, so
/// that a stream moving to another scope never mistakes another lineage's
/// generation for its own (it compares everything once).
const LINEAGE_SHIFT: u32 = 40;

/// What a connection must look at to catch up with a snapshot.
#[derive(Debug)]
pub(crate) enum Catchup {
    /// Only these names can differ (unsorted; a name changed in several
    /// generations appears once per generation).
    Names(Vec<Arc<str>>),
    /// The history does not reach back far enough: compare everything.
    Everything,
}

impl Snapshot {
    /// The empty, not-ready first snapshot of scope lineage `n`.
    pub(crate) fn lineage(n: u64) -> Self {
        Snapshot {
            generation: n << LINEAGE_SHIFT,
            ..Snapshot::default()
        }
    }

    /// Starts the next generation, which changed `names` (by type) for a
    /// registry event at `at`.
    fn record(&mut self, names: Names, at: Option<Instant>) {
        for (t, names) in names.iter().enumerate() {
            if !names.is_empty() {
                // The set changed: its SotW encoding is rebuilt on first
                // use (kept while only other types change).
                self.sotw_full[t] = OnceLock::new();
            }
        }
        self.generation += 1;
        self.history.push_back(Arc::new(GenerationChange {
            generation: self.generation,
            at,
            names,
        }));
        while self.history.len() > HISTORY_LEN {
            self.history.pop_front();
        }
    }

    /// The generation: grows by one per published snapshot.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The registry version this snapshot reflects.
    pub fn registry_version(&self) -> u64 {
        self.registry_version
    }

    /// True once the registry has synced every source (and from then on,
    /// whatever sources are added or lost later); nothing is sent to
    /// proxies before.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The resource of `type_url` named `name`.
    pub fn get(&self, type_url: TypeUrl, name: &str) -> Option<&Arc<Resource>> {
        self.types[type_url as usize].map.get(name)
    }

    /// Every resource of `type_url`, ordered by name.
    pub fn resources(&self, type_url: TypeUrl) -> impl Iterator<Item = &Arc<Resource>> {
        self.types[type_url as usize].map.values()
    }

    /// The number of resources of `type_url`.
    pub fn len(&self, type_url: TypeUrl) -> usize {
        self.types[type_url as usize].map.len()
    }

    /// True when there are no resources at all.
    pub fn is_empty(&self) -> bool {
        self.types.iter().all(|t| t.map.is_empty())
    }

    /// A content digest of all resources of `type_url` (the SotW
    /// `version_info`).
    pub fn digest(&self, type_url: TypeUrl) -> u64 {
        self.types[type_url as usize].digest
    }

    /// The resources of `t` whose names start with `prefix` (the members
    /// of a LEDS collection), in name order.
    pub(crate) fn with_prefix<'a>(
        &'a self,
        t: TypeUrl,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Resource>> + 'a {
        let map = &self.types[t as usize].map;
        map.range::<_, str>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(move |(name, _)| name.starts_with(prefix))
        .map(|(_, r)| r)
    }

    /// Every resource of `t`, encoded as the `resources` field of a SotW
    /// response.
    pub(crate) fn sotw_all(&self, t: TypeUrl) -> &Bytes {
        self.sotw_full[t as usize].get_or_init(|| codec::sotw_resources_field(self.resources(t)))
    }

    /// The names of `type_url` that changed after `generation`, and the
    /// earliest registry event among those changes.
    pub(crate) fn changed_since(
        &self,
        type_url: TypeUrl,
        generation: u64,
    ) -> (Catchup, Option<Instant>) {
        if generation == self.generation {
            return (Catchup::Names(Vec::new()), None);
        }
        if generation > self.generation {
            // Another scope's lineage.
            return (Catchup::Everything, None);
        }
        // Generations in the history are consecutive: the ones after
        // `generation` are its last `self.generation - generation` entries.
        let wanted = (self.generation - generation) as usize;
        if wanted > self.history.len() {
            return (Catchup::Everything, None);
        }
        let mut names = Vec::new();
        let mut at: Option<Instant> = None;
        let start = self.history.len() - wanted;
        debug_assert!(
            self.history
                .get(start)
                .is_none_or(|g| g.generation == generation + 1)
        );
        for g in (start..self.history.len()).filter_map(|i| self.history.get(i)) {
            let g_names = &g.names[type_url as usize];
            if !g_names.is_empty() {
                names.extend(g_names.iter().cloned());
                at = match (at, g.at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        (Catchup::Names(names), at)
    }
}

/// The resource names generated for one hostname.
#[derive(Debug, Default)]
struct HostResources {
    clusters: Vec<Arc<str>>,
    assignments: Vec<Arc<str>>,
    /// Per assignment served through LEDS, its members' names.
    members: HashMap<Arc<str>, Vec<Arc<str>>>,
}

/// What one [`Generator::apply`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GenerateStats {
    /// Clusters added, changed or removed.
    pub clusters_changed: usize,
    /// ClusterLoadAssignments added, changed or removed.
    pub assignments_changed: usize,
    /// Whether a new snapshot was published.
    pub published: bool,
    /// Resources newly withheld because Envoy would reject them, by type
    /// (index: [`TypeUrl`] as usize). Each content is counted once.
    pub invalid: [usize; TypeUrl::COUNT],
    /// What caused it.
    pub triggers: crate::status::Triggers,
}

/// Turns registry views into snapshots and publishes them.
#[derive(Debug)]
pub struct Generator {
    hosts: HashMap<Hostname, HostResources>,
    /// Resources withheld because they break an Envoy invariant: (type,
    /// name) to the version that did, so each content is reported once.
    /// Bounded by the number of resources; an entry goes when the resource
    /// becomes valid or its host goes.
    invalid: HashMap<(TypeUrl, Arc<str>), Arc<str>>,
    /// Whether resources are checked before they are served.
    check: bool,
    registry_version: Option<u64>,
    snapshot: Arc<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// The table shared with streams.
    scopes: Scopes,
    history: crate::status::PushHistory,
    /// What each scope holds.
    scoped: HashMap<ScopeKey, ScopeState>,
    /// Resources of hosts that some scope sees otherwise than the unscoped
    /// snapshot (another namespace's declaration or rule), per (declaring
    /// namespace, rule namespace); dropped when the host changes.
    flavors: HashMap<Hostname, Vec<(Flavor, ByType)>>,
    /// Which Sidecar or rule selects what (namespace, name, selector), and
    /// the labels failover priorities rank by: when they change, streams
    /// pick their scope again.
    selection: (Vec<Selects>, Vec<String>),
    /// East-west gateways per network (split horizon); empty: one network.
    gateways: Arc<crate::NetworkGateways>,
    /// Assignments with at least this many endpoints are served through
    /// LEDS to proxies that take it (`usize::MAX`: none).
    leds_threshold: usize,
    /// The Kubernetes DNS domain gRPC clients' short names expand to.
    cluster_domain: String,
}

/// Resources by type (index: [`TypeUrl`] as usize).
type ByType = [Vec<Arc<Resource>>; TypeUrl::COUNT];

/// Resource names by type (index: [`TypeUrl`] as usize).
type Names = [Vec<Arc<str>>; TypeUrl::COUNT];

/// Indices of per-type arrays.
const CDS: usize = TypeUrl::Cluster as usize;
const EDS: usize = TypeUrl::ClusterLoadAssignment as usize;
const LDS: usize = TypeUrl::Listener as usize;
const RDS: usize = TypeUrl::RouteConfiguration as usize;
const LEDS_EDS: usize = TypeUrl::LedsClusterLoadAssignment as usize;
const LEDS: usize = TypeUrl::LbEndpoint as usize;

/// A Sidecar's (namespace, name, workload selector).
type Selects = (String, String, Option<BTreeMap<String, String>>);

/// A way of seeing a host: (the namespace of the declaration seen, the
/// rule applied (namespace, name), the DNS lookup family of a DNS host,
/// the proxy's locality and failover priority labels when locality load
/// balancing applies).
type Flavor = (
    String,
    Option<(String, String)>,
    Option<IpFamily>,
    Option<Place>,
    Option<String>,
    Option<Arc<str>>,
);

/// Where a proxy is, for locality load balancing: its locality and its
/// values of the failover priority labels (see
/// [`ScopeKey::priority_labels`]).
pub(crate) type Place = (Locality, Option<Vec<(String, String)>>);

/// What one scope holds.
#[derive(Debug)]
struct ScopeState {
    /// Its Sidecar as last generated.
    sidecar: Option<Arc<Sidecar>>,
    /// Whether it was generated once.
    built: bool,
    tx: watch::Sender<Arc<Snapshot>>,
    snapshot: Arc<Snapshot>,
    /// The resource names it holds per host, by type.
    hosts: HashMap<Hostname, Names>,
    /// Every host's listener for each listener name (gRPC scopes): a short
    /// name can also be another service's own host (see `proxyless`).
    listeners: Contenders,
}

/// Per listener name, the hosts that generated one and their listeners.
type Contenders = HashMap<Arc<str>, Vec<(Hostname, Arc<Resource>)>>;

impl Default for Generator {
    fn default() -> Self {
        Self::new()
    }
}

impl Generator {
    /// An empty, not-ready generator.
    pub fn new() -> Self {
        let snapshot = Arc::new(Snapshot::default());
        let (tx, _) = watch::channel(snapshot.clone());
        Generator {
            hosts: HashMap::new(),
            invalid: HashMap::new(),
            check: true,
            registry_version: None,
            snapshot,
            tx,
            scopes: Scopes::default(),
            history: Default::default(),
            scoped: HashMap::new(),
            flavors: HashMap::new(),
            selection: (Vec::new(), Vec::new()),
            gateways: Arc::new(crate::NetworkGateways::new()),
            leds_threshold: crate::leds::DEFAULT_THRESHOLD,
            cluster_domain: "cluster.local".into(),
        }
    }

    /// The Kubernetes DNS domain proxyless gRPC clients' short names
    /// (`reviews:9080`) expand to, as istiod's `--domain` (default
    /// `cluster.local`).
    pub fn with_cluster_domain(mut self, domain: &str) -> Self {
        self.cluster_domain = domain.to_string();
        self
    }

    /// Serves assignments of at least `threshold` endpoints through LEDS
    /// to proxies that take it (see `leds`); `None` turns LEDS off. The
    /// default is [`leds::DEFAULT_THRESHOLD`](crate::leds::DEFAULT_THRESHOLD).
    /// Set it before the first [`Generator::apply`].
    pub fn with_leds_threshold(mut self, threshold: Option<usize>) -> Self {
        self.leds_threshold = threshold.unwrap_or(usize::MAX).max(1);
        self
    }

    /// Serves endpoints on other networks through these east-west gateways
    /// (multi-network split horizon, see `network`): each proxy's network
    /// then picks its scope. Empty (the default): every endpoint is
    /// reached directly.
    pub fn with_network_gateways(mut self, gateways: crate::NetworkGateways) -> Self {
        self.scopes.lock().multi_network = gateways.values().any(|g| !g.is_empty());
        self.gateways = Arc::new(gateways);
        self
    }

    /// Turns the check against Envoy's invariants ([`Invalid`]) off or on
    /// (it is on by default). Off, every generated resource is served and a
    /// proxy's NACK is the only guard: an escape hatch for a check that
    /// refuses what a particular Envoy accepts, and a way for tests to make
    /// a real Envoy reject something.
    ///
    /// [`Invalid`]: crate::Invalid
    pub fn check_resources(mut self, on: bool) -> Self {
        self.check = on;
        self
    }

    /// A receiver of every snapshot this generator publishes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// How many resources of `type_url` are withheld now because Envoy
    /// would reject them (their last good version, if any, is served).
    pub fn withheld(&self, type_url: TypeUrl) -> usize {
        self.invalid.keys().filter(|(t, _)| *t == type_url).count()
    }

    /// Brings the resources up to date with `view`, regenerating only what
    /// changed since the last view applied, and publishes a new snapshot if
    /// any resource changed or readiness did.
    pub fn apply(&mut self, view: &View) -> GenerateStats {
        let mut next = (*self.snapshot).clone();
        let changes = self.registry_version.and_then(|v| view.changes_since(v));
        // Without the registry's log (the first run, or fell behind): every
        // host, and the Sidecars may have changed.
        let full = changes.is_none();
        let sidecars_changed = changes.as_ref().is_none_or(|c| c.proxy_selectors);
        let (work, at): (Vec<(Hostname, ChangeKind)>, Option<Instant>) = match changes {
            Some(change) => (change.services.into_iter().collect(), Some(change.at)),
            None => {
                // First run or fell behind the registry's log: every host.
                let mut all: BTreeSet<Hostname> = self.hosts.keys().cloned().collect();
                all.extend(view.services().map(|(h, _)| h.clone()));
                (
                    all.into_iter().map(|h| (h, ChangeKind::Service)).collect(),
                    None,
                )
            }
        };
        self.registry_version = Some(view.version());
        let mut changed = Names::default();
        let mut invalid = [0; TypeUrl::COUNT];
        for (host, kind) in &work {
            match view.service(host.as_str()) {
                Some(svc) if *kind != ChangeKind::Removed => {
                    self.regenerate(&mut next, host, svc, *kind, &mut changed, &mut invalid)
                }
                _ => self.remove_host(&mut next, host, &mut changed),
            }
        }
        let mut triggers = crate::status::Triggers {
            full,
            config: sidecars_changed && !full,
            ..Default::default()
        };
        if !full {
            for (_, kind) in &work {
                match kind {
                    ChangeKind::Endpoints => triggers.endpoints += 1,
                    ChangeKind::Service => triggers.services += 1,
                    ChangeKind::Removed => triggers.removed += 1,
                }
            }
        }
        let hosts: Vec<Hostname> = work.into_iter().map(|(h, _)| h).collect();
        let stats = GenerateStats {
            clusters_changed: changed[CDS].len(),
            assignments_changed: changed[EDS].len(),
            published: false,
            invalid,
            triggers,
        };
        // Ready once, ready for good: a source added or lost later (its
        // status is on /ready) must not stop pushes of every other one.
        let ready = next.ready || view.is_ready();
        let ready_flip = next.ready != ready;
        next.registry_version = view.version();
        if changed.iter().all(Vec::is_empty) && !ready_flip {
            // No resource changed: record the registry version without
            // waking anyone (no stream has anything to send).
            self.snapshot = Arc::new(next);
            let snapshot = self.snapshot.clone();
            self.tx.send_if_modified(|s| {
                *s = snapshot;
                false
            });
            self.update_scopes(view, &hosts, full, sidecars_changed, at);
            return stats;
        }
        next.ready = ready;
        next.record(changed, at);
        self.snapshot = Arc::new(next);
        self.tx.send_replace(self.snapshot.clone());
        self.update_scopes(view, &hosts, full, sidecars_changed, at);
        GenerateStats {
            published: true,
            ..stats
        }
    }

    /// The last generations, for `/debug/push_status` (share it with
    /// [`AdsService::with_push_history`](crate::AdsService::with_push_history)).
    pub fn push_history(&self) -> &crate::status::PushHistory {
        &self.history
    }

    /// The scopes this generator keeps up to date (see `scope`).
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// Brings every scope up to date after the unscoped snapshot was: the
    /// hosts in `changed` (every host when `full`, and in a scope that is
    /// new or whose Sidecar changed), then publishes the scopes that
    /// changed, or whose epoch did.
    fn update_scopes(
        &mut self,
        view: &View,
        changed: &[Hostname],
        full: bool,
        sidecars_changed: bool,
        at: Option<Instant>,
    ) {
        let epoch = {
            let mut t = self.scopes.lock();
            t.view = Some(Arc::new(view.clone()));
            if sidecars_changed {
                let selection = selection_of(view);
                if selection != self.selection {
                    self.selection = selection;
                    t.epoch += 1;
                }
            }
            // Scopes no stream watches any more go (a new one's stream holds
            // its receiver from the start).
            let pending = std::mem::take(&mut t.pending);
            t.senders.retain(|_, tx| tx.receiver_count() > 0);
            self.scoped.retain(|k, _| t.senders.contains_key(k));
            for key in pending {
                if let Some(tx) = t.senders.get(&key) {
                    let snapshot = tx.borrow().clone();
                    self.scoped.insert(
                        key,
                        ScopeState {
                            sidecar: None,
                            built: false,
                            tx: tx.clone(),
                            snapshot,
                            hosts: HashMap::new(),
                            listeners: HashMap::new(),
                        },
                    );
                }
            }
            t.epoch
        };
        if self.scoped.is_empty() {
            self.flavors.clear();
            return;
        }
        if full {
            self.flavors.clear();
        } else {
            for host in changed {
                self.flavors.remove(host);
            }
        }
        let mut scoped = std::mem::take(&mut self.scoped);
        let ready = self.snapshot.ready;
        for (key, state) in &mut scoped {
            let sidecar = key.sidecar.as_ref().and_then(|(ns, name)| {
                view.sidecars()
                    .find(|s| &s.namespace == ns && &s.name == name)
                    .cloned()
            });
            let rebuild = full || !state.built || sidecar != state.sidecar;
            state.sidecar = sidecar;
            state.built = true;
            let hosts: Vec<Hostname> = if rebuild {
                let mut all: BTreeSet<Hostname> = state.hosts.keys().cloned().collect();
                all.extend(view.services().map(|(h, _)| h.clone()));
                all.into_iter().collect()
            } else {
                changed.to_vec()
            };
            let mut next = (*state.snapshot).clone();
            let mut names = Names::default();
            for host in &hosts {
                let resources = match view.service(host.as_str()) {
                    Some(svc) => self.scoped_resources(host, svc, key, state.sidecar.as_deref()),
                    None => ByType::default(),
                };
                put_host(
                    &mut next,
                    &mut state.hosts,
                    &mut state.listeners,
                    host,
                    resources,
                    &mut names,
                );
            }
            let resources_changed = names.iter().any(|n| !n.is_empty());
            if !resources_changed && next.ready == ready && next.epoch == epoch {
                continue;
            }
            if resources_changed || next.ready != ready {
                next.ready = ready;
                next.registry_version = view.version();
                next.record(names, at);
            }
            next.epoch = epoch;
            state.snapshot = Arc::new(next);
            state.tx.send_replace(state.snapshot.clone());
        }
        self.scoped = scoped;
    }

    /// The resources of `host` a proxy of namespace `client` under
    /// `sidecar` gets (by type), shared with the unscoped snapshot where
    /// they are the same, else with other scopes that see the same flavor.
    fn scoped_resources(
        &mut self,
        host: &Hostname,
        svc: &MergedService,
        scope: &ScopeKey,
        sidecar: Option<&Sidecar>,
    ) -> ByType {
        let client = &*scope.namespace;
        let imports = |ns: &str| sidecar.is_none_or(|s| s.imports(host.as_str(), ns, client));
        let Some(seen) = svc.for_namespace_where(client, imports) else {
            return ByType::default();
        };
        let namespace = seen.service.namespace.as_str();
        // A rule selecting this scope's proxies comes first (istiod's
        // `SidecarScope.DestinationRule`).
        let rule = svc
            .selector_rules
            .iter()
            .find(|r| {
                scope
                    .rules
                    .iter()
                    .any(|(ns, name)| *ns == r.namespace && *name == r.name)
            })
            .or_else(|| svc.rule_for(client, namespace));
        let same_rule = match (rule, &svc.destination_rule) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        // DNS clusters carry the proxy's lookup family (the unscoped
        // snapshot's is V4_PREFERRED, for any Envoy).
        let dns = matches!(
            seen.service.resolution,
            Resolution::Dns | Resolution::DnsRoundRobin
        );
        // Locality load balancing makes the endpoints the proxy's own.
        let located = rule.is_some_and(|r| locality::may_depend_on_proxy(r));
        // So does an endpoint behind another network's gateway.
        let networked =
            !dns && crate::network::needs_split(&seen.endpoints, &scope.network, &self.gateways);
        if std::ptr::eq(seen, svc)
            && same_rule
            && !dns
            && !located
            && !networked
            && !scope.proxyless
        {
            // What the unscoped snapshot serves, last good versions
            // included.
            let Some(entry) = self.hosts.get(host) else {
                return ByType::default();
            };
            let pick = |t: TypeUrl, names: &[Arc<str>]| -> Vec<Arc<Resource>> {
                names
                    .iter()
                    .filter_map(|n| self.snapshot.get(t, n).cloned())
                    .collect()
            };
            // (No listeners or routes: those are for gRPC scopes only.)
            let mut out = ByType::default();
            out[CDS] = pick(TypeUrl::Cluster, &entry.clusters);
            out[EDS] = pick(TypeUrl::ClusterLoadAssignment, &entry.assignments);
            out[LEDS_EDS] = pick(TypeUrl::LedsClusterLoadAssignment, &entry.assignments);
            let members: Vec<Arc<str>> = entry.members.values().flatten().cloned().collect();
            out[LEDS] = pick(TypeUrl::LbEndpoint, &members);
            return out;
        }
        let family = dns.then_some(scope.ip_family);
        let locality: Option<Place> =
            located.then(|| (scope.locality.clone(), scope.priority_labels.clone()));
        let network = networked.then(|| scope.network.clone());
        let flavor = (
            namespace.to_string(),
            rule.map(|r| (r.namespace.clone(), r.name.clone())),
            family,
            locality.clone(),
            network.clone(),
            scope.proxyless.then(|| scope.namespace.clone()),
        );
        let flavors = self.flavors.entry(host.clone()).or_default();
        if let Some((_, r)) = flavors.iter().find(|(f, _)| *f == flavor) {
            return r.clone();
        }
        let mut as_seen = seen.clone();
        as_seen.destination_rule = rule.cloned();
        let split = network.as_deref().map(|n| (n, &*self.gateways));
        let generated = generate_flavor(
            host,
            &as_seen,
            family,
            locality.as_ref(),
            split,
            scope.proxyless.then_some(proxyless::Client {
                namespace: &scope.namespace,
                domain: &self.cluster_domain,
            }),
            FlavorOptions {
                leds_threshold: self.leds_threshold,
                check: self.check,
            },
        );
        flavors.push((flavor, generated.clone()));
        generated
    }

    fn regenerate(
        &mut self,
        next: &mut Snapshot,
        host: &Hostname,
        svc: &MergedService,
        kind: ChangeKind,
        changed: &mut Names,
        invalid: &mut [usize; TypeUrl::COUNT],
    ) {
        let checking = self.check;
        let threshold = self.leds_threshold;
        let entry = self.hosts.entry(host.clone()).or_default();
        // Endpoint-only changes of an EDS service leave its clusters alone;
        // DNS clusters carry their endpoints inline, so they are rebuilt.
        let clusters_too =
            kind != ChangeKind::Endpoints || svc.service.resolution != Resolution::Static;
        let mut new_clusters = Vec::with_capacity(svc.service.ports.len());
        let mut new_assignments = Vec::new();
        // Clusters whose new version is withheld: their last good version
        // stays, and so do its endpoints.
        let mut withheld: Vec<Arc<str>> = Vec::new();
        for (port, subset) in clusters_of(svc) {
            // Reuse the name's allocation when the resource exists already.
            let fresh = cds::cluster_name(
                port.number,
                subset.map_or("", |s| s.name.as_str()),
                host.as_str(),
            );
            let name: Arc<str> = entry
                .clusters
                .iter()
                .find(|n| ***n == *fresh)
                .cloned()
                .unwrap_or_else(|| fresh.into());
            if clusters_too {
                let Some(cluster) = cds::cluster(&name, svc, port, subset) else {
                    // No cluster (a DNS service without endpoints): any
                    // earlier one is removed below.
                    continue;
                };
                let r = Resource::encode(TypeUrl::Cluster, name.clone(), &cluster);
                match checked(checking, || check::cluster(&cluster)) {
                    Ok(()) => {
                        self.invalid.remove(&(TypeUrl::Cluster, name.clone()));
                        if next.types[CDS].upsert(r) {
                            changed[CDS].push(name.clone());
                        }
                    }
                    Err(why) => {
                        withheld.push(name.clone());
                        invalid[CDS] += report(&mut self.invalid, TypeUrl::Cluster, &r, svc, &why);
                    }
                }
            }
            if svc.service.resolution == Resolution::Static {
                let cla = eds::load_assignment(&name, svc, port, subset);
                let r = Resource::encode(TypeUrl::ClusterLoadAssignment, name.clone(), &cla);
                match checked(checking, || check::assignment(&cla)) {
                    Ok(()) => {
                        self.invalid
                            .remove(&(TypeUrl::ClusterLoadAssignment, name.clone()));
                        let r = Arc::new(r);
                        if next.types[EDS].upsert_shared(r.clone()) {
                            changed[EDS].push(name.clone());
                            let members = entry.members.remove(&name).unwrap_or_default();
                            let members =
                                put_leds(next, &name, &cla, r, threshold, members, changed);
                            if !members.is_empty() {
                                entry.members.insert(name.clone(), members);
                            }
                        }
                    }
                    Err(why) => {
                        invalid[EDS] += report(
                            &mut self.invalid,
                            TypeUrl::ClusterLoadAssignment,
                            &r,
                            svc,
                            &why,
                        );
                        // Without a last good version, an empty assignment,
                        // so the cluster does not stay warming until
                        // Envoy's initial fetch timeout.
                        if next.get(TypeUrl::ClusterLoadAssignment, &name).is_none() {
                            let empty = eds::empty_assignment(&name);
                            let r = Arc::new(Resource::encode(
                                TypeUrl::ClusterLoadAssignment,
                                name.clone(),
                                &empty,
                            ));
                            if next.types[EDS].upsert_shared(r.clone()) {
                                changed[EDS].push(name.clone());
                                let members = entry.members.remove(&name).unwrap_or_default();
                                put_leds(next, &name, &empty, r, threshold, members, changed);
                            }
                        }
                    }
                }
                new_assignments.push(name.clone());
            }
            new_clusters.push(name);
        }
        if clusters_too {
            for old in entry.clusters.iter().filter(|o| !new_clusters.contains(o)) {
                if next.types[CDS].remove(old) {
                    changed[CDS].push(old.clone());
                }
            }
        }
        for old in entry
            .assignments
            .iter()
            .filter(|o| !new_assignments.contains(o) && !withheld.contains(o))
        {
            self.invalid
                .remove(&(TypeUrl::ClusterLoadAssignment, old.clone()));
            if next.types[EDS].remove(old) {
                changed[EDS].push(old.clone());
            }
            remove_leds(next, old, entry.members.remove(old), changed);
        }
        for name in &withheld {
            if !new_assignments.contains(name) && entry.assignments.contains(name) {
                new_assignments.push(name.clone());
            }
        }
        entry.clusters = new_clusters;
        entry.assignments = new_assignments;
    }

    fn remove_host(&mut self, next: &mut Snapshot, host: &Hostname, changed: &mut Names) {
        let Some(entry) = self.hosts.remove(host) else {
            return;
        };
        for name in &entry.clusters {
            self.invalid.remove(&(TypeUrl::Cluster, name.clone()));
        }
        for name in &entry.assignments {
            self.invalid
                .remove(&(TypeUrl::ClusterLoadAssignment, name.clone()));
        }
        for name in entry.clusters {
            if next.types[CDS].remove(&name) {
                changed[CDS].push(name);
            }
        }
        let mut members = entry.members;
        for name in entry.assignments {
            if next.types[EDS].remove(&name) {
                changed[EDS].push(name.clone());
            }
            remove_leds(next, &name, members.remove(&name), changed);
        }
    }
}

/// Which Sidecar may select which proxy.
fn selection_of(view: &View) -> (Vec<Selects>, Vec<String>) {
    let selects = view
        .sidecars()
        .map(|s| {
            (
                s.namespace.clone(),
                s.name.clone(),
                s.workload_selector.clone(),
            )
        })
        .chain(
            view.rule_selectors()
                .map(|((ns, name), sel)| (ns.clone(), name.clone(), Some(sel.clone()))),
        )
        .collect();
    let labels = view
        .failover_priority_labels()
        .into_iter()
        .map(str::to_string)
        .collect();
    (selects, labels)
}

/// Replaces what a scope holds of `host` with `resources`, recording the
/// names that changed. Listeners go through `listeners` (see
/// [`listener_winner`]).
fn put_host(
    next: &mut Snapshot,
    held: &mut HashMap<Hostname, Names>,
    listeners: &mut Contenders,
    host: &Hostname,
    resources: ByType,
    changed: &mut Names,
) {
    let old = held.remove(host).unwrap_or_default();
    let mut new = Names::default();
    for (t, list) in resources.into_iter().enumerate() {
        if t == LDS {
            for r in list {
                new[t].push(r.name.clone());
                let entry = listeners.entry(r.name.clone()).or_default();
                entry.retain(|(h, _)| h != host);
                entry.push((host.clone(), r));
            }
            for name in old[t].iter().filter(|n| !new[t].contains(n)) {
                if let Some(entry) = listeners.get_mut(name) {
                    entry.retain(|(h, _)| h != host);
                }
            }
            for name in old[t].iter().chain(&new[t]) {
                match listeners.get(name).and_then(|c| listener_winner(c)) {
                    Some(r) => {
                        if next.types[t].upsert_shared(r.clone()) {
                            changed[t].push(name.clone());
                        }
                    }
                    None => {
                        listeners.remove(name);
                        if next.types[t].remove(name) {
                            changed[t].push(name.clone());
                        }
                    }
                }
            }
            continue;
        }
        for r in list {
            new[t].push(r.name.clone());
            let name = r.name.clone();
            if next.types[t].upsert_shared(r) {
                changed[t].push(name);
            }
        }
        for name in old[t].iter().filter(|n| !new[t].contains(n)) {
            if next.types[t].remove(name) {
                changed[t].push(name.clone());
            }
        }
    }
    if new.iter().any(|n| !n.is_empty()) {
        held.insert(host.clone(), new);
    }
}

/// Which of the listeners named alike is served: the one of the service
/// whose own host the name is (`<host>:<port>`) over a short form, else
/// the first host by name, so the choice does not depend on the order of
/// changes; `None` when no host has one.
fn listener_winner(contenders: &[(Hostname, Arc<Resource>)]) -> Option<&Arc<Resource>> {
    let exact = |(h, r): &&(Hostname, Arc<Resource>)| {
        r.name
            .strip_prefix(h.as_str())
            .is_some_and(|rest| rest.starts_with(':'))
    };
    contenders
        .iter()
        .min_by(|a, b| exact(b).cmp(&exact(a)).then_with(|| a.0.cmp(&b.0)))
        .map(|(_, r)| r)
}

/// The generator's settings a flavor is generated with.
#[derive(Debug, Clone, Copy)]
struct FlavorOptions {
    /// See [`Generator::with_leds_threshold`].
    leds_threshold: usize,
    /// See [`Generator::check_resources`].
    check: bool,
}

/// Every resource of `svc` (a host as one namespace sees it), by type.
/// A resource Envoy would reject is left out and logged (a scope has no
/// last good version of its own). For a proxyless gRPC scope, gRPC's
/// clusters and the listeners and routes of `proxyless`: those are
/// generated for gRPC scopes only, so a mesh of Envoys pays nothing for
/// them (an Envoy's wildcard LDS gets none either way). For an Envoy scope,
/// the LEDS form of each assignment of `leds_threshold` endpoints or more
/// and its members (see `leds`), else the plain assignment, for its LEDS
/// proxies.
fn generate_flavor(
    host: &Hostname,
    svc: &MergedService,
    family: Option<IpFamily>,
    locality: Option<&Place>,
    split: Option<(&str, &crate::NetworkGateways)>,
    proxyless: Option<proxyless::Client<'_>>,
    options: FlavorOptions,
) -> ByType {
    let FlavorOptions {
        leds_threshold,
        check,
    } = options;
    let mut out = ByType::default();
    for (port, subset) in clusters_of(svc) {
        let name = cds::cluster_name(
            port.number,
            subset.map_or("", |s| s.name.as_str()),
            host.as_str(),
        );
        let cluster = if proxyless.is_some() {
            cds::grpc_cluster(&name, svc)
        } else {
            cds::cluster(&name, svc, port, subset)
        };
        let Some(mut cluster) = cluster else {
            continue;
        };
        if let Some(family) = family {
            cluster.dns_lookup_family = cds::lookup_family(family);
        }
        let policy = locality.and_then(|l| Some((l, cds::policy_for(svc, port, subset)?)));
        if let (Some((l, p)), Some(cla)) = (&policy, cluster.load_assignment.as_mut()) {
            locality::apply_assignment(cla, l, p);
        }
        if let Err(why) = checked(check, || check::cluster(&cluster)) {
            tracing::warn!(%name, error = %why, "scoped cluster withheld: Envoy would reject it");
            continue;
        }
        if svc.service.resolution == Resolution::Static {
            // Split horizon: the subset's endpoints as the proxy's network
            // reaches them, gateways included.
            let split_svc;
            let (svc, subset) = match split {
                Some((network, gateways)) => {
                    let chosen: Vec<_> = svc
                        .endpoints
                        .iter()
                        .filter(|e| eds::in_subset(e, subset))
                        .cloned()
                        .collect();
                    split_svc = MergedService {
                        endpoints: crate::network::split(
                            &chosen,
                            network,
                            gateways,
                            &svc.service.ports,
                            &svc.service.source,
                        )
                        .into(),
                        ..svc.clone()
                    };
                    (&split_svc, None)
                }
                None => (svc, subset),
            };
            let mut cla = match &policy {
                Some(((_, Some(labels)), p)) => match locality::failover_ranks(p, labels) {
                    Some(rank) => eds::load_assignment_ranked(&name, svc, port, subset, &rank),
                    None => eds::load_assignment(&name, svc, port, subset),
                },
                _ => eds::load_assignment(&name, svc, port, subset),
            };
            if let Some((l, p)) = &policy {
                locality::apply_assignment(&mut cla, l, p);
            }
            let cla = match checked(check, || check::assignment(&cla)) {
                Ok(()) => cla,
                Err(why) => {
                    tracing::warn!(%name, error = %why, "scoped assignment withheld: Envoy would reject it");
                    eds::empty_assignment(&name)
                }
            };
            let plain = Arc::new(Resource::encode(
                TypeUrl::ClusterLoadAssignment,
                name.as_str(),
                &cla,
            ));
            out[EDS].push(plain.clone());
            // LEDS proxies of this scope: the LEDS form of a large
            // assignment (a gRPC scope's clients take plain EDS).
            let size: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            if size >= leds_threshold && proxyless.is_none() {
                let (assignment, members) = crate::leds::split(&cla);
                out[LEDS_EDS].push(Arc::new(Resource::encode(
                    TypeUrl::LedsClusterLoadAssignment,
                    name.as_str(),
                    &assignment,
                )));
                out[LEDS].extend(members.into_iter().map(|(member, ep)| {
                    Arc::new(Resource::encode(TypeUrl::LbEndpoint, member, &ep))
                }));
            } else {
                out[LEDS_EDS].push(plain);
            }
        }
        out[CDS].push(Arc::new(Resource::encode(TypeUrl::Cluster, name, &cluster)));
    }
    if let Some(client) = proxyless {
        [out[LDS], out[RDS]] = proxyless_resources(host, svc, client);
    }
    out
}

/// Puts the LEDS proxies' form of the assignment `cla` (served to others
/// as `plain`) in `next`: split into collections when it has `threshold`
/// endpoints or more (see `leds`), else `plain` itself. `members` are the
/// LEDS resources the assignment had; returns those it has now.
fn put_leds(
    next: &mut Snapshot,
    name: &Arc<str>,
    cla: &envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
    plain: Arc<Resource>,
    threshold: usize,
    old: Vec<Arc<str>>,
    changed: &mut Names,
) -> Vec<Arc<str>> {
    let size: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    let mut members = Vec::new();
    let form = if size >= threshold {
        let (assignment, split) = crate::leds::split(cla);
        members.reserve(split.len());
        for (member, ep) in split {
            // Keep the name's allocation when the member exists already.
            let member: Arc<str> = match next.types[LEDS].map.get_key_value(member.as_str()) {
                Some((k, _)) => k.clone(),
                None => member.into(),
            };
            if next.types[LEDS].upsert(Resource::encode(TypeUrl::LbEndpoint, member.clone(), &ep)) {
                changed[LEDS].push(member.clone());
            }
            members.push(member);
        }
        Arc::new(Resource::encode(
            TypeUrl::LedsClusterLoadAssignment,
            name.clone(),
            &assignment,
        ))
    } else {
        plain
    };
    if next.types[LEDS_EDS].upsert_shared(form) {
        changed[LEDS_EDS].push(name.clone());
    }
    if !old.is_empty() {
        let now: std::collections::HashSet<&str> = members.iter().map(|m| &**m).collect();
        for gone in old.iter().filter(|m| !now.contains(&***m)) {
            if next.types[LEDS].remove(gone) {
                changed[LEDS].push(gone.clone());
            }
        }
    }
    members
}

/// Removes the LEDS proxies' form of the assignment `name` and its
/// `members`.
fn remove_leds(
    next: &mut Snapshot,
    name: &Arc<str>,
    members: Option<Vec<Arc<str>>>,
    changed: &mut Names,
) {
    if next.types[LEDS_EDS].remove(name) {
        changed[LEDS_EDS].push(name.clone());
    }
    for member in members.into_iter().flatten() {
        if next.types[LEDS].remove(&member) {
            changed[LEDS].push(member);
        }
    }
}

/// The proxyless gRPC listeners and route configurations of `svc` (see
/// `proxyless`): one route configuration per port, and its listener under
/// each name a client of namespace `client` may ask for. None for a
/// service gRPC has no cluster for ([`cds::grpc_cluster`]): a client that
/// held its listener is told it is gone at once, and one that never did
/// gets an empty answer (gRPC then waits its own does-not-exist timer)
/// rather than a cluster that never comes.
fn proxyless_resources(
    host: &Hostname,
    svc: &MergedService,
    client: proxyless::Client<'_>,
) -> [Vec<Arc<Resource>>; 2] {
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    if svc.service.resolution != Resolution::Static {
        return [listeners, routes];
    }
    for port in &svc.service.ports {
        for name in proxyless::listener_names(host.as_str(), port.number, client) {
            let listener = proxyless::listener(&name, svc, port);
            listeners.push(Arc::new(Resource::encode(
                TypeUrl::Listener,
                name,
                &listener,
            )));
        }
        let rc = proxyless::route_configuration(svc, port, client);
        routes.push(Arc::new(Resource::encode(
            TypeUrl::RouteConfiguration,
            rc.name.clone(),
            &rc,
        )));
    }
    [listeners, routes]
}

/// One cluster per port, and per port and subset of the host's
/// destination rule (`outbound|<port>|<subset>|<host>`).
fn clusters_of(svc: &MergedService) -> impl Iterator<Item = (&Port, Option<&Subset>)> {
    let subsets: Vec<Option<&Subset>> = std::iter::once(None)
        .chain(
            svc.destination_rule
                .iter()
                .flat_map(|r| r.subsets.iter().map(Some)),
        )
        .collect();
    svc.service
        .ports
        .iter()
        .flat_map(move |p| subsets.clone().into_iter().map(move |s| (p, s)))
}

/// The verdict of `check`, or `Ok` when checks are off.
fn checked(
    on: bool,
    check: impl FnOnce() -> Result<(), check::Invalid>,
) -> Result<(), check::Invalid> {
    if on { check() } else { Ok(()) }
}

/// Records that `r` is withheld for `why`; logs it the first time this
/// content is seen. Returns 1 when it was new (for the counter), else 0.
fn report(
    invalid: &mut HashMap<(TypeUrl, Arc<str>), Arc<str>>,
    type_url: TypeUrl,
    r: &Resource,
    svc: &MergedService,
    why: &check::Invalid,
) -> usize {
    let key = (type_url, r.name.clone());
    if invalid.get(&key) == Some(&r.version) {
        return 0;
    }
    let sources: Vec<String> = svc.contributors.iter().map(|s| s.to_string()).collect();
    tracing::warn!(
        type_url = key.0.short(),
        name = %r.name,
        hostname = %svc.service.hostname,
        sources = ?sources,
        error = %why,
        "generated resource withheld: Envoy would reject it; proxies keep its last good version"
    );
    invalid.insert(key, r.version.clone());
    1
}

#[cfg(test)]
mod tests;
