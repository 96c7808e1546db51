//! Who may call: the shared auth token (TCP gRPC and HTTP), and the rule that a listener
//! beyond loopback needs a token, TLS or an explicit `--insecure`.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::transport::server::TlsConnectInfo;
use tracing::warn;

use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::listen::{ListenMetrics, PeerInfo, Transport};

/// Header carrying the token: `authorization: Bearer <token>`.
pub const AUTH_HEADER: &str = "authorization";

/// The shared secret clients present.
#[derive(Clone)]
pub struct AuthToken(Arc<[u8]>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(…)")
    }
}

impl AuthToken {
    /// Reads the token from `path` (surrounding whitespace ignored; must not be empty).
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::Io {
            what: format!("cannot read --auth-token-file {}", path.display()),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(ServerError::Config(format!(
                "--auth-token-file {}: the token must be one word, not empty",
                path.display()
            )));
        }
        if token.len() < 16 {
            warn!("the auth token has fewer than 16 characters: easy to guess");
        }
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o044 != 0 {
                warn!(file = %path.display(), "the auth token file is readable by other users");
            }
        }
        Ok(Self(Arc::from(format!("Bearer {token}").into_bytes())))
    }

    /// Whether `header` is `Bearer <the token>`, compared in constant time.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        header.is_some_and(|h| bool::from(h.ct_eq(&self.0)))
    }
}

/// The peer of a gRPC request (also behind TLS).
pub fn peer_of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
    let ext = request.extensions();
    ext.get::<PeerInfo>().or_else(|| ext.get::<TlsConnectInfo<PeerInfo>>().map(|tls| tls.get_ref()))
}

/// The gRPC interceptor: over TCP, a configured token must come with every call. The Unix
/// socket is guarded by its file mode instead.
pub fn check_grpc(
    token: &Option<AuthToken>,
    metrics: &ListenMetrics,
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, Status> {
    let Some(token) = token else { return Ok(request) };
    if peer_of(&request).is_some_and(|p| p.transport == Transport::Unix) {
        return Ok(request);
    }
    if token.accepts(request.metadata().get(AUTH_HEADER).map(|v| v.as_bytes())) {
        return Ok(request);
    }
    metrics.unauthenticated.inc();
    Err(Status::unauthenticated(
        "missing or wrong auth token: send `authorization: Bearer <token>` (PEGAFLOW_AUTH_TOKEN_FILE)",
    ))
}

/// HTTP middleware: with a token configured, every path but `/health` needs it.
pub async fn check_http(
    State((token, metrics)): State<(Option<AuthToken>, Arc<ListenMetrics>)>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &token
        && request.uri().path() != "/health"
        && !token.accepts(request.headers().get(AUTH_HEADER).map(|v| v.as_bytes()))
    {
        metrics.unauthenticated.inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong auth token\n").into_response();
    }
    next.run(request).await
}

/// Refuses to expose the server beyond loopback without credentials or `--insecure`, and
/// warns whenever it is exposed.
pub fn check_exposure(config: &ServerConfig, metrics_addr: Option<std::net::SocketAddr>) -> Result<(), ServerError> {
    let grpc_exposed = !config.addr.ip().is_loopback();
    let http_exposed = metrics_addr.is_some_and(|a| !a.ip().is_loopback());
    if !grpc_exposed && !http_exposed {
        return Ok(());
    }
    let token = config.auth_token_file.is_some();
    let tls = config.tls_cert.is_some();
    let missing = match (grpc_exposed, http_exposed) {
        _ if config.insecure => None,
        (true, _) if !token && !tls => Some(format!("gRPC on {}", config.addr)),
        (_, true) if !token => Some(format!(
            "HTTP on {} (TLS does not cover it)",
            metrics_addr.map_or_else(String::new, |a| a.to_string())
        )),
        _ => None,
    };
    if let Some(what) = missing {
        return Err(ServerError::Config(format!(
            "{what} would be reachable from other hosts without credentials: give --auth-token-file \
             (or --tls-cert/--tls-key for gRPC), bind a loopback address, or pass --insecure"
        )));
    }
    if grpc_exposed && tls && !token && !config.insecure {
        warn!(
            "TLS proves the server to its clients, not the clients to the server: anyone who reaches the port may call; add --auth-token-file to admit only token holders"
        );
    }
    warn!(
        grpc = %config.addr,
        http = ?metrics_addr,
        token,
        tls,
        insecure = config.insecure,
        "listening beyond loopback: other hosts can reach this server"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn tokens_compare_whole_and_exact() {
        let dir = std::env::temp_dir().join(format!("pegaflow-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret-s3cret-s3cret\n").unwrap();
        let token = AuthToken::from_file(&path).unwrap();
        assert!(token.accepts(Some(b"Bearer s3cret-s3cret-s3cret")));
        assert!(!token.accepts(Some(b"Bearer s3cret-s3cret-s3cre")));
        assert!(!token.accepts(Some(b"s3cret-s3cret-s3cret")));
        assert!(!token.accepts(None));
        std::fs::write(&path, "  \n").unwrap();
        assert!(AuthToken::from_file(&path).is_err());
        assert!(AuthToken::from_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exposure_needs_credentials_or_insecure() {
        let parse = |args: &[&str]| ServerConfig::try_parse_from([&["pegaflow-server"], args].concat()).unwrap();
        let http = |c: &ServerConfig| c.metrics_socket().unwrap();
        let c = parse(&[]);
        assert!(check_exposure(&c, http(&c)).is_ok());
        let c = parse(&["--addr", "0.0.0.0:1"]);
        assert!(matches!(check_exposure(&c, http(&c)), Err(ServerError::Config(_))));
        let c = parse(&["--addr", "0.0.0.0:1", "--auth-token-file", "/t"]);
        assert!(check_exposure(&c, http(&c)).is_ok());
        let c = parse(&["--addr", "0.0.0.0:1", "--tls-cert", "c", "--tls-key", "k"]);
        assert!(check_exposure(&c, http(&c)).is_ok(), "TLS covers gRPC");
        let c = parse(&["--metrics-addr", "0.0.0.0:2", "--tls-cert", "c", "--tls-key", "k"]);
        assert!(check_exposure(&c, http(&c)).is_err(), "TLS does not cover HTTP");
        let c = parse(&["--addr", "0.0.0.0:1", "--metrics-addr", "0.0.0.0:2", "--insecure"]);
        assert!(check_exposure(&c, http(&c)).is_ok());
    }
}
