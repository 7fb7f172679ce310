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

/// Probes every replica each probe interval, and at once when a call
/// timed out. Its findings are the `replica_up` gauge and health answers.
struct Prober {
    replicas: Arc<ReplicaSet>,
    timeout: std::time::Duration,
}

impl geolog_worker::Worker for Prober {
    fn name(&self) -> &str {
        "prober"
    }

    async fn step(&mut self) -> Result<geolog_worker::Next, String> {
        self.replicas.probe_all(self.timeout).await;
        Ok(geolog_worker::Next::Idle)
    }

    fn wake(&mut self) -> impl Future<Output = ()> + Send {
        self.replicas.probe_requested()
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
    let workers = geolog_worker::Workers::new();
    let prober = Prober {
        replicas: replicas.clone(),
        timeout: config.coordinator.probe_timeout(),
    };
    let prober = workers.spawn(prober, config.coordinator.probe_interval(), stop_rx);
    let engine = Arc::new(QuorumEngine::new(config, &region.name, replicas));
    let outbox_view = Arc::new(outbox::OutboxView::default());
    let settings = outbox::ReplaySettings::from(&config.coordinator);
    let interval = settings.interval;
    let replay = outbox::Replay::new(engine.clone(), outbox_view.clone(), settings);
    let replay = workers.spawn(replay, interval, stop_tx.subscribe());
    let service = CoordinatorServer::new(server::CoordinatorService::new(
        id.to_string(),
        engine,
        outbox_view,
        workers.clone(),
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
        .serve_with_shutdown(addr, geolog_worker::or_died(&workers, shutdown))
        .await;
    let _ = stop_tx.send(true);
    let _ = prober.await;
    let _ = replay.await;
    if let Some(name) = workers.dead() {
        return Err(format!("background worker {name} died; the coordinator stopped").into());
    }
    result.map_err(Into::into)
}
