//! REST handlers of the log API. Each parses with `extract`, calls a
//! coordinator over gRPC, and renders the answer; no quorum logic here.

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{self, LogQuery};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State, rejection::PathRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use geolog_core::{ErrorCode, Hlc, Key};
use geolog_proto::{coordinator as cpb, storage as spb};
use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;

#[derive(Serialize)]
struct Timestamp {
    /// The packed hybrid logical clock; orders versions.
    hlc: u64,
    physical_ms: u64,
    logical: u16,
    /// `physical_ms` as RFC 3339.
    time: String,
}

#[derive(Serialize)]
struct VersionView {
    timestamp: Timestamp,
    /// The storage node that minted the version.
    node: String,
    /// That node's sequence number for it.
    seq: u64,
    /// The version's version vector: what its writer had seen plus itself.
    vector: geolog_core::causal::VersionVector,
    /// What its writer had seen (its causal context): it supersedes exactly
    /// the versions `(node, seq)` with `seq <= seen[node]`.
    seen: geolog_core::causal::VersionVector,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct RegionAcksView {
    region: String,
    /// Omitted when the level sets no minimum for this region.
    #[serde(skip_serializing_if = "is_zero")]
    required: u32,
    received: u32,
}

#[derive(Serialize)]
struct AcksView {
    required: u32,
    received: u32,
    regions: Vec<RegionAcksView>,
}

fn version_view(v: &spb::Version) -> VersionView {
    let hlc = Hlc::from_packed(v.timestamp.as_ref().map_or(0, |t| t.packed));
    let time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(hlc.physical_ms()) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
    let dot = v.dot.clone().unwrap_or_default();
    let seen = geolog_proto::vector_of(&v.context);
    let mut vector = seen.clone();
    vector.raise(&dot.node, dot.seq);
    VersionView {
        timestamp: Timestamp {
            hlc: hlc.packed(),
            physical_ms: hlc.physical_ms(),
            logical: hlc.logical(),
            time,
        },
        node: dot.node,
        seq: dot.seq,
        vector,
        seen,
    }
}

fn acks_view(acks: Option<cpb::Acks>) -> AcksView {
    let acks = acks.unwrap_or_default();
    AcksView {
        required: acks.required,
        received: acks.received,
        regions: acks
            .regions
            .into_iter()
            .map(|r| RegionAcksView {
                region: r.region,
                required: r.required,
                received: r.received,
            })
            .collect(),
    }
}

/// The level a request asked for, on the wire (unset: the default).
fn level_of(query: &LogQuery) -> i32 {
    query.consistency.map_or(0, geolog_proto::consistency)
}

/// The name of a level a coordinator answered with.
fn level_name(wire: i32) -> String {
    match cpb::Consistency::requested(wire) {
        Ok(Some(level)) => level.as_str().to_string(),
        _ => String::new(),
    }
}

fn missing_version() -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        "coordinator answered without a version",
    )
}

/// Header that may carry the context token instead of the body field.
pub const CONTEXT_HEADER: &str = "x-geolog-context";

fn key_from_path(key: Result<Path<String>, PathRejection>) -> Result<Key, ApiError> {
    let Path(key) =
        key.map_err(|e| ApiError::new(ErrorCode::InvalidKey, format!("invalid key in path: {e}")))?;
    Ok(Key::new(key)?)
}

fn raw_value(version: &spb::Version) -> Result<Box<RawValue>, ApiError> {
    serde_json::from_slice::<Box<RawValue>>(&version.value_json).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("stored value is not JSON: {e}"),
        )
    })
}

/// A version with its value, as in `siblings`, history and replica views.
#[derive(Serialize)]
struct ValueView {
    value: Box<RawValue>,
    version: VersionView,
}

fn value_views(versions: &[spb::Version]) -> Result<Vec<ValueView>, ApiError> {
    versions
        .iter()
        .map(|v| {
            Ok(ValueView {
                value: raw_value(v)?,
                version: version_view(v),
            })
        })
        .collect()
}

#[derive(Serialize)]
struct WriteAnswer {
    key: Key,
    version: VersionView,
    /// Context token of the key's state after this write.
    context: String,
    /// True when this answers a retry with the same idempotency key: the
    /// version is the first write's and nothing new was created (`acks`
    /// then describe nothing).
    replayed: bool,
    /// `ANY` only, when no replica of the key could take the write: the
    /// durable hints stored for its replicas (the acknowledgement).
    #[serde(skip_serializing_if = "is_zero")]
    hints: u32,
    consistency: String,
    acks: AcksView,
}

fn write_answer(key: Key, answer: cpb::WriteResponse) -> Result<WriteAnswer, ApiError> {
    let version = answer.version.as_ref().ok_or_else(missing_version)?;
    Ok(WriteAnswer {
        key,
        version: version_view(version),
        context: answer.context,
        replayed: answer.replayed,
        hints: answer.hints,
        consistency: level_name(answer.consistency),
        acks: acks_view(answer.acks),
    })
}

/// The coordinator request for one record, after checking its context
/// token and idempotency key (here, with a clear 400, rather than after a
/// round trip).
fn write_request(
    body: extract::WriteBody,
    context: Option<String>,
    idempotency_key: Option<String>,
    consistency: i32,
) -> Result<cpb::WriteRequest, ApiError> {
    let context = context.unwrap_or_default();
    if !context.is_empty() {
        geolog_core::causal::VersionVector::from_token(&context)?;
    }
    if let Some(id) = &idempotency_key {
        extract::validate_idempotency_key(id)?;
    }
    Ok(cpb::WriteRequest {
        value_json: String::from(Box::<str>::from(body.value)).into(),
        key: body.key.into_string(),
        consistency,
        context,
        idempotency_key: idempotency_key.unwrap_or_default(),
    })
}

/// `POST /api/logs?consistency=LEVEL` with `{"key": ..., "value": ..., "context"?: ...}`.
pub async fn write(
    State(state): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let query = extract::parse_query(raw.as_deref(), extract::LOG_PARAMS)?;
    let bytes = extract::read_body(&headers, body, state.max_body_bytes).await?;
    let body = extract::parse_write(&bytes)?;
    let context = extract::body_or_header(
        body.context.clone(),
        &headers,
        CONTEXT_HEADER,
        "context",
        ErrorCode::InvalidContext,
    )?;
    let idempotency_key = extract::body_or_header(
        body.id.clone(),
        &headers,
        "idempotency-key",
        "id",
        ErrorCode::InvalidRequest,
    )?;
    let key = body.key.clone();
    let request = write_request(body, context, idempotency_key, level_of(&query))?;
    let answer = state.writes.call(request).await?;
    Ok((StatusCode::CREATED, Json(write_answer(key, answer)?)).into_response())
}

/// One record's outcome in a batch answer.
#[derive(Serialize)]
struct BatchRecordAnswer {
    /// The record's position in the batch (0-based; NDJSON: among the
    /// non-empty lines).
    index: usize,
    /// What a single write of this record would have answered.
    status: u16,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    written: Option<WriteAnswer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<geolog_core::GeologError>,
}

impl BatchRecordAnswer {
    fn failed(index: usize, err: geolog_core::GeologError) -> Self {
        BatchRecordAnswer {
            index,
            status: err.code.http_status().as_u16(),
            written: None,
            error: Some(err),
        }
    }
}

#[derive(Serialize)]
struct BatchAnswer {
    consistency: String,
    records: usize,
    written: usize,
    failed: usize,
    /// One per record, in batch order.
    results: Vec<BatchRecordAnswer>,
}

/// `POST /api/logs/batch?consistency=LEVEL`: a JSON array or NDJSON of
/// write bodies, optionally gzip- or zstd-compressed. Each record is
/// validated and written on its own and answered in `results`: `201` when
/// every record was written, `207` when some failed; when none was
/// written and all failed alike, their common status.
pub async fn write_batch(
    State(state): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let query = extract::parse_query(raw.as_deref(), extract::LOG_PARAMS)?;
    for header in [CONTEXT_HEADER, "idempotency-key"] {
        if headers.contains_key(header) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "header {header} does not apply to a batch; give each record its own field"
                ),
            ));
        }
    }
    let bytes = extract::read_body(&headers, body, state.max_batch_bytes).await?;
    let bytes = extract::decode_body(&headers, bytes, state.max_batch_bytes).await?;
    let records = extract::parse_batch(
        &bytes,
        extract::is_ndjson(&headers),
        state.max_batch_records,
        state.max_body_bytes,
    )?;
    let mut results: Vec<Option<BatchRecordAnswer>> = Vec::with_capacity(records.len());
    let (mut sent, mut requests) = (Vec::new(), Vec::new());
    for (index, record) in records.into_iter().enumerate() {
        let request = record.and_then(|body| {
            let (key, context, id) = (body.key.clone(), body.context.clone(), body.id.clone());
            Ok((key, write_request(body, context, id, 0)?))
        });
        match request {
            Ok((key, request)) => {
                sent.push((index, key));
                requests.push(request);
                results.push(None);
            }
            Err(err) => results.push(Some(BatchRecordAnswer::failed(index, err.0))),
        }
    }
    let mut consistency = query
        .consistency
        .map(|l| l.as_str().to_string())
        .unwrap_or_default();
    if !requests.is_empty() {
        let mut client = state.coordinator.clone();
        let mut request = tonic::Request::new(cpb::WriteBatchRequest {
            records: requests,
            consistency: level_of(&query),
            together: true,
        });
        request.set_timeout(state.request_timeout);
        let answer = client.write_batch(request).await?.into_inner();
        if answer.results.len() != sent.len() {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "coordinator answered a different number of records",
            ));
        }
        for ((index, key), result) in sent.into_iter().zip(answer.results) {
            results[index] = Some(
                match geolog_proto::item_outcome(result.written, result.error) {
                    Ok(written) => {
                        let written = write_answer(key, written)?;
                        consistency.clone_from(&written.consistency);
                        BatchRecordAnswer {
                            index,
                            status: StatusCode::CREATED.as_u16(),
                            written: Some(written),
                            error: None,
                        }
                    }
                    Err(err) => BatchRecordAnswer::failed(index, err),
                },
            );
        }
    }
    let results: Vec<BatchRecordAnswer> = results
        .into_iter()
        .map(|r| r.expect("every record is answered"))
        .collect();
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    let statuses: std::collections::BTreeSet<u16> = results.iter().map(|r| r.status).collect();
    let status = match (failed, statuses.len()) {
        (0, _) => StatusCode::CREATED,
        (f, 1) if f == results.len() => {
            StatusCode::from_u16(results[0].status).unwrap_or(StatusCode::MULTI_STATUS)
        }
        _ => StatusCode::MULTI_STATUS,
    };
    let answer = BatchAnswer {
        consistency,
        records: results.len(),
        written: results.len() - failed,
        failed,
        results,
    };
    Ok((status, Json(answer)).into_response())
}

#[derive(Serialize)]
struct ReadAnswer<'a> {
    key: &'a str,
    /// The deterministic pick among the siblings: highest timestamp, ties by dot.
    value: Box<RawValue>,
    version: VersionView,
    /// Every current (concurrent) version.
    siblings: Vec<ValueView>,
    /// True when there is more than one sibling.
    conflict: bool,
    /// Pass it back with the next write to supersede what this read saw.
    context: String,
    consistency: String,
    acks: AcksView,
}

/// `GET /api/logs/{key}?consistency=LEVEL`.
pub async fn read(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    read_key(&state, key_from_path(key)?, raw).await
}

/// `GET /api/logs/batch`: the key named `batch` (that path's `POST` is
/// the batch endpoint).
pub async fn read_batch_key(
    State(state): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    read_key(&state, Key::new("batch")?, raw).await
}

async fn read_key(state: &AppState, key: Key, raw: Option<String>) -> Result<Response, ApiError> {
    let query = extract::parse_query(raw.as_deref(), extract::LOG_PARAMS)?;
    let answer = state
        .reads
        .call(cpb::ReadRequest {
            key: key.to_string(),
            consistency: level_of(&query),
        })
        .await?;
    let Some(version) = answer.version.as_ref() else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "key {:?} has no versions at consistency {}",
                key.as_str(),
                level_name(answer.consistency)
            ),
        ));
    };
    let view = ReadAnswer {
        key: &key,
        value: raw_value(version)?,
        version: version_view(version),
        siblings: value_views(&answer.siblings)?,
        conflict: answer.siblings.len() > 1,
        context: answer.context,
        consistency: level_name(answer.consistency),
        acks: acks_view(answer.acks),
    };
    Ok(Json(view).into_response())
}

#[derive(Serialize)]
struct HistoryAnswer<'a> {
    key: &'a str,
    /// Every version, superseded ones too, newest first.
    versions: Vec<ValueView>,
    /// Cursor for the next (older) page: pass it as `before`; null at the end.
    next: Option<String>,
    consistency: String,
    acks: AcksView,
}

/// Default history page size.
const DEFAULT_HISTORY_LIMIT: u32 = 100;

/// `GET /api/logs/{key}/history?limit=&before=&after=&consistency=`.
pub async fn history(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let key = key_from_path(key)?;
    let query = extract::parse_query(raw.as_deref(), extract::HISTORY_PARAMS)?;
    let cursor = |c: Option<extract::HistoryCursor>| {
        c.map(|c| spb::HistoryCursor {
            hlc: c.hlc,
            node: c.node,
            seq: c.seq,
        })
    };
    let mut client = state.coordinator.clone();
    let mut request = tonic::Request::new(cpb::HistoryRequest {
        key: key.to_string(),
        consistency: level_of(&query),
        limit: query.limit.unwrap_or(DEFAULT_HISTORY_LIMIT),
        before: cursor(query.before.clone()),
        after: cursor(query.after.clone()),
    });
    request.set_timeout(state.request_timeout);
    let answer = client.history(request).await?.into_inner();
    let next = answer
        .more
        .then(|| answer.versions.last())
        .flatten()
        .map(|v| {
            let dot = v.dot.clone().unwrap_or_default();
            extract::HistoryCursor {
                hlc: v.timestamp.as_ref().map_or(0, |t| t.packed),
                node: dot.node,
                seq: dot.seq,
            }
            .to_token()
        });
    let view = HistoryAnswer {
        key: &key,
        versions: value_views(&answer.versions)?,
        next,
        consistency: level_name(answer.consistency),
        acks: acks_view(answer.acks),
    };
    Ok(Json(view).into_response())
}

#[derive(Serialize)]
struct ReplicaHolding {
    node: String,
    region: String,
    answered: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    /// The key's current versions on this replica.
    versions: Vec<ValueView>,
}

/// `GET /api/logs/{key}/replicas`: the key's replicas per region (from the
/// ring), whether each answered, and what each holds.
pub async fn replicas(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let key = key_from_path(key)?;
    extract::parse_query(raw.as_deref(), &[])?;
    let mut client = state.coordinator.clone();
    let mut request = tonic::Request::new(cpb::ReplicasRequest {
        key: key.to_string(),
    });
    request.set_timeout(state.request_timeout);
    let answer = client.replicas(request).await?.into_inner();
    let replicas = answer
        .replicas
        .into_iter()
        .map(|r| {
            Ok(ReplicaHolding {
                versions: value_views(&r.versions)?,
                node: r.node,
                region: r.region,
                answered: r.answered,
                error: r.error,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(serde_json::json!({ "key": key, "replicas": replicas })).into_response())
}

#[derive(Serialize)]
struct CoordinatorHealth {
    id: String,
    addr: String,
    /// `up` or `down`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Its background workers (when it answered).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    workers: Vec<WorkerView>,
}

#[derive(Serialize)]
struct WorkerView {
    name: String,
    /// `idle`, `busy`, `throttled`, `backing_off` (its last step failed) or
    /// `dead`.
    state: &'static str,
    steps: u64,
    errors: u64,
    failing_for: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_success_unix_ms: Option<u64>,
}

impl WorkerView {
    fn of(w: cpb::WorkerHealth) -> Self {
        let state = match w.state() {
            cpb::WorkerState::Idle => "idle",
            cpb::WorkerState::Busy => "busy",
            cpb::WorkerState::Throttled => "throttled",
            cpb::WorkerState::BackingOff => "backing_off",
            cpb::WorkerState::Dead => "dead",
            cpb::WorkerState::Unknown => "unknown",
        };
        WorkerView {
            name: w.name,
            state,
            steps: w.steps,
            errors: w.errors,
            failing_for: w.failing_for,
            last_error: w.last_error,
            last_success_unix_ms: w.last_success_unix_ms,
        }
    }

    /// A worker that fails or died makes the gateway's answer `degraded`.
    fn is_healthy(&self) -> bool {
        !matches!(self.state, "backing_off" | "dead")
    }
}

#[derive(Serialize)]
struct ReplicaView {
    node: String,
    region: String,
    addr: String,
    /// `alive`, `suspect` or `dead`.
    state: &'static str,
    /// The circuit breaker towards it: `closed`, `half_open` or `open`.
    #[serde(skip_serializing_if = "str::is_empty")]
    circuit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_ok_ms_ago: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
}

/// A replica's or link's state as the health document names it.
fn state_name(state: cpb::ReplicaState) -> &'static str {
    match state {
        cpb::ReplicaState::Alive => "alive",
        cpb::ReplicaState::Suspect => "suspect",
        cpb::ReplicaState::Dead => "dead",
        cpb::ReplicaState::Unknown => "unknown",
    }
}

/// A circuit breaker's state as the health document names it (empty: a
/// remote replica its region did not report).
fn circuit_name(circuit: cpb::CircuitState) -> &'static str {
    match circuit {
        cpb::CircuitState::Closed => "closed",
        cpb::CircuitState::HalfOpen => "half_open",
        cpb::CircuitState::Open => "open",
        cpb::CircuitState::Unreported => "",
    }
}

/// The link from this region to another one.
#[derive(Serialize)]
struct LinkView {
    region: String,
    state: &'static str,
    circuit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_ok_ms_ago: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
}

/// The region's anti-entropy worker and its last pass.
#[derive(Serialize)]
struct AntiEntropyView {
    id: String,
    addr: String,
    /// `up`, `down`, or `unknown` (no status address in the config).
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passes: Option<u64>,
    /// The worker's last finished pass, with `result`: `ok`, or `failed`
    /// when some replica pair could not be compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_pass: Option<serde_json::Value>,
}

/// Asks the region's anti-entropy worker for its status.
async fn anti_entropy_view(state: &AppState) -> Option<AntiEntropyView> {
    let (id, addr) = state.anti_entropy.clone()?;
    let mut view = AntiEntropyView {
        id,
        addr,
        status: "unknown",
        error: None,
        passes: None,
        last_pass: None,
    };
    if view.addr.is_empty() {
        return Some(view);
    }
    let answer = state
        .http
        .get(format!("http://{}/status", view.addr))
        .send()
        .await
        .and_then(|r| r.error_for_status());
    let status = match answer {
        Ok(r) => r.json::<serde_json::Value>().await,
        Err(err) => Err(err),
    };
    match status {
        Ok(status) => {
            view.status = "up";
            view.passes = status["passes"].as_u64();
            view.last_pass = status
                .get("last_pass")
                .filter(|p| !p.is_null())
                .map(|pass| {
                    let mut pass = pass.clone();
                    let failed = pass["failed_pairs"].as_u64().unwrap_or(0);
                    pass["result"] = if failed == 0 { "ok" } else { "failed" }.into();
                    pass
                });
        }
        Err(err) => {
            view.status = "down";
            view.error = Some(err.to_string());
        }
    }
    Some(view)
}

#[derive(Serialize)]
struct OutboxView {
    /// The remote region the entries wait for.
    region: String,
    depth: u64,
    /// Age of the oldest pending entry: the replay lag.
    oldest_age_ms: u64,
}

impl OutboxView {
    fn of(o: &cpb::OutboxHealth) -> Self {
        OutboxView {
            region: o.region.clone(),
            depth: o.depth,
            oldest_age_ms: o.oldest_age_ms,
        }
    }
}

#[derive(Serialize)]
struct HintView {
    /// The replica the hints wait for.
    target: String,
    pending: u64,
    oldest_age_ms: u64,
}

impl HintView {
    fn of(o: &cpb::OutboxHealth) -> Self {
        HintView {
            target: o.region.clone(),
            pending: o.depth,
            oldest_age_ms: o.oldest_age_ms,
        }
    }
}

#[derive(Serialize)]
struct HealthAnswer {
    /// `ok` (everything alive), `degraded` (some replica dead) or
    /// `unavailable` (no coordinator reachable; answered with 503).
    status: &'static str,
    gateway: String,
    region: String,
    coordinators: Vec<CoordinatorHealth>,
    replicas: Vec<ReplicaView>,
    /// Cross-region outbox of this region (writes not yet delivered).
    outbox: Vec<OutboxView>,
    /// Hints waiting for replicas of this region that missed writes.
    hints: Vec<HintView>,
    /// This region's links to the other regions.
    links: Vec<LinkView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anti_entropy: Option<AntiEntropyView>,
}

/// `GET /api/logs/health`: this gateway, its coordinators, and every replica
/// as the first reachable coordinator sees it.
pub async fn health(State(state): State<Arc<AppState>>, RawQuery(raw): RawQuery) -> Response {
    if let Err(err) = extract::parse_query(raw.as_deref(), &[]) {
        return err.into_response();
    }
    let mut coordinators = Vec::new();
    let mut replicas: Option<Vec<ReplicaView>> = None;
    let mut outbox: Vec<OutboxView> = Vec::new();
    let mut hints: Vec<HintView> = Vec::new();
    let mut links: Vec<LinkView> = Vec::new();
    let anti_entropy = tokio::spawn({
        let state = state.clone();
        async move { anti_entropy_view(&state).await }
    });
    for (id, addr, client) in &state.coordinator_probes {
        let mut client = client.clone();
        let mut request = tonic::Request::new(cpb::HealthRequest {});
        request.set_timeout(Duration::from_secs(2));
        match tokio::time::timeout(Duration::from_secs(2), client.health(request)).await {
            Ok(Ok(answer)) => {
                let mut answer = answer.into_inner();
                coordinators.push(CoordinatorHealth {
                    id: id.clone(),
                    addr: addr.clone(),
                    status: "up",
                    error: None,
                    workers: std::mem::take(&mut answer.workers)
                        .into_iter()
                        .map(WorkerView::of)
                        .collect(),
                });
                if replicas.is_none() {
                    outbox = answer.outbox.iter().map(OutboxView::of).collect();
                    hints = answer.hints.iter().map(HintView::of).collect();
                    links = answer
                        .links
                        .iter()
                        .map(|l| LinkView {
                            region: l.region.clone(),
                            state: state_name(l.state()),
                            circuit: circuit_name(l.circuit()),
                            last_ok_ms_ago: l.last_ok_ms_ago,
                            last_error: l.last_error.clone(),
                        })
                        .collect();
                }
                replicas.get_or_insert_with(|| {
                    answer
                        .replicas
                        .into_iter()
                        .map(|r| ReplicaView {
                            state: state_name(r.state()),
                            circuit: circuit_name(r.circuit()),
                            node: r.node,
                            region: r.region,
                            addr: r.addr,
                            last_ok_ms_ago: r.last_ok_ms_ago,
                            last_error: r.last_error,
                        })
                        .collect()
                });
            }
            Ok(Err(status)) => coordinators.push(CoordinatorHealth {
                id: id.clone(),
                addr: addr.clone(),
                status: "down",
                error: Some(status.message().to_string()),
                workers: Vec::new(),
            }),
            Err(_) => coordinators.push(CoordinatorHealth {
                id: id.clone(),
                addr: addr.clone(),
                status: "down",
                error: Some("health check timed out".into()),
                workers: Vec::new(),
            }),
        }
    }
    let replicas = replicas.unwrap_or_default();
    let anti_entropy = anti_entropy.await.ok().flatten();
    let (status, code) = if coordinators.iter().all(|c| c.status == "down") {
        ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
    } else if coordinators.iter().any(|c| c.status == "down")
        || coordinators
            .iter()
            .any(|c| !c.workers.iter().all(WorkerView::is_healthy))
        || replicas.iter().any(|r| r.state != "alive")
        || links.iter().any(|l| l.state != "alive")
        || anti_entropy.as_ref().is_some_and(|w| w.status == "down")
    {
        ("degraded", StatusCode::OK)
    } else {
        ("ok", StatusCode::OK)
    };
    let answer = HealthAnswer {
        status,
        gateway: state.id.clone(),
        region: state.region.clone(),
        coordinators,
        replicas,
        outbox,
        hints,
        links,
        anti_entropy,
    };
    (code, Json(answer)).into_response()
}

/// `GET /metrics` in Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.prometheus {
        Some(handle) => handle.render().into_response(),
        None => ApiError::new(
            ErrorCode::RouteNotFound,
            "metrics are not enabled in this process",
        )
        .into_response(),
    }
}

pub async fn route_not_found() -> ApiError {
    ApiError::new(
        ErrorCode::RouteNotFound,
        "no such route; see the API in README.md",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}
