//! The PegaFlow engine API: messages and the tonic client/server for `pegaflow.v1.Engine`.
//!
//! Generated from `proto/engine.proto` at build time; see that file for the meaning of
//! every field.

#![allow(missing_docs)] // generated code

/// Messages and services of package `pegaflow.v1`.
pub mod v1 {
    tonic::include_proto!("pegaflow.v1");
}

pub use v1::*;
