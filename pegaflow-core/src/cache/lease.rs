//! Leases: a query hit pins its blocks until every rank has started loading its last
//! range of them, the lease is released, or it expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::BlockKey;

/// Lease lifetime when the client asks for none.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Longest lease a client may ask for.
pub(super) const MAX_LEASE_TTL: Duration = Duration::from_secs(600);

/// Caps on what leases may pin, so no client can make the server hold unbounded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseLimits {
    /// Live leases one instance may hold. Default: 1024.
    pub per_instance: usize,
    /// Blocks all live leases together may pin. Default: 1,048,576.
    pub blocks: usize,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        Self { per_instance: 1024, blocks: 1 << 20 }
    }
}

pub(super) struct Lease {
    pub namespace: std::sync::Arc<str>,
    /// The instance that asked for it (what the per-instance cap counts).
    pub holder: std::sync::Arc<str>,
    pub keys: Vec<BlockKey>,
    pub expires_at: Instant,
    /// When the query that took it ran (the start of the load path).
    pub created_at: Instant,
    pub tp_size: u32,
    /// Per rank that loaded from it: where its next range may start, and whether it
    /// loaded its last range.
    pub ranks: HashMap<u32, RankProgress>,
}

/// How far one rank has loaded a lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RankProgress {
    /// Leased blocks before this one were loaded (or skipped) by the rank.
    pub next: usize,
    /// The rank loaded its last range.
    pub done: bool,
}

/// Which leased blocks one load copies: `count` blocks from `offset`; `more` when the
/// rank loads further ranges of the lease afterwards (through a bounded staging buffer,
/// say). A rank's ranges go forward and never overlap; the lease is released once every
/// rank has started its last range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRange {
    /// The first leased block of the range.
    pub offset: usize,
    /// Blocks in the range.
    pub count: usize,
    /// The rank loads further ranges after this one.
    pub more: bool,
}

impl LeaseRange {
    /// The first `count` blocks, and no more ranges: a whole load in one call.
    pub fn prefix(count: usize) -> Self {
        Self { offset: 0, count, more: false }
    }
}

#[derive(Default)]
pub(super) struct LeaseTable {
    leases: HashMap<String, Lease>,
    per_holder: HashMap<std::sync::Arc<str>, usize>,
    blocks: usize,
    // Earliest expiry among live leases, so sweeping is free when nothing is due.
    next_expiry: Option<Instant>,
}

impl LeaseTable {
    /// Whether `holder` may take one more lease of `blocks` blocks under `limits`; the
    /// reason when not.
    pub fn admits(&self, holder: &str, blocks: usize, limits: &LeaseLimits) -> Result<(), String> {
        let held = self.per_holder.get(holder).copied().unwrap_or(0);
        if held >= limits.per_instance {
            return Err(format!("the instance holds {held} leases, the most allowed: load or release some first"));
        }
        if self.blocks + blocks > limits.blocks {
            return Err(format!(
                "leases pin {} blocks; {blocks} more would pass the server's cap of {}",
                self.blocks, limits.blocks
            ));
        }
        Ok(())
    }

    pub fn insert(&mut self, lease: Lease) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        *self.per_holder.entry(std::sync::Arc::clone(&lease.holder)).or_default() += 1;
        self.blocks += lease.keys.len();
        self.next_expiry = Some(self.next_expiry.map_or(lease.expires_at, |t| t.min(lease.expires_at)));
        self.leases.insert(id.clone(), lease);
        id
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Lease> {
        self.leases.get_mut(id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        self.forget(&lease);
        Some(lease)
    }

    /// Drops a removed lease from the counts.
    fn forget(&mut self, lease: &Lease) {
        self.blocks -= lease.keys.len();
        if let Some(count) = self.per_holder.get_mut(&lease.holder) {
            *count -= 1;
            if *count == 0 {
                self.per_holder.remove(&lease.holder);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Blocks pinned by live leases (a block in two leases counts twice).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Removes and returns the leases expired at `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Lease> {
        if self.next_expiry.is_none_or(|t| t > now) {
            return Vec::new();
        }
        let expired: Vec<String> =
            self.leases.iter().filter(|(_, l)| l.expires_at <= now).map(|(id, _)| id.clone()).collect();
        let out = expired.iter().filter_map(|id| self.remove(id)).collect();
        self.next_expiry = self.leases.values().map(|l| l.expires_at).min();
        out
    }
}
