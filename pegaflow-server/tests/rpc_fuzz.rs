//! A bounded, seeded fuzz run over every RPC: random bytes, mutated valid messages and
//! valid messages with random fields. The server must stay up, never answer INTERNAL (or
//! UNKNOWN) to anything a client sends, and keep the blocks saved before intact.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test crate

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{BLOCKS, ClientKv, LAYERS, METHODS, RawCodec, Rng, Server, hashes, load_state, open_session, settle};
use pegaflow_common::load_state::LoadStatus;
use pegaflow_proto as pb;
use prost::Message;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

/// Requests per RPC (10 RPCs).
const ROUNDS: usize = 1000;
/// Raw request frames (random flag, declared length and body) over all RPCs.
const FRAME_ROUNDS: usize = 2000;
const SEED: u64 = 0x5eed_f00d;

/// What the generator may reuse: real ids and tokens, so requests get past the first checks.
struct Known {
    instance: String,
    session: String,
    kv_token: Vec<u8>,
    state_token: Vec<u8>,
}

fn random_id(rng: &mut Rng, known: &str) -> String {
    match rng.below(8) {
        0..=3 => known.to_owned(),
        4 => String::new(),
        5 => "é".repeat(rng.below(25_000) as usize),
        _ => format!("fuzz-{}", rng.below(50)),
    }
}

fn random_hashes(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..rng.below(9))
        .map(|i| match rng.below(8) {
            0 => rng.bytes_upto(64),
            1 => hashes(1, 16)[i as usize % 16].clone(), // a known block
            _ => rng.bytes(32),
        })
        .collect()
}

fn random_token(rng: &mut Rng, known: &Known) -> Vec<u8> {
    match rng.below(5) {
        0 => known.kv_token.clone(),
        1 => known.state_token.clone(),
        2 => rng.bytes_upto(40),
        _ => rng.bytes(16),
    }
}

/// A well-formed message of `method` with random field values.
fn random_message(rng: &mut Rng, method: &str, known: &Known) -> Vec<u8> {
    let instance = random_id(rng, &known.instance);
    let small = |rng: &mut Rng| rng.below(4) as u32;
    match method.rsplit('/').next().unwrap_or_default() {
        "RegisterKvLayers" => {
            let token = random_token(rng, known);
            let mut req =
                ClientKv::request_for(&token, &instance, &rng.below(1 << 20).to_string(), small(rng), small(rng));
            req.replicated_kv = rng.below(2) == 0;
            for layer in &mut req.layers {
                if let Some(layout) = layer.layout.as_mut()
                    && rng.below(2) == 0
                {
                    layout.shape = (0..rng.below(6)).map(|_| rng.below(80)).collect();
                    layout.stride = (0..rng.below(6)).map(|_| rng.next() as i64 % 100_000).collect();
                    layout.element_size = rng.below(9) as u32;
                    layout.block_dim = small(rng);
                    layout.byte_offset = rng.next() >> rng.below(64);
                }
            }
            req.encode_to_vec()
        }
        "UnregisterInstance" => {
            pb::UnregisterInstanceRequest { instance_id: instance, session_id: random_id(rng, "no-such-session") }
                .encode_to_vec()
        }
        "Save" => {
            let block_hashes = random_hashes(rng);
            pb::SaveRequest {
                instance_id: instance,
                session_id: random_id(rng, &known.session),
                tp_rank: small(rng),
                layers: (0..rng.below(3)).map(|_| rng.below(6) as u32).collect(),
                block_ids: (0..block_hashes.len() + rng.below(2) as usize).map(|_| rng.below(BLOCKS + 8)).collect(),
                parent_hashes: if rng.below(2) == 0 { Vec::new() } else { random_hashes(rng) },
                block_hashes,
            }
            .encode_to_vec()
        }
        "Query" => pb::QueryRequest {
            instance_id: instance,
            block_hashes: random_hashes(rng),
            lease_ttl_ms: rng.below(700_000),
        }
        .encode_to_vec(),
        "Load" => pb::LoadRequest {
            instance_id: instance,
            // Never the real session: a load with it could write into the known blocks.
            session_id: random_id(rng, "no-such-session"),
            tp_rank: small(rng),
            lease_id: random_id(rng, "no-such-lease"),
            block_ids: (0..rng.below(9)).map(|_| rng.below(BLOCKS + 8)).collect(),
            layers: (0..rng.below(3)).map(|_| rng.below(6) as u32).collect(),
            load_state_token: random_token(rng, known),
            lease_offset: rng.below(40) as u32,
            more_ranges: rng.below(2) == 1,
        }
        .encode_to_vec(),
        "ReleaseLease" => pb::ReleaseLeaseRequest { lease_id: random_id(rng, "no-such-lease") }.encode_to_vec(),
        "OpenSession" => pb::OpenSessionRequest { instance_id: instance }.encode_to_vec(),
        _ => Vec::new(), // Health, ListInstances, DropCache: empty messages
    }
}

/// Random bytes, a mutated valid message, or a valid message with random fields.
fn body(rng: &mut Rng, method: &str, known: &Known) -> Vec<u8> {
    match rng.below(3) {
        0 => rng.bytes_upto(200),
        1 => {
            let mut bytes = random_message(rng, method, known);
            for _ in 0..1 + rng.below(4) {
                match rng.below(3) {
                    0 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len() as u64) as usize;
                        bytes[at] ^= 1 << rng.below(8);
                    }
                    1 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                    _ => bytes.extend(rng.bytes_upto(16)),
                }
            }
            bytes
        }
        _ => random_message(rng, method, known),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_never_crash_corrupt_or_answer_internal() {
    let started = Instant::now();
    let mut server = Server::start(&[]).await;
    let mut c = server.client().await;
    let mut d = server.descriptors();
    let kv = ClientKv::new(3);
    let kv_token = kv.hand_over(&mut d);
    let (session, _alive) = open_session(&mut c, "known").await;
    c.register_kv_layers(kv.request(&kv_token, "known", &session, 0, 1)).await.unwrap();
    let saved = hashes(1, 16);
    c.save(pb::SaveRequest {
        instance_id: "known".into(),
        session_id: session.clone(),
        tp_rank: 0,
        layers: vec![],
        block_ids: (0..16).collect(),
        block_hashes: saved.clone(),
        parent_hashes: Vec::new(),
    })
    .await
    .unwrap();
    let expected: Vec<Vec<u8>> =
        (0..LAYERS).flat_map(|l| (0..16).map(move |b| (l, b))).map(|(l, b)| kv.segment(l, 0, b)).collect();
    let (state, state_token) = load_state(&mut d);
    let known =
        Known { instance: "known".into(), session: session.clone(), kv_token, state_token: state_token.clone() };

    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    let mut rng = Rng::new(SEED);
    let mut outcomes: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for round in 0..ROUNDS * METHODS.len() {
        let method = METHODS[round % METHODS.len()];
        let request = body(&mut rng, method, &known);
        grpc.ready().await.unwrap();
        let path = PathAndQuery::from_static(method);
        let outcome = if method.ends_with("OpenSession") {
            // A session opened and dropped at once: it must never take "known" with it.
            match grpc.server_streaming(tonic::Request::new(request.clone()), path, RawCodec).await {
                Ok(mut stream) => {
                    let first = tokio::time::timeout(Duration::from_secs(5), stream.get_mut().message()).await;
                    first.expect("no first session event").map(|_| ())
                }
                Err(status) => Err(status),
            }
        } else {
            grpc.unary(tonic::Request::new(request.clone()), path, RawCodec).await.map(|_| ())
        };
        let code = common::code(&outcome);
        assert!(
            !matches!(code, Code::Internal | Code::Unknown),
            "{method} answered {outcome:?} to {} bytes: {:02x?}",
            request.len(),
            &request[..request.len().min(64)]
        );
        *outcomes.entry((method.rsplit('/').next().unwrap_or(method), format!("{code:?}"))).or_default() += 1;
    }
    println!("{} requests in {:?}: {outcomes:?}", ROUNDS * METHODS.len(), started.elapsed());

    // Then whole request bodies at the gRPC framing level: random flags and lengths.
    let mut channel = server.channel().await;
    let mut frames: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..FRAME_ROUNDS {
        use tower::{Service, ServiceExt};
        let method = METHODS[round % METHODS.len()];
        let mut body = body(&mut rng, method, &known);
        let declared = match rng.below(3) {
            0 => body.len() as u32,
            1 => rng.next() as u32,
            _ => body.len() as u32 + rng.below(8) as u32,
        };
        let mut frame = vec![rng.below(3) as u8];
        frame.extend_from_slice(&declared.to_be_bytes());
        frame.append(&mut body);
        let request = tonic::codegen::http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{method}", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame))))
            .unwrap();
        let response = channel.ready().await.unwrap().call(request).await.unwrap();
        let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap_or("?").to_owned());
        // Without a status in the headers the call went through to the handler.
        let status = status.unwrap_or_else(|| "handled".into());
        assert!(status != "13" && status != "2", "{method}: {:?}", response.headers());
        *frames.entry(status).or_default() += 1;
    }
    println!("{FRAME_ROUNDS} raw frames: {frames:?}");

    // Alive, and what was saved before still hits and loads byte for byte.
    assert!(server.alive(), "the server died");
    c.health(pb::HealthRequest {}).await.unwrap();
    let instances = c.list_instances(pb::ListInstancesRequest {}).await.unwrap().into_inner().instances;
    assert!(instances.iter().any(|i| i.instance_id == "known"), "the fuzz run removed the instance: {instances:?}");
    let hit = c
        .query(pb::QueryRequest { instance_id: "known".into(), block_hashes: saved, lease_ttl_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.hit_blocks, 16);
    let dst: Vec<u64> = (40..56).collect();
    c.load(pb::LoadRequest {
        instance_id: "known".into(),
        session_id: session.clone(),
        tp_rank: 0,
        lease_id: hit.lease_id,
        block_ids: dst.clone(),
        layers: vec![],
        load_state_token: state_token,
        lease_offset: 0,
        more_ranges: false,
    })
    .await
    .unwrap();
    assert_eq!(settle(&state).await, LoadStatus::Done);
    let loaded: Vec<Vec<u8>> =
        (0..LAYERS).flat_map(|l| dst.iter().map(move |&b| (l, b))).map(|(l, b)| kv.segment(l, 0, b)).collect();
    assert!(loaded == expected, "saved blocks came back different");
    assert!(started.elapsed() < Duration::from_secs(120), "took {:?}", started.elapsed());
}
