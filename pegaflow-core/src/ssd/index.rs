//! Which blocks the SSD tier holds: per block (namespace, hash), where each TP part lies
//! (cache path, virtual position, length, checksum, layout). The one per-block record
//! the tier keeps in memory: a 56-byte map entry for a block of one part (namespaces and
//! layouts interned, fields packed to 4-byte alignment, blocks of several parts keep
//! them in a second map), so a server with millions of blocks on its SSDs stays small:
//! at most ~114 bytes per block just after the map doubles, ~65 typically.
//! Bookkeeping only, under the tier's lock.
//!
//! A part is live while its cache path's write head has not come round to it again
//! ([`super::BlockFile::is_live`]); entries overwritten that way are skipped by every
//! lookup and swept out whenever a head has moved an eighth of its file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use foldhash::fast::RandomState;

use crate::cache::{BlockHash, BlockKey};

/// Where one TP part of a block lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLoc {
    /// Virtual position in its data file.
    pub position: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    /// Payload bytes.
    pub len: u32,
    /// Index of the cache path.
    pub file: u16,
    /// The part's layout, as [`SsdIndex::layout_id`] numbered it.
    pub layout: u16,
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

/// A block's key with its namespace interned (34 bytes, 2-byte aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    hash: BlockHash,
    namespace: u16,
}

/// A part's location packed to 20 bytes at 4-byte alignment (with the key, a map entry
/// is 56 bytes instead of 72); its length is its layout's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    file: u8,
    /// TP size: 1 holds the block's only part here; more keeps the parts in `multi`.
    parts: u8,
    layout: u16,
    position: [u32; 2],
    checksum: [u32; 2],
}

fn split(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

fn join(v: [u32; 2]) -> u64 {
    u64::from(v[0]) | (u64::from(v[1]) << 32)
}

impl Slot {
    fn of(loc: &PartLoc, parts: u8) -> Option<Self> {
        Some(Self {
            file: u8::try_from(loc.file).ok()?,
            parts,
            layout: loc.layout,
            position: split(loc.position),
            checksum: split(loc.checksum),
        })
    }

    fn loc(&self, layouts: &[(u64, u32)]) -> PartLoc {
        PartLoc {
            position: join(self.position),
            checksum: join(self.checksum),
            len: layouts.get(usize::from(self.layout)).map_or(0, |l| l.1),
            file: u16::from(self.file),
            layout: self.layout,
        }
    }
}

/// A cache path's write head and capacity, and the head at the last sweep.
#[derive(Debug, Clone, Copy, Default)]
struct FileHead {
    head: u64,
    capacity: u64,
    swept: u64,
}

impl FileHead {
    fn is_live(&self, loc: &PartLoc) -> bool {
        self.head <= loc.position.saturating_add(self.capacity)
    }
}

/// The SSD tier's index.
#[derive(Debug, Default)]
pub struct SsdIndex {
    blocks: HashMap<Key, Slot, RandomState>,
    /// The parts of blocks stored by several TP ranks.
    multi: HashMap<Key, Box<[Option<PartLoc>]>, RandomState>,
    namespace_ids: HashMap<Arc<str>, u16>,
    layout_ids: HashMap<(u64, u32), u16>,
    /// Fingerprint and part bytes of each layout number.
    layouts: Vec<(u64, u32)>,
    files: Vec<FileHead>,
    prefetching: HashSet<Key, RandomState>,
}

impl SsdIndex {
    /// An index over cache paths of these capacities, with their heads.
    pub fn new(files: &[(u64, u64)]) -> Self {
        let files = files.iter().map(|&(head, capacity)| FileHead { head, capacity, swept: head }).collect();
        Self { files, ..Self::default() }
    }

    fn key(&self, key: &BlockKey) -> Option<Key> {
        self.namespace_ids.get(&*key.namespace).map(|&namespace| Key { namespace, hash: key.hash })
    }

    /// The number of `namespace` (numbered on first sight; `None` past 65,535).
    fn namespace_id(&mut self, namespace: &str) -> Option<u16> {
        if let Some(&id) = self.namespace_ids.get(namespace) {
            return Some(id);
        }
        let id = u16::try_from(self.namespace_ids.len()).ok()?;
        self.namespace_ids.insert(Arc::from(namespace), id);
        Some(id)
    }

    /// The number of layout `fingerprint` with parts of `len` bytes (numbered on first
    /// sight; `None` past 65,535).
    pub fn layout_id(&mut self, fingerprint: u64, len: u32) -> Option<u16> {
        if let Some(&id) = self.layout_ids.get(&(fingerprint, len)) {
            return Some(id);
        }
        let id = u16::try_from(self.layouts.len()).ok()?;
        self.layouts.push((fingerprint, len));
        self.layout_ids.insert((fingerprint, len), id);
        Some(id)
    }

    /// The fingerprint of layout number `id`.
    pub fn layout_fingerprint(&self, id: u16) -> Option<u64> {
        self.layouts.get(usize::from(id)).map(|l| l.0)
    }

    fn live(&self, loc: &PartLoc) -> bool {
        self.files.get(usize::from(loc.file)).is_some_and(|f| f.is_live(loc))
    }

    /// Records that part `part` of `key` is stored at `loc` (replacing an older copy).
    /// Returns false when it cannot be indexed (more than 65,535 namespaces, 255 cache
    /// paths or TP ranks).
    pub fn insert(&mut self, key: &BlockKey, part: PartId, loc: PartLoc) -> bool {
        self.insert_replayed(&key.namespace, key.hash, part, loc)
    }

    /// [`Self::insert`] by namespace name (a block found in a replayed index log).
    pub fn insert_replayed(&mut self, namespace: &str, hash: BlockHash, part: PartId, loc: PartLoc) -> bool {
        let (Some(namespace), Ok(of)) = (self.namespace_id(namespace), u8::try_from(part.of)) else { return false };
        let key = Key { hash, namespace };
        if self.layouts.get(usize::from(loc.layout)).is_none_or(|l| l.1 != loc.len) {
            return false; // numbered by `layout_id` with its length
        }
        let Some(slot) = Slot::of(&loc, of) else { return false };
        if of == 1 {
            self.multi.remove(&key);
            self.blocks.insert(key, slot);
            return true;
        }
        let rank = usize::from(part.rank);
        match self.multi.get_mut(&key) {
            Some(parts) if parts.len() == usize::from(of) => parts[rank] = Some(loc),
            _ => {
                // New, or stored before by another TP size: the newer layout wins.
                let mut parts = vec![None; usize::from(of)].into_boxed_slice();
                parts[rank] = Some(loc);
                self.multi.insert(key, parts);
            }
        }
        self.blocks.insert(key, slot);
        true
    }

    /// Sets cache path `file`'s head and capacity (once it is open).
    pub fn set_file(&mut self, file: u16, head: u64, capacity: u64) {
        if let Some(f) = self.files.get_mut(usize::from(file)) {
            *f = FileHead { head, capacity, swept: head };
        }
    }

    /// Moves cache path `file`'s head to `head` (after a write); sweeps out the entries
    /// overwritten since the last sweep once the head moved an eighth of the file.
    pub fn advance(&mut self, file: u16, head: u64) {
        let Some(f) = self.files.get_mut(usize::from(file)) else { return };
        f.head = head;
        if head.saturating_sub(f.swept) >= f.capacity / 8 {
            f.swept = head;
            let files = self.files.clone();
            let live = |loc: &PartLoc| files.get(usize::from(loc.file)).is_some_and(|f| f.is_live(loc));
            self.multi.retain(|_, parts| {
                for part in parts.iter_mut() {
                    if part.is_some_and(|loc| !live(&loc)) {
                        *part = None;
                    }
                }
                parts.iter().any(Option::is_some)
            });
            let (multi, layouts) = (&self.multi, &self.layouts);
            self.blocks.retain(
                |key, slot| {
                    if slot.parts == 1 { live(&slot.loc(layouts)) } else { multi.contains_key(key) }
                },
            );
        }
    }

    /// Forgets the part of `key` at (`file`, `position`), if that is where it is (it
    /// failed its checksum, say). A block missing a part is no longer served.
    pub fn remove_at(&mut self, key: &BlockKey, file: u16, position: u64) {
        let Some(key) = self.key(key) else { return };
        let at = |loc: &PartLoc| loc.file == file && loc.position == position;
        let empty = match (self.blocks.get(&key), self.multi.get_mut(&key)) {
            (None, _) => return,
            (Some(slot), None) => at(&slot.loc(&self.layouts)),
            (Some(_), Some(parts)) => {
                for part in parts.iter_mut() {
                    if part.is_some_and(|loc| at(&loc)) {
                        *part = None;
                    }
                }
                parts.iter().all(Option::is_none)
            }
        };
        if empty {
            self.blocks.remove(&key);
            self.multi.remove(&key);
        }
    }

    /// Every part of `key`, when all are stored and live.
    pub fn whole(&self, key: &BlockKey) -> Option<Vec<PartLoc>> {
        let key = self.key(key)?;
        let slot = self.blocks.get(&key)?;
        let parts = if slot.parts == 1 {
            vec![slot.loc(&self.layouts)]
        } else {
            self.multi.get(&key)?.iter().copied().collect::<Option<Vec<_>>>()?
        };
        parts.iter().all(|loc| self.live(loc)).then_some(parts)
    }

    /// Whether every part of `key` is stored and live.
    pub fn is_whole(&self, key: &BlockKey) -> bool {
        self.whole(key).is_some()
    }

    /// Blocks with an entry (some may have been overwritten since the last sweep).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block has an entry.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Marks `key` as being copied up; false when it already is (or is not indexed).
    pub fn start_prefetch(&mut self, key: &BlockKey) -> bool {
        self.key(key).is_some_and(|key| self.prefetching.insert(key))
    }

    /// Whether `key` is being copied up now.
    pub fn is_prefetching(&self, key: &BlockKey) -> bool {
        self.key(key).is_some_and(|k| self.prefetching.contains(&k))
    }

    /// Ends the copy up of `key`.
    pub fn end_prefetch(&mut self, key: &BlockKey) {
        if let Some(key) = self.key(key) {
            self.prefetching.remove(&key);
        }
    }

    /// Blocks being copied up now.
    pub fn prefetching(&self) -> usize {
        self.prefetching.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: u64 = 1 << 20;

    fn key(ns: &str, n: u8) -> BlockKey {
        BlockKey { namespace: Arc::from(ns), hash: [n; 32] }
    }

    /// An index over cache paths of CAPACITY bytes, layout 0 of 4096-byte parts.
    fn index(files: usize) -> SsdIndex {
        let mut index = SsdIndex::new(&vec![(0, CAPACITY); files]);
        assert_eq!(index.layout_id(0xfeed, 4096), Some(0));
        index
    }

    fn loc(file: u16, position: u64) -> PartLoc {
        PartLoc { position, checksum: 7, len: 4096, file, layout: 0 }
    }

    #[test]
    fn a_block_is_whole_once_every_part_is_stored_and_loses_a_part_when_dropped() {
        let mut index = index(2);
        let k = key("ns", 1);
        index.insert(&k, PartId { rank: 0, of: 2 }, loc(0, 0));
        assert!(!index.is_whole(&k) && index.whole(&k).is_none());
        index.insert(&k, PartId { rank: 1, of: 2 }, loc(1, 8192));
        assert_eq!(index.whole(&k), Some(vec![loc(0, 0), loc(1, 8192)]));
        index.remove_at(&k, 0, 4096); // another extent: nothing changes
        assert!(index.is_whole(&k));
        index.remove_at(&k, 1, 8192);
        assert!(!index.is_whole(&k));
        index.remove_at(&k, 0, 0);
        assert!(index.is_empty());
    }

    #[test]
    fn an_overwritten_part_is_not_served_and_is_swept_out() {
        let mut index = index(1);
        let (old, new) = (key("ns", 1), key("ns", 2));
        index.insert(&old, PartId { rank: 0, of: 1 }, loc(0, 0));
        index.insert(&new, PartId { rank: 0, of: 1 }, loc(0, CAPACITY - 4096));
        index.advance(0, CAPACITY); // a full lap: `old` is still intact
        assert!(index.is_whole(&old));
        index.advance(0, CAPACITY + 4096); // the head came round over it
        assert!(!index.is_whole(&old) && index.is_whole(&new));
        assert_eq!(index.len(), 2, "not swept yet: the head moved less than an eighth");
        index.advance(0, CAPACITY + CAPACITY / 4);
        assert_eq!(index.len(), 1, "swept");
        assert!(index.is_whole(&new));
    }

    #[test]
    fn namespaces_are_told_apart_and_a_new_tp_size_replaces_the_old_parts() {
        let mut index = index(1);
        let (a, b) = (key("model-a", 1), key("model-b", 1));
        assert_eq!(std::mem::size_of::<(Key, Slot)>(), 56, "the map entry stays small");
        index.insert(&a, PartId { rank: 0, of: 2 }, loc(0, 0));
        index.insert(&a, PartId { rank: 0, of: 1 }, loc(0, 4096));
        assert_eq!(index.whole(&a), Some(vec![loc(0, 4096)]));
        assert!(!index.is_whole(&b), "same hash, another namespace");
        assert_eq!(index.layout_id(0xbeef, 4096), Some(1));
        assert_eq!(index.layout_id(0xfeed, 8192), Some(2), "another part size, another number");
        assert_eq!(index.layout_fingerprint(1), Some(0xbeef));
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
        let mut index = index(1);
        let k = key("ns", 9);
        assert!(!index.start_prefetch(&k), "not on the SSD");
        index.insert(&k, PartId { rank: 0, of: 1 }, loc(0, 0));
        assert!(index.start_prefetch(&k));
        assert!(!index.start_prefetch(&k));
        assert!(index.is_prefetching(&k) && index.prefetching() == 1);
        index.end_prefetch(&k);
        assert!(!index.is_prefetching(&k));
    }
}
