//! `geolog-load`: drives a geolog gateway with writes, reads or a mix at one
//! or more consistency levels and prints, per level, requests/s, errors by
//! status and latency percentiles (HDR histogram). Closed-loop by default
//! (`--clients` each send back to back); with `--rate` it is open-loop: each
//! request has a scheduled send time and its latency is measured from that
//! time, so a stalled server is not hidden (coordinated omission).
//! Bounded by `--duration` (and optionally `--requests`): it always stops.

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    /// Single-record writes.
    Write,
    /// Reads of keys written first.
    Read,
    /// 80 % reads, 20 % writes.
    Mixed,
}

/// Load generator for geolog.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// `cluster.json` of a running cluster (written by `geolog up`).
    #[arg(long, default_value = ".geolog/cluster.json")]
    cluster: PathBuf,
    /// Gateway base URL; overrides `--cluster`.
    #[arg(long)]
    url: Option<String>,
    /// Region whose gateway to use (from `--cluster`); default: the first.
    #[arg(long)]
    region: Option<String>,
    /// Consistency levels, comma-separated; each runs in turn.
    #[arg(long, default_value = "LOCAL_QUORUM", value_delimiter = ',')]
    consistency: Vec<String>,
    #[arg(long, value_enum, default_value = "write")]
    scenario: Scenario,
    /// How long each level runs, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop a level after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Open-loop: total requests per second, spread over the clients.
    #[arg(long)]
    rate: Option<f64>,
    /// Distinct keys (1 = one hot key).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Size of each value's payload string, in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The figures of one level.
#[derive(Serialize)]
struct Report {
    scenario: Scenario,
    consistency: String,
    mode: &'static str,
    clients: usize,
    seconds: f64,
    requests: u64,
    requests_per_second: f64,
    statuses: BTreeMap<String, u64>,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

fn gateway_url(args: &Args) -> anyhow::Result<String> {
    if let Some(url) = &args.url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let dir = args
        .cluster
        .parent()
        .context("--cluster has no parent directory")?;
    let file = geolog_launcher::ClusterFile::read(dir)
        .context("no running cluster; pass --url or --cluster")?;
    file.processes
        .iter()
        .filter(|p| p.role == "gateway")
        .find(|p| args.region.as_ref().is_none_or(|r| &p.region == r))
        .and_then(|p| p.url.clone())
        .context("no gateway for that region in cluster.json")
}

struct Worker {
    http: reqwest::Client,
    base: String,
    level: String,
    scenario: Scenario,
    keys: u64,
    payload: Arc<str>,
}

impl Worker {
    /// One request; returns its HTTP status (0 for a transport error).
    async fn request(&self, rng: &mut fastrand::Rng) -> u16 {
        let key = format!("load-{}", rng.u64(0..self.keys));
        let read = match self.scenario {
            Scenario::Write => false,
            Scenario::Read => true,
            Scenario::Mixed => rng.u8(0..10) < 8,
        };
        let result = if read {
            self.http
                .get(format!(
                    "{}/api/logs/{key}?consistency={}",
                    self.base, self.level
                ))
                .send()
                .await
        } else {
            let body = serde_json::json!({"key": key, "value": {"payload": &*self.payload, "n": rng.u64(..)}});
            self.http
                .post(format!("{}/api/logs?consistency={}", self.base, self.level))
                .json(&body)
                .send()
                .await
        };
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                status
            }
            Err(_) => 0,
        }
    }
}

async fn run_level(
    args: &Args,
    http: &reqwest::Client,
    base: &str,
    level: &str,
) -> anyhow::Result<Report> {
    let worker = Arc::new(Worker {
        http: http.clone(),
        base: base.to_string(),
        level: level.to_string(),
        scenario: args.scenario,
        keys: args.keys.max(1),
        payload: "x".repeat(args.payload_bytes).into(),
    });
    let duration = Duration::from_secs_f64(args.duration);
    let budget = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    let clients = args.clients;
    for client in 0..clients {
        let (worker, budget) = (worker.clone(), budget.clone());
        // Open-loop: this client's share of the rate, offset so clients interleave.
        let interval = args
            .rate
            .map(|rate| Duration::from_secs_f64(args.clients as f64 / rate));
        tasks.spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
            let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
            let mut rng = fastrand::Rng::with_seed(client as u64 + 1);
            let offset = interval.map_or(Duration::ZERO, |i| {
                i.mul_f64(client as f64 / clients as f64)
            });
            let mut scheduled = started + offset;
            loop {
                if interval.is_some() {
                    tokio::time::sleep_until(scheduled).await;
                } else {
                    scheduled = Instant::now();
                }
                if scheduled >= deadline
                    || budget
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                        .is_err()
                {
                    break;
                }
                let status = worker.request(&mut rng).await;
                let micros = scheduled.elapsed().as_micros().max(1) as u64;
                histogram.saturating_record(micros);
                *statuses.entry(status.to_string()).or_default() += 1;
                if let Some(interval) = interval {
                    scheduled += interval;
                }
            }
            (histogram, statuses)
        });
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (h, s) = done.context("a client task failed")?;
        histogram.add(&h).context("merge histograms")?;
        for (status, n) in s {
            *statuses.entry(status).or_default() += n;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        scenario: args.scenario,
        consistency: level.to_string(),
        mode: if args.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        },
        clients: args.clients,
        seconds,
        requests: histogram.len(),
        requests_per_second: histogram.len() as f64 / seconds,
        statuses,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
    })
}

/// Writes the keyspace once so reads find something.
async fn populate(args: &Args, http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let keys = args.keys.clamp(1, 5_000);
    println!("writing {keys} keys for the read scenario ...");
    for start in (0..keys).step_by(64) {
        let mut batch = tokio::task::JoinSet::new();
        for i in start..(start + 64).min(keys) {
            let request = http
                .post(format!("{base}/api/logs?consistency=ALL"))
                .json(&serde_json::json!({"key": format!("load-{i}"), "value": i}));
            batch.spawn(async move { request.send().await.map(|r| r.status()) });
        }
        while let Some(result) = batch.join_next().await {
            let status = result?.context("populate request")?;
            if !status.is_success() {
                bail!("populating keys failed with {status}");
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.clients == 0 || args.duration <= 0.0 || args.rate.is_some_and(|r| r <= 0.0) {
        bail!("--clients, --duration and --rate must be positive");
    }
    let base = gateway_url(&args)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    if !matches!(args.scenario, Scenario::Write) {
        populate(&args, &http, &base).await?;
        args.keys = args.keys.clamp(1, 5_000);
    }
    println!(
        "target {base}, {:?}, {} clients, {} s per level",
        args.scenario, args.clients, args.duration
    );
    println!(
        "{:<14} {:>9} {:>9}  {:>8} {:>8} {:>8} {:>8} {:>8}  statuses",
        "level", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    let mut reports = Vec::new();
    for level in &args.consistency {
        let report = run_level(&args, &http, &base, level).await?;
        let statuses: Vec<String> = report
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        println!(
            "{:<14} {:>9} {:>9.1}  {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
            report.consistency,
            report.requests,
            report.requests_per_second,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.p999_ms,
            report.max_ms,
            statuses.join(" ")
        );
        reports.push(report);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
