//! One quorum call over the replicas of one key: the calls it makes (to
//! local replicas, and to remote regions through their coordinators),
//! counted in an [`AckTracker`] until the requirement is met, cannot be
//! met any more, or the deadline passes. The paths that ask replicas of a
//! key for something — a read, a history page, an idempotent retry's
//! delivery — drive one of these instead of each counting answers in a
//! loop of its own. (A batch write counts many records' trackers against
//! per-destination calls: `fanout`.)

use super::calls::Miss;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use geolog_core::{AckTracker, GeologError};
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// A replica's answer: its index in the placement, what it answered, and
/// whether it settles one of the answers awaited (a remote region reports
/// a replica that failed and then asks another in its place: that report
/// does not settle; see `calls::region_replies`). A reply for index
/// `usize::MAX` settles an awaited answer without naming a replica.
pub(super) type Reply<T> = (usize, Result<T, Miss>, bool);

/// What [`QuorumCall::next`] brings.
pub(super) enum Next<T> {
    /// A replica's answer, already counted in the tracker (an answer of a
    /// replica that answered before is not brought again).
    Answer(usize, Result<T, Miss>),
    /// The time given to `next` came (for a speculative extra call).
    Wake,
    /// Nothing more will come in time: the deadline passed, or every
    /// answer awaited came.
    Done,
}

pub(super) struct QuorumCall<T> {
    tracker: AckTracker,
    /// The deadline's timer, and the caller's wake-up's: each armed once
    /// per call, not once per answer awaited.
    deadline: Pin<Box<Sleep>>,
    wake: Option<(Instant, Pin<Box<Sleep>>)>,
    /// Calls polled by the caller's task (no task each: a read's replica
    /// calls are batched per node anyway).
    polled: FuturesUnordered<BoxFuture<'static, Reply<T>>>,
    /// Answers of calls run in tasks of their own (they go on past the
    /// deadline, so a hung replica still gets marked dead by its breaker).
    tx: mpsc::UnboundedSender<Reply<T>>,
    rx: mpsc::UnboundedReceiver<Reply<T>>,
    /// Answers awaited.
    awaited: usize,
}

impl<T: Send + 'static> QuorumCall<T> {
    /// A call counted by `tracker` (answers already known may be recorded
    /// in it), ending at `deadline`.
    pub fn new(tracker: AckTracker, deadline: Instant) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        QuorumCall {
            tracker,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            wake: None,
            polled: FuturesUnordered::new(),
            tx,
            rx,
            awaited: 0,
        }
    }

    /// Asks replica `idx`, in the caller's task.
    pub fn ask(
        &mut self,
        idx: usize,
        call: impl Future<Output = Result<T, Miss>> + Send + 'static,
    ) {
        self.awaited += 1;
        self.polled
            .push(Box::pin(async move { (idx, call.await, true) }));
    }

    /// Asks replica `idx` in a task of its own, which finishes even if the
    /// quorum call ends first.
    pub fn spawn(
        &mut self,
        idx: usize,
        call: impl Future<Output = Result<T, Miss>> + Send + 'static,
    ) {
        self.spawn_many(1, async move { vec![(idx, call.await, true)] });
    }

    /// Asks for `awaited` answers at once (a remote region's replicas,
    /// through its coordinator), in a task of its own.
    pub fn spawn_many(
        &mut self,
        awaited: usize,
        call: impl Future<Output = Vec<Reply<T>>> + Send + 'static,
    ) {
        self.awaited += awaited;
        let tx = self.tx.clone();
        crate::spawn_traced(async move {
            for reply in call.await {
                let _ = tx.send(reply);
            }
        });
    }

    /// The next answer, counted; [`Next::Wake`] at `wake` if given and
    /// nothing came before; [`Next::Done`] once nothing more can come in
    /// time.
    pub async fn next(&mut self, wake: Option<Instant>) -> Next<T> {
        match (wake, &self.wake) {
            (Some(at), Some((armed, _))) if *armed == at => {}
            (Some(at), _) => self.wake = Some((at, Box::pin(tokio::time::sleep_until(at)))),
            (None, _) => self.wake = None,
        }
        loop {
            if self.awaited == 0 {
                return Next::Done;
            }
            let armed = self.wake.is_some();
            let waking = self.wake.as_mut().map(|(_, timer)| timer.as_mut());
            let (idx, result, settles) = tokio::select! {
                Some(reply) = self.polled.next(), if !self.polled.is_empty() => reply,
                Some(reply) = self.rx.recv() => reply,
                _ = self.deadline.as_mut() => return Next::Done,
                _ = async { waking.expect("armed").await }, if armed => {
                    self.wake = None;
                    return Next::Wake;
                }
            };
            self.awaited -= usize::from(settles);
            if idx == usize::MAX {
                continue;
            }
            match &result {
                Ok(_) if self.tracker.answered(idx) => continue,
                Ok(_) => self.tracker.record_ok(idx),
                Err(miss) => miss.record(&mut self.tracker, idx),
            }
            return Next::Answer(idx, result);
        }
    }

    pub fn is_met(&self) -> bool {
        self.tracker.is_met()
    }

    /// True when the requirement cannot be met any more, or no answer is
    /// awaited that could meet it.
    pub fn cannot_be_met(&self) -> bool {
        self.tracker.is_impossible() || (self.awaited == 0 && !self.tracker.is_met())
    }

    pub fn tracker(&self) -> &AckTracker {
        &self.tracker
    }

    /// The error of a call that ended unmet (`what`: "read" or "write").
    pub fn failure(&self, what: &str) -> GeologError {
        self.tracker.failure(what)
    }

    pub fn into_tracker(self) -> AckTracker {
        self.tracker
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolog_core::ConsistencyLevel;
    use geolog_core::consistency::Operation;
    use geolog_core::ring::Placement;
    use std::sync::Arc;
    use std::time::Duration;

    /// A quorum read (2 of 3) of three replicas in region a.
    fn quorum_call(deadline: Instant) -> QuorumCall<u32> {
        let requirement = ConsistencyLevel::Quorum
            .requirement(Operation::Read, &[("a", 3)], "a")
            .expect("a level that fits");
        let placement = (1..=3)
            .map(|i| Placement {
                region: "a".into(),
                node: format!("a{i}"),
            })
            .collect();
        QuorumCall::new(
            AckTracker::new(Arc::new(requirement), Arc::new(placement)),
            deadline,
        )
    }

    fn answered(next: Next<u32>) -> (usize, Result<u32, Miss>) {
        match next {
            Next::Answer(idx, result) => (idx, result),
            Next::Wake => panic!("woke instead of an answer"),
            Next::Done => panic!("done instead of an answer"),
        }
    }

    #[tokio::test]
    async fn answers_are_counted_once_until_met_or_out_of_answers() {
        let mut call = quorum_call(Instant::now() + Duration::from_secs(5));
        call.ask(0, async { Err(Miss::Failed("down".into())) });
        let (idx, result) = answered(call.next(None).await);
        assert_eq!((idx, result.is_err()), (0, true));
        assert!(!call.is_met() && call.cannot_be_met(), "nothing awaited");

        // A region's replies: one replica twice (counted once), one
        // answer that settles without naming a replica.
        call.spawn_many(3, async {
            vec![
                (1, Ok(1), true),
                (1, Ok(1), true),
                (usize::MAX, Err(Miss::TimedOut), true),
            ]
        });
        assert_eq!(answered(call.next(None).await).0, 1);
        assert!(matches!(call.next(None).await, Next::Done), "all settled");
        assert!(!call.is_met());

        call.spawn(2, async { Ok(2) });
        assert_eq!(answered(call.next(None).await).0, 2);
        assert!(call.is_met());
        assert_eq!(call.tracker().received(), 2);
    }

    #[tokio::test]
    async fn a_slow_call_wakes_the_caller_then_the_deadline_ends_it() {
        let start = Instant::now();
        let mut call = quorum_call(start + Duration::from_millis(200));
        call.ask(0, std::future::pending());
        let wake = start + Duration::from_millis(20);
        assert!(matches!(call.next(Some(wake)).await, Next::Wake));
        assert!(Instant::now() >= wake);
        assert!(matches!(call.next(None).await, Next::Done));
        assert!(Instant::now() >= start + Duration::from_millis(200));
        assert_eq!(
            call.failure("read").code,
            geolog_core::ErrorCode::Timeout,
            "no replica failed: the deadline passed"
        );
    }
}
