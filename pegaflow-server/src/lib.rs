//! `pegaflow-server`: the PegaFlow engine behind a gRPC API, with HTTP health and
//! metrics, client sessions, and clean shutdown on SIGINT/SIGTERM.
//!
//! [`run_cli`] is the whole program; the Rust binary and the Python console script both
//! call it, so there is one server.

mod auth;
mod config;
mod error;
mod http;
mod listen;
mod rpc_metrics;
mod server;
mod service;
mod session;
pub mod trace;

pub use auth::AUTH_HEADER;
pub use config::{DEFAULT_ADDR, DEFAULT_METRICS_ADDR, ServerConfig, parse_size};
pub use error::{ServerError, to_status};
pub use server::run_server;

use clap::Parser;

/// Parses `args` (program name first), runs the server until a signal, and returns the
/// process exit code. Prints help, version and flag errors like any CLI.
pub fn run_cli<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let config = match ServerConfig::try_parse_from(args) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_logging(&config.log_level);
    match run_server(config) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pegaflow-server: {e}");
            1
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A host process (Python) may have installed a subscriber already: keep it.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
