//! Merge rules: every declaration, shard and selected workload for one
//! hostname become one [`MergedService`], at read time.
//!
//! The rule is deterministic and independent of arrival order:
//!
//! 1. Declarations are ordered by (source, namespace, declaring object):
//!    source kind precedence first (Kubernetes over ServiceEntry, as in
//!    Istio, see [`SourceKind`](crate::SourceKind)), then source name, then
//!    namespace, then the object's name (Istio orders same-host
//!    ServiceEntries by creation time; names stand in for it, since files
//!    have none). Each declaration stays in the store with its own
//!    namespace and `exportTo` ([`MergedService::declared`]).
//! 2. The first declaration gives the shape (namespace, resolution,
//!    location, labels, exportTo, selector).
//! 3. Ports are the union by number. When two declarations give the same
//!    number a different name or protocol, the first wins and a
//!    [`Conflict`] is recorded; so is a different resolution.
//! 4. Addresses (VIPs) are the union per cluster id.
//! 5. Endpoints are the union of every shard for the host and of every
//!    workload a declaration selects (same namespace, selector labels
//!    matched; a workload reached by name or Unix socket only behind DNS
//!    resolution), sorted canonically (locality, address, ports, …) and
//!    deduplicated.
//! 6. `DNS_ROUND_ROBIN`: only the endpoints reached through the first
//!    declaration (its own shard, named after its declaring object, and the
//!    workloads it selects) when it has any, as Istio's
//!    `mergeServiceInstances` keeps the first ServiceEntry's instance.
//! 7. A host with shards but no declaration is not a service (yet).

use std::fmt;
use std::sync::Arc;

use litemap::LiteMap;

use crate::model::{Endpoint, Hostname, Resolution, Service, canonical_order, share_equal_values};
use crate::object::Workload;
use crate::policy::{DestinationRule, exported_to};
use crate::source::SourceId;

/// Orders declarations of one host: (source, namespace, declaring object).
pub(crate) type DeclKey = (SourceId, String, String);
/// Orders shards of one host: (source, shard name).
pub(crate) type ShardKey = (SourceId, String);

/// Orders destination rules: (source, namespace, name).
pub(crate) type RuleKey = (SourceId, String, String);

/// The namespace whose rules apply to every namespace's services after
/// the service's own (Istio's default root namespace).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A shard as the store holds it: endpoints stamped with their source,
/// sorted canonically and deduplicated, in one contiguous allocation. A host
/// whose endpoints all come from one shard shares it with the merged view
/// (each endpoint in memory once, and contiguous for generation).
pub(crate) type StoredShard = Arc<[Endpoint]>;

/// What a host has of one kind (declarations, shards), by key, in key
/// order. Nearly every host has one of each (one source declares it, one
/// shard of endpoints), and a one-entry `BTreeMap` allocates a whole node
/// of eleven: 896 bytes per declaration and 720 per shard, 16 MB for
/// 10,000 ServiceEntries (heaptrack). A sorted `Vec` (`litemap`) holds
/// exactly what it has; inserting is O(n) in the host's entries, which
/// are few (a Kubernetes Service's EndpointSlices: one per 100 endpoints).
pub(crate) type PerHost<K, V> = LiteMap<K, V>;

/// One declaration of a merged host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The declaring source.
    pub source: SourceId,
    /// The namespace it was declared in.
    pub namespace: String,
    /// The declaring object's name.
    pub origin: String,
    /// Its `exportTo`.
    pub export_to: Vec<String>,
}

/// What two declarations of one host disagree on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ConflictKind {
    /// The same port number with another name or protocol.
    Port(u16),
    /// Another resolution.
    Resolution,
    /// Another destination rule for the host (from another namespace).
    DestinationRule,
}

/// A disagreement the merge rule settled: `kept`'s value won over
/// `ignored`'s.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// What they disagree on.
    pub kind: ConflictKind,
    /// The winning declaration, and its value.
    pub kept: String,
    /// The losing declaration, and its value.
    pub ignored: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ConflictKind::Port(n) => format!("port {n}"),
            ConflictKind::Resolution => "resolution".to_string(),
            ConflictKind::DestinationRule => "destination rule".to_string(),
        };
        write!(f, "{what}: keeping {} over {}", self.kept, self.ignored)
    }
}

/// The merged state of one hostname, as proxies should see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedService {
    /// The merged service shape.
    pub service: Service,
    /// Every endpoint, in canonical order (for a host served by one shard,
    /// the store's own allocation).
    pub endpoints: Arc<[Endpoint]>,
    /// The sources that contributed (declarations, shards, workloads),
    /// sorted.
    pub contributors: Vec<SourceId>,
    /// Every declaration, in precedence order.
    pub declared: Vec<Declared>,
    /// Disagreements between declarations that the merge rule settled.
    pub conflicts: Vec<Conflict>,
    /// The destination rule for a client outside any namespace (see
    /// `pick_rule`): the rules of the service's namespace, else of the
    /// root namespace, else of the first other namespace. A proxy of a
    /// namespace gets [`MergedService::rule_for`] instead.
    pub destination_rule: Option<Arc<DestinationRule>>,
    /// Every rule without a workload selector that may apply to the host,
    /// one per namespace (the rules of one namespace for the most specific
    /// matching host, merged as istiod's `mergeDestinationRule` does),
    /// ordered by namespace.
    pub rules: Vec<Arc<DestinationRule>>,
    /// The rules with a workload selector that may apply to the host, each
    /// alone, ordered by (namespace, name): one applies, before any other,
    /// to the proxies of its namespace whose labels its selector matches
    /// (istiod's `SidecarScope.DestinationRule`), and to no other proxy.
    pub selector_rules: Vec<Arc<DestinationRule>>,
    /// For a host declared in more than one namespace, the host as each of
    /// those namespaces declares it, in precedence order (Istio keeps one
    /// service per hostname and namespace and gives a proxy its own
    /// namespace's, else the first visible one: see
    /// [`MergedService::for_namespace`]); empty otherwise. Each holds its
    /// namespace's declarations, the shards they own (a shard named after
    /// its declaring object), the other shards of their sources, the
    /// shards of sources that declare nothing for the host, and the
    /// workloads they select. The fields above are the union, served to
    /// proxies outside any namespace.
    pub by_namespace: Vec<(String, Arc<MergedService>)>,
}

impl MergedService {
    /// The host as a proxy of namespace `client` sees it, `None` when no
    /// declaration is exported to it (Istio's `exportTo`; an empty one is
    /// every namespace). A host declared in several namespaces gives the
    /// declaration of `client` itself if there is one, else the first
    /// visible one in precedence order (names stand in for Istio's
    /// creation time), each with only its own endpoints (istio/istio
    /// PR 13631: a namespace cannot add endpoints to another's service).
    pub fn for_namespace(&self, client: &str) -> Option<&MergedService> {
        self.for_namespace_where(client, |_| true)
    }

    /// [`MergedService::for_namespace`] among the declarations of the
    /// namespaces `imports` accepts (a Sidecar's egress hosts: a proxy
    /// whose Sidecar imports only `ns-b/*` gets `ns-b`'s declaration of a
    /// host that `ns-a` declares too).
    pub fn for_namespace_where(
        &self,
        client: &str,
        imports: impl Fn(&str) -> bool,
    ) -> Option<&MergedService> {
        let visible = |m: &MergedService| {
            m.declared
                .iter()
                .any(|d| exported_to(&d.export_to, &d.namespace, client) && imports(&d.namespace))
        };
        if self.by_namespace.is_empty() {
            return visible(self).then_some(self);
        }
        let own = self
            .by_namespace
            .iter()
            .find(|(ns, m)| ns == client && visible(m));
        own.or_else(|| self.by_namespace.iter().find(|(_, m)| visible(m)))
            .map(|(_, m)| &**m)
    }

    /// The destination rule for a proxy of namespace `client` reaching this
    /// host as declared in `service_namespace` (Istio's
    /// `PushContext.destinationRule`): the rule of the client's namespace,
    /// else the service's namespace's if exported to the client, else the
    /// root namespace's if exported to the client.
    pub fn rule_for(&self, client: &str, service_namespace: &str) -> Option<&Arc<DestinationRule>> {
        let of = |ns: &str| {
            self.rules
                .iter()
                .find(|r| r.namespace == ns && exported_to(&r.export_to, &r.namespace, client))
        };
        of(client)
            .or_else(|| of(service_namespace))
            .or_else(|| of(ROOT_NAMESPACE))
    }
}

/// What the merge reads for one host.
pub(crate) struct Inputs<'a, W> {
    pub(crate) declarations: &'a PerHost<DeclKey, Arc<Service>>,
    pub(crate) shards: Option<&'a PerHost<ShardKey, StoredShard>>,
    /// The workloads of a namespace, with their sources.
    pub(crate) workloads: W,
    /// The destination rules naming the host.
    pub(crate) rules: &'a [(&'a RuleKey, &'a Arc<DestinationRule>)],
}

/// Merges one host; `None` without a declaration.
pub(crate) fn merge<'a, W, I>(host: &Hostname, inputs: Inputs<'a, W>) -> Option<MergedService>
where
    W: Fn(&str) -> I + Copy,
    I: Iterator<Item = (&'a SourceId, &'a Arc<Workload>)>,
{
    let mut merged = merge_one(host, &inputs)?;
    let namespaces: Vec<&String> = {
        let mut seen: Vec<&String> = Vec::new();
        for (_, ns, _) in inputs.declarations.keys() {
            if !seen.contains(&ns) {
                seen.push(ns);
            }
        }
        seen
    };
    if namespaces.len() < 2 {
        return Some(merged);
    }
    // The precedence order of each namespace's first declaration.
    let mut by_namespace = Vec::with_capacity(namespaces.len());
    let declarations = inputs.declarations;
    for ns in namespaces {
        let mine: PerHost<DeclKey, Arc<Service>> = declarations
            .iter()
            .filter(|((_, n, _), _)| n == ns)
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let shards: PerHost<ShardKey, StoredShard> = inputs
            .shards
            .into_iter()
            .flatten()
            .filter(|((source, name), _)| {
                // A shard named after a declaring object belongs to it.
                if let Some(((_, owner_ns, _), _)) = declarations
                    .iter()
                    .find(|((s, _, origin), _)| s == source && origin == name)
                {
                    return owner_ns == ns;
                }
                // Otherwise to its source's declarations, or, from a source
                // that declares nothing for the host, to every namespace.
                let declares = |n: Option<&String>| {
                    declarations
                        .keys()
                        .any(|(s, dn, _)| s == source && n.is_none_or(|n| n == dn))
                };
                declares(Some(ns)) || !declares(None)
            })
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let variant = merge_one(
            host,
            &Inputs {
                declarations: &mine,
                shards: Some(&shards),
                workloads: inputs.workloads,
                rules: inputs.rules,
            },
        );
        if let Some(v) = variant {
            by_namespace.push((ns.clone(), Arc::new(v)));
        }
    }
    merged.by_namespace = by_namespace;
    Some(merged)
}

/// Merges the declarations `inputs` gives into one service.
fn merge_one<'w, W, I>(host: &Hostname, inputs: &Inputs<'_, W>) -> Option<MergedService>
where
    W: Fn(&str) -> I,
    I: Iterator<Item = (&'w SourceId, &'w Arc<Workload>)>,
{
    let mut decls = inputs.declarations.iter();
    let ((first_source, first_ns, first_origin), first) = decls.next()?;
    let describe = |(s, ns, origin): &DeclKey| format!("{s}: {origin} in {ns}");
    let first_name = describe(&(first_source.clone(), first_ns.clone(), first_origin.clone()));
    let mut service = (**first).clone();
    service.hostname = host.clone();
    let mut conflicts = Vec::new();
    let mut declared = vec![Declared {
        source: first_source.clone(),
        namespace: first_ns.clone(),
        origin: first_origin.clone(),
        export_to: first.export_to.clone(),
    }];
    for (key, d) in decls {
        declared.push(Declared {
            source: key.0.clone(),
            namespace: key.1.clone(),
            origin: key.2.clone(),
            export_to: d.export_to.clone(),
        });
        for port in &d.ports {
            match service.port(port.number) {
                None => service.ports.push(port.clone()),
                Some(existing)
                    if existing.protocol != port.protocol || existing.name != port.name =>
                {
                    conflicts.push(Conflict {
                        kind: ConflictKind::Port(port.number),
                        kept: format!("{first_name} ({}/{:?})", existing.name, existing.protocol),
                        ignored: format!("{} ({}/{:?})", describe(key), port.name, port.protocol),
                    });
                }
                Some(_) => {}
            }
        }
        if d.resolution != service.resolution {
            conflicts.push(Conflict {
                kind: ConflictKind::Resolution,
                kept: format!("{first_name} ({:?})", service.resolution),
                ignored: format!("{} ({:?})", describe(key), d.resolution),
            });
        }
        for (cluster, addrs) in &d.addresses {
            let entry = service.addresses.entry(cluster.clone()).or_default();
            for a in addrs {
                if !entry.contains(a) {
                    entry.push(a.clone());
                }
            }
        }
    }
    conflicts.sort();
    conflicts.dedup();

    let dns = matches!(
        service.resolution,
        Resolution::Dns | Resolution::DnsRoundRobin
    );
    let mut contributors: Vec<SourceId> = declared.iter().map(|d| d.source.clone()).collect();
    // (shard, reached through the first declaration)
    let mut shards: Vec<(&StoredShard, bool)> = Vec::new();
    for ((source, name), shard) in inputs.shards.into_iter().flatten() {
        if !shard.is_empty() {
            shards.push((shard, source == first_source && name == first_origin));
            contributors.push(source.clone());
        }
    }
    // (endpoint, reached through the first declaration)
    let mut selected: Vec<(Endpoint, bool)> = Vec::new();
    for (i, ((_, ns, _), d)) in inputs.declarations.iter().enumerate() {
        let Some(selector) = &d.workload_selector else {
            continue;
        };
        for (source, w) in (inputs.workloads)(ns) {
            if w.selected_by(ns, selector)
                && w.joins(dns)
                && let Some(ep) = w.endpoint(source)
            {
                selected.push((ep, i == 0));
                contributors.push(source.clone());
            }
        }
    }
    let endpoints: Arc<[Endpoint]> = match (shards.as_slice(), selected.is_empty()) {
        // The common case: one shard, already canonical; shared as is.
        ([(shard, _)], true) => Arc::clone(shard),
        _ => {
            let own_only = service.resolution == Resolution::DnsRoundRobin
                && (shards.iter().any(|(_, own)| *own) || selected.iter().any(|(_, own)| *own));
            let mut all: Vec<Endpoint> = shards
                .iter()
                .filter(|(_, own)| !own_only || *own)
                .flat_map(|(shard, _)| shard.iter().cloned())
                .chain(
                    selected
                        .into_iter()
                        .filter(|(_, own)| !own_only || *own)
                        .map(|(ep, _)| ep),
                )
                .collect();
            all.sort_by(canonical_order);
            all.dedup();
            share_equal_values(&mut all);
            all.into()
        }
    };
    contributors.sort();
    contributors.dedup();
    let (selecting, catch_all): (Vec<_>, Vec<_>) = inputs
        .rules
        .iter()
        .partition(|(_, r)| r.workload_selector.is_some());
    let rules = rules_by_namespace(&catch_all);
    let mut selector_rules: Vec<Arc<DestinationRule>> =
        selecting.into_iter().map(|(_, r)| Arc::clone(r)).collect();
    selector_rules.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let destination_rule = pick_rule(&service.namespace, &rules, &mut conflicts);
    Some(MergedService {
        service,
        endpoints,
        contributors,
        declared,
        conflicts,
        destination_rule,
        rules,
        selector_rules,
        by_namespace: Vec::new(),
    })
}

/// One rule per namespace, ordered by namespace: the rules of a namespace
/// (in (namespace, name, source) order) merged as istiod's
/// `mergeDestinationRule` does: subsets appended (a repeated subset name
/// keeps the first), the first traffic policy. One rule alone is shared as
/// is.
fn rules_by_namespace(rules: &[&(&RuleKey, &Arc<DestinationRule>)]) -> Vec<Arc<DestinationRule>> {
    let mut sorted: Vec<&(&RuleKey, &Arc<DestinationRule>)> = rules.to_vec();
    sorted.sort_by(|(a, _), (b, _)| (&a.1, &a.2, &a.0).cmp(&(&b.1, &b.2, &b.0)));
    let mut out: Vec<Arc<DestinationRule>> = Vec::new();
    for (_, rule) in sorted {
        match out.last_mut() {
            Some(last) if last.namespace == rule.namespace => {
                let m = Arc::make_mut(last);
                for subset in &rule.subsets {
                    if !m.subsets.iter().any(|s| s.name == subset.name) {
                        m.subsets.push(subset.clone());
                    }
                }
                if m.traffic_policy.is_none() {
                    m.traffic_policy.clone_from(&rule.traffic_policy);
                }
            }
            _ => out.push(Arc::clone(rule)),
        }
    }
    out
}

/// The rule for a client outside any namespace, for a service of
/// `namespace`, among `rules` (one per namespace): the service's
/// namespace's, then the root namespace's ([`ROOT_NAMESPACE`]), then the
/// first other namespace's. The others are reported as conflicts (a proxy
/// of their namespace gets them: [`MergedService::rule_for`]).
fn pick_rule(
    namespace: &str,
    rules: &[Arc<DestinationRule>],
    conflicts: &mut Vec<Conflict>,
) -> Option<Arc<DestinationRule>> {
    let rank = |ns: &str| match ns {
        n if n == namespace => 0,
        ROOT_NAMESPACE => 1,
        _ => 2,
    };
    let chosen = rules.iter().min_by(|a, b| {
        (rank(&a.namespace), &a.namespace).cmp(&(rank(&b.namespace), &b.namespace))
    })?;
    for r in rules.iter().filter(|r| r.namespace != chosen.namespace) {
        conflicts.push(Conflict {
            kind: ConflictKind::DestinationRule,
            kept: format!("{}/{}", chosen.namespace, chosen.name),
            ignored: format!("{}/{}", r.namespace, r.name),
        });
    }
    conflicts.sort();
    conflicts.dedup();
    Some(Arc::clone(chosen))
}
