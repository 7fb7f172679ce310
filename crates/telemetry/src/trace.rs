//! Trace context across processes: W3C `traceparent` in HTTP headers and
//! gRPC metadata (both are HTTP/2 headers), a client layer that injects it
//! and times every call, and the server-side span that picks it up.
//!
//! Without [`crate::init_tracing`] having installed an exporter, spans have
//! no OpenTelemetry context: injection writes nothing and extraction yields
//! an empty parent, so all of this costs a header lookup per request.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{BoxError, Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes `span`'s trace context into outgoing headers.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// The trace context incoming `headers` carry, if any.
fn incoming(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    opentelemetry::trace::TraceContextExt::has_active_span(&context).then_some(context)
}

/// Makes the trace context in incoming `headers` (if any) `span`'s parent.
pub fn continue_from(span: &Span, headers: &HeaderMap) {
    if let Some(parent) = incoming(headers) {
        // Fails only when the span is disabled by the filter: nothing to do.
        let _ = span.set_parent(parent);
    }
}

/// The span of one incoming gRPC call to process `instance` (a node or
/// coordinator id) of `region`, continuing the caller's trace; for
/// `tonic::transport::Server::trace_fn`. A call that carries no trace
/// context (health probes, background workers) gets a debug-level span, so
/// it is neither exported nor a trace of its own at the default level.
pub fn grpc_server_span(request: &http::Request<()>, instance: &str, region: &str) -> Span {
    let method = request.uri().path().rsplit('/').next().unwrap_or_default();
    let Some(parent) = incoming(request.headers()) else {
        return tracing::debug_span!("grpc.server", rpc.method = %method, instance, region);
    };
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format!("grpc {method}"),
        otel.kind = "server",
        rpc.method = %method,
        instance,
        region,
    );
    // Fails only when the span is disabled by the filter: nothing to do.
    let _ = span.set_parent(parent);
    span
}

/// A span for one batch sent on behalf of many callers: the first caller's
/// span is its parent (a lone write stays one trace end to end), the others
/// are linked to it.
pub fn batch_span(kind: &'static str, replica: &str, callers: &[Span]) -> Span {
    let span = tracing::info_span!(
        "batch",
        otel.name = %format!("batch {kind}"),
        kind,
        replica,
        records = callers.len(),
    );
    if let Some((first, rest)) = callers.split_first() {
        let _ = span.set_parent(first.context());
        for caller in rest {
            let context = caller.context();
            let linked = opentelemetry::trace::TraceContextExt::span(&context)
                .span_context()
                .clone();
            if linked.is_valid() {
                span.add_link(linked);
            }
        }
    }
    span
}

/// Layer for a gRPC client channel to one peer: injects the current trace
/// context and records `grpc_client_request_duration_seconds` by peer,
/// method and outcome. Peers are process or region names from the config
/// (bounded), methods the fixed RPC names.
#[derive(Clone)]
pub struct GrpcClientLayer {
    peer: Arc<str>,
}

impl GrpcClientLayer {
    pub fn new(peer: &str) -> Self {
        metrics::describe_histogram!(
            "grpc_client_request_duration_seconds",
            metrics::Unit::Seconds,
            "outgoing gRPC call latency by peer, method and outcome"
        );
        GrpcClientLayer { peer: peer.into() }
    }
}

impl<S> Layer<S> for GrpcClientLayer {
    type Service = GrpcClient<S>;
    fn layer(&self, inner: S) -> GrpcClient<S> {
        GrpcClient {
            inner,
            peer: self.peer.clone(),
        }
    }
}

/// See [`GrpcClientLayer`].
#[derive(Clone)]
pub struct GrpcClient<S> {
    inner: S,
    peer: Arc<str>,
}

impl<S, B, R> Service<http::Request<B>> for GrpcClient<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        inject(&Span::current(), request.headers_mut());
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let peer = self.peer.clone();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await.map_err(Into::into);
            let outcome = match &result {
                // An error status in the headers is a trailers-only answer;
                // a successful one carries its status in the trailers.
                Ok(response) => match response.headers().get("grpc-status") {
                    Some(code) if code.as_bytes() != b"0" => "error",
                    _ => "ok",
                },
                Err(err) if err.is::<tower::timeout::error::Elapsed>() => "timeout",
                Err(_) => "unavailable",
            };
            metrics::histogram!(
                "grpc_client_request_duration_seconds",
                "peer" => peer.to_string(),
                "method" => method,
                "outcome" => outcome,
            )
            .record(started.elapsed().as_secs_f64());
            result
        })
    }
}
