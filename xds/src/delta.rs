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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::google::rpc;
use prost::Message;

use crate::ack::{Received, Sent};
use crate::batch::Batch;
use crate::cache::Snapshot;
use crate::codec::{EncodedResponse, delta_response};
use crate::held::intern;
use crate::resource::TypeUrl;
use crate::status::{HeldResource, TypeDump};
use crate::tracker::Tracker;

/// A `DeltaDiscoveryRequest` as the stream decodes it: names and initial
/// versions stay slices of the received buffer. A reconnecting proxy sends
/// a version for every resource it holds (tens of thousands at scale), and
/// most of them only need comparing, not keeping.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DeltaRequest {
    #[prost(message, optional, tag = "1")]
    pub(crate) node: Option<Node>,
    #[prost(string, tag = "2")]
    pub(crate) type_url: String,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub(crate) resource_names_subscribe: Vec<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub(crate) resource_names_unsubscribe: Vec<Bytes>,
    /// The `map<string, string>`, read as its wire form: repeated entries.
    #[prost(message, repeated, tag = "5")]
    pub(crate) initial_resource_versions: Vec<VersionEntry>,
    #[prost(string, tag = "6")]
    pub(crate) response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub(crate) error_detail: Option<rpc::Status>,
}

/// One `initial_resource_versions` entry.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct VersionEntry {
    #[prost(bytes = "bytes", tag = "1")]
    pub(crate) key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub(crate) value: Bytes,
}

/// Names that are not UTF-8 cannot name a resource: dropped.
fn utf8(b: &Bytes) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// A response ready to send.
#[derive(Debug)]
pub struct Outgoing {
    /// The type of the resources it carries.
    pub type_url: TypeUrl,
    /// The encoded message.
    pub response: EncodedResponse,
    /// How many resources it carries.
    pub resources: usize,
    /// The earliest registry event this response delivers (for convergence
    /// time); `None` for initial or resync responses.
    pub event_at: Option<Instant>,
    /// Its nonce.
    pub nonce: Arc<str>,
    /// Its `version_info` (SotW) or `system_version_info` (delta).
    pub version: Arc<str>,
}

/// One type's state on a delta stream: the shared [`Tracker`] (which it
/// dereferences to) and what only delta keeps.
#[derive(Debug)]
struct TypeState {
    tracker: Tracker,
    /// The proxy subscribed to every resource (`*`, or a first request
    /// naming nothing).
    wildcard: bool,
    /// Whether a wildcard subscription gets this type's resources
    /// ([`TypeUrl::wildcard`]).
    serves_wildcard: bool,
    /// Names to compare on the next response (any order, duplicates).
    check: Vec<Arc<str>>,
    /// Compare every subscribed and held name (new stream, wildcard).
    full_check: bool,
}

impl TypeState {
    fn new(type_url: TypeUrl) -> Self {
        TypeState {
            tracker: Tracker::new(type_url),
            wildcard: false,
            serves_wildcard: type_url.wildcard(),
            check: Vec::new(),
            full_check: false,
        }
    }

    /// Whether a wildcard subscription applies to this type.
    fn all(&self) -> bool {
        self.wildcard && self.serves_wildcard
    }
}

crate::tracker::deref_to_tracker!(TypeState);

/// The state of one delta ADS stream, without I/O: feed it the proxy's
/// requests with [`DeltaConnection::handle_request`] and send what
/// [`DeltaConnection::next_response`] returns. Public for tools and
/// benchmarks that drive the protocol without a network.
#[derive(Debug)]
pub struct DeltaConnection {
    /// Names one type may subscribe to (see [`Limits`](crate::Limits)).
    max_names: usize,
    types: [TypeState; TypeUrl::COUNT],
    /// The rest of a response being sent in chunks.
    batch: Option<Batch>,
    nonce: u64,
    /// The proxy takes LEDS: its EDS subscription reads the snapshot's
    /// [`TypeUrl::LedsClusterLoadAssignment`] table.
    leds: bool,
    /// LEDS assignments a reconnecting proxy held, to send as plain EDS
    /// before their LEDS form (see [`DeltaConnection::reset_leds`]).
    leds_reset: Vec<Arc<str>>,
    /// Collections a reconnecting proxy named (see `reset_leds`).
    leds_reset_globs: Vec<String>,
    /// The LEDS-form assignments this stream sent: a collection of
    /// another one, named in a first LEDS request, was learnt on an
    /// earlier stream.
    leds_sent: std::collections::HashSet<Arc<str>>,
    /// This stream sent a CDS response: an EDS subscription before it
    /// comes from a reconnecting proxy.
    cds_sent: bool,
}

impl Default for DeltaConnection {
    fn default() -> Self {
        DeltaConnection {
            max_names: usize::MAX,
            types: TypeUrl::ALL.map(TypeState::new),
            batch: None,
            nonce: 0,
            leds: false,
            leds_reset: Vec::new(),
            leds_reset_globs: Vec::new(),
            leds_sent: Default::default(),
            cds_sent: false,
        }
    }
}

impl DeltaConnection {
    /// Applies one request from the proxy, against the stream's current
    /// snapshot `snap`.
    pub fn handle_request(&mut self, req: DeltaDiscoveryRequest, snap: &Arc<Snapshot>) -> Received {
        // The server decodes into the borrowing form directly; tools and
        // tests hand over Envoy's message.
        match DeltaRequest::decode(req.encode_to_vec().as_slice()) {
            Ok(req) => self.handle_decoded(req, snap),
            Err(e) => Received::Ignored(format!("unreadable request: {e}")),
        }
    }

    /// Refuses a request that makes one type's subscription larger than
    /// `max` names.
    pub fn set_max_names(&mut self, max: usize) {
        self.max_names = max;
    }

    /// Serves the proxy large assignments through LEDS (see `leds`) when
    /// `on` ([`Proxy::leds`](crate::Proxy)); set before its first EDS
    /// request.
    pub fn set_leds(&mut self, on: bool) {
        self.leds = on;
    }

    /// The snapshot table that serves requests of wire type `t`.
    fn table(&self, t: TypeUrl) -> TypeUrl {
        match t {
            TypeUrl::ClusterLoadAssignment if self.leds => TypeUrl::LedsClusterLoadAssignment,
            t => t,
        }
    }

    /// Applies one request, as the stream decoded it.
    pub(crate) fn handle_decoded(
        &mut self,
        mut req: DeltaRequest,
        snap: &Arc<Snapshot>,
    ) -> Received {
        let Some(t) = TypeUrl::parse(&req.type_url) else {
            return Received::Unserved {
                answer: req.response_nonce.is_empty(),
                type_url: req.type_url,
            };
        };
        let t = self.table(t);
        let max_names = self.max_names;
        let st = &mut self.types[t as usize];
        if st
            .names
            .len()
            .saturating_add(req.resource_names_subscribe.len())
            > max_names
        {
            return Received::Refused(format!(
                "a subscription to more than {max_names} {} resources",
                t.short()
            ));
        }
        let mut outcome = Received::Subscription;
        if !req.response_nonce.is_empty() {
            let sent = match req.error_detail {
                Some(_) => st.take_nacked(&req.response_nonce),
                None => {
                    let all = st.all();
                    let subscribing = &req.resource_names_subscribe;
                    st.take_acked(&req.response_nonce, all, |name| {
                        subscribing.iter().any(|n| n.as_ref() == name.as_bytes())
                    })
                }
            };
            outcome = match req.error_detail {
                Some(status) => {
                    let first = sent.as_ref().is_some_and(|s| !s.probe);
                    if let Some(sent) = sent {
                        st.rejections.nacked(sent.resources);
                    }
                    Received::Nack {
                        type_name: t.short(),
                        known: sent_nonce(self.nonce, &req.response_nonce),
                        nonce: req.response_nonce,
                        message: status.message,
                        first,
                    }
                }
                None => Received::Ack,
            };
        }
        let first = !st.active;
        let entries = std::mem::take(&mut req.initial_resource_versions);
        let initial: HashMap<&str, &str> = entries
            .iter()
            .filter_map(|e| Some((utf8(&e.key)?, utf8(&e.value)?)))
            .collect();
        // Whether what the proxy holds is described relative to `snap`.
        let mut based = false;
        if first {
            st.active = true;
            st.must_respond = !st.serves_wildcard;
            // A first request that names nothing is a legacy wildcard.
            st.wildcard = req.resource_names_subscribe.is_empty()
                || req
                    .resource_names_subscribe
                    .iter()
                    .any(|n| n.as_ref() == b"*");
            if t == TypeUrl::LedsClusterLoadAssignment && (!initial.is_empty() || !self.cds_sent) {
                // A reconnecting proxy (it names what it holds, or asks for
                // assignments before any cluster was sent on this stream):
                // reset its LEDS assignments (see `reset_leds`; which of
                // them are LEDS is known once the snapshot is ready).
                self.leds_reset.extend(
                    req.resource_names_subscribe
                        .iter()
                        .filter_map(utf8)
                        .map(|n| intern(snap, t, n)),
                );
            }
            if t == TypeUrl::LbEndpoint {
                // Collections named in a stream's first LEDS request before
                // the stream sent their assignment: a reconnecting Envoy,
                // which re-subscribes to them without its members'
                // versions. Their assignments are reset too.
                self.leds_reset_globs.extend(
                    req.resource_names_subscribe
                        .iter()
                        .filter_map(utf8)
                        .filter_map(crate::leds::glob_prefix)
                        .map(str::to_string),
                );
            }
            let all = st.all();
            match st.tracker.resume(snap, &initial, all) {
                Some(check) => {
                    based = true;
                    st.check.extend(check);
                }
                None => st.full_check = true,
            }
        }
        let mut subscribed = Vec::new();
        for name in req.resource_names_subscribe.iter().filter_map(utf8) {
            if name == "*" {
                if !st.wildcard {
                    st.wildcard = true;
                    st.full_check = true;
                }
                continue;
            }
            let name = intern(snap, t, name);
            if first
                && based
                && let Some(prefix) = crate::leds::glob_prefix(&name)
            {
                // A glob collection on reconnect: its members the proxy
                // did not name are not held (the snapshot base says so).
                for r in snap.with_prefix(t, prefix) {
                    if !initial.contains_key(&*r.name) {
                        st.force.push(r.name.clone());
                    }
                }
                st.check.push(name.clone());
            } else if first && (!based || initial.contains_key(&*name)) {
                // Compare with what the proxy says it holds.
                st.check.push(name.clone());
            } else if first || st.names.contains(&name) {
                if first && based {
                    // A reconnecting proxy names the versions it holds; it
                    // named none for this one, so it holds none (the base
                    // snapshot must not say otherwise, or a NACK would
                    // "restore" a version it never had).
                    st.held.set(name.clone(), None);
                }
                // A proxy subscribes to what it does not hold (anymore): it
                // gets the resource whatever its version. (A name new to
                // the subscription after the first request is forced as
                // `names` less `caught_up`, with no per-stream list: a
                // first sync subscribes to every cluster's assignment.)
                st.force.push(name.clone());
            }
            subscribed.push(name);
        }
        st.names.extend(subscribed);
        if first {
            // The first request's names are forced or compared above.
            st.caught_up = st.names.clone();
        }
        let mut gone = Vec::new();
        // The wildcard first: names dropped with it are then dropped from
        // the named subscription alone (the same outcome in any order).
        if req
            .resource_names_unsubscribe
            .iter()
            .any(|n| n.as_ref() == b"*")
        {
            st.wildcard = false;
            st.keep_named_only(&mut gone);
        }
        let dropped: Vec<Arc<str>> = req
            .resource_names_unsubscribe
            .iter()
            .filter_map(utf8)
            .filter(|n| *n != "*")
            .map(|n| intern(snap, t, n))
            .collect();
        if !dropped.is_empty() {
            let set: std::collections::HashSet<&str> = dropped.iter().map(|n| &**n).collect();
            st.check.retain(|n| !set.contains(&**n));
            let still_wanted = st.all();
            st.unsubscribe(&dropped, still_wanted, &mut gone);
        }
        // What the proxy dropped is neither held after the responses in
        // flight nor sent by the rest of a batch.
        st.in_flight.dropped(&gone);
        if let Some(batch) = self.batch.as_mut().filter(|b| b.type_url == t) {
            batch.forget(&gone);
            if batch.is_empty() {
                self.batch = None;
            }
        }
        outcome
    }

    /// The next response to send, CDS before EDS; `None` when the proxy is
    /// up to date with `snap` (or the snapshot is not ready).
    pub fn next_response(&mut self, snap: &Arc<Snapshot>) -> Option<Outgoing> {
        if !snap.is_ready() {
            return None;
        }
        if self.batch.is_none() {
            self.batch = self
                .reset_leds(snap)
                .or_else(|| TypeUrl::ALL.into_iter().find_map(|t| self.respond(t, snap)))
                .or_else(|| TypeUrl::ALL.into_iter().find_map(|t| self.probe(t, snap)));
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
        let response = delta_response(t.wire(), &version, &nonce, &chunk.resources, &chunk.removed);
        let (count, event_at) = (chunk.resources.len(), chunk.event_at);
        self.cds_sent |= t == TypeUrl::Cluster;
        if t == TypeUrl::LedsClusterLoadAssignment {
            for r in &chunk.resources {
                let plain = snap.get(TypeUrl::ClusterLoadAssignment, &r.name);
                if plain.map(|p| &p.version) != Some(&r.version) {
                    self.leds_sent.insert(r.name.clone());
                }
            }
        }
        self.types[t as usize].in_flight.push(
            nonce.clone(),
            Sent {
                undo: chunk.undo,
                resources: chunk.resources,
                probe: chunk.probe,
                dropped: Vec::new(),
            },
        );
        Some(Outgoing {
            type_url: t.wire(),
            response,
            resources: count,
            event_at,
            nonce,
            version,
        })
    }

    /// What the proxy holds of each type it asked for, with the resources
    /// as `snap` has them where the versions are the same.
    pub(crate) fn dump(&self, snap: &Snapshot) -> Vec<TypeDump> {
        self.types
            .iter()
            .zip(TypeUrl::ALL)
            .filter(|(st, _)| st.active)
            .map(|(st, t)| {
                // What it holds is kept relative to a snapshot, which also
                // has what a named subscription does not cover: only what
                // it wants was sent.
                let all = st.all();
                let mut entries = st.held.entries();
                entries.retain(|(name, _)| st.tracker.wants(name, all));
                TypeDump {
                    type_url: t.wire(),
                    wildcard: st.wildcard,
                    subscribed: st.names.len(),
                    resources: held_resources(t, entries, snap),
                    rejected: st.rejections.rejected_now(t, snap),
                }
            })
            .collect()
    }

    /// Per type, how many resources the proxy rejected are still current.
    pub(crate) fn rejected_counts(&self, snap: &Snapshot) -> Vec<(TypeUrl, usize)> {
        let mut counts =
            crate::ack::rejected_counts(self.types.iter().map(|st| &st.rejections), snap);
        // The EDS table the stream does not use has nothing to say.
        let unused = match self.leds {
            true => TypeUrl::ClusterLoadAssignment,
            false => TypeUrl::LedsClusterLoadAssignment,
        };
        counts.retain(|(t, _)| *t != unused);
        for (t, _) in &mut counts {
            *t = t.wire();
        }
        counts
    }

    /// Computes everything `t` needs to catch up with `snap`, and updates
    /// what the proxy holds as if it were sent.
    fn respond(&mut self, t: TypeUrl, snap: &Arc<Snapshot>) -> Option<Batch> {
        let st = &mut self.types[t as usize];
        if !st.active {
            return None;
        }
        let (all, full) = (st.all(), std::mem::take(&mut st.full_check));
        let check = std::mem::take(&mut st.check);
        let batch = st.tracker.catch_up(snap, all, full, check, true)?;
        self.follow_clusters(&batch, snap);
        Some(batch)
    }

    /// A resource of a rejected response, sent again alone (see
    /// `ack::Rejections`), once the proxy is otherwise up to date.
    fn probe(&mut self, t: TypeUrl, snap: &Arc<Snapshot>) -> Option<Batch> {
        let st = &mut self.types[t as usize];
        let all = st.all();
        let batch = st.tracker.probe(snap, all)?;
        self.follow_clusters(&batch, snap);
        Some(batch)
    }

    /// Envoy warms a new or changed EDS cluster until its endpoints
    /// arrive: make sure they follow the clusters in `batch` (see
    /// [`TypeUrl::follower`]). With LEDS, the members of its collections
    /// too: the new cluster subscribes to collections Envoy is already
    /// subscribed to, so Envoy asks for nothing and would wait for them
    /// until its initial fetch timeout, then serve no endpoint.
    fn follow_clusters(&mut self, batch: &Batch, snap: &Arc<Snapshot>) {
        if let Some(follower) = batch.type_url.follower() {
            let follower = self.table(follower);
            let eds = &mut self.types[follower as usize];
            let all = eds.all();
            eds.tracker
                .follow(batch.sends.iter().map(|r| &r.name), all, snap);
            if self.leds {
                let leds = &mut self.types[TypeUrl::LbEndpoint as usize];
                for r in &batch.sends {
                    let prefix = crate::leds::cluster_prefix(&r.name);
                    let globs: Vec<Arc<str>> = leds
                        .names
                        .iter()
                        .filter(|g| g.starts_with(&prefix))
                        .cloned()
                        .collect();
                    leds.force.extend(globs);
                }
            }
        }
    }

    /// The plain EDS form of the LEDS assignments a reconnecting proxy
    /// held (`leds_reset`), sent first: Envoy then drops their collections
    /// and members, and the LEDS form that follows (forced) subscribes to
    /// them anew, so members removed while it was away do not stay.
    fn reset_leds(&mut self, snap: &Arc<Snapshot>) -> Option<Batch> {
        if self.leds_reset.is_empty() && self.leds_reset_globs.is_empty() {
            return None;
        }
        let t = TypeUrl::LedsClusterLoadAssignment;
        let st = &mut self.types[t as usize];
        if !st.active {
            // Its EDS subscription has not come yet on this stream.
            return None;
        }
        let mut batch = Batch::new(t, None);
        let mut names = std::mem::take(&mut self.leds_reset);
        let globs = std::mem::take(&mut self.leds_reset_globs);
        if !globs.is_empty() {
            let sent = &self.leds_sent;
            names.extend(
                snap.resources(t)
                    .filter(|r| {
                        let prefix = crate::leds::cluster_prefix(&r.name);
                        globs.iter().any(|g| g.starts_with(&prefix)) && !sent.contains(&r.name)
                    })
                    .map(|r| r.name.clone()),
            );
        }
        names.sort();
        names.dedup();
        for name in names {
            if !st.tracker.wants(&name, st.all()) {
                continue;
            }
            let plain = snap.get(TypeUrl::ClusterLoadAssignment, &name);
            let leds = snap.get(t, &name);
            if let Some(plain) = plain
                && leds.is_some_and(|l| l.version != plain.version)
            {
                let previous = st.held.set(name.clone(), Some(plain.version.clone()));
                batch.send(plain.clone(), previous);
                st.force.push(name);
            }
        }
        (!batch.is_empty()).then_some(batch)
    }
}

/// Whether `nonce` names one of the responses a stream whose last nonce
/// is `last` sent (nonces are 1, 2, 3 …).
pub(crate) fn sent_nonce(last: u64, nonce: &str) -> bool {
    nonce.parse::<u64>().is_ok_and(|n| n >= 1 && n <= last)
}

/// `entries` with the resources of `snap` whose versions are the same.
pub(crate) fn held_resources(
    t: TypeUrl,
    entries: Vec<(Arc<str>, Arc<str>)>,
    snap: &Snapshot,
) -> Vec<HeldResource> {
    entries
        .into_iter()
        .map(|(name, version)| {
            let resource = snap.get(t, &name).filter(|r| r.version == version).cloned();
            HeldResource {
                name,
                version,
                resource,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
