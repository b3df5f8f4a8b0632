//! Host drains: a host an operator drains takes no new VMs (placement skips
//! it), and its VMs are moved off as migration jobs, at most `concurrency`
//! at a time per host. A VM whose move fails or cannot be made (no live
//! migration for a running VM, a strict affinity group) stays and is named
//! in the host's view; every refusal is audited once per drain (and tried
//! again later). The host is DRAINED once nothing of HCP's is left on it
//! and every move off it has finished. One drainer runs at a
//! time across worker processes (a named lease); the state lives in the
//! store (the host's drain state and the jobs), so another process takes
//! over where this one stopped.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hcp_proto::ids::{ProviderId, VmId};
use tokio::sync::watch;

use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::config::DrainConfig;
use crate::model::{AuditEvent, Drain, Host, VmStatus, now};
use crate::moves::{Asker, Moves};
use crate::store::Store;

/// Runs drains.
pub struct Drainer {
    store: Store,
    moves: Moves,
    events: crate::events::JobEvents,
    config: DrainConfig,
    owner: String,
    /// Moves refused in the current drains, and when: audited the first
    /// time, tried again after [`RETRY_REFUSED`] (room may free up).
    refused: HashMap<(ProviderId, String, VmId), Instant>,
}

/// The shortest time between two passes that job changes trigger.
const MIN_GAP: Duration = Duration::from_millis(10);

/// How long a refused move waits before the drain tries it again.
const RETRY_REFUSED: Duration = Duration::from_secs(30);

const LEASE: &str = "drainer";
const ACTOR: &str = "system:drain";

impl Drainer {
    /// Creates a drainer; `owner` identifies this process.
    pub fn new(
        store: Store,
        moves: Moves,
        events: crate::events::JobEvents,
        config: DrainConfig,
        owner: String,
    ) -> Self {
        Self { store, moves, events, config, owner, refused: HashMap::new() }
    }

    /// Runs a pass every period while this process holds the lease.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.config.interval_ms);
        let mut changes = self.events.subscribe();
        let mut active = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                // A lagging receiver only means many changes: look now.
                _ = changes.recv(), if active => {}
                _ = shutdown.changed() => return,
            }
            let t = now();
            let until = t + chrono::Duration::seconds(10);
            match self.store.acquire_singleton(LEASE, &self.owner, t, until).await {
                Ok(true) => match self.pass().await {
                    Ok(draining) => {
                        active = draining;
                        if active {
                            tokio::time::sleep(MIN_GAP).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "drain pass failed"),
                },
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the drainer lease"),
            }
        }
    }

    /// One pass over every draining host; returns whether any is draining.
    pub async fn pass(&mut self) -> Result<bool, crate::store::StoreError> {
        let hosts = self.store.list_hosts(None).await?;
        let draining: Vec<&Host> = hosts.iter().filter(|h| h.drain == Drain::Draining).collect();
        self.refused.retain(|(p, h, _), _| draining.iter().any(|d| d.provider_id == *p && d.name == *h));
        let any = !draining.is_empty();
        for host in draining {
            self.drain(host).await?;
        }
        Ok(any)
    }

    async fn drain(&mut self, host: &Host) -> Result<(), crate::store::StoreError> {
        let vms = self.store.vms_on_host(host.provider_id, &host.name).await?;
        let in_flight = self.store.moves_in_flight(host.provider_id, &host.name).await?;
        if vms.is_empty() {
            // A VM names its new host from the moment its move is
            // accepted: the host is empty once those moves have finished.
            if in_flight == 0 {
                self.store.set_drain(host.provider_id, &host.name, Drain::Drained, now()).await?;
                tracing::info!(provider = %host.provider_id, host = %host.name, "host drained");
            }
            return Ok(());
        }
        let since = host.drain_started_at.unwrap_or(host.updated_at);
        let failed: HashSet<VmId> =
            self.store.failed_moves(host.provider_id, &host.name, since).await?.into_iter().collect();
        let mut room = self.config.concurrency.saturating_sub(in_flight);
        let request_id = format!("drain-{}-{}", host.provider_id, host.name);
        for vm in vms {
            if room == 0 {
                break;
            }
            let key = (host.provider_id, host.name.clone(), vm.id);
            let movable =
                vm.current_job_id.is_none() && matches!(vm.status, VmStatus::Active | VmStatus::Stopped);
            let waiting = self.refused.get(&key).is_some_and(|at| at.elapsed() < RETRY_REFUSED);
            if !movable || failed.contains(&vm.id) || waiting {
                continue;
            }
            let asker = Asker { actor: ACTOR, request_id: &request_id };
            match self.moves.migrate(&asker, vm.id, None, None).await {
                Ok((_, job)) => {
                    room -= 1;
                    tracing::info!(vm_id = %vm.id, job_id = %job.id, host = %host.name, "drain: move accepted");
                }
                // Taken by a job meanwhile: the next pass looks again.
                Err(e) if e.details.contains_key("job_id") => {}
                Err(e) => {
                    tracing::info!(vm_id = %vm.id, host = %host.name, error = %e.message, "drain: vm cannot move");
                    if self.refused.insert(key, Instant::now()).is_some() {
                        continue;
                    }
                    let mut audit = AuditEvent::new(
                        ACTOR,
                        AuditAction::HostDrain,
                        Resource::Vm(vm.id),
                        AuditOutcome::Refused(None),
                    );
                    audit.tenant_id = vm.tenant_id.clone();
                    audit.project_id = vm.project_id.clone();
                    audit.trace_id = hcp_telemetry::current_trace_id().unwrap_or_default();
                    audit.detail = format!("host {}: {}", host.name, e.message);
                    if let Err(e) = self.store.append_audit(&audit).await {
                        tracing::warn!(error = %e, "cannot record a drain refusal");
                    }
                }
            }
        }
        Ok(())
    }
}
