//! Throughput of the SSD tier's I/O engine on one file: random block-sized reads or
//! writes at a queue depth, the same shape as
//! `fio --ioengine=io_uring --direct=1 --rw=randread|randwrite --bs=B --iodepth=D`, so the
//! two can be compared in one run (`scripts/bench_ssd.sh`).
//!
//! ```text
//! cargo run --release -p pegaflow-core --example ssd_io_bench -- \
//!     FILE SIZE_MIB BLOCK_KIB DEPTH read|write SECONDS [positional] [buffers=N]
//! ```
//! Operations stream through the engine (`IoEngine::stream`), each buffer used again as
//! soon as its operation completed; `DEPTH` buffers by default, as fio keeps one per
//! queue slot (`buffers=N` cycles through N: more distinct memory per second).
//! Prints one JSON line: GB/s, IOPS, and p50/p99 latency per operation (from its
//! submission until its completion was seen).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use pegaflow_core::ssd::io::{AlignedBuf, IoBuf, IoEngine, IoKind, IoOp};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!("usage: ssd_io_bench FILE SIZE_MIB BLOCK_KIB DEPTH read|write SECONDS [positional] ({what})");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path: String = arg(&args, 1, "file");
    let size = arg::<u64>(&args, 2, "size") << 20;
    let block = arg::<usize>(&args, 3, "block") << 10;
    let depth: u32 = arg(&args, 4, "depth");
    let write = arg::<String>(&args, 5, "op") == "write";
    let seconds: f64 = arg(&args, 6, "seconds");
    let uring = !args.iter().skip(7).any(|a| a == "positional");
    let buffers = args
        .iter()
        .skip(7)
        .find_map(|a| a.strip_prefix("buffers=").and_then(|n| n.parse::<usize>().ok()))
        .unwrap_or(depth as usize)
        .max(depth as usize);
    let file = match OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot open {path} with O_DIRECT: {e}");
            std::process::exit(1)
        }
    };
    if file.metadata().map(|m| m.len()).unwrap_or(0) < size {
        // Lay the file out once (reads of holes would not touch the device).
        let mut engine = IoEngine::new(16, uring);
        let ops = (0..size / (1 << 20))
            .map(|i| {
                let mut buf = AlignedBuf::new(1 << 20);
                buf.bytes_mut().fill(i as u8);
                IoOp::Write { offset: i << 20, buf: buf.into() }
            })
            .collect();
        if engine.run(&file, ops).iter().any(|(_, r)| r.is_err()) {
            eprintln!("cannot fill {path}");
            std::process::exit(1)
        }
    }
    let slots = size / block as u64;
    let mut engine = IoEngine::new(depth, uring);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_offset = move || {
        // xorshift: a cheap uniform pick of a block-aligned offset
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % slots) * block as u64
    };
    // Written bytes are pseudo-random, as fio's: a cloud disk may treat zeros apart.
    let spare: VecDeque<IoBuf> = (0..buffers)
        .map(|i| {
            let mut buf = AlignedBuf::new(block);
            let mut x = 0x2545_F491_4F6C_DD1Du64 ^ i as u64;
            for chunk in buf.bytes_mut().chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            IoBuf::from(buf)
        })
        .collect();
    // Oldest returned first, so `buffers=N` really cycles through N.
    let spare = RefCell::new(spare);
    let (mut ops_done, mut latencies) = (0u64, Vec::new());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut issued = 0u64;
    let outcome = engine.stream(
        &file,
        || {
            // At least one operation, however short the time asked for.
            if issued > 0 && Instant::now() >= deadline {
                return None;
            }
            let buf = spare.borrow_mut().pop_front()?;
            issued += 1;
            let offset = next_offset();
            Some((0, if write { IoOp::Write { offset, buf } } else { IoOp::Read { offset, buf } }))
        },
        |end| {
            if let Err(e) = end.result {
                eprintln!("I/O failed: {e}");
                std::process::exit(1)
            }
            ops_done += 1;
            latencies.push(end.latency.as_secs_f64());
            spare.borrow_mut().push_back(match end.op {
                IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf,
            });
        },
    );
    if let Err(e) = outcome {
        eprintln!("the ring failed: {e}");
        std::process::exit(1)
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] * 1e6;
    println!(
        "{{\"engine\": \"{}\", \"op\": \"{}\", \"block_kib\": {}, \"depth\": {depth}, \"gb_per_s\": {:.3}, \"iops\": {:.0}, \"lat_p50_us\": {:.1}, \"lat_p99_us\": {:.1}}}",
        if engine.kind() == IoKind::Uring { "io_uring" } else { "positional" },
        if write { "write" } else { "read" },
        block >> 10,
        ops_done as f64 * block as f64 / elapsed / 1e9,
        ops_done as f64 / elapsed,
        pct(0.5),
        pct(0.99),
    );
}
