//! The one mapping from engine errors to gRPC statuses, and the server's own errors.

use pegaflow_core::{EngineError, ErrorCategory, shown};
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
    match error.category() {
        ErrorCategory::Invalid => Status::invalid_argument(message),
        ErrorCategory::NotFound => Status::not_found(message),
        ErrorCategory::AlreadyExists => Status::already_exists(message),
        ErrorCategory::PermissionDenied => Status::permission_denied(message),
        ErrorCategory::Exhausted => Status::resource_exhausted(message),
        ErrorCategory::Unavailable => Status::unavailable(message),
        ErrorCategory::Internal => Status::internal(message),
    }
}

/// Logs a failed operation (with its instance and lease, so the line can be found from
/// either) and converts the error: server-side failures at warn, client faults (bad
/// input, unknown ids, caps: counted by `pegaflow_rpc_duration_seconds{code}`) at debug.
pub fn failed(op: &'static str, instance: &str, lease: Option<&str>, error: EngineError) -> Status {
    let (instance, lease) = (shown(instance), lease.map(shown).map(|l| l.to_string()).unwrap_or_default());
    match error.category() {
        ErrorCategory::Internal | ErrorCategory::Unavailable => {
            tracing::warn!(op, %instance, %lease, %error, "failed")
        }
        _ => tracing::debug!(op, %instance, %lease, %error, "refused"),
    }
    to_status(error)
}

/// Rewrites tonic's `INTERNAL` for a request frame it could not read (a message flagged
/// compressed without an encoding, a bad flag, a body that ends inside a message or holds
/// no message) to
/// `INVALID_ARGUMENT`: the frame is the client's fault. Those statuses come before any
/// handler, as trailers-only responses, so the header is all there is to change.
pub fn client_faults_are_invalid<B>(mut response: http::Response<B>) -> http::Response<B> {
    // The start of tonic's messages, percent-encoded as they travel in the header.
    const FRAMING: [&[u8]; 3] =
        [b"protocol%20error", b"Unexpected%20EOF%20decoding%20stream", b"Missing%20request%20message"];
    let headers = response.headers_mut();
    let framing = headers.get("grpc-message").is_some_and(|m| FRAMING.iter().any(|p| m.as_bytes().starts_with(p)));
    if framing && headers.get("grpc-status").is_some_and(|s| s == "13") {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    response
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
    use pegaflow_common::shm::ShmError;
    use pegaflow_core::device::DeviceError;

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
            (
                EngineError::Device(DeviceError::Shm(ShmError::TooLarge { len: 2, max: 1 })),
                tonic::Code::ResourceExhausted,
            ),
            (EngineError::Device(DeviceError::ShutDown("host")), tonic::Code::Unavailable),
            (EngineError::Device(DeviceError::Cuda("x".into())), tonic::Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(error).code(), code);
        }
        let status = to_status(EngineError::InvalidArgument("é".repeat(100_000)));
        assert!(status.message().len() <= MAX_STATUS_MESSAGE + 3);
    }

    #[test]
    fn framing_errors_become_invalid_argument_and_nothing_else_changes() {
        let rewrite = |status: &str, message: &str| {
            let response = http::Response::builder()
                .header("grpc-status", status)
                .header("grpc-message", message)
                .body(())
                .unwrap();
            client_faults_are_invalid(response).headers()["grpc-status"].to_str().unwrap().to_owned()
        };
        let flag = "protocol%20error:%20received%20message%20with%20compressed-flag%20but%20no%20grpc-encoding";
        assert_eq!(rewrite("13", flag), "3");
        assert_eq!(rewrite("13", "Unexpected%20EOF%20decoding%20stream."), "3");
        assert_eq!(rewrite("13", "Missing%20request%20message."), "3");
        assert_eq!(rewrite("13", "CUDA%20error"), "13", "a real internal error stays");
        assert_eq!(rewrite("5", flag), "5");
    }
}
