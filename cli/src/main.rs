//! `geolog`: run a local cluster. `up` starts one in the foreground and
//! stops everything it started on Ctrl-C/SIGTERM; `down` stops it from
//! another shell; `status` lists its processes.

mod control;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use geolog_launcher::process::{pid_alive, signal_pid};
use geolog_launcher::topology::Shape;
use geolog_launcher::{ClusterFile, ClusterSpec, RunningCluster};
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about = "Run a local geolog cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster in the foreground (Ctrl-C stops it).
    Up {
        /// Where config, PostgreSQL data, logs and cluster.json live.
        #[arg(long, default_value = ".geolog")]
        data_dir: PathBuf,
        /// Number of regions (generated topology).
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// Storage nodes per region (generated topology).
        #[arg(long, default_value_t = 3)]
        nodes_per_region: usize,
        /// Replicas of each key per region (generated topology).
        #[arg(long, default_value_t = 3)]
        replication_factor: usize,
        /// Use this topology file instead of generating one.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Port of the first region's gateway; region i uses port + i. 0 picks free ports.
        #[arg(long, default_value_t = 8080)]
        gateway_port: u16,
        /// Run PostgreSQL with fsync=off (faster, loses data if the machine crashes).
        #[arg(long)]
        no_fsync: bool,
        /// One-way latency added to every inter-region link (e.g. 40ms).
        #[arg(long, value_parser = control::parse_duration, default_value = "0ms")]
        wan_latency: std::time::Duration,
    },
    /// Inject faults into the inter-region links of a running cluster.
    Fault {
        #[command(subcommand)]
        fault: FaultCommand,
        #[arg(long, default_value = ".geolog", global = true)]
        data_dir: PathBuf,
    },
    /// Anti-entropy on demand.
    Repair {
        #[command(subcommand)]
        repair: RepairCommand,
        #[arg(long, default_value = ".geolog", global = true)]
        data_dir: PathBuf,
    },
    /// Stop, start or wipe one storage node of a running cluster.
    Node {
        #[command(subcommand)]
        node: NodeCommand,
        #[arg(long, default_value = ".geolog", global = true)]
        data_dir: PathBuf,
    },
    /// Stop the cluster running in DATA_DIR.
    Down {
        #[arg(long, default_value = ".geolog")]
        data_dir: PathBuf,
    },
    /// The processes of the cluster running in DATA_DIR, then each
    /// region's health as its gateway reports it: replicas alive / suspect /
    /// dead with their circuits, links to other regions, hints pending,
    /// outbox depth and the last anti-entropy pass.
    Status {
        #[arg(long, default_value = ".geolog")]
        data_dir: PathBuf,
        /// Print each region's health document as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when URL answers 2xx within 3 s, 1 otherwise: the container
    /// healthcheck (the runtime image has no curl).
    Healthcheck {
        #[arg(
            env = "GEOLOG_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8080/api/logs/health"
        )]
        url: String,
    },
}

#[derive(Subcommand)]
enum FaultCommand {
    /// Cut every link between two regions (both directions).
    Partition { a: String, b: String },
    /// Heal every partition.
    Heal,
    /// Set the one-way latency between two regions (e.g. 80ms; 0 removes it).
    Latency {
        a: String,
        b: String,
        #[arg(value_parser = control::parse_duration)]
        latency: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Stop a storage node (SIGTERM).
    Stop {
        id: String,
        /// Stop its PostgreSQL server too.
        #[arg(long)]
        with_postgres: bool,
    },
    /// Start a stopped storage node (and its PostgreSQL) again.
    Start { id: String },
    /// Disk loss on demand: stop a storage node, delete its PostgreSQL data,
    /// re-initialise it empty and start it again.
    Wipe { id: String },
}

#[derive(Subcommand)]
enum RepairCommand {
    /// Compare every replica pair now (inside each region and across
    /// regions) with Merkle trees, repair what differs, and print the result.
    Run {
        /// Only the replicas of this region (with their remote peers).
        #[arg(long)]
        region: Option<String>,
        /// Only keys whose ring token is in LOW..=HIGH (u64, decimal or
        /// 0x-hex; `geolog repair token KEY` prints a key's token).
        #[arg(long, value_parser = parse_token_range)]
        key_range: Option<(u64, u64)>,
    },
    /// What each region's anti-entropy worker did: passes, the last pass
    /// (ranges compared, digests, versions and bytes repaired, duration,
    /// failures) and totals since it started.
    Status,
    /// Print the ring token of KEY (for `repair run --key-range`).
    Token { key: String },
}

fn parse_token_range(text: &str) -> Result<(u64, u64), String> {
    let parse = |t: &str| {
        let t = t.trim();
        match t.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => t.parse(),
        }
        .map_err(|e| format!("{t:?} is not a u64 token: {e}"))
    };
    let (low, high) = text
        .split_once("..")
        .ok_or_else(|| "expected LOW..HIGH".to_string())?;
    let (low, high) = (parse(low)?, parse(high.trim_start_matches('='))?);
    if low > high {
        return Err(format!("empty range: {low} > {high}"));
    }
    Ok((low, high))
}

/// Sends one command to the control API of the cluster in `data_dir`.
async fn control_call(
    data_dir: &std::path::Path,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let file = ClusterFile::read(data_dir)?;
    let url = file
        .control_url
        .context("this cluster has no control API (started by an older geolog?)")?;
    let response = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .with_context(|| format!("cannot reach the launcher at {url}"))?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{}", answer["error"].as_str().unwrap_or("request failed"));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A healthcheck prints nothing: its output ends up in container state.
    let _telemetry = (!matches!(cli.command, Command::Healthcheck { .. }))
        .then(|| geolog_telemetry::init_tracing("geolog"));
    match cli.command {
        Command::Healthcheck { url } => {
            let healthy = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(3))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            std::process::exit(if healthy { 0 } else { 1 });
        }
        Command::Up {
            data_dir,
            regions,
            nodes_per_region,
            replication_factor,
            topology,
            gateway_port,
            no_fsync,
            wan_latency,
        } => {
            if let Ok(existing) = ClusterFile::read(&data_dir)
                && pid_alive(existing.launcher_pid)
                && existing.launcher_pid != std::process::id()
            {
                bail!(
                    "a cluster is already running in {} (launcher pid {}); stop it with `geolog down --data-dir {}`",
                    data_dir.display(),
                    existing.launcher_pid,
                    data_dir.display()
                );
            }
            let shape = Shape {
                regions,
                nodes_per_region,
                replication_factor,
            };
            let mut spec = ClusterSpec::new(&data_dir, shape);
            spec.topology = topology;
            spec.gateway_port = gateway_port;
            spec.fsync = !no_fsync;
            spec.wan_latency = wan_latency;
            println!("starting geolog in {} ...", data_dir.display());
            let started = Instant::now();
            let mut cluster = RunningCluster::start(spec)
                .await
                .context("cluster failed to start")?;
            println!(
                "geolog is up ({:.1}s). Gateways:",
                started.elapsed().as_secs_f64()
            );
            for region in &cluster.config().regions {
                for url in cluster.gateway_urls(&region.name) {
                    println!("  region {:<4} {url}", region.name);
                }
            }
            println!(
                "processes: {}",
                cluster.data_dir().join("cluster.json").display()
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            cluster.set_control_url(format!("http://{}", listener.local_addr()?))?;
            println!("press Ctrl-C (or run `geolog down`) to stop");
            let cluster = std::sync::Arc::new(tokio::sync::Mutex::new(cluster));
            let app = control::router(cluster.clone());
            axum::serve(listener, app)
                .with_graceful_shutdown(geolog_telemetry::shutdown_signal())
                .await?;
            println!("stopping ...");
            let mut cluster = cluster.lock().await;
            tokio::task::block_in_place(|| cluster.shutdown());
            println!("stopped");
        }
        Command::Down { data_dir } => {
            let file = ClusterFile::read(&data_dir)?;
            if signal_pid(file.launcher_pid, Signal::SIGTERM) {
                let deadline = Instant::now() + Duration::from_secs(90);
                while pid_alive(file.launcher_pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if pid_alive(file.launcher_pid) {
                    bail!("launcher {} did not stop within 90 s", file.launcher_pid);
                }
            } else {
                // The launcher died without cleaning up: stop what it recorded.
                for p in &file.processes {
                    signal_pid(p.pid, Signal::SIGTERM);
                }
                for p in &file.processes {
                    if let Some(pg) = p.postgres_pid {
                        signal_pid(pg, Signal::SIGINT);
                    }
                }
                let _ = std::fs::remove_file(data_dir.join("cluster.json"));
            }
            println!("stopped");
        }
        Command::Fault { fault, data_dir } => {
            let (path, body) = match fault {
                FaultCommand::Partition { a, b } => {
                    ("/fault/partition", serde_json::json!({"a": a, "b": b}))
                }
                FaultCommand::Heal => ("/fault/heal", serde_json::json!({})),
                FaultCommand::Latency { a, b, latency } => (
                    "/fault/latency",
                    serde_json::json!({"a": a, "b": b, "latency_ms": latency.as_millis() as u64}),
                ),
            };
            control_call(&data_dir, path, body).await?;
            println!("ok");
        }
        Command::Node { node, data_dir } => {
            let (path, body) = match node {
                NodeCommand::Stop { id, with_postgres } => (
                    "/node/stop",
                    serde_json::json!({"id": id, "with_postgres": with_postgres}),
                ),
                NodeCommand::Start { id } => ("/node/start", serde_json::json!({"id": id})),
                NodeCommand::Wipe { id } => ("/node/wipe", serde_json::json!({"id": id})),
            };
            control_call(&data_dir, path, body).await?;
            println!("ok");
        }
        Command::Repair {
            repair: RepairCommand::Run { region, key_range },
            data_dir,
        } => {
            let file = ClusterFile::read(&data_dir)?;
            let config = geolog_config::GeologConfig::load(&file.config)?;
            let regions: Vec<String> = match region {
                Some(r) if config.region(&r).is_none() => bail!("no region {r:?} in this cluster"),
                Some(r) => vec![r],
                None => config.regions.iter().map(|r| r.name.clone()).collect(),
            };
            let mut failed = 0;
            for region in regions {
                let mut worker = geolog_anti_entropy::AntiEntropy::new(&config, &region)?;
                worker.compare_everything();
                if let Some((low, high)) = key_range {
                    worker.restrict_to(&[(low, high)]);
                }
                let pass = worker.pass(true).await;
                println!("region {region}: {}", describe_pass(&pass));
                failed += pass.failed_pairs;
            }
            if failed > 0 {
                bail!("{failed} comparisons failed; run again once the replicas answer");
            }
        }
        Command::Repair {
            repair: RepairCommand::Token { key },
            ..
        } => println!("{}", geolog_core::ring::key_token(&key)),
        Command::Repair {
            repair: RepairCommand::Status,
            data_dir,
        } => repair_status(&data_dir).await?,
        Command::Status { data_dir, json } => {
            let file = ClusterFile::read(&data_dir)?;
            if json {
                let mut regions = serde_json::Map::new();
                for (region, health) in region_health(&file).await {
                    regions.insert(
                        region,
                        health.unwrap_or_else(|e| serde_json::json!({"error": e})),
                    );
                }
                println!("{}", serde_json::to_string_pretty(&regions)?);
                return Ok(());
            }
            println!(
                "launcher pid {} ({})",
                file.launcher_pid,
                if pid_alive(file.launcher_pid) {
                    "running"
                } else {
                    "gone"
                }
            );
            for p in &file.processes {
                println!(
                    "{:<12} {:<6} {:<8} pid {:<7} {:<5} {}",
                    p.role,
                    p.region,
                    p.id,
                    p.pid,
                    if pid_alive(p.pid) { "up" } else { "down" },
                    p.url.as_deref().unwrap_or(&p.addr)
                );
            }
            for (region, health) in region_health(&file).await {
                print_region_health(&region, health);
            }
        }
    }
    Ok(())
}

/// Each region's `/api/logs/health`, from its first gateway that answers.
async fn region_health(file: &ClusterFile) -> Vec<(String, Result<serde_json::Value, String>)> {
    let http = reqwest::Client::new();
    let regions: std::collections::BTreeSet<String> =
        file.processes.iter().map(|p| p.region.clone()).collect();
    let mut answers = Vec::new();
    for region in regions {
        let mut answer = Err("no gateway".to_string());
        for url in file
            .processes
            .iter()
            .filter(|p| p.region == region)
            .filter_map(|p| p.url.as_ref())
        {
            let got = http
                .get(format!("{url}/api/logs/health"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            answer = match got {
                Ok(r) => r.json().await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("gateway {url} unreachable: {e}")),
            };
            if answer.is_ok() {
                break;
            }
        }
        answers.push((region, answer));
    }
    answers
}

/// `geolog status`'s view of one region.
fn print_region_health(region: &str, health: Result<serde_json::Value, String>) {
    let h = match health {
        Ok(h) => h,
        Err(e) => {
            println!("\nregion {region}: {e}");
            return;
        }
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    println!("\nregion {region}: {}", text(&h["status"]));
    for c in h["coordinators"].as_array().into_iter().flatten() {
        println!(
            "  coordinator {:<10} {}",
            text(&c["id"]),
            text(&c["status"])
        );
    }
    for r in h["replicas"].as_array().into_iter().flatten() {
        let line = format!(
            "  replica {:<8} {:<4} {:<8} circuit {:<9} {}",
            text(&r["node"]),
            text(&r["region"]),
            text(&r["state"]),
            r["circuit"].as_str().unwrap_or("-"),
            r["last_error"].as_str().unwrap_or("")
        );
        println!("{}", line.trim_end());
    }
    for l in h["links"].as_array().into_iter().flatten() {
        println!(
            "  link to {:<6} {:<8} circuit {}",
            text(&l["region"]),
            text(&l["state"]),
            text(&l["circuit"])
        );
    }
    let pending: u64 = h["hints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["pending"].as_u64())
        .sum();
    println!("  hints pending: {pending}");
    for o in h["outbox"].as_array().into_iter().flatten() {
        println!(
            "  outbox to {}: {} entries, oldest {} ms",
            text(&o["region"]),
            o["depth"].as_u64().unwrap_or(0),
            o["oldest_age_ms"].as_u64().unwrap_or(0)
        );
    }
    let ae = &h["anti_entropy"];
    if ae.is_object() {
        match ae["last_pass"].as_object() {
            Some(pass) => println!(
                "  anti-entropy {} ({}): last pass {} — {} pairs, {} failed, {} versions repaired",
                text(&ae["id"]),
                text(&ae["status"]),
                pass.get("result").and_then(|v| v.as_str()).unwrap_or("-"),
                pass.get("pairs").and_then(|v| v.as_u64()).unwrap_or(0),
                pass.get("failed_pairs")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0),
                pass.get("versions_repaired")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0),
            ),
            None => println!(
                "  anti-entropy {} ({}): no pass finished yet",
                text(&ae["id"]),
                text(&ae["status"])
            ),
        }
    }
}

/// One line about a pass of anti-entropy.
fn describe_pass(pass: &geolog_anti_entropy::PassSummary) -> String {
    let r = &pass.report;
    let mut line = format!(
        "{} pairs, {} ranges compared, {} digests exchanged, {} differing leaves, {} versions sent, {} repaired, {} bytes, {:.2}s",
        pass.pairs,
        r.ranges,
        r.digests,
        r.leaves,
        r.versions_sent,
        r.versions_repaired,
        r.bytes,
        pass.duration_ms as f64 / 1000.0
    );
    if pass.failed_pairs > 0 {
        line += &format!(
            "; {} pairs failed: {}",
            pass.failed_pairs,
            pass.errors.join("; ")
        );
    }
    line
}

/// `geolog repair status`: asks each region's anti-entropy worker.
async fn repair_status(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let file = ClusterFile::read(data_dir)?;
    let http = reqwest::Client::new();
    for p in file.processes.iter().filter(|p| p.role == "anti-entropy") {
        if p.addr.is_empty() {
            println!(
                "region {}: worker {} serves no status (no address in the config)",
                p.region, p.id
            );
            continue;
        }
        let answer = http
            .get(format!("http://{}/status", p.addr))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        let status: geolog_anti_entropy::WorkerStatus = match answer {
            Ok(r) => r.json().await.context("unreadable status")?,
            Err(err) => {
                println!("region {}: worker {} unreachable ({err})", p.region, p.id);
                continue;
            }
        };
        println!("region {}: {} passes since start", p.region, status.passes);
        match &status.last_pass {
            Some(pass) => {
                let ago = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
                    .saturating_sub(pass.finished_at_unix_ms);
                println!(
                    "  last pass {:.1}s ago{}: {}",
                    ago as f64 / 1000.0,
                    if pass.cross_region {
                        " (with other regions)"
                    } else {
                        ""
                    },
                    describe_pass(pass)
                );
            }
            None => println!("  no pass finished yet"),
        }
        let t = &status.totals;
        println!(
            "  totals: {} ranges compared, {} digests exchanged, {} versions repaired, {} bytes",
            t.ranges, t.digests, t.versions_repaired, t.bytes
        );
    }
    Ok(())
}
