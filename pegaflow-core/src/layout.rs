//! KV layout descriptors: one validated affine address formula per registered layer.
//!
//! A layer's KV tensor is described like any strided tensor (shape, strides in
//! elements, element size) plus which dimension indexes blocks and which (if any)
//! separates K from V. Validation reduces it to
//!
//! ```text
//! segment(block, s) = base + block * block_stride + s * kv_stride,   s < num_segments
//! ```
//!
//! with every segment `segment_bytes` long, dense, pairwise disjoint and inside the
//! registered region. Nothing else in the engine computes device addresses.

/// Why a tensor description is not a usable KV layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Shape and stride disagree in length, or the tensor has no dimensions.
    #[error("shape has {shape} dims but stride has {stride} (need 1..=8 dims)")]
    Rank {
        /// Dimensions in the shape.
        shape: usize,
        /// Dimensions in the stride.
        stride: usize,
    },
    /// `element_size` is zero or larger than 16 bytes.
    #[error("element size {0} is not in 1..=16 bytes")]
    ElementSize(u32),
    /// `block_dim` or `kv_dim` does not name a valid dimension.
    #[error("{0}")]
    Dimension(String),
    /// A dimension of size zero, or a negative stride.
    #[error("dimension {dim}: size {size}, stride {stride} (need size > 0 and stride >= 0)")]
    Degenerate {
        /// The offending dimension.
        dim: usize,
        /// Its size.
        size: u64,
        /// Its stride in elements.
        stride: i64,
    },
    /// The dimensions inside one block are not one dense row-major run.
    #[error("dimension {dim} has stride {stride}, expected {expected} for a dense segment")]
    NotDense {
        /// The offending dimension.
        dim: usize,
        /// Its stride in elements.
        stride: i64,
        /// The dense stride it should have.
        expected: u64,
    },
    /// Two segments of the tensor share bytes.
    #[error("segments overlap: {0}")]
    Overlap(String),
    /// The tensor reaches past the end of its memory region.
    #[error("tensor spans bytes up to {end} but the region holds {region_len}")]
    OutOfRange {
        /// One past the last byte the tensor touches.
        end: u64,
        /// Size of the registered region.
        region_len: u64,
    },
    /// Sizes overflow 64 bits.
    #[error("layout size overflows u64")]
    Overflow,
}

/// A strided tensor as the client describes it (units: elements, except where noted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Size of each dimension.
    pub shape: Vec<u64>,
    /// Stride of each dimension, in elements.
    pub stride: Vec<i64>,
    /// Bytes per element.
    pub element_size: u32,
    /// Dimension that indexes KV blocks.
    pub block_dim: usize,
    /// Dimension of size 2 separating K and V; `None` when K and V share a segment.
    pub kv_dim: Option<usize>,
    /// Byte offset of element 0 inside the region.
    pub byte_offset: u64,
}

/// A validated KV layout: where each block's segments live inside a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    num_blocks: u64,
    segment_bytes: u64,
    num_segments: u64,
    block_stride: u64,
    kv_stride: u64,
    base: u64,
}

const MAX_DIMS: usize = 8;

impl KvLayout {
    /// Validates `spec` against a region of `region_len` bytes.
    pub fn from_tensor(spec: &TensorSpec, region_len: u64) -> Result<Self, LayoutError> {
        let ndim = spec.shape.len();
        if ndim == 0 || ndim > MAX_DIMS || spec.stride.len() != ndim {
            return Err(LayoutError::Rank { shape: ndim, stride: spec.stride.len() });
        }
        if spec.element_size == 0 || spec.element_size > 16 {
            return Err(LayoutError::ElementSize(spec.element_size));
        }
        if spec.block_dim >= ndim {
            return Err(LayoutError::Dimension(format!(
                "block_dim {} is not a dimension of a {ndim}-d tensor",
                spec.block_dim
            )));
        }
        if let Some(kv) = spec.kv_dim {
            if kv >= ndim || kv == spec.block_dim {
                return Err(LayoutError::Dimension(format!(
                    "kv_dim {kv} must be a dimension other than block_dim {}",
                    spec.block_dim
                )));
            }
            if spec.shape[kv] != 2 {
                return Err(LayoutError::Dimension(format!(
                    "kv_dim {kv} has size {}, expected 2 (K and V)",
                    spec.shape[kv]
                )));
            }
        }
        for (dim, (&size, &stride)) in spec.shape.iter().zip(&spec.stride).enumerate() {
            if size == 0 || stride < 0 {
                return Err(LayoutError::Degenerate { dim, size, stride });
            }
        }

        let elem = u64::from(spec.element_size);
        let segment_elems = dense_inner_elems(spec)?;
        let segment_bytes = segment_elems.checked_mul(elem).ok_or(LayoutError::Overflow)?;
        let stride_bytes = |dim: usize| -> Result<u64, LayoutError> {
            // Strides were checked non-negative above.
            (spec.stride[dim].unsigned_abs()).checked_mul(elem).ok_or(LayoutError::Overflow)
        };
        let layout = KvLayout {
            num_blocks: spec.shape[spec.block_dim],
            segment_bytes,
            num_segments: if spec.kv_dim.is_some() { 2 } else { 1 },
            block_stride: stride_bytes(spec.block_dim)?,
            kv_stride: match spec.kv_dim {
                Some(kv) => stride_bytes(kv)?,
                None => 0,
            },
            base: spec.byte_offset,
        };
        layout.check_disjoint()?;
        let end = layout.end()?;
        if end > region_len {
            return Err(LayoutError::OutOfRange { end, region_len });
        }
        Ok(layout)
    }

    /// Number of blocks the tensor holds.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Bytes of one segment (one of K or V, or the fused K‖V).
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Segments per block: 2 for separate K and V, 1 when fused.
    pub fn num_segments(&self) -> u64 {
        self.num_segments
    }

    /// Bytes one block of this layer occupies once stored (all its segments).
    pub fn slot_bytes(&self) -> u64 {
        self.segment_bytes * self.num_segments
    }

    /// Byte offset inside the region of segment `segment` of `block`.
    ///
    /// Callers pass `block < num_blocks()` and `segment < num_segments()`.
    pub fn segment_offset(&self, block: u64, segment: u64) -> u64 {
        self.base + block * self.block_stride + segment * self.kv_stride
    }

    /// Bytes between consecutive blocks.
    pub fn block_stride(&self) -> u64 {
        self.block_stride
    }

    fn end(&self) -> Result<u64, LayoutError> {
        let last_block = (self.num_blocks - 1).checked_mul(self.block_stride);
        let last_segment = (self.num_segments - 1).checked_mul(self.kv_stride);
        last_block
            .zip(last_segment)
            .and_then(|(b, s)| self.base.checked_add(b)?.checked_add(s)?.checked_add(self.segment_bytes))
            .ok_or(LayoutError::Overflow)
    }

    /// Proves all segments pairwise disjoint.
    ///
    /// Same-index segments of different blocks are `d * block_stride` apart, so they are
    /// disjoint iff `block_stride >= segment_bytes`. A K and a V segment are
    /// `|d * block_stride - kv_stride|` apart for `d` in `-(n-1)..=n-1`; that distance is
    /// smallest at the multiples of `block_stride` next to `kv_stride`, so checking those
    /// two values of `d` covers all of them.
    fn check_disjoint(&self) -> Result<(), LayoutError> {
        let seg = self.segment_bytes;
        if self.num_blocks > 1 && self.block_stride < seg {
            return Err(LayoutError::Overlap(format!(
                "block stride {} B is smaller than the segment ({seg} B)",
                self.block_stride
            )));
        }
        if self.num_segments == 1 {
            return Ok(());
        }
        let max_d = self.num_blocks - 1;
        let below = self.kv_stride.checked_div(self.block_stride).unwrap_or(0).min(max_d);
        for d in [below, (below + 1).min(max_d)] {
            let distance = (d * self.block_stride).abs_diff(self.kv_stride);
            if distance < seg {
                return Err(LayoutError::Overlap(format!(
                    "K of block b+{d} and V of block b are {distance} B apart, less than a segment ({seg} B)"
                )));
            }
        }
        Ok(())
    }
}

/// Elements of one segment: the dimensions other than `block_dim` and `kv_dim` must form
/// one dense row-major run.
fn dense_inner_elems(spec: &TensorSpec) -> Result<u64, LayoutError> {
    let mut expected: u64 = 1;
    for dim in (0..spec.shape.len()).rev() {
        if dim == spec.block_dim || Some(dim) == spec.kv_dim {
            continue;
        }
        let size = spec.shape[dim];
        // A dimension of size 1 is never stepped over, so its stride is irrelevant.
        if size > 1 && spec.stride[dim].unsigned_abs() != expected {
            return Err(LayoutError::NotDense { dim, stride: spec.stride[dim], expected });
        }
        expected = expected.checked_mul(size).ok_or(LayoutError::Overflow)?;
    }
    Ok(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contiguous_strides(shape: &[u64]) -> Vec<i64> {
        let mut strides = vec![0i64; shape.len()];
        let mut acc = 1i64;
        for d in (0..shape.len()).rev() {
            strides[d] = acc;
            acc *= shape[d] as i64;
        }
        strides
    }

    fn spec(shape: &[u64], block_dim: usize, kv_dim: Option<usize>) -> TensorSpec {
        TensorSpec {
            shape: shape.to_vec(),
            stride: contiguous_strides(shape),
            element_size: 2,
            block_dim,
            kv_dim,
            byte_offset: 0,
        }
    }

    fn bytes(shape: &[u64]) -> u64 {
        shape.iter().product::<u64>() * 2
    }

    #[test]
    fn flash_attention_kv_first() {
        let shape = [2, 4000, 16, 8, 128];
        let layout = KvLayout::from_tensor(&spec(&shape, 1, Some(0)), bytes(&shape)).unwrap();
        assert_eq!(layout.num_blocks(), 4000);
        assert_eq!(layout.segment_bytes(), 32 * 1024);
        assert_eq!(layout.num_segments(), 2);
        assert_eq!(layout.slot_bytes(), 64 * 1024);
        assert_eq!(layout.segment_offset(3, 0), 3 * 32768);
        assert_eq!(layout.segment_offset(3, 1), 4000 * 32768 + 3 * 32768);
    }

    #[test]
    fn blocks_first_layout() {
        let shape = [100, 2, 16, 8, 64];
        let layout = KvLayout::from_tensor(&spec(&shape, 0, Some(1)), bytes(&shape)).unwrap();
        assert_eq!(layout.segment_bytes(), 16 * 8 * 64 * 2);
        assert_eq!(layout.segment_offset(1, 1), 3 * 16 * 8 * 64 * 2);
    }

    #[test]
    fn fused_cpu_layout_has_one_segment() {
        // vLLM CPU: [num_blocks, kv_heads, block_size, 2 * head_dim].
        let shape = [64, 4, 32, 64];
        let layout = KvLayout::from_tensor(&spec(&shape, 0, None), bytes(&shape)).unwrap();
        assert_eq!(layout.num_segments(), 1);
        assert_eq!(layout.segment_bytes(), 4 * 32 * 64 * 2);
        assert_eq!(layout.slot_bytes(), layout.segment_bytes());
    }

    #[test]
    fn byte_offset_shifts_everything_and_counts_in_range() {
        let shape = [2, 10, 4];
        let mut s = spec(&shape, 1, Some(0));
        s.byte_offset = 100;
        let layout = KvLayout::from_tensor(&s, bytes(&shape) + 100).unwrap();
        assert_eq!(layout.segment_offset(0, 0), 100);
        let err = KvLayout::from_tensor(&s, bytes(&shape) + 99).unwrap_err();
        assert!(matches!(err, LayoutError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn rejects_region_too_small() {
        let shape = [2, 10, 16];
        let err = KvLayout::from_tensor(&spec(&shape, 1, Some(0)), bytes(&shape) - 1).unwrap_err();
        assert_eq!(err, LayoutError::OutOfRange { end: bytes(&shape), region_len: bytes(&shape) - 1 });
    }

    #[test]
    fn rejects_blocks_overlapping() {
        let mut s = spec(&[10, 16], 0, None);
        s.stride = vec![8, 1]; // blocks 8 elements apart, segments 16 long
        let err = KvLayout::from_tensor(&s, 1 << 20).unwrap_err();
        assert!(matches!(err, LayoutError::Overlap(_)), "{err}");
    }

    #[test]
    fn rejects_v_landing_inside_other_blocks_k() {
        // K of block b at b*32, V at 40 + b*32: V of block 0 overlaps K of block 1.
        let s = TensorSpec {
            shape: vec![2, 4, 16],
            stride: vec![20, 16, 1],
            element_size: 2,
            block_dim: 1,
            kv_dim: Some(0),
            byte_offset: 0,
        };
        let err = KvLayout::from_tensor(&s, 1 << 20).unwrap_err();
        assert!(matches!(err, LayoutError::Overlap(_)), "{err}");
        // The same with V far after all K segments is fine.
        let ok = TensorSpec { stride: vec![64, 16, 1], ..s };
        KvLayout::from_tensor(&ok, 1 << 20).unwrap();
    }

    #[test]
    fn rejects_k_and_v_aliasing() {
        let mut s = spec(&[2, 4, 16], 1, Some(0));
        s.stride[0] = 0;
        let err = KvLayout::from_tensor(&s, 1 << 20).unwrap_err();
        assert!(matches!(err, LayoutError::Overlap(_)), "{err}");
    }

    #[test]
    fn rejects_non_dense_segment() {
        let mut s = spec(&[2, 10, 8, 16], 1, Some(0));
        s.stride[2] = 32; // gap between rows
        let err = KvLayout::from_tensor(&s, 1 << 20).unwrap_err();
        assert!(matches!(err, LayoutError::NotDense { dim: 2, .. }), "{err}");
    }

    #[test]
    fn rejects_bad_dimensions() {
        let s = spec(&[3, 10, 16], 1, Some(0));
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::Dimension(_))));
        let s = spec(&[2, 10, 16], 3, None);
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::Dimension(_))));
        let s = spec(&[2, 10, 16], 1, Some(1));
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::Dimension(_))));
        let mut s = spec(&[2, 10, 16], 1, Some(0));
        s.stride.pop();
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::Rank { .. })));
        let mut s = spec(&[2, 0, 16], 1, Some(0));
        s.stride = vec![16, 16, 1];
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::Degenerate { .. })));
        let mut s = spec(&[2, 10, 16], 1, Some(0));
        s.stride[1] = -16;
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::Degenerate { .. })));
        let mut s = spec(&[2, 10, 16], 1, Some(0));
        s.element_size = 0;
        assert!(matches!(KvLayout::from_tensor(&s, 1 << 20), Err(LayoutError::ElementSize(0))));
    }

    #[test]
    fn rejects_overflow() {
        let s = TensorSpec {
            shape: vec![2, u64::MAX / 2, 16],
            stride: vec![1 << 40, 16, 1],
            element_size: 2,
            block_dim: 1,
            kv_dim: Some(0),
            byte_offset: 0,
        };
        assert!(KvLayout::from_tensor(&s, u64::MAX).is_err());
    }
}
