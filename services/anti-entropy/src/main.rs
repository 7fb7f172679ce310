//! `geolog-anti-entropy`: parse config, run passes, serve `/status`,
//! `/metrics` and `/health` on the region's anti-entropy address, stop on a
//! signal.

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::routing::get;
use clap::Parser;
use geolog_anti_entropy::{AntiEntropy, WorkerStatus};
use geolog_config::GeologConfig;
use metrics_exporter_prometheus::PrometheusHandle;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The anti-entropy worker of one region.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Cluster config (TOML).
    #[arg(long, env = "GEOLOG_CONFIG")]
    config: PathBuf,
    /// The region whose replicas this worker compares.
    #[arg(long, env = "GEOLOG_REGION")]
    region: String,
    /// Where to serve `/status`, `/metrics` and `/health` (default: the
    /// region's `anti_entropy` address in the config, if any).
    #[arg(long, env = "GEOLOG_LISTEN")]
    listen: Option<String>,
}

#[derive(Clone)]
struct Served {
    status: Arc<Mutex<WorkerStatus>>,
    prometheus: PrometheusHandle,
}

// The services allocate and free small buffers on every request from
// several threads; glibc's allocator spent a fifth of their CPU there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = geolog_telemetry::init_tracing("geolog-anti-entropy");
    let prometheus = geolog_telemetry::prometheus();
    let config = GeologConfig::load(&args.config)?;
    let region = config
        .region(&args.region)
        .with_context(|| format!("no region {:?} in {}", args.region, args.config.display()))?;
    let listen = args
        .listen
        .or_else(|| region.anti_entropy.first().map(|p| p.addr.clone()));
    let worker = AntiEntropy::new(&config, &args.region)?;
    let served = Served {
        status: worker.status(),
        prometheus,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = geolog_worker::Workers::new();
    let (passes, interval) = worker.into_worker();
    let run = workers.spawn(passes, interval, stop_rx);
    match listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(%addr, region = %args.region, "anti-entropy worker serving status");
            let router = axum::Router::new()
                .route("/health", get(|| async { "ok" }))
                .route("/status", get(status))
                .route("/metrics", get(metrics))
                .with_state(served);
            axum::serve(listener, router)
                .with_graceful_shutdown(geolog_worker::or_died(
                    &workers,
                    geolog_telemetry::shutdown_signal(),
                ))
                .await?;
        }
        None => geolog_worker::or_died(&workers, geolog_telemetry::shutdown_signal()).await,
    }
    let _ = stop_tx.send(true);
    let _ = run.await;
    if let Some(name) = workers.dead() {
        anyhow::bail!("background worker {name} died; the anti-entropy worker stopped");
    }
    tracing::info!("anti-entropy worker stopped");
    telemetry.shutdown().await;
    Ok(())
}

async fn status(State(served): State<Served>) -> Json<WorkerStatus> {
    Json(
        served
            .status
            .lock()
            .expect("status lock is never poisoned")
            .clone(),
    )
}

async fn metrics(State(served): State<Served>) -> String {
    served.prometheus.render()
}
