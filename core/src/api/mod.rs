//! The northbound gRPC services. Each handler authenticates (the principal
//! comes from [`crate::auth::AuthLayer`]), checks its scope, validates
//! input naming the offending field, and calls the store. Handlers build
//! [`ApiError`]s; [`crate::error::status`] turns them into gRPC statuses.

use std::sync::Arc;

use hcp_proto::error::ApiError;
use hcp_proto::ids::JobId;

use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::Principal;
use crate::config::Config;
use crate::jobs::JobQueue;
use crate::model::AuditEvent;
use crate::providers::ProviderClients;
use crate::store::Store;

pub mod caller;
pub mod catalog;
pub mod console;
pub mod fleet;
pub mod groups;
pub mod hosts;
pub mod idempotency;
pub mod images;
pub mod keypairs;
pub mod ops;
pub mod page;
pub mod tenant;
pub mod usage;
pub mod validate;
pub mod webhooks;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiContext {
    /// The store.
    pub store: Store,
    /// Provider channels.
    pub clients: ProviderClients,
    /// Where accepted jobs are announced.
    pub queue: Arc<dyn JobQueue>,
    /// Configuration.
    pub config: Arc<Config>,
    /// Seals provider credentials; None when no secrets key is configured.
    pub secrets: Option<crate::secrets::SecretBox>,
    /// The audit keys `VerifyAuditChain` checks links with (empty when no
    /// secrets key is configured).
    pub audit_keys: Arc<crate::audit_chain::KeyRing>,
    /// Signs and checks page tokens.
    pub pages: page::PageTokens,
    /// Job change notifications for watchers.
    pub events: crate::events::JobEvents,
    /// Where core may connect (an import's URL is checked against it when
    /// the import is accepted).
    pub egress: crate::egress::EgressClient,
}

impl ApiContext {
    /// Returns an audit event for an action of `principal`, stamped now with
    /// the current trace.
    pub fn audit(
        &self,
        principal: &Principal,
        action: AuditAction,
        resource: Resource<'_>,
        outcome: AuditOutcome<'_>,
    ) -> AuditEvent {
        let mut event = AuditEvent::new(&principal.subject, action, resource, outcome);
        event.tenant_id = principal.tenant_id.clone().unwrap_or_default();
        event.trace_id = hcp_telemetry::current_trace_id().unwrap_or_default();
        event
    }

    /// Appends an audit event that has no other write to commit with (a
    /// refusal). If it cannot be written, the event goes to the log in full
    /// at ERROR and the request fails UNAVAILABLE: an audit record is never
    /// dropped silently.
    pub async fn append_audit(&self, event: &AuditEvent) -> Result<(), ApiError> {
        self.store.append_audit(event).await.map_err(|e| {
            tracing::error!(
                error = %e,
                cause = ?std::error::Error::source(&e),
                audit_event = ?event,
                "cannot write an audit event; the request is refused"
            );
            ApiError::new(
                hcp_proto::error::ErrorCode::Unavailable,
                "the audit trail cannot be written; retry later",
            )
        })
    }

    /// Announces a committed job.
    pub fn announce(&self, job: JobId) {
        self.queue.job_accepted(job);
    }
}

/// Short for handler results.
pub type ApiResult<T> = Result<tonic::Response<T>, tonic::Status>;

/// Wraps a handler body: maps its `ApiError` to a status.
pub async fn handle<T>(
    f: impl Future<Output = Result<T, ApiError>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    f.await.map(tonic::Response::new).map_err(crate::error::status)
}

/// The caller, once the request has passed its message's field rules
/// ([`hcp_proto::rules::check`], the rules the OpenAPI document states):
/// how every handler starts but those of operations on one VM, which check
/// the rules after the VM's in-flight job (`tenant.rs`), so a 409 naming
/// the job comes first whatever else is wrong.
/// The `Idempotency-Key` header is checked first, as the first part of the
/// request.
pub fn checked<T: prost::Message + prost::Name>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    let p = crate::auth::principal(req)?;
    idempotency::idempotency_key(req).map_err(crate::error::status)?;
    hcp_proto::rules::check(req.get_ref()).map_err(crate::error::status)?;
    Ok(p)
}
