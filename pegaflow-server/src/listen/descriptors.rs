//! The server end of the descriptor protocol (`pegaflow_proto::descriptor`): receives
//! sealed memory by `SCM_RIGHTS`, maps it through the engine and answers tokens. Every
//! token dies with the connection.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use pegaflow_core::{Engine, EngineError, MemoryKind, MemoryToken};
use pegaflow_proto::descriptor::{self as wire, REQUEST_BYTES, Request, Response};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::error::to_status;

/// Room for descriptors in one `recvmsg`; a request may carry one, more end the
/// connection (the kernel closes what does not fit).
const MAX_FDS: usize = 4;

/// Serves one descriptor connection of user `uid` until it closes or the server stops. A
/// request begun must be complete within `request_timeout`.
pub async fn serve(
    mut stream: UnixStream,
    uid: u32,
    connection: u64,
    engine: &Arc<Engine>,
    request_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let request = tokio::select! {
            request = read_request(&stream, request_timeout) => request,
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
                (Some(fd), true) => {
                    // Mapping faults every page in: seconds for a large region, off the
                    // async workers.
                    let engine = Arc::clone(engine);
                    tokio::task::spawn_blocking(move || engine.add_memory(fd, kind_of(kind), min_len, uid, connection))
                        .await
                        .unwrap_or_else(|e| Err(EngineError::Unavailable(format!("memory hand-over stopped: {e}"))))
                }
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
/// Once its first bytes arrived, the rest must follow within `timeout`, and a request
/// carrying more than one descriptor ends the connection at once (a client must not make
/// the server hold descriptors).
async fn read_request(
    stream: &UnixStream,
    timeout: Duration,
) -> std::io::Result<Option<([u8; REQUEST_BYTES], Vec<OwnedFd>)>> {
    let mut bytes = [0u8; REQUEST_BYTES];
    let mut fds = Vec::new();
    let mut got = 0;
    let mut deadline = None;
    while got < REQUEST_BYTES {
        let read = stream.async_io(Interest::READABLE, || receive(stream.as_raw_fd(), &mut bytes[got..], &mut fds));
        let n = match deadline {
            None => read.await?,
            Some(deadline) => tokio::time::timeout_at(deadline, read)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request not completed in time"))??,
        };
        if fds.len() > 1 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "more than one descriptor in a request"));
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "request cut short"))
            };
        }
        got += n;
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
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
