//! `ApiError`: how every failure leaves the gateway —
//! `{"error": {"code", "message", ...quorum details}}` with the status the
//! shared vocabulary assigns to the code.

use axum::Json;
use axum::response::{IntoResponse, Response};
use geolog_core::{ErrorCode, GeologError};

/// `{"error": {...}}`, fields in declaration order (unlike `json!`, which sorts).
#[derive(serde::Serialize)]
struct ErrorEnvelope<'a> {
    error: &'a GeologError,
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub GeologError);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(GeologError::new(code, message))
    }
}

impl From<GeologError> for ApiError {
    fn from(err: GeologError) -> Self {
        ApiError(err)
    }
}

impl From<tonic::Status> for ApiError {
    /// A coordinator answer or a transport failure reaching it.
    fn from(status: tonic::Status) -> Self {
        let mut err = GeologError::from_status(&status);
        if status.details().is_empty() {
            // Not the coordinator's answer (it always sends its error's
            // details): the call to it failed. A connection that broke
            // mid-call (the coordinator killed) reads as `Unknown`: the
            // request may or may not have been carried out — `503`, to be
            // retried (with an idempotency key), never a `500`.
            if status.code() == tonic::Code::Unknown {
                err.code = ErrorCode::Unavailable;
                err.message = format!(
                    "the coordinator call failed ({}); the request may or may not have been carried out: retry it (with the same idempotency key)",
                    status.message()
                );
            } else if err.code == ErrorCode::Unavailable {
                err.message = format!("no coordinator reachable: {}", status.message());
            }
        }
        ApiError(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.0.code.http_status();
        if status.is_server_error() && self.0.code == ErrorCode::Internal {
            tracing::error!(code = %self.0.code, message = %self.0.message, "request failed");
        }
        let mut response = (status, Json(ErrorEnvelope { error: &self.0 })).into_response();
        if self.0.code == ErrorCode::PayloadTooLarge {
            // The rest of the body was not read, so this connection cannot
            // carry another request; say so, or a client may reuse it.
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_call_to_the_coordinator_is_a_503_not_a_500() {
        let broken = ApiError::from(tonic::Status::unknown("transport error"));
        assert_eq!(broken.0.code, ErrorCode::Unavailable);
        assert!(
            broken.0.message.contains("may or may not"),
            "{}",
            broken.0.message
        );
        let refused = ApiError::from(tonic::Status::unavailable("tcp connect error"));
        assert_eq!(refused.0.code, ErrorCode::Unavailable);
        // The coordinator's own errors keep their code.
        let own = ApiError::from(GeologError::internal("a bug").to_status());
        assert_eq!(own.0.code, ErrorCode::Internal);
    }
}
