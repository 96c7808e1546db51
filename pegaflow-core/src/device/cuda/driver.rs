//! The few CUDA driver calls the backend needs, each wrapped once. Every `unsafe` block
//! of the CUDA backend that talks to the driver lives here.

use std::ffi::c_void;
use std::ptr::NonNull;

use cudarc::driver::sys;

use crate::device::DeviceError;

pub(crate) type Result<T> = std::result::Result<T, DeviceError>;

fn check(result: sys::CUresult, what: &str) -> Result<()> {
    result.result().map_err(|e| DeviceError::Cuda(format!("{what}: {e:?}")))
}

/// Whether `libcuda.so` can be loaded on this machine.
pub(crate) fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { sys::is_culib_present() }
}

/// Initialises the driver and lists its devices as (ordinal, uuid).
pub(crate) fn init_devices() -> Result<Vec<(i32, [u8; 16])>> {
    // SAFETY: plain driver calls with valid out-pointers.
    unsafe {
        check(sys::cuInit(0), "cuInit")?;
        let mut count = 0;
        check(sys::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
        let mut out = Vec::new();
        for ordinal in 0..count {
            let mut dev = 0;
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            let mut uuid = std::mem::MaybeUninit::<sys::CUuuid>::uninit();
            check(sys::cuDeviceGetUuid_v2(uuid.as_mut_ptr(), dev), "cuDeviceGetUuid_v2")?;
            let bytes = uuid.assume_init().bytes.map(|b| b as u8);
            out.push((ordinal, bytes));
        }
        Ok(out)
    }
}

/// The driver version as major * 1000 + minor * 10 (e.g. 13000).
pub(crate) fn driver_version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: valid out-pointer.
    check(unsafe { sys::cuDriverGetVersion(&mut v) }, "cuDriverGetVersion")?;
    Ok(v)
}

/// A device's primary context, retained for the life of this value.
pub(crate) struct Context {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a primary context may be made current on any thread.
unsafe impl Send for Context {}
// SAFETY: as above; the handle itself is immutable.
unsafe impl Sync for Context {}

impl Context {
    pub fn retain(ordinal: i32) -> Result<Self> {
        // SAFETY: valid out-pointers; the context is released in Drop.
        unsafe {
            let mut dev = 0;
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            check(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
            Ok(Self { dev, ctx })
        }
    }

    /// Makes the context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is a retained primary context.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        let attr = |a| -> Result<i32> {
            let mut v = 0;
            // SAFETY: valid out-pointer and device.
            check(unsafe { sys::cuDeviceGetAttribute(&mut v, a, self.dev) }, "cuDeviceGetAttribute")?;
            Ok(v)
        };
        Ok((
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `Context::retain`.
        let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

/// A device allocation opened from another process's CUDA IPC handle. The context must
/// be current when it is opened and dropped.
pub(crate) struct IpcMapping {
    pub base: u64,
    /// Bytes of the whole allocation behind the handle.
    pub alloc_len: u64,
}

impl IpcMapping {
    pub fn open(handle: &[u8; 64]) -> Result<Self> {
        let mut raw = sys::CUipcMemHandle { reserved: [0; 64] };
        for (dst, src) in raw.reserved.iter_mut().zip(handle) {
            *dst = *src as _;
        }
        // SAFETY: `raw` is a full 64-byte handle; out-pointers are valid. The mapping is
        // closed in Drop.
        unsafe {
            let mut base: sys::CUdeviceptr = 0;
            check(
                sys::cuIpcOpenMemHandle_v2(
                    &mut base,
                    raw,
                    sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                ),
                "cuIpcOpenMemHandle",
            )?;
            let mut start: sys::CUdeviceptr = 0;
            let mut len = 0usize;
            if let Err(e) = check(sys::cuMemGetAddressRange_v2(&mut start, &mut len, base), "cuMemGetAddressRange") {
                let _ = sys::cuIpcCloseMemHandle(base);
                return Err(e);
            }
            Ok(Self { base, alloc_len: len as u64 - (base - start) })
        }
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // SAFETY: `base` came from cuIpcOpenMemHandle; each open is closed exactly once.
        let _ = unsafe { sys::cuIpcCloseMemHandle(self.base) };
    }
}

/// Page-locks `len` bytes at `ptr` for DMA in every context (`cuMemHostRegister`).
///
/// # Safety
/// `ptr..ptr+len` must stay mapped until [`host_unregister`] is called on `ptr`.
pub(crate) unsafe fn host_register(ptr: NonNull<u8>, len: u64) -> Result<()> {
    // SAFETY: the caller guarantees the range stays mapped.
    check(
        unsafe { sys::cuMemHostRegister_v2(ptr.as_ptr().cast(), len as usize, sys::CU_MEMHOSTREGISTER_PORTABLE) },
        "cuMemHostRegister",
    )
}

/// Undoes [`host_register`].
pub(crate) fn host_unregister(ptr: NonNull<u8>) -> Result<()> {
    // SAFETY: unregistering a range registered by `host_register` (or failing cleanly).
    check(unsafe { sys::cuMemHostUnregister(ptr.as_ptr().cast()) }, "cuMemHostUnregister")
}

/// Where a batched copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyKind {
    /// Device → pinned host.
    ToHost,
    /// Pinned host → device.
    ToDevice,
    /// Device → device.
    OnDevice,
}

/// A non-blocking stream of the current context.
pub(crate) struct Stream(pub sys::CUstream);

impl Stream {
    pub fn new() -> Result<Self> {
        let mut s = std::ptr::null_mut();
        // SAFETY: valid out-pointer; destroyed in Drop.
        check(
            unsafe { sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        Ok(Self(s))
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream.
        check(unsafe { sys::cuStreamSynchronize(self.0) }, "cuStreamSynchronize")
    }

    pub fn wait(&self, event: &Event) -> Result<()> {
        // SAFETY: live stream and event.
        check(unsafe { sys::cuStreamWaitEvent(self.0, event.0, 0) }, "cuStreamWaitEvent")
    }

    /// Device → host copy.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes (pinned for async behaviour) until the stream
    /// has passed this copy, and `src` a live device range.
    pub unsafe fn copy_to_host(&self, dst: NonNull<u8>, src: u64, len: u64) -> Result<()> {
        // SAFETY: the caller's contract.
        check(unsafe { sys::cuMemcpyDtoHAsync_v2(dst.as_ptr().cast(), src, len as usize, self.0) }, "cuMemcpyDtoHAsync")
    }

    /// Copies `sizes[i]` bytes from `srcs[i]` to `dsts[i]` for every i with one
    /// `cuMemcpyBatchAsync_v2` call (copy engines only; CUDA 13.0+ drivers). Host
    /// addresses are passed as pointers into registered memory.
    ///
    /// # Safety
    /// Every range must stay valid until the stream passes the batch, and lie where `kind`
    /// says.
    pub unsafe fn copy_batch(
        &self,
        dsts: &mut [u64],
        srcs: &mut [u64],
        sizes: &mut [usize],
        kind: CopyKind,
    ) -> Result<()> {
        let device = sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: 0 };
        let host = sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, id: 0 };
        let (src_hint, dst_hint) = match kind {
            CopyKind::ToHost => (device, host),
            CopyKind::ToDevice => (host, device),
            CopyKind::OnDevice => (device, device),
        };
        let mut attrs = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: src_hint,
            dstLocHint: dst_hint,
            flags: 0,
        };
        let mut attr_index = 0usize;
        // SAFETY: the three arrays have equal length (checked by the caller's construction)
        // and the caller's contract covers every range.
        check(
            unsafe {
                sys::cuMemcpyBatchAsync_v2(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    sizes.len(),
                    &mut attrs,
                    &mut attr_index,
                    1,
                    self.0,
                )
            },
            "cuMemcpyBatchAsync",
        )
    }

    /// Device → device copy (same context), done by a copy engine.
    ///
    /// # Safety
    /// Both ranges must be live device memory, not overlapping, until the stream passes
    /// this copy.
    pub unsafe fn copy_on_device(&self, dst: u64, src: u64, len: u64) -> Result<()> {
        // SAFETY: the caller's contract.
        check(unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len as usize, self.0) }, "cuMemcpyDtoDAsync")
    }

    /// Host → device copy.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes until the stream has passed this copy, and `dst`
    /// a live device range.
    pub unsafe fn copy_to_device(&self, dst: u64, src: NonNull<u8>, len: u64) -> Result<()> {
        // SAFETY: the caller's contract.
        check(
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast::<c_void>(), len as usize, self.0) },
            "cuMemcpyHtoDAsync",
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by cuStreamCreate.
        let _ = unsafe { sys::cuStreamDestroy_v2(self.0) };
    }
}

/// A timing-disabled event.
pub(crate) struct Event(pub sys::CUevent);

impl Event {
    pub fn new() -> Result<Self> {
        let mut e = std::ptr::null_mut();
        // SAFETY: valid out-pointer; destroyed in Drop.
        check(
            unsafe { sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) },
            "cuEventCreate",
        )?;
        Ok(Self(e))
    }

    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: live event and stream.
        check(unsafe { sys::cuEventRecord(self.0, stream.0) }, "cuEventRecord")
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        check(unsafe { sys::cuEventSynchronize(self.0) }, "cuEventSynchronize")
    }

    /// Whether the work before the event's record is done (without waiting).
    pub fn is_done(&self) -> Result<bool> {
        // SAFETY: a live event.
        match unsafe { sys::cuEventQuery(self.0) } {
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => check(other, "cuEventQuery").map(|()| true),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate.
        let _ = unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// Device memory of the current context.
pub(crate) struct DeviceBuffer {
    pub ptr: u64,
}

impl DeviceBuffer {
    pub fn new(len: u64) -> Result<Self> {
        let mut ptr = 0;
        // SAFETY: valid out-pointer; freed in Drop.
        check(unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) }, "cuMemAlloc")?;
        Ok(Self { ptr })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc; the owning context is current on the worker.
        let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

/// Pinned host memory from the driver (small buffers: kernel tables).
pub(crate) struct PinnedBuffer {
    pub ptr: NonNull<u8>,
}

impl PinnedBuffer {
    pub fn new(len: u64) -> Result<Self> {
        let mut p = std::ptr::null_mut();
        // SAFETY: valid out-pointer; freed in Drop.
        check(unsafe { sys::cuMemHostAlloc(&mut p, len as usize, sys::CU_MEMHOSTALLOC_PORTABLE) }, "cuMemHostAlloc")?;
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| DeviceError::Cuda("cuMemHostAlloc returned null".into()))?;
        Ok(Self { ptr })
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc.
        let _ = unsafe { sys::cuMemFreeHost(self.ptr.as_ptr().cast()) };
    }
}
