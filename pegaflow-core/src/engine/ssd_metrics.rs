//! The SSD tier's metrics (`pegaflow_ssd_*`), exported whether or not a cache path is
//! configured (zeros without one), so dashboards and the metrics document see one set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The direction of an SSD I/O.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IoLabel {
    /// `write` (pool → SSD) or `read` (SSD → pool).
    pub direction: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn io_seconds() -> Histogram {
    // 20 µs .. ~10 s, by 2x.
    Histogram::new(exponential_buckets(2e-5, 2.0, 20))
}

fn io_bytes() -> Histogram {
    // 4 KiB .. 4 GiB, by 4x.
    Histogram::new(exponential_buckets(4096.0, 4.0, 11))
}

/// Counters and gauges of the SSD tier.
#[derive(Debug)]
pub struct SsdMetrics {
    /// Bytes of each block part written or read.
    pub io_bytes: HistogramFamily<IoLabel>,
    /// Duration of each block part's write or read.
    pub io_seconds: HistogramFamily<IoLabel>,
    /// Block parts whose write or read failed (an I/O error; checksums apart).
    pub io_errors: Family<IoLabel, Counter>,
    /// Block parts moved through a buffer (copied) because their pool range or length
    /// is not aligned for direct I/O; the others go between the pool and the SSD in place.
    pub copied_parts: Family<IoLabel, Counter>,
    /// Blocks not written because the write queue was full.
    pub dropped_writes: Counter,
    /// Block parts that failed their checksum on read (dropped, served as a miss).
    pub checksum_failures: Counter,
    /// Blocks copied up from the SSD into the pool.
    pub promoted_blocks: Counter,
    /// Write batches waiting in the queue.
    pub write_queue_batches: Gauge,
    /// Blocks being copied up now.
    pub prefetching_blocks: Gauge,
    /// Blocks with every part on the SSD.
    pub blocks: Gauge,
    /// Blocks found on the SSD at start.
    pub recovered_blocks: Gauge,
    /// 1 while the cache paths' indexes are replayed after start (SSD lookups miss).
    pub recovering: Gauge,
    /// Usable SSD bytes (all cache paths).
    pub capacity_bytes: Gauge,
}

impl Default for SsdMetrics {
    fn default() -> Self {
        let metrics = Self {
            io_bytes: Family::new_with_constructor(io_bytes),
            io_seconds: Family::new_with_constructor(io_seconds),
            io_errors: Family::default(),
            copied_parts: Family::default(),
            dropped_writes: Counter::default(),
            checksum_failures: Counter::default(),
            promoted_blocks: Counter::default(),
            write_queue_batches: Gauge::default(),
            prefetching_blocks: Gauge::default(),
            blocks: Gauge::default(),
            recovered_blocks: Gauge::default(),
            recovering: Gauge::default(),
            capacity_bytes: Gauge::default(),
        };
        for direction in ["write", "read"] {
            let label = IoLabel { direction };
            let _ = metrics.io_bytes.get_or_create(&label);
            let _ = metrics.io_seconds.get_or_create(&label);
            let _ = metrics.io_errors.get_or_create(&label);
            let _ = metrics.copied_parts.get_or_create(&label);
        }
        metrics
    }
}

impl SsdMetrics {
    /// Adds every metric under `pegaflow_ssd_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ssd");
        r.register("io_bytes", "Bytes of each block part written to or read from the SSD", self.io_bytes.clone());
        r.register("io_seconds", "Duration of each block part's SSD write or read", self.io_seconds.clone());
        r.register("io_errors", "SSD block writes and reads that failed", self.io_errors.clone());
        r.register(
            "copied_parts",
            "SSD block parts copied through a buffer: not aligned for direct I/O",
            self.copied_parts.clone(),
        );
        r.register("dropped_writes", "Blocks not written: the write queue was full", self.dropped_writes.clone());
        r.register("checksum_failures", "SSD blocks that failed their checksum", self.checksum_failures.clone());
        r.register("promoted_blocks", "Blocks copied up from the SSD into the pool", self.promoted_blocks.clone());
        r.register("write_queue_batches", "SSD write batches waiting", self.write_queue_batches.clone());
        r.register("prefetching_blocks", "Blocks being copied up from the SSD", self.prefetching_blocks.clone());
        r.register("blocks", "Blocks with every part on the SSD", self.blocks.clone());
        r.register("recovered_blocks", "Blocks found on the SSD at start", self.recovered_blocks.clone());
        r.register("recovering", "1 while the SSD indexes are replayed after start", self.recovering.clone());
        r.register("capacity_bytes", "Usable SSD cache bytes", self.capacity_bytes.clone());
    }
}
