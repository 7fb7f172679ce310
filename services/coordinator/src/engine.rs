//! `QuorumEngine`: the write and read paths. It turns a consistency level
//! into a requirement, fails fast when the replicas believed alive cannot
//! meet it, sends, and counts answers with [`AckTracker`] until the level is
//! met, becomes impossible, or the deadline passes.
//!
//! Writes: a local replica (the first alive in preference order) mints the
//! version — its dot and HLC timestamp — and, in the same transaction, one
//! outbox entry per remote region. The version is then applied to the other
//! local replicas directly and sent once to each remote region's
//! coordinator, which applies it to that region's replicas and streams
//! their acks back. The client is answered once the level is met; delivery
//! continues in detached tasks, and a region's outbox entry is deleted only
//! when all its replicas have the version — otherwise the replay worker
//! (`outbox`) delivers it later.
//!
//! Reads: ask as many alive replicas as the level needs (local first, remote
//! ones through their region's coordinator), replace a local replica that
//! fails, ask one more local replica when the answer is slow (speculative
//! read), return the newest version.

use crate::replicas::{Replica, ReplicaSet};
use geolog_config::GeologConfig;
use geolog_core::causal::{self, Causal, Dot, VersionVector};
use geolog_core::consistency::Operation;
use geolog_core::ring::Placement;
use geolog_core::{AckTracker, ConsistencyLevel, ErrorCode, GeologError, Requirement};
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The outcome of a successful write or read.
#[derive(Debug)]
pub struct Outcome {
    /// The written version, or the deterministic pick among `siblings`.
    pub version: Option<pb::Version>,
    pub level: ConsistencyLevel,
    pub acks: geolog_core::error::QuorumDetails,
    /// The key's current versions (merged frontier).
    pub siblings: Vec<pb::Version>,
    /// Context token of the state the client now knows.
    pub context: String,
    /// Replicas written back by read repair.
    pub repaired: u32,
    /// True when a write was a retry answered with the first write's version.
    pub replayed: bool,
}

/// What a read asks each replica for.
#[derive(Debug, Clone)]
pub enum ReadKind {
    /// The key's frontier (current versions).
    Frontier,
    /// A page of the key's history.
    History {
        limit: u32,
        before: Option<pb::HistoryCursor>,
        after: Option<pb::HistoryCursor>,
    },
    /// The version created with an idempotency key.
    Idempotent { idempotency_key: String },
}

impl ReadKind {
    async fn query(
        &self,
        replica: &Replica,
        key: String,
    ) -> Result<Vec<pb::Version>, tonic::Status> {
        let mut client = replica.client.clone();
        match self {
            ReadKind::Frontier => Ok(client
                .read(pb::ReadRequest { key })
                .await?
                .into_inner()
                .versions),
            ReadKind::History { .. } => {
                let request = self
                    .history_request(&key)
                    .expect("history kind has a request");
                Ok(client.history(request).await?.into_inner().versions)
            }
            ReadKind::Idempotent { idempotency_key } => {
                let request = pb::FindIdempotentRequest {
                    key,
                    idempotency_key: idempotency_key.clone(),
                };
                Ok(client.find_idempotent(request).await?.into_inner().versions)
            }
        }
    }

    fn history_request(&self, key: &str) -> Option<pb::HistoryRequest> {
        match self {
            ReadKind::Frontier | ReadKind::Idempotent { .. } => None,
            ReadKind::History {
                limit,
                before,
                after,
            } => Some(pb::HistoryRequest {
                key: key.to_string(),
                limit: *limit,
                before: before.clone(),
                after: after.clone(),
            }),
        }
    }
}

impl ReadKind {
    fn idempotency_key(&self) -> String {
        match self {
            ReadKind::Idempotent { idempotency_key } => idempotency_key.clone(),
            _ => String::new(),
        }
    }
}

/// The hash that tells a retry (same request) from a reuse (another one).
pub fn body_hash(key: &str, value_json: &str, context: Option<&VersionVector>) -> String {
    let mut bytes = Vec::with_capacity(key.len() + value_json.len() + 2);
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(value_json.as_bytes());
    bytes.push(0);
    if let Some(context) = context {
        bytes.extend_from_slice(context.to_token().as_bytes());
    }
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// The answers a read collected.
struct Gathered {
    placement: Arc<Vec<Placement>>,
    answers: Vec<(usize, Vec<pb::Version>)>,
    acks: geolog_core::error::QuorumDetails,
    deadline: tokio::time::Instant,
}

/// A wire version seen through the causality functions.
#[derive(Clone)]
struct Wire {
    dot: Dot,
    context: VersionVector,
    version: pb::Version,
}

impl Wire {
    fn of(version: pb::Version) -> Wire {
        let dot = version
            .dot
            .as_ref()
            .map(|d| Dot::new(d.node.clone(), d.seq))
            .unwrap_or_else(|| Dot::new("", 0));
        let context = VersionVector(
            version
                .context
                .iter()
                .map(|(n, s)| (n.clone(), *s))
                .collect(),
        );
        Wire {
            dot,
            context,
            version,
        }
    }
}

impl Causal for Wire {
    fn dot(&self) -> &Dot {
        &self.dot
    }
    fn context(&self) -> &VersionVector {
        &self.context
    }
}

/// The causal frontier of versions from several replicas.
fn merge_frontiers(versions: impl Iterator<Item = pb::Version>) -> Vec<pb::Version> {
    causal::frontier(versions.map(Wire::of))
        .into_iter()
        .map(|w| w.version)
        .collect()
}

fn dot_set(versions: &[pb::Version]) -> BTreeSet<(String, u64)> {
    versions
        .iter()
        .filter_map(|v| v.dot.as_ref().map(|d| (d.node.clone(), d.seq)))
        .collect()
}

/// Everything a set of current versions has seen: the context token a reader gets.
pub fn state_vector_of(frontier: &[pb::Version]) -> VersionVector {
    let wires: Vec<Wire> = frontier.iter().cloned().map(Wire::of).collect();
    causal::state_vector(&wires)
}

/// History order: (timestamp, node, seq).
fn history_key(v: &pb::Version) -> (u64, String, u64) {
    let dot = v.dot.clone().unwrap_or_default();
    (
        v.timestamp.as_ref().map_or(0, |t| t.packed),
        dot.node,
        dot.seq,
    )
}

/// Why a replica did not acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    Failed,
    TimedOut,
}

impl Miss {
    fn of(status: &tonic::Status) -> Miss {
        if is_timeout(status) {
            Miss::TimedOut
        } else {
            Miss::Failed
        }
    }

    fn record(self, tracker: &mut AckTracker, idx: usize) {
        match self {
            Miss::Failed => tracker.record_failure(idx),
            Miss::TimedOut => tracker.record_timeout(idx),
        }
    }
}

/// The quorum engine of one coordinator.
pub struct QuorumEngine {
    region: String,
    rfs: Vec<(String, usize)>,
    default_level: ConsistencyLevel,
    write_timeout: Duration,
    read_timeout: Duration,
    speculative_read: Duration,
    replicas: Arc<ReplicaSet>,
    /// Fast path for retries: (key, idempotency key) → (body hash, version).
    /// Only a cache — the durable record travels with the version.
    recent_idempotency: moka::sync::Cache<(String, String), (String, pb::Version)>,
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
            speculative_read: config.coordinator.speculative_read(),
            replicas,
            recent_idempotency: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
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

    /// The key's replicas and the alive ones in contact order (local region
    /// first, then ring order), after the fail-fast check.
    fn plan(
        &self,
        key: &str,
        requirement: &Requirement,
    ) -> Result<(Arc<Vec<Placement>>, Vec<usize>), GeologError> {
        let placement = self.replicas.placement(key);
        let mut alive: Vec<usize> = (0..placement.len())
            .filter(|&i| self.replicas.is_alive(&placement[i]))
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

    fn local_replica(&self, node: &str) -> Arc<Replica> {
        self.replicas
            .local(node)
            .expect("placement in the local region names local nodes")
            .clone()
    }

    /// Writes `value_json` as a new version of `key`.
    pub async fn write(
        &self,
        key: &str,
        value_json: &str,
        level: ConsistencyLevel,
        context: Option<VersionVector>,
        idempotency_key: Option<String>,
    ) -> Result<Outcome, GeologError> {
        geolog_core::key::validate_key(key)?;
        let requirement = self.requirement(level, Operation::Write)?;
        let hash = idempotency_key
            .as_ref()
            .map(|_| body_hash(key, value_json, context.as_ref()));
        if let (Some(id), Some(hash)) = (&idempotency_key, &hash)
            && let Some(earlier) = self.find_idempotent(key, id).await
        {
            return self.replay(key, id, hash, earlier, level);
        }
        let (placement, alive) = self.plan(key, &requirement)?;
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        let mut tracker = Self::tracker(requirement, &placement);
        let remote_regions: Vec<String> = self
            .replicas
            .remote_regions()
            .iter()
            .map(|r| r.name.clone())
            .collect();

        // Mint on the first alive local replica that accepts.
        let mut minted = None;
        for &idx in alive
            .iter()
            .filter(|&&i| placement[i].region == self.region)
        {
            let replica = self.local_replica(&placement[idx].node);
            let request = pb::MintRequest {
                key: key.to_string(),
                value_json: value_json.to_string(),
                outbox_regions: remote_regions.clone(),
                has_context: context.is_some(),
                context: context
                    .clone()
                    .map(|c| c.0.into_iter().collect())
                    .unwrap_or_default(),
                idempotency_key: idempotency_key.clone().unwrap_or_default(),
                body_hash: hash.clone().unwrap_or_default(),
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
                    minted = Some((idx, response.into_inner()));
                    break;
                }
                Ok(Ok(Err(status))) => {
                    let err = GeologError::from_status(&status);
                    if err.code.http_status().is_client_error() {
                        return Err(err);
                    }
                    tracing::warn!(replica = %placement[idx].node, error = %err.message, "mint failed, trying next replica");
                    Miss::of(&status).record(&mut tracker, idx);
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
        let Some((mint_idx, minted)) = minted else {
            if tracker.received() == 0 && !alive.iter().any(|&i| placement[i].region == self.region)
            {
                return Err(GeologError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "no replica of region {} is alive to accept the write; use a gateway of another region",
                        self.region
                    ),
                ));
            }
            return Err(tracker.failure("write"));
        };
        let version = minted
            .version
            .ok_or_else(|| GeologError::internal("storage node minted no version"))?;
        if let (true, Some(id), Some(hash)) = (minted.replayed, &idempotency_key, &hash) {
            // The minting node already held a write with this key (the
            // lookup above could not reach it): nothing new was created.
            return self.replay(key, id, hash, version, level);
        }
        if let (Some(id), Some(hash)) = (&idempotency_key, &hash) {
            self.recent_idempotency.insert(
                (key.to_string(), id.clone()),
                (hash.clone(), version.clone()),
            );
        }
        let outbox: HashMap<String, u64> = minted
            .outbox
            .into_iter()
            .map(|e| (e.region, e.id))
            .collect();
        // What travels is the minting replica's whole frontier for the key
        // (state-based: see geolog_core::causal), which contains `version`.
        let frontier = minted.frontier;
        let context = state_vector_of(&frontier).to_token();

        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<(), Miss>)>();
        // Every other local replica, directly.
        for idx in 0..placement.len() {
            if placement[idx].region != self.region || tracker.answered(idx) {
                continue;
            }
            let replica = self.local_replica(&placement[idx].node);
            let (tx, frontier) = (tx.clone(), frontier.clone());
            tokio::spawn(async move {
                let result = apply(&replica, frontier).await.map_err(|s| Miss::of(&s));
                let _ = tx.send((idx, result));
            });
        }
        // Each remote region, through its coordinator.
        let mint_node = self.local_replica(&placement[mint_idx].node);
        for remote in self.replicas.remote_regions() {
            let idxs: Vec<usize> = (0..placement.len())
                .filter(|&i| placement[i].region == remote.name)
                .collect();
            let remote = remote.clone();
            let (tx, frontier, placement) = (tx.clone(), frontier.clone(), placement.clone());
            let outbox_id = outbox.get(&remote.name).copied();
            let (origin, mint_node) = (self.region.clone(), mint_node.clone());
            tokio::spawn(async move {
                let request = cpb::ReplicateRequest {
                    origin_region: origin,
                    versions: frontier,
                };
                let acks = replicate(&remote, request).await;
                let mut delivered = 0;
                let mut pending: Vec<usize> = idxs.clone();
                if let Ok(acks) = &acks {
                    for ack in acks {
                        if let Some(pos) =
                            pending.iter().position(|&i| placement[i].node == ack.node)
                        {
                            let idx = pending.remove(pos);
                            let result = if ack.ok {
                                delivered += 1;
                                Ok(())
                            } else if ack.timed_out {
                                Err(Miss::TimedOut)
                            } else {
                                Err(Miss::Failed)
                            };
                            let _ = tx.send((idx, result));
                        }
                    }
                }
                let miss = match &acks {
                    Err(status) => Miss::of(status),
                    Ok(_) => Miss::Failed,
                };
                for idx in pending {
                    let _ = tx.send((idx, Err(miss)));
                }
                if delivered == idxs.len()
                    && let Some(id) = outbox_id
                {
                    outbox_done(&mint_node, vec![id]).await;
                }
            });
        }
        drop(tx);
        while !tracker.is_met() {
            if tracker.is_impossible() {
                return Err(tracker.failure("write"));
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((idx, Ok(())))) => tracker.record_ok(idx),
                Ok(Some((idx, Err(miss)))) => miss.record(&mut tracker, idx),
                Ok(None) | Err(_) => return Err(tracker.failure("write")),
            }
        }
        Ok(Outcome {
            version: Some(version),
            level,
            acks: tracker.details(),
            siblings: Vec::new(),
            context,
            repaired: 0,
            replayed: false,
        })
    }

    /// Looks for the version created with idempotency key `id`: in the cache,
    /// then on every alive local replica and, through their coordinators, on
    /// every reachable replica of the other regions, within the read
    /// timeout. Unreachable replicas are skipped: during a partition a retry
    /// may not see a first write made on the other side.
    async fn find_idempotent(&self, key: &str, id: &str) -> Option<pb::Version> {
        if let Some((_, version)) = self
            .recent_idempotency
            .get(&(key.to_string(), id.to_string()))
        {
            return Some(version);
        }
        let placement = self.replicas.placement(key);
        let kind = ReadKind::Idempotent {
            idempotency_key: id.to_string(),
        };
        let mut lookups = tokio::task::JoinSet::new();
        for p in placement
            .iter()
            .filter(|p| p.region == self.region && self.replicas.is_alive(p))
        {
            let (replica, kind, key) = (self.local_replica(&p.node), kind.clone(), key.to_string());
            lookups.spawn(async move { kind.query(&replica, key).await.unwrap_or_default() });
        }
        for remote in self
            .replicas
            .remote_regions()
            .iter()
            .filter(|r| r.link.is_alive())
        {
            let count = placement.iter().filter(|p| p.region == remote.name).count() as u32;
            let request = cpb::RegionReadRequest {
                key: key.to_string(),
                replicas: count,
                history: None,
                idempotency_key: id.to_string(),
            };
            let remote = remote.clone();
            lookups.spawn(async move {
                region_read(&remote, request)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|a| a.versions)
                    .collect()
            });
        }
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        while let Ok(Some(found)) = tokio::time::timeout_at(deadline, lookups.join_next()).await {
            if let Some(version) = found.ok().and_then(|v| v.into_iter().next()) {
                return Some(version);
            }
        }
        None
    }

    /// The answer to a retry: the earlier version if the request is the
    /// same, `409 idempotency_conflict` if the key was used for another.
    fn replay(
        &self,
        key: &str,
        id: &str,
        hash: &str,
        earlier: pb::Version,
        level: ConsistencyLevel,
    ) -> Result<Outcome, GeologError> {
        if earlier.body_hash != hash {
            return Err(GeologError::new(
                ErrorCode::IdempotencyConflict,
                format!(
                    "idempotency key {id:?} was already used for a different request on key {key:?}"
                ),
            ));
        }
        metrics::counter!("idempotent_replays_total").increment(1);
        self.recent_idempotency.insert(
            (key.to_string(), id.to_string()),
            (hash.to_string(), earlier.clone()),
        );
        Ok(Outcome {
            context: state_vector_of(std::slice::from_ref(&earlier)).to_token(),
            version: Some(earlier),
            level,
            acks: Default::default(),
            siblings: Vec::new(),
            repaired: 0,
            replayed: true,
        })
    }

    /// Asks as many alive replicas as `level` needs for `kind` of `key` and
    /// returns every answer, by replica index, once the level is met.
    async fn gather(
        &self,
        key: &str,
        level: ConsistencyLevel,
        kind: &ReadKind,
    ) -> Result<Gathered, GeologError> {
        geolog_core::key::validate_key(key)?;
        let requirement = self.requirement(level, Operation::Read)?;
        let (placement, alive) = self.plan(key, &requirement)?;
        let started = tokio::time::Instant::now();
        let deadline = started + self.read_timeout;
        let initial = initial_read_set(&requirement, &placement, &alive);
        let mut untried: Vec<usize> = alive
            .iter()
            .copied()
            .filter(|i| !initial.contains(i) && placement[*i].region == self.region)
            .collect();
        let mut tracker = Self::tracker(requirement, &placement);

        // (replica, answer, whether it settles one of the answers in flight:
        // a remote region reports failed replicas it then replaces).
        type Answer = (usize, Result<Vec<pb::Version>, Miss>, bool);
        let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
        let send_local = |idx: usize| {
            let replica = self.local_replica(&placement[idx].node);
            let (tx, key, kind) = (tx.clone(), key.to_string(), kind.clone());
            tokio::spawn(async move {
                let result = kind.query(&replica, key).await.map_err(|s| Miss::of(&s));
                let _ = tx.send((idx, result, true));
            });
        };
        let mut in_flight = 0;
        let mut remote_counts: HashMap<&str, Vec<usize>> = HashMap::new();
        for &idx in &initial {
            if placement[idx].region == self.region {
                send_local(idx);
            } else {
                remote_counts
                    .entry(placement[idx].region.as_str())
                    .or_default()
                    .push(idx);
            }
            in_flight += 1;
        }
        for (region, idxs) in remote_counts {
            let Some(remote) = self.replicas.remote(region).cloned() else {
                continue;
            };
            let candidates: Vec<usize> = (0..placement.len())
                .filter(|&i| placement[i].region == region)
                .collect();
            let (tx, placement) = (tx.clone(), placement.clone());
            let wanted = idxs.len();
            let request = cpb::RegionReadRequest {
                key: key.to_string(),
                replicas: wanted as u32,
                history: kind.history_request(key),
                idempotency_key: kind.idempotency_key(),
            };
            tokio::spawn(async move {
                let answers = region_read(&remote, request).await;
                let mut reported = 0;
                let mut unused = candidates;
                if let Ok(answers) = &answers {
                    for answer in answers {
                        let Some(pos) = unused
                            .iter()
                            .position(|&i| placement[i].node == answer.node)
                        else {
                            continue;
                        };
                        let idx = unused.remove(pos);
                        let result = if answer.ok {
                            Ok(answer.versions.clone())
                        } else if answer.timed_out {
                            Err(Miss::TimedOut)
                        } else {
                            Err(Miss::Failed)
                        };
                        let settles = result.is_ok();
                        if settles {
                            reported += 1;
                        }
                        let _ = tx.send((idx, result, settles));
                    }
                }
                // Every asked-for answer that did not come is a miss.
                let miss = match &answers {
                    Err(status) => Miss::of(status),
                    Ok(_) => Miss::Failed,
                };
                let missing = wanted.saturating_sub(reported);
                let mut settled = 0;
                for idx in unused.into_iter().take(missing) {
                    let _ = tx.send((idx, Err(miss), true));
                    settled += 1;
                }
                // Fewer unused replicas than missing answers: settle the rest
                // without naming a replica.
                for _ in settled..missing {
                    let _ = tx.send((usize::MAX, Err(miss), true));
                }
            });
        }
        let mut answers: Vec<(usize, Vec<pb::Version>)> = Vec::new();
        let mut speculated = false;
        while !tracker.is_met() {
            if tracker.is_impossible() || in_flight == 0 {
                return Err(tracker.failure("read"));
            }
            let speculate_at = started + self.speculative_read;
            let received = tokio::select! {
                received = tokio::time::timeout_at(deadline, rx.recv()) => received,
                _ = tokio::time::sleep_until(speculate_at), if !speculated && !untried.is_empty() => {
                    speculated = true;
                    metrics::counter!("speculative_reads_total").increment(1);
                    send_local(untried.remove(0));
                    in_flight += 1;
                    continue;
                }
            };
            match received {
                Ok(Some((usize::MAX, _, settles))) => in_flight -= usize::from(settles),
                Ok(Some((idx, Ok(versions), settles))) => {
                    in_flight -= usize::from(settles);
                    if !tracker.answered(idx) {
                        tracker.record_ok(idx);
                        answers.push((idx, versions));
                    }
                }
                Ok(Some((idx, Err(miss), settles))) => {
                    in_flight -= usize::from(settles);
                    miss.record(&mut tracker, idx);
                    // Replace a failed local replica with the next alive one.
                    if placement[idx].region == self.region && !untried.is_empty() {
                        send_local(untried.remove(0));
                        in_flight += 1;
                    }
                }
                Ok(None) | Err(_) => return Err(tracker.failure("read")),
            }
        }
        Ok(Gathered {
            placement,
            answers,
            acks: tracker.details(),
            deadline,
        })
    }

    /// Reads the current value of `key`: the merged frontier of as many
    /// replicas as `level` needs. Replicas that disagree with the merge are
    /// written back before answering (so quorum reads never go backwards);
    /// the key's other replicas are repaired in the background.
    pub async fn read(&self, key: &str, level: ConsistencyLevel) -> Result<Outcome, GeologError> {
        let gathered = self.gather(key, level, &ReadKind::Frontier).await?;
        let merged: Vec<pb::Version> =
            merge_frontiers(gathered.answers.iter().flat_map(|(_, v)| v.iter().cloned()));
        let merged_dots = dot_set(&merged);
        let stale: Vec<usize> = gathered
            .answers
            .iter()
            .filter(|(_, v)| dot_set(v) != merged_dots)
            .map(|(i, _)| *i)
            .collect();
        let mut repaired = 0;
        if !stale.is_empty() && !merged.is_empty() {
            repaired = self.repair(&gathered, &stale, &merged).await;
            metrics::counter!("read_repairs_total").increment(repaired as u64);
        }
        if merged.len() > 1 {
            metrics::counter!("version_vector_conflicts_total").increment(1);
        }
        let context = state_vector_of(&merged).to_token();
        let version = merged
            .iter()
            .max_by(|a, b| order_key(a).cmp(&order_key(b)))
            .cloned();
        Ok(Outcome {
            version,
            level,
            acks: gathered.acks,
            siblings: merged,
            context,
            repaired: repaired as u32,
            replayed: false,
        })
    }

    /// Writes `merged` back to the stale replicas that were read (waiting,
    /// within the read deadline) and, in the background, to every other
    /// replica of the key. Returns how many read replicas acknowledged.
    async fn repair(&self, gathered: &Gathered, stale: &[usize], merged: &[pb::Version]) -> usize {
        let placement = &gathered.placement;
        let read: Vec<usize> = gathered.answers.iter().map(|(i, _)| *i).collect();
        let mut waits = tokio::task::JoinSet::new();
        let mut remote_stale: Vec<&str> = Vec::new();
        for &idx in stale {
            if placement[idx].region == self.region {
                let replica = self.local_replica(&placement[idx].node);
                let merged = merged.to_vec();
                waits.spawn(async move { apply(&replica, merged).await.is_ok() as usize });
            } else if !remote_stale.contains(&placement[idx].region.as_str()) {
                remote_stale.push(placement[idx].region.as_str());
            }
        }
        for region in &remote_stale {
            // One message repairs every replica of that region.
            if let Some(remote) = self.replicas.remote(region).cloned() {
                let count = stale
                    .iter()
                    .filter(|&&i| placement[i].region == *region)
                    .count();
                let request = cpb::ReplicateRequest {
                    origin_region: self.region.clone(),
                    versions: merged.to_vec(),
                };
                waits.spawn(async move {
                    match replicate(&remote, request).await {
                        Ok(acks) if acks.iter().all(|a| a.ok) => count,
                        _ => 0,
                    }
                });
            }
        }
        let mut repaired = 0;
        while let Ok(Some(done)) =
            tokio::time::timeout_at(gathered.deadline, waits.join_next()).await
        {
            repaired += done.unwrap_or(0);
        }
        // Background: the replicas not read.
        for idx in (0..placement.len()).filter(|i| !read.contains(i)) {
            if placement[idx].region == self.region {
                let replica = self.local_replica(&placement[idx].node);
                let merged = merged.to_vec();
                tokio::spawn(async move { apply(&replica, merged).await });
            }
        }
        for remote in self.replicas.remote_regions() {
            let untouched = !remote_stale.contains(&remote.name.as_str());
            let unread = (0..placement.len())
                .any(|i| placement[i].region == remote.name && !read.contains(&i));
            if untouched && unread {
                let remote = remote.clone();
                let request = cpb::ReplicateRequest {
                    origin_region: self.region.clone(),
                    versions: merged.to_vec(),
                };
                tokio::spawn(async move { replicate(&remote, request).await });
            }
        }
        repaired
    }

    /// A page of the key's history (superseded versions too), newest first,
    /// from as many replicas as `level` needs.
    pub async fn history(
        &self,
        key: &str,
        level: ConsistencyLevel,
        limit: u32,
        before: Option<pb::HistoryCursor>,
        after: Option<pb::HistoryCursor>,
    ) -> Result<(Vec<pb::Version>, bool, Outcome), GeologError> {
        let limit = limit.clamp(1, 1_000);
        let kind = ReadKind::History {
            limit,
            before,
            after,
        };
        let gathered = self.gather(key, level, &kind).await?;
        let more = gathered
            .answers
            .iter()
            .any(|(_, v)| v.len() >= limit as usize);
        let mut by_dot: BTreeMap<(String, u64), pb::Version> = BTreeMap::new();
        for v in gathered.answers.into_iter().flat_map(|(_, v)| v) {
            let dot = v
                .dot
                .as_ref()
                .map(|d| (d.node.clone(), d.seq))
                .unwrap_or_default();
            by_dot.entry(dot).or_insert(v);
        }
        let mut versions: Vec<pb::Version> = by_dot.into_values().collect();
        versions.sort_by_key(|v| std::cmp::Reverse(history_key(v)));
        let more = more || versions.len() > limit as usize;
        versions.truncate(limit as usize);
        let outcome = Outcome {
            version: None,
            level,
            acks: gathered.acks,
            siblings: Vec::new(),
            context: String::new(),
            repaired: 0,
            replayed: false,
        };
        Ok((versions, more, outcome))
    }

    /// Every replica of `key` and what it holds (its frontier), or why it
    /// did not answer. Asks all of them, whatever their believed health.
    pub async fn replica_view(&self, key: &str) -> Result<Vec<cpb::ReplicaView>, GeologError> {
        geolog_core::key::validate_key(key)?;
        let placement = self.replicas.placement(key);
        let mut calls = tokio::task::JoinSet::new();
        for p in placement.iter().filter(|p| p.region == self.region) {
            let replica = self.local_replica(&p.node);
            let key = key.to_string();
            calls.spawn(async move {
                let mut client = replica.probe_client();
                let request = pb::ReadRequest { key };
                let result =
                    tokio::time::timeout(Duration::from_secs(2), client.read(request)).await;
                let (answered, error, versions) = match result {
                    Ok(Ok(r)) => (true, String::new(), r.into_inner().versions),
                    Ok(Err(status)) => (false, status.message().to_string(), Vec::new()),
                    Err(_) => (false, "timed out".to_string(), Vec::new()),
                };
                vec![cpb::ReplicaView {
                    node: replica.node.clone(),
                    region: replica.region.clone(),
                    answered,
                    error,
                    versions,
                }]
            });
        }
        for remote in self.replicas.remote_regions() {
            let nodes: Vec<String> = placement
                .iter()
                .filter(|p| p.region == remote.name)
                .map(|p| p.node.clone())
                .collect();
            let (remote, key) = (remote.clone(), key.to_string());
            calls.spawn(async move {
                let request = cpb::RegionReadRequest {
                    key,
                    replicas: nodes.len() as u32,
                    history: None,
                    idempotency_key: String::new(),
                };
                let answers = region_read(&remote, request).await;
                nodes
                    .into_iter()
                    .map(|node| {
                        let found = answers
                            .as_ref()
                            .ok()
                            .and_then(|a| a.iter().find(|a| a.node == node));
                        match (found, &answers) {
                            (Some(a), _) => cpb::ReplicaView {
                                node,
                                region: remote.name.clone(),
                                answered: a.ok,
                                error: a.error.clone(),
                                versions: a.versions.clone(),
                            },
                            (None, Err(status)) => cpb::ReplicaView {
                                node,
                                region: remote.name.clone(),
                                answered: false,
                                error: format!("region unreachable: {}", status.message()),
                                versions: Vec::new(),
                            },
                            (None, Ok(_)) => cpb::ReplicaView {
                                node,
                                region: remote.name.clone(),
                                answered: false,
                                error: "not asked: believed dead by its region".into(),
                                versions: Vec::new(),
                            },
                        }
                    })
                    .collect()
            });
        }
        let mut views = Vec::new();
        while let Some(done) = calls.join_next().await {
            views.extend(
                done.map_err(|e| GeologError::internal(format!("replica view task failed: {e}")))?,
            );
        }
        let order: Vec<&str> = placement.iter().map(|p| p.node.as_str()).collect();
        views.sort_by_key(|v| order.iter().position(|n| *n == v.node));
        Ok(views)
    }

    /// For a remote region's `Replicate`: applies `versions` to this region's
    /// replicas of their keys, one batch per node, reporting each node's ack
    /// on the returned channel as it answers.
    pub fn apply_local(
        &self,
        versions: Vec<pb::Version>,
    ) -> mpsc::UnboundedReceiver<cpb::ReplicaAck> {
        let mut by_node: HashMap<String, Vec<pb::Version>> = HashMap::new();
        for version in versions {
            for p in self
                .replicas
                .placement(&version.key)
                .iter()
                .filter(|p| p.region == self.region)
            {
                by_node
                    .entry(p.node.clone())
                    .or_default()
                    .push(version.clone());
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (node, batch) in by_node {
            let replica = self.local_replica(&node);
            let tx = tx.clone();
            tokio::spawn(async move {
                let ack = match apply(&replica, batch).await {
                    Ok(()) => cpb::ReplicaAck {
                        node,
                        ok: true,
                        ..Default::default()
                    },
                    Err(status) => cpb::ReplicaAck {
                        node,
                        ok: false,
                        timed_out: Miss::of(&status) == Miss::TimedOut,
                        error: status.message().to_string(),
                    },
                };
                let _ = tx.send(ack);
            });
        }
        rx
    }

    /// For a remote region's `RegionRead`: reads `kind` of `key` from
    /// `wanted` alive replicas of this region, replacing failed ones,
    /// streaming answers.
    pub fn read_local(
        &self,
        key: String,
        wanted: usize,
        kind: ReadKind,
    ) -> mpsc::UnboundedReceiver<cpb::ReplicaVersions> {
        let placement = self.replicas.placement(&key);
        let mut candidates: Vec<Arc<Replica>> = placement
            .iter()
            .filter(|p| p.region == self.region && self.replicas.is_alive(p))
            .map(|p| self.local_replica(&p.node))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut answered = 0;
            while answered < wanted && !candidates.is_empty() {
                let batch: Vec<Arc<Replica>> = candidates
                    .drain(..(wanted - answered).min(candidates.len()))
                    .collect();
                let mut calls = tokio::task::JoinSet::new();
                for replica in batch {
                    let (key, kind) = (key.clone(), kind.clone());
                    calls.spawn(
                        async move { (replica.node.clone(), kind.query(&replica, key).await) },
                    );
                }
                while let Some(Ok((node, result))) = calls.join_next().await {
                    let answer = match result {
                        Ok(versions) => {
                            answered += 1;
                            cpb::ReplicaVersions {
                                node,
                                ok: true,
                                versions,
                                ..Default::default()
                            }
                        }
                        Err(status) => cpb::ReplicaVersions {
                            node,
                            ok: false,
                            timed_out: Miss::of(&status) == Miss::TimedOut,
                            error: status.message().to_string(),
                            versions: Vec::new(),
                        },
                    };
                    if tx.send(answer).is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

/// Applies versions to one local replica.
pub async fn apply(replica: &Replica, versions: Vec<pb::Version>) -> Result<(), tonic::Status> {
    let mut client = replica.client.clone();
    match client.apply(pb::ApplyRequest { versions }).await {
        Ok(_) => Ok(()),
        Err(status) => {
            tracing::debug!(replica = %replica.node, error = %status.message(), "apply failed");
            Err(status)
        }
    }
}

/// Deletes delivered outbox entries on the node that holds them; failures
/// only mean the replay worker sends them once more.
pub async fn outbox_done(replica: &Replica, ids: Vec<u64>) {
    let mut client = replica.client.clone();
    if let Err(status) = client.outbox_done(pb::OutboxDoneRequest { ids }).await {
        tracing::debug!(replica = %replica.node, error = %status.message(), "outbox cleanup failed; replay will resend");
    }
}

/// Sends versions to a remote region and collects every replica's ack.
pub async fn replicate(
    remote: &crate::replicas::RemoteRegion,
    request: cpb::ReplicateRequest,
) -> Result<Vec<cpb::ReplicaAck>, tonic::Status> {
    let mut client = remote.client.clone();
    let mut stream = client.replicate(request).await?.into_inner();
    let mut acks = Vec::new();
    while let Some(ack) = stream.message().await? {
        acks.push(ack);
    }
    Ok(acks)
}

async fn region_read(
    remote: &crate::replicas::RemoteRegion,
    request: cpb::RegionReadRequest,
) -> Result<Vec<cpb::ReplicaVersions>, tonic::Status> {
    let mut client = remote.client.clone();
    let mut stream = client.region_read(request).await?.into_inner();
    let mut answers = Vec::new();
    while let Some(answer) = stream.message().await? {
        answers.push(answer);
    }
    Ok(answers)
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
