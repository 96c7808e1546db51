//! Gather through device-to-device copies: a fragmented request is collected into a
//! device staging slot by `cuMemcpyDtoDAsync` / batched copies (no kernel of ours), and
//! the slot moves to or from the pool as a few large DMAs.
//!
//! Each slot has its own stream that carries both its device copies and its DMAs, so
//! stream order alone keeps a slot from being refilled before its DMA has drained it: no
//! events, no host waits until the end of the request. Slots on different streams
//! overlap: one slot's device copies run while another's DMA uses the link.
//!
//! Measured on the H100 (docs/benchmarks.md, session 3): 256 × 2 MiB in 10.0 ms (direct
//! DMAs: 10.6 ms), but a concurrent GEMM in the inference engine's process ran 17% slower
//! — device-to-device copies in the server's context make the GPU time-slice between the
//! contexts just as the gather kernel does — and 16,384 × 32 KiB took 80 ms. So it is
//! opt-in (`PEGAFLOW_CUDA_STRATEGY=ce-gather`), for GPUs the server has to itself.

use super::driver::{CopyKind, DeviceBuffer, Result, Stream};
use super::host_ptr;
use super::plan::{Chunk, Segment, StagedSegment, plan_staged};
use crate::device::Direction;
use crate::memory::HostPool;

/// Chunks with more device copies than this use one batched call (CUDA 13+ drivers):
/// the driver spends ~0.9 µs of CPU per batched copy against ~2–3 µs per single call.
const BATCH_MIN: usize = 16;

struct Slot {
    staging: DeviceBuffer,
    stream: Stream,
}

/// The staging slots of one copy worker.
pub(crate) struct CeGather {
    slots: Vec<Slot>,
    slot_bytes: u64,
    batch: bool,
}

impl CeGather {
    /// `slots` slots of `slot_bytes` each in the current context; `batch` when the driver
    /// has `cuMemcpyBatchAsync`.
    pub fn new(slots: usize, slot_bytes: u64, batch: bool) -> Result<Self> {
        let slots = (0..slots.max(2))
            .map(|_| Ok(Slot { staging: DeviceBuffer::new(slot_bytes)?, stream: Stream::new()? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, slot_bytes, batch })
    }

    /// Moves `segments` in `direction` and returns once every copy is done (also after an
    /// error: nothing stays in flight).
    pub fn run(&self, pool: &HostPool, segments: Vec<Segment>, direction: Direction) -> Result<()> {
        let chunks = plan_staged(segments, self.slot_bytes, usize::MAX);
        let mut outcome = Ok(());
        for (i, chunk) in chunks.iter().enumerate() {
            let slot = &self.slots[i % self.slots.len()];
            if let Err(e) = self.queue(pool, slot, chunk, direction) {
                outcome = Err(e);
                break;
            }
        }
        for slot in &self.slots {
            let drained = slot.stream.synchronize();
            if outcome.is_ok() {
                outcome = drained;
            }
        }
        outcome
    }

    fn queue(&self, pool: &HostPool, slot: &Slot, chunk: &Chunk, direction: Direction) -> Result<()> {
        match direction {
            Direction::Save => {
                self.device_copies(slot, chunk, direction)?;
                for d in &chunk.dmas {
                    let host = host_ptr(pool, d.host_offset, d.len)?;
                    // SAFETY: pool range checked and owned by the job until the streams are
                    // drained; the staging range is inside the slot and was filled earlier
                    // on this same stream.
                    unsafe { slot.stream.copy_to_host(host, slot.staging.ptr + d.staging_offset, d.len)? };
                }
            }
            Direction::Load => {
                for d in &chunk.dmas {
                    let host = host_ptr(pool, d.host_offset, d.len)?;
                    // SAFETY: as above, in the other direction; the slot's previous scatter
                    // is ahead of this copy on the same stream.
                    unsafe { slot.stream.copy_to_device(slot.staging.ptr + d.staging_offset, host, d.len)? };
                }
                self.device_copies(slot, chunk, direction)?;
            }
        }
        Ok(())
    }

    /// Queues the chunk's device ↔ staging copies on the slot's stream.
    fn device_copies(&self, slot: &Slot, chunk: &Chunk, direction: Direction) -> Result<()> {
        let pair = |s: &StagedSegment| {
            let staging = slot.staging.ptr + s.staging_offset;
            match direction {
                Direction::Save => (staging, s.device_ptr),
                Direction::Load => (s.device_ptr, staging),
            }
        };
        if self.batch && chunk.segments.len() > BATCH_MIN {
            let (mut dsts, mut srcs, mut sizes): (Vec<u64>, Vec<u64>, Vec<usize>) =
                chunk.segments.iter().map(|s| (pair(s).0, pair(s).1, s.len as usize)).collect();
            // SAFETY: every device range is inside a live registered region (engine-validated)
            // or the slot, kept alive until the stream is drained.
            return unsafe { slot.stream.copy_batch(&mut dsts, &mut srcs, &mut sizes, CopyKind::OnDevice) };
        }
        for s in &chunk.segments {
            let (dst, src) = pair(s);
            // SAFETY: as above.
            unsafe { slot.stream.copy_on_device(dst, src, s.len)? };
        }
        Ok(())
    }
}
