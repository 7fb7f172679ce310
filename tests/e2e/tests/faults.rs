//! Storage nodes killed by the PIDs in `cluster.json`: which levels keep
//! working, which fail and how fast, and that nothing acknowledged is lost
//! once the nodes are back.

mod common;

use common::{Api, TUTORIAL, code, kill_by_cluster_json};
use geolog_testkit::TestCluster;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn quorum_tolerates_two_dead_nodes_and_all_fails_fast() {
    let mut cluster = TestCluster::start(TUTORIAL).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let data_dir = cluster.cluster.data_dir().to_path_buf();
    // Every write the cluster acknowledged: key → value.
    let mut acknowledged = BTreeMap::new();

    for i in 0..20 {
        let key = format!("before-{i}");
        let (status, _) = api.write(&key, json!(i), Some("ALL")).await;
        assert_eq!(status, 201);
        acknowledged.insert(key, json!(i));
    }

    // Two of five dead: QUORUM (3) still writes and reads; ALL fails with
    // 503 at once — not after the 2 s write timeout.
    kill_by_cluster_json(&data_dir, "a1");
    kill_by_cluster_json(&data_dir, "a2");
    let started = Instant::now();
    let (status, body) = api.write("during-2-dead", json!("x"), Some("ALL")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ALL failed fast: {:?}",
        started.elapsed()
    );
    api.wait_dead_replicas(2).await;
    let started = Instant::now();
    let (status, body) = api.write("during-2-dead", json!("x"), Some("ALL")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"));
    assert_eq!(
        (
            body["error"]["required"].as_u64(),
            body["error"]["alive"].as_u64()
        ),
        (Some(5), Some(3))
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "detected: no RPC is even tried"
    );
    let (status, body) = api.read("before-0", Some("ALL")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"));

    for i in 0..20 {
        let key = format!("quorum-{i}");
        let (status, body) = api.write(&key, json!(i), Some("QUORUM")).await;
        assert_eq!(status, 201, "{body}");
        acknowledged.insert(key, json!(i));
        let (status, body) = api.read(&format!("before-{i}"), Some("QUORUM")).await;
        assert_eq!((status, &body["value"]), (200, &json!(i)));
    }

    // Three of five dead: QUORUM fails, ONE still works.
    kill_by_cluster_json(&data_dir, "a3");
    api.wait_dead_replicas(3).await;
    let (status, body) = api.write("during-3-dead", json!("q"), Some("QUORUM")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    assert_eq!(
        (
            body["error"]["required"].as_u64(),
            body["error"]["alive"].as_u64()
        ),
        (Some(3), Some(2))
    );
    let (status, _) = api.read("before-1", Some("QUORUM")).await;
    assert_eq!(status, 503);
    for i in 0..10 {
        let key = format!("one-{i}");
        let (status, body) = api.write(&key, json!(i), Some("ONE")).await;
        assert_eq!(status, 201, "{body}");
        acknowledged.insert(key, json!(i));
    }
    let (status, body) = api.read("before-2", Some("ONE")).await;
    assert_eq!((status, &body["value"]), (200, &json!(2)));

    // Heal: the nodes come back on their own PostgreSQL with their data.
    for id in ["a1", "a2", "a3"] {
        cluster.cluster.restart(id).await.expect("node restarts");
    }
    api.wait_dead_replicas(0).await;
    let (status, _) = api.write("after-heal", json!(true), Some("ALL")).await;
    assert_eq!(status, 201);

    // Nothing acknowledged was lost: a read at ALL consults every replica
    // and returns every acknowledged value.
    for (key, value) in &acknowledged {
        let (status, body) = api.read(key, Some("ALL")).await;
        assert_eq!((status, &body["value"]), (200, value), "{key}");
    }
    // Writes acknowledged at QUORUM are also visible to QUORUM reads
    // (quorums intersect), even though two replicas missed them.
    for i in 0..20 {
        let (status, body) = api.read(&format!("quorum-{i}"), Some("QUORUM")).await;
        assert_eq!((status, &body["value"]), (200, &json!(i)));
    }
}

/// SIGSTOP freezes a storage node: its socket accepts, nothing answers.
fn signal_by_cluster_json(data_dir: &std::path::Path, id: &str, signal: nix::sys::signal::Signal) {
    let file = geolog_launcher::ClusterFile::read(data_dir).unwrap();
    let pid = file.processes.iter().find(|p| p.id == id).unwrap().pid;
    assert!(geolog_launcher::process::signal_pid(pid, signal));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_replica_times_out_then_is_routed_around() {
    use nix::sys::signal::Signal;
    // No periodic probes (only the one at start): detection must come from
    // the request path itself, which makes the timeout deterministic.
    let env = common::env(&[
        ("GEOLOG__COORDINATOR__PROBE_INTERVAL_MS", "600000"),
        ("GEOLOG__COORDINATOR__WRITE_TIMEOUT_MS", "400"),
        ("GEOLOG__COORDINATOR__READ_TIMEOUT_MS", "400"),
        ("GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS", "1000"),
        ("GEOLOG__COORDINATOR__CIRCUIT_OPEN_MS", "1500"),
    ]);
    let cluster = TestCluster::start_with_env(TUTORIAL, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let data_dir = cluster.cluster.data_dir().to_path_buf();
    let (status, _) = api.write("before", json!(1), Some("ALL")).await;
    assert_eq!(status, 201);

    signal_by_cluster_json(&data_dir, "a1", Signal::SIGSTOP);
    let (status, body) = api.write("while-hung", json!(2), Some("ALL")).await;
    assert_eq!((status, code(&body)), (504, "timeout"), "{body}");
    assert_eq!(body["error"]["required"], 5);
    assert!(body["error"]["received"].as_u64().unwrap() < 5);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may have landed"),
        "{body}"
    );

    // The hung call hits its 1 s replica timeout, the health check it
    // asks for times out too, and that opens the circuit:
    // from then on ALL fails fast and QUORUM goes around the node.
    api.wait_dead_replicas(1).await;
    let started = Instant::now();
    let (status, body) = api.write("while-hung-2", json!(3), Some("ALL")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    assert!(started.elapsed() < Duration::from_millis(300));
    let (status, _) = api
        .write("quorum-while-hung", json!(4), Some("QUORUM"))
        .await;
    assert_eq!(status, 201);

    // Thawed, the node is tried again once its dead mark expires.
    signal_by_cluster_json(&data_dir, "a1", Signal::SIGCONT);
    api.wait_dead_replicas(0).await;
    let (status, _) = api.write("after", json!(5), Some("ALL")).await;
    assert_eq!(status, 201);
    for (key, value) in [("before", 1), ("quorum-while-hung", 4), ("after", 5)] {
        let (status, body) = api.read(key, Some("ALL")).await;
        assert_eq!((status, &body["value"]), (200, &json!(value)), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_that_ask_a_hung_replica_are_answered_by_the_others() {
    use nix::sys::signal::Signal;
    // The hung node stays believed alive for the whole test: no probes,
    // and its calls time out only after the reads are done.
    let env = common::env(&[
        ("GEOLOG__COORDINATOR__PROBE_INTERVAL_MS", "600000"),
        ("GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS", "20000"),
        ("GEOLOG__COORDINATOR__READ_TIMEOUT_MS", "20000"),
    ]);
    let cluster = TestCluster::start_with_env(TUTORIAL, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let data_dir = cluster.cluster.data_dir().to_path_buf();
    let keys: Vec<String> = (0..40).map(|i| format!("hung-read-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let (status, _) = api.write(key, json!(i), Some("ALL")).await;
        assert_eq!(status, 201);
    }

    signal_by_cluster_json(&data_dir, "a1", Signal::SIGSTOP);
    // Concurrent reads travel together (one call per replica for all of
    // them); those whose first replicas include the hung node are met by
    // one more replica after the speculative-read delay, not its timeout.
    let started = Instant::now();
    let reads = keys.iter().map(|key| api.read(key, Some("LOCAL_QUORUM")));
    let answers = futures_util::future::join_all(reads).await;
    let took = started.elapsed();
    signal_by_cluster_json(&data_dir, "a1", Signal::SIGCONT);
    for (i, (status, body)) in answers.into_iter().enumerate() {
        assert_eq!((status, &body["value"]), (200, &json!(i)), "{body}");
        assert_eq!(body["acks"]["received"], 3, "{body}");
    }
    assert!(took < Duration::from_secs(5), "reads took {took:?}");
}

/// Hints the region's coordinator reports for `target`.
async fn hints_pending(api: &Api, target: &str) -> u64 {
    let (_, health) = api
        .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
        .await;
    health["hints"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["target"] == target))
        .map_or(0, |h| h["pending"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn hint_replay_alone_brings_back_a_node_that_was_down() {
    let mut env = geolog_testkit::fast_failure_detection();
    // The anti-entropy worker makes its first pass at start and then waits:
    // only hints can bring the node back within this test.
    env.push(("GEOLOG__ANTI_ENTROPY__INTERVAL_MS".into(), "600000".into()));
    let mut cluster = TestCluster::start_with_env(TUTORIAL, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    cluster.cluster.stop_node("a5", false).unwrap();
    api.wait_replica_state("a5", "dead").await;

    let keys: Vec<String> = (0..20).map(|i| format!("hinted-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let (status, body) = api.write(key, json!(i), Some("QUORUM")).await;
        assert_eq!(status, 201, "{body}");
    }
    // The missed writes wait as durable hints (measured once a second).
    common::wait_until(Duration::from_secs(10), || async {
        hints_pending(&api, "a5").await == 20
    })
    .await;

    cluster.cluster.start_node("a5").await.unwrap();
    common::wait_until(Duration::from_secs(30), || async {
        hints_pending(&api, "a5").await == 0
    })
    .await;
    // Nothing read these keys (no read repair) and no anti-entropy pass
    // ran since: the node has every write from hint replay alone.
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(held(&api, key, "a5").await, vec![json!(i)], "{key} on a5");
    }
}

/// The values `node` holds for `key`, from the replica view.
async fn held(api: &Api, key: &str, node: &str) -> Vec<serde_json::Value> {
    let (_, view) = api
        .raw(
            reqwest::Method::GET,
            &format!("/api/logs/{key}/replicas"),
            Vec::new(),
        )
        .await;
    view["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["node"] == node))
        .and_then(|r| r["versions"].as_array())
        .map(|v| v.iter().map(|v| v["value"].clone()).collect())
        .unwrap_or_default()
}

/// Fast failure detection, and hints that expire before they can be
/// replayed (a 1 ms window): only anti-entropy, passing every
/// `interval_ms`, can repair what a replica missed.
fn anti_entropy_only(interval_ms: &str) -> Vec<(String, String)> {
    let mut env = geolog_testkit::fast_failure_detection();
    env.push(("GEOLOG__COORDINATOR__HINT_WINDOW_MS".into(), "1".into()));
    env.push((
        "GEOLOG__ANTI_ENTROPY__INTERVAL_MS".into(),
        interval_ms.into(),
    ));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn anti_entropy_alone_repairs_a_node_that_missed_writes() {
    let mut cluster = TestCluster::start_with_env(TUTORIAL, anti_entropy_only("300"))
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    cluster.cluster.stop_node("a4", false).unwrap();
    api.wait_replica_state("a4", "dead").await;
    let keys: Vec<String> = (0..20).map(|i| format!("ae-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let (status, body) = api.write(key, json!(i), Some("QUORUM")).await;
        assert_eq!(status, 201, "{body}");
    }
    cluster.cluster.start_node("a4").await.unwrap();
    api.wait_replica_state("a4", "alive").await;
    // (Whether a4 still lacks them now depends on when the next pass ran;
    // with a 1 ms hint window no hint can have delivered them.)
    for (i, key) in keys.iter().enumerate() {
        common::wait_until(Duration::from_secs(30), || async {
            held(&api, key, "a4").await == vec![json!(i)]
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_node_is_rebuilt_by_geolog_repair_run() {
    // The background worker makes its first pass at start and then waits:
    // only the explicit `geolog repair run` below can repair.
    let mut cluster = TestCluster::start_with_env(TUTORIAL, anti_entropy_only("600000"))
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let keys: Vec<String> = (0..30).map(|i| format!("wiped-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let (status, body) = api.write(key, json!(i), Some("ALL")).await;
        assert_eq!(status, 201, "{body}");
    }

    cluster.cluster.wipe_node("a3").await.expect("wipe");
    api.wait_replica_state("a3", "alive").await;
    assert!(
        held(&api, &keys[0], "a3").await.is_empty(),
        "the wipe lost the data"
    );
    // New writes work at once, and never reuse a dot the wiped node minted before.
    let (status, body) = api.write("after-wipe", json!("new"), Some("ALL")).await;
    assert_eq!(status, 201, "{body}");

    let repair_run = || common::geolog(cluster.cluster.data_dir(), &["repair", "run"]);
    let out = repair_run();
    let printed = common::printed(&out);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("region a:"), "{printed}");
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            held(&api, key, "a3").await,
            vec![json!(i)],
            "{key} on a3 after repair"
        );
    }
    let (_, read) = api.read("after-wipe", Some("ALL")).await;
    assert_eq!(
        (read["value"].clone(), read["conflict"].as_bool()),
        (json!("new"), Some(false))
    );
    // A second run finds nothing left to repair.
    let printed = common::printed(&repair_run());
    assert!(printed.contains(" 0 repaired"), "{printed}");
}

/// A key's history larger than a message (20 versions of 900 KB in one
/// tree leaf) is repaired onto a wiped node: anti-entropy reads it a page
/// at a time and applies it in calls that fit a message.
#[tokio::test(flavor = "multi_thread")]
async fn anti_entropy_repairs_a_history_larger_than_a_message() {
    let mut cluster = TestCluster::start_with_env(TUTORIAL, anti_entropy_only("600000"))
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let pad = "x".repeat(900_000);
    for i in 0..20 {
        let (status, body) = api
            .write("big-history", json!({"i": i, "pad": pad}), Some("ALL"))
            .await;
        assert_eq!(status, 201, "{}", code(&body));
    }
    cluster.cluster.wipe_node("a3").await.expect("wipe");
    api.wait_replica_state("a3", "alive").await;
    assert!(held(&api, "big-history", "a3").await.is_empty());

    let repair_run = || common::geolog(cluster.cluster.data_dir(), &["repair", "run"]);
    let out = repair_run();
    let printed = common::printed(&out);
    assert!(out.status.success(), "{printed}");
    let newest = held(&api, "big-history", "a3").await;
    assert_eq!(newest.len(), 1, "{printed}");
    assert_eq!(newest[0]["i"], 19);
    // Every version reached a3: a second run finds the replicas equal.
    let printed = common::printed(&repair_run());
    assert!(printed.contains(" 0 repaired"), "{printed}");
}

/// `ANY` counts a stored hint as the acknowledgement: with every replica of
/// a key down, another node of the region holds the write with a hint per
/// replica, and hint replay delivers it when they return.
#[tokio::test(flavor = "multi_thread")]
async fn any_is_acknowledged_by_stored_hints_when_every_replica_is_down() {
    let shape = geolog_launcher::topology::Shape {
        regions: 1,
        nodes_per_region: 4,
        replication_factor: 2,
    };
    let mut cluster = TestCluster::start(shape).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let (_, view) = api
        .raw(
            reqwest::Method::GET,
            "/api/logs/hinted/replicas",
            Vec::new(),
        )
        .await;
    let replicas: Vec<String> = view["replicas"]
        .as_array()
        .expect("replica view")
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replicas.len(), 2, "{view}");
    for node in &replicas {
        cluster.cluster.stop_node(node, false).unwrap();
    }
    for node in &replicas {
        api.wait_replica_state(node, "dead").await;
    }
    let (status, body) = api.write("hinted", json!("held"), Some("ONE")).await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    let (status, body) = api.write("hinted", json!("held"), Some("ANY")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hints"], json!(2), "{body}");
    assert_eq!(body["acks"]["received"], json!(0), "{body}");

    for node in &replicas {
        cluster.cluster.start_node(node).await.unwrap();
    }
    for node in &replicas {
        common::wait_until(Duration::from_secs(30), || async {
            held(&api, "hinted", node).await == vec![json!("held")]
        })
        .await;
    }
    let (status, read) = api.read("hinted", Some("ALL")).await;
    assert_eq!((status, &read["value"]), (200, &json!("held")), "{read}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mint_that_timed_out_is_never_minted_again_elsewhere() {
    use nix::sys::signal::Signal;
    // The replica's own deadline passes well before the write's.
    let env = common::env(&[
        ("GEOLOG__COORDINATOR__PROBE_INTERVAL_MS", "600000"),
        ("GEOLOG__COORDINATOR__WRITE_TIMEOUT_MS", "3000"),
        ("GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS", "500"),
        ("GEOLOG__COORDINATOR__CIRCUIT_OPEN_MS", "1500"),
    ]);
    let cluster = TestCluster::start_with_env(TUTORIAL, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let data_dir = cluster.cluster.data_dir().to_path_buf();
    let (_, view) = api
        .raw(
            reqwest::Method::GET,
            "/api/logs/invoice-9/replicas",
            Vec::new(),
        )
        .await;
    let minter = view["replicas"][0]["node"].as_str().unwrap().to_string();
    let write = || {
        let request = api
            .http
            .post(format!("{}/api/logs?consistency=ONE", api.base))
            .header("Idempotency-Key", "invoice-9-issue")
            .json(&json!({"key": "invoice-9", "value": 9}));
        async move { Api::decode(request.send().await.unwrap()).await }
    };

    // The minting replica hangs: its mint may still commit when it wakes,
    // so the write must not be minted on the next replica as well.
    signal_by_cluster_json(&data_dir, &minter, Signal::SIGSTOP);
    let (status, body) = write().await;
    signal_by_cluster_json(&data_dir, &minter, Signal::SIGCONT);
    assert_eq!((status, code(&body)), (504, "timeout"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may have landed"),
        "{body}"
    );
    api.wait_dead_replicas(0).await;
    let (status, body) = write().await;
    assert_eq!(status, 201, "{body}");
    let history = api.history_at_all("invoice-9").await;
    assert_eq!(history.len(), 1, "one version for one request: {history:?}");
}
