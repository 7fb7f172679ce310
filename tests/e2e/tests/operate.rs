//! What an operator relies on, on a real cluster: one trace per request
//! across gateway, coordinators of two regions and storage nodes, exported
//! over OTLP to a collector (a real OTLP/gRPC receiver in this test);
//! `/metrics` on every process listed in `cluster.json`, with every metric
//! the issue names and every metric the Grafana dashboards query; and the
//! health view per region (`/api/logs/health`, `geolog status`).

mod common;

use common::{Api, wait_until};
use geolog_launcher::ClusterFile;
use geolog_launcher::topology::Shape;
use geolog_testkit::{TestCluster, fast_failure_detection};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct SpanSeen {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace receiver keeping every span.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanSeen>>>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    seen.push(SpanSeen {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn trace(&self, trace_id: &str) -> Vec<SpanSeen> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// Metric names in Prometheus text (histograms as `_bucket`, `_sum`,
/// `_count`, as a query names them).
fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// PromQL's grouping keywords: `by (…)`, `on (…)` name labels, not metrics.
const PROMQL_GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other PromQL words that are not metric names: operators, and
/// aggregation operators (which may be followed by `by (…)` instead of `(`).
const PROMQL_WORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The metric names a PromQL expression reads: identifiers that are not
/// functions (followed by `(`), keywords, label names inside `{…}` or
/// `by (…)`, strings or durations.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut braces = 0;
    let mut grouping = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += 1;
                }
                i += 1;
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces -= 1;
                i += 1;
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
            }
            ')' => {
                grouping = false;
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next] == ' ' {
                    next += 1;
                }
                let is_call = chars.get(next) == Some(&'(');
                if PROMQL_GROUPING.contains(&word.as_str()) {
                    grouping = is_call;
                } else if braces == 0
                    && !grouping
                    && !is_call
                    && !PROMQL_WORDS.contains(&word.as_str())
                {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() => {
                // A number or a duration (5m): skip the unit with it.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_extraction() {
    let names = promql_metrics(
        r#"histogram_quantile(0.99, sum by (le, consistency) (rate(http_server_requests_seconds_bucket{route!="/metrics"}[5m])))"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["http_server_requests_seconds_bucket".to_string()])
    );
    let names = promql_metrics(
        "sum(rate(quorum_writes_total{result=\"ok\"}[1m])) / clamp_min(sum(rate(quorum_writes_total[1m])), 1e-9) or max(replica_up) by (replica)",
    );
    assert_eq!(
        names,
        BTreeSet::from(["quorum_writes_total".to_string(), "replica_up".to_string()])
    );
}

/// Every `expr` of every panel target in the provisioned dashboards.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = repo_root().join("deploy/grafana/dashboards");
    let mut queries = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "dashboards missing in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", file.display()));
        assert!(
            dashboard["title"].is_string(),
            "{}: no title",
            file.display()
        );
        assert!(dashboard["uid"].is_string(), "{}: no uid", file.display());
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{}: no panels", file.display());
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| {
                    panic!(
                        "{}: panel {} has a target without expr",
                        file.display(),
                        panel["title"]
                    )
                });
                queries.push((file.display().to_string(), expr.to_string()));
            }
        }
    }
    queries
}

/// A process's Prometheus text.
async fn scrape(api: &Api, url: &str) -> String {
    let response = api.http.get(url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "{url}");
    response.text().await.unwrap()
}

/// The region's health document once `settled` holds (20 s at most).
async fn health_until(
    api: &Api,
    settled: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, h) = api
            .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
            .await;
        if settled(&h) {
            assert_eq!(status, 200);
            return h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never settled: {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `geolog status` output once `settled` holds (20 s at most).
fn status_until(data_dir: &std::path::Path, settled: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let output =
            std::process::Command::new(geolog_launcher::cluster::default_bin_dir().join("geolog"))
                .arg("status")
                .arg("--data-dir")
                .arg(data_dir)
                .output()
                .unwrap();
        assert!(output.status.success());
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        if settled(&printed) {
            return printed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never settled:\n{printed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_per_request_metrics_everywhere_and_health_per_region() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let mut env = fast_failure_detection();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint));
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
    env.push(("GEOLOG__ANTI_ENTROPY__INTERVAL_MS".into(), "1000".into()));
    env.push(("GEOLOG__ANTI_ENTROPY__RPC_TIMEOUT_MS".into(), "2000".into()));
    let shape = Shape {
        regions: 2,
        nodes_per_region: 2,
        replication_factor: 2,
    };
    let mut cluster = TestCluster::start_with_env(shape, env).await.unwrap();
    let api = Api::new(cluster.gateway("a"));

    // A write at EACH_QUORUM, inside a trace the client started.
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let parent = format!("{:016x}", fastrand::u64(1..));
    let response = api
        .http
        .post(format!("{}/api/logs?consistency=EACH_QUORUM", api.base))
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .json(&serde_json::json!({"key": "traced", "value": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);

    // Gateway, both regions' coordinators and storage nodes of both regions
    // report spans of that one trace.
    let complete = |spans: &[SpanSeen]| {
        let has = |service: &str, attr: &str, value: &str| {
            spans
                .iter()
                .any(|s| s.service == service && s.attributes.get(attr).is_some_and(|v| v == value))
        };
        // Spans are exported as each ends, in batches per process: wait
        // for every one the assertions below look at.
        spans.iter().any(|s| s.service == "geolog-gateway")
            && spans.iter().any(|s| s.name == "coordinator write")
            && has("geolog-coordinator", "region", "a")
            && has("geolog-coordinator", "region", "b")
            && has("geolog-storage", "region", "a")
            && has("geolog-storage", "region", "b")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !complete(&collector.trace(&trace_id)) {
        if std::time::Instant::now() > deadline {
            let spans = collector.trace(&trace_id);
            let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
            for s in collector.spans.lock().unwrap().iter() {
                *counts
                    .entry(format!("{} {}", s.service, s.name))
                    .or_default() += 1;
            }
            eprintln!("all spans received: {counts:#?}");
            let logs = cluster.keep_files();
            panic!(
                "trace incomplete after 20 s (logs kept in {}): {spans:#?}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = collector.trace(&trace_id);
    // The gateway's span continues the client's.
    let http = spans
        .iter()
        .find(|s| s.service == "geolog-gateway" && s.parent_span_id == parent)
        .unwrap_or_else(|| panic!("no gateway span under the client's span: {spans:#?}"));
    assert_eq!(http.attributes["status"], "201");
    // The coordinator's request span names key, level, region and acks.
    let request = spans
        .iter()
        .find(|s| s.service == "geolog-coordinator" && s.name == "coordinator write")
        .unwrap_or_else(|| panic!("no coordinator write span: {spans:#?}"));
    assert_eq!(request.attributes["key"], "traced");
    assert_eq!(request.attributes["level"], "EACH_QUORUM");
    assert_eq!(request.attributes["region"], "a");
    assert_eq!(request.attributes["outcome"], "ok");
    let acks: u64 = request.attributes["acks"].parse().unwrap();
    let required: u64 = request.attributes["required"].parse().unwrap();
    assert!(
        acks >= required && required >= 4,
        "acks {acks} of {required}"
    );
    // Batches name the replica they went to; storage spans their node.
    // One replica mints the version, the others (b's through b's
    // coordinator) apply it.
    let written: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.name == "batch mint" || s.name == "batch apply")
        .filter_map(|s| s.attributes.get("replica").map(String::as_str))
        .collect();
    assert_eq!(
        written,
        BTreeSet::from(["a1", "a2", "b1", "b2"]),
        "{spans:#?}"
    );
    assert!(spans.iter().any(|s| s.name == "batch replicate"
        && s.attributes.get("replica").is_some_and(|r| r == "region:b")));
    for node in ["a1", "a2", "b1", "b2"] {
        assert!(
            spans.iter().any(|s| s.service == "geolog-storage"
                && s.attributes.get("instance").is_some_and(|i| i == node)),
            "no storage span from {node}"
        );
    }
    // Every span of the trace hangs off a span of the same trace (or the
    // client's): nothing was orphaned across a process boundary.
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        assert!(
            span.parent_span_id == parent || ids.contains(span.parent_span_id.as_str()),
            "span {} of {} has a parent outside the trace",
            span.name,
            span.service
        );
    }

    // Anti-entropy is traced too: a comparison of a pair, with the nodes'
    // digest calls in its trace.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all = collector.spans.lock().unwrap().clone();
        let compared = all.iter().any(|c| {
            c.service == "geolog-anti-entropy"
                && c.name == "anti_entropy compare"
                && all.iter().any(|s| {
                    s.trace_id == c.trace_id
                        && s.service == "geolog-storage"
                        && s.name == "grpc Digests"
                })
        });
        if compared {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no traced anti-entropy comparison"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Some traffic so every series the dashboards read exists.
    for level in ["ONE", "QUORUM", "LOCAL_QUORUM", "ALL"] {
        let (status, _) = api
            .write("metrics", serde_json::json!({"l": level}), Some(level))
            .await;
        assert_eq!(status, 201);
        let (status, _) = api.read("metrics", Some(level)).await;
        assert_eq!(status, 200);
    }

    // Health per region: replicas with circuits, links, anti-entropy.
    let file = ClusterFile::read(cluster.cluster.data_dir()).unwrap();
    for region in ["a", "b"] {
        // A probe that times out once on a busy machine makes a replica
        // `suspect` for a moment: wait for the settled view.
        let h = health_until(&Api::new(cluster.gateway(region)), |h| {
            h["status"] == "ok" && h["anti_entropy"]["last_pass"]["result"] == "ok"
        })
        .await;
        assert_eq!(h["anti_entropy"]["status"], "up");
        let replicas = h["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 4);
        for r in replicas {
            assert_eq!(r["state"], "alive");
        }
        for r in replicas.iter().filter(|r| r["region"] == region) {
            assert_eq!(r["circuit"], "closed");
        }
        let links = h["links"].as_array().unwrap();
        assert_eq!(links.len(), 1);
        assert_eq!(links[0]["state"], "alive");
        assert_eq!(links[0]["circuit"], "closed");
        assert!(h["hints"].is_array() && h["outbox"].is_array());
    }
    let printed = status_until(cluster.cluster.data_dir(), |printed| {
        printed.contains("region a: ok") && printed.contains("region b: ok")
    });
    for expected in [
        "region a: ok",
        "region b: ok",
        "replica a1",
        "link to b",
        "hints pending: 0",
        "outbox to a:",
        "anti-entropy a-ae1 (up): last pass ok",
    ] {
        assert!(
            printed.contains(expected),
            "{expected:?} not in:\n{printed}"
        );
    }

    // Every process serves /metrics where cluster.json says, and labels are
    // bounded: no key ever becomes a label value.
    let mut exported = BTreeSet::new();
    let mut by_role: HashMap<String, BTreeSet<String>> = HashMap::new();
    for process in &file.processes {
        let url = process
            .metrics_url
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no metrics_url", process.id));
        let text = scrape(&api, url).await;
        assert!(
            !text.contains("\"traced\"") && !text.contains("\"metrics\""),
            "{url}"
        );
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{url} exports nothing");
        by_role
            .entry(process.role.clone())
            .or_default()
            .extend(names.iter().cloned());
        exported.extend(names);
    }
    let required = [
        ("gateway", "http_server_requests_seconds_bucket"),
        ("gateway", "grpc_client_request_duration_seconds_bucket"),
        ("coordinator", "quorum_writes_total"),
        ("coordinator", "quorum_write_success_rate"),
        ("coordinator", "version_vector_conflicts_total"),
        ("coordinator", "read_repairs_total"),
        ("coordinator", "hints_pending"),
        ("coordinator", "hints_replayed_total"),
        ("coordinator", "outbox_depth"),
        ("coordinator", "outbox_oldest_age_seconds"),
        ("coordinator", "replica_up"),
        ("coordinator", "replica_circuit_state"),
        ("coordinator", "region_link_circuit_state"),
        ("coordinator", "grpc_client_request_duration_seconds_bucket"),
        ("storage", "db_pool_connections"),
        ("storage", "db_pool_max_connections"),
        ("storage", "storage_request_duration_seconds_bucket"),
        ("anti-entropy", "anti_entropy_ranges_compared_total"),
        (
            "anti-entropy",
            "grpc_client_request_duration_seconds_bucket",
        ),
        ("anti-entropy", "anti_entropy_digests_exchanged_total"),
        ("anti-entropy", "anti_entropy_versions_repaired_total"),
        ("anti-entropy", "anti_entropy_last_pass_timestamp_seconds"),
    ];
    for (role, name) in required {
        assert!(
            by_role[role].contains(name),
            "{role} does not export {name}: {:?}",
            by_role[role]
        );
    }

    // The dashboards query only what the services export.
    for (file, expr) in dashboard_queries() {
        for name in promql_metrics(&expr) {
            assert!(
                exported.contains(&name),
                "{file}: query {expr:?} reads {name:?}, which no service exports"
            );
        }
    }

    // A storage node dies: health, status and metrics of both regions show
    // it, and anti-entropy reports the pass that could not compare it.
    cluster.cluster.kill("b2").unwrap();
    let b = Api::new(cluster.gateway("b"));
    let health = |api: &Api| {
        let api = Api::new(api.base.clone());
        async move {
            api.raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
                .await
                .1
        }
    };
    let replica = |h: &serde_json::Value, node: &str| {
        h["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node"] == node)
            .cloned()
            .unwrap()
    };
    wait_until(Duration::from_secs(20), || async {
        let h = health(&b).await;
        replica(&h, "b2")["circuit"] == "open"
            && h["anti_entropy"]["last_pass"]["result"] == "failed"
    })
    .await;
    let h = health(&b).await;
    assert_eq!(h["status"], "degraded");
    assert_eq!(replica(&h, "b2")["state"], "dead");
    assert!(
        h["anti_entropy"]["last_pass"]["failed_pairs"]
            .as_u64()
            .unwrap()
            > 0
    );
    wait_until(Duration::from_secs(10), || async {
        let h = health(&api).await;
        replica(&h, "b2")["state"] == "dead" && replica(&h, "b2")["circuit"] == "open"
    })
    .await;
    let coordinator_b = file
        .processes
        .iter()
        .find(|p| p.id == "b-co1")
        .and_then(|p| p.metrics_url.clone())
        .unwrap();
    let text = scrape(&api, &coordinator_b).await;
    assert!(
        text.lines().any(|l| l.starts_with("replica_circuit_state{")
            && l.contains("replica=\"b2\"")
            && l.ends_with(" 2")),
        "b2's circuit is not open in b-co1's metrics"
    );
    status_until(cluster.cluster.data_dir(), |printed| {
        printed.contains("region b: degraded")
            && printed.lines().any(|l| {
                l.contains("replica b2") && l.contains("dead") && l.contains("circuit open")
            })
            && printed.contains("anti-entropy b-ae1 (up): last pass failed")
    });

    // Back: everything alive again, and every acknowledged write is there.
    cluster.cluster.restart("b2").await.unwrap();
    wait_until(Duration::from_secs(30), || async {
        let h = health(&b).await;
        h["status"] == "ok" && h["anti_entropy"]["last_pass"]["result"] == "ok"
    })
    .await;
    let (status, body) = api.read("traced", Some("ALL")).await;
    assert_eq!(
        (status, &body["value"]),
        (200, &serde_json::json!({"n": 1})),
        "{body}"
    );
    // Written four times without a context: the last write is the value or
    // one of the siblings.
    let (status, body) = api.read("metrics", Some("ALL")).await;
    assert_eq!(status, 200);
    assert!(body.to_string().contains(r#"{"l":"ALL"}"#), "{body}");
}
