//! Device backends: where a client's KV memory lives and how bytes move between it and
//! the host pool.
//!
//! The engine speaks only to [`DeviceBackend`]; no backend type leaks above this module.
//! `host` copies with memcpy between the pool and sealed memory clients handed over (CPU inference and every CI
//! test); a CUDA backend slots in beside it.

pub mod cuda;
mod host;
mod plan;

use std::any::Any;
use std::sync::Arc;

pub use cuda::CudaDevice;
pub use host::{HostDevice, HostDeviceOptions};
pub use plan::{CopyOp, coalesce};

use crate::memory::HostPool;
use pegaflow_common::shm::{SharedMemory, ShmError};

/// Why a device could not map memory or move bytes.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The client's memory could not be used (unsealed, wrong kind, too small).
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// No backend of this server handles this kind of memory.
    #[error("no device backend for {0}")]
    Unsupported(String),
    /// A copy op points outside its region or the pool (an engine bug).
    #[error("copy out of bounds: {0}")]
    OutOfBounds(String),
    /// The backend stopped (shutting down).
    #[error("device backend {0} is shut down")]
    ShutDown(&'static str),
    /// A CUDA driver call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

/// Client memory already mapped by the server (received as a sealed descriptor). Two
/// values are the same region when they share the mapping.
#[derive(Debug, Clone)]
pub struct HostMemory(pub Arc<SharedMemory>);

impl PartialEq for HostMemory {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for HostMemory {}

impl std::hash::Hash for HostMemory {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
    }
}

impl DeviceError {
    /// What the caller can do about it: bad client memory is the request's fault, a
    /// stopped backend is transient, anything else is internal.
    pub fn category(&self) -> crate::error::ErrorCategory {
        use crate::error::ErrorCategory;
        match self {
            Self::Shm(ShmError::TooLarge { .. }) => ErrorCategory::Exhausted,
            Self::Shm(ShmError::Os { .. } | ShmError::Populate(_)) => ErrorCategory::Internal,
            Self::Shm(_) | Self::Unsupported(_) => ErrorCategory::Invalid,
            Self::ShutDown(_) => ErrorCategory::Unavailable,
            Self::OutOfBounds(_) | Self::Cuda(_) => ErrorCategory::Internal,
        }
    }
}

/// Where a client's KV tensor memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RegionSource {
    /// Host memory the client handed over by descriptor (see [`pegaflow_common::shm`]).
    HostMemory(HostMemory),
    /// A CUDA allocation exported by the client with `cudaIpcGetMemHandle`.
    CudaIpc {
        /// The raw 64-byte IPC handle.
        handle: [u8; 64],
        /// UUID of the GPU holding the allocation (independent of device numbering).
        device_uuid: [u8; 16],
        /// Byte offset of the registered range inside the allocation.
        offset: u64,
        /// Bytes of the registered range.
        size: u64,
    },
}

impl std::fmt::Display for RegionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HostMemory(memory) => write!(f, "host memory ({} B)", memory.0.len()),
            Self::CudaIpc { offset, size, .. } => write!(f, "CUDA IPC memory ({size} B at offset {offset})"),
        }
    }
}

/// A client memory region mapped into the server. Dropping the last reference unmaps it.
pub trait DeviceRegion: Send + Sync {
    /// Bytes addressable in the region.
    fn len(&self) -> u64;
    /// True when the region has no bytes (backends never return such regions).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Lets the backend that created the region recover its concrete type.
    fn as_any(&self) -> &dyn Any;
    /// The GPU holding the region, for backends with several devices.
    fn device_ordinal(&self) -> Option<i32> {
        None
    }
}

/// Direction of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device region → host pool.
    Save,
    /// Host pool → device region.
    Load,
}

/// The copies one region takes part in for one request.
pub struct RegionCopy {
    /// The client memory.
    pub region: Arc<dyn DeviceRegion>,
    /// Byte ranges; each is inside `region` and inside the pool.
    pub ops: Vec<CopyOp>,
}

/// One request's copies, executed by one backend.
pub struct CopyJob {
    /// Which way bytes flow.
    pub direction: Direction,
    /// The pool the host offsets point into.
    pub pool: Arc<HostPool>,
    /// Per-region copies.
    pub regions: Vec<RegionCopy>,
}

impl CopyJob {
    /// Total bytes the job moves.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().flat_map(|r| &r.ops).map(|op| op.len).sum()
    }
}

/// Called exactly once when a job finishes, from a backend thread. Must not block long.
pub type CopyDone = Box<dyn FnOnce(Result<(), DeviceError>) + Send>;

/// A place KV memory lives and the means to copy it.
///
/// Contract:
/// - `open_region` maps client memory; it MUST fail (not panic) on any bad source and
///   MUST NOT keep the region alive after the returned `Arc` is dropped.
/// - `submit` MUST NOT block on the copy; it runs the job on the backend's own threads
///   (saves and loads must be able to progress concurrently) and calls `done` exactly
///   once, also when the backend is shutting down.
/// - The engine guarantees every op is inside its region and the pool, and that no other
///   copy touches the same pool bytes until `done` is called.
pub trait DeviceBackend: Send + Sync {
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// Whether this backend can map `source`.
    fn handles(&self, source: &RegionSource) -> bool;
    /// Maps client memory.
    fn open_region(&self, source: &RegionSource) -> Result<Arc<dyn DeviceRegion>, DeviceError>;
    /// Queues a copy job.
    fn submit(&self, job: CopyJob, done: CopyDone);
    /// Loads whatever the backend needs (drivers, contexts) ahead of the first request.
    /// Called once from a background thread at start, concurrently with pool population.
    fn warm_up(&self) {}
    /// Makes the pool ready for fast DMA (e.g. page-locks it). Called once, from a
    /// background thread after the pool is populated; returns whether anything was done.
    fn pin_pool(&self, _pool: &Arc<HostPool>) -> Result<bool, DeviceError> {
        Ok(false)
    }
}
