//! An ordered queue of evictable blocks: the building block of every policy.

use std::collections::BTreeMap;

use super::{Choice, EntryStore, PolicyEntry};
use crate::cache::BlockKey;

/// Blocks by order value (unique per block), smallest first.
#[derive(Default)]
pub(super) struct OrderQueue {
    by_order: BTreeMap<u64, BlockKey>,
}

impl OrderQueue {
    pub fn push(&mut self, order: u64, key: &BlockKey) {
        self.by_order.insert(order, key.clone());
    }

    pub fn remove(&mut self, order: u64) {
        self.by_order.remove(&order);
    }

    pub fn first(&self) -> Option<(u64, &BlockKey)> {
        self.by_order.first_key_value().map(|(order, key)| (*order, key))
    }

    pub fn last(&self) -> Option<(u64, &BlockKey)> {
        self.by_order.last_key_value().map(|(order, key)| (*order, key))
    }

    /// Blocks in order, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &BlockKey)> {
        self.by_order.iter().map(|(order, key)| (*order, key))
    }

    pub fn pop_first(&mut self) -> Option<BlockKey> {
        self.by_order.pop_first().map(|(_, key)| key)
    }

    pub fn pop_last(&mut self) -> Option<BlockKey> {
        self.by_order.pop_last().map(|(_, key)| key)
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
