//! The write path: a batch fans out per destination, not per record; a
//! lone write is a batch of one (`QuorumEngine::write` adds what only it
//! has: idempotency lookups and `ANY` held as hints).
//! Its records are minted on their keys' first alive local replica — one
//! call per replica for all the records it mints — and the minted
//! frontiers then go to every other destination as one call each: one
//! `Apply` per other local replica, one `Replicate` per remote region. One
//! loop counts every record's acks as the destinations answer, so a batch
//! of 100 costs a handful of tasks, not hundreds.
//!
//! A mint that timed out may have committed: its records are not minted
//! again elsewhere (that would make two versions of one request) but fail
//! with `504`, "may have landed". A replica that refused the call outright
//! is replaced by the key's next alive local replica.

use super::calls::{Miss, apply, mint_together, outbox_done, replicate, store_hints};
use super::{QuorumEngine, Written, state_vector_of};
use crate::replicas::Replica;
use geolog_core::causal::VersionVector;
use geolog_core::consistency::Operation;
use geolog_core::ring::Placement;
use geolog_core::{AckTracker, ConsistencyLevel, ErrorCode, GeologError, JsonText, Key};
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A minted version and the node that minted it, which holds it as a hint
/// for a replica that misses it.
type Hinted = (Arc<Replica>, pb::Version);

/// One record of a batch (no idempotency key: those take the single path).
pub struct BatchRecord {
    pub key: Key,
    pub value_json: JsonText,
    pub context: Option<VersionVector>,
}

/// A record on its way: its placement, candidates and ack count.
pub(super) struct InFlight {
    placement: Arc<Vec<Placement>>,
    /// Local alive replicas not tried yet for the mint, in order.
    candidates: Vec<usize>,
    pub(super) tracker: AckTracker,
    pub(super) minted: Option<(usize, pb::MintResponse)>,
    pub(super) result: Option<Result<Written, GeologError>>,
    /// Dropped once the record is queued on its minting replica (see
    /// [`super::MintOrder`]).
    queued: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InFlight {
    /// A record of a key with `placement`, to be minted on the first of its
    /// `alive` replicas in `region` that accepts it.
    pub(super) fn new(
        placement: Arc<Vec<Placement>>,
        alive: Vec<usize>,
        tracker: AckTracker,
        region: &str,
    ) -> Self {
        InFlight {
            candidates: alive
                .into_iter()
                .filter(|&i| placement[i].region == region)
                .collect(),
            tracker,
            placement,
            minted: None,
            result: None,
            queued: None,
        }
    }

    /// `queued` is dropped once the record is queued for its mint.
    pub(super) fn signalling(mut self, queued: Option<tokio::sync::oneshot::Sender<()>>) -> Self {
        self.queued = queued;
        self
    }
}

/// What a destination answered for the records it was sent.
enum Answer {
    /// A local replica: every record's key state applied, or not.
    Local {
        node: String,
        records: Vec<usize>,
        result: Result<(), Miss>,
    },
    /// A remote region: its replicas' acks for the whole call.
    Region {
        region: String,
        records: Vec<usize>,
        acks: Result<Vec<cpb::ReplicaAck>, Miss>,
    },
}

impl QuorumEngine {
    /// Writes `records` at `level`; one result per record, in order.
    /// Records of one key are minted in batch order (they go to the same
    /// replica in one call). `together`: the records of one client batch,
    /// refused together when a minting replica's queue is full; otherwise
    /// (coalesced single writes) each is admitted or refused alone.
    pub async fn write_batch(
        &self,
        records: Vec<BatchRecord>,
        level: ConsistencyLevel,
        together: bool,
    ) -> Vec<Result<Written, GeologError>> {
        let requirement = match self.requirement(level, Operation::Write) {
            Ok(r) => r,
            Err(err) => return records.iter().map(|_| Err(err.clone())).collect(),
        };
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        let mut flights: Vec<InFlight> = Vec::with_capacity(records.len());
        for record in &records {
            let planned = self.plan(&record.key, &requirement);
            let (placement, alive, result) = match planned {
                Ok((placement, alive)) => (placement, alive, None),
                Err(err) => (
                    self.replicas.placement(&record.key),
                    Vec::new(),
                    Some(Err(err)),
                ),
            };
            let tracker = Self::tracker(requirement.clone(), &placement);
            let mut flight = InFlight::new(placement, alive, tracker, &self.region);
            flight.result = result;
            flights.push(flight);
        }
        if together && let Some(err) = self.refuse_if_overloaded(&flights) {
            for f in flights.iter_mut().filter(|f| f.result.is_none()) {
                f.result = Some(Err(err.clone().with_quorum(f.tracker.details())));
            }
        }
        let remote_regions = self.remote_region_names();
        let requests: Vec<pb::MintRequest> = records
            .into_iter()
            .map(|r| pb::MintRequest {
                key: r.key.into_string(),
                value_json: r.value_json.to_bytes(),
                outbox_regions: remote_regions.clone(),
                has_context: r.context.is_some(),
                context: r.context.map(geolog_proto::dots).unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        self.mint_all(&mut flights, &requests, together, deadline)
            .await;
        drop(requests);
        self.deliver(&mut flights, level, deadline).await;
        flights
            .into_iter()
            .map(|f| f.result.unwrap_or_else(|| Err(f.tracker.failure("write"))))
            .collect()
    }

    /// The batch is refused whole, nothing written, when a replica that
    /// would mint some of its records has a full queue: a client then
    /// retries the batch, not the records a `207` would list.
    fn refuse_if_overloaded(&self, flights: &[InFlight]) -> Option<GeologError> {
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for f in flights.iter().filter(|f| f.result.is_none()) {
            if let Some(&idx) = f.candidates.first() {
                *per_node.entry(f.placement[idx].node.as_str()).or_default() += 1;
            }
        }
        let (node, _) = per_node
            .into_iter()
            .find(|(node, records)| self.local_replica(node).batches.mint.is_full(*records))?;
        Some(GeologError::new(
            geolog_core::ErrorCode::Overloaded,
            format!(
                "write refused, nothing was written: replica {node} cannot take more records now (its queue is full); retry later"
            ),
        ))
    }

    /// Mints every record not failed yet, one call per minting replica,
    /// replacing replicas that refused until each record is minted or has
    /// no candidate left.
    pub(super) async fn mint_all(
        &self,
        flights: &mut [InFlight],
        requests: &[pb::MintRequest],
        together: bool,
        deadline: tokio::time::Instant,
    ) {
        loop {
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, f) in flights.iter_mut().enumerate() {
                if f.result.is_some() || f.minted.is_some() {
                    continue;
                }
                match f.candidates.first() {
                    Some(&idx) => groups
                        .entry(f.placement[idx].node.clone())
                        .or_default()
                        .push(i),
                    None => f.result = Some(Err(self.unminted(&f.tracker, &f.placement))),
                }
            }
            if groups.is_empty() {
                return;
            }
            let mut calls = Vec::new();
            for (node, members) in groups {
                let replica = self.local_replica(&node);
                // Queued in batch order (a key's records mint in that
                // order): a client batch's all or none, coalesced single
                // writes each on its own.
                let records = members.iter().map(|&i| requests[i].clone());
                let answers: Vec<_> = if together {
                    mint_together(&replica, records.collect())
                } else {
                    records
                        .flat_map(|record| mint_together(&replica, vec![record]))
                        .collect()
                };
                // Queued: a write ordered after one of these may queue.
                for &i in &members {
                    drop(flights[i].queued.take());
                }
                // Spawned so that, past our deadline, the calls still run to
                // their end and a hung replica gets marked dead by its breaker.
                let call = crate::spawn_traced(async move {
                    let mut results = Vec::with_capacity(answers.len());
                    for answer in answers {
                        results.push(answer.await);
                    }
                    results
                });
                calls.push((members, call));
            }
            for (members, call) in calls {
                let results = match tokio::time::timeout_at(deadline, call).await {
                    Ok(Ok(results)) => results,
                    Ok(Err(join)) => {
                        let err = GeologError::internal(format!("mint task failed: {join}"));
                        for &i in &members {
                            flights[i].result = Some(Err(err.clone()));
                        }
                        continue;
                    }
                    Err(_) => {
                        for &i in &members {
                            let f = &mut flights[i];
                            let idx = f.candidates[0];
                            f.tracker.record_timeout(idx);
                            f.result = Some(Err(f.tracker.failure("write")));
                        }
                        continue;
                    }
                };
                for (&i, result) in members.iter().zip(results) {
                    let f = &mut flights[i];
                    let idx = f.candidates.remove(0);
                    match result {
                        Ok(minted) => {
                            f.tracker.record_ok(idx);
                            f.minted = Some((idx, minted));
                        }
                        Err(Miss::Rejected(err)) => f.result = Some(Err(err)),
                        Err(Miss::Overloaded(why)) => {
                            // Not tried elsewhere: minting on a replica that
                            // may lack the key's latest version would make
                            // siblings of writes that follow each other.
                            f.result = Some(Err(refused_overloaded(&why, &f.tracker)));
                        }
                        Err(Miss::TimedOut) => {
                            // May have committed: never minted a second time
                            // elsewhere, as another version of one request.
                            f.tracker.record_timeout(idx);
                            f.result = Some(Err(f.tracker.failure("write")));
                        }
                        Err(Miss::Failed(why)) => {
                            tracing::warn!(replica = %f.placement[idx].node, error = %why, "mint failed, trying next replica");
                            f.tracker.record_failure(idx);
                            if f.tracker.is_impossible() {
                                f.result = Some(Err(f.tracker.failure("write")));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends the minted frontiers to every other destination (one call per
    /// local replica and per remote region) and counts acks until every
    /// record's level is met or lost, or the deadline passes. Delivery goes
    /// on after that; a local replica that misses gets hints on the minting
    /// nodes, and the minting nodes are told which records reached every
    /// replica of a remote region.
    pub(super) async fn deliver(
        &self,
        flights: &mut [InFlight],
        level: ConsistencyLevel,
        deadline: tokio::time::Instant,
    ) {
        let mut to_local: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut to_region: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, f) in flights.iter().enumerate() {
            let Some((mint_idx, _)) = &f.minted else {
                continue;
            };
            for (idx, p) in f.placement.iter().enumerate() {
                if idx == *mint_idx {
                    continue;
                }
                if p.region == self.region {
                    to_local.entry(p.node.clone()).or_default().push(i);
                } else {
                    let records = to_region.entry(p.region.clone()).or_default();
                    if records.last() != Some(&i) {
                        records.push(i);
                    }
                }
            }
        }
        let frontier_of = |i: usize| -> Vec<pb::Version> {
            flights[i]
                .minted
                .as_ref()
                .map(|(_, m)| m.frontier.clone())
                .unwrap_or_default()
        };
        let minter_of = |i: usize| -> String {
            let f = &flights[i];
            let (idx, _) = f.minted.as_ref().expect("only minted records are sent");
            f.placement[*idx].node.clone()
        };
        let (tx, mut rx) = mpsc::channel::<Answer>(to_local.len() + to_region.len() + 1);
        // What a local replica that misses its versions is owed, held as
        // hints by each record's minting node: copied once for all replicas,
        // read only if one fails.
        let owed: Arc<Vec<Option<Hinted>>> = Arc::new(if to_local.is_empty() {
            Vec::new()
        } else {
            (0..flights.len())
                .map(|i| {
                    let f = &flights[i];
                    let (idx, m) = f.minted.as_ref()?;
                    Some((
                        self.local_replica(&f.placement[*idx].node),
                        m.version.clone()?,
                    ))
                })
                .collect()
        });
        for (node, records) in to_local {
            let replica = self.local_replica(&node);
            let versions: Vec<pb::Version> = records.iter().flat_map(|&i| frontier_of(i)).collect();
            let owed = owed.clone();
            let tx = tx.clone();
            crate::spawn_traced(async move {
                let result = apply(&replica, versions).await;
                if result.is_err() {
                    // Per minting node, in record order.
                    let mut hints: BTreeMap<&str, (&Arc<Replica>, Vec<pb::Version>)> =
                        BTreeMap::new();
                    for (holder, version) in records.iter().filter_map(|&i| owed[i].as_ref()) {
                        let (_, versions) = hints
                            .entry(holder.node.as_str())
                            .or_insert_with(|| (holder, Vec::new()));
                        versions.push(version.clone());
                    }
                    for (_, (holder, versions)) in hints {
                        store_hints(holder, &replica.node, versions).await;
                    }
                }
                let _ = tx
                    .send(Answer::Local {
                        node,
                        records,
                        result,
                    })
                    .await;
            });
        }
        for (region, records) in to_region {
            let Some(remote) = self.replicas.remote(&region).cloned() else {
                continue;
            };
            let versions: Vec<pb::Version> = records.iter().flat_map(|&i| frontier_of(i)).collect();
            // Deliveries to report, per minting node, once delivered.
            let mut outbox: BTreeMap<String, Vec<pb::OutboxEntry>> = BTreeMap::new();
            for &i in &records {
                if let Some((_, m)) = &flights[i].minted {
                    let entries = m.outbox.iter().filter(|e| e.region == region).cloned();
                    outbox.entry(minter_of(i)).or_default().extend(entries);
                }
            }
            let holders: Vec<_> = outbox
                .into_iter()
                .map(|(minter, entries)| (self.local_replica(&minter), entries))
                .collect();
            let wanted: usize = {
                let mut nodes: Vec<&str> = records
                    .iter()
                    .flat_map(|&i| flights[i].placement.iter())
                    .filter(|p| p.region == region)
                    .map(|p| p.node.as_str())
                    .collect();
                nodes.sort_unstable();
                nodes.dedup();
                nodes.len()
            };
            let tx = tx.clone();
            crate::spawn_traced(async move {
                let acks = replicate(&remote, versions).await;
                let delivered = acks
                    .as_ref()
                    .is_ok_and(|acks| acks.iter().filter(|a| a.ok).count() >= wanted);
                if delivered {
                    for (holder, entries) in holders {
                        outbox_done(&holder, entries).await;
                    }
                }
                let _ = tx
                    .send(Answer::Region {
                        region,
                        records,
                        acks,
                    })
                    .await;
            });
        }
        drop(tx);

        let settled =
            |f: &InFlight| f.result.is_some() || f.tracker.is_met() || f.tracker.is_impossible();
        while !flights.iter().all(settled) {
            let answer = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(answer)) => answer,
                Ok(None) | Err(_) => break,
            };
            match answer {
                Answer::Local {
                    node,
                    records,
                    result,
                } => {
                    for i in records {
                        let f = &mut flights[i];
                        let Some(idx) = f.placement.iter().position(|p| p.node == node) else {
                            continue;
                        };
                        match result {
                            Ok(()) => f.tracker.record_ok(idx),
                            Err(ref miss) => miss.record(&mut f.tracker, idx),
                        }
                    }
                }
                Answer::Region {
                    region,
                    records,
                    acks,
                } => {
                    let acks = acks.as_deref();
                    for i in records {
                        let f = &mut flights[i];
                        for idx in 0..f.placement.len() {
                            if f.placement[idx].region != region {
                                continue;
                            }
                            match Miss::of_region(acks, &f.placement[idx].node) {
                                Ok(()) => f.tracker.record_ok(idx),
                                Err(ref miss) => miss.record(&mut f.tracker, idx),
                            }
                        }
                    }
                }
            }
        }
        for f in flights.iter_mut() {
            if f.result.is_some() {
                continue;
            }
            let Some((_, minted)) = f.minted.take() else {
                continue;
            };
            if !f.tracker.is_met() {
                f.result = Some(Err(f.tracker.failure("write")));
                continue;
            }
            let Some(version) = minted.version else {
                f.result = Some(Err(GeologError::new(
                    ErrorCode::Internal,
                    "a replica answered a mint without the version",
                )));
                continue;
            };
            f.result = Some(Ok(Written {
                context: state_vector_of(&minted.frontier).to_token(),
                version,
                level,
                acks: f.tracker.details(),
                replayed: false,
                hints: 0,
            }));
        }
    }
}

/// A write refused before anything was minted: its minting replica's
/// queue was full (`why`). Nothing was written; the client retries later.
fn refused_overloaded(why: &str, tracker: &AckTracker) -> GeologError {
    GeologError::new(
        geolog_core::ErrorCode::Overloaded,
        format!("write refused, nothing was written: {why}"),
    )
    .with_quorum(tracker.details())
}
