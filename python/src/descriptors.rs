//! The client's descriptor connection: hands sealed memory (KV tensors, load states) to
//! the server over its Unix socket and gets the tokens gRPC calls name it by.
//!
//! One connection per `EngineClient`, opened on first use and reopened when the server
//! closed it (a restart): every token of a closed connection is void, so each connection
//! gets a process-unique id and a token is only reused on the connection that issued it.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pegaflow_proto::descriptor::{DescriptorClient, DescriptorError, MemoryKind, TOKEN_BYTES};

/// A memory token and the connection it is valid on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Id of the descriptor connection that issued it.
    pub connection: u64,
    /// The token bytes.
    pub bytes: [u8; TOKEN_BYTES],
}

/// Why memory could not be handed over.
#[derive(Debug)]
pub enum HandOverError {
    /// The server's socket is unknown or unreachable (class `PegaflowUnavailable`).
    Unreachable(String),
    /// Another server than the one Health described answers on the socket (a restart, or
    /// another host's server at the same path): ask Health again.
    ServerChanged,
    /// The server refused the memory; a gRPC code and its reason.
    Refused {
        /// gRPC status code.
        code: u32,
        /// The server's message.
        message: String,
    },
}

/// The connection, lazily opened.
#[derive(Debug, Default)]
pub struct Descriptors {
    path: Option<PathBuf>,
    /// The id the server behind `path` must answer (known when the path came from Health).
    server_id: Option<Vec<u8>>,
    conn: Option<(u64, DescriptorClient)>,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl Descriptors {
    /// Where the server's socket is, once known.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// Sets the server's socket (a `unix:` endpoint).
    pub fn set_path(&mut self, path: PathBuf) {
        if self.path.as_ref() != Some(&path) {
            self.conn = None;
            self.path = Some(path);
        }
    }

    /// Sets the server's socket and the id its server must answer (from Health).
    pub fn set_server(&mut self, path: PathBuf, server_id: Vec<u8>) {
        self.set_path(path);
        self.server_id = Some(server_id);
    }

    /// The id of the live connection, if any (a connection the server closed is dropped).
    pub fn live_connection(&mut self) -> Option<u64> {
        if self.conn.as_ref().is_some_and(|(_, c)| !c.is_open()) {
            self.conn = None;
        }
        self.conn.as_ref().map(|(id, _)| *id)
    }

    fn connection(&mut self, timeout: Duration) -> Result<&mut (u64, DescriptorClient), HandOverError> {
        self.live_connection();
        if self.conn.is_none() {
            let path = self.path.clone().ok_or_else(|| {
                HandOverError::Unreachable("the server has no Unix socket (started with --uds '')".into())
            })?;
            let client = DescriptorClient::connect(&path, timeout).map_err(|e| {
                HandOverError::Unreachable(format!(
                    "cannot reach the server's Unix socket {} ({e}): host memory can only be handed over on the \
                     server's host, by a user allowed to open the socket",
                    path.display()
                ))
            })?;
            if self.server_id.as_deref().is_some_and(|id| id != client.server_id()) {
                return Err(HandOverError::ServerChanged);
            }
            self.conn = Some((NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed), client));
        }
        self.conn.as_mut().ok_or_else(|| HandOverError::Unreachable("no connection".into()))
    }

    /// Hands `fd` over; returns its token.
    pub fn register(
        &mut self,
        fd: BorrowedFd<'_>,
        kind: MemoryKind,
        min_len: u64,
        timeout: Duration,
    ) -> Result<Token, HandOverError> {
        let (id, client) = self.connection(timeout)?;
        let id = *id;
        match client.register(fd, kind, min_len) {
            Ok(bytes) => Ok(Token { connection: id, bytes }),
            Err(DescriptorError::Refused { code, message }) => Err(HandOverError::Refused { code, message }),
            Err(DescriptorError::Io(e)) => {
                self.conn = None;
                Err(HandOverError::Unreachable(format!("the server's Unix socket failed: {e}")))
            }
        }
    }

    /// Tells the server to forget `token` (if its connection is still the live one).
    pub fn release(&mut self, token: Token) {
        if let Some((id, client)) = self.conn.as_mut()
            && *id == token.connection
            && client.release(token.bytes).is_err()
        {
            self.conn = None;
        }
    }
}
