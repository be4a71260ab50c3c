//! Bookkeeping of responses a proxy has not acknowledged yet, so a NACK can
//! restore what the proxy really holds, and of what it rejected, so a
//! rejected resource is not sent again until its content changes.
//!
//! A delta proxy may unsubscribe from a name, and subscribe again, while
//! a response carrying it is on its way; what it holds after that
//! response depends on whether it subscribed again before the response
//! arrived, which its answer tells ([`InFlight::dropped`],
//! [`InFlight::take_acked`]). Simulated Envoys (random subscriptions,
//! pipelined responses, NACKs and reconnects against the sans-IO
//! connections, in `delta/tests.rs` and `sotw/tests.rs`) check that the
//! server ends believing what the proxy holds.
//!
//! # What a NACK tells
//!
//! Envoy rejects a response as a whole when one of its resources is bad:
//! seen with Envoy 1.40 over SotW and delta EDS (`tests/e2e/nacks.rs`),
//! where a valid ClusterLoadAssignment sent beside an invalid one was not
//! applied either. A NACK of a response that carried one resource names the
//! bad resource; a NACK of a larger one only says one of them is bad. So
//! ([`Rejections`]):
//!
//! - a resource rejected alone is known bad: it is not sent again while the
//!   snapshot holds the rejected version (Istio and go-control-plane do the
//!   same: nothing is re-sent until the content changes);
//! - the resources of a larger rejected response are sent again once, one
//!   per response, so the good ones reach the proxy and the bad one is found
//!   (it costs one more NACK, never a loop).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::batch::Batch;
use crate::cache::Snapshot;
use crate::held::Held;
use crate::resource::{Resource, TypeUrl};

/// At most this many unacknowledged responses are remembered per type; an
/// older one is taken as accepted (Envoy acknowledges in order, so only a
/// broken client gets here).
const MAX_IN_FLIGHT: usize = 64;

/// At most this many known-bad resources are remembered per type; past it
/// the oldest is forgotten (and may be sent, and rejected, once more).
const MAX_REJECTED: usize = 1024;

/// What a response changed in a proxy's [`Held`] versions: each name with
/// the version it replaced (`None`: the proxy did not have it). A resource
/// the response carried with no entry here replaced nothing: a first sync
/// records nothing per resource (heaptrack: 6 MB at the peak of 1,000
/// proxies × 1,000 services went to entries that said only that).
pub(crate) type Undo = Vec<(Arc<str>, Option<Arc<str>>)>;

/// One response sent and not yet answered.
#[derive(Debug)]
pub(crate) struct Sent {
    /// How to put back what the proxy held before.
    pub(crate) undo: Undo,
    /// The resources it carried (name and version are what matter).
    pub(crate) resources: Vec<Arc<Resource>>,
    /// A resource of a rejected response sent again alone: its NACK is
    /// counted but not logged again (one log line per proxy and content).
    pub(crate) probe: bool,
    /// Names it carries that the proxy unsubscribed from while it was in
    /// flight (see [`InFlight::dropped`]); empty but for that race.
    pub(crate) dropped: Vec<Arc<str>>,
}

/// Responses sent and not yet ACKed or NACKed.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    entries: VecDeque<(Arc<str>, Sent)>,
}

impl InFlight {
    pub(crate) fn push(&mut self, nonce: Arc<str>, sent: Sent) {
        if self.entries.len() == MAX_IN_FLIGHT {
            self.entries.pop_front();
        }
        self.entries.push_back((nonce, sent));
    }

    /// Forgets the response with `nonce`; returns what it sent if known.
    pub(crate) fn take(&mut self, nonce: &str) -> Option<Sent> {
        let pos = self.entries.iter().position(|(n, _)| **n == *nonce)?;
        self.entries.remove(pos).map(|(_, sent)| sent)
    }

    /// Every name the responses in flight send or remove.
    pub(crate) fn carried(&self) -> impl Iterator<Item = &Arc<str>> {
        self.entries.iter().flat_map(|(_, sent)| {
            sent.undo
                .iter()
                .map(|(name, _)| name)
                .chain(sent.resources.iter().map(|r| &r.name))
        })
    }

    /// The proxy unsubscribed from `names` (and no wildcard covers them)
    /// while these responses were in flight. It dropped what it held of
    /// them, so the first response carrying one replaced nothing; and a
    /// response carrying one applies only if the proxy subscribed again
    /// before it arrived, which is known when it is answered (see
    /// [`InFlight::take_acked`]). Envoy's delta subscription state keeps a
    /// resource of a response only if it is subscribed to it when the
    /// response arrives; it acknowledges in order, after the subscription
    /// changes it made before, so the server sees them in that order.
    pub(crate) fn dropped(&mut self, names: &[Arc<str>]) {
        if self.entries.is_empty() || names.is_empty() {
            return;
        }
        let names: std::collections::HashSet<&str> = names.iter().map(|n| &**n).collect();
        for (_, sent) in &mut self.entries {
            let before = sent.dropped.len();
            for (name, previous) in &mut sent.undo {
                if names.contains(&**name) {
                    *previous = None;
                    sent.dropped.push(name.clone());
                }
            }
            for r in &sent.resources {
                if names.contains(&*r.name) {
                    sent.dropped.push(r.name.clone());
                }
            }
            if sent.dropped.len() > before {
                sent.dropped.sort_unstable();
                sent.dropped.dedup();
            }
        }
    }

    /// Forgets the accepted response `nonce`; returns what it sent if
    /// known. Of the names the proxy unsubscribed from while it was in
    /// flight ([`InFlight::dropped`]), the proxy now holds what it carried
    /// if `wants` the name again (it subscribed again before the response
    /// arrived), or nothing: the next response in flight carrying the name
    /// replaced that, or else `held` says so and the name goes to `recheck`
    /// (a catch-up since may have found nothing to send for it).
    pub(crate) fn take_acked(
        &mut self,
        nonce: &str,
        held: &mut Held,
        wants: impl Fn(&str) -> bool,
        recheck: &mut Vec<Arc<str>>,
    ) -> Option<Sent> {
        let pos = self.entries.iter().position(|(n, _)| **n == *nonce)?;
        let (_, sent) = self.entries.remove(pos)?;
        for name in &sent.dropped {
            let holds = match wants(name) {
                true => sent
                    .resources
                    .iter()
                    .find(|r| r.name == *name)
                    .map(|r| r.version.clone()),
                false => None,
            };
            let mut replaced = false;
            for (_, later) in self.entries.iter_mut().skip(pos) {
                if let Some((_, previous)) = later.undo.iter_mut().find(|(n, _)| n == name) {
                    *previous = holds.clone();
                    replaced = true;
                } else if later.resources.iter().any(|r| r.name == *name) {
                    later.undo.push((name.clone(), holds.clone()));
                    replaced = true;
                }
                if replaced {
                    break;
                }
            }
            if !replaced {
                held.set(name.clone(), holds);
                recheck.push(name.clone());
            }
        }
        Some(sent)
    }

    /// Forgets the rejected response with `nonce` and puts back in `held`
    /// the versions it replaced; returns what it sent if known (its undo
    /// list consumed).
    ///
    /// A name that a later response still in flight sent again is not put
    /// back: the proxy holds that later version if it accepts it. Instead
    /// the later response's undo takes this one's previous version, which
    /// is what the proxy holds if it rejects the later one too. (Putting it
    /// back at once made the server believe the proxy held an older
    /// version than the one it was about to accept.)
    ///
    /// The names it removed go to `retry` when it also carried resources
    /// (and those it carried that the proxy unsubscribed from while it was
    /// in flight, to be compared again):
    /// Envoy rejects a response as a whole, so the removals were refused
    /// for a resource beside them, and the proxy still holds those names
    /// (nothing else would remove them: the snapshot will not change them
    /// again). A rejected response of removals alone is not retried (no
    /// loop with a proxy that refuses them).
    pub(crate) fn take_nacked(
        &mut self,
        nonce: &str,
        held: &mut Held,
        retry: &mut Vec<Arc<str>>,
    ) -> Option<Sent> {
        let pos = self.entries.iter().position(|(n, _)| **n == *nonce)?;
        let (_, mut sent) = self.entries.remove(pos)?;
        if !sent.resources.is_empty() {
            let carried: std::collections::HashSet<&str> =
                sent.resources.iter().map(|r| &*r.name).collect();
            retry.extend(
                sent.undo
                    .iter()
                    .filter(|(name, _)| !carried.contains(&**name))
                    .map(|(name, _)| name.clone()),
            );
        }
        let mut previous: std::collections::HashMap<Arc<str>, Option<Arc<str>>> =
            std::mem::take(&mut sent.undo).into_iter().collect();
        for r in &sent.resources {
            previous.entry(r.name.clone()).or_insert(None);
        }
        for (_, later) in self.entries.iter_mut().skip(pos) {
            for (name, prev) in &mut later.undo {
                if let Some(p) = previous.remove(name) {
                    *prev = p;
                }
            }
            // A later resource with no entry replaced nothing: it did
            // replace this one's removal, so it now replaces what this
            // one's removal did.
            for r in &later.resources {
                if let Some(p) = previous.remove(&r.name) {
                    later.undo.push((r.name.clone(), p));
                }
            }
        }
        for (name, p) in previous {
            if sent.dropped.contains(&name) {
                // Unsubscribed while in flight (see `InFlight::dropped`):
                // a catch-up since took the proxy to hold nothing of it,
                // and may have found nothing to send.
                retry.push(name.clone());
            }
            held.set(name, p);
        }
        Some(sent)
    }
}

/// How [`offer`] treats a resource.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offer {
    /// Sent even if the proxy holds that version.
    pub(crate) forced: bool,
    /// The proxy holds nothing of it unless `Held` recorded a version for
    /// the name itself (a name it subscribed to since the last catch-up:
    /// the snapshot base does not describe it, but a response that arrived
    /// after it subscribed again does; see [`InFlight::take_acked`]).
    pub(crate) unheld: bool,
}

/// Queues `r` in `batch` unless the proxy holds that version already (and
/// it is not forced), or rejected that very version (then what it holds
/// is pinned, so a later rebase does not pretend it took it). Shared by
/// the delta and SotW connections.
pub(crate) fn offer(
    batch: &mut Batch,
    held: &mut Held,
    rejections: &mut Rejections,
    r: &Arc<Resource>,
    how: Offer,
    snap: &Arc<Snapshot>,
) {
    let holds = match how.unheld {
        true => held.recorded(&r.name),
        false => held.version_in(snap, r),
    };
    if holds == Some(&r.version) && !how.forced {
        return;
    }
    let holds = holds.cloned();
    if rejections.blocks(r) {
        // Rejected as it is: the proxy keeps what it has.
        held.set(r.name.clone(), holds);
        return;
    }
    held.forget(&r.name);
    batch.send(r.clone(), holds);
}

/// The next resource of a rejected response to send again alone, as a
/// one-resource batch (see [`Rejections`]); `wants` says whether the proxy
/// still subscribes to a name.
pub(crate) fn probe(
    t: TypeUrl,
    rejections: &mut Rejections,
    held: &mut Held,
    snap: &Snapshot,
    wants: impl Fn(&str) -> bool,
) -> Option<Batch> {
    let r =
        rejections.next_probe(|name| wants(name).then(|| snap.get(t, name).cloned()).flatten())?;
    let previous = held.set(r.name.clone(), Some(r.version.clone()));
    let mut batch = Batch::new(t, None);
    batch.probe = true;
    batch.send(r, previous);
    Some(batch)
}

/// What one proxy rejected, per type (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    /// Resources rejected alone: name and the rejected version.
    known: VecDeque<(Arc<str>, Arc<str>)>,
    /// Resources of a rejected larger response, to send again one by one.
    probes: VecDeque<Arc<Resource>>,
}

impl Rejections {
    /// Records a NACK of `sent`.
    pub(crate) fn nacked(&mut self, sent: Vec<Arc<Resource>>) {
        match <[Arc<Resource>; 1]>::try_from(sent) {
            Ok([one]) => {
                self.known.retain(|(n, _)| *n != one.name);
                if self.known.len() == MAX_REJECTED {
                    self.known.pop_front();
                }
                self.known
                    .push_back((one.name.clone(), one.version.clone()));
            }
            Err(many) => {
                // A bound: a proxy cannot be probed for more than it was
                // sent in the responses it may have in flight. A name
                // already waiting takes the version just rejected (the
                // older one would be skipped as no longer current, and
                // the newer never tried).
                for r in many {
                    match self.probes.iter_mut().find(|p| p.name == r.name) {
                        Some(p) => *p = r,
                        None => self.probes.push_back(r),
                    }
                }
            }
        }
    }

    /// Whether `r` is known bad and must not be sent. A newer version of a
    /// known-bad name is no longer blocked.
    pub(crate) fn blocks(&mut self, r: &Resource) -> bool {
        match self.known.iter().position(|(n, _)| *n == r.name) {
            Some(i) if self.known[i].1 == r.version => true,
            Some(i) => {
                self.known.remove(i);
                false
            }
            None => false,
        }
    }

    /// The next resource to send alone: a probe whose version is still
    /// `current(name)`'s (a changed one goes out the ordinary way).
    pub(crate) fn next_probe(
        &mut self,
        mut current: impl FnMut(&str) -> Option<Arc<Resource>>,
    ) -> Option<Arc<Resource>> {
        while let Some(p) = self.probes.pop_front() {
            if let Some(r) = current(&p.name)
                && r.version == p.version
            {
                return Some(r);
            }
        }
        None
    }

    /// The resources rejected alone whose rejected version is still the
    /// one `snap` has of type `t`: name and that version.
    pub(crate) fn rejected_now(&self, t: TypeUrl, snap: &Snapshot) -> Vec<(Arc<str>, Arc<str>)> {
        self.current(t, snap).cloned().collect()
    }

    /// The entries of [`Rejections::rejected_now`], without copying them.
    fn current<'a>(
        &'a self,
        t: TypeUrl,
        snap: &'a Snapshot,
    ) -> impl Iterator<Item = &'a (Arc<str>, Arc<str>)> + 'a {
        self.known
            .iter()
            .filter(move |(name, version)| snap.get(t, name).is_some_and(|r| r.version == *version))
    }

    /// Forgets `name` (unsubscribed).
    pub(crate) fn forget(&mut self, name: &str) {
        self.forget_all(|n| n == name);
    }

    /// Forgets every name `gone` says (unsubscribed).
    pub(crate) fn forget_all(&mut self, gone: impl Fn(&str) -> bool) {
        self.known.retain(|(n, _)| !gone(n));
        self.probes.retain(|p| !gone(&p.name));
    }
}

/// Per type (in [`TypeUrl::ALL`] order, one [`Rejections`] each), how many
/// resources the proxy rejected are still current in `snap`.
pub(crate) fn rejected_counts<'a>(
    per_type: impl Iterator<Item = &'a Rejections>,
    snap: &Snapshot,
) -> Vec<(TypeUrl, usize)> {
    per_type
        .zip(TypeUrl::ALL)
        // Counted without collecting: this runs on every ACK and NACK.
        .map(|(r, t)| (t, r.current(t, snap).count()))
        .collect()
}

/// The outcome of one request, for logs and metrics.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// The proxy accepted a response.
    Ack,
    /// The proxy rejected a response; it keeps its previous version.
    Nack {
        /// The type URL's short name.
        type_name: &'static str,
        /// The nonce of the rejected response.
        nonce: String,
        /// The proxy's error message.
        message: String,
        /// Whether to log it: the first NACK of a response that was not a
        /// resource re-sent alone after a rejected batch. A proxy that
        /// repeats a NACK, names a response it was never sent, or rejects
        /// the probe of a resource it already rejected is counted each
        /// time but logged once.
        first: bool,
        /// Whether the nonce names a response this stream sent: a NACK of
        /// one it never sent (invented by the client) is neither counted
        /// nor logged.
        known: bool,
    },
    /// A new stream, a subscription change, or a request needing a response.
    Subscription,
    /// A request for a type this server does not generate (a standard
    /// sidecar bootstrap asks for LDS, others for SDS or RTDS). `answer`
    /// when it asks anew (no response nonce): it gets an empty response,
    /// so the proxy does not wait for its init-fetch timeout (15 s in
    /// Envoy) on it; its ACKs of that response are not answered.
    Unserved {
        /// The type URL as the proxy sent it.
        type_url: String,
        /// Whether to answer (the request names no response nonce).
        answer: bool,
    },
    /// A stale request, or one that cannot be read.
    Ignored(String),
    /// The request passes a limit (subscribed names): the stream must end
    /// with `RESOURCE_EXHAUSTED` and this message.
    Refused(String),
}
