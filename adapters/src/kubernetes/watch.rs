//! The I/O side of the `kubernetes` adapter: the client, one `kube`
//! watcher per kind, the objects sent so far, and the updates.
//!
//! Each watcher lists, then watches from the list's resourceVersion with
//! bookmarks, and relists after `410 Gone`; its errors are retried with the
//! `kube` crate's default backoff (exponential with jitter). This module
//! turns its events into registry updates: a listing ends in one `Reset`
//! (once every kind is listed), a single event in one `Patch`.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt as _, watcher};
use meshreg_registry::{Object, ObjectKey, SourceId, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Config;
use super::convert::{self, Cluster, ConvertError};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How long to wait before reading an unreadable kubeconfig again.
const KUBECONFIG_RETRY: Duration = Duration::from_secs(5);

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Service, Kind::EndpointSlice];

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// One event of either watcher, with the object already converted.
enum Event {
    /// A listing of `kind` starts.
    Init(Kind),
    /// An object of a listing (`Some`) or of the watch (`Apply`).
    Listed(Kind, (String, String), Option<Object>),
    Apply(Kind, (String, String), Option<Object>),
    Delete(Kind, (String, String)),
    /// A listing of `kind` is complete.
    InitDone(Kind),
    /// The watcher failed (it retries by itself).
    Failed(Kind, String),
}

/// What the adapter has sent, per Kubernetes object.
struct State {
    source: SourceId,
    metrics: Metrics,
    /// The registry object of each Kubernetes object (`None`: it converts
    /// to nothing, e.g. an ExternalName Service).
    held: HashMap<(Kind, String, String), Option<Object>>,
    /// Objects of a listing in progress, per kind.
    pending: HashMap<Kind, HashMap<(String, String), Option<Object>>>,
    /// Kinds listed at least once.
    listed: Vec<Kind>,
    /// Whether the registry has our state (a `Reset` was sent and no
    /// failure happened since).
    in_sync: bool,
    /// Whether a failure was reported and not yet recovered from.
    failing: bool,
}

impl State {
    fn all_listed(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    fn reset(&mut self) -> Update {
        self.in_sync = true;
        self.failing = false;
        let objects: Vec<Object> = self.held.values().flatten().cloned().collect();
        for kind in Kind::ALL {
            let count = self
                .held
                .iter()
                .filter(|((k, ..), o)| *k == kind && o.is_some())
                .count();
            self.metrics.objects(&self.source, kind.name(), count);
        }
        tracing::info!(objects = objects.len(), "sent the cluster's state");
        Update::Reset {
            source: self.source.clone(),
            objects,
        }
    }

    /// The update an event calls for, if any.
    fn on(&mut self, event: Event) -> Option<Update> {
        match event {
            Event::Init(kind) => {
                self.pending.insert(kind, HashMap::new());
                None
            }
            Event::Listed(kind, id, object) => {
                self.pending.entry(kind).or_default().insert(id, object);
                None
            }
            Event::InitDone(kind) => {
                let listed = self.pending.remove(&kind).unwrap_or_default();
                self.held.retain(|(k, ..), _| *k != kind);
                self.held.extend(
                    listed
                        .into_iter()
                        .map(|((ns, name), o)| ((kind, ns, name), o)),
                );
                if !self.listed.contains(&kind) {
                    self.listed.push(kind);
                }
                self.all_listed().then(|| self.reset())
            }
            Event::Apply(kind, (ns, name), object) => {
                let old = self.held.insert((kind, ns, name), object.clone()).flatten();
                if !self.in_sync || self.failing {
                    // Not sent yet, or recovering: the whole state goes.
                    return self.all_listed().then(|| self.reset());
                }
                if old == object {
                    return None;
                }
                let delete = match (&old, &object) {
                    (Some(o), Some(n)) if o.key() == n.key() => Vec::new(),
                    (Some(o), _) => vec![o.key()],
                    (None, _) => Vec::new(),
                };
                Some(Update::Patch {
                    source: self.source.clone(),
                    apply: object.into_iter().collect(),
                    delete,
                })
            }
            Event::Delete(kind, (ns, name)) => {
                let old = self.held.remove(&(kind, ns, name)).flatten();
                if !self.in_sync || self.failing {
                    return self.all_listed().then(|| self.reset());
                }
                let key: ObjectKey = old?.key();
                Some(Update::Patch {
                    source: self.source.clone(),
                    apply: Vec::new(),
                    delete: vec![key],
                })
            }
            Event::Failed(kind, error) => {
                if self.failing {
                    return None;
                }
                // Once per outage: the watcher retries on its own.
                tracing::warn!(kind = kind.name(), %error, "cannot watch the API server; keeping the last state and retrying");
                self.metrics.error(&self.source, "watch");
                self.failing = true;
                Some(Update::Stale {
                    source: self.source.clone(),
                    error: format!("watching {}: {error}", kind.name()),
                })
            }
        }
    }
}

/// Logs and counts an object that does not convert; it contributes nothing.
fn converted(
    result: std::result::Result<Option<Object>, ConvertError>,
    source: &SourceId,
    metrics: &Metrics,
) -> Option<Object> {
    result.unwrap_or_else(|error| {
        tracing::warn!(%error, "object refused; it contributes nothing");
        metrics.error(source, "invalid");
        None
    })
}

/// The identity of an object, for keying what was sent.
fn id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Maps a watcher's events of `kind` to [`Event`]s, converting each object.
fn events<K, F>(
    api: kube::Api<K>,
    kind: Kind,
    convert: F,
) -> impl futures::Stream<Item = Event> + Send + 'static
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    F: Fn(&K) -> Option<Object> + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| match event {
            Ok(watcher::Event::Init) => Event::Init(kind),
            Ok(watcher::Event::InitApply(o)) => Event::Listed(kind, id(o.meta()), convert(&o)),
            Ok(watcher::Event::InitDone) => Event::InitDone(kind),
            Ok(watcher::Event::Apply(o)) => Event::Apply(kind, id(o.meta()), convert(&o)),
            Ok(watcher::Event::Delete(o)) => Event::Delete(kind, id(o.meta())),
            Err(e) => Event::Failed(kind, e.to_string()),
        })
}

/// A client for the kubeconfig's current context.
async fn client(config: &Config) -> std::result::Result<kube::Client, String> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&config.kubeconfig)
        .map_err(|e| format!("reading {}: {e}", config.kubeconfig.display()))?;
    let options = kube::config::KubeConfigOptions::default();
    let client_config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| format!("{}: {e}", config.kubeconfig.display()))?;
    kube::Client::try_from(client_config).map_err(|e| e.to_string())
}

pub(super) async fn run(
    config: Config,
    metrics: Metrics,
    source: SourceId,
    sink: mpsc::Sender<Update>,
    shutdown: CancellationToken,
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
    let services = {
        let (cluster, source, metrics) = (cluster.clone(), source.clone(), metrics.clone());
        events(
            kube::Api::<KubeService>::all(client.clone()),
            Kind::Service,
            move |s| converted(convert::service(s, &cluster, &source), &source, &metrics),
        )
    };
    let slices = {
        let (cluster, source, metrics) = (cluster.clone(), source.clone(), metrics.clone());
        events(
            kube::Api::<EndpointSlice>::all(client),
            Kind::EndpointSlice,
            move |s| converted(convert::shard(s, &cluster, &source), &source, &metrics),
        )
    };
    let mut stream = std::pin::pin!(futures::stream::select(services, slices));
    let mut state = State {
        source: source.clone(),
        metrics: metrics.clone(),
        held: HashMap::new(),
        pending: HashMap::new(),
        listed: Vec::new(),
        in_sync: false,
        failing: false,
    };
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshreg_registry::{SourceKind, test_util};

    fn state() -> State {
        let registry = prometheus::Registry::new();
        State {
            source: SourceId::new(SourceKind::Kubernetes, "c1"),
            metrics: Metrics::register(&registry).unwrap(),
            held: HashMap::new(),
            pending: HashMap::new(),
            listed: Vec::new(),
            in_sync: false,
            failing: false,
        }
    }

    fn shard(host: &str, name: &str, ips: &[&str]) -> Object {
        let c = test_util::contribution(host, ips);
        Object::Endpoints(meshreg_registry::EndpointShard {
            hostname: c.service.hostname.clone(),
            name: name.into(),
            endpoints: c.endpoints,
        })
    }

    fn id(name: &str) -> (String, String) {
        ("ns".into(), name.into())
    }

    fn list(
        s: &mut State,
        kind: Kind,
        objects: Vec<((String, String), Option<Object>)>,
    ) -> Option<Update> {
        assert!(s.on(Event::Init(kind)).is_none());
        for (i, o) in objects {
            assert!(s.on(Event::Listed(kind, i, o)).is_none());
        }
        s.on(Event::InitDone(kind))
    }

    #[test]
    fn one_reset_once_every_kind_is_listed_then_one_patch_per_event() {
        let mut s = state();
        assert!(list(&mut s, Kind::Service, vec![]).is_none());
        let a = shard("a.ns.svc.cluster.local", "a-1", &["10.0.0.1"]);
        let Some(Update::Reset { objects, .. }) = list(
            &mut s,
            Kind::EndpointSlice,
            vec![(id("a-1"), Some(a.clone()))],
        ) else {
            panic!("no reset");
        };
        assert_eq!(objects, std::slice::from_ref(&a));
        // An edit of one slice: that shard alone.
        let a2 = shard("a.ns.svc.cluster.local", "a-1", &["10.0.0.2"]);
        let Some(Update::Patch { apply, delete, .. }) = s.on(Event::Apply(
            Kind::EndpointSlice,
            id("a-1"),
            Some(a2.clone()),
        )) else {
            panic!("no patch");
        };
        assert_eq!((apply, delete), (vec![a2.clone()], vec![]));
        // The same object again: nothing.
        assert!(
            s.on(Event::Apply(
                Kind::EndpointSlice,
                id("a-1"),
                Some(a2.clone())
            ))
            .is_none()
        );
        // A slice moved to another service: the old key goes.
        let b = shard("b.ns.svc.cluster.local", "a-1", &["10.0.0.2"]);
        let Some(Update::Patch { apply, delete, .. }) = s.on(Event::Apply(
            Kind::EndpointSlice,
            id("a-1"),
            Some(b.clone()),
        )) else {
            panic!("no patch");
        };
        assert_eq!((apply, delete), (vec![b.clone()], vec![a2.key()]));
        // Deleted: its key goes.
        let Some(Update::Patch { apply, delete, .. }) =
            s.on(Event::Delete(Kind::EndpointSlice, id("a-1")))
        else {
            panic!("no patch");
        };
        assert_eq!((apply, delete), (vec![], vec![b.key()]));
    }

    #[test]
    fn a_failure_is_reported_once_and_the_next_event_resends_the_state() {
        let mut s = state();
        list(&mut s, Kind::Service, vec![]);
        let a = shard("a.ns.svc.cluster.local", "a-1", &["10.0.0.1"]);
        assert!(matches!(
            list(
                &mut s,
                Kind::EndpointSlice,
                vec![(id("a-1"), Some(a.clone()))]
            ),
            Some(Update::Reset { .. })
        ));
        assert!(matches!(
            s.on(Event::Failed(Kind::Service, "connection refused".into())),
            Some(Update::Stale { .. })
        ));
        // Retries fail again: nothing more.
        assert!(
            s.on(Event::Failed(
                Kind::EndpointSlice,
                "connection refused".into()
            ))
            .is_none()
        );
        // Back: a watch event after the outage sends the whole state.
        let a2 = shard("a.ns.svc.cluster.local", "a-1", &["10.0.0.2"]);
        let Some(Update::Reset { objects, .. }) = s.on(Event::Apply(
            Kind::EndpointSlice,
            id("a-1"),
            Some(a2.clone()),
        )) else {
            panic!("no reset");
        };
        assert_eq!(objects, [a2]);
        assert!(!s.failing);
    }

    #[test]
    fn a_relist_replaces_the_kind_and_drops_what_is_gone() {
        let mut s = state();
        list(&mut s, Kind::Service, vec![]);
        let a = shard("a.ns.svc.cluster.local", "a-1", &["10.0.0.1"]);
        let b = shard("b.ns.svc.cluster.local", "b-1", &["10.0.0.3"]);
        list(
            &mut s,
            Kind::EndpointSlice,
            vec![(id("a-1"), Some(a.clone())), (id("b-1"), Some(b.clone()))],
        );
        // 410 Gone: the watcher lists again; b-1 was deleted meanwhile.
        let Some(Update::Reset { objects, .. }) = list(
            &mut s,
            Kind::EndpointSlice,
            vec![(id("a-1"), Some(a.clone()))],
        ) else {
            panic!("no reset");
        };
        assert_eq!(objects, [a]);
    }
}
