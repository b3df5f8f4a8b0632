//! Typed ids. Every HCP id is a UUID on the wire (a string); in Rust each kind
//! is its own type so a job id cannot be passed where a VM id is expected.
//! New ids are UUIDv7, so they sort by creation time, which keyset pagination
//! relies on.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// The input was not a UUID in canonical form.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a valid UUID")]
pub struct ParseIdError;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Returns a new time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Returns the id as a UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                // Only the canonical hyphenated form is accepted, so an id has
                // exactly one spelling in URLs, logs and the database.
                if s.len() != 36 {
                    return Err(ParseIdError);
                }
                Uuid::parse_str(s).map(Self).map_err(|_| ParseIdError)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

typed_id!(
    /// A virtual machine.
    VmId
);
typed_id!(
    /// An asynchronous job.
    JobId
);
typed_id!(
    /// A registered provider endpoint.
    ProviderId
);
typed_id!(
    /// An audit event.
    EventId
);
typed_id!(
    /// A VM snapshot.
    SnapshotId
);
typed_id!(
    /// A tenant's placement group.
    PlacementGroupId
);
typed_id!(
    /// A volume.
    VolumeId
);
typed_id!(
    /// A tenant's webhook endpoint.
    WebhookId
);
typed_id!(
    /// An image of the catalog.
    ImageId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_canonical_uuids() {
        let id = VmId::new();
        assert_eq!(id.to_string().parse::<VmId>().unwrap(), id);
        assert!("not-a-uuid".parse::<VmId>().is_err());
        assert!(id.0.simple().to_string().parse::<VmId>().is_err());
        assert!("".parse::<JobId>().is_err());
    }

    #[test]
    fn new_ids_sort_by_creation() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
    }
}
