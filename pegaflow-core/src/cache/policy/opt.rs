//! Belady's optimum: evict the block needed furthest in the future, and do not admit a
//! block needed later than every block it would displace. It reads the future from the
//! trace being replayed, so it exists only as the reference the replay tool measures
//! real policies against; the server never runs it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::queue::OrderQueue;
use super::{Choice, EntryStore, Policy, PolicyEntry};
use crate::cache::{BlockHash, BlockKey};

/// Every future request of every block: positions in the trace's sequence of block
/// requests (request by request, block by block), ascending per block.
#[derive(Debug, Default)]
pub struct OptOracle {
    uses: HashMap<BlockHash, Vec<u64>>,
}

impl OptOracle {
    /// Notes that the block `hash` is requested at `position` (positions must grow).
    pub fn push(&mut self, hash: BlockHash, position: u64) {
        self.uses.entry(hash).or_default().push(position);
    }

    /// The first request of `hash` at or after `from`.
    fn next_use(&self, hash: &BlockHash, from: u64) -> Option<u64> {
        let uses = self.uses.get(hash)?;
        let i = uses.partition_point(|&p| p < from);
        uses.get(i).copied()
    }
}

/// Where the replay is: the position of the first block request of the next request
/// (so a block's next use is its first request at or after it).
pub type OptClock = Arc<AtomicU64>;

/// Belady's policy over a known trace.
pub struct Opt {
    oracle: Arc<OptOracle>,
    clock: OptClock,
    queue: OrderQueue,
    /// Blocks never needed again get orders counting down from the top, unique each.
    never: u64,
    rejected: u64,
}

impl Opt {
    /// The optimum for the trace `oracle` describes, following the replay at `clock`.
    pub fn new(oracle: Arc<OptOracle>, clock: OptClock) -> Self {
        Self { oracle, clock, queue: OrderQueue::default(), never: u64::MAX, rejected: 0 }
    }

    fn next_use(&mut self, key: &BlockKey) -> u64 {
        match self.oracle.next_use(&key.hash, self.clock.load(Ordering::Relaxed)) {
            Some(position) => position,
            None => {
                self.never -= 1;
                self.never
            }
        }
    }
}

impl Policy for Opt {
    fn name(&self) -> &'static str {
        "opt"
    }

    fn insert(&mut self, key: &BlockKey, entry: &mut PolicyEntry, _store: &mut dyn EntryStore) {
        *entry = PolicyEntry { segment: 0, order: self.next_use(key), queued: false };
    }

    fn touch(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        let order = self.next_use(key);
        self.queue.reorder(key, entry, order);
    }

    fn enqueue(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        self.queue.enqueue(key, entry);
    }

    fn dequeue(&mut self, entry: &mut PolicyEntry) {
        self.queue.dequeue(entry);
    }

    fn remove(&mut self, _entry: &PolicyEntry) {}

    fn choose(&mut self, candidate: Option<&BlockKey>, store: &mut dyn EntryStore) -> Choice {
        let Some((furthest, _)) = self.queue.last() else { return Choice::Nothing };
        if let Some(candidate) = candidate {
            let needed_at = self.oracle.next_use(&candidate.hash, self.clock.load(Ordering::Relaxed));
            if needed_at.is_none_or(|at| at > furthest) {
                self.rejected += 1;
                return Choice::Reject;
            }
        }
        match self.queue.pop_last() {
            Some(key) => OrderQueue::evict(key, store),
            None => Choice::Nothing,
        }
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }
}
