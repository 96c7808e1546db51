//! Writing sealed blocks to the SSD: each part of a pinned block goes to the cache path
//! its hash picks, and the tier's index learns where it lies.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Shared, warn_once};
use crate::cache::{BlockHash, PartGeometry, PinnedBlock};
use crate::engine::ssd_metrics::IoLabel;
use crate::ssd::{BlockId, PartId, PartLoc};

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

/// Writes every part of each pinned block, then unpins it.
pub(super) fn write_batch(shared: &Shared, batch: Vec<PinnedBlock>) {
    let metrics = &shared.metrics.ssd;
    metrics.write_queue_batches.dec();
    if !shared.recovery.wait() {
        metrics.dropped_writes.inc_by(batch.len() as u64);
        shared.cache.lock().unpin_blocks(batch.iter().map(|b| &b.key));
        shared.pinned.fetch_sub(batch.iter().map(PinnedBlock::bytes).sum(), Ordering::AcqRel);
        return;
    }
    let label = IoLabel { direction: "write" };
    for block in &batch {
        let number = file_of(&block.key.hash, shared.files.len());
        for part in &block.parts {
            let len = part.geometry.total();
            let Some(ptr) = shared.pool.ptr_at(part.offset, len) else { continue };
            // SAFETY: the part lies inside the pool (checked by `ptr_at`) and is pinned and
            // sealed: no save writes it and no eviction frees it until it is unpinned below.
            let data = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len as usize) };
            let (Ok(rank), Ok(of)) = (u16::try_from(part.rank), u16::try_from(block.tp_size)) else { continue };
            let id = BlockId {
                namespace: block.key.namespace.to_string(),
                hash: block.key.hash,
                part: PartId { rank, of }.to_u32(),
                layout: fingerprint(&part.geometry),
            };
            let layout = id.layout;
            let started = Instant::now();
            let written = {
                let mut file = shared.files[number].write();
                file.add_layout(layout, part.geometry.layer_sizes())
                    .and_then(|()| file.write(id, data))
                    .map(|record| (record, file.head()))
            };
            match written {
                Ok((record, head)) => {
                    metrics.io_seconds.get_or_create(&label).observe(started.elapsed().as_secs_f64());
                    metrics.io_bytes.get_or_create(&label).observe(len as f64);
                    let mut index = shared.index.lock();
                    index.advance(number as u16, head);
                    if let Some(layout) = index.layout_id(layout, record.len) {
                        let loc = PartLoc {
                            position: record.offset,
                            checksum: record.checksum,
                            len: record.len,
                            file: number as u16,
                            layout,
                        };
                        index.insert(&block.key, PartId { rank, of }, loc);
                    }
                    metrics.blocks.set(index.len() as i64);
                }
                Err(e) => {
                    metrics.io_errors.get_or_create(&label).inc();
                    warn_once(&e);
                }
            }
        }
    }
    shared.cache.lock().unpin_blocks(batch.iter().map(|b| &b.key));
    shared.pinned.fetch_sub(batch.iter().map(PinnedBlock::bytes).sum(), Ordering::AcqRel);
}
