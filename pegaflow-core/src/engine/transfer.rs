//! Turns prepared tickets into copy jobs: the one place that pairs layout addresses
//! (device side) with slot offsets (pool side).

use std::sync::Arc;

use super::registry::{LayerBinding, RankBinding};
use crate::cache::{LoadTicket, SaveTicket};
use crate::device::{CopyJob, CopyOp, Direction, RegionCopy, coalesce};
use crate::memory::HostPool;

/// Collects ops per region (by the layer's region index) and coalesces them.
struct JobBuilder {
    regions: Vec<Option<RegionCopy>>,
}

impl JobBuilder {
    fn new(rank: &RankBinding) -> Self {
        Self { regions: (0..rank.regions as usize).map(|_| None).collect() }
    }

    /// Adds `op`, extending the region's previous op when the two are contiguous on both
    /// sides (a cross-layer block's per-layer pieces become one op here, so a large request
    /// never materialises thousands of ops only to merge them later).
    fn push(&mut self, binding: &LayerBinding, op: CopyOp) {
        let ops = &mut self.regions[binding.region_index]
            .get_or_insert_with(|| RegionCopy { region: Arc::clone(&binding.region), ops: Vec::new() })
            .ops;
        if !ops.last_mut().is_some_and(|last| last.absorb(&op)) {
            ops.push(op);
        }
    }

    fn finish(self, direction: Direction, pool: &Arc<HostPool>) -> CopyJob {
        let mut regions: Vec<RegionCopy> = self.regions.into_iter().flatten().collect();
        for region in &mut regions {
            coalesce(&mut region.ops);
        }
        CopyJob { direction, pool: Arc::clone(pool), regions }
    }
}

/// Copies for every slot of a save ticket: each segment of the layer's block goes to the
/// slot, segments back to back.
pub(super) fn save_job(pool: &Arc<HostPool>, rank: &RankBinding, block_ids: &[u64], ticket: &SaveTicket) -> CopyJob {
    if rank.block_major {
        // A ticket lists each block's slots together, layers ascending.
        let mut blocks: Vec<&[(usize, u32, u64)]> = ticket.slots.chunk_by(|a, b| a.0 == b.0).collect();
        blocks.sort_unstable_by_key(|slots| block_ids[slots[0].0]);
        let mut job = JobBuilder::new(rank);
        for slots in blocks {
            for &(index, layer, slot_offset) in slots {
                push_block(&mut job, &rank.layers[layer as usize], block_ids[index], slot_offset);
            }
        }
        return job.finish(Direction::Save, pool);
    }
    let mut per_layer: Vec<Vec<(u64, u64)>> = vec![Vec::new(); rank.layers.len()];
    for &(index, layer, slot_offset) in &ticket.slots {
        per_layer[layer as usize].push((block_ids[index], slot_offset));
    }
    let mut job = JobBuilder::new(rank);
    for (binding, mut slots) in rank.layers.iter().zip(per_layer) {
        slots.sort_unstable_by_key(|&(block, _)| block);
        push_layer(&mut job, binding, &slots);
    }
    job.finish(Direction::Save, pool)
}

/// Copies for a load ticket: for each destination block and layer, the slot back into
/// the layer's block. `destinations` is `(block id, position in the request)` sorted by
/// block id; position i receives the ticket's i-th part.
pub(super) fn load_job(
    pool: &Arc<HostPool>,
    rank: &RankBinding,
    destinations: &[(u64, usize)],
    layers: &[u32],
    ticket: &LoadTicket,
) -> CopyJob {
    let order: Vec<(u64, u64)> =
        destinations.iter().map(|&(block, index)| (block, ticket.part_offsets[index])).collect();
    let mut job = JobBuilder::new(rank);
    if rank.block_major {
        for &(block, part) in &order {
            for &layer in layers {
                let slot_offset = part + ticket.geometry.layer_offset(layer);
                push_block(&mut job, &rank.layers[layer as usize], block, slot_offset);
            }
        }
        return job.finish(Direction::Load, pool);
    }
    let mut slots = Vec::with_capacity(order.len());
    for &layer in layers {
        let layer_offset = ticket.geometry.layer_offset(layer);
        slots.clear();
        slots.extend(order.iter().map(|&(block, part)| (block, part + layer_offset)));
        push_layer(&mut job, &rank.layers[layer as usize], &slots);
    }
    job.finish(Direction::Load, pool)
}

/// Ops for one block of one layer, segment by segment.
fn push_block(job: &mut JobBuilder, binding: &LayerBinding, block: u64, slot_offset: u64) {
    push_layer(job, binding, &[(block, slot_offset)]);
}

/// Ops for one layer's `(block, slot offset)` pairs, sorted by block: segment-major, so a
/// region's ops form at most one ascending run per segment and coalescing stays linear.
fn push_layer(job: &mut JobBuilder, binding: &LayerBinding, slots: &[(u64, u64)]) {
    let layout = &binding.layout;
    for segment in 0..layout.num_segments() {
        for &(block, slot_offset) in slots {
            job.push(
                binding,
                CopyOp {
                    device_offset: layout.segment_offset(block, segment),
                    host_offset: slot_offset + segment * layout.segment_bytes(),
                    len: layout.segment_bytes(),
                },
            );
        }
    }
}
