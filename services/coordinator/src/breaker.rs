//! A circuit breaker as a tower layer around one replica's gRPC channel.
//!
//! Transport failures (connection refused, reset) open the circuit: while
//! open, calls fail at once instead of waiting, so a dead node costs no
//! latency once detected. A call that hits the per-replica timeout only
//! makes the replica suspect: slow is not dead. The prober checks it at
//! once, and only if that health check times out too — or once
//! [`CALL_TIMEOUTS_TO_DEAD`] calls in a row timed out with none answered —
//! is it marked dead: a busy replica that takes long over a big batch
//! keeps its place. Application errors (a gRPC status sent by the node)
//! are answers, not failures of the link, and leave the circuit alone. The
//! health prober closes the circuit when the node answers again; the open
//! state also expires by itself (see [`HealthBoard`]) so a stalled prober
//! cannot keep a node out forever.

use geolog_proto::coordinator as cpb;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{BoxError, Layer, Service};

/// Why a call was rejected without being sent.
#[derive(Debug)]
pub struct CircuitOpen {
    pub node: Arc<str>,
}

impl std::fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "replica {} is marked dead (circuit open)", self.node)
    }
}

impl std::error::Error for CircuitOpen {}

/// What the coordinator believes about every replica. Open circuits are
/// entries of a moka cache whose time-to-live is the open duration: an
/// entry that nobody refreshes expires, which half-opens the circuit.
pub struct HealthBoard {
    open: moka::sync::Cache<Arc<str>, String>,
    started: Instant,
    /// Asks the prober to check the replicas now (a call timed out).
    probe_now: tokio::sync::Notify,
}

impl HealthBoard {
    pub fn new(open_for: Duration) -> Arc<Self> {
        Arc::new(HealthBoard {
            open: moka::sync::Cache::builder()
                .time_to_live(open_for)
                .max_capacity(100_000)
                .build(),
            started: Instant::now(),
            probe_now: tokio::sync::Notify::new(),
        })
    }

    /// Resolves when a replica's call timed out and it should be checked.
    pub async fn probe_requested(&self) {
        self.probe_now.notified().await;
    }

    pub fn is_open(&self, node: &str) -> bool {
        self.open.contains_key(node)
    }

    pub fn open(&self, node: &Arc<str>, reason: String) {
        if !self.is_open(node) {
            tracing::warn!(replica = %node, %reason, "replica marked dead");
        }
        self.open.insert(node.clone(), reason);
    }

    pub fn close(&self, node: &str) {
        if self.is_open(node) {
            tracing::info!(replica = %node, "replica alive again");
            self.open.invalidate(node);
        }
    }

    pub fn last_error(&self, node: &str) -> Option<String> {
        self.open.get(node)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// How a replica looks from a coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaHealth {
    /// Answering.
    Alive,
    /// Still used, but its last probe timed out, or it failed and has not
    /// answered since its circuit half-opened.
    Suspect,
    /// Circuit open: calls fail at once until a probe succeeds.
    Dead,
}

impl From<ReplicaHealth> for cpb::ReplicaState {
    fn from(health: ReplicaHealth) -> Self {
        match health {
            ReplicaHealth::Alive => cpb::ReplicaState::Alive,
            ReplicaHealth::Suspect => cpb::ReplicaState::Suspect,
            ReplicaHealth::Dead => cpb::ReplicaState::Dead,
        }
    }
}

/// A replica's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Open expired without a success since: the next call is a trial.
    HalfOpen,
    Open,
}

impl From<Circuit> for cpb::CircuitState {
    fn from(circuit: Circuit) -> Self {
        match circuit {
            Circuit::Closed => cpb::CircuitState::Closed,
            Circuit::HalfOpen => cpb::CircuitState::HalfOpen,
            Circuit::Open => cpb::CircuitState::Open,
        }
    }
}

impl Circuit {
    /// The value of the `replica_circuit_state` gauge.
    pub fn gauge(self) -> f64 {
        match self {
            Circuit::Closed => 0.0,
            Circuit::HalfOpen => 1.0,
            Circuit::Open => 2.0,
        }
    }
}

/// Consecutive probe timeouts that mark a replica dead.
pub const PROBE_TIMEOUTS_TO_DEAD: u32 = 2;

/// Consecutive call timeouts (no success between them) that mark a
/// replica dead even while its health checks answer.
pub const CALL_TIMEOUTS_TO_DEAD: u32 = 5;

/// Per-replica state shared between the breaker and health reporting.
pub struct ReplicaState {
    pub node: Arc<str>,
    board: Arc<HealthBoard>,
    /// `HealthBoard::now_ms` of the last success, 0 when never.
    last_ok_ms: AtomicU64,
    /// `HealthBoard::now_ms` of the last failure, 0 when never.
    last_failure_ms: AtomicU64,
    /// Health probes that timed out in a row (see `record_probe_timeout`).
    probe_timeouts: std::sync::atomic::AtomicU32,
    /// A call timed out and no answer came since (see `record_call_timeout`).
    call_timed_out: std::sync::atomic::AtomicBool,
    /// Calls that timed out with no success in between.
    call_timeouts: std::sync::atomic::AtomicU32,
    last_error: Mutex<String>,
}

impl ReplicaState {
    pub fn new(node: &str, board: Arc<HealthBoard>) -> Arc<Self> {
        Arc::new(ReplicaState {
            node: node.into(),
            board,
            last_ok_ms: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            probe_timeouts: std::sync::atomic::AtomicU32::new(0),
            call_timed_out: std::sync::atomic::AtomicBool::new(false),
            call_timeouts: std::sync::atomic::AtomicU32::new(0),
            last_error: Mutex::new(String::new()),
        })
    }

    pub fn is_alive(&self) -> bool {
        !self.board.is_open(&self.node)
    }

    pub fn record_success(&self) {
        self.last_ok_ms
            .store(self.board.now_ms().max(1), Ordering::Relaxed);
        self.probe_timeouts.store(0, Ordering::Relaxed);
        self.call_timed_out.store(false, Ordering::Relaxed);
        self.board.close(&self.node);
    }

    /// A call was answered: besides [`ReplicaState::record_success`], the
    /// count of calls timed out in a row starts again (a health check that
    /// answers does not reset it: the write path may be stuck behind it).
    pub fn record_call_success(&self) {
        self.call_timeouts.store(0, Ordering::Relaxed);
        self.record_success();
    }

    /// A call hit the per-replica timeout. A busy replica may take that
    /// long over a big batch and still be well: it stays alive (suspect)
    /// and the prober checks it at once.
    pub fn record_call_timeout(&self) {
        self.call_timed_out.store(true, Ordering::Relaxed);
        // A write path stuck behind a healthy health check (a held lock, a
        // stalled disk) still gets routed around.
        if self.call_timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= CALL_TIMEOUTS_TO_DEAD {
            self.record_failure(format!("{CALL_TIMEOUTS_TO_DEAD} calls in a row timed out"));
        }
        self.board.probe_now.notify_one();
    }

    /// A health probe timed out. One slow probe is often a busy machine,
    /// not a dead node: only a second one in a row, or one right after a
    /// call timed out, marks the replica dead (a refused connection or a
    /// failed database still does at once).
    pub fn record_probe_timeout(&self) {
        let after_call = self.call_timed_out.swap(false, Ordering::Relaxed);
        let in_a_row = self.probe_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if after_call {
            self.record_failure("a call and the health check after it timed out".into());
        } else if in_a_row >= PROBE_TIMEOUTS_TO_DEAD {
            self.record_failure("health check timed out twice in a row".into());
        }
    }

    pub fn record_failure(&self, reason: String) {
        self.last_failure_ms
            .store(self.board.now_ms().max(1), Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .expect("lock is never poisoned: no panics while held") = reason.clone();
        self.board.open(&self.node, reason);
    }

    /// What health reports show: the replica's state and its circuit's.
    pub fn health(&self) -> (ReplicaHealth, Circuit) {
        if !self.is_alive() {
            return (ReplicaHealth::Dead, Circuit::Open);
        }
        let failed_since_ok =
            self.last_failure_ms.load(Ordering::Relaxed) > self.last_ok_ms.load(Ordering::Relaxed);
        if failed_since_ok {
            // The open state expired without a success since: the next
            // call is the trial.
            (ReplicaHealth::Suspect, Circuit::HalfOpen)
        } else if self.probe_timeouts.load(Ordering::Relaxed) > 0
            || self.call_timed_out.load(Ordering::Relaxed)
        {
            (ReplicaHealth::Suspect, Circuit::Closed)
        } else {
            (ReplicaHealth::Alive, Circuit::Closed)
        }
    }

    /// Milliseconds since the last success, if any.
    pub fn last_ok_ago_ms(&self) -> Option<u64> {
        match self.last_ok_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.board.now_ms().saturating_sub(at)),
        }
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .expect("lock is never poisoned: no panics while held")
            .clone()
    }
}

/// Layer producing [`CircuitBreaker`]s for one replica.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    state: Arc<ReplicaState>,
}

impl CircuitBreakerLayer {
    pub fn new(state: Arc<ReplicaState>) -> Self {
        CircuitBreakerLayer { state }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    state: Arc<ReplicaState>,
}

impl<S, Req> Service<Req> for CircuitBreaker<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if !self.state.is_alive() {
            let err = CircuitOpen {
                node: self.state.node.clone(),
            };
            return Box::pin(async move { Err(err.into()) });
        }
        let state = self.state.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            match future.await {
                Ok(response) => {
                    state.record_call_success();
                    Ok(response)
                }
                Err(err) => {
                    let err: BoxError = err.into();
                    if err.is::<tower::timeout::error::Elapsed>() {
                        state.record_call_timeout();
                    } else {
                        state.record_failure(describe(&*err));
                    }
                    Err(err)
                }
            }
        })
    }
}

/// The innermost cause of a transport error, for health reports.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text = format!("{text}: {inner}");
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> Arc<ReplicaState> {
        ReplicaState::new("a1", HealthBoard::new(Duration::from_secs(60)))
    }

    #[test]
    fn a_timed_out_call_makes_a_replica_suspect_not_dead() {
        let state = replica();
        state.record_success();
        state.record_call_timeout();
        assert!(state.is_alive(), "slow is not dead");
        assert_eq!(state.health(), (ReplicaHealth::Suspect, Circuit::Closed));
        // The check it asked for answered: busy, and well.
        state.record_success();
        assert_eq!(state.health(), (ReplicaHealth::Alive, Circuit::Closed));
    }

    #[test]
    fn a_timed_out_call_and_a_timed_out_check_after_it_mark_it_dead() {
        let state = replica();
        state.record_success();
        state.record_call_timeout();
        state.record_probe_timeout();
        assert!(!state.is_alive());
        assert_eq!(
            state.last_error(),
            "a call and the health check after it timed out"
        );
    }

    #[test]
    fn one_slow_probe_alone_is_not_enough_two_in_a_row_are() {
        let state = replica();
        state.record_success();
        state.record_probe_timeout();
        assert!(state.is_alive());
        state.record_probe_timeout();
        assert!(!state.is_alive());
    }

    #[test]
    fn calls_that_keep_timing_out_mark_it_dead_even_if_checks_answer() {
        let state = replica();
        for _ in 0..CALL_TIMEOUTS_TO_DEAD - 1 {
            state.record_call_timeout();
        }
        // The checks it asks for answer: that does not start the count again.
        state.record_success();
        assert!(state.is_alive());
        state.record_call_timeout();
        assert!(!state.is_alive());
        assert_eq!(state.last_error(), "5 calls in a row timed out");
        // An answered call does.
        let state = replica();
        for _ in 0..CALL_TIMEOUTS_TO_DEAD - 1 {
            state.record_call_timeout();
        }
        state.record_call_success();
        state.record_call_timeout();
        assert!(state.is_alive());
    }

    #[tokio::test]
    async fn a_timed_out_call_asks_the_prober_to_check_at_once() {
        let board = HealthBoard::new(Duration::from_secs(60));
        let state = ReplicaState::new("a1", board.clone());
        state.record_call_timeout();
        tokio::time::timeout(Duration::from_secs(1), board.probe_requested())
            .await
            .expect("a probe was requested");
    }
}
