//! Client memory received by descriptor, named by unguessable tokens.
//!
//! A client hands the server a sealed memfd over the Unix socket (KV memory to register,
//! or a load state); the server maps it at once, closes the descriptor and answers with a
//! random 128-bit token that later gRPC calls name. An entry belongs to the descriptor
//! connection that brought it and disappears when that connection closes or the client
//! releases it; a registered region keeps its own reference, so releasing the token never
//! unmaps memory in use. Entries per connection and client mappings in total are capped.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::{HostMemory, RegionSource};
use crate::error::{EngineError, Result};
use pegaflow_common::load_state::{LOAD_STATE_BYTES, LoadState, LoadStateError};
use pegaflow_common::shm::{SharedMemory, ShmError, client_mapped_bytes, client_mappings};

/// Bytes of a memory token.
pub const TOKEN_BYTES: usize = 16;

/// Tokens one descriptor connection may hold at once.
pub const MAX_TOKENS_PER_CONNECTION: usize = 4096;

/// Names memory a client handed over. Random, so knowing one proves having been told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryToken(pub [u8; TOKEN_BYTES]);

impl MemoryToken {
    /// Parses the token bytes of a request.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        bytes.try_into().map(Self).map_err(|_| {
            EngineError::invalid(format!("memory token has {} bytes, expected {TOKEN_BYTES}", bytes.len()))
        })
    }
}

/// What a client's memory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// KV tensors to register.
    KvMemory,
    /// A load-completion flag (see [`pegaflow_common::load_state`]).
    LoadState,
}

enum Held {
    Kv(Arc<SharedMemory>),
    LoadState(Arc<LoadState>),
}

struct Entry {
    held: Held,
    /// Unix user that handed it over.
    uid: u32,
    connection: u64,
}

/// The token table.
pub(crate) struct MemoryHandles {
    entries: Mutex<HashMap<MemoryToken, Entry>>,
    max_mappings: usize,
    max_bytes: u64,
}

impl MemoryHandles {
    /// A table under caps of `max_mappings` client mappings and `max_bytes` mapped client
    /// bytes (both counted over everything mapped, registered regions included).
    pub fn new(max_mappings: usize, max_bytes: u64) -> Self {
        Self { entries: Mutex::new(HashMap::new()), max_mappings, max_bytes }
    }

    /// Maps `fd` (checks in [`SharedMemory::from_fd`]) and files it under a new token owned
    /// by `connection` of user `uid`.
    pub fn add(&self, fd: OwnedFd, kind: MemoryKind, min_len: u64, uid: u32, connection: u64) -> Result<MemoryToken> {
        if client_mappings() >= self.max_mappings as i64 {
            return Err(EngineError::ResourceExhausted(format!(
                "the server holds {} client memory mappings, its cap: unregister some first",
                client_mappings()
            )));
        }
        let held_by_connection = self.entries.lock().values().filter(|e| e.connection == connection).count();
        if held_by_connection >= MAX_TOKENS_PER_CONNECTION {
            return Err(EngineError::ResourceExhausted(format!(
                "this connection holds {held_by_connection} memory tokens, the most allowed: release some first"
            )));
        }
        let room = self.max_bytes.saturating_sub(client_mapped_bytes());
        let held = match kind {
            MemoryKind::KvMemory => Held::Kv(Arc::new(SharedMemory::from_fd(fd, min_len, room).map_err(memory_error)?)),
            MemoryKind::LoadState => {
                let memory = SharedMemory::from_fd(fd, LOAD_STATE_BYTES, room).map_err(memory_error)?;
                Held::LoadState(Arc::new(LoadState::open(Arc::new(memory)).map_err(|e| match e {
                    LoadStateError::Shm(e) => memory_error(e),
                    LoadStateError::BadMagic => EngineError::invalid("the memory is not a PegaFlow load state"),
                })?))
            }
        };
        let token = MemoryToken(*uuid::Uuid::new_v4().as_bytes());
        self.entries.lock().insert(token, Entry { held, uid, connection });
        Ok(token)
    }

    /// Forgets a token of `connection` (unknown tokens are ignored: releasing is idempotent).
    pub fn release(&self, token: &MemoryToken, connection: u64) {
        let mut entries = self.entries.lock();
        if entries.get(token).is_some_and(|e| e.connection == connection) {
            entries.remove(token);
        }
    }

    /// Forgets every token of a closed connection; returns how many.
    pub fn drop_connection(&self, connection: u64) -> usize {
        let mut entries = self.entries.lock();
        let before = entries.len();
        entries.retain(|_, e| e.connection != connection);
        before - entries.len()
    }

    /// The KV memory `token` names, as a region source. `caller_uid` (known over the Unix
    /// socket) must be the user who handed it over.
    pub fn kv_memory(&self, token: &MemoryToken, caller_uid: Option<u32>) -> Result<RegionSource> {
        let entries = self.entries.lock();
        let entry = entries.get(token).ok_or_else(|| unknown_token("KV memory"))?;
        check_uid(entry, caller_uid)?;
        match &entry.held {
            Held::Kv(memory) => Ok(RegionSource::HostMemory(HostMemory(Arc::clone(memory)))),
            Held::LoadState(_) => Err(EngineError::invalid("the token names a load state, not KV memory")),
        }
    }

    /// The load state `token` names.
    pub fn load_state(&self, token: &MemoryToken, caller_uid: Option<u32>) -> Result<Arc<LoadState>> {
        let entries = self.entries.lock();
        let entry = entries.get(token).ok_or_else(|| unknown_token("load state"))?;
        check_uid(entry, caller_uid)?;
        match &entry.held {
            Held::LoadState(state) => Ok(Arc::clone(state)),
            Held::Kv(_) => Err(EngineError::invalid("the token names KV memory, not a load state")),
        }
    }
}

fn check_uid(entry: &Entry, caller_uid: Option<u32>) -> Result<()> {
    match caller_uid {
        Some(uid) if uid != entry.uid => Err(EngineError::denied("the memory was handed over by another user")),
        _ => Ok(()),
    }
}

fn unknown_token(what: &str) -> EngineError {
    EngineError::not_found(format!(
        "unknown {what} token: hand the memory over again (tokens end with the connection that brought them)"
    ))
}

fn memory_error(e: ShmError) -> EngineError {
    match e {
        ShmError::TooLarge { .. } => EngineError::ResourceExhausted(e.to_string()),
        ShmError::Os { ref source, .. } | ShmError::Populate(ref source)
            if matches!(source.raw_os_error(), Some(libc::ENOMEM | libc::ENOSPC | libc::EFAULT)) =>
        {
            EngineError::ResourceExhausted(e.to_string())
        }
        // Whatever else the checks or the mapping of a client's descriptor fail on comes
        // from that descriptor.
        other => EngineError::invalid(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd_of(memory: &SharedMemory) -> OwnedFd {
        memory.fd().unwrap().try_clone_to_owned().unwrap()
    }

    #[test]
    fn tokens_resolve_by_kind_and_owner_and_end_with_their_connection() {
        let handles = MemoryHandles::new(1 << 20, u64::MAX);
        let kv = SharedMemory::create("kv", 8192).unwrap();
        let state = LoadState::create().unwrap();
        let kv_token = handles.add(fd_of(&kv), MemoryKind::KvMemory, 4096, 1000, 7).unwrap();
        let state_token = handles.add(fd_of(state.memory()), MemoryKind::LoadState, 0, 1000, 7).unwrap();
        assert_ne!(kv_token, state_token);

        assert!(matches!(handles.kv_memory(&kv_token, Some(1000)), Ok(RegionSource::HostMemory(_))));
        assert!(handles.kv_memory(&kv_token, None).is_ok(), "over TCP the token is the proof");
        assert!(matches!(handles.kv_memory(&kv_token, Some(1001)), Err(EngineError::PermissionDenied(_))));
        assert!(matches!(handles.kv_memory(&state_token, Some(1000)), Err(EngineError::InvalidArgument(_))));
        assert!(handles.load_state(&state_token, Some(1000)).is_ok());

        // Another connection cannot release it; its own can, and closing drops the rest.
        handles.release(&kv_token, 8);
        assert!(handles.kv_memory(&kv_token, None).is_ok());
        handles.release(&kv_token, 7);
        assert!(matches!(handles.kv_memory(&kv_token, None), Err(EngineError::NotFound(_))));
        assert_eq!(handles.drop_connection(7), 1);
        assert!(matches!(handles.load_state(&state_token, None), Err(EngineError::NotFound(_))));
    }

    #[test]
    fn bad_memory_is_refused_with_a_clear_error() {
        let handles = MemoryHandles::new(1 << 20, u64::MAX);
        let small = SharedMemory::create("small", 100).unwrap();
        let err = handles.add(fd_of(&small), MemoryKind::KvMemory, 4096, 0, 1).unwrap_err();
        assert!(matches!(err, EngineError::InvalidArgument(ref m) if m.contains("need at least 4096")), "{err}");
        let not_a_state = SharedMemory::create("x", LOAD_STATE_BYTES).unwrap();
        let err = handles.add(fd_of(&not_a_state), MemoryKind::LoadState, 0, 0, 1).unwrap_err();
        assert!(matches!(err, EngineError::InvalidArgument(_)), "{err}");
        let none = MemoryHandles::new(0, u64::MAX);
        let err = none.add(fd_of(&small), MemoryKind::KvMemory, 1, 0, 1).unwrap_err();
        assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err}");
        let no_bytes = MemoryHandles::new(1 << 20, 0);
        let err = no_bytes.add(fd_of(&small), MemoryKind::KvMemory, 1, 0, 1).unwrap_err();
        assert!(matches!(err, EngineError::ResourceExhausted(ref m) if m.contains("at most")), "{err}");
    }
}
