//! Scenario tests of the block cache with tiny pools.

mod admission;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::error::EngineError;
use crate::memory::PoolAllocator;

pub(super) const UNIT: u64 = 256;

pub(super) fn ns(name: &str) -> Arc<str> {
    Arc::from(name)
}

pub(super) fn h(i: u8) -> BlockHash {
    [i; HASH_BYTES]
}

/// A geometry of `layers` layers of one allocation unit each.
pub(super) fn geometry(layers: u32) -> Arc<PartGeometry> {
    Arc::new(PartGeometry::new(vec![UNIT / u64::from(layers); layers as usize]))
}

/// An LRU cache holding `blocks` single-rank parts of one unit.
pub(super) fn cache(blocks: u64) -> BlockCache {
    BlockCache::with_policy(PoolAllocator::new(blocks * UNIT, None), PolicyKind::Lru.build(blocks))
}

/// A W-TinyLFU cache holding `blocks` single-rank parts of one unit. Its sketch ages
/// every `20 × blocks` requests, so aging stays out of scenarios that are not about it.
pub(super) fn tinylfu(blocks: u64) -> BlockCache {
    BlockCache::with_policy(PoolAllocator::new(blocks * UNIT, None), PolicyKind::TinyLfu.build(20 * blocks))
}

/// Plans room (reclaiming victims at once) and prepares a save without chain links.
pub(super) fn prep(
    cache: &mut BlockCache,
    n: &Arc<str>,
    hashes: &[BlockHash],
    rank: u32,
    tp: u32,
    g: &Arc<PartGeometry>,
    layers: &[u32],
) -> crate::Result<SaveTicket> {
    let spec = SaveSpec { namespace: n, hashes, parents: &[], rank, tp_size: tp, geometry: g, layers };
    cache.prepare_save_with(&spec, |c, victims| c.reclaim(victims))
}

/// A query of a one-rank holder as (hits, lease id).
pub(super) fn q(
    cache: &mut BlockCache,
    now: Instant,
    n: &Arc<str>,
    holder: &str,
    hashes: &[BlockHash],
    ttl: Option<Duration>,
) -> crate::Result<(u32, Option<String>)> {
    q_ranks(cache, now, n, holder, 1, hashes, ttl)
}

/// A query of a holder whose `loaders` ranks each load, as (hits, lease id).
pub(super) fn q_ranks(
    cache: &mut BlockCache,
    now: Instant,
    n: &Arc<str>,
    holder: &str,
    loaders: u32,
    hashes: &[BlockHash],
    ttl: Option<Duration>,
) -> crate::Result<(u32, Option<String>)> {
    let outcome = cache.query(now, n, holder, loaders, hashes, ttl)?;
    Ok((outcome.hits(), outcome.lease_id().map(str::to_owned)))
}

/// Drops the unpinned blocks and reclaims them; returns how many.
pub(super) fn drop_all(cache: &mut BlockCache) -> usize {
    let victims = cache.drop_unpinned();
    let dropped = victims.len();
    cache.reclaim(victims);
    dropped
}

pub(super) fn save_all(
    cache: &mut BlockCache,
    n: &Arc<str>,
    hashes: &[BlockHash],
    rank: u32,
    tp: u32,
    g: &Arc<PartGeometry>,
) -> u32 {
    let layers: Vec<u32> = (0..g.num_layers()).collect();
    let ticket = prep(cache, n, hashes, rank, tp, g, &layers).unwrap();
    cache.complete_save(ticket, true)
}

pub(super) fn hits(cache: &mut BlockCache, n: &Arc<str>, hashes: &[BlockHash]) -> u32 {
    let (hits, lease) = q(cache, Instant::now(), n, "inst", hashes, None).unwrap();
    if let Some(lease) = lease {
        cache.release_lease(&lease).unwrap();
    }
    hits
}

#[test]
fn a_block_seals_only_when_every_layer_and_rank_is_saved() {
    let mut c = BlockCache::new(PoolAllocator::new(1 << 20, None));
    let n = ns("m");
    let g = geometry(2);
    // Rank 0, layer 0 only.
    let t = prep(&mut c, &n, &[h(1)], 0, 2, &g, &[0]).unwrap();
    assert_eq!(t.slots.len(), 1);
    assert_eq!(c.complete_save(t, true), 0);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 0);
    // Rank 0, both layers: layer 0 is skipped, layer 1 copied.
    let t = prep(&mut c, &n, &[h(1)], 0, 2, &g, &[0, 1]).unwrap();
    assert_eq!(t.slots.iter().map(|s| s.layers.clone()).collect::<Vec<_>>(), vec![1..2]);
    assert_eq!(c.complete_save(t, true), 0);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 0, "rank 1 has not saved");
    assert_eq!(save_all(&mut c, &n, &[h(1)], 1, 2, &g), 1);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 1);
    assert_eq!(c.stats().sealed_blocks, 1);
}

#[test]
fn slot_offsets_are_disjoint_per_layer_and_rank() {
    let mut c = BlockCache::new(PoolAllocator::new(1 << 20, None));
    let n = ns("m");
    let g = Arc::new(PartGeometry::new(vec![100, 300]));
    let t0 = prep(&mut c, &n, &[h(1), h(2)], 0, 2, &g, &[0, 1]).unwrap();
    let t1 = prep(&mut c, &n, &[h(1), h(2)], 1, 2, &g, &[0, 1]).unwrap();
    let mut ranges: Vec<(u64, u64)> = t0
        .slots
        .iter()
        .chain(&t1.slots)
        .map(|run| (run.offset, run.offset + run.layers.clone().map(|l| g.layer_bytes(l)).sum::<u64>()))
        .collect();
    ranges.sort();
    // One run per block and rank: both layers of a part are back to back.
    assert_eq!(ranges.len(), 4);
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:?}");
}

#[test]
fn failed_copy_leaves_slots_empty_and_block_unsealed() {
    let mut c = cache(4);
    let n = ns("m");
    let g = geometry(1);
    let t = prep(&mut c, &n, &[h(1)], 0, 1, &g, &[0]).unwrap();
    assert_eq!(c.complete_save(t, false), 0);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 0);
    // The slot can be saved again.
    assert_eq!(save_all(&mut c, &n, &[h(1)], 0, 1, &g), 1);
}

#[test]
fn prefix_hits_stop_at_the_first_miss_and_namespaces_are_separate() {
    let mut c = cache(8);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2), h(4)], 0, 1, &g);
    assert_eq!(hits(&mut c, &n, &[h(1), h(2), h(3), h(4)]), 2);
    assert_eq!(hits(&mut c, &n, &[h(3), h(1)]), 0);
    assert_eq!(hits(&mut c, &ns("other"), &[h(1)]), 0);
}

#[test]
fn eviction_takes_the_oldest_unleased_block_first() {
    let mut c = cache(3);
    let n = ns("m");
    let g = geometry(1);
    for i in 1..=3 {
        save_all(&mut c, &n, &[h(i)], 0, 1, &g);
    }
    // Using block 1 makes block 2 the oldest.
    assert_eq!(hits(&mut c, &n, &[h(1)]), 1);
    let t = prep(&mut c, &n, &[h(4)], 0, 1, &g, &[0]).unwrap();
    assert_eq!(t.evicted, 1);
    c.complete_save(t, true);
    assert_eq!(hits(&mut c, &n, &[h(2)]), 0);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 1);
    assert_eq!(hits(&mut c, &n, &[h(3)]), 1);
    assert_eq!(c.stats().evictions, 1);
}

#[test]
fn leased_blocks_survive_pressure_and_free_up_after_release() {
    let mut c = cache(2);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2)], 0, 1, &g);
    let (hit, lease) = q(&mut c, Instant::now(), &n, "inst", &[h(1), h(2)], None).unwrap();
    assert_eq!(hit, 2);
    let lease = lease.unwrap();
    let err = prep(&mut c, &n, &[h(3)], 0, 1, &g, &[0]).unwrap_err();
    assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err}");
    // The failed save changed nothing.
    assert_eq!(c.stats().blocks, 2);
    c.release_lease(&lease).unwrap();
    assert_eq!(save_all(&mut c, &n, &[h(3)], 0, 1, &g), 1);
    assert_eq!(c.stats().blocks, 2);
}

#[test]
fn a_failed_multi_block_save_rolls_back_what_it_reserved() {
    let mut c = cache(3);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2)], 0, 1, &g);
    let (_, lease) = q(&mut c, Instant::now(), &n, "inst", &[h(1), h(2)], None).unwrap();
    let before = c.stats();
    // Needs 2 units; only 1 is free and nothing is evictable.
    let err = prep(&mut c, &n, &[h(7), h(8)], 0, 1, &g, &[0]).unwrap_err();
    assert!(matches!(err, EngineError::ResourceExhausted(_)));
    assert_eq!(c.stats(), before);
    c.release_lease(&lease.unwrap()).unwrap();
}

#[test]
fn a_request_larger_than_the_pool_fails_without_evicting() {
    let mut c = cache(2);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1)], 0, 1, &g);
    let err = prep(&mut c, &n, &[h(2), h(3), h(4)], 0, 1, &g, &[0]).unwrap_err();
    assert!(err.to_string().contains("pool holds"), "{err}");
    assert_eq!(c.stats().evictions, 0);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 1);
}

#[test]
fn in_flight_saves_are_never_evicted() {
    let mut c = cache(2);
    let n = ns("m");
    let g = geometry(1);
    let in_flight = prep(&mut c, &n, &[h(1)], 0, 1, &g, &[0]).unwrap();
    save_all(&mut c, &n, &[h(2)], 0, 1, &g);
    // Needs room: block 2 (sealed, unleased) goes, block 1 (being copied) stays.
    let t = prep(&mut c, &n, &[h(3)], 0, 1, &g, &[0]).unwrap();
    assert_eq!(t.evicted, 1);
    c.complete_save(t, true);
    assert_eq!(c.complete_save(in_flight, true), 1);
    assert_eq!(hits(&mut c, &n, &[h(1), h(3)]), 2);
    assert_eq!(hits(&mut c, &n, &[h(2)]), 0);
}

#[test]
fn leases_expire_and_unpin() {
    let mut c = cache(2);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2)], 0, 1, &g);
    let t0 = Instant::now();
    let (_, lease) = q(&mut c, t0, &n, "inst", &[h(1), h(2)], Some(Duration::from_millis(50))).unwrap();
    let lease = lease.unwrap();
    assert_eq!(c.stats().leases, 1);
    let later = t0 + Duration::from_millis(51);
    let err = c.prepare_load(later, &n, &lease, 0, 0, LeaseRange::prefix(1), &g).unwrap_err();
    assert!(matches!(err, EngineError::NotFound(_)), "{err}");
    assert_eq!(c.stats().leases, 0);
    assert!(matches!(c.release_lease(&lease), Err(EngineError::NotFound(_))));
    // Unpinned again: both evictable.
    let t = prep(&mut c, &n, &[h(3), h(4)], 0, 1, &g, &[0]).unwrap();
    assert_eq!(t.evicted, 2);
    c.complete_save(t, true);
    assert!(q(&mut c, t0, &n, "inst", &[h(1)], Some(Duration::from_secs(3600))).is_err(), "ttl above the maximum");
}

#[test]
fn a_lease_is_released_once_every_rank_started_loading() {
    let mut c = BlockCache::new(PoolAllocator::new(1 << 20, None));
    let n = ns("m");
    let g = geometry(2);
    save_all(&mut c, &n, &[h(1), h(2)], 0, 2, &g);
    save_all(&mut c, &n, &[h(1), h(2)], 1, 2, &g);
    let now = Instant::now();
    let (hit, lease) = q_ranks(&mut c, now, &n, "inst", 2, &[h(1), h(2)], None).unwrap();
    assert_eq!(hit, 2);
    let lease = lease.unwrap();
    assert!(matches!(
        c.prepare_load(now, &n, &lease, 0, 0, LeaseRange::prefix(3), &g),
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        c.prepare_load(now, &n, &lease, 2, 2, LeaseRange::prefix(1), &g),
        Err(EngineError::InvalidArgument(_))
    ));
    let other = geometry(1);
    assert!(matches!(
        c.prepare_load(now, &n, &lease, 0, 0, LeaseRange::prefix(1), &other),
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(
        matches!(
            c.prepare_load(now, &ns("other"), &lease, 0, 0, LeaseRange::prefix(2), &g),
            Err(EngineError::NotFound(_))
        ),
        "a lease never serves another namespace"
    );
    let r0 = c.prepare_load(now, &n, &lease, 0, 0, LeaseRange::prefix(2), &g).unwrap();
    assert_eq!(r0.part_offsets.len(), 2);
    assert!(c.prepare_load(now, &n, &lease, 0, 0, LeaseRange::prefix(2), &g).is_err(), "a rank loads a lease once");
    assert_eq!(c.stats().leases, 1);
    let r1 = c.prepare_load(now, &n, &lease, 1, 1, LeaseRange::prefix(1), &g).unwrap();
    assert_eq!(c.stats().leases, 0);
    c.complete_load(r0);
    c.complete_load(r1);
}

#[test]
fn a_rank_may_load_its_lease_in_forward_ranges() {
    let mut c = BlockCache::new(PoolAllocator::new(1 << 20, None));
    let n = ns("m");
    let g = geometry(2);
    let blocks = [h(1), h(2), h(3), h(4)];
    save_all(&mut c, &n, &blocks, 0, 2, &g);
    save_all(&mut c, &n, &blocks, 1, 2, &g);
    let now = Instant::now();
    let lease = q_ranks(&mut c, now, &n, "inst", 2, &blocks, None).unwrap().1.unwrap();
    let range = |offset, count, more| LeaseRange { offset, count, more };
    let first = c.prepare_load(now, &n, &lease, 0, 0, range(0, 2, true), &g).unwrap();
    assert_eq!(first.part_offsets.len(), 2);
    for (bad, why) in [
        (range(1, 1, true), "overlaps a loaded range"),
        (range(3, 2, false), "past the lease's end"),
        (range(usize::MAX, 2, false), "offset overflows"),
        (range(2, 0, false), "no blocks"),
    ] {
        let err = c.prepare_load(now, &n, &lease, 0, 0, bad, &g).unwrap_err();
        assert!(matches!(err, EngineError::InvalidArgument(_)), "{why}: {err}");
    }
    let second = c.prepare_load(now, &n, &lease, 0, 0, range(2, 2, false), &g).unwrap();
    let mut offsets: Vec<u64> = first.part_offsets.iter().chain(&second.part_offsets).copied().collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 4, "the two ranges are the lease's four blocks");
    assert!(c.prepare_load(now, &n, &lease, 0, 0, range(3, 1, false), &g).is_err(), "rank 0 loaded its last range");
    assert_eq!(c.stats().leases, 1, "rank 1 has not started its last range");
    // Rank 1 skips the first block and loads the rest at once.
    let other = c.prepare_load(now, &n, &lease, 1, 1, range(1, 3, false), &g).unwrap();
    assert_eq!(other.part_offsets.len(), 3);
    assert_eq!(c.stats().leases, 0, "every rank started its last range: released");
    for ticket in [first, second, other] {
        c.complete_load(ticket);
    }
    // Nothing stays pinned: all four blocks can be dropped.
    assert_eq!(c.drop_unpinned().len(), 4);
}

#[test]
fn load_pins_outlive_the_lease() {
    let mut c = cache(2);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2)], 0, 1, &g);
    let now = Instant::now();
    let (_, lease) = q(&mut c, now, &n, "inst", &[h(1)], None).unwrap();
    let ticket = c.prepare_load(now, &n, &lease.unwrap(), 0, 0, LeaseRange::prefix(1), &g).unwrap();
    assert_eq!(c.stats().leases, 0, "the only rank started: lease released");
    // Block 1 is still being copied: only block 2 may go.
    let t = prep(&mut c, &n, &[h(3)], 0, 1, &g, &[0]).unwrap();
    c.complete_save(t, true);
    // Two more blocks cannot fit while block 1 is pinned.
    assert!(matches!(prep(&mut c, &n, &[h(4), h(5)], 0, 1, &g, &[0]), Err(EngineError::ResourceExhausted(_))));
    c.complete_load(ticket);
    assert_eq!(hits(&mut c, &n, &[h(1)]), 1);
}

#[test]
fn saving_four_times_the_capacity_never_fails() {
    let mut c = cache(16);
    let n = ns("m");
    let g = geometry(4);
    for i in 0..64u8 {
        assert_eq!(save_all(&mut c, &n, &[h(i)], 0, 1, &g), 1);
    }
    let s = c.stats();
    assert_eq!(s.blocks, 16);
    assert_eq!(s.evictions, 48);
    assert_eq!(s.used_bytes, s.capacity_bytes);
    // The newest 16 survive.
    let newest: Vec<BlockHash> = (48..64u8).map(h).collect();
    assert_eq!(hits(&mut c, &n, &newest), 16);
}

#[test]
fn a_different_tp_size_or_layout_in_the_same_namespace_is_rejected() {
    let mut c = BlockCache::new(PoolAllocator::new(1 << 20, None));
    let n = ns("m");
    let g = geometry(2);
    let t = prep(&mut c, &n, &[h(1)], 0, 2, &g, &[0]).unwrap();
    c.complete_save(t, true);
    assert!(matches!(prep(&mut c, &n, &[h(1)], 0, 1, &g, &[0]), Err(EngineError::InvalidArgument(_))));
    let other = geometry(4);
    assert!(matches!(prep(&mut c, &n, &[h(1)], 0, 2, &other, &[0]), Err(EngineError::InvalidArgument(_))));
}

#[test]
fn lease_caps_refuse_a_query_without_pinning_and_free_up_on_release() {
    // Scenario: instance "a" may hold 2 leases, all leases together 3 blocks.
    let mut c = cache(8).with_lease_limits(LeaseLimits { per_instance: 2, blocks: 3 });
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2), h(3)], 0, 1, &g);
    let now = Instant::now();
    let (_, first) = q(&mut c, now, &n, "a", &[h(1)], None).unwrap();
    let (_, second) = q(&mut c, now, &n, "a", &[h(2)], None).unwrap();
    let before = c.stats();
    let err = q(&mut c, now, &n, "a", &[h(3)], None).unwrap_err();
    assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err}");
    // Another instance still may, until the block cap: 2 pinned + 2 > 3.
    let err = q(&mut c, now, &n, "b", &[h(1), h(2)], None).unwrap_err();
    assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err}");
    assert_eq!(c.stats().leases, before.leases);
    assert_eq!(c.stats().refused_leases, 2);
    let (hit, third) = q(&mut c, now, &n, "b", &[h(3)], None).unwrap();
    assert_eq!(hit, 1);
    // Releasing frees both caps; a miss never counts.
    c.release_lease(&first.unwrap()).unwrap();
    assert_eq!(q(&mut c, now, &n, "a", &[h(9)], None).unwrap(), (0, None));
    let (hit, fourth) = q(&mut c, now, &n, "a", &[h(3)], None).unwrap();
    assert_eq!(hit, 1);
    for lease in [second, third, fourth] {
        c.release_lease(&lease.unwrap()).unwrap();
    }
    // Every block is unpinned again: all three can be evicted by new saves.
    assert_eq!(save_all(&mut c, &n, &[h(10), h(11), h(12), h(13), h(14), h(15), h(16), h(17)], 0, 1, &g), 8);
}

#[test]
fn dropping_the_cache_keeps_exactly_the_leased_blocks() {
    // Scenario: three sealed blocks, one of them leased; an admin drops the cache.
    let mut c = cache(4);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2), h(3)], 0, 1, &g);
    let (_, lease) = q(&mut c, Instant::now(), &n, "inst", &[h(2)], None).unwrap();
    assert_eq!(drop_all(&mut c), 2);
    assert_eq!(c.stats().blocks, 1);
    assert_eq!(c.stats().used_bytes, UNIT);
    c.release_lease(&lease.unwrap()).unwrap();
    assert_eq!(hits(&mut c, &n, &[h(2)]), 1, "the leased block survived");
    assert_eq!(hits(&mut c, &n, &[h(1)]), 0);
    assert_eq!(drop_all(&mut c), 1);
    assert_eq!(c.stats().used_bytes, 0);
}

#[test]
fn one_stored_copy_serves_every_rank_of_a_replicated_instance() {
    // MLA: two TP ranks hold the same bytes, so the block has one part that rank 1 saved
    // and both ranks load; the lease ends once both started.
    let mut c = cache(4);
    let n = ns("mla");
    let g = geometry(1);
    assert_eq!(save_all(&mut c, &n, &[h(1)], 0, 1, &g), 1, "one part seals the block");
    assert_eq!(c.stats().used_bytes, UNIT, "one copy, not one per rank");
    let now = Instant::now();
    let (hit, lease) = q_ranks(&mut c, now, &n, "inst", 2, &[h(1)], None).unwrap();
    assert_eq!(hit, 1);
    let lease = lease.unwrap();
    let r1 = c.prepare_load(now, &n, &lease, 1, 0, LeaseRange::prefix(1), &g).unwrap();
    assert_eq!(c.stats().leases, 1, "rank 0 has not loaded yet");
    let r0 = c.prepare_load(now, &n, &lease, 0, 0, LeaseRange::prefix(1), &g).unwrap();
    assert_eq!(r0.part_offsets, r1.part_offsets, "both ranks read the same bytes");
    assert_eq!(c.stats().leases, 0);
    c.complete_load(r0);
    c.complete_load(r1);
}

#[test]
fn marking_a_part_gives_one_run_per_stretch_of_consecutive_empty_layers() {
    use super::block::{Part, Slot};
    let g = Arc::new(PartGeometry::new(vec![10, 20, 30, 40, 50]));
    let mut alloc = PoolAllocator::new(1 << 20, None);
    let mut part = Part::empty(alloc.allocate(g.total()).unwrap(), &g);
    let base = part.slice.offset();
    part.slots[3] = Slot::Saved;
    let mut runs = Vec::new();
    // Layer 3 is saved already; 1 comes after 4 and 0, out of order.
    assert!(part.mark_writing(&[0, 2, 3, 4, 1], |layers, offset| runs.push((layers, offset))));
    assert_eq!(runs, vec![(0..1, base), (2..3, base + 30), (4..5, base + 100), (1..2, base + 10)]);
    assert_eq!(part.writing, 4);
    runs.clear();
    let mut all = Part::empty(alloc.allocate(g.total()).unwrap(), &g);
    let base = all.slice.offset();
    assert!(all.mark_writing(&[0, 1, 2, 3, 4], |layers, offset| runs.push((layers, offset))));
    assert_eq!(runs, vec![(0..5, base)], "every layer of a block: one run");
    // Nothing left to mark: no run, and it says so.
    assert!(!all.mark_writing(&[0, 1, 2, 3, 4], |_, _| panic!("nothing is empty")));
}
