//! `cargo run -r --bin pegaflow-server -- --help`

// mimalloc keeps freed memory for reuse: the per-request copy plans (megabytes) would
// otherwise be fresh mmaps that page-fault on every request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(pegaflow_server::run_cli(std::env::args_os()));
}
