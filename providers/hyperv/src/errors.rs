//! Hyper-V's failures (WS-Management, method return values, jobs) and their
//! one mapping onto the protocol's error kinds.

use hcp_provider_sdk::{ErrorKind, ProviderError};

use crate::rv;
use crate::wsman::WsmanError;

/// A failure below the protocol.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HvError {
    /// WS-Management itself failed.
    #[error(transparent)]
    Wsman(#[from] WsmanError),
    /// A method answered a non-zero `ReturnValue`.
    #[error("{method} returned {code}")]
    Method {
        /// The method.
        method: String,
        /// Its `ReturnValue`.
        code: u32,
    },
    /// A job ended in state 8, 9 or 10 (or 7 with an error code).
    #[error("{method} failed: {message} (job state {state}, error {code})")]
    Job {
        /// The method that started it.
        method: String,
        /// `JobState`.
        state: u64,
        /// `ErrorCode`.
        code: u64,
        /// `ErrorDescription`.
        message: String,
    },
    /// A job did not end in time.
    #[error("{0} did not finish in time")]
    JobTimeout(String),
    /// Something the host answered makes no sense here.
    #[error("{0}")]
    Unexpected(String),
}

/// Maps a Hyper-V failure onto the protocol's error kinds (the only place).
pub fn map_error(e: HvError) -> ProviderError {
    let message = e.to_string();
    let (kind, retryable) = match &e {
        HvError::Wsman(w) => match w {
            WsmanError::NoCredentials | WsmanError::Transport(_) | WsmanError::Timeout(_) => {
                (ErrorKind::Unavailable, None)
            }
            WsmanError::Unauthorized => (ErrorKind::PermissionDenied, Some(false)),
            _ if w.is_not_found() => (ErrorKind::NotFound, None),
            _ => (ErrorKind::Internal, Some(false)),
        },
        HvError::Method { code, .. } => match *code {
            rv::INVALID_STATE => (ErrorKind::InvalidState, None),
            rv::IN_USE => (ErrorKind::Busy, None),
            rv::INVALID_PARAMETER | 4 => (ErrorKind::InvalidArgument, None),
            rv::ACCESS_DENIED => (ErrorKind::PermissionDenied, Some(false)),
            rv::NOT_SUPPORTED | 1 => (ErrorKind::Unsupported, None),
            _ => (ErrorKind::Internal, None),
        },
        // A job that ended in an exception carries Hyper-V's reason; trying
        // again does the same.
        HvError::Job { .. } => (ErrorKind::Internal, Some(false)),
        HvError::JobTimeout(_) => (ErrorKind::Unavailable, None),
        HvError::Unexpected(_) => (ErrorKind::Internal, None),
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
    fn return_values_and_jobs_map_onto_the_protocol_once() {
        let m = |code| map_error(HvError::Method { method: "X".into(), code }).kind;
        assert_eq!(m(rv::INVALID_STATE), ErrorKind::InvalidState);
        assert_eq!(m(rv::IN_USE), ErrorKind::Busy);
        assert_eq!(m(rv::INVALID_PARAMETER), ErrorKind::InvalidArgument);
        assert_eq!(m(rv::ACCESS_DENIED), ErrorKind::PermissionDenied);
        assert_eq!(m(32768), ErrorKind::Internal);
        let job = map_error(HvError::Job {
            method: "X".into(),
            state: 10,
            code: 32768,
            message: "disk full".into(),
        });
        assert_eq!((job.kind, job.retryable), (ErrorKind::Internal, Some(false)));
        assert!(job.message.contains("disk full"));
        let denied = map_error(HvError::Wsman(WsmanError::Unauthorized));
        assert_eq!((denied.kind, denied.retryable), (ErrorKind::PermissionDenied, Some(false)));
    }
}
