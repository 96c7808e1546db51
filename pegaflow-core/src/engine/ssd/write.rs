//! Writing sealed blocks to the SSD: each part of a pinned block goes to the cache path
//! its hash picks — space reserved at the write head, the bytes written through an
//! `io_uring` ring (`IoEngine`) straight from the pool where they are aligned for direct
//! I/O (else copied into a buffer first), then recorded — and the tier's index learns
//! where it lies.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use parking_lot::RwLock;

use super::{Shared, warn_once};
use crate::cache::{BlockHash, PartGeometry, PinnedBlock, PinnedPart};
use crate::engine::ssd_metrics::IoLabel;
use crate::ssd::io::{AlignedBuf, IoBuf, IoEngine, IoOp, LentBuf};
use crate::ssd::{BlockFile, BlockId, PartId, PartLoc, Reserved, SsdError};

/// The layout fingerprint of a part: xxh3 of its layer sizes.
fn fingerprint(geometry: &PartGeometry) -> u64 {
    let bytes: Vec<u8> = geometry.layer_sizes().iter().flat_map(|b| b.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Which cache path a block goes to.
fn file_of(hash: &BlockHash, files: usize) -> usize {
    let mut head = [0u8; 8];
    head.copy_from_slice(&hash[..8]);
    (u64::from_le_bytes(head) % files.max(1) as u64) as usize
}

/// One part on its way to the SSD: whose it is, where it goes, its bytes.
struct PartWrite {
    block: usize,
    part: PartId,
    id: BlockId,
    reserved: Reserved,
    len: u32,
    checksum: u64,
    buf: Option<IoBuf>,
}

/// Parts written in one run of the ring: `depth` writes stay in flight through a run, and
/// the bookkeeping between runs (reserving, recording) leaves the disk idle, so runs are
/// long — but never more than a quarter of the data file, so that a run does not wrap
/// over its own extents.
const RUN_PARTS: usize = 64;

/// `parts` cut into runs of at most [`RUN_PARTS`] parts and `max_bytes` bytes (a part
/// larger than that is a run of its own).
fn runs<T>(parts: &[T], bytes: impl Fn(&T) -> u64, max_bytes: u64) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut total) = (0, 0u64);
    for (i, part) in parts.iter().enumerate() {
        let len = bytes(part);
        if i > start && (i - start == RUN_PARTS || total + len > max_bytes) {
            out.push(&parts[start..i]);
            (start, total) = (i, 0);
        }
        total += len;
    }
    if start < parts.len() {
        out.push(&parts[start..]);
    }
    out
}

/// Writes every part of each pinned block (runs of parts per cache path, `engine.depth()`
/// writes in flight through io_uring), records them, then unpins the blocks.
pub(super) fn write_batch(shared: &Shared, engine: &mut IoEngine, batch: Vec<PinnedBlock>) {
    let metrics = &shared.metrics.ssd;
    metrics.write_queue_batches.dec();
    if shared.recovery.wait() {
        for number in 0..shared.files.len() {
            let mine: Vec<(usize, &PinnedPart)> = batch
                .iter()
                .enumerate()
                .filter(|(_, block)| file_of(&block.key.hash, shared.files.len()) == number)
                .flat_map(|(b, block)| block.parts.iter().map(move |p| (b, p)))
                .collect();
            let max_bytes = shared.files[number].read().capacity() / 4;
            for run in runs(&mine, |(_, part)| part.geometry.total(), max_bytes) {
                write_parts(shared, engine, number, &batch, run);
            }
        }
    } else {
        metrics.dropped_writes.inc_by(batch.len() as u64);
    }
    shared.cache.lock().unpin_blocks(batch.iter().map(|b| &b.key));
    shared.pinned.fetch_sub(batch.iter().map(PinnedBlock::bytes).sum(), Ordering::AcqRel);
}

/// Writes `parts` (of `batch`'s blocks) to cache path `number`: space reserved at the
/// head, the bytes written in one run of the ring, the ones written recorded and
/// indexed.
fn write_parts(
    shared: &Shared,
    engine: &mut IoEngine,
    number: usize,
    batch: &[PinnedBlock],
    parts: &[(usize, &PinnedPart)],
) {
    let label = IoLabel { direction: "write" };
    let metrics = &shared.metrics.ssd;
    let mut writes = Vec::with_capacity(parts.len());
    {
        for &(b, part) in parts {
            match prepare(shared, &shared.files[number], &batch[b], b, part) {
                Ok(Some(write)) => writes.push(write),
                Ok(None) => {}
                Err(e) => {
                    metrics.io_errors.get_or_create(&label).inc();
                    warn_once(&e);
                }
            }
        }
    }
    let positions: HashMap<u64, usize> = writes.iter().enumerate().map(|(i, w)| (w.reserved.offset, i)).collect();
    let ops: Vec<IoOp> =
        writes.iter_mut().filter_map(|w| Some(IoOp::Write { offset: w.reserved.offset, buf: w.buf.take()? })).collect();
    // The data file is only read meanwhile: copies up from it go on.
    let done = {
        let file = shared.files[number].read();
        engine.run_timed(file.data(), ops)
    };
    let mut written = Vec::with_capacity(done.len());
    for (op, result, latency) in done {
        let IoOp::Write { offset, .. } = op else { continue };
        let Some(&i) = positions.get(&offset) else { continue };
        match result {
            Ok(()) => {
                metrics.io_seconds.get_or_create(&label).observe(latency.as_secs_f64());
                metrics.io_bytes.get_or_create(&label).observe(f64::from(writes[i].len));
                written.push(i);
            }
            Err(e) => {
                metrics.io_errors.get_or_create(&label).inc();
                warn_once(&SsdError::Io {
                    path: shared.files[number].read().path().to_path_buf(),
                    op: "write",
                    source: e,
                });
            }
        }
    }
    let mut records = Vec::with_capacity(written.len());
    let head = {
        let mut file = shared.files[number].write();
        for i in written {
            let w = &writes[i];
            match file.commit(w.id.clone(), &w.reserved, w.len, w.checksum) {
                Ok(record) => records.push((w.block, w.part, record)),
                Err(e) => {
                    metrics.io_errors.get_or_create(&label).inc();
                    warn_once(&e);
                }
            }
        }
        file.head()
    };
    let mut index = shared.index.lock();
    index.advance(number as u16, head);
    for (block, part, record) in records {
        if let Some(layout) = index.layout_id(record.id.layout, record.len) {
            let loc = PartLoc {
                position: record.offset,
                checksum: record.checksum,
                len: record.len,
                file: number as u16,
                layout,
            };
            index.insert(&batch[block].key, part, loc);
        }
    }
    metrics.blocks.set(index.len() as i64);
}

/// Sums one part and reserves space for it in `file`; its bytes are lent from the pool,
/// or copied out of it where they are not aligned for direct I/O.
fn prepare(
    shared: &Shared,
    file: &RwLock<BlockFile>,
    block: &PinnedBlock,
    index: usize,
    part: &PinnedPart,
) -> Result<Option<PartWrite>, SsdError> {
    let len = part.geometry.total();
    let (Some(ptr), Ok(rank), Ok(of), Ok(len32)) = (
        shared.pool.ptr_at(part.offset, len),
        u16::try_from(part.rank),
        u16::try_from(block.tp_size),
        u32::try_from(len),
    ) else {
        return Ok(None);
    };
    // SAFETY: the part lies inside the pool (checked by `ptr_at`) and is pinned and
    // sealed: no save writes it and no eviction frees it until the batch unpins it.
    let data = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len as usize) };
    let layout = fingerprint(&part.geometry);
    // Summed before the file is locked: readers of the file wait meanwhile.
    let checksum = xxhash_rust::xxh3::xxh3_64(data);
    let reserved = {
        let mut file = file.write();
        file.add_layout(layout, part.geometry.layer_sizes())?;
        file.reserve(layout, len)?
    };
    // SAFETY: as above — nothing writes the part's bytes, and they stay allocated (pinned)
    // until the batch unpins them, after `write_parts` got every write back.
    let lent = unsafe { LentBuf::new(ptr, data.len()) }.filter(|_| reserved.extent == len);
    let buf = lent.map(IoBuf::Lent).unwrap_or_else(|| {
        shared.metrics.ssd.copied_parts.get_or_create(&IoLabel { direction: "write" }).inc();
        let mut buf = AlignedBuf::new(reserved.extent as usize);
        buf.bytes_mut()[..data.len()].copy_from_slice(data);
        buf.into()
    });
    let part_id = PartId { rank, of };
    Ok(Some(PartWrite {
        block: index,
        part: part_id,
        id: BlockId {
            namespace: block.key.namespace.to_string(),
            hash: block.key.hash,
            part: part_id.to_u32(),
            layout,
        },
        reserved,
        len: len32,
        checksum,
        buf: Some(buf),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(runs: &[&[u64]]) -> Vec<usize> {
        runs.iter().map(|run| run.len()).collect()
    }

    #[test]
    fn runs_are_bounded_by_parts_and_bytes() {
        let parts = vec![10u64; 150];
        assert_eq!(lens(&runs(&parts, |&b| b, u64::MAX)), [RUN_PARTS, RUN_PARTS, 150 - 2 * RUN_PARTS]);
        assert_eq!(lens(&runs(&parts, |&b| b, 25)), vec![2; 75], "at most 25 bytes a run");
        // A part above the bound is a run of its own; nothing is left out.
        assert_eq!(lens(&runs(&[5, 100, 5, 5], |&b| b, 20)), [1, 1, 2]);
        assert!(runs(&[] as &[u64], |&b| b, 20).is_empty());
    }
}
