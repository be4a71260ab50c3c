//! The registry's writer, run on a thread of its own, and the metrics that
//! read the registry's own state (source status, conflicts).
//!
//! Applying a 10,000-host reset and merging takes milliseconds to seconds
//! of CPU; on a dedicated thread it never stalls the async workers that
//! serve xDS streams. The writer is the one place that knows each source's
//! status, so `meshreg_source_synced` and `meshreg_source_state` are set
//! here from it (adapters only count their errors and objects).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use meshreg_registry::{SourceId, SourceState, Update, View, Writer};
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, oneshot};

/// When a source last sent an update, and its last complete state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceActivity {
    /// Its last update of any kind.
    pub(crate) last_update: SystemTime,
    /// Its last complete state (a reset: initial list, relist, rescan).
    pub(crate) last_sync: Option<SystemTime>,
    /// Updates it sent.
    pub(crate) updates: u64,
}

/// Each source's [`SourceActivity`], kept by the registry thread for
/// `/debug/sourcez`; an entry leaves with its source.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity {
    inner: Arc<Mutex<HashMap<SourceId, SourceActivity>>>,
}

impl Activity {
    fn record(&self, update: &Update) {
        let now = SystemTime::now();
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let source = update.source();
        if matches!(update, Update::Forget { .. }) {
            m.remove(source);
            return;
        }
        let a = m.entry(source.clone()).or_insert(SourceActivity {
            last_update: now,
            last_sync: None,
            updates: 0,
        });
        a.last_update = now;
        a.updates += 1;
        if matches!(update, Update::Reset { .. } | Update::ResetKeeping { .. }) {
            a.last_sync = Some(now);
        }
    }

    /// What `source` did, if it sent anything.
    pub(crate) fn get(&self, source: &SourceId) -> Option<SourceActivity> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.get(source).copied()
    }
}

/// Metrics read from the registry's state.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) activity: Activity,
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
            activity: Activity::default(),
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
                let forgotten = matches!(update, Update::Forget { .. });
                metrics.activity.record(&update);
                // Objects the registry refused before and that come again:
                // accepted unless refused again below.
                let again: Vec<String> = if metrics.adapters.rejections().any(&source) {
                    match &update {
                        Update::Reset { objects, .. }
                        | Update::ResetKeeping { objects, .. }
                        | Update::Patch { apply: objects, .. } => objects
                            .iter()
                            .map(|o| format!("registry: {}", o.key()))
                            .collect(),
                        _ => Vec::new(),
                    }
                } else {
                    Vec::new()
                };
                for object in &again {
                    metrics.adapters.rejections().accepted(&source, object);
                }
                let applied = writer.apply(update);
                for error in &applied.rejected {
                    tracing::warn!(%error, "registry refused an object; the rest of the update is applied");
                    metrics.adapters.error(&source, "invalid");
                    let meshreg_registry::Error::Invalid { key, reason, .. } = error else {
                        continue;
                    };
                    metrics.adapters.rejections().rejected(
                        &source,
                        &format!("registry: {key}"),
                        vec![meshreg_adapters::Problem {
                            document: None,
                            field: String::new(),
                            reason: "invalid".into(),
                            message: reason.clone(),
                        }],
                    );
                }
                if forgotten {
                    // The source is gone: its adapter series and what it
                    // refused go with it, not left at their last values.
                    metrics.adapters.forget(&source);
                }
                let view: &Arc<View> = writer.view();
                metrics.observe(view, &mut known);
            }
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}
