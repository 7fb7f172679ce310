//! The coordinator's gRPC service: decodes requests, calls the engine,
//! encodes outcomes and errors. Errors are logged here, where handled.

use crate::SpawnTraced;
use crate::engine::{BatchRecord, MintOrder, QuorumEngine, ReadKind, ReadValue, Written};
use crate::observe::{observed, observed_batch};
use crate::outbox::OutboxView;
use geolog_core::causal::VersionVector;
use geolog_core::error::QuorumDetails;
use geolog_core::{ConsistencyLevel, ErrorCode, GeologError, JsonText, Key};
use geolog_proto::coordinator as pb;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

pub struct CoordinatorService {
    id: String,
    engine: Arc<QuorumEngine>,
    outbox: Arc<OutboxView>,
    workers: geolog_worker::Workers,
}

impl CoordinatorService {
    pub fn new(
        id: String,
        engine: Arc<QuorumEngine>,
        outbox: Arc<OutboxView>,
        workers: geolog_worker::Workers,
    ) -> Self {
        CoordinatorService {
            id,
            engine,
            outbox,
            workers,
        }
    }
}

/// A background worker's status on the wire.
fn worker_health(name: String, status: geolog_worker::Status) -> pb::WorkerHealth {
    use geolog_worker::State;
    let state = match status.state {
        State::Idle => pb::WorkerState::Idle,
        State::Busy => pb::WorkerState::Busy,
        State::Throttled => pb::WorkerState::Throttled,
        State::BackingOff => pb::WorkerState::BackingOff,
        State::Dead => pb::WorkerState::Dead,
    };
    pb::WorkerHealth {
        name,
        state: state as i32,
        steps: status.steps,
        errors: status.errors,
        failing_for: status.failing_for,
        last_error: status.last_error.unwrap_or_default(),
        last_success_unix_ms: status.last_success.and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis() as u64)
        }),
    }
}

type AnswerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn acks(acks: &QuorumDetails) -> pb::Acks {
    pb::Acks {
        required: acks.required,
        received: acks.received.unwrap_or(0),
        regions: acks
            .regions
            .iter()
            .map(|r| pb::RegionAcks {
                region: r.region.clone(),
                required: r.required,
                received: r.received.unwrap_or(0),
            })
            .collect(),
    }
}

fn fail(op: &'static str, key: &str, err: GeologError) -> Status {
    log_failure(op, key, &err);
    err.to_status()
}

fn log_failure(op: &'static str, key: &str, err: &GeologError) {
    match err.code {
        ErrorCode::Internal => tracing::error!(op, key, error = %err.message, "request failed"),
        ErrorCode::Unavailable | ErrorCode::Timeout => {
            tracing::warn!(op, key, error = %err.message, "request failed")
        }
        _ => tracing::debug!(op, key, error = %err.message, "request rejected"),
    }
}

/// Records per `WriteBatch` call.
pub const MAX_WRITE_BATCH: usize = 10_000;

/// Reads per `ReadBatch` call.
pub const MAX_READ_BATCH: usize = 10_000;

/// The level of a batch call `op` of `count` items, refused beyond `max`
/// (`items` names them in the error).
fn batch_level(
    engine: &QuorumEngine,
    op: &'static str,
    consistency: i32,
    count: usize,
    max: usize,
    items: &str,
) -> Result<ConsistencyLevel, Status> {
    let level = engine.level(consistency).map_err(|e| fail(op, "", e))?;
    if count > max {
        let err = GeologError::new(
            ErrorCode::InvalidRequest,
            format!("at most {max} {items} per batch"),
        );
        return Err(fail(op, "", err));
    }
    Ok(level)
}

/// A write's context token: none when empty. Refused unless it could
/// have come from a read of this cluster (see
/// [`VersionVector::check_context`]).
fn context_of(engine: &QuorumEngine, token: &str) -> Result<Option<VersionVector>, GeologError> {
    if token.is_empty() {
        return Ok(None);
    }
    let context = VersionVector::from_token(token)?;
    context.check_context(
        |node| engine.replicas().is_node(node),
        geolog_core::causal::wall_micros(),
    )?;
    Ok(Some(context))
}

/// One item's outcome in a batch answer: its answer, or its error.
fn answer_or_error<T>(
    result: Result<T, GeologError>,
) -> (Option<T>, Option<geolog_core::error::wire::Error>) {
    match result {
        Ok(answer) => (Some(answer), None),
        Err(err) => (None, Some(err.to_wire())),
    }
}

/// One read of `key`'s current value at `level`, in its own request span.
async fn read_one(
    engine: &QuorumEngine,
    key: &str,
    level: ConsistencyLevel,
) -> Result<pb::ReadResponse, GeologError> {
    let key = &Key::new(key)?;
    let outcome = observed(
        "read",
        engine.region(),
        key,
        level.as_str(),
        engine.read(key, level),
    )
    .await?;
    Ok(read_response(outcome))
}

fn read_response(outcome: ReadValue) -> pb::ReadResponse {
    pb::ReadResponse {
        acks: Some(acks(&outcome.acks)),
        consistency: geolog_proto::consistency(outcome.level),
        version: outcome.version,
        siblings: outcome.siblings,
        context: outcome.context,
        repaired: outcome.repaired,
    }
}

/// One write, at `level` (the record's own level is ignored).
async fn write_one(
    engine: &QuorumEngine,
    req: pb::WriteRequest,
    level: geolog_core::ConsistencyLevel,
    order: MintOrder,
) -> Result<pb::WriteResponse, GeologError> {
    let key = Key::new(req.key)?;
    let context = context_of(engine, &req.context)?;
    let value = JsonText::from_wire(req.value_json)?;
    let outcome = observed(
        "write",
        engine.region(),
        &key,
        level.as_str(),
        engine.write(
            &key,
            &value,
            level,
            context,
            (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            order,
        ),
    )
    .await?;
    Ok(written(outcome))
}

/// The answer to a write that met its level.
fn written(outcome: Written) -> pb::WriteResponse {
    pb::WriteResponse {
        acks: Some(acks(&outcome.acks)),
        consistency: geolog_proto::consistency(outcome.level),
        // Without its value: the writer sent it, and carrying it back made
        // a batch's answer as large as the batch (past the gateway's
        // message limit for big records, after they were committed).
        version: Some(geolog_proto::storage::Version {
            value_json: Default::default(),
            ..outcome.version
        }),
        context: outcome.context,
        replayed: outcome.replayed,
        hints: outcome.hints,
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    type ReplicateStream = AnswerStream<pb::ReplicaAck>;
    type RegionReadStream = AnswerStream<pb::ReplicaVersions>;

    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let req = request.into_inner();
        for version in &req.versions {
            geolog_core::key::validate_key(&version.key)?;
        }
        metrics::counter!("replicate_received_total", "origin" => req.origin_region.clone())
            .increment(req.versions.len() as u64);
        let acks = self.engine.apply_local(req.versions);
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(acks).map(Ok),
        )))
    }

    async fn region_read(
        &self,
        request: Request<pb::RegionReadRequest>,
    ) -> Result<Response<Self::RegionReadStream>, Status> {
        let req = request.into_inner();
        let key = Key::new(req.key)?;
        let kind = match req.history {
            None if !req.idempotency_key.is_empty() => ReadKind::Idempotent {
                idempotency_key: req.idempotency_key,
            },
            None => ReadKind::Frontier,
            Some(h) => ReadKind::History {
                limit: h.limit.clamp(1, 1_000),
                before: h.before,
                after: h.after,
            },
        };
        let answers = self.engine.read_local(key, req.replicas as usize, kind);
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(answers).map(Ok),
        )))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        let level = self
            .engine
            .level(req.consistency)
            .map_err(|e| fail("write", &req.key, e))?;
        let key = req.key.clone();
        let written = write_one(&self.engine, req, level, MintOrder::default())
            .await
            .map_err(|e| fail("write", &key, e))?;
        Ok(Response::new(written))
    }

    async fn write_batch(
        &self,
        request: Request<pb::WriteBatchRequest>,
    ) -> Result<Response<pb::WriteBatchResponse>, Status> {
        let req = request.into_inner();
        let level = batch_level(
            &self.engine,
            "write_batch",
            req.consistency,
            req.records.len(),
            MAX_WRITE_BATCH,
            "records",
        )?;
        // Records fan out per destination (`QuorumEngine::write_batch`),
        // all but the keys that carry idempotency keys: those records are
        // written one by one (each needs its own lookup of an earlier
        // write), still in batch order per key; so are all records at
        // `ANY` (a record no replica takes is held as hints), and a batch of
        // one — how a gateway sends a lone single write — which keeps its
        // own request span (key, acks) and needs no batch bookkeeping.
        let count = req.records.len();
        let together = req.together;
        let idempotent_keys: HashSet<&str> = req
            .records
            .iter()
            .filter(|r| !r.idempotency_key.is_empty())
            .map(|r| r.key.as_str())
            .collect();
        let single: Vec<bool> = req
            .records
            .iter()
            .map(|r| {
                count == 1
                    || level == ConsistencyLevel::Any
                    || idempotent_keys.contains(r.key.as_str())
            })
            .collect();
        drop(idempotent_keys);
        let mut results: Vec<Option<Result<pb::WriteResponse, GeologError>>> = vec![None; count];
        let mut writes = tokio::task::JoinSet::new();
        let mut last_of_key: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
        let mut batched = Vec::new();
        let mut batched_at = Vec::new();
        for (index, record) in req.records.into_iter().enumerate() {
            if !single[index] {
                let parsed = Key::new(record.key).and_then(|key| {
                    let context = context_of(&self.engine, &record.context)?;
                    Ok((key, context, JsonText::from_wire(record.value_json)?))
                });
                let (key, context, value) = match parsed {
                    Ok(parsed) => parsed,
                    Err(err) => {
                        results[index] = Some(Err(err));
                        continue;
                    }
                };
                batched_at.push(index);
                batched.push(BatchRecord {
                    key,
                    value_json: value,
                    context,
                });
                continue;
            }
            let engine = self.engine.clone();
            let (minted, next) = oneshot::channel();
            let order = MintOrder {
                after: last_of_key.insert(record.key.clone(), next),
                minted: Some(minted),
            };
            writes.spawn_traced(async move {
                let result = write_one(&engine, record, level, order).await;
                (index, result)
            });
        }
        let region = self.engine.region().to_string();
        let keys: Vec<Key> = batched.iter().map(|r| r.key.clone()).collect();
        let outcomes = observed_batch(
            "write",
            &region,
            level.as_str(),
            batched.len(),
            self.engine.write_batch(batched, level, together),
        )
        .await;
        for ((index, outcome), key) in batched_at.into_iter().zip(outcomes).zip(keys) {
            results[index] = Some(outcome.map(written).inspect_err(|err| {
                log_failure("write_batch", &key, err);
            }));
        }
        while let Some(done) = writes.join_next().await {
            let (index, result) =
                done.map_err(|e| Status::internal(format!("a batch write task failed: {e}")))?;
            results[index] = Some(result);
        }
        let results = results
            .into_iter()
            .map(|result| {
                let (written, error) = answer_or_error(result.expect("every record has a result"));
                pb::WriteResult { written, error }
            })
            .collect();
        Ok(Response::new(pb::WriteBatchResponse { results }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let req = request.into_inner();
        let level = self
            .engine
            .level(req.consistency)
            .map_err(|e| fail("read", &req.key, e))?;
        let read = read_one(&self.engine, &req.key, level)
            .await
            .map_err(|e| fail("read", &req.key, e))?;
        Ok(Response::new(read))
    }

    async fn read_batch(
        &self,
        request: Request<pb::ReadBatchRequest>,
    ) -> Result<Response<pb::ReadBatchResponse>, Status> {
        let req = request.into_inner();
        let level = batch_level(
            &self.engine,
            "read_batch",
            req.consistency,
            req.reads.len(),
            MAX_READ_BATCH,
            "reads",
        )?;
        // One span for the batch; the reads of one replica share its calls.
        let mut results: Vec<Option<Result<pb::ReadResponse, GeologError>>> =
            req.reads.iter().map(|_| None).collect();
        let mut keys = Vec::with_capacity(req.reads.len());
        let mut keys_at = Vec::with_capacity(req.reads.len());
        for (index, read) in req.reads.into_iter().enumerate() {
            match Key::new(read.key) {
                Ok(key) => {
                    keys.push(key);
                    keys_at.push(index);
                }
                Err(err) => results[index] = Some(Err(err)),
            }
        }
        let outcomes = observed_batch(
            "read",
            self.engine.region(),
            level.as_str(),
            keys.len(),
            self.engine.read_batch(&keys, level),
        )
        .await;
        for ((index, outcome), key) in keys_at.into_iter().zip(outcomes).zip(&keys) {
            results[index] = Some(outcome.map(read_response));
            if let Some(Err(err)) = &results[index] {
                log_failure("read_batch", key, err);
            }
        }
        let results = results
            .into_iter()
            .map(|result| {
                let (read, error) = answer_or_error(result.expect("every read has a result"));
                pb::ReadResult { read, error }
            })
            .collect();
        Ok(Response::new(pb::ReadBatchResponse { results }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = request.into_inner();
        let (level, key) = self
            .engine
            .level(req.consistency)
            .and_then(|level| Ok((level, Key::new(req.key.clone())?)))
            .map_err(|e| fail("history", &req.key, e))?;
        let (versions, more, outcome) = observed(
            "history",
            self.engine.region(),
            &key,
            level.as_str(),
            self.engine
                .history(&key, level, req.limit, req.before, req.after),
        )
        .await
        .map_err(|e| fail("history", &req.key, e))?;
        Ok(Response::new(pb::HistoryResponse {
            versions,
            consistency: geolog_proto::consistency(level),
            acks: Some(acks(&outcome)),
            more,
        }))
    }

    async fn replicas(
        &self,
        request: Request<pb::ReplicasRequest>,
    ) -> Result<Response<pb::ReplicasResponse>, Status> {
        let req = request.into_inner();
        let key = Key::new(req.key.clone()).map_err(|e| fail("replicas", &req.key, e))?;
        let replicas = self
            .engine
            .replica_view(&key)
            .await
            .map_err(|e| fail("replicas", &req.key, e))?;
        Ok(Response::new(pb::ReplicasResponse { replicas }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let replicas = self.engine.replicas().health();
        Ok(Response::new(pb::HealthResponse {
            coordinator: self.id.clone(),
            region: self.engine.region().to_string(),
            replicas,
            outbox: self.outbox.health(),
            hints: self.outbox.hints(),
            links: self.engine.replicas().links(),
            workers: self
                .workers
                .statuses()
                .into_iter()
                .map(|(name, status)| worker_health(name, status))
                .collect(),
        }))
    }

    async fn node_digests(
        &self,
        request: Request<pb::NodeDigestsRequest>,
    ) -> Result<Response<geolog_proto::storage::DigestsResponse>, Status> {
        let req = request.into_inner();
        let mut client = self.relay(&req.node)?;
        client.digests(req.request.unwrap_or_default()).await
    }

    async fn node_bucket_versions(
        &self,
        request: Request<pb::NodeBucketVersionsRequest>,
    ) -> Result<Response<geolog_proto::storage::BucketVersionsResponse>, Status> {
        let req = request.into_inner();
        let mut client = self.relay(&req.node)?;
        client
            .bucket_versions(req.request.unwrap_or_default())
            .await
    }

    async fn node_apply(
        &self,
        request: Request<pb::NodeApplyRequest>,
    ) -> Result<Response<geolog_proto::storage::ApplyResponse>, Status> {
        let req = request.into_inner();
        let mut client = self.relay(&req.node)?;
        client.apply(req.request.unwrap_or_default()).await
    }
}

impl CoordinatorService {
    /// The client of local storage node `node` for relayed anti-entropy
    /// calls: without the breaker, which is the write path's business.
    fn relay(
        &self,
        node: &str,
    ) -> Result<
        geolog_proto::storage::storage_client::StorageClient<tonic::transport::Channel>,
        Status,
    > {
        self.engine
            .replicas()
            .local(node)
            .map(|r| r.probe_client())
            .ok_or_else(|| {
                GeologError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "no storage node {node:?} in region {}",
                        self.engine.region()
                    ),
                )
                .to_status()
            })
    }
}
