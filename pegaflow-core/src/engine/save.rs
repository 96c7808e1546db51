//! The save path: chunked prepare-and-copy of a rank's blocks into the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::{TierLabel, TransferLabels};
use super::registry::RankBinding;
use super::validate::{check_block_ids, select_layers};
use super::{Engine, RankRef, SaveBlocks, SaveOutcome, transfer};
use crate::cache::{SaveSpec, Tier};
use crate::device::DeviceError;
use crate::error::{EngineError, Result, shown};

/// One submitted chunk: what was prepared, its bytes, and where its result arrives.
type SubmittedSave = (SaveOutcome, u64, oneshot::Receiver<std::result::Result<u32, DeviceError>>);

impl Engine {
    /// Copies `block_ids` of the rank (all layers, or `layers`) into the cache under
    /// `blocks`' hashes. When this returns, the blocks it completed are visible to queries.
    pub async fn save(
        &self,
        target: RankRef<'_>,
        blocks: SaveBlocks<'_>,
        block_ids: &[u64],
        layers: &[u32],
    ) -> Result<SaveOutcome> {
        let started = Instant::now();
        let hashes = blocks.hashes;
        self.check_request_size("block hashes", hashes.len().max(block_ids.len()))?;
        let tp_rank = target.tp_rank;
        let rank = self.registry.rank(target.instance_id, tp_rank, target.caller)?;
        if block_ids.len() != hashes.len() {
            return Err(EngineError::invalid(format!(
                "{} block ids but {} block hashes",
                block_ids.len(),
                hashes.len()
            )));
        }
        if !blocks.parents.is_empty() && blocks.parents.len() != hashes.len() {
            return Err(EngineError::invalid(format!(
                "{} parent hashes for {} blocks (give one per block, or none)",
                blocks.parents.len(),
                hashes.len()
            )));
        }
        let layers = select_layers(&rank, layers)?;
        check_block_ids(&rank, &layers, block_ids)?;
        if block_ids.is_empty() {
            return Ok(SaveOutcome::default());
        }
        // Large requests go in growing chunks: the copy of the first chunk starts while
        // the next ones are prepared, so preparation hides behind the transfer. The whole
        // request is checked first (conflicting parts, more than the pool holds), so those
        // errors leave nothing behind. A later chunk can still fail when the pool is full
        // of leased or in-flight blocks: the chunks before it stay saved, and their blocks,
        // like any sealed block, may be evicted by the chunks after them.
        let spec = |hashes, parents, layers| SaveSpec {
            namespace: &rank.namespace,
            hashes,
            parents,
            rank: rank.part,
            tp_size: rank.parts,
            geometry: &rank.geometry,
            layers,
        };
        if block_ids.len() > FIRST_SAVE_CHUNK {
            self.cache.lock().check_save(&spec(hashes, blocks.parents, &layers))?;
        }
        let mut outcome = SaveOutcome::default();
        let mut bytes = 0u64;
        let mut copies = Vec::new();
        let mut failure = None;
        let mut first_submitted = None;
        for range in save_chunks(block_ids.len()) {
            let parents = blocks.parents.get(range.clone()).unwrap_or_default();
            let chunk = spec(&hashes[range.clone()], parents, &layers);
            match self.submit_save(&rank, &chunk, &block_ids[range]) {
                Ok((prepared, chunk_bytes, copy)) => {
                    bytes += chunk_bytes;
                    outcome.saved_blocks += prepared.saved_blocks;
                    outcome.skipped_blocks += prepared.skipped_blocks;
                    outcome.rejected_blocks += prepared.rejected_blocks;
                    outcome.evicted_blocks += prepared.evicted_blocks;
                    copies.push(copy);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            first_submitted.get_or_insert_with(|| started.elapsed());
        }
        // Every submitted chunk is awaited, even after a failure: the caller may reuse its
        // blocks as soon as this returns. The last one is short (chunks finish in order)
        // and is waited for without letting the worker thread sleep: waking an idle
        // thread costs 50–150 µs on the H100 host, a tenth of an 8B-256 save.
        let last = copies.len().saturating_sub(1);
        for (i, copy) in copies.into_iter().enumerate() {
            let copied = if i == last { spin_recv(copy, self.save_spin).await } else { copy.await.ok() };
            match copied {
                Some(Ok(sealed)) => outcome.sealed_blocks += sealed,
                Some(Err(e)) => failure = failure.or(Some(e.into())),
                None => failure = failure.or(Some(EngineError::Unavailable("copy worker stopped".into()))),
            }
        }
        tracing::debug!(
            instance = %shown(target.instance_id),
            rank = tp_rank,
            blocks = block_ids.len(),
            first_chunk_us = first_submitted.unwrap_or_default().as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "save"
        );
        let labels = TransferLabels { direction: "save", backend: rank.backend.name() };
        match failure {
            Some(e) => {
                self.metrics.transfer_failures.get_or_create(&labels).inc();
                Err(e)
            }
            None => {
                if bytes > 0 {
                    self.metrics.observe_transfer(&labels, bytes, started.elapsed().as_secs_f64());
                }
                Ok(outcome)
            }
        }
    }

    /// Prepares one chunk of a save and hands its copy to the backend; returns what was
    /// prepared, the bytes to copy, and a receiver of the blocks sealed once the copy is
    /// done.
    fn submit_save(&self, rank: &RankBinding, spec: &SaveSpec<'_>, block_ids: &[u64]) -> Result<SubmittedSave> {
        let ticket = self.cache.lock().prepare_save_with(spec, |cache, victims| self.dispose(cache, victims))?;
        let ram = TierLabel { tier: Tier::Ram.as_str() };
        self.metrics.admitted_blocks.get_or_create(&ram).inc_by(u64::from(ticket.admitted));
        self.metrics.rejected_blocks.get_or_create(&ram).inc_by(u64::from(ticket.rejected));
        let prepared = SaveOutcome {
            saved_blocks: ticket.blocks(),
            sealed_blocks: 0,
            skipped_blocks: ticket.skipped,
            rejected_blocks: ticket.rejected,
            evicted_blocks: ticket.evicted,
        };
        let job = transfer::save_job(&self.pool, rank, block_ids, &ticket);
        let bytes = job.bytes();
        let (tx, rx) = oneshot::channel();
        let cache = Arc::clone(&self.cache);
        let metrics = Arc::clone(&self.metrics);
        let ssd = self.ssd.clone();
        let saved_blocks = u64::from(ticket.blocks());
        rank.backend.submit(
            job,
            Box::new(move |result| {
                // A caller that gave up (deadline, disconnect) may already have reused its
                // blocks, so bytes copied meanwhile can be torn: publish nothing then.
                let abandoned = tx.is_closed();
                let mut cache = cache.lock();
                let copied = result.is_ok() && !abandoned;
                // Sealed keys are collected only for the SSD tier's writes.
                let sealed = match &ssd {
                    Some(ssd) => {
                        let keys = cache.complete_save_sealed(ticket, copied);
                        let sealed = keys.len() as u32;
                        ssd.write_sealed(&mut cache, keys);
                        sealed
                    }
                    None => cache.complete_save(ticket, copied),
                };
                metrics.observe_cache(&cache.stats());
                drop(cache);
                if result.is_ok() {
                    metrics.saved_blocks.inc_by(saved_blocks);
                }
                let _ = tx.send(result.map(|()| sealed));
            }),
        );
        Ok((prepared, bytes, rx))
    }
}

/// Receives from `rx` (`None`: the sender was dropped), keeping the worker thread busy
/// (yielding to other tasks) for up to `spin` before sleeping on it like a plain `.await`.
async fn spin_recv<T>(mut rx: oneshot::Receiver<T>, spin: Duration) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < spin {
        match rx.try_recv() {
            Ok(value) => return Some(value),
            Err(oneshot::error::TryRecvError::Empty) => tokio::task::yield_now().await,
            Err(oneshot::error::TryRecvError::Closed) => return None,
        }
    }
    rx.await.ok()
}

/// Blocks in the first chunk of a save; later chunks double in size.
const FIRST_SAVE_CHUNK: usize = 16;

/// The chunks a save of `n` blocks is prepared and copied in.
fn save_chunks(n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut start = 0;
    let mut size = FIRST_SAVE_CHUNK;
    std::iter::from_fn(move || {
        (start < n).then(|| {
            let end = n.min(start + size);
            let range = start..end;
            start = end;
            size *= 2;
            range
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spin_recv_gets_early_and_late_values_and_sees_a_dropped_sender() {
        for delay_ms in [0, 5] {
            let (tx, rx) = oneshot::channel();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay_ms));
                let _ = tx.send(delay_ms);
            });
            assert_eq!(spin_recv(rx, Duration::from_millis(1)).await, Some(delay_ms));
        }
        let (tx, rx) = oneshot::channel::<u8>();
        drop(tx);
        assert_eq!(spin_recv(rx, Duration::from_millis(1)).await, None);
    }

    #[test]
    fn save_chunks_cover_the_request_in_order_and_grow() {
        let chunks: Vec<_> = save_chunks(256).collect();
        assert_eq!(chunks, vec![0..16, 16..48, 48..112, 112..240, 240..256]);
        assert_eq!(save_chunks(10).collect::<Vec<_>>(), vec![0..10]);
        assert_eq!(save_chunks(0).count(), 0);
    }
}
