//! The block cache: index keyed by (namespace, hash), sealing, leases, eviction.
//!
//! Invariants:
//! - a block is visible to queries only once every (layer, TP rank) slot is saved;
//! - a block that is leased or being copied (pinned) is never evicted: pinned blocks
//!   are kept off the eviction queue, which holds exactly the unpinned blocks;
//! - every pool byte belongs to exactly one block part;
//! - a call that fails leaves the index as it was (eviction of unpinned blocks aside).
//!
//! The cache moves no bytes: it hands out pool offsets to copy to or from, in two
//! phases (prepare pins, complete publishes or rolls back).

mod index;
mod lease;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use index::{BlockCache, CacheStats, LoadTicket, SaveTicket};
pub use lease::{DEFAULT_LEASE_TTL, LeaseLimits};

/// Length of a block content hash, in bytes.
pub const HASH_BYTES: usize = 32;

/// A block's content hash (vLLM's prefix-chain block hash).
pub type BlockHash = [u8; HASH_BYTES];

/// Identity of a stored block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// Namespace: a digest of everything that changes a block's bytes.
    pub namespace: Arc<str>,
    /// Content hash.
    pub hash: BlockHash,
}

/// How one TP rank's slots are laid out in its part of a block: one slot per layer,
/// back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartGeometry {
    layer_bytes: Vec<u64>,
    layer_offsets: Vec<u64>,
    total: u64,
}

impl PartGeometry {
    /// Geometry from the slot size of each layer, in layer order.
    pub fn new(layer_bytes: Vec<u64>) -> Self {
        let mut offsets = Vec::with_capacity(layer_bytes.len());
        let mut total = 0u64;
        for &bytes in &layer_bytes {
            offsets.push(total);
            total += bytes;
        }
        Self { layer_bytes, layer_offsets: offsets, total }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> u32 {
        self.layer_bytes.len() as u32
    }

    /// Offset of `layer`'s slot inside the part. `layer < num_layers()`.
    pub fn layer_offset(&self, layer: u32) -> u64 {
        self.layer_offsets[layer as usize]
    }

    /// Bytes of `layer`'s slot. `layer < num_layers()`.
    pub fn layer_bytes(&self, layer: u32) -> u64 {
        self.layer_bytes[layer as usize]
    }

    /// Bytes of the whole part.
    pub fn total(&self) -> u64 {
        self.total
    }
}
