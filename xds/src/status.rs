//! What operators ask of the xDS server: per stream and type, what was sent
//! and what the proxy answered ([`TypeSync`], what `istioctl proxy-status`
//! shows), what one proxy holds ([`ConfigDump`], what `istioctl
//! proxy-config` shows), and the last pushes ([`PushHistory`], istiod's
//! `/debug/push_status`).
//!
//! Everything here is bounded: a few responses per stream and type, and
//! [`PUSH_HISTORY`] pushes.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::resource::{Resource, TypeUrl};

/// Responses remembered per stream and type, to name the version an ACK
/// accepted (Envoy answers in order, so the last few are enough).
const RECENT: usize = 8;

/// Pushes [`PushHistory`] keeps.
pub const PUSH_HISTORY: usize = 100;

/// One response sent to a proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Its nonce.
    pub nonce: Arc<str>,
    /// Its `version_info` (SotW) or `system_version_info` (delta).
    pub version: Arc<str>,
    /// When it was sent (or answered, for an ACK).
    pub at: SystemTime,
}

/// A rejected response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The response it rejected (`version` is empty when it was not one of
    /// the last few sent).
    pub response: Response,
    /// The proxy's error message.
    pub message: String,
}

/// Where a proxy stands on one type, as `istioctl proxy-status` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Nothing of this type was sent (the proxy did not ask, or there is
    /// nothing yet).
    NotSent,
    /// The last response sent was accepted.
    Synced,
    /// The last response sent is not answered yet.
    Stale,
    /// The last response sent was rejected; the proxy keeps what it
    /// accepted before.
    Nacked,
}

impl SyncState {
    /// The word istioctl prints (`NACKED` is meshreg's own: istioctl folds
    /// it into `STALE`).
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::NotSent => "NOT SENT",
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
        }
    }
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one stream sent of one type and what the proxy answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSync {
    /// The type.
    pub type_url: TypeUrl,
    /// The last response sent.
    pub sent: Option<Response>,
    /// The last response accepted (`at`: when the ACK arrived).
    pub acked: Option<Response>,
    /// The last rejection.
    pub nacked: Option<Nack>,
    /// Responses sent.
    pub responses: u64,
    /// Rejections received.
    pub nacks: u64,
    /// Resources the proxy rejected whose rejected version is still the
    /// current one: it keeps an older version of each (or none).
    pub rejected: usize,
    recent: VecDeque<Response>,
}

impl TypeSync {
    fn new(type_url: TypeUrl) -> Self {
        TypeSync {
            type_url,
            sent: None,
            acked: None,
            nacked: None,
            responses: 0,
            nacks: 0,
            rejected: 0,
            recent: VecDeque::new(),
        }
    }

    /// Where the proxy stands: `STALE` while the last response sent is
    /// unanswered; `NACKED` when it was rejected, or while a resource it
    /// rejected is still current (later responses carrying other resources
    /// may have been accepted); else `SYNCED`.
    pub fn state(&self) -> SyncState {
        let Some(sent) = &self.sent else {
            return SyncState::NotSent;
        };
        let nacked = self
            .nacked
            .as_ref()
            .is_some_and(|n| n.response.nonce == sent.nonce);
        let acked = self.acked.as_ref().is_some_and(|a| a.nonce == sent.nonce);
        if !acked && !nacked {
            SyncState::Stale
        } else if nacked || self.rejected > 0 {
            SyncState::Nacked
        } else {
            SyncState::Synced
        }
    }

    fn sent(&mut self, nonce: Arc<str>, version: Arc<str>, at: SystemTime) {
        let r = Response { nonce, version, at };
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(r.clone());
        self.sent = Some(r);
        self.responses += 1;
    }

    fn answered(&mut self, nonce: &str, error: Option<&str>, at: SystemTime) {
        // The response answered, as recorded: its nonce and version are
        // shared, not copied.
        let known = self.recent.iter().rev().find(|r| *r.nonce == *nonce);
        match error {
            None => {
                // An ACK of a response we do not remember (too old, or not
                // ours) says nothing about which version the proxy has.
                if let Some(r) = known {
                    self.acked = Some(Response { at, ..r.clone() });
                }
            }
            Some(message) => {
                let response = match known {
                    Some(r) => Response { at, ..r.clone() },
                    None => Response {
                        nonce: nonce.into(),
                        version: "".into(),
                        at,
                    },
                };
                self.nacks += 1;
                self.nacked = Some(Nack {
                    response,
                    message: message.to_string(),
                });
            }
        }
    }
}

/// What one stream sent and what its proxy answered, per type (in
/// [`TypeUrl::ALL`] order). Shared between the stream and the debug
/// endpoints; each update holds the lock for a few field writes.
#[derive(Debug, Clone)]
pub(crate) struct StreamSync {
    inner: Arc<Mutex<Vec<TypeSync>>>,
}

impl Default for StreamSync {
    fn default() -> Self {
        StreamSync {
            inner: Arc::new(Mutex::new(
                TypeUrl::ALL.into_iter().map(TypeSync::new).collect(),
            )),
        }
    }
}

impl StreamSync {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<TypeSync>) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a response sent.
    pub(crate) fn sent(&self, t: TypeUrl, nonce: Arc<str>, version: Arc<str>) {
        let now = SystemTime::now();
        self.with(|types| types[t as usize].sent(nonce, version, now));
    }

    /// Records a request that answers the response `nonce` of `t`: an ACK,
    /// or a NACK with `error`.
    pub(crate) fn answered(&self, t: TypeUrl, nonce: &str, error: Option<&str>) {
        let now = SystemTime::now();
        self.with(|types| types[t as usize].answered(nonce, error, now));
    }

    /// Records how many resources of each type the proxy rejected and
    /// are still current.
    pub(crate) fn set_rejected(&self, counts: &[(TypeUrl, usize)]) {
        self.with(|types| {
            for (t, n) in counts {
                types[*t as usize].rejected = *n;
            }
        });
    }

    /// A copy of every type's state.
    pub(crate) fn get(&self) -> Vec<TypeSync> {
        self.with(|types| types.clone())
    }
}

/// One resource a proxy holds.
#[derive(Debug, Clone)]
pub struct HeldResource {
    /// Its name.
    pub name: Arc<str>,
    /// The version the proxy holds (a hash of the content).
    pub version: Arc<str>,
    /// The resource as it was sent, when the stream's snapshot still has
    /// this version (`None`: the proxy holds an older version, e.g. after
    /// rejecting a newer one, and only its version is known).
    pub resource: Option<Arc<Resource>>,
}

/// What one proxy holds of one type.
#[derive(Debug, Clone)]
pub struct TypeDump {
    /// The type.
    pub type_url: TypeUrl,
    /// Whether it subscribed to every resource of the type (wildcard).
    pub wildcard: bool,
    /// Names it subscribed to (for a wildcard subscription: none).
    pub subscribed: usize,
    /// What it holds, ordered by name.
    pub resources: Vec<HeldResource>,
    /// Resources it rejected whose rejected version is still current: name
    /// and that version (it holds an older version of each, or none).
    pub rejected: Vec<(Arc<str>, Arc<str>)>,
}

/// What one proxy holds: the resources it accepted or was sent and has
/// not rejected, as the stream tracks them (the same bookkeeping that
/// decides what to send it next).
#[derive(Debug, Clone)]
pub struct ConfigDump {
    /// Its node id.
    pub node_id: String,
    /// `delta` or `sotw` (of the stream asked: the newest of that id).
    pub mode: &'static str,
    /// The peer address of that stream.
    pub peer: Option<std::net::SocketAddr>,
    /// Per type, in [`TypeUrl::ALL`] order.
    pub types: Vec<TypeDump>,
}

/// What caused a push: the registry's changes folded into one generation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Triggers {
    /// Hosts whose endpoints alone changed (Istio's `endpoint` trigger).
    pub endpoints: usize,
    /// Hosts added or whose shape changed (Istio's `service`).
    pub services: usize,
    /// Hosts removed (also `service` in Istio).
    pub removed: usize,
    /// A Sidecar or a selecting DestinationRule changed (Istio's `config`).
    pub config: bool,
    /// Every host was regenerated: the first generation, or the generator
    /// fell behind the registry's change log (Istio's `global`).
    pub full: bool,
}

impl Triggers {
    /// `(type, count)` for `pilot_push_triggers`, with Istio's type names.
    pub fn by_type(&self) -> [(&'static str, usize); 4] {
        [
            ("endpoint", self.endpoints),
            ("service", self.services + self.removed),
            ("config", usize::from(self.config)),
            ("global", usize::from(self.full)),
        ]
    }
}

/// One generation of resources, as `/debug/push_status` lists it.
#[derive(Debug, Clone)]
pub struct Push {
    /// When it finished.
    pub at: SystemTime,
    /// The registry version it reflects.
    pub registry_version: u64,
    /// The snapshot generation it published (the previous one when it
    /// published nothing).
    pub generation: u64,
    /// What caused it.
    pub triggers: Triggers,
    /// Clusters added, changed or removed.
    pub clusters_changed: usize,
    /// ClusterLoadAssignments added, changed or removed.
    pub assignments_changed: usize,
    /// Whether a snapshot went out to the streams.
    pub published: bool,
    /// Proxies connected when it went out.
    pub proxies: i64,
    /// How long generating it took.
    pub duration: Duration,
    /// From the first registry event of its batch until it was generated
    /// (`None` for a generation no registry event caused).
    pub since_event: Option<Duration>,
}

/// The last [`PUSH_HISTORY`] pushes, newest last; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PushHistory {
    inner: Arc<Mutex<VecDeque<Push>>>,
}

impl PushHistory {
    pub(crate) fn record(&self, push: Push) {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == PUSH_HISTORY {
            q.pop_front();
        }
        q.push_back(push);
    }

    /// The pushes kept, oldest first.
    pub fn list(&self) -> Vec<Push> {
        let q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_last_response_sent() {
        let s = StreamSync::default();
        let t = TypeUrl::Cluster;
        let state = || s.get()[t as usize].state();
        assert_eq!(state(), SyncState::NotSent);
        s.sent(t, "1".into(), "v1".into());
        assert_eq!(state(), SyncState::Stale);
        s.answered(t, "1", None);
        assert_eq!(state(), SyncState::Synced);
        assert_eq!(
            s.get()[t as usize].acked.as_ref().unwrap().version,
            "v1".into()
        );
        s.sent(t, "2".into(), "v2".into());
        s.answered(t, "2", Some("bad cluster"));
        let got = &s.get()[t as usize];
        assert_eq!(got.state(), SyncState::Nacked);
        assert_eq!(got.nacks, 1);
        assert_eq!(got.nacked.as_ref().unwrap().response.version, "v2".into());
        assert_eq!(got.nacked.as_ref().unwrap().message, "bad cluster");
        // The proxy still holds what it accepted.
        assert_eq!(got.acked.as_ref().unwrap().version, "v1".into());
        // The other type is untouched.
        assert_eq!(
            s.get()[TypeUrl::ClusterLoadAssignment as usize].state(),
            SyncState::NotSent
        );
    }

    #[test]
    fn an_ack_of_an_earlier_response_names_its_version() {
        let s = StreamSync::default();
        let t = TypeUrl::ClusterLoadAssignment;
        s.sent(t, "1".into(), "7".into());
        s.sent(t, "2".into(), "8".into());
        s.answered(t, "1", None);
        let got = &s.get()[t as usize];
        assert_eq!(got.acked.as_ref().unwrap().version, "7".into());
        assert_eq!(got.state(), SyncState::Stale);
        // An ACK of a nonce never sent changes nothing.
        s.answered(t, "99", None);
        assert_eq!(
            s.get()[t as usize].acked.as_ref().unwrap().nonce,
            "1".into()
        );
    }

    #[test]
    fn the_push_history_is_bounded() {
        let h = PushHistory::default();
        for generation in 0..(PUSH_HISTORY as u64 + 5) {
            h.record(Push {
                at: SystemTime::now(),
                registry_version: generation,
                generation,
                triggers: Triggers::default(),
                clusters_changed: 0,
                assignments_changed: 0,
                published: true,
                proxies: 0,
                duration: Duration::ZERO,
                since_event: None,
            });
        }
        let list = h.list();
        assert_eq!(list.len(), PUSH_HISTORY);
        assert_eq!(list[0].generation, 5);
    }
}
