//! Single writes and reads go to the coordinators coalesced: concurrent
//! `POST /api/logs` (or `GET /api/logs/{key}`) requests at the same level
//! are sent as one `WriteBatch` (`ReadBatch`) call (see [`geolog_batch`]),
//! each request answered with its own record's outcome — what a `Write`
//! (`Read`) call would have answered. A lone request is sent at once; only
//! requests that arrive while calls are in flight share one. A gRPC call
//! per request (with its inbound call, task and frames on the coordinator)
//! was most of the coordinator's time on single writes and reads; and the
//! coordinator fans a write batch out per replica, not per record.

use crate::error::ApiError;
use geolog_batch::{BatchLimits, Batcher};
use geolog_core::GeologError;
use geolog_proto::coordinator as cpb;
use geolog_proto::coordinator::coordinator_client::CoordinatorClient;
use geolog_telemetry::trace::GrpcClient;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

type Client = CoordinatorClient<GrpcClient<Channel>>;

/// What one coalesced call answers: per request, its answer or its error.
type Answers<A> = Result<Vec<Result<A, GeologError>>, tonic::Status>;

/// The batcher of one level's requests of type `R`.
type LevelBatcher<R> = Arc<Batcher<R, Result<<R as Coalesced>::Answer, GeologError>>>;

/// Requests at most per coalesced call, by bytes: well under the
/// coordinators' message limit (a larger request still goes, alone).
const MAX_CALL_BYTES: usize = 1 << 20;

/// A request the gateway may send together with others of its level.
pub trait Coalesced: Sized + Send + 'static {
    type Answer: Send + 'static;
    /// Names the batches (metrics and spans).
    const KIND: &'static str;
    /// Its consistency level on the wire (unset: the coordinators' default).
    fn level(&self) -> i32;
    /// Rough bytes, to bound a call.
    fn weight(&self) -> usize;
    /// One call carrying `requests`, all at `level`, answered in order.
    fn send(
        client: Client,
        requests: Vec<Self>,
        level: i32,
        timeout: Duration,
    ) -> impl Future<Output = Answers<Self::Answer>> + Send + 'static;
}

impl Coalesced for cpb::WriteRequest {
    type Answer = cpb::WriteResponse;
    const KIND: &'static str = "write";

    fn level(&self) -> i32 {
        self.consistency
    }

    fn weight(&self) -> usize {
        self.key.len() + self.value_json.len() + self.context.len() + 64
    }

    async fn send(
        mut client: Client,
        records: Vec<Self>,
        consistency: i32,
        timeout: Duration,
    ) -> Answers<Self::Answer> {
        // Not `together`: unrelated clients' writes, each admitted alone.
        let mut request = tonic::Request::new(cpb::WriteBatchRequest {
            records,
            consistency,
            together: false,
        });
        request.set_timeout(timeout);
        let answer = client.write_batch(request).await?.into_inner();
        Ok(answer
            .results
            .into_iter()
            .map(|result| geolog_proto::item_outcome(result.written, result.error))
            .collect())
    }
}

impl Coalesced for cpb::ReadRequest {
    type Answer = cpb::ReadResponse;
    const KIND: &'static str = "read";

    fn level(&self) -> i32 {
        self.consistency
    }

    fn weight(&self) -> usize {
        self.key.len() + 16
    }

    async fn send(
        mut client: Client,
        reads: Vec<Self>,
        consistency: i32,
        timeout: Duration,
    ) -> Answers<Self::Answer> {
        let mut request = tonic::Request::new(cpb::ReadBatchRequest { reads, consistency });
        request.set_timeout(timeout);
        let answer = client.read_batch(request).await?.into_inner();
        Ok(answer
            .results
            .into_iter()
            .map(|result| geolog_proto::item_outcome(result.read, result.error))
            .collect())
    }
}

/// One batcher per consistency level (a call has one level).
pub struct Coalescer<R: Coalesced> {
    client: Client,
    timeout: Duration,
    limits: BatchLimits,
    by_level: Mutex<HashMap<i32, LevelBatcher<R>>>,
    to: String,
}

impl<R: Coalesced> Coalescer<R> {
    /// Coalesces into calls of at most `max_items` requests, `in_flight`
    /// calls outstanding per level, each with deadline `timeout`. At most
    /// `max_waiting` requests wait (the gateway's concurrency limit: a
    /// request is refused there before it could wait here).
    pub fn new(
        client: Client,
        region: &str,
        max_items: usize,
        in_flight: usize,
        max_waiting: usize,
        timeout: Duration,
    ) -> Self {
        Coalescer {
            client,
            timeout,
            limits: BatchLimits {
                max_items,
                max_bytes: MAX_CALL_BYTES,
                in_flight,
                max_waiting,
                // Bounded by the count alone: a request waits here at most
                // its own deadline.
                max_wait: timeout,
            },
            by_level: Mutex::new(HashMap::new()),
            to: format!("coordinators:{region}"),
        }
    }

    /// Sends one request and answers as its own call would.
    pub async fn call(&self, request: R) -> Result<R::Answer, ApiError> {
        // Checked here, so that only real levels get a batcher.
        cpb::Consistency::requested(request.level())?;
        let batcher = self.batcher(request.level());
        Ok(batcher.call(request).await??)
    }

    fn batcher(&self, level: i32) -> LevelBatcher<R> {
        let mut by_level = self
            .by_level
            .lock()
            .expect("lock is never poisoned: no panics while held");
        if let Some(batcher) = by_level.get(&level) {
            return batcher.clone();
        }
        let (client, timeout) = (self.client.clone(), self.timeout);
        let batcher = Arc::new(Batcher::new(
            R::KIND,
            &self.to,
            self.limits,
            R::weight,
            move |requests: Vec<R>| R::send(client.clone(), requests, level, timeout),
        ));
        by_level.insert(level, batcher.clone());
        batcher
    }
}
