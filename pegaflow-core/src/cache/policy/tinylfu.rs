//! W-TinyLFU: new blocks enter a small LRU window; blocks pushed out of the window join
//! the main region (a segmented LRU: probation, then protected once used again) as
//! *arrivals*. When room is needed, an arrival duels main's victim and the frequency
//! sketch decides which of the two leaves; with no arrival waiting, the new block itself
//! duels the victim and is refused (not copied) if it loses. One-off scans pass through
//! the window and lose their duels, so hot prefixes in main survive them.

use std::collections::VecDeque;

use super::queue::OrderQueue;
use super::sketch::FrequencySketch;
use super::{Choice, EntryStore, Policy, PolicyEntry};
use crate::cache::BlockKey;

/// Share of the resident blocks the window holds (percent). Measured with the replay
/// tool on the synthetic mixed trace (docs/benchmarks.md).
pub const WINDOW_PERCENT: u64 = 1;
/// Share of the main region that is protected (percent).
const PROTECTED_PERCENT: u64 = 50;
/// Arrivals remembered for a duel; older ones become plain probation blocks.
const MAX_ARRIVALS: usize = 4096;

const WINDOW: u8 = 0;
const PROBATION: u8 = 1;
const PROTECTED: u8 = 2;

/// W-TinyLFU over the evictable blocks.
pub struct TinyLfu {
    sketch: FrequencySketch,
    queues: [OrderQueue; 3],
    /// Evictable blocks per segment. Segment shares count only these: a parent or a
    /// pinned block is no candidate for anything, wherever it sits.
    counts: [u64; 3],
    /// Blocks that left the window for probation and have not dueled yet, oldest first,
    /// with their order then (a block used since has proved itself: no duel).
    arrivals: VecDeque<(BlockKey, u64)>,
    window_percent: u64,
    tick: u64,
    rejected: u64,
    /// The last touch left a block in protected: the next rebalance keeps protected
    /// within its share (a touch that ends elsewhere demotes nothing).
    balance_due: bool,
}

impl TinyLfu {
    /// A policy for a tier of about `capacity_blocks` blocks.
    pub fn new(capacity_blocks: u64) -> Self {
        Self {
            sketch: FrequencySketch::new(capacity_blocks),
            queues: Default::default(),
            counts: [0; 3],
            arrivals: VecDeque::new(),
            window_percent: WINDOW_PERCENT,
            tick: 0,
            rejected: 0,
            balance_due: false,
        }
    }

    /// The same with a window of `percent` of the resident blocks (1..=99).
    pub fn with_window_percent(mut self, percent: u64) -> Self {
        self.window_percent = percent.clamp(1, 99);
        self
    }

    fn window_target(&self) -> u64 {
        (self.counts.iter().sum::<u64>() * self.window_percent / 100).max(1)
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Moves a block between segments, keeping its order and whether it is queued.
    fn shift(&mut self, key: &BlockKey, entry: &mut PolicyEntry, to: u8) {
        let from = entry.segment;
        if entry.queued {
            self.queues[from as usize].remove(entry.order);
            self.queues[to as usize].push(entry.order, key);
            self.counts[from as usize] -= 1;
            self.counts[to as usize] += 1;
        }
        entry.segment = to;
    }

    /// Moves the window's oldest blocks to probation, as arrivals, until the window is
    /// within its share.
    fn spill_window(&mut self, store: &mut dyn EntryStore) {
        while self.counts[WINDOW as usize] > self.window_target() {
            let Some(arrival) = self.shift_oldest(WINDOW, PROBATION, store) else { break };
            self.arrivals.push_back(arrival);
            if self.arrivals.len() > MAX_ARRIVALS {
                self.arrivals.pop_front();
            }
        }
    }

    /// Moves the oldest evictable block of `from` to `to`; returns it and its order, or
    /// `None` when `from` has none.
    fn shift_oldest(&mut self, from: u8, to: u8, store: &mut dyn EntryStore) -> Option<(BlockKey, u64)> {
        let (order, key) = self.queues[from as usize].first()?;
        let key = key.clone();
        match store.entry(&key) {
            Some(entry) => {
                let mut moved = *entry;
                self.shift(&key, &mut moved, to);
                *entry = moved;
            }
            // Every queued block is in the index; drop a stray entry all the same.
            None => {
                self.queues[from as usize].pop_first();
                self.counts[from as usize] -= 1;
            }
        }
        Some((key, order))
    }

    /// Keeps the protected segment within its share by demoting its oldest evictable
    /// blocks to probation.
    fn balance_protected(&mut self, store: &mut dyn EntryStore) {
        let main = self.counts[PROBATION as usize] + self.counts[PROTECTED as usize];
        while self.counts[PROTECTED as usize] > main * PROTECTED_PERCENT / 100 {
            if self.shift_oldest(PROTECTED, PROBATION, store).is_none() {
                break;
            }
        }
    }

    /// Main's next victim other than the block at `except` in probation: probation's
    /// oldest, else protected's oldest.
    fn main_victim(&self, except: Option<u64>) -> Option<(u8, BlockKey)> {
        let probation = self.queues[PROBATION as usize].iter().find(|(order, _)| Some(*order) != except);
        probation
            .map(|(_, key)| (PROBATION, key.clone()))
            .or_else(|| self.queues[PROTECTED as usize].first().map(|(_, key)| (PROTECTED, key.clone())))
    }

    fn evict(&mut self, segment: u8, key: BlockKey, store: &mut dyn EntryStore) -> Choice {
        if let Some(entry) = store.entry(&key)
            && entry.queued
        {
            self.queues[segment as usize].remove(entry.order);
            self.counts[segment as usize] -= 1;
            entry.queued = false;
        }
        Choice::Evict(key)
    }

    /// Whether `candidate` is worth at least as much as `victim`: among equals the newer
    /// block wins, as under LRU (the replay tool measured refusing ties lower on every
    /// synthetic trace).
    fn wins(&self, candidate: &BlockKey, victim: &BlockKey) -> bool {
        self.sketch.estimate(candidate) >= self.sketch.estimate(victim)
    }

    /// The oldest arrival still waiting, unused, in probation and evictable, with its
    /// order.
    fn next_arrival(&mut self, store: &mut dyn EntryStore) -> Option<(BlockKey, u64)> {
        while let Some((key, order)) = self.arrivals.pop_front() {
            if let Some(entry) = store.entry(&key)
                && entry.segment == PROBATION
                && entry.queued
                && entry.order == order
            {
                return Some((key, order));
            }
        }
        None
    }
}

impl Policy for TinyLfu {
    fn name(&self) -> &'static str {
        "tinylfu"
    }

    fn record(&mut self, key: &BlockKey) {
        self.sketch.record(key);
    }

    fn insert(&mut self, _key: &BlockKey, entry: &mut PolicyEntry, store: &mut dyn EntryStore) {
        *entry = PolicyEntry { segment: WINDOW, order: self.next_tick(), queued: false };
        self.spill_window(store);
    }

    fn touch(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        let queued = entry.queued;
        self.dequeue(entry);
        entry.order = self.next_tick();
        if entry.segment == PROBATION {
            self.shift(key, entry, PROTECTED);
        }
        self.balance_due = entry.segment == PROTECTED;
        if queued {
            self.enqueue(key, entry);
        }
    }

    fn rebalance(&mut self, store: &mut dyn EntryStore) {
        // The index keeps the touched block off its queue until this returns, so the
        // block itself is never the one demoted.
        if std::mem::take(&mut self.balance_due) {
            self.balance_protected(store);
        }
    }

    fn enqueue(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        if !entry.queued {
            self.queues[entry.segment as usize].push(entry.order, key);
            self.counts[entry.segment as usize] += 1;
            entry.queued = true;
        }
    }

    fn dequeue(&mut self, entry: &mut PolicyEntry) {
        if entry.queued {
            self.queues[entry.segment as usize].remove(entry.order);
            self.counts[entry.segment as usize] -= 1;
            entry.queued = false;
        }
    }

    fn remove(&mut self, _entry: &PolicyEntry) {}

    fn choose(&mut self, candidate: Option<&BlockKey>, store: &mut dyn EntryStore) -> Choice {
        self.spill_window(store);
        if let Some((arrival, order)) = self.next_arrival(store) {
            // The newest member of main duels its oldest: the loser leaves.
            return match self.main_victim(Some(order)) {
                Some((segment, victim)) if self.wins(&arrival, &victim) => self.evict(segment, victim, store),
                Some(_) => {
                    self.rejected += 1;
                    self.evict(PROBATION, arrival, store)
                }
                None => self.evict(PROBATION, arrival, store),
            };
        }
        // No arrival waits for a duel: the new block itself must beat main's victim (a
        // block popular enough is never evicted for one that is not).
        let victim = self.main_victim(None);
        let Some((segment, victim)) =
            victim.or_else(|| self.queues[WINDOW as usize].first().map(|(_, k)| (WINDOW, k.clone())))
        else {
            return Choice::Nothing;
        };
        match candidate {
            Some(candidate) if !self.wins(candidate, &victim) => {
                self.rejected += 1;
                Choice::Reject
            }
            _ => self.evict(segment, victim, store),
        }
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;

    impl EntryStore for HashMap<BlockKey, PolicyEntry> {
        fn entry(&mut self, key: &BlockKey) -> Option<&mut PolicyEntry> {
            self.get_mut(key)
        }
    }

    fn key(i: u8) -> BlockKey {
        BlockKey { namespace: Arc::from("ns"), hash: [i; 32] }
    }

    /// Four protected blocks (over protected's share of a main region without probation)
    /// and one window block, each on its queue.
    fn policy_over_its_share() -> (TinyLfu, HashMap<BlockKey, PolicyEntry>) {
        let mut policy = TinyLfu::new(1000);
        let mut store = HashMap::new();
        for (i, segment) in [(1, PROTECTED), (2, PROTECTED), (3, PROTECTED), (4, PROTECTED), (9, WINDOW)] {
            let mut entry = PolicyEntry { segment, order: policy.next_tick(), queued: false };
            policy.enqueue(&key(i), &mut entry);
            store.insert(key(i), entry);
        }
        (policy, store)
    }

    /// A use as the index makes it: off the queue, touch, rebalance, back on.
    fn used(policy: &mut TinyLfu, store: &mut HashMap<BlockKey, PolicyEntry>, i: u8) {
        let mut entry = store[&key(i)];
        policy.dequeue(&mut entry);
        policy.touch(&key(i), &mut entry);
        store.insert(key(i), entry);
        policy.rebalance(store);
        let mut entry = store[&key(i)];
        policy.enqueue(&key(i), &mut entry);
        store.insert(key(i), entry);
    }

    #[test]
    fn only_a_use_that_ends_in_protected_demotes_protected_blocks() {
        let (mut policy, mut store) = policy_over_its_share();
        used(&mut policy, &mut store, 9); // a window block: protected is left alone
        assert_eq!(policy.counts, [1, 0, 4]);
        used(&mut policy, &mut store, 4); // a protected block: the others over the share go
        assert_eq!(policy.counts, [1, 2, 2]);
        assert_eq!(store[&key(1)].segment, PROBATION, "the oldest protected block is demoted first");
        assert_eq!(store[&key(4)].segment, PROTECTED, "the used block itself is never demoted");
    }
}
