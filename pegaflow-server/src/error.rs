//! The one mapping from engine errors to gRPC statuses, and the server's own errors.

use pegaflow_core::EngineError;
use pegaflow_core::device::DeviceError;
use pegaflow_core::shm::ShmError;
use tonic::Status;

/// Longest message a status carries, in bytes: gRPC sends it in an HTTP/2 header, and a
/// client refuses a header list past its limit (16 KiB by default).
const MAX_STATUS_MESSAGE: usize = 4096;

/// Maps an engine error to the gRPC code a client can act on.
pub fn to_status(error: EngineError) -> Status {
    let mut message = error.to_string();
    if message.len() > MAX_STATUS_MESSAGE {
        let mut end = MAX_STATUS_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    match error {
        EngineError::InvalidArgument(_) | EngineError::InvalidLayout { .. } => Status::invalid_argument(message),
        EngineError::NotFound(_) => Status::not_found(message),
        EngineError::AlreadyExists(_) => Status::already_exists(message),
        EngineError::PermissionDenied(_) => Status::permission_denied(message),
        EngineError::ResourceExhausted(_) => Status::resource_exhausted(message),
        EngineError::Unavailable(_) => Status::unavailable(message),
        EngineError::Device(
            DeviceError::Shm(
                ShmError::NotSealed | ShmError::NotReadWrite | ShmError::Unsupported(_) | ShmError::TooSmall { .. },
            )
            | DeviceError::Unsupported(_),
        ) => Status::invalid_argument(message),
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
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_has_its_code_and_messages_stay_small() {
        let cases = [
            (EngineError::InvalidArgument("x".into()), tonic::Code::InvalidArgument),
            (EngineError::NotFound("x".into()), tonic::Code::NotFound),
            (EngineError::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (EngineError::PermissionDenied("x".into()), tonic::Code::PermissionDenied),
            (EngineError::ResourceExhausted("x".into()), tonic::Code::ResourceExhausted),
            (EngineError::Unavailable("x".into()), tonic::Code::Unavailable),
            (EngineError::Device(DeviceError::Shm(ShmError::NotSealed)), tonic::Code::InvalidArgument),
            (EngineError::Device(DeviceError::Cuda("x".into())), tonic::Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(error).code(), code);
        }
        let status = to_status(EngineError::InvalidArgument("é".repeat(100_000)));
        assert!(status.message().len() <= MAX_STATUS_MESSAGE + 3);
    }
}
