//! Compiles `proto/engine.proto` with protox (pure Rust), so no `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/engine.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().codec_path("crate::codec::EngineCodec").compile_fds(descriptors)?;
    Ok(())
}
