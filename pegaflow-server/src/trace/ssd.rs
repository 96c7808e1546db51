//! The SSD tier in a replay: a circular log of a number of blocks (as the server's data
//! file: a new block overwrites the oldest), and when a block goes to it — the choice the
//! replay measures: hit ratio against blocks written.

use std::collections::{HashMap, VecDeque};

use pegaflow_core::cache::BlockHash;
use serde::Serialize;

/// When a block is written to the SSD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SsdWrites {
    /// Every block stored in RAM is written through (the server's choice).
    OnSave,
    /// A block goes down when RAM evicts it.
    OnEvict,
    /// A block goes down when RAM evicts it, if it was hit at least once while cached.
    SecondUse,
}

/// The replayed SSD: which blocks it holds, and what went to it.
#[derive(Debug)]
pub struct SsdModel {
    capacity: usize,
    writes_when: SsdWrites,
    /// Blocks in write order; an entry is stale when `live` has a newer one.
    log: VecDeque<(BlockHash, u64)>,
    live: HashMap<BlockHash, u64>,
    next: u64,
    /// Hits each RAM-resident block got (for `SecondUse`).
    uses: HashMap<BlockHash, u32>,
    /// Blocks written.
    pub written: u64,
}

impl SsdModel {
    /// An empty SSD of `capacity` blocks.
    pub fn new(capacity: u64, writes_when: SsdWrites) -> Self {
        Self {
            capacity: capacity.max(1) as usize,
            writes_when,
            log: VecDeque::new(),
            live: HashMap::new(),
            next: 0,
            uses: HashMap::new(),
            written: 0,
        }
    }

    /// Whether the SSD holds `hash`.
    pub fn holds(&self, hash: &BlockHash) -> bool {
        self.live.contains_key(hash)
    }

    fn write(&mut self, hash: BlockHash) {
        if self.holds(&hash) {
            return;
        }
        while self.live.len() >= self.capacity {
            let Some((old, seq)) = self.log.pop_front() else { break };
            if self.live.get(&old) == Some(&seq) {
                self.live.remove(&old);
            }
        }
        self.log.push_back((hash, self.next));
        self.live.insert(hash, self.next);
        self.next += 1;
        self.written += 1;
    }

    /// Blocks hit (from RAM or copied up from the SSD).
    pub fn used(&mut self, hashes: &[BlockHash]) {
        if self.writes_when == SsdWrites::SecondUse {
            for hash in hashes {
                *self.uses.entry(*hash).or_default() += 1;
            }
        }
    }

    /// Blocks just stored in RAM by a save.
    pub fn stored(&mut self, hashes: &[BlockHash]) {
        if self.writes_when == SsdWrites::OnSave {
            for hash in hashes {
                self.write(*hash);
            }
        }
    }

    /// A block RAM evicted.
    pub fn evicted(&mut self, hash: BlockHash) {
        let uses = self.uses.remove(&hash).unwrap_or(0);
        match self.writes_when {
            SsdWrites::OnEvict => self.write(hash),
            SsdWrites::SecondUse if uses > 0 => self.write(hash),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> BlockHash {
        [n; 32]
    }

    #[test]
    fn a_full_ssd_overwrites_its_oldest_blocks() {
        let mut ssd = SsdModel::new(2, SsdWrites::OnSave);
        ssd.stored(&[h(1), h(2), h(1)]);
        assert_eq!(ssd.written, 2, "a block already there is not written again");
        ssd.stored(&[h(3)]);
        assert!(!ssd.holds(&h(1)) && ssd.holds(&h(2)) && ssd.holds(&h(3)));
    }

    #[test]
    fn each_policy_writes_at_its_moment() {
        let mut on_evict = SsdModel::new(8, SsdWrites::OnEvict);
        on_evict.stored(&[h(1)]);
        assert!(!on_evict.holds(&h(1)));
        on_evict.evicted(h(1));
        assert!(on_evict.holds(&h(1)));

        let mut second = SsdModel::new(8, SsdWrites::SecondUse);
        second.stored(&[h(1), h(2)]);
        second.used(&[h(2)]);
        second.evicted(h(1));
        second.evicted(h(2));
        assert!(!second.holds(&h(1)) && second.holds(&h(2)), "only the block used again");
    }
}
