//! Plain value classes crossing the binding: layer specs and call results.

use pegaflow_proto as pb;
use pyo3::prelude::*;

/// One KV layer living in a shared-memory file, described as a strided tensor.
#[pyclass(module = "pegaflow._native", frozen, get_all)]
#[derive(Clone)]
pub struct KvLayer {
    /// Layer index.
    pub layer: u32,
    /// Shared-memory file name under /dev/shm.
    pub shm_name: String,
    /// Tensor shape.
    pub shape: Vec<u64>,
    /// Tensor strides, in elements.
    pub stride: Vec<i64>,
    /// Bytes per element.
    pub element_size: u32,
    /// Dimension indexing blocks.
    pub block_dim: u32,
    /// Dimension separating K and V, or None when fused.
    pub kv_dim: Option<u32>,
    /// Byte offset of the tensor inside the file.
    pub byte_offset: u64,
}

#[pymethods]
impl KvLayer {
    #[new]
    #[pyo3(signature = (layer, shm_name, shape, stride, element_size, block_dim, kv_dim = None, byte_offset = 0))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword constructor
    fn new(
        layer: u32,
        shm_name: String,
        shape: Vec<u64>,
        stride: Vec<i64>,
        element_size: u32,
        block_dim: u32,
        kv_dim: Option<u32>,
        byte_offset: u64,
    ) -> Self {
        Self { layer, shm_name, shape, stride, element_size, block_dim, kv_dim, byte_offset }
    }

    fn __repr__(&self) -> String {
        format!(
            "KvLayer(layer={}, shm_name={:?}, shape={:?}, stride={:?}, element_size={}, block_dim={}, kv_dim={:?}, byte_offset={})",
            self.layer,
            self.shm_name,
            self.shape,
            self.stride,
            self.element_size,
            self.block_dim,
            self.kv_dim,
            self.byte_offset
        )
    }
}

impl KvLayer {
    pub fn to_proto(&self) -> pb::LayerRegistration {
        pb::LayerRegistration {
            layer: self.layer,
            region: Some(pb::layer_registration::Region::HostShm(pb::HostShmRegion { name: self.shm_name.clone() })),
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
    /// Blocks skipped (already stored).
    pub skipped_blocks: u32,
    /// Blocks evicted to make room.
    pub evicted_blocks: u32,
}

#[pymethods]
impl SaveResult {
    fn __repr__(&self) -> String {
        format!(
            "SaveResult(saved_blocks={}, sealed_blocks={}, skipped_blocks={}, evicted_blocks={})",
            self.saved_blocks, self.sealed_blocks, self.skipped_blocks, self.evicted_blocks
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
}

#[pymethods]
impl QueryResult {
    fn __repr__(&self) -> String {
        match &self.lease_id {
            Some(id) => format!("QueryResult(hit_blocks={}, lease_id='{id}')", self.hit_blocks),
            None => format!("QueryResult(hit_blocks={}, lease_id=None)", self.hit_blocks),
        }
    }
}
