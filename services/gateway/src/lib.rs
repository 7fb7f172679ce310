//! geolog gateway: the public REST API. It parses and validates, limits body
//! size, time and concurrency, maps errors to HTTP, serves `/metrics` and
//! health, and forwards to its region's coordinators over gRPC, balancing
//! across them. It holds no data.

pub mod coalesce;
pub mod error;
pub mod extract;
pub mod handlers;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use geolog_config::GeologConfig;
use geolog_core::ErrorCode;
use geolog_proto::coordinator as cpb;
use geolog_proto::coordinator::coordinator_client::CoordinatorClient;
use geolog_telemetry::trace::{GrpcClient, GrpcClientLayer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tower::{BoxError, Layer, ServiceBuilder};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub id: String,
    pub region: String,
    /// Balanced across the region's coordinators (traced and timed as
    /// peer `coordinators:REGION`).
    pub coordinator: CoordinatorClient<GrpcClient<Channel>>,
    /// Single writes and reads, coalesced into `WriteBatch` and
    /// `ReadBatch` calls on `coordinator`.
    pub writes: Arc<coalesce::Coalescer<cpb::WriteRequest>>,
    pub reads: Arc<coalesce::Coalescer<cpb::ReadRequest>>,
    /// One client per coordinator, for health.
    pub coordinator_probes: Vec<(String, String, CoordinatorClient<Channel>)>,
    pub max_body_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_records: usize,
    pub request_timeout: Duration,
    pub prometheus: Option<PrometheusHandle>,
    /// The region's anti-entropy worker (id, status address), for health.
    pub anti_entropy: Option<(String, String)>,
    /// Plain-HTTP client for the worker's `/status`.
    pub http: reqwest::Client,
}

impl AppState {
    /// Builds lazy clients to the coordinators of gateway `id`'s region.
    pub fn new(
        config: &GeologConfig,
        id: &str,
        prometheus: Option<PrometheusHandle>,
    ) -> Result<Self, BoxError> {
        let (region, _) = config
            .gateway_process(id)
            .ok_or_else(|| format!("no gateway {id:?} in the config"))?;
        if region.coordinators.is_empty() {
            return Err(format!("region {} has no coordinators", region.name).into());
        }
        let endpoint = |addr: &str| -> Result<Endpoint, BoxError> {
            Ok(Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true))
        };
        let endpoints = region
            .coordinators
            .iter()
            .map(|c| endpoint(&c.addr))
            .collect::<Result<Vec<_>, _>>()?;
        let coordinator = CoordinatorClient::new(
            GrpcClientLayer::new(&format!("coordinators:{}", region.name))
                .layer(Channel::balance_list(endpoints.into_iter())),
        )
        .max_decoding_message_size(geolog_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(geolog_proto::MAX_MESSAGE_BYTES);
        let coordinator_probes = region
            .coordinators
            .iter()
            .map(|c| {
                Ok((
                    c.id.clone(),
                    c.addr.clone(),
                    CoordinatorClient::new(endpoint(&c.addr)?.connect_lazy()),
                ))
            })
            .collect::<Result<Vec<_>, BoxError>>()?;
        let request_timeout = Duration::from_millis(config.gateway.request_timeout_ms);
        fn coalescer<R: coalesce::Coalesced>(
            client: &CoordinatorClient<GrpcClient<Channel>>,
            region: &str,
            settings: &geolog_config::GatewaySettings,
            timeout: Duration,
        ) -> Arc<coalesce::Coalescer<R>> {
            Arc::new(coalesce::Coalescer::new(
                client.clone(),
                region,
                settings.coalesce_max,
                settings.coalesce_in_flight,
                settings.concurrency_limit,
                timeout,
            ))
        }
        let writes = coalescer(&coordinator, &region.name, &config.gateway, request_timeout);
        let reads = coalescer(&coordinator, &region.name, &config.gateway, request_timeout);
        Ok(AppState {
            id: id.to_string(),
            region: region.name.clone(),
            coordinator,
            writes,
            reads,
            coordinator_probes,
            max_body_bytes: config.gateway.max_body_bytes,
            max_batch_bytes: config.gateway.max_batch_bytes,
            max_batch_records: config.gateway.max_batch_records,
            request_timeout,
            prometheus,
            anti_entropy: region
                .anti_entropy
                .first()
                .map(|p| (p.id.clone(), p.addr.clone())),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        })
    }
}

/// Errors raised by the tower layers (timeout, load shedding) as JSON.
async fn layer_error(err: BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(ErrorCode::Timeout, "request timed out in the gateway")
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::new(
            ErrorCode::Overloaded,
            "too many requests in flight; retry with backoff",
        )
    } else {
        ApiError::new(ErrorCode::Internal, format!("unhandled layer error: {err}"))
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        ErrorCode::Internal,
        "internal error (the gateway recovered from a panic)",
    )
    .into_response()
}

/// Describes the gateway's metrics (`# HELP` lines).
fn describe_metrics() {
    metrics::describe_histogram!(
        "http_server_requests_seconds",
        metrics::Unit::Seconds,
        "REST request latency by route, method, status and consistency level"
    );
    metrics::describe_gauge!(
        "http_server_open_connections",
        "client connections open (at most gateway.max_connections)"
    );
}

/// The routes, as the `route` label names them.
const ROUTES: [&str; 7] = [
    "/api/logs",
    "/api/logs/batch",
    "/api/logs/health",
    "/api/logs/{key}",
    "/api/logs/{key}/history",
    "/api/logs/{key}/replicas",
    "/metrics",
];

/// A label value, borrowed when it is one of a known few (no allocation
/// per request for the common ones).
fn label(known: Option<&'static str>, other: impl FnOnce() -> String) -> metrics::SharedString {
    match known {
        Some(value) => value.into(),
        None => other().into(),
    }
}

/// Records `http_server_requests_seconds` by route, method, status and level.
async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let matched = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str());
    let route = match matched {
        Some(path) => label(ROUTES.iter().find(|r| **r == path).copied(), || {
            path.to_string()
        }),
        None => "unmatched".into(),
    };
    let method = label(
        match *request.method() {
            Method::GET => Some("GET"),
            Method::POST => Some("POST"),
            Method::PUT => Some("PUT"),
            Method::DELETE => Some("DELETE"),
            Method::HEAD => Some("HEAD"),
            _ => None,
        },
        || request.method().to_string(),
    );
    // Only valid level names become label values: bounded cardinality.
    let level = extract::parse_query(request.uri().query(), extract::HISTORY_PARAMS)
        .ok()
        .and_then(|q| q.consistency)
        .map_or("default", |l| l.as_str());
    let response = next.run(request).await;
    let status = response.status();
    tracing::Span::current().record("status", status.as_u16());
    let status = label(
        match status.as_u16() {
            200 => Some("200"),
            201 => Some("201"),
            400 => Some("400"),
            404 => Some("404"),
            409 => Some("409"),
            413 => Some("413"),
            429 => Some("429"),
            500 => Some("500"),
            503 => Some("503"),
            504 => Some("504"),
            _ => None,
        },
        || status.as_u16().to_string(),
    );
    metrics::histogram!(
        "http_server_requests_seconds",
        "route" => route,
        "method" => method,
        "status" => status,
        "consistency" => level,
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Seconds a `503` asks the client to wait before retrying.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// `Retry-After` on every `503` (overloaded, or replicas unavailable):
/// what clients and shippers wait before they retry.
fn retry_after<B>(response: &http::Response<B>) -> Option<http::HeaderValue> {
    (response.status() == http::StatusCode::SERVICE_UNAVAILABLE)
        .then(|| http::HeaderValue::from_static(RETRY_AFTER_SECONDS))
}

/// The whole REST application.
pub fn router(state: AppState, concurrency_limit: usize, request_timeout: Duration) -> Router {
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(layer_error))
        .load_shed()
        .concurrency_limit(concurrency_limit)
        .timeout(request_timeout);
    Router::new()
        .route("/api/logs", post(handlers::write))
        .route(
            "/api/logs/batch",
            post(handlers::write_batch).get(handlers::read_batch_key),
        )
        .route("/api/logs/health", get(handlers::health))
        .route("/api/logs/{key}", get(handlers::read))
        .route("/api/logs/{key}/history", get(handlers::history))
        .route("/api/logs/{key}/replicas", get(handlers::replicas))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::route_not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        // Shared, not copied per request (the state holds clients and strings).
        .with_state(Arc::new(state))
        .layer(limits)
        .layer(middleware::from_fn(record_metrics))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request| {
                            let id = request
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-");
                            let route = request
                                .extensions()
                                .get::<MatchedPath>()
                                .map_or("unmatched", |p| p.as_str());
                            let span = tracing::info_span!(
                                "http",
                                otel.name = %format!("{} {route}", request.method()),
                                otel.kind = "server",
                                method = %request.method(),
                                uri = %request.uri(),
                                request_id = %id,
                                status = tracing::field::Empty,
                            );
                            geolog_telemetry::trace::continue_from(&span, request.headers());
                            span
                        })
                        // A line per request at DEBUG: at INFO the log costs
                        // more than the request on a busy gateway.
                        .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG)),
                )
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(SetResponseHeaderLayer::if_not_present(
                    http::header::RETRY_AFTER,
                    retry_after,
                ))
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                    panic_response,
                )),
        )
}

/// Serves gateway `id` on `listener` until `shutdown` resolves, then drains
/// (for at most [`DRAIN_TIMEOUT`]). At most `gateway.max_connections`
/// connections are open at once — past it, new ones wait in the listen
/// backlog — and one that has sent nothing for
/// `gateway.header_read_timeout_ms` while no request of its is in flight
/// (a new connection, an idle keep-alive one, a request head that stalls)
/// is closed: clients that open connections and never finish a request
/// cannot use up the gateway's file descriptors. (`axum::serve` has
/// neither bound, and hyper's own header-read timeout starts only at a
/// request's first byte.)
pub async fn serve(
    config: &GeologConfig,
    id: &str,
    listener: tokio::net::TcpListener,
    prometheus: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    describe_metrics();
    let state = AppState::new(config, id, prometheus)?;
    let app = router(
        state,
        config.gateway.concurrency_limit,
        Duration::from_millis(config.gateway.request_timeout_ms),
    );
    tracing::info!(addr = %listener.local_addr()?, gateway = id, "gateway serving");
    let idle_timeout = Duration::from_millis(config.gateway.header_read_timeout_ms);
    let mut connections = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    connections
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    let max_connections = config.gateway.max_connections;
    let open = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let open_gauge = metrics::gauge!("http_server_open_connections");
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = open.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors, or a connection reset before it
                    // was taken: wait a little instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (stream, activity) = Watched::new(stream);
        let connection = connections
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app.clone()),
            )
            .into_owned();
        let (open_gauge, mut stopping) = (open_gauge.clone(), stopping.clone());
        open_gauge.increment(1.0);
        tokio::spawn(async move {
            tokio::pin!(connection);
            let mut check = tokio::time::interval(idle_timeout / 4);
            let mut closing = false;
            loop {
                tokio::select! {
                    // An error here is the client's (reset, timeout, bad
                    // request line): hyper answered it if it could.
                    _ = connection.as_mut() => break,
                    _ = check.tick(), if !closing => {
                        if activity.idle() >= idle_timeout {
                            // Closes it now if no request is in flight,
                            // after the request otherwise.
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                    _ = stopping.changed(), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
            open_gauge.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = open.acquire_many(max_connections as u32);
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
    Ok(())
}

/// A client connection that records when it last moved bytes.
struct Watched {
    stream: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

/// When a connection last read or wrote, in milliseconds since it opened.
struct Activity {
    opened: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the connection last moved bytes.
    fn idle(&self) -> Duration {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.opened
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

impl Watched {
    fn new(stream: tokio::net::TcpStream) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity {
            opened: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        });
        let watched = Watched {
            stream,
            activity: activity.clone(),
        };
        (watched, activity)
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How long a stopping gateway waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
