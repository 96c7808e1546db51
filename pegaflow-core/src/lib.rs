//! PegaFlow engine core: KV layouts, the host memory pool, device backends, the block
//! cache and the save / query / load orchestration. No networking lives here.

pub mod cache;
pub mod device;
mod engine;
mod error;
pub mod layout;
pub mod memory;
pub mod ssd;

pub use engine::{
    Caller, Engine, EngineConfig, EngineInitError, EngineLimits, EngineMetrics, InstanceInfo, LayerRegistration,
    LeaseRef, LoadTraceConfig, MAX_ID_LEN, MAX_TOKENS_PER_CONNECTION, MemoryKind, MemoryToken, RankRef,
    RegisterRequest, SaveBlocks, SaveOutcome, SsdConfig, SsdMetrics, TOKEN_BYTES,
};
pub use error::{EngineError, ErrorCategory, MAX_SHOWN_CHARS, Result, Shown, shown};
