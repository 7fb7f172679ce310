//! What every client request records: its span (key, level, region, acks,
//! outcome — the trace an operator follows), `coordinator_requests_total`
//! and `coordinator_request_duration_seconds` by operation, level and
//! outcome, and for writes the quorum outcome series
//! `quorum_writes_total{level, result}` and `quorum_write_success_rate{level}`.

use crate::engine::Outcome;
use geolog_core::{ErrorCode, GeologError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::Instrument;

/// An answer that carries the acks it gathered.
pub trait Acked {
    fn outcome(&self) -> &Outcome;
}

impl Acked for Outcome {
    fn outcome(&self) -> &Outcome {
        self
    }
}

impl<A, B> Acked for (A, B, Outcome) {
    fn outcome(&self) -> &Outcome {
        &self.2
    }
}

/// Runs `f` (operation `op` on `key` at `level`, coordinated in `region`)
/// inside its span and records its outcome.
pub async fn observed<T: Acked>(
    op: &'static str,
    region: &str,
    key: &str,
    level: &'static str,
    f: impl Future<Output = Result<T, GeologError>>,
) -> Result<T, GeologError> {
    let span = tracing::info_span!(
        "coordinator",
        otel.name = %format!("coordinator {op}"),
        op,
        key,
        level,
        region,
        acks = tracing::field::Empty,
        required = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let started = Instant::now();
    let result = f.instrument(span.clone()).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if e.code == ErrorCode::Unavailable => "unavailable",
        Err(e) if e.code == ErrorCode::Timeout => "timeout",
        Err(e) if e.code.http_status().is_client_error() => "rejected",
        Err(_) => "error",
    };
    span.record("outcome", outcome);
    if let Ok(answer) = &result {
        let acks = &answer.outcome().acks;
        span.record("acks", acks.received.unwrap_or(0));
        span.record("required", acks.required);
    }
    let labels = [
        ("op", op.to_string()),
        ("consistency", level.to_string()),
        ("outcome", outcome.to_string()),
    ];
    metrics::counter!("coordinator_requests_total", &labels).increment(1);
    metrics::histogram!("coordinator_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    if op == "write" {
        record_quorum_write(level, outcome);
    }
    result
}

/// Seconds of history behind `quorum_write_success_rate`.
const WINDOW_SECS: u64 = 60;

/// Per level, one slot per second of the last minute: (second, ok, all).
type Window = [(u64, u64, u64); WINDOW_SECS as usize];

static WINDOWS: LazyLock<Mutex<HashMap<&'static str, Window>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Counts a write's result and refreshes the level's success rate: the
/// share of writes at that level in the last minute that were acknowledged
/// (rejected bad input does not count against it).
fn record_quorum_write(level: &'static str, result: &'static str) {
    metrics::counter!("quorum_writes_total", "level" => level, "result" => result).increment(1);
    if result == "rejected" {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rate = {
        let mut windows = WINDOWS.lock().expect("no panics while held");
        let window = windows
            .entry(level)
            .or_insert([(0, 0, 0); WINDOW_SECS as usize]);
        success_rate(window, now, result == "ok")
    };
    metrics::gauge!("quorum_write_success_rate", "level" => level).set(rate);
}

/// Adds one write at second `now` and returns the share of successes in
/// the window.
fn success_rate(window: &mut Window, now: u64, ok: bool) -> f64 {
    let slot = &mut window[(now % WINDOW_SECS) as usize];
    if slot.0 != now {
        *slot = (now, 0, 0);
    }
    slot.1 += u64::from(ok);
    slot.2 += 1;
    let (ok, all) = window
        .iter()
        .filter(|(second, _, _)| now.saturating_sub(*second) < WINDOW_SECS)
        .fold((0, 0), |(ok, all), s| (ok + s.1, all + s.2));
    ok as f64 / all.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_only_the_last_minute() {
        let mut window = [(0, 0, 0); WINDOW_SECS as usize];
        assert_eq!(success_rate(&mut window, 1_000, false), 0.0);
        assert_eq!(success_rate(&mut window, 1_001, true), 0.5);
        assert_eq!(success_rate(&mut window, 1_030, true), 2.0 / 3.0);
        // 1,000 has left the window; 1,001 and 1,030 remain.
        assert_eq!(success_rate(&mut window, 1_060, true), 1.0);
        // The slot of 1,001 is reused by 1,061: its old counts are dropped.
        assert_eq!(success_rate(&mut window, 1_061, false), 2.0 / 3.0);
        // Nothing but the new write after a quiet minute and a half.
        assert_eq!(success_rate(&mut window, 1_200, true), 1.0);
    }
}
