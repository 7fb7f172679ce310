//! What every client request records: its span (key, level, region, acks,
//! outcome — the trace an operator follows), `coordinator_requests_total`
//! and `coordinator_request_duration_seconds` by operation, level and
//! outcome, and for writes the quorum outcome series
//! `quorum_writes_total{level, result}` and `quorum_write_success_rate{level}`.

use crate::engine::{ReadValue, Written};
use geolog_core::error::QuorumDetails;
use geolog_core::{ErrorCode, GeologError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::Instrument;

/// An answer that carries the acks it gathered.
pub trait Acked {
    fn acks(&self) -> &QuorumDetails;
}

impl Acked for Written {
    fn acks(&self) -> &QuorumDetails {
        &self.acks
    }
}

impl Acked for ReadValue {
    fn acks(&self) -> &QuorumDetails {
        &self.acks
    }
}

/// A history page: versions, whether more follow, acks.
impl<A, B> Acked for (A, B, QuorumDetails) {
    fn acks(&self) -> &QuorumDetails {
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
    let outcome = outcome_of(&result);
    span.record("outcome", outcome);
    if let Ok(answer) = &result {
        let acks = answer.acks();
        span.record("acks", acks.received.unwrap_or(0));
        span.record("required", acks.required);
    }
    record_request(op, level, outcome, started, 1);
    result
}

/// [`observed`] for the records of a batch handled together (`op`:
/// `write` or `read`): one span for the batch, each record counted as
/// one `op`.
pub async fn observed_batch<T>(
    op: &'static str,
    region: &str,
    level: &'static str,
    records: usize,
    f: impl Future<Output = Vec<Result<T, GeologError>>>,
) -> Vec<Result<T, GeologError>> {
    let span = tracing::info_span!(
        "coordinator",
        otel.name = %format!("coordinator {op}_batch"),
        op = %format!("{op}_batch"),
        level,
        region,
        records,
        succeeded = tracing::field::Empty,
    );
    let started = Instant::now();
    let results = f.instrument(span.clone()).await;
    span.record("succeeded", results.iter().filter(|r| r.is_ok()).count());
    // Counted per outcome, not per record: a labelled series lookup per
    // record was an eighth of the coordinator's time on batches.
    let mut outcomes: Vec<(&'static str, u64)> = Vec::new();
    for outcome in results.iter().map(outcome_of) {
        match outcomes.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, n)) => *n += 1,
            None => outcomes.push((outcome, 1)),
        }
    }
    for (outcome, n) in outcomes {
        record_request(op, level, outcome, started, n);
    }
    results
}

fn outcome_of<T>(result: &Result<T, GeologError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) if e.code == ErrorCode::Unavailable => "unavailable",
        Err(e) if e.code == ErrorCode::Timeout => "timeout",
        Err(e) if e.code.http_status().is_client_error() => "rejected",
        Err(_) => "error",
    }
}

/// Counts `n` requests of one operation, level and outcome that took
/// since `started`.
fn record_request(
    op: &'static str,
    level: &'static str,
    outcome: &'static str,
    started: Instant,
    n: u64,
) {
    let labels = [("op", op), ("consistency", level), ("outcome", outcome)];
    metrics::counter!("coordinator_requests_total", &labels).increment(n);
    metrics::histogram!("coordinator_request_duration_seconds", &labels)
        .record_many(started.elapsed().as_secs_f64(), n as usize);
    if op == "write" {
        record_quorum_write(level, outcome, n);
    }
}

/// Describes the coordinator's metrics (`# HELP` lines) and starts the
/// series that have a fixed label set at zero, so dashboards and alerts see
/// them before the first event. `region` is this coordinator's region,
/// `local` its storage nodes, `remote` the other regions.
pub fn describe_metrics(local: &[String], remote: &[String]) {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "coordinator_requests_total",
        "client requests by op, consistency and outcome"
    );
    describe_histogram!(
        "coordinator_request_duration_seconds",
        metrics::Unit::Seconds,
        "client request latency by op, consistency and outcome"
    );
    describe_counter!(
        "quorum_writes_total",
        "writes by consistency level and result (ok, unavailable, timeout, rejected, error)"
    );
    describe_gauge!(
        "quorum_write_success_rate",
        "share of the last minute's writes at each level that were acknowledged"
    );
    describe_counter!(
        "version_vector_conflicts_total",
        "reads that found concurrent siblings"
    );
    describe_counter!("read_repairs_total", "replicas written back by read repair");
    describe_counter!(
        "speculative_reads_total",
        "reads sent to an extra replica after a slow one"
    );
    describe_counter!(
        "idempotent_replays_total",
        "writes answered from an earlier write with the same idempotency key"
    );
    describe_counter!(
        "hints_stored_total",
        "hints stored for replicas that missed a write"
    );
    describe_counter!(
        "any_writes_hinted_total",
        "ANY writes acknowledged by a stored hint only"
    );
    describe_counter!(
        "hints_replayed_total",
        "hinted versions delivered, by target replica"
    );
    describe_gauge!("hints_pending", "hints waiting, by target replica");
    describe_gauge!(
        "write_queue_items",
        "write items queued or in a call to one destination, not yet answered, by kind and destination"
    );
    describe_counter!(
        "outbox_replayed_total",
        "cross-region outbox versions delivered late, by region"
    );
    describe_gauge!(
        "outbox_depth",
        "versions minted in this region not yet delivered to a remote region, by region"
    );
    describe_gauge!(
        "outbox_oldest_age_seconds",
        "age of the oldest version not yet delivered to a remote region (replication lag)"
    );
    describe_counter!(
        "replicate_received_total",
        "versions received from other regions, by origin"
    );
    describe_gauge!(
        "replica_up",
        "1 when the replica's last health probe succeeded"
    );
    describe_gauge!(
        "replica_circuit_state",
        "circuit towards a replica: 0 closed, 1 half-open, 2 open"
    );
    describe_gauge!(
        "region_link_up",
        "1 when the other region's coordinators answered the last probe"
    );
    describe_gauge!(
        "region_link_circuit_state",
        "circuit towards a region: 0 closed, 1 half-open, 2 open"
    );
    describe_histogram!(
        "write_batch_records",
        "records per group-commit batch, by kind"
    );
    for name in [
        "version_vector_conflicts_total",
        "read_repairs_total",
        "speculative_reads_total",
        "idempotent_replays_total",
        "hints_stored_total",
        "any_writes_hinted_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for node in local {
        metrics::counter!("hints_replayed_total", "target" => node.clone()).absolute(0);
    }
    for region in remote {
        metrics::counter!("outbox_replayed_total", "region" => region.clone()).absolute(0);
    }
}

/// Seconds of history behind `quorum_write_success_rate`.
const WINDOW_SECS: u64 = 60;

/// Per level, one slot per second of the last minute: (second, ok, all).
type Window = [(u64, u64, u64); WINDOW_SECS as usize];

static WINDOWS: LazyLock<Mutex<HashMap<&'static str, Window>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Counts `n` writes of one result and refreshes the level's success rate: the
/// share of writes at that level in the last minute that were acknowledged
/// (rejected bad input does not count against it).
fn record_quorum_write(level: &'static str, result: &'static str, n: u64) {
    metrics::counter!("quorum_writes_total", "level" => level, "result" => result).increment(n);
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
        success_rate(window, now, result == "ok", n)
    };
    metrics::gauge!("quorum_write_success_rate", "level" => level).set(rate);
}

/// Adds `n` writes (all `ok` or all not) at second `now` and returns the
/// share of successes in the window.
fn success_rate(window: &mut Window, now: u64, ok: bool, n: u64) -> f64 {
    let slot = &mut window[(now % WINDOW_SECS) as usize];
    if slot.0 != now {
        *slot = (now, 0, 0);
    }
    if ok {
        slot.1 += n;
    }
    slot.2 += n;
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
        assert_eq!(success_rate(&mut window, 1_000, false, 1), 0.0);
        assert_eq!(success_rate(&mut window, 1_001, true, 1), 0.5);
        assert_eq!(success_rate(&mut window, 1_030, true, 1), 2.0 / 3.0);
        // 1,000 has left the window; 1,001 and 1,030 remain.
        assert_eq!(success_rate(&mut window, 1_060, true, 1), 1.0);
        // The slot of 1,001 is reused by 1,061: its old counts are dropped.
        assert_eq!(success_rate(&mut window, 1_061, false, 1), 2.0 / 3.0);
        // Nothing but the new write after a quiet minute and a half.
        assert_eq!(success_rate(&mut window, 1_200, true, 1), 1.0);
    }

    #[test]
    fn a_batch_counts_as_many_writes() {
        let mut window = [(0, 0, 0); WINDOW_SECS as usize];
        assert_eq!(success_rate(&mut window, 1_000, true, 3), 1.0);
        assert_eq!(success_rate(&mut window, 1_000, false, 1), 0.75);
    }
}
