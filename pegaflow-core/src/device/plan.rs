//! Copy ops and their coalescing: runs contiguous on both sides become one copy.

/// Copy `len` bytes between `device_offset` in a region and `host_offset` in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    /// Byte offset in the device region.
    pub device_offset: u64,
    /// Byte offset in the host pool.
    pub host_offset: u64,
    /// Bytes to copy.
    pub len: u64,
}

impl CopyOp {
    /// Grows this op by `next` when `next` starts where this one ends on both sides;
    /// returns whether it did.
    pub fn absorb(&mut self, next: &CopyOp) -> bool {
        let contiguous =
            self.device_offset + self.len == next.device_offset && self.host_offset + self.len == next.host_offset;
        if contiguous {
            self.len += next.len;
        }
        contiguous
    }
}

/// Sorts `ops` by device offset and merges neighbours that are contiguous on both the
/// device and the host side. The set of bytes copied is unchanged.
pub fn coalesce(ops: &mut Vec<CopyOp>) {
    // Stable sort merges natural runs in linear time; engine-built ops are made of a few
    // sorted runs (e.g. all K segments, then all V segments).
    if !ops.is_sorted_by_key(|op| op.device_offset) {
        ops.sort_by_key(|op| op.device_offset);
    }
    let mut merged: Vec<CopyOp> = Vec::with_capacity(ops.len());
    for op in ops.drain(..) {
        if !merged.last_mut().is_some_and(|last| last.absorb(&op)) {
            merged.push(op);
        }
    }
    *ops = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(device_offset: u64, host_offset: u64, len: u64) -> CopyOp {
        CopyOp { device_offset, host_offset, len }
    }

    #[test]
    fn merges_runs_contiguous_on_both_sides_only() {
        let mut ops = vec![op(200, 1100, 100), op(0, 1000, 100), op(100, 5000, 100), op(300, 1200, 50)];
        coalesce(&mut ops);
        assert_eq!(ops, vec![op(0, 1000, 100), op(100, 5000, 100), op(200, 1100, 150)]);
    }

    #[test]
    fn fully_contiguous_becomes_one_op() {
        let mut ops: Vec<_> = (0..64).rev().map(|i| op(i * 32, 4096 + i * 32, 32)).collect();
        coalesce(&mut ops);
        assert_eq!(ops, vec![op(0, 4096, 64 * 32)]);
    }
}
