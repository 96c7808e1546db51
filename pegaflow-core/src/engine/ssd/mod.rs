//! The SSD tier in the engine. A block is written through to the cache paths once it is
//! sealed in the pool (so a crash or restart keeps every block whose write finished, and
//! eviction from the pool costs no I/O); the write queue is bounded and a full queue drops
//! the write, counted, never delaying a save. A query whose prefix continues on the SSD
//! starts copying those blocks up into the pool and answers "loading"; a later query hits
//! them in RAM. At start the cache paths' indexes are replayed, so a restarted server
//! serves what it wrote before. A block that fails its checksum is dropped and is a miss.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

mod read;
mod write;

use read::prefetch_batch;
use write::write_batch;

use super::metrics::EngineMetrics;
use crate::cache::{BlockCache, BlockHash, BlockKey, PinnedBlock};
use crate::memory::HostPool;
use crate::ssd::io::IoEngine;
use crate::ssd::{BlockFile, PartId, PartLoc, SsdError, SsdIndex};

/// SSD tier settings (the server's `--ssd-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsdConfig {
    /// Cache paths (files or directories); blocks are spread over them by hash.
    pub paths: Vec<PathBuf>,
    /// Bytes over all paths (split evenly). Default: 512 GiB.
    pub capacity: u64,
    /// Write batches (one per chunk of blocks a save seals) that may wait; more are
    /// dropped. Default: 8.
    pub write_queue_depth: usize,
    /// Prefetch batches (one per query) that may wait; more are not started. Default: 2.
    pub prefetch_queue_depth: usize,
    /// Block writes at once. Default: 2.
    pub write_inflight: usize,
    /// Block reads at once. Default: 16.
    pub prefetch_inflight: usize,
    /// Blocks being copied up at most (backpressure on queries). Default: 800.
    pub max_prefetch_blocks: usize,
}

impl Default for SsdConfig {
    fn default() -> Self {
        Self {
            paths: Vec::new(),
            capacity: 512 << 30,
            write_queue_depth: 8,
            prefetch_queue_depth: 2,
            write_inflight: 2,
            prefetch_inflight: 16,
            max_prefetch_blocks: 800,
        }
    }
}

/// What the tier's threads share with the engine.
struct Shared {
    files: Vec<RwLock<BlockFile>>,
    recovery: Recovery,
    /// Pool bytes pinned by queued or running writes.
    pinned: AtomicU64,
    index: Mutex<SsdIndex>,
    cache: Arc<Mutex<BlockCache>>,
    pool: Arc<HostPool>,
    metrics: Arc<EngineMetrics>,
}

/// The SSD tier: its files, index and I/O threads.
pub(super) struct SsdTier {
    shared: Arc<Shared>,
    writes: Option<SyncSender<Vec<PinnedBlock>>>,
    prefetches: Option<SyncSender<Vec<BlockKey>>>,
    max_prefetch_blocks: usize,
    /// Pool bytes writes may pin at once.
    max_pinned: u64,
    threads: Vec<JoinHandle<()>>,
}

/// Where the replay of the cache paths' indexes stands.
#[derive(Default)]
struct Recovery {
    /// `None` while replaying; then whether it succeeded.
    done: Mutex<Option<bool>>,
    changed: parking_lot::Condvar,
}

impl Recovery {
    fn finish(&self, ok: bool, metrics: &EngineMetrics) {
        metrics.ssd.recovering.set(0);
        *self.done.lock() = Some(ok);
        self.changed.notify_all();
    }

    /// Waits for the replay; whether the tier can be used.
    fn wait(&self) -> bool {
        let mut done = self.done.lock();
        while done.is_none() {
            self.changed.wait(&mut done);
        }
        done.unwrap_or(false)
    }
}

/// Replays every cache path's index log into the tier's index, then lets writes in.
fn recover(shared: &Shared) {
    let started = Instant::now();
    let mut index = SsdIndex::new(&vec![(0, u64::MAX); shared.files.len()]);
    for (number, file) in shared.files.iter().enumerate() {
        let mut file = file.write();
        let replayed = file.recover(|put| {
            let (Some(part), Some(layout)) = (PartId::from_u32(put.part), index.layout_id(put.layout, put.len)) else {
                return;
            };
            let loc =
                PartLoc { position: put.offset, checksum: put.checksum, len: put.len, file: number as u16, layout };
            index.insert_replayed(put.namespace, put.hash, part, loc);
        });
        if let Err(e) = replayed {
            tracing::error!(error = %e, "SSD index cannot be replayed: the SSD tier is off");
            shared.recovery.finish(false, &shared.metrics);
            return;
        }
        index.set_file(number as u16, file.head(), file.capacity());
    }
    let blocks = index.len();
    *shared.index.lock() = index;
    shared.metrics.ssd.recovered_blocks.set(blocks as i64);
    shared.metrics.ssd.blocks.set(blocks as i64);
    tracing::info!(
        paths = shared.files.len(),
        blocks,
        seconds = started.elapsed().as_secs_f64(),
        "SSD index recovered"
    );
    shared.recovery.finish(true, &shared.metrics);
}

/// Share of the pool that blocks waiting for their SSD write may hold (pinned, they
/// cannot be evicted): a save always finds the rest of the pool evictable.
const WRITE_PIN_SHARE: u64 = 8;

impl SsdTier {
    /// Opens every cache path (a bad path, a locked one or one without room fails here)
    /// and starts the I/O threads; the indexes are replayed in the background (the
    /// server serves meanwhile: SSD lookups miss and writes wait until it is done).
    pub fn open(
        config: &SsdConfig,
        cache: Arc<Mutex<BlockCache>>,
        pool: Arc<HostPool>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<Self, SsdError> {
        if config.paths.is_empty() || config.paths.len() > usize::from(u8::MAX) {
            return Err(SsdError::Config(format!("{} cache paths (1 to 255)", config.paths.len())));
        }
        let each = config.capacity / config.paths.len() as u64;
        let files =
            config.paths.iter().map(|p| BlockFile::prepare(p, each).map(RwLock::new)).collect::<Result<Vec<_>, _>>()?;
        metrics.ssd.capacity_bytes.set(files.iter().map(|f| f.read().capacity()).sum::<u64>() as i64);
        metrics.ssd.recovering.set(1);
        let index = SsdIndex::new(&vec![(0, u64::MAX); files.len()]);
        let max_pinned = pool.len() / WRITE_PIN_SHARE;
        let shared = Arc::new(Shared {
            files,
            recovery: Recovery::default(),
            pinned: AtomicU64::new(0),
            index: Mutex::new(index),
            cache,
            pool,
            metrics,
        });
        let (writes, write_rx) = sync_channel(config.write_queue_depth.max(1));
        let (prefetches, prefetch_rx) = sync_channel(config.prefetch_queue_depth.max(1));
        let mut threads = Vec::new();
        let recovering = Arc::clone(&shared);
        threads.push(spawn_io_thread("pegaflow-ssd-recover", move || recover(&recovering))?);
        // One writer, `write_inflight` writes in flight through its ring.
        let (writer, depth) = (Arc::clone(&shared), config.write_inflight.max(1) as u32);
        threads.push(spawn_io_thread("pegaflow-ssd-write", move || {
            let mut engine = IoEngine::new(depth, true);
            while let Ok(batch) = write_rx.recv() {
                write_batch(&writer, &mut engine, batch);
            }
        })?);
        // One reader, `prefetch_inflight` reads in flight through its ring.
        let (reader, depth) = (Arc::clone(&shared), config.prefetch_inflight.max(1) as u32);
        threads.push(spawn_io_thread("pegaflow-ssd-read", move || {
            let mut engine = IoEngine::new(depth, true);
            while let Ok(keys) = prefetch_rx.recv() {
                prefetch_batch(&reader, &mut engine, keys);
            }
        })?);
        Ok(Self {
            shared,
            writes: Some(writes),
            prefetches: Some(prefetches),
            max_prefetch_blocks: config.max_prefetch_blocks.max(1),
            max_pinned,
            threads,
        })
    }

    /// Queues blocks just sealed in `cache` for writing (those not on the SSD already).
    /// They stay pinned until written, within an eighth of the pool; a full queue or the
    /// pin budget drops the rest, counted.
    pub fn write_sealed(&self, cache: &mut BlockCache, sealed: Vec<BlockKey>) {
        let Some(writes) = &self.writes else { return };
        let fresh: Vec<BlockKey> = {
            let index = self.shared.index.lock();
            sealed.into_iter().filter(|k| !index.is_whole(k)).collect()
        };
        if fresh.is_empty() {
            return;
        }
        let metrics = &self.shared.metrics.ssd;
        let asked = fresh.len();
        let room = self.max_pinned.saturating_sub(self.shared.pinned.load(Ordering::Acquire));
        let batch = cache.pin_sealed(fresh, room);
        let bytes: u64 = batch.iter().map(PinnedBlock::bytes).sum();
        metrics.dropped_writes.inc_by((asked - batch.len()) as u64);
        if batch.is_empty() {
            return;
        }
        self.shared.pinned.fetch_add(bytes, Ordering::AcqRel);
        match writes.try_send(batch) {
            Ok(()) => {
                metrics.write_queue_batches.inc();
            }
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                metrics.dropped_writes.inc_by(batch.len() as u64);
                cache.unpin_blocks(batch.iter().map(|b| &b.key));
                self.shared.pinned.fetch_sub(bytes, Ordering::AcqRel);
            }
        }
    }

    /// For the blocks of a query past its RAM hits (`hashes`): starts copying up the run
    /// of them stored whole on the SSD (within the prefetch budget). `Some(started)` when
    /// the first of them is on its way into the pool (the query then answers "loading"),
    /// with the number of blocks this call started; `None` when it is not.
    pub fn prefetch(&self, namespace: &Arc<str>, hashes: &[BlockHash]) -> Option<usize> {
        let prefetches = self.prefetches.as_ref()?;
        let mut index = self.shared.index.lock();
        let mut run = Vec::new();
        let mut first_on_its_way = false;
        for (i, hash) in hashes.iter().enumerate() {
            let key = BlockKey { namespace: Arc::clone(namespace), hash: *hash };
            if index.is_prefetching(&key) {
                first_on_its_way |= i == 0;
                continue;
            }
            if !index.is_whole(&key) || index.prefetching() >= self.max_prefetch_blocks {
                break;
            }
            index.start_prefetch(&key);
            first_on_its_way |= i == 0;
            run.push(key);
        }
        let started = run.len();
        if !run.is_empty()
            && let Err(TrySendError::Full(run) | TrySendError::Disconnected(run)) = prefetches.try_send(run)
        {
            // Too many prefetches waiting: these blocks stay a miss for now.
            for key in &run {
                index.end_prefetch(key);
            }
            let first = hashes.first().map(|h| BlockKey { namespace: Arc::clone(namespace), hash: *h });
            first_on_its_way = first.is_some_and(|key| index.is_prefetching(&key));
            self.shared.metrics.ssd.prefetching_blocks.set(index.prefetching() as i64);
            return first_on_its_way.then_some(0);
        }
        self.shared.metrics.ssd.prefetching_blocks.set(index.prefetching() as i64);
        first_on_its_way.then_some(started)
    }
}

impl Drop for SsdTier {
    fn drop(&mut self) {
        // Closing the queues ends the threads once they finish what they hold.
        self.writes.take();
        self.prefetches.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn_io_thread(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, SsdError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map_err(|e| SsdError::Config(format!("cannot start SSD threads: {e}")))
}

/// Logs the first SSD I/O error (later ones only count: a failing disk would flood the
/// log).
fn warn_once(error: &SsdError) {
    static LOGGED: OnceLock<()> = OnceLock::new();
    if LOGGED.set(()).is_ok() {
        tracing::warn!(error = %error, "SSD I/O failed; further failures are counted in pegaflow_ssd_io_errors");
    }
}
