//! geolog storage node: one process per node, owning exactly one PostgreSQL
//! database. It stores versions and serves them over gRPC; it never talks to
//! other storage nodes and never decides about consistency.

pub mod digest_tree;
pub mod keystate;
pub mod server;
pub mod store;

use geolog_proto::storage::storage_server::StorageServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use store::VersionStore;

use geolog_proto::MAX_MESSAGE_BYTES;

/// What a node's background workers do: how often it checkpoints its
/// keys' heads (and how many unsaved keys make it checkpoint sooner), and
/// after how long hints it holds for a replica that never took them are
/// dropped (anti-entropy repairs what they held).
#[derive(Debug, Clone, Copy)]
pub struct Background {
    pub checkpoint_interval: std::time::Duration,
    pub max_unsaved_keys: u64,
    pub hint_window: std::time::Duration,
}

/// Serves `store` on `addr` until `shutdown` resolves, then drains in-flight
/// requests, checkpoints the heads and closes the pool.
pub async fn serve(
    addr: SocketAddr,
    store: Arc<VersionStore>,
    region: String,
    background: Background,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    describe_metrics();
    let workers = geolog_worker::Workers::new();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let checkpointer = store::Checkpointer::new(
        store.clone(),
        background.checkpoint_interval,
        background.max_unsaved_keys,
    );
    let poll = checkpointer.poll();
    let checkpointer = workers.spawn(checkpointer, poll, stopping.clone());
    let expiry = store::HintExpiry::new(store.clone(), background.hint_window);
    let period = expiry.period();
    let expiry = workers.spawn(expiry, period, stopping);
    let traced = (store.node().to_string(), region.clone());
    let service = StorageServer::new(server::StorageService::new(store.clone(), region))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tracing::info!(%addr, node = store.node(), "storage node serving");
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .trace_fn(move |request| {
            geolog_telemetry::trace::grpc_server_span(request, &traced.0, &traced.1)
        })
        .add_service(service)
        .serve_with_shutdown(addr, geolog_worker::or_died(&workers, shutdown))
        .await;
    // Stop the periodic checkpoints (one in progress finishes), then store
    // every unsaved key.
    let _ = stop.send(true);
    let _ = checkpointer.await;
    let _ = expiry.await;
    if let Err(err) = store.checkpoint().await {
        tracing::warn!(error = %err, "last heads checkpoint failed; the next start recovers them");
    }
    store.close().await;
    if let Some(name) = workers.dead() {
        return Err(format!("background worker {name} died; the storage node stopped").into());
    }
    Ok(result?)
}

/// Describes the node's metrics (`# HELP` lines); the expiry counters start
/// at zero.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "storage_request_duration_seconds",
        metrics::Unit::Seconds,
        "storage RPC latency by op and outcome"
    );
    describe_gauge!(
        "db_pool_connections",
        "PostgreSQL pool connections by state (in_use, idle)"
    );
    describe_gauge!("db_pool_max_connections", "PostgreSQL pool size limit");
    describe_gauge!(
        "frontier_unsaved_keys",
        "keys changed since their heads were last checkpointed"
    );
    describe_counter!(
        "heads_checkpoints_total",
        "checkpoints of the keys' heads stored"
    );
    describe_gauge!(
        "frontier_cache_keys",
        "keys whose current versions (frontier) this node holds in memory"
    );
    describe_counter!(
        "frontier_loads_total",
        "frontiers of keys not cached: from = database (read there) or tree (known empty: the key's digest-tree leaf holds no version)"
    );
    describe_counter!(
        "hints_expired_total",
        "hints dropped after their time to live"
    );
    describe_counter!(
        "outbox_expired_total",
        "versions passed undelivered by a remote region's cursor after the outbox window, by region"
    );
    metrics::counter!("hints_expired_total").absolute(0);
}
