//! Client sessions: a server stream per client whose closing means the client is gone.
//!
//! tonic drops a response stream when its client disconnects (process killed, socket
//! closed, stream cancelled). The stream owns a guard: when it drops, the ranks registered
//! under this session are unregistered (and the instance with its last rank), so a hung
//! old client cannot keep a rank that a restarted one needs, and the mappings close.
//!
//! A session belongs to one instance id and to the peer that opened it (its uid over the
//! Unix socket). Its id is random and only ever sent to that peer: registering a rank, or
//! unregistering an instance, needs it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use pegaflow_core::{Engine, shown};
use pegaflow_proto::SessionEvent;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::IntervalStream;
use tonic::Status;
use tracing::info;

use crate::listen::{Busy, PeerInfo};

/// How often an open session sends a heartbeat (also surfaces dead peers).
const HEARTBEAT: Duration = Duration::from_secs(5);

struct SessionInfo {
    instance_id: String,
    uid: Option<u32>,
}

/// The open sessions by id. Every session stream ends when shutdown begins, so open
/// sessions never hold up a graceful stop.
pub struct Sessions {
    open: Mutex<HashMap<String, SessionInfo>>,
    shutdown: watch::Receiver<bool>,
}

impl Sessions {
    /// Sessions that end once `shutdown` turns true.
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self { open: Mutex::new(HashMap::new()), shutdown }
    }

    /// Opens a session of `peer` for `instance_id`.
    pub fn open(self: &Arc<Self>, instance_id: String, peer: Option<&PeerInfo>, engine: Arc<Engine>) -> SessionStream {
        let session_id = uuid::Uuid::new_v4().simple().to_string();
        let uid = peer.and_then(|p| p.uid);
        self.open.lock().insert(session_id.clone(), SessionInfo { instance_id: instance_id.clone(), uid });
        // Only a prefix of the id is logged: over TCP the id is the session's only proof.
        info!(instance = %shown(&instance_id), session = %&session_id[..8], uid, pid = peer.and_then(|p| p.pid), "session opened");
        let mut shutdown = self.shutdown.clone();
        SessionStream {
            shutdown: Box::pin(async move {
                // An error means the sender is gone: the server is stopping too.
                let _ = shutdown.wait_for(|stop| *stop).await;
            }),
            ticks: IntervalStream::new(tokio::time::interval(HEARTBEAT)),
            sequence: 0,
            _busy: peer.map(|p| p.activity.busy()),
            guard: SessionGuard { instance_id, session_id, engine, sessions: Arc::clone(self) },
        }
    }

    /// Checks that `session_id` is open, was opened for `instance_id`, and by the caller's
    /// user (when known).
    pub fn check(&self, session_id: &str, instance_id: &str, caller_uid: Option<u32>) -> Result<(), Status> {
        if session_id.is_empty() {
            return Err(Status::invalid_argument(
                "session_id is required: open a session (OpenSession) for the instance first",
            ));
        }
        let open = self.open.lock();
        let session = open.get(session_id).ok_or_else(|| {
            Status::not_found(format!("unknown or closed session {}: open a new one", shown(session_id)))
        })?;
        if session.instance_id != instance_id {
            return Err(Status::permission_denied(format!(
                "session {} was opened for another instance than {}",
                shown(session_id),
                shown(instance_id)
            )));
        }
        if session.uid != caller_uid {
            return Err(Status::permission_denied(format!(
                "session {} belongs to another user or connection",
                shown(session_id)
            )));
        }
        Ok(())
    }
}

struct SessionGuard {
    instance_id: String,
    session_id: String,
    engine: Arc<Engine>,
    sessions: Arc<Sessions>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.open.lock().remove(&self.session_id);
        let dropped = self.engine.unregister_session(&self.instance_id, &self.session_id);
        info!(
            instance = %shown(&self.instance_id),
            session = %&self.session_id[..8],
            ranks = dropped,
            "session closed: its ranks unregistered"
        );
    }
}

/// The heartbeat stream of one session.
pub struct SessionStream {
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ticks: IntervalStream,
    sequence: u64,
    /// An open session is a call in flight: its connection is never idle.
    _busy: Option<Busy>,
    guard: SessionGuard,
}

impl Stream for SessionStream {
    type Item = Result<SessionEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.ticks).poll_next(cx) {
            Poll::Ready(Some(_)) => {
                self.sequence += 1;
                let session_id = self.guard.session_id.clone();
                Poll::Ready(Some(Ok(SessionEvent { sequence: self.sequence, session_id })))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
