//! Client sessions: a server stream per client whose closing means the client is gone.
//!
//! tonic drops a response stream when its client disconnects (process killed, socket
//! closed, stream cancelled). The stream owns a guard: when it drops, the ranks registered
//! under this session are unregistered (so a hung old client cannot keep a rank that a
//! restarted one needs), and when it was the instance's last session, the whole instance
//! goes. Either way the mappings close.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use pegaflow_core::{Engine, EngineError};
use pegaflow_proto::SessionEvent;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::IntervalStream;
use tonic::Status;
use tracing::{info, warn};

/// How often an open session sends a heartbeat (also surfaces dead peers).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Open sessions per instance. Every session stream ends when shutdown begins, so open
/// sessions never hold up a graceful stop.
pub struct Sessions {
    open: Mutex<HashMap<String, usize>>,
    shutdown: watch::Receiver<bool>,
}

impl Sessions {
    /// Sessions that end once `shutdown` turns true.
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self { open: Mutex::new(HashMap::new()), shutdown }
    }

    /// Opens a session for `instance_id`.
    pub fn open(self: &Arc<Self>, instance_id: String, engine: Arc<Engine>) -> SessionStream {
        if let Ok(mut open) = self.open.lock() {
            *open.entry(instance_id.clone()).or_default() += 1;
        }
        let session_id = uuid::Uuid::new_v4().simple().to_string();
        info!(instance = %instance_id, session = %session_id, "session opened");
        let mut shutdown = self.shutdown.clone();
        SessionStream {
            shutdown: Box::pin(async move {
                // An error means the sender is gone: the server is stopping too.
                let _ = shutdown.wait_for(|stop| *stop).await;
            }),
            ticks: IntervalStream::new(tokio::time::interval(HEARTBEAT)),
            sequence: 0,
            _guard: SessionGuard { instance_id, session_id, engine, sessions: Arc::clone(self) },
        }
    }

    /// Counts a closed session; true when it was the instance's last.
    fn close(&self, instance_id: &str) -> bool {
        let Ok(mut open) = self.open.lock() else { return false };
        match open.get_mut(instance_id) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                open.remove(instance_id);
                true
            }
            None => false,
        }
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
        let owned = self.engine.unregister_session(&self.instance_id, &self.session_id);
        if owned > 0 {
            info!(instance = %self.instance_id, session = %self.session_id, ranks = owned, "session closed: its ranks unregistered");
        }
        if !self.sessions.close(&self.instance_id) {
            return;
        }
        match self.engine.unregister(&self.instance_id) {
            Ok(()) => info!(instance = %self.instance_id, "session closed: instance unregistered"),
            Err(EngineError::NotFound(_)) => info!(instance = %self.instance_id, "session closed"),
            Err(e) => warn!(instance = %self.instance_id, error = %e, "session closed: unregister failed"),
        }
    }
}

/// The heartbeat stream of one session.
pub struct SessionStream {
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ticks: IntervalStream,
    sequence: u64,
    _guard: SessionGuard,
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
                let session_id = self._guard.session_id.clone();
                Poll::Ready(Some(Ok(SessionEvent { sequence: self.sequence, session_id })))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
