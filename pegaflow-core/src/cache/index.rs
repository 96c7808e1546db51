//! `BlockCache`: the index (records by key, copies per tier, prefix links), leases, the
//! query and load halves, and eviction through the tier's policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use super::block::Block;
use super::lease::{Lease, LeaseLimits, LeaseRange, LeaseTable, MAX_LEASE_TTL, RankProgress};
use super::policy::{Choice, EntryStore, Policy, PolicyEntry, PolicyKind};
use super::{BlockHash, BlockKey, DEFAULT_LEASE_TTL, EvictReason, PartGeometry, QueryOutcome, Tier, Victim};
use crate::error::{EngineError, Result, shown};
use crate::memory::PoolAllocator;

/// Blocks by key. Block hashes come from clients, so the map keeps a per-process random
/// seed; foldhash over SipHash because a save or load looks up every block of a request.
pub(super) type BlockMap = HashMap<BlockKey, Block, RandomState>;

impl EntryStore for BlockMap {
    fn entry(&mut self, key: &BlockKey) -> Option<&mut PolicyEntry> {
        self.get_mut(key).map(|b| &mut b.policy)
    }
}

/// What a prepared load must copy: for each requested block, its part's pool offset.
#[derive(Debug)]
pub struct LoadTicket {
    keys: Vec<BlockKey>,
    /// Pool offset of the rank's part of each block, in request order.
    pub part_offsets: Vec<u64>,
    /// Geometry of those parts.
    pub geometry: Arc<PartGeometry>,
    /// When the query that leased these blocks ran.
    pub leased_at: Instant,
}

/// Counters and gauges of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks in the index (sealed or not).
    pub blocks: u64,
    /// Blocks visible to queries.
    pub sealed_blocks: u64,
    /// Pool bytes held by blocks.
    pub used_bytes: u64,
    /// Usable pool bytes.
    pub capacity_bytes: u64,
    /// Live leases.
    pub leases: u64,
    /// Blocks pinned by live leases.
    pub leased_blocks: u64,
    /// Blocks evicted for room since start.
    pub evictions: u64,
    /// Blocks dropped by an administrator since start.
    pub dropped: u64,
    /// New blocks refused admission since start (the policy rated them below what they
    /// would have displaced).
    pub admissions_rejected: u64,
    /// Queries refused because a lease cap was reached.
    pub refused_leases: u64,
}

/// The block index. Not thread-safe by itself: the engine wraps it in a mutex and never
/// holds that lock across a copy.
pub struct BlockCache {
    pub(super) blocks: BlockMap,
    pub(super) policy: Box<dyn Policy>,
    pub(super) allocator: PoolAllocator,
    leases: LeaseTable,
    lease_limits: LeaseLimits,
    pub(super) sealed: u64,
    evictions: u64,
    dropped: u64,
    refused_leases: u64,
}

impl BlockCache {
    /// An empty cache whose blocks live in `allocator`'s pool, under W-TinyLFU admission
    /// with a sketch sized for blocks of 64 KiB.
    pub fn new(allocator: PoolAllocator) -> Self {
        let blocks = allocator.capacity() / (64 << 10);
        Self::with_policy(allocator, PolicyKind::default().build(blocks))
    }

    /// An empty cache run by `policy`.
    pub fn with_policy(allocator: PoolAllocator, policy: Box<dyn Policy>) -> Self {
        Self {
            blocks: BlockMap::default(),
            policy,
            allocator,
            leases: LeaseTable::default(),
            lease_limits: LeaseLimits::default(),
            sealed: 0,
            evictions: 0,
            dropped: 0,
            refused_leases: 0,
        }
    }

    /// Caps what leases may pin (default: [`LeaseLimits::default`]).
    pub fn with_lease_limits(mut self, limits: LeaseLimits) -> Self {
        self.lease_limits = limits;
        self
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            blocks: self.blocks.len() as u64,
            sealed_blocks: self.sealed,
            used_bytes: self.allocator.used_bytes(),
            capacity_bytes: self.allocator.capacity(),
            leases: self.leases.len() as u64,
            leased_blocks: self.leases.blocks() as u64,
            evictions: self.evictions,
            dropped: self.dropped,
            admissions_rejected: self.policy.rejected(),
            refused_leases: self.refused_leases,
        }
    }

    /// The tiers holding `key`'s block and the state of each copy (empty: not cached).
    pub fn copies(&self, key: &BlockKey) -> Vec<(Tier, super::CopyState)> {
        self.blocks.get(key).map(|b| b.copies().collect()).unwrap_or_default()
    }

    /// Finds the leading readable blocks of `hashes` and leases them for `ttl` (`None`:
    /// [`DEFAULT_LEASE_TTL`]) on behalf of instance `holder`, whose `loaders` TP ranks
    /// will each load them (the lease ends once all have started). Every hash asked for
    /// counts towards its block's popularity, hit or not. A hit that would pass the lease
    /// caps is refused (`ResourceExhausted`) and pins nothing.
    pub fn query(
        &mut self,
        now: Instant,
        namespace: &Arc<str>,
        holder: &str,
        loaders: u32,
        hashes: &[BlockHash],
        ttl: Option<Duration>,
    ) -> Result<QueryOutcome> {
        let ttl = ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if ttl > MAX_LEASE_TTL {
            return Err(EngineError::invalid(format!(
                "lease ttl {} ms exceeds the maximum of {} ms",
                ttl.as_millis(),
                MAX_LEASE_TTL.as_millis()
            )));
        }
        self.expire_leases(now);
        let mut keys = Vec::new();
        let mut walking = true;
        let mut loading = false;
        for hash in hashes {
            let key = BlockKey { namespace: Arc::clone(namespace), hash: *hash };
            self.policy.record(&key);
            if !walking {
                continue;
            }
            match self.blocks.get(&key) {
                Some(block) if block.readable() => keys.push(key),
                found => {
                    // A query stops at the first block it cannot serve, as vLLM does.
                    walking = false;
                    loading = keys.is_empty()
                        && found.and_then(|b| b.ram.as_ref()).is_some_and(super::block::RamCopy::write_in_flight);
                }
            }
        }
        if keys.is_empty() {
            return Ok(if loading { QueryOutcome::Loading } else { QueryOutcome::Miss });
        }
        if let Err(reason) = self.leases.admits(holder, keys.len(), &self.lease_limits) {
            self.refused_leases += 1;
            return Err(EngineError::ResourceExhausted(reason));
        }
        for key in &keys {
            let Some(block) = self.blocks.get_mut(key) else { continue };
            // Pinned first: off its queue, the use only updates its order (no queue move).
            pin_block(self.policy.as_mut(), block);
            self.policy.touch(key, &mut block.policy);
            self.policy.rebalance(&mut self.blocks);
        }
        let tiers = vec![Tier::Ram; keys.len()];
        let lease_id = self.leases.insert(Lease {
            namespace: Arc::clone(namespace),
            holder: Arc::from(holder),
            keys,
            expires_at: now + ttl,
            created_at: now,
            tp_size: loaders.max(1),
            ranks: HashMap::new(),
        });
        Ok(QueryOutcome::Hit { lease_id, tiers })
    }

    /// Phase one of a load: checks the lease and pins its blocks `range` for TP `rank`'s
    /// copy out of stored part `part` (the rank's own, or part 0 when every rank holds
    /// the same bytes). Once every TP rank has started its last range, the lease is
    /// released.
    #[allow(clippy::too_many_arguments)] // the load's coordinates, each checked here
    pub fn prepare_load(
        &mut self,
        now: Instant,
        namespace: &Arc<str>,
        lease_id: &str,
        rank: u32,
        part: u32,
        range: LeaseRange,
        geometry: &Arc<PartGeometry>,
    ) -> Result<LoadTicket> {
        self.expire_leases(now);
        let lease = self
            .leases
            .get_mut(lease_id)
            .ok_or_else(|| EngineError::not_found(format!("unknown or expired lease {}", shown(lease_id))))?;
        if *lease.namespace != **namespace {
            // Leases never cross namespaces: different models must not read each other.
            return Err(EngineError::not_found(format!("unknown or expired lease {}", shown(lease_id))));
        }
        let LeaseRange { offset, count, more } = range;
        let end = offset.saturating_add(count);
        if count == 0 || end > lease.keys.len() {
            return Err(EngineError::invalid(format!(
                "destination blocks {offset}..{end} outside a lease of {} blocks",
                lease.keys.len()
            )));
        }
        if rank >= lease.tp_size {
            return Err(EngineError::invalid(format!("rank {rank} outside the lease's TP size {}", lease.tp_size)));
        }
        let progress = lease.ranks.get(&rank).copied().unwrap_or_default();
        if progress.done {
            return Err(EngineError::invalid(format!("rank {rank} already loaded lease {}", shown(lease_id))));
        }
        if offset < progress.next {
            return Err(EngineError::invalid(format!(
                "rank {rank} already loaded lease {} up to block {}: ranges go forward",
                shown(lease_id),
                progress.next
            )));
        }
        let keys: Vec<BlockKey> = lease.keys[offset..end].to_vec();
        let leased_at = lease.created_at;
        let mut part_offsets = Vec::with_capacity(count);
        for key in &keys {
            let part = self
                .blocks
                .get(key)
                .and_then(|b| b.part(part))
                .ok_or_else(|| EngineError::not_found(format!("block {} lost its part", hex(&key.hash))))?;
            if *part.geometry != **geometry {
                return Err(EngineError::invalid(format!(
                    "block {} was stored with a different layout than rank {rank} registered",
                    hex(&key.hash)
                )));
            }
            part_offsets.push(part.slice.offset());
        }
        for key in &keys {
            // Pinned and counted as read with one lookup.
            if let Some(block) = self.blocks.get_mut(key) {
                pin_block(self.policy.as_mut(), block);
                if let Some(copy) = block.ram.as_mut() {
                    copy.reads += 1;
                }
            }
        }
        if let Some(lease) = self.leases.get_mut(lease_id) {
            lease.ranks.insert(rank, RankProgress { next: end, done: !more });
            if lease.ranks.values().filter(|p| p.done).count() as u32 == lease.tp_size {
                self.release_lease(lease_id)?;
            }
        }
        Ok(LoadTicket { keys, part_offsets, geometry: Arc::clone(geometry), leased_at })
    }

    /// Phase two of a load: unpins the copied blocks.
    pub fn complete_load(&mut self, ticket: LoadTicket) {
        for key in &ticket.keys {
            // Unpinned with the same lookup.
            if let Some(block) = self.blocks.get_mut(key) {
                if let Some(copy) = block.ram.as_mut() {
                    copy.reads = copy.reads.saturating_sub(1);
                }
                unpin_block(self.policy.as_mut(), key, block);
            }
        }
    }

    /// Releases a lease, unpinning its blocks.
    pub fn release_lease(&mut self, lease_id: &str) -> Result<()> {
        let lease = self
            .leases
            .remove(lease_id)
            .ok_or_else(|| EngineError::not_found(format!("unknown or expired lease {}", shown(lease_id))))?;
        for key in &lease.keys {
            self.unpin(key);
        }
        Ok(())
    }

    /// Drops the leases expired at `now`; returns how many.
    pub fn expire_leases(&mut self, now: Instant) -> usize {
        let expired = self.leases.take_expired(now);
        for lease in &expired {
            for key in &lease.keys {
                self.unpin(key);
            }
        }
        expired.len()
    }

    /// Takes every block that is neither leased nor being copied (nor the prefix of such
    /// a block) out of the index (admin) and returns them for the engine to reclaim.
    pub fn drop_unpinned(&mut self) -> Vec<Victim> {
        let mut victims = Vec::new();
        // Only evictable blocks are on the queues; taking a chain's tail puts its parent
        // there, so whole unpinned chains go.
        while let Choice::Evict(key) = self.policy.choose(None, &mut self.blocks) {
            victims.extend(self.detach(&key, EvictReason::Dropped));
        }
        victims
    }

    /// Frees the bytes of blocks taken out of the index.
    pub fn reclaim(&mut self, victims: Vec<Victim>) {
        for victim in victims {
            match victim.reason {
                EvictReason::Capacity => self.evictions += 1,
                EvictReason::Dropped => self.dropped += 1,
            }
            for slice in victim.slices {
                self.allocator.free(slice);
            }
        }
    }

    /// Takes a block out of the index: its parent may become evictable; its bytes go
    /// with the returned victim.
    pub(super) fn detach(&mut self, key: &BlockKey, reason: EvictReason) -> Option<Victim> {
        let mut block = self.blocks.remove(key)?;
        self.policy.dequeue(&mut block.policy);
        self.policy.remove(&block.policy);
        if let Some(parent) = block.parent {
            let parent = BlockKey { namespace: Arc::clone(&key.namespace), hash: parent };
            if let Some(p) = self.blocks.get_mut(&parent) {
                p.children = p.children.saturating_sub(1);
            }
            self.refresh(&parent);
        }
        let ram = block.ram.take()?;
        if ram.sealed {
            self.sealed -= 1;
        }
        let slices = ram.parts.into_vec().into_iter().flatten().map(|p| p.slice).collect();
        Some(Victim { key: key.clone(), tier: Tier::Ram, reason, sealed: ram.sealed, slices })
    }

    /// Puts the block on the policy's queue, or takes it off, as its state now says.
    pub(super) fn refresh(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.get_mut(key) {
            if block.evictable() {
                self.policy.enqueue(key, &mut block.policy);
            } else {
                self.policy.dequeue(&mut block.policy);
            }
        }
    }

    /// Tells the policy the block was used.
    pub(super) fn touch(&mut self, key: &BlockKey) {
        let Some(block) = self.blocks.get_mut(key) else { return };
        // Off its queue while the policy rebalances (see `Policy::touch`).
        let queued = block.policy.queued;
        self.policy.dequeue(&mut block.policy);
        self.policy.touch(key, &mut block.policy);
        self.policy.rebalance(&mut self.blocks);
        if queued && let Some(block) = self.blocks.get_mut(key) {
            self.policy.enqueue(key, &mut block.policy);
        }
    }

    pub(super) fn pin(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.get_mut(key) {
            pin_block(self.policy.as_mut(), block);
        }
    }

    pub(super) fn unpin(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.get_mut(key) {
            unpin_block(self.policy.as_mut(), key, block);
        }
    }
}

/// Pins a block the caller has at hand (no second lookup): off its policy queue.
pub(super) fn pin_block(policy: &mut dyn Policy, block: &mut Block) {
    block.pins += 1;
    policy.dequeue(&mut block.policy);
}

/// Drops one pin of a block the caller has at hand; back on its queue once evictable.
pub(super) fn unpin_block(policy: &mut dyn Policy, key: &BlockKey, block: &mut Block) {
    block.pins = block.pins.saturating_sub(1);
    if block.evictable() {
        policy.enqueue(key, &mut block.policy);
    }
}

pub(super) fn hex(hash: &BlockHash) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}
