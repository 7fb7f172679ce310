//! `geolog-gateway`: parse config, serve REST, shut down.

use anyhow::Context;
use clap::Parser;
use geolog_config::GeologConfig;
use std::path::PathBuf;

/// A geolog REST gateway.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Cluster config (TOML).
    #[arg(long, env = "GEOLOG_CONFIG")]
    config: PathBuf,
    /// This gateway's id in the config.
    #[arg(long, env = "GEOLOG_ID")]
    id: String,
    /// Address to listen on; defaults to the gateway's `addr` in the config.
    #[arg(long, env = "GEOLOG_LISTEN")]
    listen: Option<String>,
}

// The services allocate and free small buffers on every request from
// several threads; glibc's allocator spent a fifth of their CPU there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = geolog_telemetry::init_tracing("geolog-gateway");
    let prometheus = geolog_telemetry::prometheus();
    let config = GeologConfig::load(&args.config)?;
    let (_, process) = config
        .gateway_process(&args.id)
        .with_context(|| format!("no gateway {:?} in {}", args.id, args.config.display()))?;
    let listen = args.listen.unwrap_or_else(|| process.addr.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    geolog_gateway::serve(
        &config,
        &args.id,
        listener,
        Some(prometheus),
        geolog_telemetry::shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("gateway stopped");
    telemetry.shutdown().await;
    Ok(())
}
