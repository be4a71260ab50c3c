//! What an adapter can tell the registry.

use crate::model::{Endpoint, Hostname, Service};
use crate::source::SourceId;

/// One source's view of one service: its shape and the endpoints the
/// source knows for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// The service shape as the source declares it.
    pub service: Service,
    /// The endpoints the source knows for the service.
    pub endpoints: Vec<Endpoint>,
}

/// A change from one source. Applying an update is atomic: readers see the
/// state before it or after it, never half of it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Update {
    /// The complete state of `source`: replaces everything it contributed
    /// before (hostnames it no longer lists are removed) and marks the source
    /// synced. Adapters send this after an initial list or a relist, so a
    /// relist never makes endpoints vanish in between.
    Reset {
        /// Who sends it.
        source: SourceId,
        /// Everything the source knows.
        services: Vec<Contribution>,
    },
    /// Adds or replaces the source's contribution for one hostname.
    Upsert {
        /// Who sends it.
        source: SourceId,
        /// The new contribution.
        contribution: Contribution,
    },
    /// Removes the source's contribution for one hostname.
    Delete {
        /// Who sends it.
        source: SourceId,
        /// The hostname the source no longer knows.
        hostname: Hostname,
    },
}

impl Update {
    /// The source that sent the update.
    pub fn source(&self) -> &SourceId {
        match self {
            Update::Reset { source, .. }
            | Update::Upsert { source, .. }
            | Update::Delete { source, .. } => source,
        }
    }
}
