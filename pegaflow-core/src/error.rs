//! The engine's error type. Variants say what the caller can do; the server maps each
//! to one gRPC code (`pegaflow-server/src/error.rs`).

use crate::device::DeviceError;
use crate::layout::LayoutError;

/// What a caller can do about an error. Each edge (gRPC, the descriptor protocol) maps
/// categories, never variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCategory {
    /// Fix the request (permanent).
    Invalid,
    /// The named thing does not exist (or no longer).
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// Someone else's instance, rank or memory (permanent).
    PermissionDenied,
    /// A capacity or cap is reached (transient unless the request is larger than it).
    Exhausted,
    /// The server is stopping or a worker is gone (transient).
    Unavailable,
    /// A device or OS failure, or a bug.
    Internal,
}

/// Result alias for engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything an engine call can fail with. A failed call changes no state.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed (permanent: fix the request).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A layout that cannot describe a KV tensor (permanent).
    #[error("invalid layout for layer {layer}: {source}")]
    InvalidLayout {
        /// Layer whose layout was rejected.
        layer: u32,
        /// What is wrong with it.
        #[source]
        source: LayoutError,
    },
    /// The instance, rank or lease does not exist (or expired).
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller does not own what it tries to use or change (another client's instance,
    /// memory handed over by another user). Permanent.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The rank is already registered.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Not enough cache capacity: larger than the pool, or nothing evictable (transient
    /// unless larger than the pool).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A device could not map memory or copy bytes.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The engine is shutting down (transient).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl EngineError {
    /// What the caller can do about it.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::InvalidArgument(_) | Self::InvalidLayout { .. } => ErrorCategory::Invalid,
            Self::NotFound(_) => ErrorCategory::NotFound,
            Self::AlreadyExists(_) => ErrorCategory::AlreadyExists,
            Self::PermissionDenied(_) => ErrorCategory::PermissionDenied,
            Self::ResourceExhausted(_) => ErrorCategory::Exhausted,
            Self::Unavailable(_) => ErrorCategory::Unavailable,
            Self::Device(e) => e.category(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub(crate) fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }

    pub(crate) fn denied(msg: impl Into<String>) -> Self {
        Self::PermissionDenied(msg.into())
    }
}

/// Longest client-supplied id or name echoed in an error message, in characters.
pub const MAX_SHOWN_CHARS: usize = 128;

/// A client-supplied id or name as error messages show it: quoted, and cut after
/// [`MAX_SHOWN_CHARS`] characters (a huge id must not make a huge error: gRPC carries
/// messages in HTTP/2 headers, whose size is limited).
pub struct Shown<'a>(pub &'a str);

/// Shows `text` quoted and truncated, for error messages.
pub fn shown(text: &str) -> Shown<'_> {
    Shown(text)
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(MAX_SHOWN_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((end, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..end], self.0.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_are_cut_in_messages() {
        assert_eq!(shown("abc").to_string(), "\"abc\"");
        let long = "é".repeat(20_000);
        let text = EngineError::not_found(format!("unknown instance {}", shown(&long))).to_string();
        assert!(text.chars().count() < 200, "{}", text.len());
        assert!(text.ends_with("(40000 bytes)"), "{text}");
    }
}
