//! geolog anti-entropy worker (one per region): compares replicas pairwise
//! with Merkle trees and repairs what differs.
//!
//! The tree is laid over the ring's token space. Two replicas compare only
//! the token ranges whose keys both replicate ([`Ring::shared_ranges`]);
//! each storage node computes the digest of any bucket of those ranges by
//! aggregation inside its PostgreSQL (XOR of version hashes), so a
//! comparison ships digests, never rows: the root first, then only the 16
//! children of buckets whose digests differ, down to the leaves. Of the
//! differing leaves, each side receives only the versions it lacks, through
//! the normal merge (so causality stays right).
//!
//! A pass compares every pair of replicas of the region and, every few
//! passes, each of them with the other regions' replicas — those through
//! the remote region's coordinator, over the same links (and faults) as
//! replication. Progress is counted in metrics (`anti_entropy_*`) and kept
//! in a [`WorkerStatus`] the worker serves on `/status`.

use geolog_config::GeologConfig;
use geolog_core::Ring;
use geolog_core::merkle::{
    Bucket, DIGEST_SLICE_MS, LEAF_DEPTH, LEVEL_BITS, clip, intersect, signed_token,
};
use geolog_proto::coordinator as cpb;
use geolog_proto::coordinator::coordinator_client::CoordinatorClient;
use geolog_proto::storage as pb;
use geolog_proto::storage::storage_client::StorageClient;
use geolog_telemetry::trace::{GrpcClient, GrpcClientLayer};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use tower::Layer;
use tracing::Instrument;

use geolog_proto::MAX_MESSAGE_BYTES;
/// Leaves are fetched and repaired in chunks of about this many versions.
const VERSIONS_PER_CALL: u64 = 5_000;

/// How the worker reaches a storage node.
#[derive(Clone)]
enum Access {
    /// A node of the worker's region.
    Direct(StorageClient<GrpcClient<Channel>>),
    /// A node of another region, through that region's coordinator.
    Relayed(CoordinatorClient<GrpcClient<Channel>>),
}

/// One storage node as the worker sees it.
#[derive(Clone)]
pub struct Node {
    pub id: String,
    pub region: String,
    access: Access,
}

/// What one or more comparisons did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairReport {
    /// Token ranges compared (shared by both replicas of a pair).
    pub ranges: u64,
    /// Digests received from both sides.
    pub digests: u64,
    /// Leaf buckets that differed.
    pub leaves: u64,
    /// Versions sent to a side that lacked them.
    pub versions_sent: u64,
    /// Versions that were new to the receiving side.
    pub versions_repaired: u64,
    /// Encoded bytes of everything exchanged: digests, leaf versions
    /// fetched from both sides, versions sent.
    pub bytes: u64,
}

impl PairReport {
    fn add(&mut self, other: &PairReport) {
        self.ranges += other.ranges;
        self.digests += other.digests;
        self.leaves += other.leaves;
        self.versions_sent += other.versions_sent;
        self.versions_repaired += other.versions_repaired;
        self.bytes += other.bytes;
    }
}

/// One finished pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassSummary {
    pub finished_at_unix_ms: u64,
    pub duration_ms: u64,
    pub cross_region: bool,
    /// Pairs of replicas compared, and how many of them failed.
    pub pairs: u64,
    pub failed_pairs: u64,
    /// The last few failures (`a <-> b: message`).
    pub errors: Vec<String>,
    #[serde(flatten)]
    pub report: PairReport,
}

/// What the worker has done since it started (served on `/status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub region: String,
    pub passes: u64,
    pub last_pass: Option<PassSummary>,
    pub totals: PairReport,
}

/// The worker of one region.
/// Anti-entropy as a background worker: each step is one pass; every
/// `cross_region_every`-th pass also compares with the other regions.
pub struct Passes {
    anti_entropy: AntiEntropy,
    passes: u32,
}

impl geolog_worker::Worker for Passes {
    fn name(&self) -> &str {
        "anti-entropy"
    }

    async fn step(&mut self) -> Result<geolog_worker::Next, String> {
        let cross = self
            .passes
            .is_multiple_of(self.anti_entropy.cross_region_every);
        self.anti_entropy.pass(cross).await;
        self.passes = self.passes.wrapping_add(1);
        Ok(geolog_worker::Next::Idle)
    }
}

pub struct AntiEntropy {
    region: String,
    nodes: Vec<Node>,
    ring: Ring,
    interval: Duration,
    cross_region_every: u32,
    /// When set, only these tree-token ranges are compared.
    only: Option<Vec<(i64, i64)>>,
    /// Versions minted this recently are left out of comparisons.
    settle: Duration,
    status: Arc<Mutex<WorkerStatus>>,
}

impl AntiEntropy {
    /// Builds lazy clients: to the region's storage nodes directly, to the
    /// other regions' nodes through their coordinators (or routes).
    pub fn new(config: &GeologConfig, region: &str) -> Result<Self, tonic::transport::Error> {
        let timeout = Duration::from_millis(config.anti_entropy.rpc_timeout_ms);
        // Every call traced and timed per peer (node id or `region:NAME`).
        let channel = |peer: &str,
                       addrs: Vec<String>|
         -> Result<GrpcClient<Channel>, tonic::transport::Error> {
            let endpoints = addrs
                .iter()
                .map(|a| {
                    Ok(Endpoint::from_shared(format!("http://{a}"))?
                        .connect_timeout(Duration::from_secs(2))
                        .timeout(timeout))
                })
                .collect::<Result<Vec<_>, tonic::transport::Error>>()?;
            Ok(GrpcClientLayer::new(peer).layer(Channel::balance_list(endpoints.into_iter())))
        };
        let mut nodes = Vec::new();
        for r in &config.regions {
            let relay = if r.name == region {
                None
            } else {
                Some(
                    CoordinatorClient::new(channel(
                        &format!("region:{}", r.name),
                        config.coordinator_addrs(region, &r.name),
                    )?)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
            };
            for n in &r.nodes {
                let access = match &relay {
                    Some(client) => Access::Relayed(client.clone()),
                    None => Access::Direct(
                        StorageClient::new(channel(&n.id, vec![n.addr.clone()])?)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    ),
                };
                nodes.push(Node {
                    id: n.id.clone(),
                    region: r.name.clone(),
                    access,
                });
            }
        }
        Ok(AntiEntropy {
            region: region.to_string(),
            nodes,
            ring: config.ring(),
            interval: Duration::from_millis(config.anti_entropy.interval_ms),
            cross_region_every: config.anti_entropy.cross_region_every.max(1),
            only: None,
            settle: Duration::from_millis(config.anti_entropy.settle_ms),
            status: Arc::new(Mutex::new(WorkerStatus {
                region: region.to_string(),
                ..Default::default()
            })),
        })
    }

    /// Compares only keys whose ring token lies in one of `ranges`
    /// (inclusive `u64` ring tokens).
    pub fn restrict_to(&mut self, ranges: &[(u64, u64)]) {
        let mut only: Vec<(i64, i64)> = ranges
            .iter()
            .map(|&(low, high)| (signed_token(low), signed_token(high)))
            .collect();
        only.sort_unstable();
        self.only = Some(only);
    }

    /// Compares every version, however recent (on-demand repair).
    pub fn compare_everything(&mut self) {
        self.settle = Duration::ZERO;
    }

    /// The worker's progress, shared with whoever serves it.
    pub fn status(&self) -> Arc<Mutex<WorkerStatus>> {
        self.status.clone()
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

    /// Compares every pair once; records and returns the summary.
    pub async fn pass(&self, cross_region: bool) -> PassSummary {
        let started = Instant::now();
        let mut summary = PassSummary {
            finished_at_unix_ms: 0,
            duration_ms: 0,
            cross_region,
            pairs: 0,
            failed_pairs: 0,
            errors: Vec::new(),
            report: PairReport::default(),
        };
        let mut unreachable: BTreeMap<String, bool> = BTreeMap::new();
        for (a, b) in self.pairs(cross_region) {
            let pair_started = Instant::now();
            summary.pairs += 1;
            let result = match &b.access {
                Access::Relayed(relay) => {
                    // One quick probe per region and pass: a cut-off region
                    // costs seconds, not one RPC timeout per pair.
                    let down = match unreachable.get(&b.region) {
                        Some(&down) => down,
                        None => {
                            let down = !answers(relay).await;
                            unreachable.insert(b.region.clone(), down);
                            down
                        }
                    };
                    if down {
                        Err(Status::unavailable(format!(
                            "region {} unreachable",
                            b.region
                        )))
                    } else {
                        self.compare(&a, &b).instrument(compare_span(&a, &b)).await
                    }
                }
                _ => self.compare(&a, &b).instrument(compare_span(&a, &b)).await,
            };
            match result {
                Ok(report) => {
                    metrics::counter!("anti_entropy_ranges_compared_total")
                        .increment(report.ranges);
                    metrics::counter!("anti_entropy_digests_exchanged_total")
                        .increment(report.digests);
                    metrics::counter!("anti_entropy_versions_sent_total")
                        .increment(report.versions_sent);
                    metrics::counter!("anti_entropy_versions_repaired_total")
                        .increment(report.versions_repaired);
                    metrics::counter!("anti_entropy_bytes_total").increment(report.bytes);
                    metrics::histogram!("anti_entropy_compare_seconds")
                        .record(pair_started.elapsed().as_secs_f64());
                    if report.versions_sent > 0 {
                        tracing::info!(a = %a.id, b = %b.id, leaves = report.leaves, repaired = report.versions_repaired, "replicas repaired");
                    }
                    summary.report.add(&report);
                }
                Err(status) => {
                    metrics::counter!("anti_entropy_errors_total").increment(1);
                    tracing::warn!(a = %a.id, b = %b.id, error = %status.message(), "comparison failed; next pass retries");
                    summary.failed_pairs += 1;
                    if summary.errors.len() < 5 {
                        summary
                            .errors
                            .push(format!("{} <-> {}: {}", a.id, b.id, status.message()));
                    }
                }
            }
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        summary.finished_at_unix_ms = geolog_core::hlc::system_ms();
        metrics::counter!("anti_entropy_passes_total").increment(1);
        metrics::gauge!("anti_entropy_last_pass_timestamp_seconds")
            .set(summary.finished_at_unix_ms as f64 / 1000.0);
        metrics::gauge!("anti_entropy_last_pass_failed_pairs").set(summary.failed_pairs as f64);
        let mut status = self.status.lock().expect("status lock is never poisoned");
        status.passes += 1;
        status.totals.add(&summary.report);
        status.last_pass = Some(summary.clone());
        summary
    }

    /// The worker that runs passes, one per step, every
    /// `anti_entropy.interval_ms`.
    pub fn into_worker(self) -> (Passes, Duration) {
        describe_metrics();
        let interval = self.interval;
        (
            Passes {
                anti_entropy: self,
                passes: 0,
            },
            interval,
        )
    }

    /// Compares two replicas over the ranges both hold: root digest, then
    /// only differing subtrees, then gives each side the versions of
    /// differing leaves it lacks.
    pub async fn compare(&self, a: &Node, b: &Node) -> Result<PairReport, Status> {
        let shared = self
            .ring
            .shared_ranges((&a.region, &a.id), (&b.region, &b.id));
        let shared = match &self.only {
            Some(only) => intersect(&shared, only),
            None => shared,
        };
        let mut report = PairReport {
            ranges: shared.len() as u64,
            ..Default::default()
        };
        if shared.is_empty() {
            return Ok(report);
        }
        // One cutoff for both sides and every level of the descent.
        let before_hlc = if self.settle.is_zero() {
            0
        } else {
            let now_ms = geolog_core::hlc::system_ms();
            // On a slice boundary: the nodes answer from the digests they
            // keep in memory.
            let cutoff_ms = now_ms.saturating_sub(self.settle.as_millis() as u64);
            geolog_core::Hlc::new(cutoff_ms - cutoff_ms % DIGEST_SLICE_MS, 0).packed()
        };
        let mut ranges = shared.clone();
        let mut depth = 0;
        let mut differing: Vec<(Bucket, u64)>;
        loop {
            let (da, db) = tokio::try_join!(
                a.digests(&ranges, depth, before_hlc),
                b.digests(&ranges, depth, before_hlc)
            )?;
            report.digests += (da.0.len() + db.0.len()) as u64;
            report.bytes += da.1 + db.1;
            let (da, db) = (da.0, db.0);
            let buckets: BTreeSet<&Bucket> = da.keys().chain(db.keys()).collect();
            differing = buckets
                .into_iter()
                .filter(|c| da.get(c) != db.get(c))
                .map(|c| {
                    let size = |d: &BTreeMap<Bucket, (u64, u64)>| d.get(c).map_or(0, |x| x.1);
                    (*c, size(&da) + size(&db))
                })
                .collect();
            if differing.is_empty() || depth == LEAF_DEPTH {
                break;
            }
            let parents: Vec<Bucket> = differing.iter().map(|(b, _)| *b).collect();
            ranges = clip(&parents, &shared);
            depth += LEVEL_BITS;
        }
        report.leaves = differing.len() as u64;
        for chunk in chunks(&differing) {
            let ranges = clip(&chunk, &shared);
            let (va, vb) = tokio::try_join!(a.versions(&ranges), b.versions(&ranges))?;
            report.bytes += va.1 + vb.1;
            let (va, vb) = (va.0, vb.0);
            let dots = |vs: &[pb::Version]| -> HashSet<(String, Option<pb::Dot>)> {
                vs.iter().map(identity).collect()
            };
            let (has_a, has_b) = (dots(&va), dots(&vb));
            for (to, versions, has) in [(b, va, &has_b), (a, vb, &has_a)] {
                let missing: Vec<pb::Version> = versions
                    .into_iter()
                    .filter(|v| !has.contains(&identity(v)))
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                report.versions_sent += missing.len() as u64;
                report.bytes += missing.iter().map(|v| v.encoded_len() as u64).sum::<u64>();
                report.versions_repaired += u64::from(to.apply(missing).await?);
            }
        }
        debug_assert!(differing.iter().all(|(b, _)| b.depth == LEAF_DEPTH));
        Ok(report)
    }
}

/// True when a remote region's coordinator answers a health check soon.
async fn answers(relay: &CoordinatorClient<GrpcClient<Channel>>) -> bool {
    let mut client = relay.clone();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.health(cpb::HealthRequest {})).await,
        Ok(Ok(_))
    )
}

/// Splits differing leaves into chunks of about [`VERSIONS_PER_CALL`]
/// versions (both sides counted), so no message grows with the data set.
fn chunks(leaves: &[(Bucket, u64)]) -> Vec<Vec<Bucket>> {
    let mut out: Vec<Vec<Bucket>> = Vec::new();
    let mut size = 0;
    for &(leaf, versions) in leaves {
        if out.is_empty() || size + versions > VERSIONS_PER_CALL {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("pushed above").push(leaf);
        size += versions;
    }
    out
}

/// `versions` in order, split into groups of at most `max_bytes` encoded
/// (a version larger than that alone).
fn by_bytes(versions: Vec<pb::Version>, max_bytes: usize) -> Vec<Vec<pb::Version>> {
    let mut groups: Vec<Vec<pb::Version>> = Vec::new();
    let mut size = 0;
    for version in versions {
        let len = version.encoded_len();
        if groups.is_empty() || size + len > max_bytes {
            groups.push(Vec::new());
            size = 0;
        }
        size += len;
        groups.last_mut().expect("pushed above").push(version);
    }
    groups
}

/// A version's identity: its key and dot.
fn identity(v: &pb::Version) -> (String, Option<pb::Dot>) {
    (v.key.clone(), v.dot.clone())
}

fn to_wire(ranges: &[(i64, i64)]) -> Vec<pb::TokenRange> {
    ranges
        .iter()
        .map(|&(low, high)| pb::TokenRange { low, high })
        .collect()
}

impl Node {
    /// The digests of the buckets of `depth` inside `ranges`, and the bytes
    /// the answer took.
    async fn digests(
        &self,
        ranges: &[(i64, i64)],
        depth: u32,
        before_hlc: u64,
    ) -> Result<(BTreeMap<Bucket, (u64, u64)>, u64), Status> {
        let request = pb::DigestsRequest {
            ranges: to_wire(ranges),
            depth,
            before_hlc,
        };
        let answer = match &self.access {
            Access::Direct(client) => client.clone().digests(request).await?,
            Access::Relayed(client) => {
                let request = cpb::NodeDigestsRequest {
                    node: self.id.clone(),
                    request: Some(request),
                };
                client.clone().node_digests(request).await?
            }
        }
        .into_inner();
        let bytes = answer.encoded_len() as u64;
        let digests = answer
            .digests
            .into_iter()
            .filter_map(|d| {
                d.bucket.map(|b| {
                    let bucket = Bucket {
                        depth: b.depth,
                        prefix: b.prefix,
                    };
                    (bucket, (d.digest, d.versions))
                })
            })
            .collect();
        Ok((digests, bytes))
    }

    /// Every version of the keys inside `ranges`, and the bytes they took:
    /// as many pages as the node answers (each well under a message).
    async fn versions(&self, ranges: &[(i64, i64)]) -> Result<(Vec<pb::Version>, u64), Status> {
        let mut versions: Vec<pb::Version> = Vec::new();
        let mut bytes = 0;
        loop {
            let request = pb::BucketVersionsRequest {
                ranges: to_wire(ranges),
                after: versions.last().map(pb::VersionPosition::of),
            };
            let answer = match &self.access {
                Access::Direct(client) => client.clone().bucket_versions(request).await?,
                Access::Relayed(client) => {
                    let request = cpb::NodeBucketVersionsRequest {
                        node: self.id.clone(),
                        request: Some(request),
                    };
                    client.clone().node_bucket_versions(request).await?
                }
            }
            .into_inner();
            bytes += answer.encoded_len() as u64;
            let more = answer.more && !answer.versions.is_empty();
            versions.extend(answer.versions);
            if !more {
                return Ok((versions, bytes));
            }
        }
    }

    /// Merges `versions` into the node, in calls of at most a quarter of a
    /// message each; returns how many were new.
    async fn apply(&self, versions: Vec<pb::Version>) -> Result<u32, Status> {
        let mut inserted = 0;
        for versions in by_bytes(versions, MAX_MESSAGE_BYTES / 4) {
            let request = pb::ApplyRequest { versions };
            let answer = match &self.access {
                Access::Direct(client) => client.clone().apply(request).await?,
                Access::Relayed(client) => {
                    let request = cpb::NodeApplyRequest {
                        node: self.id.clone(),
                        request: Some(request),
                    };
                    client.clone().node_apply(request).await?
                }
            };
            inserted += answer.into_inner().inserted;
        }
        Ok(inserted)
    }
}

/// The span of one pair's comparison: a trace per pair and pass, the
/// nodes' digest, versions and apply calls under it.
fn compare_span(a: &Node, b: &Node) -> tracing::Span {
    tracing::info_span!(
        "anti_entropy",
        otel.name = "anti_entropy compare",
        a = %a.id,
        b = %b.id,
        a_region = %a.region,
        b_region = %b.region,
    )
}

/// Describes the worker's metrics (`# HELP` lines); counters start at zero.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (name, help) in [
        ("anti_entropy_passes_total", "finished anti-entropy passes"),
        (
            "anti_entropy_ranges_compared_total",
            "Merkle tree ranges compared",
        ),
        (
            "anti_entropy_digests_exchanged_total",
            "Merkle digests received from both sides",
        ),
        (
            "anti_entropy_versions_sent_total",
            "versions sent to a replica that lacked them",
        ),
        (
            "anti_entropy_versions_repaired_total",
            "versions that were new to the receiving replica",
        ),
        (
            "anti_entropy_bytes_total",
            "encoded bytes exchanged by comparisons and repairs",
        ),
        (
            "anti_entropy_errors_total",
            "replica pairs whose comparison failed",
        ),
    ] {
        describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
    describe_histogram!(
        "anti_entropy_compare_seconds",
        metrics::Unit::Seconds,
        "time to compare and repair one replica pair"
    );
    describe_gauge!(
        "anti_entropy_last_pass_timestamp_seconds",
        "when the last pass finished (unix seconds)"
    );
    describe_gauge!(
        "anti_entropy_last_pass_failed_pairs",
        "replica pairs the last pass could not compare"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_near_the_bound_and_keep_every_leaf() {
        let leaves: Vec<(Bucket, u64)> = (0..100)
            .map(|i| {
                let bucket = Bucket {
                    depth: LEAF_DEPTH,
                    prefix: i,
                };
                (bucket, 30 + i % 7 * 100)
            })
            .collect();
        let split = chunks(&leaves);
        assert_eq!(split.iter().map(Vec::len).sum::<usize>(), 100);
        for chunk in &split {
            let size: u64 = chunk.iter().map(|b| leaves[b.prefix as usize].1).sum();
            assert!(chunk.len() == 1 || size <= VERSIONS_PER_CALL);
        }
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn versions_are_applied_in_groups_that_fit_a_message() {
        let version = |bytes: usize| pb::Version {
            key: "k".into(),
            value_json: vec![b'1'; bytes].into(),
            ..Default::default()
        };
        let sizes = [10, 500, 10, 2_000, 10, 10, 10];
        let versions: Vec<pb::Version> = sizes.iter().map(|&n| version(n)).collect();
        let groups = by_bytes(versions.clone(), 1_000);
        assert_eq!(groups.concat(), versions, "all of them, in order");
        for group in &groups {
            let size: usize = group.iter().map(|v| v.encoded_len()).sum();
            assert!(group.len() == 1 || size <= 1_000, "{size}");
        }
        assert_eq!(groups.len(), 3, "[10, 500, 10], [2000], [10, 10, 10]");
        assert!(by_bytes(Vec::new(), 1_000).is_empty());
    }
}
