//! `geolog-storage`: parse config, open the store, serve, shut down.

use anyhow::Context;
use clap::Parser;
use geolog_config::GeologConfig;
use geolog_storage::store::{StoreSettings, VersionStore};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A geolog storage node.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Cluster config (TOML).
    #[arg(long, env = "GEOLOG_CONFIG")]
    config: PathBuf,
    /// This node's id in the config.
    #[arg(long, env = "GEOLOG_ID")]
    id: String,
    /// PostgreSQL URL; overrides the node's `database_url` in the config.
    #[arg(long, env = "GEOLOG_DATABASE_URL")]
    database_url: Option<String>,
    /// Address to listen on; defaults to the node's `addr` in the config.
    #[arg(long, env = "GEOLOG_LISTEN")]
    listen: Option<String>,
    /// Where to serve Prometheus `/metrics`; defaults to the node's
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
    let telemetry = geolog_telemetry::init_tracing("geolog-storage");
    let _ = geolog_telemetry::prometheus();
    let config = GeologConfig::load(&args.config)?;
    let (region, node) = config
        .node(&args.id)
        .with_context(|| format!("no storage node {:?} in {}", args.id, args.config.display()))?;
    let database_url = args
        .database_url
        .or_else(|| node.database_url.clone())
        .context("no database URL: pass --database-url or set database_url in the config")?;
    let listen = args.listen.unwrap_or_else(|| node.addr.clone());
    let addr = tokio::net::lookup_host(&listen)
        .await?
        .next()
        .with_context(|| format!("cannot resolve {listen}"))?;
    let settings = StoreSettings {
        max_connections: config.storage.pool_max_connections,
        acquire_timeout: Duration::from_millis(config.storage.pool_acquire_timeout_ms),
        frontier_cache_bytes: config.storage.frontier_cache_bytes,
        // Anti-entropy's cutoff trails its passes by the settle time.
        digest_window: Duration::from_millis(config.anti_entropy.settle_ms)
            + Duration::from_secs(30),
    };
    let store = Arc::new(
        VersionStore::open(&database_url, &node.id, &settings, Duration::from_secs(30))
            .await
            .context("cannot open the node's database")?,
    );
    if let Some(metrics) = args.metrics_listen.or_else(|| node.metrics_addr.clone()) {
        let sampled = store.clone();
        geolog_telemetry::serve_metrics(&metrics, move || sampled.record_pool_usage())
            .await
            .with_context(|| format!("cannot serve metrics on {metrics}"))?;
    }
    let background = geolog_storage::Background {
        checkpoint_interval: Duration::from_millis(config.storage.heads_checkpoint_ms),
        max_unsaved_keys: config.storage.heads_checkpoint_keys,
        hint_window: Duration::from_millis(config.coordinator.hint_window_ms),
    };
    geolog_storage::serve(
        addr,
        store,
        region.name.clone(),
        background,
        geolog_telemetry::shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("storage node stopped");
    telemetry.shutdown().await;
    Ok(())
}
