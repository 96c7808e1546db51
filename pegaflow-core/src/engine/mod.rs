//! The engine: instances, and the save / query / load paths over the cache and the
//! device backends.
//!
//! Locking: the cache mutex is held only to prepare or complete an operation, never
//! across a copy. Completion runs in the backend's callback, so an abandoned request
//! (client gone mid-save) still publishes or rolls back its slots.

mod handles;
mod load;
mod metrics;
mod registry;
mod save;
mod ssd;
mod ssd_metrics;
mod transfer;
mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub use handles::{MAX_TOKENS_PER_CONNECTION, MemoryKind, MemoryToken, TOKEN_BYTES};
pub use load::{LeaseRef, LoadTraceConfig};
pub use metrics::EngineMetrics;
pub use registry::{Caller, InstanceInfo, LayerRegistration, MAX_ID_LEN, RegisterRequest};
pub use ssd::SsdConfig;
pub use ssd_metrics::SsdMetrics;

use crate::cache::{BlockCache, BlockHash, CacheStats, LeaseLimits, PolicyKind, Victim};
use crate::device::{CudaDevice, DeviceBackend, HostDevice, HostDeviceOptions, RegionSource};
use crate::error::{EngineError, Result};
use crate::memory::{HostPool, PoolAllocator, PoolError, PoolOptions};
use handles::MemoryHandles;
use registry::Registry;

/// Caps on what clients can make the engine hold or do in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// What leases may pin.
    pub leases: LeaseLimits,
    /// Block hashes (or block ids) one save, query or load may carry. Default: 65,536
    /// (a 1M-token prompt in 16-token blocks).
    pub max_hashes_per_request: usize,
    /// Client memory the server maps at once (KV regions and load states; each is one
    /// kernel mapping, of which a process may have about 65,000). Default: 16,384.
    pub max_client_mappings: usize,
    /// Bytes of client memory the server maps at once (address space is 128 TiB).
    /// Default: 16 TiB.
    pub max_client_memory: u64,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            leases: LeaseLimits::default(),
            max_hashes_per_request: 1 << 16,
            max_client_mappings: 1 << 14,
            max_client_memory: 16 << 40,
        }
    }
}

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Cache capacity in bytes (the host pool).
    pub pool_size: u64,
    /// Back the pool with 2 MiB huge pages. Default: false.
    pub use_hugepages: bool,
    /// Typical bytes of one block of one rank; sizes the allocator and the admission
    /// sketch. Default: 64 KiB.
    pub hint_value_size: Option<u64>,
    /// Admission and eviction order of the RAM tier. Default: W-TinyLFU.
    pub policy: PolicyKind,
    /// Copy threads per direction of the host backend. Default: half the CPUs (1..=8).
    pub copy_threads: Option<usize>,
    /// CUDA device ordinals to serve; empty means all.
    pub cuda_devices: Vec<u32>,
    /// How long engine threads poll (yielding the CPU) instead of sleeping: CUDA copy
    /// workers after each job, and a save waiting for its last chunk (at most
    /// [`pegaflow_common::spin::SPIN`] of it). Each avoided sleep saves an idle-thread wake-up
    /// (0.05–0.15 ms on some hosts). Zero always sleeps.
    pub spin: Duration,
    /// Resource caps.
    pub limits: EngineLimits,
    /// Which loads log their per-stage durations.
    pub load_trace: LoadTraceConfig,
    /// The SSD tier; `None`: RAM only.
    pub ssd: Option<SsdConfig>,
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineInitError {
    /// The pool could not be mapped.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Worker threads could not be started.
    #[error("cannot start copy threads: {0}")]
    Threads(#[from] std::io::Error),
    /// An SSD cache path cannot be used.
    #[error(transparent)]
    Ssd(#[from] crate::ssd::SsdError),
}

/// What a save did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveOutcome {
    /// Blocks whose slots this call copied.
    pub saved_blocks: u32,
    /// Blocks that became visible to queries.
    pub sealed_blocks: u32,
    /// Blocks skipped (already stored or being stored, or refused admission).
    pub skipped_blocks: u32,
    /// Of the skipped blocks, those refused admission (worth less than what they would
    /// have displaced).
    pub rejected_blocks: u32,
    /// Blocks evicted to make room.
    pub evicted_blocks: u32,
}

/// The rank a save or load runs for, and who asks.
#[derive(Debug, Clone, Copy)]
pub struct RankRef<'a> {
    /// The instance.
    pub instance_id: &'a str,
    /// Its TP rank.
    pub tp_rank: u32,
    /// The session (and user) asking: must be the one that registered the rank.
    pub caller: Caller<'a>,
}

/// The blocks a save stores: content hashes, and the block before each in its prefix
/// chain (`None`: a chain's first block; empty slice: not known).
#[derive(Debug, Clone, Copy)]
pub struct SaveBlocks<'a> {
    /// Content hash of each block.
    pub hashes: &'a [BlockHash],
    /// Parent of each block, or empty.
    pub parents: &'a [Option<BlockHash>],
}

/// The KV-cache engine.
pub struct Engine {
    pool: Arc<HostPool>,
    backends: Vec<Arc<dyn DeviceBackend>>,
    preparing: std::sync::Once,
    cache: Arc<Mutex<BlockCache>>,
    registry: Registry,
    handles: MemoryHandles,
    max_hashes: usize,
    metrics: Arc<EngineMetrics>,
    /// How long a save waits for its last chunk without sleeping.
    save_spin: Duration,
    tracer: Arc<load::LoadTracer>,
    /// The SSD tier, when configured.
    ssd: Option<Arc<ssd::SsdTier>>,
}

impl Engine {
    /// Maps the pool and starts the host backend.
    pub fn new(config: EngineConfig) -> Result<Self, EngineInitError> {
        let pool =
            Arc::new(HostPool::new(PoolOptions { size: config.pool_size, use_hugepages: config.use_hugepages })?);
        // With an SSD tier, pool ranges are whole 4 KiB extents: direct I/O in place.
        let unit = if config.ssd.is_some() { crate::ssd::file::ALIGN } else { 0 };
        let allocator = PoolAllocator::with_min_unit(pool.len(), config.hint_value_size, unit);
        let mut host_options = HostDeviceOptions::default();
        if let Some(threads) = config.copy_threads {
            host_options.copy_threads = threads;
        }
        let host: Arc<dyn DeviceBackend> = Arc::new(HostDevice::new(host_options)?);
        let cuda: Arc<dyn DeviceBackend> = Arc::new(CudaDevice::new(config.cuda_devices.clone(), config.spin));
        let metrics = Arc::new(EngineMetrics::default());
        let capacity_blocks = allocator.capacity() / config.hint_value_size.unwrap_or(64 << 10).max(1);
        let cache = BlockCache::with_policy(allocator, config.policy.build(capacity_blocks))
            .with_lease_limits(config.limits.leases);
        metrics.observe_cache(&cache.stats());
        let backends = vec![host, cuda];
        let registry = Registry::new(backends.clone(), metrics.instances.clone(), metrics.open_regions.clone());
        let cache = Arc::new(Mutex::new(cache));
        let ssd = match &config.ssd {
            Some(ssd) => {
                Some(Arc::new(ssd::SsdTier::open(ssd, Arc::clone(&cache), Arc::clone(&pool), Arc::clone(&metrics))?))
            }
            None => None,
        };
        Ok(Self {
            pool,
            backends,
            preparing: std::sync::Once::new(),
            cache,
            registry,
            handles: MemoryHandles::new(config.limits.max_client_mappings, config.limits.max_client_memory),
            max_hashes: config.limits.max_hashes_per_request,
            metrics,
            save_spin: config.spin.min(pegaflow_common::spin::SPIN),
            tracer: Arc::new(load::LoadTracer::new(config.load_trace)),
            ssd,
        })
    }

    /// Starts making the pool ready in the background (populate its pages, warm up and pin
    /// for the device backends); the server calls it once it is listening, so start-up
    /// never waits for it. Copies work before it finishes, only slower. Idempotent.
    pub fn prepare_pool_in_background(&self) {
        self.preparing.call_once(|| {
            let spawned =
                prepare_pool_in_background(Arc::clone(&self.pool), self.backends.clone(), Arc::clone(&self.metrics));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start pool preparation; pages fault in on first use");
            }
        });
    }

    /// The engine's metrics, to add to a registry.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// Cache counters.
    pub fn stats(&self) -> CacheStats {
        self.cache.lock().stats()
    }

    /// Maps client memory received as `fd` over the Unix socket (from user `uid`, on
    /// descriptor connection `connection`) and returns the token that names it.
    pub fn add_memory(
        &self,
        fd: std::os::fd::OwnedFd,
        kind: MemoryKind,
        min_len: u64,
        uid: u32,
        connection: u64,
    ) -> Result<MemoryToken> {
        let token = self.handles.add(fd, kind, min_len, uid, connection);
        self.metrics.observe_mappings();
        if matches!(token, Err(EngineError::ResourceExhausted(_))) {
            self.metrics.refused_mappings.inc();
        }
        token
    }

    /// Forgets a token of `connection` (its memory stays mapped while registered).
    pub fn release_memory(&self, token: &MemoryToken, connection: u64) {
        self.handles.release(token, connection);
        self.metrics.observe_mappings();
    }

    /// Forgets every token of a closed descriptor connection; returns how many.
    pub fn drop_connection(&self, connection: u64) -> usize {
        let dropped = self.handles.drop_connection(connection);
        self.metrics.observe_mappings();
        dropped
    }

    /// The registrable region a KV memory token names; `caller_uid` (known over the Unix
    /// socket) must be the user who handed the memory over.
    pub fn host_memory(&self, token: &MemoryToken, caller_uid: Option<u32>) -> Result<RegionSource> {
        self.handles.kv_memory(token, caller_uid)
    }

    /// Registers every layer of one TP rank; returns the bytes one block of the rank
    /// takes in the cache.
    pub fn register(&self, request: RegisterRequest) -> Result<u64> {
        let registered = self.registry.register(request);
        self.metrics.observe_mappings();
        registered
    }

    /// Drops the ranks of an instance that were registered under a client session (called
    /// when that session closes); returns how many.
    pub fn unregister_session(&self, instance_id: &str, session_id: &str) -> usize {
        let dropped = self.registry.unregister_session(instance_id, session_id);
        self.metrics.observe_mappings();
        dropped
    }

    /// Unregisters an instance (all ranks) on behalf of `session_id`, which must hold one
    /// of its ranks, called by user `caller_uid` (when known) who must own the instance.
    pub fn unregister(&self, instance_id: &str, session_id: &str, caller_uid: Option<u32>) -> Result<()> {
        let unregistered = self.registry.unregister(instance_id, session_id, caller_uid);
        self.metrics.observe_mappings();
        unregistered
    }

    fn check_request_size(&self, what: &str, count: usize) -> Result<()> {
        if count > self.max_hashes {
            self.metrics.oversized_requests.inc();
            return Err(EngineError::invalid(format!(
                "{count} {what} in one request; the server's cap is {} (split the request)",
                self.max_hashes
            )));
        }
        Ok(())
    }

    /// Registered instances.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.registry.list()
    }

    /// Drops every cached block that is neither leased nor being copied (admin). Returns
    /// how many blocks went and how many stayed.
    pub fn drop_cache(&self) -> (u64, u64) {
        let mut cache = self.cache.lock();
        let victims = cache.drop_unpinned();
        let dropped = victims.len() as u64;
        self.dispose(&mut cache, victims);
        let stats = cache.stats();
        self.metrics.observe_cache(&stats);
        (dropped, stats.blocks)
    }

    /// Takes evicted blocks and reclaims their bytes (the SSD tier, when there is one,
    /// already holds the copies it was able to write).
    fn dispose(&self, cache: &mut BlockCache, victims: Vec<Victim>) {
        dispose_victims(&self.metrics, cache, victims);
    }

    /// Drops expired leases; the server calls this periodically. Returns how many.
    pub fn expire_leases(&self) -> usize {
        let mut cache = self.cache.lock();
        let expired = cache.expire_leases(Instant::now());
        self.metrics.observe_cache(&cache.stats());
        expired
    }
}

/// Counts and reclaims blocks evicted from the pool.
fn dispose_victims(metrics: &EngineMetrics, cache: &mut BlockCache, victims: Vec<Victim>) {
    // One metric update per run of victims alike (a save's victims all leave the same
    // tier for the same reason): a labelled counter costs a lock and a lookup.
    for run in victims.chunk_by(|a, b| (a.tier, a.reason) == (b.tier, b.reason)) {
        metrics.observe_evictions(run[0].tier, run[0].reason, run.len() as u64);
    }
    cache.reclaim(victims);
}

/// Makes the pool ready after the server starts serving: faults its pages in (progress in
/// `pegaflow_pool_ready_bytes`), then lets each backend pin it for DMA
/// (`pegaflow_pool_dma_ready_bytes`). Copies work meanwhile, only slower.
fn prepare_pool_in_background(
    pool: Arc<HostPool>,
    backends: Vec<Arc<dyn DeviceBackend>>,
    metrics: Arc<EngineMetrics>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("pegaflow-pool".into()).spawn(move || {
        let started = Instant::now();
        let ready = std::sync::atomic::AtomicU64::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
        let result = std::thread::scope(|scope| {
            for backend in &backends {
                scope.spawn(|| backend.warm_up());
            }
            let worker = scope.spawn(|| pool.populate(threads, &ready));
            while !worker.is_finished() {
                metrics.pool_ready_bytes.set(ready.load(std::sync::atomic::Ordering::Relaxed) as i64);
                std::thread::sleep(Duration::from_millis(50));
            }
            worker.join().unwrap_or_else(|_| Err(std::io::Error::other("populate thread panicked")))
        });
        metrics.pool_ready_bytes.set(ready.load(std::sync::atomic::Ordering::Relaxed) as i64);
        match result {
            Ok(()) => tracing::info!(bytes = pool.len(), seconds = started.elapsed().as_secs_f64(), "pool pages ready"),
            Err(e) => tracing::warn!(error = %e, "cannot populate the pool up front; pages fault in on first use"),
        }
        for backend in &backends {
            let t0 = Instant::now();
            match backend.pin_pool(&pool) {
                Ok(true) => {
                    metrics.pool_dma_ready_bytes.set(pool.len() as i64);
                    tracing::info!(
                        backend = backend.name(),
                        seconds = t0.elapsed().as_secs_f64(),
                        "pool pinned for DMA"
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(backend = backend.name(), error = %e, "cannot pin the pool; DMA runs slower"),
            }
        }
    })?;
    Ok(())
}
