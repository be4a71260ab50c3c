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

/// Metrics of the xDS server; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub(crate) connected: IntGauge,
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
}

impl Metrics {
    /// Creates the metrics and registers them with `registry`.
    ///
    /// # Errors
    ///
    /// If a metric with the same name is already registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            connected: IntGauge::new("pilot_xds", "Number of proxies connected over xDS.")?,
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
        };
        registry.register(Box::new(m.connected.clone()))?;
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
        for t in TypeUrl::ALL {
            // Make the series exist before the first push, so dashboards
            // and scrapes see zeros rather than nothing.
            m.pushes.with_label_values(&[t.short()]);
            m.rejects.with_label_values(&[t.short()]);
            m.bytes_sent.with_label_values(&[t.short()]);
            m.invalid.with_label_values(&[t.short()]);
            m.withheld.with_label_values(&[t.short()]);
        }
        Ok(m)
    }

    /// Metrics registered nowhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry has no duplicates")
    }
}
