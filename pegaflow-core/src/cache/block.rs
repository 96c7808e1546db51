//! A block's record: which tiers hold a copy, in what state, and what keeps it cached.

use std::ops::Range;
use std::sync::Arc;

use super::policy::PolicyEntry;
use super::{BlockHash, CopyState, PartGeometry, Tier};
use crate::memory::PoolSlice;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Empty,
    Writing,
    Saved,
}

/// One TP rank's bytes of a block in the RAM pool.
pub(super) struct Part {
    pub slice: PoolSlice,
    pub geometry: Arc<PartGeometry>,
    pub slots: Box<[Slot]>,
    pub saved: u32,
    /// Slots being written now.
    pub writing: u32,
}

impl Part {
    /// A part in `slice` with no slot saved or being written.
    pub fn empty(slice: PoolSlice, geometry: &Arc<PartGeometry>) -> Self {
        Self {
            slice,
            geometry: Arc::clone(geometry),
            slots: vec![Slot::Empty; geometry.num_layers() as usize].into(),
            saved: 0,
            writing: 0,
        }
    }

    /// Marks the empty slots among `layers` as being written and calls `run(layers, pool
    /// offset)` for each run of consecutive layers marked (a run's slots are back to
    /// back in the pool). Returns whether it marked any.
    pub fn mark_writing(&mut self, layers: &[u32], mut run: impl FnMut(Range<u32>, u64)) -> bool {
        let mut current: Option<Range<u32>> = None;
        let mut marked = false;
        for &layer in layers {
            let slot = &mut self.slots[layer as usize];
            if *slot != Slot::Empty {
                if let Some(done) = current.take() {
                    run(done.clone(), self.slot_offset(done.start));
                }
                continue;
            }
            *slot = Slot::Writing;
            self.writing += 1;
            marked = true;
            match &mut current {
                Some(open) if open.end == layer => open.end += 1,
                _ => {
                    if let Some(done) = current.replace(layer..layer + 1) {
                        run(done.clone(), self.slot_offset(done.start));
                    }
                }
            }
        }
        if let Some(done) = current {
            run(done.clone(), self.slot_offset(done.start));
        }
        marked
    }

    /// Pool offset of `layer`'s slot.
    pub fn slot_offset(&self, layer: u32) -> u64 {
        self.slice.offset() + self.geometry.layer_offset(layer)
    }
}

/// The RAM tier's copy of a block: one part per TP rank.
pub(super) struct RamCopy {
    pub parts: Box<[Option<Part>]>,
    /// Every slot of every part saved: the copy is readable.
    pub sealed: bool,
    /// Loads copying out of it now.
    pub reads: u32,
}

impl RamCopy {
    pub fn new(tp_size: u32) -> Self {
        Self { parts: (0..tp_size).map(|_| None).collect(), sealed: false, reads: 0 }
    }

    pub fn is_complete(&self) -> bool {
        self.parts.iter().all(|p| p.as_ref().is_some_and(|p| p.saved == p.geometry.num_layers()))
    }

    pub fn state(&self) -> CopyState {
        match (self.sealed, self.reads) {
            (false, _) => CopyState::Writing,
            (true, 0) => CopyState::Readable,
            (true, _) => CopyState::Reading,
        }
    }

    /// Whether some slot is being written now (a query may wait for it).
    pub fn write_in_flight(&self) -> bool {
        self.parts.iter().flatten().any(|p| p.writing > 0)
    }
}

/// A block of the index.
pub(super) struct Block {
    /// The RAM tier's copy (the SSD and remote tiers of later work add theirs here).
    pub ram: Option<RamCopy>,
    /// Leases and in-flight copies: a pinned block is never a victim.
    pub pins: u32,
    /// The block before it in its prefix chain, when the saver said so and it was cached.
    pub parent: Option<BlockHash>,
    /// Cached blocks whose parent this is: a block with children is never a victim, so
    /// eviction takes chain tails first and never strands a child.
    pub children: u32,
    pub policy: PolicyEntry,
}

impl Block {
    pub fn new(tp_size: u32) -> Self {
        Self { ram: Some(RamCopy::new(tp_size)), pins: 0, parent: None, children: 0, policy: PolicyEntry::default() }
    }

    /// Readable in some tier (sealed).
    pub fn readable(&self) -> bool {
        self.ram.as_ref().is_some_and(|c| c.sealed)
    }

    /// Whether the policy may pick it.
    pub fn evictable(&self) -> bool {
        self.pins == 0 && self.children == 0 && self.ram.is_some()
    }

    /// The tiers holding a copy, with each copy's state.
    pub fn copies(&self) -> impl Iterator<Item = (Tier, CopyState)> + '_ {
        self.ram.iter().map(|c| (Tier::Ram, c.state()))
    }

    pub fn part(&self, rank: u32) -> Option<&Part> {
        self.ram.as_ref()?.parts.get(rank as usize)?.as_ref()
    }

    pub fn part_mut(&mut self, rank: u32) -> Option<&mut Part> {
        self.ram.as_mut()?.parts.get_mut(rank as usize)?.as_mut()
    }

    pub fn tp_size(&self) -> usize {
        self.ram.as_ref().map_or(0, |c| c.parts.len())
    }
}
