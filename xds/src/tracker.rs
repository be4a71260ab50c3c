//! What one stream tracks of one resource type, shared by the delta and
//! SotW connections (issue 14: they kept near-copies of it): the names the
//! proxy subscribed to, the versions it holds, the names to send whatever
//! it holds, the snapshot generation it caught up with, the responses in
//! flight and what it rejected; and the catch-up that turns a newer
//! snapshot into the resources to send.
//!
//! The connections own the protocol: how requests change a subscription
//! (delta adds and removes names, SotW names the whole set), wildcards,
//! SotW's full-state types, and encoding. Each keeps a `TypeState` per type
//! that holds a [`Tracker`] and dereferences to it.

use std::sync::Arc;

use crate::ack::{InFlight, Rejections, Sent, offer, probe};
use crate::batch::{Batch, sorted_unique};
use crate::cache::{Catchup, Snapshot};
use crate::held::{Held, NameSet};
use crate::resource::TypeUrl;

/// One type's subscription on one stream (see the module docs).
#[derive(Debug)]
pub(crate) struct Tracker {
    pub(crate) type_url: TypeUrl,
    /// The proxy has asked for this type.
    pub(crate) active: bool,
    /// Names it subscribed to.
    pub(crate) names: NameSet,
    /// What it holds (or was sent and has not rejected).
    pub(crate) held: Held,
    /// Names to send even if it holds the same version: new subscriptions,
    /// the followers of resources just sent (any order, duplicates).
    pub(crate) force: Vec<Arc<str>>,
    /// The snapshot generation it has caught up with.
    pub(crate) generation: u64,
    pub(crate) in_flight: InFlight,
    pub(crate) rejections: Rejections,
    /// Answer even with nothing to send (a proxy that asked and waits).
    pub(crate) must_respond: bool,
}

impl Tracker {
    pub(crate) fn new(type_url: TypeUrl) -> Self {
        Tracker {
            type_url,
            active: false,
            names: NameSet::default(),
            held: Held::new(type_url),
            force: Vec::new(),
            generation: 0,
            in_flight: InFlight::default(),
            rejections: Rejections::default(),
            must_respond: false,
        }
    }

    /// Whether the proxy wants `name`: subscribed, or any name under a
    /// `wildcard` subscription that serves this type.
    pub(crate) fn wants(&self, name: &str, wildcard: bool) -> bool {
        wildcard || self.names.contains(name)
    }

    /// Replaces the subscription with `names` (a SotW request names the
    /// whole set): names dropped are no longer held or known rejected, new
    /// ones are sent whatever the proxy held. Returns whether it changed.
    pub(crate) fn replace_names(&mut self, names: NameSet) -> bool {
        if names == self.names {
            return false;
        }
        for gone in self.names.difference(&names) {
            self.held.set(gone.clone(), None);
            self.rejections.forget(gone);
        }
        for new in names.difference(&self.names) {
            self.force.push(new.clone());
        }
        self.names = names;
        true
    }

    /// Drops `name` from the subscription (a delta unsubscribe); unless a
    /// wildcard still covers it (`still_wanted`), the proxy no longer holds
    /// it.
    pub(crate) fn unsubscribe(&mut self, name: Arc<str>, still_wanted: bool) {
        self.names.remove(&name);
        self.force.retain(|n| *n != name);
        self.rejections.forget(&name);
        if !still_wanted {
            self.held.set(name, None);
        }
    }

    /// Forgets what the proxy holds outside its named subscription (a
    /// wildcard it dropped).
    pub(crate) fn keep_named_only(&mut self) {
        for held in self.held.names() {
            if !self.names.contains(&held) {
                self.held.set(held, None);
            }
        }
    }

    /// The rejected response `nonce`, forgotten, with what it replaced put
    /// back (see [`InFlight::take_nacked`]); `None` if it is not in flight.
    pub(crate) fn take_nacked(&mut self, nonce: &str) -> Option<Sent> {
        self.in_flight.take_nacked(nonce, &mut self.held)
    }

    /// What brings the proxy up to `snap`, as one batch, and what it holds
    /// updated as if the batch were sent; `None` when there is nothing to
    /// send and no answer owed.
    ///
    /// Looked at: the names changed since the generation caught up with
    /// (every name subscribed or held when `full`, or when the snapshot's
    /// history does not reach back, plus every resource under `wildcard`),
    /// `extra`, and the forced names. A wanted resource is offered (sent
    /// unless the proxy holds that version, or rejected it as it is); with
    /// `removals` (delta), a held name the snapshot no longer has is
    /// removed.
    pub(crate) fn catch_up(
        &mut self,
        snap: &Arc<Snapshot>,
        wildcard: bool,
        full: bool,
        mut extra: Vec<Arc<str>>,
        removals: bool,
    ) -> Option<Batch> {
        let t = self.type_url;
        let (catchup, event_at) = snap.changed_since(t, self.generation);
        let everything = full || matches!(catchup, Catchup::Everything);
        let mut candidates: Vec<Arc<str>> = match catchup {
            Catchup::Names(names) if !everything => names,
            _ => {
                let mut all = self.held.names();
                all.extend(self.names.iter().cloned());
                if wildcard {
                    all.extend(snap.resources(t).map(|r| r.name.clone()));
                }
                all
            }
        };
        candidates.append(&mut extra);
        let force = sorted_unique(std::mem::take(&mut self.force));
        candidates.extend(force.iter().cloned());
        let candidates = sorted_unique(candidates);
        self.generation = snap.generation();
        let mut batch = Batch::new(t, if everything { None } else { event_at });
        for name in candidates {
            if !self.wants(&name, wildcard) {
                continue;
            }
            match snap.get(t, &name) {
                Some(r) => {
                    let forced = force.binary_search(&name).is_ok();
                    offer(&mut batch, &mut self.held, &mut self.rejections, r, forced);
                }
                None if removals && self.held.version(&name).is_some() => {
                    let previous = self.held.take(&name);
                    batch.removed.push((name, previous));
                }
                None => {}
            }
        }
        self.held.rebase(snap);
        let must_respond = std::mem::take(&mut self.must_respond);
        if batch.is_empty() && !must_respond {
            return None;
        }
        Some(batch)
    }

    /// A resource of a rejected response, sent again alone (see
    /// [`Rejections`]), once the proxy is otherwise up to date.
    pub(crate) fn probe(&mut self, snap: &Snapshot, wildcard: bool) -> Option<Batch> {
        let names = &self.names;
        probe(
            self.type_url,
            &mut self.rejections,
            &mut self.held,
            snap,
            |name| wildcard || names.contains(name),
        )
    }
}

/// Makes a connection's per-type state (a struct with a `tracker` field)
/// dereference to its [`Tracker`], so the shared fields read as its own.
macro_rules! deref_to_tracker {
    ($state:ty) => {
        impl std::ops::Deref for $state {
            type Target = $crate::tracker::Tracker;
            fn deref(&self) -> &$crate::tracker::Tracker {
                &self.tracker
            }
        }

        impl std::ops::DerefMut for $state {
            fn deref_mut(&mut self) -> &mut $crate::tracker::Tracker {
                &mut self.tracker
            }
        }
    };
}
pub(crate) use deref_to_tracker;
