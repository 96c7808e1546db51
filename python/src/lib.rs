//! `pegaflow._native`: the PyO3 extension of the `pegaflow-llm` package.
//!
//! A thin binding: it converts arguments, releases the GIL around blocking calls and maps
//! errors; all logic lives in `pegaflow-core` and `pegaflow-server`.

mod client;
mod descriptors;
mod errors;
mod load_state;
mod transport;
mod types;
mod waiting;

use pyo3::prelude::*;

// Same allocator as the server binary (see pegaflow-server/src/bin): the server also runs
// inside this extension through `run_server`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the PegaFlow server with command-line `argv` (program name first) until SIGINT
/// or SIGTERM; returns the exit code. The GIL is released while it runs.
#[pyfunction]
fn run_server(py: Python<'_>, argv: Vec<String>) -> i32 {
    let code = py.detach(|| pegaflow_server::run_cli(argv));
    // The server already handled SIGINT/SIGTERM and stopped cleanly; Python's own handler
    // saw the same signal and would raise KeyboardInterrupt on return. Consume it here.
    let _ = py.check_signals();
    code
}

#[pymodule(name = "_native")]
fn pegaflow_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::PyEngineClient>()?;
    m.add_class::<load_state::PyLoadState>()?;
    m.add_class::<types::KvLayer>()?;
    m.add_class::<types::SaveResult>()?;
    m.add_class::<types::QueryResult>()?;
    m.add_function(wrap_pyfunction!(run_server, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
