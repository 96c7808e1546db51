//! The SSD tier's storage: per cache path, a data file written as a circular log of
//! aligned extents and an append-only index log replayed at start, so a restarted server
//! still has the blocks written before (see [`file`] and [`record`]). Every block carries
//! an xxh3-64 checksum verified on read: a mismatch is a miss, never wrong bytes.
//!
//! This layer stores and finds bytes; which blocks go to the SSD, prefetching and the
//! I/O queues sit above it.

pub mod file;
pub mod index;
pub mod io;
pub mod record;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use file::{BlockFile, IoMode, Reserved};
pub use index::{PartId, PartLoc, SsdIndex};
pub use record::{BlockId, BlockRecord, PutRef};

/// Why an SSD cache path cannot be used, or a block not read.
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    /// A file operation failed.
    #[error("SSD cache {path}: {op} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process (a second server) holds the path.
    #[error("SSD cache {0} is in use by another process (a second pegaflow-server on the same path?)")]
    Locked(PathBuf),
    /// The file system cannot hold the capacity.
    #[error("SSD cache {path}: not enough free space for {capacity} bytes (lower --ssd-cache-capacity)")]
    NoSpace {
        /// The data file.
        path: PathBuf,
        /// The capacity asked for.
        capacity: u64,
    },
    /// A block's bytes do not match its checksum.
    #[error("SSD cache {path}: block at offset {offset} failed its checksum")]
    Corrupt {
        /// The data file.
        path: PathBuf,
        /// The block's offset.
        offset: u64,
    },
    /// The block at this virtual position was overwritten by newer ones (a miss).
    #[error("SSD cache: the block at position {0} was overwritten")]
    Overwritten(u64),
    /// A setting or request outside what the store takes.
    #[error("SSD cache: {0}")]
    Config(String),
}
