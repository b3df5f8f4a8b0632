//! vSphere faults mapped onto the protocol's error kinds, in one place.

use hcp_provider_sdk::{ErrorKind, ProviderError};

use crate::soap::VimError;

/// Maps a vSphere failure onto the protocol's error kinds (the only place).
pub fn map_error(e: VimError) -> ProviderError {
    let message = hcp_provider_sdk::kit::cli::chain(&e);
    let (kind, retryable) = match &e {
        VimError::NoCredentials | VimError::Transport(_) | VimError::Timeout(_) => {
            (ErrorKind::Unavailable, None)
        }
        VimError::Encode { .. } | VimError::Decode(_) => (ErrorKind::Internal, None),
        VimError::Fault { fault, .. } => match fault.as_str() {
            "ManagedObjectNotFound" | "FileNotFound" => (ErrorKind::NotFound, None),
            "InvalidPowerState" | "InvalidState" | "ToolsUnavailable" | "InvalidHostState" => {
                (ErrorKind::InvalidState, None)
            }
            "InvalidArgument"
            | "InvalidRequest"
            | "InvalidName"
            | "InvalidType"
            | "InvalidDeviceSpec"
            | "InvalidDatastore"
            | "InvalidDatastorePath" => (ErrorKind::InvalidArgument, None),
            "NotAuthenticated" | "InvalidLogin" | "NoPermission" => {
                (ErrorKind::PermissionDenied, Some(false))
            }
            "NotSupported" | "MethodNotFound" | "NotImplemented" => (ErrorKind::Unsupported, None),
            // Another task holds the VM, or a second create's clone of the
            // same name is running: it passes.
            "TaskInProgress" | "ResourceInUse" | "ConcurrentAccess" | "DuplicateName" | "FileLocked"
            | "RequestCanceled" => (ErrorKind::Busy, None),
            "HostCommunication" | "HostNotConnected" | "InsufficientResourcesFault" | "NoDiskSpace" => {
                (ErrorKind::Unavailable, None)
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
    use crate::vim;

    #[test]
    fn faults_map_onto_the_protocol_once() {
        let f = |fault: &str| map_error(VimError::Fault { fault: fault.into(), message: "m".into() }).kind;
        assert_eq!(f("ManagedObjectNotFound"), ErrorKind::NotFound);
        assert_eq!(f("InvalidPowerState"), ErrorKind::InvalidState);
        assert_eq!(f("TaskInProgress"), ErrorKind::Busy);
        assert_eq!(f("DuplicateName"), ErrorKind::Busy);
        assert_eq!(f("MethodNotFound"), ErrorKind::Unsupported);
        assert_eq!(f("InvalidArgument"), ErrorKind::InvalidArgument);
        assert_eq!(f("Whatever"), ErrorKind::Internal);
        let denied = map_error(VimError::Fault { fault: "InvalidLogin".into(), message: "m".into() });
        assert_eq!((denied.kind, denied.retryable), (ErrorKind::PermissionDenied, Some(false)));
        assert_eq!(map_error(VimError::Transport("x".into())).kind, ErrorKind::Unavailable);
    }

    #[test]
    fn undecodable_answers_are_internal_and_say_why() {
        let e = map_error(VimError::Decode(vim::DecodeError::Missing { parent: "objects", child: "obj" }));
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Internal, "unexpected answer from vSphere: objects without obj")
        );
        let xml = roxmltree::Document::parse("<a>").unwrap_err();
        let e = map_error(VimError::Decode(xml.clone().into()));
        assert_eq!(e.message, format!("unexpected answer from vSphere: {xml}"));
    }
}
