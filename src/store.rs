//! The registry's writer, run on a thread of its own, and the metrics that
//! read the registry's own state (source status, conflicts).
//!
//! Applying a 10,000-host reset and merging takes milliseconds to seconds
//! of CPU; on a dedicated thread it never stalls the async workers that
//! serve xDS streams. The writer is the one place that knows each source's
//! status, so `meshreg_source_synced` and `meshreg_source_state` are set
//! here from it (adapters only count their errors and objects).

use std::collections::BTreeSet;
use std::sync::Arc;

use meshreg_registry::{SourceId, SourceState, Update, View, Writer};
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, oneshot};

/// Metrics read from the registry's state.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    synced: IntGaugeVec,
    state: IntGaugeVec,
    conflicts: IntGauge,
    adapters: meshreg_adapters::Metrics,
}

const STATES: [&str; 3] = ["syncing", "synced", "stale"];

impl Metrics {
    /// Registers `meshreg_source_synced{source}`,
    /// `meshreg_source_state{source,state}` and `meshreg_registry_conflicts`;
    /// objects the registry refuses are counted in `adapters`'
    /// `meshreg_source_errors_total{reason="invalid"}`.
    pub(crate) fn register(
        registry: &Registry,
        adapters: meshreg_adapters::Metrics,
    ) -> Result<Self, prometheus::Error> {
        let synced = IntGaugeVec::new(
            Opts::new(
                "meshreg_source_synced",
                "1 while the source's state is served (synced, or stale with its last state).",
            ),
            &["source"],
        )?;
        let state = IntGaugeVec::new(
            Opts::new(
                "meshreg_source_state",
                "1 for the source's current state: syncing, synced or stale.",
            ),
            &["source", "state"],
        )?;
        let conflicts = IntGauge::new(
            "meshreg_registry_conflicts",
            "Disagreements between declarations of one host that the merge rule settles now.",
        )?;
        registry.register(Box::new(synced.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(conflicts.clone()))?;
        Ok(Metrics {
            synced,
            state,
            conflicts,
            adapters,
        })
    }

    fn observe(&self, view: &View, known: &mut BTreeSet<SourceId>) {
        self.conflicts
            .set(i64::try_from(view.conflict_count()).unwrap_or(i64::MAX));
        let mut now = BTreeSet::new();
        for (source, status) in view.sources() {
            let label = source.to_string();
            self.synced
                .with_label_values(&[label.as_str()])
                .set(i64::from(status.is_serving()));
            let current = match status.state {
                SourceState::Syncing => "syncing",
                SourceState::Synced => "synced",
                _ => "stale",
            };
            for s in STATES {
                self.state
                    .with_label_values(&[label.as_str(), s])
                    .set(i64::from(s == current));
            }
            now.insert(source.clone());
        }
        // Forgotten sources leave the metrics.
        for gone in known.difference(&now) {
            let label = gone.to_string();
            let _ = self.synced.remove_label_values(&[label.as_str()]);
            for s in STATES {
                let _ = self.state.remove_label_values(&[label.as_str(), s]);
            }
        }
        *known = now;
    }
}

/// Runs `writer` on a thread named `registry` until every sender of
/// `updates` is gone; the returned receiver completes then.
///
/// # Errors
///
/// If the thread cannot be spawned.
pub(crate) fn spawn(
    mut writer: Writer,
    mut updates: mpsc::Receiver<Update>,
    metrics: Metrics,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("registry".into())
        .spawn(move || {
            let _span = tracing::info_span!("registry").entered();
            let mut known = BTreeSet::new();
            metrics.observe(writer.view(), &mut known);
            while let Some(update) = updates.blocking_recv() {
                let source = update.source().clone();
                let applied = writer.apply(update);
                for error in &applied.rejected {
                    tracing::warn!(%error, "registry refused an object; the rest of the update is applied");
                    metrics.adapters.error(&source, "invalid");
                }
                let view: &Arc<View> = writer.view();
                metrics.observe(view, &mut known);
            }
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}
