//! `geolog-load`: drives a geolog gateway with writes, reads, a mix or
//! batches at one or more consistency levels and prints, per level,
//! requests/s, records/s, errors by status and latency percentiles (HDR
//! histogram). Closed-loop by default (`--clients` each send back to back);
//! with `--rate` it is open-loop: each request has a scheduled send time and
//! its latency is measured from that time, so a stalled server is not
//! hidden (coordinated omission). With `--peer-postgres URL` the same
//! records go to what a user would pick instead — PostgreSQL with quorum
//! synchronous replication (`load-tests/peer.sh` starts it) — so both are
//! measured with the same clients, payloads and percentiles.
//! Bounded by `--duration` (and optionally `--requests`): it always stops.

mod peer;
mod plot;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    /// Single-record writes.
    Write,
    /// Reads of keys written first.
    Read,
    /// 80 % reads, 20 % writes.
    Mixed,
    /// `POST /api/logs/batch` with `--batch-size` records per request.
    Batch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Compression {
    None,
    Gzip,
    Zstd,
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
    /// Consistency levels, comma-separated; each runs in turn (or all at
    /// once with `--concurrent-levels`).
    #[arg(long, default_value = "LOCAL_QUORUM", value_delimiter = ',')]
    consistency: Vec<String>,
    #[arg(long, value_enum, default_value = "write")]
    scenario: Scenario,
    /// How long each level runs: seconds, or with a unit (`500ms`, `30s`, `10m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: f64,
    /// Stop a level after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Concurrent clients (per level with `--concurrent-levels`).
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
    /// Records per request of the batch scenario.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Compression of batch bodies.
    #[arg(long, value_enum, default_value = "none")]
    compress: Compression,
    /// Run every level at the same time (availability under faults).
    #[arg(long)]
    concurrent_levels: bool,
    /// Send the same workload to this PostgreSQL primary instead of
    /// geolog (see `peer.rs`): one statement per request — a row, or a
    /// batch's rows — and reads of a key's newest row.
    #[arg(long, value_name = "URL")]
    peer_postgres: Option<String>,
    /// Print each service's resident memory (from `--cluster`) at the start
    /// and the end.
    #[arg(long)]
    rss: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw latency over time per level as SVG to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Append every acknowledged write (key, node, seq) to this file.
    #[arg(long)]
    acked: Option<PathBuf>,
    /// Instead of loading: check that every write listed in this file (by
    /// `--acked`) is in its key's history read at ALL; retries for up to
    /// 60 s while replication catches up, exits non-zero if any is missing.
    #[arg(long)]
    verify: Option<PathBuf>,
}

/// A duration in seconds from `30`, `30s`, `500ms` or `10m`.
fn parse_duration(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n * scale),
        _ => Err(format!(
            "{text:?} is not a duration such as 30s, 500ms or 10m"
        )),
    }
}

/// One second of a level's run.
#[derive(Serialize, Clone)]
pub struct Second {
    pub second: u64,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The figures of one level.
#[derive(Serialize)]
pub struct Report {
    scenario: Scenario,
    target: &'static str,
    pub consistency: String,
    mode: &'static str,
    clients: usize,
    records_per_request: usize,
    payload_bytes: usize,
    keys: u64,
    seconds: f64,
    requests: u64,
    requests_per_second: f64,
    /// Records acknowledged (for batches: those the answer says written).
    records: u64,
    records_per_second: f64,
    /// Requests answered 2xx, over all.
    availability: f64,
    statuses: BTreeMap<String, u64>,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Latency of the answers that were accepted (2xx) alone.
    accepted_p50_ms: f64,
    accepted_p99_ms: f64,
    /// Answers that refused the request for now (`503`, `429`: overload
    /// shed, retry later), and how fast they came.
    refused: u64,
    refused_p50_ms: f64,
    refused_p99_ms: f64,
    pub timeline: Vec<Second>,
}

/// Resident memory of one process, in KiB.
#[derive(Serialize)]
struct Rss {
    role: String,
    id: String,
    pid: u32,
    start_kib: Option<u64>,
    end_kib: Option<u64>,
}

fn gateway_url(args: &Args) -> anyhow::Result<String> {
    if let Some(url) = &args.url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let file = cluster_file(args)?;
    file.processes
        .iter()
        .filter(|p| p.role == "gateway")
        .find(|p| args.region.as_ref().is_none_or(|r| &p.region == r))
        .and_then(|p| p.url.clone())
        .context("no gateway for that region in cluster.json")
}

fn cluster_file(args: &Args) -> anyhow::Result<geolog_launcher::ClusterFile> {
    let dir = args
        .cluster
        .parent()
        .context("--cluster has no parent directory")?;
    geolog_launcher::ClusterFile::read(dir).context("no running cluster; pass --url or --cluster")
}

/// Where requests go.
enum Target {
    Gateway { http: reqwest::Client, base: String },
    Peer(Arc<peer::PeerTarget>),
}

struct Worker {
    target: Target,
    acked: Option<Arc<Mutex<std::fs::File>>>,
    level: String,
    scenario: Scenario,
    keys: u64,
    batch_size: usize,
    compress: Compression,
    payload: Arc<str>,
}

/// The answer to one request: its status (0 for a transport error) and
/// how many records it acknowledged.
struct Answer {
    status: String,
    records: u64,
}

#[derive(serde::Deserialize)]
struct BatchCounts {
    written: u64,
}

impl Worker {
    /// Whether the next request is a read (80 % of the mixed scenario).
    fn is_read(&self, rng: &mut fastrand::Rng) -> bool {
        match self.scenario {
            Scenario::Read => true,
            Scenario::Mixed => rng.u8(0..10) < 8,
            Scenario::Write | Scenario::Batch => false,
        }
    }

    fn record(&self, rng: &mut fastrand::Rng) -> (String, serde_json::Value) {
        let key = format!("load-{}", rng.u64(0..self.keys));
        let value = serde_json::json!({"payload": &*self.payload, "n": rng.u64(..)});
        (key, value)
    }

    async fn request(&self, rng: &mut fastrand::Rng) -> Answer {
        let records = if self.scenario == Scenario::Batch {
            self.batch_size
        } else {
            1
        };
        match &self.target {
            Target::Peer(peer) => {
                let result = if self.is_read(rng) {
                    let key = format!("load-{}", rng.u64(0..self.keys));
                    peer.read(&key).await.map(|_| 1)
                } else {
                    let rows: Vec<(String, String)> = (0..records)
                        .map(|_| {
                            let (k, v) = self.record(rng);
                            (k, v.to_string())
                        })
                        .collect();
                    peer.insert(&rows).await.map(|()| records as u64)
                };
                match result {
                    Ok(records) => Answer {
                        status: "ok".into(),
                        records,
                    },
                    Err(err) => {
                        eprintln!("peer request failed: {err:#}");
                        Answer {
                            status: "error".into(),
                            records: 0,
                        }
                    }
                }
            }
            Target::Gateway { http, base } => self.http_request(http, base, rng).await,
        }
    }

    async fn http_request(
        &self,
        http: &reqwest::Client,
        base: &str,
        rng: &mut fastrand::Rng,
    ) -> Answer {
        let read = self.is_read(rng);
        let level = &self.level;
        let request = if read {
            let key = format!("load-{}", rng.u64(0..self.keys));
            http.get(format!("{base}/api/logs/{key}?consistency={level}"))
        } else if self.scenario == Scenario::Batch {
            let records: Vec<serde_json::Value> = (0..self.batch_size)
                .map(|_| {
                    let (key, value) = self.record(rng);
                    serde_json::json!({"key": key, "value": value})
                })
                .collect();
            let body = serde_json::to_vec(&records).expect("JSON serializes");
            let request = http
                .post(format!("{base}/api/logs/batch?consistency={level}"))
                .header("content-type", "application/json");
            match self.compress {
                Compression::None => request.body(body),
                Compression::Gzip => {
                    use std::io::Write;
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&body).expect("writing to memory");
                    request
                        .header("content-encoding", "gzip")
                        .body(gz.finish().expect("writing to memory"))
                }
                Compression::Zstd => request.header("content-encoding", "zstd").body(
                    ruzstd::encoding::compress_to_vec(
                        &body[..],
                        ruzstd::encoding::CompressionLevel::Fastest,
                    ),
                ),
            }
        } else {
            let (key, value) = self.record(rng);
            http.post(format!("{base}/api/logs?consistency={level}"))
                .json(&serde_json::json!({"key": key, "value": value}))
        };
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let body = response.bytes().await.unwrap_or_default();
                let records = if !status.is_success() {
                    0
                } else if self.scenario == Scenario::Batch && !read {
                    serde_json::from_slice::<BatchCounts>(&body).map_or(0, |c| c.written)
                } else {
                    1
                };
                if status.is_success() && !read {
                    self.record_acked(&body);
                }
                Answer {
                    status: status.as_u16().to_string(),
                    records,
                }
            }
            Err(_) => Answer {
                status: "0".into(),
                records: 0,
            },
        }
    }
}

impl Worker {
    /// Appends the acknowledged writes of an answer to the `--acked` file.
    fn record_acked(&self, body: &[u8]) {
        let Some(file) = &self.acked else { return };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        let written: Vec<&serde_json::Value> = match answer["results"].as_array() {
            Some(results) => results.iter().filter(|r| r["status"] == 201).collect(),
            None => vec![&answer],
        };
        let mut lines = String::new();
        for w in written {
            if let (Some(key), Some(node), Some(seq)) = (
                w["key"].as_str(),
                w["version"]["node"].as_str(),
                w["version"]["seq"].as_u64(),
            ) {
                lines.push_str(&format!("{key}\t{node}\t{seq}\n"));
            }
        }
        use std::io::Write;
        let _ = file
            .lock()
            .expect("no panics while held")
            .write_all(lines.as_bytes());
    }
}

/// `--verify`: every acknowledged write is in its key's history at ALL.
async fn verify(http: &reqwest::Client, base: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut wanted: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split('\t');
        if let (Some(key), Some(node), Some(seq)) = (parts.next(), parts.next(), parts.next()) {
            wanted
                .entry(key.to_string())
                .or_default()
                .push((node.to_string(), seq.parse()?));
        }
    }
    let total: usize = wanted.values().map(Vec::len).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut missing = 0;
        let mut unreadable = 0;
        for (key, dots) in &wanted {
            let url = format!("{base}/api/logs/{key}/history?consistency=ALL&limit=1000");
            let answer: Option<serde_json::Value> = match http.get(url).send().await {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            let Some(answer) = answer else {
                unreadable += 1;
                missing += dots.len();
                continue;
            };
            let versions = answer["versions"].as_array().cloned().unwrap_or_default();
            for (node, seq) in dots {
                let found = versions
                    .iter()
                    .any(|v| v["version"]["node"] == node.as_str() && v["version"]["seq"] == *seq);
                missing += usize::from(!found);
            }
        }
        if missing == 0 {
            println!("verified: all {total} acknowledged writes are in their keys' history at ALL");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{missing} of {total} acknowledged writes missing at ALL ({unreadable} keys unreadable)"
            );
        }
        println!("{missing} of {total} acknowledged writes not yet at ALL; retrying");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Per-second latency of a run, shared by its clients.
struct Timeline {
    started: Instant,
    seconds: Mutex<Vec<(Histogram<u64>, u64)>>,
}

impl Timeline {
    fn record(&self, at: Instant, micros: u64, error: bool) {
        let second = at.saturating_duration_since(self.started).as_secs() as usize;
        let mut seconds = self.seconds.lock().expect("no panics while held");
        while seconds.len() <= second {
            let h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2).expect("valid bounds");
            seconds.push((h, 0));
        }
        seconds[second].0.saturating_record(micros);
        seconds[second].1 += u64::from(error);
    }

    fn seconds(&self) -> Vec<Second> {
        let seconds = self.seconds.lock().expect("no panics while held");
        seconds
            .iter()
            .enumerate()
            .map(|(i, (h, errors))| Second {
                second: i as u64,
                requests: h.len(),
                errors: *errors,
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect()
    }
}

async fn run_level(
    args: &Args,
    target: Target,
    level: &str,
    acked: Option<Arc<Mutex<std::fs::File>>>,
) -> anyhow::Result<Report> {
    let peer = matches!(target, Target::Peer(_));
    let worker = Arc::new(Worker {
        target,
        acked,
        level: level.to_string(),
        scenario: args.scenario,
        keys: args.keys.max(1),
        batch_size: args.batch_size,
        compress: args.compress,
        payload: "x".repeat(args.payload_bytes).into(),
    });
    let duration = Duration::from_secs_f64(args.duration);
    let budget = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    let started = Instant::now();
    let deadline = started + duration;
    let timeline = Arc::new(Timeline {
        started,
        seconds: Mutex::new(Vec::new()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let clients = args.clients;
    for client in 0..clients {
        let (worker, budget, timeline) = (worker.clone(), budget.clone(), timeline.clone());
        // Open-loop: this client's share of the rate, offset so clients interleave.
        let interval = args
            .rate
            .map(|rate| Duration::from_secs_f64(args.clients as f64 / rate));
        tasks.spawn(async move {
            let (mut accepted, mut refused) = (histogram(), histogram());
            let mut histogram = histogram();
            let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
            let mut records = 0;
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
                let answer = worker.request(&mut rng).await;
                let micros = scheduled.elapsed().as_micros().max(1) as u64;
                histogram.saturating_record(micros);
                let ok = answer.status == "ok" || answer.status.starts_with('2');
                if ok {
                    accepted.saturating_record(micros);
                } else if answer.status == "503" || answer.status == "429" {
                    refused.saturating_record(micros);
                }
                timeline.record(scheduled, micros, !ok);
                records += answer.records;
                *statuses.entry(answer.status).or_default() += 1;
                if let Some(interval) = interval {
                    scheduled += interval;
                }
            }
            (histogram, accepted, refused, statuses, records)
        });
    }
    let (mut accepted, mut refused) = (histogram(), histogram());
    let mut histogram = histogram();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut records = 0;
    while let Some(done) = tasks.join_next().await {
        let (h, a, f, s, r) = done.context("a client task failed")?;
        histogram.add(&h).context("merge histograms")?;
        accepted.add(&a).context("merge histograms")?;
        refused.add(&f).context("merge histograms")?;
        records += r;
        for (status, n) in s {
            *statuses.entry(status).or_default() += n;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let at = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ms = |q: f64| at(&histogram, q);
    let ok: u64 = statuses
        .iter()
        .filter(|(s, _)| *s == "ok" || s.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    Ok(Report {
        scenario: args.scenario,
        target: if peer { "peer-postgres" } else { "geolog" },
        consistency: if peer { "PEER".into() } else { level.into() },
        mode: if args.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        },
        clients: args.clients,
        records_per_request: if args.scenario == Scenario::Batch {
            args.batch_size
        } else {
            1
        },
        payload_bytes: args.payload_bytes,
        keys: args.keys,
        seconds,
        requests: histogram.len(),
        requests_per_second: histogram.len() as f64 / seconds,
        records,
        records_per_second: records as f64 / seconds,
        availability: ok as f64 / histogram.len().max(1) as f64,
        statuses,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        accepted_p50_ms: at(&accepted, 0.5),
        accepted_p99_ms: at(&accepted, 0.99),
        refused: refused.len(),
        refused_p50_ms: at(&refused, 0.5),
        refused_p99_ms: at(&refused, 0.99),
        timeline: timeline.seconds(),
    })
}

/// Writes the keyspace once so reads find something.
async fn populate(args: &Args, http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let keys = args.keys.clamp(1, 5_000);
    println!("writing {keys} keys for the read scenario ...");
    for start in (0..keys).step_by(500) {
        let records: Vec<serde_json::Value> = (start..(start + 500).min(keys))
            .map(|i| serde_json::json!({"key": format!("load-{i}"), "value": i}))
            .collect();
        let response = http
            .post(format!("{base}/api/logs/batch?consistency=ALL"))
            .json(&records)
            .send()
            .await
            .context("populate request")?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!("populating keys failed with {}", response.status());
        }
    }
    Ok(())
}

/// Resident memory of every process of the cluster (and its PostgreSQL servers).
fn rss_snapshot(args: &Args) -> Vec<(String, String, u32, Option<u64>)> {
    let Ok(file) = cluster_file(args) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for p in &file.processes {
        rows.push((p.role.clone(), p.id.clone(), p.pid, rss_kib(p.pid)));
        if let Some(pg) = p.postgres_pid {
            rows.push(("postgres".into(), p.id.clone(), pg, rss_kib(pg)));
        }
    }
    rows
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn print_report(report: &Report) {
    let statuses: Vec<String> = report
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}:{n}"))
        .collect();
    println!(
        "{:<14} {:>9} {:>9.1} {:>10.1} {:>6.1}%  {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
        report.consistency,
        report.requests,
        report.requests_per_second,
        report.records_per_second,
        report.availability * 100.0,
        report.p50_ms,
        report.p90_ms,
        report.p99_ms,
        report.p999_ms,
        report.max_ms,
        statuses.join(" ")
    );
    if report.refused > 0 {
        println!(
            "{:<14} accepted p50 {:.2} ms, p99 {:.2} ms; refused (503/429) {} = {:.1}% of requests, p50 {:.2} ms, p99 {:.2} ms",
            "",
            report.accepted_p50_ms,
            report.accepted_p99_ms,
            report.refused,
            report.refused as f64 * 100.0 / report.requests.max(1) as f64,
            report.refused_p50_ms,
            report.refused_p99_ms,
        );
    }
}

#[derive(Serialize)]
struct Output<'a> {
    reports: &'a [Report],
    rss: Vec<Rss>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.clients == 0
        || args.duration <= 0.0
        || args.rate.is_some_and(|r| r <= 0.0)
        || args.batch_size == 0
    {
        bail!("--clients, --duration, --rate and --batch-size must be positive");
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * args.consistency.len().max(1))
        .timeout(Duration::from_secs(30))
        .build()?;
    if let Some(path) = &args.verify {
        return verify(&http, &gateway_url(&args)?, path).await;
    }
    let acked = match &args.acked {
        Some(path) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))?,
        ))),
        None => None,
    };
    let peer = match &args.peer_postgres {
        Some(url) => Some(peer::PeerTarget::connect(url, args.clients as u32).await?),
        None => None,
    };
    let base = match &peer {
        None => gateway_url(&args)?,
        Some(_) => "the PostgreSQL peer".to_string(),
    };
    if matches!(args.scenario, Scenario::Read | Scenario::Mixed) {
        match &peer {
            Some(peer) => peer.populate().await?,
            None => populate(&args, &http, &base).await?,
        }
        args.keys = args.keys.clamp(1, peer::READ_KEYS);
    }
    let rss_start = if args.rss {
        rss_snapshot(&args)
    } else {
        Vec::new()
    };
    let per_request = if args.scenario == Scenario::Batch {
        format!(", {} records per request", args.batch_size)
    } else {
        String::new()
    };
    println!(
        "target {base}, {:?}{per_request}, {} clients, {} keys, {} B payload, {} s per level",
        args.scenario, args.clients, args.keys, args.payload_bytes, args.duration
    );
    println!(
        "{:<14} {:>9} {:>9} {:>10} {:>7}  {:>8} {:>8} {:>8} {:>8} {:>8}  statuses",
        "level",
        "requests",
        "req/s",
        "records/s",
        "ok",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms"
    );
    let target = |level: &str| match &peer {
        Some(peer) => (Target::Peer(peer.clone()), "PEER".to_string()),
        None => (
            Target::Gateway {
                http: http.clone(),
                base: base.clone(),
            },
            level.to_string(),
        ),
    };
    let levels: Vec<String> = if peer.is_some() {
        vec!["PEER".into()]
    } else {
        args.consistency.clone()
    };
    let args = Arc::new(args);
    let mut reports = Vec::new();
    if args.concurrent_levels {
        let mut runs = tokio::task::JoinSet::new();
        for (i, level) in levels.iter().enumerate() {
            let (t, level) = target(level);
            let args = args.clone();
            let acked = acked.clone();
            runs.spawn(async move { (i, run_level(&args, t, &level, acked).await) });
        }
        let mut done = Vec::new();
        while let Some(run) = runs.join_next().await {
            let (i, report) = run?;
            done.push((i, report?));
        }
        done.sort_by_key(|(i, _)| *i);
        reports.extend(done.into_iter().map(|(_, r)| r));
        reports.iter().for_each(print_report);
    } else {
        for level in &levels {
            let (t, level) = target(level);
            let report = run_level(&args, t, &level, acked.clone()).await?;
            print_report(&report);
            reports.push(report);
        }
    }
    finish(&args, &peer, &reports, rss_start).await
}

/// Memory, JSON and plot after the runs; drops the peer's table.
async fn finish(
    args: &Args,
    peer: &Option<Arc<peer::PeerTarget>>,
    reports: &[Report],
    rss_start: Vec<(String, String, u32, Option<u64>)>,
) -> anyhow::Result<()> {
    if let Some(peer) = peer {
        peer.drop_table().await;
    }
    let mut rss = Vec::new();
    if args.rss {
        let end = rss_snapshot(args);
        println!("resident memory (KiB): role id start end");
        for (role, id, pid, start) in rss_start {
            let end_kib = end.iter().find(|(_, _, p, _)| *p == pid).and_then(|e| e.3);
            println!(
                "  {role:<13} {id:<8} {:>8} {:>8}",
                start.map_or("-".into(), |k| k.to_string()),
                end_kib.map_or("-".into(), |k| k.to_string())
            );
            rss.push(Rss {
                role,
                id,
                pid,
                start_kib: start,
                end_kib,
            });
        }
    }
    if let Some(path) = &args.json {
        let output = Output { reports, rss };
        std::fs::write(path, serde_json::to_string_pretty(&output)?)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::svg(reports))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_take_units_or_plain_seconds() {
        assert_eq!(parse_duration("30"), Ok(30.0));
        assert_eq!(parse_duration("30s"), Ok(30.0));
        assert_eq!(parse_duration("500ms"), Ok(0.5));
        assert_eq!(parse_duration("10m"), Ok(600.0));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }
}
