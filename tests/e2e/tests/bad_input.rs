//! Every bad input gets a 4xx JSON error with a stable code — never a 500,
//! a panic or a non-JSON answer — and creates nothing.

mod common;

use common::{Api, TUTORIAL, code};
use geolog_testkit::TestCluster;
use reqwest::Method;

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
