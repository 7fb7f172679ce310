//! Telemetry setup shared by every binary: structured logs and
//! OpenTelemetry traces through `tracing`, and a Prometheus metrics
//! recorder. Libraries only emit (`tracing::info!`, `metrics::counter!`);
//! binaries call these setup functions once. Must never be called from
//! library code or tests that start several services in one process (the
//! recorder and the tracer provider are global).

pub mod trace;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

/// What [`init_tracing`] installed; call [`Telemetry::shutdown`] at exit so
/// the spans still queued in the batching exporter are sent.
#[must_use = "shut it down at exit, or queued spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the span exporter (bounded by the exporter's own
    /// timeout). Runs on a blocking thread: the flush waits for the export.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(err)) = flushed {
                tracing::warn!(error = %err, "span exporter did not shut down cleanly");
            }
        }
    }
}

/// Whether the standard OpenTelemetry environment asks for trace export:
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// set, and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
fn export_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG`
/// (default `info`); `GEOLOG_LOG_FORMAT=json` switches to JSON lines. When
/// the OpenTelemetry environment names an OTLP endpoint (see
/// [`export_requested`]), spans are also exported over OTLP/gRPC through a
/// batching exporter (its queue and schedule from the standard `OTEL_BSP_*`
/// variables; the request path never waits for an export), with
/// `service.name` from `OTEL_SERVICE_NAME` or else `service`. W3C trace
/// context propagation is installed either way. Must be called inside a
/// tokio runtime (the exporter's gRPC channel lives on it).
pub fn init_tracing(service: &'static str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let json = std::env::var("GEOLOG_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Log lines do not carry their spans' fields unless asked: the log
    // layer formats every field of every span it sees when the span opens
    // (a request span per request and per replica call), a tenth of a
    // busy coordinator's time, whether or not anything is logged inside.
    // Request-level warnings name their key and operation themselves.
    let spans_in_logs = std::env::var("GEOLOG_LOG_SPANS").is_ok_and(|v| v == "1" || v == "true");
    let only_events = tracing_subscriber::filter::filter_fn(move |meta: &tracing::Metadata<'_>| {
        spans_in_logs || meta.is_event()
    });
    // A span no layer wants must not be built (its fields evaluated,
    // entered, closed: every request span, on every process, when traces
    // are not exported). So `RUST_LOG` filters each layer, not the whole
    // subscriber, and the export layer is left out rather than added as
    // `None`: either a global filter or an absent optional layer counts as
    // wanting every span it lets through (tests/spans.rs).
    let env_filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = if json {
        fmt::layer()
            .json()
            .with_current_span(true)
            .with_filter(only_events.and(env_filter()))
            .boxed()
    } else {
        fmt::layer()
            .with_target(false)
            .with_filter(only_events.and(env_filter()))
            .boxed()
    };
    let mut export_error = None;
    let provider = if export_requested() {
        match tracer_provider(service) {
            Ok(provider) => Some(provider),
            Err(err) => {
                export_error = Some(err);
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_error_records_to_exceptions(true)
            .with_filter(env_filter())
    });
    let subscriber = tracing_subscriber::registry().with(logs);
    let installed = match otel {
        Some(otel) => subscriber.with(otel).try_init(),
        None => subscriber.try_init(),
    }
    .is_ok();
    if installed {
        tracing::info!(
            service,
            trace_export = provider.is_some(),
            "telemetry initialised"
        );
        if let Some(err) = export_error {
            tracing::warn!(error = %err, "cannot build the OTLP span exporter; traces are not exported");
        }
    }
    Telemetry { provider }
}

fn tracer_provider(
    service: &'static str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process) and returns a
/// handle that renders `/metrics`. Must be called inside a tokio runtime:
/// it spawns the recorder's upkeep task.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .expect("bucket list is not empty")
                // Counts, not seconds: records per group-commit batch.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("write_batch_records".into()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                )
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

/// Serves Prometheus text on `GET /metrics` (and `ok` on `GET /health`)
/// at `addr`: the side port of a process whose own port speaks gRPC only.
/// `refresh` runs before each render, to sample gauges that are cheaper to
/// read on demand (pool usage). Returns once listening; the server runs
/// until the process exits.
pub async fn serve_metrics(
    addr: &str,
    refresh: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = prometheus();
    let refresh = std::sync::Arc::new(refresh);
    let router = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let refresh = refresh.clone();
                let handle = handle.clone();
                async move {
                    refresh();
                    handle.render()
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::error!(error = %err, "metrics side port stopped");
        }
    });
    tracing::info!(addr = %local, "serving /metrics");
    Ok(local)
}

/// Resolves on SIGINT or SIGTERM: the start of an ordered shutdown.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested");
}
