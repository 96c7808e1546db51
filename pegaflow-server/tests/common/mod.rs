//! What the server's integration tests share: a real `pegaflow-server` process, typed and
//! raw gRPC clients, host memory handed over on the Unix socket, a seeded RNG.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test helpers: panics are failures

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use pegaflow_common::load_state::LoadState;
use pegaflow_common::shm::SharedMemory;
use pegaflow_proto as pb;
use pegaflow_proto::descriptor::{DescriptorClient, MemoryKind};
use pegaflow_proto::engine_client::EngineClient;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Every RPC of `pegaflow.v1.Engine`.
pub const METHODS: [&str; 10] = [
    "/pegaflow.v1.Engine/RegisterKvLayers",
    "/pegaflow.v1.Engine/UnregisterInstance",
    "/pegaflow.v1.Engine/Save",
    "/pegaflow.v1.Engine/Query",
    "/pegaflow.v1.Engine/Load",
    "/pegaflow.v1.Engine/ReleaseLease",
    "/pegaflow.v1.Engine/Health",
    "/pegaflow.v1.Engine/ListInstances",
    "/pegaflow.v1.Engine/DropCache",
    "/pegaflow.v1.Engine/OpenSession",
];

/// Layers of the test KV memory.
pub const LAYERS: u32 = 4;
/// Blocks of the test KV memory.
pub const BLOCKS: u64 = 64;
/// Bytes of one K or V segment (16 tokens x 16 elements x 2 bytes).
pub const SEG: u64 = 512;

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `host:port` of gRPC over TCP.
    pub addr: String,
    /// The Unix socket.
    pub uds: PathBuf,
    dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    /// Starts `pegaflow-server` with a 64 MiB pool, no HTTP, and `extra` flags; waits
    /// until it answers.
    pub async fn start(extra: &[&str]) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pegaflow-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("engine.sock");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_pegaflow-server"))
            .args(["--addr", &addr, "--pool-size", "64mb", "--metrics-addr", "", "--log-level", "warn"])
            .arg("--uds")
            .arg(&uds)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self { child, addr, uds, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = server.try_client().await {
                // A server requiring a token answers too: it is up.
                match c.health(pb::HealthRequest {}).await {
                    Ok(_) => return server,
                    Err(status) if status.code() == Code::Unauthenticated => return server,
                    Err(_) => {}
                }
            }
            assert!(Instant::now() < deadline, "server not up within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_client(&self) -> Result<EngineClient<Channel>, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))?.connect().await?;
        Ok(EngineClient::new(channel))
    }

    /// A TCP channel.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// A typed client over TCP.
    pub async fn client(&self) -> EngineClient<Channel> {
        EngineClient::new(self.channel().await)
    }

    /// A typed client over the Unix socket (calls carry this process's uid).
    pub async fn unix_client(&self) -> EngineClient<Channel> {
        let path = self.uds.clone();
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
            }))
            .await
            .unwrap();
        EngineClient::new(channel)
    }

    /// A descriptor-protocol connection.
    pub fn descriptors(&self) -> DescriptorClient {
        DescriptorClient::connect(&self.uds, Duration::from_secs(5)).unwrap()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Client KV memory: LAYERS tensors (2, BLOCKS, 16, 16) of 2-byte elements in one memfd,
/// filled with a pattern derived from `seed`.
pub struct ClientKv {
    /// The memory.
    pub map: SharedMemory,
}

impl ClientKv {
    /// New memory with a pattern.
    pub fn new(seed: u8) -> Self {
        let map = SharedMemory::create("pegaflow-it", Self::layer_bytes() * u64::from(LAYERS)).unwrap();
        let kv = Self { map };
        for (i, b) in kv.bytes().iter_mut().enumerate() {
            *b = ((i as u64 * 31 + u64::from(seed) * 7) % 251) as u8 ^ seed;
        }
        kv
    }

    /// Bytes of one layer.
    pub fn layer_bytes() -> u64 {
        2 * BLOCKS * SEG
    }

    /// All bytes.
    #[allow(clippy::mut_from_ref)] // shared memory: the test coordinates access itself
    pub fn bytes(&self) -> &mut [u8] {
        // SAFETY: the test owns the mapping and reads or writes only while no copy runs.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr_at(0, 1).unwrap().as_ptr(), self.map.len() as usize) }
    }

    /// Bytes of (layer, K/V, block).
    pub fn segment(&self, layer: u32, kv: u64, block: u64) -> Vec<u8> {
        let start = (u64::from(layer) * Self::layer_bytes() + kv * BLOCKS * SEG + block * SEG) as usize;
        self.bytes()[start..start + SEG as usize].to_vec()
    }

    /// Hands the memory over; returns its token.
    pub fn hand_over(&self, descriptors: &mut DescriptorClient) -> Vec<u8> {
        descriptors.register(self.map.fd().unwrap(), MemoryKind::KvMemory, 0).unwrap().to_vec()
    }

    /// The registration of every layer, in memory `token`.
    pub fn request(
        &self,
        token: &[u8],
        instance: &str,
        session: &str,
        rank: u32,
        tp: u32,
    ) -> pb::RegisterKvLayersRequest {
        Self::request_for(token, instance, session, rank, tp)
    }

    /// The registration of a memory like this one, named by `token`.
    pub fn request_for(token: &[u8], instance: &str, session: &str, rank: u32, tp: u32) -> pb::RegisterKvLayersRequest {
        pb::RegisterKvLayersRequest {
            instance_id: instance.into(),
            namespace: "ns".into(),
            tp_rank: rank,
            tp_size: tp,
            num_layers: LAYERS,
            session_id: session.into(),
            replicated_kv: false,
            layers: (0..LAYERS)
                .map(|layer| pb::LayerRegistration {
                    layer,
                    region: Some(pb::layer_registration::Region::HostMemory(pb::HostMemoryRegion {
                        token: token.to_vec(),
                    })),
                    layout: Some(pb::TensorLayout {
                        shape: vec![2, BLOCKS, 16, 16],
                        stride: vec![(BLOCKS * 256) as i64, 256, 16, 1],
                        element_size: 2,
                        block_dim: 1,
                        kv_dim: Some(0),
                        byte_offset: u64::from(layer) * Self::layer_bytes(),
                    }),
                })
                .collect(),
        }
    }
}

/// A load state handed over on `descriptors`; returns it and its token.
pub fn load_state(descriptors: &mut DescriptorClient) -> (LoadState, Vec<u8>) {
    let state = LoadState::create().unwrap();
    let token = descriptors.register(state.memory().fd().unwrap(), MemoryKind::LoadState, 0).unwrap();
    (state, token.to_vec())
}

/// Opens a session; returns its id and the stream that keeps it open.
pub async fn open_session(
    client: &mut EngineClient<Channel>,
    instance: &str,
) -> (String, tonic::Streaming<pb::SessionEvent>) {
    let mut stream =
        client.open_session(pb::OpenSessionRequest { instance_id: instance.into() }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    (first.session_id, stream)
}

/// `n` distinct 32-byte hashes tagged `tag`.
pub fn hashes(tag: u8, n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| [[tag; 8], i.to_le_bytes(), [0; 8], [0; 8]].concat()).collect()
}

/// Waits for a load state to settle (at most 10 s).
pub async fn settle(state: &LoadState) -> pegaflow_common::load_state::LoadStatus {
    let t0 = Instant::now();
    loop {
        let s = state.status();
        if s != pegaflow_common::load_state::LoadStatus::Pending || t0.elapsed() > Duration::from_secs(10) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The code of a call's outcome.
pub fn code<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// A seeded xorshift64* generator: the fuzz run is repeatable.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Fewer than `max` random bytes.
    pub fn bytes_upto(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max) as usize;
        self.bytes(len)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A codec that sends and receives message bodies as raw bytes, to send what no typed
/// client would.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

/// Raw encoder.
#[derive(Debug)]
pub struct RawEncoder;
/// Raw decoder.
#[derive(Debug)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}
