//! Reaching the server: the gRPC channel for an endpoint, the auth header, and the move
//! to the server's Unix socket when the client runs on the server's host (there the server
//! knows the caller's uid, which makes the instances it registers its own, and hands over
//! memory on the same socket).

use std::path::{Path, PathBuf};
use std::time::Duration;

use pegaflow_proto::engine_client::EngineClient as GrpcClient;
use pyo3::prelude::*;
use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::errors::{ErrorClass, pegaflow_error};

/// The typed gRPC client every call goes through.
pub(crate) type Grpc = GrpcClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub(crate) struct Auth(pub(crate) Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Reads the auth token: `auth_token_file`, else `PEGAFLOW_AUTH_TOKEN_FILE`, else none.
pub(crate) fn auth_header(py: Python<'_>, auth_token_file: Option<&str>) -> PyResult<Option<AsciiMetadataValue>> {
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
pub(crate) fn channel(endpoint: &str, timeout: Duration) -> Result<(Channel, Option<PathBuf>), String> {
    if let Some(path) = endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
        return Ok((unix_channel(&path, timeout), Some(path)));
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

/// A channel over the Unix socket at `path` (connected on first use).
pub(crate) fn unix_channel(path: &Path, timeout: Duration) -> Channel {
    let target = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move { tokio::net::UnixStream::connect(target).await.map(hyper_util::rt::TokioIo::new) }
        }))
}
