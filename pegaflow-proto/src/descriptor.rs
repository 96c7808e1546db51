//! The descriptor protocol: how a client hands memory to the server by file descriptor.
//!
//! It runs on the server's Unix socket beside gRPC: a connection whose first bytes are
//! [`HELLO`] speaks it, any other is gRPC (HTTP/2). The server answers the hello with its
//! 16-byte server id (the one Health reports), so a client can tell it reached the server
//! it meant. Then the client sends fixed-size requests ([`REQUEST_BYTES`]):
//!
//! ```text
//! 0      op: 1 register (exactly one descriptor attached, SCM_RIGHTS), 2 release
//! 1      kind (register): 1 KV memory, 2 load state
//! 2..8   zero
//! 8..16  register: minimum bytes the memory must have (little endian)
//! 16..32 release: the token to forget
//! ```
//!
//! A register is answered with `status (u32, a gRPC code, 0 = OK) | token (16 bytes) |
//! message length (u32) | message (UTF-8, at most 1024 bytes)`; a release is not
//! answered. The server maps the memory, closes the descriptor and files the mapping under
//! the token, which gRPC calls then name (`HostMemoryRegion.token`,
//! `LoadRequest.load_state_token`). Tokens end with the connection that brought them.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// First bytes of a descriptor connection (version 1).
pub const HELLO: [u8; 8] = *b"PFDESC01";
/// Bytes of one request.
pub const REQUEST_BYTES: usize = 32;
/// Bytes of a response before its message.
pub const RESPONSE_HEADER_BYTES: usize = 24;
/// Longest response message.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Bytes of a token.
pub const TOKEN_BYTES: usize = 16;

/// What memory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// KV tensors to register.
    KvMemory = 1,
    /// A load-completion flag.
    LoadState = 2,
}

/// A client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Map the attached descriptor (at least `min_len` bytes) and answer a token.
    Register {
        /// What the memory is for.
        kind: MemoryKind,
        /// Bytes it must have at least.
        min_len: u64,
    },
    /// Forget a token.
    Release {
        /// The token.
        token: [u8; TOKEN_BYTES],
    },
}

impl Request {
    /// The request's wire bytes.
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut out = [0u8; REQUEST_BYTES];
        match *self {
            Self::Register { kind, min_len } => {
                out[0] = 1;
                out[1] = kind as u8;
                out[8..16].copy_from_slice(&min_len.to_le_bytes());
            }
            Self::Release { token } => {
                out[0] = 2;
                out[16..32].copy_from_slice(&token);
            }
        }
        out
    }

    /// Parses wire bytes; the reason when they are not a request.
    pub fn decode(bytes: &[u8; REQUEST_BYTES]) -> Result<Self, String> {
        if bytes[2..8].iter().any(|&b| b != 0) {
            return Err("reserved request bytes must be zero".into());
        }
        match bytes[0] {
            1 => {
                let kind = match bytes[1] {
                    1 => MemoryKind::KvMemory,
                    2 => MemoryKind::LoadState,
                    other => return Err(format!("unknown memory kind {other}")),
                };
                let mut len = [0u8; 8];
                len.copy_from_slice(&bytes[8..16]);
                Ok(Self::Register { kind, min_len: u64::from_le_bytes(len) })
            }
            2 => {
                let mut token = [0u8; TOKEN_BYTES];
                token.copy_from_slice(&bytes[16..32]);
                Ok(Self::Release { token })
            }
            other => Err(format!("unknown request op {other}")),
        }
    }
}

/// The answer to a register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// A gRPC status code (0: OK).
    pub code: u32,
    /// The token (zero on error).
    pub token: [u8; TOKEN_BYTES],
    /// Why it failed (empty on success).
    pub message: String,
}

impl Response {
    /// The response's wire bytes; the message is cut to [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_MESSAGE_BYTES);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &self.message.as_bytes()[..end];
        let mut out = Vec::with_capacity(RESPONSE_HEADER_BYTES + message.len());
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(&self.token);
        out.extend_from_slice(&(message.len() as u32).to_le_bytes());
        out.extend_from_slice(message);
        out
    }
}

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// The socket failed (server gone, wrong path, permission).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server refused the memory; `code` is a gRPC status code.
    #[error("{message}")]
    Refused {
        /// gRPC status code.
        code: u32,
        /// The server's reason.
        message: String,
    },
}

/// Bytes of the server id answered to the hello.
pub const SERVER_ID_BYTES: usize = 16;

/// The client end: one connection, blocking calls.
#[derive(Debug)]
pub struct DescriptorClient {
    stream: UnixStream,
    server_id: [u8; SERVER_ID_BYTES],
}

impl DescriptorClient {
    /// Connects to the server's Unix socket at `path`; every read and write gives up after
    /// `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let mut stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&HELLO)?;
        let mut server_id = [0u8; SERVER_ID_BYTES];
        stream.read_exact(&mut server_id)?;
        Ok(Self { stream, server_id })
    }

    /// The id of the server on the other end (as its Health reports it).
    pub fn server_id(&self) -> [u8; SERVER_ID_BYTES] {
        self.server_id
    }

    /// Hands `fd` over as `kind` memory of at least `min_len` bytes; returns its token.
    pub fn register(
        &mut self,
        fd: BorrowedFd<'_>,
        kind: MemoryKind,
        min_len: u64,
    ) -> Result<[u8; TOKEN_BYTES], DescriptorError> {
        let request = Request::Register { kind, min_len }.encode();
        let fds = [fd.as_raw_fd()];
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(&request)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        self.stream.write_all(&request[sent..])?;
        let mut header = [0u8; RESPONSE_HEADER_BYTES];
        self.stream.read_exact(&mut header)?;
        let word = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let (code, len) = (word(0), word(20) as usize);
        if len > MAX_MESSAGE_BYTES {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "response message too long").into());
        }
        let mut message = vec![0u8; len];
        self.stream.read_exact(&mut message)?;
        if code != 0 {
            return Err(DescriptorError::Refused { code, message: String::from_utf8_lossy(&message).into_owned() });
        }
        let mut token = [0u8; TOKEN_BYTES];
        token.copy_from_slice(&header[4..20]);
        Ok(token)
    }

    /// Tells the server to forget `token` (not answered).
    pub fn release(&mut self, token: [u8; TOKEN_BYTES]) -> std::io::Result<()> {
        self.stream.write_all(&Request::Release { token }.encode())
    }

    /// Whether the server still holds the connection (a closed one lost every token).
    pub fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        match nix::sys::socket::recv(self.stream.as_raw_fd(), &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => false,
            Ok(_) => true, // the server never sends unasked; treat as open
            Err(nix::errno::Errno::EAGAIN) => true,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        for request in [
            Request::Register { kind: MemoryKind::KvMemory, min_len: 1 << 40 },
            Request::Register { kind: MemoryKind::LoadState, min_len: 512 },
            Request::Release { token: [7; TOKEN_BYTES] },
        ] {
            assert_eq!(Request::decode(&request.encode()), Ok(request));
        }
        let mut bad = Request::Register { kind: MemoryKind::KvMemory, min_len: 0 }.encode();
        bad[1] = 9;
        assert!(Request::decode(&bad).is_err());
        bad[0] = 0;
        assert!(Request::decode(&bad).is_err());
        let mut reserved = Request::Release { token: [1; 16] }.encode();
        reserved[3] = 1;
        assert!(Request::decode(&reserved).is_err());
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let wire = Response { code: 3, token: [0; 16], message: "é".repeat(2000) }.encode();
        let len = u32::from_le_bytes([wire[20], wire[21], wire[22], wire[23]]) as usize;
        assert!(len <= MAX_MESSAGE_BYTES && len.is_multiple_of(2));
        assert_eq!(wire.len(), RESPONSE_HEADER_BYTES + len);
    }
}
