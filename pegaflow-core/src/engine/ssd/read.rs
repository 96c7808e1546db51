//! Copying blocks up from the SSD into the pool: pool space is reserved as a save would
//! (evicting for room), the parts stream through an `io_uring` ring (`IoEngine::stream`)
//! straight into that space where it is aligned for direct I/O (else through a buffer,
//! then copied), each is checked and sealed as it completes — or rolled back, and
//! dropped if it was corrupt.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use super::{Shared, warn_once};
use crate::cache::{BlockKey, PartGeometry, SaveSpec, SaveTicket};
use crate::engine::ssd_metrics::IoLabel;
use crate::memory::HostPool;
use crate::ssd::io::{AlignedBuf, Completed, IO_ALIGN, IoBuf, IoEngine, IoOp, LentBuf};
use crate::ssd::{PartLoc, SsdError};

/// A part being copied up: its block, where it lies, and the pool space reserved for it.
struct PartRead {
    key: usize,
    loc: PartLoc,
    ticket: SaveTicket,
    pool_offset: u64,
    len: u64,
}

/// Copies the blocks of `keys` up from the SSD into the pool: per cache path, their parts
/// stream through the ring (`engine.depth()` reads in flight all along), each block's
/// pool space reserved as the stream reaches it and each part sealed as it completes.
pub(super) fn prefetch_batch(shared: &Shared, engine: &mut IoEngine, keys: Vec<BlockKey>) {
    if !shared.recovery.wait() {
        end_prefetches(shared, &keys);
        return;
    }
    let mut by_file: Vec<Vec<(BlockKey, Vec<PartLoc>)>> = vec![Vec::new(); shared.files.len()];
    for key in keys {
        let parts = shared.index.lock().whole(&key).filter(|parts| !parts.is_empty());
        // A block's parts lie on the cache path its hash picked. Parts on several paths
        // (ranks saved before and after the paths changed) are a miss: not copied up.
        let file = parts.as_ref().and_then(|parts| {
            let file = parts[0].file;
            parts.iter().all(|p| p.file == file).then_some(usize::from(file))
        });
        match (parts, file.and_then(|f| by_file.get_mut(f))) {
            (Some(parts), Some(blocks)) => blocks.push((key, parts)),
            _ => end_prefetches(shared, std::slice::from_ref(&key)),
        }
    }
    for (number, blocks) in by_file.into_iter().enumerate() {
        if !blocks.is_empty() {
            copy_up(shared, engine, number, blocks);
        }
    }
}

/// The state of one cache path's copy-up stream.
struct CopyUp {
    blocks: Vec<(BlockKey, Vec<PartLoc>)>,
    /// The next block to reserve.
    next_block: usize,
    /// Parts reserved and not yet handed to the ring.
    queued: VecDeque<PartRead>,
    /// Parts handed to the ring, by tag; `None` once completed.
    reading: Vec<Option<PartRead>>,
    /// Per block: parts still being read, and whether one failed.
    left: Vec<usize>,
    failed: Vec<bool>,
}

/// Streams the parts of `blocks` from cache path `number` into the pool.
fn copy_up(shared: &Shared, engine: &mut IoEngine, number: usize, blocks: Vec<(BlockKey, Vec<PartLoc>)>) {
    let label = IoLabel { direction: "read" };
    let metrics = &shared.metrics.ssd;
    // A handle of its own, so the data file's lock is held only to check each part
    // (writers reserve and record meanwhile).
    let data = match shared.files[number].read().data().try_clone() {
        Ok(data) => data,
        Err(source) => {
            let path = shared.files[number].read().path().to_path_buf();
            metrics.io_errors.get_or_create(&label).inc_by(blocks.len() as u64);
            warn_once(&SsdError::Io { path, op: "read", source });
            let keys: Vec<BlockKey> = blocks.into_iter().map(|(key, _)| key).collect();
            end_prefetches(shared, &keys);
            return;
        }
    };
    let n = blocks.len();
    let state = RefCell::new(CopyUp {
        blocks,
        next_block: 0,
        queued: VecDeque::new(),
        reading: Vec::new(),
        left: vec![0; n],
        failed: vec![false; n],
    });
    let next = || {
        let mut st = state.borrow_mut();
        loop {
            if let Some(part) = st.queued.pop_front() {
                let file = shared.files[number].read();
                let offset = file.offset_of(part.loc.position);
                drop(file);
                let buf = lend_pool_space(&shared.pool, &part).unwrap_or_else(|| {
                    metrics.copied_parts.get_or_create(&label).inc();
                    AlignedBuf::new(part.len.div_ceil(IO_ALIGN as u64) as usize * IO_ALIGN).into()
                });
                let tag = st.reading.len();
                st.reading.push(Some(part));
                return Some((tag, IoOp::Read { offset, buf }));
            }
            let i = st.next_block;
            if i == st.blocks.len() {
                return None;
            }
            st.next_block += 1;
            let mut reads = Vec::new();
            let (key, parts) = &st.blocks[i];
            let placed = reserve(shared, i, key, parts, &mut reads);
            st.failed[i] |= !placed;
            st.left[i] = reads.len();
            st.queued.extend(reads);
            if st.left[i] == 0 {
                finish_block(shared, &st, i);
            }
        }
    };
    let done = |end: Completed| {
        let mut st = state.borrow_mut();
        let Some(part) = st.reading.get_mut(end.tag).and_then(Option::take) else { return };
        let IoOp::Read { buf, .. } = end.op else { return };
        metrics.io_seconds.get_or_create(&label).observe(end.latency.as_secs_f64());
        metrics.io_bytes.get_or_create(&label).observe(part.len as f64);
        let payload = &buf.bytes()[..part.len as usize];
        let outcome = end
            .result
            .map_err(|source| SsdError::Io {
                path: shared.files[number].read().path().to_path_buf(),
                op: "read",
                source,
            })
            .and_then(|()| shared.files[number].read().check(part.loc.position, payload, part.loc.checksum))
            .and_then(|()| match buf {
                IoBuf::Lent(_) => Ok(()), // read in place
                IoBuf::Owned(_) => copy_into_pool(&shared.pool, &part, payload),
            });
        let i = part.key;
        let ok = settle(shared, number, &st.blocks[i].0, part, outcome);
        st.failed[i] |= !ok;
        st.left[i] -= 1;
        if st.left[i] == 0 {
            finish_block(shared, &st, i);
        }
    };
    let outcome = engine.stream(&data, next, done);
    let st = state.into_inner();
    if outcome.is_err() {
        metrics.io_errors.get_or_create(&label).inc();
        let mut cache = shared.cache.lock();
        // Reserved, never read: rolled back.
        for part in st.queued {
            cache.complete_save(part.ticket, false);
        }
        // In flight when the ring failed: the kernel may still write into their pool
        // space (lent to the reads), which stays reserved for good rather than go to
        // another block.
        for part in st.reading.into_iter().flatten() {
            std::mem::forget(part.ticket);
        }
        drop(cache);
        let unfinished: Vec<BlockKey> = st.blocks.into_iter().map(|(key, _)| key).collect();
        end_prefetches(shared, &unfinished);
    }
    metrics.blocks.set(shared.index.lock().len() as i64);
}

/// Block `i` of the stream has every part read (or refused): counted, its prefetch over.
fn finish_block(shared: &Shared, st: &CopyUp, i: usize) {
    if !st.failed[i] {
        shared.metrics.ssd.promoted_blocks.inc();
    }
    end_prefetches(shared, std::slice::from_ref(&st.blocks[i].0));
}

/// Seals a part read into the pool, or rolls it back (and forgets it on the SSD when it
/// failed its checksum or was overwritten). True when it was sealed.
fn settle(shared: &Shared, number: usize, key: &BlockKey, part: PartRead, outcome: Result<(), SsdError>) -> bool {
    let metrics = &shared.metrics.ssd;
    let ok = outcome.is_ok();
    let mut corrupt = false;
    {
        let mut cache = shared.cache.lock();
        let mut index = shared.index.lock();
        match &outcome {
            Ok(()) => {}
            Err(e @ SsdError::Corrupt { .. }) => {
                metrics.checksum_failures.inc();
                tracing::warn!(error = %e, "SSD block dropped: it failed its checksum");
                index.remove_at(key, part.loc.file, part.loc.position);
                corrupt = true;
            }
            // Newer blocks took its place: a miss.
            Err(SsdError::Overwritten(_)) => index.remove_at(key, part.loc.file, part.loc.position),
            Err(e) => {
                metrics.io_errors.get_or_create(&IoLabel { direction: "read" }).inc();
                warn_once(e);
            }
        }
        cache.complete_save(part.ticket, ok);
    }
    if corrupt {
        // Forgotten durably, so a restart does not find it again.
        let _ = shared.files[number].write().drop_block(part.loc.position);
    }
    ok
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
