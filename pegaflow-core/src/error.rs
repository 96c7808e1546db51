//! The engine's error type. Variants say what the caller can do; the server maps each
//! to one gRPC code (`pegaflow-server/src/error.rs`).

use crate::device::DeviceError;
use crate::layout::LayoutError;

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
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub(crate) fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
}
