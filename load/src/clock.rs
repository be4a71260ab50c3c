//! A clock shared by the driver and the proxy fleet: CLOCK_MONOTONIC in
//! nanoseconds, comparable across processes on one machine (unlike
//! `std::time::Instant`, which cannot leave its process).

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}
