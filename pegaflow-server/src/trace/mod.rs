//! `pegaflow-trace`: replays a production-format trace through the real block index and
//! reports hit ratios, or writes a seeded synthetic trace.

pub mod format;
pub mod replay;
pub mod ssd;
pub mod synth;

use std::io::{BufReader, Write};
use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

use crate::config::parse_size;
use format::{read_trace, write_trace};
use replay::{Capacity, ReplayPolicy, ReplayReport, SsdReplay, replay};
use ssd::SsdWrites;
use synth::{SynthConfig, synthesize};

/// Replays a KV-cache trace (JSON Lines: `{"timestamp", "input_length", "output_length",
/// "hash_ids"}`, one 512-token block per hash id) through PegaFlow's cache index. Prints
/// a summary and, as its last line, one JSON object of results.
#[derive(Debug, Parser)]
#[command(name = "pegaflow-trace", version, subcommand_negates_reqs = true)]
#[command(group(ArgGroup::new("capacity").required(true).args(["capacity_blocks", "capacity_fraction"])))]
pub struct TraceCli {
    /// Trace file, or `-` for standard input.
    #[arg(long, required = true)]
    pub trace: Option<String>,
    /// `lru`, `tinylfu` (the server's default) or `opt` (Belady's optimum, the reference).
    #[arg(long, value_enum, required = true)]
    pub policy: Option<ReplayPolicy>,
    /// Cache size in blocks.
    #[arg(long)]
    pub capacity_blocks: Option<u64>,
    /// Cache size as a fraction of the trace's distinct blocks (e.g. 0.1).
    #[arg(long)]
    pub capacity_fraction: Option<f64>,
    /// Bytes of one block (e.g. 64kb); the replay moves none, the allocator rounds them.
    #[arg(long, value_parser = parse_size, default_value = "64kb")]
    pub block_bytes: u64,
    /// W-TinyLFU window, percent of the resident blocks (tuning; default: the server's).
    #[arg(long, hide = true)]
    pub window_percent: Option<u64>,
    /// An SSD tier below the cache, of this many blocks (a circular log, like the
    /// server's); its hits are copied up into the cache.
    #[arg(long, conflicts_with = "ssd_capacity_fraction")]
    pub ssd_capacity_blocks: Option<u64>,
    /// An SSD tier of this fraction of the trace's distinct blocks.
    #[arg(long)]
    pub ssd_capacity_fraction: Option<f64>,
    /// When blocks go to the SSD: `on-save` (written through: the server's choice),
    /// `on-evict` (when the cache evicts them) or `second-use` (evicted after a hit).
    #[arg(long, value_enum, default_value = "on-save")]
    pub ssd_writes: SsdWrites,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a seeded synthetic trace of mixed traffic (Zipf multi-turn conversations
    /// and one-off long documents).
    Synth {
        #[command(flatten)]
        config: SynthConfig,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Why the tool failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceToolError {
    /// Bad trace.
    #[error(transparent)]
    Trace(#[from] format::TraceError),
    /// Bad synthetic shape.
    #[error(transparent)]
    Synth(#[from] synth::SynthError),
    /// The cache refused something.
    #[error("replay failed: {0}")]
    Replay(#[from] pegaflow_core::EngineError),
    /// Bad capacity.
    #[error("{0}")]
    Usage(String),
    /// Output failed.
    #[error("cannot write: {0}")]
    Io(#[from] std::io::Error),
}

/// Parses `args` (program name first), runs, and returns the process exit code.
pub fn run_trace_cli<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match TraceCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pegaflow-trace: {e}");
            1
        }
    }
}

fn run(cli: TraceCli) -> Result<(), TraceToolError> {
    if let Some(Command::Synth { config, out }) = cli.command {
        let trace = synthesize(&config)?;
        match out {
            Some(path) => write_trace(std::io::BufWriter::new(std::fs::File::create(path)?), &trace)?,
            None => write_trace(std::io::BufWriter::new(std::io::stdout().lock()), &trace)?,
        }
        return Ok(());
    }
    let (Some(path), Some(policy)) = (cli.trace, cli.policy) else {
        return Err(TraceToolError::Usage("--trace and --policy are required".into()));
    };
    let capacity = match (cli.capacity_blocks, cli.capacity_fraction) {
        (Some(n), None) if n > 0 => Capacity::Blocks(n),
        (None, Some(f)) if f > 0.0 && f.is_finite() => Capacity::Fraction(f),
        _ => return Err(TraceToolError::Usage("give a positive --capacity-blocks or --capacity-fraction".into())),
    };
    let requests = if path == "-" {
        read_trace(std::io::stdin().lock())?
    } else {
        read_trace(BufReader::new(std::fs::File::open(&path)?))?
    };
    let ssd_capacity = match (cli.ssd_capacity_blocks, cli.ssd_capacity_fraction) {
        (None, None) => None,
        (Some(n), None) if n > 0 => Some(Capacity::Blocks(n)),
        (None, Some(f)) if f > 0.0 && f.is_finite() => Some(Capacity::Fraction(f)),
        _ => {
            return Err(TraceToolError::Usage(
                "give a positive --ssd-capacity-blocks or --ssd-capacity-fraction".into(),
            ));
        }
    };
    let ssd = ssd_capacity.map(|capacity| SsdReplay { capacity, writes: cli.ssd_writes });
    let report = replay(&requests, policy, capacity, cli.block_bytes, cli.window_percent, ssd)?;
    let mut out = std::io::stdout().lock();
    print_summary(&mut out, &report)?;
    serde_json::to_writer(&mut out, &report).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn print_summary(out: &mut impl Write, r: &ReplayReport) -> std::io::Result<()> {
    writeln!(
        out,
        "policy {}: {} requests, {} distinct blocks, cache of {} blocks",
        r.policy, r.requests, r.distinct_blocks, r.capacity_blocks
    )?;
    writeln!(
        out,
        "  block hit ratio {:.4} ({} of {}), prefix token hit ratio {:.4}",
        r.block_hit_ratio, r.hit_blocks, r.blocks, r.prefix_token_hit_ratio
    )?;
    writeln!(
        out,
        "  admissions rejected {}, evictions {}, blocks not stored {}",
        r.admissions_rejected, r.evictions, r.skipped_blocks
    )?;
    if let Some(writes) = r.ssd_writes {
        writeln!(
            out,
            "  SSD of {} blocks, written {:?}: {} of the hits from the SSD, {} blocks written",
            r.ssd_capacity_blocks, writes, r.ssd_hit_blocks, r.ssd_written_blocks
        )?;
    }
    writeln!(out, "  {:.0} queries/s on one core, {:.0} requests/s replayed", r.queries_per_s, r.requests_per_s)
}
