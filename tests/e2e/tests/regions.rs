//! Three regions × three nodes (RF 3 each), real processes, real PostgreSQL,
//! inter-region traffic through the launcher's fault proxies.

mod common;

use common::{Api, THREE_BY_THREE, code, kill_by_cluster_json, wait_until};
use geolog_testkit::TestCluster;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn apis(cluster: &TestCluster) -> BTreeMap<&'static str, Api> {
    ["a", "b", "c"]
        .into_iter()
        .map(|r| (r, Api::new(cluster.gateway(r))))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_level_on_three_regions() {
    let cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let apis = apis(&cluster);
    // (level, acks required in total, required in each region (a, b, c))
    let levels = [
        ("ANY", 1, [0, 0, 0]),
        ("ONE", 1, [0, 0, 0]),
        ("TWO", 2, [0, 0, 0]),
        ("THREE", 3, [0, 0, 0]),
        ("QUORUM", 5, [0, 0, 0]),
        ("ALL", 9, [0, 0, 0]),
        ("LOCAL_ONE", 1, [1, 0, 0]),
        ("LOCAL_QUORUM", 2, [2, 0, 0]),
        ("EACH_QUORUM", 6, [2, 2, 2]),
    ];
    for (level, required, per_region) in levels {
        let key = format!("three-{level}");
        let (status, body) = apis["a"].write(&key, json!(level), Some(level)).await;
        assert_eq!(status, 201, "{level}: {body}");
        assert_eq!(body["acks"]["required"], required, "{level}");
        for (i, region) in ["a", "b", "c"].iter().enumerate() {
            let acks = body["acks"]["regions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["region"] == *region);
            let acks = acks.unwrap_or_else(|| panic!("{level}: acks of region {region} in {body}"));
            assert_eq!(
                acks["required"].as_u64().unwrap_or(0),
                per_region[i],
                "{level} {region}"
            );
            assert!(
                acks["received"].as_u64().unwrap() >= per_region[i],
                "{level} {region}: {body}"
            );
        }
        let read_level = if level == "ANY" { "ALL" } else { level };
        let (status, read) = apis["a"].read(&key, Some(read_level)).await;
        assert_eq!((status, &read["value"]), (200, &json!(level)), "{level}");
    }
    // A write is delivered to every region whatever its level: after a
    // LOCAL_ONE write in A, region C answers at LOCAL_ONE (once delivered).
    let (status, _) = apis["a"]
        .write("spread", json!("everywhere"), Some("LOCAL_ONE"))
        .await;
    assert_eq!(status, 201);
    for region in ["b", "c"] {
        common::wait_until(Duration::from_secs(10), || async {
            apis[region].read("spread", Some("LOCAL_ONE")).await.0 == 200
        })
        .await;
    }
    // Reads at EACH_QUORUM / QUORUM from C see a write acknowledged at EACH_QUORUM in A.
    let (status, _) = apis["a"].write("each", json!(1), Some("EACH_QUORUM")).await;
    assert_eq!(status, 201);
    for level in ["EACH_QUORUM", "QUORUM", "ALL"] {
        let (status, body) = apis["c"].read("each", Some(level)).await;
        assert_eq!((status, &body["value"]), (200, &json!(1)), "{level} in c");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_then_outbox_replay_delivers_everything() {
    let cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let apis = apis(&cluster);
    cluster.cluster.partition("a", "c").unwrap();
    cluster.cluster.partition("b", "c").unwrap();
    let mut acknowledged: Vec<(String, serde_json::Value)> = Vec::new();

    // Majority side: LOCAL_QUORUM and QUORUM (5 of 9: A and B) keep working.
    for i in 0..10 {
        for level in ["LOCAL_QUORUM", "QUORUM"] {
            let key = format!("a-{level}-{i}");
            let (status, body) = apis["a"].write(&key, json!(i), Some(level)).await;
            assert_eq!(status, 201, "{level} in A during the partition: {body}");
            acknowledged.push((key, json!(i)));
        }
    }
    // EACH_QUORUM needs C: 503 (C known unreachable) or 504 (not yet known).
    let (status, body) = apis["a"]
        .write("a-each", json!(0), Some("EACH_QUORUM"))
        .await;
    assert!(status == 503 || status == 504, "{status} {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("region c"),
        "{body}"
    );
    // Once C is known unreachable, the same fails fast with 503.
    apis["a"].wait_replica_state("c1", "dead").await;
    let started = Instant::now();
    let (status, body) = apis["a"]
        .write("a-each", json!(0), Some("EACH_QUORUM"))
        .await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    assert!(started.elapsed() < Duration::from_millis(500));

    // Minority side: C's own LOCAL_QUORUM writes still work; QUORUM does not.
    for i in 0..10 {
        let key = format!("c-{i}");
        let (status, body) = apis["c"].write(&key, json!(i), Some("LOCAL_QUORUM")).await;
        assert_eq!(
            status, 201,
            "LOCAL_QUORUM in C during the partition: {body}"
        );
        acknowledged.push((key, json!(i)));
    }
    let (status, _) = apis["c"].write("c-quorum", json!(0), Some("QUORUM")).await;
    assert!(status == 503 || status == 504);
    // The outbox is measured once per replay interval (1 s).
    for (region, what) in [
        ("a", "what C has not received"),
        ("c", "what A and B have not received"),
    ] {
        common::wait_until(Duration::from_secs(10), || async {
            (1..u64::MAX).contains(&apis[region].outbox_depth().await)
        })
        .await;
        println!(
            "{region} holds {what}: {} entries",
            apis[region].outbox_depth().await
        );
    }

    // Heal: outbox replay alone (there is no anti-entropy) delivers
    // everything, and every write acknowledged on either side is readable
    // at LOCAL_ONE in every region.
    cluster.cluster.heal();
    // The healed links are seen alive within 2 s, and stay alive while the
    // outboxes drain: ALL (every replica of every region) keeps working.
    let healed = Instant::now();
    let all_alive = |api: &common::Api| {
        let api = api.clone();
        async move {
            let (_, health) = api
                .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
                .await;
            health["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["state"] == "alive"))
        }
    };
    for region in ["a", "c"] {
        while !all_alive(&apis[region]).await {
            assert!(
                healed.elapsed() < Duration::from_secs(2),
                "{region} still sees a dead replica {:?} after the heal",
                healed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in 0..15 {
        for region in ["a", "c"] {
            assert!(
                all_alive(&apis[region]).await,
                "{region}: a replica died after the heal"
            );
            let key = format!("{region}-all-after-heal-{i}");
            let (status, body) = apis[region].write(&key, json!(i), Some("ALL")).await;
            assert_eq!(status, 201, "ALL from {region} after the heal: {body}");
            acknowledged.push((key, json!(i)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for api in apis.values() {
        api.wait_outbox_empty(Duration::from_secs(60)).await;
    }
    for (region, api) in &apis {
        for (key, value) in &acknowledged {
            let (status, body) = api.read(key, Some("LOCAL_ONE")).await;
            assert_eq!(
                (status, &body["value"]),
                (200, value),
                "{key} at LOCAL_ONE in {region}"
            );
        }
    }
    let (status, _) = apis["a"]
        .write("after-heal", json!(true), Some("EACH_QUORUM"))
        .await;
    assert_eq!(status, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_region_down() {
    let mut cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let apis = apis(&cluster);
    for node in ["c1", "c2", "c3"] {
        cluster.cluster.stop_node(node, false).unwrap();
    }
    // Within the failure-detection time (probes every 200 ms), A knows.
    let started = Instant::now();
    apis["a"].wait_replica_state("c3", "dead").await;
    apis["a"].wait_replica_state("c1", "dead").await;
    apis["a"].wait_replica_state("c2", "dead").await;
    let detection = started.elapsed();
    assert!(
        detection < Duration::from_secs(5),
        "detected in {detection:?}"
    );
    let (status, body) = apis["a"].write("each", json!(0), Some("EACH_QUORUM")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    assert_eq!(
        body["error"]["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == "c")
            .unwrap()["alive"],
        0
    );

    let mut acknowledged = Vec::new();
    for (region, level) in [
        ("a", "QUORUM"),
        ("a", "LOCAL_QUORUM"),
        ("b", "QUORUM"),
        ("b", "LOCAL_QUORUM"),
    ] {
        for i in 0..5 {
            let key = format!("{region}-{level}-{i}");
            let (status, body) = apis[region].write(&key, json!(i), Some(level)).await;
            assert_eq!(status, 201, "{level} in {region}: {body}");
            let (status, _) = apis[region].read(&key, Some(level)).await;
            assert_eq!(status, 200);
            acknowledged.push((key, json!(i)));
        }
    }

    // The outboxes are sampled once per replay interval: wait until A's
    // and B's show what C has not received (C is down, so they cannot
    // empty before it returns), so that "empty" below means delivered and
    // not a sample taken before the writes.
    for region in ["a", "b"] {
        common::wait_until(Duration::from_secs(20), || async {
            (1..u64::MAX).contains(&apis[region].outbox_depth().await)
        })
        .await;
    }
    // The region comes back; the outboxes of A and B deliver what it missed.
    for node in ["c1", "c2", "c3"] {
        cluster.cluster.start_node(node).await.unwrap();
    }
    for region in ["a", "b"] {
        apis[region]
            .wait_outbox_empty(Duration::from_secs(60))
            .await;
    }
    for (key, value) in &acknowledged {
        let (status, body) = apis["c"].read(key, Some("LOCAL_ONE")).await;
        if (status, &body["value"]) != (200, value) {
            // What each replica holds, and what a believed it owed.
            let get = reqwest::Method::GET;
            let path = format!("/api/logs/{key}/replicas");
            let (_, replicas) = apis["c"].raw(get.clone(), &path, Vec::new()).await;
            let (_, health) = apis["a"].raw(get, "/api/logs/health", Vec::new()).await;
            let logs = cluster.keep_files();
            panic!(
                "{key} at LOCAL_ONE in c: {status} {body}\nreplicas: {replicas}\na's health: {health}\nlogs kept in {}",
                logs.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_mid_stream_loses_nothing_acknowledged() {
    let mut cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let apis = apis(&cluster);
    let data_dir = cluster.cluster.data_dir().to_path_buf();
    let writer_api = Api::new(cluster.gateway("a"));
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let acked = std::sync::Arc::new(AtomicUsize::new(0));
    let (writer_stop, writer_acked) = (stop.clone(), acked.clone());
    // A writer streaming writes at LOCAL_QUORUM through A, as fast as it can.
    let writer = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        let mut refused = 0;
        let mut i = 0;
        while !writer_stop.load(Ordering::SeqCst) {
            let key = format!("stream-{i}");
            let (status, _) = writer_api.write(&key, json!(i), Some("LOCAL_QUORUM")).await;
            if status == 201 {
                acknowledged.push((key, json!(i)));
                writer_acked.fetch_add(1, Ordering::SeqCst);
            } else {
                refused += 1;
            }
            i += 1;
        }
        (acknowledged, refused)
    });
    // Progress is counted in writes, not in time: a loaded machine is slow.
    let acked_at_least = |n: usize| {
        let acked = acked.clone();
        async move { acked.load(Ordering::SeqCst) >= n }
    };
    wait_until(Duration::from_secs(60), || acked_at_least(11)).await;
    kill_by_cluster_json(&data_dir, "a-co1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster
        .cluster
        .restart("a-co1")
        .await
        .expect("coordinator restarts");
    let before = acked.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(60), || acked_at_least(before + 10)).await;
    stop.store(true, Ordering::SeqCst);
    let (acknowledged, refused) = writer.await.unwrap();
    assert!(
        acknowledged.len() > 20,
        "the writer made progress: {}",
        acknowledged.len()
    );
    assert!(
        refused > 0,
        "some writes were refused while the coordinator was down"
    );

    // In A: quorum reads see every acknowledged write. In B and C: after
    // outbox replay, every replica has it.
    for api in apis.values() {
        api.wait_outbox_empty(Duration::from_secs(60)).await;
    }
    for (key, value) in &acknowledged {
        let (status, body) = apis["a"].read(key, Some("LOCAL_QUORUM")).await;
        assert_eq!((status, &body["value"]), (200, value), "{key} in a");
        for region in ["b", "c"] {
            let (status, body) = apis[region].read(key, Some("LOCAL_ONE")).await;
            assert_eq!(
                (status, &body["value"]),
                (200, value),
                "{key} at LOCAL_ONE in {region}"
            );
        }
    }
}

/// A region cut off for longer than the outbox window: the versions owed
/// for it expire, and anti-entropy alone brings it back after the heal.
/// Anti-entropy crosses regions over the same links as replication, so
/// during the partition it cannot reach the other side either.
#[tokio::test(flavor = "multi_thread")]
async fn a_region_cut_off_longer_than_the_outbox_window_is_repaired_by_anti_entropy() {
    // Only the explicit `geolog repair run` below can repair.
    let (cluster, a, b) =
        two_regions_without_periodic_repair(&[("GEOLOG__COORDINATOR__OUTBOX_WINDOW_MS", "1000")])
            .await;
    let data_dir = cluster.cluster.data_dir();

    cluster.cluster.partition("a", "b").unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("cut-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let (status, body) = a.write(key, json!(i), Some("LOCAL_QUORUM")).await;
        assert_eq!(status, 201, "{body}");
    }
    let out = common::geolog(data_dir, &["repair", "run", "--region", "a"]);
    let printed = common::printed(&out);
    assert!(!out.status.success(), "crossed the partition: {printed}");
    assert!(printed.contains("pairs failed"), "{printed}");

    // The replay worker drops entries older than the window on its next
    // (failing) attempt. Counted in a's databases: the health's depth is
    // sampled by the replay worker between attempts, and a sample taken
    // before the writes could read as empty while an attempt is held up
    // by the cut (then every entry was delivered at the heal).
    wait_until(Duration::from_secs(40), || async {
        owed_versions(&cluster, "a").await == 0
    })
    .await;
    // And no replication call to b is still queued in a's coordinator (one
    // queued behind the failing ones would be sent once the link heals).
    let coordinator_a = geolog_launcher::ClusterFile::read(data_dir)
        .unwrap()
        .processes
        .into_iter()
        .find(|p| p.id == "a-co1")
        .and_then(|p| p.metrics_url)
        .expect("a-co1 serves metrics");
    wait_until(Duration::from_secs(40), || async {
        let text = a.http.get(&coordinator_a).send().await.unwrap();
        let text = text.text().await.unwrap();
        !text.lines().any(|l| {
            l.starts_with("write_queue_items{")
                && l.contains("kind=\"replicate\"")
                && !l.ends_with(" 0")
        })
    })
    .await;
    cluster.cluster.heal();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A replication call made during the cut may still land once it heals
    // (the link delivers what it held although the sender gave up on it):
    // anti-entropy must repair whatever did not.
    let mut missing = 0;
    for key in &keys {
        if b.read(key, Some("LOCAL_ONE")).await.0 == 404 {
            missing += 1;
        }
    }
    assert!(missing > 0, "every key reached b without anti-entropy");

    let out = common::geolog(data_dir, &["repair", "run"]);
    let printed = common::printed(&out);
    assert!(out.status.success(), "{printed}");
    // A key neither replica of b had is received by both.
    let repaired: u64 = printed
        .lines()
        .find(|l| l.starts_with("region a:"))
        .and_then(|l| l.split(" repaired").next())
        .and_then(|before| before.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no repaired count: {printed}"));
    assert!(
        (2 * missing..=40).contains(&repaired),
        "{missing} keys missing in b, {repaired} repaired: {printed}"
    );
    for (i, key) in keys.iter().enumerate() {
        let (status, body) = b.read(key, Some("LOCAL_QUORUM")).await;
        assert_eq!((status, &body["value"]), (200, &json!(i)), "{key}");
    }

    let printed = common::printed(&common::geolog(data_dir, &["repair", "status"]));
    for region in ["a", "b"] {
        assert!(
            printed.contains(&format!("region {region}: "))
                && printed.contains("passes since start"),
            "{printed}"
        );
    }
    assert!(printed.contains("last pass"), "{printed}");
}

/// Each of `region`'s nodes with a connection pool to its database.
async fn node_databases(cluster: &TestCluster, region: &str) -> Vec<(String, sqlx::PgPool)> {
    let config = cluster.cluster.config();
    let region = config.regions.iter().find(|r| r.name == region).unwrap();
    let mut pools = Vec::new();
    for node in &region.nodes {
        let url = node.database_url.clone().expect("managed nodes have a URL");
        pools.push((node.id.clone(), sqlx::PgPool::connect(&url).await.unwrap()));
    }
    pools
}

/// Versions `region`'s nodes minted that the cursor of another region has
/// not passed yet, counted in their databases.
async fn owed_versions(cluster: &TestCluster, region: &str) -> i64 {
    let mut rows = 0;
    for (node, pool) in node_databases(cluster, region).await {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM versions v JOIN region_cursors c \
               ON (v.arrived, v.seq) > (c.change, c.seq) WHERE v.node = $1",
        )
        .bind(&node)
        .fetch_one(&pool)
        .await
        .unwrap();
        rows += count;
        pool.close().await;
    }
    rows
}

/// Two regions of two nodes (RF 2) with fast failure detection and `extra`
/// settings, whose anti-entropy workers make their first pass at start and
/// then wait: (cluster, region a's API, region b's API).
async fn two_regions_without_periodic_repair(extra: &[(&str, &str)]) -> (TestCluster, Api, Api) {
    let mut env = geolog_testkit::fast_failure_detection();
    env.push(("GEOLOG__ANTI_ENTROPY__INTERVAL_MS".into(), "600000".into()));
    env.extend(common::env(extra));
    let shape = geolog_launcher::topology::Shape {
        regions: 2,
        nodes_per_region: 2,
        replication_factor: 2,
    };
    let cluster = TestCluster::start_with_env(shape, env)
        .await
        .expect("cluster starts");
    let (a, b) = (
        Api::new(cluster.gateway("a")),
        Api::new(cluster.gateway("b")),
    );
    (cluster, a, b)
}

/// Cross-region replay ships each version with its key's frontier on the
/// minting node, never bare: a concurrent sibling the region's cursor has
/// passed undelivered (dropped, say, after the outbox window) still reaches
/// the other region with the sibling minted after it. A bare version would make the
/// receiver's state claim a dot it lacks (its vector covers the minter's
/// earlier sequence numbers), and the lost sibling would never show.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_replay_ships_the_frontier_not_a_bare_version() {
    // Only replication may deliver here, not anti-entropy.
    let (cluster, a, b) = two_regions_without_periodic_repair(&[]).await;
    cluster.cluster.partition("a", "b").unwrap();
    let (status, base) = a.write("doc", json!("base"), Some("LOCAL_QUORUM")).await;
    assert_eq!(status, 201, "{base}");
    let context = base["context"].as_str().unwrap().to_string();
    // Two writes that both saw only the base: concurrent siblings, minted
    // one after the other on the same node.
    for value in ["first", "second"] {
        let (status, body) = a
            .write_with_context("doc", json!(value), &context, "LOCAL_QUORUM")
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (_, read) = a.read("doc", Some("LOCAL_QUORUM")).await;
    assert_eq!(read["siblings"].as_array().map(Vec::len), Some(2), "{read}");

    // The cursor to b passes every version of the key but the newest, as
    // if they had expired undelivered (the node reads its cursor from its
    // database on every replay).
    let mut passed = 0;
    for (node, pool) in node_databases(&cluster, "a").await {
        let done = sqlx::query(
            "UPDATE region_cursors c SET change = v.arrived, seq = v.seq \
             FROM (SELECT arrived, seq FROM versions WHERE key = 'doc' AND node = $1 \
                   ORDER BY arrived DESC, seq DESC OFFSET 1 LIMIT 1) v \
             WHERE c.region = 'b'",
        )
        .bind(&node)
        .execute(&pool)
        .await
        .unwrap();
        passed += done.rows_affected();
        pool.close().await;
    }
    assert_eq!(passed, 1, "the minting node's cursor");
    // The health's outbox depth is sampled: wait until it shows the one
    // entry left, so that "empty" below means delivered.
    wait_until(Duration::from_secs(30), || async {
        a.outbox_depth().await == 1
    })
    .await;

    cluster.cluster.heal();
    a.wait_outbox_empty(Duration::from_secs(60)).await;
    let (status, read) = b.read("doc", Some("LOCAL_QUORUM")).await;
    assert_eq!(status, 200, "{read}");
    let mut values: Vec<String> = read["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].to_string())
        .collect();
    values.sort();
    assert_eq!(values, ["\"first\"", "\"second\""], "{read}");
}
