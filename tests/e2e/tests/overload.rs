//! Past capacity, bounded queues refuse fast instead of queueing without
//! end: writes that do not fit a replica's queue are answered `503
//! overloaded` with `Retry-After` and the JSON error body, nothing refused
//! at the mint was written, everything acknowledged is readable, no busy
//! replica is declared dead, and the cluster takes writes again once the
//! burst is over.

mod common;

use common::{Api, code};
use geolog_launcher::topology::Shape;
use geolog_testkit::{TestCluster, fast_failure_detection};
use serde_json::{Value, json};
use std::collections::HashMap;

const ONE_BY_THREE: Shape = Shape {
    regions: 1,
    nodes_per_region: 3,
    replication_factor: 3,
};

/// A cluster whose replicas let at most 64 records wait for a call (and
/// whose batches, which must fit a queue, hold 64 records at most).
async fn small_queues() -> TestCluster {
    let mut env = fast_failure_detection();
    env.push(("GEOLOG__COORDINATOR__QUEUE_MAX_RECORDS".into(), "64".into()));
    env.push(("GEOLOG__GATEWAY__MAX_BATCH_RECORDS".into(), "64".into()));
    TestCluster::start_with_env(ONE_BY_THREE, env)
        .await
        .expect("cluster starts")
}

/// How a record was answered: written (with its value), or refused.
#[derive(Clone)]
enum Fate {
    Written(i64),
    /// Refused at the mint: nothing was written.
    NotWritten,
    /// Failed after the mint (its level not met): may have landed.
    MayHaveLanded,
}

#[tokio::test(flavor = "multi_thread")]
async fn bursts_past_capacity_are_refused_fast_and_nothing_acknowledged_is_lost() {
    let cluster = small_queues().await;
    let api = Api::new(cluster.gateway("a"));

    // 80 batches of 50 records at once: 4,000 records, far more than the
    // replicas' queues (64 records each) hold. Every key is its own.
    let mut sends = tokio::task::JoinSet::new();
    for b in 0..80 {
        let (http, base) = (api.http.clone(), api.base.clone());
        sends.spawn(async move {
            let records: Vec<Value> = (0..50)
                .map(|i| json!({"key": format!("burst-{b}-{i}"), "value": b * 100 + i}))
                .collect();
            let response = http
                .post(format!("{base}/api/logs/batch?consistency=LOCAL_QUORUM"))
                .json(&records)
                .send()
                .await
                .unwrap();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let (status, body) = Api::decode(response).await;
            (b, status, retry_after, body)
        });
    }
    let mut fates: HashMap<String, Fate> = HashMap::new();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    while let Some(done) = sends.join_next().await {
        let (b, status, retry_after, body) = done.unwrap();
        *statuses.entry(status).or_default() += 1;
        assert!(
            [201, 207, 503, 504].contains(&status),
            "batch {b}: {status} {body}"
        );
        if status == 503 {
            assert_eq!(
                retry_after.as_deref(),
                Some("1"),
                "a 503 says when to retry"
            );
        }
        for result in body["results"].as_array().unwrap() {
            let i = result["index"].as_i64().unwrap();
            let key = format!("burst-{b}-{i}");
            let fate = match result["status"].as_u64().unwrap() {
                201 => Fate::Written(b * 100 + i),
                503 => {
                    let error = &result["error"];
                    assert_eq!(error["code"], "overloaded", "{result}");
                    let message = error["message"].as_str().unwrap();
                    if message.contains("nothing was written") {
                        Fate::NotWritten
                    } else {
                        Fate::MayHaveLanded
                    }
                }
                // A loaded machine may also let a call time out.
                504 => Fate::MayHaveLanded,
                other => panic!("record {key}: {other} {result}"),
            };
            fates.insert(key, fate);
        }
    }
    assert_eq!(fates.len(), 4_000, "every record is answered");
    let written = fates
        .values()
        .filter(|f| matches!(f, Fate::Written(_)))
        .count();
    let refused = fates
        .values()
        .filter(|f| matches!(f, Fate::NotWritten))
        .count();
    assert!(written > 0, "some records fit: {statuses:?}");
    assert!(refused > 0, "the burst overflowed the queues: {statuses:?}");

    // Refused, not failed: no replica was declared dead.
    assert_eq!(api.replicas_in_state("dead").await, 0);

    // Single writes refused the same way: 503, the JSON body, Retry-After.
    let mut singles = tokio::task::JoinSet::new();
    for i in 0..300 {
        let (http, base) = (api.http.clone(), api.base.clone());
        singles.spawn(async move {
            let big = "x".repeat(2_000);
            let response = http
                .post(format!("{base}/api/logs"))
                .json(&json!({"key": format!("single-{i}"), "value": {"i": i, "pad": big}}))
                .send()
                .await
                .unwrap();
            let retry_after = response.headers().get("retry-after").cloned();
            let (status, body) = Api::decode(response).await;
            (i, status, retry_after, body)
        });
    }
    while let Some(done) = singles.join_next().await {
        let (i, status, retry_after, body) = done.unwrap();
        match status {
            201 => {
                fates.insert(format!("single-{i}"), Fate::Written(i));
            }
            503 => {
                assert_eq!(code(&body), "overloaded", "{body}");
                assert!(retry_after.is_some(), "a 503 says when to retry");
            }
            504 => {
                fates.insert(format!("single-{i}"), Fate::MayHaveLanded);
            }
            other => panic!("single write {i}: {other} {body}"),
        }
    }

    // Once the burst is over the cluster takes writes again, all of them.
    let records: Vec<Value> = (0..50)
        .map(|i| json!({"key": format!("after-{i}"), "value": i}))
        .collect();
    let (status, body) = api
        .raw(
            reqwest::Method::POST,
            "/api/logs/batch?consistency=ALL",
            serde_json::to_vec(&records).unwrap(),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Everything acknowledged is readable at ALL; nothing refused at the
    // mint exists anywhere. (Sixteen readers, each a share of the keys.)
    let fates: Vec<(String, Fate)> = fates.into_iter().collect();
    let mut checks = tokio::task::JoinSet::new();
    for share in fates.chunks(fates.len().div_ceil(16)) {
        let share: Vec<(String, Fate)> =
            share.iter().map(|(k, f)| (k.clone(), f.clone())).collect();
        let api = Api::new(api.base.clone());
        checks.spawn(async move {
            for (key, fate) in share {
                let (status, body) = api.read(&key, Some("ALL")).await;
                match fate {
                    Fate::Written(value) => {
                        assert_eq!(status, 200, "{key}: {body}");
                        let got = &body["value"];
                        let got = got.as_i64().or_else(|| got["i"].as_i64());
                        assert_eq!(got, Some(value), "{key}: {body}");
                    }
                    Fate::NotWritten => assert_eq!(status, 404, "{key} was refused: {body}"),
                    Fate::MayHaveLanded => {
                        assert!([200, 404].contains(&status), "{key}: {body}")
                    }
                }
            }
        });
    }
    while let Some(done) = checks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_slow_over_big_batches_is_not_declared_dead() {
    // Calls get 40 ms: big batches take longer, health checks (2 s) do
    // not even on a loaded machine.
    let mut env = fast_failure_detection();
    env.retain(|(k, _)| {
        k != "GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS"
            && k != "GEOLOG__COORDINATOR__PROBE_TIMEOUT_MS"
    });
    env.push((
        "GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS".into(),
        "40".into(),
    ));
    env.push((
        "GEOLOG__COORDINATOR__PROBE_TIMEOUT_MS".into(),
        "2000".into(),
    ));
    let cluster = TestCluster::start_with_env(ONE_BY_THREE, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    // Two batches at once: each replica gets at most four calls, all slow,
    // fewer than the CALL_TIMEOUTS_TO_DEAD (5) in a row that do mark a
    // replica whose every call times out (a stuck write path) dead.
    let mut sends = tokio::task::JoinSet::new();
    for b in 0..2 {
        let (http, base) = (api.http.clone(), api.base.clone());
        sends.spawn(async move {
            let pad = "x".repeat(500);
            let records: Vec<Value> = (0..1_000)
                .map(|i| json!({"key": format!("slow-{b}-{i}"), "value": {"i": i, "pad": pad}}))
                .collect();
            let response = http
                .post(format!("{base}/api/logs/batch?consistency=ONE"))
                .json(&records)
                .send()
                .await
                .unwrap();
            let (status, body) = Api::decode(response).await;
            let timed_out = body["results"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["status"] == 504)
                .count();
            (status, timed_out)
        });
    }
    let (mut dead_seen, mut timed_out) = (0, 0);
    while !sends.is_empty() {
        dead_seen = dead_seen.max(api.replicas_in_state("dead").await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        while let Some(done) = sends.try_join_next() {
            let (status, records) = done.unwrap();
            assert!([201, 207, 503, 504].contains(&status), "{status}");
            timed_out += records;
        }
    }
    assert!(
        timed_out > 0,
        "no call took longer than the replica timeout"
    );
    assert_eq!(dead_seen, 0, "slow calls made a replica be declared dead");
    assert_eq!(api.replicas_in_state("dead").await, 0);
}

/// Clients that open connections and never finish a request (slowloris)
/// neither hold them for ever nor lock others out: the gateway closes a
/// connection whose request head has not arrived within its header-read
/// timeout, and keeps at most `max_connections` open (the rest wait in the
/// listen backlog), so its descriptors cannot run out.
#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_finish_a_request_are_closed_and_lock_nobody_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = fast_failure_detection();
    env.push(("GEOLOG__GATEWAY__MAX_CONNECTIONS".into(), "16".into()));
    env.push((
        "GEOLOG__GATEWAY__HEADER_READ_TIMEOUT_MS".into(),
        "1000".into(),
    ));
    let cluster = TestCluster::start_with_env(ONE_BY_THREE, env)
        .await
        .expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let addr = api.base.trim_start_matches("http://").to_string();

    // Three times the cap: half send half a request head, half nothing.
    let mut stalled = Vec::new();
    for i in 0..48 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /api/logs/health HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        stalled.push(stream);
    }
    // A real client still gets through once the stalled ones time out.
    let started = std::time::Instant::now();
    let (status, answer) = api.write("after-slowloris", json!(1), Some("ALL")).await;
    assert_eq!(status, 201, "{answer}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );
    // Every stalled connection was closed by the gateway (EOF or reset).
    for mut stream in stalled {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a stalled connection was left open");
    }
    let metrics = api.metrics().await;
    let open = metrics
        .lines()
        .find(|l| l.starts_with("http_server_open_connections"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the gauge is exported");
    assert!(open <= 16.0, "{open} connections open");
    let (status, answer) = api.read("after-slowloris", Some("ALL")).await;
    assert_eq!((status, &answer["value"]), (200, &json!(1)));
}
