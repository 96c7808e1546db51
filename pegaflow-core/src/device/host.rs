//! The host backend: "device" memory is a sealed memfd the client maps too; copies
//! are memcpy on worker threads, one pool of threads per direction so saves and loads
//! progress concurrently. A large job is split across the direction's threads.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tracing::debug;

use super::{CopyDone, CopyJob, CopyOp, DeviceBackend, DeviceError, DeviceRegion, Direction, RegionSource};
use crate::memory::HostPool;
use pegaflow_common::shm::SharedMemory;

/// Jobs smaller than this run on one thread (splitting costs more than it saves).
const SPLIT_THRESHOLD: u64 = 4 << 20;

/// Settings of the host backend.
#[derive(Debug, Clone, Copy)]
pub struct HostDeviceOptions {
    /// Copy threads per direction. Default: half the CPUs, between 1 and 8.
    pub copy_threads: usize,
}

impl Default for HostDeviceOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self { copy_threads: (cpus / 2).clamp(1, 8) }
    }
}

/// Client memory mapped by the server. Sealed against shrinking, so every mapped byte
/// stays backed and no copy can fault.
struct HostRegion {
    map: Arc<SharedMemory>,
}

impl DeviceRegion for HostRegion {
    fn len(&self) -> u64 {
        self.map.len()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Host backend. Dropping it finishes queued jobs and joins its threads.
pub struct HostDevice {
    save: Workers,
    load: Workers,
}

impl HostDevice {
    /// Starts the copy threads.
    pub fn new(options: HostDeviceOptions) -> std::io::Result<Self> {
        let threads = options.copy_threads.max(1);
        Ok(Self { save: Workers::start("save", threads)?, load: Workers::start("load", threads)? })
    }
}

impl DeviceBackend for HostDevice {
    fn name(&self) -> &'static str {
        "host"
    }

    fn handles(&self, source: &RegionSource) -> bool {
        matches!(source, RegionSource::HostMemory(_))
    }

    fn open_region(&self, source: &RegionSource) -> Result<Arc<dyn DeviceRegion>, DeviceError> {
        match source {
            RegionSource::HostMemory(memory) => Ok(Arc::new(HostRegion { map: Arc::clone(&memory.0) })),
            other => Err(DeviceError::Unsupported(format!("{other} on the host backend"))),
        }
    }

    fn submit(&self, job: CopyJob, done: CopyDone) {
        let workers = match job.direction {
            Direction::Save => &self.save,
            Direction::Load => &self.load,
        };
        workers.submit(job, done);
    }
}

/// One copy task: a share of a job's ops, each naming its region by index.
struct Task {
    direction: Direction,
    pool: Arc<HostPool>,
    regions: Arc<[Arc<dyn DeviceRegion>]>,
    pieces: Vec<(usize, CopyOp)>,
    join: Arc<JobJoin>,
}

impl Task {
    /// Releases the task's region references, then reports its result: whoever is told
    /// that a job is done may unregister its regions and expect them unmapped.
    fn finish(self, result: Result<(), DeviceError>) {
        let join = self.join;
        drop(self.regions);
        join.finish_one(result);
    }
}

/// Collects the results of a job's tasks and calls `done` after the last one.
struct JobJoin {
    remaining: AtomicUsize,
    error: Mutex<Option<DeviceError>>,
    done: Mutex<Option<CopyDone>>,
}

impl JobJoin {
    fn finish_one(&self, result: Result<(), DeviceError>) {
        if let Err(e) = result {
            self.error.lock().get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let outcome = match self.error.lock().take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            if let Some(done) = self.done.lock().take() {
                done(outcome);
            }
        }
    }
}

struct Workers {
    name: &'static str,
    threads: usize,
    tx: Mutex<Option<mpsc::Sender<Task>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    fn start(name: &'static str, threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let handle = std::thread::Builder::new().name(format!("pegaflow-{name}-{i}")).spawn(move || {
                loop {
                    // Hold the lock only to take one task.
                    let task = rx.lock().recv();
                    match task {
                        Ok(task) => {
                            let result = run_task(&task);
                            task.finish(result);
                        }
                        Err(_) => break,
                    }
                }
            })?;
            handles.push(handle);
        }
        Ok(Self { name, threads, tx: Mutex::new(Some(tx)), handles: Mutex::new(handles) })
    }

    fn submit(&self, job: CopyJob, done: CopyDone) {
        let shares = split(&job, self.threads);
        let join = Arc::new(JobJoin {
            remaining: AtomicUsize::new(shares.len().max(1)),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
        });
        if shares.is_empty() {
            join.finish_one(Ok(()));
            return;
        }
        debug!(workers = self.name, bytes = job.bytes(), tasks = shares.len(), "host copy");
        let regions: Arc<[Arc<dyn DeviceRegion>]> = job.regions.iter().map(|r| Arc::clone(&r.region)).collect();
        // Only the tasks may hold the regions from here on (see `Task::finish`).
        let CopyJob { direction, pool, regions: copies } = job;
        drop(copies);
        let tx = self.tx.lock().clone();
        for pieces in shares {
            let task = Task {
                direction,
                pool: Arc::clone(&pool),
                regions: Arc::clone(&regions),
                pieces,
                join: Arc::clone(&join),
            };
            let undelivered = match &tx {
                Some(tx) => tx.send(task).err().map(|e| e.0),
                None => Some(task),
            };
            if let Some(task) = undelivered {
                task.finish(Err(DeviceError::ShutDown("host")));
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.tx.lock().take();
        for handle in self.handles.lock().drain(..) {
            let _ = handle.join();
        }
    }
}

/// Splits a job into at most `threads` shares of about equal bytes, cutting ops where
/// needed. Small jobs stay whole.
fn split(job: &CopyJob, threads: usize) -> Vec<Vec<(usize, CopyOp)>> {
    let total = job.bytes();
    if total == 0 {
        return Vec::new();
    }
    let shares = if total < SPLIT_THRESHOLD { 1 } else { threads.max(1) as u64 };
    let target = total.div_ceil(shares);
    let mut out = Vec::with_capacity(shares as usize);
    let mut current = Vec::new();
    let mut filled = 0u64;
    for (index, region) in job.regions.iter().enumerate() {
        for op in &region.ops {
            let mut op = *op;
            while op.len > 0 {
                let take = op.len.min(target - filled);
                current.push((index, CopyOp { len: take, ..op }));
                op.device_offset += take;
                op.host_offset += take;
                op.len -= take;
                filled += take;
                if filled == target {
                    out.push(std::mem::take(&mut current));
                    filled = 0;
                }
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn run_task(task: &Task) -> Result<(), DeviceError> {
    for &(index, ref op) in &task.pieces {
        let region = task.regions[index]
            .as_any()
            .downcast_ref::<HostRegion>()
            .ok_or_else(|| DeviceError::Unsupported("a non-host region on the host backend".into()))?;
        let out_of_bounds = || DeviceError::OutOfBounds(format!("{op:?} in a region of {} B", region.map.len()));
        let device = region.map.ptr_at(op.device_offset, op.len).ok_or_else(out_of_bounds)?;
        let host = task.pool.ptr_at(op.host_offset, op.len).ok_or_else(out_of_bounds)?;
        let (src, dst) = match task.direction {
            Direction::Save => (device, host),
            Direction::Load => (host, device),
        };
        // SAFETY: both ranges were bounds-checked above; the engine guarantees that no
        // other copy touches these pool bytes until the job completes, and the pool and
        // the region mapping are distinct allocations, so the ranges do not overlap.
        // Device bytes may be written concurrently by the client (its own race).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), op.len as usize) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PoolOptions;

    fn region_with(bytes: &[u8]) -> Arc<dyn DeviceRegion> {
        let map = Arc::new(SharedMemory::create("pegaflow-test", bytes.len() as u64).unwrap());
        // SAFETY: the fresh mapping is exactly bytes.len() long and private to the test.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.ptr_at(0, 1).unwrap().as_ptr(), bytes.len()) };
        Arc::new(HostRegion { map })
    }

    fn run(device: &HostDevice, job: CopyJob) -> Result<(), DeviceError> {
        let (tx, rx) = mpsc::channel();
        device.submit(job, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap()
    }

    #[test]
    fn save_then_load_round_trips_across_split_tasks() {
        let device = HostDevice::new(HostDeviceOptions { copy_threads: 3 }).unwrap();
        let pool = Arc::new(HostPool::new(PoolOptions { size: 16 << 20, use_hugepages: false }).unwrap());
        let len = 10 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let region = region_with(&data);
        let ops = vec![CopyOp { device_offset: 0, host_offset: 4096, len: len as u64 }];
        let job = |direction| CopyJob {
            direction,
            pool: Arc::clone(&pool),
            regions: vec![super::super::RegionCopy { region: Arc::clone(&region), ops: ops.clone() }],
        };
        assert_eq!(split(&job(Direction::Save), 3).len(), 3);
        run(&device, job(Direction::Save)).unwrap();
        // Wipe the device copy, then load it back from the pool.
        let host = region.as_any().downcast_ref::<HostRegion>().unwrap();
        // SAFETY: the mapping is len bytes long and no copy is running.
        unsafe { std::ptr::write_bytes(host.map.ptr_at(0, 1).unwrap().as_ptr(), 0, len) };
        run(&device, job(Direction::Load)).unwrap();
        // SAFETY: as above.
        let back = unsafe { std::slice::from_raw_parts(host.map.ptr_at(0, 1).unwrap().as_ptr(), len) };
        assert!(back == data.as_slice());
    }

    #[test]
    fn out_of_bounds_op_fails_cleanly() {
        let device = HostDevice::new(HostDeviceOptions { copy_threads: 1 }).unwrap();
        let pool = Arc::new(HostPool::new(PoolOptions { size: 1 << 20, use_hugepages: false }).unwrap());
        let region = region_with(&[1u8; 64]);
        let job = CopyJob {
            direction: Direction::Save,
            pool,
            regions: vec![super::super::RegionCopy {
                region,
                ops: vec![CopyOp { device_offset: 32, host_offset: 0, len: 64 }],
            }],
        };
        assert!(matches!(run(&device, job), Err(DeviceError::OutOfBounds(_))));
    }

    #[test]
    fn opens_only_host_memory() {
        let device = HostDevice::new(HostDeviceOptions::default()).unwrap();
        let memory = Arc::new(SharedMemory::create("pegaflow-test", 4096).unwrap());
        let region = device.open_region(&RegionSource::HostMemory(super::super::HostMemory(memory))).unwrap();
        assert_eq!(region.len(), 4096);
        let cuda = RegionSource::CudaIpc { handle: [0; 64], device_uuid: [0; 16], offset: 0, size: 1 };
        assert!(!device.handles(&cuda));
        assert!(matches!(device.open_region(&cuda), Err(DeviceError::Unsupported(_))));
    }
}
