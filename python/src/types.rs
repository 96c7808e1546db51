//! Plain value classes crossing the binding: layer specs and call results.

use pegaflow_proto as pb;
use pyo3::prelude::*;

/// One KV layer, described as a strided tensor inside a memory region: a sealed memfd
/// (host backend, handed to the server by descriptor) or a CUDA allocation shared by IPC
/// (CUDA backend).
#[pyclass(module = "pegaflow._native", frozen)]
#[derive(Clone)]
pub struct KvLayer {
    /// Layer index.
    #[pyo3(get)]
    pub layer: u32,
    /// Tensor shape.
    #[pyo3(get)]
    pub shape: Vec<u64>,
    /// Tensor strides, in elements.
    #[pyo3(get)]
    pub stride: Vec<i64>,
    /// Bytes per element.
    #[pyo3(get)]
    pub element_size: u32,
    /// Dimension indexing blocks.
    #[pyo3(get)]
    pub block_dim: u32,
    /// Dimension separating K and V, or None when fused.
    #[pyo3(get)]
    pub kv_dim: Option<u32>,
    /// Byte offset of the tensor inside its region.
    #[pyo3(get)]
    pub byte_offset: u64,
    /// Descriptor of the sealed memfd holding the tensor (host backend); it must stay open
    /// until the layer is registered.
    #[pyo3(get)]
    pub host_fd: Option<i32>,
    /// Raw 64-byte CUDA IPC handle of the allocation (CUDA backend).
    pub cuda_ipc_handle: Option<Vec<u8>>,
    /// 16-byte UUID of the GPU (CUDA backend).
    pub device_uuid: Option<Vec<u8>>,
    /// Byte offset of the region inside the CUDA allocation.
    #[pyo3(get)]
    pub region_offset: u64,
    /// Bytes of the region (CUDA backend).
    #[pyo3(get)]
    pub region_size: u64,
}

#[pymethods]
impl KvLayer {
    #[new]
    #[pyo3(signature = (
        layer, *, shape, stride, element_size, block_dim, kv_dim = None, byte_offset = 0,
        host_fd = None, cuda_ipc_handle = None, device_uuid = None, region_offset = 0, region_size = 0
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword constructor
    fn new(
        py: Python<'_>,
        layer: u32,
        shape: Vec<u64>,
        stride: Vec<i64>,
        element_size: u32,
        block_dim: u32,
        kv_dim: Option<u32>,
        byte_offset: u64,
        host_fd: Option<i32>,
        cuda_ipc_handle: Option<Vec<u8>>,
        device_uuid: Option<Vec<u8>>,
        region_offset: u64,
        region_size: u64,
    ) -> PyResult<Self> {
        let invalid =
            |msg: &str| crate::errors::pegaflow_error(py, crate::errors::ErrorClass::InvalidArgument, msg.to_owned());
        match (&host_fd, &cuda_ipc_handle) {
            (Some(_), None) => {}
            (None, Some(_)) if device_uuid.is_some() && region_size > 0 => {}
            (None, Some(_)) => return Err(invalid("a CUDA layer needs device_uuid and region_size > 0")),
            _ => return Err(invalid("give exactly one of host_fd (host) or cuda_ipc_handle (CUDA)")),
        }
        Ok(Self {
            layer,
            shape,
            stride,
            element_size,
            block_dim,
            kv_dim,
            byte_offset,
            host_fd,
            cuda_ipc_handle,
            device_uuid,
            region_offset,
            region_size,
        })
    }

    /// Raw 64-byte CUDA IPC handle, or None for a host layer.
    #[getter]
    fn cuda_ipc_handle(&self) -> Option<&[u8]> {
        self.cuda_ipc_handle.as_deref()
    }

    /// 16-byte GPU UUID, or None for a host layer.
    #[getter]
    fn device_uuid(&self) -> Option<&[u8]> {
        self.device_uuid.as_deref()
    }

    fn __repr__(&self) -> String {
        let region = match &self.host_fd {
            Some(fd) => format!("host_fd={fd}"),
            None => format!("cuda_ipc (offset={}, size={})", self.region_offset, self.region_size),
        };
        format!(
            "KvLayer(layer={}, {region}, shape={:?}, stride={:?}, element_size={}, block_dim={}, kv_dim={:?}, byte_offset={})",
            self.layer, self.shape, self.stride, self.element_size, self.block_dim, self.kv_dim, self.byte_offset
        )
    }
}

impl KvLayer {
    /// The registration message; `token` names the host memory handed over for `host_fd`.
    pub fn to_proto(&self, token: Option<&crate::descriptors::Token>) -> pb::LayerRegistration {
        let region = match (&self.host_fd, &self.cuda_ipc_handle) {
            (Some(_), _) => pb::layer_registration::Region::HostMemory(pb::HostMemoryRegion {
                token: token.map(|t| t.bytes.to_vec()).unwrap_or_default(),
            }),
            (None, handle) => pb::layer_registration::Region::CudaIpc(pb::CudaIpcRegion {
                handle: handle.clone().unwrap_or_default(),
                device_uuid: self.device_uuid.clone().unwrap_or_default(),
                offset: self.region_offset,
                size: self.region_size,
            }),
        };
        pb::LayerRegistration {
            layer: self.layer,
            region: Some(region),
            layout: Some(pb::TensorLayout {
                shape: self.shape.clone(),
                stride: self.stride.clone(),
                element_size: self.element_size,
                block_dim: self.block_dim,
                kv_dim: self.kv_dim,
                byte_offset: self.byte_offset,
            }),
        }
    }
}

/// What a save did.
#[pyclass(module = "pegaflow._native", frozen, get_all)]
pub struct SaveResult {
    /// Blocks whose slots this call copied.
    pub saved_blocks: u32,
    /// Blocks that became visible to queries.
    pub sealed_blocks: u32,
    /// Blocks skipped (already stored, or refused admission).
    pub skipped_blocks: u32,
    /// Blocks evicted to make room.
    pub evicted_blocks: u32,
    /// Of the skipped blocks, those the cache refused to admit (rated below what they
    /// would have displaced): not an error.
    pub rejected_blocks: u32,
}

#[pymethods]
impl SaveResult {
    fn __repr__(&self) -> String {
        format!(
            "SaveResult(saved_blocks={}, sealed_blocks={}, skipped_blocks={}, evicted_blocks={}, rejected_blocks={})",
            self.saved_blocks, self.sealed_blocks, self.skipped_blocks, self.evicted_blocks, self.rejected_blocks
        )
    }
}

/// What a query found.
#[pyclass(module = "pegaflow._native", frozen, get_all)]
pub struct QueryResult {
    /// Leading blocks cached.
    pub hit_blocks: u32,
    /// Lease pinning them, or None when nothing hit.
    pub lease_id: Option<String>,
    /// How long the lease lives, milliseconds (the server's choice when none was asked).
    pub lease_ttl_ms: u64,
    /// Where each hit block is read from ("ram", "ssd"; "unknown" for a tier this client
    /// does not know), one per hit block.
    pub tiers: Vec<&'static str>,
    /// Nothing hit, but the first block is being saved now: asking again soon may hit.
    pub loading: bool,
}

#[pymethods]
impl QueryResult {
    fn __repr__(&self) -> String {
        match &self.lease_id {
            Some(id) => format!(
                "QueryResult(hit_blocks={}, lease_id='{id}', lease_ttl_ms={})",
                self.hit_blocks, self.lease_ttl_ms
            ),
            None => format!("QueryResult(hit_blocks={}, lease_id=None, loading={})", self.hit_blocks, self.loading),
        }
    }
}
