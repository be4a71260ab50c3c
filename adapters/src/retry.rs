//! What an adapter does while something it needs before its first query
//! cannot be had (an ACL token file, the system resolver configuration):
//! report the source stale with why, count it, and try again.

use std::time::Duration;

use meshreg_registry::{SourceId, Update};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Calls `get` until it succeeds, every `every`; each failure is logged
/// (with `then`, what the source does meanwhile), counted as `reason`, and
/// reported to the registry as `Update::Stale`. `None` when `shutdown` is
/// cancelled or `sink` closed.
pub(crate) async fn until_ok<T>(
    mut get: impl FnMut() -> Result<T, String>,
    then: &str,
    reason: &str,
    every: Duration,
    (source, metrics): (&SourceId, &Metrics),
    sink: &mpsc::Sender<Update>,
    shutdown: &CancellationToken,
) -> Option<T> {
    loop {
        match get() {
            Ok(v) => return Some(v),
            Err(why) => {
                tracing::warn!(source = %source, "{why}; {then}");
                metrics.error(source, reason);
                let stale = Update::Stale {
                    source: source.clone(),
                    error: why,
                };
                if sink.send(stale).await.is_err() {
                    return None;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
    }
}
