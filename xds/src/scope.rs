//! Scopes: the part of the mesh a proxy sees, and the table through which
//! streams find the snapshots of theirs.
//!
//! A proxy of a namespace sees the services exported to its namespace
//! (`exportTo`), each as its namespace sees it (its own declaration of a
//! host declared in several namespaces, the destination rule of its own
//! namespace first: `MergedService::for_namespace` and `rule_for`), and of
//! those only what the egress hosts of the `Sidecar` that applies to it
//! import (`View::sidecar_for`, `Sidecar::imports`). Every proxy with the
//! same namespace and Sidecar sees the same thing, so they share one
//! [`ScopeKey`] and one stream of snapshots, generated and encoded once for
//! all of them (memory per proxy does not grow with the mesh). A proxy whose
//! node names no namespace (a plain Envoy) is unscoped: it sees every
//! service, from the generator's own snapshot.
//!
//! This module owns the table the [`Generator`](crate::Generator) and the
//! streams share: one `watch` sender per scope, the scopes asked for and
//! not generated yet, and the registry view Sidecars are picked from. The
//! generator owns what each scope holds (`cache`). The table is bounded:
//! at most [`MAX_SCOPES`] scopes; a scope no stream watches any more is
//! dropped at the next generation, or at once when the table is full.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use meshreg_registry::{Locality, View};
use tokio::sync::{Notify, watch};

use crate::cache::Snapshot;

/// The most scopes held at once. Scopes come from node metadata, which a
/// proxy chooses: a stream that would need one more is refused.
pub const MAX_SCOPES: usize = 10_000;

/// What decides what a proxy sees: its namespace, the `Sidecar` that
/// applies to it (`(namespace, name)`), if any, and its IP family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey {
    /// The proxy's namespace.
    pub namespace: Arc<str>,
    /// The Sidecar that applies to it.
    pub sidecar: Option<(String, String)>,
    /// The addresses it resolves DNS clusters to.
    pub ip_family: IpFamily,
    /// The DestinationRules with a workload selector that select it
    /// (namespace, name), which come before any other rule for their host.
    pub rules: Vec<(String, String)>,
    /// Its locality (locality load balancing).
    pub locality: Locality,
    /// Its values of the labels some DestinationRule's `failoverPriority`
    /// ranks endpoints by (empty for a label it lacks), by label name;
    /// `None` for a proxy without any label (after the topology labels
    /// are added), which istiod leaves unranked.
    pub priority_labels: Option<Vec<(String, String)>>,
    /// Its network, when east-west gateways are configured (split horizon
    /// makes EDS depend on it); empty otherwise.
    pub network: String,
    /// A proxyless gRPC client (see [`Proxy::proxyless`](crate::Proxy)):
    /// its clusters are the ones gRPC accepts.
    pub proxyless: bool,
}

/// The DNS lookup family of a proxy's DNS clusters, as istiod's cluster
/// builder picks it from the proxy's IPs (`INSTANCE_IPS`, else the node
/// id's): `V6_ONLY` when it has addresses and all are IPv6, otherwise
/// `V4_ONLY` (istiod's default, dual stack disabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4 (`V4_ONLY`).
    V4,
    /// IPv6 only (`V6_ONLY`).
    V6,
}

impl IpFamily {
    /// The family of a proxy with addresses `ips`.
    pub fn of(ips: &[IpAddr]) -> IpFamily {
        if !ips.is_empty() && ips.iter().all(IpAddr::is_ipv6) {
            IpFamily::V6
        } else {
            IpFamily::V4
        }
    }
}

/// `namespace`, then `+sidecar:<ns>/<name>`, `+rule:<ns>/<name>` per
/// selecting rule, `+ipv6`, `+locality:<region>/<zone>/<subzone>`,
/// `+label:<name>=<value>` per failover priority label (what
/// `/debug/proxies` and the logs show).
impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.namespace)?;
        if let Some((ns, name)) = &self.sidecar {
            write!(f, "+sidecar:{ns}/{name}")?;
        }
        for (ns, name) in &self.rules {
            write!(f, "+rule:{ns}/{name}")?;
        }
        if self.ip_family == IpFamily::V6 {
            write!(f, "+ipv6")?;
        }
        let l = &self.locality;
        if !(l.region.is_empty() && l.zone.is_empty() && l.subzone.is_empty()) {
            write!(f, "+locality:{}/{}/{}", l.region, l.zone, l.subzone)?;
        }
        for (k, v) in self.priority_labels.iter().flatten() {
            write!(f, "+label:{k}={v}")?;
        }
        if !self.network.is_empty() {
            write!(f, "+network:{}", self.network)?;
        }
        if self.proxyless {
            write!(f, "+grpc")?;
        }
        Ok(())
    }
}

/// A stream's scope was refused: [`MAX_SCOPES`] scopes exist.
#[derive(Debug, Clone, thiserror::Error)]
#[error("too many scopes ({MAX_SCOPES}) to add one for namespace {0:?}")]
pub struct TooManyScopes(pub String);

/// The table of scopes, shared by the generator and every stream. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct Scopes {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    table: Mutex<Table>,
    wake: Notify,
}

/// What the table holds; the generator edits it under the lock.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// The registry view of the last generation (Sidecars are picked from
    /// it); `None` before the first.
    pub(crate) view: Option<Arc<View>>,
    /// Grows whenever which Sidecar applies to which proxy may have
    /// changed: a stream whose snapshot carries another epoch picks its
    /// scope again.
    pub(crate) epoch: u64,
    pub(crate) senders: HashMap<ScopeKey, watch::Sender<Arc<Snapshot>>>,
    /// Scopes asked for and not generated yet.
    pub(crate) pending: Vec<ScopeKey>,
    lineages: u64,
    /// Whether east-west gateways are configured (proxies' networks then
    /// pick their scopes).
    pub(crate) multi_network: bool,
}

/// What of a proxy picks its scope (from its node: see `Proxy`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeRequest {
    /// Its namespace (empty: unscoped).
    pub namespace: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its locality.
    pub locality: Locality,
    /// Its network (`NETWORK`; the `topology.istio.io/network` label).
    pub network: String,
    /// Its cluster (`CLUSTER_ID`; the `topology.istio.io/cluster` label).
    pub cluster_id: String,
    /// A proxyless gRPC client.
    pub proxyless: bool,
}

impl ScopeRequest {
    /// The request of `proxy`.
    pub fn of(proxy: &crate::Proxy) -> Self {
        ScopeRequest {
            namespace: proxy.namespace.clone(),
            proxyless: proxy.proxyless,
            labels: proxy.labels.clone(),
            ips: proxy.ips.clone(),
            locality: Locality {
                region: proxy.locality.0.clone(),
                zone: proxy.locality.1.clone(),
                subzone: proxy.locality.2.clone(),
            },
            network: proxy.network.clone(),
            cluster_id: proxy.cluster_id.clone(),
        }
    }

    /// A proxy of `namespace` and nothing else (tests, tools).
    pub fn namespace(namespace: &str) -> Self {
        ScopeRequest {
            namespace: namespace.to_string(),
            ..ScopeRequest::default()
        }
    }
}

/// A stream's scope: its key, its snapshots and the epoch it was picked in.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) key: ScopeKey,
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(crate) epoch: u64,
}

impl Scopes {
    /// The scope of the proxy `req` describes: `Ok(None)` for a proxy
    /// outside any namespace (unscoped). A scope not generated yet
    /// starts with an empty, not-ready snapshot and wakes the generator.
    ///
    /// # Errors
    ///
    /// [`TooManyScopes`] when the table is full.
    pub(crate) fn subscribe(
        &self,
        req: &ScopeRequest,
    ) -> Result<Option<Subscription>, TooManyScopes> {
        let (namespace, labels) = (req.namespace.as_str(), &req.labels);
        if namespace.is_empty() {
            return Ok(None);
        }
        let mut t = self.lock();
        let sidecar = t
            .view
            .as_ref()
            .and_then(|v| v.sidecar_for(namespace, labels))
            .map(|s| (s.namespace.clone(), s.name.clone()));
        let rules = t
            .view
            .as_ref()
            .map(|v| v.rules_selecting(namespace, labels))
            .unwrap_or_default();
        let priority_labels = t.view.as_ref().map_or(Some(Vec::new()), |v| {
            let names = v.failover_priority_labels();
            if names.is_empty() {
                return Some(Vec::new());
            }
            let value = |name: &str| {
                crate::locality::label_value(
                    labels,
                    &req.locality,
                    &req.network,
                    &req.cluster_id,
                    name,
                )
                .to_string()
            };
            let any = !labels.is_empty()
                || crate::locality::TOPOLOGY_LABELS
                    .iter()
                    .any(|name| !value(name).is_empty());
            any.then(|| {
                names
                    .into_iter()
                    .map(|name| (name.to_string(), value(name)))
                    .collect()
            })
        });
        let key = ScopeKey {
            namespace: namespace.into(),
            sidecar,
            ip_family: IpFamily::of(&req.ips),
            rules,
            locality: req.locality.clone(),
            priority_labels,
            network: if t.multi_network {
                req.network.clone()
            } else {
                String::new()
            },
            proxyless: req.proxyless,
        };
        let epoch = t.epoch;
        if let Some(tx) = t.senders.get(&key) {
            return Ok(Some(Subscription {
                snapshots: tx.subscribe(),
                key,
                epoch,
            }));
        }
        if t.senders.len() >= MAX_SCOPES {
            // Scopes whose streams ended go at the next generation; a full
            // table drops them now, so ended streams never lock new ones
            // out.
            let Table {
                senders, pending, ..
            } = &mut *t;
            senders.retain(|_, tx| tx.receiver_count() > 0);
            pending.retain(|k| senders.contains_key(k));
            if t.senders.len() >= MAX_SCOPES {
                return Err(TooManyScopes(namespace.to_string()));
            }
        }
        t.lineages += 1;
        let (tx, snapshots) = watch::channel(Arc::new(Snapshot::lineage(t.lineages)));
        t.senders.insert(key.clone(), tx);
        t.pending.push(key.clone());
        drop(t);
        self.inner.wake.notify_one();
        Ok(Some(Subscription {
            key,
            snapshots,
            epoch,
        }))
    }

    /// Waits until a stream asks for a scope that is not generated yet (a
    /// request made before the wait counts).
    pub async fn requested(&self) {
        self.inner.wake.notified().await;
    }

    /// The number of scopes some stream watches.
    pub fn len(&self) -> usize {
        self.lock()
            .senders
            .values()
            .filter(|tx| tx.receiver_count() > 0)
            .count()
    }

    /// True when there is no scope.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent at every await-free step; a panic
        // elsewhere while holding it leaves nothing half-written.
        self.inner
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
