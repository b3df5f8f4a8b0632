//! Moving VMs between hosts: the migrations operators ask for (one VM, or
//! every VM of a host being drained) and the recoveries the reconciler
//! starts by a VM's restart policy. Each is a job accepted like any other
//! operation (the VM's state and the job in one transaction, see
//! `Store::accept_operation`), with the target host written on the VM at
//! accept time so placement counts it there while it moves.

use std::sync::Arc;

use hcp_proto::error::{ApiError, ErrorCode};
use hcp_proto::ids::VmId;

use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::error::from_store;
use crate::jobs::JobQueue;
use crate::lifecycle::Capability;
use crate::model::{AuditEvent, Job, JobKind, Scope, Vm, VmStatus};
use crate::placement;
use crate::store::{AcceptOperation, HostChange, Member, Store, StoreError};

/// Accepts moves.
#[derive(Clone)]
pub struct Moves {
    store: Store,
    queue: Arc<dyn JobQueue>,
    max_attempts: u32,
}

/// Who asks for a move, and why.
#[derive(Debug, Clone)]
pub struct Asker<'a> {
    /// The token subject, or `system:<component>`.
    pub actor: &'a str,
    /// The request's id (or the drain's, the reconciler pass's).
    pub request_id: &'a str,
}

impl Moves {
    /// Creates the service.
    pub fn new(store: Store, queue: Arc<dyn JobQueue>, max_attempts: u32) -> Self {
        Self { store, queue, max_attempts }
    }

    /// Accepts a migration of `vm` to `target` (placement picks when
    /// `None`), live by default when the VM runs. Errors name what rules
    /// the move out before any job exists.
    pub async fn migrate(
        &self,
        asker: &Asker<'_>,
        vm: VmId,
        target: Option<&str>,
        live: Option<bool>,
    ) -> Result<(Vm, Job), ApiError> {
        let vm = match self.store.get_vm_internal(vm).await {
            Ok(vm) if vm.status != VmStatus::Deleted => vm,
            Ok(_) | Err(StoreError::NotFound) => return Err(ApiError::not_found("vm", vm)),
            Err(e) => return Err(from_store(e, "vm")),
        };
        let running = vm.status == VmStatus::Active;
        let live = live.unwrap_or(running);
        if live && !running {
            return Err(ApiError::invalid_field(
                "live",
                format!("a live migration needs a running vm; vm {} is {}", vm.id, vm.status),
            ));
        }
        if !live && running {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "a cold migration needs a stopped vm; vm {} is ACTIVE (stop it, or migrate it live)",
                    vm.id
                ),
            )
            .with_detail("field", "live"));
        }
        let provider =
            self.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        let cap = if live { Capability::LiveMigration } else { Capability::ColdMigration };
        if !cap.of(&provider.capabilities) {
            return Err(ApiError::feature_not_supported(
                cap.flag(),
                format!(
                    "the vm's provider does not support {} migration ({cap})",
                    if live { "live" } else { "cold" }
                ),
            ));
        }
        let (candidates, guard) = self.targets(&vm, target).await?;
        let mut last = None;
        for choice in candidates.iter().take(MAX_TRIES) {
            let change = HostChange {
                to: Some(choice.host.clone()),
                live,
                group: guard.clone(),
                capacity: choice.capacity.clone(),
            };
            let detail = format!("from {} to {}{}", vm.host, choice.host, if live { ", live" } else { "" });
            match self.accept(asker, &vm, JobKind::MigrateVm, change, detail).await {
                Ok(job) => return Ok((vm, job)),
                Err(StoreError::Conflict(msg)) if guard.is_some() => last = Some(("placement_group", msg)),
                Err(StoreError::NoRoom(msg)) => last = Some(("capacity", msg)),
                Err(e) => return Err(from_store(e, &format!("vm {}", vm.id))),
            }
        }
        let (reason, msg) = last.unwrap_or(("placement_group", "no host can take the vm".to_owned()));
        Err(ApiError::new(ErrorCode::Conflict, msg).with_detail("reason", reason))
    }

    /// Accepts a recovery of a VM found down: where it is, or (its host
    /// down) on a host placement picks, which needs cold migration.
    pub async fn recover(
        &self,
        asker: &Asker<'_>,
        vm: &Vm,
        host_down: bool,
        why: &str,
    ) -> Result<Job, ApiError> {
        let to = if host_down {
            let provider =
                self.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
            if !Capability::ColdMigration.of(&provider.capabilities) {
                return Err(ApiError::feature_not_supported(
                    Capability::ColdMigration.flag(),
                    "its host is down and its provider cannot rebuild it elsewhere",
                ));
            }
            let (mut candidates, guard) = self.targets(vm, None).await?;
            Some((candidates.remove(0), guard))
        } else {
            None
        };
        let (to, capacity, group) = match to {
            Some((choice, guard)) => (Some(choice.host), choice.capacity, guard),
            None => (None, None, None),
        };
        let detail = match &to {
            Some(to) => format!("{why}; rebuilt from {} on {to}", vm.host),
            None => format!("{why}; started where it is"),
        };
        let change = HostChange { to, live: false, group, capacity };
        self.accept(asker, vm, JobKind::RecoverVm, change, detail)
            .await
            .map_err(|e| from_store(e, &format!("vm {}", vm.id)))
    }

    /// The hosts of the VM's provider it may move to (`target` alone when
    /// named), best first, and the strict group rule the move must keep.
    async fn targets(
        &self,
        vm: &Vm,
        target: Option<&str>,
    ) -> Result<(Vec<placement::Choice>, Option<crate::store::GroupGuard>), ApiError> {
        let group = self.group_of(vm).await?;
        let request = placement::Request {
            zone: Some(&vm.zone),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            group: group.as_ref().map(|(g, m)| (g, m.as_slice())),
            provider: Some(vm.provider_id),
            moving: Some((vm.id, &vm.host)),
            host: target,
            ..placement::Request::default()
        };
        Ok((placement::candidates(&self.store, &request).await?, request.guard()))
    }

    async fn group_of(
        &self,
        vm: &Vm,
    ) -> Result<Option<(crate::model::PlacementGroup, Vec<Member>)>, ApiError> {
        let Some(id) = vm.placement_group_id else { return Ok(None) };
        let g = self
            .store
            .get_placement_group_internal(id)
            .await
            .map_err(|e| from_store(e, "placement group"))?;
        let m = self.store.group_members(id).await.map_err(|e| from_store(e, "placement group"))?;
        Ok(Some((g, m)))
    }

    async fn accept(
        &self,
        asker: &Asker<'_>,
        vm: &Vm,
        kind: JobKind,
        change: HostChange,
        detail: String,
    ) -> Result<Job, StoreError> {
        let scope = Scope::new(vm.tenant_id.clone(), vm.project_id.clone());
        let job = Job::queued(
            kind,
            &scope,
            Some(vm.id),
            asker.actor,
            self.max_attempts,
            hcp_telemetry::current_traceparent(),
            asker.request_id,
        );
        let mut audit =
            AuditEvent::new(asker.actor, AuditAction::Job(kind), Resource::Vm(vm.id), AuditOutcome::Accepted);
        audit.tenant_id = vm.tenant_id.clone();
        audit.project_id = vm.project_id.clone();
        audit.job_id = job.id.to_string();
        audit.trace_id = hcp_telemetry::current_trace_id().unwrap_or_default();
        audit.detail = detail;
        let op = AcceptOperation {
            scope,
            vm_id: vm.id,
            kind,
            require_status: Some(vm.status),
            snapshot: None,
            image: None,
            resize: None,
            host_change: Some(change),
            capacity: None,
        };
        self.store.accept_operation(&op, &job, &audit, None).await?;
        self.queue.job_accepted(job.id);
        Ok(job)
    }
}

/// Candidates a move tries when a strict group's rule refuses the first.
const MAX_TRIES: usize = 16;
