//! `QuorumEngine`: the write and read paths. It turns a consistency level
//! into a requirement, fails fast when the replicas believed alive cannot
//! meet it, sends, and counts answers with [`AckTracker`] until the level is
//! met, becomes impossible, or the deadline passes.
//!
//! Writes: a local replica (the first alive in preference order) mints the
//! version — its dot and HLC timestamp — which the node then owes every
//! remote region (its outbox, a cursor per region over its own versions).
//! The version is then applied to the other local replicas directly and
//! sent once to each remote region's coordinator, which applies it to that
//! region's replicas and streams their acks back. The client is answered
//! once the level is met; delivery continues in detached tasks, and the
//! minting node is told the version reached a region once all its replicas
//! have it — otherwise the replay worker (`outbox`) delivers it later.
//!
//! Reads: ask as many alive replicas as the level needs (local first, remote
//! ones through their region's coordinator), replace a local replica that
//! fails, ask one more local replica when the answer is slow (speculative
//! read), return the newest version.

mod calls;
mod fanout;
mod idempotent;
mod quorum;
mod read;
mod remote;

pub use calls::{Miss, apply, mint, outbox_done, replicate, store_hint, store_hints};
pub use fanout::BatchRecord;
use fanout::InFlight;
pub use read::{ReadKind, state_vector_of};

use crate::replicas::{Replica, ReplicaSet};
use geolog_config::GeologConfig;
use geolog_core::causal::VersionVector;
use geolog_core::consistency::Operation;
use geolog_core::error::QuorumDetails;
use geolog_core::ring::Placement;
use geolog_core::{
    AckTracker, ConsistencyLevel, ErrorCode, GeologError, JsonText, Key, Requirement,
};
use geolog_proto::storage as pb;
use std::sync::Arc;
use std::time::Duration;

/// A write that met its level.
#[derive(Debug)]
pub struct Written {
    /// The version written (for a retry with an idempotency key, the
    /// first write's).
    pub version: pb::Version,
    pub level: ConsistencyLevel,
    pub acks: QuorumDetails,
    /// Context token of the key's state on the minting replica after it.
    pub context: String,
    /// True when a retry was answered with the first write's version.
    pub replayed: bool,
    /// `ANY` writes no replica could take: hints stored instead.
    pub hints: u32,
}

/// A read of a key's current value that met its level.
#[derive(Debug)]
pub struct ReadValue {
    /// The deterministic pick among `siblings`; none when the key has no
    /// version at that level.
    pub version: Option<pb::Version>,
    pub level: ConsistencyLevel,
    pub acks: QuorumDetails,
    /// The key's current versions (merged frontier).
    pub siblings: Vec<pb::Version>,
    /// Context token of the state the client now knows.
    pub context: String,
    /// Replicas written back by read repair.
    pub repaired: u32,
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

/// Orders the mints of writes to one key inside a batch: a write waits
/// for `after` — dropped by the previous write of the key once its record
/// is queued on its minting replica, or once it failed — before queueing
/// its own, then drops `minted`. Records of one key bound for one replica
/// are minted in queue order (usually in the same transaction); only a
/// replica failing in between can reorder them. Everything else of the
/// writes overlaps.
#[derive(Debug, Default)]
pub struct MintOrder {
    pub after: Option<tokio::sync::oneshot::Receiver<()>>,
    pub minted: Option<tokio::sync::oneshot::Sender<()>>,
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
    /// Fast path for retries: (key, idempotency key) → (version, the
    /// replicas that acknowledged it). Only a cache — the durable record
    /// travels with the version.
    recent_idempotency: moka::sync::Cache<(String, String), idempotent::Remembered>,
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

    /// The level a request asked for on the wire; unset means the
    /// configured default.
    pub fn level(&self, wire: i32) -> Result<ConsistencyLevel, GeologError> {
        Ok(geolog_proto::coordinator::Consistency::requested(wire)?.unwrap_or(self.default_level))
    }

    fn requirement(
        &self,
        level: ConsistencyLevel,
        op: Operation,
    ) -> Result<Arc<Requirement>, GeologError> {
        let rfs: Vec<(&str, usize)> = self.rfs.iter().map(|(r, n)| (r.as_str(), *n)).collect();
        level.requirement(op, &rfs, &self.region).map(Arc::new)
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

    fn tracker(requirement: Arc<Requirement>, placement: &Arc<Vec<Placement>>) -> AckTracker {
        AckTracker::new(requirement, placement.clone())
    }

    /// The other regions, which every minted version must still reach.
    fn remote_region_names(&self) -> Vec<String> {
        self.replicas
            .remote_regions()
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// The error of a write no local replica minted: when none was alive
    /// to try, the client should use a gateway of another region;
    /// otherwise what the replicas' answers add up to.
    fn unminted(&self, tracker: &AckTracker, placement: &[Placement]) -> GeologError {
        let tried_local = placement
            .iter()
            .enumerate()
            .any(|(i, p)| p.region == self.region && tracker.answered(i));
        if tracker.received() == 0 && !tried_local {
            return GeologError::new(
                ErrorCode::Unavailable,
                format!(
                    "no replica of region {} is alive to accept the write; use a gateway of another region",
                    self.region
                ),
            );
        }
        tracker.failure("write")
    }

    fn local_replica(&self, node: &str) -> Arc<Replica> {
        self.replicas
            .local(node)
            .expect("placement in the local region names local nodes")
            .clone()
    }

    /// Writes `value_json` as a new version of `key`; `order` chains the
    /// mint after another write's (see [`MintOrder`]). The batch path
    /// (`fanout`) with one record, plus what only a lone write has: the
    /// lookup of an earlier write with the same idempotency key, and `ANY`
    /// held as hints when no replica of the key takes it.
    pub async fn write(
        &self,
        key: &Key,
        value_json: &JsonText,
        level: ConsistencyLevel,
        context: Option<VersionVector>,
        idempotency_key: Option<String>,
        order: MintOrder,
    ) -> Result<Written, GeologError> {
        let requirement = self.requirement(level, Operation::Write)?;
        // One deadline for the whole write, the lookup of an earlier one
        // with the same idempotency key included.
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        let hash = idempotency_key
            .as_ref()
            .map(|_| body_hash(key, value_json, context.as_ref()));
        if let (Some(id), Some(hash)) = (&idempotency_key, &hash)
            && let Some(earlier) = self.find_idempotent(key, id, deadline).await
        {
            return self.replay(key, id, hash, earlier, level, deadline).await;
        }
        let (placement, alive) = match self.plan(key, &requirement) {
            // `ANY` is met by a stored hint even when no replica is alive.
            Err(err) if level == ConsistencyLevel::Any && err.code == ErrorCode::Unavailable => {
                (self.replicas.placement(key), Vec::new())
            }
            plan => plan?,
        };
        let tracker = Self::tracker(requirement, &placement);
        let flight =
            InFlight::new(placement.clone(), alive, tracker, &self.region).signalling(order.minted);
        let request = pb::MintRequest {
            key: key.to_string(),
            value_json: value_json.to_bytes(),
            outbox_regions: self.remote_region_names(),
            has_context: context.is_some(),
            context: context.map(geolog_proto::dots).unwrap_or_default(),
            idempotency_key: idempotency_key.clone().unwrap_or_default(),
            body_hash: hash.clone().unwrap_or_default(),
        };
        // Minted after the write this one is ordered after has minted (or
        // failed).
        if let Some(after) = order.after {
            let _ = after.await;
        }
        let mut flights = [flight];
        self.mint_all(
            &mut flights,
            std::slice::from_ref(&request),
            false,
            deadline,
        )
        .await;
        let [flight] = &mut flights;
        match &flight.minted {
            None => {
                let err = match flight.result.take() {
                    Some(Err(err)) => err,
                    _ => GeologError::internal("a write was neither minted nor failed"),
                };
                // Nothing of it is queued: the next write of the key goes.
                drop(flights);
                // No replica took it (none alive, or each failed before
                // storing anything): `ANY` holds it as hints instead.
                if level == ConsistencyLevel::Any && err.code == ErrorCode::Unavailable {
                    return self.write_hinted(request, &placement).await;
                }
                return Err(err);
            }
            Some((mint_idx, minted)) if minted.replayed => {
                // The minting node already held a write with this key (the
                // lookup above could not reach it): nothing new was created.
                let (Some(id), Some(hash), Some(version)) =
                    (&idempotency_key, &hash, minted.version.clone())
                else {
                    return Err(GeologError::internal(
                        "a replica answered a write without an idempotency key as replayed",
                    ));
                };
                let earlier = idempotent::Earlier {
                    version,
                    holders: vec![placement[*mint_idx].node.clone()],
                };
                return self.replay(key, id, hash, earlier, level, deadline).await;
            }
            Some(_) => {}
        }
        self.deliver(&mut flights, level, deadline).await;
        let [flight] = flights;
        let written = flight
            .result
            .unwrap_or_else(|| Err(GeologError::internal("a minted write has no outcome")))?;
        if let Some(id) = &idempotency_key {
            // Remembered once its level is met, with the replicas that
            // hold it: a retry at a higher level checks them.
            let holders = flight
                .tracker
                .acked()
                .map(|i| placement[i].node.clone())
                .collect();
            self.remember_idempotent(key, id, &written.version, holders);
        }
        Ok(written)
    }

    /// `ANY` when no replica of the key could take the write: another alive
    /// node of the region mints the version (owed to the other regions by
    /// its outbox) and keeps it with a durable hint for every local
    /// replica of the key; the stored hints are the acknowledgement. Hint
    /// replay delivers it when the replicas answer again (the holder keeps
    /// its copy, which anti-entropy never compares: it replicates no such
    /// key).
    async fn write_hinted(
        &self,
        request: pb::MintRequest,
        placement: &[Placement],
    ) -> Result<Written, GeologError> {
        let targets: Vec<&str> = placement
            .iter()
            .filter(|p| p.region == self.region)
            .map(|p| p.node.as_str())
            .collect();
        let holders: Vec<Arc<Replica>> = self
            .replicas
            .all_local()
            .filter(|r| r.state.is_alive() && !targets.contains(&r.node.as_str()))
            .cloned()
            .collect();
        for holder in holders {
            let minted = match mint(holder.as_ref(), request.clone()).await {
                Ok(minted) => minted,
                Err(status) => {
                    tracing::warn!(holder = %holder.node, error = %status, "cannot hold an ANY write");
                    continue;
                }
            };
            let version = minted
                .version
                .ok_or_else(|| GeologError::internal("storage node minted no version"))?;
            let mut hints = 0;
            for target in &targets {
                if store_hint(&holder, target, version.clone()).await {
                    hints += 1;
                }
            }
            if hints == 0 {
                return Err(GeologError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "no replica of the key is alive and node {} could not store hints; the write may have landed there and will be repaired",
                        holder.node
                    ),
                ));
            }
            metrics::counter!("any_writes_hinted_total").increment(1);
            return Ok(Written {
                context: state_vector_of(&minted.frontier).to_token(),
                version,
                level: ConsistencyLevel::Any,
                acks: QuorumDetails {
                    required: 1,
                    received: Some(0),
                    ..Default::default()
                },
                replayed: false,
                hints,
            });
        }
        Err(GeologError::new(
            ErrorCode::Unavailable,
            format!(
                "no replica of the key and no other storage node of region {} is alive to hold a hint",
                self.region
            ),
        ))
    }
}
