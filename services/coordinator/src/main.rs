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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    geolog_telemetry::init_tracing("geolog-coordinator");
    let _ = geolog_telemetry::prometheus();
    let config = GeologConfig::load(&args.config)?;
    let (_, process) = config
        .coordinator_process(&args.id)
        .with_context(|| format!("no coordinator {:?} in {}", args.id, args.config.display()))?;
    let listen = args.listen.unwrap_or_else(|| process.addr.clone());
    let addr = tokio::net::lookup_host(&listen)
        .await?
        .next()
        .with_context(|| format!("cannot resolve {listen}"))?;
    geolog_coordinator::serve(&config, &args.id, addr, geolog_telemetry::shutdown_signal())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("coordinator stopped");
    Ok(())
}
