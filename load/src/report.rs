//! Results: percentiles and the table printed at the end of a run.

use std::fmt;

use serde::Serialize;

use crate::driver::Plan;
use meshreg_load::proxy::Mode;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) samples: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (empty gives zeros).
    pub(crate) fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1]
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
            samples: samples.len(),
        }
    }

    /// Per change, the time from its start to its arrival at the last
    /// proxy (`arrivals_ns`, 0 = never arrived: left out), in ms.
    pub(crate) fn of_arrivals(arrivals_ns: &[u64], starts_ns: &[u64]) -> Self {
        Self::of(
            arrivals_ns
                .iter()
                .zip(starts_ns)
                .filter(|(a, _)| **a > 0)
                .map(|(a, s)| a.saturating_sub(*s) as f64 / 1e6)
                .collect(),
        )
    }

    /// One measurement.
    pub(crate) fn single(ms: f64) -> Self {
        Self::of(vec![ms])
    }
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) profile: &'static str,
    pub(crate) mode: Mode,
    pub(crate) proxies: usize,
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    pub(crate) debounce_ms: u64,
    /// Time until the last proxy had the change (ms).
    pub(crate) latency: Option<Percentiles>,
    /// Bytes received per proxy (per change, for churn and add/remove).
    pub(crate) bytes_per_proxy: f64,
    /// Responses received per proxy (per change, for churn and add/remove).
    pub(crate) responses_per_proxy: f64,
    pub(crate) server_cpu_s: f64,
    pub(crate) fleet_cpu_s: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) wall_s: f64,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(scenario: &str, plan: &Plan) -> Self {
        Row {
            scenario: scenario.to_string(),
            profile: plan.profile.name,
            mode: plan.mode,
            proxies: plan.profile.proxies,
            services: plan.profile.services,
            endpoints: plan.profile.endpoints,
            debounce_ms: plan.debounce.after.as_millis() as u64,
            latency: None,
            bytes_per_proxy: 0.0,
            responses_per_proxy: 0.0,
            server_cpu_s: 0.0,
            fleet_cpu_s: 0.0,
            peak_rss_mb: 0.0,
            wall_s: 0.0,
            note: String::new(),
        }
    }

    /// The Markdown table header matching [`Row`]'s `Display`.
    pub(crate) fn header() -> &'static str {
        "| scenario | mode | p50 ms | p90 ms | p99 ms | max ms | bytes/proxy | resp/proxy | server CPU s (cores) | CPU ms/proxy | peak RSS MB | RSS KB/proxy | notes |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self
            .latency
            .clone()
            .unwrap_or_else(|| Percentiles::of(vec![]));
        let mode = match self.mode {
            Mode::Delta => "delta",
            Mode::Sotw => "sotw",
        };
        let cores = if self.wall_s > 0.0 {
            self.server_cpu_s / self.wall_s
        } else {
            0.0
        };
        write!(
            f,
            "| {} | {mode} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} ({:.2}) | {:.2} | {:.0} | {:.0} | {} |",
            self.scenario,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            self.bytes_per_proxy,
            self.responses_per_proxy,
            self.server_cpu_s,
            cores,
            self.server_cpu_s * 1e3 / self.proxies.max(1) as f64,
            self.peak_rss_mb,
            self.peak_rss_mb * 1e3 / self.proxies.max(1) as f64,
            self.note
        )
    }
}
