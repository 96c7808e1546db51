//! An ordered queue of evictable blocks: the building block of every policy.
//!
//! Policies push mostly in rising order (LRU and W-TinyLFU take a new tick on every use),
//! so most blocks go to the back of a sorted run in O(1) and leave it by a binary search
//! and a tombstone; only a block pushed below the run's end (a parent back on its queue
//! at its old place, a block moved between W-TinyLFU's segments, Belady's next-use
//! orders) goes to an ordered map. A B-tree for everything cost ~20% of a query's server
//! time in node inserts and removals (a profile of 4,096-block queries and releases).

use std::collections::{BTreeMap, VecDeque};
use std::iter::Peekable;

use super::{Choice, EntryStore, PolicyEntry};
use crate::cache::BlockKey;

/// Blocks by order value (unique per block), smallest first.
#[derive(Default)]
pub(super) struct OrderQueue {
    /// Rising orders; a removed block leaves a tombstone (`None`) until it reaches either
    /// end or the run is compacted. Both ends are always live.
    run: VecDeque<(u64, Option<BlockKey>)>,
    /// Live blocks in `run`.
    run_live: usize,
    /// Blocks pushed with an order not above the run's last.
    side: BTreeMap<u64, BlockKey>,
}

/// Tombstones tolerated beyond the live blocks before the run is compacted.
const SLACK: usize = 64;

impl OrderQueue {
    pub fn push(&mut self, order: u64, key: &BlockKey) {
        match self.run.back() {
            Some((last, _)) if order <= *last => {
                self.side.insert(order, key.clone());
            }
            _ => {
                self.run.push_back((order, Some(key.clone())));
                self.run_live += 1;
            }
        }
    }

    pub fn remove(&mut self, order: u64) {
        let _ = self.take(order);
    }

    /// Removes the block of `order`, if queued.
    fn take(&mut self, order: u64) -> Option<BlockKey> {
        if let Ok(at) = self.run.binary_search_by_key(&order, |(o, _)| *o)
            && let Some(key) = self.run[at].1.take()
        {
            self.run_live -= 1;
            self.tidy();
            return Some(key);
        }
        self.side.remove(&order)
    }

    /// Restores the invariants after a removal: live ends, bounded tombstones.
    fn tidy(&mut self) {
        while matches!(self.run.front(), Some((_, None))) {
            self.run.pop_front();
        }
        while matches!(self.run.back(), Some((_, None))) {
            self.run.pop_back();
        }
        if self.run.len() > 2 * self.run_live + SLACK {
            self.run.retain(|(_, key)| key.is_some());
        }
    }

    fn run_first(&self) -> Option<(u64, &BlockKey)> {
        self.run.front().and_then(|(order, key)| key.as_ref().map(|k| (*order, k)))
    }

    fn run_last(&self) -> Option<(u64, &BlockKey)> {
        self.run.back().and_then(|(order, key)| key.as_ref().map(|k| (*order, k)))
    }

    pub fn first(&self) -> Option<(u64, &BlockKey)> {
        let side = self.side.first_key_value().map(|(order, key)| (*order, key));
        match (self.run_first(), side) {
            (Some(run), Some(side)) => Some(if side.0 < run.0 { side } else { run }),
            (run, side) => run.or(side),
        }
    }

    pub fn last(&self) -> Option<(u64, &BlockKey)> {
        let side = self.side.last_key_value().map(|(order, key)| (*order, key));
        match (self.run_last(), side) {
            (Some(run), Some(side)) => Some(if side.0 > run.0 { side } else { run }),
            (run, side) => run.or(side),
        }
    }

    /// Blocks in order, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &BlockKey)> {
        let run = self.run.iter().filter_map(|(order, key)| key.as_ref().map(|k| (*order, k)));
        Merge { a: run.peekable(), b: self.side.iter().map(|(order, key)| (*order, key)).peekable() }
    }

    pub fn pop_first(&mut self) -> Option<BlockKey> {
        let (order, _) = self.first()?;
        self.take(order)
    }

    pub fn pop_last(&mut self) -> Option<BlockKey> {
        let (order, _) = self.last()?;
        self.take(order)
    }
}

/// Two ordered iterators as one (orders are unique across both).
struct Merge<'a, A: Iterator<Item = (u64, &'a BlockKey)>, B: Iterator<Item = (u64, &'a BlockKey)>> {
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<'a, A, B> Iterator for Merge<'a, A, B>
where
    A: Iterator<Item = (u64, &'a BlockKey)>,
    B: Iterator<Item = (u64, &'a BlockKey)>,
{
    type Item = (u64, &'a BlockKey);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) if b.0 < a.0 => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

/// Queue moves of a policy entry: the entry's `queued` flag and the queue stay in step.
impl OrderQueue {
    /// Puts the block on the queue at its order (nothing when it is on already).
    pub fn enqueue(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        if !entry.queued {
            self.push(entry.order, key);
            entry.queued = true;
        }
    }

    /// Takes the block off the queue (nothing when it is off).
    pub fn dequeue(&mut self, entry: &mut PolicyEntry) {
        if entry.queued {
            self.remove(entry.order);
            entry.queued = false;
        }
    }

    /// Gives the block a new order, keeping it on the queue if it was.
    pub fn reorder(&mut self, key: &BlockKey, entry: &mut PolicyEntry, order: u64) {
        let queued = entry.queued;
        self.dequeue(entry);
        entry.order = order;
        if queued {
            self.enqueue(key, entry);
        }
    }

    /// The victim taken off the queue, its record marked so.
    pub fn evict(key: BlockKey, store: &mut dyn EntryStore) -> Choice {
        if let Some(entry) = store.entry(&key) {
            entry.queued = false;
        }
        Choice::Evict(key)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(n: u64) -> BlockKey {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&n.to_le_bytes());
        BlockKey { namespace: Arc::from("ns"), hash }
    }

    fn snapshot(q: &OrderQueue) -> Vec<(u64, BlockKey)> {
        q.iter().map(|(order, key)| (order, key.clone())).collect()
    }

    /// Random pushes (mostly rising, some below the end), removals, pops from both ends,
    /// checked after every step against a B-tree holding the same blocks.
    #[test]
    fn behaves_like_an_ordered_map_under_random_operations() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut q = OrderQueue::default();
        let mut model: BTreeMap<u64, BlockKey> = BTreeMap::new();
        let mut tick = 1_000u64;
        for step in 0..40_000 {
            match rand(100) {
                0..45 => {
                    tick += 1 + rand(3);
                    let order = if rand(10) == 0 { rand(tick) } else { tick };
                    if let std::collections::btree_map::Entry::Vacant(slot) = model.entry(order) {
                        q.push(order, &key(order));
                        slot.insert(key(order));
                    }
                }
                45..85 => {
                    if let Some(order) = model.keys().nth(rand(model.len().max(1) as u64) as usize).copied() {
                        q.remove(order);
                        model.remove(&order);
                    }
                    q.remove(u64::MAX - rand(5)); // absent: no effect
                }
                85..93 => assert_eq!(q.pop_first(), model.pop_first().map(|(_, k)| k), "step {step}"),
                _ => assert_eq!(q.pop_last(), model.pop_last().map(|(_, k)| k), "step {step}"),
            }
            assert_eq!(q.first().map(|(o, _)| o), model.first_key_value().map(|(o, _)| *o), "step {step}");
            assert_eq!(q.last().map(|(o, _)| o), model.last_key_value().map(|(o, _)| *o), "step {step}");
            if step % 97 == 0 {
                assert_eq!(snapshot(&q), model.iter().map(|(o, k)| (*o, k.clone())).collect::<Vec<_>>());
            }
            assert!(q.run.len() <= 2 * q.run_live + SLACK);
        }
        assert_eq!(snapshot(&q), model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn rising_pushes_stay_in_the_run_and_removals_leave_no_tombstone_at_the_ends() {
        let mut q = OrderQueue::default();
        for order in 1..=100 {
            q.push(order, &key(order));
        }
        assert!(q.side.is_empty());
        assert_eq!(q.run_live, 100);
        for order in (2..=99).step_by(2) {
            q.remove(order);
        }
        q.remove(1);
        q.remove(100);
        assert_eq!(q.first().map(|(o, _)| o), Some(3));
        assert_eq!(q.last().map(|(o, _)| o), Some(99));
        // A block back at its old place goes to the side map and comes out in order.
        q.push(50, &key(50));
        assert_eq!(q.side.len(), 1);
        let orders: Vec<u64> = q.iter().map(|(o, _)| o).collect();
        assert_eq!(orders.iter().filter(|o| **o == 50).count(), 1);
        assert!(orders.is_sorted());
        assert_eq!(orders.len(), 50);
    }
}
