//! An ordered queue of evictable blocks: the building block of every policy.

use std::collections::BTreeMap;

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

    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    pub fn pop_first(&mut self) -> Option<BlockKey> {
        self.by_order.pop_first().map(|(_, key)| key)
    }

    pub fn pop_last(&mut self) -> Option<BlockKey> {
        self.by_order.pop_last().map(|(_, key)| key)
    }
}
