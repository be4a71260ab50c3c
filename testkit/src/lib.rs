//! Protocol-faithful fakes of the platforms meshreg reads, for the tests
//! and benchmarks that need faults on demand or a platform of a given size
//! without starting the real program. Each fake serves the real protocol
//! (the real client talks to it unchanged); the real programs, built by
//! `scripts/peers.sh`, stay the reference in the end-to-end tests.
//!
//! - [`fake_kube`]: a Kubernetes API server (list, watch, `410 Gone`,
//!   dropped watches, `500`s).

pub mod fake_kube;
