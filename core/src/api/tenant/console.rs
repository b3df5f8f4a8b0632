//! Console sessions: a single-use, short-lived token for a VM's console,
//! checked against the provider's capabilities for the protocol asked for.

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::VmId;
use hcp_proto::tenant::{ConsoleLog, ConsoleSession, CreateConsoleRequest, GetConsoleLogRequest};

use super::{Target, TenantApi, hash_token, random_token};
use crate::api::{idempotency, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::{Capability, ConsoleProtocol, ConsoleType};
use crate::model::{self, VmStatus, now};

/// Lines of the console log when the request names no number.
const DEFAULT_LOG_LINES: u32 = 100;

impl TenantApi {
    /// The guest's boot log: the end of its serial output, from the
    /// provider (which keeps it while the VM exists, stopped too).
    pub(super) async fn console_log(
        &self,
        p: Principal,
        req: GetConsoleLogRequest,
    ) -> Result<ConsoleLog, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Read)?;
        let vm_id: VmId = validate::id("vm_id", &req.vm_id)?;
        let vm =
            self.ctx.store.get_vm(&scope, vm_id).await.map_err(|e| from_store(e, &format!("vm {vm_id}")))?;
        let provider =
            self.ctx.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        let capability = Capability::ConsoleLog;
        if !capability.of(&provider.capabilities) {
            return Err(ApiError::feature_not_supported(
                capability.flag(),
                format!("the vm's provider keeps no console log ({capability})"),
            ));
        }
        let mut compute = self.ctx.clients.compute(&provider)?;
        let mut call = tonic::Request::new(hcp_proto::provider::GetConsoleLogRequest {
            vm_id: vm_id.to_string(),
            tail_lines: req.tail_lines.unwrap_or(DEFAULT_LOG_LINES),
        });
        hcp_telemetry::inject_request(&mut call);
        match compute.get_console_log(call).await {
            Ok(r) => {
                let log = r.into_inner();
                Ok(ConsoleLog { output: log.output, lines: log.lines, truncated: log.truncated })
            }
            Err(s) => {
                let e = crate::providers::ProviderCallError::from_status(&s);
                // A VM the hypervisor does not have yet (or any more) has
                // written nothing there.
                if e.code == ErrorCode::NotFound {
                    return Ok(ConsoleLog::default());
                }
                Err(ApiError::new(e.code, format!("the provider cannot read the console log: {}", e.message)))
            }
        }
    }

    pub(super) async fn create_console(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        req: CreateConsoleRequest,
    ) -> Result<ConsoleSession, ApiError> {
        let fingerprint = serde_json::json!({"type": req.r#type});
        let t =
            self.target(&p, key, &req.project_id, &req.vm_id, AuditAction::VmConsole.as_str(), fingerprint)?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        let result = self.new_console(&p, &t, &req).await;
        // The answer holds the session's token in clear: its replay record
        // ends when the token does (core itself keeps only its hash).
        let until =
            result.as_ref().ok().and_then(|s| s.expires_at.as_ref()).and_then(|t| {
                chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
            });
        idempotency::finish_until(&self.ctx, t.idem.as_ref(), result, until).await
    }

    async fn new_console(
        &self,
        p: &Principal,
        t: &Target,
        req: &CreateConsoleRequest,
    ) -> Result<ConsoleSession, ApiError> {
        let (scope, vm_id) = (&t.scope, t.vm_id);
        // A job in flight is named before anything else is checked.
        let vm = self.idle_vm(t).await?;
        hcp_proto::rules::check(req)?;
        let asked = if req.r#type.is_empty() {
            ConsoleType::Protocol(ConsoleProtocol::Vnc)
        } else {
            ConsoleType::parse(&req.r#type).ok_or_else(|| {
                let names: Vec<&str> = ConsoleType::names().collect();
                ApiError::invalid_field(
                    "type",
                    format!("console type must be one of {}, got {}", names.join(", "), excerpt(&req.r#type)),
                )
            })?
        };
        let web = asked == ConsoleType::Web;
        let provider =
            self.ctx.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        let kind = asked.protocol(&provider.capabilities);
        let protocol = kind.as_str().to_owned();
        let capability = kind.capability();
        if !capability.of(&provider.capabilities) {
            return Err(ApiError::feature_not_supported(
                capability.flag(),
                format!("the vm's provider does not offer {protocol} consoles ({capability})"),
            ));
        }
        if vm.status != VmStatus::Active {
            return Err(ApiError::conflict(format!(
                "vm {vm_id} is {}; a console needs it ACTIVE",
                vm.status
            )));
        }
        // Ask the provider now, so a console that cannot work fails here
        // rather than when the tenant connects. The endpoint itself is not
        // stored: the console proxy asks again when the token is redeemed.
        let mut compute = self.ctx.clients.compute(&provider)?;
        let mut call = tonic::Request::new(hcp_proto::provider::GetConsoleRequest {
            vm_id: vm_id.to_string(),
            protocol: protocol.clone(),
        });
        hcp_telemetry::inject_request(&mut call);
        compute.get_console(call).await.map_err(|s| {
            let e = crate::providers::ProviderCallError::from_status(&s);
            ApiError::new(e.code, format!("the provider cannot open a console: {}", e.message))
        })?;

        let token = random_token();
        let t = now();
        let expires_at = t + chrono::Duration::seconds(self.ctx.config.console.token_ttl_seconds as i64);
        let session = model::ConsoleSession {
            token_hash: hash_token(&token),
            tenant_id: scope.tenant.clone(),
            project_id: req.project_id.clone(),
            vm_id,
            protocol: protocol.clone(),
            expires_at,
            used_at: None,
            revoked_at: None,
            created_at: t,
            client_address: None,
            ended_at: None,
        };
        let mut audit = self.ctx.audit(p, AuditAction::VmConsole, Resource::Vm(vm_id), AuditOutcome::Issued);
        audit.project_id = req.project_id.clone();
        audit.detail = protocol.clone();
        self.ctx
            .store
            .insert_console_session(&session, &audit)
            .await
            .map_err(|e| from_store(e, "console"))?;
        let base = self.ctx.config.console.public_base_url.trim_end_matches('/');
        let web_base = match base.split_once("://") {
            Some(("wss", rest)) => format!("https://{rest}"),
            Some(("ws", rest)) => format!("http://{rest}"),
            _ => base.to_owned(),
        };
        // VNC, SPICE and serial have a page in the browser; RDP has a relay for
        // native clients when the operator runs one.
        let web_url = if ConsoleProtocol::WITH_PAGES.contains(&kind) {
            format!("{web_base}/console/{protocol}.html?token={token}")
        } else {
            String::new()
        };
        let address = match kind {
            ConsoleProtocol::Rdp => self.ctx.config.console.rdp_address.clone(),
            _ => String::new(),
        };
        let url = if web { web_url.clone() } else { format!("{base}/console/{protocol}?token={token}") };
        Ok(ConsoleSession {
            r#type: asked.as_str().to_owned(),
            url,
            expires_at: Some(convert::ts(expires_at)),
            web_url,
            address,
            token,
        })
    }
}
