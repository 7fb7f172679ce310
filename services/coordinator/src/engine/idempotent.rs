//! Retries of writes that carry an idempotency key. The first write's
//! version is looked up (recent ones in a cache, the rest on every
//! reachable replica) and answered `201 replayed` only once as many
//! replicas as the retry's level needs hold it: a retry at `ALL` of a
//! write acknowledged at `ONE` first delivers the version to the replicas
//! that lack it. A key used for another request answers `409`.

use super::calls::{Miss, apply, region_read, replicate};
use super::quorum::{Next, QuorumCall};
use super::read::ReadKind;
use super::{QuorumEngine, Written, state_vector_of};
use crate::SpawnTraced;
use geolog_core::consistency::Operation;
use geolog_core::ring::Placement;
use geolog_core::{AckTracker, ConsistencyLevel, ErrorCode, GeologError, Key};
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;

/// The first write of an idempotency key: its version and the replicas
/// (node ids) known to hold it.
pub(super) struct Earlier {
    pub version: pb::Version,
    pub holders: Vec<String>,
}

/// What the cache keeps per (key, idempotency key): the version (which
/// carries the request's hash) and the replicas that had acknowledged it.
pub(super) type Remembered = (pb::Version, Vec<String>);

impl QuorumEngine {
    /// Looks for the version created with idempotency key `id`: in the
    /// cache, then on every alive local replica and, through their
    /// coordinators, on every reachable replica of the other regions,
    /// within the read timeout (and the write's `deadline`). Unreachable
    /// replicas are skipped: during a partition a retry may not see a
    /// first write made on the other side.
    pub(super) async fn find_idempotent(
        &self,
        key: &Key,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Option<Earlier> {
        if let Some((version, holders)) = self
            .recent_idempotency
            .get(&(key.to_string(), id.to_string()))
        {
            return Some(Earlier { version, holders });
        }
        let placement = self.replicas.placement(key);
        let kind = ReadKind::Idempotent {
            idempotency_key: id.to_string(),
        };
        // Every lookup answers (node, what it found).
        let mut lookups = tokio::task::JoinSet::new();
        for p in placement
            .iter()
            .filter(|p| p.region == self.region && self.replicas.is_alive(p))
        {
            let query = kind.query(self.local_replica(&p.node), key.clone());
            let node = p.node.clone();
            lookups.spawn_traced(async move { vec![(node, query.await.unwrap_or_default())] });
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
            lookups.spawn_traced(async move {
                region_read(&remote, request)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| (a.node, a.versions))
                    .collect()
            });
        }
        let deadline = deadline.min(tokio::time::Instant::now() + self.read_timeout);
        let mut found: Option<Earlier> = None;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, lookups.join_next()).await {
            for (node, versions) in done.unwrap_or_default() {
                let Some(version) = versions.into_iter().next() else {
                    continue;
                };
                match &mut found {
                    // The same version: another write under this key (a
                    // partition's other side) does not count for this one.
                    Some(earlier) if earlier.version.dot == version.dot => {
                        earlier.holders.push(node)
                    }
                    Some(_) => {}
                    None => {
                        found = Some(Earlier {
                            version,
                            holders: vec![node],
                        })
                    }
                }
            }
        }
        found
    }

    /// Remembers that `version`, written with idempotency key `id`, is
    /// held by `holders` (at least as many as its write's level needed).
    pub(super) fn remember_idempotent(
        &self,
        key: &str,
        id: &str,
        version: &pb::Version,
        holders: Vec<String>,
    ) {
        // The value in an allocation of its own: a slice would keep the
        // whole answer it came in alive for as long as the cache keeps it.
        let version = pb::Version {
            value_json: bytes::Bytes::copy_from_slice(&version.value_json),
            ..version.clone()
        };
        self.recent_idempotency
            .insert((key.to_string(), id.to_string()), (version, holders));
    }

    /// The answer to a retry: the earlier version once `level` is met by
    /// the replicas holding it (delivering it to the others first if it is
    /// not), `409 idempotency_conflict` if the key was used for another
    /// request.
    pub(super) async fn replay(
        &self,
        key: &Key,
        id: &str,
        hash: &str,
        earlier: Earlier,
        level: ConsistencyLevel,
        deadline: tokio::time::Instant,
    ) -> Result<Written, GeologError> {
        if earlier.version.body_hash != hash {
            return Err(GeologError::new(
                ErrorCode::IdempotencyConflict,
                format!(
                    "idempotency key {id:?} was already used for a different request on key {key:?}"
                ),
            ));
        }
        let requirement = self.requirement(level, Operation::Write)?;
        let placement = self.replicas.placement(key);
        let mut tracker = Self::tracker(requirement, &placement);
        for (idx, p) in placement.iter().enumerate() {
            if earlier.holders.contains(&p.node) {
                tracker.record_ok(idx);
            }
        }
        if !tracker.is_met() {
            tracker = self
                .deliver_earlier(key, &earlier, &placement, tracker, deadline)
                .await;
            if !tracker.is_met() {
                return Err(tracker.failure("write"));
            }
        }
        metrics::counter!("idempotent_replays_total").increment(1);
        let holders = tracker
            .acked()
            .map(|idx| placement[idx].node.clone())
            .collect();
        self.remember_idempotent(key, id, &earlier.version, holders);
        Ok(Written {
            context: state_vector_of(std::slice::from_ref(&earlier.version)).to_token(),
            version: earlier.version,
            level,
            acks: tracker.details(),
            replayed: true,
            hints: 0,
        })
    }

    /// Sends the earlier version, with a local holder's frontier of the
    /// key (state-based replication ships frontiers, see
    /// `geolog_core::causal`), to every alive replica not known to hold
    /// it, as one quorum call counted by `tracker` (returned) until it is
    /// met, cannot be, or the write deadline passes. Sends nothing when no
    /// local replica holding it answers.
    async fn deliver_earlier(
        &self,
        key: &Key,
        earlier: &Earlier,
        placement: &[Placement],
        mut tracker: AckTracker,
        deadline: tokio::time::Instant,
    ) -> AckTracker {
        // Never a bare version: without a local holder's frontier nothing
        // is sent, and the retry fails like a write that did not meet its
        // level (the outbox or hints deliver it; a later retry succeeds).
        let Some(holder) = placement.iter().find(|p| {
            p.region == self.region
                && earlier.holders.contains(&p.node)
                && self.replicas.is_alive(p)
        }) else {
            return tracker;
        };
        let query = ReadKind::Frontier.query(self.local_replica(&holder.node), key.clone());
        let Ok(Ok(frontier)) = tokio::time::timeout_at(deadline, query).await else {
            return tracker;
        };
        let mut shipped = vec![earlier.version.clone()];
        shipped.extend(
            frontier
                .into_iter()
                .filter(|v| v.dot != earlier.version.dot),
        );
        for (idx, p) in placement.iter().enumerate() {
            if p.region == self.region && !tracker.answered(idx) && !self.replicas.is_alive(p) {
                tracker.record_failure(idx);
            }
        }
        let mut call = QuorumCall::new(tracker, deadline);
        for (idx, p) in placement.iter().enumerate() {
            if p.region != self.region || call.tracker().answered(idx) {
                continue;
            }
            let (replica, shipped) = (self.local_replica(&p.node), shipped.clone());
            call.spawn(idx, async move { apply(&replica, shipped).await });
        }
        for remote in self.replicas.remote_regions() {
            let nodes: Vec<(usize, String)> = (0..placement.len())
                .filter(|&i| placement[i].region == remote.name && !call.tracker().answered(i))
                .map(|i| (i, placement[i].node.clone()))
                .collect();
            if nodes.is_empty() {
                continue;
            }
            let (remote, shipped) = (remote.clone(), shipped.clone());
            call.spawn_many(nodes.len(), async move {
                let acks = replicate(&remote, shipped).await;
                let acks = acks.as_deref();
                nodes
                    .into_iter()
                    .map(|(idx, node)| (idx, Miss::of_region(acks, &node), true))
                    .collect()
            });
        }
        while !call.is_met() && !call.cannot_be_met() {
            if let Next::Done = call.next(None).await {
                break;
            }
        }
        call.into_tracker()
    }
}
