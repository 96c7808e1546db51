//! The one mapping from gRPC statuses (and hand-over failures) to the Python exceptions
//! of `pegaflow.errors`.
//!
//! The classes are defined in Python so they can derive from both `PegaflowError` and
//! a stdlib base (`except ValueError` works); [`ErrorClass`] names each one once, and each
//! class object is looked up once per process and kept.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use tonic::{Code, Status};

use crate::descriptors::HandOverError;

/// The exception classes of `pegaflow.errors` the binding raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// `PegaflowInvalidArgument` (ValueError).
    InvalidArgument,
    /// `PegaflowNotFound` (LookupError).
    NotFound,
    /// `PegaflowAlreadyExists`.
    AlreadyExists,
    /// `PegaflowPermissionDenied` (PermissionError).
    PermissionDenied,
    /// `PegaflowResourceExhausted`.
    ResourceExhausted,
    /// `PegaflowUnavailable` (ConnectionError).
    Unavailable,
    /// `PegaflowTimeout` (TimeoutError).
    Timeout,
    /// `PegaflowInternalError`.
    Internal,
    /// `PegaflowLoadError`.
    LoadFailed,
}

/// The class objects, by [`ErrorClass`] discriminant.
static CLASSES: [PyOnceLock<Py<PyType>>; 9] = [const { PyOnceLock::new() }; 9];

impl ErrorClass {
    fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "PegaflowInvalidArgument",
            Self::NotFound => "PegaflowNotFound",
            Self::AlreadyExists => "PegaflowAlreadyExists",
            Self::PermissionDenied => "PegaflowPermissionDenied",
            Self::ResourceExhausted => "PegaflowResourceExhausted",
            Self::Unavailable => "PegaflowUnavailable",
            Self::Timeout => "PegaflowTimeout",
            Self::Internal => "PegaflowInternalError",
            Self::LoadFailed => "PegaflowLoadError",
        }
    }

    /// The class of a gRPC status code.
    fn of(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::PermissionDenied | Code::Unauthenticated => Self::PermissionDenied,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::Unavailable | Code::Cancelled => Self::Unavailable,
            Code::DeadlineExceeded => Self::Timeout,
            _ => Self::Internal,
        }
    }
}

/// Builds `pegaflow.errors.<class>(message)`.
pub fn pegaflow_error(py: Python<'_>, class: ErrorClass, message: String) -> PyErr {
    let class = CLASSES[class as usize].import(py, "pegaflow.errors", class.name());
    match class {
        Ok(class) => match class.call1((message.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// Maps a gRPC status to the matching exception, keeping the server's message. A status
/// made on this side from a broken connection (it carries the transport error as its
/// source; the server's own statuses never do) means the server is unreachable or died
/// mid-call: `PegaflowUnavailable`, whatever code tonic gave it.
pub fn status_to_pyerr(py: Python<'_>, status: &Status) -> PyErr {
    let local_failure = std::error::Error::source(status).is_some();
    let class = match status.code() {
        Code::Unknown | Code::Internal if local_failure => ErrorClass::Unavailable,
        code => ErrorClass::of(code),
    };
    let mut message =
        if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().to_owned() };
    if let Some(source) = std::error::Error::source(status) {
        message = format!("{message}: {source}");
    }
    pegaflow_error(py, class, message)
}

/// Maps a failed memory hand-over to its exception.
pub fn hand_over_error(py: Python<'_>, error: HandOverError) -> PyErr {
    match error {
        HandOverError::Unreachable(message) => pegaflow_error(py, ErrorClass::Unavailable, message),
        HandOverError::ServerChanged => pegaflow_error(
            py,
            ErrorClass::Unavailable,
            "the server's Unix socket belongs to another server than the endpoint's: host memory can only be \
             handed over on the server's host"
                .into(),
        ),
        HandOverError::Refused { code, message } => {
            pegaflow_error(py, ErrorClass::of(Code::from_i32(code as i32)), message)
        }
    }
}
