//! The I/O side of the `kubernetes` adapter: the client, one `kube`
//! watcher per kind, the objects sent so far, and the updates.
//!
//! Each watcher lists, then watches from the list's resourceVersion with
//! bookmarks, and relists after `410 Gone`. A watcher that fails is
//! replaced by a new one after a pause ([`paced`]), which lists again, as
//! client-go's reflector does after a failed watch: a completed listing is
//! the proof that a kind reads the API server again, and the source stays
//! stale until every failed kind has one. This module turns the events
//! into registry updates: a listing ends in one `Reset` (once every kind is
//! listed and none is failing), a single event in one `Patch`.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use meshreg_registry::{Locality, Object, SourceId, Update, shared_str};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Config;
use super::convert::{self, Cluster, Lookup, PodInfo};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How long to wait before reading an unreadable kubeconfig again.
const KUBECONFIG_RETRY: Duration = Duration::from_secs(5);

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
    Namespace,
    ServiceEntry,
    WorkloadEntry,
    DestinationRule,
    Sidecar,
    WorkloadGroup,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::Namespace,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::DestinationRule,
        Kind::Sidecar,
        Kind::WorkloadGroup,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::DestinationRule => "DestinationRule",
            Kind::Sidecar => "Sidecar",
            Kind::WorkloadGroup => "WorkloadGroup",
        }
    }
}

/// An object as the adapter keeps it: Services and EndpointSlices whole
/// (they are converted again when what they join changes), Pods, Nodes and
/// Namespaces reduced to what endpoints take from them.
#[derive(Debug, Clone)]
enum Raw {
    Service(Box<KubeService>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(PodInfo),
    Node(Locality),
    Namespace(String),
    /// An Istio object as JSON text, read by the file source's parser.
    Istio(String),
}

/// `(namespace, name)`; cluster-scoped objects have an empty namespace.
type Id = (String, String);

/// One event of any watcher.
enum Event {
    /// A listing of `kind` starts.
    Init(Kind),
    /// An object of a listing.
    Listed(Kind, Id, Raw),
    /// A listing of `kind` is complete.
    InitDone(Kind),
    Apply(Kind, Id, Raw),
    Delete(Kind, Id),
    /// The watcher failed (it retries by itself).
    Failed(Kind, String),
    /// The API server does not serve the kind (its CRD is not installed):
    /// listed as empty, not a failure.
    Absent(Kind),
}

/// The objects the adapter knows and what it has sent.
struct State {
    source: SourceId,
    metrics: Metrics,
    cluster: Cluster,
    services: HashMap<Id, Box<KubeService>>,
    slices: HashMap<Id, Box<EndpointSlice>>,
    pods: HashMap<Id, PodInfo>,
    nodes: HashMap<String, Locality>,
    namespaces: HashMap<String, String>,
    /// Istio objects (ServiceEntry, WorkloadEntry, DestinationRule, Sidecar,
    /// WorkloadGroup) as JSON text.
    istio: HashMap<(Kind, Id), String>,
    /// The registry objects sent for each Service, EndpointSlice, Pod and
    /// Istio object.
    sent: HashMap<(Kind, Id), Vec<Object>>,
    /// Objects of a listing in progress, per kind.
    pending: HashMap<Kind, Vec<(Id, Raw)>>,
    /// Kinds listed at least once.
    listed: Vec<Kind>,
    /// Whether the registry has our state (a `Reset` was sent, and no
    /// failure since).
    in_sync: bool,
    /// Kinds whose watcher failed and has not listed since; the source is
    /// stale while any is.
    failing: Vec<Kind>,
}

impl Lookup for State {
    fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }
    fn node(&self, name: &str) -> Option<&Locality> {
        self.nodes.get(name)
    }
    fn namespace_network(&self, name: &str) -> &str {
        self.namespaces.get(name).map_or("", String::as_str)
    }
}

impl State {
    fn new(source: SourceId, metrics: Metrics, cluster: Cluster) -> State {
        State {
            source,
            metrics,
            cluster,
            services: HashMap::new(),
            slices: HashMap::new(),
            pods: HashMap::new(),
            nodes: HashMap::new(),
            namespaces: HashMap::new(),
            istio: HashMap::new(),
            sent: HashMap::new(),
            pending: HashMap::new(),
            listed: Vec::new(),
            in_sync: false,
            failing: Vec::new(),
        }
    }

    fn all_listed(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// Stores `raw` (or forgets `id` when `None`); returns the Services,
    /// EndpointSlices and Pods whose registry objects may change with it.
    fn store(&mut self, kind: Kind, id: Id, raw: Option<Raw>) -> Vec<(Kind, Id)> {
        match (kind, raw) {
            (Kind::Service, Some(Raw::Service(s))) => {
                self.services.insert(id.clone(), s);
                vec![(kind, id)]
            }
            (Kind::Service, _) => {
                self.services.remove(&id);
                vec![(kind, id)]
            }
            (Kind::EndpointSlice, Some(Raw::EndpointSlice(s))) => {
                self.slices.insert(id.clone(), s);
                vec![(kind, id)]
            }
            (Kind::EndpointSlice, _) => {
                self.slices.remove(&id);
                vec![(kind, id)]
            }
            (Kind::Pod, raw) => {
                match raw {
                    Some(Raw::Pod(p)) => self.pods.insert(id.clone(), p),
                    _ => self.pods.remove(&id),
                };
                // The Pod as a workload, and the slices of its namespace
                // that point to it.
                let mut affected = self.slices_where(|(ns, _), slice| {
                    *ns == id.0
                        && slice.endpoints.iter().flatten().any(|e| {
                            e.target_ref
                                .as_ref()
                                .is_some_and(|r| r.name.as_deref() == Some(id.1.as_str()))
                        })
                });
                affected.push((Kind::Pod, id));
                affected
            }
            (Kind::Node, raw) => {
                match raw {
                    Some(Raw::Node(l)) => self.nodes.insert(id.1.clone(), l),
                    _ => self.nodes.remove(&id.1),
                };
                let node = id.1;
                let on_node: Vec<Id> = self
                    .pods
                    .iter()
                    .filter(|(_, p)| p.node == node)
                    .map(|(id, _)| id.clone())
                    .collect();
                let mut affected = self.slices_where(|(ns, _), slice| {
                    slice.endpoints.iter().flatten().any(|e| {
                        e.node_name.as_deref() == Some(node.as_str())
                            || e.target_ref.as_ref().is_some_and(|r| {
                                on_node.iter().any(|(pod_ns, pod)| {
                                    pod_ns == ns && r.name.as_deref() == Some(pod.as_str())
                                })
                            })
                    })
                });
                affected.extend(on_node.into_iter().map(|id| (Kind::Pod, id)));
                affected
            }
            (
                Kind::ServiceEntry
                | Kind::WorkloadEntry
                | Kind::DestinationRule
                | Kind::Sidecar
                | Kind::WorkloadGroup,
                raw,
            ) => {
                match raw {
                    Some(Raw::Istio(text)) => self.istio.insert((kind, id.clone()), text),
                    _ => self.istio.remove(&(kind, id.clone())),
                };
                vec![(kind, id)]
            }
            (Kind::Namespace, raw) => {
                match raw {
                    Some(Raw::Namespace(n)) => self.namespaces.insert(id.1.clone(), n),
                    _ => self.namespaces.remove(&id.1),
                };
                // Only the system namespace's network label is read: it
                // is every workload's default network.
                if id.1 != convert::SYSTEM_NAMESPACE {
                    return Vec::new();
                }
                let mut affected = self.slices_where(|_, _| true);
                affected.extend(self.pods.keys().map(|pod| (Kind::Pod, pod.clone())));
                affected
            }
        }
    }

    fn slices_where(&self, f: impl Fn(&Id, &EndpointSlice) -> bool) -> Vec<(Kind, Id)> {
        self.slices
            .iter()
            .filter(|(id, s)| f(id, s))
            .map(|(id, _)| (Kind::EndpointSlice, id.clone()))
            .collect()
    }

    /// The registry objects of a Service, EndpointSlice, Pod or Istio
    /// object as it is now.
    fn convert(&self, kind: Kind, id: &Id) -> Vec<Object> {
        let result = match kind {
            Kind::Service => self
                .services
                .get(id)
                .map_or(Ok(None), |s| {
                    convert::service(s, &self.cluster, &self.source)
                })
                .map_err(|e| e.to_string()),
            Kind::EndpointSlice => self
                .slices
                .get(id)
                .map_or(Ok(None), |s| {
                    convert::shard(s, &self.cluster, &self.source, self)
                })
                .map_err(|e| e.to_string()),
            Kind::Pod => Ok(self
                .pods
                .get(id)
                .and_then(|p| convert::workload(&id.0, &id.1, p, &self.cluster, self))),
            Kind::ServiceEntry
            | Kind::WorkloadEntry
            | Kind::DestinationRule
            | Kind::Sidecar
            | Kind::WorkloadGroup => {
                let Some(text) = self.istio.get(&(kind, id.clone())) else {
                    return Vec::new();
                };
                let what = format!("{} {}/{}", kind.name(), id.0, id.1);
                return match crate::serviceentry::registry_objects(&what, text, &self.source) {
                    Ok(mut objects) => {
                        self.metrics.rejections().accepted(&self.source, &what);
                        // Workloads and endpoints read from a cluster's API
                        // server are that cluster's, as istiod gives them
                        // its config cluster's id.
                        let cluster_id = shared_str(&self.cluster.id);
                        for o in &mut objects {
                            match o {
                                Object::Workload(w) if w.cluster_id.is_empty() => {
                                    w.cluster_id = self.cluster.id.clone();
                                }
                                Object::Endpoints(shard) => {
                                    for e in shard
                                        .endpoints
                                        .iter_mut()
                                        .filter(|e| e.cluster_id.is_empty())
                                    {
                                        e.cluster_id = cluster_id.clone();
                                    }
                                }
                                _ => {}
                            }
                        }
                        objects
                    }
                    Err(error) => {
                        // As with a bad file: its last good state stays.
                        self.refused(&what, &error, "its last good state is kept");
                        self.sent
                            .get(&(kind, id.clone()))
                            .cloned()
                            .unwrap_or_default()
                    }
                };
            }
            Kind::Node | Kind::Namespace => Ok(None),
        };
        let what = format!("{} {}/{}", kind.name(), id.0, id.1);
        match result {
            Ok(object) => {
                self.metrics.rejections().accepted(&self.source, &what);
                object.into_iter().collect()
            }
            Err(error) => {
                self.refused(&what, &error, "it contributes nothing");
                Vec::new()
            }
        }
    }

    /// Logs, counts and records that `what` is refused for `error`, once
    /// per distinct refusal: converting it again (a relist, a joined Pod
    /// changing) repeats nothing.
    fn refused(&self, what: &str, error: &dyn std::fmt::Display, then: &str) {
        let problems = vec![problem(error)];
        if self
            .metrics
            .rejections()
            .refuses(&self.source, what, &problems)
        {
            return;
        }
        tracing::warn!(object = what, %error, "object refused; {then}");
        self.metrics.error(&self.source, "invalid");
        self.metrics
            .rejections()
            .rejected(&self.source, what, problems);
    }

    /// The Services, EndpointSlices, Pods and Istio objects held.
    fn current(&self) -> Vec<(Kind, Id)> {
        self.services
            .keys()
            .map(|id| (Kind::Service, id.clone()))
            .chain(
                self.slices
                    .keys()
                    .map(|id| (Kind::EndpointSlice, id.clone())),
            )
            .chain(self.pods.keys().map(|id| (Kind::Pod, id.clone())))
            .chain(self.istio.keys().cloned())
            .collect()
    }

    fn reset(&mut self) -> Update {
        self.in_sync = true;
        let ids = self.current();
        self.sent = ids
            .into_iter()
            .map(|(kind, id)| {
                let objects = self.convert(kind, &id);
                ((kind, id), objects)
            })
            .filter(|(_, objects)| !objects.is_empty())
            .collect();
        self.count_objects();
        let objects: Vec<Object> = self.sent.values().flatten().cloned().collect();
        tracing::info!(objects = objects.len(), "sent the cluster's state");
        Update::Reset {
            source: self.source.clone(),
            objects,
        }
    }

    /// The patch that brings the registry's copy of `ids` up to date.
    fn patch(&mut self, ids: Vec<(Kind, Id)>) -> Option<Update> {
        let mut apply = Vec::new();
        let mut delete = Vec::new();
        for (kind, id) in ids {
            let now = self.convert(kind, &id);
            let key = (kind, id);
            let old = if now.is_empty() {
                self.sent.remove(&key).unwrap_or_default()
            } else {
                self.sent.insert(key, now.clone()).unwrap_or_default()
            };
            if old == now {
                continue;
            }
            let keys: Vec<_> = now.iter().map(Object::key).collect();
            delete.extend(old.iter().map(Object::key).filter(|k| !keys.contains(k)));
            apply.extend(now.into_iter().filter(|o| !old.contains(o)));
        }
        if apply.is_empty() && delete.is_empty() {
            return None;
        }
        self.count_objects();
        Some(Update::Patch {
            source: self.source.clone(),
            apply,
            delete,
        })
    }

    /// `meshreg_source_objects` per kind, from what was sent.
    fn count_objects(&self) {
        for kind in [
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Pod,
            Kind::ServiceEntry,
            Kind::WorkloadEntry,
            Kind::DestinationRule,
            Kind::Sidecar,
            Kind::WorkloadGroup,
        ] {
            let count = self.sent.keys().filter(|(k, _)| *k == kind).count();
            self.metrics.objects(&self.source, kind.name(), count);
        }
    }

    /// The update an event calls for, if any.
    fn on(&mut self, event: Event) -> Option<Update> {
        match event {
            Event::Init(kind) => {
                self.pending.insert(kind, Vec::new());
                None
            }
            Event::Listed(kind, id, raw) => {
                self.pending.entry(kind).or_default().push((id, raw));
                None
            }
            Event::InitDone(kind) => {
                let listed = self.pending.remove(&kind).unwrap_or_default();
                match kind {
                    Kind::Service => self.services.clear(),
                    Kind::EndpointSlice => self.slices.clear(),
                    Kind::Pod => self.pods.clear(),
                    Kind::Node => self.nodes.clear(),
                    Kind::Namespace => self.namespaces.clear(),
                    Kind::ServiceEntry
                    | Kind::WorkloadEntry
                    | Kind::DestinationRule
                    | Kind::Sidecar
                    | Kind::WorkloadGroup => {
                        self.istio.retain(|(k, _), _| *k != kind);
                    }
                }
                for (id, raw) in listed {
                    self.store(kind, id, Some(raw));
                }
                if !self.listed.contains(&kind) {
                    self.listed.push(kind);
                }
                self.listing_done(kind)
            }
            Event::Apply(kind, id, raw) => self.changed(kind, id, Some(raw)),
            Event::Delete(kind, id) => self.changed(kind, id, None),
            Event::Absent(kind) => {
                // The watcher keeps retrying (a CRD installed later is
                // listed then): an absent kind already read as empty is
                // not read again.
                let held = self.istio.keys().any(|(k, _)| *k == kind);
                if self.listed.contains(&kind) && !held && !self.failing.contains(&kind) {
                    return None;
                }
                if !self.listed.contains(&kind) {
                    tracing::info!(
                        kind = kind.name(),
                        "not served by the API server (CRD not installed); none read"
                    );
                }
                self.on(Event::Init(kind));
                self.on(Event::InitDone(kind))
            }
            Event::Failed(kind, error) => {
                let new_outage = self.failing.is_empty();
                if !self.failing.contains(&kind) {
                    self.failing.push(kind);
                }
                if !new_outage {
                    return None;
                }
                // Once per outage: the watchers retry on their own.
                tracing::warn!(kind = kind.name(), %error, "cannot watch the API server; keeping the last state and retrying");
                self.metrics.error(&self.source, "watch");
                Some(Update::Stale {
                    source: self.source.clone(),
                    error: format!("watching {}: {error}", kind.name()),
                })
            }
        }
    }

    /// After a listing of `kind` (first, after `410 Gone`, or by a new
    /// watcher after a failure): once every kind is listed and none is
    /// failing, the whole state, which the registry diffs (and which
    /// clears a stale source); while others still fail, a patch of what
    /// changed, so what is read again is not held back.
    fn listing_done(&mut self, kind: Kind) -> Option<Update> {
        let was_failing = !self.failing.is_empty();
        self.failing.retain(|k| *k != kind);
        if !self.all_listed() {
            return None;
        }
        if !self.failing.is_empty() {
            // Nothing sent yet: the first state waits for every kind.
            return if self.in_sync {
                self.patch(self.everything())
            } else {
                None
            };
        }
        if was_failing {
            tracing::info!("the API server answers again; every kind listed anew");
        }
        Some(self.reset())
    }

    /// Every object that has or had registry objects.
    fn everything(&self) -> Vec<(Kind, Id)> {
        let mut ids: std::collections::HashSet<(Kind, Id)> = self.current().into_iter().collect();
        ids.extend(self.sent.keys().cloned());
        ids.into_iter().collect()
    }

    fn changed(&mut self, kind: Kind, id: Id, raw: Option<Raw>) -> Option<Update> {
        let affected = self.store(kind, id, raw);
        if !self.in_sync {
            // Not sent yet: the whole state goes, once it can.
            return (self.all_listed() && self.failing.is_empty()).then(|| self.reset());
        }
        self.patch(affected)
    }
}

/// The identity of an object, for keying what was sent.
fn id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Id {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The events of `kind` from watchers of `api`, each object reduced with
/// `keep`, paced by kube's default backoff (see [`paced`]).
fn events<K, F>(
    api: kube::Api<K>,
    kind: Kind,
    keep: F,
) -> impl futures::Stream<Item = Event> + Send + 'static
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: Fn(K) -> Raw + Send + 'static,
{
    paced(
        kind,
        move || watcher(api.clone(), watcher::Config::default()).boxed(),
        keep,
        watcher::DefaultBackoff::default(),
    )
}

/// Maps the events of watchers made by `make` to [`Event`]s of `kind`,
/// reducing each object with `keep`. `410 Gone` is dropped (the watcher
/// relists by itself); a `404` on a list means the kind is not served.
///
/// A watcher that fails (or ends) is dropped, and a new one is made after
/// a pause from `backoff` (kube's default is client-go's: 0.8 s doubling
/// to 30 s, with jitter, reset after 2 min without failure). Only progress
/// resets the backoff — a completed listing, an object event — never the
/// start of a listing that then fails: kube's own `StreamBackoff` resets on
/// any event, so an absent CRD or a refused token was retried about once a
/// second forever. The new watcher lists again (client-go's reflector does
/// the same after a failed watch), so recovery shows as a completed
/// listing, where a watch resumed from its resourceVersion shows nothing
/// until an object of its kind changes.
fn paced<K, S, M, F, B>(
    kind: Kind,
    make: M,
    keep: F,
    backoff: B,
) -> impl futures::Stream<Item = Event> + Send + 'static
where
    K: kube::Resource + Send + 'static,
    S: futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + Unpin + 'static,
    M: FnMut() -> S + Send + 'static,
    F: Fn(K) -> Raw + Send + 'static,
    B: kube::runtime::utils::Backoff + Send + 'static,
{
    struct Pace<S, M, F, B> {
        make: M,
        keep: F,
        backoff: B,
        current: Option<S>,
        pause: Option<Duration>,
    }
    let pace = Pace {
        make,
        keep,
        backoff,
        current: None,
        pause: None,
    };
    futures::stream::unfold(pace, move |mut p| async move {
        loop {
            if let Some(pause) = p.pause.take() {
                tokio::time::sleep(pause).await;
            }
            let stream = p.current.get_or_insert_with(&mut p.make);
            let failure = match stream.next().await {
                Some(Ok(watcher::Event::Init)) => return Some((Event::Init(kind), p)),
                Some(Ok(watcher::Event::InitApply(o))) => {
                    let event = Event::Listed(kind, id(o.meta()), (p.keep)(o));
                    return Some((event, p));
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    p.backoff.reset();
                    return Some((Event::InitDone(kind), p));
                }
                Some(Ok(watcher::Event::Apply(o))) => {
                    p.backoff.reset();
                    let event = Event::Apply(kind, id(o.meta()), (p.keep)(o));
                    return Some((event, p));
                }
                Some(Ok(watcher::Event::Delete(o))) => {
                    p.backoff.reset();
                    return Some((Event::Delete(kind, id(o.meta())), p));
                }
                Some(Err(e)) if expired(&e) => continue,
                // A group the API server does not serve (a CRD not
                // installed) answers a plain "404 page not found".
                Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(status))))
                    if status.code == 404 =>
                {
                    Event::Absent(kind)
                }
                Some(Err(e)) => Event::Failed(kind, e.to_string()),
                None => Event::Failed(kind, "the watch ended".into()),
            };
            p.current = None;
            p.pause = Some(p.backoff.next().unwrap_or(MAX_PAUSE));
            return Some((failure, p));
        }
    })
}

/// The pause after a failure when the backoff gives none (kube's default
/// never stops; this is its ceiling).
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// `410 Gone`: the watch's resourceVersion expired. Part of the protocol,
/// not a failure: the watcher lists again, and the listing ends in a
/// `Reset` the registry diffs.
fn expired(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(status) if status.code == 410)
        || matches!(e, watcher::Error::WatchFailed(kube::Error::Api(status)) if status.code == 410)
}

/// The events of Istio objects of `kind` (`networking.istio.io/v1`), as
/// JSON text with their `apiVersion` and `kind`.
fn istio_events(
    client: kube::Client,
    kind: Kind,
) -> impl futures::Stream<Item = Event> + Send + 'static {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", kind.name());
    let resource = ApiResource::from_gvk(&gvk);
    let api = kube::Api::<DynamicObject>::all_with(client, &resource);
    let text = move |o: DynamicObject| {
        let mut value = serde_json::to_value(&o).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("apiVersion".into(), "networking.istio.io/v1".into());
            map.insert("kind".into(), kind.name().into());
        }
        Raw::Istio(value.to_string())
    };
    events(api, kind, text)
}

/// A client for the kubeconfig's current context, or in-cluster.
async fn client(config: &Config) -> std::result::Result<kube::Client, String> {
    let client_config = match &config.kubeconfig {
        Some(path) => {
            // The parser's and loader's errors quote the file's lines, and
            // a kubeconfig holds tokens and keys: report only what failed.
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                let what = match e {
                    kube::config::KubeconfigError::ReadConfig(io, _) => io.to_string(),
                    _ => "not a valid kubeconfig (details withheld: the file holds credentials)"
                        .into(),
                };
                format!("{}: {what}", path.display())
            })?;
            let options = kube::config::KubeConfigOptions::default();
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|_| {
                    format!(
                        "{}: its current context cannot be used (details withheld: the file holds credentials)",
                        path.display()
                    )
                })?
        }
        None => kube::Config::incluster().map_err(|e| format!("in-cluster credentials: {e}"))?,
    };
    kube::Client::try_from(client_config).map_err(|e| e.to_string())
}

pub(super) async fn run(
    config: Config,
    metrics: Metrics,
    source: SourceId,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
    mut first: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<()> {
    let span = tracing::info_span!("adapter", kind = "kubernetes", source = %source);
    let _guard = span.enter();
    for (field, value) in [
        ("cluster_id", &config.cluster_id),
        ("domain", &config.domain),
    ] {
        if value.is_empty() {
            return Err(Error::Config {
                adapter: "kubernetes",
                field,
                reason: "must not be empty".into(),
            });
        }
    }
    drop(_guard);
    metrics.unsynced(&source);
    // The client, retried while the kubeconfig cannot be used (it may be
    // written after the daemon starts, as mounted Secrets are).
    let mut reported = false;
    let client = loop {
        match client(&config).await {
            Ok(c) => break c,
            Err(error) => {
                if !reported {
                    tracing::warn!(parent: &span, %error, "cannot use the kubeconfig; retrying");
                    metrics.error(&source, "kubeconfig");
                    let stale = Update::Stale {
                        source: source.clone(),
                        error,
                    };
                    if sink.send(stale).await.is_err() {
                        return Ok(());
                    }
                    if let Some(f) = first.take() {
                        let _ = f.send(());
                    }
                    reported = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(KUBECONFIG_RETRY) => {}
                }
            }
        }
    };
    let cluster = Cluster {
        id: config.cluster_id.clone(),
        network: config.network.clone(),
        domain: config.domain.clone(),
    };
    let all = futures::stream::select_all([
        events(
            kube::Api::<KubeService>::all(client.clone()),
            Kind::Service,
            |s| Raw::Service(Box::new(s)),
        )
        .boxed(),
        events(
            kube::Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            |s| Raw::EndpointSlice(Box::new(s)),
        )
        .boxed(),
        events(kube::Api::<Pod>::all(client.clone()), Kind::Pod, |p| {
            Raw::Pod(convert::pod_info(&p))
        })
        .boxed(),
        events(kube::Api::<Node>::all(client.clone()), Kind::Node, |n| {
            Raw::Node(convert::node_locality(&n))
        })
        .boxed(),
        events(
            kube::Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            |n| Raw::Namespace(convert::namespace_network(&n)),
        )
        .boxed(),
        istio_events(client.clone(), Kind::ServiceEntry).boxed(),
        istio_events(client.clone(), Kind::WorkloadEntry).boxed(),
        istio_events(client.clone(), Kind::DestinationRule).boxed(),
        istio_events(client.clone(), Kind::Sidecar).boxed(),
        istio_events(client, Kind::WorkloadGroup).boxed(),
    ]);
    let mut stream = all;
    let mut state = State::new(source.clone(), metrics.clone(), cluster);
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            event = stream.next() => event,
        };
        // The watchers never end on their own.
        let Some(event) = event else { return Ok(()) };
        let Some(update) = span.in_scope(|| state.on(event)) else {
            continue;
        };
        metrics.update_sent(&source);
        if sink.send(update).await.is_err() {
            return Ok(());
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
    }
}

/// A refused Kubernetes object's one problem.
fn problem(error: &(impl std::fmt::Display + ?Sized)) -> crate::Problem {
    crate::Problem {
        document: None,
        field: String::new(),
        reason: "invalid".into(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshreg_registry::SourceKind;

    fn state() -> State {
        let registry = prometheus::Registry::new();
        State::new(
            SourceId::new(SourceKind::Kubernetes, "c1"),
            Metrics::register(&registry).unwrap(),
            Cluster {
                id: "c1".into(),
                network: String::new(),
                domain: "cluster.local".into(),
            },
        )
    }

    fn id(name: &str) -> Id {
        ("ns".into(), name.into())
    }

    /// A slice of service `svc` with one endpoint per (ip, pod).
    fn slice(name: &str, svc: &str, endpoints: &[(&str, &str)]) -> Raw {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(ip, pod)| {
                serde_json::json!({"addresses": [ip],
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": "ns"}})
            })
            .collect();
        Raw::EndpointSlice(Box::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4", "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080}],
            }))
            .unwrap(),
        ))
    }

    fn pod(version: &str) -> Raw {
        Raw::Pod(PodInfo {
            labels: [("version".to_string(), version.to_string())].into(),
            ..PodInfo::default()
        })
    }

    /// Lists every kind; returns the update of the last listing.
    fn list_all(s: &mut State, slices: Vec<(Id, Raw)>, pods: Vec<(Id, Raw)>) -> Option<Update> {
        let mut last = None;
        for kind in Kind::ALL {
            assert!(s.on(Event::Init(kind)).is_none());
            let objects = match kind {
                Kind::EndpointSlice => slices.clone(),
                Kind::Pod => pods.clone(),
                _ => Vec::new(),
            };
            for (i, o) in objects {
                assert!(s.on(Event::Listed(kind, i, o)).is_none());
            }
            last = s.on(Event::InitDone(kind));
        }
        last
    }

    fn labels_of(update: &Update) -> Vec<Option<String>> {
        let objects = match update {
            Update::Reset { objects, .. } => objects,
            Update::Patch { apply, .. } => apply,
            other => panic!("{other:?}"),
        };
        objects
            .iter()
            .flat_map(|o| match o {
                Object::Endpoints(s) => s.endpoints.clone(),
                _ => Vec::new(),
            })
            .map(|e| e.labels.get("version").cloned())
            .collect()
    }

    #[test]
    fn one_reset_once_every_kind_is_listed_then_one_patch_per_event() {
        let mut s = state();
        let Some(reset) = list_all(
            &mut s,
            vec![(id("a-1"), slice("a-1", "a", &[("10.0.0.1", "p1")]))],
            vec![(id("p1"), pod("v1"))],
        ) else {
            panic!("no reset");
        };
        // The slice joined its pod's labels.
        assert_eq!(labels_of(&reset), [Some("v1".to_string())]);
        // An edit of one slice: that shard alone.
        let Some(Update::Patch { apply, delete, .. }) = s.on(Event::Apply(
            Kind::EndpointSlice,
            id("a-1"),
            slice("a-1", "a", &[("10.0.0.2", "p1")]),
        )) else {
            panic!("no patch");
        };
        assert_eq!((apply.len(), delete.len()), (1, 0));
        // The same slice again: nothing.
        assert!(
            s.on(Event::Apply(
                Kind::EndpointSlice,
                id("a-1"),
                slice("a-1", "a", &[("10.0.0.2", "p1")]),
            ))
            .is_none()
        );
        // Its pod relabelled: the slice's shard again, with the new label.
        let Some(update) = s.on(Event::Apply(Kind::Pod, id("p1"), pod("v2"))) else {
            panic!("no patch for the pod");
        };
        assert_eq!(labels_of(&update), [Some("v2".to_string())]);
        // A pod no slice points to: nothing.
        assert!(
            s.on(Event::Apply(Kind::Pod, id("other"), pod("v9")))
                .is_none()
        );
        // The slice moved to another service: the old key goes.
        let Some(Update::Patch { apply, delete, .. }) = s.on(Event::Apply(
            Kind::EndpointSlice,
            id("a-1"),
            slice("a-1", "b", &[("10.0.0.2", "p1")]),
        )) else {
            panic!("no patch");
        };
        assert_eq!((apply.len(), delete.len()), (1, 1));
        // Deleted: its key goes.
        let Some(Update::Patch { apply, delete, .. }) =
            s.on(Event::Delete(Kind::EndpointSlice, id("a-1")))
        else {
            panic!("no patch");
        };
        assert_eq!((apply.len(), delete.len()), (0, 1));
    }

    #[test]
    fn a_failure_is_reported_once_and_stale_clears_once_every_failed_kind_listed() {
        let mut s = state();
        assert!(matches!(
            list_all(
                &mut s,
                vec![(id("a-1"), slice("a-1", "a", &[("10.0.0.1", "p1")]))],
                vec![]
            ),
            Some(Update::Reset { .. })
        ));
        assert!(matches!(
            s.on(Event::Failed(Kind::Service, "connection refused".into())),
            Some(Update::Stale { .. })
        ));
        // Retries fail again: nothing more.
        assert!(
            s.on(Event::Failed(Kind::Pod, "connection refused".into()))
                .is_none()
        );
        // A kind that did not fail changes meanwhile: sent as it is.
        assert!(matches!(
            s.on(Event::Apply(
                Kind::EndpointSlice,
                id("a-1"),
                slice("a-1", "a", &[("10.0.0.2", "p1")]),
            )),
            Some(Update::Patch { .. })
        ));
        // Services listed again (nothing changed), Pods still failing:
        // nothing to send, and the source stays stale.
        s.on(Event::Init(Kind::Service));
        assert!(s.on(Event::InitDone(Kind::Service)).is_none());
        assert_eq!(s.failing, [Kind::Pod]);
        // Pods listed again: the whole state, which clears the stale mark.
        s.on(Event::Init(Kind::Pod));
        let Some(Update::Reset { objects, .. }) = s.on(Event::InitDone(Kind::Pod)) else {
            panic!("no reset");
        };
        assert_eq!(objects.len(), 1);
        assert!(s.failing.is_empty());
    }

    #[test]
    fn a_kind_listed_again_while_another_fails_sends_what_changed() {
        let mut s = state();
        list_all(
            &mut s,
            vec![(id("a-1"), slice("a-1", "a", &[("10.0.0.1", "p1")]))],
            vec![],
        );
        s.on(Event::Failed(Kind::EndpointSlice, "refused".into()));
        s.on(Event::Failed(Kind::Node, "refused".into()));
        // The slice changed during the outage.
        s.on(Event::Init(Kind::EndpointSlice));
        s.on(Event::Listed(
            Kind::EndpointSlice,
            id("a-1"),
            slice("a-1", "a", &[("10.0.0.9", "p1")]),
        ));
        let Some(Update::Patch { apply, .. }) = s.on(Event::InitDone(Kind::EndpointSlice)) else {
            panic!("no patch");
        };
        assert_eq!(apply.len(), 1);
        assert_eq!(s.failing, [Kind::Node]);
    }

    /// A fake watcher factory: each watcher yields `items()`; the instants
    /// at which watchers were made are recorded.
    fn factory(
        made: std::sync::Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
        progress_on: usize,
    ) -> impl FnMut() -> futures::stream::Iter<
        std::vec::IntoIter<watcher::Result<watcher::Event<KubeService>>>,
    > + Send
    + 'static {
        move || {
            let mut made = made.lock().unwrap();
            made.push(tokio::time::Instant::now());
            let mut items = vec![Ok(watcher::Event::Init)];
            if made.len() == progress_on {
                items.push(Ok(watcher::Event::InitDone));
            }
            items.push(Err(watcher::Error::NoResourceVersion));
            futures::stream::iter(items)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_watchers_are_replaced_after_pauses_that_only_progress_resets() {
        let made = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stream = paced(
            Kind::Service,
            factory(made.clone(), 9),
            |s| Raw::Service(Box::new(s)),
            watcher::DefaultBackoff::default(),
        );
        futures::pin_mut!(stream);
        let mut failures = 0;
        while failures < 10 {
            if let Some(Event::Failed(..)) = stream.next().await {
                failures += 1;
            }
        }
        let made = made.lock().unwrap().clone();
        let gaps: Vec<Duration> = made.windows(2).map(|w| w[1] - w[0]).collect();
        // Each listing starts (`Init`) and fails: the pauses grow (0.8 s
        // doubling, with jitter, to 30 s) although every watcher yielded
        // an event before failing.
        assert!(gaps[0] < Duration::from_secs(2), "{gaps:?}");
        assert!(gaps[5] >= Duration::from_secs(25), "{gaps:?}");
        assert!(gaps[7] <= Duration::from_secs(60), "{gaps:?}");
        // The ninth watcher completed its listing: the next pause is short.
        assert!(gaps[8] < Duration::from_secs(2), "{gaps:?}");
    }

    #[test]
    fn a_relist_replaces_the_kind_and_drops_what_is_gone() {
        let mut s = state();
        list_all(
            &mut s,
            vec![
                (id("a-1"), slice("a-1", "a", &[("10.0.0.1", "p1")])),
                (id("b-1"), slice("b-1", "b", &[("10.0.0.3", "p3")])),
            ],
            vec![],
        );
        // 410 Gone: the slices are listed again; b-1 was deleted meanwhile.
        assert!(s.on(Event::Init(Kind::EndpointSlice)).is_none());
        s.on(Event::Listed(
            Kind::EndpointSlice,
            id("a-1"),
            slice("a-1", "a", &[("10.0.0.1", "p1")]),
        ));
        let Some(Update::Reset { objects, .. }) = s.on(Event::InitDone(Kind::EndpointSlice)) else {
            panic!("no reset");
        };
        assert_eq!(objects.len(), 1);
    }

    #[test]
    fn nothing_is_sent_before_every_kind_is_listed() {
        let mut s = state();
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Node] {
            s.on(Event::Init(kind));
            assert!(s.on(Event::InitDone(kind)).is_none());
        }
        assert!(
            s.on(Event::Apply(
                Kind::EndpointSlice,
                id("a-1"),
                slice("a-1", "a", &[("10.0.0.1", "p1")]),
            ))
            .is_none()
        );
        s.on(Event::Init(Kind::Namespace));
        assert!(s.on(Event::InitDone(Kind::Namespace)).is_none());
        // The API server serves no WorkloadEntry (no CRD): listed as empty.
        assert!(s.on(Event::Absent(Kind::WorkloadEntry)).is_none());
        assert!(s.on(Event::Absent(Kind::DestinationRule)).is_none());
        assert!(s.on(Event::Absent(Kind::Sidecar)).is_none());
        assert!(s.on(Event::Absent(Kind::WorkloadGroup)).is_none());
        s.on(Event::Init(Kind::ServiceEntry));
        assert!(matches!(
            s.on(Event::InitDone(Kind::ServiceEntry)),
            Some(Update::Reset { .. })
        ));
        // Its watcher retries: nothing more.
        assert!(s.on(Event::Absent(Kind::WorkloadEntry)).is_none());
    }

    #[test]
    fn istio_objects_are_read_by_the_file_sources_parser() {
        let mut s = state();
        let se = |ip: &str| {
            Raw::Istio(
                serde_json::json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                    "metadata": {"name": "db", "namespace": "ns"},
                    "spec": {"hosts": ["db.example.com"], "resolution": "STATIC",
                             "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
                             "endpoints": [{"address": ip}]},
                })
                .to_string(),
            )
        };
        list_all(&mut s, vec![], vec![]);
        // A declaration and its inline endpoints' shard.
        let Some(Update::Patch { apply, delete, .. }) =
            s.on(Event::Apply(Kind::ServiceEntry, id("db"), se("10.0.0.5")))
        else {
            panic!("no patch");
        };
        assert_eq!((apply.len(), delete.len()), (2, 0));
        // An endpoint change re-sends the shard only.
        let Some(Update::Patch { apply, delete, .. }) =
            s.on(Event::Apply(Kind::ServiceEntry, id("db"), se("10.0.0.6")))
        else {
            panic!("no patch");
        };
        assert!(matches!(&apply[..], [Object::Endpoints(_)]), "{apply:?}");
        assert!(delete.is_empty());
        // Refused by Istio's validation (no hosts): its last good state
        // stays, as a bad file's does; deleting it withdraws that.
        let bad = Raw::Istio(
            serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "db", "namespace": "ns"}, "spec": {"hosts": []}})
            .to_string(),
        );
        assert!(
            s.on(Event::Apply(Kind::ServiceEntry, id("db"), bad.clone()))
                .is_none()
        );
        // Its inline endpoints carry the cluster's id.
        assert!(s.sent.values().flatten().any(|o| matches!(o,
            Object::Endpoints(shard) if shard.endpoints.iter().all(|e| &*e.cluster_id == "c1"))));
        // Listed again (a relist while another kind fails): the same
        // refusal is not counted again.
        let errors = s.metrics.error_count(&s.source);
        s.on(Event::Init(Kind::ServiceEntry));
        s.on(Event::Listed(Kind::ServiceEntry, id("db"), bad));
        s.on(Event::Failed(Kind::Pod, "refused".into()));
        s.on(Event::InitDone(Kind::ServiceEntry));
        assert_eq!(
            s.metrics.error_count(&s.source),
            errors + 1,
            "only the Pod failure counts"
        );
        s.on(Event::Init(Kind::Pod));
        s.on(Event::InitDone(Kind::Pod));
        let Some(Update::Patch { apply, delete, .. }) =
            s.on(Event::Delete(Kind::ServiceEntry, id("db")))
        else {
            panic!("no patch");
        };
        assert_eq!((apply.len(), delete.len()), (0, 2));
    }

    #[test]
    fn a_pod_with_an_ip_is_a_workload_and_its_readiness_follows() {
        let mut s = state();
        let running = |ready: bool| {
            Raw::Pod(PodInfo {
                labels: [("app".to_string(), "reviews".to_string())].into(),
                ip: Some("10.1.0.9".parse().unwrap()),
                ready,
                ..PodInfo::default()
            })
        };
        let Some(Update::Reset { objects, .. }) = list_all(
            &mut s,
            vec![],
            vec![(id("p1"), running(true)), (id("pending"), pod("v1"))],
        ) else {
            panic!("no reset");
        };
        // Only the pod with an IP is a workload.
        let workloads: Vec<&meshreg_registry::Workload> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Workload(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(workloads.len(), 1);
        assert_eq!(
            (workloads[0].name.as_str(), workloads[0].health),
            ("p1", meshreg_registry::Health::Healthy)
        );
        // Not ready any more: the workload is patched, unhealthy.
        let Some(Update::Patch { apply, .. }) =
            s.on(Event::Apply(Kind::Pod, id("p1"), running(false)))
        else {
            panic!("no patch");
        };
        assert!(matches!(
            &apply[..],
            [Object::Workload(w)] if w.health == meshreg_registry::Health::Unhealthy
        ));
        // Deleted: its key goes.
        let Some(Update::Patch { delete, .. }) = s.on(Event::Delete(Kind::Pod, id("p1"))) else {
            panic!("no patch");
        };
        assert_eq!(delete.len(), 1);
    }
}
