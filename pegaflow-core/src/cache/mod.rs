//! The block cache: index keyed by (namespace, hash), copies per tier, sealing, leases,
//! prefix chains, and admission/eviction through a [`policy::Policy`].
//!
//! Invariants:
//! - a block is visible to queries only once every (layer, TP rank) slot is saved;
//! - a block that is leased or being copied (pinned), or whose chain continues in the
//!   cache (it has cached children), is never evicted: the policy's queues hold exactly
//!   the other blocks;
//! - every pool byte belongs to exactly one block part or one victim not yet reclaimed;
//! - a call that fails leaves the index as it was (eviction of unpinned blocks aside).
//!
//! The cache moves no bytes: it hands out pool offsets to copy to or from, in two
//! phases (prepare pins, complete publishes or rolls back), and hands evicted blocks
//! back as [`Victim`]s for the engine to reclaim (or, with a lower tier, to move down).

mod block;
mod copyout;
mod index;
mod lease;
pub mod policy;
mod save;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use copyout::{PinnedBlock, PinnedPart};
pub use index::{BlockCache, CacheStats, LoadTicket};
pub use lease::{DEFAULT_LEASE_TTL, LeaseLimits, LeaseRange};
pub use policy::PolicyKind;
pub use save::{RoomPlan, SaveSpec, SaveTicket, SlotRun};

use crate::memory::PoolSlice;

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

/// Block hashes from the wire, each exactly [`HASH_BYTES`] long.
pub fn parse_hashes(raw: &[Vec<u8>]) -> crate::Result<Vec<BlockHash>> {
    raw.iter().enumerate().map(|(i, h)| parse_hash(i, h)).collect()
}

/// Parent hashes from the wire: one per block, empty bytes for a chain's first block.
pub fn parse_parents(raw: &[Vec<u8>]) -> crate::Result<Vec<Option<BlockHash>>> {
    raw.iter().enumerate().map(|(i, h)| if h.is_empty() { Ok(None) } else { parse_hash(i, h).map(Some) }).collect()
}

fn parse_hash(i: usize, raw: &[u8]) -> crate::Result<BlockHash> {
    BlockHash::try_from(raw).map_err(|_| {
        crate::EngineError::invalid(format!("block hash {i} has {} bytes, expected {HASH_BYTES}", raw.len()))
    })
}

/// A storage tier holding copies of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The pinned host memory pool.
    Ram,
    /// The SSD cache paths.
    Ssd,
}

impl Tier {
    /// Label value in metrics (`ram`, `ssd`; later `remote`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ram => "ram",
            Self::Ssd => "ssd",
        }
    }
}

/// The state of one tier's copy of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// Being written (or partly written): not readable.
    Writing,
    /// Readable.
    Readable,
    /// Readable and being read now.
    Reading,
}

/// What a query found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    /// The leading blocks are readable and leased: `tiers[i]` is where block `i` is read
    /// from.
    Hit {
        /// Lease pinning the hit blocks until loaded, released or expired.
        lease_id: String,
        /// Tier of each hit block, in request order.
        tiers: Vec<Tier>,
    },
    /// The first block is not readable yet but a save of it is in flight: asking again
    /// shortly may hit.
    Loading,
    /// The first block is not cached.
    Miss,
}

impl QueryOutcome {
    /// Leading blocks hit.
    pub fn hits(&self) -> u32 {
        match self {
            Self::Hit { tiers, .. } => tiers.len() as u32,
            _ => 0,
        }
    }

    /// The lease, when something hit.
    pub fn lease_id(&self) -> Option<&str> {
        match self {
            Self::Hit { lease_id, .. } => Some(lease_id),
            _ => None,
        }
    }
}

/// Why a block left a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// Room for new blocks.
    Capacity,
    /// An administrator dropped the cache.
    Dropped,
}

impl EvictReason {
    /// Label value in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::Dropped => "dropped",
        }
    }
}

/// A block taken out of a tier: no longer in the index, its bytes still held until the
/// engine reclaims them ([`BlockCache::reclaim`]) or moves them to a lower tier first.
#[derive(Debug)]
pub struct Victim {
    /// The block.
    pub key: BlockKey,
    /// The tier it left.
    pub tier: Tier,
    /// Why.
    pub reason: EvictReason,
    /// Whether it was readable (sealed) when it left.
    pub sealed: bool,
    /// Its bytes in the tier.
    pub(crate) slices: Vec<PoolSlice>,
}

impl Victim {
    /// Bytes the victim holds in its tier.
    pub fn bytes(&self) -> u64 {
        self.slices.iter().map(PoolSlice::len).sum()
    }
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

    /// Bytes of the slots of `layers`, back to back in the part. `layers.end <=
    /// num_layers()`.
    pub fn run_bytes(&self, layers: std::ops::Range<u32>) -> u64 {
        self.layer_bytes[layers.start as usize..layers.end as usize].iter().sum()
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

    /// Each layer's slot bytes, in layer order.
    pub fn layer_sizes(&self) -> &[u64] {
        &self.layer_bytes
    }
}
