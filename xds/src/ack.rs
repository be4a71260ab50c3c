//! Bookkeeping of responses a proxy has not acknowledged yet, so a NACK can
//! restore what the proxy really holds.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::held::Held;

/// At most this many unacknowledged responses are remembered per type; an
/// older one is taken as accepted (Envoy acknowledges in order, so only a
/// broken client gets here).
const MAX_IN_FLIGHT: usize = 64;

/// What a response changed in a proxy's [`Held`] versions: each name with
/// the version it replaced (`None`: the proxy did not have it).
pub(crate) type Undo = Vec<(Arc<str>, Option<Arc<str>>)>;

/// Responses sent and not yet ACKed or NACKed.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    entries: VecDeque<(String, Undo)>,
}

impl InFlight {
    pub(crate) fn push(&mut self, nonce: String, undo: Undo) {
        if self.entries.len() == MAX_IN_FLIGHT {
            self.entries.pop_front();
        }
        self.entries.push_back((nonce, undo));
    }

    /// Forgets the response with `nonce`; returns its undo log if known.
    pub(crate) fn take(&mut self, nonce: &str) -> Option<Undo> {
        let pos = self.entries.iter().position(|(n, _)| n == nonce)?;
        self.entries.remove(pos).map(|(_, undo)| undo)
    }
}

/// Puts back the versions a rejected response replaced.
pub(crate) fn revert(held: &mut Held, undo: Undo) {
    for (name, previous) in undo {
        held.set(name, previous);
    }
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
        /// Whether this is the first NACK of that response. A proxy that
        /// repeats a NACK (or names a response it was never sent) is
        /// counted each time but logged once.
        first: bool,
    },
    /// A new stream, a subscription change, or a request needing a response.
    Subscription,
    /// A type this server does not serve, or a stale request.
    Ignored(String),
}
