//! geolog anti-entropy worker (one per region): compares replicas pairwise
//! with Merkle trees and repairs what differs.
//!
//! Each storage node computes the digest of any bucket of the key-hash
//! space by aggregation inside its PostgreSQL (XOR of version hashes), so a
//! comparison ships digests, never rows: root first, then only the 16
//! children of buckets whose digests differ, down to the leaves; only the
//! versions of differing leaves travel, in both directions, through the
//! normal merge (so causality stays right). A pass compares every pair of
//! replicas of the region and, every few passes, each of them with the
//! other regions' replicas. Keys a node does not replicate are never sent to
//! it. Progress is counted in metrics (`anti_entropy_*`).

use geolog_config::GeologConfig;
use geolog_core::merkle::{Bucket, LEAF_DEPTH};
use geolog_proto::storage as pb;
use geolog_proto::storage::storage_client::StorageClient;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// One storage node as the worker sees it.
#[derive(Clone)]
pub struct Node {
    pub id: String,
    pub region: String,
    client: StorageClient<Channel>,
}

/// What one comparison of two replicas did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PairReport {
    /// Digests received from both sides.
    pub digests: u64,
    /// Leaf buckets that differed.
    pub leaves: u64,
    /// Versions sent to either side.
    pub versions_sent: u64,
    /// Versions that were new to the receiving side.
    pub versions_repaired: u64,
}

/// The worker of one region.
pub struct AntiEntropy {
    region: String,
    nodes: Vec<Node>,
    ring: geolog_core::Ring,
    interval: Duration,
    cross_region_every: u32,
}

impl AntiEntropy {
    /// Builds lazy clients to every storage node of the topology.
    pub fn new(config: &GeologConfig, region: &str) -> Result<Self, tonic::transport::Error> {
        let timeout = Duration::from_millis(config.anti_entropy.rpc_timeout_ms);
        let mut nodes = Vec::new();
        for r in &config.regions {
            for n in &r.nodes {
                let channel = Endpoint::from_shared(format!("http://{}", n.addr))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(timeout)
                    .connect_lazy();
                let client = StorageClient::new(channel)
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(64 * 1024 * 1024);
                nodes.push(Node {
                    id: n.id.clone(),
                    region: r.name.clone(),
                    client,
                });
            }
        }
        Ok(AntiEntropy {
            region: region.to_string(),
            nodes,
            ring: config.ring(),
            interval: Duration::from_millis(config.anti_entropy.interval_ms),
            cross_region_every: config.anti_entropy.cross_region_every.max(1),
        })
    }

    /// The pairs one pass compares: every pair inside the region, and with
    /// `cross_region`, every local node with every remote one.
    pub fn pairs(&self, cross_region: bool) -> Vec<(Node, Node)> {
        let local: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.region == self.region)
            .collect();
        let mut pairs = Vec::new();
        for (i, a) in local.iter().enumerate() {
            for b in &local[i + 1..] {
                pairs.push(((*a).clone(), (*b).clone()));
            }
            if cross_region {
                for b in self.nodes.iter().filter(|n| n.region != self.region) {
                    pairs.push(((*a).clone(), b.clone()));
                }
            }
        }
        pairs
    }

    /// Compares every pair once; returns the summed report.
    pub async fn pass(&self, cross_region: bool) -> PairReport {
        let mut total = PairReport::default();
        for (a, b) in self.pairs(cross_region) {
            let started = Instant::now();
            match self.compare(&a, &b).await {
                Ok(report) => {
                    metrics::counter!("anti_entropy_ranges_compared_total").increment(1);
                    metrics::counter!("anti_entropy_digests_exchanged_total")
                        .increment(report.digests);
                    metrics::counter!("anti_entropy_versions_repaired_total")
                        .increment(report.versions_repaired);
                    metrics::histogram!("anti_entropy_compare_seconds")
                        .record(started.elapsed().as_secs_f64());
                    if report.versions_sent > 0 {
                        tracing::info!(a = %a.id, b = %b.id, leaves = report.leaves, repaired = report.versions_repaired, "replicas repaired");
                    }
                    total.digests += report.digests;
                    total.leaves += report.leaves;
                    total.versions_sent += report.versions_sent;
                    total.versions_repaired += report.versions_repaired;
                }
                Err(status) => {
                    metrics::counter!("anti_entropy_errors_total").increment(1);
                    tracing::warn!(a = %a.id, b = %b.id, error = %status.message(), "comparison failed; next pass retries");
                }
            }
        }
        total
    }

    /// Runs passes until `stop` changes.
    pub async fn run(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut passes: u32 = 0;
        loop {
            let cross = passes.is_multiple_of(self.cross_region_every);
            let report = self.pass(cross).await;
            metrics::gauge!("anti_entropy_last_pass_repaired").set(report.versions_repaired as f64);
            passes = passes.wrapping_add(1);
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Compares two replicas: root digest, then only differing subtrees,
    /// then exchanges the versions of differing leaves both ways.
    pub async fn compare(&self, a: &Node, b: &Node) -> Result<PairReport, tonic::Status> {
        let mut report = PairReport::default();
        let (root_a, root_b) = (
            digests(a, &[Bucket::ROOT], false).await?,
            digests(b, &[Bucket::ROOT], false).await?,
        );
        report.digests += (root_a.len() + root_b.len()) as u64;
        if root_a == root_b {
            return Ok(report);
        }
        let mut differing = vec![Bucket::ROOT];
        while !differing.iter().all(|b| b.is_leaf()) {
            let (da, db) = (
                digests(a, &differing, true).await?,
                digests(b, &differing, true).await?,
            );
            report.digests += (da.len() + db.len()) as u64;
            let children: BTreeSet<&Bucket> = da.keys().chain(db.keys()).collect();
            differing = children
                .into_iter()
                .filter(|c| da.get(c) != db.get(c))
                .copied()
                .collect();
            if differing.is_empty() {
                return Ok(report);
            }
        }
        report.leaves = differing.len() as u64;
        debug_assert!(differing.iter().all(|b| b.depth == LEAF_DEPTH));
        let (va, vb) = (
            bucket_versions(a, &differing).await?,
            bucket_versions(b, &differing).await?,
        );
        for (from, to, versions) in [(a, b, va), (b, a, vb)] {
            // Only keys the receiver replicates, and only what it lacks.
            let useful: Vec<pb::Version> = versions
                .into_iter()
                .filter(|v| self.ring.replicas(&v.key).iter().any(|p| p.node == to.id))
                .collect();
            if useful.is_empty() {
                continue;
            }
            report.versions_sent += useful.len() as u64;
            let mut client = to.client.clone();
            let inserted = client
                .apply(pb::ApplyRequest { versions: useful })
                .await?
                .into_inner()
                .inserted;
            report.versions_repaired += u64::from(inserted);
            tracing::debug!(from = %from.id, to = %to.id, inserted, "leaf versions exchanged");
        }
        Ok(report)
    }
}

fn to_wire(buckets: &[Bucket]) -> Vec<pb::Bucket> {
    buckets
        .iter()
        .map(|b| pb::Bucket {
            depth: b.depth,
            prefix: b.prefix,
        })
        .collect()
}

async fn digests(
    node: &Node,
    buckets: &[Bucket],
    split: bool,
) -> Result<BTreeMap<Bucket, (u64, u64)>, tonic::Status> {
    let mut client = node.client.clone();
    let request = pb::DigestsRequest {
        buckets: to_wire(buckets),
        split,
    };
    let answer = client.digests(request).await?.into_inner();
    Ok(answer
        .digests
        .into_iter()
        .filter_map(|d| {
            d.bucket.map(|b| {
                (
                    Bucket {
                        depth: b.depth,
                        prefix: b.prefix,
                    },
                    (d.digest, d.versions),
                )
            })
        })
        .collect())
}

async fn bucket_versions(
    node: &Node,
    buckets: &[Bucket],
) -> Result<Vec<pb::Version>, tonic::Status> {
    let mut client = node.client.clone();
    let request = pb::BucketVersionsRequest {
        buckets: to_wire(buckets),
    };
    Ok(client.bucket_versions(request).await?.into_inner().versions)
}
