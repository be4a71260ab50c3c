//! End-to-end tests: the `meshreg` binary cargo built for this test run,
//! driven through its ServiceEntry directory and observed through a real
//! Envoy's admin API and real traffic. One module per scenario; `support`
//! holds the harness.
//!
//! Envoy comes from `$ENVOY_BIN` or `.venv/bin/envoy` (scripts/test.sh
//! installs it); istiod, kube-apiserver and etcd from scripts/peers.sh
//! (`peers` starts them).

// Test helpers are `pub` for the scenario modules; the crate exports nothing.
#![allow(unreachable_pub)]

mod peers;
mod prometheus;
mod support;

mod bookinfo;
mod check;
mod consul;
mod ctl;
mod dns;
mod edits;
mod fake_consul;
mod in_process;
mod istiod;
mod kubernetes;
mod leds;
mod limits;
mod metrics;
mod nacks;
mod proxyless;
mod reload;
mod scoping;
mod startup;
mod subsets;
mod sweep;
mod tls;
mod traffic;
mod unserved;
mod vm;
mod xds_tls;
