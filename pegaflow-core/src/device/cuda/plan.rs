//! How a request's scattered segments move through the GPU staging buffer: the pure
//! planning half of the copy engine (no CUDA here, so CI tests it).
//!
//! vLLM's paged layout scatters a request over thousands of small device segments while
//! its pool side is a few contiguous runs. One DMA per segment costs ~3 µs each (measured
//! on the H100: 47–53 ms for 16,384 × 32 KiB, 5× under the link), so fragmented requests
//! are gathered on the GPU into a staging buffer (HBM speed) and moved with large DMAs,
//! chunk by chunk, double-buffered. Requests whose segments are already large go as
//! direct DMAs.

/// One copy: `len` bytes between a device address and a pool offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Absolute device address.
    pub device_ptr: u64,
    /// Byte offset in the host pool.
    pub host_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// A DMA between the pool and the staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dma {
    /// Byte offset in the host pool.
    pub host_offset: u64,
    /// Byte offset in the staging slot.
    pub staging_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// A segment copied by the GPU kernel between its device address and the staging slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedSegment {
    /// Absolute device address.
    pub device_ptr: u64,
    /// Byte offset in the staging slot.
    pub staging_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// What fits in one staging slot: the kernel's segment table and the DMAs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Pool ↔ staging transfers, contiguous on both sides.
    pub dmas: Vec<Dma>,
    /// Device ↔ staging copies done by the kernel.
    pub segments: Vec<StagedSegment>,
}

/// Which way to move a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One DMA per (coalesced) segment.
    Direct,
    /// The driver's batched copy over several streams: copy engines only (default for
    /// fragmented requests on CUDA 13+ drivers; leaves the inference engine's kernels alone).
    Batched,
    /// GPU gather/scatter through the staging buffer, pipelined with large DMAs: the
    /// fastest per request, but its kernels make the GPU time-slice with the client's
    /// context (opt-in, and the fallback on drivers without the batched copy).
    Staged,
    /// Gather/scatter through the staging buffer by device-to-device copies instead of a
    /// kernel, pipelined with large DMAs. Opt-in: on the H100 it moved 256 × 2 MiB in
    /// 10.0 ms but slowed a concurrent GEMM by 17% (device-to-device copies in the
    /// server's context time-slice with the engine like kernels do), and 16,384 × 32 KiB
    /// took 80 ms.
    CeGather,
}

/// Segments at least this large on average count as large: the ~3 µs fixed cost of a
/// DMA is then under 10% of its transfer time at ~55 GB/s, so no gather is needed.
pub const LARGE_AVG_BYTES: u64 = 2 << 20;
/// Requests of at most this many segments go as direct DMAs (a kernel launch and an
/// extra hop are not worth it).
pub const DIRECT_MAX_SEGMENTS: usize = 4;
/// Requests of large segments go as direct DMAs up to this many segments, and as one
/// batched call beyond: on the H100, 256 × 2 MiB took 10.6 ms as direct DMAs and 10.0 ms
/// as batches (the driver chains them without the per-copy gap), while 16 × 2 MiB was
/// the same either way (docs/benchmarks.md, session 3).
pub const DIRECT_MAX_LARGE_SEGMENTS: usize = 16;

/// Whether `segments` are large on average (see [`LARGE_AVG_BYTES`]).
pub fn is_large(segments: &[Segment]) -> bool {
    let total: u64 = segments.iter().map(|s| s.len).sum();
    total / segments.len().max(1) as u64 >= LARGE_AVG_BYTES
}

/// Picks the strategy for a request. `batched`: the driver has the batched copy (CUDA
/// 13+); without it fragmented requests fall back to the staged gather.
pub fn choose(segments: &[Segment], batched: bool) -> Strategy {
    match (segments.len(), is_large(segments), batched) {
        (n, _, _) if n <= DIRECT_MAX_SEGMENTS => Strategy::Direct,
        (n, true, true) if n > DIRECT_MAX_LARGE_SEGMENTS => Strategy::Batched,
        (_, true, _) => Strategy::Direct,
        (_, false, true) => Strategy::Batched,
        (_, false, false) => Strategy::Staged,
    }
}

/// `segment` as pieces of at most `max` bytes, in order (one piece when `max` is 0). A
/// copy engine works through one DMA at a time: a 128 MiB DMA (a staged chunk coalesced
/// into one run) holds it for 2.4 ms, and the inference engine's own small copies on
/// it wait behind that.
pub fn pieces(segment: Segment, max: u64) -> impl Iterator<Item = Segment> {
    let step = if max == 0 { segment.len.max(1) } else { max };
    (0..segment.len).step_by(step as usize).map(move |at| Segment {
        device_ptr: segment.device_ptr + at,
        host_offset: segment.host_offset + at,
        len: step.min(segment.len - at),
    })
}

/// Splits `segments` into chunks of at most `slot_bytes` staged bytes and at most
/// `max_table` kernel entries. Segments are ordered by pool offset so each chunk's pool
/// side collapses into few large DMAs; a segment larger than the room left is split.
pub fn plan_staged(mut segments: Vec<Segment>, slot_bytes: u64, max_table: usize) -> Vec<Chunk> {
    // Run-adaptive stable sort: the engine emits segments in a few ascending runs.
    if !segments.is_sorted_by_key(|s| s.host_offset) {
        segments.sort_by_key(|s| s.host_offset);
    }
    let mut chunks = Vec::new();
    let mut chunk = Chunk::default();
    let mut pos = 0u64;
    for mut seg in segments {
        while seg.len > 0 {
            if pos == slot_bytes || chunk.segments.len() == max_table {
                chunks.push(std::mem::take(&mut chunk));
                pos = 0;
            }
            let take = seg.len.min(slot_bytes - pos);
            chunk.segments.push(StagedSegment { device_ptr: seg.device_ptr, staging_offset: pos, len: take });
            match chunk.dmas.last_mut() {
                Some(d) if d.host_offset + d.len == seg.host_offset && d.staging_offset + d.len == pos => d.len += take,
                _ => chunk.dmas.push(Dma { host_offset: seg.host_offset, staging_offset: pos, len: take }),
            }
            pos += take;
            seg.device_ptr += take;
            seg.host_offset += take;
            seg.len -= take;
        }
    }
    if !chunk.segments.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(device_ptr: u64, host_offset: u64, len: u64) -> Segment {
        Segment { device_ptr, host_offset, len }
    }

    /// Replays a plan byte by byte: every (device, host) byte pair must be covered once.
    fn pairs(chunks: &[Chunk], slot: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for c in chunks {
            let mut host_of = vec![u64::MAX; slot as usize];
            for d in &c.dmas {
                for i in 0..d.len {
                    host_of[(d.staging_offset + i) as usize] = d.host_offset + i;
                }
            }
            for s in &c.segments {
                for i in 0..s.len {
                    out.push((s.device_ptr + i, host_of[(s.staging_offset + i) as usize]));
                }
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn scattered_device_segments_become_one_dma_per_contiguous_pool_run() {
        // 8 segments of 32 B, scattered on the device, two pool runs of 4.
        let segments: Vec<_> = (0..8u64)
            .map(|i| seg(10_000 + (7 - i) * 1000, if i < 4 { i * 32 } else { 500 + (i - 4) * 32 }, 32))
            .collect();
        let chunks = plan_staged(segments.clone(), 1 << 20, 1024);
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0].dmas,
            vec![
                Dma { host_offset: 0, staging_offset: 0, len: 128 },
                Dma { host_offset: 500, staging_offset: 128, len: 128 }
            ]
        );
        let mut want: Vec<(u64, u64)> =
            segments.iter().flat_map(|s| (0..s.len).map(move |i| (s.device_ptr + i, s.host_offset + i))).collect();
        want.sort_unstable();
        assert_eq!(pairs(&chunks, 1 << 20), want);
    }

    #[test]
    fn chunks_respect_slot_size_and_table_limit_and_split_large_segments() {
        let segments = vec![seg(0, 0, 100), seg(1000, 100, 250), seg(5000, 350, 10)];
        let chunks = plan_staged(segments.clone(), 128, 1024);
        assert!(chunks.iter().all(|c| c.segments.iter().map(|s| s.len).sum::<u64>() <= 128));
        assert_eq!(chunks.iter().map(|c| c.segments.iter().map(|s| s.len).sum::<u64>()).sum::<u64>(), 360);
        let mut want: Vec<(u64, u64)> =
            segments.iter().flat_map(|s| (0..s.len).map(move |i| (s.device_ptr + i, s.host_offset + i))).collect();
        want.sort_unstable();
        assert_eq!(pairs(&chunks, 128), want);
        let limited = plan_staged((0..10).map(|i| seg(i * 100, i * 8, 8)).collect(), 1 << 20, 3);
        assert_eq!(limited.iter().map(|c| c.segments.len()).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
    }

    #[test]
    fn pieces_cover_a_segment_in_order_within_the_cap() {
        let s = seg(1 << 30, 4096, 10 * 1024 + 7);
        let got: Vec<_> = pieces(s, 4096).collect();
        assert_eq!(
            got,
            vec![seg(1 << 30, 4096, 4096), seg((1 << 30) + 4096, 8192, 4096), seg((1 << 30) + 8192, 12_288, 2055)]
        );
        assert_eq!(pieces(s, 0).collect::<Vec<_>>(), vec![s]);
        assert_eq!(pieces(s, 1 << 20).collect::<Vec<_>>(), vec![s]);
        assert_eq!(pieces(seg(0, 0, 8192), 4096).count(), 2);
        assert_eq!(pieces(seg(0, 0, 0), 4096).count(), 0);
    }

    #[test]
    fn strategy_follows_segment_size_and_count() {
        let small: Vec<_> = (0..16_384).map(|i| seg(i * 32_768, i * 32_768, 32_768)).collect();
        assert_eq!(choose(&small, true), Strategy::Batched);
        assert_eq!(choose(&small, false), Strategy::Staged);
        let large: Vec<_> = (0..256).map(|i| seg(i << 22, i << 22, 2 << 20)).collect();
        assert_eq!(choose(&large, true), Strategy::Batched);
        assert_eq!(choose(&large, false), Strategy::Direct);
        assert_eq!(choose(&large[..16], true), Strategy::Direct);
        assert_eq!(choose(&small[..3], true), Strategy::Direct);
    }
}
