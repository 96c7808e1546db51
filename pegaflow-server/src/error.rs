//! The one mapping from engine errors to gRPC statuses, and the server's own errors.

use pegaflow_core::EngineError;
use pegaflow_core::device::DeviceError;
use pegaflow_core::shm::ShmError;
use tonic::Status;

/// Maps an engine error to the gRPC code a client can act on.
pub fn to_status(error: EngineError) -> Status {
    let message = error.to_string();
    match error {
        EngineError::InvalidArgument(_) | EngineError::InvalidLayout { .. } => Status::invalid_argument(message),
        EngineError::NotFound(_) => Status::not_found(message),
        EngineError::AlreadyExists(_) => Status::already_exists(message),
        EngineError::ResourceExhausted(_) => Status::resource_exhausted(message),
        EngineError::Unavailable(_) => Status::unavailable(message),
        EngineError::Device(DeviceError::Shm(ShmError::NotFound(_))) => Status::not_found(message),
        EngineError::Device(DeviceError::Shm(ShmError::InvalidName(_) | ShmError::TooSmall { .. }))
        | EngineError::Device(DeviceError::Unsupported(_)) => Status::invalid_argument(message),
        EngineError::Device(DeviceError::ShutDown(_)) => Status::unavailable(message),
        EngineError::Device(_) => Status::internal(message),
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad flags.
    #[error("{0}")]
    Config(String),
    /// The engine could not start (pool, threads).
    #[error("cannot start the engine: {0}")]
    Engine(#[from] pegaflow_core::EngineInitError),
    /// Binding or serving failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}
