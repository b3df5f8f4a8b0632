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
    match err.code {
        ErrorCode::Internal => tracing::warn!(code = %err.code, message = %err.message, "request failed"),
        // Its cause is logged where it is found, once per outage.
        ErrorCode::Unavailable => tracing::debug!(code = %err.code, message = %err.message, "request failed"),
        _ => {}
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
        StoreError::QuotaExceeded(msg) => ApiError::new(ErrorCode::QuotaExceeded, msg),
        StoreError::NoRoom(msg) => ApiError::new(ErrorCode::Conflict, msg).with_detail("reason", "capacity"),
        // The job in flight is named, so a client can wait on it and retry.
        StoreError::Busy { job, message } => {
            ApiError::new(ErrorCode::Conflict, message).with_detail("job_id", job.to_string())
        }
        // Lost to concurrent transactions even after the store ran it
        // again: the client may retry.
        StoreError::Contention(source) => {
            tracing::warn!(error = %source, "transaction kept losing to concurrent ones");
            ApiError::new(ErrorCode::Unavailable, "the database is busy; retry later")
                .with_detail(DETAIL_RETRY_AFTER, "1")
        }
        StoreError::Unavailable(source) => {
            // An outage fails every request: one WARN per period says so
            // without burying the log; the rest are at DEBUG.
            if outage_log_due() {
                tracing::warn!(error = %source, "database unavailable; requests get 503 until it is back");
            } else {
                tracing::debug!(error = %source, "database unavailable");
            }
            ApiError::new(ErrorCode::Unavailable, "the database is unavailable; retry later")
                .with_detail(DETAIL_RETRY_AFTER, "1")
        }
        other => {
            tracing::error!(error = ?other, "store failure");
            ApiError::internal()
        }
    }
}

/// Whether a database outage should be logged at WARN now: at most once
/// per [`OUTAGE_LOG_PERIOD_SECS`] per process.
fn outage_log_due() -> bool {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp();
    let last = LAST.load(Ordering::Relaxed);
    now - last >= OUTAGE_LOG_PERIOD_SECS
        && LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

/// Detail key: seconds to wait before retrying.
pub const DETAIL_RETRY_AFTER: &str = "retry_after_seconds";

/// Seconds between WARN lines about one database outage.
const OUTAGE_LOG_PERIOD_SECS: i64 = 10;
