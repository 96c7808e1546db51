//! How often a block was asked for lately: a count-min sketch of 4-bit counters behind a
//! doorkeeper, halved periodically so that old popularity fades.
//!
//! The doorkeeper (a Bloom filter sized for one aging period's requests, ~3% false
//! positives) absorbs the first request of every key, so the one-off keys of a scan
//! never reach the counters; a key's estimate is the smallest of its four counters plus
//! one when the doorkeeper has seen it. After `10 × width`
//! recorded requests every counter is halved and the doorkeeper cleared (aging), so the
//! sketch follows shifts in popularity and never saturates for good.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use crate::cache::BlockKey;

const ROWS: usize = 4;
const WIDTH_FACTOR: u64 = 1;
const SAMPLE_FACTOR: u64 = 1;
/// Counters saturate here (4 bits' worth: more says nothing new about popularity).
const MAX_COUNT: u8 = 15;
/// Multipliers deriving the rows' and the doorkeeper's indexes from one 64-bit hash.
const SEEDS: [u64; ROWS + DOORKEEPER_PROBES] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x85EB_CA77_C2B2_AE63,
    0x27D4_EB2F_1656_67C5,
    0xFF51_AFD7_ED55_8CCD,
    0xC4CE_B9FE_1A85_EC53,
];
/// Bits the doorkeeper probes per key, and bits it has per request of an aging period
/// (3 and 8: about 3% false positives when every request is a new key).
const DOORKEEPER_PROBES: usize = 3;
const DOORKEEPER_BITS_PER_REQUEST: u64 = 8;

/// Frequency estimates for admission.
pub struct FrequencySketch {
    counters: Box<[u8]>,
    doorkeeper: Box<[u64]>,
    /// Counters per row; a power of two.
    width: usize,
    hasher: RandomState,
    /// Requests recorded since the last aging, and how many trigger the next.
    recorded: u64,
    sample: u64,
    agings: u64,
}

impl FrequencySketch {
    /// A sketch for a cache of about `capacity` blocks (clients choose block hashes, so
    /// indexes come from a per-process random seed).
    pub fn new(capacity: u64) -> Self {
        let width = (capacity * WIDTH_FACTOR).clamp(64, 1 << 26).next_power_of_two() as usize;
        let sample = SAMPLE_FACTOR * capacity.max(64);
        Self {
            counters: vec![0; width * ROWS].into(),
            doorkeeper: vec![0; (sample * DOORKEEPER_BITS_PER_REQUEST / 64) as usize].into(),
            width,
            hasher: RandomState::default(),
            recorded: 0,
            sample,
            agings: 0,
        }
    }

    /// Counts one request for `key`.
    pub fn record(&mut self, key: &BlockKey) {
        let hash = self.hasher.hash_one(key);
        if self.doorkeeper_insert(hash) {
            for row in 0..ROWS {
                let i = self.index(hash, row);
                if self.counters[i] < MAX_COUNT {
                    self.counters[i] += 1;
                }
            }
        }
        self.recorded += 1;
        if self.recorded >= self.sample {
            self.age();
        }
    }

    /// How often `key` was asked for lately (0 to 16).
    pub fn estimate(&self, key: &BlockKey) -> u8 {
        let hash = self.hasher.hash_one(key);
        let counted = (0..ROWS).map(|row| self.counters[self.index(hash, row)]).min().unwrap_or(0);
        counted + u8::from(self.doorkeeper_contains(hash))
    }

    /// Times the counters were halved.
    pub fn agings(&self) -> u64 {
        self.agings
    }

    /// Halves every counter and clears the doorkeeper.
    fn age(&mut self) {
        for counter in self.counters.iter_mut() {
            *counter /= 2;
        }
        self.doorkeeper.fill(0);
        self.recorded = 0;
        self.agings += 1;
    }

    fn index(&self, hash: u64, row: usize) -> usize {
        let spread = hash.wrapping_mul(SEEDS[row]);
        row * self.width + (spread >> 32) as usize % self.width
    }

    fn doorkeeper_bits(&self, hash: u64) -> [usize; DOORKEEPER_PROBES] {
        let bits = self.doorkeeper.len() * 64;
        std::array::from_fn(|probe| (hash.wrapping_mul(SEEDS[ROWS + probe]) >> 29) as usize % bits)
    }

    fn doorkeeper_contains(&self, hash: u64) -> bool {
        self.doorkeeper_bits(hash).iter().all(|&bit| self.doorkeeper[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Sets the key's bits; true when they were all set already (seen before).
    fn doorkeeper_insert(&mut self, hash: u64) -> bool {
        let mut seen = true;
        for bit in self.doorkeeper_bits(hash) {
            let word = &mut self.doorkeeper[bit / 64];
            seen &= *word & (1 << (bit % 64)) != 0;
            *word |= 1 << (bit % 64);
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(i: u32) -> BlockKey {
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&i.to_le_bytes());
        BlockKey { namespace: Arc::from("m"), hash }
    }

    #[test]
    fn the_doorkeeper_absorbs_first_requests_and_counts_saturate() {
        let mut s = FrequencySketch::new(1024);
        assert_eq!(s.estimate(&key(1)), 0);
        s.record(&key(1));
        assert_eq!(s.estimate(&key(1)), 1, "doorkeeper only");
        s.record(&key(1));
        assert_eq!(s.estimate(&key(1)), 2);
        for _ in 0..100 {
            s.record(&key(1));
        }
        assert_eq!(s.estimate(&key(1)), MAX_COUNT + 1);
        assert!(s.estimate(&key(2)) <= 1, "an unseen key is near zero");
    }

    #[test]
    fn aging_halves_old_popularity() {
        let mut s = FrequencySketch::new(64);
        for _ in 0..12 {
            s.record(&key(1));
        }
        let before = s.estimate(&key(1));
        // One-off keys push the sketch past its sample size.
        let mut i = 100;
        while s.agings() == 0 {
            s.record(&key(i));
            i += 1;
        }
        let after = s.estimate(&key(1));
        assert!(after <= before / 2 + 1, "{before} -> {after}");
        assert!(after >= 1, "halved, not forgotten");
    }

    #[test]
    fn hot_keys_outrank_one_off_keys() {
        let mut s = FrequencySketch::new(4096);
        for round in 0..8 {
            for hot in 0..50 {
                s.record(&key(hot));
            }
            for cold in 0..500 {
                s.record(&key(10_000 + round * 1000 + cold));
            }
        }
        let hot_min = (0..50).map(|k| s.estimate(&key(k))).min().unwrap();
        let cold_max = (0..500).map(|k| s.estimate(&key(17_000 + k))).max().unwrap();
        assert!(hot_min > cold_max, "hot {hot_min} vs cold {cold_max}");
    }
}
