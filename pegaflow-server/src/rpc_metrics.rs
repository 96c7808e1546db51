//! RPC count and duration by method and status code: a tower layer around the gRPC
//! routes, observing `pegaflow_rpc_duration_seconds{method, code}` (its `_count` is the
//! RPC count). Durations run until the response headers (a streaming call: until the
//! stream opens). Method names come from a fixed list, so a client sending odd paths
//! cannot grow the label set.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The Engine service's methods (anything else counts as `unknown`).
const METHODS: [&str; 10] = [
    "RegisterKvLayers",
    "UnregisterInstance",
    "Save",
    "Query",
    "Load",
    "ReleaseLease",
    "Health",
    "ListInstances",
    "DropCache",
    "OpenSession",
];

/// Labels of one RPC.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method (`Save`, `Query`, ...).
    pub method: &'static str,
    /// The gRPC status code name (`OK`, `InvalidArgument`, ...).
    pub code: &'static str,
}

fn duration_histogram() -> Histogram {
    // 20 µs .. ~20 s, by 2x.
    Histogram::new(exponential_buckets(2e-5, 2.0, 21))
}

/// The RPC histogram, shared by the layer on every listener.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self { duration: Family::new_with_constructor(duration_histogram) }
    }
}

impl RpcMetrics {
    /// Adds `pegaflow_rpc_duration_seconds` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("pegaflow").register(
            "rpc_duration_seconds",
            "gRPC calls by method and status code, seconds until the response headers",
            self.duration.clone(),
        );
    }

    fn observe(&self, method: &'static str, code: &'static str, started: Instant) {
        self.duration.get_or_create(&RpcLabels { method, code }).observe(started.elapsed().as_secs_f64());
    }
}

impl<S> tower::Layer<S> for RpcMetrics {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner, metrics: self.clone() }
    }
}

/// The service the layer wraps around the routes.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_of(request.uri().path());
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(r) => code_of(r.headers()),
                Err(_) => "Unavailable",
            };
            metrics.observe(method, code, started);
            response
        })
    }
}

/// `/pegaflow.v1.Engine/Save` → `Save`.
fn method_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    METHODS.iter().find(|m| **m == name).copied().unwrap_or("unknown")
}

/// The status a response carries in its headers (errors, which tonic sends without a
/// body); a response without one is a success whose status follows in the trailers.
fn code_of(headers: &http::HeaderMap) -> &'static str {
    let Some(status) = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok())
    else {
        return "OK";
    };
    match tonic::Code::from_i32(status) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_codes_map_to_a_fixed_label_set() {
        assert_eq!(method_of("/pegaflow.v1.Engine/Save"), "Save");
        assert_eq!(method_of("/pegaflow.v1.Engine/OpenSession"), "OpenSession");
        assert_eq!(method_of("/x/../../etc/passwd"), "unknown");
        assert_eq!(method_of(""), "unknown");
        let mut headers = http::HeaderMap::new();
        assert_eq!(code_of(&headers), "OK");
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(code_of(&headers), "InvalidArgument");
        headers.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(code_of(&headers), "Unknown");
        headers.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(code_of(&headers), "OK");
    }
}
