//! Incremental (delta) xDS, sans-IO: the state of one proxy's
//! `DeltaAggregatedResources` stream.
//!
//! [`DeltaConnection::handle_request`] takes what the proxy says
//! (subscriptions, wildcard, ACK/NACK, `initial_resource_versions`);
//! [`DeltaConnection::next_response`] says what to send given the newest
//! [`Snapshot`]: only resources whose version differs from what the proxy
//! holds, and `removed_resources` for the ones that disappeared. CDS is
//! always answered before EDS, and every cluster sent makes its
//! ClusterLoadAssignment follow, so Envoy never leaves a cluster warming.
//! A connection that falls behind skips intermediate snapshots: it sends
//! the newest version of each changed resource once.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use crate::ack::{InFlight, Received, Undo, Versions, revert};
use crate::cache::{Catchup, Snapshot};
use crate::codec::{EncodedResponse, delta_response};
use crate::resource::{Resource, TypeUrl};

/// A response ready to send.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) type_url: TypeUrl,
    pub(crate) response: EncodedResponse,
    pub(crate) resources: usize,
    /// The earliest registry event this response delivers (for convergence
    /// time); `None` for initial or resync responses.
    pub(crate) event_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// The proxy has asked for this type.
    active: bool,
    wildcard: bool,
    names: HashSet<Arc<str>>,
    /// What the proxy holds (or has been sent and not rejected).
    known: Versions,
    /// Names to compare on the next response (new subscriptions).
    check: BTreeSet<Arc<str>>,
    /// Names to send even if the proxy has the same version.
    force: BTreeSet<Arc<str>>,
    /// Compare every subscribed and known name (new stream, wildcard).
    full_check: bool,
    /// The snapshot generation this state has caught up with.
    generation: u64,
    in_flight: InFlight,
}

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One delta ADS stream.
#[derive(Debug, Default)]
pub(crate) struct DeltaConnection {
    types: [TypeState; 2],
    nonce: u64,
}

impl DeltaConnection {
    /// Applies one request from the proxy.
    pub(crate) fn handle_request(&mut self, req: DeltaDiscoveryRequest) -> Received {
        let Some(t) = TypeUrl::parse(&req.type_url) else {
            return Received::Ignored(req.type_url);
        };
        let st = &mut self.types[t as usize];
        let mut outcome = Received::Subscription;
        if !req.response_nonce.is_empty() {
            let undo = st.in_flight.take(&req.response_nonce);
            outcome = match req.error_detail {
                Some(status) => {
                    if let Some(undo) = undo {
                        revert(&mut st.known, undo);
                    }
                    Received::Nack {
                        type_name: t.short(),
                        nonce: req.response_nonce,
                        message: status.message,
                    }
                }
                None => Received::Ack,
            };
        }
        if !st.active {
            st.active = true;
            st.full_check = true;
            // A first request that names nothing is a legacy wildcard.
            st.wildcard = req.resource_names_subscribe.is_empty();
            for (name, version) in req.initial_resource_versions {
                st.known.insert(name.into(), version.into());
            }
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                st.wildcard = true;
                st.full_check = true;
            } else {
                let name: Arc<str> = name.into();
                st.names.insert(name.clone());
                st.check.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                st.wildcard = false;
                let names = &st.names;
                st.known.retain(|k, _| names.contains(k));
            } else {
                st.names.remove(name.as_str());
                st.check.remove(name.as_str());
                if !st.wildcard {
                    st.known.remove(name.as_str());
                }
            }
        }
        outcome
    }

    /// The next response to send, CDS before EDS; `None` when the proxy is
    /// up to date with `snap` (or the snapshot is not ready).
    pub(crate) fn next_response(&mut self, snap: &Snapshot) -> Option<Outgoing> {
        if !snap.is_ready() {
            return None;
        }
        for t in TypeUrl::ALL {
            let Some((out, sent)) = self.respond(t, snap) else {
                continue;
            };
            if t == TypeUrl::Cluster {
                // Envoy warms a new or changed EDS cluster until its
                // endpoints arrive: make sure they follow.
                let eds = &mut self.types[TypeUrl::ClusterLoadAssignment as usize];
                for name in sent {
                    if eds.wants(&name) && snap.get(TypeUrl::ClusterLoadAssignment, &name).is_some()
                    {
                        eds.force.insert(name);
                    }
                }
            }
            return Some(out);
        }
        None
    }

    fn respond(&mut self, t: TypeUrl, snap: &Snapshot) -> Option<(Outgoing, Vec<Arc<str>>)> {
        let st = &mut self.types[t as usize];
        if !st.active {
            return None;
        }
        let (catchup, event_at) = snap.changed_since(t, st.generation);
        let everything = st.full_check || matches!(catchup, Catchup::Everything);
        let mut candidates = match catchup {
            Catchup::Names(names) if !everything => names,
            _ => {
                let mut all: BTreeSet<Arc<str>> = st.known.keys().cloned().collect();
                all.extend(st.names.iter().cloned());
                if st.wildcard {
                    all.extend(snap.resources(t).map(|r| r.name.clone()));
                }
                all
            }
        };
        candidates.append(&mut st.check);
        candidates.extend(st.force.iter().cloned());
        st.generation = snap.generation();
        st.full_check = false;

        let mut send: Vec<Arc<Resource>> = Vec::new();
        let mut removed: Vec<Arc<str>> = Vec::new();
        let mut undo: Undo = Vec::new();
        for name in candidates {
            if !st.wants(&name) {
                continue;
            }
            match snap.get(t, &name) {
                Some(r) => {
                    let forced = st.force.contains(&name);
                    if forced || st.known.get(&name) != Some(&r.version) {
                        undo.push((name.clone(), st.known.insert(name, r.version.clone())));
                        send.push(r.clone());
                    }
                }
                None => {
                    if let Some(previous) = st.known.remove(&name) {
                        undo.push((name.clone(), Some(previous)));
                        removed.push(name);
                    }
                }
            }
        }
        st.force.clear();
        if send.is_empty() && removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let response = delta_response(t, &snap.generation().to_string(), &nonce, &send, &removed);
        st.in_flight.push(nonce, undo);
        let out = Outgoing {
            type_url: t,
            response,
            resources: send.len(),
            event_at: if everything { None } else { event_at },
        };
        Some((out, send.into_iter().map(|r| r.name.clone()).collect()))
    }
}

#[cfg(test)]
mod tests;
