//! Host memory: the pool that holds cached blocks, and the allocator that carves it.
//!
//! The pool's size is the cache capacity. The allocator only hands out ranges; which
//! block owns a range, and when it is freed, is decided by the cache.

mod allocator;
mod pool;

pub use allocator::{PoolAllocator, PoolSlice};
pub use pool::{HostPool, PoolError, PoolOptions};
