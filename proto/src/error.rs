//! The one error taxonomy of HCP's northbound API.
//!
//! Every layer has its own error type; at the edge each becomes an
//! [`ApiError`], whose [`ErrorCode`] is mapped exactly once to a gRPC code
//! ([`ErrorCode::grpc_code`]) and once to an HTTP status
//! ([`ErrorCode::http_status`]). On the wire an `ApiError` travels as a gRPC
//! status with a `google.rpc.ErrorInfo` detail (domain [`ERROR_DOMAIN`],
//! reason = the code's name, metadata = the details), so gRPC clients and the
//! REST gateway read the same code, message and details.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;

use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of HCP errors.
pub const ERROR_DOMAIN: &str = "hcp.dev";

/// Detail key naming the request field an INVALID_ARGUMENT is about.
pub const DETAIL_FIELD: &str = "field";
/// Detail key naming the capability a FEATURE_NOT_SUPPORTED is about.
pub const DETAIL_CAPABILITY: &str = "capability";
/// Detail key carrying the trace id of the request that failed.
pub const DETAIL_TRACE_ID: &str = "trace_id";

/// What went wrong, from the caller's point of view. A deliberately small set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed; `details.field` names the field.
    InvalidArgument,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials without the needed role.
    PermissionDenied,
    /// No such resource, or not one the caller may see.
    NotFound,
    /// The resource's current state does not allow the operation.
    Conflict,
    /// A resource with that name already exists.
    AlreadyExists,
    /// No provider for the request has the capability it needs;
    /// `details.capability` names it.
    FeatureNotSupported,
    /// The project's quota does not allow the request.
    QuotaExceeded,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
    /// The hypervisor provider could not be reached or is not ready.
    ProviderUnavailable,
    /// The hypervisor provider refused or failed the operation.
    ProviderError,
    /// A dependency of HCP (database, queue) is down; retry later.
    Unavailable,
    /// The operation did not finish in time.
    DeadlineExceeded,
    /// A bug or an unexpected failure inside HCP.
    Internal,
}

impl ErrorCode {
    /// Every code, for tables and tests.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidArgument,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::AlreadyExists,
        ErrorCode::FeatureNotSupported,
        ErrorCode::QuotaExceeded,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::ProviderUnavailable,
        ErrorCode::ProviderError,
        ErrorCode::Unavailable,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Internal,
    ];

    /// The code's wire name, as in the REST body's `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::FeatureNotSupported => "FEATURE_NOT_SUPPORTED",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            ErrorCode::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            ErrorCode::ProviderError => "PROVIDER_ERROR",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// Parses a wire name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == name)
    }

    /// The gRPC status code for this error. The only such mapping.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::Conflict => Code::FailedPrecondition,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FeatureNotSupported => Code::FailedPrecondition,
            ErrorCode::QuotaExceeded => Code::ResourceExhausted,
            ErrorCode::IdempotencyKeyReused => Code::FailedPrecondition,
            ErrorCode::ProviderUnavailable => Code::Unavailable,
            ErrorCode::ProviderError => Code::Internal,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The HTTP status for this error. The only such mapping.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::FeatureNotSupported => StatusCode::CONFLICT,
            ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ProviderUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ProviderError => StatusCode::BAD_GATEWAY,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code a gRPC status maps to when it carries no HCP detail (a
    /// failure of the transport, or of a peer that is not HCP).
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::PermissionDenied => ErrorCode::PermissionDenied,
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists => ErrorCode::AlreadyExists,
            Code::FailedPrecondition | Code::Aborted => ErrorCode::Conflict,
            Code::Unimplemented => ErrorCode::FeatureNotSupported,
            Code::ResourceExhausted => ErrorCode::QuotaExceeded,
            Code::Unavailable => ErrorCode::Unavailable,
            Code::DeadlineExceeded | Code::Cancelled => ErrorCode::DeadlineExceeded,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the API caller sees it: a code, a message safe to show, and
/// details (the field, the capability, the trace id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The taxonomy code.
    pub code: ErrorCode,
    /// Lowercase message for the caller; never internal details.
    pub message: String,
    /// Structured details, e.g. `field` for INVALID_ARGUMENT.
    pub details: BTreeMap<String, String>,
}

impl ApiError {
    /// Returns an error with no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), details: BTreeMap::new() }
    }

    /// Returns an INVALID_ARGUMENT naming `field`.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message).with_detail(DETAIL_FIELD, field)
    }

    /// Returns a NOT_FOUND for a resource of `kind`.
    pub fn not_found(kind: &str, id: impl fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} {id} not found"))
    }

    /// Returns a CONFLICT.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// Returns a FEATURE_NOT_SUPPORTED naming `capability`.
    pub fn feature_not_supported(capability: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FeatureNotSupported, message).with_detail(DETAIL_CAPABILITY, capability)
    }

    /// Returns an INTERNAL error with a generic message; the cause is for
    /// logs only.
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error")
    }

    /// Adds one detail.
    pub fn with_detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Encodes the error as a gRPC status with an `ErrorInfo` detail (and a
    /// `BadRequest` field violation for INVALID_ARGUMENT).
    pub fn to_status(&self) -> tonic::Status {
        let mut details = ErrorDetails::new();
        let metadata: HashMap<String, String> =
            self.details.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        details.set_error_info(self.code.as_str(), ERROR_DOMAIN, metadata);
        if let Some(field) = self.details.get(DETAIL_FIELD) {
            details.add_bad_request_violation(field.clone(), self.message.clone());
        }
        tonic::Status::with_error_details(self.code.grpc_code(), self.message.clone(), details)
    }

    /// Decodes a gRPC status. A status without an HCP `ErrorInfo` (from the
    /// transport or a foreign peer) is classified by its gRPC code.
    pub fn from_status(status: &tonic::Status) -> Self {
        let parsed = status.get_error_details();
        if let Some(info) = parsed.error_info()
            && info.domain == ERROR_DOMAIN
            && let Some(code) = ErrorCode::from_name(&info.reason)
        {
            return Self {
                code,
                message: status.message().to_owned(),
                details: info.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            };
        }
        Self::new(ErrorCode::from_grpc_code(status.code()), status.message().to_owned())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_a_grpc_status() {
        for &code in ErrorCode::ALL {
            let err = ApiError::new(code, "boom").with_detail("k", "v");
            let back = ApiError::from_status(&err.to_status());
            assert_eq!(back, err, "{code}");
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
    }

    #[test]
    fn http_and_grpc_tables() {
        let check = |code: ErrorCode, http: u16, grpc: tonic::Code| {
            assert_eq!(code.http_status().as_u16(), http, "{code}");
            assert_eq!(code.grpc_code(), grpc, "{code}");
        };
        check(ErrorCode::InvalidArgument, 400, tonic::Code::InvalidArgument);
        check(ErrorCode::Unauthenticated, 401, tonic::Code::Unauthenticated);
        check(ErrorCode::PermissionDenied, 403, tonic::Code::PermissionDenied);
        check(ErrorCode::NotFound, 404, tonic::Code::NotFound);
        check(ErrorCode::Conflict, 409, tonic::Code::FailedPrecondition);
        check(ErrorCode::FeatureNotSupported, 409, tonic::Code::FailedPrecondition);
        check(ErrorCode::QuotaExceeded, 429, tonic::Code::ResourceExhausted);
        check(ErrorCode::IdempotencyKeyReused, 422, tonic::Code::FailedPrecondition);
        check(ErrorCode::Unavailable, 503, tonic::Code::Unavailable);
    }

    #[test]
    fn foreign_status_is_classified_by_code() {
        let s = tonic::Status::unavailable("connection refused");
        assert_eq!(ApiError::from_status(&s).code, ErrorCode::Unavailable);
        let s = tonic::Status::unknown("x");
        assert_eq!(ApiError::from_status(&s).code, ErrorCode::Internal);
    }
}
