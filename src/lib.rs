//! `meshreg`, the daemon as a library: discovers services from the
//! configured sources, merges them into one registry and serves them to
//! Envoy and proxyless gRPC over xDS.
//!
//! # Layout
//!
//! - `config`: the YAML config file ([`Config`]), validated before anything
//!   binds.
//! - `app`: [`App`], the one place that wires registry, sources, xDS and
//!   HTTP; used by the `meshreg` binary, `meshreg-load` and tests.
//! - `store`: the registry's writer on its own thread, and the metrics read
//!   from its state.
//! - `http`: `/metrics`, `/ready`, `/healthz`, the debug endpoints;
//!   `debug`: their JSON documents, shared with `ctl`.
//! - `ctl`: `meshreg ctl`, istioctl's inspection commands for a running
//!   daemon, over its HTTP port.
//! - `signal`: SIGTERM/SIGINT (shutdown) and SIGHUP (reload).
//!
//! `anyhow` is for the binary only; this library has its own [`Error`].

mod app;
pub mod config;
pub mod ctl;
pub mod debug;
mod etcd_sync;
mod federation;
mod http;
mod memory;
pub mod signal;
mod store;
mod vm;

pub use app::{App, Error, Result, check_sources};
pub use config::{Config, ConfigError};
