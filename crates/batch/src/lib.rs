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

use std::future::Future;
use std::sync::Arc;
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
}

/// Queues items for one destination and sends them in batches.
pub struct Batcher<I, O> {
    queue: mpsc::UnboundedSender<Queued<I, O>>,
    /// `write_queue_items{kind, to}`: items queued or in a call, not yet
    /// answered (whether or not their callers still wait) — this
    /// destination's backlog.
    backlog: metrics::Gauge,
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
        let (queue, rx) = mpsc::unbounded_channel();
        let backlog = metrics::gauge!("write_queue_items", "kind" => kind, "to" => to.to_string());
        tokio::spawn(run(kind, to.into(), limits, weigh, Arc::new(send), rx));
        Batcher { queue, backlog }
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
        Batcher::new(kind, to, limits, weigh, move |lists: Vec<Vec<T>>| {
            let count = lists.len();
            let call = send(lists.into_iter().flatten().collect());
            async move {
                let answer = call.await?;
                Ok(vec![answer; count])
            }
        })
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Queues `item` and waits for its answer.
    pub async fn call(&self, item: I) -> Result<O, tonic::Status> {
        self.enqueue(item).await
    }

    /// Queues `item` now (items queued one after the other are sent in
    /// that order) and returns the wait for its answer.
    pub fn enqueue(
        &self,
        item: I,
    ) -> impl Future<Output = Result<O, tonic::Status>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let counted = Counted::new(&self.backlog);
        let queued = self.queue.send((item, reply, Span::current(), counted));
        async move {
            queued.map_err(|_| tonic::Status::unavailable("the batcher has stopped"))?;
            answer
                .await
                .unwrap_or_else(|_| Err(tonic::Status::internal("a batch was dropped unanswered")))
        }
    }
}

/// One item in a backlog gauge while it lives.
struct Counted(metrics::Gauge);

impl Counted {
    fn new(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

async fn run<I, O, W, F, Fut>(
    kind: &'static str,
    to: Arc<str>,
    limits: BatchLimits,
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
            None => match queue.recv().await {
                Some(item) => item,
                None => return,
            },
        };
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
}
