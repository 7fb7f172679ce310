//! geolog coordinator: a stateless quorum engine. It knows the topology,
//! places keys on replicas, fans writes and reads out, counts answers per
//! region and detects dead replicas. It stores nothing itself.

pub mod breaker;
pub mod engine;
pub mod observe;
pub mod outbox;
pub mod replicas;
pub mod server;

/// `tokio::spawn` inside the caller's span: a request's fan-out tasks
/// (replica calls, batches, repairs) stay in the request's trace.
pub(crate) fn spawn_traced<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(future))
}

/// [`spawn_traced`] for a `JoinSet`.
pub(crate) trait SpawnTraced<T> {
    fn spawn_traced<F>(&mut self, future: F) -> tokio::task::AbortHandle
    where
        F: std::future::Future<Output = T> + Send + 'static;
}

impl<T: Send + 'static> SpawnTraced<T> for tokio::task::JoinSet<T> {
    fn spawn_traced<F>(&mut self, future: F) -> tokio::task::AbortHandle
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        self.spawn(tracing::Instrument::in_current_span(future))
    }
}

use engine::QuorumEngine;
use geolog_config::GeologConfig;
use geolog_proto::coordinator::coordinator_server::CoordinatorServer;
use replicas::ReplicaSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Probes every replica on the configured period, and at once when a
/// call timed out, until `stop` fires. Its state is visible as the
/// `replica_up` gauge and in health answers.
async fn run_prober(
    replicas: Arc<ReplicaSet>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => replicas.probe_all(timeout).await,
            _ = replicas.probe_requested() => replicas.probe_all(timeout).await,
            _ = stop.changed() => return,
        }
    }
}

/// Serves the coordinator `id` on `addr` until `shutdown` resolves.
pub async fn serve(
    config: &GeologConfig,
    id: &str,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (region, _) = config
        .coordinator_process(id)
        .ok_or_else(|| format!("no coordinator {id:?} in the config"))?;
    observe::describe_metrics(
        &region
            .nodes
            .iter()
            .map(|n| n.id.clone())
            .collect::<Vec<_>>(),
        &config
            .regions
            .iter()
            .filter(|r| r.name != region.name)
            .map(|r| r.name.clone())
            .collect::<Vec<_>>(),
    );
    let replicas = Arc::new(ReplicaSet::new(config, &region.name)?);
    // One probe before serving, so the first requests see real health.
    replicas.probe_all(config.coordinator.probe_timeout()).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(run_prober(
        replicas.clone(),
        config.coordinator.probe_interval(),
        config.coordinator.probe_timeout(),
        stop_rx,
    ));
    let engine = Arc::new(QuorumEngine::new(config, &region.name, replicas));
    let outbox_view = Arc::new(outbox::OutboxView::default());
    let replay = tokio::spawn(outbox::run(
        engine.clone(),
        outbox_view.clone(),
        outbox::ReplaySettings::from(&config.coordinator),
        stop_tx.subscribe(),
    ));
    let service = CoordinatorServer::new(server::CoordinatorService::new(
        id.to_string(),
        engine,
        outbox_view,
    ))
    .max_decoding_message_size(geolog_proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(geolog_proto::MAX_MESSAGE_BYTES);
    tracing::info!(%addr, coordinator = id, region = %region.name, "coordinator serving");
    let traced = (id.to_string(), region.name.clone());
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .trace_fn(move |request| {
            geolog_telemetry::trace::grpc_server_span(request, &traced.0, &traced.1)
        })
        .add_service(service)
        .serve_with_shutdown(addr, shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = prober.await;
    let _ = replay.await;
    result.map_err(Into::into)
}
