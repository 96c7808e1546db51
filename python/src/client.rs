//! `EngineClient`: blocking gRPC calls to a pegaflow-server, each with a deadline and the
//! GIL released while it waits. Host memory (KV tensors, load states) is handed to the
//! server by descriptor over its Unix socket (see `descriptors`), never by name.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pegaflow_core::spin;
use pegaflow_proto as pb;
use pegaflow_proto::descriptor::MemoryKind;
use pegaflow_proto::engine_client::EngineClient as GrpcClient;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::{Response, Status};

use crate::descriptors::{Descriptors, Token};
use crate::errors::{ErrorClass, hand_over_error, pegaflow_error, status_to_pyerr};
use crate::load_state::PyLoadState;
use crate::types::{KvLayer, QueryResult, SaveResult};

type Grpc = GrpcClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

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
    client: Grpc,
    endpoint: String,
    timeout: Duration,
    /// Open sessions by instance id.
    sessions: Mutex<HashMap<String, Session>>,
    /// The descriptor connection to the server's Unix socket.
    pub(crate) descriptors: Arc<Mutex<Descriptors>>,
}

/// Locks `mutex`, also after a panic elsewhere (the data stays consistent: every critical
/// section here is a single map or connection update).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PyEngineClient {
    /// Runs one call with the client's deadline, GIL released.
    fn call<T, F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(Grpc) -> Fut + Send,
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

impl PyEngineClient {
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
        let health = self.call(py, |mut c| async move { c.health(pb::HealthRequest {}).await })?;
        if health.uds_path.is_empty() {
            return Err(pegaflow_error(
                py,
                ErrorClass::Unavailable,
                "the server has no Unix socket (started with --uds ''): host memory cannot be registered".into(),
            ));
        }
        lock(&self.descriptors).set_path(PathBuf::from(health.uds_path));
        Ok(())
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
        self.resolve_socket(py)?;
        let timeout = self.timeout;
        let descriptors = Arc::clone(&self.descriptors);
        py.detach(move || {
            // SAFETY: `fd` was checked open above and is only read by sendmsg during this
            // call; the caller keeps it open (it belongs to a live KvLayer's memory).
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            lock(&descriptors).register(borrowed, kind, 0, timeout)
        })
        .map_err(|e| hand_over_error(py, e))
    }

    /// The load state's token on this client's descriptor connection, handing it over first
    /// when needed.
    fn load_state_token(&self, py: Python<'_>, state: &PyLoadState) -> PyResult<Token> {
        if let Some(token) = state.token_on(&self.descriptors) {
            return Ok(token);
        }
        self.resolve_socket(py)?;
        let timeout = self.timeout;
        let descriptors = Arc::clone(&self.descriptors);
        let fd = state.fd();
        let token = py
            .detach(move || {
                // SAFETY: the load state's memfd lives as long as `state`, which the caller
                // holds across this call.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                lock(&descriptors).register(borrowed, MemoryKind::LoadState, 0, timeout)
            })
            .map_err(|e| hand_over_error(py, e))?;
        state.remember(token, &self.descriptors);
        Ok(token)
    }
}

/// Reads the auth token: `auth_token_file`, else `PEGAFLOW_AUTH_TOKEN_FILE`, else none.
fn auth_header(py: Python<'_>, auth_token_file: Option<&str>) -> PyResult<Option<AsciiMetadataValue>> {
    let path = match auth_token_file {
        Some(path) => path.to_owned(),
        None => match std::env::var("PEGAFLOW_AUTH_TOKEN_FILE") {
            Ok(path) if !path.trim().is_empty() => path,
            _ => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        pegaflow_error(py, ErrorClass::InvalidArgument, format!("cannot read the auth token file {path:?}: {e}"))
    })?;
    MetadataValue::try_from(format!("Bearer {}", text.trim())).map(Some).map_err(|_| {
        pegaflow_error(py, ErrorClass::InvalidArgument, format!("the auth token in {path:?} is not printable ASCII"))
    })
}

/// The channel to `endpoint`: `host:port`, `http://…`, `https://…` (TLS; CA from
/// `PEGAFLOW_TLS_CA_FILE`, else the system's roots) or `unix:PATH`.
fn channel(endpoint: &str, timeout: Duration) -> Result<(Channel, Option<PathBuf>), String> {
    if let Some(path) = endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
        let target = path.clone();
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let target = target.clone();
                async move { tokio::net::UnixStream::connect(target).await.map(hyper_util::rt::TokioIo::new) }
            }));
        return Ok((channel, Some(path)));
    }
    let uri = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let mut builder = Endpoint::from_shared(uri)
        .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if endpoint.starts_with("https://") {
        let tls = match std::env::var("PEGAFLOW_TLS_CA_FILE") {
            Ok(ca) if !ca.trim().is_empty() => {
                let pem = std::fs::read(&ca).map_err(|e| format!("cannot read PEGAFLOW_TLS_CA_FILE {ca:?}: {e}"))?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            _ => ClientTlsConfig::new().with_native_roots(),
        };
        builder = builder.tls_config(tls).map_err(|e| format!("TLS setup for {endpoint:?}: {e}"))?;
    }
    Ok((builder.connect_lazy(), None))
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
        if let Some(path) = socket {
            descriptors.set_path(path);
        }
        Ok(Self {
            runtime,
            warm: spin::KeepWarm::new(client_warm_window()),
            client: GrpcClient::with_interceptor(channel, auth),
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
    /// layers' memory is handed over by descriptor first.
    fn register_kv_layers(
        &self,
        py: Python<'_>,
        instance_id: String,
        namespace: String,
        tp_rank: u32,
        tp_size: u32,
        layers: Vec<PyRef<'_, KvLayer>>,
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
        let token = self.load_state_token(py, &load_state)?;
        // A wait on this state fails at once if the session (the server) goes away.
        load_state.watch(self.session(&instance_id).map(|(_, alive)| alive));
        let req = pb::LoadRequest {
            instance_id,
            tp_rank,
            lease_id,
            block_ids,
            layers: layers.unwrap_or_default(),
            load_state_token: token.bytes.to_vec(),
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
                d.set_item("owner_uid", i.owner_uid)?;
                d.set_item("owner_pid", i.owner_pid)?;
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
