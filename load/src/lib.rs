//! `meshreg-load` as a library: the simulated Envoy proxy ([`proxy`]),
//! reusable by any test that needs a real ADS client (delta or SotW) which
//! records exactly what it holds, and the cross-process clock ([`clock`]).
//! The `meshreg-load` binary (fleet, driver, scenarios) is built on it.
//!
//! A proxy behaves like Envoy: wildcard CDS, then EDS for every EDS cluster
//! it receives; every response ACKed with its nonce (or NACKed, when told
//! to reject a resource); on a delta reconnect, `initial_resource_versions`
//! for what it holds. Its [`proxy::View`] holds a digest computed the way the
//! server computes its snapshot's, so "this proxy holds exactly the
//! snapshot" is one comparison.

pub mod clock;
pub mod proxy;
mod wire;
