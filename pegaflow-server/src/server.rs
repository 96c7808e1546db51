//! Starts the engine, the gRPC and HTTP listeners and the lease sweeper; stops them all
//! on SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pegaflow_core::spin::KeepWarm;
use pegaflow_core::{Engine, EngineConfig};
use pegaflow_proto::engine_server::EngineServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::service::EngineService;
use crate::session::Sessions;

const LEASE_SWEEP: Duration = Duration::from_millis(500);

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
    let pool_size = config.effective_pool_size();
    let engine = Arc::new(Engine::new(EngineConfig {
        pool_size,
        use_hugepages: config.use_hugepages,
        hint_value_size: config.hint_value_size,
        copy_threads: None,
        cuda_devices: config.devices.clone(),
        spin: config.spin_window(),
    })?);
    let mut registry = Registry::default();
    engine.metrics().register(&mut registry);
    let registry = Arc::new(registry);

    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc_listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServerError::Io { what: format!("cannot listen on {}", config.addr), source })?;
    let http_task = match metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Io { what: format!("cannot listen on {addr} (metrics)"), source })?;
            let router = crate::http::router(Arc::clone(&registry));
            let mut stop = stop_rx.clone();
            info!(%addr, "HTTP /health and /metrics");
            Some(tokio::spawn(async move {
                axum::serve(listener, router)
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
    let service = EngineService::new(
        Arc::clone(&engine),
        Arc::new(Sessions::new(stop_rx.clone())),
        KeepWarm::new(config.spin_window()),
    );
    // Listeners are bound: pool population, CUDA start-up and pinning may now compete for
    // the machine without delaying the first answer.
    engine.prepare_pool_in_background();
    info!(
        addr = %config.addr,
        pool_bytes = pool_size,
        hugepages = config.use_hugepages,
        startup_ms = started.elapsed().as_millis() as u64,
        "pegaflow-server serving"
    );
    let mut stop = stop_rx.clone();
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(EngineServer::new(service))
        // No Nagle: a small reply held for a delayed ACK costs ~40 ms when calls overlap.
        .serve_with_incoming_shutdown(TcpIncoming::from(grpc_listener).with_nodelay(Some(true)), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    info!("shutting down");
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
