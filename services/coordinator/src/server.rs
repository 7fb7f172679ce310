//! The coordinator's gRPC service: decodes requests, calls the engine,
//! encodes outcomes and errors. Errors are logged here, where handled.

use crate::engine::{Outcome, QuorumEngine, observed};
use geolog_core::{ErrorCode, GeologError};
use geolog_proto::coordinator as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CoordinatorService {
    id: String,
    engine: Arc<QuorumEngine>,
}

impl CoordinatorService {
    pub fn new(id: String, engine: Arc<QuorumEngine>) -> Self {
        CoordinatorService { id, engine }
    }
}

fn acks(outcome: &Outcome) -> pb::Acks {
    pb::Acks {
        required: outcome.acks.required,
        received: outcome.acks.received.unwrap_or(0),
        regions: outcome
            .acks
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
    match err.code {
        ErrorCode::Internal => tracing::error!(op, key, error = %err.message, "request failed"),
        ErrorCode::Unavailable | ErrorCode::Timeout => {
            tracing::warn!(op, key, error = %err.message, "request failed")
        }
        _ => tracing::debug!(op, key, error = %err.message, "request rejected"),
    }
    err.to_status()
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        let level = self
            .engine
            .level(&req.consistency)
            .map_err(|e| fail("write", &req.key, e))?;
        let outcome = observed(
            "write",
            level.as_str(),
            self.engine.write(&req.key, &req.value_json, level),
        )
        .await
        .map_err(|e| fail("write", &req.key, e))?;
        Ok(Response::new(pb::WriteResponse {
            acks: Some(acks(&outcome)),
            consistency: outcome.level.to_string(),
            version: outcome.version,
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let req = request.into_inner();
        let level = self
            .engine
            .level(&req.consistency)
            .map_err(|e| fail("read", &req.key, e))?;
        let outcome = observed("read", level.as_str(), self.engine.read(&req.key, level))
            .await
            .map_err(|e| fail("read", &req.key, e))?;
        Ok(Response::new(pb::ReadResponse {
            acks: Some(acks(&outcome)),
            consistency: outcome.level.to_string(),
            version: outcome.version,
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let replicas = self
            .engine
            .replicas()
            .all()
            .map(|r| pb::ReplicaHealth {
                node: r.node.clone(),
                region: r.region.clone(),
                addr: r.addr.clone(),
                state: if r.state.is_alive() { "alive" } else { "dead" }.to_string(),
                last_ok_ms_ago: r.state.last_ok_ago_ms(),
                last_error: r.state.last_error(),
            })
            .collect();
        Ok(Response::new(pb::HealthResponse {
            coordinator: self.id.clone(),
            region: self.engine.region().to_string(),
            replicas,
        }))
    }
}
