//! A response computed at once and sent in chunks.
//!
//! A proxy's first sync can be megabytes. Sending it as one message would
//! make the gRPC layer hold (and keep the capacity of) a buffer that large
//! for every connecting proxy at once; chunks of at most
//! [`MAX_CHUNK_BYTES`] keep per-stream buffers small, and the stream loop
//! only builds the next chunk when the transport has taken the last one.
//! The protocol allows it: delta responses and SotW EDS responses need not
//! carry everything (SotW CDS must, and is never chunked).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::ack::Undo;
use crate::resource::{Resource, TypeUrl};

/// The most resource bytes one response carries (a single larger resource
/// still goes out alone).
pub(crate) const MAX_CHUNK_BYTES: usize = 16 * 1024;

/// What is left to send of one computed response.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) type_url: TypeUrl,
    /// The resources to send.
    pub(crate) sends: VecDeque<Arc<Resource>>,
    /// The versions the proxy held before, for the sends that replace one
    /// (for NACKs; a first sync replaces nothing, so this stays small).
    pub(crate) previous: HashMap<Arc<str>, Arc<str>>,
    /// Each removed name with the version the proxy held before.
    pub(crate) removed: Vec<(Arc<str>, Option<Arc<str>>)>,
    /// The earliest registry event this response delivers.
    pub(crate) event_at: Option<Instant>,
    /// A resource of a rejected response sent again alone (see
    /// `ack::Rejections`): its NACK was already logged once.
    pub(crate) probe: bool,
}

/// One chunk of a [`Batch`].
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) resources: Vec<Arc<Resource>>,
    pub(crate) removed: Vec<Arc<str>>,
    pub(crate) undo: Undo,
    /// Set on the last chunk only, so convergence is observed once.
    pub(crate) event_at: Option<Instant>,
    /// From a probe batch.
    pub(crate) probe: bool,
}

impl Batch {
    /// An empty batch of `type_url`.
    pub(crate) fn new(type_url: TypeUrl, event_at: Option<Instant>) -> Self {
        Batch {
            type_url,
            sends: VecDeque::new(),
            previous: HashMap::new(),
            removed: Vec::new(),
            event_at,
            probe: false,
        }
    }

    /// Queues `r`, which replaces `previous` at the proxy.
    pub(crate) fn send(&mut self, r: Arc<Resource>, previous: Option<Arc<str>>) {
        if let Some(p) = previous {
            self.previous.insert(r.name.clone(), p);
        }
        self.sends.push_back(r);
    }

    /// Takes `names` out of what is left to send (the proxy unsubscribed
    /// from them).
    pub(crate) fn forget(&mut self, names: &[Arc<str>]) {
        if names.is_empty() {
            return;
        }
        let names: std::collections::HashSet<&str> = names.iter().map(|n| &**n).collect();
        self.sends.retain(|r| !names.contains(&*r.name));
        self.previous.retain(|n, _| !names.contains(&**n));
        self.removed.retain(|(n, _)| !names.contains(&**n));
    }

    /// True when nothing is left.
    pub(crate) fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.removed.is_empty()
    }

    /// Takes the next chunk; removals ride in the first one.
    pub(crate) fn next_chunk(&mut self) -> Chunk {
        let mut chunk = Chunk {
            resources: Vec::new(),
            removed: Vec::with_capacity(self.removed.len()),
            undo: Vec::new(),
            event_at: None,
            probe: self.probe,
        };
        for (name, previous) in self.removed.drain(..) {
            chunk.undo.push((name.clone(), previous));
            chunk.removed.push(name);
        }
        // How many fit, first: the chunk's list is allocated once.
        let mut bytes = 0;
        let fit = self
            .sends
            .iter()
            .enumerate()
            .take_while(|(i, r)| {
                bytes += r.delta.len();
                *i == 0 || bytes <= MAX_CHUNK_BYTES
            })
            .count();
        chunk.resources.reserve_exact(fit);
        let mut bytes = 0;
        while let Some(r) = self.sends.front() {
            if !chunk.resources.is_empty() && bytes + r.delta.len() > MAX_CHUNK_BYTES {
                break;
            }
            // The delta encoding (name, version, Any) is the larger one.
            bytes += r.delta.len();
            if let Some(r) = self.sends.pop_front() {
                // No entry: it replaced nothing (see `Undo`).
                if let Some(previous) = self.previous.remove(&r.name) {
                    chunk.undo.push((r.name.clone(), Some(previous)));
                }
                chunk.resources.push(r);
            }
        }
        if self.is_empty() {
            chunk.event_at = self.event_at;
        }
        chunk
    }
}

/// Sorts and deduplicates names (candidate lists, forced names).
pub(crate) fn sorted_unique(mut names: Vec<Arc<str>>) -> Vec<Arc<str>> {
    // A stable sort merges already-sorted runs (snapshot order) in linear time.
    names.sort();
    names.dedup();
    names
}
