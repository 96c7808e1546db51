//! The save half of the cache: admission and room (victims handed back), then the two
//! phases of the copy (prepare pins and reserves, complete publishes or rolls back).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::block::{Block, Part, Slot};
use super::index::{BlockCache, hex, unpin_block};
use super::policy::Choice;
use super::{BlockHash, BlockKey, EvictReason, PartGeometry, Victim};
use crate::error::{EngineError, Result};

/// One save of one TP rank: which blocks, in which chains, which layers.
#[derive(Debug, Clone, Copy)]
pub struct SaveSpec<'a> {
    /// Namespace of the rank's instance.
    pub namespace: &'a Arc<str>,
    /// Content hash of each block.
    pub hashes: &'a [BlockHash],
    /// The block before each block in its prefix chain (`None`: a chain's first block);
    /// empty when the saver did not say. Eviction keeps chains whole with it.
    pub parents: &'a [Option<BlockHash>],
    /// Rank saving, of `tp_size` ranks.
    pub rank: u32,
    /// TP ranks of the instance.
    pub tp_size: u32,
    /// Layout of the rank's part of a block.
    pub geometry: &'a Arc<PartGeometry>,
    /// Layers to copy.
    pub layers: &'a [u32],
}

impl SaveSpec<'_> {
    fn key(&self, hash: BlockHash) -> BlockKey {
        BlockKey { namespace: Arc::clone(self.namespace), hash }
    }

    fn parent(&self, index: usize) -> Option<BlockHash> {
        self.parents.get(index).copied().flatten()
    }
}

/// The admission decision for one save, and the blocks evicted for it.
#[derive(Debug)]
pub struct RoomPlan {
    /// Per block of the request: false when it may not take new space.
    admitted: Vec<bool>,
    /// Blocks refused (by the policy, or because their parent was).
    pub rejected: u32,
    /// Some block found nothing to evict: the pool is full of pinned blocks.
    pub full: bool,
    /// Blocks taken out to make room; the engine reclaims them (or moves them down).
    pub victims: Vec<Victim>,
}

/// Slots of one block to copy, back to back in the pool: layers `layers` of the
/// request's block `index`, the first at pool offset `offset`. With every layer of a
/// block asked for, a block is one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRun {
    /// Index of the block in the request.
    pub index: usize,
    /// Consecutive layers.
    pub layers: Range<u32>,
    /// Pool offset of the first layer's slot.
    pub offset: u64,
}

/// What a prepared save must copy: runs of slots, each with a pool offset to write.
#[derive(Debug)]
pub struct SaveTicket {
    entries: Vec<SaveEntry>,
    /// Every run of slots to copy, each block's runs together.
    pub slots: Vec<SlotRun>,
    /// Blocks not copied: stored or being stored already, refused admission, or no
    /// pool range found.
    pub skipped: u32,
    /// Of the skipped blocks, those refused admission.
    pub rejected: u32,
    /// New blocks this save brought into the index.
    pub admitted: u32,
    /// Blocks evicted to make room.
    pub evicted: u32,
}

#[derive(Debug)]
struct SaveEntry {
    key: BlockKey,
    rank: u32,
    /// Its runs: a range of the ticket's `slots`.
    runs: Range<usize>,
}

impl SaveTicket {
    /// Blocks with at least one slot to copy.
    pub fn blocks(&self) -> u32 {
        self.entries.len() as u32
    }

    /// The pool offset of the first slot to copy (with every layer of one block part
    /// asked for, where that part starts).
    pub fn first_slot_offset(&self) -> Option<u64> {
        self.slots.iter().map(|run| run.offset).min()
    }

    /// Slots to copy.
    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|run| run.layers.len()).sum()
    }
}

impl BlockCache {
    /// Plans room for a save, hands the victims to `dispose` (which reclaims them, or
    /// moves them to a lower tier and then reclaims them) and prepares the copy.
    pub fn prepare_save_with(
        &mut self,
        spec: &SaveSpec<'_>,
        dispose: impl FnOnce(&mut Self, Vec<Victim>),
    ) -> Result<SaveTicket> {
        let mut plan = self.make_room(spec)?;
        let victims = std::mem::take(&mut plan.victims);
        let evicted = victims.len() as u32;
        dispose(self, victims);
        let mut ticket = self.prepare_save(spec, &plan)?;
        ticket.evicted = evicted;
        Ok(ticket)
    }

    /// Decides which new blocks of the save are admitted and takes victims out of the
    /// index until they fit. A block refused by the policy takes its chain's later
    /// blocks with it (a query would stop before them). The request's own cached blocks
    /// are never victims for it. Errors (conflicting layouts, more than the pool) change
    /// nothing.
    pub fn make_room(&mut self, spec: &SaveSpec<'_>) -> Result<RoomPlan> {
        self.check_save(spec)?;
        let unit = self.allocator.rounded(spec.geometry.total());
        let mut free = self.allocator.capacity().saturating_sub(self.allocator.used_bytes());
        // The request's own cached blocks, pinned only once something must be evicted.
        let mut held: Option<Vec<BlockKey>> = None;
        let mut plan =
            RoomPlan { admitted: vec![true; spec.hashes.len()], rejected: 0, full: false, victims: Vec::new() };
        // Hashes come from clients: foldhash with this process's random seed, as the index.
        let mut refused: HashSet<BlockHash, RandomState> = HashSet::default();
        for (index, hash) in spec.hashes.iter().enumerate() {
            let key = spec.key(*hash);
            let existing = self.blocks.get(&key);
            let needs_space = match existing {
                None => true,
                Some(block) => !block.readable() && block.part(spec.rank).is_none(),
            };
            if !needs_space {
                continue;
            }
            if spec.parent(index).is_some_and(|p| refused.contains(&p)) {
                plan.admitted[index] = false;
                plan.rejected += 1;
                refused.insert(*hash);
                continue;
            }
            // Another rank's part already got this block in: it is not a candidate again.
            let candidate = existing.is_none().then_some(&key);
            if free < unit && held.is_none() {
                held = Some(self.hold_cached(spec));
            }
            while free < unit && plan.admitted[index] {
                match self.policy.choose(candidate, &mut self.blocks) {
                    Choice::Evict(victim) => {
                        if let Some(victim) = self.detach(&victim, EvictReason::Capacity) {
                            free += victim.slices.iter().map(|s| self.allocator.rounded(s.len())).sum::<u64>();
                            plan.victims.push(victim);
                        }
                    }
                    Choice::Reject => {
                        plan.admitted[index] = false;
                        plan.rejected += 1;
                        refused.insert(*hash);
                    }
                    Choice::Nothing => {
                        plan.admitted[index] = false;
                        plan.full = true;
                    }
                }
            }
            if plan.admitted[index] {
                free -= unit;
            }
        }
        for key in held.iter().flatten() {
            self.unpin(key);
        }
        Ok(plan)
    }

    /// Pins the request's blocks that are cached, so making room for the request never
    /// evicts them; returns them for unpinning.
    fn hold_cached(&mut self, spec: &SaveSpec<'_>) -> Vec<BlockKey> {
        let held: Vec<BlockKey> =
            spec.hashes.iter().map(|h| spec.key(*h)).filter(|k| self.blocks.contains_key(k)).collect();
        for key in &held {
            self.pin(key);
        }
        held
    }

    /// Phase one of a save: reserves pool space for the rank's part of each admitted
    /// block, marks the requested slots as being written and pins the blocks. Blocks
    /// already sealed, slots already stored or being stored, and blocks `plan` refused
    /// are skipped. Fails (changing nothing) when the plan found the pool full of pinned
    /// blocks.
    pub fn prepare_save(&mut self, spec: &SaveSpec<'_>, plan: &RoomPlan) -> Result<SaveTicket> {
        if plan.full {
            return Err(EngineError::ResourceExhausted(format!(
                "pool full: {} bytes in use by blocks that are leased or being copied",
                self.allocator.used_bytes()
            )));
        }
        let mut ticket =
            SaveTicket { entries: Vec::new(), slots: Vec::new(), skipped: 0, rejected: 0, admitted: 0, evicted: 0 };
        for (index, hash) in spec.hashes.iter().enumerate() {
            let key = spec.key(*hash);
            if !plan.admitted.get(index).copied().unwrap_or(false) {
                ticket.skipped += 1;
                ticket.rejected += 1;
                continue;
            }
            match self.blocks.get(&key) {
                Some(block) if block.readable() => {
                    ticket.skipped += 1;
                    self.touch(&key);
                    continue;
                }
                Some(_) => self.touch(&key),
                None => {
                    let block = self.new_block(spec, index, &key);
                    self.blocks.insert(key.clone(), block);
                    ticket.admitted += 1;
                }
            }
            self.pin(&key);
            if !self.place_part(spec, &key) {
                // No pool range although the plan made room (fragmentation between
                // block sizes): skipped, reported, never an error.
                ticket.skipped += 1;
                self.unpin(&key);
                if self.drop_if_empty(&key) {
                    ticket.admitted -= 1;
                }
                continue;
            }
            let Some(part) = self.blocks.get_mut(&key).and_then(|b| b.part_mut(spec.rank)) else { continue };
            let first = ticket.slots.len();
            if part.mark_writing(spec.layers, |layers, offset| ticket.slots.push(SlotRun { index, layers, offset })) {
                let runs = first..ticket.slots.len();
                ticket.entries.push(SaveEntry { key, rank: spec.rank, runs });
            } else {
                ticket.skipped += 1;
                self.unpin(&key);
            }
        }
        Ok(ticket)
    }

    /// A new block record (not in the index yet), linked under its parent when the
    /// parent is cached.
    fn new_block(&mut self, spec: &SaveSpec<'_>, index: usize, key: &BlockKey) -> Block {
        let mut block = Block::new(spec.tp_size);
        if let Some(parent) = spec.parent(index) {
            let parent_key = spec.key(parent);
            // The parent exists before the child, so links can never form a cycle.
            if let Some(p) = self.blocks.get_mut(&parent_key) {
                p.children += 1;
                self.policy.dequeue(&mut p.policy);
                block.parent = Some(parent);
            }
        }
        self.policy.insert(key, &mut block.policy, &mut self.blocks);
        block
    }

    /// Gives the rank's part of the block a pool range; false when none is free.
    fn place_part(&mut self, spec: &SaveSpec<'_>, key: &BlockKey) -> bool {
        if self.blocks.get(key).is_some_and(|b| b.part(spec.rank).is_some()) {
            return true;
        }
        let Some(slice) = self.allocator.allocate(spec.geometry.total()) else { return false };
        match self.blocks.get_mut(key).and_then(|b| b.ram.as_mut()) {
            Some(copy) => {
                copy.parts[spec.rank as usize] = Some(Part::empty(slice, spec.geometry));
                true
            }
            None => {
                self.allocator.free(slice);
                false
            }
        }
    }

    /// Removes a block that holds no part and nothing pins; true when it did.
    fn drop_if_empty(&mut self, key: &BlockKey) -> bool {
        let empty = self.blocks.get(key).is_some_and(|b| {
            b.pins == 0 && b.children == 0 && b.ram.as_ref().is_none_or(|c| c.parts.iter().all(Option::is_none))
        });
        // It holds no bytes: the victim has nothing to reclaim.
        empty && self.detach(key, EvictReason::Capacity).is_some()
    }

    /// Read-only pass: rejects saves that conflict with stored parts (other TP size or
    /// layout) or that could not fit the pool even if it were empty, and returns the pool
    /// bytes new parts need.
    pub fn check_save(&self, spec: &SaveSpec<'_>) -> Result<u64> {
        if !spec.parents.is_empty() && spec.parents.len() != spec.hashes.len() {
            return Err(EngineError::invalid(format!(
                "{} parent hashes for {} blocks (give one per block, or none)",
                spec.parents.len(),
                spec.hashes.len()
            )));
        }
        let (rank, tp_size) = (spec.rank, spec.tp_size);
        let mut new_parts: HashSet<BlockHash, RandomState> = HashSet::default();
        for hash in spec.hashes {
            match self.blocks.get(&spec.key(*hash)) {
                None => {
                    new_parts.insert(*hash);
                }
                Some(block) if block.tp_size() != tp_size as usize => {
                    return Err(EngineError::invalid(format!(
                        "block {} was stored by {} TP ranks, this instance has {tp_size}",
                        hex(hash),
                        block.tp_size()
                    )));
                }
                Some(block) if block.readable() => {}
                Some(block) => match block.part(rank) {
                    None => {
                        new_parts.insert(*hash);
                    }
                    Some(part) if *part.geometry != **spec.geometry => {
                        return Err(EngineError::invalid(format!(
                            "block {} was stored with a different layout for rank {rank}",
                            hex(hash)
                        )));
                    }
                    Some(_) => {}
                },
            }
        }
        let needed = new_parts.len() as u64 * self.allocator.rounded(spec.geometry.total());
        if needed > self.allocator.capacity() {
            return Err(EngineError::ResourceExhausted(format!(
                "saving {} blocks needs {needed} bytes but the pool holds {}",
                spec.hashes.len(),
                self.allocator.capacity()
            )));
        }
        Ok(needed)
    }

    /// Phase two of a save: publishes the copied slots (or clears them when the copy
    /// failed), seals completed blocks and unpins. Returns the number of blocks sealed.
    pub fn complete_save(&mut self, ticket: SaveTicket, copied: bool) -> u32 {
        let mut sealed = 0;
        self.complete_save_each(ticket, copied, |_| sealed += 1);
        sealed
    }

    /// [`Self::complete_save`], returning the blocks it sealed (for a lower tier).
    pub fn complete_save_sealed(&mut self, ticket: SaveTicket, copied: bool) -> Vec<BlockKey> {
        let mut sealed = Vec::new();
        self.complete_save_each(ticket, copied, |key| sealed.push(key.clone()));
        sealed
    }

    fn complete_save_each(&mut self, ticket: SaveTicket, copied: bool, mut on_sealed: impl FnMut(&BlockKey)) {
        let SaveTicket { entries, slots, .. } = ticket;
        for entry in entries {
            let Some(block) = self.blocks.get_mut(&entry.key) else { continue };
            if let Some(part) = block.part_mut(entry.rank) {
                for layer in slots[entry.runs].iter().flat_map(|run| run.layers.clone()) {
                    part.writing = part.writing.saturating_sub(1);
                    if copied {
                        part.slots[layer as usize] = Slot::Saved;
                        part.saved += 1;
                    } else {
                        part.slots[layer as usize] = Slot::Empty;
                    }
                }
            }
            if let Some(copy) = block.ram.as_mut()
                && !copy.sealed
                && copy.is_complete()
            {
                copy.sealed = true;
                self.sealed += 1;
                on_sealed(&entry.key);
            }
            unpin_block(self.policy.as_mut(), &entry.key, block);
        }
    }
}
