//! The one mapping from gRPC statuses to the Python exceptions of `pegaflow.errors`.
//!
//! The classes are defined in Python so they can derive from both `PegaflowError` and
//! a stdlib base (`except ValueError` works); Rust looks them up by name.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tonic::{Code, Status};

/// Builds `pegaflow.errors.<class_name>(message)`.
pub fn pegaflow_error(py: Python<'_>, class_name: &str, message: String) -> PyErr {
    let class = py.import("pegaflow.errors").and_then(|m| m.getattr(class_name));
    match class {
        Ok(class) => match class.call1((message.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// Maps a gRPC status to the matching exception, keeping the server's message.
pub fn status_to_pyerr(py: Python<'_>, status: &Status) -> PyErr {
    let class = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => "PegaflowInvalidArgument",
        Code::NotFound => "PegaflowNotFound",
        Code::AlreadyExists => "PegaflowAlreadyExists",
        Code::ResourceExhausted => "PegaflowResourceExhausted",
        Code::Unavailable | Code::Cancelled => "PegaflowUnavailable",
        Code::DeadlineExceeded => "PegaflowTimeout",
        _ => "PegaflowInternalError",
    };
    let message =
        if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().to_owned() };
    pegaflow_error(py, class, message)
}
