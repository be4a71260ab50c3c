//! Errors from applying an [`Update`](crate::Update).

/// Why an update was refused. A refused update changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A service or endpoint failed validation.
    #[error("invalid update from {source_id}: {reason}")]
    Invalid {
        /// The source that sent the update.
        source_id: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
