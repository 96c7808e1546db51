//! Leases: a query hit pins its blocks until every rank has started loading them, the
//! lease is released, or it expires.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::BlockKey;

/// Lease lifetime when the client asks for none.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Longest lease a client may ask for.
pub(super) const MAX_LEASE_TTL: Duration = Duration::from_secs(600);

pub(super) struct Lease {
    pub namespace: std::sync::Arc<str>,
    pub keys: Vec<BlockKey>,
    pub expires_at: Instant,
    pub tp_size: u32,
    pub started_ranks: HashSet<u32>,
}

#[derive(Default)]
pub(super) struct LeaseTable {
    leases: HashMap<String, Lease>,
    // Earliest expiry among live leases, so sweeping is free when nothing is due.
    next_expiry: Option<Instant>,
}

impl LeaseTable {
    pub fn insert(&mut self, lease: Lease) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.next_expiry = Some(self.next_expiry.map_or(lease.expires_at, |t| t.min(lease.expires_at)));
        self.leases.insert(id.clone(), lease);
        id
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Lease> {
        self.leases.get_mut(id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Lease> {
        self.leases.remove(id)
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Removes and returns the leases expired at `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Lease> {
        if self.next_expiry.is_none_or(|t| t > now) {
            return Vec::new();
        }
        let expired: Vec<String> =
            self.leases.iter().filter(|(_, l)| l.expires_at <= now).map(|(id, _)| id.clone()).collect();
        let out = expired.iter().filter_map(|id| self.leases.remove(id)).collect();
        self.next_expiry = self.leases.values().map(|l| l.expires_at).min();
        out
    }
}
