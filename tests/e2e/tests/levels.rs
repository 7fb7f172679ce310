//! Every consistency level writes and reads back on the tutorial cluster
//! (5 storage nodes on 5 PostgreSQL servers, real processes).

mod common;

use common::{Api, TUTORIAL};
use geolog_testkit::TestCluster;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn every_level_writes_and_reads_back() {
    let cluster = TestCluster::start(TUTORIAL).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));

    // (level, acks required for N = 5 in one region)
    let levels = [
        ("ONE", 1),
        ("TWO", 2),
        ("THREE", 3),
        ("QUORUM", 3),
        ("ALL", 5),
        ("LOCAL_ONE", 1),
        ("LOCAL_QUORUM", 3),
        ("EACH_QUORUM", 3),
        ("ANY", 1),
    ];
    for (level, required) in levels {
        let key = format!("key-{level}");
        let value = json!({"level": level, "nested": {"n": [1, 2.5, null, "x"]}});
        let (status, body) = api.write(&key, value.clone(), Some(level)).await;
        assert_eq!(status, 201, "{level}: {body}");
        assert_eq!(body["consistency"], level);
        assert_eq!(body["acks"]["required"], required, "{level}");
        assert!(
            body["acks"]["received"].as_u64().unwrap() >= required,
            "{level}: {body}"
        );
        assert!(body["version"]["node"].as_str().unwrap().starts_with('a'));
        assert!(body["version"]["seq"].as_u64().unwrap() >= 1);
        let read_level = if level == "ANY" { "ALL" } else { level };
        let (status, read) = api.read(&key, Some(read_level)).await;
        assert_eq!(status, 200, "{level}: {read}");
        assert_eq!(read["value"], value, "{level}");
        assert_eq!(
            read["version"], body["version"],
            "{level}: the read returns the written version"
        );
    }

    // Levels are case-insensitive; the default is LOCAL_QUORUM.
    let (status, body) = api.write("mixed-case", json!(1), Some("quorum")).await;
    assert_eq!(
        (status, body["consistency"].as_str()),
        (201, Some("QUORUM"))
    );
    let (status, body) = api.write("default-level", json!(2), None).await;
    assert_eq!(
        (status, body["consistency"].as_str()),
        (201, Some("LOCAL_QUORUM"))
    );
    let (_, body) = api.read("default-level", None).await;
    assert_eq!(body["value"], 2);

    // Sequential writes of one key: a quorum read returns the last one, and
    // versions are ordered by their hybrid logical clocks.
    let mut last_hlc = 0;
    for i in 0..10 {
        let (status, body) = api.write("counter", json!(i), Some("QUORUM")).await;
        assert_eq!(status, 201);
        let hlc = body["version"]["timestamp"]["hlc"].as_u64().unwrap();
        assert!(hlc > last_hlc, "HLC grows with each sequential write");
        last_hlc = hlc;
    }
    let (_, body) = api.read("counter", Some("QUORUM")).await;
    assert_eq!(body["value"], 9);

    // Keys are any UTF-8 up to 512 bytes; '/' travels percent-encoded in paths.
    let (status, _) = api.write("región/ü/日本", json!("utf8"), Some("ALL")).await;
    assert_eq!(status, 201);
    let (status, body) = api
        .read("regi%C3%B3n%2F%C3%BC%2F%E6%97%A5%E6%9C%AC", Some("ONE"))
        .await;
    assert_eq!((status, body["key"].as_str()), (200, Some("región/ü/日本")));
    let long = "k".repeat(512);
    assert_eq!(api.write(&long, json!(1), Some("ALL")).await.0, 201);
    assert_eq!(api.read(&long, Some("ALL")).await.0, 200);

    // An absent key is a 404 with the stable code.
    let (status, body) = api.read("never-written", Some("ALL")).await;
    assert_eq!((status, common::code(&body)), (404, "not_found"));

    // Health reports the coordinator and all five replicas alive; metrics
    // are exported.
    let (status, health) = api
        .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
        .await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    assert_eq!(health["replicas"].as_array().unwrap().len(), 5);
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("http_server_requests_seconds"),
        "{metrics}"
    );
}
