//! [`Metrics`]: what every adapter reports about its source.
//!
//! Owned, not global: the binary builds one [`Metrics`] with
//! [`Metrics::register`] and hands clones to each adapter; every series is
//! labelled with the adapter's `source` (the [`SourceId`] display form, e.g.
//! `serviceentry//etc/meshreg/se`). This module does not decide *when* to
//! count; the adapters do. A source's sync state is the registry's (the
//! daemon exports it).
//!
//! Beside the counters, [`Rejections`]: the objects each source refuses
//! now and why (file, document, field, reason), for `/debug/rejected`;
//! an object leaves it when it is accepted again or its source goes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use meshreg_registry::SourceId;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Refused objects [`Rejections`] keeps at most; past it, the oldest
/// entry goes.
pub const MAX_REJECTED: usize = 1000;

/// One problem with a refused object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The document of a multi-document file (0-based), when it has one.
    pub document: Option<usize>,
    /// The field path inside the object (e.g. `spec.ports[0].number`);
    /// empty when the whole object is at fault.
    pub field: String,
    /// Short reason (`parse`, `invalid`, …, as `meshreg_source_errors_total`).
    pub reason: String,
    /// What is wrong, and the Istio rule it breaks where there is one.
    pub message: String,
}

/// An object a source refuses now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The source.
    pub source: String,
    /// The object: a file path, or `Kind namespace/name`.
    pub object: String,
    /// When it was refused (the latest time).
    pub at: SystemTime,
    /// Why.
    pub problems: Vec<Problem>,
}

/// (source, object) → (insertion order, what was refused).
type ByObject = HashMap<(String, String), (u64, Rejected)>;

/// The objects sources refuse now, by source and object; bounded by
/// [`MAX_REJECTED`]. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Rejections {
    inner: Arc<Mutex<ByObject>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

impl Rejections {
    fn with<R>(&self, f: impl FnOnce(&mut ByObject) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records that `source` refuses `object` for `problems` (replacing
    /// what was recorded for it).
    pub fn rejected(&self, source: &SourceId, object: &str, problems: Vec<Problem>) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Rejected {
            source: source.to_string(),
            object: object.to_string(),
            at: SystemTime::now(),
            problems,
        };
        self.with(|m| {
            m.insert((entry.source.clone(), entry.object.clone()), (seq, entry));
            if m.len() > MAX_REJECTED
                && let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, (s, _))| *s)
                    .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        });
    }

    /// Whether `source` already refuses `object` for exactly `problems`:
    /// a caller that converts an object again (a relist) logs and counts
    /// its refusal only when it is new.
    pub fn refuses(&self, source: &SourceId, object: &str, problems: &[Problem]) -> bool {
        let key = (source.to_string(), object.to_string());
        self.with(|m| m.get(&key).is_some_and(|(_, r)| r.problems == problems))
    }

    /// Records that `source` accepts `object` (again).
    pub fn accepted(&self, source: &SourceId, object: &str) {
        let key = (source.to_string(), object.to_string());
        self.with(|m| m.remove(&key));
    }

    /// Whether `source` refuses anything now (cheap: callers skip work
    /// when not).
    pub fn any(&self, source: &SourceId) -> bool {
        let source = source.to_string();
        self.with(|m| m.keys().any(|(s, _)| *s == source))
    }

    /// Forgets everything `source` refused (the source is gone).
    pub fn forget(&self, source: &SourceId) {
        let source = source.to_string();
        self.with(|m| m.retain(|(s, _), _| *s != source));
    }

    /// Every refused object, ordered by source and object.
    pub fn list(&self) -> Vec<Rejected> {
        let all: BTreeMap<(String, String), Rejected> =
            self.with(|m| m.iter().map(|(k, (_, r))| (k.clone(), r.clone())).collect());
        all.into_values().collect()
    }
}

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
    rejections: Rejections,
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
            rejections: Rejections::default(),
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

    /// Errors counted for `source`, every reason.
    pub fn error_count(&self, source: &SourceId) -> u64 {
        use prometheus::core::Collector;
        let label = source.to_string();
        self.errors
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "source" && l.value() == label)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The objects the sources refuse now.
    pub fn rejections(&self) -> &Rejections {
        &self.rejections
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

    /// Removes every series of `source` (and what it refused): the source
    /// is gone (a cluster's kubeconfig removed, a source dropped by a
    /// reload), so its last values must not stay exported as if current.
    pub fn forget(&self, source: &SourceId) {
        let label = source.to_string();
        remove_source(&self.errors, &label);
        remove_source(&self.updates, &label);
        remove_source(&self.objects, &label);
        remove_source(&self.requests, &label);
        self.rejections.forget(source);
    }

    /// Sets how many objects of `kind` `source` currently has loaded.
    pub(crate) fn objects(&self, source: &SourceId, kind: &str, count: usize) {
        self.objects
            .with_label_values(&[source.to_string().as_str(), kind])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

/// Removes the series of `vec` whose `source` label is `source`.
fn remove_source<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    source: &str,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("source") == Some(&source) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_source_leaves_every_series() {
        use meshreg_registry::SourceKind;
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        let (a, b) = (
            SourceId::new(SourceKind::Kubernetes, "a"),
            SourceId::new(SourceKind::Kubernetes, "b"),
        );
        for s in [&a, &b] {
            m.error(s, "watch");
            m.update_sent(s);
            m.request(s);
            m.objects(s, "Pod", 3);
            m.objects(s, "Service", 1);
            m.rejections().rejected(s, "Pod x", problem());
        }
        m.forget(&a);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(!text.contains("source=\"kubernetes/a\""), "{text}");
        assert_eq!(text.matches("source=\"kubernetes/b\"").count(), 5, "{text}");
        assert!(!m.rejections().any(&a));
        assert!(m.rejections().any(&b));
    }

    fn problem() -> Vec<Problem> {
        vec![Problem {
            document: Some(0),
            field: "spec.hosts".into(),
            reason: "invalid".into(),
            message: "no host".into(),
        }]
    }

    #[test]
    fn rejections_are_kept_until_accepted_forgotten_or_evicted() {
        let r = Rejections::default();
        let a = SourceId::new(meshreg_registry::SourceKind::ServiceEntry, "/a");
        let b = SourceId::new(meshreg_registry::SourceKind::ServiceEntry, "/b");
        r.rejected(&a, "/a/x.yaml", problem());
        r.rejected(&b, "/b/y.yaml", problem());
        assert!(r.any(&a) && r.any(&b));
        r.accepted(&a, "/a/x.yaml");
        assert!(!r.any(&a));
        r.forget(&b);
        assert!(r.list().is_empty());
        for i in 0..MAX_REJECTED + 5 {
            r.rejected(&a, &format!("/a/{i:05}.yaml"), problem());
        }
        let list = r.list();
        assert_eq!(list.len(), MAX_REJECTED);
        // The oldest went first.
        assert_eq!(list[0].object, "/a/00005.yaml");
    }
}
