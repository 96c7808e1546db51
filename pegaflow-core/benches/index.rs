//! Index throughput: queries of 256 hashes per second on one core, against a cache
//! of 100,000 blocks in 256-block chains, under each policy. Each query takes and
//! releases its lease, as a real one does. `cargo bench -p pegaflow-core --bench index`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use pegaflow_core::cache::{BlockCache, BlockHash, PartGeometry, PolicyKind, SaveSpec};
use pegaflow_core::memory::PoolAllocator;

const CHAIN: usize = 256;
const CHAINS: usize = 400;
const BLOCK: u64 = 64 << 10;

fn hash(chain: usize, i: usize) -> BlockHash {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&(chain as u64).to_le_bytes());
    h[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    h
}

fn filled(kind: PolicyKind) -> pegaflow_core::Result<(BlockCache, Arc<str>)> {
    let blocks = (CHAIN * CHAINS) as u64;
    let mut cache = BlockCache::with_policy(PoolAllocator::new(blocks * BLOCK, Some(BLOCK)), kind.build(blocks));
    let namespace: Arc<str> = Arc::from("bench");
    let geometry = Arc::new(PartGeometry::new(vec![BLOCK]));
    for c in 0..CHAINS {
        let hashes: Vec<BlockHash> = (0..CHAIN).map(|i| hash(c, i)).collect();
        let parents: Vec<Option<BlockHash>> = (0..CHAIN).map(|i| i.checked_sub(1).map(|p| hashes[p])).collect();
        let spec = SaveSpec {
            namespace: &namespace,
            hashes: &hashes,
            parents: &parents,
            rank: 0,
            tp_size: 1,
            geometry: &geometry,
            layers: &[0],
        };
        let ticket = cache.prepare_save_with(&spec, |c, v| c.reclaim(v))?;
        cache.complete_save(ticket, true);
    }
    Ok((cache, namespace))
}

fn main() -> pegaflow_core::Result<()> {
    for (name, kind) in [("lru", PolicyKind::Lru), ("tinylfu", PolicyKind::TinyLfu)] {
        let started = Instant::now();
        let (mut cache, namespace) = filled(kind)?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name:8} save: {:.0} ns per block (prepare and complete, chains of {CHAIN} into an empty cache)",
            secs / (CHAIN * CHAINS) as f64 * 1e9
        );
        let chains: Vec<Vec<BlockHash>> = (0..CHAINS).map(|c| (0..CHAIN).map(|i| hash(c, i)).collect()).collect();
        let misses: Vec<Vec<BlockHash>> =
            (0..CHAINS).map(|c| (0..CHAIN).map(|i| hash(CHAINS + c, i)).collect()).collect();
        for (what, queries) in [("hit", &chains), ("miss", &misses)] {
            let rounds = 20;
            let started = Instant::now();
            let mut releasing = std::time::Duration::ZERO;
            for round in 0..rounds {
                for (i, chain) in queries.iter().enumerate() {
                    let outcome = cache.query(Instant::now(), &namespace, "bench", 1, chain, None)?;
                    if let Some(lease) = outcome.lease_id() {
                        let release = Instant::now();
                        cache.release_lease(lease)?;
                        releasing += release.elapsed();
                    }
                    black_box((round, i, outcome.hits()));
                }
            }
            let n = (rounds * queries.len()) as f64;
            let secs = started.elapsed().as_secs_f64();
            let release = releasing.as_secs_f64();
            println!(
                "{name:8} {what:4}: {:>9.0} queries/s of {CHAIN} hashes ({:.2} µs each, {:.0} ns per hash; \
                 query {:.0} ns, release {:.0} ns per hash)",
                n / secs,
                secs / n * 1e6,
                secs / n / CHAIN as f64 * 1e9,
                (secs - release) / n / CHAIN as f64 * 1e9,
                release / n / CHAIN as f64 * 1e9
            );
        }
        for layers in [1u32, 32] {
            let per_block = full_cache_saves(&mut cache, &namespace, layers)?;
            println!(
                "{name:8} save into the full cache, {layers:2} layers: {per_block:.0} ns per block \
                 (prepare, evicting one block each, and complete)"
            );
        }
    }
    Ok(())
}

/// Saves new chains into a full cache, as a server that has run a while does: every new
/// block evicts one. Returns nanoseconds per block.
fn full_cache_saves(cache: &mut BlockCache, namespace: &Arc<str>, layers: u32) -> pegaflow_core::Result<f64> {
    let geometry = Arc::new(PartGeometry::new(vec![BLOCK / u64::from(layers); layers as usize]));
    let all: Vec<u32> = (0..layers).collect();
    let rounds = 100;
    let mut secs = 0.0;
    for round in 0..rounds {
        // Hashes no other round or query used.
        let hashes: Vec<BlockHash> =
            (0..CHAIN).map(|i| hash(10 * CHAINS + 1000 * layers as usize + round, i)).collect();
        let parents: Vec<Option<BlockHash>> = (0..CHAIN).map(|i| i.checked_sub(1).map(|p| hashes[p])).collect();
        let spec = SaveSpec {
            namespace,
            hashes: &hashes,
            parents: &parents,
            rank: 0,
            tp_size: 1,
            geometry: &geometry,
            layers: &all,
        };
        let started = Instant::now();
        let ticket = cache.prepare_save_with(&spec, |c, v| c.reclaim(v))?;
        black_box(ticket.slot_count());
        cache.complete_save(ticket, true);
        secs += started.elapsed().as_secs_f64();
    }
    Ok(secs / (rounds * CHAIN) as f64 * 1e9)
}
