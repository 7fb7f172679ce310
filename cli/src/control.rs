//! The control API `geolog up` serves on loopback so that `geolog fault …`
//! and `geolog node …`, run from another shell, can act on the processes
//! and links this launcher owns. Its URL is `control_url` in `cluster.json`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use geolog_launcher::RunningCluster;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub type SharedCluster = Arc<Mutex<RunningCluster>>;

#[derive(Serialize, Deserialize)]
pub struct Regions {
    pub a: String,
    pub b: String,
}

#[derive(Serialize, Deserialize)]
pub struct Latency {
    pub a: String,
    pub b: String,
    pub latency_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    #[serde(default)]
    pub with_postgres: bool,
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn answer(result: Result<(), geolog_launcher::LaunchError>) -> Answer {
    match result {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"ok": true}))),
        Err(err) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": err.to_string()})),
        ),
    }
}

async fn partition(State(cluster): State<SharedCluster>, Json(r): Json<Regions>) -> Answer {
    answer(cluster.lock().await.partition(&r.a, &r.b))
}

async fn heal(State(cluster): State<SharedCluster>) -> Answer {
    cluster.lock().await.heal();
    answer(Ok(()))
}

async fn latency(State(cluster): State<SharedCluster>, Json(l): Json<Latency>) -> Answer {
    answer(
        cluster
            .lock()
            .await
            .set_latency(&l.a, &l.b, Duration::from_millis(l.latency_ms)),
    )
}

async fn node_stop(State(cluster): State<SharedCluster>, Json(n): Json<Node>) -> Answer {
    let mut cluster = cluster.lock().await;
    answer(tokio::task::block_in_place(|| {
        cluster.stop_node(&n.id, n.with_postgres)
    }))
}

async fn node_start(State(cluster): State<SharedCluster>, Json(n): Json<Node>) -> Answer {
    answer(cluster.lock().await.start_node(&n.id).await)
}

async fn node_wipe(State(cluster): State<SharedCluster>, Json(n): Json<Node>) -> Answer {
    let mut cluster = cluster.lock().await;
    answer(cluster.wipe_node(&n.id).await)
}

pub fn router(cluster: SharedCluster) -> Router {
    Router::new()
        .route("/fault/partition", post(partition))
        .route("/fault/heal", post(heal))
        .route("/fault/latency", post(latency))
        .route("/node/stop", post(node_stop))
        .route("/node/start", post(node_start))
        .route("/node/wipe", post(node_wipe))
        .with_state(cluster)
}

/// Parses `80ms`, `1.5s`, `250us` or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let ms = match unit {
        "" | "ms" => value,
        "s" => value * 1000.0,
        "us" => value / 1000.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}; use ms, s or us"
            ));
        }
    };
    if !(0.0..=3_600_000.0).contains(&ms) {
        return Err(format!("duration {text:?} out of range"));
    }
    Ok(Duration::from_micros((ms * 1000.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("80ms").unwrap(), Duration::from_millis(80));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("40").unwrap(), Duration::from_millis(40));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
