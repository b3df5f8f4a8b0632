//! Where core's internal errors become the API's [`ApiError`], and where an
//! `ApiError` becomes a gRPC status carrying the request's trace id. Handlers
//! return `ApiError`; nothing else in core builds a `tonic::Status`.

use hcp_proto::error::{ApiError, DETAIL_TRACE_ID, ErrorCode};

use crate::store::StoreError;

/// Encodes an API error as a gRPC status, adding the current trace id.
pub fn status(err: ApiError) -> tonic::Status {
    let err = match hcp_telemetry::current_trace_id() {
        Some(trace) if !err.details.contains_key(DETAIL_TRACE_ID) => err.with_detail(DETAIL_TRACE_ID, trace),
        _ => err,
    };
    if err.code == ErrorCode::Internal || err.code == ErrorCode::Unavailable {
        tracing::warn!(code = %err.code, message = %err.message, "request failed");
    }
    err.to_status()
}

/// Maps a store error for a request about `what` (e.g. "vm 0190...").
/// Internal causes are logged with their chain and hidden from the caller.
pub fn from_store(err: StoreError, what: &str) -> ApiError {
    match err {
        StoreError::NotFound => ApiError::new(ErrorCode::NotFound, format!("{what} not found")),
        StoreError::AlreadyExists { what } => {
            ApiError::new(ErrorCode::AlreadyExists, format!("{what} already exists"))
        }
        StoreError::Conflict(msg) => ApiError::new(ErrorCode::Conflict, msg),
        StoreError::Unavailable(source) => {
            tracing::error!(error = %source, "database unavailable");
            ApiError::new(ErrorCode::Unavailable, "the database is unavailable; retry later")
        }
        other => {
            tracing::error!(error = ?other, "store failure");
            ApiError::internal()
        }
    }
}
