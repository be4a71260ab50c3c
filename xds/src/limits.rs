//! What one peer may make the xDS server hold ([`Limits`]), and the shared
//! budget of bytes buffered for incomplete requests ([`Budget`]).
//!
//! Every limit refuses or closes the offending peer only, with gRPC's
//! `RESOURCE_EXHAUSTED` (or a closed connection before HTTP/2 starts), is
//! counted in `meshreg_xds_limit_hits_total{limit}` and logged at most
//! once a minute per limit (with the count since the last line), so a
//! flood cannot flood the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `limit` label values of `meshreg_xds_limit_hits_total`.
pub(crate) const NAMES: [&str; 8] = [
    "connections",
    "connections_per_ip",
    "preface_timeout",
    "first_request_timeout",
    "names_per_stream",
    "request_bytes",
    "buffered_bytes",
    "requests_per_second",
];

/// Limits on what peers of the xDS port may make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections in all (further ones are closed at once).
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Time a new connection has to send the HTTP/2 connection preface.
    pub preface_timeout: Duration,
    /// Time a new stream has to send its first complete request.
    pub first_request_timeout: Duration,
    /// Concurrent streams per connection (HTTP/2 `MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Resource names one stream may subscribe to, per type.
    pub max_names_per_stream: usize,
    /// Size of one request message.
    pub max_request_bytes: usize,
    /// Bytes buffered for incomplete requests, all streams together.
    pub max_buffered_bytes: usize,
    /// Bytes buffered for incomplete requests of the streams of one peer
    /// address: one address cannot take the whole shared buffer from the
    /// others (found by `meshreg-load flood`: 64 half-sent 4 MiB requests
    /// from one address filled it and held every other proxy's requests,
    /// ACKs included, for 30 s).
    pub max_buffered_bytes_per_ip: usize,
    /// Requests per second one stream may send (averaged over 10 s; an
    /// Envoy sends about one per response).
    pub max_requests_per_second: u32,
}

impl Default for Limits {
    /// Defaults sized for 10,000 proxies on one daemon: Istio sets none of
    /// these on istiod's xDS port (it relies on mTLS), gRPC's own default
    /// message limit is 4 MiB, and Envoy opens one ADS stream per
    /// connection.
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_ip: 1_000,
            preface_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 100,
            max_names_per_stream: 100_000,
            max_request_bytes: 4 * 1024 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            max_buffered_bytes_per_ip: 32 * 1024 * 1024,
            max_requests_per_second: 1_000,
        }
    }
}

/// Bytes reserved for incomplete requests, shared by every stream, with a
/// share per peer address. The per-address table holds only addresses
/// with bytes reserved now (at most one entry per open connection).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    inner: Arc<Mutex<Reserved>>,
    max: usize,
    max_per_ip: usize,
}

#[derive(Debug, Default)]
struct Reserved {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Budget {
    pub(crate) fn new(max: usize, max_per_ip: usize) -> Self {
        Budget {
            inner: Arc::default(),
            max,
            max_per_ip,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reserved> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `n` bytes for a stream of `peer` (`None`: not counted per
    /// address); false (nothing reserved) when that would pass the budget
    /// or `peer`'s share of it.
    pub(crate) fn try_reserve(&self, peer: Option<IpAddr>, n: usize) -> bool {
        let mut r = self.lock();
        let Some(total) = r.total.checked_add(n).filter(|&t| t <= self.max) else {
            return false;
        };
        if let Some(ip) = peer {
            let held = r.per_ip.get(&ip).copied().unwrap_or(0);
            match held.checked_add(n).filter(|&h| h <= self.max_per_ip) {
                Some(h) => {
                    r.per_ip.insert(ip, h);
                }
                None => return false,
            }
        }
        r.total = total;
        true
    }

    /// Gives back `n` bytes reserved for a stream of `peer`.
    pub(crate) fn release(&self, peer: Option<IpAddr>, n: usize) {
        if n == 0 {
            return;
        }
        let mut r = self.lock();
        r.total = r.total.saturating_sub(n);
        if let Some(ip) = peer
            && let Some(held) = r.per_ip.get_mut(&ip)
        {
            *held = held.saturating_sub(n);
            if *held == 0 {
                r.per_ip.remove(&ip);
            }
        }
    }

    /// Bytes reserved now, in all and by `peer`.
    #[cfg(test)]
    pub(crate) fn used(&self, peer: IpAddr) -> (usize, usize) {
        let r = self.lock();
        (r.total, r.per_ip.get(&peer).copied().unwrap_or(0))
    }
}

/// Logs a limit's hits at most once a minute, with how many there were.
#[derive(Debug)]
pub(crate) struct HitLog {
    name: &'static str,
    since_last: AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

/// How often a limit's hits are logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

impl HitLog {
    pub(crate) const fn new(name: &'static str) -> Self {
        HitLog {
            name,
            since_last: AtomicU64::new(0),
            last: std::sync::Mutex::new(None),
        }
    }

    /// Counts a hit; logs it (with `detail`) when the last line is a
    /// minute old.
    pub(crate) fn hit(&self, metrics: &crate::Metrics, detail: &dyn std::fmt::Display) {
        metrics.limit_hits.with_label_values(&[self.name]).inc();
        self.note(detail);
    }

    /// Logs `detail` when the last line is a minute old (the caller counts).
    pub(crate) fn note(&self, detail: &dyn std::fmt::Display) {
        let n = self.since_last.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            self.since_last.store(0, Ordering::Relaxed);
            tracing::warn!(
                what = self.name,
                times = n,
                "xDS peer refused: {detail} (logged at most once a minute)"
            );
        }
    }
}

/// A per-stream request rate limit: a bucket of `10 × rate` requests
/// refilled at `rate` a second.
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub(crate) fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        RateLimit {
            rate,
            capacity: rate * 10.0,
            tokens: rate * 10.0,
            at: Instant::now(),
        }
    }

    /// Takes one request; false when the stream is over its rate.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_max_and_takes_back() {
        let (a, b) = (
            Some("10.0.0.1".parse().unwrap()),
            "10.0.0.2".parse().unwrap(),
        );
        let budget = Budget::new(100, 100);
        assert!(budget.try_reserve(a, 60));
        assert!(!budget.try_reserve(Some(b), 41));
        assert!(budget.try_reserve(Some(b), 40));
        assert_eq!(budget.used(b), (100, 40));
        budget.release(a, 60);
        assert!(budget.try_reserve(Some(b), 10));
        assert_eq!(budget.used(b), (50, 50));
        budget.release(Some(b), 50);
        assert_eq!(budget.used(b), (0, 0));
        assert!(budget.inner.lock().unwrap().per_ip.is_empty());
    }

    /// One address cannot take more than its share: another still gets
    /// room while the first is refused.
    #[test]
    fn one_address_gets_its_share_only() {
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let budget = Budget::new(100, 30);
        assert!(budget.try_reserve(Some(a), 30));
        assert!(!budget.try_reserve(Some(a), 1));
        assert!(budget.try_reserve(Some(b), 30));
        assert_eq!(budget.used(a), (60, 30));
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_its_rate() {
        let mut r = RateLimit::new(10);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(r.take(t0));
        }
        assert!(!r.take(t0));
        // A second later, ten more.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            assert!(r.take(t1));
        }
        assert!(!r.take(t1));
    }
}
