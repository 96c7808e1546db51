//! `cargo run -r --bin pegaflow-server -- --help`

fn main() {
    std::process::exit(pegaflow_server::run_cli(std::env::args_os()));
}
