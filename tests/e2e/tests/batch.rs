//! `POST /api/logs/batch`: JSON arrays and NDJSON, gzip and zstd bodies,
//! one answer per record — bad records fail alone, nothing is dropped
//! silently, and what was acknowledged is readable everywhere.

mod common;

use common::{Api, THREE_BY_THREE, code, gzip, wait_until, zstd};
use geolog_testkit::TestCluster;
use serde_json::{Value, json};
use std::time::Duration;

impl Api {
    async fn batch(&self, query: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        self.post_with(&format!("/api/logs/batch{query}"), &headers, body)
            .await
    }
}

fn ndjson(records: &[Value]) -> Vec<u8> {
    records
        .iter()
        .map(|r| format!("{r}\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_answer_per_record_and_land_everywhere() {
    let cluster = TestCluster::start(THREE_BY_THREE)
        .await
        .expect("cluster starts");
    let a = Api::new(cluster.gateway("a"));
    let b = Api::new(cluster.gateway("b"));

    // 300 good records over 100 keys (three sequential writes each), with
    // four bad ones among them.
    let mut records: Vec<Value> = (0..300)
        .map(|i| json!({"key": format!("batch-{}", i % 100), "value": {"n": i}}))
        .collect();
    let bad = [
        (17, json!({"key": "", "value": 1}), "invalid_key"),
        (90, json!({"key": "k", "vaule": 1}), "invalid_json"),
        (
            150,
            json!({"key": "k", "value": 1, "context": "not-a-token"}),
            "invalid_context",
        ),
        (
            299,
            json!({"key": "k", "value": 1, "id": "has space"}),
            "invalid_request",
        ),
    ];
    for (index, record, _) in &bad {
        records.insert(*index, record.clone());
    }
    let body = serde_json::to_vec(&records).unwrap();
    let (status, answer) = a
        .batch(
            "?consistency=LOCAL_QUORUM",
            &[("content-type", "application/json")],
            body,
        )
        .await;
    assert_eq!(status, 207, "{answer}");
    assert_eq!(
        (
            answer["records"].as_u64(),
            answer["written"].as_u64(),
            answer["failed"].as_u64()
        ),
        (Some(304), Some(300), Some(4))
    );
    assert_eq!(answer["consistency"], "LOCAL_QUORUM");
    let results = answer["results"].as_array().unwrap();
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["index"].as_u64(), Some(i as u64));
        match bad.iter().find(|(index, _, _)| *index == i) {
            Some((_, _, expected)) => {
                assert_eq!(
                    (result["status"].as_u64(), result["error"]["code"].as_str()),
                    (Some(400), Some(*expected)),
                    "{result}"
                );
            }
            None => {
                assert_eq!(result["status"], 201, "{result}");
                assert_eq!(result["key"], records[i]["key"]);
                assert!(result["version"]["seq"].as_u64().is_some(), "{result}");
                assert!(
                    result["acks"]["received"].as_u64().unwrap() >= 2,
                    "{result}"
                );
            }
        }
    }
    // Records of one key apply in batch order: the last one is the value,
    // with no siblings, read at ALL from another region.
    let good: Vec<&Value> = records
        .iter()
        .filter(|r| r["key"].as_str().is_some_and(|k| k.starts_with("batch-")))
        .collect();
    for key in [0, 1, 42, 99] {
        let last = good
            .iter()
            .rev()
            .find(|r| r["key"] == format!("batch-{key}"))
            .unwrap();
        let (status, read) = b.read(&format!("batch-{key}"), Some("ALL")).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["value"], last["value"], "{read}");
        assert_eq!(read["conflict"], false, "{read}");
    }
    let history = a
        .raw(
            reqwest::Method::GET,
            "/api/logs/batch-42/history",
            Vec::new(),
        )
        .await
        .1;
    assert_eq!(
        history["versions"].as_array().unwrap().len(),
        3,
        "{history}"
    );

    // One hot key: 1,000 records of the same key supersede each other in
    // batch order, none times out waiting for the ones before it.
    let hot: Vec<Value> = (0..1000)
        .map(|i| json!({"key": "hot", "value": i}))
        .collect();
    let (status, answer) = a
        .batch(
            "?consistency=LOCAL_QUORUM",
            &[],
            serde_json::to_vec(&hot).unwrap(),
        )
        .await;
    assert_eq!(
        (status, answer["written"].as_u64()),
        (201, Some(1000)),
        "{answer}"
    );
    let (status, read) = a.read("hot", Some("LOCAL_QUORUM")).await;
    assert_eq!(
        (status, &read["value"], &read["conflict"]),
        (200, &json!(999), &json!(false)),
        "{read}"
    );
    let seqs: Vec<u64> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"]["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "minted in batch order"
    );

    // NDJSON, gzip and zstd; idempotent records replay on retry.
    let lines: Vec<Value> = (0..50)
        .map(|i| json!({"key": format!("nd-{i}"), "value": i, "id": format!("req-{i}")}))
        .collect();
    let plain = ndjson(&lines);
    let ndjson_type = ("content-type", "application/x-ndjson");
    let (status, first) = a
        .batch(
            "",
            &[ndjson_type, ("content-encoding", "gzip")],
            gzip(&plain),
        )
        .await;
    assert_eq!(
        (status, first["written"].as_u64()),
        (201, Some(50)),
        "{first}"
    );
    let (status, retry) = a
        .batch(
            "",
            &[ndjson_type, ("content-encoding", "zstd")],
            zstd(&plain),
        )
        .await;
    assert_eq!(
        (status, retry["written"].as_u64()),
        (201, Some(50)),
        "{retry}"
    );
    for (one, two) in first["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(retry["results"].as_array().unwrap())
    {
        assert_eq!(two["replayed"], true, "{two}");
        assert_eq!(one["version"], two["version"]);
    }
    wait_until(Duration::from_secs(10), || async {
        b.read("nd-49", Some("LOCAL_ONE")).await.0 == 200
    })
    .await;

    // Whole-batch errors: the body as a whole is wrong.
    let bomb = gzip(&vec![b' '; 17 * 1024 * 1024]);
    let too_many = serde_json::to_vec(&vec![json!({"key": "k", "value": 1}); 10_001]).unwrap();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown encoding",
            vec![("content-encoding", "br")],
            b"[]".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "corrupt gzip",
            vec![("content-encoding", "gzip")],
            b"not gzip".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "decompression bomb",
            vec![("content-encoding", "gzip")],
            bomb,
            413,
            "payload_too_large",
        ),
        ("empty array", vec![], b"[]".to_vec(), 400, "invalid_json"),
        (
            "not an array",
            vec![],
            br#"{"key": "k", "value": 1}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "too many records",
            vec![],
            too_many,
            413,
            "payload_too_large",
        ),
        (
            "idempotency header",
            vec![("idempotency-key", "x")],
            br#"[{"key": "k", "value": 1}]"#.to_vec(),
            400,
            "invalid_request",
        ),
    ];
    for (what, headers, body, status, expected) in cases {
        let (got, answer) = a.batch("", &headers, body).await;
        assert_eq!((got, code(&answer)), (status, expected), "{what}: {answer}");
    }
    let (status, answer) = a.batch("?consistancy=ALL", &[], b"[]".to_vec()).await;
    assert_eq!((status, code(&answer)), (400, "invalid_request"));

    // `GET /api/logs/batch` is the key named "batch".
    assert_eq!(
        a.write("batch", json!("a key like any other"), None)
            .await
            .0,
        201
    );
    let (status, read) = a
        .raw(reqwest::Method::GET, "/api/logs/batch", Vec::new())
        .await;
    assert_eq!(
        (status, &read["value"]),
        (200, &json!("a key like any other"))
    );

    // When no record can meet the level, the batch says so per record and
    // with their common status; nothing acknowledged is lost.
    let mut cluster = cluster;
    cluster.cluster.kill("a1").unwrap();
    cluster.cluster.kill("a2").unwrap();
    a.wait_dead_replicas(2).await;
    let body = serde_json::to_vec(&[
        json!({"key": "down-1", "value": 1}),
        json!({"key": "down-2", "value": 2}),
    ])
    .unwrap();
    let (status, answer) = a
        .batch("?consistency=LOCAL_QUORUM", &[], body.clone())
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["error"]["code"] == "unavailable"),
        "{answer}"
    );
    let (status, answer) = a.batch("?consistency=ONE", &[], body).await;
    assert_eq!(
        (status, answer["written"].as_u64()),
        (201, Some(2)),
        "{answer}"
    );
    for key in ["batch-0", "batch-99", "nd-0", "down-2"] {
        let (status, read) = b.read(key, Some("LOCAL_QUORUM")).await;
        assert_eq!(status, 200, "{key}: {read}");
    }
}

/// A batch whose records together outgrow a gRPC message's default limit
/// (4 MiB) is answered per record like any other: the answer carries each
/// version without its value (it was answered `500` after the records were
/// committed, and the client's retry then wrote them twice).
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_big_records_is_answered_and_readable() {
    // About 5 MB for every replica, in debug builds, while the other test
    // of this file loads the box: the tests' 1-s replica timeout made a
    // replica's apply time out now and then. Sizes are what this tests,
    // not speed.
    let mut env = geolog_testkit::fast_failure_detection();
    env.extend(common::env(&[
        ("GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS", "10000"),
        ("GEOLOG__COORDINATOR__WRITE_TIMEOUT_MS", "10000"),
    ]));
    let cluster = TestCluster::start_with_env(common::TUTORIAL, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let big = "x".repeat(900_000);
    let records: Vec<Value> = (0..6)
        .map(|i| json!({"key": format!("big-{i}"), "value": {"i": i, "pad": big}}))
        .collect();
    let (status, answer) = api
        .batch("", &[], serde_json::to_vec(&records).unwrap())
        .await;
    assert_eq!(
        (status, answer["written"].as_u64()),
        (201, Some(6)),
        "{answer}"
    );
    for (i, record) in records.iter().enumerate() {
        let (status, read) = api.read(&format!("big-{i}"), None).await;
        assert_eq!(status, 200, "{}", code(&read));
        assert_eq!(read["value"], record["value"]);
        let history = api.history_at_all(&format!("big-{i}")).await;
        assert_eq!(history.len(), 1, "written once");
    }

    // A history of 19 such versions (over 16 MiB) pages by bytes: every
    // page fits a message, and following `next` returns every version.
    for round in 0..2 {
        let more: Vec<Value> = (0..9)
            .map(|j| json!({"key": "big-0", "value": {"round": round, "j": j, "pad": big}}))
            .collect();
        let (status, answer) = api.batch("", &[], serde_json::to_vec(&more).unwrap()).await;
        assert_eq!(
            (status, answer["written"].as_u64()),
            (201, Some(9)),
            "{answer}"
        );
    }
    let (mut seen, mut pages, mut before) = (Vec::new(), 0, None::<String>);
    loop {
        let mut path = "/api/logs/big-0/history?consistency=ALL&limit=100".to_string();
        if let Some(cursor) = &before {
            path.push_str(&format!("&before={cursor}"));
        }
        let (status, page) = api.raw(reqwest::Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200, "{}", code(&page));
        pages += 1;
        for v in page["versions"].as_array().unwrap() {
            seen.push((v["version"]["node"].clone(), v["version"]["seq"].clone()));
        }
        match page["next"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
    }
    let distinct: std::collections::BTreeSet<String> = seen
        .iter()
        .map(|(node, seq)| format!("{node}:{seq}"))
        .collect();
    assert_eq!((seen.len(), distinct.len()), (19, 19), "{seen:?}");
    assert!(pages >= 5, "19 versions of 900 KB in {pages} pages");
}
