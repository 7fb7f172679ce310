//! Background work in one shape (after Garage's
//! `src/util/background/worker.rs`): a [`Worker`] does one step at a time
//! and says what it does next — step again at once (busy), wait for work
//! (idle), or wait a given time (throttled). [`Workers`] runs each in its
//! own task with the same loop:
//!
//! - a step that fails is retried after a backoff that doubles, from the
//!   worker's idle period up to [`MAX_BACKOFF`], and counted;
//! - each worker's state, steps, errors and last error are kept for the
//!   process's health answer and exported as metrics
//!   (`worker_state{worker}`: 0 idle, 1 busy, 2 throttled, 3 backing off
//!   after an error, 4 dead; `worker_steps_total`, `worker_errors_total`);
//! - a step that panics kills the worker and resolves [`Workers::died`]:
//!   the process then stops as a whole (its `serve` returns an error)
//!   instead of living on half-alive;
//! - every worker stops at its next step or wait once `stop` is set.

use futures_util::FutureExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// The longest wait between retries of a failing worker.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a worker does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// More work is waiting: step again at once.
    Busy,
    /// Nothing to do: wait for the idle period or [`Worker::wake`].
    Idle,
    /// Work is waiting but must not be done before this long.
    Throttled(Duration),
}

/// A background loop, one step at a time.
pub trait Worker: Send + 'static {
    /// Its name in logs, metrics and health.
    fn name(&self) -> &str;

    /// Does one unit of work. An error is logged, counted and retried
    /// after a backoff.
    fn step(&mut self) -> impl Future<Output = Result<Next, String>> + Send;

    /// Resolves when work may have arrived while idle, before the idle
    /// period ends (default: never).
    fn wake(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// What a worker is doing, as health and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    Busy,
    Throttled,
    /// Its last step failed; it retries after a backoff.
    BackingOff,
    /// A step panicked: the worker is gone (and the process stopping).
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Busy => "busy",
            State::Throttled => "throttled",
            State::BackingOff => "backing_off",
            State::Dead => "dead",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            State::Idle => 0.0,
            State::Busy => 1.0,
            State::Throttled => 2.0,
            State::BackingOff => 3.0,
            State::Dead => 4.0,
        }
    }
}

/// One worker's status.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// Steps done, failed ones included.
    pub steps: u64,
    /// Steps failed.
    pub errors: u64,
    /// Consecutive failures of the last steps (0 once one succeeds).
    pub failing_for: u32,
    pub last_error: Option<String>,
    /// When its last step succeeded.
    pub last_success: Option<SystemTime>,
}

/// The workers of one process.
#[derive(Clone)]
pub struct Workers {
    statuses: Arc<Mutex<BTreeMap<String, Status>>>,
    /// The name of the first worker that died, once one has.
    died: Arc<watch::Sender<Option<String>>>,
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

impl Workers {
    pub fn new() -> Self {
        metrics::describe_gauge!(
            "worker_state",
            "background worker state, by worker: 0 idle, 1 busy, 2 throttled, 3 backing off after an error, 4 dead"
        );
        metrics::describe_counter!("worker_steps_total", "background worker steps, by worker");
        metrics::describe_counter!(
            "worker_errors_total",
            "background worker steps that failed, by worker"
        );
        Workers {
            statuses: Arc::default(),
            died: Arc::new(watch::channel(None).0),
        }
    }

    /// Runs `worker` in its own task until `stop` is set: idle periods last
    /// `idle`. The task ends when `stop` is set (at its next step or wait)
    /// or when a step panics.
    pub fn spawn<W: Worker>(
        &self,
        mut worker: W,
        idle: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let name = worker.name().to_string();
        let this = self.clone();
        this.set(&name, |s| s.state = State::Idle);
        tokio::spawn(async move {
            let state = metrics::gauge!("worker_state", "worker" => name.clone());
            let steps = metrics::counter!("worker_steps_total", "worker" => name.clone());
            let errors = metrics::counter!("worker_errors_total", "worker" => name.clone());
            let mut backoff = idle;
            loop {
                if *stop.borrow() {
                    return;
                }
                let stepped = AssertUnwindSafe(worker.step()).catch_unwind().await;
                steps.increment(1);
                let wait = match stepped {
                    Err(panic) => {
                        let why = panic_message(&panic);
                        tracing::error!(worker = %name, panic = %why, "background worker panicked; the process stops");
                        state.set(State::Dead.gauge());
                        this.set(&name, |s| {
                            s.state = State::Dead;
                            s.steps += 1;
                            s.errors += 1;
                            s.last_error = Some(format!("panicked: {why}"));
                        });
                        this.report_death(&name);
                        return;
                    }
                    Ok(Err(why)) => {
                        errors.increment(1);
                        let failing_for = this.set(&name, |s| {
                            s.state = State::BackingOff;
                            s.steps += 1;
                            s.errors += 1;
                            s.failing_for += 1;
                            s.last_error = Some(why.clone());
                            s.failing_for
                        });
                        tracing::warn!(worker = %name, error = %why, failing_for, retry_in_ms = backoff.as_millis() as u64, "background step failed");
                        state.set(State::BackingOff.gauge());
                        let wait = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        Some(wait)
                    }
                    Ok(Ok(next)) => {
                        backoff = idle;
                        let (now, wait) = match next {
                            Next::Busy => (State::Busy, None),
                            Next::Idle => (State::Idle, Some(idle)),
                            Next::Throttled(d) => (State::Throttled, Some(d)),
                        };
                        this.set(&name, |s| {
                            s.state = now;
                            s.steps += 1;
                            s.failing_for = 0;
                            s.last_success = Some(SystemTime::now());
                        });
                        state.set(now.gauge());
                        wait
                    }
                };
                match wait {
                    // Busy: let the other tasks run between steps.
                    None => tokio::task::yield_now().await,
                    Some(wait) => {
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = worker.wake() => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        })
    }

    /// Every worker's status, by name.
    pub fn statuses(&self) -> Vec<(String, Status)> {
        self.lock()
            .iter()
            .map(|(name, status)| (name.clone(), status.clone()))
            .collect()
    }

    /// Resolves with a worker's name once one has died (a step panicked).
    pub fn died(&self) -> impl Future<Output = String> + Send + use<> {
        let mut died = self.died.subscribe();
        async move {
            let name = died
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|name| name.clone());
            match name {
                Some(name) => name,
                // The sender is gone: no worker can die any more.
                None => std::future::pending().await,
            }
        }
    }

    /// The worker that died, if one did.
    pub fn dead(&self) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, status)| status.state == State::Dead)
            .map(|(name, _)| name.clone())
    }

    fn report_death(&self, name: &str) {
        self.died.send_replace(Some(name.to_string()));
    }

    fn set<T>(&self, name: &str, change: impl FnOnce(&mut Status) -> T) -> T {
        let mut statuses = self.lock();
        let status = statuses.entry(name.to_string()).or_insert(Status {
            state: State::Idle,
            steps: 0,
            errors: 0,
            failing_for: 0,
            last_error: None,
            last_success: None,
        });
        change(status)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Status>> {
        self.statuses
            .lock()
            .expect("lock is never poisoned: no panics while held")
    }
}

/// `shutdown`, or sooner when one of `workers` dies: a server given this
/// stops as a whole ([`Workers::dead`] then names the worker).
pub fn or_died<F: Future<Output = ()>>(
    workers: &Workers,
    shutdown: F,
) -> impl Future<Output = ()> + use<F> {
    let died = workers.died();
    async move {
        tokio::select! {
            () = shutdown => {}
            name = died => tracing::error!(worker = %name, "a background worker died: stopping"),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails its first `fail` steps, then is busy `busy` times, then idle;
    /// panics at step `panic_at` if set.
    struct Scripted {
        steps: Arc<AtomicU32>,
        fail: u32,
        busy: u32,
        panic_at: Option<u32>,
    }

    impl Worker for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }

        async fn step(&mut self) -> Result<Next, String> {
            let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
            if self.panic_at == Some(n) {
                panic!("step {n} broke");
            }
            if n <= self.fail {
                return Err(format!("step {n} failed"));
            }
            Ok(if n <= self.fail + self.busy {
                Next::Busy
            } else {
                Next::Idle
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_busy_steps_run_at_once_and_stop_ends_it() {
        let workers = Workers::new();
        let steps = Arc::new(AtomicU32::new(0));
        let (stop, stopping) = watch::channel(false);
        let worker = Scripted {
            steps: steps.clone(),
            fail: 3,
            busy: 5,
            panic_at: None,
        };
        let task = workers.spawn(worker, Duration::from_secs(1), stopping);
        // Failures wait 1 + 2 + 4 s; then 5 busy steps at once, then idle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(steps.load(Ordering::SeqCst), 1);
        let (_, status) = workers.statuses().pop().unwrap();
        assert_eq!(
            (status.state, status.errors, status.failing_for),
            (State::BackingOff, 1, 1)
        );
        assert_eq!(status.last_error.as_deref(), Some("step 1 failed"));
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(steps.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(6_100)).await;
        // Step 4 ran at 7 s; 5..=8 busy right after it; 9 idle.
        assert_eq!(steps.load(Ordering::SeqCst), 9);
        let (_, status) = workers.statuses().pop().unwrap();
        assert_eq!(
            (status.state, status.errors, status.failing_for),
            (State::Idle, 3, 0)
        );
        assert!(status.last_success.is_some());
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_step_kills_the_worker_and_is_reported() {
        let workers = Workers::new();
        let died = workers.died();
        let (_stop, stopping) = watch::channel(false);
        let worker = Scripted {
            steps: Arc::new(AtomicU32::new(0)),
            fail: 0,
            busy: 10,
            panic_at: Some(3),
        };
        workers
            .spawn(worker, Duration::from_secs(1), stopping)
            .await
            .unwrap();
        assert_eq!(died.await, "scripted");
        let (_, status) = workers.statuses().pop().unwrap();
        assert_eq!(status.state, State::Dead);
        assert!(status.last_error.unwrap().contains("step 3 broke"));
    }
}
