//! Replays a trace through the real block index ([`BlockCache`] with its policy), the
//! way an inference engine drives the server: query the prompt's chain (a hit stops at
//! the first miss), release the lease, save the blocks from the first miss on with their
//! chain links. No bytes move: the pool is only an allocator.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pegaflow_core::EngineError;
use pegaflow_core::cache::policy::{Opt, OptClock, OptOracle, Policy, TinyLfu};
use pegaflow_core::cache::{BlockCache, BlockHash, HASH_BYTES, PartGeometry, PolicyKind, SaveSpec};
use pegaflow_core::memory::PoolAllocator;
use serde::Serialize;

use super::format::{TOKENS_PER_BLOCK, TraceRequest};
use super::ssd::{SsdModel, SsdWrites};

/// Policies the replay can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayPolicy {
    /// Least recently used, everything admitted.
    Lru,
    /// W-TinyLFU admission with prefix-aware eviction (the server's default).
    Tinylfu,
    /// Belady's offline optimum under the same replay rule (the reference).
    Opt,
}

/// How big the replayed cache is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// A number of blocks.
    Blocks(u64),
    /// A fraction of the trace's distinct blocks.
    Fraction(f64),
}

/// What a replay measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Policy name.
    pub policy: &'static str,
    /// Requests replayed.
    pub requests: u64,
    /// Distinct blocks in the trace.
    pub distinct_blocks: u64,
    /// Blocks the cache holds.
    pub capacity_blocks: u64,
    /// Blocks in all requests.
    pub blocks: u64,
    /// Blocks hit (leading, per request).
    pub hit_blocks: u64,
    /// `hit_blocks / blocks`.
    pub block_hit_ratio: f64,
    /// Prompt tokens served from the cache over all prompt tokens.
    pub prefix_token_hit_ratio: f64,
    /// Candidates the policy refused.
    pub admissions_rejected: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Blocks a save did not store (refused, or no room among pinned blocks).
    pub skipped_blocks: u64,
    /// Of `hit_blocks`, those found on the SSD (copied up into RAM); 0 without one.
    pub ssd_hit_blocks: u64,
    /// Blocks the SSD holds; 0 without one.
    pub ssd_capacity_blocks: u64,
    /// When blocks went to the SSD, if there was one.
    pub ssd_writes: Option<SsdWrites>,
    /// Blocks written to the SSD.
    pub ssd_written_blocks: u64,
    /// Queries (with their lease and release) per second of query time, one core.
    pub queries_per_s: f64,
    /// Requests (query and save) per second of replay time.
    pub requests_per_s: f64,
}

/// The 32-byte block hash a trace's hash id stands for.
pub fn block_hash(id: u64) -> BlockHash {
    let mut hash = [0x5Au8; HASH_BYTES];
    hash[..8].copy_from_slice(&id.to_le_bytes());
    hash
}

/// Blocks the cache holds under `capacity` for a trace of `distinct` blocks (at least 1).
pub fn capacity_blocks(capacity: Capacity, distinct: u64) -> u64 {
    match capacity {
        Capacity::Blocks(n) => n.max(1),
        Capacity::Fraction(f) => ((f * distinct as f64).ceil() as u64).max(1),
    }
}

/// An SSD tier below the replayed RAM cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsdReplay {
    /// Its size.
    pub capacity: Capacity,
    /// When blocks go to it.
    pub writes: SsdWrites,
}

/// Replays `requests` under `policy` with blocks of `block_bytes`, above an SSD tier if
/// `ssd` says so: a prompt's chain hits RAM first, then continues on the SSD (those
/// blocks are copied up into RAM, as the server does), and misses from there.
pub fn replay(
    requests: &[TraceRequest],
    policy: ReplayPolicy,
    capacity: Capacity,
    block_bytes: u64,
    window_percent: Option<u64>,
    ssd: Option<SsdReplay>,
) -> Result<ReplayReport, EngineError> {
    let distinct: HashSet<u64> = requests.iter().flat_map(|r| r.hash_ids.iter().copied()).collect();
    let capacity_blocks = capacity_blocks(capacity, distinct.len() as u64);
    let clock = OptClock::default();
    let policy_impl: Box<dyn Policy> = match policy {
        ReplayPolicy::Lru => PolicyKind::Lru.build(capacity_blocks),
        ReplayPolicy::Tinylfu => match window_percent {
            Some(percent) => Box::new(TinyLfu::new(capacity_blocks).with_window_percent(percent)),
            None => PolicyKind::TinyLfu.build(capacity_blocks),
        },
        ReplayPolicy::Opt => Box::new(Opt::new(Arc::new(oracle(requests)), Arc::clone(&clock))),
    };
    let rounded = PoolAllocator::new(block_bytes.max(1) * 16, Some(block_bytes)).rounded(block_bytes);
    let allocator = PoolAllocator::new(capacity_blocks * rounded, Some(block_bytes));
    let mut cache = BlockCache::with_policy(allocator, policy_impl);
    let namespace: Arc<str> = Arc::from("trace");
    let geometry = Arc::new(PartGeometry::new(vec![block_bytes]));
    let ssd_capacity = ssd.map_or(0, |s| self::capacity_blocks(s.capacity, distinct.len() as u64));
    let mut ssd_model = ssd.map(|s| SsdModel::new(ssd_capacity, s.writes));
    let mut ssd_hits = 0u64;

    let (mut blocks, mut hit_blocks, mut tokens, mut hit_tokens, mut skipped) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut query_time = Duration::ZERO;
    let mut position = 0u64;
    let started = Instant::now();
    for request in requests {
        position += request.hash_ids.len() as u64;
        clock.store(position, Ordering::Relaxed);
        let chain: Vec<BlockHash> = request.hash_ids.iter().map(|&id| block_hash(id)).collect();
        let queried = Instant::now();
        let outcome = cache.query(Instant::now(), &namespace, "trace", 1, &chain, None)?;
        if let Some(lease) = outcome.lease_id() {
            cache.release_lease(lease)?;
        }
        query_time += queried.elapsed();
        let in_ram = outcome.hits() as usize;
        let mut hits = in_ram;
        if let Some(model) = ssd_model.as_mut() {
            model.used(&chain[..in_ram]);
            hits += chain[in_ram..].iter().take_while(|h| model.holds(h)).count();
            model.used(&chain[in_ram..hits]);
        }
        ssd_hits += (hits - in_ram) as u64;
        blocks += chain.len() as u64;
        hit_blocks += hits as u64;
        tokens += request.input_length;
        hit_tokens += (hits as u64 * TOKENS_PER_BLOCK).min(request.input_length);
        // SSD hits are stored into RAM like new blocks (copied up); only blocks past the
        // hits are new to the SSD too.
        let save = SaveRange { chain: &chain, from: in_ram, new_from: hits };
        skipped += save_rest(&mut cache, &namespace, &geometry, save, capacity_blocks, ssd_model.as_mut())?;
    }
    let elapsed = started.elapsed();
    let stats = cache.stats();
    Ok(ReplayReport {
        policy: cache.policy_name(),
        requests: requests.len() as u64,
        distinct_blocks: distinct.len() as u64,
        capacity_blocks,
        blocks,
        hit_blocks,
        block_hit_ratio: ratio(hit_blocks, blocks),
        prefix_token_hit_ratio: ratio(hit_tokens, tokens),
        admissions_rejected: stats.admissions_rejected,
        evictions: stats.evictions,
        skipped_blocks: skipped,
        ssd_hit_blocks: ssd_hits,
        ssd_capacity_blocks: ssd_capacity,
        ssd_writes: ssd.map(|s| s.writes),
        ssd_written_blocks: ssd_model.as_ref().map_or(0, |m| m.written),
        queries_per_s: requests.len() as f64 / query_time.as_secs_f64().max(1e-9),
        requests_per_s: requests.len() as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// What a request stores: `chain[from..]`, of which `chain[new_from..]` are new blocks.
#[derive(Clone, Copy)]
struct SaveRange<'a> {
    chain: &'a [BlockHash],
    from: usize,
    new_from: usize,
}

/// Saves `save.chain[save.from..]` with its links, in pieces no larger than the cache;
/// tells the SSD model what was stored and evicted; returns the blocks not stored.
fn save_rest(
    cache: &mut BlockCache,
    namespace: &Arc<str>,
    geometry: &Arc<PartGeometry>,
    save: SaveRange<'_>,
    capacity_blocks: u64,
    mut ssd: Option<&mut SsdModel>,
) -> Result<u64, EngineError> {
    let chain = save.chain;
    let parents: Vec<Option<BlockHash>> = (0..chain.len()).map(|i| i.checked_sub(1).map(|p| chain[p])).collect();
    let mut skipped = 0;
    let piece = capacity_blocks.max(1) as usize;
    let mut start = save.from;
    while start < chain.len() {
        let end = chain.len().min(start + piece);
        let spec = SaveSpec {
            namespace,
            hashes: &chain[start..end],
            parents: &parents[start..end],
            rank: 0,
            tp_size: 1,
            geometry,
            layers: &[0],
        };
        let mut evicted = Vec::new();
        let prepared = cache.prepare_save_with(&spec, |cache, victims| {
            evicted.extend(victims.iter().filter(|v| v.sealed).map(|v| v.key.hash));
            cache.reclaim(victims);
        });
        if let Some(model) = ssd.as_deref_mut() {
            for hash in evicted {
                model.evicted(hash);
            }
        }
        match prepared {
            Ok(ticket) => {
                skipped += u64::from(ticket.rejected);
                let sealed = cache.complete_save_sealed(ticket, true);
                if let Some(model) = ssd.as_deref_mut() {
                    let new: HashSet<&BlockHash> = chain[save.new_from.max(start).min(end)..end].iter().collect();
                    let fresh: Vec<BlockHash> = sealed.iter().map(|k| k.hash).filter(|h| new.contains(h)).collect();
                    model.stored(&fresh);
                }
            }
            // Everything left is this request's own chain: the rest does not fit.
            Err(EngineError::ResourceExhausted(_)) => return Ok(skipped + (chain.len() - start) as u64),
            Err(e) => return Err(e),
        }
        start = end;
    }
    Ok(skipped)
}

/// Every block request of the trace, by position, for Belady.
fn oracle(requests: &[TraceRequest]) -> OptOracle {
    let mut oracle = OptOracle::default();
    let mut position = 0u64;
    for request in requests {
        for &id in &request.hash_ids {
            oracle.push(block_hash(id), position);
            position += 1;
        }
    }
    oracle
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}
