//! The read side of the quorum engine: gathering answers from as many
//! replicas as a level needs (local first, remote regions through their
//! coordinators, with replacement of failed replicas and one speculative
//! extra read), merging frontiers, read repair, history pages and the
//! operators' replica view.

use super::calls::{Miss, apply, region_read, region_replies, replicate};
use super::quorum::{Next, QuorumCall};
use super::{QuorumEngine, ReadValue};
use crate::SpawnTraced;
use crate::replicas::Replica;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use geolog_core::causal::{self, Causal, Dot, VersionVector};
use geolog_core::consistency::Operation;
use geolog_core::error::QuorumDetails;
use geolog_core::ring::Placement;
use geolog_core::{ConsistencyLevel, GeologError, Key, Requirement};
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
    /// Asks `replica` for this kind of `key` (the call outlives `self`).
    pub(super) fn query(
        &self,
        replica: Arc<Replica>,
        key: Key,
    ) -> impl Future<Output = Result<Vec<pb::Version>, Miss>> + Send + 'static {
        let kind = self.clone();
        async move {
            let mut client = replica.client.clone();
            let answer = match kind {
                // Concurrent frontier reads of one node share one call.
                ReadKind::Frontier => replica
                    .batches
                    .read
                    .call(vec![key.into_string()])
                    .await
                    .map(|mut frontiers| frontiers.pop().unwrap_or_default()),
                ReadKind::History { .. } => {
                    let request = kind
                        .history_request(&key)
                        .expect("history kind has a request");
                    client
                        .history(request)
                        .await
                        .map(|answer| answer.into_inner().versions)
                }
                ReadKind::Idempotent { idempotency_key } => {
                    let request = pb::FindIdempotentRequest {
                        key: key.into_string(),
                        idempotency_key,
                    };
                    client
                        .find_idempotent(request)
                        .await
                        .map(|answer| answer.into_inner().versions)
                }
            };
            answer.map_err(|status| Miss::of(&status))
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

/// The answers a read collected.
struct Gathered {
    placement: Arc<Vec<Placement>>,
    answers: Vec<(usize, Vec<pb::Version>)>,
    acks: geolog_core::error::QuorumDetails,
    deadline: tokio::time::Instant,
}

/// A read of a batch (its index) asking one of its replicas (its index in
/// the read's placement).
type Asked = (usize, usize);

/// A read of a batch, counted as its replicas answer for all its keys.
struct BatchedRead {
    placement: Arc<Vec<Placement>>,
    tracker: geolog_core::AckTracker,
    answers: Vec<(usize, Vec<pb::Version>)>,
    /// A replica it asked failed: it takes the lone read's path.
    missed: bool,
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
            .map(|d| Dot::new(d.node.as_str(), d.seq))
            .unwrap_or_else(|| Dot::new("", 0));
        let context = geolog_proto::vector_of(&version.context);
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
/// (What [`causal::state_vector`] computes, read off the wire versions
/// without copying them.)
pub fn state_vector_of(frontier: &[pb::Version]) -> VersionVector {
    let mut vv = VersionVector::default();
    for v in frontier {
        for d in v.context.iter().chain(&v.dot) {
            vv.raise(&d.node, d.seq);
        }
    }
    vv
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

impl QuorumEngine {
    /// Asks as many alive replicas as `level` needs for `kind` of `key` and
    /// returns every answer, by replica index, once the level is met; one
    /// more local replica if they have not answered `speculate_after`.
    async fn gather(
        &self,
        key: &Key,
        level: ConsistencyLevel,
        kind: &ReadKind,
        speculate_after: Duration,
    ) -> Result<Gathered, GeologError> {
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
        let mut call = QuorumCall::new(Self::tracker(requirement, &placement), deadline);
        // Local replicas are asked in this task (their calls are batched
        // per node, see `ReplicaBatches::read`); remote regions in tasks.
        let ask_local = |call: &mut QuorumCall<Vec<pb::Version>>, idx: usize| {
            let replica = self.local_replica(&placement[idx].node);
            call.ask(idx, kind.query(replica, key.clone()));
        };
        let mut remote_counts: HashMap<&str, Vec<usize>> = HashMap::new();
        for &idx in &initial {
            if placement[idx].region == self.region {
                ask_local(&mut call, idx);
            } else {
                remote_counts
                    .entry(placement[idx].region.as_str())
                    .or_default()
                    .push(idx);
            }
        }
        for (region, idxs) in remote_counts {
            let Some(remote) = self.replicas.remote(region).cloned() else {
                continue;
            };
            let candidates: Vec<usize> = (0..placement.len())
                .filter(|&i| placement[i].region == region)
                .collect();
            let placement = placement.clone();
            let wanted = idxs.len();
            let request = cpb::RegionReadRequest {
                key: key.to_string(),
                replicas: wanted as u32,
                history: kind.history_request(key),
                idempotency_key: kind.idempotency_key(),
            };
            call.spawn_many(wanted, async move {
                let answers = region_read(&remote, request).await;
                region_replies(&placement, candidates, wanted, answers)
            });
        }
        let mut answers: Vec<(usize, Vec<pb::Version>)> = Vec::new();
        let mut speculated = false;
        let speculate_at = started + speculate_after;
        while !call.is_met() {
            if call.cannot_be_met() {
                return Err(call.failure("read"));
            }
            let wake = (!speculated && !untried.is_empty()).then_some(speculate_at);
            match call.next(wake).await {
                Next::Answer(idx, Ok(versions)) => answers.push((idx, versions)),
                Next::Answer(idx, Err(_)) => {
                    // Replace a failed local replica with the next alive one.
                    if placement[idx].region == self.region && !untried.is_empty() {
                        ask_local(&mut call, untried.remove(0));
                    }
                }
                Next::Wake => {
                    speculated = true;
                    metrics::counter!("speculative_reads_total").increment(1);
                    ask_local(&mut call, untried.remove(0));
                }
                Next::Done => return Err(call.failure("read")),
            }
        }
        Ok(Gathered {
            placement,
            answers,
            acks: call.tracker().details(),
            deadline,
        })
    }

    /// Reads the current value of `key`: the merged frontier of as many
    /// replicas as `level` needs. Replicas that disagree with the merge are
    /// written back before answering (so quorum reads never go backwards);
    /// the key's other replicas are repaired in the background.
    pub async fn read(&self, key: &Key, level: ConsistencyLevel) -> Result<ReadValue, GeologError> {
        self.read_speculating(key, level, self.speculative_read)
            .await
    }

    /// [`QuorumEngine::read`], asking one more local replica if the first
    /// have not answered `speculate_after`.
    async fn read_speculating(
        &self,
        key: &Key,
        level: ConsistencyLevel,
        speculate_after: Duration,
    ) -> Result<ReadValue, GeologError> {
        let kind = ReadKind::Frontier;
        let gathered = self.gather(key, level, &kind, speculate_after).await?;
        Ok(self.conclude(gathered, level).await)
    }

    /// Reads the current values of `keys` at `level`, each answered as
    /// [`QuorumEngine::read`] would. The reads that need only local
    /// replicas ask each replica once for all their keys (one queued item,
    /// so one `ReadMany` call, per replica) and count its answer for every
    /// key in it. A read that is not met that way — a replica failed or is
    /// slower than the speculative-read delay — and a read that needs
    /// remote regions each take [`QuorumEngine::read`]'s path, its
    /// speculative read due when the batch's would have been.
    pub async fn read_batch(
        &self,
        keys: &[Key],
        level: ConsistencyLevel,
    ) -> Vec<Result<ReadValue, GeologError>> {
        let requirement = match self.requirement(level, Operation::Read) {
            Ok(requirement) => requirement,
            Err(err) => return keys.iter().map(|_| Err(err.clone())).collect(),
        };
        let started = tokio::time::Instant::now();
        let deadline = started + self.read_timeout;
        let mut results: Vec<Option<Result<ReadValue, GeologError>>> =
            keys.iter().map(|_| None).collect();
        let mut alone: Vec<usize> = Vec::new();
        let mut reads: Vec<Option<BatchedRead>> = keys.iter().map(|_| None).collect();
        // Per local node: which reads ask it, and as which of their replicas.
        let mut by_node: HashMap<&str, (&Arc<Replica>, Vec<Asked>)> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let (placement, alive) = match self.plan(key, &requirement) {
                Ok(planned) => planned,
                Err(err) => {
                    results[i] = Some(Err(err));
                    continue;
                }
            };
            let initial = initial_read_set(&requirement, &placement, &alive);
            if initial.iter().any(|&j| placement[j].region != self.region) {
                alone.push(i);
                continue;
            }
            for &j in &initial {
                let replica = self
                    .replicas
                    .local(&placement[j].node)
                    .expect("placement in the local region names local nodes");
                by_node
                    .entry(replica.node.as_str())
                    .or_insert_with(|| (replica, Vec::new()))
                    .1
                    .push((i, j));
            }
            reads[i] = Some(BatchedRead {
                tracker: Self::tracker(requirement.clone(), &placement),
                placement,
                answers: Vec::new(),
                missed: false,
            });
        }
        let mut calls: FuturesUnordered<_> = by_node
            .into_values()
            .map(|(replica, asked)| {
                let keys = asked.iter().map(|&(i, _)| keys[i].to_string()).collect();
                let answer = replica.batches.read.enqueue(keys);
                async move { (asked, answer.await) }
            })
            .collect();
        let settled = |r: &BatchedRead| r.missed || r.tracker.is_met();
        let speculate_at = started + self.speculative_read;
        while !reads.iter().flatten().all(settled) {
            let Ok(Some((asked, answer))) =
                tokio::time::timeout_at(speculate_at, calls.next()).await
            else {
                break;
            };
            match answer {
                Ok(frontiers) => {
                    for ((i, j), frontier) in asked.into_iter().zip(frontiers) {
                        let read = reads[i].as_mut().expect("asked reads are batched");
                        read.tracker.record_ok(j);
                        read.answers.push((j, frontier));
                    }
                }
                Err(status) => {
                    let miss = Miss::of(&status);
                    for (i, j) in asked {
                        let read = reads[i].as_mut().expect("asked reads are batched");
                        miss.record(&mut read.tracker, j);
                        read.missed = true;
                    }
                }
            }
        }
        drop(calls);
        let mut concluded = Vec::new();
        for (i, read) in reads.into_iter().enumerate() {
            let Some(read) = read else { continue };
            if !read.tracker.is_met() {
                alone.push(i);
                continue;
            }
            let gathered = Gathered {
                acks: read.tracker.details(),
                placement: read.placement,
                answers: read.answers,
                deadline,
            };
            concluded.push(async move { (i, self.conclude(gathered, level).await) });
        }
        let waited = started.elapsed();
        let alone = alone.into_iter().map(|i| async move {
            let speculate_after = self.speculative_read.saturating_sub(waited);
            (
                i,
                self.read_speculating(&keys[i], level, speculate_after)
                    .await,
            )
        });
        let (concluded, alone) = futures_util::future::join(
            futures_util::future::join_all(concluded),
            futures_util::future::join_all(alone),
        )
        .await;
        for (i, value) in concluded {
            results[i] = Some(Ok(value));
        }
        for (i, result) in alone {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.expect("every read answered"))
            .collect()
    }

    /// A read's answer from the replicas it gathered: their merged
    /// frontier, written back first to those that lacked part of it.
    async fn conclude(&self, gathered: Gathered, level: ConsistencyLevel) -> ReadValue {
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
        ReadValue {
            version,
            level,
            acks: gathered.acks,
            siblings: merged,
            context,
            repaired: repaired as u32,
        }
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
                waits.spawn_traced(async move { apply(&replica, merged).await.is_ok() as usize });
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
                let merged = merged.to_vec();
                waits.spawn_traced(async move {
                    match replicate(&remote, merged).await {
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
                crate::spawn_traced(async move { apply(&replica, merged).await });
            }
        }
        for remote in self.replicas.remote_regions() {
            let untouched = !remote_stale.contains(&remote.name.as_str());
            let unread = (0..placement.len())
                .any(|i| placement[i].region == remote.name && !read.contains(&i));
            if untouched && unread {
                let remote = remote.clone();
                let merged = merged.to_vec();
                crate::spawn_traced(async move { replicate(&remote, merged).await });
            }
        }
        repaired
    }

    /// A page of the key's history (superseded versions too), newest first,
    /// from as many replicas as `level` needs.
    pub async fn history(
        &self,
        key: &Key,
        level: ConsistencyLevel,
        limit: u32,
        before: Option<pb::HistoryCursor>,
        after: Option<pb::HistoryCursor>,
    ) -> Result<(Vec<pb::Version>, bool, QuorumDetails), GeologError> {
        let limit = limit.clamp(1, 1_000);
        let kind = ReadKind::History {
            limit,
            before,
            after,
        };
        let gathered = self
            .gather(key, level, &kind, self.speculative_read)
            .await?;
        let (versions, more) = merge_pages(
            gathered.answers.into_iter().map(|(_, page)| page),
            limit as usize,
        );
        Ok((versions, more, gathered.acks))
    }

    /// Every replica of `key` and what it holds (its frontier), or why it
    /// did not answer. Asks all of them, whatever their believed health.
    pub async fn replica_view(&self, key: &Key) -> Result<Vec<cpb::ReplicaView>, GeologError> {
        let placement = self.replicas.placement(key);
        let mut calls = tokio::task::JoinSet::new();
        for p in placement.iter().filter(|p| p.region == self.region) {
            let replica = self.local_replica(&p.node);
            let key = key.to_string();
            calls.spawn_traced(async move {
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
            calls.spawn_traced(async move {
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
                                error: format!("region unreachable: {status}"),
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
}

/// Several replicas' pages of one key's history (each newest first) as one
/// page of at most `limit` versions, and whether older ones may exist.
/// A replica's page may end before `limit` because it ran out of history
/// or because its node cut it by bytes ([`geolog_proto::HISTORY_PAGE_BYTES`]);
/// either way only its first versions are known, so the merged page holds
/// the newest `k` versions of the union, `k` the shortest non-empty page:
/// each of those is within the first `k` of every replica holding it. A
/// page that was cut short (or reached `limit`) leaves `more` set, and the
/// next page starts after the last version returned.
fn merge_pages(
    pages: impl Iterator<Item = Vec<pb::Version>>,
    limit: usize,
) -> (Vec<pb::Version>, bool) {
    let mut known = limit;
    let mut more = false;
    let mut by_dot: BTreeMap<(String, u64), pb::Version> = BTreeMap::new();
    for page in pages {
        if !page.is_empty() {
            known = known.min(page.len());
        }
        more |= page.len() >= limit;
        for v in page {
            let dot = v
                .dot
                .as_ref()
                .map(|d| (d.node.clone(), d.seq))
                .unwrap_or_default();
            by_dot.entry(dot).or_insert(v);
        }
    }
    let mut versions: Vec<pb::Version> = by_dot.into_values().collect();
    versions.sort_by_key(|v| std::cmp::Reverse(history_key(v)));
    // The answer fits one message whatever the replicas' pages added up to.
    let mut bytes = 0;
    let fits = versions
        .iter()
        .take_while(|v| {
            bytes += v.value_json.len() + 64;
            bytes <= geolog_proto::HISTORY_PAGE_BYTES
        })
        .count()
        .max(1);
    let keep = known.min(fits);
    more |= versions.len() > keep;
    versions.truncate(keep);
    (versions, more)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn version(node: &str, seq: u64, context: &[(&str, u64)]) -> pb::Version {
        pb::Version {
            dot: Some(pb::Dot {
                node: node.into(),
                seq,
            }),
            context: context
                .iter()
                .map(|&(node, seq)| pb::Dot {
                    node: node.into(),
                    seq,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn at(hlc: u64, node: &str, bytes: usize) -> pb::Version {
        pb::Version {
            dot: Some(pb::Dot {
                node: node.into(),
                seq: hlc,
            }),
            timestamp: Some(pb::Hlc { packed: hlc }),
            value_json: vec![b'1'; bytes].into(),
            ..Default::default()
        }
    }

    fn hlcs(versions: &[pb::Version]) -> Vec<u64> {
        versions
            .iter()
            .map(|v| v.timestamp.as_ref().unwrap().packed)
            .collect()
    }

    #[test]
    fn merged_history_pages_go_no_further_than_the_shortest_page() {
        // Both complete: the union, no more.
        let a = vec![at(5, "a", 1), at(3, "a", 1)];
        let b = vec![at(5, "a", 1), at(4, "b", 1), at(3, "a", 1)];
        let (page, more) = merge_pages([a.clone(), b].into_iter(), 10);
        assert_eq!((hlcs(&page), more), (vec![5, 4], true));
        // A lagging replica with nothing: the other's page.
        let (page, more) = merge_pages([a.clone(), Vec::new()].into_iter(), 10);
        assert_eq!((hlcs(&page), more), (vec![5, 3], false));
        // At the limit: more.
        let (page, more) = merge_pages([a.clone(), a].into_iter(), 2);
        assert_eq!((hlcs(&page), more), (vec![5, 3], true));
        // Cut by bytes: never past one message, never empty.
        let big = geolog_proto::HISTORY_PAGE_BYTES / 2;
        let pages = vec![at(9, "a", big), at(8, "a", big), at(7, "a", big)];
        let (page, more) = merge_pages([pages].into_iter(), 10);
        assert_eq!((hlcs(&page), more), (vec![9], true));
        let huge = vec![at(9, "a", 2 * geolog_proto::HISTORY_PAGE_BYTES)];
        let (page, more) = merge_pages([huge].into_iter(), 10);
        assert_eq!((hlcs(&page), more), (vec![9], false));
    }

    #[test]
    fn the_state_vector_of_wire_versions_is_the_causal_one() {
        let frontier = [
            version("a", 5, &[("a", 4), ("b", 2)]),
            version("b", 3, &[("a", 1), ("c", 7)]),
        ];
        let wires: Vec<Wire> = frontier.iter().cloned().map(Wire::of).collect();
        let expected = causal::state_vector(&wires);
        assert_eq!(state_vector_of(&frontier), expected);
        assert_eq!(
            expected,
            [("a", 5), ("b", 3), ("c", 7)]
                .into_iter()
                .collect::<VersionVector>()
        );
    }
}
