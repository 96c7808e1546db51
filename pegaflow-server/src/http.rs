//! HTTP endpoints: `GET /health` and `GET /metrics` (Prometheus text format).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::auth::{AuthToken, check_http};
use crate::listen::ListenMetrics;

/// Routes for `/health` and `/metrics` over `registry`; with a `token`, every path but
/// `/health` requires it.
pub fn router(registry: Arc<Registry>, token: Option<AuthToken>, metrics: Arc<ListenMetrics>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(registry)
        .layer(axum::middleware::from_fn_with_state((token, metrics), check_http))
}

async fn health() -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}")
}

async fn metrics_text(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}
