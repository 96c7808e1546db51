//! How the binding's threads wait: locks that survive a panic elsewhere, and how long a
//! caller spins before it sleeps (`PEGAFLOW_CLIENT_SPIN_US`).

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pegaflow_common::spin;

/// Locks `mutex`, also after a panic elsewhere (the data stays consistent: every critical
/// section here is a single map or connection update).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `PEGAFLOW_CLIENT_SPIN_US`, read once: how long client threads spin instead of
/// sleeping (0 turns every client-side spin off).
fn spin_override() -> Option<Duration> {
    static VALUE: OnceLock<Option<Duration>> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("PEGAFLOW_CLIENT_SPIN_US").ok().and_then(|v| v.trim().parse().ok()).map(Duration::from_micros)
    })
}

/// How long a caller (a call, `LoadState.wait`) yields the CPU before it sleeps: 1 ms
/// unless `PEGAFLOW_CLIENT_SPIN_US` says otherwise.
pub(crate) fn caller_spin() -> Duration {
    spin_override().unwrap_or(spin::SPIN)
}

/// How long the runtime's I/O thread keeps polling after a call: 2 ms on machines with
/// enough CPUs (see `pegaflow_common::spin`) unless `PEGAFLOW_CLIENT_SPIN_US` says otherwise.
pub(crate) fn client_warm_window() -> Duration {
    spin_override().unwrap_or_else(|| spin::default_warm_window(Duration::from_millis(2)))
}
