//! Command-line flags of `pegaflow-server` (also parsed by the Python console script).

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// allocator's tables and the admission frequency sketch. Default: 64kb.
    #[arg(long, value_parser = parse_size)]
    pub hint_value_size: Option<u64>,

    /// Share of loads (0 to 1) that log their load path (query → lease → copy → ready)
    /// as one line with per-stage durations (target `pegaflow::trace`).
    #[arg(long, default_value_t = 0.01)]
    pub trace_sample_rate: f64,

    /// Loads slower than this many milliseconds, from the query that leased their blocks
    /// until the client can read them, always log their load path.
    #[arg(long, default_value_t = 200)]
    pub trace_slow_ms: u64,

    /// Admit every saved block and evict least recently used first, instead of
    /// W-TinyLFU (a frequency sketch keeps one-off scans from flushing hot prefixes).
    #[arg(long)]
    pub disable_lfu_admission: bool,

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

    /// Unix socket for local clients: gRPC and the hand-over of host memory by descriptor
    /// (the host backend needs it); created with mode 0660, so users of the server's group
    /// may connect. An empty value disables it. Default:
    /// `$XDG_RUNTIME_DIR/pegaflow/pegaflow-<port>.sock`, else `/run/pegaflow/…` as root,
    /// else `/tmp/pegaflow-<uid>/…` (`<port>`: the `--addr` port).
    #[arg(long)]
    pub uds: Option<String>,

    /// A file holding the shared secret clients must send (`authorization: Bearer
    /// <token>`) on TCP gRPC calls and HTTP requests other than /health. Required (or
    /// TLS, or --insecure) when a listener is not on loopback.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,

    /// PEM certificate chain: serve gRPC over TLS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Allow a non-loopback listener without --auth-token-file or TLS: anyone who can
    /// reach the port can use the server.
    #[arg(long)]
    pub insecure: bool,

    /// Seconds a new connection may take to send its first request bytes (the HTTP/2
    /// preface, or the descriptor protocol's hello) before it is closed.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout_s: u64,

    /// Seconds a gRPC connection may stay without any call in flight (an open session
    /// counts as one) before it is closed. 0 never closes idle connections.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_s: u64,

    /// Seconds between HTTP/2 keepalive pings to a silent client (dead peers are found and
    /// dropped). 0 disables them.
    #[arg(long, default_value_t = 10)]
    pub keepalive_interval_s: u64,

    /// Seconds to wait for a keepalive ping's answer before dropping the connection.
    #[arg(long, default_value_t = 5)]
    pub keepalive_timeout_s: u64,

    /// Connections served at once over all listeners (gRPC and descriptor); more are
    /// closed on arrival. Lowered to fit the open-file limit.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,

    /// Client memory mappings (registered KV regions, load states, memory handed over and
    /// not yet released) held at once.
    #[arg(long, default_value_t = 16384)]
    pub max_client_mappings: usize,

    /// Bytes of client memory mapped at once (registered regions and memory handed over);
    /// a hand-over past it fails RESOURCE_EXHAUSTED. Default: 16tb.
    #[arg(long, value_parser = parse_size)]
    pub max_client_memory: Option<u64>,

    /// Live leases one instance may hold; a query past it fails RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_leases_per_instance: usize,

    /// Blocks all live leases together may pin; a query past it fails RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_leased_blocks: usize,

    /// Block hashes or ids one Save, Query or Load may carry; more is INVALID_ARGUMENT.
    #[arg(long, default_value_t = 1 << 16)]
    pub max_hashes_per_request: usize,

    /// SSD cache: a file or a directory (the files go inside); repeat the flag (or
    /// separate with commas) to spread blocks over several. Sealed blocks are written
    /// through; a restarted server serves them again. Without it the cache is RAM only.
    #[arg(long, value_delimiter = ',')]
    pub ssd_cache_path: Vec<PathBuf>,

    /// SSD cache capacity over all paths (split evenly), e.g. 512gb, 2tb; reserved at
    /// start, so a disk without the room fails then.
    #[arg(long, value_parser = parse_size, default_value = "512gb")]
    pub ssd_cache_capacity: u64,

    /// SSD write queue depth: write batches that may wait (one per chunk of blocks a save
    /// seals: 16, 32, 64, … blocks); when full,
    /// new blocks are not written to the SSD (counted in pegaflow_ssd_dropped_writes).
    #[arg(long, default_value_t = 8)]
    pub ssd_write_queue_depth: usize,

    /// SSD prefetch queue depth: prefetch batches (one per query) that may wait.
    #[arg(long, default_value_t = 2)]
    pub ssd_prefetch_queue_depth: usize,

    /// SSD block writes at once.
    #[arg(long, default_value_t = 2)]
    pub ssd_write_inflight: usize,

    /// SSD block reads at once.
    #[arg(long, default_value_t = 16)]
    pub ssd_prefetch_inflight: usize,

    /// Blocks being copied up from the SSD at most (backpressure: queries past it
    /// leave the rest a miss).
    #[arg(long, default_value_t = 800)]
    pub max_prefetch_blocks: usize,
}

impl ServerConfig {
    /// The SSD tier's settings, when a cache path is given.
    pub fn ssd(&self) -> Option<pegaflow_core::SsdConfig> {
        (!self.ssd_cache_path.is_empty()).then(|| pegaflow_core::SsdConfig {
            paths: self.ssd_cache_path.clone(),
            capacity: self.ssd_cache_capacity,
            write_queue_depth: self.ssd_write_queue_depth,
            prefetch_queue_depth: self.ssd_prefetch_queue_depth,
            write_inflight: self.ssd_write_inflight,
            prefetch_inflight: self.ssd_prefetch_inflight,
            max_prefetch_blocks: self.max_prefetch_blocks,
        })
    }

    /// The pool size to use: the flag, or half the memory capped at 30 GiB.
    pub fn effective_pool_size(&self) -> u64 {
        self.pool_size.unwrap_or_else(|| (total_memory().unwrap_or(2 << 30) / 2).min(AUTO_POOL_CAP))
    }

    /// How long a server thread keeps polling after each request.
    pub fn spin_window(&self) -> Duration {
        match self.spin_us {
            Some(us) => Duration::from_micros(us),
            None => pegaflow_common::spin::default_warm_window(Duration::from_millis(2)),
        }
    }

    /// Which loads log their load path.
    pub fn load_trace(&self) -> pegaflow_core::LoadTraceConfig {
        pegaflow_core::LoadTraceConfig {
            sample_rate: self.trace_sample_rate,
            slow: Duration::from_millis(self.trace_slow_ms),
        }
    }

    /// Engine resource caps from the flags.
    pub fn engine_limits(&self) -> pegaflow_core::EngineLimits {
        pegaflow_core::EngineLimits {
            leases: pegaflow_core::cache::LeaseLimits {
                per_instance: self.max_leases_per_instance,
                blocks: self.max_leased_blocks,
            },
            max_hashes_per_request: self.max_hashes_per_request,
            max_client_mappings: self.max_client_mappings,
            max_client_memory: self
                .max_client_memory
                .unwrap_or(pegaflow_core::EngineLimits::default().max_client_memory),
        }
    }

    /// The Unix socket path, or `None` when disabled.
    pub fn uds_path(&self) -> Option<PathBuf> {
        match self.uds.as_deref().map(str::trim) {
            Some("") => None,
            Some(path) => Some(PathBuf::from(path)),
            None => Some(default_runtime_dir().join(format!("pegaflow-{}.sock", self.addr.port()))),
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

/// Where the default Unix socket lives: `$XDG_RUNTIME_DIR/pegaflow`, `/run/pegaflow` for
/// root, else `/tmp/pegaflow-<uid>`.
fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("pegaflow");
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() { PathBuf::from("/run/pegaflow") } else { PathBuf::from(format!("/tmp/pegaflow-{uid}")) }
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
        let uds = c.uds_path().unwrap();
        assert!(uds.to_string_lossy().ends_with("/pegaflow-50055.sock"), "{uds:?}");
        assert_eq!((c.handshake_timeout_s, c.idle_timeout_s, c.max_connections), (10, 300, 1024));
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
            "--uds",
            "",
            "--auth-token-file",
            "/etc/token",
            "--insecure",
            "--idle-timeout-s",
            "7",
            "--max-connections",
            "9",
            "--max-leases-per-instance",
            "3",
            "--max-hashes-per-request",
            "100",
        ])
        .unwrap();
        assert_eq!(c.effective_pool_size(), 2 << 30);
        assert_eq!(c.devices, vec![0, 2]);
        assert_eq!(c.hint_value_size, Some(2 << 20));
        assert!(c.use_hugepages);
        assert_eq!(c.metrics_socket().unwrap(), None);
        assert_eq!(c.spin_window(), Duration::from_micros(500));
        assert_eq!(c.uds_path(), None);
        assert_eq!(c.auth_token_file.as_deref(), Some(std::path::Path::new("/etc/token")));
        assert!(c.insecure);
        assert_eq!((c.idle_timeout_s, c.max_connections), (7, 9));
        let limits = c.engine_limits();
        assert_eq!((limits.leases.per_instance, limits.max_hashes_per_request), (3, 100));
        assert!(ServerConfig::try_parse_from(["pegaflow-server", "--tls-cert", "c.pem"]).is_err(), "needs a key");
        assert!(ServerConfig::try_parse_from(["pegaflow-server", "--pool-size", "lots"]).is_err());
    }

    #[test]
    fn the_ssd_tier_is_off_without_a_path_and_takes_every_flag() {
        let c = ServerConfig::try_parse_from(["pegaflow-server"]).unwrap();
        assert_eq!(c.ssd(), None);
        let c = ServerConfig::try_parse_from([
            "pegaflow-server",
            "--ssd-cache-path",
            "/mnt/a,/mnt/b",
            "--ssd-cache-path",
            "/mnt/c",
            "--ssd-cache-capacity",
            "2tb",
            "--ssd-write-queue-depth",
            "3",
            "--ssd-prefetch-queue-depth",
            "4",
            "--ssd-write-inflight",
            "5",
            "--ssd-prefetch-inflight",
            "6",
            "--max-prefetch-blocks",
            "7",
        ])
        .unwrap();
        let ssd = c.ssd().unwrap();
        assert_eq!(ssd.paths, ["/mnt/a", "/mnt/b", "/mnt/c"].map(std::path::PathBuf::from));
        assert_eq!(ssd.capacity, 2 << 40);
        assert_eq!(
            (ssd.write_queue_depth, ssd.prefetch_queue_depth, ssd.write_inflight, ssd.prefetch_inflight),
            (3, 4, 5, 6)
        );
        assert_eq!(ssd.max_prefetch_blocks, 7);
        let defaults = ServerConfig::try_parse_from(["pegaflow-server", "--ssd-cache-path", "/mnt/a"]).unwrap();
        assert_eq!(
            defaults.ssd().unwrap(),
            pegaflow_core::SsdConfig { paths: vec!["/mnt/a".into()], ..Default::default() }
        );
    }
}
