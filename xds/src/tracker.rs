//! What one stream tracks of one resource type, shared by the delta and
//! SotW connections (issue 14: they kept near-copies of it): the names the
//! proxy subscribed to, the versions it holds, the names to send whatever
//! it holds (followers, and the names subscribed since the last catch-up:
//! the subscription less the set it caught up with, which it does not
//! hold), the snapshot generation it caught up with, the responses in
//! flight and what it rejected; and the catch-up that turns a newer
//! snapshot into the resources to send.
//!
//! It also decides the two protocol-specific starts and sends that are
//! about what a proxy holds: where a reconnecting delta proxy's
//! `initial_resource_versions` put it ([`Tracker::resume`]), and whether a
//! SotW full-state type (CDS, LDS) must be sent again
//! ([`Tracker::full_state`]); and which followers a send forces
//! ([`Tracker::follow`]).
//!
//! The connections own the wire: parsing requests into subscription
//! changes (delta adds and removes names, SotW names the whole set),
//! wildcards, and encoding. Each keeps a `TypeState` per type that holds a
//! [`Tracker`] and dereferences to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::ack::{InFlight, Offer, Rejections, Sent, offer, probe};
use crate::batch::{Batch, sorted_unique};
use crate::cache::{Catchup, Snapshot};
use crate::held::{Cursor, Held, NameSet, intern};
use crate::resource::TypeUrl;

/// A full-state response owed (see [`Tracker::full_state`]).
#[derive(Debug)]
pub(crate) struct FullState {
    /// The digest of the set to send (its `version_info`).
    pub(crate) digest: u64,
    /// The names changed since the last response, or `None` for a resync
    /// (a first response, one after a NACK, or history that does not reach
    /// back): then every follower is sent again.
    pub(crate) changed: Option<Vec<Arc<str>>>,
    /// The earliest registry event it delivers (`None` for a resync).
    pub(crate) event_at: Option<Instant>,
}

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
    /// Names to send even if it holds the same version: the followers of
    /// resources just sent, names subscribed again (any order,
    /// duplicates). New subscriptions are not listed here: they are
    /// `names` less `caught_up`.
    pub(crate) force: Vec<Arc<str>>,
    /// The subscription as of the last catch-up (shared with `names` until
    /// it changes, so it costs nothing per stream): what `names` has more
    /// was subscribed since, and is sent whatever the proxy holds.
    pub(crate) caught_up: NameSet,
    /// The snapshot generation it has caught up with.
    pub(crate) generation: u64,
    pub(crate) in_flight: InFlight,
    pub(crate) rejections: Rejections,
    /// Answer even with nothing to send (a proxy that asked and waits).
    pub(crate) must_respond: bool,
    /// Full-state types (SotW): the digest of the last set sent.
    pub(crate) sent_digest: Option<u64>,
    /// Full-state types (SotW): the proxy rejected a response since the
    /// last one it accepted, so it kept older resources.
    pub(crate) rejected_full: bool,
}

impl Tracker {
    pub(crate) fn new(type_url: TypeUrl) -> Self {
        Tracker {
            type_url,
            active: false,
            names: NameSet::default(),
            held: Held::new(type_url),
            force: Vec::new(),
            caught_up: NameSet::default(),
            generation: 0,
            in_flight: InFlight::default(),
            rejections: Rejections::default(),
            must_respond: false,
            sent_digest: None,
            rejected_full: false,
        }
    }

    /// Starts the type from the versions a (re)connecting delta proxy says
    /// it holds (`initial_resource_versions`). Returns the names to compare
    /// on the first response, or `None` when every subscribed and held name
    /// must be (no versions given, or no snapshot yet to compare with).
    ///
    /// With versions and a snapshot, what the proxy holds is recorded
    /// relative to `snap` (only where it differs), so a reconnect costs
    /// O(what it holds) and sends only what changed while it was away;
    /// under a `wildcard`, what it does not hold is forced.
    pub(crate) fn resume(
        &mut self,
        snap: &Arc<Snapshot>,
        initial: &HashMap<&str, &str>,
        wildcard: bool,
    ) -> Option<Vec<Arc<str>>> {
        let t = self.type_url;
        if initial.is_empty() || !snap.is_ready() {
            for (name, version) in initial {
                self.held
                    .set(intern(snap, t, name), Some((*version).into()));
            }
            return None;
        }
        self.held.reset_to(snap);
        self.generation = snap.generation();
        let mut check = Vec::new();
        for (name, version) in initial {
            if snap.get(t, name).map(|r| &*r.version) != Some(*version) {
                let name = intern(snap, t, name);
                self.held.set(name.clone(), Some((*version).into()));
                check.push(name);
            }
        }
        if wildcard {
            for r in snap.resources(t) {
                if !initial.contains_key(&*r.name) {
                    self.force.push(r.name.clone());
                }
            }
        }
        Some(check)
    }

    /// Whether a SotW full-state type (CDS, LDS) must be sent again, and
    /// what with: when the set the proxy subscribed to changed, or it asked
    /// anew (`must_respond`). With names, a digest of those names' versions
    /// decides, so a gRPC client holding three clusters is sent CDS only
    /// when one of the three changes; with none (`names` empty, a
    /// wildcard), the digest of the whole type, or of the empty set for a
    /// type served by name only. Records the response as sent.
    pub(crate) fn full_state(&mut self, snap: &Snapshot) -> Option<FullState> {
        let t = self.type_url;
        let digest = if !self.names.is_empty() {
            self.names
                .iter()
                .filter_map(|n| snap.get(t, n))
                .fold(0, |acc, r| {
                    acc ^ xxhash_rust::xxh3::xxh3_64(r.version.as_bytes())
                        ^ xxhash_rust::xxh3::xxh3_64(r.name.as_bytes()).rotate_left(1)
                })
        } else if t.wildcard() {
            snap.digest(t)
        } else {
            0
        };
        if self.sent_digest == Some(digest) && !self.must_respond {
            self.generation = snap.generation();
            return None;
        }
        let resync = self.sent_digest.is_none() || std::mem::take(&mut self.rejected_full);
        let (catchup, event_at) = snap.changed_since(t, self.generation);
        let changed = match catchup {
            Catchup::Names(names) if !resync => Some(sorted_unique(names)),
            _ => None,
        };
        self.generation = snap.generation();
        self.must_respond = false;
        self.sent_digest = Some(digest);
        Some(FullState {
            digest,
            event_at: if changed.is_some() { event_at } else { None },
            changed,
        })
    }

    /// Makes the resources `sent` of the type this one follows (CDS for
    /// EDS, LDS for RDS) be sent again, where the proxy wants them and the
    /// snapshot has them: Envoy warms a new or changed cluster until its
    /// endpoints arrive, whatever version it held.
    pub(crate) fn follow<'a>(
        &mut self,
        sent: impl IntoIterator<Item = &'a Arc<str>>,
        wildcard: bool,
        snap: &Snapshot,
    ) {
        let t = self.type_url;
        for name in sent {
            if self.wants(name, wildcard) && snap.get(t, name).is_some() {
                self.force.push(name.clone());
            }
        }
    }

    /// [`Tracker::follow`] for every subscribed name (a resync).
    pub(crate) fn follow_all(&mut self, snap: &Snapshot) {
        let t = self.type_url;
        let all: Vec<Arc<str>> = self
            .names
            .iter()
            .filter(|n| snap.get(t, n).is_some())
            .cloned()
            .collect();
        self.force.extend(all);
    }

    /// Whether the proxy wants `name`: subscribed, directly or through
    /// its glob collection (LEDS), or any name under a `wildcard`
    /// subscription that serves this type.
    pub(crate) fn wants(&self, name: &str, wildcard: bool) -> bool {
        wanted(self.type_url, &self.names, name, wildcard)
    }

    /// `names` with every glob collection among them (LEDS) replaced by
    /// its members in `snap` and the names the proxy holds of it.
    fn expand_globs(&self, snap: &Snapshot, names: &mut Vec<Arc<str>>) {
        if self.type_url != TypeUrl::LbEndpoint {
            return;
        }
        let mut members = Vec::new();
        names.retain(|n| match crate::leds::glob_prefix(n) {
            Some(prefix) => {
                members.extend(
                    snap.with_prefix(self.type_url, prefix)
                        .map(|r| r.name.clone()),
                );
                members.extend(
                    self.held
                        .names()
                        .into_iter()
                        .filter(|h| h.starts_with(prefix)),
                );
                false
            }
            None => true,
        });
        names.append(&mut members);
    }

    /// Replaces the subscription with `names` (a SotW request names the
    /// whole set): names dropped are no longer held or known rejected, new
    /// ones are sent whatever the proxy held. Returns whether it changed.
    pub(crate) fn replace_names(&mut self, names: NameSet) -> bool {
        if names == self.names {
            return false;
        }
        let gone: Vec<Arc<str>> = self.names.difference(&names).cloned().collect();
        self.dropped(&gone);
        self.names = names;
        true
    }

    /// The proxy dropped `gone` from its subscription (a SotW request
    /// that no longer names them): it holds nothing of them, nor of them
    /// in a response in flight ([`InFlight::dropped`]), and what it
    /// rejected of them is forgotten. What `names` has more than
    /// `caught_up` is forced at the next catch-up, so a name dropped now
    /// and named again before then is new again.
    pub(crate) fn dropped(&mut self, gone: &[Arc<str>]) {
        if gone.is_empty() {
            return;
        }
        let refs: Vec<&str> = gone.iter().map(|n| &**n).collect();
        let set: std::collections::HashSet<&str> = refs.iter().copied().collect();
        for name in gone {
            self.held.set(name.clone(), None);
        }
        self.rejections.forget_all(|n| set.contains(n));
        self.in_flight.dropped(gone);
        self.caught_up.remove_all(&refs);
    }

    /// Drops `names` from the subscription (a delta unsubscribe); unless a
    /// wildcard still covers them (`still_wanted`), the proxy no longer
    /// holds them, and they (with a glob collection's members) are added to
    /// `dropped` (for [`InFlight::dropped`]). One pass over each list for
    /// all the names (a request may drop thousands).
    pub(crate) fn unsubscribe(
        &mut self,
        names: &[Arc<str>],
        still_wanted: bool,
        dropped: &mut Vec<Arc<str>>,
    ) {
        if names.is_empty() {
            return;
        }
        let refs: Vec<&str> = names.iter().map(|n| &**n).collect();
        let set: std::collections::HashSet<&str> = refs.iter().copied().collect();
        self.names.remove_all(&refs);
        self.force.retain(|n| !set.contains(&**n));
        // Subscribed again before the next catch-up, they are new again.
        self.caught_up.remove_all(&refs);
        self.rejections.forget_all(|n| set.contains(n));
        if still_wanted {
            return;
        }
        for name in names {
            if let Some(prefix) = crate::leds::glob_prefix(name) {
                // A glob collection: its members go with it.
                for member in self.held.names() {
                    if member.starts_with(prefix) {
                        self.rejections.forget(&member);
                        self.held.set(member.clone(), None);
                        dropped.push(member);
                    }
                }
            }
            self.held.set(name.clone(), None);
            dropped.push(name.clone());
        }
    }

    /// The accepted response `nonce`, forgotten (see
    /// [`InFlight::take_acked`]); `None` if it is not in flight. A name the
    /// same request subscribes to (`subscribing`) counts as wanted: Envoy
    /// sends the subscription changes still pending with its ACK, so the
    /// change may have come before the response arrived; taken as held, a
    /// name the proxy does not hold costs at most a removal it ignores,
    /// while one it holds and the server forgot stays after its deletion.
    pub(crate) fn take_acked(
        &mut self,
        nonce: &str,
        wildcard: bool,
        subscribing: impl Fn(&str) -> bool,
    ) -> Option<Sent> {
        let (t, names) = (self.type_url, &self.names);
        self.in_flight.take_acked(
            nonce,
            &mut self.held,
            |name| wanted(t, names, name, wildcard) || subscribing(name),
            &mut self.force,
        )
    }

    /// Forgets what the proxy holds outside its named subscription (a
    /// wildcard it dropped); the names forgotten go to `dropped` (for
    /// [`InFlight::dropped`]).
    pub(crate) fn keep_named_only(&mut self, dropped: &mut Vec<Arc<str>>) {
        for held in self.held.names() {
            if !self.names.contains(&held) {
                self.held.set(held.clone(), None);
                dropped.push(held);
            }
        }
        // Names a response in flight removed (no longer in `held`) or
        // sends are dropped too: what it replaced is gone.
        for name in self.in_flight.carried() {
            if !self.names.contains(name) {
                dropped.push(name.clone());
            }
        }
    }

    /// The rejected response `nonce`, forgotten, with what it replaced put
    /// back (see [`InFlight::take_nacked`]; the removals it carried beside
    /// resources are sent again); `None` if it is not in flight.
    pub(crate) fn take_nacked(&mut self, nonce: &str) -> Option<Sent> {
        self.in_flight
            .take_nacked(nonce, &mut self.held, &mut self.force)
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
        self.expand_globs(snap, &mut candidates);
        let mut force = std::mem::take(&mut self.force);
        // Names subscribed since the last catch-up: sent whatever the proxy
        // holds, and known not to be held (`held` describes a named
        // subscription's other names as the snapshot has them, so a NACK
        // would otherwise "restore" a version the proxy never had).
        let mut subscribed_since: Vec<Arc<str>> = Vec::new();
        if !self.names.is_same(&self.caught_up) {
            subscribed_since.extend(self.names.added_since(&self.caught_up).cloned());
            force.extend(subscribed_since.iter().cloned());
            self.caught_up = self.names.clone();
        }
        self.expand_globs(snap, &mut force);
        let force = sorted_unique(force);
        candidates.extend(force.iter().cloned());
        let candidates = sorted_unique(candidates);
        self.generation = snap.generation();
        let mut batch = Batch::new(t, if everything { None } else { event_at });
        // A first sync sends every candidate: one allocation, not a
        // doubling series (later batches send few, and are small).
        batch.sends.reserve(candidates.len());
        // `candidates`, `force` and the subscription are sorted: membership
        // is a walk of each beside the candidates, not a binary search per
        // name (names share long prefixes, so each comparison costs; perf of
        // a first sync: a tenth of the server's CPU went to those searches).
        let mut forced_at = Cursor::new(&force);
        let mut new_at = Cursor::new(&subscribed_since);
        let mut subscribed = Cursor::new(self.names.as_slice());
        for name in candidates {
            let wanted = wildcard
                || subscribed.has(&name)
                || (t == TypeUrl::LbEndpoint && wanted(t, &self.names, &name, false));
            if !wanted {
                continue;
            }
            match snap.get(t, &name) {
                Some(r) => {
                    let forced = forced_at.has(&name);
                    let unheld = new_at.has(&name);
                    offer(
                        &mut batch,
                        &mut self.held,
                        &mut self.rejections,
                        r,
                        Offer { forced, unheld },
                        snap,
                    );
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
        let (t, names) = (self.type_url, &self.names);
        probe(t, &mut self.rejections, &mut self.held, snap, |name| {
            wanted(t, names, name, wildcard)
        })
    }
}

/// See [`Tracker::wants`].
fn wanted(t: TypeUrl, names: &NameSet, name: &str, wildcard: bool) -> bool {
    wildcard
        || names.contains(name)
        || (t == TypeUrl::LbEndpoint
            && crate::leds::collection_of(name).is_some_and(|g| names.contains(&g)))
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

#[cfg(test)]
mod tests {
    use meshreg_registry::test_util::{contribution, reset_of, test_source};
    use meshreg_registry::{Update, Writer, new};

    use super::*;
    use crate::cache::Generator;

    const A: &str = "outbound|80||a.test";
    const B: &str = "outbound|80||b.test";
    const C: &str = "outbound|80||c.test";

    #[test]
    fn a_cursor_answers_membership_for_ascending_names() {
        let set: Vec<Arc<str>> = [A, C].into_iter().map(Arc::from).collect();
        let mut cursor = Cursor::new(&set);
        // Equal names in other allocations, and the set's own.
        assert!(cursor.has(&Arc::from(A)));
        assert!(cursor.has(&set[0]));
        assert!(!cursor.has(&Arc::from(B)));
        assert!(cursor.has(&Arc::from(C)));
        assert!(!cursor.has(&Arc::from("outbound|80||d.test")));
        assert!(!Cursor::new(&[]).has(&Arc::from(A)));
    }

    fn setup() -> (Writer, Generator) {
        let (mut w, _r) = new([test_source()]);
        w.apply(reset_of(
            test_source(),
            vec![
                contribution("a.test", &["10.0.0.1"]),
                contribution("b.test", &["10.0.0.2"]),
                contribution("c.test", &["10.0.0.3"]),
            ],
        ));
        let mut g = Generator::new();
        g.apply(w.view());
        (w, g)
    }

    fn set(w: &mut Writer, g: &mut Generator, host: &str, ip: &str) {
        w.apply(Update::contribution(
            test_source(),
            contribution(host, &[ip]),
        ));
        g.apply(w.view());
    }

    fn sent(b: &Batch) -> Vec<&str> {
        b.sends.iter().map(|r| &*r.name).collect()
    }

    #[test]
    fn names_subscribed_since_the_last_catch_up_are_sent_whatever_is_held() {
        let (_w, g) = setup();
        let snap = g.snapshot().clone();
        let t = TypeUrl::ClusterLoadAssignment;
        let mut tr = Tracker::new(t);
        tr.names = NameSet::from_names([A].map(Arc::from));
        let batch = tr.catch_up(&snap, false, true, Vec::new(), true).unwrap();
        assert_eq!(sent(&batch), [A]);
        assert!(tr.caught_up.is_same(&tr.names));
        // Up to date: nothing to send.
        assert!(tr.catch_up(&snap, false, false, Vec::new(), true).is_none());
        // B and C are new (the proxy holds B's version already: a new
        // subscription is sent anyway); A is not sent again.
        let b = snap.get(t, B).unwrap().version.clone();
        tr.held.set(B.into(), Some(b));
        tr.names.extend(vec![B.into(), C.into()]);
        let batch = tr.catch_up(&snap, false, false, Vec::new(), true).unwrap();
        assert_eq!(sent(&batch), [B, C]);
        assert!(tr.catch_up(&snap, false, false, Vec::new(), true).is_none());
        // Dropped under a wildcard that still covers it, then subscribed
        // again before a catch-up: new again.
        tr.unsubscribe(&[C.into()], true, &mut Vec::new());
        tr.names.extend(vec![C.into()]);
        let batch = tr.catch_up(&snap, false, false, Vec::new(), true).unwrap();
        assert_eq!(sent(&batch), [C]);
    }

    #[test]
    fn a_name_dropped_and_named_again_before_a_catch_up_is_sent_again() {
        // SotW names the whole set in every request: {A, B}, then {A},
        // then {A, B} again before the stream caught up. The proxy dropped
        // B, so B is sent again.
        let (_w, g) = setup();
        let snap = g.snapshot().clone();
        let mut tr = Tracker::new(TypeUrl::ClusterLoadAssignment);
        let ab = || NameSet::from_names([A, B].map(Arc::from));
        assert!(tr.replace_names(ab()));
        let batch = tr.catch_up(&snap, false, true, Vec::new(), true).unwrap();
        assert_eq!(sent(&batch), [A, B]);
        assert!(tr.replace_names(NameSet::from_names([A].map(Arc::from))));
        assert!(tr.replace_names(ab()));
        let batch = tr.catch_up(&snap, false, false, Vec::new(), true).unwrap();
        assert_eq!(sent(&batch), [B]);
    }

    #[test]
    fn resume_records_only_where_the_proxy_differs() {
        let (_w, g) = setup();
        let snap = g.snapshot().clone();
        let t = TypeUrl::ClusterLoadAssignment;
        let a = snap.get(t, A).unwrap().version.to_string();
        let initial: HashMap<&str, &str> = [(A, a.as_str()), (B, "stale")].into();
        let mut tr = Tracker::new(t);
        tr.names = NameSet::from_names([A, B, C].map(Arc::from));
        // As the connection does after a first request: its names are
        // compared or forced there, not new at the catch-up.
        tr.caught_up = tr.names.clone();
        let check = tr
            .resume(&snap, &initial, false)
            .expect("based on the snapshot");
        assert_eq!(check.iter().map(|n| &**n).collect::<Vec<_>>(), [B]);
        assert_eq!(tr.held.overrides(), 1, "only b differs from the snapshot");
        // c is subscribed and not held: the connection forces new names.
        tr.force.push(C.into());
        let batch = tr.catch_up(&snap, false, false, check, true).unwrap();
        assert_eq!(sent(&batch), [B, C]);

        // No versions: every name is compared.
        let mut tr = Tracker::new(t);
        assert!(tr.resume(&snap, &HashMap::new(), false).is_none());
    }

    #[test]
    fn resume_under_a_wildcard_forces_what_the_proxy_lacks() {
        let (_w, g) = setup();
        let snap = g.snapshot().clone();
        let t = TypeUrl::Cluster;
        let a = snap.get(t, A).unwrap().version.to_string();
        let initial: HashMap<&str, &str> = [(A, a.as_str())].into();
        let mut tr = Tracker::new(t);
        let check = tr.resume(&snap, &initial, true).unwrap();
        let batch = tr.catch_up(&snap, true, false, check, true).unwrap();
        assert_eq!(sent(&batch), [B, C]);
    }

    #[test]
    fn named_full_state_is_owed_only_when_a_named_resource_changes() {
        let (mut w, mut g) = setup();
        let t = TypeUrl::Cluster;
        let mut tr = Tracker::new(t);
        tr.names = NameSet::from_names([A, B].map(Arc::from));
        tr.must_respond = true;
        let first = tr.full_state(g.snapshot()).unwrap();
        assert!(first.changed.is_none(), "the first response is a resync");
        assert!(tr.full_state(g.snapshot()).is_none());
        // c is not subscribed: nothing owed.
        set(&mut w, &mut g, "c.test", "10.0.0.9");
        assert!(tr.full_state(g.snapshot()).is_none());
        // a's cluster changes shape (HTTP/2): owed, with a named.
        let mut a = contribution("a.test", &["10.0.0.1"]);
        a.service.ports[0].protocol = meshreg_registry::Protocol::Http2;
        w.apply(Update::contribution(test_source(), a));
        g.apply(w.view());
        let owed = tr.full_state(g.snapshot()).unwrap();
        assert_ne!(owed.digest, first.digest);
        assert_eq!(
            owed.changed
                .unwrap()
                .iter()
                .map(|n| &**n)
                .collect::<Vec<_>>(),
            [A]
        );
        // After a rejection the next one is a resync.
        tr.rejected_full = true;
        tr.must_respond = true;
        assert!(tr.full_state(g.snapshot()).unwrap().changed.is_none());
    }

    #[test]
    fn follow_forces_only_wanted_names_the_snapshot_has() {
        let (_w, g) = setup();
        let snap = g.snapshot();
        let mut tr = Tracker::new(TypeUrl::ClusterLoadAssignment);
        tr.names = NameSet::from_names([A, "outbound|80||gone.test"].map(Arc::from));
        let sent: Vec<Arc<str>> = [A, B, "outbound|80||gone.test"].map(Arc::from).into();
        tr.follow(&sent, false, snap);
        assert_eq!(tr.force.iter().map(|n| &**n).collect::<Vec<_>>(), [A]);
        tr.force.clear();
        tr.follow(&sent, true, snap);
        assert_eq!(tr.force.iter().map(|n| &**n).collect::<Vec<_>>(), [A, B]);
        tr.force.clear();
        tr.follow_all(snap);
        assert_eq!(tr.force.iter().map(|n| &**n).collect::<Vec<_>>(), [A]);
    }
}
