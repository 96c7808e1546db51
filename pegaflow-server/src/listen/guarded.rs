//! A served connection with the server's rules attached: it holds one of the limited
//! connection slots, knows its peer, and closes itself when the client is too slow to
//! start (no full HTTP/2 preface within the handshake timeout) or stays without a call in
//! flight for the idle timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::ListenMetrics;

/// Length of the HTTP/2 client preface every gRPC connection starts with.
pub const H2_PREFACE_BYTES: usize = 24;
/// Bytes an HTTP/1 client must send within the handshake timeout (a request line).
pub const HTTP1_FIRST_BYTES: usize = 16;

/// How the peer reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP (identity unknown: the auth token and session ids are the proof).
    Tcp,
    /// The Unix socket (uid and pid known from `SO_PEERCRED`).
    Unix,
}

/// Who is on the other end of a connection; every gRPC request carries it as an extension.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// How the peer connected.
    pub transport: Transport,
    /// The peer's Unix user (Unix socket only).
    pub uid: Option<u32>,
    /// The peer's process (Unix socket only).
    pub pid: Option<i32>,
    /// Calls in flight on the connection, for the idle rule.
    pub activity: Arc<Activity>,
}

/// Calls in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `origin` when the last call ended.
    idle_since_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { origin: Instant::now(), in_flight: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) }
    }
}

impl Activity {
    /// Marks a call in flight until the guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// Marks bytes received now (HTTP/1 connections, where reads are the only activity).
    fn touch(&self) {
        self.idle_since_ms.fetch_max(self.origin.elapsed().as_millis() as u64, Ordering::AcqRel);
    }

    /// When the connection became idle, or `None` while a call is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.origin + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }
}

/// A call in flight (see [`Activity::busy`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let elapsed = self.0.origin.elapsed().as_millis() as u64;
        self.0.idle_since_ms.fetch_max(elapsed, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of the limited connection slots; frees it (and the gauge) when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<ListenMetrics>,
}

impl Slot {
    pub(super) fn new(permit: OwnedSemaphorePermit, metrics: Arc<ListenMetrics>) -> Self {
        metrics.connections.inc();
        Self { _permit: permit, metrics }
    }

    /// One of `slots`, or `None` (counted as a refused connection) when all are taken.
    pub(super) fn take(slots: &Arc<Semaphore>, metrics: &Arc<ListenMetrics>) -> Option<Self> {
        match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => Some(Self::new(permit, Arc::clone(metrics))),
            Err(_) => {
                metrics.refused.inc();
                None
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// Timeouts applied to every gRPC connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Until the HTTP/2 preface is complete.
    pub handshake: Duration,
    /// Without a call in flight; `None` never.
    pub idle: Option<Duration>,
}

/// A connection served by tonic under the server's rules.
pub struct Guarded<IO> {
    io: IO,
    /// Bytes already read from `io` (to tell gRPC from the descriptor protocol), handed
    /// out again before `io`'s own.
    replay: Vec<u8>,
    replayed: usize,
    peer: PeerInfo,
    preface_left: usize,
    handshake_deadline: Instant,
    idle: Option<Duration>,
    /// HTTP/1: bytes received count as activity (there are no gRPC calls to track).
    reads_are_activity: bool,
    timer: Pin<Box<Sleep>>,
    metrics: Arc<ListenMetrics>,
    _slot: Slot,
}

impl<IO> Guarded<IO> {
    /// Wraps a gRPC connection `io` from which `replay` (the start of the HTTP/2 preface)
    /// was already read: those bytes are read again first.
    pub fn new(io: IO, peer: PeerInfo, timeouts: Timeouts, replay: Vec<u8>, slot: Slot) -> Self {
        Self::with_rules(io, replay, peer, timeouts, H2_PREFACE_BYTES, false, slot)
    }

    /// Wraps an HTTP/1 connection: a request line within the handshake timeout, then
    /// closed after the idle timeout without bytes received.
    pub fn http1(io: IO, peer: PeerInfo, timeouts: Timeouts, slot: Slot) -> Self {
        Self::with_rules(io, Vec::new(), peer, timeouts, HTTP1_FIRST_BYTES, true, slot)
    }

    fn with_rules(
        io: IO,
        replay: Vec<u8>,
        peer: PeerInfo,
        timeouts: Timeouts,
        preface_left: usize,
        reads_are_activity: bool,
        slot: Slot,
    ) -> Self {
        let handshake_deadline = peer.activity.origin + timeouts.handshake;
        let metrics = Arc::clone(&slot.metrics);
        Self {
            io,
            preface_left: preface_left.saturating_sub(replay.len()),
            replay,
            replayed: 0,
            peer,
            handshake_deadline,
            idle: timeouts.idle,
            reads_are_activity,
            timer: Box::pin(tokio::time::sleep_until(handshake_deadline)),
            metrics,
            _slot: slot,
        }
    }

    /// Ready with an error once a deadline has passed; otherwise arms the timer for the
    /// next check.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let next = if self.preface_left > 0 {
                if now >= self.handshake_deadline {
                    self.metrics.timed_out("handshake");
                    return Poll::Ready(timed_out("no HTTP/2 preface within the handshake timeout"));
                }
                self.handshake_deadline
            } else {
                match (self.idle, self.peer.activity.idle_since()) {
                    (None, _) => now + Duration::from_secs(86_400),
                    (Some(idle), None) => now + idle,
                    (Some(idle), Some(since)) if now >= since + idle => {
                        self.metrics.timed_out("idle");
                        return Poll::Ready(timed_out("no call within the idle timeout"));
                    }
                    (Some(idle), Some(since)) => since + idle,
                }
            };
            self.timer.as_mut().reset(next);
        }
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_owned())
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let n = (this.replay.len() - this.replayed).min(buf.remaining());
            buf.put_slice(&this.replay[this.replayed..this.replayed + n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                this.preface_left = this.preface_left.saturating_sub(read);
                if this.reads_are_activity && read > 0 {
                    this.peer.activity.touch();
                }
                // A client trickling bytes must still finish the preface in time.
                if this.preface_left > 0 && Instant::now() >= this.handshake_deadline {
                    this.metrics.timed_out("handshake");
                    return Poll::Ready(Err(timed_out("no HTTP/2 preface within the handshake timeout")));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO> Connected for Guarded<IO> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn guarded(io: tokio::io::DuplexStream, timeouts: Timeouts) -> (Guarded<tokio::io::DuplexStream>, Arc<Activity>) {
        let metrics = Arc::new(ListenMetrics::default());
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let activity = Arc::new(Activity::default());
        let peer = PeerInfo { transport: Transport::Tcp, uid: None, pid: None, activity: Arc::clone(&activity) };
        (Guarded::new(io, peer, timeouts, Vec::new(), Slot::new(permit, metrics)), activity)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_the_handshake_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let (mut g, _) = guarded(server, Timeouts { handshake: Duration::from_secs(10), idle: None });
        let mut buf = [0u8; 8];
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(g.metrics.timed_out_count("handshake"), 1);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_only_without_calls_in_flight() {
        let (mut client, server) = tokio::io::duplex(64);
        let idle = Duration::from_secs(30);
        let (mut g, activity) = guarded(server, Timeouts { handshake: Duration::from_secs(10), idle: Some(idle) });
        client.write_all(&[0u8; H2_PREFACE_BYTES]).await.unwrap();
        let mut buf = [0u8; H2_PREFACE_BYTES];
        g.read_exact(&mut buf).await.unwrap();
        // A call in flight keeps the connection open past the idle timeout.
        let busy = activity.busy();
        let read = tokio::time::timeout(idle * 3, g.read(&mut buf)).await;
        assert!(read.is_err(), "closed while a call was in flight");
        drop(busy);
        let t0 = Instant::now();
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= idle - Duration::from_secs(1));
        assert_eq!(g.metrics.timed_out_count("idle"), 1);
    }

    #[tokio::test]
    async fn replayed_bytes_come_first_and_count_toward_the_preface() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(&[b'x'; H2_PREFACE_BYTES - 8]).await.unwrap();
        drop(client);
        let metrics = Arc::new(ListenMetrics::default());
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let peer = PeerInfo { transport: Transport::Unix, uid: Some(0), pid: None, activity: Default::default() };
        let timeouts = Timeouts { handshake: Duration::from_secs(10), idle: None };
        let mut g = Guarded::new(server, peer, timeouts, b"PRI * HT".to_vec(), Slot::new(permit, metrics));
        let mut out = Vec::new();
        g.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"PRI * HT") && out.len() == H2_PREFACE_BYTES);
        assert_eq!(g.preface_left, 0);
    }
}
