//! What the engine does for a remote region's coordinator: applying and
//! reading on this region's replicas, each replica's outcome reported in
//! the answer.

use super::QuorumEngine;
use super::calls::apply;
use super::read::ReadKind;
use crate::SpawnTraced;
use crate::replicas::Replica;
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
                    Err(miss) => {
                        let (timed_out, overloaded, error) = miss.report();
                        cpb::ReplicaAck {
                            node,
                            ok: false,
                            timed_out,
                            overloaded,
                            error,
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
                        Err(miss) => {
                            let (timed_out, overloaded, error) = miss.report();
                            cpb::ReplicaVersions {
                                node,
                                ok: false,
                                timed_out,
                                overloaded,
                                error,
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
