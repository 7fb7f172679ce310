//! `geolog-coordinator`: parse config, serve, shut down.

use anyhow::Context;
use clap::Parser;
use geolog_config::GeologConfig;
use std::path::PathBuf;

/// A geolog coordinator (quorum engine).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Cluster config (TOML).
    #[arg(long, env = "GEOLOG_CONFIG")]
    config: PathBuf,
    /// This coordinator's id in the config.
    #[arg(long, env = "GEOLOG_ID")]
    id: String,
    /// Address to listen on; defaults to the coordinator's `addr` in the config.
    #[arg(long, env = "GEOLOG_LISTEN")]
    listen: Option<String>,
    /// Where to serve Prometheus `/metrics`; defaults to the coordinator's
    /// `metrics_addr` in the config (none: no metrics port).
    #[arg(long, env = "GEOLOG_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

// The services allocate and free small buffers on every request from
// several threads; glibc's allocator spent a fifth of their CPU there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = geolog_telemetry::init_tracing("geolog-coordinator");
    let _ = geolog_telemetry::prometheus();
    let config = GeologConfig::load(&args.config)?;
    let (_, process) = config
        .coordinator_process(&args.id)
        .with_context(|| format!("no coordinator {:?} in {}", args.id, args.config.display()))?;
    let listen = args.listen.unwrap_or_else(|| process.addr.clone());
    if let Some(metrics) = args.metrics_listen.or_else(|| process.metrics_addr.clone()) {
        geolog_telemetry::serve_metrics(&metrics, || {})
            .await
            .with_context(|| format!("cannot serve metrics on {metrics}"))?;
    }
    let addr = tokio::net::lookup_host(&listen)
        .await?
        .next()
        .with_context(|| format!("cannot resolve {listen}"))?;
    geolog_coordinator::serve(&config, &args.id, addr, geolog_telemetry::shutdown_signal())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("coordinator stopped");
    telemetry.shutdown().await;
    Ok(())
}
