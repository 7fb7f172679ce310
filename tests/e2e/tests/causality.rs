//! Causality end to end: siblings from a partition, conflict resolution
//! with a context, history, read repair, and context errors.

mod common;

use common::{Api, THREE_BY_THREE, TUTORIAL, code, wait_until};
use geolog_testkit::TestCluster;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

fn values(body: &Value) -> BTreeSet<String> {
    body["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_conflict_is_kept_and_resolved_with_a_context() {
    let cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let (a, b, c) = (
        Api::new(cluster.gateway("a")),
        Api::new(cluster.gateway("b")),
        Api::new(cluster.gateway("c")),
    );
    let (status, _) = a.write("doc", json!("base"), Some("ALL")).await;
    assert_eq!(status, 201);

    cluster.cluster.partition("a", "b").unwrap();
    let (status, _) = a
        .write("doc", json!("written in a"), Some("LOCAL_QUORUM"))
        .await;
    assert_eq!(status, 201);
    let (status, _) = b
        .write("doc", json!("written in b"), Some("LOCAL_QUORUM"))
        .await;
    assert_eq!(status, 201);
    cluster.cluster.heal();
    a.wait_replica_state("b1", "alive").await;
    b.wait_replica_state("a1", "alive").await;
    for api in [&a, &b, &c] {
        api.wait_outbox_empty(Duration::from_secs(60)).await;
    }

    // Both concurrent writes are kept as siblings; the base is superseded.
    let (status, read) = c.read("doc", Some("ALL")).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["conflict"], true, "{read}");
    let expected: BTreeSet<String> = ["\"written in a\"", "\"written in b\""]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(values(&read), expected);
    // The deterministic pick is one of them, and reads agree on it.
    assert!(expected.contains(&read["value"].to_string()));
    let (_, again) = a.read("doc", Some("QUORUM")).await;
    assert_eq!(again["value"], read["value"]);

    // Writing with the context resolves the conflict everywhere.
    let context = read["context"].as_str().unwrap().to_string();
    let (status, body) = c
        .write_with_context("doc", json!("merged"), &context, "LOCAL_QUORUM")
        .await;
    assert_eq!(status, 201, "{body}");
    for api in [&a, &b, &c] {
        api.wait_outbox_empty(Duration::from_secs(60)).await;
    }
    for api in [&a, &b, &c] {
        wait_until(Duration::from_secs(10), || async {
            let (status, body) = api.read("doc", Some("LOCAL_ONE")).await;
            status == 200 && body["conflict"] == false && body["value"] == "merged"
        })
        .await;
    }
    let (_, all) = a.read("doc", Some("ALL")).await;
    assert_eq!(
        (all["conflict"].as_bool(), &all["value"]),
        (Some(false), &json!("merged"))
    );

    // The history keeps all four versions, newest first.
    let (status, history) = b
        .raw(
            Method::GET,
            "/api/logs/doc/history?consistency=ALL",
            Vec::new(),
        )
        .await;
    assert_eq!(status, 200, "{history}");
    let versions: Vec<Value> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["value"].clone())
        .collect();
    assert_eq!(versions.len(), 4, "{history}");
    assert_eq!(versions[0], json!("merged"));
    assert_eq!(versions[3], json!("base"));
    assert!(history["next"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn sequential_writes_never_conflict_and_history_pages() {
    let cluster = TestCluster::start(TUTORIAL).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    for level in ["LOCAL_ONE", "ONE", "QUORUM"] {
        for i in 0..7 {
            let (status, _) = api
                .write("seq", json!(format!("{level}-{i}")), Some(level))
                .await;
            assert_eq!(status, 201);
        }
        let (_, read) = api.read("seq", Some("ALL")).await;
        assert_eq!(read["conflict"], false, "{read}");
        assert_eq!(read["siblings"].as_array().unwrap().len(), 1);
        assert_eq!(read["value"], json!(format!("{level}-6")));
    }
    // Paging through 21 versions, 5 at a time, newest first, no repeats.
    let mut seen = Vec::new();
    let mut path = "/api/logs/seq/history?limit=5".to_string();
    loop {
        let (status, page) = api.raw(Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200, "{page}");
        let versions = page["versions"].as_array().unwrap();
        assert!(versions.len() <= 5);
        seen.extend(
            versions
                .iter()
                .map(|v| v["value"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(next) => path = format!("/api/logs/seq/history?limit=5&before={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 21, "{seen:?}");
    assert_eq!(seen[0], "QUORUM-6");
    assert_eq!(seen[20], "LOCAL_ONE-0");
    let (status, body) = api
        .raw(
            Method::GET,
            "/api/logs/seq/history?before=nonsense",
            Vec::new(),
        )
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    let (status, body) = api
        .raw(Method::GET, "/api/logs/seq/history?limit=0", Vec::new())
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));

    // Context errors are 400 invalid_context, and write nothing.
    let (status, body) = api
        .write_with_context("seq", json!("x"), "not-a-token!", "ONE")
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_context"));
    let response = api
        .http
        .post(format!("{}/api/logs", api.base))
        .header("X-Geolog-Context", "e30")
        .json(&json!({"key": "seq", "value": 1, "context": "e31"}))
        .send()
        .await
        .unwrap();
    let (status, body) = Api::decode(response).await;
    assert_eq!((status, code(&body)), (400, "invalid_context"));
    let (_, read) = api.read("seq", Some("ALL")).await;
    assert_eq!(read["value"], json!("QUORUM-6"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quorum_read_repairs_the_stale_replica_it_reads() {
    let mut cluster = TestCluster::start(TUTORIAL).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let (status, _) = api.write("repair-me", json!("old"), Some("ALL")).await;
    assert_eq!(status, 201);
    // The key's first replica in ring order is always among those a quorum read asks.
    let (_, view) = api
        .raw(Method::GET, "/api/logs/repair-me/replicas", Vec::new())
        .await;
    let first = view["replicas"][0]["node"].as_str().unwrap().to_string();
    assert_eq!(view["replicas"].as_array().unwrap().len(), 5);

    cluster.cluster.stop_node(&first, false).unwrap();
    api.wait_replica_state(&first, "dead").await;
    let (status, _) = api.write("repair-me", json!("new"), Some("QUORUM")).await;
    assert_eq!(status, 201);
    cluster.cluster.start_node(&first).await.unwrap();
    api.wait_replica_state(&first, "alive").await;

    let holding = |view: &Value, node: &str| -> Vec<Value> {
        let replica = view["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node"] == node)
            .unwrap()
            .clone();
        assert_eq!(replica["answered"], true, "{replica}");
        replica["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["value"].clone())
            .collect()
    };
    let (_, view) = api
        .raw(Method::GET, "/api/logs/repair-me/replicas", Vec::new())
        .await;
    assert_eq!(
        holding(&view, &first),
        vec![json!("old")],
        "the replica missed the write: {view}"
    );

    let (status, read) = api.read("repair-me", Some("QUORUM")).await;
    assert_eq!((status, &read["value"]), (200, &json!("new")));
    // Repaired before the read answered: no waiting needed.
    let (_, view) = api
        .raw(Method::GET, "/api/logs/repair-me/replicas", Vec::new())
        .await;
    assert_eq!(holding(&view, &first), vec![json!("new")], "{view}");
    let metrics = api.metrics().await;
    assert!(metrics.contains("http_server_requests_seconds"));
}

async fn idempotent_write(
    api: &Api,
    key: &str,
    value: Value,
    id: &str,
    in_body: bool,
) -> (u16, Value) {
    let mut body = json!({"key": key, "value": value});
    let mut request = api
        .http
        .post(format!("{}/api/logs?consistency=LOCAL_QUORUM", api.base));
    if in_body {
        body["id"] = json!(id);
    } else {
        request = request.header("Idempotency-Key", id);
    }
    Api::decode(request.json(&body).send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_retries_across_regions_create_one_version() {
    let cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let (a, b, c) = (
        Api::new(cluster.gateway("a")),
        Api::new(cluster.gateway("b")),
        Api::new(cluster.gateway("c")),
    );
    let payment = json!({"amount": 42, "currency": "EUR"});

    let (status, first) =
        idempotent_write(&a, "payments", payment.clone(), "pay-0001", false).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["replayed"], false);
    // Retries through another region's gateway, by header and by body field,
    // and through the same gateway: the first result, nothing new.
    for (api, in_body) in [(&b, false), (&c, true), (&a, true)] {
        let (status, retry) =
            idempotent_write(api, "payments", payment.clone(), "pay-0001", in_body).await;
        assert_eq!(status, 201, "{retry}");
        assert_eq!(retry["replayed"], true, "{retry}");
        assert_eq!(retry["version"], first["version"]);
    }
    // The same idempotency key with another body is a conflict.
    let (status, body) =
        idempotent_write(&b, "payments", json!({"amount": 43}), "pay-0001", false).await;
    assert_eq!(
        (status, code(&body)),
        (409, "idempotency_conflict"),
        "{body}"
    );
    // Bad keys are refused.
    let (status, body) =
        idempotent_write(&a, "payments", payment.clone(), "has space", false).await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    // A different idempotency key is a different write.
    let (status, other) =
        idempotent_write(&c, "payments", payment.clone(), "pay-0002", false).await;
    assert_eq!((status, other["replayed"].as_bool()), (201, Some(false)));

    for api in [&a, &b, &c] {
        api.wait_outbox_empty(Duration::from_secs(60)).await;
    }
    let history = c.history_at_all("payments").await;
    assert_eq!(
        history.len(),
        2,
        "one version per idempotency key: {history:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_is_replayed_only_once_its_own_level_is_met() {
    // Nothing but the retry may deliver the write: no hint replay and no
    // anti-entropy pass during the test.
    let mut env = geolog_testkit::fast_failure_detection();
    env.extend(common::env(&[
        ("GEOLOG__COORDINATOR__OUTBOX_REPLAY_INTERVAL_MS", "600000"),
        ("GEOLOG__ANTI_ENTROPY__INTERVAL_MS", "600000"),
    ]));
    let mut cluster = TestCluster::start_with_env(TUTORIAL, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let (_, view) = api
        .raw(Method::GET, "/api/logs/order-7/replicas", Vec::new())
        .await;
    let nodes: Vec<String> = view["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    let down = [nodes[3].clone(), nodes[4].clone()];
    for node in &down {
        cluster.cluster.stop_node(node, false).unwrap();
        api.wait_replica_state(node, "dead").await;
    }
    let write = |level: &'static str| {
        let request = api
            .http
            .post(format!("{}/api/logs?consistency={level}", api.base))
            .header("Idempotency-Key", "order-7-create")
            .json(&json!({"key": "order-7", "value": {"total": 99}}));
        async move { Api::decode(request.send().await.unwrap()).await }
    };
    let (status, first) = write("ONE").await;
    assert_eq!(
        (status, &first["replayed"]),
        (201, &json!(false)),
        "{first}"
    );
    for node in &down {
        cluster.cluster.start_node(node).await.unwrap();
        api.wait_replica_state(node, "alive").await;
    }
    let holders = |view: &Value| -> usize {
        view["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["versions"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["value"] == json!({"total": 99})))
            })
            .count()
    };
    let (_, view) = api
        .raw(Method::GET, "/api/logs/order-7/replicas", Vec::new())
        .await;
    assert_eq!(holders(&view), 3, "the two stopped nodes missed it: {view}");

    // The retry at ALL is the first write's answer only once all five
    // hold it: it is delivered to the two that lack it first.
    let (status, retry) = write("ALL").await;
    assert_eq!(status, 201, "{retry}");
    assert_eq!(retry["replayed"], true, "{retry}");
    assert_eq!(retry["version"], first["version"]);
    assert_eq!(retry["acks"]["required"], 5, "{retry}");
    assert_eq!(retry["acks"]["received"], 5, "{retry}");
    let (_, view) = api
        .raw(Method::GET, "/api/logs/order-7/replicas", Vec::new())
        .await;
    assert_eq!(holders(&view), 5, "{view}");
    let history = api.history_at_all("order-7").await;
    assert_eq!(history.len(), 1, "{history:?}");
}
