//! The reconciler: periodically compares each provider's inventory with the
//! desired state in the store and handles three kinds of drift, each by a
//! configured policy, recording every decision as an audit event:
//!
//! | drift | report | repair | reap / adopt |
//! |---|---|---|---|
//! | VM missing on the hypervisor | audit only | VM becomes ERROR (NOT_FOUND) | VM becomes DELETED |
//! | power changed out of band | audit only | the hypervisor is driven back to the desired state | `adopt`: the store takes the observed state |
//! | orphan: an HCP-tagged VM HCP does not know (or deleted) | audit only | — | `reap`: deleted on the hypervisor |
//!
//! A VM's restart policy comes before the power policy: a VM that should
//! run and is found down (`always`: shut off or crashed; `on-failure`:
//! crashed, or its host is down) gets a `vm.recover` job, which starts it
//! where it is or, its host being down, rebuilds it on another host. The
//! host a provider reports a VM on is recorded (a move HCP did not make).
//!
//! Races with jobs are ruled out: a VM with a job operating on it, in a
//! transitional state, or changed after the inventory was taken is skipped
//! (its next period decides), and corrections are compare-and-set on the
//! status. One reconciler runs at a time across all worker processes (a
//! named lease in the store).

use std::collections::HashMap;
use std::time::Duration;

use hcp_proto::ids::VmId;
use hcp_proto::provider;
use tokio::sync::watch;

use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::config::ReconcilerConfig;
use crate::lifecycle::{self, Correction, Drift, Power, Verdict};
use crate::model::{
    AuditEvent, HostState, LeftoverCleanup, OrphanPolicy, Provider, RestartPolicy, VmStatus, now,
};
use crate::moves::{Asker, Moves};
use crate::providers::{CallError, ProviderClients};
use crate::store::{KnownVm, Store};

mod volumes;

/// What one pass over one provider found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// VMs the provider listed.
    pub listed: usize,
    /// VMs the store has on the provider.
    pub known: usize,
    /// Missing on the hypervisor.
    pub missing: usize,
    /// Power drift.
    pub power: usize,
    /// Orphans.
    pub orphans: usize,
    /// Skipped because a job operates on them or they changed meanwhile.
    pub skipped: usize,
    /// VMs whose reported addresses changed and were recorded.
    pub addresses: usize,
    /// VMs found down whose restart policy started a recovery.
    pub restarts: usize,
    /// VMs whose host changed without HCP, recorded.
    pub hosts: usize,
    /// Volumes gone from the hypervisor (now ERROR).
    pub volumes_missing: usize,
    /// Volumes attached or detached without HCP, recorded.
    pub attachments: usize,
    /// HCP's volumes on the hypervisor that HCP does not know, reported.
    pub volume_orphans: usize,
    /// Leftovers of force-deleted VMs cleaned (deleted on the provider,
    /// or found gone there).
    pub leftovers: usize,
}

/// Runs reconciliation passes.
#[derive(Clone)]
pub struct Reconciler {
    store: Store,
    clients: ProviderClients,
    config: ReconcilerConfig,
    owner: String,
    moves: Moves,
}

/// Name of the singleton lease.
const LEASE: &str = "reconciler";

impl Reconciler {
    /// Creates a reconciler; `owner` identifies this process.
    pub fn new(
        store: Store,
        clients: ProviderClients,
        config: ReconcilerConfig,
        owner: String,
        moves: Moves,
    ) -> Self {
        Self { store, clients, config, owner, moves }
    }

    /// Runs a pass every period while this process holds the lease.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_secs(self.config.interval_seconds);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            let t = now();
            let until = t + chrono::Duration::from_std(every * 3).unwrap_or_default();
            match self.store.acquire_singleton(LEASE, &self.owner, t, until).await {
                Ok(true) => {
                    self.pass().await;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the reconciler lease"),
            }
        }
    }

    /// One pass over every provider.
    pub async fn pass(&self) -> Report {
        let mut total = Report::default();
        let providers = match self.store.list_providers().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "reconciler cannot list providers");
                return total;
            }
        };
        for p in providers.iter().filter(|p| p.healthy) {
            match self.reconcile(p).await {
                Ok(r) => {
                    if r.missing + r.power + r.orphans + r.volumes_missing + r.attachments + r.volume_orphans
                        > 0
                    {
                        tracing::info!(provider = %p.name, ?r, "drift handled");
                    }
                    total.listed += r.listed;
                    total.known += r.known;
                    total.missing += r.missing;
                    total.power += r.power;
                    total.orphans += r.orphans;
                    total.skipped += r.skipped;
                    total.addresses += r.addresses;
                    total.restarts += r.restarts;
                    total.hosts += r.hosts;
                    total.volumes_missing += r.volumes_missing;
                    total.attachments += r.attachments;
                    total.volume_orphans += r.volume_orphans;
                    total.leftovers += r.leftovers;
                }
                Err(e) => {
                    tracing::warn!(provider = %p.name, error = %hcp_telemetry::error_chain(&e), "reconcile failed")
                }
            }
        }
        total
    }

    /// Lists a provider's whole inventory.
    async fn inventory(&self, p: &Provider) -> Result<Vec<provider::VmInfo>, CallError> {
        let mut compute = self.clients.compute(p).map_err(CallError::Channel)?;
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = compute
                .list_vms(provider::ListVmsRequest { page_size: 1000, page_token: token.clone() })
                .await
                .map_err(|status| CallError::Failed { method: "ListVms", status })?
                .into_inner();
            out.extend(page.vms);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// One provider: compare, decide, act, audit.
    pub async fn reconcile(&self, p: &Provider) -> Result<Report, CallError> {
        // Taken before listing: a VM the store changed after this moment may
        // not be reflected in the inventory, so it is left for next time.
        let observed_at = now();
        let inventory = self.inventory(p).await?;
        let known = self.store.vms_on_provider(p.id).await?;
        let by_id: HashMap<VmId, &KnownVm> = known.iter().map(|k| (k.id, k)).collect();
        // Host states as of now, not as of the last probe: a VM found
        // crashed on a host that just died is rebuilt elsewhere, not
        // started where it cannot run.
        if let Err(e) = self.clients.refresh_hosts(&self.store, p).await {
            tracing::debug!(
                provider = %p.name,
                error = %hcp_telemetry::error_chain(&e),
                "cannot refresh hosts before reconciling"
            );
        }
        let down: std::collections::HashSet<String> = self
            .store
            .list_hosts(Some(p.id))
            .await?
            .into_iter()
            .filter(|h| h.state == HostState::Down)
            .map(|h| h.name)
            .collect();
        let mut report = Report { listed: inventory.len(), known: known.len(), ..Report::default() };
        // Force-deleted VMs whose provider-side VM is still to be cleaned:
        // known, not orphans; cleaned below whatever the orphan policy.
        let leftovers: std::collections::HashSet<VmId> =
            self.store.list_leftovers(Some(p.id), true).await?.into_iter().map(|l| l.vm_id).collect();
        let mut seen = std::collections::HashSet::with_capacity(inventory.len());
        let mut first_hosts: Vec<(VmId, String)> = Vec::new();

        for vm in &inventory {
            let Ok(id) = vm.vm_id.parse::<VmId>() else {
                tracing::debug!(vm_id = %vm.vm_id, "provider listed a vm without an HCP id");
                continue;
            };
            seen.insert(id);
            if leftovers.contains(&id) {
                continue;
            }
            let power =
                provider::PowerState::try_from(vm.power_state).unwrap_or(provider::PowerState::Unspecified);
            match by_id.get(&id) {
                None => {
                    report.orphans += 1;
                    self.orphan(p, id, "unknown to HCP").await;
                }
                Some(k)
                    if k.current_job_id.is_some()
                        || k.status.is_transitional()
                        || k.updated_at > observed_at =>
                {
                    report.skipped += 1;
                }
                Some(k) if k.status == VmStatus::Deleted => {
                    report.orphans += 1;
                    self.orphan(p, id, "deleted in HCP").await;
                }
                Some(k) => {
                    let host_down = down.contains(&k.host);
                    if restart_applies(k, power, host_down) {
                        report.restarts += 1;
                        self.restart(k, power, host_down).await;
                        continue;
                    }
                    if !vm.host.is_empty() && k.host.is_empty() {
                        // HCP learns where the VM is (made before hosts were
                        // recorded, or adopted): no move, no audit; written
                        // in bulk after the pass.
                        first_hosts.push((id, vm.host.clone()));
                    } else if !vm.host.is_empty() && vm.host != k.host {
                        match self.store.set_vm_host(id, &vm.host).await {
                            Ok(true) => {
                                report.hosts += 1;
                                let detail = format!("host {} -> {}", k.host, vm.host);
                                self.record(self.audit(
                                    AuditAction::ReconcileHost,
                                    id,
                                    AuditOutcome::Recorded,
                                    detail,
                                ))
                                .await;
                            }
                            Ok(false) => report.skipped += 1,
                            Err(e) => tracing::warn!(vm_id = %id, error = %e, "cannot record a host"),
                        }
                    }
                    let drift = observed_power(power).and_then(|p| lifecycle::drift(k.status, Some(p)));
                    if let Some(drift) = drift {
                        report.power += 1;
                        self.power_drift(p, k, drift, power, observed_at).await;
                    } else if let Some(networks) = crate::jobs::merge_interfaces(&k.networks, &vm.interfaces)
                    {
                        // Addresses change without HCP (DHCP, the guest):
                        // record what the hypervisor reports now.
                        match self.store.set_vm_networks(id, &networks).await {
                            Ok(true) => report.addresses += 1,
                            Ok(false) => report.skipped += 1,
                            Err(e) => tracing::warn!(vm_id = %id, error = %e, "cannot record addresses"),
                        }
                    }
                }
            }
        }
        for k in &known {
            if !seen.contains(&k.id) && lifecycle::drift(k.status, None) == Some(Drift::Missing) {
                if k.current_job_id.is_some() || k.updated_at > observed_at {
                    report.skipped += 1;
                    continue;
                }
                if k.status == VmStatus::Active
                    && k.restart_policy != RestartPolicy::Never
                    && down.contains(&k.host)
                {
                    // Its host is down and took the VM out of the
                    // provider's view: rebuild it elsewhere.
                    report.restarts += 1;
                    self.restart(k, provider::PowerState::Unspecified, true).await;
                    continue;
                }
                report.missing += 1;
                self.missing(k, observed_at).await;
            }
        }
        for id in &leftovers {
            if self.clean_leftover(p, *id, seen.contains(id)).await {
                report.leftovers += 1;
            }
        }
        if p.capabilities.supports_volumes {
            self.reconcile_volumes(p, &mut report).await?;
        }
        match self.store.set_first_hosts(&first_hosts).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(provider = %p.name, vms = n, "recorded the hosts of vms whose host HCP did not know")
            }
            Err(e) => tracing::warn!(provider = %p.name, error = %e, "cannot record hosts"),
        }
        Ok(report)
    }

    /// The audit event of a decision (every decision makes exactly one).
    fn audit(&self, action: AuditAction, vm: VmId, outcome: AuditOutcome<'_>, detail: String) -> AuditEvent {
        let mut event = AuditEvent::new("system:reconciler", action, Resource::Vm(vm), outcome);
        event.trace_id = hcp_telemetry::current_trace_id().unwrap_or_default();
        event.detail = detail;
        event
    }

    async fn record(&self, audit: AuditEvent) {
        match self.store.append_audit(&audit).await {
            Ok(()) => counted(&audit),
            Err(e) => tracing::warn!(error = %e, "cannot record a reconciler decision"),
        }
    }

    async fn missing(&self, k: &KnownVm, observed_at: chrono::DateTime<chrono::Utc>) {
        let detail = format!("desired {}, absent on the hypervisor", k.status);
        let correction = lifecycle::correct(Drift::Missing, k.status, self.config.missing, self.config.power);
        self.carry_out(k, Drift::Missing, &correction, detail, observed_at).await;
    }

    async fn power_drift(
        &self,
        p: &Provider,
        k: &KnownVm,
        drift: Drift,
        observed: provider::PowerState,
        observed_at: chrono::DateTime<chrono::Utc>,
    ) {
        let detail = format!("desired {}, observed {}", k.status, observed.as_str_name());
        let correction = lifecycle::correct(drift, k.status, self.config.missing, self.config.power);
        let Some(power) = correction.drive else {
            return self.carry_out(k, drift, &correction, detail, observed_at).await;
        };
        let result = match self.clients.compute(p) {
            Ok(mut c) => {
                let r = match power {
                    Power::Running => {
                        c.start_vm(provider::VmRef { vm_id: k.id.to_string() }).await.map(|_| ())
                    }
                    Power::Off => c
                        .stop_vm(provider::StopVmRequest {
                            vm_id: k.id.to_string(),
                            force: false,
                            timeout_seconds: 0,
                        })
                        .await
                        .map(|_| ()),
                };
                r.map_err(|s| s.message().to_owned())
            }
            Err(e) => Err(e.message),
        };
        let (verdict, detail) = match result {
            Ok(()) => (correction.verdict, detail),
            Err(e) => (Verdict::Failed, format!("{detail}; repair failed: {e}")),
        };
        self.record(self.audit(drift.audit_action(), k.id, AuditOutcome::Drift(verdict), detail)).await;
    }

    /// Records a correction: the audit event alone for a report, else the
    /// guarded change of the VM's record with it.
    async fn carry_out(
        &self,
        k: &KnownVm,
        drift: Drift,
        correction: &Correction,
        detail: String,
        observed_at: chrono::DateTime<chrono::Utc>,
    ) {
        let audit = self.audit(drift.audit_action(), k.id, AuditOutcome::Drift(correction.verdict), detail);
        if correction.vm.is_none() {
            return self.record(audit).await;
        }
        match self.store.correct_vm_status(k.id, k.status, observed_at, correction, &audit).await {
            Ok(true) => counted(&audit),
            Ok(false) => tracing::debug!(vm_id = %k.id, "vm changed meanwhile; left for the next pass"),
            Err(e) => tracing::warn!(vm_id = %k.id, ?drift, error = %e, "cannot correct a vm"),
        }
    }

    /// Starts a recovery of a VM found down (its restart policy said so).
    async fn restart(&self, k: &KnownVm, observed: provider::PowerState, host_down: bool) {
        let why = if host_down {
            format!("host {} is down", k.host)
        } else {
            format!("desired {}, observed {}", k.status, observed.as_str_name())
        };
        let why = format!("restart policy {}: {why}", k.restart_policy);
        let vm = match self.store.get_vm_internal(k.id).await {
            Ok(vm) => vm,
            Err(e) => {
                tracing::warn!(vm_id = %k.id, error = %e, "cannot read a vm to restart");
                return;
            }
        };
        let request_id = format!("reconcile-{}", self.owner);
        let asker = Asker { actor: "system:reconciler", request_id: &request_id };
        match self.moves.recover(&asker, &vm, host_down, &why).await {
            Ok(job) => {
                tracing::info!(vm_id = %k.id, job_id = %job.id, %why, "restart accepted");
                metrics::counter!("hcp_reconciler_drift_total", "kind" => "restart", "action" => "accepted")
                    .increment(1);
            }
            // A job took the VM meanwhile: the next pass looks again.
            Err(e) if e.details.contains_key("job_id") => {}
            Err(e) => {
                let detail = format!("{why}; cannot restart: {}", e.message);
                self.record(self.audit(
                    AuditAction::ReconcileRestart,
                    k.id,
                    AuditOutcome::Refused(None),
                    detail,
                ))
                .await;
            }
        }
    }

    /// Deletes a force-deleted VM's leftover on its provider (when it
    /// still lists it; DeleteVm is idempotent) and marks it cleaned,
    /// audited. A failed delete leaves it open for the next pass.
    async fn clean_leftover(&self, p: &Provider, id: VmId, listed: bool) -> bool {
        let how = if listed {
            let result = match self.clients.compute(p) {
                Ok(mut c) => c.delete_vm(provider::VmRef { vm_id: id.to_string() }).await.map(|_| ()),
                Err(e) => Err(tonic::Status::unavailable(e.message)),
            };
            match result {
                Ok(()) => LeftoverCleanup::Removed,
                Err(s) if s.code() == tonic::Code::NotFound => LeftoverCleanup::Absent,
                Err(s) => {
                    let detail = format!("leftover on provider {}; delete failed: {}", p.name, s.message());
                    self.record(self.audit(
                        AuditAction::ReconcileLeftover,
                        id,
                        AuditOutcome::Drift(Verdict::Failed),
                        detail,
                    ))
                    .await;
                    return false;
                }
            }
        } else {
            LeftoverCleanup::Absent
        };
        let detail = format!("leftover on provider {}: {how}", p.name);
        let audit =
            self.audit(AuditAction::ReconcileLeftover, id, AuditOutcome::Drift(Verdict::Reaped), detail);
        match self.store.mark_leftover_cleaned(id, how, &audit).await {
            Ok(true) => {
                counted(&audit);
                tracing::info!(vm_id = %id, provider = %p.name, how = %how, "leftover of a force-deleted vm cleaned");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(vm_id = %id, error = %e, "cannot mark a leftover cleaned");
                false
            }
        }
    }

    async fn orphan(&self, p: &Provider, id: VmId, why: &str) {
        let detail = format!("{why}; on provider {}", p.name);
        match self.config.orphan {
            OrphanPolicy::Report => {
                self.record(self.audit(
                    AuditAction::ReconcileOrphan,
                    id,
                    AuditOutcome::Drift(Verdict::Reported),
                    detail,
                ))
                .await
            }
            OrphanPolicy::Reap => {
                let result = match self.clients.compute(p) {
                    Ok(mut c) => c
                        .delete_vm(provider::VmRef { vm_id: id.to_string() })
                        .await
                        .map(|_| ())
                        .map_err(|s| s.message().to_owned()),
                    Err(e) => Err(e.message),
                };
                let (verdict, detail) = match result {
                    Ok(()) => (Verdict::Reaped, detail),
                    Err(e) => (Verdict::Failed, format!("{detail}; delete failed: {e}")),
                };
                let outcome = AuditOutcome::Drift(verdict);
                self.record(self.audit(AuditAction::ReconcileOrphan, id, outcome, detail)).await;
            }
        }
    }
}
/// Whether a VM found in `power` (its host down or not) should be started
/// again by its restart policy: it should run (ACTIVE in HCP), and it is
/// down in a way the policy covers.
/// The power state a provider reported, as the lifecycle compares it;
/// `None` when it said nothing usable (a VM listed without a power state
/// does not drift).
fn observed_power(power: provider::PowerState) -> Option<Power> {
    use provider::PowerState as P;
    match power {
        P::Running => Some(Power::Running),
        P::Shutoff | P::Crashed => Some(Power::Off),
        _ => None,
    }
}

fn restart_applies(k: &KnownVm, power: provider::PowerState, host_down: bool) -> bool {
    use provider::PowerState as P;
    if k.status != VmStatus::Active {
        return false;
    }
    match k.restart_policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => power == P::Crashed || (host_down && power != P::Running),
        RestartPolicy::Always => {
            matches!(power, P::Crashed | P::Shutoff) || (host_down && power != P::Running)
        }
    }
}

/// Counts a decision that was recorded, as
/// `hcp_reconciler_drift_total{kind,action}`.
fn counted(audit: &AuditEvent) {
    let kind = audit.action.strip_prefix("reconcile.").unwrap_or(&audit.action).to_owned();
    metrics::counter!("hcp_reconciler_drift_total", "kind" => kind, "action" => audit.outcome.clone())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(status: VmStatus, policy: RestartPolicy) -> KnownVm {
        KnownVm {
            id: VmId::new(),
            status,
            current_job_id: None,
            updated_at: now(),
            networks: Vec::new(),
            host: "h1".into(),
            restart_policy: policy,
        }
    }

    #[test]
    fn restart_policies_cover_what_they_say() {
        use RestartPolicy as R;
        use provider::PowerState as P;
        // (policy, observed power, host down) -> restart?
        let table = [
            (R::Never, P::Crashed, true, false),
            (R::Never, P::Shutoff, false, false),
            (R::OnFailure, P::Crashed, false, true),
            (R::OnFailure, P::Shutoff, false, false),
            (R::OnFailure, P::Shutoff, true, true),
            (R::OnFailure, P::Running, true, false),
            (R::Always, P::Shutoff, false, true),
            (R::Always, P::Crashed, false, true),
            (R::Always, P::Paused, false, false),
            (R::Always, P::Running, false, false),
            (R::Always, P::Unspecified, true, true),
        ];
        for (policy, power, down, want) in table {
            assert_eq!(
                restart_applies(&known(VmStatus::Active, policy), power, down),
                want,
                "{policy} {power:?} {down}"
            );
        }
        // Only a VM that should run is restarted.
        for status in [VmStatus::Stopped, VmStatus::Error, VmStatus::Deleted, VmStatus::Stopping] {
            assert!(!restart_applies(&known(status, R::Always), P::Shutoff, true), "{status}");
        }
    }
}
