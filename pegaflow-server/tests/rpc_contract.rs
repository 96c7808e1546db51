//! The error contract of `engine.proto`, RPC by RPC, against a real server: every bad
//! request gets its documented code, and the descriptor protocol refuses what it must.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test crate

mod common;

use std::io::{Read, Write};

use common::{ClientKv, RawCodec, Server, code, hashes, load_state, open_session, settle};
use pegaflow_common::load_state::LoadStatus;
use pegaflow_proto as pb;
use pegaflow_proto::descriptor::{HELLO, MemoryKind, REQUEST_BYTES, RESPONSE_HEADER_BYTES, Request};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_its_documented_codes() {
    let server = Server::start(&["--max-leases-per-instance", "1", "--max-hashes-per-request", "64"]).await;
    let mut c = server.client().await;
    let mut d = server.descriptors();
    let kv = ClientKv::new(1);
    let token = kv.hand_over(&mut d);

    // OpenSession: an id is required and bounded.
    let empty = c.open_session(pb::OpenSessionRequest { instance_id: String::new() }).await;
    assert_eq!(code(&empty), Code::InvalidArgument);
    let huge = c.open_session(pb::OpenSessionRequest { instance_id: "x".repeat(300) }).await;
    assert_eq!(code(&huge), Code::InvalidArgument);
    let (session, _alive) = open_session(&mut c, "a").await;
    let (other_session, _other) = open_session(&mut c, "b").await;

    // RegisterKvLayers: a session of this instance is required; memory by known token.
    let register = |token: &[u8], session: &str| kv.request(token, "a", session, 0, 1);
    assert_eq!(code(&c.register_kv_layers(register(&token, "")).await), Code::InvalidArgument);
    assert_eq!(code(&c.register_kv_layers(register(&token, "nope")).await), Code::NotFound);
    assert_eq!(code(&c.register_kv_layers(register(&token, &other_session)).await), Code::PermissionDenied);
    assert_eq!(code(&c.register_kv_layers(register(&[7; 16], &session)).await), Code::NotFound);
    assert_eq!(code(&c.register_kv_layers(register(&[7; 3], &session)).await), Code::InvalidArgument);
    let mut wrong_count = register(&token, &session);
    wrong_count.num_layers = 3;
    assert_eq!(code(&c.register_kv_layers(wrong_count).await), Code::InvalidArgument);
    // A session opened over TCP cannot be used from the Unix socket (another identity).
    let mut unix = server.unix_client().await;
    assert_eq!(code(&unix.register_kv_layers(register(&token, &session)).await), Code::PermissionDenied);
    c.register_kv_layers(register(&token, &session)).await.unwrap();
    assert_eq!(code(&c.register_kv_layers(register(&token, &session)).await), Code::AlreadyExists);

    // Save.
    let h = hashes(1, 4);
    let save_as = |session: &str, instance: &str, hashes: Vec<Vec<u8>>| pb::SaveRequest {
        instance_id: instance.into(),
        session_id: session.into(),
        tp_rank: 0,
        layers: vec![],
        block_ids: (0..hashes.len() as u64).collect(),
        block_hashes: hashes,
        parent_hashes: Vec::new(),
    };
    let save = |instance: &str, hashes: Vec<Vec<u8>>| save_as(&session, instance, hashes);
    assert_eq!(code(&c.save(save("nope", h.clone())).await), Code::NotFound);
    // Only the session that registered the rank copies from its memory.
    assert_eq!(code(&c.save(save_as(&other_session, "a", h.clone())).await), Code::PermissionDenied);
    assert_eq!(code(&c.save(save_as("", "a", h.clone())).await), Code::PermissionDenied);
    assert_eq!(code(&c.save(save("a", vec![vec![1; 31]])).await), Code::InvalidArgument);
    let too_many: Vec<Vec<u8>> = hashes(2, 65);
    assert_eq!(code(&c.save(save("a", too_many.clone())).await), Code::InvalidArgument);
    let long = "é".repeat(20_000);
    let err = c.save(save(&long, h.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().len() < 1000, "{} bytes", err.message().len());
    // Chain parents: one per block (empty bytes for a root) or none at all.
    let with_parents = |parents: Vec<Vec<u8>>| pb::SaveRequest { parent_hashes: parents, ..save("a", h.clone()) };
    assert_eq!(code(&c.save(with_parents(vec![vec![]])).await), Code::InvalidArgument, "one parent for four blocks");
    let mut bad = vec![vec![]; 4];
    bad[2] = vec![7; 5];
    assert_eq!(code(&c.save(with_parents(bad)).await), Code::InvalidArgument, "a 5-byte parent");
    let chain: Vec<Vec<u8>> = std::iter::once(vec![]).chain(h[..3].iter().cloned()).collect();
    let saved = c.save(with_parents(chain)).await.unwrap().into_inner();
    assert_eq!((saved.saved_blocks, saved.rejected_blocks), (4, 0));

    // Query, with its caps.
    let query = |instance: &str, hashes: Vec<Vec<u8>>| pb::QueryRequest {
        instance_id: instance.into(),
        block_hashes: hashes,
        lease_ttl_ms: 0,
    };
    assert_eq!(code(&c.query(query("nope", h.clone())).await), Code::NotFound);
    assert_eq!(code(&c.query(query("a", too_many)).await), Code::InvalidArgument);
    let hit = c.query(query("a", h.clone())).await.unwrap().into_inner();
    assert_eq!(hit.hit_blocks, 4);
    assert_eq!(code(&c.query(query("a", h.clone())).await), Code::ResourceExhausted, "one lease per instance");
    assert_eq!(c.query(query("a", hashes(9, 2))).await.unwrap().into_inner().hit_blocks, 0, "a miss pins nothing");

    // Load.
    let (state, state_token) = load_state(&mut d);
    let load_as = |session: &str, lease: &str, token: &[u8], ids: Vec<u64>| pb::LoadRequest {
        instance_id: "a".into(),
        session_id: session.into(),
        tp_rank: 0,
        lease_id: lease.into(),
        block_ids: ids,
        layers: vec![],
        load_state_token: token.to_vec(),
        ..Default::default()
    };
    let load = |lease: &str, token: &[u8], ids: Vec<u64>| load_as(&session, lease, token, ids);
    assert_eq!(code(&c.load(load("nope", &state_token, vec![9])).await), Code::NotFound);
    // Only the session that registered the rank copies into its memory.
    let foreign = load_as(&other_session, &hit.lease_id, &state_token, vec![9]);
    assert_eq!(code(&c.load(foreign).await), Code::PermissionDenied);
    assert_eq!(code(&c.load(load(&hit.lease_id, &[1; 5], vec![9])).await), Code::InvalidArgument);
    assert_eq!(code(&c.load(load(&hit.lease_id, &[1; 16], vec![9])).await), Code::NotFound);
    assert_eq!(
        code(&c.load(load(&hit.lease_id, &token, vec![9])).await),
        Code::InvalidArgument,
        "KV memory is no load state"
    );
    assert_eq!(code(&c.load(load(&hit.lease_id, &state_token, vec![64])).await), Code::InvalidArgument);
    c.load(load(&hit.lease_id, &state_token, vec![9, 10, 11, 12])).await.unwrap();
    assert_eq!(settle(&state).await, LoadStatus::Done);
    assert_eq!(kv.segment(2, 1, 3), kv.segment(2, 1, 12));

    // ReleaseLease.
    let release = c.release_lease(pb::ReleaseLeaseRequest { lease_id: "nope".into() }).await;
    assert_eq!(code(&release), Code::NotFound);

    // Health and ListInstances always answer.
    let health = c.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(health.uds_path, server.uds.display().to_string());
    assert_eq!(c.list_instances(pb::ListInstancesRequest {}).await.unwrap().into_inner().instances.len(), 1);

    // UnregisterInstance: only a session holding a rank of it.
    let unregister = |instance: &str, session: &str| pb::UnregisterInstanceRequest {
        instance_id: instance.into(),
        session_id: session.into(),
    };
    assert_eq!(code(&c.unregister_instance(unregister("nope", &session)).await), Code::NotFound);
    assert_eq!(code(&c.unregister_instance(unregister("a", "")).await), Code::PermissionDenied);
    assert_eq!(code(&c.unregister_instance(unregister("a", &other_session)).await), Code::PermissionDenied);
    c.unregister_instance(unregister("a", &session)).await.unwrap();
    assert_eq!(code(&c.save(save("a", h)).await), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_invalid_argument_on_every_rpc() {
    let server = Server::start(&[]).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    for method in common::METHODS {
        for body in [vec![0xff, 0xff, 0xff], vec![0x0a, 0x80], vec![0x12, 0x05, 0x01]] {
            grpc.ready().await.unwrap();
            let path = PathAndQuery::from_static(method);
            let status = if method.ends_with("OpenSession") {
                grpc.server_streaming(tonic::Request::new(body.clone()), path, RawCodec).await.map(|_| ())
            } else {
                grpc.unary(tonic::Request::new(body.clone()), path, RawCodec).await.map(|_| ())
            };
            assert_eq!(code(&status), Code::InvalidArgument, "{method} {body:?}: {status:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_tcp_calls_but_not_the_unix_socket() {
    let dir = std::env::temp_dir().join(format!("pegaflow-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "0123456789abcdef0123456789abcdef\n").unwrap();
    let server = Server::start(&["--auth-token-file", file.to_str().unwrap()]).await;
    let mut tcp = server.client().await;
    assert_eq!(code(&tcp.health(pb::HealthRequest {}).await), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::HealthRequest {});
    wrong.metadata_mut().insert("authorization", "Bearer 0123456789abcdef0123456789abcdeX".parse().unwrap());
    assert_eq!(code(&tcp.health(wrong).await), Code::Unauthenticated);
    let mut right = tonic::Request::new(pb::HealthRequest {});
    right.metadata_mut().insert("authorization", "Bearer 0123456789abcdef0123456789abcdef".parse().unwrap());
    tcp.health(right).await.unwrap();
    server.unix_client().await.health(pb::HealthRequest {}).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends raw descriptor-protocol bytes (no descriptor) and reads the answer's code.
fn raw_answer(stream: &mut std::os::unix::net::UnixStream, request: &[u8; REQUEST_BYTES]) -> u32 {
    stream.write_all(request).unwrap();
    let mut header = [0u8; RESPONSE_HEADER_BYTES];
    stream.read_exact(&mut header).unwrap();
    let len = u32::from_le_bytes(header[20..24].try_into().unwrap()) as usize;
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).unwrap();
    u32::from_le_bytes(header[0..4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_protocol_refuses_bad_memory_and_forgets_tokens_with_their_connection() {
    let server = Server::start(&[]).await;
    // Garbage and a register without a descriptor: INVALID_ARGUMENT, connection stays usable.
    let mut raw = std::os::unix::net::UnixStream::connect(&server.uds).unwrap();
    raw.write_all(&HELLO).unwrap();
    let mut server_id = [0u8; 16];
    raw.read_exact(&mut server_id).unwrap();
    let health = server.client().await.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(health.server_id, server_id, "the hello is answered with the server's id");
    let mut garbage = [0u8; REQUEST_BYTES];
    garbage[0] = 9;
    assert_eq!(raw_answer(&mut raw, &garbage), Code::InvalidArgument as u32);
    let no_fd = Request::Register { kind: MemoryKind::KvMemory, min_len: 0 }.encode();
    assert_eq!(raw_answer(&mut raw, &no_fd), Code::InvalidArgument as u32);

    // Unsealed memory is refused.
    let mut d = server.descriptors();
    let unsealed = nix::sys::memfd::memfd_create("unsealed", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&unsealed, 1 << 20).unwrap();
    let err = d.register(std::os::fd::AsFd::as_fd(&unsealed), MemoryKind::KvMemory, 0).unwrap_err();
    assert!(err.to_string().contains("not sealed"), "{err}");
    // Memory smaller than asked, and a load state without its magic.
    let kv = ClientKv::new(2);
    let err = d.register(kv.map.fd().unwrap(), MemoryKind::KvMemory, 1 << 40).unwrap_err();
    assert!(err.to_string().contains("need at least"), "{err}");
    let err = d.register(kv.map.fd().unwrap(), MemoryKind::LoadState, 0).unwrap_err();
    assert!(err.to_string().contains("not a PegaFlow load state"), "{err}");

    // A token dies with the connection that brought it.
    let mut c = server.client().await;
    let (session, _alive) = open_session(&mut c, "t").await;
    let token = kv.hand_over(&mut d);
    drop(d);
    // The server forgets it once it sees the connection close (give a loaded machine
    // time). The probe cannot register anything: its layout is invalid, so a known token
    // answers INVALID_ARGUMENT and a forgotten one NOT_FOUND.
    let mut probe = kv.request(&token, "t", &session, 0, 1);
    for layer in &mut probe.layers {
        layer.layout.as_mut().unwrap().element_size = 0;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match code(&c.register_kv_layers(probe.clone()).await) {
            Code::NotFound => break,
            Code::InvalidArgument if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => panic!("the token is still known 10 s after its connection closed: {other:?}"),
        }
    }
    let mut d = server.descriptors();
    let token = kv.hand_over(&mut d);
    c.register_kv_layers(kv.request(&token, "t", &session, 0, 1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_registered_over_the_unix_socket_records_its_owner() {
    let server = Server::start(&[]).await;
    let mut unix = server.unix_client().await;
    let mut d = server.descriptors();
    let kv = ClientKv::new(4);
    let token = kv.hand_over(&mut d);
    let (session, _alive) = open_session(&mut unix, "mine").await;
    unix.register_kv_layers(kv.request(&token, "mine", &session, 0, 2)).await.unwrap();
    let info = unix.list_instances(pb::ListInstancesRequest {}).await.unwrap().into_inner().instances;
    assert_eq!(info[0].owner_uid, Some(nix::unistd::getuid().as_raw()));
    assert_eq!(info[0].owner_pid, Some(std::process::id() as i32));
    // Over TCP nobody is known: the same session id is refused there (another identity),
    // and a TCP session cannot add a rank to the uid-owned instance.
    let mut tcp = server.client().await;
    let (tcp_session, _tcp_alive) = open_session(&mut tcp, "mine").await;
    let other = ClientKv::new(5);
    let other_token = other.hand_over(&mut d);
    let added = tcp.register_kv_layers(other.request(&other_token, "mine", &tcp_session, 1, 2)).await;
    assert_eq!(code(&added), Code::PermissionDenied);
    let removed = tcp
        .unregister_instance(pb::UnregisterInstanceRequest { instance_id: "mine".into(), session_id: session.clone() })
        .await;
    assert_eq!(code(&removed), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_request_frames_are_invalid_argument() {
    use tower::{Service, ServiceExt};
    let server = Server::start(&[]).await;
    let mut channel = server.channel().await;
    // A message flagged compressed without an encoding; one that ends inside its body;
    // a flag that is neither 0 nor 1.
    for frame in [vec![1u8, 0, 0, 0, 0], vec![0u8, 0, 0, 0, 9, 1, 2], vec![7u8, 0, 0, 0, 0]] {
        let request = tonic::codegen::http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/pegaflow.v1.Engine/Health", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame.clone()))))
            .unwrap();
        let response = channel.ready().await.unwrap().call(request).await.unwrap();
        let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(status.as_deref(), Some("3"), "{frame:?}: {:?}", response.headers());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_admin_drops_the_cache_and_leased_blocks_stay() {
    let server = Server::start(&[]).await;
    let mut unix = server.unix_client().await;
    let mut d = server.descriptors();
    let kv = ClientKv::new(6);
    let token = kv.hand_over(&mut d);
    let (session, _alive) = open_session(&mut unix, "drop").await;
    unix.register_kv_layers(kv.request(&token, "drop", &session, 0, 1)).await.unwrap();
    let h = hashes(6, 4);
    let save = pb::SaveRequest {
        instance_id: "drop".into(),
        session_id: session.clone(),
        tp_rank: 0,
        layers: vec![],
        block_ids: (0..4).collect(),
        block_hashes: h.clone(),
        parent_hashes: Vec::new(),
    };
    unix.save(save).await.unwrap();
    let query =
        |hashes: Vec<Vec<u8>>| pb::QueryRequest { instance_id: "drop".into(), block_hashes: hashes, lease_ttl_ms: 0 };
    let leased = unix.query(query(h[..1].to_vec())).await.unwrap().into_inner();
    assert_eq!(leased.hit_blocks, 1);
    // Over TCP without a token nobody is trusted with it.
    let mut tcp = server.client().await;
    assert_eq!(code(&tcp.drop_cache(pb::DropCacheRequest {}).await), Code::PermissionDenied);
    // This test runs as the server's own user: allowed on the Unix socket.
    let dropped = unix.drop_cache(pb::DropCacheRequest {}).await.unwrap().into_inner();
    assert_eq!((dropped.dropped_blocks, dropped.kept_blocks), (3, 1));
    assert_eq!(unix.query(query(h[1..].to_vec())).await.unwrap().into_inner().hit_blocks, 0);
    let release = pb::ReleaseLeaseRequest { lease_id: leased.lease_id };
    unix.release_lease(release).await.unwrap();
    assert_eq!(unix.query(query(h[..1].to_vec())).await.unwrap().into_inner().hit_blocks, 1, "the leased block stayed");
}
