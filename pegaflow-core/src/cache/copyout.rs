//! Copies out of the pool that are not loads: the SSD writer reads sealed blocks' parts
//! while they are pinned (never evicted, never rewritten meanwhile).

use std::sync::Arc;

use super::index::BlockCache;
use super::{BlockKey, PartGeometry};

/// One TP part of a pinned block.
#[derive(Debug, Clone)]
pub struct PinnedPart {
    /// The part (TP rank).
    pub rank: u32,
    /// Its pool offset.
    pub offset: u64,
    /// Its layout (bytes: `geometry.total()`).
    pub geometry: Arc<PartGeometry>,
}

/// A sealed block pinned for a copy out of the pool.
#[derive(Debug, Clone)]
pub struct PinnedBlock {
    /// The block.
    pub key: BlockKey,
    /// Its TP size (parts).
    pub tp_size: u32,
    /// Every part.
    pub parts: Vec<PinnedPart>,
}

impl PinnedBlock {
    /// Pool bytes of every part.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.geometry.total()).sum()
    }
}

impl BlockCache {
    /// Pins the sealed blocks among `keys`, in order, while their bytes stay within
    /// `max_bytes`, and returns where their parts are; blocks not sealed (or gone) are
    /// left out. Unpin with [`Self::unpin_blocks`].
    pub fn pin_sealed(&mut self, keys: Vec<BlockKey>, max_bytes: u64) -> Vec<PinnedBlock> {
        let mut pinned = Vec::with_capacity(keys.len());
        let mut bytes = 0u64;
        for key in keys {
            let Some(copy) = self.blocks.get(&key).and_then(|b| b.ram.as_ref()).filter(|c| c.sealed) else {
                continue;
            };
            let parts: Vec<PinnedPart> = copy
                .parts
                .iter()
                .enumerate()
                .filter_map(|(rank, part)| {
                    let part = part.as_ref()?;
                    Some(PinnedPart {
                        rank: rank as u32,
                        offset: part.slice.offset(),
                        geometry: Arc::clone(&part.geometry),
                    })
                })
                .collect();
            let tp_size = copy.parts.len() as u32;
            let block_bytes: u64 = parts.iter().map(|p| p.geometry.total()).sum();
            if bytes + block_bytes > max_bytes {
                break;
            }
            bytes += block_bytes;
            self.pin(&key);
            pinned.push(PinnedBlock { key, tp_size, parts });
        }
        pinned
    }

    /// Unpins blocks pinned by [`Self::pin_sealed`].
    pub fn unpin_blocks<'a>(&mut self, keys: impl IntoIterator<Item = &'a BlockKey>) {
        for key in keys {
            self.unpin(key);
        }
    }

    /// Whether `key`'s block is readable in the pool now.
    pub fn is_readable(&self, key: &BlockKey) -> bool {
        self.blocks.get(key).is_some_and(super::block::Block::readable)
    }
}
