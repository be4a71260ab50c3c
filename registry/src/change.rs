//! Change events: which hostnames changed between two registry versions.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::model::Hostname;
use crate::object::ObjectKey;
use crate::source::SourceId;

/// What changed about one hostname.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Only the endpoints changed: EDS is enough.
    Endpoints,
    /// The service shape changed (or the service appeared): CDS and EDS.
    Service,
    /// The service is gone.
    Removed,
}

/// The hostnames that changed in one registry version.
#[derive(Debug, Clone)]
pub struct Change {
    /// The registry version this change produced.
    pub version: u64,
    /// When the update that caused it was applied (the start of the clock
    /// for push convergence time).
    pub at: Instant,
    /// The source whose update caused it (`None` for a fold of several
    /// sources' changes), so a source can recognise the echo of its own
    /// updates.
    pub source: Option<SourceId>,
    /// The keys of the objects the update changed (empty in a fold of
    /// several changes).
    pub keys: Vec<ObjectKey>,
    /// Each changed hostname with what changed about it.
    pub services: BTreeMap<Hostname, ChangeKind>,
    /// Whether a `Sidecar` or a `DestinationRule` with a workload
    /// selector was added, changed or removed: what applies to a proxy by
    /// its namespace and labels may have changed.
    pub proxy_selectors: bool,
}

impl Change {
    /// Folds a later change into this one, keeping the strongest kind per
    /// hostname (a removal or a shape change subsumes an endpoint change),
    /// the earliest time, and the source only if both have the same.
    pub fn merge(&mut self, later: &Change) {
        self.version = self.version.max(later.version);
        self.at = self.at.min(later.at);
        if self.source != later.source {
            self.source = None;
        }
        self.keys.clear();
        self.proxy_selectors |= later.proxy_selectors;
        for (host, kind) in &later.services {
            self.services
                .entry(host.clone())
                .and_modify(|k| {
                    // A host removed and then re-added is a shape change.
                    *k = match (*k, *kind) {
                        (ChangeKind::Removed, ChangeKind::Removed) => ChangeKind::Removed,
                        (_, ChangeKind::Removed) => ChangeKind::Removed,
                        (ChangeKind::Endpoints, ChangeKind::Endpoints) => ChangeKind::Endpoints,
                        _ => ChangeKind::Service,
                    }
                })
                .or_insert(*kind);
        }
    }
}
