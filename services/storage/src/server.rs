//! The storage node's gRPC service: translates between protobuf messages and
//! [`VersionStore`] calls. No SQL and no replication logic here.

use crate::store::{
    HistoryCursor, Idempotency, MintInput, StoredVersion, VersionPosition, VersionStore,
};
use geolog_core::causal::Dot;
use geolog_core::merkle::{LEAF_DEPTH, LEVEL_BITS};
use geolog_core::{ErrorCode, GeologError, Hlc, JsonText, Key};
use geolog_proto::storage as pb;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// gRPC front of one storage node.
pub struct StorageService {
    store: Arc<VersionStore>,
    region: String,
}

impl StorageService {
    pub fn new(store: Arc<VersionStore>, region: String) -> Self {
        StorageService { store, region }
    }
}

/// Converts a stored version to its wire form.
pub fn to_proto(v: StoredVersion) -> pb::Version {
    pb::Version {
        key: v.key.into_string(),
        value_json: v.value_json.to_bytes(),
        timestamp: Some(pb::Hlc {
            packed: v.hlc.packed(),
        }),
        dot: Some(pb::Dot {
            node: v.dot.node.to_string(),
            seq: v.dot.seq,
        }),
        context: geolog_proto::dots(v.context),
        idempotency_key: v
            .idempotency
            .as_ref()
            .map(|i| i.key.clone())
            .unwrap_or_default(),
        body_hash: v.idempotency.map(|i| i.body_hash).unwrap_or_default(),
    }
}

fn idempotency(key: String, body_hash: String) -> Option<Idempotency> {
    (!key.is_empty()).then_some(Idempotency { key, body_hash })
}

/// Converts and checks a version received from the network.
pub fn from_proto(v: pb::Version) -> Result<StoredVersion, GeologError> {
    let (Some(ts), Some(dot)) = (v.timestamp, v.dot) else {
        return Err(GeologError::new(
            ErrorCode::InvalidRequest,
            "version without timestamp or dot",
        ));
    };
    let key = Key::new(v.key)?;
    let fits = |n: u64| n > 0 && n <= i64::MAX as u64;
    if dot.node.is_empty()
        || !fits(dot.seq)
        || !fits(ts.packed)
        || v.context.iter().any(|d| d.seq > i64::MAX as u64)
    {
        return Err(GeologError::new(
            ErrorCode::InvalidRequest,
            "version with an invalid dot, timestamp or context",
        ));
    }
    let value = JsonText::from_wire(v.value_json)?;
    value
        .check_syntax()
        .map_err(|m| GeologError::new(ErrorCode::InvalidRequest, m))?;
    Ok(StoredVersion {
        key,
        // Its own allocation: the cache may keep it long after the message.
        value_json: value.detached(),
        hlc: Hlc::from_packed(ts.packed),
        dot: Dot::new(dot.node.as_str(), dot.seq),
        context: geolog_proto::vector(v.context),
        idempotency: idempotency(v.idempotency_key, v.body_hash),
    })
}

/// Pending outbox entries or hints on the wire; `target` is the remote
/// region (outbox) or the target node (hints).
fn pending_entries(
    target: &str,
    entries: Vec<(u64, StoredVersion, Vec<StoredVersion>)>,
) -> pb::OutboxPendingResponse {
    pb::OutboxPendingResponse {
        entries: entries
            .into_iter()
            .map(|(id, v, frontier)| pb::OutboxEntry {
                id,
                region: target.to_string(),
                version: Some(to_proto(v)),
                frontier: frontier.into_iter().map(to_proto).collect(),
            })
            .collect(),
    }
}

/// Checks token ranges received from the network.
fn token_ranges(ranges: &[pb::TokenRange]) -> Result<Vec<(i64, i64)>, GeologError> {
    let valid = ranges.len() <= 1_000_000
        && ranges.iter().all(|r| r.low <= r.high)
        && ranges.windows(2).all(|w| w[0].high < w[1].low);
    if valid {
        Ok(ranges.iter().map(|r| (r.low, r.high)).collect())
    } else {
        Err(GeologError::new(
            ErrorCode::InvalidRequest,
            "token ranges must be sorted, disjoint, low <= high, at most 1,000,000",
        ))
    }
}

fn cursor(c: Option<pb::HistoryCursor>) -> Option<HistoryCursor> {
    c.map(|c| HistoryCursor {
        hlc: c.hlc,
        node: c.node,
        seq: c.seq,
    })
}

fn observe(op: &'static str, started: Instant, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::histogram!("storage_request_duration_seconds", "op" => op, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Records per `MintBatch` call.
const MAX_MINT_BATCH: usize = 10_000;

/// Bytes a paged answer carries at most (well under the message limit):
/// the keys of a `ReadMany` past it are answered `ask_alone`, the versions
/// of `BucketVersions` past it come with the next page.
const PAGE_BYTES: usize = geolog_proto::MAX_MESSAGE_BYTES / 4;

/// One record's failure inside a batch answer.
fn record_error(err: &GeologError) -> pb::MintResult {
    pb::MintResult {
        minted: None,
        error: Some(err.to_wire()),
    }
}

/// Logs a store failure where it is handled (here, turned into a status).
fn fail(op: &'static str, err: crate::store::StoreError) -> Status {
    let err = GeologError::from(err);
    if err.code == ErrorCode::Internal {
        tracing::error!(op, error = %err.message, "storage request failed");
    } else {
        tracing::warn!(op, error = %err.message, "storage request failed");
    }
    err.to_status()
}

/// Runs a change of the store to its end even when the caller goes away.
/// tonic drops a handler's future when its client cancels the call (a
/// coordinator's replica timeout, an anti-entropy worker killed mid-pass);
/// a change dropped after PostgreSQL committed it but before the node's
/// memory recorded it (the keys' frontiers, the digest tree) would leave
/// that memory behind the database: reads of those keys missing the
/// version here, digests that never match their replicas'.
async fn to_the_end<T: Send + 'static>(
    change: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(change)
        .await
        .map_err(|e| Status::internal(format!("a store task failed: {e}")))
}

#[tonic::async_trait]
impl pb::storage_server::Storage for StorageService {
    async fn mint_batch(
        &self,
        request: Request<pb::MintBatchRequest>,
    ) -> Result<Response<pb::MintBatchResponse>, Status> {
        let started = Instant::now();
        let records = request.into_inner().records;
        if records.len() > MAX_MINT_BATCH {
            return Err(GeologError::new(
                ErrorCode::InvalidRequest,
                format!("at most {MAX_MINT_BATCH} records per mint batch"),
            )
            .into());
        }
        // Records with an invalid key fail alone; the others are minted.
        let mut results: Vec<Option<pb::MintResult>> = Vec::with_capacity(records.len());
        let mut inputs = Vec::with_capacity(records.len());
        for req in records {
            let checked =
                Key::new(req.key).and_then(|key| Ok((key, JsonText::from_wire(req.value_json)?)));
            let (key, value) = match checked {
                Ok((key, value)) => (key, value.detached()),
                Err(err) => {
                    results.push(Some(record_error(&err)));
                    continue;
                }
            };
            results.push(None);
            inputs.push(MintInput {
                context: req.has_context.then(|| geolog_proto::vector(req.context)),
                key,
                value_json: value,
                outbox_regions: req.outbox_regions,
                idempotency: idempotency(req.idempotency_key, req.body_hash),
            });
        }
        let store = self.store.clone();
        let result = to_the_end(async move { store.mint_batch(inputs).await }).await?;
        observe("mint", started, result.is_ok());
        let mut minted = result.map_err(|e| fail("mint", e))?.into_iter();
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| match minted.next().expect("one result per input") {
                    Ok(minted) => pb::MintResult {
                        minted: Some(pb::MintResponse {
                            version: Some(to_proto(minted.version)),
                            outbox: minted
                                .outbox
                                .into_iter()
                                .map(|(id, region)| pb::OutboxEntry {
                                    id,
                                    region,
                                    ..Default::default()
                                })
                                .collect(),
                            frontier: minted.frontier.into_iter().map(to_proto).collect(),
                            replayed: minted.replayed,
                        }),
                        error: None,
                    },
                    Err(err) => record_error(&GeologError::from(err)),
                })
            })
            .collect();
        Ok(Response::new(pb::MintBatchResponse { results }))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let started = Instant::now();
        let versions = request
            .into_inner()
            .versions
            .into_iter()
            .map(from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.store.clone();
        let result = to_the_end(async move { store.merge(&versions).await }).await?;
        observe("apply", started, result.is_ok());
        let inserted = result.map_err(|e| fail("apply", e))?;
        Ok(Response::new(pb::ApplyResponse {
            inserted: inserted as u32,
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let started = Instant::now();
        let key = Key::new(request.into_inner().key)?;
        let result = self.store.frontier(&key).await;
        observe("read", started, result.is_ok());
        let frontier = result.map_err(|e| fail("read", e))?;
        Ok(Response::new(pb::ReadResponse {
            versions: frontier.into_iter().map(to_proto).collect(),
        }))
    }

    async fn read_many(
        &self,
        request: Request<pb::ReadManyRequest>,
    ) -> Result<Response<pb::ReadManyResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        if req.keys.len() > geolog_proto::MAX_READ_MANY {
            return Err(GeologError::new(
                ErrorCode::InvalidRequest,
                format!("at most {} keys per ReadMany", geolog_proto::MAX_READ_MANY),
            )
            .to_status());
        }
        let keys = req
            .keys
            .into_iter()
            .map(Key::new)
            .collect::<Result<Vec<Key>, _>>()?;
        let keys: Vec<&str> = keys.iter().map(Key::as_str).collect();
        let result = self.store.frontiers(&keys).await;
        observe("read_many", started, result.is_ok());
        let found = result.map_err(|e| fail("read_many", e))?;
        let mut budget = PAGE_BYTES;
        let frontiers = keys
            .iter()
            .map(|key| {
                // A repeated key is answered at each place it was asked.
                let frontier = found.get(*key).cloned().unwrap_or_default();
                let bytes: usize = frontier.iter().map(|v| v.value_json.len() + 64).sum();
                // The first frontier always goes (Read would answer it).
                if bytes > budget && budget < PAGE_BYTES {
                    return pb::KeyFrontier {
                        versions: Vec::new(),
                        ask_alone: true,
                    };
                }
                budget = budget.saturating_sub(bytes);
                pb::KeyFrontier {
                    versions: frontier.into_iter().map(to_proto).collect(),
                    ask_alone: false,
                }
            })
            .collect();
        Ok(Response::new(pb::ReadManyResponse { frontiers }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let key = Key::new(req.key)?;
        let (before, after) = (cursor(req.before), cursor(req.after));
        let limit = req.limit.clamp(1, 1_000);
        let result = self
            .store
            .history(&key, limit, before.as_ref(), after.as_ref())
            .await;
        observe("history", started, result.is_ok());
        let versions = result.map_err(|e| fail("history", e))?;
        Ok(Response::new(pb::HistoryResponse {
            versions: versions.into_iter().map(to_proto).collect(),
        }))
    }

    async fn find_idempotent(
        &self,
        request: Request<pb::FindIdempotentRequest>,
    ) -> Result<Response<pb::FindIdempotentResponse>, Status> {
        let req = request.into_inner();
        let key = Key::new(req.key)?;
        let found = self
            .store
            .find_idempotent(&key, &req.idempotency_key)
            .await
            .map_err(|e| fail("find_idempotent", e))?;
        Ok(Response::new(pb::FindIdempotentResponse {
            versions: found.into_iter().map(to_proto).collect(),
        }))
    }

    async fn digests(
        &self,
        request: Request<pb::DigestsRequest>,
    ) -> Result<Response<pb::DigestsResponse>, Status> {
        let req = request.into_inner();
        if req.depth > LEAF_DEPTH || !req.depth.is_multiple_of(LEVEL_BITS) {
            return Err(GeologError::new(
                ErrorCode::InvalidRequest,
                format!("depth must be a multiple of {LEVEL_BITS}, at most {LEAF_DEPTH}"),
            )
            .into());
        }
        let ranges = token_ranges(&req.ranges)?;
        let digests = self
            .store
            .digests(
                &ranges,
                req.depth,
                (req.before_hlc > 0).then_some(req.before_hlc),
            )
            .await
            .map_err(|e| fail("digests", e))?;
        Ok(Response::new(pb::DigestsResponse {
            digests: digests
                .into_iter()
                .map(|(prefix, digest, versions)| pb::BucketDigest {
                    bucket: Some(pb::Bucket {
                        depth: req.depth,
                        prefix,
                    }),
                    digest,
                    versions,
                })
                .collect(),
        }))
    }

    async fn bucket_versions(
        &self,
        request: Request<pb::BucketVersionsRequest>,
    ) -> Result<Response<pb::BucketVersionsResponse>, Status> {
        let req = request.into_inner();
        let ranges = token_ranges(&req.ranges)?;
        let after = match req.after {
            Some(p) => Some(VersionPosition {
                key: Key::new(p.key)?,
                hlc: p.hlc,
                node: p.node,
                seq: p.seq,
            }),
            None => None,
        };
        let (versions, more) = self
            .store
            .range_versions(&ranges, after.as_ref(), PAGE_BYTES)
            .await
            .map_err(|e| fail("bucket_versions", e))?;
        Ok(Response::new(pb::BucketVersionsResponse {
            versions: versions.into_iter().map(to_proto).collect(),
            more,
        }))
    }

    async fn outbox_pending(
        &self,
        request: Request<pb::OutboxPendingRequest>,
    ) -> Result<Response<pb::OutboxPendingResponse>, Status> {
        let req = request.into_inner();
        let limit = req.limit.clamp(1, 10_000);
        let entries = self
            .store
            .outbox_pending(
                &req.region,
                limit,
                Duration::from_millis(req.min_age_ms),
                (req.window_ms > 0).then(|| Duration::from_millis(req.window_ms)),
            )
            .await
            .map_err(|e| fail("outbox_pending", e))?;
        Ok(Response::new(pending_entries(&req.region, entries)))
    }

    async fn store_hints(
        &self,
        request: Request<pb::StoreHintsRequest>,
    ) -> Result<Response<pb::StoreHintsResponse>, Status> {
        let req = request.into_inner();
        let versions = req
            .versions
            .into_iter()
            .map(from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let stored = self
            .store
            .store_hints(&req.target, &versions)
            .await
            .map_err(|e| fail("store_hints", e))?;
        Ok(Response::new(pb::StoreHintsResponse {
            stored: stored as u32,
        }))
    }

    async fn hint_pending(
        &self,
        request: Request<pb::HintPendingRequest>,
    ) -> Result<Response<pb::OutboxPendingResponse>, Status> {
        let req = request.into_inner();
        let entries = self
            .store
            .hint_pending(&req.target, req.limit.clamp(1, 10_000))
            .await
            .map_err(|e| fail("hint_pending", e))?;
        Ok(Response::new(pending_entries(&req.target, entries)))
    }

    async fn hint_done(
        &self,
        request: Request<pb::OutboxDoneRequest>,
    ) -> Result<Response<pb::OutboxDoneResponse>, Status> {
        let deleted = self
            .store
            .hints_done(&request.into_inner().ids)
            .await
            .map_err(|e| fail("hint_done", e))?;
        Ok(Response::new(pb::OutboxDoneResponse {
            deleted: deleted as u32,
        }))
    }

    async fn hint_stats(
        &self,
        _: Request<pb::HintStatsRequest>,
    ) -> Result<Response<pb::HintStatsResponse>, Status> {
        let stats = self
            .store
            .hint_stats()
            .await
            .map_err(|e| fail("hint_stats", e))?;
        Ok(Response::new(pb::HintStatsResponse {
            targets: stats
                .into_iter()
                .map(|(target, pending, oldest_age_ms)| pb::HintTargetStats {
                    target,
                    pending,
                    oldest_age_ms,
                })
                .collect(),
        }))
    }

    async fn outbox_done(
        &self,
        request: Request<pb::OutboxDeliveredRequest>,
    ) -> Result<Response<pb::OutboxDoneResponse>, Status> {
        let mut by_region: HashMap<String, Vec<u64>> = HashMap::new();
        for entry in request.into_inner().entries {
            by_region.entry(entry.region).or_default().push(entry.id);
        }
        let recorded: u64 = by_region
            .iter()
            .map(|(region, seqs)| self.store.outbox_delivered(region, seqs))
            .sum();
        Ok(Response::new(pb::OutboxDoneResponse {
            deleted: recorded as u32,
        }))
    }

    async fn outbox_stats(
        &self,
        _: Request<pb::OutboxStatsRequest>,
    ) -> Result<Response<pb::OutboxStatsResponse>, Status> {
        let stats = self
            .store
            .outbox_stats()
            .await
            .map_err(|e| fail("outbox_stats", e))?;
        Ok(Response::new(pb::OutboxStatsResponse {
            regions: stats
                .into_iter()
                .map(|(region, depth, oldest_age_ms)| pb::OutboxRegionStats {
                    region,
                    depth,
                    oldest_age_ms,
                })
                .collect(),
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let database_ok = self.store.ping(Duration::from_millis(300)).await;
        Ok(Response::new(pb::HealthResponse {
            node: self.store.node().to_string(),
            region: self.region.clone(),
            database_ok,
        }))
    }
}
