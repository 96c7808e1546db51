//! Start-up with many blocks on the SSD: fills a cache path with N small blocks (once;
//! reused while the directory holds them), then times `Engine::new` on it (when a server
//! would serve) and the background replay of the index log into the tier's index (when
//! SSD hits start), and the memory the index took per block.
//!
//! ```text
//! cargo run --release -p pegaflow-core --example ssd_recovery_bench -- DIR [BLOCKS]
//! ```
//! Prints one JSON line: blocks recovered, seconds, resident bytes per block.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pegaflow_core::ssd::{BlockFile, BlockId, PartId};
use pegaflow_core::{Engine, EngineConfig, SsdConfig};

// The server's allocator: transient replay buffers go back to the system as they do there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXTENT: u64 = 4096;
const LAYOUT: u64 = 0x5eed;

fn fill(dir: &Path, blocks: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut file = BlockFile::open(dir, blocks * EXTENT)?;
    if file.take_replayed().len() as u64 >= blocks {
        return Ok(());
    }
    file.add_layout(LAYOUT, &[64])?;
    let started = Instant::now();
    let payload = [7u8; 64];
    for i in 0..blocks {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&i.to_le_bytes());
        let id = BlockId {
            namespace: "bench-namespace-0123456789abcdef".into(),
            hash,
            part: PartId { rank: 0, of: 1 }.to_u32(),
            layout: LAYOUT,
        };
        file.write(id, &payload)?;
    }
    eprintln!("wrote {blocks} blocks in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Resident bytes of this process (`/proc/self/statm`).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: ssd_recovery_bench DIR [BLOCKS]");
        std::process::exit(2)
    };
    let blocks: u64 = args.get(2).and_then(|b| b.parse().ok()).unwrap_or(1_000_000);
    std::fs::create_dir_all(&dir)?;
    fill(&dir, blocks)?;
    let before = resident();
    let started = Instant::now();
    let engine = Engine::new(EngineConfig {
        pool_size: 64 << 20,
        use_hugepages: false,
        hint_value_size: None,
        policy: Default::default(),
        copy_threads: Some(1),
        cuda_devices: Vec::new(),
        spin: Duration::ZERO,
        limits: Default::default(),
        load_trace: Default::default(),
        ssd: Some(SsdConfig { paths: vec![dir], capacity: blocks * EXTENT, ..Default::default() }),
    })?;
    let serving = started.elapsed().as_secs_f64();
    while engine.metrics().ssd.recovering.get() != 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let recovered_s = started.elapsed().as_secs_f64();
    let grown = resident().saturating_sub(before);
    let recovered = engine.metrics().ssd.recovered_blocks.get();
    println!(
        "{{\"blocks\": {recovered}, \"serving_s\": {serving:.3}, \"recovered_s\": {recovered_s:.3}, \"resident_bytes_per_block\": {:.0}}}",
        grown as f64 / recovered.max(1) as f64
    );
    Ok(())
}
