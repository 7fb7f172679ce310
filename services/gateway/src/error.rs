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
        if status.details().is_empty() && err.code == ErrorCode::Unavailable {
            err.message = format!("no coordinator reachable: {}", status.message());
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
