//! `geolog-repair-bench`: what anti-entropy costs, against the naive
//! comparison that ships every row.
//!
//! Starts a one-region cluster of two storage nodes (RF 2, real processes,
//! real PostgreSQL), loads the same N versions into both nodes' databases
//! (straight SQL, in batches, with the columns the storage node would
//! write), then measures:
//!
//! (0) nothing missing: one Merkle comparison of equal replicas (what
//!     every periodic pass costs while nothing changes);
//! (a) one version missing on one node: one Merkle comparison (digests,
//!     leaf versions, bytes, time) vs. fetching every row of both nodes and
//!     diffing them;
//! (b) the second node wiped (`geolog node wipe`) and rebuilt by one
//!     comparison vs. shipping every row of the first node.
//!
//! `cargo build --release --workspace && target/release/geolog-repair-bench --versions 1000000`

use anyhow::Context;
use clap::Parser;
use geolog_anti_entropy::{AntiEntropy, PairReport};
use geolog_core::merkle::{Bucket, tree_token, version_hash};
use geolog_launcher::topology::Shape;
use geolog_launcher::{ClusterSpec, RunningCluster};
use geolog_proto::storage as pb;
use geolog_proto::storage::storage_client::StorageClient;
use prost::Message;
use sqlx::postgres::PgPool;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about = "Anti-entropy cost vs shipping every row")]
struct Args {
    /// Versions on each node.
    #[arg(long, default_value_t = 1_000_000)]
    versions: u64,
    /// Bytes of each version's value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Skip case (b) (rebuilding a wiped node), the longest by far.
    #[arg(long)]
    no_wipe: bool,
    /// Where the cluster lives while the bench runs (deleted after).
    #[arg(long, default_value = "target/geolog-repair-bench")]
    data_dir: PathBuf,
}

const MINTER: &str = "a1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.data_dir);
    let mut spec = ClusterSpec::new(
        &args.data_dir,
        Shape {
            regions: 1,
            nodes_per_region: 2,
            replication_factor: 2,
        },
    );
    spec.gateway_port = 0;
    // Only the comparisons below may repair.
    spec.env = vec![(
        "GEOLOG__ANTI_ENTROPY__INTERVAL_MS".into(),
        "86400000".into(),
    )];
    let mut cluster = RunningCluster::start(spec).await?;
    let result = run(&args, &mut cluster).await;
    cluster.shutdown();
    let _ = std::fs::remove_dir_all(&args.data_dir);
    result
}

async fn run(args: &Args, cluster: &mut RunningCluster) -> anyhow::Result<()> {
    let config = cluster.config().clone();
    let nodes = &config.regions[0].nodes;
    let mut pools = Vec::new();
    for node in nodes {
        let url = node
            .database_url
            .clone()
            .context("managed nodes have a URL")?;
        pools.push(PgPool::connect(&url).await?);
    }
    let started = Instant::now();
    load(&pools, args.versions, args.value_bytes).await?;
    println!(
        "loaded {} versions on each of {} nodes in {:.1}s",
        args.versions,
        pools.len(),
        started.elapsed().as_secs_f64()
    );

    // (a) one version missing on the second node.
    let missing = format!("bench-{}", args.versions / 2);
    sqlx::query("DELETE FROM versions WHERE token = $2 AND key = $1")
        .bind(&missing)
        .bind(tree_token(&missing))
        .execute(&pools[1])
        .await?;
    for pool in &pools {
        sqlx::query("VACUUM ANALYZE versions").execute(pool).await?;
    }
    // The rows were written behind the nodes' backs: restarted, each node
    // loads the digests of what its database holds.
    for node in nodes {
        cluster.restart(&node.id).await?;
    }
    let clients: Vec<StorageClient<tonic::transport::Channel>> = nodes
        .iter()
        .map(|n| client(&n.addr))
        .collect::<Result<_, _>>()?;
    let ((naive_bytes, naive_diff), naive_time) = timed(naive_diff(&clients)).await?;
    anyhow::ensure!(
        naive_diff == 1,
        "the naive diff found {naive_diff} differences"
    );
    let mut worker = AntiEntropy::new(&config, "a")?;
    worker.compare_everything();
    let (a, b) = worker.pairs(false).remove(0);
    let (report_a, time_a) = timed(worker.compare(&a, &b)).await?;
    // Repaired: the replicas are equal now.
    let (report_0, time_0) = timed(worker.compare(&a, &b)).await?;
    anyhow::ensure!(
        report_0.leaves == 0 && report_0.versions_sent == 0,
        "equal replicas differ: {report_0:?}"
    );
    // What the root digests cost each node when aggregated inside
    // PostgreSQL (a cutoff off a slice boundary, which memory does not
    // serve; in the future, so every version counts), as every pass did
    // before the nodes kept digests in memory.
    let root = |before_hlc: u64| pb::DigestsRequest {
        ranges: vec![pb::TokenRange {
            low: i64::MIN,
            high: i64::MAX,
        }],
        depth: 0,
        before_hlc,
    };
    let future = geolog_core::Hlc::new(u64::from(u32::MAX) * 1_000, 1).packed();
    let mut roots = Vec::new();
    let started = Instant::now();
    for client in &clients {
        roots.push(
            client
                .clone()
                .digests(root(future))
                .await?
                .into_inner()
                .digests,
        );
    }
    let time_pg = started.elapsed();
    let started = Instant::now();
    for (client, aggregated) in clients.iter().zip(&roots) {
        let held = client.clone().digests(root(0)).await?.into_inner().digests;
        anyhow::ensure!(
            &held == aggregated,
            "memory {held:?} != database {aggregated:?}"
        );
    }
    let time_mem = started.elapsed();
    anyhow::ensure!(
        report_a.versions_repaired == 1,
        "expected one repair: {report_a:?}"
    );

    println!();
    println!(
        "{:<38} {:>12} {:>14} {:>10} {:>10}",
        "case", "digests", "bytes", "versions", "seconds"
    );
    let row = |name: &str, r: &PairReport, t: Duration| {
        println!(
            "{:<38} {:>12} {:>14} {:>10} {:>10.3}",
            name,
            r.digests,
            r.bytes,
            r.versions_sent,
            t.as_secs_f64()
        )
    };
    row("(0) equal replicas, anti-entropy", &report_0, time_0);
    println!(
        "{:<38} {:>12} {:>14} {:>10} {:>10.3}",
        "(0) both root digests, from memory",
        2,
        "",
        0,
        time_mem.as_secs_f64()
    );
    println!(
        "{:<38} {:>12} {:>14} {:>10} {:>10.3}",
        "(0) both root digests, aggregated in PG",
        2,
        "",
        0,
        time_pg.as_secs_f64()
    );
    row("(a) 1 differing, anti-entropy", &report_a, time_a);
    println!(
        "{:<38} {:>12} {:>14} {:>10} {:>10.3}",
        "(a) 1 differing, naive (both sides)",
        0,
        naive_bytes,
        2 * args.versions - 1,
        naive_time.as_secs_f64()
    );
    println!();
    println!(
        "(a) naive/anti-entropy: {:.0}x the bytes, {:.0}x the time",
        naive_bytes as f64 / report_a.bytes.max(1) as f64,
        naive_time.as_secs_f64() / time_a.as_secs_f64(),
    );
    if args.no_wipe {
        return Ok(());
    }

    // (b) the second node wiped, rebuilt by one comparison.
    cluster.wipe_node(&nodes[1].id).await?;
    let (report_b, time_b) = timed(worker.compare(&a, &b)).await?;
    anyhow::ensure!(
        report_b.versions_repaired == args.versions,
        "expected {} repairs: {report_b:?}",
        args.versions
    );
    let (one_side, ship_time) = timed(fetch_all(&clients[0])).await?;
    row("(b) wiped node, anti-entropy", &report_b, time_b);
    println!(
        "{:<38} {:>12} {:>14} {:>10} {:>10.3}",
        "(b) wiped node, naive (ship one side)",
        0,
        one_side.0,
        one_side.1,
        ship_time.as_secs_f64()
    );
    println!(
        "(b): {:.2}x the bytes (anti-entropy fetches then applies, so versions cross twice); \
         the naive time is only fetching one side ({:.1}s), applying the rows is extra",
        one_side.0 as f64 / report_b.bytes.max(1) as f64,
        ship_time.as_secs_f64()
    );
    Ok(())
}

async fn timed<T, E>(f: impl Future<Output = Result<T, E>>) -> Result<(T, Duration), E> {
    let started = Instant::now();
    let value = f.await?;
    Ok((value, started.elapsed()))
}

fn client(addr: &str) -> Result<StorageClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(Duration::from_secs(300))
        .connect_lazy();
    Ok(StorageClient::new(channel).max_decoding_message_size(256 * 1024 * 1024))
}

/// The same versions on every node: keys `bench-0..n`, minted by `a1`.
async fn load(pools: &[PgPool], n: u64, value_bytes: usize) -> anyhow::Result<()> {
    let value = serde_json::to_string(&"x".repeat(value_bytes))?;
    const BATCH: u64 = 10_000;
    for start in (0..n).step_by(BATCH as usize) {
        let end = (start + BATCH).min(n);
        let keys: Vec<String> = (start..end).map(|i| format!("bench-{i}")).collect();
        let seqs: Vec<i64> = (start..end).map(|i| i as i64 + 1).collect();
        let tokens: Vec<i64> = keys.iter().map(|k| tree_token(k)).collect();
        let vhashes: Vec<i64> = keys
            .iter()
            .zip(&seqs)
            .map(|(k, s)| version_hash(k, MINTER, *s as u64))
            .collect();
        let hlc = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64)
            << 16;
        for pool in pools {
            sqlx::query(
                "WITH v AS (INSERT INTO versions (key, node, seq, hlc, value, context, token, vhash) \
                 SELECT k, $2, s, $3, $4, ''::bytea, t, h \
                 FROM UNNEST($1::text[], $5::bigint[], $6::bigint[], $7::bigint[]) AS u(k, s, t, h) \
                 RETURNING key, node, seq, hlc) \
                 INSERT INTO frontiers (key, nodes, seqs, hlcs) SELECT key, ARRAY[node], ARRAY[seq], ARRAY[hlc] FROM v",
            )
            .bind(&keys)
            .bind(MINTER)
            .bind(hlc)
            .bind(&value)
            .bind(&seqs)
            .bind(&tokens)
            .bind(&vhashes)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// Every version of one node, fetched range by range: (bytes, versions).
async fn fetch_all(
    client: &StorageClient<tonic::transport::Channel>,
) -> Result<(u64, u64), tonic::Status> {
    let mut totals = (0, 0);
    for versions in fetch_ranges(client).await? {
        totals.0 += versions.encoded_len() as u64;
        totals.1 += versions.versions.len() as u64;
    }
    Ok(totals)
}

async fn fetch_ranges(
    client: &StorageClient<tonic::transport::Channel>,
) -> Result<Vec<pb::BucketVersionsResponse>, tonic::Status> {
    let mut pages = Vec::new();
    for prefix in 0..1u64 << 8 {
        let (low, high) = Bucket { depth: 8, prefix }.hash_range();
        let mut after = None;
        loop {
            let request = pb::BucketVersionsRequest {
                ranges: vec![pb::TokenRange { low, high }],
                after,
            };
            let page = client.clone().bucket_versions(request).await?.into_inner();
            after = page
                .versions
                .last()
                .filter(|_| page.more)
                .map(pb::VersionPosition::of);
            pages.push(page);
            if after.is_none() {
                break;
            }
        }
    }
    Ok(pages)
}

/// The naive comparison: every row of both nodes crosses the network and
/// the sets are diffed. Returns (bytes, differences).
async fn naive_diff(
    clients: &[StorageClient<tonic::transport::Channel>],
) -> Result<(u64, usize), tonic::Status> {
    let mut bytes = 0;
    let mut sets: Vec<HashSet<(String, String, u64)>> = Vec::new();
    for client in clients {
        let mut set = HashSet::new();
        for page in fetch_ranges(client).await? {
            bytes += page.encoded_len() as u64;
            for v in page.versions {
                let dot = v.dot.unwrap_or_default();
                set.insert((v.key, dot.node, dot.seq));
            }
        }
        sets.push(set);
    }
    Ok((bytes, sets[0].symmetric_difference(&sets[1]).count()))
}
