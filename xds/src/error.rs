//! Errors of the xDS layer.

/// Why the xDS server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gRPC transport failed (bind or serve).
    #[error("xDS transport: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
