//! The engine end to end on the host backend, in process: registration, save, query,
//! load with byte checks, concurrent saves and loads, re-registration.

#![allow(clippy::unwrap_used)] // a test crate: helpers panic on setup failure

use std::sync::Arc;
use std::time::{Duration, Instant};

use pegaflow_common::load_state::{LoadState, LoadStatus};
use pegaflow_common::shm::SharedMemory;
use pegaflow_core::cache::{BlockHash, PolicyKind};
use pegaflow_core::device::RegionSource;
use pegaflow_core::layout::TensorSpec;
use pegaflow_core::{
    Caller, Engine, EngineConfig, EngineError, LayerRegistration, LeaseRef, MemoryKind, MemoryToken, RankRef,
    RegisterRequest, SaveBlocks, SaveOutcome,
};

/// The descriptor connection and Unix user these tests hand memory over as.
const CONNECTION: u64 = 1;
const UID: u32 = 1000;
/// The session and user every rank here is registered by, and which save and load it.
const ME: Caller<'static> = Caller { session_id: "session", uid: Some(UID) };

const LAYERS: u32 = 4;
const BLOCKS: u64 = 64;
const SEG: u64 = 512; // bytes per K or V segment: 16 tokens x 16 elements x 2 bytes

/// A client's KV memory: LAYERS tensors (2, BLOCKS, 16, 16) of 2-byte elements in one file.
struct ClientKv {
    map: SharedMemory,
}

impl ClientKv {
    fn new(seed: u8) -> Self {
        let map = SharedMemory::create("pegaflow-it", Self::layer_bytes() * u64::from(LAYERS)).unwrap();
        let kv = Self { map };
        for (i, b) in kv.bytes_mut().iter_mut().enumerate() {
            *b = ((i as u64 * 31 + u64::from(seed) * 7) % 251) as u8 ^ seed;
        }
        kv
    }

    fn layer_bytes() -> u64 {
        2 * BLOCKS * SEG
    }

    #[allow(clippy::mut_from_ref)] // shared memory: the test coordinates access itself
    fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: the test owns the mapping; the engine copies only while a save/load is
        // awaited, never while the test reads or writes.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr_at(0, 1).unwrap().as_ptr(), self.map.len() as usize) }
    }

    /// Bytes of (layer, K/V, block).
    fn segment(&self, layer: u32, kv: u64, block: u64) -> Vec<u8> {
        let start = (u64::from(layer) * Self::layer_bytes() + kv * BLOCKS * SEG + block * SEG) as usize;
        self.bytes_mut()[start..start + SEG as usize].to_vec()
    }

    fn request(&self, e: &Engine, instance: &str, namespace: &str, rank: u32, tp: u32) -> RegisterRequest {
        let source = region(e, &self.map);
        RegisterRequest {
            instance_id: instance.into(),
            namespace: namespace.into(),
            tp_rank: rank,
            tp_size: tp,
            num_layers: LAYERS,
            layers: (0..LAYERS)
                .map(|layer| LayerRegistration {
                    layer,
                    source: source.clone(),
                    tensor: TensorSpec {
                        shape: vec![2, BLOCKS, 16, 16],
                        stride: vec![(BLOCKS * 256) as i64, 256, 16, 1],
                        element_size: 2,
                        block_dim: 1,
                        kv_dim: Some(0),
                        byte_offset: u64::from(layer) * Self::layer_bytes(),
                    },
                })
                .collect(),
            session_id: "session".into(),
            owner_uid: Some(UID),
            owner_pid: None,
            replicated_kv: false,
        }
    }
}

/// Hands `memory` to the engine as the server's descriptor channel does.
fn region(e: &Engine, memory: &SharedMemory) -> RegionSource {
    let fd = memory.fd().unwrap().try_clone_to_owned().unwrap();
    let token = e.add_memory(fd, MemoryKind::KvMemory, 0, UID, CONNECTION).unwrap();
    e.host_memory(&token, Some(UID)).unwrap()
}

/// A client load state and the token the engine knows it by.
fn load_state(e: &Engine) -> (LoadState, MemoryToken) {
    let state = LoadState::create().unwrap();
    let fd = state.memory().fd().unwrap().try_clone_to_owned().unwrap();
    let token = e.add_memory(fd, MemoryKind::LoadState, 0, UID, CONNECTION).unwrap();
    (state, token)
}

fn engine(pool: u64) -> Arc<Engine> {
    engine_with(pool, Default::default(), None)
}

/// An engine whose admission sketch is sized for blocks of `hint` bytes (a small hint
/// makes a large sketch: fewer collisions, slower aging).
fn engine_with(pool: u64, policy: PolicyKind, hint: Option<u64>) -> Arc<Engine> {
    Arc::new(
        Engine::new(EngineConfig {
            pool_size: pool,
            use_hugepages: false,
            hint_value_size: hint,
            policy,
            copy_threads: Some(2),
            cuda_devices: Vec::new(),
            spin: Duration::from_millis(1),
            limits: Default::default(),
            load_trace: Default::default(),
            ssd: None,
        })
        .unwrap(),
    )
}

fn hashes(tag: u8, n: u64) -> Vec<BlockHash> {
    (0..n)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&[tag; 8]);
            h[8..16].copy_from_slice(&i.to_le_bytes());
            h
        })
        .collect()
}

/// A save of one chain-less batch, in the argument order the tests read best.
async fn save(
    e: &Engine,
    instance_id: &str,
    tp_rank: u32,
    caller: Caller<'_>,
    layers: &[u32],
    block_ids: &[u64],
    hashes: &[BlockHash],
) -> pegaflow_core::Result<SaveOutcome> {
    let target = RankRef { instance_id, tp_rank, caller };
    e.save(target, SaveBlocks { hashes, parents: &[] }, block_ids, layers).await
}

/// A query as (hits, lease id).
fn query(
    e: &Engine,
    instance_id: &str,
    hashes: &[BlockHash],
    ttl: Option<Duration>,
) -> pegaflow_core::Result<(u32, Option<String>)> {
    let outcome = e.query(instance_id, hashes, ttl)?;
    Ok((outcome.hits(), outcome.lease_id().map(str::to_owned)))
}

#[allow(clippy::too_many_arguments)]
fn load(
    e: &Engine,
    instance_id: &str,
    tp_rank: u32,
    caller: Caller<'_>,
    lease_id: &str,
    block_ids: &[u64],
    layers: &[u32],
    state: &MemoryToken,
) -> pegaflow_core::Result<u32> {
    e.load(RankRef { instance_id, tp_rank, caller }, LeaseRef::whole(lease_id), block_ids, layers, state)
}

async fn wait(state: &LoadState) -> LoadStatus {
    let t0 = Instant::now();
    loop {
        let s = state.status();
        if s != LoadStatus::Pending || t0.elapsed() > Duration::from_secs(10) {
            return s;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_query_load_round_trip_is_byte_exact() {
    let e = engine(64 << 20);
    let kv = ClientKv::new(1);
    e.register(kv.request(&e, "a", "ns", 0, 1)).unwrap();
    let h = hashes(1, 16);
    let ids: Vec<u64> = (0..16).collect();
    let out = save(&e, "a", 0, ME, &[], &ids, &h).await.unwrap();
    assert_eq!((out.saved_blocks, out.sealed_blocks), (16, 16));
    // Read-your-writes: visible right after save returns.
    let (hits, lease) = query(&e, "a", &h, None).unwrap();
    assert_eq!(hits, 16);
    let dst: Vec<u64> = (40..56).rev().collect();
    let (state, state_token) = load_state(&e);
    assert_eq!(load(&e, "a", 0, ME, &lease.unwrap(), &dst, &[], &state_token).unwrap(), 16);
    assert_eq!(wait(&state).await, LoadStatus::Done);
    for layer in 0..LAYERS {
        for (src, dst) in ids.iter().zip(&dst) {
            for half in 0..2 {
                assert_eq!(kv.segment(layer, half, *src), kv.segment(layer, half, *dst), "layer {layer} block {src}");
            }
        }
    }
    assert_eq!(e.stats().leases, 0, "a single-rank load releases the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_saves_and_loads_on_disjoint_blocks() {
    let e = engine(64 << 20);
    let kv = ClientKv::new(2);
    e.register(kv.request(&e, "c", "ns", 0, 1)).unwrap();
    let first = hashes(2, 8);
    save(&e, "c", 0, ME, &[], &(0..8).collect::<Vec<_>>(), &first).await.unwrap();
    let mut tasks = Vec::new();
    for round in 0..8u64 {
        let e = Arc::clone(&e);
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            // Saves read blocks 8..24 while loads write blocks 32.., so they are disjoint.
            let h = hashes(10 + round as u8, 2);
            save(&e, "c", 0, ME, &[], &[8 + 2 * round, 9 + 2 * round], &h).await.unwrap();
            let (hits, lease) = query(&e, "c", &first[..2], None).unwrap();
            assert_eq!(hits, 2);
            let (state, state_token) = load_state(&e);
            load(&e, "c", 0, ME, &lease.unwrap(), &[32 + 4 * round, 33 + 4 * round], &[], &state_token).unwrap();
            assert_eq!(wait(&state).await, LoadStatus::Done);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for round in 0..8u64 {
        for layer in 0..LAYERS {
            assert_eq!(kv.segment(layer, 1, 1), kv.segment(layer, 1, 33 + 4 * round));
        }
    }
    assert_eq!(e.stats().sealed_blocks, 8 + 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_then_register_again() {
    let e = engine(16 << 20);
    let kv = ClientKv::new(3);
    e.register(kv.request(&e, "r", "ns", 0, 1)).unwrap();
    assert!(matches!(e.register(kv.request(&e, "r", "ns", 0, 1)), Err(EngineError::AlreadyExists(_))));
    assert_eq!(e.metrics().open_regions.get(), 1);
    // Only the registering session, of the owning user, moves the rank's bytes.
    for stranger in [Caller { session_id: "other", uid: Some(UID) }, Caller { session_id: "session", uid: None }] {
        let err = save(&e, "r", 0, stranger, &[], &[0], &hashes(3, 1)).await.unwrap_err();
        assert!(matches!(err, EngineError::PermissionDenied(_)), "{err}");
        let (_state, token) = load_state(&e);
        let err = load(&e, "r", 0, stranger, "lease", &[0], &[], &token).unwrap_err();
        assert!(matches!(err, EngineError::PermissionDenied(_)), "{err}");
    }
    save(&e, "r", 0, ME, &[], &[0], &hashes(3, 1)).await.unwrap();
    // Only a session holding a rank, of the owning user, may unregister it.
    assert!(matches!(e.unregister("r", "other-session", Some(UID)), Err(EngineError::PermissionDenied(_))));
    assert!(matches!(e.unregister("r", "session", Some(UID + 1)), Err(EngineError::PermissionDenied(_))));
    assert!(matches!(e.unregister("r", "session", None), Err(EngineError::PermissionDenied(_))));
    e.unregister("r", "session", Some(UID)).unwrap();
    assert_eq!(e.metrics().open_regions.get(), 0);
    assert!(matches!(save(&e, "r", 0, ME, &[], &[0], &hashes(3, 1)).await, Err(EngineError::NotFound(_))));
    assert!(matches!(e.unregister("r", "session", Some(UID)), Err(EngineError::NotFound(_))));
    e.register(kv.request(&e, "r", "ns", 0, 1)).unwrap();
    // The cache outlived the registration.
    assert_eq!(query(&e, "r", &hashes(3, 1), None).unwrap().0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_subset_does_not_seal_and_tp_ranks_must_all_save() {
    let e = engine(16 << 20);
    let (kv0, kv1) = (ClientKv::new(4), ClientKv::new(5));
    e.register(kv0.request(&e, "t", "ns", 0, 2)).unwrap();
    e.register(kv1.request(&e, "t", "ns", 1, 2)).unwrap();
    let h = hashes(4, 2);
    save(&e, "t", 0, ME, &[0, 1], &[0, 1], &h).await.unwrap();
    save(&e, "t", 0, ME, &[2, 3], &[0, 1], &h).await.unwrap();
    assert_eq!(query(&e, "t", &h, None).unwrap().0, 0, "rank 1 has not saved");
    let out = save(&e, "t", 1, ME, &[], &[0, 1], &h).await.unwrap();
    assert_eq!(out.sealed_blocks, 2);
    let (hits, lease) = query(&e, "t", &h, None).unwrap();
    assert_eq!(hits, 2);
    let lease = lease.unwrap();
    let ((s0, t0), (s1, t1)) = (load_state(&e), load_state(&e));
    load(&e, "t", 0, ME, &lease, &[10, 11], &[], &t0).unwrap();
    load(&e, "t", 1, ME, &lease, &[10, 11], &[], &t1).unwrap();
    assert_eq!(wait(&s0).await, LoadStatus::Done);
    assert_eq!(wait(&s1).await, LoadStatus::Done);
    for layer in 0..LAYERS {
        assert_eq!(kv0.segment(layer, 0, 1), kv0.segment(layer, 0, 11));
        assert_eq!(kv1.segment(layer, 1, 0), kv1.segment(layer, 1, 10));
        assert_ne!(kv0.segment(layer, 0, 11), kv1.segment(layer, 0, 11), "ranks hold their own bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_with_repeated_destination_blocks_is_refused() {
    let e = engine(16 << 20);
    let kv = ClientKv::new(6);
    e.register(kv.request(&e, "d", "ns", 0, 1)).unwrap();
    let h = hashes(6, 2);
    save(&e, "d", 0, ME, &[], &[0, 1], &h).await.unwrap();
    let (_, lease) = query(&e, "d", &h, None).unwrap();
    let lease = lease.unwrap();
    let (state, state_token) = load_state(&e);
    let err = load(&e, "d", 0, ME, &lease, &[9, 9], &[], &state_token).unwrap_err();
    assert!(matches!(err, EngineError::InvalidArgument(_)), "{err}");
    // Nothing changed: the lease still loads.
    load(&e, "d", 0, ME, &lease, &[9, 10], &[], &state_token).unwrap();
    assert_eq!(wait(&state).await, LoadStatus::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_layer_layout_round_trips_byte_exact() {
    // vLLM's cross-layer tensor (BLOCKS, LAYERS, 2, 16, 16) of 2-byte elements, registered
    // as per-layer views of one shared file: each block is one contiguous run.
    let block_bytes = u64::from(LAYERS) * 2 * SEG;
    let map = SharedMemory::create("pegaflow-it", BLOCKS * block_bytes).unwrap();
    // SAFETY: the test owns the mapping and no copy runs yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(map.ptr_at(0, 1).unwrap().as_ptr(), map.len() as usize) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let e = engine(16 << 20);
    let source = region(&e, &map);
    e.register(RegisterRequest {
        instance_id: "x".into(),
        namespace: "ns".into(),
        tp_rank: 0,
        tp_size: 1,
        num_layers: LAYERS,
        session_id: "session".into(),
        owner_uid: Some(UID),
        owner_pid: None,
        replicated_kv: false,
        layers: (0..LAYERS)
            .map(|layer| LayerRegistration {
                layer,
                source: source.clone(),
                tensor: TensorSpec {
                    shape: vec![BLOCKS, 2, 16, 16],
                    stride: vec![(block_bytes / 2) as i64, 256, 16, 1],
                    element_size: 2,
                    block_dim: 0,
                    kv_dim: Some(1),
                    byte_offset: u64::from(layer) * 2 * SEG,
                },
            })
            .collect(),
    })
    .unwrap();
    let h = hashes(7, 4);
    save(&e, "x", 0, ME, &[], &[9, 2, 30, 5], &h).await.unwrap();
    let (hits, lease) = query(&e, "x", &h, None).unwrap();
    assert_eq!(hits, 4);
    let (state, state_token) = load_state(&e);
    load(&e, "x", 0, ME, &lease.unwrap(), &[40, 41, 60, 50], &[], &state_token).unwrap();
    assert_eq!(wait(&state).await, LoadStatus::Done);
    let block = |b: u64| bytes[(b * block_bytes) as usize..((b + 1) * block_bytes) as usize].to_vec();
    for (src, dst) in [(9, 40), (2, 41), (30, 60), (5, 50)] {
        assert_eq!(block(src), block(dst), "block {src} -> {dst}");
    }

    // Layer subsets out of order (saved as runs 2, 0 and then 1..4), loaded back as layers
    // 0 and 2..4 only: layer 1 of the destination must stay as it was.
    let h = hashes(8, 2);
    save(&e, "x", 0, ME, &[2, 0], &[11, 12], &h).await.unwrap();
    assert_eq!(query(&e, "x", &h, None).unwrap().0, 0, "layers 1 and 3 missing");
    let out = save(&e, "x", 0, ME, &[1, 2, 3], &[11, 12], &h).await.unwrap();
    assert_eq!(out.sealed_blocks, 2);
    let (hits, lease) = query(&e, "x", &h, None).unwrap();
    assert_eq!(hits, 2);
    state.reset();
    load(&e, "x", 0, ME, &lease.unwrap(), &[21, 22], &[0, 2, 3], &state_token).unwrap();
    assert_eq!(wait(&state).await, LoadStatus::Done);
    let layer = |b: u64, l: u64| {
        let start = (b * block_bytes + l * 2 * SEG) as usize;
        bytes[start..start + (2 * SEG) as usize].to_vec()
    };
    for (src, dst) in [(11, 21), (12, 22)] {
        for l in [0, 2, 3] {
            assert_eq!(layer(src, l), layer(dst, l), "block {src} -> {dst}, layer {l}");
        }
        assert_ne!(layer(src, 1), layer(dst, 1), "layer 1 was not asked for");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_save_goes_in_chunks_and_counts_every_block_once() {
    // 30 blocks: more than the first chunk, so the save is prepared and copied in parts.
    let e = engine(64 << 20);
    let kv = ClientKv::new(5);
    e.register(kv.request(&e, "big", "ns", 0, 1)).unwrap();
    let mut h = hashes(11, 30);
    h[20] = h[3]; // a duplicate that lands in a later chunk
    let ids: Vec<u64> = (0..30).rev().collect();
    let out = save(&e, "big", 0, ME, &[], &ids, &h).await.unwrap();
    assert_eq!((out.saved_blocks, out.sealed_blocks, out.skipped_blocks), (29, 29, 1));
    let (hits, lease) = query(&e, "big", &h, None).unwrap();
    assert_eq!(hits, 30);
    let dst: Vec<u64> = (0..30).map(|i| 63 - 2 * (i % 15) - i / 15).collect(); // 34..=63, scattered
    let (state, state_token) = load_state(&e);
    load(&e, "big", 0, ME, &lease.unwrap(), &dst, &[], &state_token).unwrap();
    assert_eq!(wait(&state).await, LoadStatus::Done);
    for (i, (src, dst)) in ids.iter().zip(&dst).enumerate() {
        // Position 20 repeats position 3's hash: it loads position 3's saved bytes.
        let src = if i == 20 { ids[3] } else { *src };
        for layer in 0..LAYERS {
            for half in 0..2 {
                assert_eq!(kv.segment(layer, half, src), kv.segment(layer, half, *dst), "position {i} layer {layer}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_larger_than_the_pool_fails_without_evicting_anything() {
    // One block is LAYERS x 2 x SEG = 4 KiB; a 256 KiB pool holds 64 of them.
    let e = engine(256 << 10);
    let kv = ClientKv::new(6);
    e.register(kv.request(&e, "full", "ns", 0, 1)).unwrap();
    let kept = hashes(12, 8);
    save(&e, "full", 0, ME, &[], &(0..8).collect::<Vec<_>>(), &kept).await.unwrap();
    let too_many = hashes(13, BLOCKS + 8);
    let ids: Vec<u64> = (0..BLOCKS + 8).map(|i| i % BLOCKS).collect();
    assert!(matches!(save(&e, "full", 0, ME, &[], &ids, &too_many).await, Err(EngineError::ResourceExhausted(_))));
    assert_eq!(query(&e, "full", &kept, None).unwrap().0, 8, "nothing was evicted");
    assert_eq!(query(&e, "full", &too_many, None).unwrap().0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_save_with_a_conflicting_block_fails_before_copying_anything() {
    let e = engine(64 << 20);
    let one = ClientKv::new(7);
    let two = ClientKv::new(8);
    e.register(one.request(&e, "tp1", "shared", 0, 1)).unwrap();
    e.register(two.request(&e, "tp2", "shared", 0, 2)).unwrap();
    let h = hashes(14, 30);
    // Stored by a TP-1 instance; the TP-2 save below lists it in a later chunk.
    save(&e, "tp1", 0, ME, &[], &[0], &h[20..21]).await.unwrap();
    let ids: Vec<u64> = (0..30).collect();
    assert!(matches!(save(&e, "tp2", 0, ME, &[], &ids, &h).await, Err(EngineError::InvalidArgument(_))));
    assert_eq!(e.stats().blocks, 1, "the first chunks were not saved either");
}

/// One request as an inference engine makes it: query the chain, release the lease, save
/// the blocks from the first miss on (into block ids `ids`) with their chain links.
async fn request(e: &Engine, instance: &str, chain: &[BlockHash], ids: &[u64]) -> SaveOutcome {
    let (hit, lease) = query(e, instance, chain, None).unwrap();
    if let Some(lease) = lease {
        e.release_lease(&lease).unwrap();
    }
    let from = hit as usize;
    let parents: Vec<Option<BlockHash>> = (from..chain.len()).map(|i| i.checked_sub(1).map(|p| chain[p])).collect();
    if from == chain.len() {
        return SaveOutcome::default();
    }
    let target = RankRef { instance_id: instance, tp_rank: 0, caller: ME };
    let blocks = SaveBlocks { hashes: &chain[from..], parents: &parents };
    e.save(target, blocks, &ids[from..], &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_refused_by_admission_succeeds_with_its_blocks_skipped() {
    // A 40 KiB pool: ten 4 KiB blocks, all popular; the newest sit in the window under a
    // lease, so a new chain must beat main's victim itself: seen once, it cannot.
    let e = engine_with(40 << 10, PolicyKind::TinyLfu, None);
    let kv = ClientKv::new(8);
    e.register(kv.request(&e, "adm", "ns", 0, 1)).unwrap();
    let popular = hashes(20, 10);
    for _ in 0..4 {
        for (i, block) in popular[..9].iter().enumerate() {
            request(&e, "adm", &[*block], &[i as u64]).await;
        }
    }
    request(&e, "adm", &popular[9..], &[9]).await;
    let (_, lease) = query(&e, "adm", &popular[7..], None).unwrap();
    let chain = hashes(21, 3);
    let out = request(&e, "adm", &chain, &[10, 11, 12]).await;
    assert_eq!((out.saved_blocks, out.skipped_blocks, out.rejected_blocks), (0, 3, 3), "{out:?}");
    assert_eq!(query(&e, "adm", &chain, None).unwrap().0, 0);
    e.release_lease(&lease.unwrap()).unwrap();
    for block in &popular {
        assert_eq!(query(&e, "adm", &[*block], None).unwrap().0, 1, "a popular block was evicted");
    }
    assert_eq!(e.stats().admissions_rejected, 1, "one duel lost; its chain followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_pressure_under_admission_evicts_and_never_fails_a_save() {
    // 64 blocks fit; 8 rounds of 32 new one-off blocks, with a hot chain asked for every
    // round. The sketch is sized for 1,024 blocks so that hash collisions (its seed is
    // random per process) cannot decide the outcome.
    let e = engine_with(256 << 10, PolicyKind::TinyLfu, Some(256));
    let kv = ClientKv::new(9);
    e.register(kv.request(&e, "press", "ns", 0, 1)).unwrap();
    let hot = hashes(30, 8);
    let hot_ids: Vec<u64> = (0..8).collect();
    for round in 0..8u8 {
        request(&e, "press", &hot, &hot_ids).await;
        let cold = hashes(40 + round, 32);
        let ids: Vec<u64> = (8..40).collect();
        let out = request(&e, "press", &cold, &ids).await;
        assert_eq!(out.saved_blocks + out.skipped_blocks, 32, "round {round}: {out:?}");
        let stats = e.stats();
        assert!(stats.used_bytes <= stats.capacity_bytes);
    }
    assert_eq!(query(&e, "press", &hot, None).unwrap().0, 8, "the hot chain survived the scans");
    let stats = e.stats();
    assert!(stats.evictions > 0 && stats.blocks <= 64, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_instance_stores_one_copy_that_every_rank_loads() {
    // MLA across two TP ranks: each rank's memory holds the same latent KV, so the cache
    // keeps one copy. Rank 0 saves; rank 1's save of the same blocks copies nothing; both
    // ranks load rank 0's bytes.
    let e = engine(16 << 20);
    let (r0, r1) = (ClientKv::new(21), ClientKv::new(22));
    let replicated =
        |kv: &ClientKv, rank| RegisterRequest { replicated_kv: true, ..kv.request(&e, "mla", "ns-mla", rank, 2) };
    let block_bytes = e.register(replicated(&r0, 0)).unwrap();
    let mismatch = RegisterRequest { replicated_kv: false, ..r1.request(&e, "mla", "ns-mla", 1, 2) };
    assert!(matches!(e.register(mismatch), Err(EngineError::InvalidArgument(_))), "ranks must agree");
    e.register(replicated(&r1, 1)).unwrap();
    assert!(e.instances()[0].replicated_kv);
    let h = hashes(50, 4);
    let out = save(&e, "mla", 0, ME, &[], &[0, 1, 2, 3], &h).await.unwrap();
    assert_eq!((out.saved_blocks, out.sealed_blocks), (4, 4), "one rank's save seals the blocks");
    let out = save(&e, "mla", 1, ME, &[], &[0, 1, 2, 3], &h).await.unwrap();
    assert_eq!((out.saved_blocks, out.skipped_blocks), (0, 4), "rank 1 copies nothing");
    assert_eq!(e.stats().used_bytes, 4 * block_bytes, "one copy, not one per rank");
    let (hits, lease) = query(&e, "mla", &h, None).unwrap();
    assert_eq!(hits, 4);
    let lease = lease.unwrap();
    for (rank, kv) in [(1, &r1), (0, &r0)] {
        let (state, token) = load_state(&e);
        assert_eq!(load(&e, "mla", rank, ME, &lease, &[40, 41, 42, 43], &[], &token).unwrap(), 4);
        assert_eq!(wait(&state).await, LoadStatus::Done);
        for (dst, src) in [(40, 0), (41, 1), (42, 2), (43, 3)] {
            for layer in 0..LAYERS {
                for half in 0..2 {
                    assert_eq!(kv.segment(layer, half, dst), r0.segment(layer, half, src), "rank {rank}");
                }
            }
        }
    }
    assert_eq!(e.stats().leases, 0, "both ranks loaded: the lease ended");
}
