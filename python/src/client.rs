//! `EngineClient`: blocking gRPC calls to a pegaflow-server, each with a deadline and the
//! GIL released while it waits. Host memory (KV tensors, load states) is handed to the
//! server by descriptor over its Unix socket (see `descriptors`), never by name.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pegaflow_common::spin;
use pegaflow_proto as pb;
use pegaflow_proto::descriptor::MemoryKind;
use pegaflow_proto::engine_client::EngineClient as GrpcClient;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic::{Response, Status};

use crate::descriptors::{Descriptors, HandOverError, Token};
use crate::errors::{ErrorClass, hand_over_error, pegaflow_error, status_to_pyerr};
use crate::load_state::PyLoadState;
use crate::transport::{Auth, Grpc, auth_header, channel, unix_channel};
use crate::types::{KvLayer, QueryResult, SaveResult};
use crate::waiting::{caller_spin, client_warm_window, lock};

/// An open session: the stream task, the server's session id, and whether it still runs.
struct Session {
    task: JoinHandle<()>,
    id: String,
    alive: Arc<AtomicBool>,
}

/// Client of one pegaflow-server.
#[pyclass(module = "pegaflow._native", name = "EngineClient", frozen)]
pub struct PyEngineClient {
    runtime: Runtime,
    /// Keeps the runtime's I/O thread polling between the calls of a burst.
    warm: spin::KeepWarm,
    /// The route of every call: the endpoint's channel, or the server's Unix socket once
    /// found (see [`PyEngineClient::settle_route`]).
    client: RwLock<Grpc>,
    /// The endpoint's own channel: what the route is checked against.
    endpoint_client: Grpc,
    auth: Auth,
    /// Whether the route is final (a Health answer said where the server's socket is).
    route_settled: AtomicBool,
    settling: Mutex<()>,
    endpoint: String,
    timeout: Duration,
    /// Open sessions by instance id.
    sessions: Mutex<HashMap<String, Session>>,
    /// The descriptor connection to the server's Unix socket.
    pub(crate) descriptors: Arc<Mutex<Descriptors>>,
}

impl PyEngineClient {
    /// Runs one call with the client's deadline, GIL released.
    fn call<T, F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(Grpc) -> Fut + Send,
        Fut: Future<Output = Result<Response<T>, Status>> + Send,
    {
        if !self.route_settled.load(Ordering::Acquire) {
            self.settle_route(py);
        }
        let client = self.grpc();
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

impl PyEngineClient {
    fn grpc(&self) -> Grpc {
        self.client.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Finds out, once, where the server's Unix socket is (Health) and, when this client
    /// can reach it and the same server answers there (same server id: another host's
    /// server may use the same path here), sends every later call over it. A server that
    /// does not answer leaves the route open for the next call to settle.
    fn settle_route(&self, py: Python<'_>) {
        let _settling = lock(&self.settling);
        if self.route_settled.load(Ordering::Acquire) {
            return;
        }
        let timeout = self.timeout;
        let tcp = self.endpoint_client.clone();
        let ask = |mut client: Grpc| async move {
            match tokio::time::timeout(timeout, client.health(pb::HealthRequest {})).await {
                Ok(Ok(answer)) => Some(answer.into_inner()),
                _ => None,
            }
        };
        let Some(health) = py.detach(|| self.runtime.block_on(ask(tcp))) else { return };
        self.route_settled.store(true, Ordering::Release);
        if health.uds_path.is_empty() {
            return;
        }
        let path = PathBuf::from(&health.uds_path);
        lock(&self.descriptors).set_server(path.clone(), health.server_id.clone());
        let unix = {
            let _context = self.runtime.enter();
            GrpcClient::with_interceptor(unix_channel(&path, timeout), self.auth.clone())
        };
        let local = py.detach(|| self.runtime.block_on(ask(unix.clone())));
        if local.is_some_and(|h| h.server_id == health.server_id) {
            *self.client.write().unwrap_or_else(std::sync::PoisonError::into_inner) = unix;
        }
    }

    /// The session id and liveness flag of `instance_id`'s open session.
    fn session(&self, instance_id: &str) -> Option<(String, Arc<AtomicBool>)> {
        lock(&self.sessions)
            .get(instance_id)
            .filter(|s| s.alive.load(Ordering::Acquire))
            .map(|s| (s.id.clone(), Arc::clone(&s.alive)))
    }

    /// Makes sure the descriptor connection knows the server's Unix socket (asking Health
    /// when the endpoint is TCP).
    fn resolve_socket(&self, py: Python<'_>) -> PyResult<()> {
        if lock(&self.descriptors).path().is_some() {
            return Ok(());
        }
        if !self.route_settled.load(Ordering::Acquire) {
            self.settle_route(py);
        }
        if lock(&self.descriptors).path().is_some() {
            return Ok(());
        }
        let message = if self.route_settled.load(Ordering::Acquire) {
            "the server has no Unix socket (started with --uds ''): host memory cannot be registered"
        } else {
            "the server does not answer: cannot find its Unix socket to hand host memory over"
        };
        Err(pegaflow_error(py, ErrorClass::Unavailable, message.into()))
    }

    /// Hands the memory behind `fd` to the server; returns its token.
    fn hand_over(&self, py: Python<'_>, fd: i32, kind: MemoryKind) -> PyResult<Token> {
        // SAFETY: F_GETFD only reads the descriptor table entry.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(pegaflow_error(
                py,
                ErrorClass::InvalidArgument,
                format!("host_fd {fd} is not an open descriptor"),
            ));
        }
        // The caller keeps `fd` open across the call: it is a live KvLayer's memory.
        self.register_memory(py, fd, kind)
    }

    /// Sends `fd` on the descriptor connection; when the socket turns out to belong to
    /// another server than the one last described (the server restarted), asks Health
    /// again and retries once.
    fn register_memory(&self, py: Python<'_>, fd: i32, kind: MemoryKind) -> PyResult<Token> {
        for attempt in 0..2 {
            self.resolve_socket(py)?;
            let timeout = self.timeout;
            let descriptors = Arc::clone(&self.descriptors);
            let sent = py.detach(move || {
                // SAFETY: `fd` is an open descriptor its owner keeps open across this call
                // (checked by `hand_over`; a load state's memfd lives as long as the state).
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                lock(&descriptors).register(borrowed, kind, 0, timeout)
            });
            match sent {
                Err(HandOverError::ServerChanged) if attempt == 0 => {
                    self.route_settled.store(false, Ordering::Release);
                    self.settle_route(py);
                }
                other => return other.map_err(|e| hand_over_error(py, e)),
            }
        }
        Err(hand_over_error(py, HandOverError::ServerChanged))
    }

    /// The load state's token on this client's descriptor connection, handing it over first
    /// when needed.
    fn load_state_token(&self, py: Python<'_>, state: &PyLoadState) -> PyResult<Token> {
        if let Some(token) = state.token_on(&self.descriptors) {
            return Ok(token);
        }
        let token = self.register_memory(py, state.fd(), MemoryKind::LoadState)?;
        state.remember(token, &self.descriptors);
        Ok(token)
    }
}

#[pymethods]
impl PyEngineClient {
    /// Connects lazily to `endpoint` ("host:port", "http://host:port", "https://host:port"
    /// or "unix:/path/to.sock"); every call fails after `timeout_s` seconds. The auth
    /// token is read from `auth_token_file`, else from `PEGAFLOW_AUTH_TOKEN_FILE`.
    #[new]
    #[pyo3(signature = (endpoint = "127.0.0.1:50055", timeout_s = 5.0, auth_token_file = None))]
    fn new(py: Python<'_>, endpoint: &str, timeout_s: f64, auth_token_file: Option<&str>) -> PyResult<Self> {
        let timeout = Duration::try_from_secs_f64(timeout_s).ok().filter(|t| !t.is_zero()).ok_or_else(|| {
            pegaflow_error(py, ErrorClass::InvalidArgument, format!("timeout_s must be > 0, got {timeout_s}"))
        })?;
        let auth = Auth(auth_header(py, auth_token_file)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pegaflow-client")
            .enable_all()
            .build()
            .map_err(|e| pegaflow_error(py, ErrorClass::Internal, e.to_string()))?;
        let (channel, socket) = {
            let _guard = runtime.enter();
            channel(endpoint, timeout).map_err(|e| pegaflow_error(py, ErrorClass::InvalidArgument, e))?
        };
        let mut descriptors = Descriptors::default();
        // A `unix:` endpoint is the socket already: nothing to find out.
        let settled = socket.is_some();
        if let Some(path) = socket {
            descriptors.set_path(path);
        }
        Ok(Self {
            runtime,
            warm: spin::KeepWarm::new(client_warm_window()),
            client: RwLock::new(GrpcClient::with_interceptor(channel.clone(), auth.clone())),
            endpoint_client: GrpcClient::with_interceptor(channel, auth.clone()),
            auth,
            route_settled: AtomicBool::new(settled),
            settling: Mutex::new(()),
            endpoint: endpoint.to_owned(),
            timeout,
            sessions: Mutex::new(HashMap::new()),
            descriptors: Arc::new(Mutex::new(descriptors)),
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
        d.set_item("uds_path", r.uds_path)?;
        Ok(d)
    }

    /// Registers every KV layer of one TP rank; returns the bytes one block of the rank
    /// takes in the cache. The rank belongs to this client's session of the instance
    /// (opened here if none is open): the server drops it when the session closes. Host
    /// layers' memory is handed over by descriptor first. `replicated_kv`: every TP rank
    /// holds the same bytes (MLA), so the cache keeps one copy that any rank saves and
    /// every rank loads; all ranks of the instance must pass the same value.
    #[pyo3(signature = (instance_id, namespace, tp_rank, tp_size, layers, replicated_kv = false))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword signature
    fn register_kv_layers(
        &self,
        py: Python<'_>,
        instance_id: String,
        namespace: String,
        tp_rank: u32,
        tp_size: u32,
        layers: Vec<PyRef<'_, KvLayer>>,
        replicated_kv: bool,
    ) -> PyResult<u64> {
        if self.session(&instance_id).is_none() {
            self.open_session(py, instance_id.clone())?;
        }
        let session_id = self.session(&instance_id).map(|(id, _)| id).unwrap_or_default();
        let mut tokens: HashMap<i32, Token> = HashMap::new();
        let handed = (|| {
            for fd in layers.iter().filter_map(|l| l.host_fd) {
                if let std::collections::hash_map::Entry::Vacant(slot) = tokens.entry(fd) {
                    slot.insert(self.hand_over(py, fd, MemoryKind::KvMemory)?);
                }
            }
            Ok::<(), PyErr>(())
        })();
        let registered = handed.and_then(|()| {
            let req = pb::RegisterKvLayersRequest {
                session_id,
                instance_id,
                namespace,
                tp_rank,
                tp_size,
                num_layers: layers.len() as u32,
                layers: layers.iter().map(|l| l.to_proto(l.host_fd.and_then(|fd| tokens.get(&fd)))).collect(),
                replicated_kv,
            };
            Ok(self.call(py, |mut c| async move { c.register_kv_layers(req).await })?.block_bytes)
        });
        // The registered regions keep their own mappings: the tokens are no longer needed.
        let mut descriptors = lock(&self.descriptors);
        for token in tokens.into_values() {
            descriptors.release(token);
        }
        registered
    }

    /// Drops an instance (all ranks) and its mappings; this client's session of it must
    /// hold one of its ranks.
    fn unregister_instance(&self, py: Python<'_>, instance_id: String) -> PyResult<()> {
        let session_id = self.session(&instance_id).map(|(id, _)| id).unwrap_or_default();
        self.call(py, |mut c| async move {
            c.unregister_instance(pb::UnregisterInstanceRequest { instance_id, session_id }).await
        })?;
        Ok(())
    }

    /// Saves `block_ids` under `block_hashes` (32 bytes each), all layers or `layers`.
    /// `parent_hashes` gives the block before each in its prefix chain (b"" for a
    /// chain's first block), so eviction keeps chains whole.
    #[pyo3(signature = (instance_id, tp_rank, block_ids, block_hashes, layers = None, parent_hashes = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword signature
    fn save(
        &self,
        py: Python<'_>,
        instance_id: String,
        tp_rank: u32,
        block_ids: Vec<u64>,
        block_hashes: Vec<Vec<u8>>,
        layers: Option<Vec<u32>>,
        parent_hashes: Option<Vec<Vec<u8>>>,
    ) -> PyResult<SaveResult> {
        let session_id = self.session(&instance_id).map(|(id, _)| id).unwrap_or_default();
        let req = pb::SaveRequest {
            session_id,
            instance_id,
            tp_rank,
            layers: layers.unwrap_or_default(),
            block_ids,
            block_hashes,
            parent_hashes: parent_hashes.unwrap_or_default(),
        };
        let r = self.call(py, |mut c| async move { c.save(req).await })?;
        Ok(SaveResult {
            saved_blocks: r.saved_blocks,
            sealed_blocks: r.sealed_blocks,
            skipped_blocks: r.skipped_blocks,
            evicted_blocks: r.evicted_blocks,
            rejected_blocks: r.rejected_blocks,
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
        // Static names: a query of thousands of blocks builds no string per block. A tier
        // this client does not know (a newer server) still counts, as "unknown".
        let tiers = r.hit_tiers.iter().map(|&t| pb::Tier::try_from(t).map_or("unknown", tier_name)).collect();
        Ok(QueryResult {
            hit_blocks: r.hit_blocks,
            lease_id: (!r.lease_id.is_empty()).then_some(r.lease_id),
            lease_ttl_ms: r.lease_ttl_ms,
            tiers,
            loading: r.loading,
        })
    }

    /// Starts loading len(block_ids) leased blocks, from leased block `lease_offset` on,
    /// into `block_ids`; `more_ranges` when this rank loads further ranges of the lease
    /// afterwards. Wait on `load_state` for completion. Returns the number of blocks queued.
    #[pyo3(signature = (
        instance_id, tp_rank, lease_id, block_ids, load_state, layers = None, lease_offset = 0,
        more_ranges = false
    ))]
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
        lease_offset: u32,
        more_ranges: bool,
    ) -> PyResult<u32> {
        let token = self.load_state_token(py, &load_state)?;
        let session = self.session(&instance_id);
        // A wait on this state fails at once if the session (the server) goes away.
        load_state.watch(session.as_ref().map(|(_, alive)| Arc::clone(alive)));
        let req = pb::LoadRequest {
            session_id: session.map(|(id, _)| id).unwrap_or_default(),
            instance_id,
            tp_rank,
            lease_id,
            block_ids,
            layers: layers.unwrap_or_default(),
            load_state_token: token.bytes.to_vec(),
            lease_offset,
            more_ranges,
        };
        Ok(self.call(py, |mut c| async move { c.load(req).await })?.blocks)
    }

    /// Releases a lease before it expires.
    fn release_lease(&self, py: Python<'_>, lease_id: String) -> PyResult<()> {
        self.call(py, |mut c| async move { c.release_lease(pb::ReleaseLeaseRequest { lease_id }).await })?;
        Ok(())
    }

    /// Admin: drops every cached block that is neither leased nor being copied; returns
    /// {"dropped_blocks", "kept_blocks"}. Allowed on the server's Unix socket to root and
    /// the server's user, over TCP to holders of the server's token.
    fn drop_cache<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.call(py, |mut c| async move { c.drop_cache(pb::DropCacheRequest {}).await })?;
        let d = PyDict::new(py);
        d.set_item("dropped_blocks", r.dropped_blocks)?;
        d.set_item("kept_blocks", r.kept_blocks)?;
        Ok(d)
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
                d.set_item("owner_uid", i.owner_uid)?;
                d.set_item("owner_pid", i.owner_pid)?;
                d.set_item("replicated_kv", i.replicated_kv)?;
                Ok(d)
            })
            .collect()
    }

    /// Opens a liveness session for `instance_id` (keeps the open one, if alive): when it
    /// closes (close_session, close, or this process dies), the server drops the ranks
    /// this client registered under it, and the instance with its last rank.
    /// `register_kv_layers` opens one when needed.
    fn open_session(&self, py: Python<'_>, instance_id: String) -> PyResult<()> {
        if self.session(&instance_id).is_some() {
            return Ok(());
        }
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
                return Err(pegaflow_error(py, ErrorClass::Unavailable, "session closed by the server".into()));
            }
            Ok(Err(status)) => return Err(status_to_pyerr(py, &status)),
            Err(_) => return Err(pegaflow_error(py, ErrorClass::Timeout, format!("no session within {timeout:?}"))),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&alive);
        let task = self.runtime.spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
            flag.store(false, Ordering::Release);
        });
        let previous = lock(&self.sessions).insert(instance_id, Session { task, id: session_id, alive });
        if let Some(previous) = previous {
            previous.alive.store(false, Ordering::Release);
            previous.task.abort();
        }
        Ok(())
    }

    /// Whether the session of `instance_id` is still open. False when none was opened, or
    /// when its stream ended: the server stopped, restarted or dropped it, so the
    /// registrations made under it are gone and must be made again.
    fn session_alive(&self, instance_id: &str) -> bool {
        self.session(instance_id).is_some()
    }

    /// Closes the session of `instance_id`; the server then unregisters its ranks.
    fn close_session(&self, instance_id: String) {
        if let Some(session) = lock(&self.sessions).remove(&instance_id) {
            session.alive.store(false, Ordering::Release);
            session.task.abort();
        }
    }

    /// Closes every session of this client.
    fn close(&self) {
        for (_, session) in lock(&self.sessions).drain() {
            session.alive.store(false, Ordering::Release);
            session.task.abort();
        }
    }
}

impl Drop for PyEngineClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// A tier's name for Python (`ram`, `ssd`), as the protocol's enum names it without the
/// `TIER_` prefix (`unknown` for a value this client's protocol does not have).
fn tier_name(tier: pb::Tier) -> &'static str {
    match tier {
        pb::Tier::Ram => "ram",
        pb::Tier::Ssd => "ssd",
        pb::Tier::Unspecified => "unspecified",
    }
}
