//! Command-line flags of `pegaflow-server` (also parsed by the Python console script).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Default gRPC address: loopback only.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50055";
/// Default metrics address: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9091";
/// Upper bound of the automatic pool size.
const AUTO_POOL_CAP: u64 = 30 << 30;

/// PegaFlow KV-cache server: keeps inference engines' KV blocks in a host memory pool
/// and copies them back when a request shares a prefix.
#[derive(Debug, Clone, Parser)]
#[command(name = "pegaflow-server", version, about)]
pub struct ServerConfig {
    /// gRPC listen address.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,

    /// Cache capacity: host pool size, e.g. 512mb, 30gb, 1.5tb. Default: half the
    /// machine's memory, at most 30gb.
    #[arg(long, value_parser = parse_size)]
    pub pool_size: Option<u64>,

    /// CUDA device ids, comma-separated (e.g. 0,2). Only the CUDA backend uses them;
    /// this build serves the host (shared-memory) backend.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<u32>,

    /// Typical bytes of one block of one rank (all layers), e.g. 2mb; sizes the
    /// allocator's tables. Default: 64kb.
    #[arg(long, value_parser = parse_size)]
    pub hint_value_size: Option<u64>,

    /// Back the pool with 2 MiB huge pages (reserve them in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub use_hugepages: bool,

    /// HTTP address for /health and /metrics; an empty value disables it.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,

    /// Microseconds one server thread keeps polling after each request instead of
    /// sleeping, so the next request of a burst finds it awake (a sleeping thread costs
    /// 0.1–0.3 ms to wake on some hosts); CUDA copy workers likewise poll for their next
    /// job, and a save waits for its last chunk without sleeping (up to 1 ms of it). 0
    /// turns all of that off; the cost is busy threads while requests keep coming.
    /// Default: 2000 on machines with 8 or more CPUs, else 0.
    #[arg(long, env = "PEGAFLOW_SPIN_US")]
    pub spin_us: Option<u64>,

    /// Log level: trace, debug, info, warn, error. RUST_LOG, when set, wins.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

impl ServerConfig {
    /// The pool size to use: the flag, or half the memory capped at 30 GiB.
    pub fn effective_pool_size(&self) -> u64 {
        self.pool_size.unwrap_or_else(|| (total_memory().unwrap_or(2 << 30) / 2).min(AUTO_POOL_CAP))
    }

    /// How long a server thread keeps polling after each request.
    pub fn spin_window(&self) -> Duration {
        match self.spin_us {
            Some(us) => Duration::from_micros(us),
            None => pegaflow_core::spin::default_warm_window(Duration::from_millis(2)),
        }
    }

    /// The metrics address, or `None` when disabled.
    pub fn metrics_socket(&self) -> Result<Option<SocketAddr>, String> {
        let addr = self.metrics_addr.trim();
        if addr.is_empty() {
            return Ok(None);
        }
        addr.parse().map(Some).map_err(|e| format!("invalid --metrics-addr {addr:?}: {e}"))
    }
}

/// Parses `512mb`, `30gb`, `1.5tb`, `4096` (bytes). Units are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?} (use kb, mb, gb or tb)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("invalid size {text:?} (e.g. 512mb, 30gb, 1.5tb)"))?;
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512mb"), Ok(512 << 20));
        assert_eq!(parse_size("30GB"), Ok(30 << 30));
        assert_eq!(parse_size("1.5tb"), Ok(3 << 39));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64 kb"), Ok(64 << 10));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12pb").is_err());
        assert!(parse_size("gb").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn defaults_are_loopback() {
        let c = ServerConfig::try_parse_from(["pegaflow-server"]).unwrap();
        assert_eq!(c.addr.to_string(), DEFAULT_ADDR);
        assert!(c.addr.ip().is_loopback());
        assert!(c.metrics_socket().unwrap().unwrap().ip().is_loopback());
        assert!(c.effective_pool_size() > 0 && c.effective_pool_size() <= AUTO_POOL_CAP);
    }

    #[test]
    fn parses_every_flag() {
        let c = ServerConfig::try_parse_from([
            "pegaflow-server",
            "--addr",
            "0.0.0.0:6000",
            "--pool-size",
            "2gb",
            "--devices",
            "0,2",
            "--hint-value-size",
            "2mb",
            "--use-hugepages",
            "--metrics-addr",
            "",
            "--log-level",
            "debug",
            "--spin-us",
            "500",
        ])
        .unwrap();
        assert_eq!(c.effective_pool_size(), 2 << 30);
        assert_eq!(c.devices, vec![0, 2]);
        assert_eq!(c.hint_value_size, Some(2 << 20));
        assert!(c.use_hugepages);
        assert_eq!(c.metrics_socket().unwrap(), None);
        assert_eq!(c.spin_window(), Duration::from_micros(500));
        assert!(ServerConfig::try_parse_from(["pegaflow-server", "--pool-size", "lots"]).is_err());
    }
}
