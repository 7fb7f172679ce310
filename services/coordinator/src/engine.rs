//! `QuorumEngine`: the write and read paths. It turns a consistency level
//! into a requirement, fails fast when the replicas believed alive cannot
//! meet it, sends, and counts answers with [`AckTracker`] until the level is
//! met, becomes impossible, or the deadline passes.
//!
//! Writes: one replica (the first alive in preference order, local region
//! first) mints the version — its dot and HLC timestamp — and stores it;
//! the minted version is then applied to every other replica in parallel.
//! The client is answered once the level is met; delivery to the remaining
//! replicas continues in detached tasks.
//!
//! Reads: ask as many alive replicas as the level needs (local first),
//! replace any that fail with the next alive one, return the newest version.

use crate::replicas::{Replica, ReplicaSet};
use geolog_config::GeologConfig;
use geolog_core::consistency::Operation;
use geolog_core::ring::Placement;
use geolog_core::{AckTracker, ConsistencyLevel, ErrorCode, GeologError, Requirement};
use geolog_proto::storage as pb;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The outcome of a successful write or read.
#[derive(Debug)]
pub struct Outcome {
    pub version: Option<pb::Version>,
    pub level: ConsistencyLevel,
    pub acks: geolog_core::error::QuorumDetails,
}

/// The quorum engine of one coordinator.
pub struct QuorumEngine {
    region: String,
    rfs: Vec<(String, usize)>,
    default_level: ConsistencyLevel,
    write_timeout: Duration,
    read_timeout: Duration,
    replicas: Arc<ReplicaSet>,
}

impl QuorumEngine {
    pub fn new(config: &GeologConfig, region: &str, replicas: Arc<ReplicaSet>) -> Self {
        QuorumEngine {
            region: region.to_string(),
            rfs: config
                .replication_factors()
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect(),
            default_level: config.coordinator.default_level(),
            write_timeout: config.coordinator.write_timeout(),
            read_timeout: config.coordinator.read_timeout(),
            replicas,
        }
    }

    pub fn replicas(&self) -> &Arc<ReplicaSet> {
        &self.replicas
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Parses a level name; empty means the configured default.
    pub fn level(&self, name: &str) -> Result<ConsistencyLevel, GeologError> {
        if name.is_empty() {
            Ok(self.default_level)
        } else {
            name.parse()
        }
    }

    fn requirement(
        &self,
        level: ConsistencyLevel,
        op: Operation,
    ) -> Result<Requirement, GeologError> {
        let rfs: Vec<(&str, usize)> = self.rfs.iter().map(|(r, n)| (r.as_str(), *n)).collect();
        level.requirement(op, &rfs, &self.region)
    }

    /// The key's replicas, the alive ones in contact order (local region
    /// first, then ring order), after the fail-fast check.
    fn plan(
        &self,
        key: &str,
        requirement: &Requirement,
    ) -> Result<(Arc<Vec<Placement>>, Vec<usize>), GeologError> {
        let placement = self.replicas.placement(key);
        let mut alive: Vec<usize> = (0..placement.len())
            .filter(|&i| self.replicas.get(&placement[i].node).state.is_alive())
            .collect();
        alive.sort_by_key(|&i| placement[i].region != self.region);
        requirement.check_alive(alive.iter().map(|&i| placement[i].region.as_str()))?;
        Ok((placement, alive))
    }

    fn tracker(requirement: Requirement, placement: &[Placement]) -> AckTracker {
        AckTracker::new(
            requirement,
            placement.iter().map(|p| p.region.clone()).collect(),
        )
    }

    /// Writes `value_json` as a new version of `key`.
    pub async fn write(
        &self,
        key: &str,
        value_json: &str,
        level: ConsistencyLevel,
    ) -> Result<Outcome, GeologError> {
        geolog_core::key::validate_key(key)?;
        let requirement = self.requirement(level, Operation::Write)?;
        let (placement, alive) = self.plan(key, &requirement)?;
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        let mut tracker = Self::tracker(requirement, &placement);

        // Mint on the first alive replica that accepts.
        let mut minted = None;
        for &idx in &alive {
            let replica = self.replicas.get(&placement[idx].node).clone();
            let request = pb::MintRequest {
                key: key.to_string(),
                value_json: value_json.to_string(),
            };
            // Spawned so that, past our deadline, the call still runs to its
            // own end and a hung replica gets marked dead by its breaker.
            let call = tokio::spawn(async move {
                let mut client = replica.client.clone();
                client.mint(request).await
            });
            match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(Ok(response))) => {
                    tracker.record_ok(idx);
                    minted = response.into_inner().version;
                    break;
                }
                Ok(Ok(Err(status))) => {
                    let err = GeologError::from_status(&status);
                    if err.code.http_status().is_client_error() {
                        return Err(err);
                    }
                    tracing::warn!(replica = %placement[idx].node, error = %err.message, "mint failed, trying next replica");
                    record(&mut tracker, idx, &status);
                    if tracker.is_impossible() {
                        return Err(tracker.failure("write"));
                    }
                }
                Ok(Err(join)) => {
                    return Err(GeologError::internal(format!("mint task failed: {join}")));
                }
                Err(_) => return Err(tracker.failure("write")),
            }
        }
        let Some(version) = minted else {
            return Err(tracker.failure("write"));
        };

        // Apply to every other replica, whatever the level.
        let (tx, mut rx) = mpsc::unbounded_channel();
        for idx in 0..placement.len() {
            if tracker.answered(idx) {
                continue;
            }
            let replica = self.replicas.get(&placement[idx].node).clone();
            let tx = tx.clone();
            let version = version.clone();
            tokio::spawn(async move {
                let result = apply(&replica, version).await;
                let _ = tx.send((idx, result));
            });
        }
        drop(tx);
        while !tracker.is_met() {
            if tracker.is_impossible() {
                return Err(tracker.failure("write"));
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((idx, Ok(())))) => tracker.record_ok(idx),
                Ok(Some((idx, Err(status)))) => record(&mut tracker, idx, &status),
                Ok(None) | Err(_) => return Err(tracker.failure("write")),
            }
        }
        Ok(Outcome {
            version: Some(version),
            level,
            acks: tracker.details(),
        })
    }

    /// Reads the newest version of `key` from as many replicas as `level` needs.
    pub async fn read(&self, key: &str, level: ConsistencyLevel) -> Result<Outcome, GeologError> {
        geolog_core::key::validate_key(key)?;
        let requirement = self.requirement(level, Operation::Read)?;
        let (placement, alive) = self.plan(key, &requirement)?;
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        let initial = initial_read_set(&requirement, &placement, &alive);
        let mut untried: Vec<usize> = alive
            .iter()
            .copied()
            .filter(|i| !initial.contains(i))
            .collect();
        let mut tracker = Self::tracker(requirement, &placement);

        let (tx, mut rx) = mpsc::unbounded_channel();
        let send = |idx: usize| {
            let replica = self.replicas.get(&placement[idx].node).clone();
            let tx = tx.clone();
            let key = key.to_string();
            tokio::spawn(async move {
                let mut client = replica.client.clone();
                let result = client.read(pb::ReadRequest { key }).await;
                let _ = tx.send((idx, result.map(|r| r.into_inner().versions)));
            });
        };
        for &idx in &initial {
            send(idx);
        }
        let mut in_flight = initial.len();
        let mut newest: Option<pb::Version> = None;
        while !tracker.is_met() {
            if tracker.is_impossible() || in_flight == 0 {
                return Err(tracker.failure("read"));
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((idx, Ok(versions)))) => {
                    in_flight -= 1;
                    tracker.record_ok(idx);
                    for v in versions {
                        if newest.as_ref().is_none_or(|n| order_key(&v) > order_key(n)) {
                            newest = Some(v);
                        }
                    }
                }
                Ok(Some((idx, Err(status)))) => {
                    in_flight -= 1;
                    tracing::debug!(replica = %placement[idx].node, error = %status.message(), "read failed");
                    record(&mut tracker, idx, &status);
                    // Replace it with the next alive replica, preferring a
                    // region that still needs answers.
                    if let Some(pos) = next_replacement(&tracker, &placement, &untried) {
                        let next = untried.remove(pos);
                        send(next);
                        in_flight += 1;
                    }
                }
                Ok(None) | Err(_) => return Err(tracker.failure("read")),
            }
        }
        Ok(Outcome {
            version: newest,
            level,
            acks: tracker.details(),
        })
    }
}

/// Applies a version to one replica; true when it acknowledged.
/// Applies a version to one replica.
async fn apply(replica: &Replica, version: pb::Version) -> Result<(), tonic::Status> {
    let mut client = replica.client.clone();
    let request = pb::ApplyRequest {
        versions: vec![version],
    };
    match client.apply(request).await {
        Ok(_) => Ok(()),
        Err(status) => {
            tracing::debug!(replica = %replica.node, error = %status.message(), "apply failed");
            Err(status)
        }
    }
}

/// Records a failed RPC as a timeout or a failure.
fn record(tracker: &mut AckTracker, idx: usize, status: &tonic::Status) {
    if is_timeout(status) {
        tracker.record_timeout(idx);
    } else {
        tracker.record_failure(idx);
    }
}

/// True when the replica did not answer in time: a deadline status, or the
/// per-replica tower timeout somewhere in the error's sources.
fn is_timeout(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::DeadlineExceeded {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tower::timeout::error::Elapsed>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Newest first: highest HLC, ties broken by the minting node id.
fn order_key(v: &pb::Version) -> (u64, &str) {
    (
        v.timestamp.as_ref().map_or(0, |t| t.packed),
        v.dot.as_ref().map_or("", |d| d.node.as_str()),
    )
}

/// The replicas to ask first: for each region with a minimum, that many of
/// its alive replicas; then more alive ones (in contact order) up to the total.
fn initial_read_set(
    requirement: &Requirement,
    placement: &[Placement],
    alive: &[usize],
) -> Vec<usize> {
    let mut chosen = Vec::new();
    for (region, need) in &requirement.per_region {
        chosen.extend(
            alive
                .iter()
                .copied()
                .filter(|&i| &placement[i].region == region)
                .take(*need),
        );
    }
    for &i in alive {
        if chosen.len() >= requirement.total {
            break;
        }
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen
}

fn next_replacement(
    tracker: &AckTracker,
    placement: &[Placement],
    untried: &[usize],
) -> Option<usize> {
    let short: Vec<&str> = tracker.regions_short();
    untried
        .iter()
        .position(|&i| short.contains(&placement[i].region.as_str()))
        .or(if untried.is_empty() { None } else { Some(0) })
}

/// Measures how long `f` took and records it with its outcome.
pub async fn observed<T>(
    op: &'static str,
    level: &str,
    f: impl Future<Output = Result<T, GeologError>>,
) -> Result<T, GeologError> {
    let started = Instant::now();
    let result = f.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if e.code == ErrorCode::Unavailable => "unavailable",
        Err(e) if e.code == ErrorCode::Timeout => "timeout",
        Err(e) if e.code.http_status().is_client_error() => "rejected",
        Err(_) => "error",
    };
    let labels = [
        ("op", op.to_string()),
        ("consistency", level.to_string()),
        ("outcome", outcome.to_string()),
    ];
    metrics::counter!("coordinator_requests_total", &labels).increment(1);
    metrics::histogram!("coordinator_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    result
}
