//! `BlockCache`: the index, the eviction queue (LRU over unpinned blocks), and the
//! prepare/complete halves of save and load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use super::lease::{Lease, LeaseLimits, LeaseTable, MAX_LEASE_TTL};
use super::{BlockHash, BlockKey, DEFAULT_LEASE_TTL, PartGeometry};
use crate::error::{EngineError, Result, shown};
use crate::memory::{PoolAllocator, PoolSlice};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Empty,
    Writing,
    Saved,
}

/// One TP rank's bytes of a block.
struct Part {
    slice: PoolSlice,
    geometry: Arc<PartGeometry>,
    slots: Box<[Slot]>,
    saved: u32,
}

struct Block {
    parts: Box<[Option<Part>]>,
    sealed: bool,
    /// Leases plus in-flight copies. A pinned block is not on the eviction queue.
    pins: u32,
    /// Position on the eviction queue while unpinned.
    lru_tick: Option<u64>,
}

impl Block {
    fn is_complete(&self) -> bool {
        self.parts.iter().all(|p| p.as_ref().is_some_and(|p| p.saved == p.geometry.num_layers()))
    }
}

/// Blocks by key. Block hashes come from clients, so the map keeps a per-process random
/// seed; foldhash over SipHash because a save or load looks up every block of a request.
type BlockMap = HashMap<BlockKey, Block, RandomState>;

/// The eviction queue: unpinned blocks by the tick of their last use, oldest first.
/// Methods take the block itself so that callers holding it need no second lookup.
#[derive(Default)]
struct Lru {
    queue: BTreeMap<u64, BlockKey>,
    tick: u64,
}

impl Lru {
    /// Takes the block off the queue: a pinned block is never evicted.
    fn pin(&mut self, block: &mut Block) {
        block.pins += 1;
        if let Some(tick) = block.lru_tick.take() {
            self.queue.remove(&tick);
        }
    }

    /// Unpinning counts as a use: the block goes to the young end of the queue.
    fn unpin(&mut self, key: &BlockKey, block: &mut Block) {
        block.pins = block.pins.saturating_sub(1);
        if block.pins == 0 && block.lru_tick.is_none() {
            self.push(key, block);
        }
    }

    /// Moves an unpinned block to the young end of the queue.
    fn touch(&mut self, key: &BlockKey, block: &mut Block) {
        if let Some(tick) = block.lru_tick {
            self.queue.remove(&tick);
            self.push(key, block);
        }
    }

    /// Takes the oldest unpinned block's key off the queue.
    fn pop_oldest(&mut self) -> Option<BlockKey> {
        self.queue.pop_first().map(|(_, key)| key)
    }

    /// Drops a block that leaves the cache from the queue.
    fn forget(&mut self, block: &Block) {
        if let Some(tick) = block.lru_tick {
            self.queue.remove(&tick);
        }
    }

    fn push(&mut self, key: &BlockKey, block: &mut Block) {
        self.tick += 1;
        block.lru_tick = Some(self.tick);
        self.queue.insert(self.tick, key.clone());
    }
}

/// What a prepared save must copy: for each slot, a pool offset to write.
#[derive(Debug)]
pub struct SaveTicket {
    entries: Vec<SaveEntry>,
    /// `(index in the request, layer, pool offset of the slot)` for every slot to copy.
    pub slots: Vec<(usize, u32, u64)>,
    /// Blocks skipped because every requested slot was stored or being stored.
    pub skipped: u32,
    /// Blocks evicted to make room.
    pub evicted: u32,
}

#[derive(Debug)]
struct SaveEntry {
    key: BlockKey,
    rank: u32,
    layers: Vec<u32>,
}

impl SaveTicket {
    /// Blocks with at least one slot to copy.
    pub fn blocks(&self) -> u32 {
        self.entries.len() as u32
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
    /// Blocks evicted since start.
    pub evictions: u64,
    /// Queries refused because a lease cap was reached.
    pub refused_leases: u64,
}

/// The block index. Not thread-safe by itself: the engine wraps it in a mutex and never
/// holds that lock across a copy.
pub struct BlockCache {
    blocks: BlockMap,
    lru: Lru,
    allocator: PoolAllocator,
    leases: LeaseTable,
    lease_limits: LeaseLimits,
    sealed: u64,
    evictions: u64,
    refused_leases: u64,
}

impl BlockCache {
    /// An empty cache whose blocks live in `allocator`'s pool.
    pub fn new(allocator: PoolAllocator) -> Self {
        Self {
            blocks: BlockMap::default(),
            lru: Lru::default(),
            allocator,
            leases: LeaseTable::default(),
            lease_limits: LeaseLimits::default(),
            sealed: 0,
            evictions: 0,
            refused_leases: 0,
        }
    }

    /// Caps what leases may pin (default: [`LeaseLimits::default`]).
    pub fn with_lease_limits(mut self, limits: LeaseLimits) -> Self {
        self.lease_limits = limits;
        self
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            blocks: self.blocks.len() as u64,
            sealed_blocks: self.sealed,
            used_bytes: self.allocator.used_bytes(),
            capacity_bytes: self.allocator.capacity(),
            leases: self.leases.len() as u64,
            evictions: self.evictions,
            refused_leases: self.refused_leases,
        }
    }

    /// Phase one of a save: reserves pool space for the rank's part of each block, marks
    /// the requested slots as being written and pins the blocks. Blocks already sealed,
    /// and slots already stored or being stored, are skipped. Evicts unpinned blocks, oldest
    /// first, when the pool is full. On error nothing changes.
    pub fn prepare_save(
        &mut self,
        namespace: &Arc<str>,
        hashes: &[BlockHash],
        rank: u32,
        tp_size: u32,
        geometry: &Arc<PartGeometry>,
        layers: &[u32],
    ) -> Result<SaveTicket> {
        self.check_save(namespace, hashes, rank, tp_size, geometry)?;
        let mut ticket = SaveTicket { entries: Vec::new(), slots: Vec::new(), skipped: 0, evicted: 0 };
        // Blocks this call pinned or created, to roll back on failure.
        let mut pinned: Vec<BlockKey> = Vec::new();
        let mut created_parts: Vec<BlockKey> = Vec::new();
        for (index, hash) in hashes.iter().enumerate() {
            let key = BlockKey { namespace: Arc::clone(namespace), hash: *hash };
            let block = self.blocks.entry(key.clone()).or_insert_with(|| Block {
                parts: (0..tp_size).map(|_| None).collect(),
                sealed: false,
                pins: 0,
                lru_tick: None,
            });
            if block.sealed {
                ticket.skipped += 1;
                self.lru.touch(&key, block);
                continue;
            }
            self.lru.pin(block);
            pinned.push(key.clone());
            let mut block = block;
            if block.parts[rank as usize].is_none() {
                // Allocating may evict; never this block (pinned, so off the queue).
                let Some(slice) = self.allocate(geometry.total(), &mut ticket.evicted) else {
                    self.rollback_save(&ticket, &created_parts, rank, &pinned);
                    return Err(EngineError::ResourceExhausted(format!(
                        "pool full: {} bytes in use by blocks that are leased or being copied",
                        self.allocator.used_bytes()
                    )));
                };
                let Some(again) = self.blocks.get_mut(&key) else { continue };
                again.parts[rank as usize] = Some(Part {
                    slice,
                    geometry: Arc::clone(geometry),
                    slots: vec![Slot::Empty; geometry.num_layers() as usize].into(),
                    saved: 0,
                });
                created_parts.push(key.clone());
                block = again;
            }
            let Some(part) = block.parts[rank as usize].as_mut() else { continue };
            let mut marked = Vec::with_capacity(layers.len());
            for &layer in layers {
                if part.slots[layer as usize] == Slot::Empty {
                    part.slots[layer as usize] = Slot::Writing;
                    marked.push(layer);
                    ticket.slots.push((index, layer, part.slice.offset() + part.geometry.layer_offset(layer)));
                }
            }
            if marked.is_empty() {
                ticket.skipped += 1;
                pinned.pop();
                self.lru.unpin(&key, block);
            } else {
                ticket.entries.push(SaveEntry { key, rank, layers: marked });
            }
        }
        Ok(ticket)
    }

    /// Read-only pass: rejects saves that conflict with stored parts (other TP size or
    /// layout) or that could not fit the pool even if it were empty, and returns the pool
    /// bytes new parts need.
    pub fn check_save(
        &self,
        namespace: &Arc<str>,
        hashes: &[BlockHash],
        rank: u32,
        tp_size: u32,
        geometry: &Arc<PartGeometry>,
    ) -> Result<u64> {
        let mut new_parts = HashSet::new();
        for hash in hashes {
            let key = BlockKey { namespace: Arc::clone(namespace), hash: *hash };
            match self.blocks.get(&key) {
                None => {
                    new_parts.insert(*hash);
                }
                Some(block) if block.parts.len() != tp_size as usize => {
                    return Err(EngineError::invalid(format!(
                        "block {} was stored by {} TP ranks, this instance has {tp_size}",
                        hex(hash),
                        block.parts.len()
                    )));
                }
                Some(block) if block.sealed => {}
                Some(block) => match &block.parts[rank as usize] {
                    None => {
                        new_parts.insert(*hash);
                    }
                    Some(part) if *part.geometry != **geometry => {
                        return Err(EngineError::invalid(format!(
                            "block {} was stored with a different layout for rank {rank}",
                            hex(hash)
                        )));
                    }
                    Some(_) => {}
                },
            }
        }
        let needed = new_parts.len() as u64 * self.allocator.rounded(geometry.total());
        if needed > self.allocator.capacity() {
            return Err(EngineError::ResourceExhausted(format!(
                "saving {} blocks needs {needed} bytes but the pool holds {}",
                hashes.len(),
                self.allocator.capacity()
            )));
        }
        Ok(needed)
    }

    fn rollback_save(&mut self, ticket: &SaveTicket, created_parts: &[BlockKey], rank: u32, pinned: &[BlockKey]) {
        for entry in &ticket.entries {
            if let Some(part) = self.part_mut(&entry.key, entry.rank) {
                for &layer in &entry.layers {
                    part.slots[layer as usize] = Slot::Empty;
                }
            }
        }
        for key in created_parts {
            if let Some(part) = self.blocks.get_mut(key).and_then(|b| b.parts[rank as usize].take()) {
                self.allocator.free(part.slice);
            }
        }
        for key in pinned {
            self.unpin(key);
        }
        // Blocks this call created hold no part now: drop them.
        for key in pinned {
            if self.blocks.get(key).is_some_and(|b| b.pins == 0 && b.parts.iter().all(Option::is_none)) {
                self.remove(key);
            }
        }
    }

    /// Phase two of a save: publishes the copied slots (or clears them when the copy
    /// failed), seals completed blocks and unpins. Returns the number of blocks sealed.
    pub fn complete_save(&mut self, ticket: SaveTicket, copied: bool) -> u32 {
        let mut sealed = 0;
        for entry in ticket.entries {
            let Some(block) = self.blocks.get_mut(&entry.key) else { continue };
            if let Some(part) = block.parts.get_mut(entry.rank as usize).and_then(Option::as_mut) {
                for layer in entry.layers {
                    if copied {
                        part.slots[layer as usize] = Slot::Saved;
                        part.saved += 1;
                    } else {
                        part.slots[layer as usize] = Slot::Empty;
                    }
                }
            }
            if !block.sealed && block.is_complete() {
                block.sealed = true;
                self.sealed += 1;
                sealed += 1;
            }
            self.lru.unpin(&entry.key, block);
        }
        sealed
    }

    /// Counts the leading hashes whose blocks are sealed and leases them for `ttl`
    /// (`None`: [`DEFAULT_LEASE_TTL`]) on behalf of instance `holder`. Returns the hit
    /// count and the lease id (none when nothing hit). A hit that would pass the lease
    /// caps is refused (`ResourceExhausted`) and pins nothing.
    pub fn query(
        &mut self,
        now: Instant,
        namespace: &Arc<str>,
        holder: &str,
        hashes: &[BlockHash],
        ttl: Option<Duration>,
    ) -> Result<(u32, Option<String>)> {
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
        for hash in hashes {
            let key = BlockKey { namespace: Arc::clone(namespace), hash: *hash };
            match self.blocks.get(&key) {
                Some(block) if block.sealed => keys.push(key),
                _ => break,
            }
        }
        if keys.is_empty() {
            return Ok((0, None));
        }
        if let Err(reason) = self.leases.admits(holder, keys.len(), &self.lease_limits) {
            self.refused_leases += 1;
            return Err(EngineError::ResourceExhausted(reason));
        }
        let mut tp_size = 0;
        for key in &keys {
            if let Some(block) = self.blocks.get_mut(key) {
                tp_size = block.parts.len() as u32;
                self.lru.pin(block);
            }
        }
        let hits = keys.len() as u32;
        let id = self.leases.insert(Lease {
            namespace: Arc::clone(namespace),
            holder: Arc::from(holder),
            keys,
            expires_at: now + ttl,
            tp_size,
            started_ranks: HashSet::new(),
        });
        Ok((hits, Some(id)))
    }

    /// Phase one of a load: checks the lease and pins its first `count` blocks for the
    /// copy. Once every TP rank has started its load, the lease is released.
    pub fn prepare_load(
        &mut self,
        now: Instant,
        namespace: &Arc<str>,
        lease_id: &str,
        rank: u32,
        count: usize,
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
        if count == 0 || count > lease.keys.len() {
            return Err(EngineError::invalid(format!(
                "{count} destination blocks for a lease of {} blocks",
                lease.keys.len()
            )));
        }
        if rank >= lease.tp_size {
            return Err(EngineError::invalid(format!("rank {rank} outside the lease's TP size {}", lease.tp_size)));
        }
        if lease.started_ranks.contains(&rank) {
            return Err(EngineError::invalid(format!("rank {rank} already loaded lease {}", shown(lease_id))));
        }
        let keys: Vec<BlockKey> = lease.keys[..count].to_vec();
        let mut part_offsets = Vec::with_capacity(count);
        for key in &keys {
            let part = self
                .part(key, rank)
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
            self.pin(key);
        }
        if let Some(lease) = self.leases.get_mut(lease_id) {
            lease.started_ranks.insert(rank);
            if lease.started_ranks.len() as u32 == lease.tp_size {
                self.release_lease(lease_id)?;
            }
        }
        Ok(LoadTicket { keys, part_offsets, geometry: Arc::clone(geometry) })
    }

    /// Phase two of a load: unpins the copied blocks.
    pub fn complete_load(&mut self, ticket: LoadTicket) {
        for key in &ticket.keys {
            self.unpin(key);
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

    fn part(&self, key: &BlockKey, rank: u32) -> Option<&Part> {
        self.blocks.get(key)?.parts.get(rank as usize)?.as_ref()
    }

    fn part_mut(&mut self, key: &BlockKey, rank: u32) -> Option<&mut Part> {
        self.blocks.get_mut(key)?.parts.get_mut(rank as usize)?.as_mut()
    }

    fn pin(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.get_mut(key) {
            self.lru.pin(block);
        }
    }

    fn unpin(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.get_mut(key) {
            self.lru.unpin(key, block);
        }
    }

    /// Drops every block that is neither leased nor being copied (admin); returns how many.
    pub fn drop_unpinned(&mut self) -> u64 {
        let mut dropped = 0;
        // Pinned blocks are off the queue, so this never touches them.
        while let Some(key) = self.lru.pop_oldest() {
            self.remove(&key);
            dropped += 1;
        }
        dropped
    }

    /// A pool range of `len` bytes, evicting unpinned blocks (oldest first) as needed.
    fn allocate(&mut self, len: u64, evicted: &mut u32) -> Option<PoolSlice> {
        loop {
            if let Some(slice) = self.allocator.allocate(len) {
                return Some(slice);
            }
            // Off the queue already, so `remove` finds nothing there to forget.
            let key = self.lru.pop_oldest()?;
            self.remove(&key);
            self.evictions += 1;
            *evicted += 1;
        }
    }

    fn remove(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.remove(key) {
            self.lru.forget(&block);
            if block.sealed {
                self.sealed -= 1;
            }
            for part in block.parts.into_iter().flatten() {
                self.allocator.free(part.slice);
            }
        }
    }
}

fn hex(hash: &BlockHash) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}
