//! Group commit on the write path. Every destination a write touches — the
//! gateway's calls to its coordinators, a coordinator's to a local replica
//! (mint, apply, outbox cleanup) or a remote region (replicate) — has a
//! [`Batcher`]: callers queue one item each and await its answer; a worker
//! sends whatever is queued as one call (one gRPC message; on a storage
//! node, one PostgreSQL transaction), with at most `in_flight` calls
//! outstanding per destination. Nothing waits for a batch
//! to fill: an idle destination sends a lone item at once, a busy one
//! gathers the items that arrive while its calls are in flight, so batches
//! grow with the load and per-record round trips and commits shrink.
//!
//! Every queue is bounded, by records and by time: past `max_waiting`
//! records waiting for a call, or while the last batch's oldest item had
//! waited longer than `max_wait` (a standing queue: the destination takes
//! less than it is given), a new item is refused at once with
//! `RESOURCE_EXHAUSTED`. The caller answers `503 overloaded` with
//! `Retry-After`, or leaves the copy to a durable path (a hint, the
//! outbox). Nothing queues in memory without end, and no work is spent on
//! records whose callers have given up waiting: under twice its capacity
//! a destination that queued everything spent its time on requests
//! already timed out.

use geolog_core::{ErrorCode, GeologError};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{Instrument, Span};

type Reply<O> = oneshot::Sender<Result<O, tonic::Status>>;

/// A queued item, its caller's answer channel and span (the batch's trace
/// continues the callers'), counted in its destination's backlog until it
/// is answered.
type Queued<I, O> = (I, Reply<O>, Span, Counted);

/// How big a batch may grow and how many may be outstanding.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_items: usize,
    /// Payload bytes per batch (a lone larger item still goes alone).
    pub max_bytes: usize,
    pub in_flight: usize,
    /// Records (a list item counts its length) waiting for a call, at
    /// most; more are refused. A lone item is always taken.
    pub max_waiting: usize,
    /// Longest wait for a call before new items are refused.
    pub max_wait: std::time::Duration,
}

/// Queues items for one destination and sends them in batches.
pub struct Batcher<I, O> {
    queue: mpsc::UnboundedSender<Queued<I, O>>,
    /// `write_queue_items{kind, to}`: items queued or in a call, not yet
    /// answered (whether or not their callers still wait) — this
    /// destination's backlog.
    backlog: metrics::Gauge,
    /// Records queued and not yet taken into a call, and their bound.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    /// How long the oldest item of the last batch taken had waited (µs),
    /// and the bound.
    waited_us: Arc<AtomicU64>,
    max_wait_us: u64,
    /// How many records an item is.
    records: fn(&I) -> usize,
    /// `write_queue_refused_total{kind, to}`.
    refused: metrics::Counter,
    kind: &'static str,
    to: Arc<str>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the worker (on the current tokio runtime). `send` delivers
    /// one batch and answers one output per item, in order, or one error
    /// for the whole batch. `kind` labels the batch-size metric; `kind` and
    /// `to` (the destination: a node or region) name each batch's span.
    pub fn new<W, F, Fut>(
        kind: &'static str,
        to: &str,
        limits: BatchLimits,
        weigh: W,
        send: F,
    ) -> Self
    where
        W: Fn(&I) -> usize + Send + 'static,
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, tonic::Status>> + Send + 'static,
    {
        Self::counting(kind, to, limits, |_| 1, weigh, send)
    }

    /// [`Batcher::new`] for items that are `records(item)` records each.
    fn counting<W, F, Fut>(
        kind: &'static str,
        to: &str,
        limits: BatchLimits,
        records: fn(&I) -> usize,
        weigh: W,
        send: F,
    ) -> Self
    where
        W: Fn(&I) -> usize + Send + 'static,
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, tonic::Status>> + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        let to: Arc<str> = to.into();
        let backlog = metrics::gauge!("write_queue_items", "kind" => kind, "to" => to.to_string());
        let refused =
            metrics::counter!("write_queue_refused_total", "kind" => kind, "to" => to.to_string());
        let waited_us = Arc::new(AtomicU64::new(0));
        let worker = run(
            kind,
            to.clone(),
            limits,
            waited_us.clone(),
            weigh,
            Arc::new(send),
            rx,
        );
        tokio::spawn(worker);
        Batcher {
            queue,
            backlog,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: limits.max_waiting,
            waited_us,
            max_wait_us: limits.max_wait.as_micros() as u64,
            records,
            refused,
            kind,
            to,
        }
    }
}

impl<T: Send + 'static, O: Clone + Send + 'static> Batcher<Vec<T>, O> {
    /// A batcher whose items are lists sent as one list in one call, every
    /// caller getting that call's answer.
    pub fn merging<F, Fut>(
        kind: &'static str,
        to: &str,
        limits: BatchLimits,
        weigh: fn(&[T]) -> usize,
        send: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, tonic::Status>> + Send + 'static,
    {
        let weigh = move |list: &Vec<T>| weigh(list);
        let records = |list: &Vec<T>| list.len();
        Batcher::counting(
            kind,
            to,
            limits,
            records,
            weigh,
            move |lists: Vec<Vec<T>>| {
                let count = lists.len();
                let call = send(lists.into_iter().flatten().collect());
                async move {
                    let answer = call.await?;
                    Ok(vec![answer; count])
                }
            },
        )
    }
}

impl<T: Send + 'static, O: Send + 'static> Batcher<Vec<T>, Vec<O>> {
    /// A batcher whose items are lists sent as one list in one call that
    /// answers one output per element, in order: every caller gets the
    /// outputs of its own list's elements.
    pub fn splitting<F, Fut>(
        kind: &'static str,
        to: &str,
        limits: BatchLimits,
        weigh: fn(&[T]) -> usize,
        send: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, tonic::Status>> + Send + 'static,
    {
        let weigh = move |list: &Vec<T>| weigh(list);
        let records = |list: &Vec<T>| list.len();
        Batcher::counting(
            kind,
            to,
            limits,
            records,
            weigh,
            move |lists: Vec<Vec<T>>| {
                let lengths: Vec<usize> = lists.iter().map(Vec::len).collect();
                let call = send(lists.into_iter().flatten().collect());
                async move {
                    let outputs = call.await?;
                    let total: usize = lengths.iter().sum();
                    if outputs.len() != total {
                        return Err(tonic::Status::internal(format!(
                            "a {kind} call of {total} elements got {} answers",
                            outputs.len()
                        )));
                    }
                    let mut outputs = outputs.into_iter();
                    Ok(lengths
                        .into_iter()
                        .map(|n| outputs.by_ref().take(n).collect())
                        .collect())
                }
            },
        )
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Queues `item` and waits for its answer.
    pub async fn call(&self, item: I) -> Result<O, tonic::Status> {
        self.enqueue(item).await
    }

    /// Queues `item` now (items queued one after the other are sent in
    /// that order) and returns the wait for its answer; or refuses it at
    /// once, `RESOURCE_EXHAUSTED`, when the queue is full.
    pub fn enqueue(
        &self,
        item: I,
    ) -> impl Future<Output = Result<O, tonic::Status>> + Send + 'static + use<I, O> {
        let refusal = self.admit((self.records)(&item));
        self.push(item, refusal.as_ref())
    }

    /// [`Batcher::enqueue`] for items that belong together (the records of
    /// one client batch): all are queued, in order, or all refused — the
    /// bound is checked once, for their records together.
    pub fn enqueue_all(
        &self,
        items: Vec<I>,
    ) -> Vec<impl Future<Output = Result<O, tonic::Status>> + Send + 'static + use<I, O>> {
        let refusal = self.admit(items.iter().map(|item| (self.records)(item)).sum());
        items
            .into_iter()
            .map(|item| self.push(item, refusal.as_ref()))
            .collect()
    }

    /// Counts `records` as waiting, or says why the queue refuses them.
    /// Counted only if taken (never added and taken back, so a refused
    /// group cannot make a concurrent lone item look queued behind it).
    fn admit(&self, records: usize) -> Option<tonic::Status> {
        let admitted = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                self.full(waiting, records)
                    .is_none()
                    .then_some(waiting + records)
            });
        let waiting = admitted.err()?;
        self.refused.increment(records as u64);
        let why = self
            .full(waiting, records)
            .unwrap_or_else(|| "it filled up".to_string());
        // With the error's details, so that nothing else that answers
        // RESOURCE_EXHAUSTED (an HTTP/2 peer calming its client) reads as
        // an overload: a refused record was certainly not written.
        Some(
            GeologError::new(
                ErrorCode::Overloaded,
                format!(
                    "overloaded: the {} queue to {} is full ({why}); retry later",
                    self.kind, self.to
                ),
            )
            .to_status(),
        )
    }

    /// Queues an admitted item (its records already counted as waiting;
    /// the worker uncounts them when it takes it), or answers `refusal`.
    fn push(
        &self,
        item: I,
        refusal: Option<&tonic::Status>,
    ) -> impl Future<Output = Result<O, tonic::Status>> + Send + 'static + use<I, O> {
        let (reply, answer) = oneshot::channel();
        let queued = match refusal {
            Some(status) => Err(status.clone()),
            None => {
                let counted = Counted::new(&self.backlog, (self.records)(&item), &self.waiting);
                self.queue
                    .send((item, reply, Span::current(), counted))
                    .map_err(|_| tonic::Status::unavailable("the batcher has stopped"))
            }
        };
        async move {
            queued?;
            answer
                .await
                .unwrap_or_else(|_| Err(tonic::Status::internal("a batch was dropped unanswered")))
        }
    }
}

impl<I, O> Batcher<I, O> {
    /// Why `records` more cannot wait behind `waiting` ones, if they cannot.
    fn full(&self, waiting: usize, records: usize) -> Option<String> {
        if waiting == 0 {
            return None;
        }
        let waited_us = self.waited_us.load(Ordering::Acquire);
        if waiting + records > self.max_waiting {
            Some(format!(
                "{waiting} records waiting, at most {}",
                self.max_waiting
            ))
        } else if waited_us > self.max_wait_us {
            Some(format!(
                "its last batch had waited {} ms, at most {}",
                waited_us / 1000,
                self.max_wait_us / 1000
            ))
        } else {
            None
        }
    }

    /// Whether an item of `records` records would be refused now.
    pub fn is_full(&self, records: usize) -> bool {
        self.full(self.waiting.load(Ordering::Acquire), records)
            .is_some()
    }
}

/// One item in a backlog gauge while it lives, and its records in the
/// waiting count until a call takes it.
struct Counted {
    backlog: metrics::Gauge,
    records: usize,
    waiting: Option<Arc<AtomicUsize>>,
    queued_at: Instant,
}

impl Counted {
    fn new(backlog: &metrics::Gauge, records: usize, waiting: &Arc<AtomicUsize>) -> Self {
        backlog.increment(1.0);
        Counted {
            backlog: backlog.clone(),
            records,
            waiting: Some(waiting.clone()),
            queued_at: Instant::now(),
        }
    }

    /// Taken into a call: no longer waiting.
    fn taken(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            waiting.fetch_sub(self.records, Ordering::AcqRel);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.taken();
        self.backlog.decrement(1.0);
    }
}

async fn run<I, O, W, F, Fut>(
    kind: &'static str,
    to: Arc<str>,
    limits: BatchLimits,
    waited_us: Arc<AtomicU64>,
    weigh: W,
    send: Arc<F>,
    mut queue: mpsc::UnboundedReceiver<Queued<I, O>>,
) where
    I: Send + 'static,
    O: Send + 'static,
    W: Fn(&I) -> usize,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<O>, tonic::Status>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    let mut carried = None;
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let first = match carried.take() {
            Some(item) => item,
            None if queue.is_empty() => {
                // Idle with a free slot: no queue stands, whatever the
                // last batch had waited.
                waited_us.store(0, Ordering::Release);
                match queue.recv().await {
                    Some(item) => item,
                    None => return,
                }
            }
            None => match queue.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        // How long the queue's oldest item waited: a standing queue when
        // it keeps exceeding `max_wait` (see `Batcher::full`).
        let waited = first.3.queued_at.elapsed().as_micros() as u64;
        waited_us.store(waited, Ordering::Release);
        let mut bytes = weigh(&first.0);
        let mut batch = vec![first];
        while batch.len() < limits.max_items.max(1) {
            let Ok(item) = queue.try_recv() else { break };
            let weight = weigh(&item.0);
            if bytes + weight > limits.max_bytes {
                carried = Some(item);
                break;
            }
            bytes += weight;
            batch.push(item);
        }
        for (.., counted) in &mut batch {
            counted.taken();
        }
        metrics::histogram!("write_batch_records", "kind" => kind).record(batch.len() as f64);
        let send = send.clone();
        let to = to.clone();
        tokio::spawn(async move {
            let count = batch.len();
            let mut items = Vec::with_capacity(count);
            let mut replies = Vec::with_capacity(count);
            let mut callers = Vec::with_capacity(count);
            let mut counted = Vec::with_capacity(count);
            for (item, reply, caller, item_counted) in batch {
                items.push(item);
                replies.push(reply);
                callers.push(caller);
                counted.push(item_counted);
            }
            let span = geolog_telemetry::trace::batch_span(kind, &to, &callers);
            drop(callers);
            match send(items).instrument(span).await {
                Ok(outputs) if outputs.len() == count => {
                    for (reply, output) in replies.into_iter().zip(outputs) {
                        let _ = reply.send(Ok(output));
                    }
                }
                Ok(outputs) => {
                    let status = tonic::Status::internal(format!(
                        "a {kind} batch of {count} records got {} answers",
                        outputs.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
            drop(counted);
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn limits(max_items: usize, max_bytes: usize, in_flight: usize) -> BatchLimits {
        BatchLimits {
            max_items,
            max_bytes,
            in_flight,
            max_waiting: 1 << 20,
            max_wait: Duration::from_secs(60),
        }
    }

    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A batcher whose calls take 20 ms and record each batch's items.
    fn recording(limits: BatchLimits, fail_on: Option<u32>) -> (Arc<Batcher<u32, u32>>, Batches) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let batcher = Batcher::new(
            "test",
            "node",
            limits,
            |_| 10,
            move |items: Vec<u32>| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    log.lock().unwrap().push(items.clone());
                    if fail_on.is_some_and(|f| items.contains(&f)) {
                        return Err(tonic::Status::unavailable("down"));
                    }
                    Ok(items.iter().map(|i| i * 2).collect())
                }
            },
        );
        (Arc::new(batcher), seen)
    }

    #[tokio::test]
    async fn concurrent_items_share_calls_and_get_their_own_answers() {
        let (batcher, seen) = recording(limits(64, 1 << 20, 1), None);
        let calls: Vec<_> = (0..200u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer.unwrap(), i * 2);
        }
        let batches = seen.lock().unwrap();
        assert!(
            batches.len() < 200 / 4,
            "{} batches for 200 items",
            batches.len()
        );
        assert!(batches.iter().all(|b| b.len() <= 64));
        let mut all: Vec<u32> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_lone_item_is_sent_at_once() {
        let (batcher, seen) = recording(limits(64, 1 << 20, 2), None);
        assert_eq!(batcher.call(7).await.unwrap(), 14);
        assert_eq!(*seen.lock().unwrap(), vec![vec![7]]);
    }

    #[tokio::test]
    async fn byte_limit_splits_batches_and_failures_reach_every_item_of_theirs() {
        // 10 bytes per item, 30 per batch: at most 3 items per call.
        let (batcher, seen) = recording(limits(64, 30, 1), Some(5));
        let calls: Vec<_> = (0..12u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        let mut failed = Vec::new();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            if answer.is_err() {
                failed.push(i);
            }
        }
        let batches = seen.lock().unwrap();
        assert!(batches.iter().all(|b| b.len() <= 3));
        let with_five = batches.iter().find(|b| b.contains(&5)).unwrap();
        failed.sort();
        let mut expected = with_five.clone();
        expected.sort();
        assert_eq!(failed, expected);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_takes_items_again_once_it_drains() {
        // One call in flight (20 ms each), at most 4 items waiting behind it.
        let (batcher, seen) = recording(
            BatchLimits {
                max_waiting: 4,
                ..limits(2, 1 << 20, 1)
            },
            None,
        );
        let first = batcher.enqueue(0);
        tokio::task::yield_now().await;
        // The worker took item 0 into a call; four more may wait, the rest are refused.
        let queued: Vec<_> = (1..=10u32).map(|i| (i, batcher.enqueue(i))).collect();
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for (i, answer) in queued {
            match answer.await {
                Ok(doubled) => {
                    assert_eq!(doubled, i * 2);
                    accepted.push(i);
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                    assert!(status.message().contains("overloaded"), "{status:?}");
                    refused.push(i);
                }
            }
        }
        assert_eq!(first.await.unwrap(), 0);
        assert_eq!(accepted, vec![1, 2, 3, 4]);
        assert_eq!(refused, (5..=10).collect::<Vec<_>>());
        // Refused items were never sent; once drained, the queue takes items again.
        assert!(seen.lock().unwrap().iter().flatten().all(|i| *i <= 4));
        assert_eq!(batcher.call(11).await.unwrap(), 22);
    }

    #[tokio::test]
    async fn a_list_counts_its_records_and_a_lone_large_one_still_goes() {
        let sent = Arc::new(Mutex::new(0usize));
        let log = sent.clone();
        let batcher = Arc::new(Batcher::merging(
            "test",
            "node",
            BatchLimits {
                max_waiting: 8,
                ..limits(64, 1 << 20, 1)
            },
            |list: &[u32]| list.len(),
            move |items: Vec<u32>| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *log.lock().unwrap() += items.len();
                    Ok(())
                }
            },
        ));
        // Larger than the bound, but alone: taken.
        let lone = batcher.enqueue((0..20).collect());
        tokio::task::yield_now().await;
        let six = batcher.enqueue((0..6).collect());
        let three = batcher.enqueue((0..3).collect());
        assert!(lone.await.is_ok());
        assert!(six.await.is_ok());
        assert_eq!(
            three.await.unwrap_err().code(),
            tonic::Code::ResourceExhausted,
            "6 + 3 records exceed the 8 that may wait"
        );
        assert_eq!(*sent.lock().unwrap(), 26);
    }

    #[tokio::test]
    async fn a_standing_queue_refuses_new_items_until_it_has_drained() {
        // Calls take 20 ms; an item may wait 5 ms at most.
        let (batcher, _) = recording(
            BatchLimits {
                max_wait: Duration::from_millis(5),
                ..limits(1, 1 << 20, 1)
            },
            None,
        );
        let first = batcher.enqueue(0);
        tokio::task::yield_now().await;
        // Waits ~20 ms behind the first call: the queue stands.
        let second = batcher.enqueue(1);
        assert_eq!(first.await.unwrap(), 0);
        tokio::task::yield_now().await;
        assert!(!batcher.is_full(1), "nothing waits: a lone item is taken");
        let third = batcher.enqueue(2);
        assert!(batcher.is_full(1));
        let refused = batcher.enqueue(3).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("had waited"), "{refused:?}");
        assert_eq!(second.await.unwrap(), 2);
        assert_eq!(third.await.unwrap(), 4);
        // Drained: taken again; idle, the old wait no longer refuses even
        // with an item waiting behind one in a call.
        assert_eq!(batcher.call(4).await.unwrap(), 8);
        let in_call = batcher.enqueue(5);
        tokio::task::yield_now().await;
        let waiting = batcher.enqueue(6);
        assert!(!batcher.is_full(1), "the last batch went at once");
        assert_eq!(in_call.await.unwrap(), 10);
        assert_eq!(waiting.await.unwrap(), 12);
    }

    #[tokio::test]
    async fn items_queued_together_are_all_taken_or_all_refused() {
        let (batcher, seen) = recording(
            BatchLimits {
                max_waiting: 4,
                ..limits(64, 1 << 20, 1)
            },
            None,
        );
        let first = batcher.enqueue(0);
        tokio::task::yield_now().await;
        let three = batcher.enqueue_all(vec![1, 2, 3]);
        // 3 + 2 records exceed the 4 that may wait: both refused, none sent.
        for refused in batcher.enqueue_all(vec![4, 5]) {
            assert_eq!(
                refused.await.unwrap_err().code(),
                tonic::Code::ResourceExhausted
            );
        }
        assert_eq!(first.await.unwrap(), 0);
        for (answer, i) in three.into_iter().zip(1..) {
            assert_eq!(answer.await.unwrap(), i * 2);
        }
        // Nothing waits: a group larger than the bound is taken whole.
        let ten = batcher.enqueue_all((10..20).collect());
        for (answer, i) in ten.into_iter().zip(10..) {
            assert_eq!(answer.await.unwrap(), i * 2);
        }
        let sent: Vec<u32> = seen.lock().unwrap().iter().flatten().copied().collect();
        assert!(!sent.contains(&4) && !sent.contains(&5), "{sent:?}");
        assert_eq!(sent.len(), 14);
    }

    #[tokio::test]
    async fn split_lists_share_a_call_and_each_gets_its_own_outputs() {
        let calls = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let log = calls.clone();
        let batcher = Arc::new(Batcher::splitting(
            "test",
            "node",
            limits(64, 1 << 20, 1),
            |list: &[u32]| list.len(),
            move |items: Vec<u32>| {
                log.lock().unwrap().push(items.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(items.iter().map(|i| i * 10).collect())
                }
            },
        ));
        let first = batcher.enqueue(vec![1]);
        tokio::task::yield_now().await;
        // Both wait behind the first call and go in one call together.
        let (two, three) = (batcher.enqueue(vec![2, 3]), batcher.enqueue(vec![4, 5, 6]));
        let empty = batcher.enqueue(Vec::new());
        assert_eq!(first.await.unwrap(), vec![10]);
        assert_eq!(two.await.unwrap(), vec![20, 30]);
        assert_eq!(three.await.unwrap(), vec![40, 50, 60]);
        assert_eq!(empty.await.unwrap(), Vec::<u32>::new());
        assert_eq!(*calls.lock().unwrap(), vec![vec![1], vec![2, 3, 4, 5, 6]]);
    }

    #[tokio::test]
    async fn a_split_call_answering_the_wrong_count_fails_every_list_of_it() {
        let batcher = Batcher::splitting(
            "test",
            "node",
            limits(64, 1 << 20, 1),
            |list: &[u32]| list.len(),
            |items: Vec<u32>| async move { Ok(items.into_iter().skip(1).collect::<Vec<u32>>()) },
        );
        let status = batcher.call(vec![1, 2]).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
