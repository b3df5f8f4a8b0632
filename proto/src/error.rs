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
/// Detail key listing the HTTP methods a path has, for a
/// METHOD_NOT_ALLOWED (`GET, POST`).
pub const DETAIL_ALLOW: &str = "allow";
/// Detail key carrying the trace id of the request that failed.
pub const DETAIL_TRACE_ID: &str = "trace_id";

/// Longest error message, in bytes. Longer messages are cut at a character
/// boundary and end with `…`. An error travels in HTTP/2 headers
/// (`grpc-message`, percent-encoded, and `grpc-status-details-bin`), so an
/// unbounded message built from a caller's input could exceed what the peer
/// accepts and break the connection every other request shares.
pub const MAX_MESSAGE_BYTES: usize = 512;
/// Longest detail key or value, in bytes; cut like messages.
pub const MAX_DETAIL_BYTES: usize = 256;
/// Most details on one error.
pub const MAX_DETAILS: usize = 8;
/// How much of a caller's value an error message quotes, in characters.
pub const EXCERPT_CHARS: usize = 40;

/// Quotes a caller's value for an error message: the whole value when it is
/// short, else its first [`EXCERPT_CHARS`] characters and its length, so an
/// error never echoes a long input back.
///
/// ```
/// use hcp_proto::error::excerpt;
/// assert_eq!(excerpt("web-1"), r#""web-1""#);
/// assert_eq!(excerpt(&"a".repeat(5000)), format!("\"{}…\" (5000 bytes)", "a".repeat(40)));
/// ```
pub fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => {
            let quoted = format!("{:?}", &value[..cut]);
            format!("{}…\" ({} bytes)", &quoted[..quoted.len() - 1], value.len())
        }
    }
}

/// Cuts `text` to at most `max` bytes at a character boundary, marking a cut
/// with `…`.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max - '…'.len_utf8();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push('…');
    text
}

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
    /// The path exists, but not for the request's HTTP method;
    /// `details.allow` lists the methods it has (the REST answer carries
    /// them in `Allow` as well).
    MethodNotAllowed,
    /// The resource's current state does not allow the operation.
    Conflict,
    /// A resource with that name already exists.
    AlreadyExists,
    /// No provider for the request has the capability it needs;
    /// `details.capability` names it.
    FeatureNotSupported,
    /// The project's quota does not allow the request.
    QuotaExceeded,
    /// The caller sent too many requests in a short time; retry after the
    /// time the answer names. Not a quota: nothing was used up.
    RateLimited,
    /// The request body is larger than HCP accepts; `details.field` names
    /// the part (`body`).
    PayloadTooLarge,
    /// The request's path or query is longer than HCP accepts;
    /// `details.field` names the part (`path` or `query`).
    UriTooLong,
    /// The request's headers are larger than HCP accepts; `details.field`
    /// names the header when one is to blame.
    HeadersTooLarge,
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
    /// The operation was cancelled before it finished (a job's outcome,
    /// never the answer to a request).
    Cancelled,
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
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::AlreadyExists,
        ErrorCode::FeatureNotSupported,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UriTooLong,
        ErrorCode::HeadersTooLarge,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::ProviderUnavailable,
        ErrorCode::ProviderError,
        ErrorCode::Unavailable,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
    ];

    /// The code's wire name, as in the REST body's `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::FeatureNotSupported => "FEATURE_NOT_SUPPORTED",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UriTooLong => "URI_TOO_LONG",
            ErrorCode::HeadersTooLarge => "HEADERS_TOO_LARGE",
            ErrorCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            ErrorCode::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            ErrorCode::ProviderError => "PROVIDER_ERROR",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorCode::Cancelled => "CANCELLED",
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
            ErrorCode::MethodNotAllowed => Code::Unimplemented,
            ErrorCode::Conflict => Code::FailedPrecondition,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FeatureNotSupported => Code::FailedPrecondition,
            ErrorCode::QuotaExceeded => Code::ResourceExhausted,
            ErrorCode::RateLimited => Code::ResourceExhausted,
            ErrorCode::PayloadTooLarge => Code::InvalidArgument,
            ErrorCode::UriTooLong => Code::InvalidArgument,
            ErrorCode::HeadersTooLarge => Code::InvalidArgument,
            ErrorCode::IdempotencyKeyReused => Code::FailedPrecondition,
            ErrorCode::ProviderUnavailable => Code::Unavailable,
            ErrorCode::ProviderError => Code::Internal,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorCode::Cancelled => Code::Cancelled,
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
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::FeatureNotSupported => StatusCode::CONFLICT,
            ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorCode::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ProviderUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ProviderError => StatusCode::BAD_GATEWAY,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Cancelled => StatusCode::CONFLICT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code a gRPC status maps to when it carries no HCP `ErrorInfo`.
    /// Core puts one on every error it answers, so such a status was made
    /// by the transport (a broken connection, a refused stream, a header
    /// the peer would not take) or by a peer that is not HCP: the caller's
    /// request was not judged, so the answer is "retry later", never a
    /// verdict such as QUOTA_EXCEEDED or INTERNAL.
    pub fn for_foreign_status(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::DeadlineExceeded | Code::Cancelled => ErrorCode::DeadlineExceeded,
            _ => ErrorCode::Unavailable,
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
    /// Returns an error with no details. The message is cut to
    /// [`MAX_MESSAGE_BYTES`].
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: bounded(message.into(), MAX_MESSAGE_BYTES), details: BTreeMap::new() }
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

    /// Adds one detail, cut to [`MAX_DETAIL_BYTES`]; past [`MAX_DETAILS`]
    /// details, new keys are dropped.
    pub fn with_detail(mut self, key: &str, value: impl Into<String>) -> Self {
        let key = bounded(key.to_owned(), MAX_DETAIL_BYTES);
        if self.details.len() < MAX_DETAILS || self.details.contains_key(&key) {
            self.details.insert(key, bounded(value.into(), MAX_DETAIL_BYTES));
        }
        self
    }

    /// The same error with every part within its bound (the fields are
    /// public, so an error built by hand may exceed them).
    pub fn bounded(self) -> Self {
        let mut out = Self::new(self.code, self.message);
        for (k, v) in self.details {
            out = out.with_detail(&k, v);
        }
        out
    }

    /// Encodes the error as a gRPC status with an `ErrorInfo` detail (and a
    /// `BadRequest` field violation for INVALID_ARGUMENT).
    pub fn to_status(&self) -> tonic::Status {
        let this = self.clone().bounded();
        let mut details = ErrorDetails::new();
        let metadata: HashMap<String, String> =
            this.details.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        details.set_error_info(this.code.as_str(), ERROR_DOMAIN, metadata);
        if let Some(field) = this.details.get(DETAIL_FIELD) {
            details.add_bad_request_violation(field.clone(), this.message.clone());
        }
        tonic::Status::with_error_details(this.code.grpc_code(), this.message.clone(), details)
    }

    /// Decodes a gRPC status, within the bounds. A status without an HCP
    /// `ErrorInfo` (from the transport or a foreign peer) becomes
    /// [`ErrorCode::for_foreign_status`], with a message that says so and
    /// does not repeat the transport's text.
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
            }
            .bounded();
        }
        let code = ErrorCode::for_foreign_status(status.code());
        let message = match code {
            ErrorCode::DeadlineExceeded => "the request did not finish in time; retry later",
            _ => "the service is unavailable; retry later",
        };
        Self::new(code, message)
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
        check(ErrorCode::MethodNotAllowed, 405, tonic::Code::Unimplemented);
        check(ErrorCode::Conflict, 409, tonic::Code::FailedPrecondition);
        check(ErrorCode::FeatureNotSupported, 409, tonic::Code::FailedPrecondition);
        check(ErrorCode::QuotaExceeded, 429, tonic::Code::ResourceExhausted);
        check(ErrorCode::IdempotencyKeyReused, 422, tonic::Code::FailedPrecondition);
        check(ErrorCode::Unavailable, 503, tonic::Code::Unavailable);
    }

    #[test]
    fn a_foreign_status_is_never_a_verdict() {
        // What the transport makes of a broken HTTP/2 connection or an
        // oversized header: never QUOTA_EXCEEDED or INTERNAL to a tenant.
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::ResourceExhausted,
            tonic::Code::FailedPrecondition,
        ] {
            let e = ApiError::from_status(&tonic::Status::new(code, "h2 protocol error: http2 error"));
            assert_eq!(e.code, ErrorCode::Unavailable, "{code:?}");
            assert!(!e.message.contains("h2"), "{}", e.message);
        }
        let e = ApiError::from_status(&tonic::Status::deadline_exceeded("timeout"));
        assert_eq!(e.code, ErrorCode::DeadlineExceeded);
    }

    #[test]
    fn errors_stay_within_their_bounds() {
        let long = "é".repeat(10_000);
        let e = ApiError::invalid_field(&long, format!("bad {long}")).with_detail("x", long.clone());
        assert!(e.message.len() <= MAX_MESSAGE_BYTES && e.message.ends_with('…'));
        assert!(e.details.iter().all(|(k, v)| k.len() <= MAX_DETAIL_BYTES && v.len() <= MAX_DETAIL_BYTES));
        let mut many = ApiError::new(ErrorCode::Conflict, "c");
        for i in 0..100 {
            many = many.with_detail(&format!("k{i}"), "v");
        }
        assert_eq!(many.details.len(), MAX_DETAILS);
        // Built by hand past the bounds, it is still cut on the wire.
        let raw = ApiError { code: ErrorCode::Conflict, message: long.clone(), details: BTreeMap::new() };
        let status = raw.to_status();
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(status.details().len() < 2 * (MAX_MESSAGE_BYTES + MAX_DETAILS * 2 * MAX_DETAIL_BYTES));
    }

    #[test]
    fn excerpts_quote_a_bounded_prefix() {
        assert_eq!(excerpt(""), "\"\"");
        assert_eq!(excerpt("a\0b"), r#""a\0b""#);
        let e = excerpt(&"\u{0}".repeat(10_000));
        assert!(e.len() < 300 && e.ends_with("(10000 bytes)"), "{e}");
    }
}
