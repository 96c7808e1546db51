//! Engine metrics (Prometheus text via `prometheus-client`). Names carry their unit;
//! counters carry no `_total` here (the library appends it). Every metric is listed in
//! `docs/metrics.md`; a test keeps the two in step.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::ssd_metrics::SsdMetrics;
use crate::cache::{CacheStats, EvictReason, Tier};

/// A tier.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// `ram` (later `ssd`, `remote`).
    pub tier: &'static str,
}

/// Where a looked-up block was found: a tier, or `miss`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    /// `ram`, `ssd` (copied up for a later query), or `miss`.
    pub tier: &'static str,
}

/// What a query found as a whole.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `hit`, `loading` or `miss`.
    pub outcome: &'static str,
}

/// Why blocks left a tier.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    /// The tier left.
    pub tier: &'static str,
    /// `capacity` or `dropped`.
    pub reason: &'static str,
}

/// A copy's direction and the backend that ran it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransferLabels {
    /// `save` (into the cache) or `load` (back to the client).
    pub direction: &'static str,
    /// `host` or `cuda`.
    pub backend: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn bytes_histogram() -> Histogram {
    // 64 KiB .. 64 GiB, by 4x.
    Histogram::new(exponential_buckets(65_536.0, 4.0, 11))
}

fn seconds_histogram() -> Histogram {
    // 50 µs .. ~26 s, by 2x.
    Histogram::new(exponential_buckets(5e-5, 2.0, 20))
}

/// Every metric the engine exports.
#[derive(Debug)]
pub struct EngineMetrics {
    /// Registered instances.
    pub instances: Gauge,
    /// Client memory regions currently mapped (including those held by in-flight copies).
    pub open_regions: Gauge,
    /// Client memory mappings held (KV regions and load states).
    pub client_mappings: Gauge,
    /// Usable pool bytes.
    pub pool_capacity_bytes: Gauge,
    /// Pool bytes held by blocks.
    pub pool_used_bytes: Gauge,
    /// Pool bytes whose pages are faulted in (populated in the background after start).
    pub pool_ready_bytes: Gauge,
    /// Pool bytes page-locked for GPU DMA (all of it once pinned, else 0).
    pub pool_dma_ready_bytes: Gauge,
    /// Blocks in the index, in any tier, readable or not.
    pub cache_blocks: Gauge,
    /// Blocks visible to queries.
    pub cache_sealed_blocks: Gauge,
    /// Blocks with a copy in each tier.
    pub resident_blocks: Family<TierLabel, Gauge>,
    /// Bytes of those copies.
    pub resident_bytes: Family<TierLabel, Gauge>,
    /// Live leases.
    pub leases: Gauge,
    /// Blocks pinned by live leases.
    pub leased_blocks: Gauge,
    /// Query calls by outcome.
    pub lookups: Family<OutcomeLabel, Counter>,
    /// Blocks asked for by queries, by the tier that served them (`miss`: not served).
    pub lookup_blocks: Family<LookupLabel, Counter>,
    /// New blocks admitted into a tier.
    pub admitted_blocks: Family<TierLabel, Counter>,
    /// New blocks a tier's policy refused (not copied; the save still succeeds).
    pub rejected_blocks: Family<TierLabel, Counter>,
    /// Blocks that left a tier, by reason.
    pub evicted_blocks: Family<EvictionLabels, Counter>,
    /// Blocks copied into the cache.
    pub saved_blocks: Counter,
    /// Blocks copied back to clients.
    pub loaded_blocks: Counter,
    /// Bytes per save or load request.
    pub transfer_bytes: HistogramFamily<TransferLabels>,
    /// Duration of each save or load request, seconds (a load: from the call until its
    /// copy is done).
    pub transfer_duration_seconds: HistogramFamily<TransferLabels>,
    /// Saves and loads whose copy failed.
    pub transfer_failures: Family<TransferLabels, Counter>,
    /// Memory hand-overs refused by a cap.
    pub refused_mappings: Counter,
    /// Queries refused by a lease cap.
    pub refused_leases: Counter,
    /// Requests refused for carrying more hashes or block ids than the cap.
    pub oversized_requests: Counter,
    /// The SSD tier's.
    pub ssd: SsdMetrics,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        let metrics = Self {
            instances: Gauge::default(),
            open_regions: Gauge::default(),
            client_mappings: Gauge::default(),
            pool_capacity_bytes: Gauge::default(),
            pool_used_bytes: Gauge::default(),
            pool_ready_bytes: Gauge::default(),
            pool_dma_ready_bytes: Gauge::default(),
            cache_blocks: Gauge::default(),
            cache_sealed_blocks: Gauge::default(),
            resident_blocks: Family::default(),
            resident_bytes: Family::default(),
            leases: Gauge::default(),
            leased_blocks: Gauge::default(),
            lookups: Family::default(),
            lookup_blocks: Family::default(),
            admitted_blocks: Family::default(),
            rejected_blocks: Family::default(),
            evicted_blocks: Family::default(),
            saved_blocks: Counter::default(),
            loaded_blocks: Counter::default(),
            transfer_bytes: Family::new_with_constructor(bytes_histogram),
            transfer_duration_seconds: Family::new_with_constructor(seconds_histogram),
            transfer_failures: Family::default(),
            refused_mappings: Counter::default(),
            refused_leases: Counter::default(),
            oversized_requests: Counter::default(),
            ssd: SsdMetrics::default(),
        };
        metrics.create_series();
        metrics
    }
}

impl EngineMetrics {
    /// Creates every labelled series that exists from the start, so dashboards and rates
    /// see zeros rather than gaps.
    fn create_series(&self) {
        let ram = TierLabel { tier: Tier::Ram.as_str() };
        for family in [&self.resident_blocks, &self.resident_bytes] {
            let _ = family.get_or_create(&ram);
        }
        for family in [&self.admitted_blocks, &self.rejected_blocks] {
            let _ = family.get_or_create(&ram);
        }
        for outcome in ["hit", "loading", "miss"] {
            let _ = self.lookups.get_or_create(&OutcomeLabel { outcome });
        }
        for tier in [Tier::Ram.as_str(), Tier::Ssd.as_str(), "miss"] {
            let _ = self.lookup_blocks.get_or_create(&LookupLabel { tier });
        }
        for reason in [EvictReason::Capacity, EvictReason::Dropped] {
            let _ = self
                .evicted_blocks
                .get_or_create(&EvictionLabels { tier: Tier::Ram.as_str(), reason: reason.as_str() });
        }
        for direction in ["save", "load"] {
            for backend in ["host", "cuda"] {
                let labels = TransferLabels { direction, backend };
                let _ = self.transfer_bytes.get_or_create(&labels);
                let _ = self.transfer_duration_seconds.get_or_create(&labels);
                let _ = self.transfer_failures.get_or_create(&labels);
            }
        }
    }

    /// Adds every metric to `registry` under the `pegaflow_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("pegaflow");
        r.register("instances", "Registered instances", self.instances.clone());
        r.register("open_regions", "Client memory regions mapped by the server", self.open_regions.clone());
        r.register("client_mappings", "Client memory regions and load states mapped", self.client_mappings.clone());
        r.register("pool_capacity_bytes", "Usable pool bytes", self.pool_capacity_bytes.clone());
        r.register("pool_used_bytes", "Pool bytes held by blocks", self.pool_used_bytes.clone());
        r.register("pool_ready_bytes", "Pool bytes populated so far", self.pool_ready_bytes.clone());
        r.register("pool_dma_ready_bytes", "Pool bytes pinned for GPU DMA", self.pool_dma_ready_bytes.clone());
        r.register("cache_blocks", "Blocks in the index, any tier, sealed or not", self.cache_blocks.clone());
        r.register("cache_sealed_blocks", "Blocks visible to queries", self.cache_sealed_blocks.clone());
        r.register("resident_blocks", "Blocks with a copy in the tier", self.resident_blocks.clone());
        r.register("resident_bytes", "Bytes of the copies in the tier", self.resident_bytes.clone());
        r.register("leases", "Live leases", self.leases.clone());
        r.register("leased_blocks", "Blocks pinned by live leases", self.leased_blocks.clone());
        r.register("lookups", "Query calls by outcome", self.lookups.clone());
        r.register("lookup_blocks", "Blocks asked for by queries, by serving tier or miss", self.lookup_blocks.clone());
        r.register("admitted_blocks", "New blocks admitted into the tier", self.admitted_blocks.clone());
        r.register("rejected_blocks", "New blocks the tier's policy refused", self.rejected_blocks.clone());
        r.register("evicted_blocks", "Blocks that left the tier, by reason", self.evicted_blocks.clone());
        r.register("saved_blocks", "Blocks copied into the cache", self.saved_blocks.clone());
        r.register("loaded_blocks", "Blocks copied back to clients", self.loaded_blocks.clone());
        r.register("transfer_bytes", "Bytes per save or load request", self.transfer_bytes.clone());
        r.register(
            "transfer_duration_seconds",
            "Duration of each save or load request",
            self.transfer_duration_seconds.clone(),
        );
        r.register("transfer_failures", "Saves and loads whose copy failed", self.transfer_failures.clone());
        r.register("refused_mappings", "Memory hand-overs refused by a cap", self.refused_mappings.clone());
        r.register("refused_leases", "Queries refused by a lease cap", self.refused_leases.clone());
        r.register("oversized_requests", "Requests over the hashes-per-request cap", self.oversized_requests.clone());
        self.ssd.register(r);
    }

    pub(crate) fn observe_mappings(&self) {
        self.client_mappings.set(pegaflow_common::shm::client_mappings());
    }

    pub(crate) fn observe_cache(&self, stats: &CacheStats) {
        let ram = TierLabel { tier: Tier::Ram.as_str() };
        self.cache_blocks.set(stats.blocks as i64);
        self.cache_sealed_blocks.set(stats.sealed_blocks as i64);
        self.resident_blocks.get_or_create(&ram).set(stats.blocks as i64);
        self.resident_bytes.get_or_create(&ram).set(stats.used_bytes as i64);
        self.pool_used_bytes.set(stats.used_bytes as i64);
        self.pool_capacity_bytes.set(stats.capacity_bytes as i64);
        self.leases.set(stats.leases as i64);
        self.leased_blocks.set(stats.leased_blocks as i64);
        self.observe_mappings();
    }

    /// Counts blocks that left `tier` for `reason`.
    pub(crate) fn observe_evictions(&self, tier: Tier, reason: EvictReason, blocks: u64) {
        self.evicted_blocks
            .get_or_create(&EvictionLabels { tier: tier.as_str(), reason: reason.as_str() })
            .inc_by(blocks);
    }

    /// Counts one finished save or load.
    pub(crate) fn observe_transfer(&self, labels: &TransferLabels, bytes: u64, seconds: f64) {
        self.transfer_bytes.get_or_create(labels).observe(bytes as f64);
        self.transfer_duration_seconds.get_or_create(labels).observe(seconds);
    }
}
