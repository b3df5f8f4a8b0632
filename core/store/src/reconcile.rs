//! What the reconciler reads and writes: a provider's VMs as HCP knows
//! them, guarded status corrections (only when no job is operating on the
//! VM and it has not changed since the inventory was taken), and the named
//! lease that keeps one reconciler running at a time.

use chrono::{DateTime, Utc};
use hcp_proto::ids::{JobId, ProviderId, VmId};

use super::outbox::insert_vm_usage;
use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::lifecycle::Correction;
use hcp_domain::model::{AuditEvent, VmStatus};
use hcp_proto::error::ErrorCode;

/// A VM as the reconciler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownVm {
    /// Id.
    pub id: VmId,
    /// Status.
    pub status: VmStatus,
    /// Job operating on it.
    pub current_job_id: Option<JobId>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Attachments with the addresses last recorded.
    pub networks: Vec<hcp_domain::model::NetworkAttachment>,
    /// The host HCP has it on.
    pub host: String,
    /// What to do when it is found down.
    pub restart_policy: hcp_domain::model::RestartPolicy,
}

impl super::Store {
    /// Returns every VM placed on a provider, deleted ones included.
    pub async fn vms_on_provider(&self, provider: ProviderId) -> StoreResult<Vec<KnownVm>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, status, current_job_id, updated_at, networks, host, restart_policy FROM vms \
                 WHERE provider_id = $1",
            )
            .bind(provider.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: uuid::Uuid = col!(row, "id");
                let status: String = col!(row, "status");
                let job: Option<uuid::Uuid> = col!(row, "current_job_id");
                let networks: sqlx::types::Json<Vec<hcp_domain::model::NetworkAttachment>> =
                    col!(row, "networks");
                let policy: String = col!(row, "restart_policy");
                out.push(KnownVm {
                    id: VmId(id),
                    status: VmStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("vm status {status:?}")))?,
                    current_job_id: job.map(JobId),
                    updated_at: col!(row, "updated_at"),
                    networks: networks.0,
                    host: col!(row, "host"),
                    restart_policy: hcp_domain::model::RestartPolicy::parse(&policy)
                        .ok_or_else(|| StoreError::Corrupt(format!("restart policy {policy:?}")))?,
                });
            }
            Ok(out)
        })
    }

    /// Writes `correction` (its state, error and usage event) if the VM is
    /// still `expected` with no job and unchanged since `observed_before`,
    /// with the audit event, in one transaction. Returns false when the VM
    /// changed meanwhile, or the correction changes no state (nothing is
    /// written then).
    pub async fn correct_vm_status(
        &self,
        vm: VmId,
        expected: VmStatus,
        observed_before: DateTime<Utc>,
        correction: &Correction,
        audit: &AuditEvent,
    ) -> StoreResult<bool> {
        let Some(new) = correction.vm else { return Ok(false) };
        let error_code = correction.vm_error.map(ErrorCode::as_str);
        let error_message = correction.error_message();
        let outbox = self.outbox;
        on_pool!(transaction self, |tx| {
            let done = sqlx::query(
                "UPDATE vms SET status = $1, error_code = $2, error_message = $3, updated_at = $4 \
                 WHERE id = $5 AND status = $6 AND current_job_id IS NULL AND updated_at <= $7",
            )
            .bind(new.as_str())
            .bind(error_code)
            .bind(error_message)
            .bind(audit.at)
            .bind(vm.0)
            .bind(expected.as_str())
            .bind(observed_before)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            if let Some(event) = correction.metering {
                insert_vm_usage!(tx, vm, event.as_str(), audit.at, None, outbox);
            }
            // Tenants' webhooks hear of the corrected status with it.
            super::webhooks::insert_status_change!(tx, vm, expected, new, audit.at);
            if let Some(reason) = hcp_domain::lifecycle::drifted_console_revocation(new) {
                // As when a job stops it: no token opens it any more, and
                // the console proxy ends the sessions open on it.
                super::consoles::revoke_vm_consoles!(tx, Some(vm), reason, audit.at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(true)
        })
    }

    /// Takes or renews the named lease for `owner` until `until`. Returns
    /// whether `owner` holds it.
    pub async fn acquire_singleton(
        &self,
        name: &str,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO singleton_leases (name, owner, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET owner = $2, expires_at = $3 \
                 WHERE singleton_leases.owner = $2 OR singleton_leases.expires_at < $4",
            )
            .bind(name)
            .bind(owner)
            .bind(until)
            .bind(now)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "singleton lease"))?;
            let holder: String = sqlx::query_scalar("SELECT owner FROM singleton_leases WHERE name = $1")
                .bind(name)
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "singleton lease"))?;
            Ok(holder == owner)
        })
    }
}
