//! `LoadState`: the client end of the shared-memory load-completion flag.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pegaflow_common::load_state::{LoadState as CoreLoadState, LoadStatus};
use pyo3::prelude::*;

use crate::descriptors::{Descriptors, Token};
use crate::errors::{ErrorClass, pegaflow_error};
use crate::waiting::{caller_spin, lock};

/// Completion flag of one load, polled without a round trip to the server.
#[pyclass(module = "pegaflow._native", name = "LoadState", frozen)]
pub struct PyLoadState {
    inner: CoreLoadState,
    /// The token the server knows this state by, and the connection that issued it.
    registered: Mutex<Option<(Token, Weak<Mutex<Descriptors>>)>>,
    /// Whether the session of the last load's instance is open (None: no session).
    server_alive: Mutex<Option<Arc<AtomicBool>>>,
}

impl PyLoadState {
    /// Whether the session the last load was sent under is still open (true without one).
    fn server_alive(&self) -> bool {
        lock(&self.server_alive).as_ref().is_none_or(|alive| alive.load(Ordering::Acquire))
    }

    /// The memfd to hand to the server.
    pub(crate) fn fd(&self) -> i32 {
        self.inner.memory().fd().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// The token valid on `descriptors`' live connection, if this state was handed over
    /// on it.
    pub(crate) fn token_on(&self, descriptors: &Arc<Mutex<Descriptors>>) -> Option<Token> {
        let registered = lock(&self.registered);
        let (token, owner) = registered.as_ref()?;
        if !Weak::ptr_eq(owner, &Arc::downgrade(descriptors)) {
            return None;
        }
        (lock(descriptors).live_connection() == Some(token.connection)).then_some(*token)
    }

    /// Records the token `descriptors` got for this state, releasing any previous one.
    pub(crate) fn remember(&self, token: Token, descriptors: &Arc<Mutex<Descriptors>>) {
        let previous = lock(&self.registered).replace((token, Arc::downgrade(descriptors)));
        if let Some((old, owner)) = previous
            && let Some(owner) = owner.upgrade()
        {
            lock(&owner).release(old);
        }
    }

    /// Ties waits to the liveness of the session the load was sent under.
    pub(crate) fn watch(&self, alive: Option<Arc<AtomicBool>>) {
        *lock(&self.server_alive) = alive;
    }
}

impl Drop for PyLoadState {
    fn drop(&mut self) {
        if let Some((token, owner)) = lock(&self.registered).take()
            && let Some(owner) = owner.upgrade()
        {
            lock(&owner).release(token);
        }
    }
}

#[pymethods]
impl PyLoadState {
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        let inner = CoreLoadState::create().map_err(|e| pegaflow_error(py, ErrorClass::Internal, e.to_string()))?;
        Ok(Self { inner, registered: Mutex::new(None), server_alive: Mutex::new(None) })
    }

    /// "pending", "done" or "failed", as the server wrote it. A load whose server went
    /// away stays "pending" here (a poller checks `EngineClient.session_alive`, and must
    /// not reuse this state: a server that is alive after all may still write it);
    /// `wait` raises for it.
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
        self.watch(None);
    }

    /// Blocks (without the GIL) until the load is done. Raises `PegaflowLoadError` if it
    /// failed or the server went away (its session closed) before it completed, and
    /// `PegaflowTimeout` after `timeout_s` seconds.
    #[pyo3(signature = (timeout_s = 30.0))]
    fn wait(&self, py: Python<'_>, timeout_s: f64) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(timeout_s.max(0.0)).unwrap_or(Duration::MAX);
        let status = py.detach(|| self.inner.wait(timeout, caller_spin(), &|| self.server_alive()));
        match status {
            LoadStatus::Done => Ok(()),
            LoadStatus::Failed(reason) => Err(pegaflow_error(py, ErrorClass::LoadFailed, reason)),
            LoadStatus::Pending => {
                Err(pegaflow_error(py, ErrorClass::Timeout, format!("load not done after {timeout_s} s")))
            }
        }
    }
}
