//! `cargo run -r --bin pegaflow-trace -- --help`

fn main() {
    std::process::exit(pegaflow_server::trace::run_trace_cli(std::env::args_os()));
}
