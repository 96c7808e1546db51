//! The tonic `Engine` service: converts messages, calls the engine, maps errors.

use std::sync::Arc;
use std::time::Duration;

use pegaflow_common::spin::KeepWarm;
use pegaflow_core::cache::{QueryOutcome, Tier, parse_hashes, parse_parents};
use pegaflow_core::device::RegionSource;
use pegaflow_core::layout::TensorSpec;
use pegaflow_core::{
    Caller, Engine, LayerRegistration, LeaseRef, MemoryToken, RankRef, RegisterRequest, SaveBlocks, shown,
};
use pegaflow_proto as pb;
use pegaflow_proto::engine_server::Engine as EngineApi;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::peer_of;
use crate::error::{failed, to_status};
use crate::listen::Busy;
use crate::session::{SessionStream, Sessions};

/// The gRPC face of one engine.
pub struct EngineService {
    engine: Arc<Engine>,
    sessions: Arc<Sessions>,
    warm: KeepWarm,
    uds_path: String,
    server_id: [u8; 16],
    /// TCP callers passed the token check (the server requires one): they may use admin calls.
    tcp_is_trusted: bool,
}

impl EngineService {
    /// A service over `engine`; closed sessions unregister through `sessions`; `warm`
    /// keeps a thread polling after each hot-path request; `uds_path` and `server_id` are
    /// reported by Health so TCP clients find (and recognise) the Unix socket.
    pub fn new(
        engine: Arc<Engine>,
        sessions: Arc<Sessions>,
        warm: KeepWarm,
        uds_path: String,
        server_id: [u8; 16],
        tcp_is_trusted: bool,
    ) -> Self {
        Self { engine, sessions, warm, uds_path, server_id, tcp_is_trusted }
    }

    /// Whether the caller may use admin calls: root or the server's own user over the
    /// Unix socket, or a token holder over TCP.
    fn is_admin<T>(&self, request: &Request<T>) -> bool {
        match peer_of(request) {
            Some(peer) if peer.transport == crate::listen::Transport::Unix => {
                peer.uid.is_some_and(|uid| uid == 0 || uid == nix::unistd::geteuid().as_raw())
            }
            _ => self.tcp_is_trusted,
        }
    }

    fn touch(&self) {
        self.warm.touch(&tokio::runtime::Handle::current());
    }
}

/// Marks a call in flight on its connection (the idle timeout waits for it).
fn busy<T>(request: &Request<T>) -> Option<Busy> {
    peer_of(request).map(|p| p.activity.busy())
}

/// The caller's Unix user, when it came over the Unix socket.
fn caller_uid<T>(request: &Request<T>) -> Option<u32> {
    peer_of(request).and_then(|p| p.uid)
}

fn token(bytes: &[u8]) -> Result<MemoryToken, Status> {
    MemoryToken::from_bytes(bytes).map_err(to_status)
}

fn layer_from_proto(
    engine: &Engine,
    layer: pb::LayerRegistration,
    caller_uid: Option<u32>,
) -> Result<LayerRegistration, Status> {
    let source = match layer.region {
        Some(pb::layer_registration::Region::HostMemory(memory)) => {
            engine.host_memory(&token(&memory.token)?, caller_uid).map_err(to_status)?
        }
        Some(pb::layer_registration::Region::CudaIpc(ipc)) => RegionSource::CudaIpc {
            handle: ipc.handle.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "layer {}: CUDA IPC handle has {} bytes, expected 64 (expandable segments are not supported)",
                    layer.layer,
                    ipc.handle.len()
                ))
            })?,
            device_uuid: ipc.device_uuid.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "layer {}: device UUID has {} bytes, expected 16",
                    layer.layer,
                    ipc.device_uuid.len()
                ))
            })?,
            offset: ipc.offset,
            size: ipc.size,
        },
        None => return Err(Status::invalid_argument(format!("layer {} has no memory region", layer.layer))),
    };
    let layout =
        layer.layout.ok_or_else(|| Status::invalid_argument(format!("layer {} has no tensor layout", layer.layer)))?;
    let dim = |value: u32| usize::try_from(value).map_err(|_| Status::invalid_argument("dimension index too large"));
    Ok(LayerRegistration {
        layer: layer.layer,
        source,
        tensor: TensorSpec {
            shape: layout.shape,
            stride: layout.stride,
            element_size: layout.element_size,
            block_dim: dim(layout.block_dim)?,
            kv_dim: layout.kv_dim.map(dim).transpose()?,
            byte_offset: layout.byte_offset,
        },
    })
}

#[tonic::async_trait]
impl EngineApi for EngineService {
    async fn register_kv_layers(
        &self,
        request: Request<pb::RegisterKvLayersRequest>,
    ) -> Result<Response<pb::RegisterKvLayersResponse>, Status> {
        let _busy = busy(&request);
        let uid = caller_uid(&request);
        let pid = peer_of(&request).and_then(|p| p.pid);
        let req = request.into_inner();
        self.sessions.check(&req.session_id, &req.instance_id, uid)?;
        if req.layers.len() != req.num_layers as usize {
            return Err(Status::invalid_argument(format!(
                "{} layers given for num_layers {}",
                req.layers.len(),
                req.num_layers
            )));
        }
        let layers =
            req.layers.into_iter().map(|l| layer_from_proto(&self.engine, l, uid)).collect::<Result<Vec<_>, _>>()?;
        let register = RegisterRequest {
            instance_id: req.instance_id,
            namespace: req.namespace,
            tp_rank: req.tp_rank,
            tp_size: req.tp_size,
            num_layers: req.num_layers,
            layers,
            session_id: req.session_id,
            owner_uid: uid,
            owner_pid: pid,
            replicated_kv: req.replicated_kv,
        };
        let (instance, rank, session) = (register.instance_id.clone(), register.tp_rank, register.session_id.clone());
        let block_bytes = self.engine.register(register).map_err(|e| failed("register", &instance, None, e))?;
        // The session may have closed since it was checked, its guard dropping its ranks
        // before this one was in: drop it now rather than leave it without an owner.
        if self.sessions.check(&session, &instance, uid).is_err() {
            self.engine.unregister_session(&instance, &session);
            return Err(Status::not_found(format!("session {} closed during the registration", shown(&session))));
        }
        info!(instance = %shown(&instance), rank, block_bytes, uid, "registered KV layers");
        Ok(Response::new(pb::RegisterKvLayersResponse { block_bytes }))
    }

    async fn unregister_instance(
        &self,
        request: Request<pb::UnregisterInstanceRequest>,
    ) -> Result<Response<pb::UnregisterInstanceResponse>, Status> {
        let _busy = busy(&request);
        let uid = caller_uid(&request);
        let req = request.into_inner();
        self.engine
            .unregister(&req.instance_id, &req.session_id, uid)
            .map_err(|e| failed("unregister", &req.instance_id, None, e))?;
        info!(instance = %shown(&req.instance_id), "unregistered");
        Ok(Response::new(pb::UnregisterInstanceResponse {}))
    }

    async fn save(&self, request: Request<pb::SaveRequest>) -> Result<Response<pb::SaveResponse>, Status> {
        let _busy = busy(&request);
        self.touch();
        let uid = caller_uid(&request);
        let req = request.into_inner();
        let caller = Caller { session_id: &req.session_id, uid };
        let target = RankRef { instance_id: &req.instance_id, tp_rank: req.tp_rank, caller };
        let hashes = parse_hashes(&req.block_hashes).map_err(to_status)?;
        let parents = parse_parents(&req.parent_hashes).map_err(to_status)?;
        let blocks = SaveBlocks { hashes: &hashes, parents: &parents };
        let outcome = self.engine.save(target, blocks, &req.block_ids, &req.layers).await;
        self.touch(); // a long copy outlasts the window: the reply opens a new one
        let outcome = outcome.map_err(|e| failed("save", &req.instance_id, None, e))?;
        Ok(Response::new(pb::SaveResponse {
            saved_blocks: outcome.saved_blocks,
            sealed_blocks: outcome.sealed_blocks,
            skipped_blocks: outcome.skipped_blocks,
            evicted_blocks: outcome.evicted_blocks,
            rejected_blocks: outcome.rejected_blocks,
        }))
    }

    async fn query(&self, request: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResponse>, Status> {
        let _busy = busy(&request);
        self.touch();
        let req = request.into_inner();
        let ttl = (req.lease_ttl_ms > 0).then(|| Duration::from_millis(req.lease_ttl_ms));
        let hashes = parse_hashes(&req.block_hashes).map_err(to_status)?;
        let outcome = self
            .engine
            .query(&req.instance_id, &hashes, ttl)
            .map_err(|e| failed("query", &req.instance_id, None, e))?;
        let lease_ttl = ttl.unwrap_or(pegaflow_core::cache::DEFAULT_LEASE_TTL).as_millis() as u64;
        let response = match outcome {
            QueryOutcome::Hit { lease_id, tiers } => pb::QueryResponse {
                hit_blocks: tiers.len() as u32,
                lease_id,
                lease_ttl_ms: lease_ttl,
                loading: false,
                hit_tiers: tiers.into_iter().map(|t| wire_tier(t) as i32).collect(),
            },
            QueryOutcome::Loading => pb::QueryResponse { loading: true, ..Default::default() },
            QueryOutcome::Miss => pb::QueryResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn load(&self, request: Request<pb::LoadRequest>) -> Result<Response<pb::LoadResponse>, Status> {
        let _busy = busy(&request);
        self.touch();
        let uid = caller_uid(&request);
        let req = request.into_inner();
        let state = token(&req.load_state_token)?;
        let caller = Caller { session_id: &req.session_id, uid };
        let target = RankRef { instance_id: &req.instance_id, tp_rank: req.tp_rank, caller };
        let lease = LeaseRef { id: &req.lease_id, offset: req.lease_offset, more: req.more_ranges };
        let blocks = self
            .engine
            .load(target, lease, &req.block_ids, &req.layers, &state)
            .map_err(|e| failed("load", &req.instance_id, Some(&req.lease_id), e))?;
        Ok(Response::new(pb::LoadResponse { blocks }))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let _busy = busy(&request);
        let lease_id = request.into_inner().lease_id;
        self.engine.release_lease(&lease_id).map_err(|e| failed("release", "", Some(&lease_id), e))?;
        Ok(Response::new(pb::ReleaseLeaseResponse {}))
    }

    async fn health(&self, request: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let _busy = busy(&request);
        self.touch();
        let stats = self.engine.stats();
        Ok(Response::new(pb::HealthResponse {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pool_capacity_bytes: stats.capacity_bytes,
            cache_bytes: stats.used_bytes,
            uds_path: self.uds_path.clone(),
            server_id: self.server_id.to_vec(),
        }))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let _busy = busy(&request);
        let instances = self
            .engine
            .instances()
            .into_iter()
            .map(|i| pb::InstanceInfo {
                instance_id: i.instance_id,
                namespace: i.namespace,
                tp_size: i.tp_size,
                num_layers: i.num_layers,
                registered_ranks: i.registered_ranks,
                open_regions: i.open_regions,
                owner_uid: i.owner_uid,
                owner_pid: i.owner_pid,
                replicated_kv: i.replicated_kv,
            })
            .collect();
        Ok(Response::new(pb::ListInstancesResponse { instances }))
    }

    async fn drop_cache(
        &self,
        request: Request<pb::DropCacheRequest>,
    ) -> Result<Response<pb::DropCacheResponse>, Status> {
        let _busy = busy(&request);
        if !self.is_admin(&request) {
            return Err(Status::permission_denied(
                "dropping the cache is for root or the server's user on the Unix socket, or token holders over TCP",
            ));
        }
        let (dropped_blocks, kept_blocks) = self.engine.drop_cache();
        info!(dropped_blocks, kept_blocks, uid = caller_uid(&request), "cache dropped");
        Ok(Response::new(pb::DropCacheResponse { dropped_blocks, kept_blocks }))
    }

    type OpenSessionStream = SessionStream;

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<Self::OpenSessionStream>, Status> {
        let peer = peer_of(&request).cloned();
        let id = request.into_inner().instance_id;
        if id.is_empty() || id.len() > pegaflow_core::MAX_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "instance_id must be 1..={} bytes",
                pegaflow_core::MAX_ID_LEN
            )));
        }
        Ok(Response::new(self.sessions.open(id, peer.as_ref(), Arc::clone(&self.engine))))
    }
}

fn wire_tier(tier: Tier) -> pb::Tier {
    match tier {
        Tier::Ram => pb::Tier::Ram,
        Tier::Ssd => pb::Tier::Ssd,
    }
}
