//! Accepting connections: TCP and the Unix socket, under one connection cap, each
//! connection wrapped in [`Guarded`] (peer identity, handshake and idle timeouts).
//!
//! On the Unix socket the first 8 bytes decide the protocol: the descriptor protocol's
//! hello (memory handed over by `SCM_RIGHTS`, see `pegaflow_proto::descriptor`) or
//! anything else, which is replayed to gRPC.

mod descriptors;
mod guarded;
mod uds;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pegaflow_core::Engine;
use pegaflow_proto::descriptor::HELLO;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

pub use guarded::{Busy, Guarded, PeerInfo, Slot, Timeouts, Transport};
pub use uds::{bind_unix, remove_socket};

/// Connection metrics (`pegaflow_connections*`).
#[derive(Debug, Default)]
pub struct ListenMetrics {
    /// Connections open now (gRPC, descriptor and HTTP).
    pub connections: Gauge,
    /// Connections closed on arrival because every slot was taken.
    pub refused: Counter,
    /// Connections closed by a timeout, by reason (`handshake`, `idle`).
    pub timed_out: Family<Vec<(String, String)>, Counter>,
    /// Calls refused for a missing or wrong auth token.
    pub unauthenticated: Counter,
    /// The open-file limit the server runs with.
    pub open_files_limit: Gauge,
}

impl ListenMetrics {
    /// Adds the metrics to `registry` under the `pegaflow_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        // Every reason shows from the start (zeros, not gaps).
        for reason in ["handshake", "idle"] {
            let _ = self.timed_out.get_or_create(&vec![("reason".to_owned(), reason.to_owned())]);
        }
        let r = registry.sub_registry_with_prefix("pegaflow");
        r.register("connections", "Client connections open (gRPC, descriptor, HTTP)", self.connections.clone());
        r.register("connections_refused", "Connections closed on arrival: every slot taken", self.refused.clone());
        r.register("connections_timed_out", "Connections closed by a timeout, by reason", self.timed_out.clone());
        r.register(
            "unauthenticated_requests",
            "Calls refused for a missing or wrong token",
            self.unauthenticated.clone(),
        );
        r.register("open_files_limit", "RLIMIT_NOFILE the server runs with", self.open_files_limit.clone());
    }

    fn timed_out(&self, reason: &str) {
        self.timed_out.get_or_create(&vec![("reason".to_owned(), reason.to_owned())]).inc();
    }

    #[cfg(test)]
    fn timed_out_count(&self, reason: &str) -> u64 {
        self.timed_out.get_or_create(&vec![("reason".to_owned(), reason.to_owned())]).get()
    }
}

/// What every accept loop shares.
pub struct Listening {
    /// Answered to a descriptor connection's hello (Health reports it too).
    server_id: [u8; 16],
    slots: Arc<Semaphore>,
    timeouts: Timeouts,
    metrics: Arc<ListenMetrics>,
    engine: Arc<Engine>,
    next_connection: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl Listening {
    /// Accept loops over at most `max_connections` connections at once, of the server
    /// `server_id`.
    pub fn new(
        server_id: [u8; 16],
        max_connections: usize,
        timeouts: Timeouts,
        metrics: Arc<ListenMetrics>,
        engine: Arc<Engine>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            server_id,
            slots: Arc::new(Semaphore::new(max_connections)),
            timeouts,
            metrics,
            engine,
            next_connection: AtomicU64::new(1),
            shutdown,
        })
    }

    fn slot(&self) -> Option<Slot> {
        Slot::take(&self.slots, &self.metrics)
    }

    /// Waits for the next connection that gets a slot (others are closed on arrival);
    /// `None` once the server stops.
    async fn next<S, Fut>(&self, stop: &mut watch::Receiver<bool>, mut accept: impl FnMut() -> Fut) -> Option<(S, Slot)>
    where
        Fut: Future<Output = std::io::Result<S>>,
    {
        loop {
            let accepted = tokio::select! {
                accepted = accept() => accepted,
                _ = stop.wait_for(|s| *s) => return None,
            };
            match accepted {
                Ok(stream) => {
                    if let Some(slot) = self.slot() {
                        return Some((stream, slot));
                    }
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    }

    /// gRPC connections accepted on `listener`, for tonic.
    pub fn tcp(self: &Arc<Self>, listener: TcpListener) -> ReceiverStream<std::io::Result<Guarded<TcpStream>>> {
        let (tx, rx) = mpsc::channel(64);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut stop = this.shutdown.clone();
            let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
            while let Some((stream, slot)) = this.next(&mut stop, accept).await {
                // No Nagle: a small reply held for a delayed ACK costs ~40 ms when calls overlap.
                let _ = stream.set_nodelay(true);
                let peer = PeerInfo { transport: Transport::Tcp, uid: None, pid: None, activity: Default::default() };
                if tx.send(Ok(Guarded::new(stream, peer, this.timeouts, Vec::new(), slot))).await.is_err() {
                    break;
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// gRPC connections accepted on the Unix socket, for tonic; descriptor connections are
    /// served here.
    pub fn unix(self: &Arc<Self>, listener: UnixListener) -> ReceiverStream<std::io::Result<Guarded<UnixStream>>> {
        let (tx, rx) = mpsc::channel(64);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut stop = this.shutdown.clone();
            let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
            while let Some((stream, slot)) = this.next(&mut stop, accept).await {
                let (this, tx) = (Arc::clone(&this), tx.clone());
                tokio::spawn(async move { this.classify(stream, slot, tx).await });
            }
        });
        ReceiverStream::new(rx)
    }

    /// Reads the first bytes of a Unix connection and hands it to gRPC or serves the
    /// descriptor protocol on it.
    async fn classify(
        self: Arc<Self>,
        mut stream: UnixStream,
        slot: Slot,
        grpc: mpsc::Sender<std::io::Result<Guarded<UnixStream>>>,
    ) {
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(e) => {
                warn!(error = %e, "cannot read the peer credentials of a Unix connection; closing it");
                return;
            }
        };
        // Plain reads: descriptors sent with these bytes are closed by the kernel unread.
        let mut first = vec![0u8; HELLO.len()];
        let read = tokio::time::timeout(self.timeouts.handshake, stream.read_exact(&mut first)).await;
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return debug!(error = %e, "Unix connection closed before its first bytes"),
            Err(_) => return self.metrics.timed_out("handshake"),
        }
        let peer = PeerInfo {
            transport: Transport::Unix,
            uid: Some(cred.uid()),
            pid: cred.pid(),
            activity: Default::default(),
        };
        if first == HELLO {
            if stream.write_all(&self.server_id).await.is_err() {
                return;
            }
            let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
            let timeout = self.timeouts.handshake;
            descriptors::serve(stream, cred.uid(), connection, &self.engine, timeout, self.shutdown.clone()).await;
            drop(slot);
            return;
        }
        let _ = grpc.send(Ok(Guarded::new(stream, peer, self.timeouts, first, slot))).await;
    }
}

/// HTTP connections served at once (scrapes and health checks need few).
const MAX_HTTP_CONNECTIONS: usize = 64;

/// The HTTP (`/health`, `/metrics`) listener for axum: its own small connection cap, the
/// handshake timeout for the request line, and the idle timeout counted from the last
/// bytes received.
pub struct HttpListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    timeouts: Timeouts,
    metrics: Arc<ListenMetrics>,
}

impl HttpListener {
    /// Guards connections accepted on `listener`.
    pub fn new(listener: TcpListener, timeouts: Timeouts, metrics: Arc<ListenMetrics>) -> Self {
        Self { listener, slots: Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS)), timeouts, metrics }
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            };
            let Some(slot) = Slot::take(&self.slots, &self.metrics) else { continue };
            let peer = PeerInfo { transport: Transport::Tcp, uid: None, pid: None, activity: Default::default() };
            return (Guarded::http1(stream, peer, self.timeouts, slot), addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accept error (usually out of descriptors): log it and pause, so a full descriptor
/// table does not turn into a busy loop.
async fn accept_failed(e: &std::io::Error) {
    warn!(error = %e, "cannot accept a connection");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
