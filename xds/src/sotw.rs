//! State-of-the-world xDS, sans-IO: the state of one proxy's
//! `StreamAggregatedResources` stream.
//!
//! CDS responses carry every cluster (the protocol requires the full set)
//! and are sent only when the set's digest changed or the proxy asked
//! anew. EDS responses carry only the subscribed ClusterLoadAssignments that
//! changed since the proxy last got them (Envoy keeps the others), plus the
//! ones of clusters just sent, so no cluster stays warming. Requests with a
//! stale nonce are ignored, as the protocol says, except that a NACK is
//! always counted.

use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc;

use crate::ack::{Received, Sent};
use crate::batch::Batch;
use crate::cache::Snapshot;
use crate::codec::{sotw_response, sotw_response_with};
use crate::delta::{Outgoing, held_resources};
use crate::held::{Held, NameSet, intern};
use crate::resource::{Resource, TypeUrl};
use crate::status::TypeDump;
use crate::tracker::{FullState, Tracker};

/// A `DiscoveryRequest` as this stream decodes it: the resource names stay
/// slices of the received buffer, since every SotW ACK repeats all of them
/// (thousands for EDS) and they are almost always unchanged.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SotwRequest {
    #[prost(string, tag = "1")]
    pub(crate) version_info: String,
    #[prost(message, optional, tag = "2")]
    pub(crate) node: Option<Node>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub(crate) resource_names: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub(crate) type_url: String,
    #[prost(string, tag = "5")]
    pub(crate) response_nonce: String,
    #[prost(message, optional, tag = "6")]
    pub(crate) error_detail: Option<rpc::Status>,
}

/// One type's state on a SotW stream: the shared [`Tracker`] (which it
/// dereferences to; its `names` empty means all, for the full-state types)
/// and what only SotW keeps.
#[derive(Debug)]
struct TypeState {
    tracker: Tracker,
    /// Order-independent digest of `names` as the proxy last sent them.
    names_digest: u64,
    last_nonce: Arc<str>,
    /// Full-state types: the last response's nonce and the snapshot it was
    /// built from; its ACK makes `held` that snapshot's resources (debug
    /// output only).
    cds_pending: Option<(Arc<str>, Arc<Snapshot>)>,
}

impl TypeState {
    fn new(type_url: TypeUrl) -> Self {
        TypeState {
            tracker: Tracker::new(type_url),
            names_digest: 0,
            last_nonce: Arc::from(""),
            cds_pending: None,
        }
    }
}

impl TypeState {
    /// Takes the subscription a request names; returns whether it changed.
    /// Every SotW request repeats the whole set, an ACK's or a NACK's.
    fn take_names(&mut self, names: &[Bytes], snap: &Arc<Snapshot>) -> bool {
        let t = self.type_url;
        // Thousands of names for EDS, nearly always unchanged: recognise
        // that by a digest before building anything. (A 64-bit collision
        // between two different subscriptions of the same size is not a
        // practical risk.)
        let digest = names_digest(names);
        if digest == self.names_digest && names.len() == self.names.len() {
            return false;
        }
        self.names_digest = digest;
        // Names that are not UTF-8 cannot match a resource: dropped.
        let names = NameSet::from_names(
            names
                .iter()
                .filter_map(|n| std::str::from_utf8(n).ok())
                .map(|n| intern(snap, t, n)),
        );
        let changed = self.replace_names(names);
        if changed && t.full_state_in_sotw() {
            self.must_respond = true;
        }
        changed
    }
}

impl TypeState {
    /// A request with a stale nonce (one this stream sent) is otherwise
    /// ignored (a newer response
    /// is on its way, and the proxy's answer to it names the whole
    /// subscription), but the names it lacks tell something that answer
    /// may not: the proxy dropped them since the subscription last taken,
    /// so it holds nothing of them and ignored them in any response that
    /// arrived meanwhile; named again by the time of that answer, the
    /// subscription would look unchanged. They are recorded as not held and
    /// new (sent again if still subscribed at the next catch-up).
    fn dropped_while_stale(&mut self, names: &[Bytes]) {
        if names_digest(names) == self.names_digest && names.len() == self.names.len() {
            return;
        }
        let named: std::collections::HashSet<&[u8]> = names.iter().map(|n| n.as_ref()).collect();
        let gone: Vec<Arc<str>> = self
            .names
            .iter()
            .filter(|n| !named.contains(n.as_bytes()))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        self.tracker.dropped(&gone);
        if self.type_url.full_state_in_sotw() {
            // Its full set is sent again (the digest of the names' versions
            // would not change).
            self.sent_digest = None;
        }
    }
}

crate::tracker::deref_to_tracker!(TypeState);

/// One SotW ADS stream.
#[derive(Debug)]
pub(crate) struct SotwConnection {
    /// Names one type may subscribe to (see [`Limits`](crate::Limits)).
    max_names: usize,
    types: [TypeState; TypeUrl::COUNT],
    /// The rest of an EDS (or RDS) response being sent in chunks.
    batch: Option<Batch>,
    nonce: u64,
}

impl Default for SotwConnection {
    fn default() -> Self {
        SotwConnection {
            max_names: usize::MAX,
            types: TypeUrl::ALL.map(TypeState::new),
            batch: None,
            nonce: 0,
        }
    }
}

impl SotwConnection {
    /// Refuses a request that subscribes one type to more than `max` names.
    pub(crate) fn set_max_names(&mut self, max: usize) {
        self.max_names = max;
    }

    /// Applies one request from the proxy. `snap` is only used to share
    /// name allocations with the snapshot.
    pub(crate) fn handle_request(&mut self, req: SotwRequest, snap: &Arc<Snapshot>) -> Received {
        // LEDS collections are served over delta only (Envoy subscribes to
        // them over delta alone).
        let Some(t) = TypeUrl::parse(&req.type_url).filter(|t| *t != TypeUrl::LbEndpoint) else {
            return Received::Unserved {
                answer: req.response_nonce.is_empty(),
                type_url: req.type_url,
            };
        };
        if req.resource_names.len() > self.max_names {
            return Received::Refused(format!(
                "a subscription to more than {} {} resources",
                self.max_names,
                t.short()
            ));
        }
        let st = &mut self.types[t as usize];
        if let Some(status) = req.error_detail {
            // Nothing is sent again because of a NACK: the rejected content
            // is what we would send, and re-sending it would only be
            // rejected again (go-control-plane and Istio fixed the same
            // loop). The next change of the type is sent as usual.
            let first = match st.take_nacked(&req.response_nonce) {
                Some(sent) => {
                    let probe = sent.probe;
                    if t.full_state_in_sotw() {
                        // The proxy kept its previous clusters, so clusters
                        // changed in the rejected response are not warm
                        // with their new shape: the next CDS response is
                        // followed by every subscribed assignment.
                        st.rejected_full = true;
                    } else {
                        st.rejections.nacked(sent.resources);
                    }
                    !probe
                }
                None => false,
            };
            if *req.response_nonce == *st.last_nonce {
                // A NACK names the whole subscription too: changes the
                // proxy made while the rejected response was on its way
                // came with an older nonce and were ignored as stale, and
                // it sends no other request until the next response.
                st.take_names(&req.resource_names, snap);
            }
            return Received::Nack {
                type_name: t.short(),
                known: crate::delta::sent_nonce(self.nonce, &req.response_nonce),
                nonce: req.response_nonce,
                message: status.message,
                first,
            };
        }
        let initial = req.response_nonce.is_empty();
        st.in_flight.take(&req.response_nonce);
        if let Some((nonce, sent)) = &st.cds_pending
            && **nonce == *req.response_nonce
        {
            st.tracker.held.reset_to(sent);
            st.cds_pending = None;
        }
        if !initial && *req.response_nonce != *st.last_nonce {
            if crate::delta::sent_nonce(self.nonce, &req.response_nonce) {
                st.dropped_while_stale(&req.resource_names);
            }
            return Received::Ignored(format!("stale nonce {}", req.response_nonce));
        }
        st.active = true;
        if initial {
            // A new stream: the proxy holds nothing we know of.
            st.held = Held::new(t);
            st.tracker.sent_digest = None;
            st.names = NameSet::default();
            // Every name it names now is new, so sent whatever it held.
            st.caught_up = NameSet::default();
            st.names_digest = 0;
            st.must_respond = true;
        }
        let changed = st.take_names(&req.resource_names, snap);
        if initial || changed {
            Received::Subscription
        } else {
            Received::Ack
        }
    }

    /// The next response to send, in [`TypeUrl::ALL`] order (CDS before
    /// EDS).
    pub(crate) fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing> {
        if !snap.is_ready() {
            return None;
        }
        if self.batch.is_none() {
            for t in TypeUrl::ALL {
                if t.full_state_in_sotw() {
                    if let Some(out) = self.respond_full(t, snap) {
                        return Some(out);
                    }
                } else if let Some(batch) = self.respond_changed(t, snap) {
                    self.batch = Some(batch);
                    break;
                }
            }
            if self.batch.is_none() {
                self.batch = TypeUrl::ALL
                    .into_iter()
                    .filter(|t| !t.full_state_in_sotw())
                    .find_map(|t| self.probe_changed(t, snap));
            }
        }
        let batch = self.batch.as_mut()?;
        let t = batch.type_url;
        let chunk = batch.next_chunk();
        if batch.is_empty() {
            self.batch = None;
        }
        self.nonce += 1;
        let nonce = crate::codec::number(self.nonce);
        let version = crate::codec::number(snap.generation());
        let response = sotw_response(t, &version, &nonce, &chunk.resources);
        let (count, event_at) = (chunk.resources.len(), chunk.event_at);
        let st = &mut self.types[t as usize];
        st.in_flight.push(
            nonce.clone(),
            Sent {
                undo: chunk.undo,
                resources: chunk.resources,
                probe: chunk.probe,
                dropped: Vec::new(),
            },
        );
        st.last_nonce = nonce.clone();
        Some(Outgoing {
            type_url: t,
            response,
            resources: count,
            event_at,
            nonce,
            version,
        })
    }

    /// A full-state response of `t` (CDS, LDS) if the resources the proxy
    /// subscribed to changed or it asked anew (see
    /// [`Tracker::full_state`]); its followers follow.
    fn respond_full(&mut self, t: TypeUrl, snap: &Arc<Snapshot>) -> Option<Outgoing> {
        let st = &mut self.types[t as usize];
        if !st.active {
            return None;
        }
        let wildcard = st.names.is_empty();
        let FullState {
            digest,
            changed,
            event_at,
        } = st.tracker.full_state(snap)?;
        self.nonce += 1;
        let nonce = crate::codec::number(self.nonce);
        let version: Arc<str> = format!("{digest:016x}").into();
        let (response, count) = if wildcard && t.wildcard() {
            // Wildcard: the full set, encoded once per snapshot and shared.
            let field = snap.sotw_all(t);
            (sotw_response_with(t, &version, &nonce, field), snap.len(t))
        } else if wildcard {
            // A wildcard subscription to a type served by name only (an
            // Envoy sidecar's LDS): the empty set.
            (sotw_response(t, &version, &nonce, []), 0)
        } else {
            let resources: Vec<&Arc<Resource>> =
                st.names.iter().filter_map(|n| snap.get(t, n)).collect();
            let count = resources.len();
            (sotw_response(t, &version, &nonce, resources), count)
        };
        st.in_flight.push(
            nonce.clone(),
            Sent {
                undo: Vec::new(),
                resources: Vec::new(),
                probe: false,
                dropped: Vec::new(),
            },
        );
        st.last_nonce = nonce.clone();
        st.cds_pending = Some((nonce.clone(), snap.clone()));
        if let Some(follower) = t.follower() {
            let eds = &mut self.types[follower as usize];
            match &changed {
                Some(changed) => eds.tracker.follow(changed, false, snap),
                None => eds.tracker.follow_all(snap),
            }
        }
        Some(Outgoing {
            type_url: t,
            response,
            resources: count,
            event_at,
            nonce,
            version,
        })
    }

    /// Per type, how many resources the proxy rejected are still current.
    pub(crate) fn rejected_counts(&self, snap: &Snapshot) -> Vec<(TypeUrl, usize)> {
        crate::ack::rejected_counts(self.types.iter().map(|st| &st.rejections), snap)
    }

    /// What the proxy holds of each type it asked for (CDS: the clusters
    /// of the last response it accepted, of those it subscribed to), with
    /// the resources as `snap` has them where the versions are the same.
    pub(crate) fn dump(&self, snap: &Snapshot) -> Vec<TypeDump> {
        self.types
            .iter()
            .zip(TypeUrl::ALL)
            .filter(|(st, _)| st.active)
            .map(|(st, t)| {
                let mut entries = st.held.entries();
                if !st.names.is_empty() {
                    entries.retain(|(name, _)| st.names.contains(name));
                }
                TypeDump {
                    type_url: t,
                    wildcard: t.full_state_in_sotw() && st.names.is_empty(),
                    subscribed: st.names.len(),
                    resources: held_resources(t, entries, snap),
                    rejected: st.rejections.rejected_now(t, snap),
                }
            })
            .collect()
    }

    /// A response of `t` (EDS, RDS) with the subscribed resources that
    /// changed or must be sent (an empty one answers a proxy that asked
    /// for names that do not exist, rather than leave it waiting).
    fn respond_changed(&mut self, t: TypeUrl, snap: &Arc<Snapshot>) -> Option<Batch> {
        let st = &mut self.types[t as usize];
        if !st.active {
            return None;
        }
        st.tracker.catch_up(snap, false, false, Vec::new(), false)
    }
}

impl SotwConnection {
    /// A resource of `t` (EDS, RDS) of a rejected response, sent again
    /// alone (see `ack::Rejections`), once the proxy is otherwise up to
    /// date.
    fn probe_changed(&mut self, t: TypeUrl, snap: &Arc<Snapshot>) -> Option<Batch> {
        self.types[t as usize].tracker.probe(snap, false)
    }
}

/// XOR of a hash of each name: equal for the same set in any order.
fn names_digest(names: &[Bytes]) -> u64 {
    names
        .iter()
        .fold(0, |acc, n| acc ^ xxhash_rust::xxh3::xxh3_64(n))
}

#[cfg(test)]
mod tests;
