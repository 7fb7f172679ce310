//! The replay worker: the cross-region outbox and hinted handoff. Every
//! version minted in this region is owed to each remote region by its
//! minting node, which keeps a cursor per remote region over its own
//! versions (see the storage node's `delivery`); the write path reports the
//! versions it delivered to every replica of a region. Whatever is left —
//! the region was unreachable, a replica there was down, this coordinator
//! died mid-write — this worker sends again, oldest first, in batches, with
//! exponential backoff per region while it keeps failing, and reports them
//! delivered so the cursor moves on. Replays are idempotent on the
//! receiving side. Its state is visible in metrics (`worker_state{worker="outbox-replay"}`,
//! `outbox_depth`, `outbox_oldest_age_seconds`, `outbox_replayed_total`)
//! and in health answers.

use crate::engine::{QuorumEngine, apply, outbox_done, replicate};
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Longest pause between replay attempts to a failing region.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Batches sent to one region per node per pass, so one region cannot starve the others.
const MAX_BATCHES_PER_PASS: usize = 16;

/// The outbox as last measured: per remote region, depth and oldest age.
#[derive(Default)]
pub struct OutboxView {
    regions: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Pending hints per target node, same shape.
    hints: Mutex<BTreeMap<String, (u64, u64)>>,
}

impl OutboxView {
    pub fn health(&self) -> Vec<cpb::OutboxHealth> {
        Self::entries(&self.regions)
    }

    /// Hints waiting, per target node (`region` holds the node id).
    pub fn hints(&self) -> Vec<cpb::OutboxHealth> {
        Self::entries(&self.hints)
    }

    fn entries(map: &Mutex<BTreeMap<String, (u64, u64)>>) -> Vec<cpb::OutboxHealth> {
        map.lock()
            .expect("lock is never poisoned: no panics while held")
            .iter()
            .map(|(region, (depth, oldest_age_ms))| cpb::OutboxHealth {
                region: region.clone(),
                depth: *depth,
                oldest_age_ms: *oldest_age_ms,
            })
            .collect()
    }
}

struct Backoff {
    until: Instant,
    delay: Duration,
}

/// How the replay worker paces itself and what it lets expire.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    pub interval: Duration,
    pub batch: u32,
    /// Entries younger than this may still be in their first delivery.
    pub min_age: Duration,
    /// `None`: versions owed to a region are never passed undelivered.
    pub outbox_window: Option<Duration>,
}

impl From<&geolog_config::CoordinatorSettings> for ReplaySettings {
    fn from(c: &geolog_config::CoordinatorSettings) -> Self {
        ReplaySettings {
            interval: c.outbox_replay_interval(),
            batch: c.outbox_batch,
            min_age: c.write_timeout(),
            outbox_window: (c.outbox_window_ms > 0)
                .then(|| Duration::from_millis(c.outbox_window_ms)),
        }
    }
}

/// The cross-region outbox and hint replay worker: each step measures the
/// queues, replays what every reachable region is owed (a region that
/// failed waits out its own backoff, the others go on) and replays hints.
pub struct Replay {
    engine: Arc<QuorumEngine>,
    view: Arc<OutboxView>,
    settings: ReplaySettings,
    backoff: BTreeMap<String, Backoff>,
    last_stats: LastStats,
}

impl Replay {
    pub fn new(engine: Arc<QuorumEngine>, view: Arc<OutboxView>, settings: ReplaySettings) -> Self {
        Replay {
            engine,
            view,
            settings,
            backoff: BTreeMap::new(),
            last_stats: LastStats::default(),
        }
    }
}

impl geolog_worker::Worker for Replay {
    fn name(&self) -> &str {
        "outbox-replay"
    }

    /// Busy when it sent something (more may wait), throttled while a
    /// region waits out its backoff, idle otherwise.
    async fn step(&mut self) -> Result<geolog_worker::Next, String> {
        use geolog_worker::Next;
        let (engine, settings) = (&self.engine, &self.settings);
        measure(engine, &self.view, &mut self.last_stats).await;
        let mut sent_any = false;
        let mut throttled: Option<Instant> = None;
        for remote in engine.replicas().remote_regions() {
            if let Some(b) = self.backoff.get(&remote.name)
                && Instant::now() < b.until
            {
                throttled = Some(throttled.map_or(b.until, |t| t.min(b.until)));
                continue;
            }
            match replay_region(engine, &remote.name, settings).await {
                Ok(0) => {
                    self.backoff.remove(&remote.name);
                }
                Ok(sent) => {
                    sent_any = true;
                    self.backoff.remove(&remote.name);
                    tracing::info!(region = %remote.name, versions = sent, "outbox replayed");
                }
                Err(reason) => {
                    let delay = self
                        .backoff
                        .get(&remote.name)
                        .map_or(settings.interval, |b| (b.delay * 2).min(MAX_BACKOFF));
                    tracing::warn!(region = %remote.name, %reason, retry_in_ms = delay.as_millis() as u64, "outbox replay failed");
                    let until = Instant::now() + delay;
                    throttled = Some(throttled.map_or(until, |t| t.min(until)));
                    self.backoff
                        .insert(remote.name.clone(), Backoff { until, delay });
                }
            }
        }
        match replay_hints(engine, settings).await {
            0 => {}
            sent => {
                sent_any = true;
                tracing::info!(versions = sent, "hints replayed");
            }
        }
        Ok(match throttled {
            _ if sent_any => Next::Busy,
            // Not past the next replay interval: the other regions are
            // replayed then too.
            Some(until) => Next::Throttled(
                until
                    .saturating_duration_since(Instant::now())
                    .min(settings.interval),
            ),
            None => Next::Idle,
        })
    }
}

/// Sends every pending entry for `region` from every alive local node.
/// Returns how many versions were delivered, or why it stopped.
async fn replay_region(
    engine: &QuorumEngine,
    region: &str,
    settings: &ReplaySettings,
) -> Result<usize, String> {
    let batch = settings.batch;
    let remote = engine
        .replicas()
        .remote(region)
        .expect("regions come from the replica set")
        .clone();
    let mut sent = 0;
    for replica in engine.replicas().all_local().filter(|r| r.state.is_alive()) {
        for _ in 0..MAX_BATCHES_PER_PASS {
            let mut client = replica.client.clone();
            let request = pb::OutboxPendingRequest {
                region: region.to_string(),
                limit: batch,
                min_age_ms: settings.min_age.as_millis() as u64,
                window_ms: settings.outbox_window.map_or(0, |w| w.as_millis() as u64),
            };
            let entries = match client.outbox_pending(request).await {
                Ok(response) => response.into_inner().entries,
                Err(status) => {
                    tracing::debug!(replica = %replica.node, error = %status.message(), "cannot read outbox");
                    break;
                }
            };
            if entries.is_empty() {
                break;
            }
            let full = entries.len() as u32 == batch;
            let delivered: Vec<pb::OutboxEntry> = entries
                .iter()
                .map(|e| pb::OutboxEntry {
                    id: e.id,
                    region: region.to_string(),
                    ..Default::default()
                })
                .collect();
            let count = entries.iter().filter(|e| e.version.is_some()).count();
            // Each version with its key's frontier on this node: the
            // receiver merges whole states, never a bare version (see
            // geolog_core::causal).
            let versions: Vec<pb::Version> = entries
                .into_iter()
                .flat_map(|e| e.frontier.into_iter().chain(e.version))
                .collect();
            let acks = replicate(&remote, versions)
                .await
                .map_err(|miss| format!("region unreachable: {miss}"))?;
            if let Some(failed) = acks.iter().find(|a| !a.ok) {
                return Err(format!(
                    "replica {} of region {region} failed: {}",
                    failed.node, failed.error
                ));
            }
            outbox_done(replica, delivered).await;
            sent += count;
            metrics::counter!("outbox_replayed_total", "region" => region.to_string())
                .increment(count as u64);
            if !full {
                break;
            }
        }
    }
    Ok(sent)
}

/// One node's figures for a queue: (destination — a remote region or a
/// target node —, pending, age of the oldest in ms).
type QueueFigures = Vec<(String, u64, u64)>;

/// Each local node's last outbox and hint figures: a node believed dead, or
/// whose stats call fails, counts with its last answer, not as empty (what
/// a node owes it still owes while it cannot be asked).
#[derive(Default)]
struct LastStats {
    outbox: BTreeMap<String, QueueFigures>,
    hints: BTreeMap<String, QueueFigures>,
}

/// Sums the outbox and the hints of every local node into `view` and the
/// gauges (asking the nodes believed alive).
async fn measure(engine: &QuorumEngine, view: &OutboxView, last: &mut LastStats) {
    let mut totals: BTreeMap<String, (u64, u64)> = engine
        .replicas()
        .remote_regions()
        .iter()
        .map(|r| (r.name.clone(), (0, 0)))
        .collect();
    sum_queue(
        engine,
        &mut last.outbox,
        &mut totals,
        |mut client| async move {
            let regions = client.outbox_stats(pb::OutboxStatsRequest {}).await?;
            Ok(regions
                .into_inner()
                .regions
                .into_iter()
                .map(|s| (s.region, s.depth, s.oldest_age_ms))
                .collect())
        },
    )
    .await;
    for (region, (depth, age)) in &totals {
        metrics::gauge!("outbox_depth", "region" => region.clone()).set(*depth as f64);
        metrics::gauge!("outbox_oldest_age_seconds", "region" => region.clone())
            .set(*age as f64 / 1000.0);
    }
    *view
        .regions
        .lock()
        .expect("lock is never poisoned: no panics while held") = totals;

    let mut hints: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    sum_queue(
        engine,
        &mut last.hints,
        &mut hints,
        |mut client| async move {
            let targets = client.hint_stats(pb::HintStatsRequest {}).await?;
            Ok(targets
                .into_inner()
                .targets
                .into_iter()
                .map(|s| (s.target, s.pending, s.oldest_age_ms))
                .collect())
        },
    )
    .await;
    for replica in engine.replicas().all_local() {
        let pending = hints.get(&replica.node).map_or(0, |h| h.0);
        metrics::gauge!("hints_pending", "target" => replica.node.clone()).set(pending as f64);
    }
    *view
        .hints
        .lock()
        .expect("lock is never poisoned: no panics while held") = hints;
}

/// Adds every local node's figures for one queue to `totals`: asked of the
/// nodes believed alive (`ask`), the last answer kept in `last` for the
/// others and for a failed call.
async fn sum_queue<F, Fut>(
    engine: &QuorumEngine,
    last: &mut BTreeMap<String, QueueFigures>,
    totals: &mut BTreeMap<String, (u64, u64)>,
    ask: F,
) where
    F: Fn(crate::replicas::ReplicaClient) -> Fut,
    Fut: std::future::Future<Output = Result<QueueFigures, tonic::Status>>,
{
    for replica in engine.replicas().all_local() {
        if replica.state.is_alive()
            && let Ok(figures) = ask(replica.client.clone()).await
        {
            last.insert(replica.node.clone(), figures);
        }
        for (destination, pending, age) in last.get(&replica.node).into_iter().flatten() {
            add_queue_stats(totals, destination.clone(), *pending, *age);
        }
    }
}

/// Adds one node's pending count and oldest age for `destination` (a remote
/// region or a target node) to the region-wide totals.
fn add_queue_stats(
    totals: &mut BTreeMap<String, (u64, u64)>,
    destination: String,
    pending: u64,
    oldest_age_ms: u64,
) {
    let entry = totals.entry(destination).or_default();
    entry.0 += pending;
    entry.1 = entry.1.max(oldest_age_ms);
}

/// Hinted handoff: for every local replica that is alive again, applies
/// the versions it missed (with their keys' frontiers) from every node that
/// holds hints for it, then deletes those hints. Returns versions delivered.
async fn replay_hints(engine: &QuorumEngine, settings: &ReplaySettings) -> usize {
    let batch = settings.batch;
    let mut sent = 0;
    let replicas: Vec<_> = engine.replicas().all_local().cloned().collect();
    for target in replicas.iter().filter(|r| r.state.is_alive()) {
        for holder in replicas
            .iter()
            .filter(|r| r.node != target.node && r.state.is_alive())
        {
            for _ in 0..MAX_BATCHES_PER_PASS {
                let mut client = holder.client.clone();
                let request = pb::HintPendingRequest {
                    target: target.node.clone(),
                    limit: batch,
                };
                let Ok(response) = client.hint_pending(request).await else {
                    break;
                };
                let entries = response.into_inner().entries;
                if entries.is_empty() {
                    break;
                }
                let full = entries.len() as u32 == batch;
                let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
                let versions: Vec<pb::Version> = entries
                    .into_iter()
                    .flat_map(|e| e.frontier.into_iter().chain(e.version))
                    .collect();
                if let Err(status) = apply(target, versions).await {
                    tracing::warn!(target = %target.node, error = %status, "hint replay failed");
                    break;
                }
                let count = ids.len();
                if let Err(status) = client.hint_done(pb::OutboxDoneRequest { ids }).await {
                    tracing::debug!(holder = %holder.node, error = %status.message(), "hint cleanup failed; will resend");
                }
                sent += count;
                metrics::counter!("hints_replayed_total", "target" => target.node.clone())
                    .increment(count as u64);
                if !full {
                    break;
                }
            }
        }
    }
    sent
}
