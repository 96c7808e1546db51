//! Per-device, per-direction copy workers: a thread with the device's context current,
//! its own streams (one for DMA, one for the gather/scatter kernel), and two staging slots
//! so the kernel of one chunk overlaps the DMA of the previous one.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{info, warn};

use super::ce_gather::CeGather;
use super::driver::{Context, DeviceBuffer, Event, PinnedBuffer, Result, Stream};
use super::host_ptr;
use super::kernel::CopyKernel;
use super::lanes::{BatchArrays, Lanes};
use super::pace::{Pacer, SavePace, groups};
use super::plan::{Chunk, DIRECT_MAX_SEGMENTS, Segment, Strategy, choose, pieces, plan_staged};
use crate::device::{CopyDone, DeviceError, DeviceRegion, Direction};
use crate::memory::HostPool;
use pegaflow_common::spin::recv_spinning;

/// Kernel table entries per chunk.
const MAX_TABLE: usize = 8192;
const ENTRY_BYTES: u64 = 24;

/// Staging and kernel settings. Defaults come from measurements on the H100
/// (docs/benchmarks.md); `PEGAFLOW_CUDA_{STRATEGY,LANES,SLOT_MB,SLOTS,MAX_DMA_MB}` override them.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// Bytes of one staging slot.
    slot_bytes: u64,
    /// Staging slots in flight (pipeline depth).
    slots: usize,
    /// Forces a strategy (`PEGAFLOW_CUDA_STRATEGY=direct|batched|staged|ce-gather`); `None` chooses
    /// per request.
    force: Option<Strategy>,
    /// Batched-copy lanes (threads with their own stream). Default 8: measured 13.4–13.9 ms
    /// for 16,384 × 32 KiB on the H100, against 19–21 ms for one lane.
    lanes: usize,
    /// Largest single DMA of a direct copy, in bytes (0: as large as the run). Opt-in
    /// (`PEGAFLOW_CUDA_MAX_DMA_MB`) until measured: whether the engine's own copies wait
    /// less behind ours, against the per-DMA cost.
    max_dma_bytes: u64,
    /// Saves issued in paced pieces (`PEGAFLOW_CUDA_SAVE_GBPS`, `PEGAFLOW_CUDA_SAVE_PIECE_MB`);
    /// `None`: as fast as the link takes them.
    save_pace: Option<SavePace>,
}

impl Tuning {
    fn from_env() -> Self {
        let var = |name: &str, default: u64| -> u64 {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|v| *v > 0).unwrap_or(default)
        };
        Self {
            slot_bytes: var("PEGAFLOW_CUDA_SLOT_MB", 32) << 20,
            slots: var("PEGAFLOW_CUDA_SLOTS", 2).clamp(2, 16) as usize,
            force: match std::env::var("PEGAFLOW_CUDA_STRATEGY").as_deref() {
                Ok("direct") => Some(Strategy::Direct),
                Ok("batched") => Some(Strategy::Batched),
                Ok("staged") => Some(Strategy::Staged),
                Ok("ce-gather") => Some(Strategy::CeGather),
                _ => None,
            },
            lanes: var("PEGAFLOW_CUDA_LANES", 8).clamp(1, 64) as usize,
            max_dma_bytes: var("PEGAFLOW_CUDA_MAX_DMA_MB", 0) << 20,
            save_pace: SavePace::from_values(
                std::env::var("PEGAFLOW_CUDA_SAVE_GBPS").ok().as_deref(),
                std::env::var("PEGAFLOW_CUDA_SAVE_PIECE_MB").ok().as_deref(),
            ),
        }
    }
}

/// One request for a worker.
pub(crate) struct CopyRequest {
    pub pool: Arc<HostPool>,
    pub segments: Vec<Segment>,
    /// Keeps the device mappings alive until the copy is done.
    pub _regions: Vec<Arc<dyn DeviceRegion>>,
    pub done: CopyDone,
}

/// A worker thread for one direction of one device.
pub(crate) struct Worker {
    tx: Mutex<Option<mpsc::Sender<CopyRequest>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Starts the worker; after each job it polls for the next one for `spin` before it
    /// sleeps (a sleeping thread costs 0.05–0.15 ms to wake on some hosts, while the link
    /// idles).
    pub fn start(
        ctx: Arc<Context>,
        ordinal: i32,
        direction: Direction,
        driver_version: i32,
        spin: Duration,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<CopyRequest>();
        let name = format!("pegaflow-cuda{ordinal}-{}", if direction == Direction::Save { "save" } else { "load" });
        let tuning = Tuning::from_env();
        // cuMemcpyBatchAsync_v2 exists from CUDA 13.0 drivers on.
        let lanes = if driver_version >= 13000 { Some(Lanes::start(&ctx, tuning.lanes, &name)?) } else { None };
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let engine = ctx.bind().and_then(|()| CopyEngine::new(&ctx, direction, tuning, lanes));
            serve(engine, &rx, spin);
        })?;
        Ok(Self { tx: Mutex::new(Some(tx)), handle: Mutex::new(Some(handle)) })
    }

    pub fn submit(&self, request: CopyRequest) {
        let undelivered = match self.tx.lock().as_ref() {
            Some(tx) => tx.send(request).err().map(|e| e.0),
            None => Some(request),
        };
        if let Some(request) = undelivered {
            (request.done)(Err(DeviceError::ShutDown("cuda")));
        }
    }
}

/// A request whose DMAs are queued on the worker's stream, done when `event` is.
struct Queued {
    event: Event,
    regions: Vec<Arc<dyn DeviceRegion>>,
    done: CopyDone,
}

impl Queued {
    fn finish(self) {
        let result = self.event.synchronize();
        // Release the mappings before reporting: the caller may unregister next.
        drop(self.regions);
        (self.done)(result);
    }
}

/// What came first while a request's DMAs run.
enum Next {
    Request(CopyRequest),
    Finished,
    Closed,
}

/// Waits up to `spin` for the queued request to finish or the next request to arrive,
/// whichever comes first; past `spin`, only for the queued request (so a long copy does
/// not keep a CPU busy).
fn next_while_copying(rx: &mpsc::Receiver<CopyRequest>, queued: &Queued, spin: Duration) -> Next {
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(request) => return Next::Request(request),
            Err(mpsc::TryRecvError::Disconnected) => return Next::Closed,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        // An error reading the event is reported by `finish`.
        if queued.event.is_done().unwrap_or(true) || start.elapsed() >= spin {
            return Next::Finished;
        }
        std::thread::yield_now();
    }
}

/// The worker's loop. A request of plain DMAs (direct or one batched call) is queued on
/// the DMA stream and the next request is taken while it runs: queued behind it, its
/// DMAs start the moment the previous ones end, instead of after a wake-up and the next
/// request's preparation (measured on the H200: 32 MiB requests back to back moved at
/// ~47 GB/s one at a time).
fn serve(mut engine: Result<CopyEngine>, rx: &mpsc::Receiver<CopyRequest>, spin: Duration) {
    let mut queued: Option<Queued> = None;
    loop {
        let request = match &queued {
            None => match recv_spinning(rx, spin) {
                Ok(request) => request,
                Err(_) => break,
            },
            Some(running) => match next_while_copying(rx, running, spin) {
                Next::Request(request) => request,
                Next::Finished => {
                    finish(queued.take());
                    continue;
                }
                Next::Closed => break,
            },
        };
        let CopyRequest { pool, segments, _regions: regions, done } = request;
        let engine = match &mut engine {
            Ok(engine) => engine,
            Err(e) => {
                drop(regions);
                done(Err(DeviceError::Cuda(format!("copy worker unavailable: {e}"))));
                continue;
            }
        };
        match engine.queue(&pool, &segments) {
            Some(Ok(event)) => {
                // The previous request ends first (same stream); report it, keep this one.
                finish(queued.replace(Queued { event, regions, done }));
            }
            Some(Err(e)) => {
                finish(queued.take());
                // Part of the request may be queued: drain before the slots are reused.
                engine.drain();
                drop(regions);
                done(Err(e));
            }
            None => {
                finish(queued.take());
                let result = engine.run(&pool, segments);
                drop(regions);
                done(result);
            }
        }
    }
    finish(queued.take());
}

fn finish(queued: Option<Queued>) {
    if let Some(queued) = queued {
        queued.finish();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx.lock().take();
        if let Some(handle) = self.handle.lock().take()
            && handle.thread().id() != std::thread::current().id()
        {
            // (The last reference may be dropped by the worker's own last request; the
            // thread then ends by itself once the channel is closed.)
            let _ = handle.join();
        }
    }
}

struct Slot {
    staging: DeviceBuffer,
    table: PinnedBuffer,
    device_table: DeviceBuffer,
    kernel_done: Event,
    dma_done: Event,
}

struct CopyEngine {
    direction: Direction,
    dma: Stream,
    compute: Stream,
    cc: (i32, i32),
    tuning: Tuning,
    /// Batched-copy lanes, when the driver has the batched copy.
    lanes: Option<Lanes>,
    /// Staging slots and kernel, made on first staged request; `Err` disables staging.
    staged: Option<std::result::Result<(CopyKernel, Vec<Slot>), String>>,
    /// Copy-engine gather slots, made on first use; `Err` disables the strategy.
    ce: Option<std::result::Result<CeGather, String>>,
    /// Paces saves when set (the save worker only): every save goes through it.
    pacer: Option<Pacer>,
}

impl CopyEngine {
    fn new(ctx: &Context, direction: Direction, tuning: Tuning, lanes: Option<Lanes>) -> Result<Self> {
        Ok(Self {
            direction,
            dma: Stream::new()?,
            compute: Stream::new()?,
            cc: ctx.compute_capability()?,
            tuning,
            lanes,
            staged: None,
            ce: None,
            pacer: tuning.save_pace.filter(|_| direction == Direction::Save).map(Pacer::new),
        })
    }

    fn run(&mut self, pool: &HostPool, segments: Vec<Segment>) -> Result<()> {
        if segments.is_empty() {
            return Ok(());
        }
        if let Some(mut pacer) = self.pacer.take() {
            let result = self.run_paced(&mut pacer, pool, &segments);
            self.pacer = Some(pacer);
            return result;
        }
        let started = std::time::Instant::now();
        let (count, bytes) = (segments.len(), segments.iter().map(|s| s.len).sum::<u64>());
        let strategy = match self.tuning.force.unwrap_or_else(|| choose(&segments, self.lanes.is_some())) {
            Strategy::Batched if self.lanes.is_some() => Strategy::Batched,
            Strategy::CeGather if self.ce_ready() => Strategy::CeGather,
            Strategy::Batched | Strategy::Staged if self.staging_ready() => Strategy::Staged,
            _ => Strategy::Direct,
        };
        let result = match (strategy, &self.lanes) {
            (Strategy::Batched, Some(lanes)) => {
                let to_host = self.direction == Direction::Save;
                match lanes.lanes_for(&segments) {
                    // One lane: on this thread's own stream, without a hand-over (two
                    // thread wake-ups per request, each idling the link).
                    1 => BatchArrays::new(pool, &segments, to_host).and_then(|mut batch| batch.run_on(&self.dma)),
                    n => lanes.run(pool, &segments, to_host, n),
                }
            }
            (Strategy::Staged, _) => self.run_staged(pool, segments),
            (Strategy::CeGather, _) => match &self.ce {
                Some(Ok(ce)) => ce.run(pool, segments, self.direction),
                _ => Err(DeviceError::Cuda("copy-engine gather not initialised".into())),
            },
            _ => self.run_direct(pool, &segments),
        };
        tracing::debug!(
            direction = ?self.direction, ?strategy, segments = count, bytes,
            micros = started.elapsed().as_micros() as u64, "cuda copy"
        );
        if result.is_err() {
            // Drain whatever was queued before reporting, so no buffer is reused mid-copy.
            let _ = self.dma.synchronize();
            let _ = self.compute.synchronize();
        }
        result
    }

    /// Queues `segments` on the DMA stream without waiting, when the request goes as plain
    /// DMAs from this thread (direct, or one batched call); returns the event that marks
    /// its end. `None`: the request needs [`Self::run`].
    fn queue(&mut self, pool: &HostPool, segments: &[Segment]) -> Option<Result<Event>> {
        if segments.is_empty() || self.tuning.force.is_some() || self.pacer.is_some() {
            return None;
        }
        let to_host = self.direction == Direction::Save;
        tracing::debug!(direction = ?self.direction, segments = segments.len(), "cuda copy queued");
        let queued = match (choose(segments, self.lanes.is_some()), &self.lanes) {
            (Strategy::Direct, _) => self.queue_direct(pool, segments),
            (Strategy::Batched, Some(lanes)) if lanes.lanes_for(segments) == 1 => {
                BatchArrays::new(pool, segments, to_host).and_then(|mut batch| batch.queue_on(&self.dma))
            }
            _ => return None,
        };
        Some(queued.and_then(|()| {
            let event = Event::new()?;
            event.record(&self.dma)?;
            Ok(event)
        }))
    }

    /// Waits for everything queued on this engine's streams.
    fn drain(&self) {
        let _ = self.dma.synchronize();
        let _ = self.compute.synchronize();
    }

    fn ce_ready(&mut self) -> bool {
        if self.ce.is_none() {
            let made = CeGather::new(self.tuning.slots, self.tuning.slot_bytes, self.lanes.is_some());
            match &made {
                Ok(_) => info!(direction = ?self.direction, tuning = ?self.tuning, "copy-engine gather ready"),
                Err(e) => warn!(error = %e, "copy-engine gather unavailable; using direct DMAs"),
            }
            self.ce = Some(made.map_err(|e| e.to_string()));
        }
        matches!(self.ce, Some(Ok(_)))
    }

    fn staging_ready(&mut self) -> bool {
        if self.staged.is_none() {
            let made = (|| -> Result<_> {
                let kernel = CopyKernel::load(self.cc)?;
                let slot = || -> Result<Slot> {
                    Ok(Slot {
                        staging: DeviceBuffer::new(self.tuning.slot_bytes)?,
                        table: PinnedBuffer::new(MAX_TABLE as u64 * ENTRY_BYTES)?,
                        device_table: DeviceBuffer::new(MAX_TABLE as u64 * ENTRY_BYTES)?,
                        kernel_done: Event::new()?,
                        dma_done: Event::new()?,
                    })
                };
                let slots = (0..self.tuning.slots).map(|_| slot()).collect::<Result<Vec<_>>>()?;
                Ok((kernel, slots))
            })();
            match &made {
                Ok(_) => info!(direction = ?self.direction, tuning = ?self.tuning, "GPU staging ready"),
                Err(e) => warn!(error = %e, "GPU staging unavailable; falling back to one DMA per segment"),
            }
            self.staged = Some(made.map_err(|e| e.to_string()));
        }
        matches!(self.staged, Some(Ok(_)))
    }

    /// A save in groups of the pace's piece size, each issued when the pacer allows (plain
    /// DMAs, or one batched call for a group of many small segments), then waited for.
    fn run_paced(&self, pacer: &mut Pacer, pool: &HostPool, segments: &[Segment]) -> Result<()> {
        let started = std::time::Instant::now();
        let groups = groups(segments, pacer.pace().piece_bytes);
        let queued = groups.iter().try_for_each(|group| {
            pacer.wait_turn();
            if group.len() > DIRECT_MAX_SEGMENTS && self.lanes.is_some() {
                BatchArrays::new(pool, group, true)?.queue_on(&self.dma)?;
            } else {
                self.queue_direct(pool, group)?;
            }
            pacer.issued(std::time::Instant::now(), group.iter().map(|s| s.len).sum());
            Ok(())
        });
        // Also after an error: part of the save may be in flight.
        let drained = self.dma.synchronize();
        tracing::debug!(
            groups = groups.len(),
            segments = segments.len(),
            micros = started.elapsed().as_micros() as u64,
            "cuda paced save"
        );
        queued.and(drained)
    }

    fn run_direct(&self, pool: &HostPool, segments: &[Segment]) -> Result<()> {
        let queued = self.queue_direct(pool, segments);
        let drained = self.dma.synchronize();
        queued.and(drained)
    }

    /// One DMA per segment on the DMA stream; the caller waits for the stream.
    fn queue_direct(&self, pool: &HostPool, segments: &[Segment]) -> Result<()> {
        for s in segments.iter().flat_map(|s| pieces(*s, self.tuning.max_dma_bytes)) {
            let host = host_ptr(pool, s.host_offset, s.len)?;
            // SAFETY: `host` is inside the pool (checked) and owned by this job until done;
            // the device range is inside a live registered region (engine-validated).
            unsafe {
                match self.direction {
                    Direction::Save => self.dma.copy_to_host(host, s.device_ptr, s.len)?,
                    Direction::Load => self.dma.copy_to_device(s.device_ptr, host, s.len)?,
                }
            }
        }
        Ok(())
    }

    fn run_staged(&self, pool: &HostPool, segments: Vec<Segment>) -> Result<()> {
        let Some(Ok((kernel, slots))) = &self.staged else {
            return Err(DeviceError::Cuda("staging not initialised".into()));
        };
        let chunks = plan_staged(segments, self.tuning.slot_bytes, MAX_TABLE);
        let depth = slots.len();
        for (i, chunk) in chunks.iter().enumerate() {
            let slot = &slots[i % depth];
            match self.direction {
                Direction::Save => {
                    if i >= depth {
                        slot.dma_done.synchronize()?; // chunk i-2 left this slot
                    }
                    self.launch(kernel, slot, chunk)?;
                    slot.kernel_done.record(&self.compute)?;
                    self.dma.wait(&slot.kernel_done)?;
                    for d in &chunk.dmas {
                        let host = host_ptr(pool, d.host_offset, d.len)?;
                        // SAFETY: pool range checked and owned by the job; the staging range is
                        // inside the slot and filled by the kernel this stream waited for.
                        unsafe { self.dma.copy_to_host(host, slot.staging.ptr + d.staging_offset, d.len)? };
                    }
                    slot.dma_done.record(&self.dma)?;
                }
                Direction::Load => {
                    if i >= depth {
                        slot.kernel_done.synchronize()?; // chunk i-2's scatter read this slot
                    }
                    for d in &chunk.dmas {
                        let host = host_ptr(pool, d.host_offset, d.len)?;
                        // SAFETY: as above, in the other direction.
                        unsafe { self.dma.copy_to_device(slot.staging.ptr + d.staging_offset, host, d.len)? };
                    }
                    slot.dma_done.record(&self.dma)?;
                    self.compute.wait(&slot.dma_done)?;
                    self.launch(kernel, slot, chunk)?;
                    slot.kernel_done.record(&self.compute)?;
                }
            }
        }
        match self.direction {
            Direction::Save => self.dma.synchronize(),
            Direction::Load => self.compute.synchronize(),
        }
    }

    /// Writes the chunk's table (device ↔ staging) and launches the kernel on the compute
    /// stream. The slot's table is free: the caller waited for its previous use.
    fn launch(&self, kernel: &CopyKernel, slot: &Slot, chunk: &Chunk) -> Result<()> {
        let n = chunk.segments.len();
        // SAFETY: the pinned table holds MAX_TABLE entries and the plan never puts more in
        // a chunk; no copy reads it now (the caller synchronised its previous use).
        let table = unsafe { std::slice::from_raw_parts_mut(slot.table.ptr.as_ptr().cast::<u64>(), 3 * n) };
        for (entry, s) in table.chunks_exact_mut(3).zip(&chunk.segments) {
            let staging = slot.staging.ptr + s.staging_offset;
            let (src, dst) = match self.direction {
                Direction::Save => (s.device_ptr, staging),
                Direction::Load => (staging, s.device_ptr),
            };
            entry.copy_from_slice(&[src, dst, s.len]);
        }
        // SAFETY: the table is pinned and stays untouched until this stream passes the
        // upload (guaranteed by the slot's events); every entry is a live device range.
        unsafe {
            self.compute.copy_to_device(slot.device_table.ptr, slot.table.ptr, n as u64 * ENTRY_BYTES)?;
            let longest = chunk.segments.iter().map(|s| s.len).max().unwrap_or(0);
            kernel.launch(&self.compute, slot.device_table.ptr, n as u32, longest)
        }
    }
}
