//! PVE failures mapped onto the protocol's error kinds, in one place.

use hcp_provider_sdk::{ErrorKind, ProviderError};

use crate::client::PveError;

/// Maps a PVE failure onto the protocol's error kinds (the only place).
pub fn map_error(e: PveError) -> ProviderError {
    let message = e.to_string();
    let (kind, retryable) = match &e {
        PveError::NoCredentials => (ErrorKind::Unavailable, None),
        PveError::Auth(_) => (ErrorKind::PermissionDenied, Some(false)),
        PveError::Transport(_) | PveError::Timeout(_) => (ErrorKind::Unavailable, None),
        PveError::Decode(_) => (ErrorKind::Internal, None),
        // A cluster that lost quorum refuses writes until it has it back:
        // a passing condition, retried with backoff like 595.
        _ if e.message().contains("no quorum") || e.message().contains("cluster not ready") => {
            (ErrorKind::Unavailable, None)
        }
        PveError::Task { .. } if e.is_lock() => (ErrorKind::Busy, None),
        PveError::Task { .. } => (ErrorKind::Internal, Some(false)),
        PveError::Status { status, .. } => match status {
            400 => (ErrorKind::InvalidArgument, None),
            403 => (ErrorKind::PermissionDenied, Some(false)),
            501 => (ErrorKind::Unsupported, None),
            502 | 503 | 595 | 596 => (ErrorKind::Unavailable, None),
            _ if e.is_not_found() => (ErrorKind::NotFound, None),
            _ if e.is_lock() => (ErrorKind::Busy, None),
            _ if e.already_exists() => (ErrorKind::Busy, None),
            _ if e.message().contains("not running") || e.message().contains("is running") => {
                (ErrorKind::InvalidState, None)
            }
            _ => (ErrorKind::Internal, None),
        },
    };
    let mut err = ProviderError::new(kind, message);
    err.retryable = retryable;
    err
}

/// A refused argument: INVALID_ARGUMENT naming the field.
pub(crate) fn invalid(field: &str, message: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidArgument, format!("{field}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_protocol() {
        let status = |status, message: &str| PveError::Status {
            status,
            message: message.into(),
            errors: Default::default(),
        };
        let cases = [
            (status(400, "Parameter verification failed."), ErrorKind::InvalidArgument),
            (status(403, "Permission check failed"), ErrorKind::PermissionDenied),
            (
                status(500, "Configuration file 'nodes/pve/qemu-server/9.conf' does not exist"),
                ErrorKind::NotFound,
            ),
            (
                status(500, "can't lock file '/var/lock/qemu-server/lock-9.conf' - got timeout"),
                ErrorKind::Busy,
            ),
            (status(500, "VM 9 not running"), ErrorKind::InvalidState),
            (status(595, "Connection timed out"), ErrorKind::Unavailable),
            (status(501, "Method not implemented"), ErrorKind::Unsupported),
            (PveError::Auth("authentication failure".into()), ErrorKind::PermissionDenied),
            (PveError::Task { kind: "qmclone".into(), message: "storage full".into() }, ErrorKind::Internal),
        ];
        for (e, want) in cases {
            assert_eq!(map_error(e.clone()).kind, want, "{e}");
        }
        assert_eq!(map_error(PveError::Auth("x".into())).retryable, Some(false));
    }
}
