//! The server end of the descriptor protocol (`pegaflow_proto::descriptor`): receives
//! sealed memory by `SCM_RIGHTS`, maps it through the engine and answers tokens. Every
//! token dies with the connection.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use pegaflow_core::{Engine, EngineError, MemoryKind, MemoryToken};
use pegaflow_proto::descriptor::{self as wire, REQUEST_BYTES, Request, Response};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::error::to_status;

/// Descriptors accepted with one request; more are closed and the request refused.
const MAX_FDS: usize = 4;

/// Serves one descriptor connection of user `uid` until it closes or the server stops.
pub async fn serve(
    mut stream: UnixStream,
    uid: u32,
    connection: u64,
    engine: &Arc<Engine>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let request = tokio::select! {
            request = read_request(&stream) => request,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (bytes, mut fds) = match request {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, connection, "descriptor connection failed");
                break;
            }
        };
        let answer = match Request::decode(&bytes) {
            Err(reason) => Some(Err(EngineError::InvalidArgument(reason))),
            Ok(Request::Release { token }) => {
                engine.release_memory(&MemoryToken(token), connection);
                None
            }
            Ok(Request::Register { kind, min_len }) => Some(match (fds.pop(), fds.is_empty()) {
                (Some(fd), true) => engine.add_memory(fd, kind_of(kind), min_len, uid, connection),
                (None, _) => Err(EngineError::InvalidArgument("a register request needs one descriptor".into())),
                (Some(_), false) => {
                    Err(EngineError::InvalidArgument("a register request takes exactly one descriptor".into()))
                }
            }),
        };
        drop(fds); // descriptors no request asked for
        let Some(answer) = answer else { continue };
        let response = match answer {
            Ok(token) => Response { code: 0, token: token.0, message: String::new() },
            Err(e) => {
                let status = to_status(e);
                Response { code: status.code() as u32, token: [0; wire::TOKEN_BYTES], message: status.message().into() }
            }
        };
        if stream.write_all(&response.encode()).await.is_err() {
            break;
        }
    }
    let dropped = engine.drop_connection(connection);
    if dropped > 0 {
        info!(connection, uid, tokens = dropped, "descriptor connection closed: its memory tokens dropped");
    }
}

fn kind_of(kind: wire::MemoryKind) -> MemoryKind {
    match kind {
        wire::MemoryKind::KvMemory => MemoryKind::KvMemory,
        wire::MemoryKind::LoadState => MemoryKind::LoadState,
    }
}

/// Reads one request and the descriptors that came with it; `None` at end of stream.
async fn read_request(stream: &UnixStream) -> std::io::Result<Option<([u8; REQUEST_BYTES], Vec<OwnedFd>)>> {
    let mut bytes = [0u8; REQUEST_BYTES];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < REQUEST_BYTES {
        let n =
            stream.async_io(Interest::READABLE, || receive(stream.as_raw_fd(), &mut bytes[got..], &mut fds)).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "request cut short"))
            };
        }
        got += n;
    }
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many descriptors"));
    }
    Ok(Some((bytes, fds)))
}

/// One non-blocking `recvmsg`: bytes into `buf`, descriptors (owned at once, so none can
/// leak) into `fds`.
fn receive(socket: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(socket, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT)
        .map_err(std::io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for fd in received {
                // SAFETY: the kernel just installed `fd` in this process for us; nothing else
                // owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many descriptors in one message"));
    }
    Ok(msg.bytes)
}
