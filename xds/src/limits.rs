//! What one peer may make the xDS server hold ([`Limits`]), and the shared
//! budget of bytes buffered for incomplete requests ([`Budget`]).
//!
//! Every limit refuses or closes the offending peer only, with gRPC's
//! `RESOURCE_EXHAUSTED` (or a closed connection before HTTP/2 starts), is
//! counted in `meshreg_xds_limit_hits_total{limit}` and logged at most
//! once a minute per limit (with the count since the last line), so a
//! flood cannot flood the log.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::Notify;

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
/// share per peer address.
///
/// When the shared buffer is full, a stream whose incomplete request is
/// small (at most [`SMALL_REQUEST`] buffered) is not refused: the streams
/// holding the most are closed instead (evicted, `RESOURCE_EXHAUSTED`),
/// largest first, until it fits. So streams that half-send large requests
/// from many addresses cannot hold every other proxy's requests (their
/// ACKs are small): `meshreg-load flood` showed such a flood stalling a
/// real Envoy's updates for 30 s without it.
///
/// The tables hold one entry per open stream and per address with bytes
/// reserved; every operation is O(log streams).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    inner: Arc<Mutex<Reserved>>,
    max: usize,
    max_per_ip: usize,
}

/// A request this small (bytes buffered so far, this chunk included) may
/// evict larger ones when the shared buffer is full: Envoy's ACKs and
/// subscription changes are far smaller.
pub(crate) const SMALL_REQUEST: usize = 1024 * 1024;

#[derive(Debug, Default)]
struct Reserved {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    holders: HashMap<u64, HolderState>,
    /// (bytes, holder) of every holder with bytes: the largest last.
    by_size: BTreeSet<(usize, u64)>,
    next_id: u64,
}

#[derive(Debug)]
struct HolderState {
    bytes: usize,
    peer: Option<IpAddr>,
    evicted: Arc<Evicted>,
}

#[derive(Debug, Default)]
struct Evicted {
    flag: AtomicBool,
    notify: Notify,
}

impl Reserved {
    fn set_bytes(&mut self, id: u64, bytes: usize) {
        let Some(h) = self.holders.get_mut(&id) else {
            return;
        };
        self.by_size.remove(&(h.bytes, id));
        h.bytes = bytes;
        if bytes > 0 {
            self.by_size.insert((bytes, id));
        }
    }

    /// Takes `n` bytes back from `id`'s reservation (at most what it holds).
    fn give_back(&mut self, id: u64, n: usize) {
        let Some(h) = self.holders.get(&id) else {
            return;
        };
        let (n, peer, left) = (n.min(h.bytes), h.peer, h.bytes - n.min(h.bytes));
        self.total -= n;
        if let Some(ip) = peer
            && let Some(held) = self.per_ip.get_mut(&ip)
        {
            *held = held.saturating_sub(n);
            if *held == 0 {
                self.per_ip.remove(&ip);
            }
        }
        self.set_bytes(id, left);
    }
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

    /// A holder of reservations for one stream of `peer` (`None`: not
    /// counted per address); what it holds is given back when it drops.
    pub(crate) fn holder(&self, peer: Option<IpAddr>) -> Holder {
        let mut r = self.lock();
        r.next_id += 1;
        let id = r.next_id;
        let evicted = Arc::new(Evicted::default());
        r.holders.insert(
            id,
            HolderState {
                bytes: 0,
                peer,
                evicted: evicted.clone(),
            },
        );
        Holder {
            budget: self.clone(),
            id,
            peer,
            evicted,
        }
    }

    /// Bytes reserved now, in all and by `peer`.
    #[cfg(test)]
    pub(crate) fn used(&self, peer: IpAddr) -> (usize, usize) {
        let r = self.lock();
        (r.total, r.per_ip.get(&peer).copied().unwrap_or(0))
    }
}

/// One stream's reservations in a [`Budget`].
#[derive(Debug)]
pub(crate) struct Holder {
    budget: Budget,
    id: u64,
    peer: Option<IpAddr>,
    evicted: Arc<Evicted>,
}

impl Holder {
    /// Reserves `n` more bytes; false (nothing reserved) when that would
    /// pass this address's share, or the shared buffer when this stream's
    /// request is not small or nothing larger is left to evict, or when
    /// this holder was evicted.
    pub(crate) fn try_reserve(&self, n: usize) -> bool {
        let b = &self.budget;
        let mut r = b.lock();
        if self.evicted.flag.load(Ordering::Acquire) {
            return false;
        }
        let own = r.holders.get(&self.id).map_or(0, |h| h.bytes);
        if let Some(ip) = self.peer {
            let held = r.per_ip.get(&ip).copied().unwrap_or(0);
            if held.checked_add(n).is_none_or(|h| h > b.max_per_ip) {
                return false;
            }
        }
        let wanted = own.saturating_add(n);
        while r.total.checked_add(n).is_none_or(|t| t > b.max) {
            // Full: a small request evicts the largest holder, if larger.
            if wanted > SMALL_REQUEST {
                return false;
            }
            let Some(&(bytes, victim)) = r.by_size.iter().next_back() else {
                return false;
            };
            if victim == self.id || bytes <= wanted {
                return false;
            }
            r.give_back(victim, bytes);
            if let Some(h) = r.holders.get(&victim) {
                h.evicted.flag.store(true, Ordering::Release);
                h.evicted.notify.notify_one();
            }
        }
        r.total += n;
        if let Some(ip) = self.peer {
            *r.per_ip.entry(ip).or_insert(0) += n;
        }
        r.set_bytes(self.id, wanted);
        true
    }

    /// Gives back `n` reserved bytes (at most what it holds).
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.budget.lock().give_back(self.id, n);
        }
    }

    /// Completes when this holder was evicted to make room for a small
    /// request (never otherwise).
    pub(crate) async fn evicted(&self) {
        loop {
            if self.evicted.flag.load(Ordering::Acquire) {
                return;
            }
            self.evicted.notify.notified().await;
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let mut r = self.budget.lock();
        r.give_back(self.id, usize::MAX);
        r.holders.remove(&self.id);
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
        let (ha, hb) = (budget.holder(a), budget.holder(Some(b)));
        assert!(ha.try_reserve(60));
        assert!(hb.try_reserve(40));
        assert_eq!(budget.used(b), (100, 40));
        ha.release(60);
        assert!(hb.try_reserve(10));
        assert_eq!(budget.used(b), (50, 50));
        drop(hb);
        assert_eq!(budget.used(b), (0, 0));
        assert!(budget.inner.lock().unwrap().per_ip.is_empty());
        drop(ha);
        assert!(budget.inner.lock().unwrap().holders.is_empty());
    }

    /// One address cannot take more than its share: another still gets
    /// room while the first is refused.
    #[test]
    fn one_address_gets_its_share_only() {
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let budget = Budget::new(100, 30);
        let (ha, hb) = (budget.holder(Some(a)), budget.holder(Some(b)));
        assert!(ha.try_reserve(30));
        assert!(!ha.try_reserve(1));
        assert!(hb.try_reserve(30));
        assert_eq!(budget.used(a), (60, 30));
    }

    /// When the buffer is full, a small request evicts the largest holder
    /// (which learns it), and a large one is refused.
    #[tokio::test]
    async fn a_small_request_evicts_the_largest_holder() {
        let big = 3 * SMALL_REQUEST;
        let budget = Budget::new(2 * big, 2 * big);
        let (h1, h2) = (budget.holder(None), budget.holder(None));
        assert!(h1.try_reserve(big));
        assert!(h2.try_reserve(big - 1));
        let large = budget.holder(None);
        assert!(
            !large.try_reserve(SMALL_REQUEST + 1),
            "a large request is refused"
        );
        let small = budget.holder(None);
        assert!(small.try_reserve(100));
        // h1 held the most: evicted, its bytes given back.
        tokio::time::timeout(std::time::Duration::from_secs(1), h1.evicted())
            .await
            .expect("h1 learns it was evicted");
        assert!(!h1.try_reserve(1), "an evicted holder reserves nothing");
        let r = budget.inner.lock().unwrap();
        assert_eq!(r.total, big - 1 + 100);
        drop(r);
        drop(h1);
        assert_eq!(budget.inner.lock().unwrap().total, big - 1 + 100);
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
