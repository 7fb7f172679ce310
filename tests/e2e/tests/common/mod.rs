//! Helpers shared by the end-to-end tests: a small REST client for the
//! gateway and waits on conditions with deadlines (never bare sleeps).

#![allow(dead_code)]

use geolog_launcher::ClusterFile;
use geolog_launcher::topology::Shape;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The tutorial's cluster: one region, five storage nodes, N = 5.
pub const TUTORIAL: Shape = Shape {
    regions: 1,
    nodes_per_region: 5,
    replication_factor: 5,
};

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(base: String) -> Self {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
            base,
        }
    }

    /// `POST /api/logs?consistency=level` → (status, JSON body).
    pub async fn write(&self, key: &str, value: Value, level: Option<&str>) -> (u16, Value) {
        let mut url = format!("{}/api/logs", self.base);
        if let Some(level) = level {
            url.push_str(&format!("?consistency={level}"));
        }
        let response = self
            .http
            .post(url)
            .json(&serde_json::json!({"key": key, "value": value}))
            .send()
            .await
            .unwrap();
        Self::decode(response).await
    }

    /// A write carrying the context token of what the writer has seen.
    pub async fn write_with_context(
        &self,
        key: &str,
        value: Value,
        context: &str,
        level: &str,
    ) -> (u16, Value) {
        let body = serde_json::json!({"key": key, "value": value, "context": context});
        let response = self
            .http
            .post(format!("{}/api/logs?consistency={level}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        Self::decode(response).await
    }

    /// `GET /api/logs/{key}?consistency=level`; `key` must be URL-safe or pre-encoded.
    pub async fn read(&self, key: &str, level: Option<&str>) -> (u16, Value) {
        let mut url = format!("{}/api/logs/{key}", self.base);
        if let Some(level) = level {
            url.push_str(&format!("?consistency={level}"));
        }
        Self::decode(self.http.get(url).send().await.unwrap()).await
    }

    pub async fn raw(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.try_raw(method, path, body)
            .await
            .unwrap_or_else(|| panic!("no answer from the gateway at {}", self.base))
    }

    /// A POST of `body` to `path` with extra headers (any bytes).
    pub async fn post_with(
        &self,
        path: &str,
        headers: &[(&str, &[u8])],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base)).body(body);
        for (name, value) in headers {
            request = request.header(
                *name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        Self::decode(request.send().await.unwrap()).await
    }

    /// [`Api::raw`], or `None` when the gateway could not be reached or
    /// the connection broke before a whole answer (a gateway killed under
    /// the request): the request's outcome is then unknown.
    pub async fn try_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Option<(u16, Value)> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let text = response.text().await.ok()?;
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
        Some((status, body))
    }

    pub async fn decode(response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
        (status, body)
    }

    /// The gateway's Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(format!("{}/metrics", self.base)).send();
        response.await.unwrap().text().await.unwrap()
    }

    /// The first page of `key`'s history at `ALL`, newest first.
    pub async fn history_at_all(&self, key: &str) -> Vec<Value> {
        let path = format!("/api/logs/{key}/history?consistency=ALL");
        let (status, history) = self.raw(reqwest::Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200, "{history}");
        history["versions"].as_array().unwrap().clone()
    }

    /// Replicas the coordinator reports in `state` ("alive"/"dead").
    pub async fn replicas_in_state(&self, state: &str) -> usize {
        let (_, health) = self
            .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
            .await;
        health["replicas"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["state"] == state).count())
    }

    /// Waits until the coordinator sees exactly `dead` dead replicas.
    pub async fn wait_dead_replicas(&self, dead: usize) {
        wait_until(Duration::from_secs(15), || async {
            self.replicas_in_state("dead").await == dead
        })
        .await;
    }
}

/// `bytes` gzip-compressed (one member).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `bytes` zstd-compressed (one frame).
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Environment overrides for a test cluster, as owned pairs.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Polls `condition` until it holds, panicking after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, condition: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILLs a process by the PID `cluster.json` gives for it.
pub fn kill_by_cluster_json(data_dir: &Path, id: &str) -> u32 {
    let file = ClusterFile::read(data_dir).expect("cluster.json exists while the cluster runs");
    let process = file
        .processes
        .iter()
        .find(|p| p.id == id)
        .unwrap_or_else(|| panic!("{id} in cluster.json"));
    assert!(geolog_launcher::process::signal_pid(
        process.pid,
        nix::sys::signal::Signal::SIGKILL
    ));
    process.pid
}

/// The error code of an error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

/// The default local topology: 3 regions × 3 nodes, RF 3 per region.
pub const THREE_BY_THREE: Shape = Shape {
    regions: 3,
    nodes_per_region: 3,
    replication_factor: 3,
};

impl Api {
    /// The cross-region outbox depth this region's coordinator reports.
    /// Versions this region still owes the others, as its health reports
    /// them; `u64::MAX` when the health answer does not say (a failed or
    /// partial answer is not an empty outbox).
    pub async fn outbox_depth(&self) -> u64 {
        let (status, health) = self
            .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
            .await;
        let depths: Option<Vec<u64>> = health["outbox"]
            .as_array()
            .filter(|_| status == 200)
            .map(|o| o.iter().map(|e| e["depth"].as_u64()).collect())
            .and_then(|depths: Option<Vec<u64>>| depths);
        depths.map_or(u64::MAX, |d| d.iter().sum())
    }

    /// Waits until this region's outbox is empty (everything delivered).
    /// The depth is sampled once per replay interval (1 s): waiting longer
    /// than that first means the samples read were taken after this call
    /// began (unless a replay pass outlasts the wait), not before the
    /// writes they should cover.
    pub async fn wait_outbox_empty(&self, timeout: Duration) {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        wait_until(timeout, || async { self.outbox_depth().await == 0 }).await;
    }

    /// Waits until `node` has `state` in this region's view.
    pub async fn wait_replica_state(&self, node: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, health) = self
                .raw(reqwest::Method::GET, "/api/logs/health", Vec::new())
                .await;
            let seen = health["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["node"] == node && r["state"] == state));
            if seen {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{node} never {state} in {}: {health}",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs the `geolog` CLI with `args` against the cluster in `data_dir`.
pub fn geolog(data_dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(geolog_launcher::cluster::default_bin_dir().join("geolog"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("the geolog binary runs")
}

/// Its standard output and error, for assertions and their messages.
pub fn printed(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
