//! Errors from applying an [`Update`](crate::Update).

use crate::object::ObjectKey;
use crate::source::SourceId;

/// Why the registry refused an object. A refused object changes nothing;
/// the rest of its update is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An object failed the registry's checks.
    #[error("{source_id}: {key}: {reason}")]
    Invalid {
        /// The source that sent it.
        source_id: SourceId,
        /// The object.
        key: ObjectKey,
        /// What was wrong with it.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
