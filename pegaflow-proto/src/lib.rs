//! The PegaFlow engine API: messages and the tonic client/server for `pegaflow.v1.Engine`,
//! and the descriptor protocol that hands client memory to the server on its Unix socket.
//!
//! Generated from `proto/engine.proto` at build time; see that file for the meaning of
//! every field.

pub mod codec;
pub mod descriptor;

/// Messages and services of package `pegaflow.v1`.
#[allow(missing_docs)] // generated code
pub mod v1 {
    tonic::include_proto!("pegaflow.v1");
}

pub use v1::*;
