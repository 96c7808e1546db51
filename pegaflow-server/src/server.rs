//! Starts the engine, the gRPC listeners (TCP and the Unix socket), HTTP and the lease
//! sweeper; stops them all on SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pegaflow_common::spin::KeepWarm;
use pegaflow_core::cache::PolicyKind;
use pegaflow_core::{Engine, EngineConfig};
use pegaflow_proto::engine_server::EngineServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::{AuthToken, check_exposure, check_grpc};
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::listen::{HttpListener, ListenMetrics, Listening, Timeouts, bind_unix, remove_socket};
use crate::service::EngineService;
use crate::session::Sessions;

const LEASE_SWEEP: Duration = Duration::from_millis(500);
/// Descriptors kept for everything but client connections (pool, CUDA, logs, files).
const RESERVED_FDS: u64 = 256;
/// Concurrent calls (streams) one HTTP/2 connection may carry.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Runs the server until SIGINT or SIGTERM. Blocks the calling thread.
pub fn run_server(config: ServerConfig) -> Result<(), ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pegaflow-rt")
        .build()
        .map_err(|source| ServerError::Io { what: "cannot start the async runtime".into(), source })?;
    runtime.block_on(serve(config))
}

async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    let started = Instant::now();
    let metrics_addr = config.metrics_socket().map_err(ServerError::Config)?;
    check_exposure(&config, metrics_addr)?;
    let token = config.auth_token_file.as_deref().map(AuthToken::from_file).transpose()?;
    let tls = load_tls(&config)?;
    let listen_metrics = Arc::new(ListenMetrics::default());
    let timeouts = Timeouts {
        handshake: Duration::from_secs(config.handshake_timeout_s.max(1)),
        idle: (config.idle_timeout_s > 0).then(|| Duration::from_secs(config.idle_timeout_s)),
    };
    let max_connections = fit_connections(config.max_connections, &listen_metrics);
    let pool_size = config.effective_pool_size();
    let engine = Arc::new(Engine::new(EngineConfig {
        pool_size,
        use_hugepages: config.use_hugepages,
        hint_value_size: config.hint_value_size,
        policy: if config.disable_lfu_admission { PolicyKind::Lru } else { PolicyKind::TinyLfu },
        copy_threads: None,
        cuda_devices: config.devices.clone(),
        spin: config.spin_window(),
        limits: config.engine_limits(),
        load_trace: config.load_trace(),
        ssd: config.ssd(),
    })?);
    let mut registry = Registry::default();
    engine.metrics().register(&mut registry);
    listen_metrics.register(&mut registry);
    let rpc_metrics = crate::rpc_metrics::RpcMetrics::default();
    rpc_metrics.register(&mut registry);
    let registry = Arc::new(registry);

    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc_listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServerError::Io { what: format!("cannot listen on {}", config.addr), source })?;
    let uds_path = config.uds_path();
    let uds_listener = match &uds_path {
        Some(path) => Some(bind_unix(path).map_err(|source| ServerError::Io {
            what: format!("cannot listen on the Unix socket {}", path.display()),
            source,
        })?),
        None => None,
    };
    let http_task = match metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Io { what: format!("cannot listen on {addr} (metrics)"), source })?;
            let router = crate::http::router(Arc::clone(&registry), token.clone(), Arc::clone(&listen_metrics));
            let metrics = Arc::clone(&listen_metrics);
            let mut stop = stop_rx.clone();
            info!(%addr, "HTTP /health and /metrics");
            Some(tokio::spawn(async move {
                axum::serve(HttpListener::new(listener, timeouts, metrics), router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        None => None,
    };
    let sweeper = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LEASE_SWEEP);
            loop {
                tick.tick().await;
                engine.expire_leases();
            }
        })
    };

    let signals = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        })
    };
    let server_id = *uuid::Uuid::new_v4().as_bytes();
    let service = EngineService::new(
        Arc::clone(&engine),
        Arc::new(Sessions::new(stop_rx.clone())),
        KeepWarm::new(config.spin_window()),
        uds_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        server_id,
        token.is_some(),
    );
    let service = {
        let metrics = Arc::clone(&listen_metrics);
        EngineServer::with_interceptor(service, move |request| check_grpc(&token, &metrics, request))
    };
    let listening = Listening::new(
        server_id,
        max_connections,
        timeouts,
        Arc::clone(&listen_metrics),
        Arc::clone(&engine),
        stop_rx.clone(),
    );
    let keepalive = (config.keepalive_interval_s > 0).then(|| Duration::from_secs(config.keepalive_interval_s));
    let builder = || {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(Duration::from_secs(config.keepalive_timeout_s.max(1))))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .layer(rpc_metrics.clone())
            .layer(tower::util::MapResponseLayer::new(crate::error::client_faults_are_invalid))
    };
    // Listeners are bound: pool population, CUDA start-up and pinning may now compete for
    // the machine without delaying the first answer.
    engine.prepare_pool_in_background();
    info!(
        addr = %config.addr,
        uds = ?uds_path,
        pool_bytes = pool_size,
        hugepages = config.use_hugepages,
        admission = if config.disable_lfu_admission { "lru" } else { "tinylfu" },
        tls = tls.is_some(),
        max_connections,
        startup_ms = started.elapsed().as_millis() as u64,
        "pegaflow-server serving"
    );
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let mut tcp_builder = builder();
    if let Some(tls) = tls {
        tcp_builder = tcp_builder.tls_config(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    // Either listener ending (an error, or the stop signal) stops the other too.
    let tcp_service = service.clone();
    let tcp = async {
        let served = tcp_builder
            .add_service(tcp_service)
            .serve_with_incoming_shutdown(listening.tcp(grpc_listener), stopped(stop_rx.clone()))
            .await;
        let _ = stop_tx.send(true);
        served
    };
    let unix = async {
        let served = match uds_listener {
            Some(listener) => {
                builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(listening.unix(listener), stopped(stop_rx.clone()))
                    .await
            }
            None => {
                stopped(stop_rx.clone()).await;
                Ok(())
            }
        };
        let _ = stop_tx.send(true);
        served
    };
    let result = match tokio::join!(tcp, unix) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        _ => Ok(()),
    };
    info!("shutting down");
    if let Some(path) = &uds_path {
        remove_socket(path);
    }
    let _ = stop_tx.send(true);
    signals.abort();
    sweeper.abort();
    if let Some(task) = http_task {
        match task.await {
            Ok(Err(e)) => warn!(error = %e, "HTTP server failed"),
            Err(e) => warn!(error = %e, "HTTP task failed"),
            Ok(Ok(())) => {}
        }
    }
    result?;
    Ok(())
}

/// Reads the TLS certificate and key, when given.
fn load_tls(config: &ServerConfig) -> Result<Option<ServerTlsConfig>, ServerError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else { return Ok(None) };
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|source| ServerError::Io { what: format!("cannot read {}", path.display()), source })
    };
    Ok(Some(ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?))))
}

/// Raises the open-file limit to its hard maximum (every connection is a descriptor) and
/// lowers `wanted` connections to what fits in it with room to spare.
fn fit_connections(wanted: usize, metrics: &ListenMetrics) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!(error = %e, "cannot read the open-file limit");
            return wanted;
        }
    };
    metrics.open_files_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS).max(limit / 2)).unwrap_or(usize::MAX);
    if wanted > room {
        warn!(wanted, room, open_files_limit = limit, "--max-connections lowered to fit the open-file limit");
        return room.max(1);
    }
    wanted
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = terminate => info!("SIGTERM received"),
    }
}
