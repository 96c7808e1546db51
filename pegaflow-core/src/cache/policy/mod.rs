//! Admission and eviction order, apart from the index's bookkeeping.
//!
//! The index decides *whether* a block may leave (unpinned, no cached children, a copy
//! in the tier); a policy decides *which* of those leaves first and whether a new block
//! is worth a place at all. A policy sees only blocks the index put on its queues
//! ([`Policy::enqueue`]), so leased, in-flight and parent blocks can never be victims.
//! Its per-block state lives in the block's record ([`PolicyEntry`]), so a policy keeps
//! no map of its own; when it must change another block's state (moving it between
//! segments) it reaches it through [`EntryStore`].

mod lru;
mod opt;
mod queue;
mod sketch;
mod tinylfu;

pub use lru::Lru;
pub use opt::{Opt, OptClock, OptOracle};
pub use sketch::FrequencySketch;
pub use tinylfu::{TinyLfu, WINDOW_PERCENT};

use super::BlockKey;

/// Where a block stands in a policy; kept in the block's record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntry {
    /// Policy-defined segment (W-TinyLFU: window, probation, protected).
    pub segment: u8,
    /// Position in the segment's queue, unique per block: smaller leaves first, except
    /// where a policy says otherwise (Belady evicts the largest next use).
    pub order: u64,
    /// On a queue, i.e. evictable now.
    pub queued: bool,
}

/// What to do so that a new block fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Evict this block (already taken off its queue).
    Evict(BlockKey),
    /// Do not admit the candidate: it is worth less than what would leave for it.
    Reject,
    /// Nothing can be evicted (everything is pinned or a parent).
    Nothing,
}

/// Access to the records of other blocks, for policies that move them between segments.
pub trait EntryStore {
    /// The policy state of `key`'s block, if it is in the index.
    fn entry(&mut self, key: &BlockKey) -> Option<&mut PolicyEntry>;
}

/// Admission and eviction order. One instance per tier; not thread-safe by itself (the
/// index that owns it is behind the engine's mutex).
pub trait Policy: Send {
    /// Short name for logs and metrics (`lru`, `tinylfu`, `opt`).
    fn name(&self) -> &'static str;

    /// Counts one request for `key` (every hash a query asks for, hit or miss): the
    /// frequency admission weighs. Default: nothing.
    fn record(&mut self, _key: &BlockKey) {}

    /// A block entered the index (its record is not in `store` yet). It is not on a
    /// queue yet.
    fn insert(&mut self, key: &BlockKey, entry: &mut PolicyEntry, store: &mut dyn EntryStore);

    /// The block was used (hit, or saved again): moves it in its queue if it is on one.
    /// Changes only this block's state; what the use makes the policy do to other blocks
    /// waits for [`Policy::rebalance`], which the index calls once the entry is back in
    /// its record (one lookup of the record per hit) and before the block goes back on its
    /// queue.
    fn touch(&mut self, key: &BlockKey, entry: &mut PolicyEntry);

    /// Moves other blocks as the last [`Policy::touch`] requires (W-TinyLFU: demotes
    /// protected blocks beyond its share). Default: nothing.
    fn rebalance(&mut self, _store: &mut dyn EntryStore) {}

    /// The block may leave now: puts it on its segment's queue at its current order.
    fn enqueue(&mut self, key: &BlockKey, entry: &mut PolicyEntry);

    /// The block must stay (pinned, or a parent of cached blocks): takes it off its queue.
    fn dequeue(&mut self, entry: &mut PolicyEntry);

    /// The block left the index (taken off its queue first by the caller).
    fn remove(&mut self, entry: &PolicyEntry);

    /// Makes room for `candidate`, a block not yet in the index (`None`: room for nothing
    /// in particular, as when dropping the cache). The chosen victim is off its queue.
    fn choose(&mut self, candidate: Option<&BlockKey>, store: &mut dyn EntryStore) -> Choice;

    /// Candidates refused admission since start.
    fn rejected(&self) -> u64 {
        0
    }
}

/// Which policy a tier runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Least recently used first, everything admitted.
    Lru,
    /// W-TinyLFU: an LRU window in front of a segmented LRU whose entry is guarded by a
    /// frequency sketch (the server's default).
    #[default]
    TinyLfu,
}

impl PolicyKind {
    /// The policy for a tier expected to hold about `capacity_blocks` blocks (sizes the
    /// frequency sketch).
    pub fn build(self, capacity_blocks: u64) -> Box<dyn Policy> {
        match self {
            Self::Lru => Box::new(Lru::default()),
            Self::TinyLfu => Box::new(TinyLfu::new(capacity_blocks)),
        }
    }
}
