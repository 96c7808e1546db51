//! Admission, prefix-aware eviction and victims: the policy scenarios.

use std::sync::Arc;
use std::time::Instant;

use super::*;

/// A hash for block `i` (more than the 256 of `h`).
fn k(i: u32) -> BlockHash {
    let mut hash = [0u8; HASH_BYTES];
    hash[..4].copy_from_slice(&i.to_le_bytes());
    hash[31] = 0xA5;
    hash
}

/// One request as an inference engine makes it: query the chain (every hash counts
/// towards popularity), release the lease, then save the blocks after the first miss
/// with their chain links. Returns (hits, the save's ticket counters).
fn request(c: &mut BlockCache, n: &Arc<str>, chain: &[BlockHash]) -> (u32, u32) {
    let (hit, lease) = q(c, Instant::now(), n, "inst", chain, None).unwrap();
    if let Some(lease) = lease {
        c.release_lease(&lease).unwrap();
    }
    let rest = &chain[hit as usize..];
    if rest.is_empty() {
        return (hit, 0);
    }
    let parents: Vec<Option<BlockHash>> =
        (hit as usize..chain.len()).map(|i| i.checked_sub(1).map(|p| chain[p])).collect();
    let g = geometry(1);
    let spec =
        SaveSpec { namespace: n, hashes: rest, parents: &parents, rank: 0, tp_size: 1, geometry: &g, layers: &[0] };
    let ticket = c.prepare_save_with(&spec, |c, v| c.reclaim(v)).unwrap();
    let rejected = ticket.rejected;
    c.complete_save(ticket, true);
    (hit, rejected)
}

fn hot_set_hits_after_a_scan(mut c: BlockCache) -> u32 {
    let n = ns("m");
    let hot: Vec<BlockHash> = (0..20).map(k).collect();
    for _ in 0..10 {
        for block in &hot {
            request(&mut c, &n, &[*block]);
        }
    }
    // A one-off scan five times the cache.
    for i in 0..500 {
        request(&mut c, &n, &[k(10_000 + i)]);
    }
    hot.iter().map(|block| hits(&mut c, &n, &[*block])).sum()
}

#[test]
fn a_hot_set_survives_a_one_off_scan_under_tinylfu_and_not_under_lru() {
    let kept = hot_set_hits_after_a_scan(tinylfu(100));
    assert!(kept >= 18, "W-TinyLFU kept {kept} of 20 hot blocks");
    assert_eq!(hot_set_hits_after_a_scan(cache(100)), 0, "LRU flushes the hot set");
}

#[test]
fn aging_lets_a_formerly_hot_set_go() {
    // The server's sizing: the sketch ages every cache-full of requests, so yesterday's
    // hot set does not hold the cache against today's traffic for long.
    let mut c = BlockCache::with_policy(PoolAllocator::new(64 * UNIT, None), PolicyKind::TinyLfu.build(64));
    let n = ns("m");
    for _ in 0..10 {
        for i in 0..32 {
            request(&mut c, &n, &[k(i)]);
        }
    }
    // Today: a new working set, used a few times each.
    for _ in 0..4 {
        for i in 0..64 {
            request(&mut c, &n, &[k(5_000 + i)]);
        }
    }
    let today: u32 = (0..64).map(|i| hits(&mut c, &n, &[k(5_000 + i)])).sum();
    let yesterday: u32 = (0..32).map(|i| hits(&mut c, &n, &[k(i)])).sum();
    eprintln!("today {today} yesterday {yesterday}");
    assert!(today >= 44, "the new working set got in: {today} of 64");
    assert!(yesterday <= 16, "{yesterday} of the old set still held");
}

#[test]
fn scan_candidates_are_counted_as_rejected() {
    let mut c = tinylfu(50);
    let n = ns("m");
    for _ in 0..5 {
        for i in 0..40 {
            request(&mut c, &n, &[k(i)]);
        }
    }
    assert_eq!(c.stats().admissions_rejected, 0, "nothing lost a duel while it all fit");
    for i in 0..200 {
        request(&mut c, &n, &[k(1000 + i)]);
    }
    let s = c.stats();
    assert!(s.admissions_rejected >= 100, "{s:?}");
    assert_eq!(s.blocks, 50, "the pool stays full");
}

#[test]
fn a_refused_save_succeeds_with_its_blocks_skipped_and_takes_its_chain_with_it() {
    // Scenario: a full W-TinyLFU cache of popular blocks whose window is all leased, so
    // a new chain must beat main's victim itself; it cannot (seen once) and none of its
    // blocks is copied.
    let mut c = tinylfu(10);
    let n = ns("m");
    for _ in 0..4 {
        for i in 0..9 {
            request(&mut c, &n, &[k(i)]);
        }
    }
    // The newest blocks sit in the window, the one they pushed out waits for its duel:
    // leases keep them all where they are.
    request(&mut c, &n, &[k(9)]);
    let (_, lease) = q(&mut c, Instant::now(), &n, "inst", &[k(7), k(8), k(9)], None).unwrap();
    let chain = [k(100), k(101), k(102)];
    let (_, rejected) = request(&mut c, &n, &chain);
    assert_eq!(rejected, 3, "the first block was refused and its followers with it");
    assert_eq!(hits(&mut c, &n, &chain), 0);
    assert_eq!(c.stats().admissions_rejected, 1, "one duel lost; the followers never dueled");
    let popular: Vec<BlockHash> = (0..10).map(k).collect();
    assert_eq!(popular.iter().map(|b| hits(&mut c, &n, &[*b])).sum::<u32>(), 10);
    c.release_lease(&lease.unwrap()).unwrap();
}

#[test]
fn chains_are_evicted_tail_first_and_never_strand_a_child() {
    // Scenario: a four-block chain fills an LRU cache; its root is the oldest block, yet
    // room for new blocks comes from the tail, one block at a time.
    let mut c = cache(4);
    let n = ns("m");
    let chain = [k(1), k(2), k(3), k(4)];
    request(&mut c, &n, &chain);
    request(&mut c, &n, &[k(50)]);
    assert_eq!(hits(&mut c, &n, &chain), 3, "the tail went, the prefix stays whole");
    // The chain was just used, so k50 is now the oldest evictable block.
    request(&mut c, &n, &[k(51)]);
    assert_eq!(hits(&mut c, &n, &chain), 3);
    assert_eq!(hits(&mut c, &n, &[k(50)]), 0);
    assert_eq!(c.stats().blocks, 4);
    // Without chain links the oldest block goes first and strands the rest.
    let mut plain = cache(4);
    save_all(&mut plain, &n, &chain, 0, 1, &geometry(1));
    save_all(&mut plain, &n, &[k(50)], 0, 1, &geometry(1));
    assert_eq!(hits(&mut plain, &n, &chain), 0, "root evicted: three dead blocks");
}

#[test]
fn a_parent_is_evictable_again_once_its_last_child_leaves() {
    let mut c = cache(3);
    let n = ns("m");
    request(&mut c, &n, &[k(1), k(2)]);
    request(&mut c, &n, &[k(1), k(3)]);
    // k1 is the oldest block but has two children: the next two evictions take them,
    // then k1 itself. (Looking with `copies` uses nothing.)
    let root = BlockKey { namespace: n.clone(), hash: k(1) };
    for (i, fresh) in [k(10), k(11), k(12)].into_iter().enumerate() {
        request(&mut c, &n, &[fresh]);
        assert_eq!(!c.copies(&root).is_empty(), i < 2, "after {} evictions", i + 1);
    }
}

#[test]
fn eviction_hands_victims_back_and_their_bytes_stay_held_until_reclaimed() {
    let mut c = cache(2);
    let n = ns("m");
    let g = geometry(1);
    save_all(&mut c, &n, &[h(1), h(2)], 0, 1, &g);
    let spec =
        SaveSpec { namespace: &n, hashes: &[h(3)], parents: &[], rank: 0, tp_size: 1, geometry: &g, layers: &[0] };
    let mut plan = c.make_room(&spec).unwrap();
    assert_eq!(plan.victims.len(), 1);
    let victim = &plan.victims[0];
    assert_eq!((victim.key.hash, victim.tier, victim.reason), (h(1), Tier::Ram, EvictReason::Capacity));
    assert!(victim.sealed && victim.bytes() == UNIT);
    assert_eq!(c.stats().used_bytes, 2 * UNIT, "the victim's bytes are not free yet");
    assert_eq!(hits(&mut c, &n, &[h(1)]), 0, "but it is out of the index");
    c.reclaim(std::mem::take(&mut plan.victims));
    assert_eq!((c.stats().used_bytes, c.stats().evictions), (UNIT, 1));
    let ticket = c.prepare_save(&spec, &plan).unwrap();
    assert_eq!(c.complete_save(ticket, true), 1);
}

#[test]
fn a_query_says_loading_while_the_first_block_is_being_saved() {
    let mut c = cache(4);
    let n = ns("m");
    let g = geometry(1);
    let in_flight = prep(&mut c, &n, &[h(1)], 0, 1, &g, &[0]).unwrap();
    assert_eq!(c.copies(&BlockKey { namespace: n.clone(), hash: h(1) }), vec![(Tier::Ram, CopyState::Writing)]);
    assert_eq!(c.query(Instant::now(), &n, "inst", 1, &[h(1)], None).unwrap(), QueryOutcome::Loading);
    assert_eq!(c.query(Instant::now(), &n, "inst", 1, &[h(2)], None).unwrap(), QueryOutcome::Miss);
    c.complete_save(in_flight, true);
    let outcome = c.query(Instant::now(), &n, "inst", 1, &[h(1), h(2)], None).unwrap();
    let QueryOutcome::Hit { lease_id, tiers } = outcome else { panic!("{outcome:?}") };
    assert_eq!(tiers, vec![Tier::Ram]);
    let key = BlockKey { namespace: n.clone(), hash: h(1) };
    assert_eq!(c.copies(&key), vec![(Tier::Ram, CopyState::Readable)]);
    let load = c.prepare_load(Instant::now(), &n, &lease_id, 0, 0, LeaseRange::prefix(1), &g).unwrap();
    assert_eq!(c.copies(&key), vec![(Tier::Ram, CopyState::Reading)]);
    c.complete_load(load);
    assert_eq!(c.copies(&key), vec![(Tier::Ram, CopyState::Readable)]);
}

#[test]
fn leased_and_in_flight_blocks_are_never_victims_under_tinylfu() {
    let mut c = tinylfu(8);
    let n = ns("m");
    let g = geometry(1);
    for i in 0..4 {
        request(&mut c, &n, &[k(i)]);
    }
    let leased: Vec<BlockHash> = (0..4).map(k).collect();
    let (hit, lease) = q(&mut c, Instant::now(), &n, "inst", &leased, None).unwrap();
    assert_eq!(hit, 4);
    let in_flight = prep(&mut c, &n, &[k(99)], 0, 1, &g, &[0]).unwrap();
    // Heavy pressure from blocks more popular than anything cached.
    for round in 0..6 {
        for i in 0..20 {
            let _ = round;
            request(&mut c, &n, &[k(1000 + i)]);
        }
    }
    assert_eq!(c.complete_save(in_flight, true), 1, "the in-flight block kept its place");
    c.release_lease(&lease.unwrap()).unwrap();
    for block in &leased {
        assert_eq!(hits(&mut c, &n, &[*block]), 1);
    }
}
