//! Waiting for something short without paying for a thread wake-up.
//!
//! On the lent H100 host a loopback RPC takes ~85 µs back to back but ~350 µs after
//! 10 ms of idleness: every thread in the chain that went to sleep (the caller parked
//! in `block_on`, the runtime's I/O thread) costs an idle-CPU wake-up of 50–150 µs.
//! The caller polls its own future and yields the CPU instead of sleeping for a short
//! while, so at least its own wake-up disappears; long calls fall back to parking.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a caller spins before it parks: covers queries, loads and small saves.
pub const SPIN: Duration = Duration::from_millis(1);

/// Fewest CPUs for which [`KeepWarm`] is on by default: spinning threads on a small or
/// oversubscribed machine take the CPU from the threads doing the work (measured on the
/// 2-core dev VM: a loopback RPC went from ~0.1 ms to 2 ms, one scheduler time slice).
pub const WARM_MIN_CPUS: usize = 8;

/// The default keep-warm window: `window` on machines with at least [`WARM_MIN_CPUS`]
/// CPUs, zero (off) on smaller ones.
pub fn default_warm_window(window: Duration) -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus >= WARM_MIN_CPUS { window } else { Duration::ZERO }
}

struct Signal {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        // Cheap when the caller is spinning (no syscall unless it is parked).
        self.thread.unpark();
    }
}

/// Runs `future` to completion on the calling thread, yielding the CPU for up to `spin`
/// while it waits, then parking. Futures using tokio resources need the caller to have
/// entered a multi-thread runtime (`Runtime::enter`), whose workers drive the I/O.
pub fn block_on<F: Future>(future: F, spin: Duration) -> F::Output {
    let signal = Arc::new(Signal { woken: AtomicBool::new(false), thread: std::thread::current() });
    let waker = Waker::from(Arc::clone(&signal));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let start = Instant::now();
    loop {
        // Cleared before polling: a wake during the poll is kept and re-polls at once.
        signal.woken.store(false, Ordering::Release);
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        while !signal.woken.load(Ordering::Acquire) {
            if start.elapsed() < spin {
                std::thread::yield_now();
            } else {
                // Returns on unpark, or spuriously: the flag decides.
                std::thread::park();
            }
        }
    }
}

/// Receives from a channel, yielding the CPU for up to `spin` before blocking: a worker
/// that just finished a job stays awake for the next one of a burst.
pub fn recv_spinning<T>(rx: &std::sync::mpsc::Receiver<T>, spin: Duration) -> Result<T, std::sync::mpsc::RecvError> {
    use std::sync::mpsc::TryRecvError;
    let start = Instant::now();
    while start.elapsed() < spin {
        match rx.try_recv() {
            Ok(value) => return Ok(value),
            Err(TryRecvError::Empty) => std::thread::yield_now(),
            Err(TryRecvError::Disconnected) => return Err(std::sync::mpsc::RecvError),
        }
    }
    rx.recv()
}

/// Keeps one thread of a tokio runtime polling its I/O for a short window after each
/// [`KeepWarm::touch`], instead of sleeping in the kernel: requests come in bursts (a
/// query then a load, a save per engine step), and the next one then finds a thread
/// awake. A spinning task yields on every turn, so it never delays other tasks; it
/// costs one busy thread while requests keep coming, none when they stop.
#[derive(Clone)]
pub struct KeepWarm {
    inner: Arc<WarmState>,
}

struct WarmState {
    window: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which to spin.
    until: AtomicU64,
    spinning: AtomicBool,
}

impl KeepWarm {
    /// Spins for `window` after each touch; a zero window never spins.
    pub fn new(window: Duration) -> Self {
        Self {
            inner: Arc::new(WarmState {
                window,
                epoch: Instant::now(),
                until: AtomicU64::new(0),
                spinning: AtomicBool::new(false),
            }),
        }
    }

    /// Extends the window from now, starting the spinner on `runtime` if none runs.
    pub fn touch(&self, runtime: &tokio::runtime::Handle) {
        let state = &self.inner;
        if state.window.is_zero() {
            return;
        }
        // SeqCst on both sides: the spinner stores `spinning = false` then reads `until`,
        // a touch writes `until` then reads `spinning`; weaker orderings would let both
        // read the old values and leave a burst without a spinner.
        state.until.fetch_max(state.now() + state.window.as_nanos() as u64, Ordering::SeqCst);
        if !state.spinning.swap(true, Ordering::SeqCst) {
            let state = Arc::clone(state);
            runtime.spawn(async move {
                loop {
                    if state.now() >= state.until.load(Ordering::SeqCst) {
                        state.spinning.store(false, Ordering::SeqCst);
                        // A touch between the check and the store saw `spinning` set and
                        // left: take over again if the window moved meanwhile.
                        if state.now() >= state.until.load(Ordering::SeqCst)
                            || state.spinning.swap(true, Ordering::SeqCst)
                        {
                            return;
                        }
                    }
                    tokio::task::yield_now().await;
                }
            });
        }
    }
}

impl WarmState {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    /// Runs `test` on its own thread and fails if it does not finish within 10 s (a lost
    /// wake-up would otherwise hang the test run).
    fn within_10s(test: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            test();
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => thread.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => thread.join().unwrap(), // panicked: re-raise
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("hung: a wake-up was lost"),
        }
    }

    #[test]
    fn completes_futures_woken_by_the_runtime_both_while_spinning_and_after_parking() {
        within_10s(completes_futures_woken_by_the_runtime);
    }

    fn completes_futures_woken_by_the_runtime() {
        let rt = runtime();
        let _context = rt.enter();
        for (sleep, spin) in [(1, Duration::from_millis(50)), (20, Duration::from_millis(1)), (5, Duration::ZERO)] {
            let t0 = Instant::now();
            let out = block_on(
                async move {
                    tokio::time::sleep(Duration::from_millis(sleep)).await;
                    sleep * 2
                },
                spin,
            );
            assert_eq!(out, sleep * 2);
            assert!(t0.elapsed() >= Duration::from_millis(sleep));
        }
    }

    #[test]
    fn recv_spinning_gets_values_while_spinning_and_after_blocking_and_sees_hang_ups() {
        for (delay_ms, spin_ms) in [(0, 5), (2, 50), (20, 1), (5, 0)] {
            let (tx, rx) = std::sync::mpsc::channel();
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay_ms));
                tx.send(delay_ms).unwrap();
            });
            assert_eq!(recv_spinning(&rx, Duration::from_millis(spin_ms)), Ok(delay_ms));
            sender.join().unwrap();
        }
        let (tx, rx) = std::sync::mpsc::channel::<u8>();
        drop(tx);
        assert!(recv_spinning(&rx, Duration::from_millis(5)).is_err());
        assert!(recv_spinning(&rx, Duration::ZERO).is_err());
    }

    #[test]
    fn keep_warm_spins_for_its_window_then_stops_and_restarts_on_touch() {
        let rt = runtime();
        let warm = KeepWarm::new(Duration::from_millis(20));
        warm.touch(rt.handle());
        assert!(warm.inner.spinning.load(Ordering::Acquire));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!warm.inner.spinning.load(Ordering::Acquire), "still spinning after the window");
        warm.touch(rt.handle());
        assert!(warm.inner.spinning.load(Ordering::Acquire));
        // Only a running spinner clears the flag: seeing it cleared proves one ran.
        std::thread::sleep(Duration::from_millis(60));
        assert!(!warm.inner.spinning.load(Ordering::Acquire), "the restarted spinner never stopped");
        let off = KeepWarm::new(Duration::ZERO);
        off.touch(rt.handle());
        assert!(!off.inner.spinning.load(Ordering::Acquire));
    }

    #[test]
    fn sees_values_sent_from_other_threads() {
        within_10s(sees_values_sent_from_another_thread);
    }

    fn sees_values_sent_from_another_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            tx.send(7).unwrap();
        });
        assert_eq!(block_on(rx, Duration::from_millis(2)).unwrap(), 7);
        sender.join().unwrap();
    }
}
