//! The xDS server's Prometheus metrics. Names follow Istio's pilot where the
//! meaning is the same, so pilot dashboards work unchanged.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::resource::TypeUrl;

/// Latency buckets from 1 ms to 30 s: pushes here take milliseconds, and
/// Istio's own buckets (100 ms and up) would hide them.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Response size buckets, as Istio's `pilot_xds_config_size_bytes` (1 B to
/// 40 MB) with the steps between that meshreg's responses fall into.
const SIZE_BUCKETS: &[f64] = &[
    1.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
    4_000_000.0,
    10_000_000.0,
    40_000_000.0,
];

/// Metrics of the xDS server; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub(crate) connected: IntGaugeVec,
    pub(crate) config_size: HistogramVec,
    pub(crate) push_triggers: IntCounterVec,
    pub(crate) internal_errors: IntCounterVec,
    pub(crate) limit_hits: IntCounterVec,
    pub(crate) auth_refused: IntCounterVec,
    pub(crate) pushes: IntCounterVec,
    pub(crate) convergence: Histogram,
    pub(crate) push_time: HistogramVec,
    pub(crate) debounce_time: Histogram,
    pub(crate) rejects: IntCounterVec,
    pub(crate) services: IntGauge,
    pub(crate) endpoints: IntGauge,
    pub(crate) bytes_sent: IntCounterVec,
    pub(crate) resources: IntGaugeVec,
    pub(crate) generation: IntGauge,
    pub(crate) invalid: IntCounterVec,
    pub(crate) withheld: IntGaugeVec,
    pub(crate) scopes: IntGauge,
    /// The `version` labels of `pilot_xds` in use: a proxy names its own,
    /// so at most [`MAX_VERSIONS`] distinct ones, then `other`.
    versions: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Distinct `version` labels on `pilot_xds`.
const MAX_VERSIONS: usize = 32;

impl Metrics {
    /// Creates the metrics and registers them with `registry`.
    ///
    /// # Errors
    ///
    /// If a metric with the same name is already registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            connected: IntGaugeVec::new(
                Opts::new(
                    "pilot_xds",
                    "Number of proxies connected over xDS, by the Istio version their node reports (`unknown` when none).",
                ),
                &["version"],
            )?,
            config_size: HistogramVec::new(
                HistogramOpts::new(
                    "pilot_xds_config_size_bytes",
                    "Bytes of each xDS response sent, by type.",
                )
                .buckets(SIZE_BUCKETS.to_vec()),
                &["type"],
            )?,
            push_triggers: IntCounterVec::new(
                Opts::new(
                    "pilot_push_triggers",
                    "What caused pushes, by Istio's trigger type (endpoint, service, config, global): hosts per generation.",
                ),
                &["type"],
            )?,
            auth_refused: IntCounterVec::new(
                Opts::new(
                    "meshreg_xds_auth_refused_total",
                    "Peers of the TLS xDS listener refused, by reason: handshake (TLS failed), namespace (a proxy claiming a namespace its certificate does not name), identity (a client certificate without a SPIFFE ID).",
                ),
                &["reason"],
            )?,
            limit_hits: IntCounterVec::new(
                Opts::new(
                    "meshreg_xds_limit_hits_total",
                    "Peers refused or closed because they hit a limit of the xDS port, by limit.",
                ),
                &["limit"],
            )?,
            internal_errors: IntCounterVec::new(
                Opts::new(
                    "pilot_total_xds_internal_errors",
                    "Resources the server could not serve, by type: generated but withheld because Envoy would reject them.",
                ),
                &["type"],
            )?,
            pushes: IntCounterVec::new(
                Opts::new("pilot_xds_pushes", "xDS responses sent, by type."),
                &["type"],
            )?,
            convergence: Histogram::with_opts(
                HistogramOpts::new(
                    "pilot_proxy_convergence_time",
                    "Seconds from a registry event until a proxy's response carrying it is sent.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            push_time: HistogramVec::new(
                HistogramOpts::new(
                    "pilot_xds_push_time",
                    "Seconds to build one response for one proxy, by type.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["type"],
            )?,
            debounce_time: Histogram::with_opts(
                HistogramOpts::new(
                    "pilot_debounce_time",
                    "Seconds from the first registry event of a batch until the batch is generated.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            rejects: IntCounterVec::new(
                Opts::new("pilot_total_xds_rejects", "Responses rejected (NACKed) by proxies, by type."),
                &["type"],
            )?,
            services: IntGauge::new("pilot_services", "Services in the registry.")?,
            endpoints: IntGauge::new("meshreg_endpoints", "Endpoints in the registry.")?,
            bytes_sent: IntCounterVec::new(
                Opts::new("meshreg_xds_bytes_sent_total", "Bytes of xDS responses sent, by type."),
                &["type"],
            )?,
            resources: IntGaugeVec::new(
                Opts::new("meshreg_xds_resources", "Generated xDS resources, by type."),
                &["type"],
            )?,
            generation: IntGauge::new(
                "meshreg_xds_generation",
                "Generation of the newest resource snapshot.",
            )?,
            invalid: IntCounterVec::new(
                Opts::new(
                    "meshreg_xds_invalid_resources_total",
                    "Generated resources withheld because Envoy would reject them, by type (each content once).",
                ),
                &["type"],
            )?,
            withheld: IntGaugeVec::new(
                Opts::new(
                    "meshreg_xds_withheld_resources",
                    "Resources whose newest version is withheld as invalid (their last good version is served), by type.",
                ),
                &["type"],
            )?,
            versions: Default::default(),
            scopes: IntGauge::new(
                "meshreg_xds_scopes",
                "Scopes (namespace, Sidecar, selecting rules, IP family, locality) with a snapshot of their own, shared by their proxies.",
            )?,
        };
        registry.register(Box::new(m.connected.clone()))?;
        registry.register(Box::new(m.config_size.clone()))?;
        registry.register(Box::new(m.push_triggers.clone()))?;
        registry.register(Box::new(m.internal_errors.clone()))?;
        registry.register(Box::new(m.limit_hits.clone()))?;
        registry.register(Box::new(m.auth_refused.clone()))?;
        for reason in ["handshake", "namespace", "identity"] {
            m.auth_refused.with_label_values(&[reason]);
        }
        for limit in crate::limits::NAMES {
            m.limit_hits.with_label_values(&[limit]);
        }
        registry.register(Box::new(m.pushes.clone()))?;
        registry.register(Box::new(m.convergence.clone()))?;
        registry.register(Box::new(m.push_time.clone()))?;
        registry.register(Box::new(m.debounce_time.clone()))?;
        registry.register(Box::new(m.rejects.clone()))?;
        registry.register(Box::new(m.services.clone()))?;
        registry.register(Box::new(m.endpoints.clone()))?;
        registry.register(Box::new(m.bytes_sent.clone()))?;
        registry.register(Box::new(m.resources.clone()))?;
        registry.register(Box::new(m.generation.clone()))?;
        registry.register(Box::new(m.invalid.clone()))?;
        registry.register(Box::new(m.withheld.clone()))?;
        registry.register(Box::new(m.scopes.clone()))?;
        for t in TypeUrl::SERVED {
            // Make the series exist before the first push, so dashboards
            // and scrapes see zeros rather than nothing.
            m.pushes.with_label_values(&[t.short()]);
            m.rejects.with_label_values(&[t.short()]);
            m.bytes_sent.with_label_values(&[t.short()]);
            m.invalid.with_label_values(&[t.short()]);
            m.withheld.with_label_values(&[t.short()]);
            m.config_size.with_label_values(&[t.short()]);
            m.internal_errors.with_label_values(&[t.short()]);
        }
        for (t, _) in crate::status::Triggers::default().by_type() {
            m.push_triggers.with_label_values(&[t]);
        }
        Ok(m)
    }

    /// The `pilot_xds` label for a proxy reporting Istio version
    /// `version`: `unknown` when empty, `other` when it is not a short
    /// version string or [`MAX_VERSIONS`] others are already in use.
    pub(crate) fn version_label(&self, version: &str) -> String {
        if version.is_empty() {
            return "unknown".into();
        }
        let plausible = version.len() <= 40
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-+_".contains(&b));
        if !plausible {
            return "other".into();
        }
        let mut seen = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(version) || seen.len() < MAX_VERSIONS {
            seen.insert(version.to_string());
            version.to_string()
        } else {
            "other".into()
        }
    }

    /// Metrics registered nowhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry has no duplicates")
    }
}
