//! `EngineClient`: blocking gRPC calls to a pegaflow-server, each with a deadline and the
//! GIL released while it waits.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use pegaflow_core::spin;
use pegaflow_proto as pb;
use pegaflow_proto::engine_client::EngineClient as GrpcClient;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};

use crate::errors::{pegaflow_error, status_to_pyerr};
use crate::load_state::PyLoadState;
use crate::types::{KvLayer, QueryResult, SaveResult};

/// Client of one pegaflow-server.
#[pyclass(module = "pegaflow._native", name = "EngineClient", frozen)]
pub struct PyEngineClient {
    runtime: Runtime,
    /// Keeps the runtime's I/O thread polling between the calls of a burst.
    warm: spin::KeepWarm,
    client: GrpcClient<Channel>,
    endpoint: String,
    timeout: Duration,
    /// Open sessions by instance id: the stream task and the server's session id.
    sessions: Mutex<HashMap<String, (JoinHandle<()>, String)>>,
}

impl PyEngineClient {
    /// Runs one call with the client's deadline, GIL released.
    fn call<T, F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(GrpcClient<Channel>) -> Fut + Send,
        Fut: Future<Output = Result<Response<T>, Status>> + Send,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        let result = py.detach(|| {
            let call = async move {
                match tokio::time::timeout(timeout, f(client)).await {
                    Ok(result) => result.map(Response::into_inner),
                    Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
                }
            };
            let _context = self.runtime.enter();
            self.warm.touch(self.runtime.handle());
            let result = spin::block_on(call, caller_spin());
            self.warm.touch(self.runtime.handle());
            result
        });
        result.map_err(|status| status_to_pyerr(py, &status))
    }
}

/// `PEGAFLOW_CLIENT_SPIN_US`, read once: how long client threads spin instead of
/// sleeping (0 turns every client-side spin off).
fn spin_override() -> Option<Duration> {
    static VALUE: OnceLock<Option<Duration>> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("PEGAFLOW_CLIENT_SPIN_US").ok().and_then(|v| v.trim().parse().ok()).map(Duration::from_micros)
    })
}

/// How long a caller (a call, `LoadState.wait`) yields the CPU before it sleeps: 1 ms
/// unless `PEGAFLOW_CLIENT_SPIN_US` says otherwise.
pub(crate) fn caller_spin() -> Duration {
    spin_override().unwrap_or(spin::SPIN)
}

/// How long the runtime's I/O thread keeps polling after a call: 2 ms on machines with
/// enough CPUs (see `pegaflow_core::spin`) unless `PEGAFLOW_CLIENT_SPIN_US` says otherwise.
fn client_warm_window() -> Duration {
    spin_override().unwrap_or_else(|| spin::default_warm_window(Duration::from_millis(2)))
}

#[pymethods]
impl PyEngineClient {
    /// Connects lazily to `endpoint` ("host:port" or "http://host:port"); every call
    /// fails after `timeout_s` seconds.
    #[new]
    #[pyo3(signature = (endpoint = "127.0.0.1:50055", timeout_s = 5.0))]
    fn new(py: Python<'_>, endpoint: &str, timeout_s: f64) -> PyResult<Self> {
        let timeout = Duration::try_from_secs_f64(timeout_s).ok().filter(|t| !t.is_zero()).ok_or_else(|| {
            pegaflow_error(py, "PegaflowInvalidArgument", format!("timeout_s must be > 0, got {timeout_s}"))
        })?;
        let uri = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pegaflow-client")
            .enable_all()
            .build()
            .map_err(|e| pegaflow_error(py, "PegaflowInternalError", e.to_string()))?;
        let channel = {
            let _guard = runtime.enter();
            Endpoint::from_shared(uri)
                .map_err(|e| pegaflow_error(py, "PegaflowInvalidArgument", format!("bad endpoint {endpoint:?}: {e}")))?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                .connect_lazy()
        };
        Ok(Self {
            runtime,
            warm: spin::KeepWarm::new(client_warm_window()),
            client: GrpcClient::new(channel),
            endpoint: endpoint.to_owned(),
            timeout,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The server address.
    #[getter]
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Server status: status, version, pool_capacity_bytes, cache_bytes.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.call(py, |mut c| async move { c.health(pb::HealthRequest {}).await })?;
        let d = PyDict::new(py);
        d.set_item("status", r.status)?;
        d.set_item("version", r.version)?;
        d.set_item("pool_capacity_bytes", r.pool_capacity_bytes)?;
        d.set_item("cache_bytes", r.cache_bytes)?;
        Ok(d)
    }

    /// Registers every KV layer of one TP rank; returns the bytes one block of the rank
    /// takes in the cache.
    fn register_kv_layers(
        &self,
        py: Python<'_>,
        instance_id: String,
        namespace: String,
        tp_rank: u32,
        tp_size: u32,
        layers: Vec<PyRef<'_, KvLayer>>,
    ) -> PyResult<u64> {
        // Ranks registered after open_session belong to that session: the server drops them
        // when it closes, even if other clients keep sessions of the same instance open.
        let session_id =
            self.sessions.lock().ok().and_then(|s| s.get(&instance_id).map(|(_, id)| id.clone())).unwrap_or_default();
        let req = pb::RegisterKvLayersRequest {
            session_id,
            instance_id,
            namespace,
            tp_rank,
            tp_size,
            num_layers: layers.len() as u32,
            layers: layers.iter().map(|l| l.to_proto()).collect(),
        };
        Ok(self.call(py, |mut c| async move { c.register_kv_layers(req).await })?.block_bytes)
    }

    /// Drops an instance (all ranks) and its mappings.
    fn unregister_instance(&self, py: Python<'_>, instance_id: String) -> PyResult<()> {
        self.call(
            py,
            |mut c| async move { c.unregister_instance(pb::UnregisterInstanceRequest { instance_id }).await },
        )?;
        Ok(())
    }

    /// Saves `block_ids` under `block_hashes` (32 bytes each), all layers or `layers`.
    #[pyo3(signature = (instance_id, tp_rank, block_ids, block_hashes, layers = None))]
    fn save(
        &self,
        py: Python<'_>,
        instance_id: String,
        tp_rank: u32,
        block_ids: Vec<u64>,
        block_hashes: Vec<Vec<u8>>,
        layers: Option<Vec<u32>>,
    ) -> PyResult<SaveResult> {
        let req = pb::SaveRequest { instance_id, tp_rank, layers: layers.unwrap_or_default(), block_ids, block_hashes };
        let r = self.call(py, |mut c| async move { c.save(req).await })?;
        Ok(SaveResult {
            saved_blocks: r.saved_blocks,
            sealed_blocks: r.sealed_blocks,
            skipped_blocks: r.skipped_blocks,
            evicted_blocks: r.evicted_blocks,
        })
    }

    /// Counts the leading cached blocks and leases them (`lease_ttl_ms` 0: server default).
    #[pyo3(signature = (instance_id, block_hashes, lease_ttl_ms = 0))]
    fn query(
        &self,
        py: Python<'_>,
        instance_id: String,
        block_hashes: Vec<Vec<u8>>,
        lease_ttl_ms: u64,
    ) -> PyResult<QueryResult> {
        let req = pb::QueryRequest { instance_id, block_hashes, lease_ttl_ms };
        let r = self.call(py, |mut c| async move { c.query(req).await })?;
        Ok(QueryResult {
            hit_blocks: r.hit_blocks,
            lease_id: (!r.lease_id.is_empty()).then_some(r.lease_id),
            lease_ttl_ms: r.lease_ttl_ms,
        })
    }

    /// Starts loading the first len(block_ids) leased blocks into `block_ids`; wait on
    /// `load_state` for completion. Returns the number of blocks queued.
    #[pyo3(signature = (instance_id, tp_rank, lease_id, block_ids, load_state, layers = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword signature
    fn load(
        &self,
        py: Python<'_>,
        instance_id: String,
        tp_rank: u32,
        lease_id: String,
        block_ids: Vec<u64>,
        load_state: PyRef<'_, PyLoadState>,
        layers: Option<Vec<u32>>,
    ) -> PyResult<u32> {
        let req = pb::LoadRequest {
            instance_id,
            tp_rank,
            lease_id,
            block_ids,
            layers: layers.unwrap_or_default(),
            load_state_name: load_state.inner.name().to_owned(),
        };
        Ok(self.call(py, |mut c| async move { c.load(req).await })?.blocks)
    }

    /// Releases a lease before it expires.
    fn release_lease(&self, py: Python<'_>, lease_id: String) -> PyResult<()> {
        self.call(py, |mut c| async move { c.release_lease(pb::ReleaseLeaseRequest { lease_id }).await })?;
        Ok(())
    }

    /// Admin: registered instances as dicts.
    fn list_instances<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let r = self.call(py, |mut c| async move { c.list_instances(pb::ListInstancesRequest {}).await })?;
        r.instances
            .into_iter()
            .map(|i| {
                let d = PyDict::new(py);
                d.set_item("instance_id", i.instance_id)?;
                d.set_item("namespace", i.namespace)?;
                d.set_item("tp_size", i.tp_size)?;
                d.set_item("num_layers", i.num_layers)?;
                d.set_item("registered_ranks", i.registered_ranks)?;
                d.set_item("open_regions", i.open_regions)?;
                Ok(d)
            })
            .collect()
    }

    /// Opens a liveness session for `instance_id`: when it closes (close_session, close,
    /// or this process dies), the server drops the ranks this client registered after
    /// opening it, and the whole instance once its last session is gone. Open it before
    /// `register_kv_layers`.
    fn open_session(&self, py: Python<'_>, instance_id: String) -> PyResult<()> {
        let req = pb::OpenSessionRequest { instance_id: instance_id.clone() };
        let mut stream =
            self.call(py, |mut c| async move { c.open_session(req).await.map(|r| Response::new(r.into_inner())) })?;
        // Wait for the first heartbeat so the session is live on the server when we return.
        let timeout = self.timeout;
        let first =
            py.detach(|| self.runtime.block_on(async { tokio::time::timeout(timeout, stream.message()).await }));
        let session_id = match first {
            Ok(Ok(Some(event))) => event.session_id,
            Ok(Ok(None)) => {
                return Err(pegaflow_error(py, "PegaflowUnavailable", "session closed by the server".into()));
            }
            Ok(Err(status)) => return Err(status_to_pyerr(py, &status)),
            Err(_) => return Err(pegaflow_error(py, "PegaflowTimeout", format!("no session within {timeout:?}"))),
        };
        let task = self.runtime.spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        let previous = self.sessions.lock().ok().and_then(|mut s| s.insert(instance_id, (task, session_id)));
        if let Some((previous, _)) = previous {
            previous.abort();
        }
        Ok(())
    }

    /// Whether the session of `instance_id` is still open. False when none was opened, or
    /// when its stream ended: the server stopped, restarted or dropped it, so the
    /// registrations made under it are gone and must be made again.
    fn session_alive(&self, instance_id: &str) -> bool {
        self.sessions.lock().ok().and_then(|s| s.get(instance_id).map(|(task, _)| !task.is_finished())).unwrap_or(false)
    }

    /// Closes the session of `instance_id`; the server then unregisters it.
    fn close_session(&self, instance_id: String) {
        if let Some((task, _)) = self.sessions.lock().ok().and_then(|mut s| s.remove(&instance_id)) {
            task.abort();
        }
    }

    /// Closes every session of this client.
    fn close(&self) {
        if let Ok(mut sessions) = self.sessions.lock() {
            for (_, (task, _)) in sessions.drain() {
                task.abort();
            }
        }
    }
}

impl Drop for PyEngineClient {
    fn drop(&mut self) {
        self.close();
    }
}
