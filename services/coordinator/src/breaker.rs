//! A circuit breaker as a tower layer around one replica's gRPC channel.
//!
//! Transport failures (connection refused, reset, the per-replica timeout)
//! open the circuit: while open, calls fail at once instead of waiting, so a
//! dead node costs no latency once detected. Application errors (a gRPC
//! status sent by the node) are answers, not failures of the link, and leave
//! the circuit alone. The health prober closes the circuit when the node
//! answers again; the open state also expires by itself (see
//! [`HealthBoard`]) so a stalled prober cannot keep a node out forever.

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
}

impl HealthBoard {
    pub fn new(open_for: Duration) -> Arc<Self> {
        Arc::new(HealthBoard {
            open: moka::sync::Cache::builder()
                .time_to_live(open_for)
                .max_capacity(100_000)
                .build(),
            started: Instant::now(),
        })
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

impl ReplicaHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaHealth::Alive => "alive",
            ReplicaHealth::Suspect => "suspect",
            ReplicaHealth::Dead => "dead",
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

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::HalfOpen => "half_open",
            Circuit::Open => "open",
        }
    }

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
        self.board.close(&self.node);
    }

    /// A health probe timed out. One slow probe is often a busy machine,
    /// not a dead node: only a second one in a row marks the replica dead
    /// (a refused connection or a failed database still does at once).
    pub fn record_probe_timeout(&self) {
        if self.probe_timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= PROBE_TIMEOUTS_TO_DEAD {
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
        } else if self.probe_timeouts.load(Ordering::Relaxed) > 0 {
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
                    state.record_success();
                    Ok(response)
                }
                Err(err) => {
                    let err: BoxError = err.into();
                    state.record_failure(describe(&*err));
                    Err(err)
                }
            }
        })
    }
}

/// The innermost cause of a transport error, for health reports.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    if err.is::<tower::timeout::error::Elapsed>() {
        return "replica timeout".to_string();
    }
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text = format!("{text}: {inner}");
        source = inner.source();
    }
    text
}
