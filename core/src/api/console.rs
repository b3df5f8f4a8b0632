//! The console broker: what HCP's console proxy asks core when a tenant
//! connects with a console URL. Core redeems the single-use token (once,
//! ever), checks that the VM is still the tenant's and still running, asks
//! the provider for the live endpoint (ports change when a VM restarts, so
//! it is never stored) and hands it, password included, to the proxy alone:
//! only callers with the `console.proxy` role get an answer. Every redeem,
//! refusal and session end is audited.
//!
//! SPICE opens one connection per channel (main, display, inputs, cursor,
//! ...) with the same token. The main channel's redeem opens the session as
//! for any protocol, storing the client's address; each further channel
//! joins it, admitted only while the session is open (not ended, not
//! revoked, within its maximum time) and from that address. A second main
//! channel is a second session, refused like any reused token. Each channel
//! is audited as opened and closed: each is a connection to the VM's
//! console (the inputs channel types into it), and an audit trail that
//! names every connection shows one that should not have been there.

use hcp_proto::console::console_broker_service_server::ConsoleBrokerService;
use hcp_proto::console::{
    EndConsoleRequest, EndConsoleResponse, RedeemConsoleRequest, RedeemedConsole, RevokedConsole,
    RevokedConsolesRequest, RevokedConsolesResponse,
};
use hcp_proto::error::{ApiError, ErrorCode};
use hcp_proto::ids::VmId;

use super::tenant::hash_token;
use super::{ApiContext, ApiResult, handle};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Principal, principal};
use crate::error::from_store;
use crate::model::{AuditEvent, VmStatus, now};
use crate::store::StoreError;

/// The console broker service.
#[derive(Clone)]
pub struct ConsoleApi {
    ctx: ApiContext,
}

impl ConsoleApi {
    /// Builds the service.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    fn audit(
        &self,
        p: &Principal,
        vm: VmId,
        tenant: &str,
        project: &str,
        outcome: AuditOutcome<'_>,
    ) -> AuditEvent {
        let mut a = self.ctx.audit(p, AuditAction::VmConsole, Resource::Vm(vm), outcome);
        a.tenant_id = tenant.to_owned();
        a.project_id = project.to_owned();
        a
    }

    async fn redeem(&self, p: Principal, req: RedeemConsoleRequest) -> Result<RedeemedConsole, ApiError> {
        p.console_proxy()?;
        // The label is one of the known protocols: the proxy passes on what
        // the client's URL named.
        let protocol =
            crate::lifecycle::ConsoleProtocol::parse(&req.protocol).map_or("other", |c| c.as_str());
        let result = self.redeem_token(&p, &req).await;
        let outcome = match (&result, req.channel) {
            (Ok(_), false) => "opened",
            (Ok(_), true) => "joined",
            (Err(_), _) => "refused",
        };
        metrics::counter!("hcp_console_sessions_total", "protocol" => protocol, "outcome" => outcome)
            .increment(1);
        result
    }

    async fn redeem_token(
        &self,
        p: &Principal,
        req: &RedeemConsoleRequest,
    ) -> Result<RedeemedConsole, ApiError> {
        let p = p.clone();
        if req.token.is_empty() {
            return Err(ApiError::invalid_field("token", "the console token is missing"));
        }
        if req.channel && req.protocol != "spice" {
            return Err(ApiError::invalid_field("channel", "only spice sessions have further channels"));
        }
        if req.channel && req.client_address.is_empty() {
            return Err(ApiError::invalid_field("client_address", "a channel names its client's address"));
        }
        let hash = hash_token(&req.token);
        let t = now();
        let max = self.ctx.config.console.max_session_seconds;
        let found = if req.channel {
            let opened_after = t - chrono::Duration::seconds(i64::from(max));
            self.ctx.store.join_console_session(&hash, &req.client_address, opened_after).await
        } else {
            self.ctx.store.redeem_console_session(&hash, t, &req.client_address).await
        };
        let session = match found {
            Ok(s) => s,
            Err(StoreError::NotFound) => return Err(self.refusal(&p, &hash, t, req).await),
            Err(e) => return Err(from_store(e, "console session")),
        };
        // A channel lives no longer than what is left of its session.
        let max_session_seconds = match session.used_at {
            Some(opened) if req.channel => {
                let left = i64::from(max) - (t - opened).num_seconds();
                u32::try_from(left.max(1)).unwrap_or(max)
            }
            _ => max,
        };
        let vm_id = session.vm_id;
        let (tenant, project) = (session.tenant_id.clone(), session.project_id.clone());
        let refuse = |why: &'static str, err: ApiError| {
            let a = self.audit(&p, vm_id, &tenant, &project, AuditOutcome::Refused(Some(why)));
            async move { self.ctx.append_audit(&a).await.err().unwrap_or(err) }
        };
        if req.protocol != session.protocol {
            return Err(refuse(
                "protocol mismatch",
                ApiError::invalid_field(
                    "protocol",
                    format!("the token is for a {} console, not {}", session.protocol, req.protocol),
                ),
            )
            .await);
        }
        let vm = match self.ctx.store.get_vm(&crate::model::Scope::new(&tenant, &project), vm_id).await {
            Ok(vm) => vm,
            Err(StoreError::NotFound) => {
                return Err(refuse("vm gone", ApiError::conflict("the vm no longer exists")).await);
            }
            Err(e) => return Err(from_store(e, "vm")),
        };
        if vm.status != VmStatus::Active {
            let msg = format!("the vm is {}; a console needs it ACTIVE", vm.status);
            return Err(refuse("vm not active", ApiError::conflict(msg)).await);
        }
        let provider =
            self.ctx.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        let mut compute = self.ctx.clients.compute(&provider)?;
        let mut call = tonic::Request::new(hcp_proto::provider::GetConsoleRequest {
            vm_id: vm_id.to_string(),
            protocol: session.protocol.clone(),
        });
        hcp_telemetry::inject_request(&mut call);
        let endpoint = match compute.get_console(call).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let e = crate::providers::ProviderCallError::from_status(&s);
                let err = ApiError::new(e.code, format!("the provider cannot open a console: {}", e.message));
                return Err(refuse("provider", err).await);
            }
        };
        let mut a = self.audit(&p, vm_id, &tenant, &project, AuditOutcome::Opened);
        if req.channel {
            a.detail = "spice channel".to_owned();
        }
        self.ctx.store.append_audit(&a).await.map_err(|e| from_store(e, "audit"))?;
        tracing::info!(%vm_id, protocol = %session.protocol, channel = req.channel, "console session opened");
        Ok(RedeemedConsole {
            session_id: hash,
            vm_id: vm_id.to_string(),
            tenant_id: tenant,
            project_id: project,
            endpoint: Some(endpoint),
            max_session_seconds,
        })
    }

    /// Why a token could not be redeemed (or a channel not admitted),
    /// audited when it names a session.
    async fn refusal(
        &self,
        p: &Principal,
        hash: &str,
        t: chrono::DateTime<chrono::Utc>,
        req: &RedeemConsoleRequest,
    ) -> ApiError {
        let session = match self.ctx.store.console_session(hash).await {
            Ok(Some(s)) => s,
            Ok(None) => return ApiError::new(ErrorCode::NotFound, "unknown console token"),
            Err(e) => return from_store(e, "console session"),
        };
        let max = chrono::Duration::seconds(i64::from(self.ctx.config.console.max_session_seconds));
        let why = if session.revoked_at.is_some() {
            "console token revoked: the vm was stopped, moved or deleted"
        } else if req.channel {
            match session.used_at {
                None => "console channel refused: its session has not opened",
                Some(_) if session.ended_at.is_some() => "console channel refused: its session ended",
                Some(opened) if opened + max <= t => {
                    "console channel refused: its session's maximum time passed"
                }
                Some(_) if session.client_address.as_deref() != Some(req.client_address.as_str()) => {
                    "console channel refused: it comes from another client than its session"
                }
                Some(_) => "console channel refused",
            }
        } else if session.used_at.is_some() {
            "console token already used"
        } else if session.expires_at <= t {
            "console token expired"
        } else {
            "console token not redeemable"
        };
        let a = self.audit(
            p,
            session.vm_id,
            &session.tenant_id,
            &session.project_id,
            AuditOutcome::Refused(Some(why)),
        );
        self.ctx.append_audit(&a).await.err().unwrap_or_else(|| ApiError::conflict(why))
    }

    async fn end(&self, p: Principal, req: EndConsoleRequest) -> Result<EndConsoleResponse, ApiError> {
        p.console_proxy()?;
        let session = self
            .ctx
            .store
            .console_session(&req.session_id)
            .await
            .map_err(|e| from_store(e, "console session"))?
            .ok_or_else(|| ApiError::not_found("console session", &req.session_id))?;
        let reason: String = req.reason.chars().take(200).collect();
        let mut a = self.audit(
            &p,
            session.vm_id,
            &session.tenant_id,
            &session.project_id,
            AuditOutcome::Closed(&reason),
        );
        a.detail = format!(
            "{}duration_ms={} bytes_to_client={} bytes_to_server={}",
            if req.channel { "spice channel " } else { "" },
            req.duration_ms,
            req.bytes_to_client,
            req.bytes_to_server
        );
        // The session (a SPICE session's main channel) ended: no channel
        // joins it any more, and those open are told to end.
        if !req.channel {
            self.ctx
                .store
                .end_console_session(&req.session_id, now())
                .await
                .map_err(|e| from_store(e, "console session"))?;
        }
        let protocol =
            crate::lifecycle::ConsoleProtocol::parse(&session.protocol).map_or("other", |c| c.as_str());
        metrics::histogram!("hcp_console_session_duration_seconds", "protocol" => protocol)
            .record(req.duration_ms as f64 / 1000.0);
        self.ctx.store.append_audit(&a).await.map_err(|e| from_store(e, "audit"))?;
        Ok(EndConsoleResponse {})
    }
}

/// The most sessions one RevokedConsoles asks about.
const MAX_ASKED_SESSIONS: usize = 10_000;

impl ConsoleApi {
    async fn revoked(
        &self,
        p: Principal,
        req: RevokedConsolesRequest,
    ) -> Result<RevokedConsolesResponse, ApiError> {
        p.console_proxy()?;
        if req.session_ids.len() > MAX_ASKED_SESSIONS {
            return Err(ApiError::invalid_field(
                "session_ids",
                format!("at most {MAX_ASKED_SESSIONS} sessions at once, got {}", req.session_ids.len()),
            ));
        }
        let revoked = self
            .ctx
            .store
            .revoked_consoles(&req.session_ids)
            .await
            .map_err(|e| from_store(e, "console session"))?
            .into_iter()
            .map(|(session_id, reason)| RevokedConsole { session_id, reason })
            .collect();
        Ok(RevokedConsolesResponse { revoked })
    }
}

#[tonic::async_trait]
impl ConsoleBrokerService for ConsoleApi {
    async fn revoked_consoles(
        &self,
        req: tonic::Request<RevokedConsolesRequest>,
    ) -> ApiResult<RevokedConsolesResponse> {
        let p = principal(&req)?;
        handle(self.revoked(p, req.into_inner())).await
    }

    async fn redeem_console(&self, req: tonic::Request<RedeemConsoleRequest>) -> ApiResult<RedeemedConsole> {
        let p = principal(&req)?;
        handle(self.redeem(p, req.into_inner())).await
    }

    async fn end_console(&self, req: tonic::Request<EndConsoleRequest>) -> ApiResult<EndConsoleResponse> {
        let p = principal(&req)?;
        handle(self.end(p, req.into_inner())).await
    }
}
