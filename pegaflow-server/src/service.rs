//! The tonic `Engine` service: converts messages, calls the engine, maps errors.

use std::sync::Arc;
use std::time::Duration;

use pegaflow_core::device::RegionSource;
use pegaflow_core::layout::TensorSpec;
use pegaflow_core::spin::KeepWarm;
use pegaflow_core::{Engine, LayerRegistration, RegisterRequest};
use pegaflow_proto as pb;
use pegaflow_proto::engine_server::Engine as EngineApi;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::error::to_status;
use crate::session::{SessionStream, Sessions};

/// The gRPC face of one engine.
pub struct EngineService {
    engine: Arc<Engine>,
    sessions: Arc<Sessions>,
    warm: KeepWarm,
}

impl EngineService {
    /// A service over `engine`; closed sessions unregister through `sessions`; `warm`
    /// keeps a thread polling after each hot-path request.
    pub fn new(engine: Arc<Engine>, sessions: Arc<Sessions>, warm: KeepWarm) -> Self {
        Self { engine, sessions, warm }
    }

    fn touch(&self) {
        self.warm.touch(&tokio::runtime::Handle::current());
    }
}

fn layer_from_proto(layer: pb::LayerRegistration) -> Result<LayerRegistration, Status> {
    let source = match layer.region {
        Some(pb::layer_registration::Region::HostShm(shm)) => RegionSource::HostShm { name: shm.name },
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
        let req = request.into_inner();
        let layers = req.layers.into_iter().map(layer_from_proto).collect::<Result<Vec<_>, _>>()?;
        let register = RegisterRequest {
            instance_id: req.instance_id,
            namespace: req.namespace,
            tp_rank: req.tp_rank,
            tp_size: req.tp_size,
            num_layers: req.num_layers,
            layers,
            session_id: (!req.session_id.is_empty()).then_some(req.session_id),
        };
        let (instance, rank) = (register.instance_id.clone(), register.tp_rank);
        let block_bytes = self.engine.register(register).map_err(to_status)?;
        info!(instance = %instance, rank, block_bytes, "registered KV layers");
        Ok(Response::new(pb::RegisterKvLayersResponse { block_bytes }))
    }

    async fn unregister_instance(
        &self,
        request: Request<pb::UnregisterInstanceRequest>,
    ) -> Result<Response<pb::UnregisterInstanceResponse>, Status> {
        let id = request.into_inner().instance_id;
        self.engine.unregister(&id).map_err(to_status)?;
        info!(instance = %id, "unregistered");
        Ok(Response::new(pb::UnregisterInstanceResponse {}))
    }

    async fn save(&self, request: Request<pb::SaveRequest>) -> Result<Response<pb::SaveResponse>, Status> {
        self.touch();
        let req = request.into_inner();
        let outcome =
            self.engine.save(&req.instance_id, req.tp_rank, &req.layers, &req.block_ids, &req.block_hashes).await;
        self.touch(); // a long copy outlasts the window: the reply opens a new one
        let outcome = outcome.map_err(to_status)?;
        Ok(Response::new(pb::SaveResponse {
            saved_blocks: outcome.saved_blocks,
            sealed_blocks: outcome.sealed_blocks,
            skipped_blocks: outcome.skipped_blocks,
            evicted_blocks: outcome.evicted_blocks,
        }))
    }

    async fn query(&self, request: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResponse>, Status> {
        self.touch();
        let req = request.into_inner();
        let ttl = (req.lease_ttl_ms > 0).then(|| Duration::from_millis(req.lease_ttl_ms));
        let (hit_blocks, lease) = self.engine.query(&req.instance_id, &req.block_hashes, ttl).map_err(to_status)?;
        let lease_ttl_ms =
            if lease.is_some() { ttl.unwrap_or(pegaflow_core::cache::DEFAULT_LEASE_TTL).as_millis() as u64 } else { 0 };
        Ok(Response::new(pb::QueryResponse { hit_blocks, lease_id: lease.unwrap_or_default(), lease_ttl_ms }))
    }

    async fn load(&self, request: Request<pb::LoadRequest>) -> Result<Response<pb::LoadResponse>, Status> {
        self.touch();
        let req = request.into_inner();
        let blocks = self
            .engine
            .load(&req.instance_id, req.tp_rank, &req.lease_id, &req.block_ids, &req.layers, &req.load_state_name)
            .map_err(to_status)?;
        Ok(Response::new(pb::LoadResponse { blocks }))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        self.engine.release_lease(&request.into_inner().lease_id).map_err(to_status)?;
        Ok(Response::new(pb::ReleaseLeaseResponse {}))
    }

    async fn health(&self, _request: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        self.touch();
        let stats = self.engine.stats();
        Ok(Response::new(pb::HealthResponse {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pool_capacity_bytes: stats.capacity_bytes,
            cache_bytes: stats.used_bytes,
        }))
    }

    async fn list_instances(
        &self,
        _request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
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
            })
            .collect();
        Ok(Response::new(pb::ListInstancesResponse { instances }))
    }

    type OpenSessionStream = SessionStream;

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<Self::OpenSessionStream>, Status> {
        let id = request.into_inner().instance_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("instance_id must not be empty"));
        }
        Ok(Response::new(self.sessions.open(id, Arc::clone(&self.engine))))
    }
}
