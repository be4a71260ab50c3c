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

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use crate::ack::{InFlight, Received, Undo, Versions, revert};
use crate::cache::{Catchup, Snapshot};
use crate::codec::sotw_response;
use crate::delta::Outgoing;
use crate::resource::{Resource, TypeUrl};

#[derive(Debug, Default)]
struct TypeState {
    active: bool,
    /// Subscribed names; empty means all (wildcard), for CDS.
    names: BTreeSet<Arc<str>>,
    last_nonce: String,
    /// The proxy asked and must get an answer even if nothing changed.
    must_respond: bool,
    /// What was sent (EDS: per name; CDS: under the empty name, the digest).
    sent: Versions,
    check: BTreeSet<Arc<str>>,
    force: BTreeSet<Arc<str>>,
    generation: u64,
    in_flight: InFlight,
}

/// One SotW ADS stream.
#[derive(Debug, Default)]
pub(crate) struct SotwConnection {
    types: [TypeState; 2],
    nonce: u64,
}

const CDS_DIGEST_KEY: &str = "";

impl SotwConnection {
    /// Applies one request from the proxy.
    pub(crate) fn handle_request(&mut self, req: DiscoveryRequest) -> Received {
        let Some(t) = TypeUrl::parse(&req.type_url) else {
            return Received::Ignored(req.type_url);
        };
        let st = &mut self.types[t as usize];
        if let Some(status) = req.error_detail {
            if let Some(undo) = st.in_flight.take(&req.response_nonce) {
                revert(&mut st.sent, undo);
            }
            return Received::Nack {
                type_name: t.short(),
                nonce: req.response_nonce,
                message: status.message,
            };
        }
        let initial = req.response_nonce.is_empty();
        if !initial && req.response_nonce != st.last_nonce {
            st.in_flight.take(&req.response_nonce);
            return Received::Ignored(format!("stale nonce {}", req.response_nonce));
        }
        st.in_flight.take(&req.response_nonce);
        st.active = true;
        let names: BTreeSet<Arc<str>> = req.resource_names.into_iter().map(Arc::from).collect();
        let changed = names != st.names;
        if changed {
            st.sent
                .retain(|k, _| k.as_ref() == CDS_DIGEST_KEY || names.contains(k));
            st.check.extend(names.difference(&st.names).cloned());
            st.names = names;
        }
        if initial {
            // A new stream (or a re-request after a restart of the
            // subscription): the proxy holds nothing we know of.
            st.sent.clear();
            st.check.extend(st.names.iter().cloned());
        }
        if initial || (changed && t == TypeUrl::Cluster) {
            st.must_respond = true;
        }
        if initial || changed {
            Received::Subscription
        } else {
            Received::Ack
        }
    }

    /// The next response to send, CDS before EDS.
    pub(crate) fn next_response(&mut self, snap: &Snapshot) -> Option<Outgoing> {
        if !snap.is_ready() {
            return None;
        }
        if let Some((out, sent)) = self.respond_clusters(snap) {
            let eds = &mut self.types[TypeUrl::ClusterLoadAssignment as usize];
            for name in sent {
                if eds.names.contains(&name) {
                    eds.force.insert(name);
                }
            }
            return Some(out);
        }
        self.respond_assignments(snap)
    }

    fn respond_clusters(&mut self, snap: &Snapshot) -> Option<(Outgoing, Vec<Arc<str>>)> {
        let t = TypeUrl::Cluster;
        let st = &mut self.types[t as usize];
        if !st.active {
            return None;
        }
        let digest: Arc<str> = format!("{:016x}", snap.digest(t)).into();
        let unchanged = st.sent.get(CDS_DIGEST_KEY) == Some(&digest);
        if unchanged && !st.must_respond {
            st.generation = snap.generation();
            return None;
        }
        // Clusters that changed since the last response: their endpoints
        // must follow. After a resync, all of them.
        let (catchup, event_at) = snap.changed_since(t, st.generation);
        let resources: Vec<&Arc<Resource>> = if st.names.is_empty() {
            snap.resources(t).collect()
        } else {
            st.names.iter().filter_map(|n| snap.get(t, n)).collect()
        };
        let changed: Vec<Arc<str>> = match (&catchup, st.sent.is_empty()) {
            (Catchup::Names(names), false) => names.iter().cloned().collect(),
            _ => resources.iter().map(|r| r.name.clone()).collect(),
        };
        let resync = st.sent.is_empty() || matches!(catchup, Catchup::Everything);
        st.generation = snap.generation();
        st.must_respond = false;
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let response = sotw_response(t, &digest, &nonce, resources.iter().copied());
        let undo: Undo = vec![(
            Arc::from(CDS_DIGEST_KEY),
            st.sent.insert(Arc::from(CDS_DIGEST_KEY), digest),
        )];
        st.in_flight.push(nonce.clone(), undo);
        st.last_nonce = nonce;
        let out = Outgoing {
            type_url: t,
            response,
            resources: resources.len(),
            event_at: if resync { None } else { event_at },
        };
        Some((out, changed))
    }

    fn respond_assignments(&mut self, snap: &Snapshot) -> Option<Outgoing> {
        let t = TypeUrl::ClusterLoadAssignment;
        let st = &mut self.types[t as usize];
        if !st.active {
            return None;
        }
        let (catchup, event_at) = snap.changed_since(t, st.generation);
        let resync = matches!(catchup, Catchup::Everything);
        let mut candidates = match catchup {
            Catchup::Names(names) => names,
            Catchup::Everything => st.names.clone(),
        };
        candidates.append(&mut st.check);
        candidates.extend(st.force.iter().cloned());
        st.generation = snap.generation();
        let mut send: Vec<Arc<Resource>> = Vec::new();
        let mut undo: Undo = Vec::new();
        for name in candidates {
            if !st.names.contains(&name) {
                continue;
            }
            if let Some(r) = snap.get(t, &name)
                && (st.force.contains(&name) || st.sent.get(&name) != Some(&r.version))
            {
                undo.push((name.clone(), st.sent.insert(name, r.version.clone())));
                send.push(r.clone());
            }
        }
        st.force.clear();
        if send.is_empty() && !st.must_respond {
            return None;
        }
        st.must_respond = false;
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let response = sotw_response(t, &snap.generation().to_string(), &nonce, &send);
        st.in_flight.push(nonce.clone(), undo);
        st.last_nonce = nonce;
        Some(Outgoing {
            type_url: t,
            response,
            resources: send.len(),
            event_at: if resync { None } else { event_at },
        })
    }
}

#[cfg(test)]
mod tests;
