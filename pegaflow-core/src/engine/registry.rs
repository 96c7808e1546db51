//! Registered instances: per TP rank, the mapped region and validated layout of every
//! layer. Registration validates everything before it changes anything.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

use crate::cache::PartGeometry;
use crate::device::{DeviceBackend, DeviceRegion, RegionSource};
use crate::error::{EngineError, Result, shown};
use crate::layout::{KvLayout, TensorSpec};

/// Longest instance id or namespace, in bytes.
pub const MAX_ID_LEN: usize = 256;
const MAX_TP_SIZE: u32 = 1024;
const MAX_LAYERS: u32 = 4096;

/// One layer of a registration request.
#[derive(Debug, Clone)]
pub struct LayerRegistration {
    /// Layer index, `< num_layers`.
    pub layer: u32,
    /// Where the layer's tensor memory lives.
    pub source: RegionSource,
    /// The tensor inside that memory.
    pub tensor: TensorSpec,
}

/// Registration of every layer of one TP rank.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    /// Instance (one inference engine process group).
    pub instance_id: String,
    /// Blocks are shared between instances of the same namespace only.
    pub namespace: String,
    /// This rank.
    pub tp_rank: u32,
    /// Ranks in the instance.
    pub tp_size: u32,
    /// Layers per rank.
    pub num_layers: u32,
    /// Exactly one entry per layer.
    pub layers: Vec<LayerRegistration>,
    /// The client session this rank belongs to (required): when it closes, the rank is
    /// dropped, and only a session holding a rank may unregister the instance.
    pub session_id: String,
    /// Unix user of the caller, when known (Unix socket): a new instance belongs to it,
    /// and an existing one accepts ranks only from its owner.
    pub owner_uid: Option<u32>,
    /// Process of the caller, when known (Unix socket), recorded on a new instance.
    pub owner_pid: Option<i32>,
    /// Every TP rank holds the same bytes (MLA): the cache keeps one copy per block that
    /// any rank saves and every rank loads. All ranks of an instance must agree.
    pub replicated_kv: bool,
}

/// Who copies to or from a rank: the session that registered the rank, and the caller's
/// Unix user when known (Unix socket). Only they may move the rank's bytes.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The caller's session id.
    pub session_id: &'a str,
    /// The caller's Unix user, when known.
    pub uid: Option<u32>,
}

/// Admin view of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Instance id.
    pub instance_id: String,
    /// Its namespace.
    pub namespace: String,
    /// TP size.
    pub tp_size: u32,
    /// Layers per rank.
    pub num_layers: u32,
    /// Ranks registered so far.
    pub registered_ranks: Vec<u32>,
    /// Distinct memory regions its ranks mapped.
    pub open_regions: u32,
    /// Unix user that registered it (Unix-socket clients only).
    pub owner_uid: Option<u32>,
    /// Process that registered it (Unix-socket clients only).
    pub owner_pid: Option<i32>,
    /// One stored copy for all TP ranks.
    pub replicated_kv: bool,
}

/// A mapped region that keeps the `open_regions` gauge honest: it counts until the last
/// reference (a binding or an in-flight copy) is gone.
struct TrackedRegion {
    inner: Arc<dyn DeviceRegion>,
    gauge: Gauge,
}

impl DeviceRegion for TrackedRegion {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn as_any(&self) -> &dyn Any {
        self.inner.as_any()
    }

    fn device_ordinal(&self) -> Option<i32> {
        self.inner.device_ordinal()
    }
}

impl Drop for TrackedRegion {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One layer, ready for copies.
pub(crate) struct LayerBinding {
    pub region: Arc<dyn DeviceRegion>,
    /// Index of `region` among the rank's distinct regions (groups copies without hashing).
    pub region_index: usize,
    pub layout: KvLayout,
}

/// One registered rank.
pub(crate) struct RankBinding {
    pub namespace: Arc<str>,
    pub session_id: String,
    /// Which stored part of a block is this rank's, of how many: (rank, TP size), or
    /// (0, 1) when every rank holds the same bytes.
    pub part: u32,
    pub parts: u32,
    pub backend: Arc<dyn DeviceBackend>,
    pub layers: Vec<LayerBinding>,
    pub geometry: Arc<PartGeometry>,
    pub regions: u32,
    /// All layers share one region and, within a block, every (layer, segment) lies in
    /// address order inside one block stride (vLLM's cross-layer layout): copies emitted
    /// block by block are then already sorted by address.
    pub block_major: bool,
    /// Block-major, and each block's (layer, segment) pieces lie back to back in the
    /// order the pool stores them (vLLM's cross-layer tensor, the connector's staging
    /// buffer): a run of a block's layers is one copy, whatever the number of layers.
    pub block_dense: bool,
}

struct Instance {
    namespace: Arc<str>,
    owner_uid: Option<u32>,
    owner_pid: Option<i32>,
    tp_size: u32,
    num_layers: u32,
    replicated_kv: bool,
    ranks: HashMap<u32, Arc<RankBinding>>,
}

/// The instance table.
pub(crate) struct Registry {
    instances: Mutex<HashMap<String, Instance>>,
    backends: Vec<Arc<dyn DeviceBackend>>,
    instances_gauge: Gauge,
    regions_gauge: Gauge,
}

impl Registry {
    pub fn new(backends: Vec<Arc<dyn DeviceBackend>>, instances_gauge: Gauge, regions_gauge: Gauge) -> Self {
        Self { instances: Mutex::new(HashMap::new()), backends, instances_gauge, regions_gauge }
    }

    /// Validates and maps a rank's layers; returns the bytes one block of the rank takes.
    pub fn register(&self, req: RegisterRequest) -> Result<u64> {
        validate_ids(&req)?;
        self.check_compatible(&req)?;
        let binding = self.bind(&req)?;
        let block_bytes = binding.geometry.total();
        let mut instances = self.instances.lock();
        // Re-check under the lock: another registration may have raced this one.
        if let Some(existing) = instances.get(&req.instance_id) {
            check_matches(existing, &req)?;
        }
        let instance = instances.entry(req.instance_id.clone()).or_insert_with(|| Instance {
            namespace: Arc::clone(&binding.namespace),
            owner_uid: req.owner_uid,
            owner_pid: req.owner_pid,
            tp_size: req.tp_size,
            num_layers: req.num_layers,
            replicated_kv: req.replicated_kv,
            ranks: HashMap::new(),
        });
        instance.ranks.insert(req.tp_rank, Arc::new(binding));
        self.instances_gauge.set(instances.len() as i64);
        Ok(block_bytes)
    }

    /// Drops the ranks of `instance_id` registered under `session_id`, and the instance
    /// when no rank is left. Returns how many ranks were dropped.
    pub fn unregister_session(&self, instance_id: &str, session_id: &str) -> usize {
        let mut instances = self.instances.lock();
        let Some(instance) = instances.get_mut(instance_id) else { return 0 };
        let before = instance.ranks.len();
        instance.ranks.retain(|_, rank| rank.session_id != session_id);
        let dropped = before - instance.ranks.len();
        if instance.ranks.is_empty() {
            instances.remove(instance_id);
        }
        self.instances_gauge.set(instances.len() as i64);
        dropped
    }

    /// Drops an instance on behalf of `session_id`, which must hold one of its ranks, and
    /// of `caller_uid`, which (when known) must own it. Its regions unmap once in-flight
    /// copies finish.
    pub fn unregister(&self, instance_id: &str, session_id: &str, caller_uid: Option<u32>) -> Result<()> {
        let mut instances = self.instances.lock();
        let instance = instances
            .get(instance_id)
            .ok_or_else(|| EngineError::not_found(format!("unknown instance {}", shown(instance_id))))?;
        check_owner(instance, instance_id, caller_uid)?;
        if !instance.ranks.values().any(|rank| rank.session_id == session_id) {
            return Err(EngineError::denied(format!(
                "instance {} can only be unregistered by a session that registered one of its ranks",
                shown(instance_id)
            )));
        }
        instances.remove(instance_id);
        self.instances_gauge.set(instances.len() as i64);
        Ok(())
    }

    /// The binding of a registered rank, for `caller`, which must be the session that
    /// registered it (and of the instance's owner).
    pub fn rank(&self, instance_id: &str, tp_rank: u32, caller: Caller<'_>) -> Result<Arc<RankBinding>> {
        let instances = self.instances.lock();
        let instance = instances
            .get(instance_id)
            .ok_or_else(|| EngineError::not_found(format!("unknown instance {}", shown(instance_id))))?;
        let rank = instance.ranks.get(&tp_rank).ok_or_else(|| {
            EngineError::not_found(format!("rank {tp_rank} of instance {} is not registered", shown(instance_id)))
        })?;
        check_owner(instance, instance_id, caller.uid)?;
        if rank.session_id != caller.session_id {
            return Err(EngineError::denied(format!(
                "rank {tp_rank} of instance {} belongs to another session: only the session that registered it \
                 may save or load it",
                shown(instance_id)
            )));
        }
        Ok(Arc::clone(rank))
    }

    /// Namespace and TP size of a registered instance.
    pub fn namespace(&self, instance_id: &str) -> Result<(Arc<str>, u32)> {
        self.instances
            .lock()
            .get(instance_id)
            .map(|i| (Arc::clone(&i.namespace), i.tp_size))
            .ok_or_else(|| EngineError::not_found(format!("unknown instance {}", shown(instance_id))))
    }

    pub fn list(&self) -> Vec<InstanceInfo> {
        let instances = self.instances.lock();
        let mut out: Vec<InstanceInfo> = instances
            .iter()
            .map(|(id, i)| {
                let mut ranks: Vec<u32> = i.ranks.keys().copied().collect();
                ranks.sort_unstable();
                InstanceInfo {
                    instance_id: id.clone(),
                    namespace: i.namespace.to_string(),
                    tp_size: i.tp_size,
                    num_layers: i.num_layers,
                    registered_ranks: ranks,
                    open_regions: i.ranks.values().map(|r| r.regions).sum(),
                    owner_uid: i.owner_uid,
                    owner_pid: i.owner_pid,
                    replicated_kv: i.replicated_kv,
                }
            })
            .collect();
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }

    fn check_compatible(&self, req: &RegisterRequest) -> Result<()> {
        match self.instances.lock().get(&req.instance_id) {
            Some(existing) => check_matches(existing, req),
            None => Ok(()),
        }
    }

    /// Maps the regions (each distinct source once) and validates every layout.
    fn bind(&self, req: &RegisterRequest) -> Result<RankBinding> {
        let mut by_layer: Vec<Option<&LayerRegistration>> = vec![None; req.num_layers as usize];
        for layer in &req.layers {
            let slot = by_layer.get_mut(layer.layer as usize).ok_or_else(|| {
                EngineError::invalid(format!("layer {} is outside 0..{}", layer.layer, req.num_layers))
            })?;
            if slot.replace(layer).is_some() {
                return Err(EngineError::invalid(format!("layer {} is registered twice", layer.layer)));
            }
        }
        let first = req.layers.first().ok_or_else(|| EngineError::invalid("no layers to register"))?;
        let backend =
            self.backends.iter().find(|b| b.handles(&first.source)).cloned().ok_or_else(|| {
                EngineError::Device(crate::device::DeviceError::Unsupported(first.source.to_string()))
            })?;
        let mut regions: HashMap<&RegionSource, (usize, Arc<dyn DeviceRegion>)> = HashMap::new();
        let mut layers = Vec::with_capacity(by_layer.len());
        for (index, layer) in by_layer.into_iter().enumerate() {
            let layer = layer.ok_or_else(|| {
                EngineError::invalid(format!("layer {index} is missing: register all {} layers", req.num_layers))
            })?;
            if !backend.handles(&layer.source) {
                return Err(EngineError::invalid(format!(
                    "layer {index} lives in {}, but layer 0 uses the {} backend: one backend per rank",
                    layer.source,
                    backend.name()
                )));
            }
            let (region_index, region) = match regions.get(&layer.source) {
                Some((i, region)) => (*i, Arc::clone(region)),
                None => {
                    let opened = backend.open_region(&layer.source)?;
                    self.regions_gauge.inc();
                    let tracked: Arc<dyn DeviceRegion> =
                        Arc::new(TrackedRegion { inner: opened, gauge: self.regions_gauge.clone() });
                    let i = regions.len();
                    regions.insert(&layer.source, (i, Arc::clone(&tracked)));
                    (i, tracked)
                }
            };
            let layout = KvLayout::from_tensor(&layer.tensor, region.len())
                .map_err(|source| EngineError::InvalidLayout { layer: index as u32, source })?;
            layers.push(LayerBinding { region, region_index, layout });
        }
        let devices: std::collections::BTreeSet<Option<i32>> =
            layers.iter().map(|l| l.region.device_ordinal()).collect();
        if devices.len() > 1 {
            return Err(EngineError::invalid(format!(
                "the layers of one rank live on several devices {devices:?}: register one GPU per rank"
            )));
        }
        let geometry = Arc::new(PartGeometry::new(layers.iter().map(|l| l.layout.slot_bytes()).collect()));
        let block_major = regions.len() == 1 && is_block_major(&layers);
        Ok(RankBinding {
            namespace: Arc::from(req.namespace.as_str()),
            session_id: req.session_id.clone(),
            part: if req.replicated_kv { 0 } else { req.tp_rank },
            parts: if req.replicated_kv { 1 } else { req.tp_size },
            backend,
            regions: regions.len() as u32,
            block_major,
            block_dense: block_major && is_block_dense(&layers),
            layers,
            geometry,
        })
    }
}

/// Whether block 0's (layer, segment) ranges are ascending, disjoint and inside one block
/// stride that every layer shares (so block b's ranges all precede block b+1's).
fn is_block_major(layers: &[LayerBinding]) -> bool {
    let Some(stride) = layers.first().map(|l| l.layout.block_stride()) else { return false };
    let mut end = 0u64;
    let mut start = None;
    for layer in layers {
        let layout = &layer.layout;
        if layout.block_stride() != stride {
            return false;
        }
        for segment in 0..layout.num_segments() {
            let offset = layout.segment_offset(0, segment);
            if offset < end {
                return false;
            }
            start.get_or_insert(offset);
            end = offset + layout.segment_bytes();
        }
    }
    start.is_some_and(|first| end - first <= stride)
}

/// Whether block 0's (layer, segment) pieces follow each other without a gap in layer
/// and segment order, as a part's slots do in the pool. With a stride every layer shares
/// (block-major), the same then holds for every block.
fn is_block_dense(layers: &[LayerBinding]) -> bool {
    let Some(first) = layers.first() else { return false };
    let mut next = first.layout.segment_offset(0, 0);
    for layer in layers {
        let layout = &layer.layout;
        for segment in 0..layout.num_segments() {
            if layout.segment_offset(0, segment) != next {
                return false;
            }
            next += layout.segment_bytes();
        }
    }
    true
}

/// The instance's owner is the caller, or the caller's user is unknown (TCP: the session
/// id is the proof) and so is the owner's.
fn check_owner(instance: &Instance, instance_id: &str, caller_uid: Option<u32>) -> Result<()> {
    if instance.owner_uid != caller_uid {
        return Err(EngineError::denied(format!(
            "instance {} belongs to another user or connection",
            shown(instance_id)
        )));
    }
    Ok(())
}

fn validate_ids(req: &RegisterRequest) -> Result<()> {
    if req.session_id.is_empty() {
        return Err(EngineError::invalid(
            "session_id is required: open a session (OpenSession) for the instance, then register under it",
        ));
    }
    for (what, value) in [("instance_id", &req.instance_id), ("namespace", &req.namespace)] {
        if value.is_empty() || value.len() > MAX_ID_LEN {
            return Err(EngineError::invalid(format!("{what} must be 1..={MAX_ID_LEN} bytes")));
        }
    }
    if req.tp_size == 0 || req.tp_size > MAX_TP_SIZE || req.tp_rank >= req.tp_size {
        return Err(EngineError::invalid(format!(
            "tp_rank {} / tp_size {}: need 0 <= rank < size <= {MAX_TP_SIZE}",
            req.tp_rank, req.tp_size
        )));
    }
    if req.num_layers == 0 || req.num_layers > MAX_LAYERS {
        return Err(EngineError::invalid(format!("num_layers {} is not in 1..={MAX_LAYERS}", req.num_layers)));
    }
    if req.layers.len() != req.num_layers as usize {
        return Err(EngineError::invalid(format!(
            "{} layers given for num_layers {}",
            req.layers.len(),
            req.num_layers
        )));
    }
    Ok(())
}

fn check_matches(existing: &Instance, req: &RegisterRequest) -> Result<()> {
    check_owner(existing, &req.instance_id, req.owner_uid)?;
    // Ranks may register different numbers of layers: pipeline-parallel stages hold
    // different layers, and each rank's part of a block has its own geometry.
    if *existing.namespace != *req.namespace || existing.tp_size != req.tp_size {
        return Err(EngineError::invalid(format!(
            "instance {} is registered with namespace {}, tp_size {}",
            shown(&req.instance_id),
            shown(&existing.namespace),
            existing.tp_size
        )));
    }
    if existing.replicated_kv != req.replicated_kv {
        return Err(EngineError::invalid(format!(
            "instance {} is registered with replicated_kv {}: every rank must say the same",
            shown(&req.instance_id),
            existing.replicated_kv
        )));
    }
    if existing.ranks.contains_key(&req.tp_rank) {
        return Err(EngineError::AlreadyExists(format!(
            "rank {} of instance {} is already registered",
            req.tp_rank,
            shown(&req.instance_id)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes(u64);

    impl DeviceRegion for Bytes {
        fn len(&self) -> u64 {
            self.0
        }

        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    /// Layers of shape (blocks, 2, 64) 1-byte elements inside one region.
    fn layers(block_stride: i64, layer_offsets: &[u64]) -> Vec<LayerBinding> {
        let region: Arc<dyn DeviceRegion> = Arc::new(Bytes(1 << 30));
        layer_offsets
            .iter()
            .map(|&byte_offset| LayerBinding {
                region: Arc::clone(&region),
                region_index: 0,
                layout: KvLayout::from_tensor(
                    &TensorSpec {
                        shape: vec![8, 2, 64],
                        stride: vec![block_stride, 64, 1],
                        element_size: 1,
                        block_dim: 0,
                        kv_dim: Some(1),
                        byte_offset,
                    },
                    1 << 30,
                )
                .unwrap(),
            })
            .collect()
    }

    #[test]
    fn detects_cross_layer_layouts_only() {
        // Cross-layer: 4 layers of 128 B inside a 512 B block stride.
        assert!(is_block_major(&layers(512, &[0, 128, 256, 384])));
        // Layers out of address order, or spilling past the block stride, are not.
        assert!(!is_block_major(&layers(512, &[128, 0, 256, 384])));
        assert!(!is_block_major(&layers(128, &[0, 1 << 20])));
    }

    #[test]
    fn dense_blocks_have_no_gap_between_their_pieces() {
        // 4 layers of K and V (64 B each) back to back: a block is 512 contiguous bytes.
        assert!(is_block_dense(&layers(512, &[0, 128, 256, 384])));
        // A gap between layers (a wider stride), or layers out of order, are not dense.
        assert!(!is_block_dense(&layers(1024, &[0, 256, 512, 768])));
        assert!(!is_block_dense(&layers(512, &[128, 0, 256, 384])));
    }
}
