//! Paced saves: device-to-host DMAs in pieces issued no faster than a set rate, so the
//! link goes idle between them and the inference engine's own small copies get through.
//!
//! Measured on the H200 (docs/benchmarks.md, "Decode inter-token latency: what a busy link
//! costs the engine"): plain device-to-host copies at link speed from another process
//! slow vLLM's decode steps by 6–17% at p99, while 2 MiB copies with a gap after each
//! (38 GiB/s) cost 1.3%. Saves only need to keep up with prefill (a tenth of the link for
//! Llama-8B on an H200), so trading save speed for decode latency is cheap. Opt-in
//! (`PEGAFLOW_CUDA_SAVE_GBPS`, `PEGAFLOW_CUDA_SAVE_PIECE_MB`) until measured in the server.
//! While on, every save is paced, whatever `PEGAFLOW_CUDA_STRATEGY` forces, and a save no
//! longer queues behind the previous one without a wait. The pace spaces the groups'
//! starts: when the link is slower than the pace, groups queue back to back and the link
//! never idles (pacing then changes nothing).
//! The pure half (grouping, the schedule) lives here so CI tests it without a GPU.

use std::time::{Duration, Instant};

use super::plan::{Segment, pieces};

/// The slowest pace taken (0.01 GB/s): a 2 MiB group every 0.2 s. Slower values would
/// make a save of a few blocks take minutes, or overflow the schedule's clock.
pub const MIN_GBPS: f64 = 0.01;
/// The largest group (MiB).
pub const MAX_PIECE_MB: u64 = 1024;

/// How saves are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SavePace {
    /// Bytes issued at once (DMAs of one group).
    pub piece_bytes: u64,
    /// Average rate the pieces are issued at.
    pub bytes_per_sec: f64,
}

impl SavePace {
    /// From `PEGAFLOW_CUDA_SAVE_GBPS` (GB/s, decimal, at least [`MIN_GBPS`]; unset, 0 or
    /// unparsable: no pacing) and `PEGAFLOW_CUDA_SAVE_PIECE_MB` (MiB, default 2, at most
    /// [`MAX_PIECE_MB`]).
    pub fn from_values(gbps: Option<&str>, piece_mb: Option<&str>) -> Option<Self> {
        let gbps: f64 = gbps?.trim().parse().ok().filter(|v: &f64| v.is_finite() && *v > 0.0)?;
        let gbps = gbps.max(MIN_GBPS);
        let piece_mb: u64 =
            piece_mb.and_then(|v| v.trim().parse().ok()).filter(|v| *v > 0).unwrap_or(2).min(MAX_PIECE_MB);
        Some(Self { piece_bytes: piece_mb << 20, bytes_per_sec: gbps * 1e9 })
    }

    /// Time `bytes` take at the paced rate.
    fn spacing(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec)
    }
}

/// `segments` cut into pieces of at most `piece_bytes` and gathered, in order, into groups
/// of at most `piece_bytes` each (a group is issued at once).
pub fn groups(segments: &[Segment], piece_bytes: u64) -> Vec<Vec<Segment>> {
    let mut out: Vec<Vec<Segment>> = Vec::new();
    let mut bytes = 0u64;
    for piece in segments.iter().flat_map(|s| pieces(*s, piece_bytes)) {
        match out.last_mut() {
            Some(group) if bytes + piece.len <= piece_bytes => group.push(piece),
            _ => {
                out.push(vec![piece]);
                bytes = 0;
            }
        }
        bytes += piece.len;
    }
    out
}

/// When the next group may be issued: one group's spacing after the previous group was
/// issued. A late thread does not catch up with a burst (that would fill the link again).
#[derive(Debug)]
pub struct Pacer {
    pace: SavePace,
    ready_at: Option<Instant>,
}

impl Pacer {
    pub fn new(pace: SavePace) -> Self {
        Self { pace, ready_at: None }
    }

    pub fn pace(&self) -> SavePace {
        self.pace
    }

    /// How long to wait at `now` before the next group.
    pub fn wait_at(&self, now: Instant) -> Duration {
        self.ready_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now))
    }

    /// Notes that a group of `bytes` was issued at `now`.
    pub fn issued(&mut self, now: Instant, bytes: u64) {
        self.ready_at = Some(now + self.pace.spacing(bytes));
    }

    /// Blocks until the next group may go: sleeps for most of a long wait, then polls
    /// (a sleep overshoots by ~50 µs, more than a 2 MiB piece's 38 µs at link speed).
    pub fn wait_turn(&self) {
        const SPIN: Duration = Duration::from_micros(150);
        let wait = self.wait_at(Instant::now());
        if wait > SPIN {
            std::thread::sleep(wait - SPIN);
        }
        while !self.wait_at(Instant::now()).is_zero() {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(device_ptr: u64, host_offset: u64, len: u64) -> Segment {
        Segment { device_ptr, host_offset, len }
    }

    #[test]
    fn pace_comes_from_the_environment_values_or_is_off() {
        assert_eq!(SavePace::from_values(None, Some("4")), None);
        assert_eq!(SavePace::from_values(Some("0"), None), None);
        assert_eq!(SavePace::from_values(Some("fast"), None), None);
        assert_eq!(SavePace::from_values(Some("-3"), None), None);
        assert_eq!(SavePace::from_values(Some("inf"), None), None);
        assert_eq!(
            SavePace::from_values(Some("40"), None),
            Some(SavePace { piece_bytes: 2 << 20, bytes_per_sec: 40e9 })
        );
        assert_eq!(
            SavePace::from_values(Some(" 27.5 "), Some("8")),
            Some(SavePace { piece_bytes: 8 << 20, bytes_per_sec: 27.5e9 })
        );
        assert_eq!(SavePace::from_values(Some("40"), Some("0")).map(|p| p.piece_bytes), Some(2 << 20));
        // Extremes are clamped, not overflowed.
        assert_eq!(SavePace::from_values(Some("1e-15"), None).map(|p| p.bytes_per_sec), Some(MIN_GBPS * 1e9));
        assert_eq!(
            SavePace::from_values(Some("40"), Some("17592186044416")).map(|p| p.piece_bytes),
            Some(MAX_PIECE_MB << 20)
        );
    }

    #[test]
    fn groups_cover_every_byte_in_order_within_the_piece_size() {
        // A 5 MiB run, then 64 KiB segments (per-layer pieces), then a tail.
        let mut segments = vec![seg(1 << 40, 0, 5 << 20)];
        segments.extend((0..40u64).map(|i| seg((2 << 40) + i * (1 << 30), (5 << 20) + i * 65_536, 65_536)));
        segments.push(seg(3 << 40, 1 << 30, 100));
        let piece = 2 << 20;
        let got = groups(&segments, piece);
        assert!(got.iter().all(|g| !g.is_empty() && g.iter().map(|s| s.len).sum::<u64>() <= piece));
        let flat: Vec<Segment> = got.concat();
        let replayed: Vec<(u64, u64)> = flat
            .iter()
            .flat_map(|s| (0..s.len).step_by(4096).map(move |i| (s.device_ptr + i, s.host_offset + i)))
            .collect();
        let wanted: Vec<(u64, u64)> = segments
            .iter()
            .flat_map(|s| (0..s.len).step_by(4096).map(move |i| (s.device_ptr + i, s.host_offset + i)))
            .collect();
        assert_eq!(flat.iter().map(|s| s.len).sum::<u64>(), segments.iter().map(|s| s.len).sum::<u64>());
        assert_eq!(replayed, wanted);
        // 5 MiB = 2 + 2 + 1 MiB; the 1 MiB piece takes 16 of the 64 KiB segments, then
        // 24 × 64 KiB = 1.5 MiB and the 100 B tail share the last group.
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 17, 25]);
        assert!(groups(&[], piece).is_empty());
    }

    #[test]
    fn groups_are_spaced_by_their_bytes_at_the_rate_without_catching_up() {
        let pace = SavePace { piece_bytes: 2 << 20, bytes_per_sec: 1e9 };
        let mut pacer = Pacer::new(pace);
        let t0 = Instant::now();
        assert_eq!(pacer.wait_at(t0), Duration::ZERO);
        pacer.issued(t0, 1_000_000); // 1 ms at 1 GB/s
        assert_eq!(pacer.wait_at(t0), Duration::from_millis(1));
        assert_eq!(pacer.wait_at(t0 + Duration::from_micros(400)), Duration::from_micros(600));
        assert_eq!(pacer.wait_at(t0 + Duration::from_millis(5)), Duration::ZERO);
        // Issued late (at 5 ms): the next one waits a full spacing from then, no burst.
        pacer.issued(t0 + Duration::from_millis(5), 500_000);
        assert_eq!(pacer.wait_at(t0 + Duration::from_millis(5)), Duration::from_micros(500));
    }

    #[test]
    fn wait_turn_holds_the_thread_for_the_spacing() {
        let mut pacer = Pacer::new(SavePace { piece_bytes: 1 << 20, bytes_per_sec: 1e9 });
        let start = Instant::now();
        pacer.issued(start, 3_000_000); // 3 ms
        pacer.wait_turn();
        assert!(start.elapsed() >= Duration::from_millis(3));
        assert_eq!(pacer.wait_at(Instant::now()), Duration::ZERO);
    }
}
