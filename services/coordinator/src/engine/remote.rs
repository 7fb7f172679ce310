//! What the engine does for and with other regions and nodes: applying and
//! reading for a remote region's coordinator, the RPC helpers that talk to
//! a remote region, and the small calls to local nodes they share.

use super::read::ReadKind;
use super::{Miss, QuorumEngine};
use crate::SpawnTraced;
use crate::replicas::{Replica, collect};
use geolog_core::Key;
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

impl QuorumEngine {
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
            crate::spawn_traced(async move {
                let ack = match apply(&replica, batch).await {
                    Ok(()) => cpb::ReplicaAck {
                        node,
                        ok: true,
                        ..Default::default()
                    },
                    Err(status) => {
                        let miss = Miss::of(&status);
                        cpb::ReplicaAck {
                            node,
                            ok: false,
                            timed_out: miss == Miss::TimedOut,
                            overloaded: miss == Miss::Overloaded,
                            error: status.message().to_string(),
                        }
                    }
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
        key: Key,
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
        crate::spawn_traced(async move {
            let mut answered = 0;
            while answered < wanted && !candidates.is_empty() {
                let batch: Vec<Arc<Replica>> = candidates
                    .drain(..(wanted - answered).min(candidates.len()))
                    .collect();
                let mut calls = tokio::task::JoinSet::new();
                for replica in batch {
                    let node = replica.node.clone();
                    let query = kind.query(replica, key.clone());
                    calls.spawn_traced(async move { (node, query.await) });
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
                        Err(status) => {
                            let miss = Miss::of(&status);
                            cpb::ReplicaVersions {
                                node,
                                ok: false,
                                timed_out: miss == Miss::TimedOut,
                                overloaded: miss == Miss::Overloaded,
                                error: status.message().to_string(),
                                versions: Vec::new(),
                            }
                        }
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

/// Mints one record on a local replica (in one transaction with the
/// concurrent records bound for it). The record is queued before this
/// returns — records queued one after the other are minted in that order —
/// and the returned future waits for the answer. A record refused alone
/// (idempotency conflict, invalid value) comes back as its error's status.
pub fn mint(
    replica: &Replica,
    request: pb::MintRequest,
) -> impl Future<Output = Result<pb::MintResponse, tonic::Status>> + Send + 'static {
    let answer = replica.batches.mint.enqueue(request);
    async move { minted(answer.await) }
}

/// [`mint`] for the records of one client batch bound for one replica:
/// queued together, in order, or refused together when its queue cannot
/// hold them all.
pub fn mint_together(
    replica: &Replica,
    requests: Vec<pb::MintRequest>,
) -> Vec<impl Future<Output = Result<pb::MintResponse, tonic::Status>> + Send + 'static> {
    replica
        .batches
        .mint
        .enqueue_all(requests)
        .into_iter()
        .map(|answer| async move { minted(answer.await) })
        .collect()
}

/// A record's mint result as its version, or its own error.
fn minted(
    result: Result<pb::MintResult, tonic::Status>,
) -> Result<pb::MintResponse, tonic::Status> {
    let result = result?;
    geolog_proto::item_outcome(result.minted, result.error).map_err(|err| err.to_status())
}

/// Applies versions to one local replica (batched with concurrent calls).
pub async fn apply(replica: &Replica, versions: Vec<pb::Version>) -> Result<(), tonic::Status> {
    replica
        .batches
        .apply
        .call(versions)
        .await
        .inspect_err(|status| {
            tracing::debug!(replica = %replica.node, error = %status.message(), "apply failed");
        })
}

/// Reports versions delivered to a remote region to the node that minted
/// them (entries as its mint or pending answer gave them); failures only
/// mean the replay worker sends them once more.
pub async fn outbox_done(replica: &Replica, entries: Vec<pb::OutboxEntry>) {
    if let Err(status) = replica.batches.outbox_done.call(entries).await {
        tracing::debug!(replica = %replica.node, error = %status.message(), "outbox cleanup failed; replay will resend");
    }
}

/// Records on `holder` (the node that minted `version`) that `target`
/// missed it; returns whether it is stored. A failure is logged:
/// anti-entropy is then the safety net.
pub async fn store_hint(holder: &Replica, target: &str, version: pb::Version) -> bool {
    store_hints(holder, target, vec![version]).await > 0
}

/// [`store_hint`] for many versions held on `holder`; returns how many
/// were stored.
pub async fn store_hints(holder: &Replica, target: &str, versions: Vec<pb::Version>) -> u32 {
    let mut client = holder.client.clone();
    let count = versions.len();
    let request = pb::StoreHintsRequest {
        target: target.to_string(),
        versions,
    };
    match client.store_hints(request).await {
        Ok(answer) => {
            let stored = answer.get_ref().stored;
            metrics::counter!("hints_stored_total").increment(u64::from(stored));
            if (stored as usize) < count {
                tracing::warn!(holder = %holder.node, target, stored, count, "hints not stored: the holder lacks the versions");
            }
            stored
        }
        Err(status) => {
            tracing::warn!(holder = %holder.node, target, error = %status.message(), "cannot store hints");
            0
        }
    }
}

/// Sends key states to a remote region (batched with concurrent calls)
/// and collects every replica's ack.
pub async fn replicate(
    remote: &crate::replicas::RemoteRegion,
    versions: Vec<pb::Version>,
) -> Result<Vec<cpb::ReplicaAck>, tonic::Status> {
    remote.replicate.call(versions).await
}

pub(super) async fn region_read(
    remote: &crate::replicas::RemoteRegion,
    request: cpb::RegionReadRequest,
) -> Result<Vec<cpb::ReplicaVersions>, tonic::Status> {
    let mut client = remote.client.clone();
    collect(client.region_read(request).await?.into_inner()).await
}

/// True when the replica did not answer in time: a deadline status, or the
/// per-replica tower timeout somewhere in the error's sources.
pub(super) fn is_timeout(status: &tonic::Status) -> bool {
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
