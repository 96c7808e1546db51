//! Carves the pool into block-sized ranges with `offset-allocator` (O(1) TLSF-like bins).
//!
//! `offset-allocator` counts in `u32` units, so the pool is divided into units of a
//! power-of-two size large enough that the whole pool fits in `u32`. Requests are
//! rounded up to whole units and then to the allocator's size bin: its search only looks
//! at bins whose smallest size fits the request, so a request between two bin sizes would
//! never reuse a hole of exactly its own size (evicting one block would not make room for
//! one). Bins are 8 per power of two, so rounding costs at most 12.5%, and nothing for
//! sizes that are already bin sizes (such as powers of two). Byte accounting
//! (`used_bytes`) counts the rounded sizes, which is what the pool really loses.

use offset_allocator::ext::min_allocator_size;
use offset_allocator::{Allocation, Allocator};

/// Smallest allocation unit; keeps ranges aligned for vectorised copies and DMA.
const MIN_UNIT: u64 = 256;
/// Bounds for the allocator's node table (one node per live range, ~32 B each).
const MIN_NODES: u64 = 16 * 1024;
const MAX_NODES: u64 = 1 << 24;

/// A range of the pool owned by one cache entry. Free it with [`PoolAllocator::free`].
pub struct PoolSlice {
    offset: u64,
    len: u64,
    units: u32,
    allocation: Allocation,
}

impl std::fmt::Debug for PoolAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolAllocator")
            .field("capacity", &self.capacity)
            .field("unit", &self.unit)
            .field("used_bytes", &self.used_bytes)
            .finish()
    }
}

impl std::fmt::Debug for PoolSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSlice").field("offset", &self.offset).field("len", &self.len).finish()
    }
}

impl PoolSlice {
    /// Byte offset in the pool.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes requested (the range may be rounded up internally).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-byte slice (never handed out).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Allocator over `capacity` bytes.
pub struct PoolAllocator {
    inner: Allocator,
    unit: u64,
    capacity: u64,
    used_bytes: u64,
    live: u64,
}

impl PoolAllocator {
    /// An allocator for a pool of `capacity` bytes whose typical allocation is
    /// `hint_value_size` bytes (sizes the node table; `None` assumes 64 KiB).
    pub fn new(capacity: u64, hint_value_size: Option<u64>) -> Self {
        Self::with_min_unit(capacity, hint_value_size, MIN_UNIT)
    }

    /// [`PoolAllocator::new`] whose ranges start and end on multiples of `min_unit` (a
    /// power of two of at least 256 bytes): with an SSD tier, 4 KiB, so that blocks move
    /// between the pool and the SSD by direct I/O in place.
    pub fn with_min_unit(capacity: u64, hint_value_size: Option<u64>, min_unit: u64) -> Self {
        let mut unit = min_unit.max(MIN_UNIT).next_power_of_two();
        while capacity / unit >= u64::from(u32::MAX) {
            unit *= 2;
        }
        let units = u32::try_from(capacity / unit).unwrap_or(u32::MAX - 1);
        let typical = hint_value_size.unwrap_or(64 * 1024).max(unit);
        let nodes = (2 * capacity / typical).clamp(MIN_NODES, MAX_NODES);
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX - 2);
        Self {
            inner: Allocator::with_max_allocs(units, nodes),
            unit,
            capacity: u64::from(units) * unit,
            used_bytes: 0,
            live: 0,
        }
    }

    /// Usable bytes (the pool size rounded down to whole units).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held by live slices, rounded to whole units.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Number of live slices.
    pub fn live_slices(&self) -> u64 {
        self.live
    }

    /// Bytes `len` really takes once rounded to units and to its size bin.
    pub fn rounded(&self, len: u64) -> u64 {
        self.units_for(len).map_or(u64::MAX, |units| u64::from(units) * self.unit)
    }

    /// Units a request of `len` bytes takes, or `None` when it cannot fit in `u32` units.
    fn units_for(&self, len: u64) -> Option<u32> {
        let units = u32::try_from(len.div_ceil(self.unit)).ok()?;
        let binned = min_allocator_size(units);
        (binned >= units).then_some(binned)
    }

    /// A range of `len` bytes, or `None` when no free range is large enough (the caller
    /// evicts and retries). Zero-byte requests return `None`.
    pub fn allocate(&mut self, len: u64) -> Option<PoolSlice> {
        if len == 0 {
            return None;
        }
        let units = self.units_for(len)?;
        let allocation = self.inner.allocate(units)?;
        self.used_bytes += u64::from(units) * self.unit;
        self.live += 1;
        Some(PoolSlice { offset: u64::from(allocation.offset) * self.unit, len, units, allocation })
    }

    /// Returns a slice's range to the free list.
    pub fn free(&mut self, slice: PoolSlice) {
        self.used_bytes -= u64::from(slice.units) * self.unit;
        self.live -= 1;
        self.inner.free(slice.allocation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_larger_unit_keeps_every_range_aligned() {
        let mut a = PoolAllocator::with_min_unit(1 << 20, None, 4096);
        // Sizes that are not multiples of 4 KiB, mixed: every range still starts on one.
        let slices: Vec<PoolSlice> =
            [600u64, 5000, 72 * 1024 + 8, 4096, 1].iter().filter_map(|&n| a.allocate(n)).collect();
        assert_eq!(slices.len(), 5);
        assert!(slices.iter().all(|s| s.offset() % 4096 == 0), "{slices:?}");
        assert_eq!(a.rounded(600), 4096);
    }

    #[test]
    fn allocates_disjoint_ranges_and_accounts_bytes() {
        let mut a = PoolAllocator::new(1 << 20, None);
        let x = a.allocate(1000).unwrap();
        let y = a.allocate(300).unwrap();
        assert_eq!(a.used_bytes(), 1024 + 512);
        assert_eq!(a.live_slices(), 2);
        let (lo, hi) = if x.offset() < y.offset() { (&x, &y) } else { (&y, &x) };
        assert!(lo.offset() + a.rounded(lo.len()) <= hi.offset());
        a.free(x);
        a.free(y);
        assert_eq!(a.used_bytes(), 0);
        assert_eq!(a.live_slices(), 0);
    }

    #[test]
    fn full_pool_returns_none_then_recovers_after_free() {
        let mut a = PoolAllocator::new(4096, None);
        let slices: Vec<_> = (0..16).map(|_| a.allocate(256).unwrap()).collect();
        assert!(a.allocate(1).is_none());
        assert!(a.allocate(0).is_none());
        for s in slices {
            a.free(s);
        }
        assert!(a.allocate(4096).is_some());
    }

    #[test]
    fn large_pools_scale_the_unit_to_fit_u32() {
        let a = PoolAllocator::new(4 << 40, Some(1 << 30)); // 4 TiB
        assert!(a.capacity() >= (4u64 << 40) - a.rounded(1));
        assert!(a.rounded(1) > MIN_UNIT);
    }

    #[test]
    fn a_freed_hole_fits_an_equal_request_of_any_size() {
        // 37 units is not a bin size: without bin rounding the hole left by freeing one
        // allocation is never found for the next.
        let mut a = PoolAllocator::new(20 * 37 * 256 * 2, None);
        let len = 37 * 256;
        let mut live: Vec<_> = std::iter::from_fn(|| a.allocate(len)).collect();
        let fitted = live.len();
        assert!(fitted as u64 * a.rounded(len) <= a.capacity());
        assert!(a.rounded(len) <= len + len / 8, "bin rounding costs at most 12.5%");
        for i in (0..fitted).step_by(2).rev() {
            a.free(live.swap_remove(i));
            let again = a.allocate(len);
            assert!(again.is_some(), "one freed allocation makes room for one");
            live.extend(again);
        }
    }

    #[test]
    fn larger_than_capacity_fails() {
        let mut a = PoolAllocator::new(1 << 16, None);
        assert!(a.allocate((1 << 16) + 1).is_none());
    }
}
