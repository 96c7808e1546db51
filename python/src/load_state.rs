//! `LoadState`: the client end of the shared-memory load-completion flag.

use std::time::Duration;

use pegaflow_core::load_state::{LoadState as CoreLoadState, LoadStatus};
use pyo3::prelude::*;

use crate::errors::pegaflow_error;

/// Completion flag of one load, polled without a round trip to the server.
#[pyclass(module = "pegaflow._native", name = "LoadState", frozen)]
pub struct PyLoadState {
    pub(crate) inner: CoreLoadState,
}

#[pymethods]
impl PyLoadState {
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        let inner = CoreLoadState::create().map_err(|e| pegaflow_error(py, "PegaflowInternalError", e.to_string()))?;
        Ok(Self { inner })
    }

    /// Shared-memory name to pass with a load.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_owned()
    }

    /// "pending", "done" or "failed".
    fn status(&self) -> &'static str {
        match self.inner.status() {
            LoadStatus::Pending => "pending",
            LoadStatus::Done => "done",
            LoadStatus::Failed(_) => "failed",
        }
    }

    /// True once every byte is in place.
    fn is_done(&self) -> bool {
        self.inner.status() == LoadStatus::Done
    }

    /// The failure reason, or None.
    #[getter]
    fn error(&self) -> Option<String> {
        match self.inner.status() {
            LoadStatus::Failed(reason) => Some(reason),
            _ => None,
        }
    }

    /// Sets the state back to pending for another load.
    fn reset(&self) {
        self.inner.reset();
    }

    /// Blocks (without the GIL) until the load is done. Raises `PegaflowLoadError` if it
    /// failed and `PegaflowTimeout` after `timeout_s` seconds.
    #[pyo3(signature = (timeout_s = 30.0))]
    fn wait(&self, py: Python<'_>, timeout_s: f64) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(timeout_s.max(0.0)).unwrap_or(Duration::MAX);
        let status = py.detach(|| self.inner.wait(timeout, crate::client::caller_spin()));
        match status {
            LoadStatus::Done => Ok(()),
            LoadStatus::Failed(reason) => Err(pegaflow_error(py, "PegaflowLoadError", reason)),
            LoadStatus::Pending => {
                Err(pegaflow_error(py, "PegaflowTimeout", format!("load not done after {timeout_s} s")))
            }
        }
    }
}
