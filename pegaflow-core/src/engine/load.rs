//! The read path: query (find and lease), load (copy leased blocks back), release; and
//! the per-request trace of a load (query → lease → copy → ready) as one log line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::metrics::{LookupLabel, OutcomeLabel, TransferLabels};
use super::validate::{check_block_ids, destination_order, select_layers};
use super::{Engine, MemoryToken, RankRef, transfer};
use crate::cache::{BlockHash, LeaseRange, QueryOutcome, Tier};
use crate::error::{EngineError, Result, shown};

/// Which loads log their stage durations (target `pegaflow::trace`, level info).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadTraceConfig {
    /// Share of loads traced, 0 to 1 (every n-th load for a rate of 1/n). Default: 0.01.
    pub sample_rate: f64,
    /// Loads slower than this (from the query that leased their blocks until the client
    /// can read them) are always traced. Default: 200 ms.
    pub slow: Duration,
}

impl Default for LoadTraceConfig {
    fn default() -> Self {
        Self { sample_rate: 0.01, slow: Duration::from_millis(200) }
    }
}

/// Decides which loads to trace.
#[derive(Debug)]
pub(super) struct LoadTracer {
    /// Trace every n-th load (0: none by sampling).
    every: u64,
    slow: Duration,
    loads: AtomicU64,
}

impl LoadTracer {
    pub fn new(config: LoadTraceConfig) -> Self {
        let every = if config.sample_rate > 0.0 && config.sample_rate.is_finite() {
            (1.0 / config.sample_rate.min(1.0)).round() as u64
        } else {
            0
        };
        Self { every, slow: config.slow, loads: AtomicU64::new(0) }
    }

    /// Whether the load numbered now is sampled.
    fn sample(&self) -> bool {
        let n = self.loads.fetch_add(1, Ordering::Relaxed);
        self.every > 0 && n.is_multiple_of(self.every)
    }
}

/// When each stage of one load ended.
struct LoadStages {
    leased_at: Instant,
    called: Instant,
    prepared: Instant,
    sampled: bool,
}

impl LoadStages {
    /// Logs the load's stages if it was sampled or slow.
    fn finish(&self, tracer: &LoadTracer, copied: Instant, who: &LoadWho, blocks: u32, bytes: u64, ok: bool) {
        let ready = Instant::now();
        let total = ready.duration_since(self.leased_at);
        if !self.sampled && total < tracer.slow {
            return;
        }
        let us = |from: Instant, to: Instant| to.saturating_duration_since(from).as_micros() as u64;
        tracing::info!(
            target: "pegaflow::trace",
            op = "load",
            instance = %who.instance,
            rank = who.rank,
            lease = %who.lease,
            blocks,
            bytes,
            ok,
            slow = total >= tracer.slow,
            lease_us = us(self.leased_at, self.called),
            prepare_us = us(self.called, self.prepared),
            copy_us = us(self.prepared, copied),
            ready_us = us(copied, ready),
            total_us = total.as_micros() as u64,
            "load path"
        );
    }
}

/// The lease a load copies from, and which of its blocks.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRef<'a> {
    /// The lease id a query returned.
    pub id: &'a str,
    /// The first leased block this load copies.
    pub offset: u32,
    /// The rank loads further ranges of this lease after this one.
    pub more: bool,
}

impl<'a> LeaseRef<'a> {
    /// The lease from its first block, in one load.
    pub fn whole(id: &'a str) -> Self {
        Self { id, offset: 0, more: false }
    }
}

/// Names for a load's log lines.
struct LoadWho {
    instance: String,
    rank: u32,
    lease: String,
}

impl Engine {
    /// Finds the leading cached blocks of `hashes` in the instance's namespace and leases
    /// them for `ttl` (`None`: 30 s).
    pub fn query(&self, instance_id: &str, hashes: &[BlockHash], ttl: Option<Duration>) -> Result<QueryOutcome> {
        self.check_request_size("block hashes", hashes.len())?;
        let (namespace, tp_size) = self.registry.namespace(instance_id)?;
        let mut cache = self.cache.lock();
        let queried = cache.query(Instant::now(), &namespace, instance_id, tp_size, hashes, ttl);
        if matches!(queried, Err(EngineError::ResourceExhausted(_))) {
            self.metrics.refused_leases.inc();
        }
        let mut outcome = queried?;
        self.metrics.observe_cache(&cache.stats());
        drop(cache);
        let hits_in_ram = outcome.hits() as usize;
        let mut promoting = 0u64;
        if let Some(ssd) = &self.ssd
            && hits_in_ram < hashes.len()
            && let Some(started) = ssd.prefetch(&namespace, &hashes[hits_in_ram..])
        {
            // The prefix continues on the SSD: the whole of it is in RAM shortly, so the
            // caller asks again rather than loading only the RAM part now.
            if let Some(lease_id) = outcome.lease_id() {
                let _ = self.cache.lock().release_lease(lease_id);
            }
            outcome = QueryOutcome::Loading;
            promoting = started as u64;
        }
        let (label, hits) = match &outcome {
            QueryOutcome::Hit { tiers, .. } => ("hit", tiers.len() as u64),
            QueryOutcome::Loading => ("loading", 0),
            QueryOutcome::Miss => ("miss", 0),
        };
        self.metrics.lookups.get_or_create(&OutcomeLabel { outcome: label }).inc();
        self.metrics.lookup_blocks.get_or_create(&LookupLabel { tier: Tier::Ram.as_str() }).inc_by(hits);
        self.metrics.lookup_blocks.get_or_create(&LookupLabel { tier: Tier::Ssd.as_str() }).inc_by(promoting);
        self.metrics
            .lookup_blocks
            .get_or_create(&LookupLabel { tier: "miss" })
            .inc_by((hashes.len() as u64).saturating_sub(hits + promoting));
        Ok(outcome)
    }

    /// Starts copying `block_ids.len()` blocks of a lease, from its block `lease.offset`
    /// on, into `block_ids` of the rank (all layers, or `layers`); `lease.more` when the
    /// rank loads further ranges of the lease afterwards. Returns once the copy is queued;
    /// the outcome is written to the client's load state named by `load_state` (see
    /// [`Engine::add_memory`]), which the caller's user (when known) must have handed over.
    pub fn load(
        &self,
        target: RankRef<'_>,
        lease: LeaseRef<'_>,
        block_ids: &[u64],
        layers: &[u32],
        load_state: &MemoryToken,
    ) -> Result<u32> {
        let lease_id = lease.id;
        let called = Instant::now();
        self.check_request_size("block ids", block_ids.len())?;
        let (tp_rank, caller) = (target.tp_rank, target.caller);
        let rank = self.registry.rank(target.instance_id, tp_rank, caller)?;
        let layers = select_layers(&rank, layers)?;
        check_block_ids(&rank, &layers, block_ids)?;
        let order = destination_order(block_ids)?;
        let state = self.handles.load_state(load_state, caller.uid)?;
        let ticket = self.cache.lock().prepare_load(
            Instant::now(),
            &rank.namespace,
            lease_id,
            tp_rank,
            rank.part,
            LeaseRange { offset: lease.offset as usize, count: block_ids.len(), more: lease.more },
            &rank.geometry,
        )?;
        let job = transfer::load_job(&self.pool, &rank, &order, &layers, &ticket);
        let bytes = job.bytes();
        let blocks = block_ids.len() as u32;
        let stages =
            LoadStages { leased_at: ticket.leased_at, called, prepared: Instant::now(), sampled: self.tracer.sample() };
        let who = LoadWho {
            instance: shown(target.instance_id).to_string(),
            rank: tp_rank,
            lease: shown(lease_id).to_string(),
        };
        let labels = TransferLabels { direction: "load", backend: rank.backend.name() };
        let cache = Arc::clone(&self.cache);
        let metrics = Arc::clone(&self.metrics);
        let tracer = Arc::clone(&self.tracer);
        rank.backend.submit(
            job,
            Box::new(move |result| {
                let copied = Instant::now();
                let mut cache = cache.lock();
                cache.complete_load(ticket);
                metrics.observe_cache(&cache.stats());
                drop(cache);
                match &result {
                    Ok(()) => {
                        metrics.loaded_blocks.inc_by(u64::from(blocks));
                        metrics.observe_transfer(&labels, bytes, copied.duration_since(called).as_secs_f64());
                        state.complete(Ok(()));
                    }
                    Err(e) => {
                        metrics.transfer_failures.get_or_create(&labels).inc();
                        tracing::warn!(
                            op = "load",
                            instance = %who.instance,
                            rank = who.rank,
                            lease = %who.lease,
                            blocks,
                            error = %e,
                            "load copy failed"
                        );
                        state.complete(Err(&e.to_string()));
                    }
                }
                stages.finish(&tracer, copied, &who, blocks, bytes, result.is_ok());
            }),
        );
        Ok(blocks)
    }

    /// Releases a lease before it expires.
    pub fn release_lease(&self, lease_id: &str) -> Result<()> {
        let mut cache = self.cache.lock();
        cache.release_lease(lease_id)?;
        self.metrics.observe_cache(&cache.stats());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_rate_picks_every_nth_load() {
        let count = |rate: f64| {
            let tracer = LoadTracer::new(LoadTraceConfig { sample_rate: rate, slow: Duration::MAX });
            (0..1000).filter(|_| tracer.sample()).count()
        };
        assert_eq!(count(0.01), 10);
        assert_eq!(count(1.0), 1000);
        assert_eq!(count(5.0), 1000, "above 1 means every load");
        assert_eq!(count(0.0), 0);
        assert_eq!(count(f64::NAN), 0);
    }
}
