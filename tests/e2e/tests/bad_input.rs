//! Every bad input gets a 4xx JSON error with a stable code — never a 500,
//! a panic or a non-JSON answer — and creates nothing.

mod common;

use common::{Api, TUTORIAL, code, gzip, zstd};
use geolog_testkit::TestCluster;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx() {
    let cluster = TestCluster::start(TUTORIAL).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let post = |body: &str| api.raw(Method::POST, "/api/logs", body.as_bytes().to_vec());

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("empty body", String::new(), 400, "invalid_json"),
        ("broken JSON", "{\"key\": ".into(), 400, "invalid_json"),
        ("not an object", "[1,2]".into(), 400, "invalid_json"),
        ("missing key", r#"{"value": 1}"#.into(), 400, "invalid_json"),
        (
            "missing value",
            r#"{"key": "k"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "key not a string",
            r#"{"key": 7, "value": 1}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "unknown field",
            r#"{"key": "k", "value": 1, "vaule": 2}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "empty key",
            r#"{"key": "", "value": 1}"#.into(),
            400,
            "invalid_key",
        ),
        (
            "key of 513 bytes",
            format!(r#"{{"key": "{}", "value": 1}}"#, "k".repeat(513)),
            400,
            "invalid_key",
        ),
        (
            "NUL in key",
            r#"{"key": "a\u0000b", "value": 1}"#.into(),
            400,
            "invalid_key",
        ),
    ];
    for (what, body, status, expected) in cases {
        let (got, answer) = post(&body).await;
        assert_eq!((got, code(&answer)), (status, expected), "{what}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }

    let over_limit = format!(
        r#"{{"key": "big", "value": "{}"}}"#,
        "x".repeat(1024 * 1024 + 1)
    );
    let (status, answer) = post(&over_limit).await;
    assert_eq!((status, code(&answer)), (413, "payload_too_large"));
    let (status, _) = api.read("big", Some("ALL")).await;
    assert_eq!(status, 404, "a refused write creates nothing");

    let paths: Vec<(Method, String, u16, &str)> = vec![
        (
            Method::POST,
            "/api/logs?consistency=MOST".into(),
            400,
            "invalid_consistency",
        ),
        (
            Method::POST,
            "/api/logs?consistency=".into(),
            400,
            "invalid_consistency",
        ),
        (
            Method::POST,
            "/api/logs?consistancy=ALL".into(),
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/api/logs/k?consistency=ANY".into(),
            400,
            "invalid_consistency",
        ),
        (
            Method::GET,
            "/api/logs/k?consistency=%zz".into(),
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            format!("/api/logs/{}", "k".repeat(513)),
            400,
            "invalid_key",
        ),
        (Method::GET, "/api/logs/%FF%FE".into(), 400, "invalid_key"),
        (Method::GET, "/api/logs/a%00b".into(), 400, "invalid_key"),
        (Method::GET, "/api/nothing".into(), 404, "route_not_found"),
        (
            Method::DELETE,
            "/api/logs/k".into(),
            405,
            "method_not_allowed",
        ),
        (Method::PUT, "/api/logs".into(), 405, "method_not_allowed"),
    ];
    for (method, path, status, expected) in paths {
        let body = br#"{"key": "k", "value": 1}"#.to_vec();
        let (got, answer) = api.raw(method.clone(), &path, body).await;
        assert_eq!(
            (got, code(&answer)),
            (status, expected),
            "{method} {path}: {answer}"
        );
    }

    // A burst of random bytes as bodies: always a 4xx JSON answer.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200 {
        let len = (i * 7) % 300;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        let (status, answer) = api
            .raw(Method::POST, "/api/logs?consistency=ONE", bytes)
            .await;
        assert!(
            (400..500).contains(&status),
            "random body {i} (seed-derived): {status} {answer}"
        );
    }
    let (status, health) = api.raw(Method::GET, "/api/logs/health", Vec::new()).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("ok")),
        "the cluster survived"
    );
}

fn token(vector: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(vector.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bodies_and_contexts_are_refused_alone_and_lose_nothing() {
    let cluster = TestCluster::start(TUTORIAL).await.expect("cluster starts");
    let api = Api::new(cluster.gateway("a"));
    let ndjson: (&str, &[u8]) = ("content-type", b"application/x-ndjson");
    let line = |key: &str, value: i64| format!("{}\n", json!({"key": key, "value": value}));

    // Every member of a gzip body and every frame of a zstd body count.
    for (encoding, pack) in [("gzip", gzip as fn(&[u8]) -> Vec<u8>), ("zstd", zstd)] {
        let (first, second) = (format!("{encoding}-1"), format!("{encoding}-2"));
        let body = [
            pack(line(&first, 1).as_bytes()),
            pack(line(&second, 2).as_bytes()),
        ]
        .concat();
        let headers = [ndjson, ("content-encoding", encoding.as_bytes())];
        let (status, answer) = api.post_with("/api/logs/batch", &headers, body).await;
        assert_eq!(
            (status, &answer["written"]),
            (201, &json!(2)),
            "{encoding}: {answer}"
        );
        for (key, value) in [(first, 1), (second, 2)] {
            let (status, read) = api.read(&key, Some("ALL")).await;
            assert_eq!((status, &read["value"]), (200, &json!(value)), "{key}");
        }
        // Bytes after the last member or frame: refused whole.
        let mut body = pack(line(&format!("{encoding}-trailing"), 3).as_bytes());
        body.extend_from_slice(b"garbage");
        let (status, answer) = api.post_with("/api/logs/batch", &headers, body).await;
        assert_eq!(
            (status, code(&answer)),
            (400, "invalid_request"),
            "{answer}"
        );
        let (status, _) = api.read(&format!("{encoding}-trailing"), Some("ALL")).await;
        assert_eq!(status, 404, "a refused batch writes nothing");
    }
    let (status, answer) = api
        .post_with(
            "/api/logs/batch",
            &[ndjson, ("content-encoding", "gz\u{e9}".as_bytes())],
            line("odd-encoding", 1).into_bytes(),
        )
        .await;
    assert_eq!(
        (status, code(&answer)),
        (415, "unsupported_media_type"),
        "{answer}"
    );

    // Too deep a value fails alone, at the gateway; its neighbours land.
    let deep = format!(
        r#"{{"key": "deep", "value": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (status, answer) = api
        .raw(Method::POST, "/api/logs", deep.clone().into_bytes())
        .await;
    assert_eq!((status, code(&answer)), (400, "invalid_json"), "{answer}");
    let mut lines: Vec<String> = (0..40)
        .map(|i| line(&format!("beside-deep-{i}"), i))
        .collect();
    lines.insert(5, format!("{deep}\n"));
    let (status, answer) = api
        .post_with("/api/logs/batch", &[ndjson], lines.concat().into_bytes())
        .await;
    assert_eq!(
        (status, &answer["written"], &answer["failed"]),
        (207, &json!(40), &json!(1)),
        "{answer}"
    );
    assert_eq!(
        answer["results"][5]["error"]["code"], "invalid_json",
        "{answer}"
    );

    // A batch record is held to a single write's size limit, alone.
    let big = json!({"key": "big-in-batch", "value": "x".repeat(1024 * 1024 + 1)});
    let body = json!([{"key": "small-beside-big", "value": 1}, big]).to_string();
    let (status, answer) = api
        .raw(Method::POST, "/api/logs/batch", body.into_bytes())
        .await;
    assert_eq!((status, &answer["written"]), (207, &json!(1)), "{answer}");
    assert_eq!(
        answer["results"][1]["error"]["code"], "payload_too_large",
        "{answer}"
    );
    assert_eq!(api.read("big-in-batch", Some("ALL")).await.0, 404);

    // Contexts no read of this cluster can have returned.
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let every_node = |seq: u64| {
        let nodes = ["a1", "a2", "a3", "a4", "a5"];
        Value::Object(nodes.iter().map(|n| (n.to_string(), json!(seq))).collect())
    };
    let forged = [
        ("unknown node", json!({"zz": 5})),
        ("sequence 2^63 - 1", json!({"a1": i64::MAX})),
        ("sequence 2^64 - 1", json!({"a1": u64::MAX})),
        ("sequence 0", json!({"a1": 0})),
        ("covering every node", every_node(i64::MAX as u64)),
        // Within the clock bound, but naming the minting node's next dot.
        (
            "covering the new version",
            every_node(now_micros + 30_000_000),
        ),
    ];
    for (what, vector) in forged {
        let key = format!("forged-{}", what.replace(' ', "-"));
        let (status, answer) = api
            .write_with_context(&key, json!(1), &token(&vector), "ALL")
            .await;
        assert_eq!(
            (status, code(&answer)),
            (400, "invalid_context"),
            "{what}: {answer}"
        );
        if what == "covering the new version" {
            // Refused by the minting node itself, under its key lock.
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("has not minted it"), "{answer}");
        }
        assert_eq!(
            api.read(&key, Some("ALL")).await.0,
            404,
            "{what}: nothing written"
        );
    }
    // A real token still works.
    let (status, first) = api.write("real-context", json!(1), Some("ALL")).await;
    assert_eq!(status, 201);
    let context = first["context"].as_str().unwrap();
    let (status, _) = api
        .write_with_context("real-context", json!(2), context, "ALL")
        .await;
    assert_eq!(status, 201);
    let (status, read) = api.read("real-context", Some("ALL")).await;
    assert_eq!((status, &read["value"]), (200, &json!(2)), "{read}");
    assert_eq!(read["siblings"].as_array().map(Vec::len), Some(1), "{read}");

    // History cursors past every stored position do not wrap around.
    let cursor = |hlc: u64| token(&json!([hlc, "a1", u64::MAX]));
    for hlc in [u64::MAX, 1 << 63] {
        let path = format!("/api/logs/real-context/history?before={}", cursor(hlc));
        let (status, page) = api.raw(Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["versions"].as_array().map(Vec::len),
            Some(2),
            "before {hlc}: {page}"
        );
        let path = format!("/api/logs/real-context/history?after={}", cursor(hlc));
        let (status, page) = api.raw(Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["versions"].as_array().map(Vec::len),
            Some(0),
            "after {hlc}: {page}"
        );
    }

    // Repeated parameters and headers are mistakes, not "the last wins".
    let body = br#"{"key": "repeated", "value": 1}"#.to_vec();
    let (status, answer) = api
        .raw(
            Method::POST,
            "/api/logs?consistency=ONE&consistency=ALL",
            body.clone(),
        )
        .await;
    assert_eq!(
        (status, code(&answer)),
        (400, "invalid_request"),
        "{answer}"
    );
    let (status, answer) = api
        .post_with(
            "/api/logs",
            &[("idempotency-key", b"one"), ("idempotency-key", b"two")],
            body,
        )
        .await;
    assert_eq!(
        (status, code(&answer)),
        (400, "invalid_request"),
        "{answer}"
    );
    assert_eq!(api.read("repeated", Some("ALL")).await.0, 404);
    let (status, answer) = api
        .raw(Method::GET, "/api/logs/health?verbose=1", Vec::new())
        .await;
    assert_eq!(
        (status, code(&answer)),
        (400, "invalid_request"),
        "{answer}"
    );
    let (status, health) = api.raw(Method::GET, "/api/logs/health", Vec::new()).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    // The coordinator's background workers, each alive and not failing.
    let workers = health["coordinators"][0]["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut names: Vec<&str> = workers.iter().filter_map(|w| w["name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["outbox-replay", "prober"], "{health}");
    for worker in &workers {
        let state = worker["state"].as_str().unwrap_or_default();
        assert!(["idle", "busy", "throttled"].contains(&state), "{worker}");
        assert!(worker["steps"].as_u64().unwrap_or(0) > 0, "{worker}");
    }
}
