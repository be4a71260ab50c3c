//! [`Metrics`]: what every adapter reports about its source.
//!
//! Owned, not global: the binary builds one [`Metrics`] with
//! [`Metrics::register`] and hands clones to each adapter; every series is
//! labelled with the adapter's `source` (the [`SourceId`] display form, e.g.
//! `serviceentry//etc/meshreg/se`). This module does not decide *when* to
//! count; the adapters do. A source's sync state is the registry's (the
//! daemon exports it).

use meshreg_registry::SourceId;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Per-source adapter metrics. Cheap to clone (the handles are shared).
///
/// | name | type | labels |
/// |---|---|---|
/// | `meshreg_source_errors_total` | counter | `source`, `reason` |
/// | `meshreg_source_updates_total` | counter | `source` |
/// | `meshreg_source_objects` | gauge | `source`, `kind` |
/// | `meshreg_source_requests_total` | counter | `source` |
#[derive(Debug, Clone)]
pub struct Metrics {
    errors: IntCounterVec,
    updates: IntCounterVec,
    objects: IntGaugeVec,
    requests: IntCounterVec,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the adapter metrics and registers them in `registry`.
    ///
    /// # Errors
    ///
    /// A [`prometheus::Error`] when a metric with the same name is already
    /// registered in `registry` (call this once per registry and clone the
    /// result).
    pub fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let errors = IntCounterVec::new(
            Opts::new(
                "meshreg_source_errors_total",
                "Errors reading or converting a source, by short reason (parse, invalid, io, ...).",
            ),
            &["source", "reason"],
        )?;
        let updates = IntCounterVec::new(
            Opts::new(
                "meshreg_source_updates_total",
                "Updates the source sent to the registry.",
            ),
            &["source"],
        )?;
        let objects = IntGaugeVec::new(
            Opts::new(
                "meshreg_source_objects",
                "Platform objects currently loaded from the source, by kind.",
            ),
            &["source", "kind"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "meshreg_source_requests_total",
                "Requests a polling source made to its platform (Consul queries, blocking ones included).",
            ),
            &["source"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(updates.clone()))?;
        registry.register(Box::new(objects.clone()))?;
        Ok(Metrics {
            errors,
            updates,
            objects,
            requests,
        })
    }

    /// Counts one error of `source` for `reason` (short snake_case). The
    /// daemon also counts here, as `invalid`, objects the registry refuses.
    pub fn error(&self, source: &SourceId, reason: &str) {
        self.errors
            .with_label_values(&[source.to_string().as_str(), reason])
            .inc();
    }

    /// Records that `source` made one request to its platform.
    pub(crate) fn request(&self, source: &SourceId) {
        self.requests
            .with_label_values(&[source.to_string().as_str()])
            .inc();
    }

    /// Records that `source` sent an update.
    pub(crate) fn update_sent(&self, source: &SourceId) {
        self.updates
            .with_label_values(&[source.to_string().as_str()])
            .inc();
    }

    /// Exports the source's series before its first update (zeros rather
    /// than nothing for dashboards).
    pub(crate) fn unsynced(&self, source: &SourceId) {
        self.updates
            .with_label_values(&[source.to_string().as_str()]);
    }

    /// Sets how many objects of `kind` `source` currently has loaded.
    pub(crate) fn objects(&self, source: &SourceId, kind: &str, count: usize) {
        self.objects
            .with_label_values(&[source.to_string().as_str(), kind])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}
