//! `geolog-anti-entropy`: parse config, run passes, stop on a signal.

use anyhow::Context;
use clap::Parser;
use geolog_anti_entropy::AntiEntropy;
use geolog_config::GeologConfig;
use std::path::PathBuf;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    geolog_telemetry::init_tracing("geolog-anti-entropy");
    let _ = geolog_telemetry::prometheus();
    let config = GeologConfig::load(&args.config)?;
    config
        .region(&args.region)
        .with_context(|| format!("no region {:?} in {}", args.region, args.config.display()))?;
    let worker = AntiEntropy::new(&config, &args.region)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(async move { worker.run(stop_rx).await });
    geolog_telemetry::shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = run.await;
    tracing::info!("anti-entropy worker stopped");
    Ok(())
}
