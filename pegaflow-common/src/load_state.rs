//! The load-completion flag shared between a client and the server.
//!
//! The client creates a small sealed memfd and hands its descriptor to the server once
//! (over the Unix socket, which answers with a token the Load call names); the server
//! writes the outcome when the copy finishes and wakes any waiter through a
//! futex on the state word (shared, not process-private: the two sides are different
//! processes); the client polls it or sleeps on it — no RPC round trip on the hot path. Layout (512 bytes, native endian):
//!
//! ```text
//! 0..4   magic "PFLS"
//! 4..8   state: 0 pending, 1 done, 2 failed   (written last, with Release ordering)
//! 8..12  length of the failure reason
//! 16..   UTF-8 failure reason (truncated to fit)
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::shm::{SharedMemory, ShmError};

/// Size of a load state's memory.
pub const LOAD_STATE_BYTES: u64 = 512;
const MAGIC: u32 = u32::from_le_bytes(*b"PFLS");
const STATE_OFFSET: u64 = 4;
const REASON_LEN_OFFSET: u64 = 8;
const REASON_OFFSET: u64 = 16;
const MAX_REASON: u64 = LOAD_STATE_BYTES - REASON_OFFSET;

/// Why a pending load failed when its server went away.
pub const SERVER_GONE: &str = "the server went away before the load completed";

/// What a load has come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadStatus {
    /// Still copying.
    Pending,
    /// Every byte is in place.
    Done,
    /// The copy failed; the destination blocks hold undefined bytes.
    Failed(String),
}

/// Why a load-state file is not usable.
#[derive(Debug, thiserror::Error)]
pub enum LoadStateError {
    /// Creating or mapping the memory failed.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The memory is not a load state.
    #[error("the memory is not a PegaFlow load state")]
    BadMagic,
}

/// A mapped load state; the client side creates it, the server side opens it.
pub struct LoadState {
    map: Arc<SharedMemory>,
    // Start of the mapping, which is at least LOAD_STATE_BYTES long.
    base: std::ptr::NonNull<u8>,
}

// SAFETY: all shared words are accessed atomically; the reason bytes are published by
// the state word (Release/Acquire).
unsafe impl Send for LoadState {}
// SAFETY: as above.
unsafe impl Sync for LoadState {}

impl LoadState {
    /// Creates a fresh pending state in a new sealed memfd (client side).
    pub fn create() -> Result<Self, LoadStateError> {
        let state = Self::wrap(Arc::new(SharedMemory::create("pegaflow-load-state", LOAD_STATE_BYTES)?))?;
        state.word(0).store(MAGIC, Ordering::Relaxed);
        state.word(STATE_OFFSET).store(0, Ordering::Release);
        Ok(state)
    }

    /// Wraps memory a client handed over (server side); it must carry the magic.
    pub fn open(map: Arc<SharedMemory>) -> Result<Self, LoadStateError> {
        let state = Self::wrap(map)?;
        if state.word(0).load(Ordering::Relaxed) != MAGIC {
            return Err(LoadStateError::BadMagic);
        }
        Ok(state)
    }

    fn wrap(map: Arc<SharedMemory>) -> Result<Self, LoadStateError> {
        let base =
            map.ptr_at(0, LOAD_STATE_BYTES).ok_or(ShmError::TooSmall { len: map.len(), min: LOAD_STATE_BYTES })?;
        Ok(Self { map, base })
    }

    /// The memory, whose descriptor the client hands to the server.
    pub fn memory(&self) -> &SharedMemory {
        &self.map
    }

    /// Current status.
    pub fn status(&self) -> LoadStatus {
        match self.word(STATE_OFFSET).load(Ordering::Acquire) {
            0 => LoadStatus::Pending,
            1 => LoadStatus::Done,
            _ => LoadStatus::Failed(self.reason()),
        }
    }

    /// Waits until the load settles or `timeout` passes, then returns the status. Yields
    /// the CPU for the first `spin` (small loads finish within it and an idle-CPU wake-up
    /// costs 50–150 µs), then sleeps on the state word until the server's futex wake; it
    /// also rechecks every few milliseconds, so a server that never wakes (or a lost
    /// wake-up) costs latency, never a hang. `server_alive` is asked at each recheck: once
    /// it says false (the server died or closed the client's session), a pending load can
    /// never complete and the wait ends as [`LoadStatus::Failed`].
    pub fn wait(&self, timeout: Duration, spin: Duration, server_alive: &dyn Fn() -> bool) -> LoadStatus {
        self.wait_rechecking(timeout, spin, Duration::from_millis(5), server_alive)
    }

    fn wait_rechecking(
        &self,
        timeout: Duration,
        spin: Duration,
        recheck: Duration,
        server_alive: &dyn Fn() -> bool,
    ) -> LoadStatus {
        let start = Instant::now();
        loop {
            let status = self.status();
            let waited = start.elapsed();
            if status != LoadStatus::Pending || waited >= timeout {
                return status;
            }
            if waited >= spin && !server_alive() {
                // One last look: the server may have finished just before it went away.
                return match self.status() {
                    LoadStatus::Pending => LoadStatus::Failed("the server went away before the load completed".into()),
                    settled => settled,
                };
            }
            if waited < spin {
                std::thread::yield_now();
            } else if !futex_wait(self.word(STATE_OFFSET), 0, (timeout - waited).min(recheck)) {
                // No futex here (a sandbox refusing the call): poll gently instead.
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Sets the state back to pending so the object can serve another load.
    pub fn reset(&self) {
        self.word(REASON_LEN_OFFSET).store(0, Ordering::Relaxed);
        self.word(STATE_OFFSET).store(0, Ordering::Release);
    }

    /// Publishes the outcome of a load (server side).
    pub fn complete(&self, outcome: Result<(), &str>) {
        match outcome {
            Ok(()) => self.word(STATE_OFFSET).store(1, Ordering::Release),
            Err(reason) => {
                let bytes = truncate_utf8(reason, MAX_REASON as usize);
                // SAFETY: REASON_OFFSET + bytes.len() <= LOAD_STATE_BYTES, inside the
                // mapping; the client reads them only after seeing state 2, published below.
                unsafe {
                    let dst = self.base.add(REASON_OFFSET as usize);
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.as_ptr(), bytes.len());
                }
                self.word(REASON_LEN_OFFSET).store(bytes.len() as u32, Ordering::Relaxed);
                self.word(STATE_OFFSET).store(2, Ordering::Release);
            }
        }
        futex_wake_all(self.word(STATE_OFFSET));
    }

    fn reason(&self) -> String {
        let len = u64::from(self.word(REASON_LEN_OFFSET).load(Ordering::Relaxed)).min(MAX_REASON);
        // SAFETY: REASON_OFFSET + len <= LOAD_STATE_BYTES, inside the mapping; the bytes
        // were written before the state word the caller observed with Acquire ordering.
        let bytes = unsafe { std::slice::from_raw_parts(self.base.add(REASON_OFFSET as usize).as_ptr(), len as usize) };
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn word(&self, offset: u64) -> &AtomicU32 {
        // SAFETY: `offset` is one of the 4-aligned constants above, below
        // LOAD_STATE_BYTES; the mapping is page-aligned, at least that long, and lives as
        // long as `self`; these words are only ever accessed atomically.
        unsafe { AtomicU32::from_ptr(self.base.add(offset as usize).as_ptr().cast()) }
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout` (spurious returns are fine:
/// callers recheck). False when the kernel refused the wait for another reason than the
/// value changing, an interruption or the timeout.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a live, aligned u32 in a MAP_SHARED mapping; FUTEX_WAIT only reads
    // it and the timespec outlives the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec)
    };
    rc == 0
        || matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT))
}

/// Wakes every process sleeping on `word`.
fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: as above; FUTEX_WAKE does not touch memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &[u8] {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_between_creator_and_opener() {
        let client = LoadState::create().unwrap();
        assert_eq!(client.status(), LoadStatus::Pending);
        let server = server_side(&client);
        server.complete(Ok(()));
        assert_eq!(client.status(), LoadStatus::Done);
        client.reset();
        assert_eq!(client.status(), LoadStatus::Pending);
        server.complete(Err("copy failed: ünïcode"));
        assert_eq!(client.status(), LoadStatus::Failed("copy failed: ünïcode".into()));
    }

    #[test]
    fn wait_wakes_when_the_other_side_completes_and_times_out_otherwise() {
        let client = LoadState::create().unwrap();
        let t0 = Instant::now();
        assert_eq!(client.wait(Duration::from_millis(20), Duration::from_millis(1), &|| true), LoadStatus::Pending);
        assert!(t0.elapsed() >= Duration::from_millis(20));
        let server = server_side(&client);
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            server.complete(Ok(()));
            Instant::now()
        });
        // Rechecks every 10 s: only the futex wake can end this wait soon after `complete`.
        let status = client.wait_rechecking(Duration::from_secs(30), Duration::ZERO, Duration::from_secs(10), &|| true);
        let woken = Instant::now();
        assert_eq!(status, LoadStatus::Done);
        let completed = waker.join().unwrap();
        assert!(woken.duration_since(completed) < Duration::from_secs(2), "not woken by the futex");
    }

    #[test]
    fn long_reasons_are_truncated_on_a_char_boundary() {
        let client = LoadState::create().unwrap();
        let server = server_side(&client);
        server.complete(Err(&"é".repeat(1000)));
        let LoadStatus::Failed(reason) = client.status() else { panic!("not failed") };
        assert!(reason.len() <= MAX_REASON as usize && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_dead_server_fails_a_pending_wait_promptly() {
        let client = LoadState::create().unwrap();
        let alive = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                alive.store(false, Ordering::Relaxed);
            });
            let t0 = Instant::now();
            let status = client.wait(Duration::from_secs(30), Duration::ZERO, &|| alive.load(Ordering::Relaxed));
            assert!(matches!(status, LoadStatus::Failed(ref r) if r.contains("went away")), "{status:?}");
            assert!(t0.elapsed() < Duration::from_secs(2));
        });
        // A load that completed before the server went away still counts as done.
        let done = LoadState::create().unwrap();
        server_side(&done).complete(Ok(()));
        assert_eq!(done.wait(Duration::from_secs(1), Duration::ZERO, &|| false), LoadStatus::Done);
    }

    #[test]
    fn rejects_foreign_memory() {
        let other = SharedMemory::create("other", LOAD_STATE_BYTES).unwrap();
        let fd = other.fd().unwrap().try_clone_to_owned().unwrap();
        let mapped = Arc::new(SharedMemory::from_fd(fd, LOAD_STATE_BYTES, u64::MAX).unwrap());
        assert!(matches!(LoadState::open(mapped), Err(LoadStateError::BadMagic)));
        let small = SharedMemory::create("small", 64).unwrap();
        let fd = small.fd().unwrap().try_clone_to_owned().unwrap();
        let mapped = Arc::new(SharedMemory::from_fd(fd, 1, u64::MAX).unwrap());
        assert!(matches!(LoadState::open(mapped), Err(LoadStateError::Shm(ShmError::TooSmall { .. }))));
    }

    /// What the server maps from the client's descriptor.
    fn server_side(client: &LoadState) -> LoadState {
        let fd = client.memory().fd().unwrap().try_clone_to_owned().unwrap();
        LoadState::open(Arc::new(SharedMemory::from_fd(fd, LOAD_STATE_BYTES, u64::MAX).unwrap())).unwrap()
    }
}
