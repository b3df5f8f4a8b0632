//! Tenants' webhook endpoints (`hcp.tenant.v1.WebhookService`): register
//! (the signing secret is answered this once), list, read, delete, enable
//! again after core disabled one, and the latest deliveries.
//!
//! The URL is untrusted: it is checked against the egress policy
//! (`crate::egress`) here — syntax, scheme, a literal address and every
//! address its name resolves to — and refused naming `url`; the delivery
//! worker checks it again at each attempt against the address it connects
//! to. The secret is sealed with core's secrets key, the endpoint id as
//! associated data; an Idempotency-Key replay of the create answers the
//! secret again by opening it, so it is never stored in clear.

use hcp_domain::webhook::{EventTypes, Subject, WebhookDelivery, WebhookEndpoint};
use hcp_proto::error::{ApiError, ErrorCode};
use hcp_proto::ids::WebhookId;
use hcp_proto::tenant::webhook_service_server::WebhookService;
use hcp_proto::tenant::{
    CreateWebhookRequest, CreateWebhookResponse, DeleteWebhookResponse, ListWebhookDeliveriesRequest,
    ListWebhookDeliveriesResponse, ListWebhooksRequest, ListWebhooksResponse, Webhook, WebhookRequest,
};

use super::idempotency::{self, Key, idempotency_key};
use super::{ApiContext, ApiResult, checked, handle, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert::ts;
use crate::egress::EgressClient;
use crate::error::from_store;
use crate::model::{Scope, WebhookEvent, now};
use crate::store::StoreError;

/// Most endpoints one project holds.
pub const MAX_WEBHOOKS: u32 = 10;
/// Deliveries listed when the request names no page size.
pub const DEFAULT_DELIVERIES: u32 = 50;

/// Implements `WebhookService`.
#[derive(Clone)]
pub struct WebhookApi {
    ctx: ApiContext,
    egress: EgressClient,
}

impl WebhookApi {
    /// Creates the service; URLs are checked with `egress`.
    pub fn new(ctx: ApiContext, egress: EgressClient) -> Self {
        Self { ctx, egress }
    }

    async fn create(
        &self,
        p: &Principal,
        scope: &Scope,
        r: CreateWebhookRequest,
    ) -> Result<CreateWebhookResponse, ApiError> {
        let mut events = Vec::with_capacity(r.event_types.len());
        for (i, name) in r.event_types.iter().enumerate() {
            let field = format!("event_types[{i}]");
            let event = WebhookEvent::parse(name).ok_or_else(|| {
                let known: Vec<&str> = WebhookEvent::ALL.iter().map(|e| e.as_str()).collect();
                ApiError::invalid_field(&field, format!("{field} must be one of {}", known.join(", ")))
            })?;
            events.push(event);
        }
        let events = EventTypes::of(events);
        if events.is_empty() {
            return Err(ApiError::invalid_field(
                "event_types",
                "event_types must name at least one event type",
            ));
        }
        let secrets = self.ctx.secrets.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::FeatureNotSupported,
                "webhooks need core's secrets key (secrets.key_file) to seal their signing secrets",
            )
        })?;
        let url = self
            .egress
            .check_resolves(&r.url)
            .await
            .map_err(|e| ApiError::invalid_field("url", format!("url {e}")))?;
        let id = WebhookId::new();
        let secret = crate::webhooks::new_secret();
        let endpoint = WebhookEndpoint {
            id,
            tenant_id: scope.tenant.clone(),
            project_id: scope.project.clone(),
            url: url.text,
            events,
            description: r.description,
            sealed_secret: secrets.seal_bytes(&crate::webhooks::secret_aad(id), secret.as_bytes()),
            enabled: true,
            disabled_reason: String::new(),
            consecutive_failures: 0,
            failing_since: None,
            created_at: now(),
        };
        let mut audit =
            self.ctx.audit(p, AuditAction::WebhookCreate, Resource::Webhook(id), AuditOutcome::Succeeded);
        audit.project_id = scope.project.clone();
        audit.detail = events.iter().map(WebhookEvent::as_str).collect::<Vec<_>>().join(",");
        self.ctx.store.create_webhook(&endpoint, MAX_WEBHOOKS, &audit).await.map_err(|e| match e {
            StoreError::QuotaExceeded(msg) => {
                ApiError::new(ErrorCode::QuotaExceeded, msg).with_detail("limit", MAX_WEBHOOKS.to_string())
            }
            e => from_store(e, "webhook"),
        })?;
        Ok(CreateWebhookResponse { webhook: Some(to_tenant(&endpoint)), secret })
    }

    /// The secret of an endpoint, opened again for an Idempotency-Key
    /// replay of its create.
    async fn reopen(
        &self,
        scope: &Scope,
        mut answer: CreateWebhookResponse,
    ) -> Result<CreateWebhookResponse, ApiError> {
        let Some(id) = answer.webhook.as_ref().and_then(|w| w.id.parse::<WebhookId>().ok()) else {
            return Ok(answer);
        };
        let endpoint = self
            .ctx
            .store
            .get_webhook(scope, id)
            .await
            .map_err(|e| from_store(e, &format!("webhook {id}")))?;
        let secrets = self.ctx.secrets.as_ref().ok_or_else(ApiError::internal)?;
        let secret = secrets
            .open_bytes(&crate::webhooks::secret_aad(id), &endpoint.sealed_secret)
            .map_err(|_| ApiError::internal())?;
        answer.secret = String::from_utf8(secret).map_err(|_| ApiError::internal())?;
        Ok(answer)
    }

    /// The scope and endpoint id of a call on one endpoint.
    fn target(
        p: &Principal,
        project_id: &str,
        id: &str,
        access: Access,
    ) -> Result<(Scope, WebhookId), ApiError> {
        validate::project_id(project_id)?;
        let scope = p.scope(project_id, access)?;
        let id = id
            .parse::<WebhookId>()
            .map_err(|_| ApiError::invalid_field("webhook_id", "webhook_id must be a UUID"))?;
        Ok((scope, id))
    }
}

/// The tenant's view of an endpoint (never its secret).
pub fn to_tenant(e: &WebhookEndpoint) -> Webhook {
    Webhook {
        id: e.id.to_string(),
        project_id: e.project_id.clone(),
        url: e.url.clone(),
        event_types: e.events.iter().map(|t| t.as_str().to_owned()).collect(),
        description: e.description.clone(),
        enabled: e.enabled,
        disabled_reason: e.disabled_reason.clone(),
        consecutive_failures: e.consecutive_failures,
        created_at: Some(ts(e.created_at)),
    }
}

fn delivery_to_tenant(d: &WebhookDelivery) -> hcp_proto::tenant::WebhookDelivery {
    let (vm_id, volume_id) = match d.subject {
        Subject::Vm(vm) => (vm.to_string(), String::new()),
        Subject::Volume(volume) => (String::new(), volume.to_string()),
    };
    hcp_proto::tenant::WebhookDelivery {
        event_id: d.event_id.to_string(),
        event_type: d.event.as_str().to_owned(),
        vm_id,
        volume_id,
        status: d.status.as_str().to_owned(),
        attempts: d.attempts,
        created_at: Some(ts(d.created_at)),
        last_attempt_at: d.last_attempt_at.map(ts),
        next_attempt_at: d.delivered_at.is_none().then(|| ts(d.next_attempt_at)),
        delivered_at: d.delivered_at.map(ts),
        last_status_code: d.last_status_code.map_or(0, u32::from),
        last_error: d.last_error.clone(),
        last_duration_ms: d.last_duration_ms,
    }
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    async fn create_webhook(
        &self,
        req: tonic::Request<CreateWebhookRequest>,
    ) -> ApiResult<CreateWebhookResponse> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "CreateWebhook", &r);
            if let Some(answer) =
                idempotency::replay::<CreateWebhookResponse>(&self.ctx, idem.as_ref()).await?
            {
                return self.reopen(&scope, answer).await;
            }
            // The record keeps the answer without its secret.
            let created = self.create(&p, &scope, r).await;
            let ours =
                created.as_ref().ok().map(|c| (c.webhook.as_ref().map(|w| w.id.clone()), c.secret.clone()));
            let stored = created.map(|c| CreateWebhookResponse { secret: String::new(), ..c });
            let mut answer = idempotency::finish(&self.ctx, idem.as_ref(), stored).await?;
            match ours {
                // Our own endpoint: its secret is at hand.
                Some((id, secret)) if id == answer.webhook.as_ref().map(|w| w.id.clone()) => {
                    answer.secret = secret;
                    Ok(answer)
                }
                // A concurrent twin's, answered from its record.
                _ => self.reopen(&scope, answer).await,
            }
        })
        .await
    }

    async fn list_webhooks(
        &self,
        req: tonic::Request<ListWebhooksRequest>,
    ) -> ApiResult<ListWebhooksResponse> {
        let p = checked(&req)?;
        let r = req.get_ref();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Read)?;
            let hooks = self.ctx.store.list_webhooks(&scope).await.map_err(|e| from_store(e, "webhooks"))?;
            Ok(ListWebhooksResponse { webhooks: hooks.iter().map(to_tenant).collect() })
        })
        .await
    }

    async fn get_webhook(&self, req: tonic::Request<WebhookRequest>) -> ApiResult<Webhook> {
        let p = checked(&req)?;
        let r = req.get_ref();
        handle(async {
            let (scope, id) = Self::target(&p, &r.project_id, &r.webhook_id, Access::Read)?;
            let e = self
                .ctx
                .store
                .get_webhook(&scope, id)
                .await
                .map_err(|e| from_store(e, &format!("webhook {id}")))?;
            Ok(to_tenant(&e))
        })
        .await
    }

    async fn delete_webhook(&self, req: tonic::Request<WebhookRequest>) -> ApiResult<DeleteWebhookResponse> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.get_ref();
        handle(async {
            let (scope, id) = Self::target(&p, &r.project_id, &r.webhook_id, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "DeleteWebhook", r);
            idempotency::once(&self.ctx, idem, async {
                let mut audit = self.ctx.audit(
                    &p,
                    AuditAction::WebhookDelete,
                    Resource::Webhook(id),
                    AuditOutcome::Succeeded,
                );
                audit.project_id = scope.project.clone();
                self.ctx
                    .store
                    .delete_webhook(&scope, id, &audit)
                    .await
                    .map_err(|e| from_store(e, &format!("webhook {id}")))?;
                Ok(DeleteWebhookResponse {})
            })
            .await
        })
        .await
    }

    async fn enable_webhook(&self, req: tonic::Request<WebhookRequest>) -> ApiResult<Webhook> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.get_ref();
        handle(async {
            let (scope, id) = Self::target(&p, &r.project_id, &r.webhook_id, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "EnableWebhook", r);
            idempotency::once(&self.ctx, idem, async {
                let mut audit = self.ctx.audit(
                    &p,
                    AuditAction::WebhookEnable,
                    Resource::Webhook(id),
                    AuditOutcome::Succeeded,
                );
                audit.project_id = scope.project.clone();
                let e = self
                    .ctx
                    .store
                    .enable_webhook(&scope, id, now(), &audit)
                    .await
                    .map_err(|e| from_store(e, &format!("webhook {id}")))?;
                Ok(to_tenant(&e))
            })
            .await
        })
        .await
    }

    async fn list_webhook_deliveries(
        &self,
        req: tonic::Request<ListWebhookDeliveriesRequest>,
    ) -> ApiResult<ListWebhookDeliveriesResponse> {
        let p = checked(&req)?;
        let r = req.get_ref();
        handle(async {
            let (scope, id) = Self::target(&p, &r.project_id, &r.webhook_id, Access::Read)?;
            let limit = if r.page_size == 0 { DEFAULT_DELIVERIES } else { r.page_size };
            let deliveries = self
                .ctx
                .store
                .list_webhook_deliveries(&scope, id, limit)
                .await
                .map_err(|e| from_store(e, &format!("webhook {id}")))?;
            Ok(ListWebhookDeliveriesResponse {
                deliveries: deliveries.iter().map(delivery_to_tenant).collect(),
            })
        })
        .await
    }
}
