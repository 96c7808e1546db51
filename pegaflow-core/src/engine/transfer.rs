//! Turns prepared tickets into copy jobs: the one place that pairs layout addresses
//! (device side) with slot offsets (pool side).

use std::ops::Range;
use std::sync::Arc;

use super::registry::{LayerBinding, RankBinding};
use crate::cache::{LoadTicket, SaveTicket, SlotRun};
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
    // The slots of a run, each with its pool offset.
    let slots = |run: &SlotRun| {
        let base = run.offset - rank.geometry.layer_offset(run.layers.start);
        run.layers.clone().map(move |layer| (layer, base + rank.geometry.layer_offset(layer)))
    };
    if rank.block_major {
        // A ticket lists each block's runs together.
        let mut blocks: Vec<&[SlotRun]> = ticket.slots.chunk_by(|a, b| a.index == b.index).collect();
        blocks.sort_unstable_by_key(|runs| block_ids[runs[0].index]);
        let mut job = JobBuilder::new(rank);
        for run in blocks.into_iter().flatten() {
            if rank.block_dense {
                push_dense_run(&mut job, rank, block_ids[run.index], run.layers.clone(), run.offset);
                continue;
            }
            for (layer, slot_offset) in slots(run) {
                push_block(&mut job, &rank.layers[layer as usize], block_ids[run.index], slot_offset);
            }
        }
        return job.finish(Direction::Save, pool);
    }
    let mut per_layer: Vec<Vec<(u64, u64)>> = vec![Vec::new(); rank.layers.len()];
    for run in &ticket.slots {
        for (layer, slot_offset) in slots(run) {
            per_layer[layer as usize].push((block_ids[run.index], slot_offset));
        }
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
    if rank.block_dense {
        let runs = consecutive_runs(layers);
        for &(block, part) in &order {
            for run in &runs {
                let slot_offset = part + ticket.geometry.layer_offset(run.start);
                push_dense_run(&mut job, rank, block, run.clone(), slot_offset);
            }
        }
        return job.finish(Direction::Load, pool);
    }
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

/// One op for layers `layers` of `block` of a dense rank: their pieces are back to back
/// on the device as their slots are in the pool, from `slot_offset`.
fn push_dense_run(job: &mut JobBuilder, rank: &RankBinding, block: u64, layers: Range<u32>, slot_offset: u64) {
    let binding = &rank.layers[layers.start as usize];
    job.push(
        binding,
        CopyOp {
            device_offset: binding.layout.segment_offset(block, 0),
            host_offset: slot_offset,
            len: rank.geometry.run_bytes(layers),
        },
    );
}

/// `layers` as runs of consecutive layers, in the order given.
fn consecutive_runs(layers: &[u32]) -> Vec<Range<u32>> {
    let mut runs: Vec<Range<u32>> = Vec::new();
    for &layer in layers {
        match runs.last_mut() {
            Some(run) if run.end == layer => run.end += 1,
            _ => runs.push(layer..layer + 1),
        }
    }
    runs
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

#[cfg(test)]
mod tests {
    use super::consecutive_runs;

    #[test]
    fn consecutive_runs_split_at_gaps_and_turns() {
        assert_eq!(consecutive_runs(&[0, 1, 2, 3]), vec![0..4]);
        assert_eq!(consecutive_runs(&[0, 1, 3, 4, 2]), vec![0..2, 3..5, 2..3]);
        assert!(consecutive_runs(&[]).is_empty());
    }
}
