//! [`Error`]: why an adapter stopped for good.
//!
//! Only configuration problems live here. Problems with the source itself (a
//! malformed file, a directory that does not exist yet, a failed read) are
//! not errors of `run`: the adapter logs them, counts them in
//! `meshreg_source_errors_total` and retries.

use std::path::PathBuf;

/// Why an adapter could not run. Every variant is a configuration error:
/// retrying with the same configuration fails the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field has a value the adapter cannot work with.
    #[error("invalid {adapter} adapter configuration: {field}: {reason}")]
    Config {
        /// The adapter kind, e.g. `serviceentry`.
        adapter: &'static str,
        /// The configuration field, e.g. `rescan_interval`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured directory path exists but is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The configured path.
        path: PathBuf,
    },
}

impl Error {
    /// Whether running again with the same configuration could succeed.
    /// Always `false` today: source problems are retried inside the adapter
    /// and never surface as an [`Error`].
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config { .. } | Error::NotADirectory { .. } => false,
        }
    }
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
