//! The engine's per-block cost of a save and of a query + load, on the host backend, for
//! staged layouts (every layer of a block back to back, as the connector's staging buffer
//! registers them) with few or many layers.
//!
//! Blocks are small (2 KiB), so the memcpy is a small share of the time and what is left
//! is the engine's bookkeeping: index, policy, eviction, pool allocation, copy plan,
//! completion. `tp4k` (32 layers, 4,096 blocks a request) pays it per block and per
//! layer: the same bytes as one layer (as vLLM's cross-layer tensor) and as 32 show both.
//! The pool holds four requests, so the timed saves evict as a long-running server does.
//!
//!     cargo bench -p pegaflow-core --bench save_path

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: setup failures panic

use std::sync::Arc;
use std::time::{Duration, Instant};

use pegaflow_common::load_state::{LoadState, LoadStatus};
use pegaflow_common::shm::SharedMemory;
use pegaflow_core::cache::{BlockHash, PolicyKind};
use pegaflow_core::layout::TensorSpec;
use pegaflow_core::{
    Caller, Engine, EngineConfig, LayerRegistration, LeaseRef, MemoryKind, RankRef, RegisterRequest, SaveBlocks,
};

const UID: u32 = 1000;
const CONNECTION: u64 = 1;
const ME: Caller<'static> = Caller { session_id: "session", uid: Some(UID) };
/// Bytes of a block, split into `layers` pieces.
const BLOCK_BYTES: u64 = 2048;
/// Blocks a request (the staged `tp4k` chunk is 1,024; whole requests 4,096).
const BLOCKS: u64 = 1024;
/// Rounds a layout (`SAVE_PATH_ROUNDS` overrides, e.g. for a profile).
const ROUNDS: u64 = 30;

fn engine(pool: u64, block_bytes: u64, policy: PolicyKind) -> Arc<Engine> {
    Arc::new(
        Engine::new(EngineConfig {
            pool_size: pool,
            use_hugepages: false,
            hint_value_size: Some(block_bytes),
            policy,
            copy_threads: Some(1),
            cuda_devices: Vec::new(),
            spin: Duration::from_millis(1),
            limits: Default::default(),
            load_trace: Default::default(),
            ssd: None,
        })
        .unwrap(),
    )
}

/// A staging-like registration: `slots` blocks of `layers` pieces back to back; layer `l`
/// is the column at `l * piece` with a stride of one block.
fn register(e: &Engine, map: &SharedMemory, instance: &str, layers: u32, piece: u64, slots: u64) {
    let fd = map.fd().unwrap().try_clone_to_owned().unwrap();
    let token = e.add_memory(fd, MemoryKind::KvMemory, 0, UID, CONNECTION).unwrap();
    let source = e.host_memory(&token, Some(UID)).unwrap();
    let block_bytes = u64::from(layers) * piece;
    e.register(RegisterRequest {
        instance_id: instance.into(),
        namespace: "bench".into(),
        tp_rank: 0,
        tp_size: 1,
        num_layers: layers,
        layers: (0..layers)
            .map(|layer| LayerRegistration {
                layer,
                source: source.clone(),
                tensor: TensorSpec {
                    shape: vec![slots, piece],
                    stride: vec![block_bytes as i64, 1],
                    element_size: 1,
                    block_dim: 0,
                    kv_dim: None,
                    byte_offset: u64::from(layer) * piece,
                },
            })
            .collect(),
        session_id: "session".into(),
        owner_uid: Some(UID),
        owner_pid: None,
        replicated_kv: false,
    })
    .unwrap();
}

fn hashes(round: u64, n: u64) -> Vec<BlockHash> {
    (0..n)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&round.to_le_bytes());
            h[8..16].copy_from_slice(&i.to_le_bytes());
            h
        })
        .collect()
}

/// The median, or NaN when nothing was measured.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Rounds before the timed ones: by then the pool is full and every save evicts, as in a
/// server that has run a while.
const WARMUP: u64 = 8;

async fn run(layers: u32, policy: PolicyKind) {
    let slots = 2 * BLOCKS;
    let piece = BLOCK_BYTES / u64::from(layers);
    // Room for four requests: from the fifth on, every save evicts as many blocks.
    let pool = 4 * BLOCKS * BLOCK_BYTES;
    let e = engine(pool, BLOCK_BYTES, policy);
    // Every page populated first: the timings are the engine's, not first-touch faults.
    e.prepare_pool_in_background();
    while (e.metrics().pool_ready_bytes.get() as u64) < pool {
        std::thread::sleep(Duration::from_millis(10));
    }
    let map = SharedMemory::create("pegaflow-bench", slots * BLOCK_BYTES).unwrap();
    let instance = format!("l{layers}");
    register(&e, &map, &instance, layers, piece, slots);
    let target = RankRef { instance_id: &instance, tp_rank: 0, caller: ME };
    let src: Vec<u64> = (0..BLOCKS).collect();
    let dst: Vec<u64> = (BLOCKS..2 * BLOCKS).collect();
    let state = LoadState::create().unwrap();
    let state_fd = state.memory().fd().unwrap().try_clone_to_owned().unwrap();
    let state_token = e.add_memory(state_fd, MemoryKind::LoadState, 0, UID, CONNECTION).unwrap();

    let (mut saves, mut queries, mut loads) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = std::env::var("SAVE_PATH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
    for round in 0..WARMUP + rounds {
        let h = hashes(round, BLOCKS);
        // The connector's lookup asks for a prompt's blocks before it saves them (all miss).
        assert_eq!(e.query(&instance, &h, None).unwrap().hits(), 0);
        let t = Instant::now();
        let out = e.save(target, SaveBlocks { hashes: &h, parents: &[] }, &src, &[]).await.unwrap();
        let save = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let q = e.query(&instance, &h, None).unwrap();
        let query = t.elapsed().as_secs_f64();
        let hits = u64::from(q.hits());
        // W-TinyLFU may evict the request's own new blocks (asked for once) rather than
        // older ones asked for twice, and a query stops at the first miss: LRU keeps all.
        assert!(policy != PolicyKind::Lru || hits == BLOCKS, "{hits} of {BLOCKS} blocks hit");
        if let Some(lease) = q.lease_id().map(str::to_owned) {
            let t = Instant::now();
            e.load(target, LeaseRef::whole(&lease), &dst[..hits as usize], &[], &state_token).unwrap();
            while state.status() == LoadStatus::Pending {
                std::hint::spin_loop();
            }
            let load = t.elapsed().as_secs_f64();
            assert_eq!(state.status(), LoadStatus::Done);
            state.reset();
            if round >= WARMUP {
                queries.push(query / hits as f64);
                loads.push(load / hits as f64);
            }
        }
        if round >= WARMUP {
            saves.push(save / f64::from(out.saved_blocks.max(1)));
        }
    }
    let ns = |v: Vec<f64>| median(v) * 1e9;
    println!(
        "{policy:?} {layers:3} layers x {piece:4} B, {BLOCKS} blocks a request, pool full: \
         save {:.0} ns a block, query {:.0} ns a hit, load {:.0} ns a block",
        ns(saves),
        ns(queries),
        ns(loads),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let layouts = std::env::var("SAVE_PATH_LAYERS").ok().and_then(|l| l.parse().ok()).map_or(vec![1, 32], |l| vec![l]);
    for policy in [PolicyKind::Lru, PolicyKind::TinyLfu] {
        for &layers in &layouts {
            run(layers, policy).await;
        }
    }
}
