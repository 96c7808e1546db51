//! The SSD tier in the engine. A block is written through to the cache paths once it is
//! sealed in the pool (so a crash or restart keeps every block whose write finished, and
//! eviction from the pool costs no I/O); the write queue is bounded and a full queue drops
//! the write, counted, never delaying a save. A query whose prefix continues on the SSD
//! starts copying those blocks up into the pool and answers "loading"; a later query hits
//! them in RAM. At start the cache paths' indexes are replayed, so a restarted server
//! serves what it wrote before. A block that fails its checksum is dropped and is a miss.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use super::metrics::EngineMetrics;
use super::ssd_metrics::IoLabel;
use crate::cache::{BlockCache, BlockHash, BlockKey, PartGeometry, PinnedBlock, SaveSpec};
use crate::memory::HostPool;
use crate::ssd::{BlockFile, BlockId, PartId, PartLoc, SsdError, SsdIndex};

/// SSD tier settings (the server's `--ssd-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsdConfig {
    /// Cache paths (files or directories); blocks are spread over them by hash.
    pub paths: Vec<PathBuf>,
    /// Bytes over all paths (split evenly). Default: 512 GiB.
    pub capacity: u64,
    /// Write batches (one per save) that may wait; more are dropped. Default: 8.
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
        threads.push(
            std::thread::Builder::new()
                .name("pegaflow-ssd-recover".into())
                .spawn(move || recover(&recovering))
                .map_err(|e| SsdError::Config(format!("cannot start SSD threads: {e}")))?,
        );
        spawn_workers(&mut threads, "pegaflow-ssd-write", config.write_inflight, &shared, write_rx, write_batch)?;
        spawn_workers(
            &mut threads,
            "pegaflow-ssd-read",
            config.prefetch_inflight,
            &shared,
            prefetch_rx,
            prefetch_batch,
        )?;
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

fn spawn_workers<T: Send + 'static>(
    threads: &mut Vec<JoinHandle<()>>,
    name: &str,
    count: usize,
    shared: &Arc<Shared>,
    rx: Receiver<T>,
    work: fn(&Shared, T),
) -> Result<(), SsdError> {
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..count.max(1) {
        let (shared, rx) = (Arc::clone(shared), Arc::clone(&rx));
        let thread = std::thread::Builder::new()
            .name(format!("{name}{i}"))
            .spawn(move || {
                loop {
                    let next = rx.lock().recv();
                    match next {
                        Ok(batch) => work(&shared, batch),
                        Err(_) => break,
                    }
                }
            })
            .map_err(|e| SsdError::Config(format!("cannot start SSD threads: {e}")))?;
        threads.push(thread);
    }
    Ok(())
}

/// The layout fingerprint of a part: xxh3 of its layer sizes.
fn fingerprint(geometry: &PartGeometry) -> u64 {
    let bytes: Vec<u8> = geometry.layer_sizes().iter().flat_map(|b| b.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Which cache path a block goes to.
fn file_of(hash: &BlockHash, files: usize) -> usize {
    let mut head = [0u8; 8];
    head.copy_from_slice(&hash[..8]);
    (u64::from_le_bytes(head) % files.max(1) as u64) as usize
}

/// Writes every part of each pinned block, then unpins it.
fn write_batch(shared: &Shared, batch: Vec<PinnedBlock>) {
    let metrics = &shared.metrics.ssd;
    metrics.write_queue_batches.dec();
    if !shared.recovery.wait() {
        metrics.dropped_writes.inc_by(batch.len() as u64);
        shared.cache.lock().unpin_blocks(batch.iter().map(|b| &b.key));
        shared.pinned.fetch_sub(batch.iter().map(PinnedBlock::bytes).sum(), Ordering::AcqRel);
        return;
    }
    let label = IoLabel { direction: "write" };
    for block in &batch {
        let number = file_of(&block.key.hash, shared.files.len());
        for part in &block.parts {
            let len = part.geometry.total();
            let Some(ptr) = shared.pool.ptr_at(part.offset, len) else { continue };
            // SAFETY: the part lies inside the pool (checked by `ptr_at`) and is pinned and
            // sealed: no save writes it and no eviction frees it until it is unpinned below.
            let data = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len as usize) };
            let (Ok(rank), Ok(of)) = (u16::try_from(part.rank), u16::try_from(block.tp_size)) else { continue };
            let id = BlockId {
                namespace: block.key.namespace.to_string(),
                hash: block.key.hash,
                part: PartId { rank, of }.to_u32(),
                layout: fingerprint(&part.geometry),
            };
            let layout = id.layout;
            let started = Instant::now();
            let written = {
                let mut file = shared.files[number].write();
                file.add_layout(layout, part.geometry.layer_sizes())
                    .and_then(|()| file.write(id, data))
                    .map(|record| (record, file.head()))
            };
            match written {
                Ok((record, head)) => {
                    metrics.io_seconds.get_or_create(&label).observe(started.elapsed().as_secs_f64());
                    metrics.io_bytes.get_or_create(&label).observe(len as f64);
                    let mut index = shared.index.lock();
                    index.advance(number as u16, head);
                    if let Some(layout) = index.layout_id(layout, record.len) {
                        let loc = PartLoc {
                            position: record.offset,
                            checksum: record.checksum,
                            len: record.len,
                            file: number as u16,
                            layout,
                        };
                        index.insert(&block.key, PartId { rank, of }, loc);
                    }
                    metrics.blocks.set(index.len() as i64);
                }
                Err(e) => {
                    metrics.io_errors.get_or_create(&label).inc();
                    warn_once(&e);
                }
            }
        }
    }
    shared.cache.lock().unpin_blocks(batch.iter().map(|b| &b.key));
    shared.pinned.fetch_sub(batch.iter().map(PinnedBlock::bytes).sum(), Ordering::AcqRel);
}

/// Copies each block of `keys` up from the SSD into the pool.
fn prefetch_batch(shared: &Shared, keys: Vec<BlockKey>) {
    for key in &keys {
        let parts = shared.index.lock().whole(key);
        if let Some(parts) = parts
            && promote(shared, key, &parts)
        {
            shared.metrics.ssd.promoted_blocks.inc();
        }
        let mut index = shared.index.lock();
        index.end_prefetch(key);
        shared.metrics.ssd.prefetching_blocks.set(index.prefetching() as i64);
    }
}

/// Reads every part of `key` into newly reserved pool space (as a save would, evicting
/// for room) and seals it. False when some part could not be copied up.
fn promote(shared: &Shared, key: &BlockKey, parts: &[PartLoc]) -> bool {
    let label = IoLabel { direction: "read" };
    let metrics = &shared.metrics.ssd;
    let mut whole = true;
    for (rank, loc) in parts.iter().enumerate() {
        let file = &shared.files[usize::from(loc.file)];
        let Some(fingerprint) = shared.index.lock().layout_fingerprint(loc.layout) else { return false };
        let Some(sizes) = file.read().layout(fingerprint).map(<[u64]>::to_vec) else { return false };
        let geometry = Arc::new(PartGeometry::new(sizes));
        let layers: Vec<u32> = (0..geometry.num_layers()).collect();
        let spec = SaveSpec {
            namespace: &key.namespace,
            hashes: std::slice::from_ref(&key.hash),
            parents: &[],
            rank: rank as u32,
            tp_size: parts.len() as u32,
            geometry: &geometry,
            layers: &layers,
        };
        let prepared = shared
            .cache
            .lock()
            .prepare_save_with(&spec, |cache, victims| super::dispose_victims(&shared.metrics, cache, victims));
        let Ok(ticket) = prepared else { return false };
        let Some(offset) = ticket.first_slot_offset().filter(|_| ticket.slot_count() == layers.len()) else {
            // Already in the pool, being saved, or refused room: nothing to read.
            let mut cache = shared.cache.lock();
            cache.complete_save(ticket, false);
            whole &= cache.is_readable(key);
            continue;
        };
        let len = geometry.total();
        let read = match shared.pool.ptr_at(offset, len) {
            Some(ptr) => {
                // SAFETY: the range lies inside the pool (checked by `ptr_at`) and its slots
                // are reserved for this ticket (being written, pinned): nothing else reads
                // or writes them until the ticket completes below.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len as usize) };
                let started = Instant::now();
                let read = if u64::from(loc.len) == len {
                    file.read().read_at(loc.position, loc.checksum, out)
                } else {
                    Err(SsdError::Config(format!("a {}-byte record for a {len}-byte part", loc.len)))
                };
                metrics.io_seconds.get_or_create(&label).observe(started.elapsed().as_secs_f64());
                metrics.io_bytes.get_or_create(&label).observe(len as f64);
                read
            }
            None => Err(SsdError::Config("a pool range outside the pool".into())),
        };
        let ok = read.is_ok();
        shared.cache.lock().complete_save(ticket, ok);
        if let Err(e) = read {
            match e {
                SsdError::Corrupt { .. } => {
                    metrics.checksum_failures.inc();
                    tracing::warn!(error = %e, "SSD block dropped: it failed its checksum");
                    // Forgotten durably, so a restart does not find it again.
                    let _ = file.write().drop_block(loc.position);
                }
                SsdError::Overwritten(_) => {} // newer blocks took its place: a miss
                _ => {
                    metrics.io_errors.get_or_create(&label).inc();
                    warn_once(&e);
                }
            }
            let mut index = shared.index.lock();
            index.remove_at(key, loc.file, loc.position);
            metrics.blocks.set(index.len() as i64);
            return false;
        }
    }
    whole
}

/// Logs the first SSD I/O error (later ones only count: a failing disk would flood the
/// log).
fn warn_once(error: &SsdError) {
    static LOGGED: OnceLock<()> = OnceLock::new();
    if LOGGED.set(()).is_ok() {
        tracing::warn!(error = %error, "SSD I/O failed; further failures are counted in pegaflow_ssd_io_errors");
    }
}
