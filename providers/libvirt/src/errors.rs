//! libvirt's errors in HCP's provider taxonomy: what core may retry
//! (connection trouble, busy locks), what is the caller's fault, and what is
//! simply absent. One function, so every call maps the same way.

use hcp_provider_sdk::{ErrorKind, ProviderError};
use virt::error::{Error, ErrorNumber};

/// A refused argument: INVALID_ARGUMENT with `message`.
pub(crate) fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidArgument, message)
}

/// A local file operation that failed: INTERNAL, saying what it was.
pub(crate) fn io_error(what: &str, e: std::io::Error) -> ProviderError {
    ProviderError::new(ErrorKind::Internal, format!("cannot {what}: {e}"))
}

/// INVALID_ARGUMENT unless `value` is a UUID.
pub(crate) fn check_uuid(field: &str, value: &str) -> Result<(), ProviderError> {
    uuid::Uuid::parse_str(value).map(|_| ()).map_err(|_| invalid(format!("{field}: {value:?} is not a UUID")))
}

/// Whether the error means the connection to libvirtd is gone (the next
/// call should reconnect).
pub fn connection_lost(e: &Error) -> bool {
    e.code().is_any(vec![ErrorNumber::NoConnect, ErrorNumber::Rpc, ErrorNumber::InvalidConn])
}

/// Maps a libvirt error about `what` (e.g. `vm <id>`).
pub fn classify(e: &Error, what: &str) -> ProviderError {
    use ErrorNumber as N;
    let kind = match e.code().unwrap_or(N::InternalError) {
        N::NoDomain | N::NoDomainSnapshot => {
            return ProviderError::new(ErrorKind::NotFound, format!("{what} not found"));
        }
        N::OperationInvalid | N::SnapshotRevertRisky | N::BlockCopyActive => ErrorKind::InvalidState,
        N::NoConnect | N::Rpc | N::InvalidConn | N::OperationTimeout | N::AgentUnresponsive => {
            ErrorKind::Unavailable
        }
        N::ResourceBusy => ErrorKind::Busy,
        N::AuthFailed | N::AuthCancelled | N::AccessDenied | N::OperationDenied => {
            ErrorKind::PermissionDenied
        }
        N::InvalidArg | N::XmlError | N::XmlDetail | N::ConfigUnsupported | N::XmlInvalidSchema => {
            ErrorKind::InvalidArgument
        }
        N::NoSupport | N::ArgumentUnsupported | N::OperationUnsupported => ErrorKind::Unsupported,
        _ => ErrorKind::Internal,
    };
    ProviderError::new(kind, format!("{what}: {}", e.message()))
}
