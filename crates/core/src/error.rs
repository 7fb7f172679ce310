//! The one error vocabulary of geolog. Every failure a client can see has a
//! stable [`ErrorCode`]; this module is the only place that maps a code to a
//! gRPC code and an HTTP status, in one exhaustive `match` each, so the two
//! transports can never disagree.

use prost::Message;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The error's wire form, generated from `proto/error.proto` (the service
/// protos embed these types from here).
#[allow(clippy::all, missing_docs)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/geolog.error.v1.rs"));
}

/// Stable, machine-readable error codes. The `snake_case` names are part of
/// the public API: never rename one, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body is not valid JSON or not the expected shape.
    InvalidJson,
    /// The key is empty, longer than 512 bytes, or contains a NUL character.
    InvalidKey,
    /// The consistency level is unknown or not allowed for this operation.
    InvalidConsistency,
    /// The context token is not one a read returned.
    InvalidContext,
    /// Some other part of the request (query parameter, header) is invalid.
    InvalidRequest,
    /// The body exceeds the configured limit.
    PayloadTooLarge,
    /// The body's `Content-Encoding` or `Content-Type` is not one accepted.
    UnsupportedMediaType,
    /// The key has no versions at the requested level.
    NotFound,
    /// The idempotency key was used before with a different request.
    IdempotencyConflict,
    /// No such route.
    RouteNotFound,
    /// The route exists but not for this HTTP method.
    MethodNotAllowed,
    /// Not enough replicas are alive (or answered without error) to meet the level.
    Unavailable,
    /// Replicas did not acknowledge in time.
    Timeout,
    /// The service sheds load: too many requests in flight.
    Overloaded,
    /// A bug or an unexpected failure; never caused by client input.
    Internal,
}

impl ErrorCode {
    /// The stable wire name, e.g. `"invalid_key"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::InvalidConsistency => "invalid_consistency",
            ErrorCode::InvalidContext => "invalid_context",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::NotFound => "not_found",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::RouteNotFound => "route_not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status for this code.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidKey
            | ErrorCode::InvalidConsistency
            | ErrorCode::InvalidContext
            | ErrorCode::InvalidRequest => S::BAD_REQUEST,
            ErrorCode::PayloadTooLarge => S::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => S::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::NotFound | ErrorCode::RouteNotFound => S::NOT_FOUND,
            ErrorCode::IdempotencyConflict => S::CONFLICT,
            ErrorCode::MethodNotAllowed => S::METHOD_NOT_ALLOWED,
            ErrorCode::Unavailable | ErrorCode::Overloaded => S::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout => S::GATEWAY_TIMEOUT,
            ErrorCode::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC code for this code.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code as C;
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidKey
            | ErrorCode::InvalidConsistency
            | ErrorCode::InvalidContext
            | ErrorCode::InvalidRequest
            | ErrorCode::UnsupportedMediaType => C::InvalidArgument,
            ErrorCode::PayloadTooLarge | ErrorCode::Overloaded => C::ResourceExhausted,
            ErrorCode::NotFound | ErrorCode::RouteNotFound => C::NotFound,
            ErrorCode::IdempotencyConflict => C::AlreadyExists,
            ErrorCode::MethodNotAllowed => C::Unimplemented,
            ErrorCode::Unavailable => C::Unavailable,
            ErrorCode::Timeout => C::DeadlineExceeded,
            ErrorCode::Internal => C::Internal,
        }
    }

    /// Best guess for a status that carries no geolog details (a transport
    /// failure or a peer that is not geolog).
    fn from_bare_grpc(code: tonic::Code) -> ErrorCode {
        use tonic::Code as C;
        match code {
            C::InvalidArgument => ErrorCode::InvalidRequest,
            C::NotFound => ErrorCode::NotFound,
            C::Unavailable | C::Cancelled | C::Aborted => ErrorCode::Unavailable,
            C::DeadlineExceeded => ErrorCode::Timeout,
            C::ResourceExhausted => ErrorCode::Overloaded,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<ErrorCode> for wire::ErrorCode {
    fn from(code: ErrorCode) -> Self {
        use wire::ErrorCode as W;
        match code {
            ErrorCode::InvalidJson => W::InvalidJson,
            ErrorCode::InvalidKey => W::InvalidKey,
            ErrorCode::InvalidConsistency => W::InvalidConsistency,
            ErrorCode::InvalidContext => W::InvalidContext,
            ErrorCode::InvalidRequest => W::InvalidRequest,
            ErrorCode::PayloadTooLarge => W::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType => W::UnsupportedMediaType,
            ErrorCode::NotFound => W::NotFound,
            ErrorCode::IdempotencyConflict => W::IdempotencyConflict,
            ErrorCode::RouteNotFound => W::RouteNotFound,
            ErrorCode::MethodNotAllowed => W::MethodNotAllowed,
            ErrorCode::Unavailable => W::Unavailable,
            ErrorCode::Timeout => W::Timeout,
            ErrorCode::Overloaded => W::Overloaded,
            ErrorCode::Internal => W::Internal,
        }
    }
}

impl ErrorCode {
    /// The code a wire code stands for; none for `UNSPECIFIED`.
    fn from_wire(code: wire::ErrorCode) -> Option<ErrorCode> {
        use wire::ErrorCode as W;
        Some(match code {
            W::Unspecified => return None,
            W::InvalidJson => ErrorCode::InvalidJson,
            W::InvalidKey => ErrorCode::InvalidKey,
            W::InvalidConsistency => ErrorCode::InvalidConsistency,
            W::InvalidContext => ErrorCode::InvalidContext,
            W::InvalidRequest => ErrorCode::InvalidRequest,
            W::PayloadTooLarge => ErrorCode::PayloadTooLarge,
            W::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            W::NotFound => ErrorCode::NotFound,
            W::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            W::RouteNotFound => ErrorCode::RouteNotFound,
            W::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            W::Unavailable => ErrorCode::Unavailable,
            W::Timeout => ErrorCode::Timeout,
            W::Overloaded => ErrorCode::Overloaded,
            W::Internal => ErrorCode::Internal,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a request got towards its consistency level, attached to
/// `unavailable` and `timeout` errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumDetails {
    /// Replicas the level needs.
    pub required: u32,
    /// Replicas believed alive before sending (fail-fast case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive: Option<u32>,
    /// Replicas that acknowledged (after sending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u32>,
    /// The same, per region, where the level counts per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionDetails>,
}

/// Per-region part of [`QuorumDetails`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDetails {
    pub region: String,
    pub required: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u32>,
}

/// An error with a stable code, a human message and optional quorum details.
/// This is what crosses service boundaries (as gRPC status details) and what
/// the gateway renders as `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct GeologError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none", flatten)]
    pub quorum: Option<QuorumDetails>,
}

impl GeologError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        GeologError {
            code,
            message: message.into(),
            quorum: None,
        }
    }

    pub fn with_quorum(mut self, quorum: QuorumDetails) -> Self {
        self.quorum = Some(quorum);
        self
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// The form that crosses services (`proto/error.proto`): in gRPC
    /// status details and as the error of one record of a batch answer.
    pub fn to_wire(&self) -> wire::Error {
        let quorum = self.quorum.as_ref().map(|q| wire::QuorumDetails {
            required: q.required,
            alive: q.alive,
            received: q.received,
            regions: q
                .regions
                .iter()
                .map(|r| wire::RegionDetails {
                    region: r.region.clone(),
                    required: r.required,
                    alive: r.alive,
                    received: r.received,
                })
                .collect(),
        });
        wire::Error {
            code: wire::ErrorCode::from(self.code).into(),
            message: self.message.clone(),
            quorum,
        }
    }

    /// Reads [`GeologError::to_wire`]; a code this version does not know
    /// (a newer peer's) is `internal`, with the message kept.
    pub fn from_wire(err: wire::Error) -> Self {
        let code = wire::ErrorCode::try_from(err.code)
            .ok()
            .and_then(ErrorCode::from_wire)
            .unwrap_or(ErrorCode::Internal);
        let quorum = err.quorum.map(|q| QuorumDetails {
            required: q.required,
            alive: q.alive,
            received: q.received,
            regions: q
                .regions
                .into_iter()
                .map(|r| RegionDetails {
                    region: r.region,
                    required: r.required,
                    alive: r.alive,
                    received: r.received,
                })
                .collect(),
        });
        GeologError {
            code,
            message: err.message,
            quorum,
        }
    }

    /// Encodes this error as a gRPC status whose details carry its wire
    /// form, so the receiving side recovers the exact code and quorum
    /// details.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::with_details(
            self.code.grpc_code(),
            self.message.clone(),
            self.to_wire().encode_to_vec().into(),
        )
    }

    /// Decodes a gRPC status produced by [`GeologError::to_status`], or maps a
    /// bare status (transport failure, a peer that is not geolog) to the
    /// closest code.
    pub fn from_status(status: &tonic::Status) -> Self {
        if !status.details().is_empty()
            && let Ok(err) = wire::Error::decode(status.details())
        {
            return GeologError::from_wire(err);
        }
        GeologError::new(
            ErrorCode::from_bare_grpc(status.code()),
            status.message().to_string(),
        )
    }
}

impl From<GeologError> for tonic::Status {
    fn from(err: GeologError) -> Self {
        err.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_and_details() {
        let err = GeologError::new(ErrorCode::Timeout, "slow").with_quorum(QuorumDetails {
            required: 3,
            received: Some(1),
            ..Default::default()
        });
        assert_eq!(GeologError::from_status(&err.to_status()), err);
    }

    #[test]
    fn every_code_and_every_detail_survive_the_wire() {
        let codes = [
            ErrorCode::InvalidJson,
            ErrorCode::InvalidKey,
            ErrorCode::InvalidConsistency,
            ErrorCode::InvalidContext,
            ErrorCode::InvalidRequest,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::NotFound,
            ErrorCode::IdempotencyConflict,
            ErrorCode::RouteNotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Overloaded,
            ErrorCode::Internal,
        ];
        let mut numbers = std::collections::BTreeSet::new();
        for code in codes {
            let number = i32::from(wire::ErrorCode::from(code));
            assert!(number > 0 && numbers.insert(number), "{code}: {number}");
            let err =
                GeologError::new(code, format!("{code} happened")).with_quorum(QuorumDetails {
                    required: 2,
                    alive: Some(1),
                    received: None,
                    regions: vec![RegionDetails {
                        region: "b".into(),
                        required: 2,
                        alive: None,
                        received: Some(0),
                    }],
                });
            assert_eq!(GeologError::from_status(&err.to_status()), err);
            assert_eq!(GeologError::from_wire(err.to_wire()), err);
        }
    }

    #[test]
    fn a_code_from_a_newer_peer_is_internal_with_its_message() {
        let newer = wire::Error {
            code: 999,
            message: "something new".into(),
            quorum: None,
        };
        let err = GeologError::from_wire(newer);
        assert_eq!(
            (err.code, err.message.as_str()),
            (ErrorCode::Internal, "something new")
        );
        let none = GeologError::from_wire(wire::Error::default());
        assert_eq!(none.code, ErrorCode::Internal);
    }

    #[test]
    fn bare_transport_status_maps_to_unavailable() {
        let err = GeologError::from_status(&tonic::Status::unavailable("connection refused"));
        assert_eq!(err.code, ErrorCode::Unavailable);
    }

    #[test]
    fn client_errors_are_4xx_and_never_5xx() {
        for code in [
            ErrorCode::InvalidJson,
            ErrorCode::InvalidKey,
            ErrorCode::InvalidConsistency,
            ErrorCode::InvalidContext,
            ErrorCode::InvalidRequest,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
        ] {
            assert!(code.http_status().is_client_error(), "{code}");
        }
    }
}
