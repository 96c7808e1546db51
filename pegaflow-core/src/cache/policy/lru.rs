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

    fn touch(&mut self, key: &BlockKey, entry: &mut PolicyEntry, _store: &mut dyn EntryStore) {
        let queued = entry.queued;
        if queued {
            self.dequeue(entry);
        }
        entry.order = self.next_tick();
        if queued {
            self.enqueue(key, entry);
        }
    }

    fn enqueue(&mut self, key: &BlockKey, entry: &mut PolicyEntry) {
        if !entry.queued {
            self.queue.push(entry.order, key);
            entry.queued = true;
        }
    }

    fn dequeue(&mut self, entry: &mut PolicyEntry) {
        if entry.queued {
            self.queue.remove(entry.order);
            entry.queued = false;
        }
    }

    fn remove(&mut self, _entry: &PolicyEntry) {}

    fn choose(&mut self, _candidate: Option<&BlockKey>, store: &mut dyn EntryStore) -> Choice {
        match self.queue.pop_first() {
            Some(key) => {
                if let Some(entry) = store.entry(&key) {
                    entry.queued = false;
                }
                Choice::Evict(key)
            }
            None => Choice::Nothing,
        }
    }
}
