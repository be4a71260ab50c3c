//! What a source can tell the registry: a closed set of updates over keyed
//! [`Object`]s.

use crate::model::{Endpoint, Hostname, Service};
use crate::object::{EndpointShard, Object, ObjectKey};
use crate::source::SourceId;

/// A change from one source. Applying an update is atomic: readers see the
/// state before it or after it, never half of it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Update {
    /// The complete state of `source`: objects it no longer lists are
    /// removed, the others are diffed one by one (cost proportional to what
    /// changed), and the source is synced. Adapters send this after an
    /// initial list or a relist, so a relist never makes endpoints vanish in
    /// between. Invalid objects are skipped and reported; they never keep
    /// the source from syncing.
    Reset {
        /// Who sends it.
        source: SourceId,
        /// Everything the source knows.
        objects: Vec<Object>,
    },
    /// A [`Update::Reset`] that leaves the objects named in `keep` as the
    /// source held them (neither replaced nor removed): a source that
    /// restarts and cannot read part of its platform yet (a DNS name whose
    /// server does not answer) syncs the rest without withdrawing that
    /// part.
    ResetKeeping {
        /// Who sends it.
        source: SourceId,
        /// Everything the source knows now.
        objects: Vec<Object>,
        /// Keys kept as held, if held.
        keep: Vec<ObjectKey>,
    },
    /// Adds or replaces `apply` and removes `delete`, in one step (a file's
    /// objects, a watch event).
    Patch {
        /// Who sends it.
        source: SourceId,
        /// Objects to add or replace.
        apply: Vec<Object>,
        /// Keys of objects to remove.
        delete: Vec<ObjectKey>,
    },
    /// The source is gone (a cluster removed from the config): everything it
    /// sent and its status are dropped.
    Forget {
        /// The source.
        source: SourceId,
    },
    /// The source cannot read its platform. A source that had synced keeps
    /// serving its last state and is reported stale; one that never synced
    /// stays not ready, with `error` as the reason.
    Stale {
        /// The source.
        source: SourceId,
        /// Why (shown on `/ready` and in logs).
        error: String,
    },
}

impl Update {
    /// The source that sent the update.
    pub fn source(&self) -> &SourceId {
        match self {
            Update::Reset { source, .. }
            | Update::ResetKeeping { source, .. }
            | Update::Patch { source, .. }
            | Update::Forget { source }
            | Update::Stale { source, .. } => source,
        }
    }

    /// Adds or replaces one object.
    pub fn apply(source: SourceId, object: Object) -> Self {
        Update::Patch {
            source,
            apply: vec![object],
            delete: Vec::new(),
        }
    }

    /// Removes one object.
    pub fn delete(source: SourceId, key: ObjectKey) -> Self {
        Update::Patch {
            source,
            apply: Vec::new(),
            delete: vec![key],
        }
    }

    /// Adds or replaces `c` as one declaration and one shard, both keyed
    /// by its hostname alone (see [`Contribution`]).
    pub fn contribution(source: SourceId, c: Contribution) -> Self {
        Update::Patch {
            source,
            apply: c.into_objects().to_vec(),
            delete: Vec::new(),
        }
    }

    /// Removes what [`Update::contribution`] added for `hostname` declared
    /// in `namespace`.
    pub fn withdraw(source: SourceId, namespace: &str, hostname: Hostname) -> Self {
        Update::Patch {
            source,
            apply: Vec::new(),
            delete: vec![
                ObjectKey::Service {
                    namespace: namespace.to_string(),
                    hostname: hostname.clone(),
                    origin: String::new(),
                },
                ObjectKey::Endpoints {
                    hostname,
                    shard: String::new(),
                },
            ],
        }
    }
}

/// A service with the endpoints one source knows for it: the shape simple
/// sources produce (a DNS answer for a name it declares, a benchmark). It is
/// one declaration (origin `""`) and one shard (name `""`).
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// The service shape as the source declares it.
    pub service: Service,
    /// The endpoints the source knows for the service.
    pub endpoints: Vec<Endpoint>,
}

impl Contribution {
    /// The declaration and the shard.
    pub fn into_objects(self) -> [Object; 2] {
        let hostname = self.service.hostname.clone();
        [
            Object::Service {
                origin: String::new(),
                service: self.service,
            },
            Object::Endpoints(EndpointShard {
                hostname,
                name: String::new(),
                endpoints: self.endpoints,
            }),
        ]
    }
}
