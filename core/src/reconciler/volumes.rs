//! The reconciler's look at volumes: what the hypervisor lists against
//! HCP's record, by `lifecycle::volume_drift`. HCP's record follows the
//! hypervisor (a volume gone is ERROR, an attachment made or removed
//! without HCP is recorded); nothing is deleted or detached on the
//! hypervisor, and a volume of HCP's that HCP does not know is reported to
//! operators only. Every decision is one audit event.

use std::collections::HashMap;

use hcp_proto::ids::{VmId, VolumeId};
use hcp_proto::provider;

use super::{Reconciler, Report};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::lifecycle::{Observed, Verdict, VolumeDrift, volume_drift};
use crate::model::{AuditEvent, Provider, now};
use crate::providers::CallError;

impl Reconciler {
    pub(super) async fn reconcile_volumes(&self, p: &Provider, report: &mut Report) -> Result<(), CallError> {
        // Taken before listing: a volume changed after it is left for the
        // next pass (the store's compare-and-set also checks its time).
        let observed_at = now();
        let listed = self.volume_inventory(p).await?;
        let known = self.store.volumes_on_provider(p.id).await?;
        let by_id: HashMap<VolumeId, &crate::model::Volume> = known.iter().map(|v| (v.id, v)).collect();
        let mut seen: HashMap<VolumeId, Observed> = HashMap::with_capacity(listed.len());
        for v in &listed {
            let Ok(id) = v.volume_id.parse::<VolumeId>() else { continue };
            let attachment = v.vm_id.parse::<VmId>().ok().map(|vm| (vm, v.slot));
            seen.insert(id, Observed { attachment });
            if !by_id.contains_key(&id) {
                report.volume_orphans += 1;
                let detail = format!("an HCP volume unknown to HCP (or deleted) on provider {}", p.name);
                self.record(volume_audit(
                    AuditAction::ReconcileOrphan,
                    id,
                    AuditOutcome::Drift(Verdict::Reported),
                    detail,
                ))
                .await;
            }
        }
        for v in &known {
            if v.current_job_id.is_some() || v.updated_at > observed_at {
                continue;
            }
            let observed = seen.get(&v.id).copied();
            let Some(drift) = volume_drift(v.status, v.attachment, v.native_id.is_some(), observed) else {
                continue;
            };
            let (action, detail) = match drift {
                VolumeDrift::Missing => {
                    (AuditAction::ReconcileMissing, "absent on the hypervisor".to_owned())
                }
                VolumeDrift::Attached(vm, slot) => {
                    (AuditAction::ReconcileAttachment, format!("attached to vm {vm} at {slot} without HCP"))
                }
                VolumeDrift::Detached => {
                    (AuditAction::ReconcileAttachment, "detached without HCP".to_owned())
                }
            };
            let mut audit = volume_audit(action, v.id, AuditOutcome::Drift(Verdict::Adopted), detail.clone());
            audit.tenant_id = v.tenant_id.clone();
            audit.project_id = v.project_id.clone();
            match self.store.correct_volume(v, drift, &audit).await {
                Ok(true) => {
                    super::counted(&audit);
                    match drift {
                        VolumeDrift::Missing => report.volumes_missing += 1,
                        _ => report.attachments += 1,
                    }
                }
                Ok(false) => {
                    report.skipped += 1;
                    // Attached to something that is not one of the
                    // project's VMs (or at a taken place): said, not
                    // recorded.
                    if matches!(drift, VolumeDrift::Attached(..)) {
                        let mut said =
                            volume_audit(action, v.id, AuditOutcome::Drift(Verdict::Reported), detail);
                        said.tenant_id = v.tenant_id.clone();
                        said.project_id = v.project_id.clone();
                        self.record(said).await;
                    }
                }
                Err(e) => tracing::warn!(volume_id = %v.id, error = %e, "cannot record a volume's drift"),
            }
        }
        Ok(())
    }

    /// Lists every volume of the provider.
    async fn volume_inventory(&self, p: &Provider) -> Result<Vec<provider::VolumeInfo>, CallError> {
        let mut compute = self.clients.compute(p).map_err(CallError::Channel)?;
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = compute
                .list_volumes(provider::ListVolumesRequest { page_size: 1000, page_token: token.clone() })
                .await
                .map_err(|status| CallError::Failed { method: "ListVolumes", status })?
                .into_inner();
            out.extend(page.volumes);
            if page.next_page_token.is_empty() || page.next_page_token == token {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }
}

fn volume_audit(
    action: AuditAction,
    volume: VolumeId,
    outcome: AuditOutcome<'_>,
    detail: String,
) -> AuditEvent {
    let mut event = AuditEvent::new("system:reconciler", action, Resource::Volume(volume), outcome);
    event.trace_id = hcp_telemetry::current_trace_id().unwrap_or_default();
    event.detail = detail;
    event
}
