//! How the server tells the daemon about proxies that connect, report
//! their health and leave. VM auto-registration (Istio's
//! `autoregistration` controller) is built on it, in the daemon; this
//! crate knows nothing of what the hook does with a proxy.
//!
//! The server calls [`ConnectHook::connect`] once per stream, when the
//! stream names its node (after the TLS identity checks, before the proxy
//! counts as connected). What it returns is kept for the stream's life:
//! dropping the [`Tracked`] is the disconnect. Health reports the proxy
//! sends on the stream (Istio's agent sends them as requests of type
//! [`HEALTH_INFORMATION`], as istiod's `handleWorkloadHealthcheck` reads
//! them) go to [`Tracked::health`] and are never answered.

use crate::proxy::Proxy;

/// Istio's health report type (`v3.HealthInfoType`): a request of this type
/// without `error_detail` reports the workload healthy; one with it,
/// unhealthy (its message says why).
pub const HEALTH_INFORMATION: &str = "type.googleapis.com/istio.v1.HealthInformation";

/// Why the hook refuses a proxy: the stream ends with this gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `FAILED_PRECONDITION` (9): what the proxy names does not exist yet
    /// (Istio's answer to an unknown WorkloadGroup).
    FailedPrecondition(String),
    /// `PERMISSION_DENIED` (7): the proxy may not register what it names.
    PermissionDenied(String),
}

impl Refusal {
    /// The message sent with the status.
    pub fn message(&self) -> &str {
        match self {
            Refusal::FailedPrecondition(m) | Refusal::PermissionDenied(m) => m,
        }
    }
}

/// Told of every stream that names its node.
pub trait ConnectHook: Send + Sync + std::fmt::Debug + 'static {
    /// A stream named its node (`proxy`). `Ok(Some(t))`: the hook tracks
    /// the proxy until `t` drops (the stream ended); `Ok(None)`: nothing to
    /// track; `Err`: the stream is refused.
    ///
    /// # Errors
    ///
    /// A [`Refusal`] ends the stream with its status.
    fn connect(&self, proxy: &Proxy) -> Result<Option<Box<dyn Tracked>>, Refusal>;
}

/// A proxy the hook tracks, for as long as its stream is open.
pub trait Tracked: Send + 'static {
    /// A health report from the proxy: `Ok(())` healthy, `Err(message)`
    /// unhealthy.
    fn health(&self, report: Result<(), &str>);
}
