//! Request spans cost nothing when nothing wants them: without trace
//! export and without spans in the log, a span is never built.

#[tokio::test]
async fn request_spans_are_not_built_when_nothing_exports_or_logs_them() {
    // SAFETY: set before anything reads the environment; one test per binary.
    unsafe {
        std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        std::env::remove_var("GEOLOG_LOG_SPANS");
        std::env::set_var("RUST_LOG", "info");
    }
    let _telemetry = geolog_telemetry::init_tracing("spans-test");
    let span = tracing::info_span!("request", key = %"k");
    assert!(span.is_disabled(), "an info span was built: {span:?}");
}
