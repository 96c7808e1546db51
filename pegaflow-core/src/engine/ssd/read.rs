//! Copying blocks up from the SSD into the pool: pool space is reserved as a save would
//! (evicting for room), the parts are read through an `io_uring` ring (`IoEngine`) straight
//! into that space where it is aligned for direct I/O (else through a buffer, then
//! copied), checked, and the block is sealed — or rolled back, and dropped if it was
//! corrupt.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Shared, warn_once};
use crate::cache::{BlockKey, PartGeometry, SaveSpec, SaveTicket};
use crate::engine::ssd_metrics::IoLabel;
use crate::memory::HostPool;
use crate::ssd::io::{AlignedBuf, IO_ALIGN, IoBuf, IoEngine, IoOp, LentBuf};
use crate::ssd::{PartLoc, SsdError};

/// A part being copied up: its block, where it lies, and the pool space reserved for it.
struct PartRead {
    key: usize,
    loc: PartLoc,
    ticket: SaveTicket,
    pool_offset: u64,
    len: u64,
}

/// Copies the blocks of `keys` up from the SSD into the pool, `engine.depth()` part reads
/// in flight (io_uring where the kernel allows it), window after window.
pub(super) fn prefetch_batch(shared: &Shared, engine: &mut IoEngine, keys: Vec<BlockKey>) {
    if !shared.recovery.wait() {
        end_prefetches(shared, &keys);
        return;
    }
    for window in keys.chunks(engine.depth().max(1)) {
        let mut failed = vec![false; window.len()];
        let mut reads = Vec::new();
        for (i, key) in window.iter().enumerate() {
            let parts = shared.index.lock().whole(key);
            match parts {
                Some(parts) => failed[i] |= !reserve(shared, i, key, &parts, &mut reads),
                None => failed[i] = true,
            }
        }
        for number in 0..shared.files.len() {
            let (mine, rest): (Vec<PartRead>, Vec<PartRead>) =
                reads.into_iter().partition(|r| usize::from(r.loc.file) == number);
            reads = rest;
            if !mine.is_empty() {
                read_parts(shared, engine, number, window, mine, &mut failed);
            }
        }
        let promoted = failed.iter().filter(|f| !**f).count();
        shared.metrics.ssd.promoted_blocks.inc_by(promoted as u64);
        end_prefetches(shared, window);
    }
}

fn end_prefetches(shared: &Shared, keys: &[BlockKey]) {
    let mut index = shared.index.lock();
    for key in keys {
        index.end_prefetch(key);
    }
    shared.metrics.ssd.prefetching_blocks.set(index.prefetching() as i64);
}

/// Reserves pool space for every part of block `key` (number `i` of its window), as a
/// save would (evicting for room); false when some part could not be placed.
fn reserve(shared: &Shared, i: usize, key: &BlockKey, parts: &[PartLoc], reads: &mut Vec<PartRead>) -> bool {
    for (rank, loc) in parts.iter().enumerate() {
        let file = &shared.files[usize::from(loc.file)];
        let Some(fingerprint) = shared.index.lock().layout_fingerprint(loc.layout) else { return false };
        let Some(sizes) = file.read().layout(fingerprint).map(<[u64]>::to_vec) else { return false };
        let geometry = Arc::new(PartGeometry::new(sizes));
        let layers: Vec<u32> = (0..geometry.num_layers()).collect();
        let spec = SaveSpec {
            namespace: &key.namespace,
            hashes: std::slice::from_ref(&key.hash),
            parents: &[],
            rank: rank as u32,
            tp_size: parts.len() as u32,
            geometry: &geometry,
            layers: &layers,
        };
        let prepared = shared
            .cache
            .lock()
            .prepare_save_with(&spec, |cache, victims| crate::engine::dispose_victims(&shared.metrics, cache, victims));
        let Ok(ticket) = prepared else { return false };
        let len = geometry.total();
        match ticket.first_slot_offset().filter(|_| ticket.slot_count() == layers.len()) {
            Some(pool_offset) if u64::from(loc.len) == len => {
                reads.push(PartRead { key: i, loc: *loc, ticket, pool_offset, len })
            }
            _ => {
                // Already in the pool, being saved, refused room, or a record that does
                // not match its layout: nothing to read.
                let mut cache = shared.cache.lock();
                cache.complete_save(ticket, false);
                if !cache.is_readable(key) {
                    return false;
                }
            }
        }
    }
    true
}

/// Reads `parts` from cache path `number` (one batch through `engine`), checks each and
/// copies it into its reserved pool space, then seals or rolls back its ticket. `window`:
/// the blocks the parts belong to (`PartRead::key` indexes it), `failed` is per block.
fn read_parts(
    shared: &Shared,
    engine: &mut IoEngine,
    number: usize,
    window: &[BlockKey],
    parts: Vec<PartRead>,
    failed: &mut [bool],
) {
    let label = IoLabel { direction: "read" };
    let metrics = &shared.metrics.ssd;
    let mut outcomes: Vec<Option<Result<(), SsdError>>> = (0..parts.len()).map(|_| None).collect();
    {
        let file = shared.files[number].read();
        let ops: Vec<IoOp> = parts
            .iter()
            .map(|p| IoOp::Read {
                offset: file.offset_of(p.loc.position),
                buf: lend_pool_space(&shared.pool, p).unwrap_or_else(|| {
                    metrics.copied_parts.get_or_create(&label).inc();
                    AlignedBuf::new(p.len.div_ceil(IO_ALIGN as u64) as usize * IO_ALIGN).into()
                }),
            })
            .collect();
        let by_offset: HashMap<u64, usize> =
            parts.iter().enumerate().map(|(i, p)| (file.offset_of(p.loc.position), i)).collect();
        for (op, result, latency) in engine.run_timed(file.data(), ops) {
            let IoOp::Read { offset, buf } = op else { continue };
            let Some(&i) = by_offset.get(&offset) else { continue };
            let part = &parts[i];
            metrics.io_seconds.get_or_create(&label).observe(latency.as_secs_f64());
            metrics.io_bytes.get_or_create(&label).observe(part.len as f64);
            let payload = &buf.bytes()[..part.len as usize];
            outcomes[i] = Some(
                result
                    .map_err(|source| SsdError::Io { path: file.path().to_path_buf(), op: "read", source })
                    .and_then(|()| file.check(part.loc.position, payload, part.loc.checksum))
                    .and_then(|()| match buf {
                        IoBuf::Lent(_) => Ok(()), // read in place
                        IoBuf::Owned(_) => copy_into_pool(&shared.pool, part, payload),
                    }),
            );
        }
    }
    let mut corrupt = Vec::new();
    {
        let mut cache = shared.cache.lock();
        let mut index = shared.index.lock();
        for (part, outcome) in parts.into_iter().zip(outcomes) {
            let ok = matches!(outcome, Some(Ok(())));
            match &outcome {
                Some(Ok(())) => {}
                Some(Err(e @ SsdError::Corrupt { .. })) => {
                    metrics.checksum_failures.inc();
                    tracing::warn!(error = %e, "SSD block dropped: it failed its checksum");
                    corrupt.push(part.loc.position);
                    index.remove_at(&window[part.key], part.loc.file, part.loc.position);
                }
                // Newer blocks took its place: a miss.
                Some(Err(SsdError::Overwritten(_))) => {
                    index.remove_at(&window[part.key], part.loc.file, part.loc.position);
                }
                Some(Err(e)) => {
                    metrics.io_errors.get_or_create(&label).inc();
                    warn_once(e);
                }
                // The ring failed before the read completed.
                None => {
                    metrics.io_errors.get_or_create(&label).inc();
                }
            }
            failed[part.key] |= !ok;
            if outcome.is_none() {
                // The kernel may still write into the part's pool space (it was lent to
                // the read): it stays reserved for good rather than go to another block.
                std::mem::forget(part.ticket);
                continue;
            }
            cache.complete_save(part.ticket, ok);
        }
        metrics.blocks.set(index.len() as i64);
    }
    if !corrupt.is_empty() {
        // Forgotten durably, so a restart does not find them again.
        let mut file = shared.files[number].write();
        for position in corrupt {
            let _ = file.drop_block(position);
        }
    }
}

/// The pool space reserved for `part`, lent to its read, where it is aligned for direct
/// I/O and the part's length is whole extents (so the read writes nothing beyond it).
fn lend_pool_space(pool: &HostPool, part: &PartRead) -> Option<IoBuf> {
    let ptr = pool.ptr_at(part.pool_offset, part.len)?;
    let len = usize::try_from(part.len).ok()?;
    // SAFETY: the range lies inside the pool (checked by `ptr_at`) and its slots are
    // reserved for this part's ticket (being written, pinned): nothing else reads or
    // writes them until the ticket completes, after the read is handed back — or never,
    // if the ring fails (`read_parts` then keeps the ticket).
    unsafe { LentBuf::new(ptr, len) }.map(IoBuf::Lent)
}

/// Copies a part read from the SSD into the pool space reserved for it.
fn copy_into_pool(pool: &HostPool, part: &PartRead, payload: &[u8]) -> Result<(), SsdError> {
    let ptr = pool
        .ptr_at(part.pool_offset, part.len)
        .ok_or_else(|| SsdError::Config("a pool range outside the pool".into()))?;
    // SAFETY: the range lies inside the pool (checked by `ptr_at`) and its slots are
    // reserved for this part's ticket (being written, pinned): nothing else reads or
    // writes them until the ticket completes.
    let out = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), part.len as usize) };
    out.copy_from_slice(payload);
    Ok(())
}
