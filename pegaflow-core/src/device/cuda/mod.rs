//! The CUDA backend: client KV tensors are opened from CUDA IPC handles, the host pool is
//! page-locked once (`cuMemHostRegister`, whole pool, so no copy straddles two
//! registrations), and every device has a save and a load worker with their own streams.
//!
//! The driver is loaded dynamically: the same binary starts on machines without CUDA and
//! reports a clear error only when a CUDA registration arrives. No CUDA type leaves this
//! module.

mod ce_gather;
mod driver;
mod kernel;
mod lanes;
mod pace;
pub mod plan;
mod worker;

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{info, warn};

use super::{CopyDone, CopyJob, DeviceBackend, DeviceError, DeviceRegion, Direction, RegionSource};
use crate::memory::HostPool;
use driver::{Context, IpcMapping};
use plan::Segment;
use worker::{CopyRequest, Worker};

/// One GPU: its context and its two workers.
struct Gpu {
    ordinal: i32,
    uuid: [u8; 16],
    ctx: Arc<Context>,
    save: Worker,
    load: Worker,
}

struct CudaState {
    gpus: Vec<Arc<Gpu>>,
    driver_version: i32,
}

/// A tensor's memory opened from a CUDA IPC handle.
struct CudaRegion {
    gpu: Arc<Gpu>,
    /// Start of the registered range (allocation base + client offset).
    ptr: u64,
    len: u64,
    mapping: Option<IpcMapping>,
}

impl DeviceRegion for CudaRegion {
    fn len(&self) -> u64 {
        self.len
    }

    fn device_ordinal(&self) -> Option<i32> {
        Some(self.gpu.ordinal)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        // cuIpcCloseMemHandle needs the owning context current on this thread.
        if self.gpu.ctx.bind().is_ok() {
            self.mapping.take();
        } else {
            warn!(gpu = self.gpu.ordinal, "cannot bind the context to close an IPC mapping");
            std::mem::forget(self.mapping.take());
        }
    }
}

/// The pool address of `len` bytes at `offset`, or an out-of-bounds error.
fn host_ptr(pool: &HostPool, offset: u64, len: u64) -> Result<std::ptr::NonNull<u8>, DeviceError> {
    pool.ptr_at(offset, len)
        .ok_or_else(|| DeviceError::OutOfBounds(format!("{len} bytes at pool offset {offset} ({} B pool)", pool.len())))
}

/// The CUDA device backend (lazily initialised).
pub struct CudaDevice {
    devices: Vec<u32>,
    /// How long a copy worker polls for the next job before sleeping.
    spin: Duration,
    state: OnceLock<Result<CudaState, String>>,
    pinned: Mutex<Option<Arc<HostPool>>>,
}

impl CudaDevice {
    /// A backend over the devices with these ordinals (all when empty) whose copy
    /// workers poll for `spin` after each job before sleeping. Nothing is loaded until the
    /// first CUDA call.
    pub fn new(devices: Vec<u32>, spin: Duration) -> Self {
        Self { devices, spin, state: OnceLock::new(), pinned: Mutex::new(None) }
    }

    fn state(&self) -> Result<&CudaState, DeviceError> {
        self.state
            .get_or_init(|| {
                // cudarc panics when a driver lacks a symbol; turn that into an error.
                let devices = self.devices.clone();
                let spin = self.spin;
                let state = std::panic::catch_unwind(move || init(&devices, spin))
                    .unwrap_or_else(|_| Err("the CUDA driver lacks a required function".into()));
                match &state {
                    Ok(s) => info!(gpus = s.gpus.len(), driver = s.driver_version, "CUDA backend ready"),
                    Err(e) => info!(reason = %e, "CUDA backend unavailable"),
                }
                state
            })
            .as_ref()
            .map_err(|e| DeviceError::Unsupported(format!("CUDA memory: {e}")))
    }
}

/// Loads the driver and starts the workers of the selected devices.
fn init(filter: &[u32], spin: Duration) -> Result<CudaState, String> {
    if !driver::driver_present() {
        return Err("no CUDA driver (libcuda.so) on this machine".into());
    }
    let devices = driver::init_devices().map_err(|e| e.to_string())?;
    let driver_version = driver::driver_version().map_err(|e| e.to_string())?;
    let mut gpus = Vec::new();
    for (ordinal, uuid) in devices {
        if !filter.is_empty() && !filter.contains(&(ordinal as u32)) {
            continue;
        }
        let ctx = Arc::new(Context::retain(ordinal).map_err(|e| e.to_string())?);
        let worker = |direction| {
            Worker::start(Arc::clone(&ctx), ordinal, direction, driver_version, spin).map_err(|e| e.to_string())
        };
        gpus.push(Arc::new(Gpu { ordinal, uuid, save: worker(Direction::Save)?, load: worker(Direction::Load)?, ctx }));
    }
    if gpus.is_empty() {
        return Err(format!("no CUDA device matches --devices {filter:?}"));
    }
    Ok(CudaState { gpus, driver_version })
}

impl DeviceBackend for CudaDevice {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn handles(&self, source: &RegionSource) -> bool {
        matches!(source, RegionSource::CudaIpc { .. })
    }

    fn open_region(&self, source: &RegionSource) -> Result<Arc<dyn DeviceRegion>, DeviceError> {
        let RegionSource::CudaIpc { handle, device_uuid, offset, size } = source else {
            return Err(DeviceError::Unsupported(format!("{source} on the CUDA backend")));
        };
        let state = self.state()?;
        let gpu = state.gpus.iter().find(|g| g.uuid == *device_uuid).ok_or_else(|| {
            let uuid: String = device_uuid.iter().map(|b| format!("{b:02x}")).collect();
            DeviceError::Unsupported(format!("no GPU with UUID {uuid} is served by this server"))
        })?;
        gpu.ctx.bind()?;
        let mapping = IpcMapping::open(handle)?;
        let end = offset.checked_add(*size).filter(|end| *end <= mapping.alloc_len).ok_or_else(|| {
            DeviceError::OutOfBounds(format!(
                "region of {size} B at offset {offset} exceeds the {} B allocation behind the IPC handle",
                mapping.alloc_len
            ))
        });
        let _ = end?;
        Ok(Arc::new(CudaRegion {
            gpu: Arc::clone(gpu),
            ptr: mapping.base + offset,
            len: *size,
            mapping: Some(mapping),
        }))
    }

    fn submit(&self, job: CopyJob, done: CopyDone) {
        let mut gpu: Option<Arc<Gpu>> = None;
        let mut segments = Vec::new();
        let mut regions = Vec::new();
        let CopyJob { direction, pool, regions: copies } = job;
        for copy in &copies {
            let Some(region) = copy.region.as_any().downcast_ref::<CudaRegion>() else {
                return done(Err(DeviceError::Unsupported("a non-CUDA region on the CUDA backend".into())));
            };
            match &gpu {
                Some(g) if !Arc::ptr_eq(g, &region.gpu) => {
                    return done(Err(DeviceError::Unsupported("one request spans two GPUs".into())));
                }
                Some(_) => {}
                None => gpu = Some(Arc::clone(&region.gpu)),
            }
            for op in &copy.ops {
                if op.device_offset.checked_add(op.len).is_none_or(|end| end > region.len) {
                    return done(Err(DeviceError::OutOfBounds(format!("{op:?} in a {} B region", region.len))));
                }
                segments.push(Segment {
                    device_ptr: region.ptr + op.device_offset,
                    host_offset: op.host_offset,
                    len: op.len,
                });
            }
            regions.push(Arc::clone(&copy.region));
        }
        // Only the request holds the regions from here on: the worker releases them
        // before it reports completion.
        drop(copies);
        let Some(gpu) = gpu else { return done(Ok(())) };
        let request = CopyRequest { pool, segments, _regions: regions, done };
        match direction {
            Direction::Save => gpu.save.submit(request),
            Direction::Load => gpu.load.submit(request),
        }
    }

    fn warm_up(&self) {
        // Initialises the driver and contexts (about a second) while the pool populates.
        let _ = self.state();
    }

    fn pin_pool(&self, pool: &Arc<HostPool>) -> Result<bool, DeviceError> {
        let state = match self.state() {
            Ok(state) => state,
            Err(_) => return Ok(false), // no CUDA here: nothing to pin for
        };
        let base = pool.ptr_at(0, pool.len()).ok_or_else(|| DeviceError::OutOfBounds("empty pool".into()))?;
        state.gpus[0].ctx.bind()?;
        // SAFETY: the pool mapping outlives the registration: we keep an Arc to it and
        // unregister in Drop before releasing it.
        unsafe { driver::host_register(base, pool.len())? };
        *self.pinned.lock() = Some(Arc::clone(pool));
        Ok(true)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let Some(Ok(state)) = self.state.take() else { return };
        let ctx = Arc::clone(&state.gpus[0].ctx);
        // Join the workers first (queued copies finish), then unpin the pool they used.
        drop(state);
        if let Some(pool) = self.pinned.lock().take()
            && ctx.bind().is_ok()
            && let Some(base) = pool.ptr_at(0, pool.len())
        {
            let _ = driver::host_unregister(base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_cuda_registrations_fail_clearly_and_pinning_is_skipped() {
        if driver::driver_present() {
            return; // this test is about machines without CUDA (CI)
        }
        let cuda = CudaDevice::new(Vec::new(), Duration::ZERO);
        let source = RegionSource::CudaIpc { handle: [0; 64], device_uuid: [0; 16], offset: 0, size: 1 };
        assert!(cuda.handles(&source));
        let err = cuda.open_region(&source).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no CUDA driver"), "{err}");
        let pool = Arc::new(HostPool::new(crate::memory::PoolOptions { size: 1 << 20, use_hugepages: false }).unwrap());
        assert!(!cuda.pin_pool(&pool).unwrap());
    }
}
