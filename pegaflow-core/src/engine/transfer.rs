//! Turns prepared tickets into copy jobs: the one place that pairs layout addresses
//! (device side) with slot offsets (pool side).

use std::collections::HashMap;
use std::sync::Arc;

use super::registry::RankBinding;
use crate::cache::{LoadTicket, SaveTicket};
use crate::device::{CopyJob, CopyOp, DeviceRegion, Direction, RegionCopy, coalesce};
use crate::error::{EngineError, Result};
use crate::load_state::{LoadState, LoadStateError};
use crate::memory::HostPool;
use crate::shm::ShmError;

/// Collects ops per region (keyed by the region's address) and coalesces them.
#[derive(Default)]
struct JobBuilder {
    regions: Vec<RegionCopy>,
    index: HashMap<*const (), usize>,
}

impl JobBuilder {
    fn push(&mut self, region: &Arc<dyn DeviceRegion>, op: CopyOp) {
        let key = Arc::as_ptr(region).cast::<()>();
        let i = *self.index.entry(key).or_insert_with(|| {
            self.regions.push(RegionCopy { region: Arc::clone(region), ops: Vec::new() });
            self.regions.len() - 1
        });
        self.regions[i].ops.push(op);
    }

    fn finish(mut self, direction: Direction, pool: &Arc<HostPool>) -> CopyJob {
        for region in &mut self.regions {
            coalesce(&mut region.ops);
        }
        CopyJob { direction, pool: Arc::clone(pool), regions: self.regions }
    }
}

/// Copies for every slot of a save ticket: each segment of the layer's block goes to the
/// slot, segments back to back.
pub(super) fn save_job(pool: &Arc<HostPool>, rank: &RankBinding, block_ids: &[u64], ticket: &SaveTicket) -> CopyJob {
    let mut job = JobBuilder::default();
    for &(index, layer, slot_offset) in &ticket.slots {
        let binding = &rank.layers[layer as usize];
        push_segments(&mut job, binding, block_ids[index], slot_offset);
    }
    job.finish(Direction::Save, pool)
}

/// Copies for a load ticket: for each destination block and layer, the slot back into
/// the layer's block.
pub(super) fn load_job(
    pool: &Arc<HostPool>,
    rank: &RankBinding,
    block_ids: &[u64],
    layers: &[u32],
    ticket: &LoadTicket,
) -> CopyJob {
    let mut job = JobBuilder::default();
    for (&block, &part_offset) in block_ids.iter().zip(&ticket.part_offsets) {
        for &layer in layers {
            let binding = &rank.layers[layer as usize];
            push_segments(&mut job, binding, block, part_offset + ticket.geometry.layer_offset(layer));
        }
    }
    job.finish(Direction::Load, pool)
}

fn push_segments(job: &mut JobBuilder, binding: &super::registry::LayerBinding, block: u64, slot_offset: u64) {
    let layout = &binding.layout;
    for segment in 0..layout.num_segments() {
        job.push(
            &binding.region,
            CopyOp {
                device_offset: layout.segment_offset(block, segment),
                host_offset: slot_offset + segment * layout.segment_bytes(),
                len: layout.segment_bytes(),
            },
        );
    }
}

/// Opens the client's load state, mapping failures to request errors.
pub(super) fn open_load_state(name: &str) -> Result<LoadState> {
    LoadState::open(name).map_err(|e| match e {
        LoadStateError::Shm(ShmError::NotFound(_)) => EngineError::not_found(e.to_string()),
        other => EngineError::invalid(other.to_string()),
    })
}
