//! Least recently used first; everything is admitted.

use super::queue::OrderQueue;
use super::{Choice, EntryStore, Policy, PolicyEntry};
use crate::cache::BlockKey;

/// LRU over the evictable blocks. A block's order is the tick of its last use, so a
/// parent that becomes evictable again (its last child left) takes its old place.
#[derive(Default)]
pub struct Lru {
    queue: OrderQueue,
    tick: u64,
}

impl Lru {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, _key: &BlockKey, entry: &mut PolicyEntry, _store: &mut dyn EntryStore) {
        *entry = PolicyEntry { segment: 0, order: self.next_tick(), queued: false };
    }

    fn touch(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        let order = self.next_tick();
        self.queue.reorder(key, entry, order);
    }

    fn enqueue(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        self.queue.enqueue(key, entry);
    }

    fn dequeue(&mut self, entry: &mut PolicyEntry) {
        self.queue.dequeue(entry);
    }

    fn remove(&mut self, _entry: &PolicyEntry) {}

    fn choose(&mut self, _candidate: Option<&BlockKey>, store: &mut dyn EntryStore) -> Choice {
        match self.queue.pop_first() {
            Some(key) => OrderQueue::evict(key, store),
            None => Choice::Nothing,
        }
    }
}
