//! Which blocks the SSD tier holds: per block (namespace, hash), one stored record per
//! TP part and the cache path it lives on. Bookkeeping only, under the tier's lock: the
//! files ([`super::BlockFile`]) hold the bytes and their own durable index.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::BlockRecord;
use crate::cache::{BlockHash, BlockKey};

/// Where one TP part of a block lies: which cache path, and its record's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLoc {
    /// Index of the cache path (its [`super::BlockFile`]).
    pub file: u16,
    /// Byte offset in that data file.
    pub offset: u64,
    /// Payload bytes.
    pub len: u32,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    /// Fingerprint of the part's layout.
    pub layout: u64,
}

impl PartLoc {
    /// The location of `record` on cache path `file`.
    pub fn of(file: u16, record: &BlockRecord) -> Self {
        Self { file, offset: record.offset, len: record.len, checksum: record.checksum, layout: record.id.layout }
    }
}

/// A TP part number as stored: the rank in the low 16 bits, the TP size in the high 16
/// (the record format has one `u32` for it, and a restarted server must know how many
/// parts make a block whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartId {
    /// The part (TP rank).
    pub rank: u16,
    /// Parts of the block (TP size).
    pub of: u16,
}

impl PartId {
    /// Packs into the record's `part` field.
    pub fn to_u32(self) -> u32 {
        (u32::from(self.of) << 16) | u32::from(self.rank)
    }

    /// Unpacks a record's `part` field; `None` when it names no valid part.
    pub fn from_u32(raw: u32) -> Option<Self> {
        let id = Self { rank: (raw & 0xffff) as u16, of: (raw >> 16) as u16 };
        (id.of > 0 && id.rank < id.of).then_some(id)
    }
}

/// The SSD tier's index.
#[derive(Debug, Default)]
pub struct SsdIndex {
    blocks: HashMap<BlockKey, Box<[Option<PartLoc>]>, RandomState>,
    /// One `Arc` per namespace, shared by its blocks.
    namespaces: HashSet<Arc<str>>,
    /// Blocks being copied up into the pool now.
    prefetching: HashSet<BlockKey, RandomState>,
}

impl SsdIndex {
    /// The key of `hash` in `namespace`, its namespace shared with the blocks before it.
    pub fn key(&mut self, namespace: &str, hash: BlockHash) -> BlockKey {
        let namespace = match self.namespaces.get(namespace) {
            Some(shared) => Arc::clone(shared),
            None => {
                let shared: Arc<str> = Arc::from(namespace);
                self.namespaces.insert(Arc::clone(&shared));
                shared
            }
        };
        BlockKey { namespace, hash }
    }

    /// Records that part `part` of `key` is stored at `loc` (replacing an older copy).
    pub fn insert(&mut self, key: BlockKey, part: PartId, loc: PartLoc) {
        let parts = self.blocks.entry(key).or_insert_with(|| vec![None; usize::from(part.of)].into());
        if parts.len() != usize::from(part.of) {
            // Stored before by a different TP size: the newer layout wins.
            *parts = vec![None; usize::from(part.of)].into();
        }
        parts[usize::from(part.rank)] = Some(loc);
    }

    /// Forgets the part of `key` stored at (`file`, `offset`), if that is where it is
    /// (the data file reused the extent, or the block failed its checksum). A block
    /// missing a part is no longer served.
    pub fn remove_at(&mut self, key: &BlockKey, file: u16, offset: u64) {
        let Some(parts) = self.blocks.get_mut(key) else { return };
        for part in parts.iter_mut() {
            if part.is_some_and(|loc| loc.file == file && loc.offset == offset) {
                *part = None;
            }
        }
        if parts.iter().all(Option::is_none) {
            self.blocks.remove(key);
        }
    }

    /// Every part of `key`, when all are stored.
    pub fn whole(&self, key: &BlockKey) -> Option<Vec<PartLoc>> {
        self.blocks.get(key)?.iter().copied().collect()
    }

    /// Whether every part of `key` is stored.
    pub fn is_whole(&self, key: &BlockKey) -> bool {
        self.blocks.get(key).is_some_and(|parts| parts.iter().all(Option::is_some))
    }

    /// Blocks with at least one stored part.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is stored.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Marks `key` as being copied up; false when it already is.
    pub fn start_prefetch(&mut self, key: &BlockKey) -> bool {
        self.prefetching.insert(key.clone())
    }

    /// Whether `key` is being copied up now.
    pub fn is_prefetching(&self, key: &BlockKey) -> bool {
        self.prefetching.contains(key)
    }

    /// Ends the copy up of `key`.
    pub fn end_prefetch(&mut self, key: &BlockKey) {
        self.prefetching.remove(key);
    }

    /// Blocks being copied up now.
    pub fn prefetching(&self) -> usize {
        self.prefetching.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(file: u16, offset: u64) -> PartLoc {
        PartLoc { file, offset, len: 4096, checksum: 7, layout: 1 }
    }

    #[test]
    fn a_block_is_whole_once_every_part_is_stored_and_loses_a_part_when_its_extent_goes() {
        let mut index = SsdIndex::default();
        let key = index.key("ns", [1; 32]);
        index.insert(key.clone(), PartId { rank: 0, of: 2 }, loc(0, 0));
        assert!(!index.is_whole(&key) && index.whole(&key).is_none());
        index.insert(key.clone(), PartId { rank: 1, of: 2 }, loc(1, 8192));
        assert_eq!(index.whole(&key), Some(vec![loc(0, 0), loc(1, 8192)]));
        index.remove_at(&key, 0, 4096); // another extent: nothing changes
        assert!(index.is_whole(&key));
        index.remove_at(&key, 1, 8192);
        assert!(!index.is_whole(&key));
        index.remove_at(&key, 0, 0);
        assert!(index.is_empty());
    }

    #[test]
    fn namespaces_are_shared_and_a_new_tp_size_replaces_the_old_parts() {
        let mut index = SsdIndex::default();
        let a = index.key("model-a", [1; 32]);
        let b = index.key("model-a", [2; 32]);
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        index.insert(a.clone(), PartId { rank: 0, of: 2 }, loc(0, 0));
        index.insert(a.clone(), PartId { rank: 0, of: 1 }, loc(0, 4096));
        assert_eq!(index.whole(&a), Some(vec![loc(0, 4096)]));
    }

    #[test]
    fn part_ids_round_trip_and_reject_nonsense() {
        let id = PartId { rank: 3, of: 8 };
        assert_eq!(PartId::from_u32(id.to_u32()), Some(id));
        assert_eq!(PartId::from_u32(0), None, "a part of zero parts");
        assert_eq!(PartId::from_u32(PartId { rank: 2, of: 2 }.to_u32()), None);
    }

    #[test]
    fn a_block_is_prefetched_once_at_a_time() {
        let mut index = SsdIndex::default();
        let key = index.key("ns", [9; 32]);
        assert!(index.start_prefetch(&key));
        assert!(!index.start_prefetch(&key));
        assert!(index.is_prefetching(&key) && index.prefetching() == 1);
        index.end_prefetch(&key);
        assert!(!index.is_prefetching(&key));
    }
}
