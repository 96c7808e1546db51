//! One anonymous mapping that backs every cached block.
//!
//! The mapping is created lazily by the kernel (pages are touched on first write), so
//! the server serves immediately whatever the pool size; [`HostPool::populate`] then
//! faults the pages in from background threads so copies do not pay first-touch faults.
//! With huge pages the kernel reserves 2 MiB pages up front from
//! `/proc/sys/vm/nr_hugepages`.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, MmapMut, MmapOptions};

/// Why the pool could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A zero-byte pool.
    #[error("pool size must be greater than zero")]
    Empty,
    /// The kernel refused the mapping (size, overcommit, or no huge pages reserved).
    #[error("cannot map a {size}-byte pool{hint}: {source}")]
    Map {
        /// Requested bytes.
        size: u64,
        /// Extra advice for the user.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How to create the pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Bytes of cache capacity.
    pub size: u64,
    /// Back the pool with 2 MiB huge pages. Default: false.
    pub use_hugepages: bool,
}

/// The cache's host memory. Ranges inside it are handed out by [`super::PoolAllocator`];
/// whoever holds a range has exclusive use of those bytes.
pub struct HostPool {
    base: NonNull<u8>,
    len: u64,
    // Keeps the mapping alive for as long as `base` is used.
    _map: MmapMut,
}

// SAFETY: the pool is a plain byte buffer; concurrent access to disjoint ranges is
// coordinated by the allocator and the cache (each range has one owner at a time).
unsafe impl Send for HostPool {}
// SAFETY: as above; `HostPool` itself exposes only raw pointers, never references.
unsafe impl Sync for HostPool {}

const HUGE_PAGE_BITS: u8 = 21;

impl HostPool {
    /// Maps a pool of `options.size` bytes (rounded up to 2 MiB with huge pages).
    pub fn new(options: PoolOptions) -> Result<Self, PoolError> {
        if options.size == 0 {
            return Err(PoolError::Empty);
        }
        let mut len = options.size;
        let mut mmap_options = MmapOptions::new();
        if options.use_hugepages {
            let huge = 1u64 << HUGE_PAGE_BITS;
            len = len.div_ceil(huge) * huge;
            mmap_options.huge(Some(HUGE_PAGE_BITS));
        }
        let map_err = |source| PoolError::Map {
            size: len,
            hint: if options.use_hugepages {
                " (are enough huge pages reserved in /proc/sys/vm/nr_hugepages?)"
            } else {
                ""
            },
            source,
        };
        let byte_len = usize::try_from(len).map_err(|_| {
            map_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "size exceeds the address space"))
        })?;
        let mut map = mmap_options.len(byte_len).map_anon().map_err(map_err)?;
        let base = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| map_err(std::io::Error::other("mmap returned a null pointer")))?;
        Ok(Self { base, len, _map: map })
    }

    /// Bytes in the pool.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a pool has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Faults every page in with `MADV_POPULATE_WRITE` (contents unchanged, so it is safe
    /// while copies run), split over `threads` threads. `ready` grows by the bytes done.
    /// Fails on kernels older than 5.14, where pages then fault in lazily on first use.
    pub fn populate(&self, threads: usize, ready: &AtomicU64) -> std::io::Result<()> {
        const CHUNK: u64 = 64 << 20;
        let chunks = self.len.div_ceil(CHUNK);
        let next = AtomicU64::new(0);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| -> std::io::Result<()> {
                        loop {
                            let chunk = next.fetch_add(1, Ordering::Relaxed);
                            if chunk >= chunks {
                                return Ok(());
                            }
                            let offset = chunk * CHUNK;
                            let len = CHUNK.min(self.len - offset);
                            self._map.advise_range(Advice::PopulateWrite, offset as usize, len as usize)?;
                            ready.fetch_add(len, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(std::io::Error::other("panicked"))))
        })
    }

    /// Pointer to byte `offset`.
    ///
    /// Returns `None` unless `offset + len <= self.len()`. The pointer is valid for `len`
    /// bytes for the life of the pool; reading or writing it is only sound for the holder
    /// of the [`super::PoolSlice`] covering that range.
    pub fn ptr_at(&self, offset: u64, len: u64) -> Option<NonNull<u8>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        let offset = usize::try_from(offset).ok()?;
        // SAFETY: `offset <= self.len`, which is the length of the live mapping at `base`.
        Some(unsafe { self.base.add(offset) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_bounds_checks() {
        let pool = HostPool::new(PoolOptions { size: 1 << 20, use_hugepages: false }).unwrap();
        assert_eq!(pool.len(), 1 << 20);
        assert!(pool.ptr_at(0, 1 << 20).is_some());
        assert!(pool.ptr_at(1, 1 << 20).is_none());
        assert!(pool.ptr_at(u64::MAX, 2).is_none());
    }

    #[test]
    fn populate_keeps_contents_and_counts_every_byte() {
        let pool = HostPool::new(PoolOptions { size: (130 << 20) + 4096, use_hugepages: false }).unwrap();
        let p = pool.ptr_at(100 << 20, 1).unwrap();
        // SAFETY: byte 100 MiB is inside the pool and nothing else uses it.
        unsafe { p.write(7) };
        let ready = AtomicU64::new(0);
        pool.populate(3, &ready).unwrap();
        assert_eq!(ready.load(Ordering::Relaxed), pool.len());
        // SAFETY: as above.
        assert_eq!(unsafe { p.read() }, 7);
    }

    #[test]
    fn zero_size_fails() {
        assert!(matches!(HostPool::new(PoolOptions { size: 0, use_hugepages: false }), Err(PoolError::Empty)));
    }
}
