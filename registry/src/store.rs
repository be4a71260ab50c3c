//! The store: one [`Writer`] applies updates and publishes immutable
//! [`View`]s; any number of [`Reader`]s watch them.
//!
//! Every write goes through [`Writer::apply`], which merges, bumps the
//! version, records the [`Change`] and publishes the new view in one step, so
//! a version bump or a notification cannot be forgotten. Views share
//! structure (persistent maps), so publishing one costs O(changed hosts ×
//! log n), not O(n).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use imbl::{OrdMap, Vector};
use tokio::sync::{mpsc, watch};

use crate::change::{Change, ChangeKind};
use crate::error::{Error, Result};
use crate::merge::{MergedService, merge};
use crate::model::{Hostname, Service};
use crate::source::SourceId;
use crate::update::{Contribution, Update};

/// How many past changes a view remembers, so a reader that fell behind by
/// fewer versions than this can catch up without a full comparison.
const CHANGE_LOG_LEN: usize = 1024;

/// The sync state of one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceStatus {
    /// The source has delivered its complete initial state.
    pub synced: bool,
}

/// An immutable snapshot of the registry. Cheap to clone and to hold.
#[derive(Debug, Clone)]
pub struct View {
    version: u64,
    services: OrdMap<Hostname, Arc<MergedService>>,
    sources: OrdMap<SourceId, SourceStatus>,
    log: Vector<Arc<Change>>,
    endpoint_count: usize,
}

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

    /// Every known source with its sync state.
    pub fn sources(&self) -> impl Iterator<Item = (&SourceId, &SourceStatus)> {
        self.sources.iter()
    }

    /// True once every expected source has synced.
    pub fn is_ready(&self) -> bool {
        self.sources.values().all(|s| s.synced)
    }

    /// Everything that changed after version `since`, folded into one
    /// [`Change`]; `None` when the log no longer reaches back that far (the
    /// caller must compare everything). An up-to-date caller gets an empty
    /// change.
    pub fn changes_since(&self, since: u64) -> Option<Change> {
        let mut out = Change {
            version: self.version,
            at: Instant::now(),
            services: BTreeMap::new(),
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
        for i in self.log.len() - wanted..self.log.len() {
            if let Some(c) = self.log.get(i) {
                out.merge(c);
            }
        }
        Some(out)
    }
}

/// The single writer of the registry. Not `Clone`: adapters send
/// [`Update`]s to the task that owns it (see [`run`]).
#[derive(Debug)]
pub struct Writer {
    contributions: HashMap<Hostname, BTreeMap<SourceId, Contribution>>,
    by_source: HashMap<SourceId, BTreeSet<Hostname>>,
    view: Arc<View>,
    tx: watch::Sender<Arc<View>>,
}

/// A read handle: the latest [`View`] and notification of new ones.
#[derive(Debug, Clone)]
pub struct Reader {
    rx: watch::Receiver<Arc<View>>,
}

/// Creates an empty registry that is ready once each of `expected` sources
/// has sent its first [`Update::Reset`].
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
    });
    let (tx, rx) = watch::channel(view.clone());
    let writer = Writer {
        contributions: HashMap::new(),
        by_source: HashMap::new(),
        view,
        tx,
    };
    (writer, Reader { rx })
}

/// Applies updates from `updates` until every sender is gone. Invalid
/// updates are logged and skipped; they change nothing.
pub async fn run(mut writer: Writer, mut updates: mpsc::Receiver<Update>) {
    while let Some(update) = updates.recv().await {
        if let Err(error) = writer.apply(update) {
            tracing::warn!(%error, "registry update refused");
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

    /// Applies one update: merges, bumps the version, publishes the new view
    /// and returns what changed (`None` if nothing did).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when a service in the update fails validation; the
    /// registry is then unchanged.
    pub fn apply(&mut self, update: Update) -> Result<Option<Arc<Change>>> {
        let at = Instant::now();
        let source = update.source().clone();
        let mut affected = BTreeSet::new();
        let is_reset = matches!(update, Update::Reset { .. });
        match update {
            Update::Reset { services, .. } => {
                for c in &services {
                    validate(&source, &c.service)?;
                }
                let old = self.by_source.remove(&source).unwrap_or_default();
                for host in &old {
                    self.remove_contribution(&source, host);
                }
                affected.extend(old);
                let mut hosts = BTreeSet::new();
                for c in services {
                    let host = c.service.hostname.clone();
                    hosts.insert(host.clone());
                    self.contributions
                        .entry(host.clone())
                        .or_default()
                        .insert(source.clone(), c);
                    affected.insert(host);
                }
                self.by_source.insert(source.clone(), hosts);
            }
            Update::Upsert { contribution, .. } => {
                validate(&source, &contribution.service)?;
                let host = contribution.service.hostname.clone();
                self.by_source
                    .entry(source.clone())
                    .or_default()
                    .insert(host.clone());
                self.contributions
                    .entry(host.clone())
                    .or_default()
                    .insert(source.clone(), contribution);
                affected.insert(host);
            }
            Update::Delete { hostname, .. } => {
                if let Some(hosts) = self.by_source.get_mut(&source) {
                    hosts.remove(&hostname);
                }
                self.remove_contribution(&source, &hostname);
                affected.insert(hostname);
            }
        }
        self.publish(affected, &source, is_reset, at)
    }

    fn remove_contribution(&mut self, source: &SourceId, host: &Hostname) {
        if let Some(per_source) = self.contributions.get_mut(host) {
            per_source.remove(source);
            if per_source.is_empty() {
                self.contributions.remove(host);
            }
        }
    }

    fn publish(
        &mut self,
        affected: BTreeSet<Hostname>,
        source: &SourceId,
        is_reset: bool,
        at: Instant,
    ) -> Result<Option<Arc<Change>>> {
        let mut services = self.view.services.clone();
        let mut endpoint_count = self.view.endpoint_count;
        let mut changed = BTreeMap::new();
        for host in affected {
            let new = self.contributions.get(&host).and_then(merge);
            let old = services.get(&host);
            let kind = match (old, &new) {
                (None, None) => None,
                (Some(_), None) => Some(ChangeKind::Removed),
                (None, Some(_)) => Some(ChangeKind::Service),
                (Some(o), Some(n)) if o.service != n.service => Some(ChangeKind::Service),
                (Some(o), Some(n)) if o.endpoints != n.endpoints => Some(ChangeKind::Endpoints),
                (Some(_), Some(_)) => None,
            };
            let Some(kind) = kind else { continue };
            if let Some(o) = old {
                endpoint_count -= o.endpoints.len();
            }
            match new {
                Some(n) => {
                    for conflict in &n.conflicts {
                        tracing::warn!(hostname = %host, %conflict, "sources disagree");
                    }
                    endpoint_count += n.endpoints.len();
                    services.insert(host.clone(), Arc::new(n));
                }
                None => {
                    services.remove(&host);
                }
            }
            changed.insert(host, kind);
        }
        // Only a Reset syncs a source: it is the complete state. A source
        // nobody waits for joins the list when it first syncs, so it never
        // holds readiness back.
        let newly_synced = is_reset && self.view.sources.get(source).is_none_or(|s| !s.synced);
        if changed.is_empty() && !newly_synced {
            return Ok(None);
        }
        let version = self.view.version + 1;
        let change = Arc::new(Change {
            version,
            at,
            services: changed,
        });
        let mut sources = self.view.sources.clone();
        if newly_synced {
            sources.insert(source.clone(), SourceStatus { synced: true });
        }
        let mut log = self.view.log.clone();
        log.push_back(change.clone());
        while log.len() > CHANGE_LOG_LEN {
            log.pop_front();
        }
        self.view = Arc::new(View {
            version,
            services,
            sources,
            log,
            endpoint_count,
        });
        // Receivers may all be gone (e.g. during shutdown); the view is still
        // kept for `Writer::view`.
        self.tx.send_replace(self.view.clone());
        Ok(Some(change))
    }
}

fn validate(source: &SourceId, service: &Service) -> Result<()> {
    let invalid = |reason: String| Error::Invalid {
        source_id: source.to_string(),
        reason,
    };
    if service.hostname.as_str().is_empty() {
        return Err(invalid("service with an empty hostname".into()));
    }
    let mut numbers = BTreeSet::new();
    for p in &service.ports {
        if p.number == 0 {
            return Err(invalid(format!("{}: port 0", service.hostname)));
        }
        if !numbers.insert(p.number) {
            return Err(invalid(format!(
                "{}: port {} declared twice",
                service.hostname, p.number
            )));
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

    /// Waits until every expected source has synced; returns that view, or
    /// `None` if the writer went away first.
    pub async fn wait_until_ready(&mut self) -> Option<Arc<View>> {
        self.rx
            .wait_for(|v| v.is_ready())
            .await
            .ok()
            .map(|v| v.clone())
    }
}

#[cfg(test)]
mod tests;
