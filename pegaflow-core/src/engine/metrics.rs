//! Engine metrics (Prometheus text via `prometheus-client`). Counter names carry no
//! `_total`: the library appends it.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cache::CacheStats;

/// Every metric the engine exports.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Registered instances.
    pub instances: Gauge,
    /// Client memory regions currently mapped (including those held by in-flight copies).
    pub open_regions: Gauge,
    /// Blocks copied into the cache.
    pub saved_blocks: Counter,
    /// Bytes copied into the cache.
    pub saved_bytes: Counter,
    /// Blocks copied back to clients.
    pub loaded_blocks: Counter,
    /// Bytes copied back to clients.
    pub loaded_bytes: Counter,
    /// Loads whose copy failed.
    pub load_failures: Counter,
    /// Query calls.
    pub queries: Counter,
    /// Blocks hit by queries.
    pub query_hit_blocks: Counter,
    /// Blocks asked for by queries.
    pub query_blocks: Counter,
    /// Blocks in the index.
    pub cache_blocks: Gauge,
    /// Blocks visible to queries.
    pub cache_sealed_blocks: Gauge,
    /// Pool bytes held by blocks.
    pub pool_used_bytes: Gauge,
    /// Usable pool bytes.
    pub pool_capacity_bytes: Gauge,
    /// Live leases.
    pub leases: Gauge,
    /// Pool bytes whose pages are faulted in (populated in the background after start).
    pub pool_ready_bytes: Gauge,
    /// 1 once the pool is page-locked for GPU DMA.
    pub pool_dma_ready: Gauge,
    /// Blocks evicted.
    pub evictions: Gauge,
    /// Client memory mappings held (KV regions and load states).
    pub client_mappings: Gauge,
    /// Memory hand-overs refused by a cap.
    pub refused_mappings: Counter,
    /// Queries refused by a lease cap.
    pub refused_leases: Counter,
    /// Requests refused for carrying more hashes or block ids than the cap.
    pub oversized_requests: Counter,
}

impl EngineMetrics {
    /// Adds every metric to `registry` under the `pegaflow_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("pegaflow");
        r.register("instances", "Registered instances", self.instances.clone());
        r.register("open_regions", "Client memory regions mapped by the server", self.open_regions.clone());
        r.register("saved_blocks", "Blocks copied into the cache", self.saved_blocks.clone());
        r.register("saved_bytes", "Bytes copied into the cache", self.saved_bytes.clone());
        r.register("loaded_blocks", "Blocks copied back to clients", self.loaded_blocks.clone());
        r.register("loaded_bytes", "Bytes copied back to clients", self.loaded_bytes.clone());
        r.register("load_failures", "Loads whose copy failed", self.load_failures.clone());
        r.register("queries", "Query calls", self.queries.clone());
        r.register("query_hit_blocks", "Blocks hit by queries", self.query_hit_blocks.clone());
        r.register("query_blocks", "Blocks asked for by queries", self.query_blocks.clone());
        r.register("cache_blocks", "Blocks in the index, sealed or not", self.cache_blocks.clone());
        r.register("cache_sealed_blocks", "Blocks visible to queries", self.cache_sealed_blocks.clone());
        r.register("pool_used_bytes", "Pool bytes held by blocks", self.pool_used_bytes.clone());
        r.register("pool_capacity_bytes", "Usable pool bytes", self.pool_capacity_bytes.clone());
        r.register("leases", "Live leases", self.leases.clone());
        r.register("pool_ready_bytes", "Pool bytes populated so far", self.pool_ready_bytes.clone());
        r.register("pool_dma_ready", "1 once the pool is pinned for GPU DMA", self.pool_dma_ready.clone());
        r.register("evicted_blocks", "Blocks evicted since start", self.evictions.clone());
        r.register("client_mappings", "Client memory regions and load states mapped", self.client_mappings.clone());
        r.register("refused_mappings", "Memory hand-overs refused by a cap", self.refused_mappings.clone());
        r.register("refused_leases", "Queries refused by a lease cap", self.refused_leases.clone());
        r.register("oversized_requests", "Requests over the hashes-per-request cap", self.oversized_requests.clone());
    }

    pub(crate) fn observe_mappings(&self) {
        self.client_mappings.set(pegaflow_common::shm::client_mappings());
    }

    pub(crate) fn observe_cache(&self, stats: &CacheStats) {
        self.cache_blocks.set(stats.blocks as i64);
        self.cache_sealed_blocks.set(stats.sealed_blocks as i64);
        self.pool_used_bytes.set(stats.used_bytes as i64);
        self.pool_capacity_bytes.set(stats.capacity_bytes as i64);
        self.leases.set(stats.leases as i64);
        self.evictions.set(stats.evictions as i64);
        self.observe_mappings();
    }
}
