//! The job engine: workers lease jobs from the store, run each as a sequence
//! of recorded steps against the VM's provider, and finish it together with
//! the VM's new state and an audit event.
//!
//! Guarantees, and what gives them:
//! - A job runs on one worker at a time: the lease on the job row, renewed by
//!   a heartbeat; a worker that loses its lease stops and writes nothing.
//! - A worker that dies is replaced: a lapsed lease makes the job claimable,
//!   and the next worker skips steps recorded in `job_steps` (every step but
//!   the last, whose record is the job's finish).
//! - Re-running a step never duplicates a VM: every provider call is keyed
//!   by the HCP VM id and idempotent by contract.
//! - Retryable provider failures are retried with exponential backoff and
//!   jitter up to `max_attempts`; then the job fails and the VM is ERROR.
//! - A running job can be cancelled: the request is recorded on the job
//!   row; the worker holding it learns of it from the job's change
//!   notification or its own check every `cancel_check_ms`, and every
//!   provider call is raced against that signal. The losing call's future
//!   is dropped, which resets its HTTP/2 stream (how gRPC cancellation
//!   reaches the provider); the worker does not wait for the provider, so
//!   one that ignores the cancellation is cut off all the same. The job ends
//!   CANCELLED, the step log records the interrupted step, and the VM's
//!   state is the lifecycle's ([`Outcome::Interrupted`]).
//!
//! How workers learn about new jobs is the [`JobQueue`]'s business: the
//! in-process queue wakes local workers; every worker also polls the store,
//! so a lost wake-up only delays a job.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hcp_proto::error::ErrorCode;
use hcp_proto::ids::JobId;
use hcp_proto::provider;
use tokio::sync::{Notify, Semaphore, watch};
use tracing::Instrument;

use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::config::JobsConfig;
use crate::lifecycle::{self, JobParams, Outcome, Power, Step};
use crate::model::{AuditEvent, Job, NetworkAttachment, Vm, now};
use crate::providers::{ProviderCallError, ProviderClients};
use crate::store::{Finish, RecordedStep, Store, StoreError};

mod images;
mod volumes;

/// How an attempt ended: the lifecycle outcome and what goes with it.
#[derive(Debug)]
struct Attempt {
    outcome: Outcome,
    /// The failure's message (for the job row and the ops view).
    message: String,
    /// When a retry may run.
    run_after: Option<chrono::DateTime<chrono::Utc>>,
    /// Addresses reported after a successful job.
    networks: Option<Vec<NetworkAttachment>>,
    /// The host the provider reported the VM on after a successful job.
    host: Option<String>,
    /// The VM's size as the attempt found it (see [`Finish::size`]).
    size: Option<lifecycle::Size>,
    /// The job's volume as the provider reported it after a step that made
    /// it.
    volume: Option<crate::store::VolumeReport>,
}

impl Attempt {
    /// A cancellation cut `step`'s provider call.
    fn interrupted(step: Step, by: Option<&str>) -> Self {
        let by = by.map(|b| format!(" by {b}")).unwrap_or_default();
        Attempt {
            outcome: Outcome::Interrupted(step),
            ..Self::failed(ErrorCode::Cancelled, format!("cancelled{by} while {step} ran"))
        }
    }

    fn failed(code: ErrorCode, message: String) -> Self {
        Attempt {
            outcome: Outcome::Failed(code),
            message,
            run_after: None,
            networks: None,
            host: None,
            size: None,
            volume: None,
        }
    }
}

/// Tells workers that a job was committed and can run.
pub trait JobQueue: Send + Sync + 'static {
    /// Called after the transaction holding the job committed. Must not
    /// block; a failure to deliver only delays the job until the next poll.
    fn job_accepted(&self, job: JobId);
}

/// The embedded queue: wakes the workers of this process.
#[derive(Debug, Default, Clone)]
pub struct LocalQueue {
    wake: Arc<Notify>,
}

impl LocalQueue {
    /// Returns the notifier workers wait on.
    pub fn notifier(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

impl JobQueue for LocalQueue {
    fn job_accepted(&self, _job: JobId) {
        self.wake.notify_one();
    }
}

/// Runs jobs.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    clients: ProviderClients,
    config: JobsConfig,
    worker_id: String,
    wake: Arc<Notify>,
    /// One permit per job this process may run at once.
    permits: Arc<Semaphore>,
    /// Set at the end of the shutdown grace period: attempts in flight stop
    /// where they are, writing nothing.
    abandon: Arc<watch::Sender<bool>>,
    /// Where job changes are announced to watchers.
    events: crate::events::JobEvents,
    /// Jobs this engine claimed lately (see [`Claimed`]).
    claimed: Arc<std::sync::Mutex<Claimed>>,
    /// Fetches and converts images for imports.
    images: crate::images::ImageWork,
}

/// The jobs an engine claimed lately, so that the queue's message for a job
/// its own poll already took costs no database round trips (a claim that
/// fails and a read to learn why). Bounded: the oldest are forgotten, and a
/// forgotten job's message just takes the database path again.
#[derive(Debug, Default)]
struct Claimed {
    set: std::collections::HashSet<JobId>,
    order: std::collections::VecDeque<JobId>,
}

impl Claimed {
    const MAX: usize = 4096;

    fn insert(&mut self, id: JobId) {
        if self.set.insert(id) {
            self.order.push_back(id);
            while self.order.len() > Self::MAX {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    /// A job put back to wait for a retry is the queue's again.
    fn remove(&mut self, id: JobId) {
        if self.set.remove(&id) {
            self.order.retain(|x| *x != id);
        }
    }
}

/// What happened to a job offered by the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// This worker leased it and is running it.
    Started,
    /// It is waiting for its retry time; offer it again after the delay.
    NotDue(Duration),
    /// It is finished, or another worker holds it.
    Gone,
}

/// Why a job attempt stopped short of an outcome.
enum Abort {
    /// Another worker holds the job now.
    LeaseLost,
    /// The store failed; the lease will lapse and the job run again.
    Store(StoreError),
    /// The process is shutting down past its grace period.
    Abandoned,
}

impl Engine {
    /// Creates an engine; `wake` is signalled when jobs are accepted locally.
    pub fn new(
        store: Store,
        clients: ProviderClients,
        config: JobsConfig,
        worker_id: String,
        wake: Arc<Notify>,
        events: crate::events::JobEvents,
        images: crate::images::ImageWork,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let abandon = Arc::new(watch::channel(false).0);
        let claimed = Arc::default();
        Self { store, clients, config, worker_id, wake, permits, abandon, events, claimed, images }
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, Claimed> {
        self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers one job (named by a queue message) to this worker: waits for a
    /// free slot, then leases and runs the job if it is runnable.
    pub async fn offer(&self, id: JobId) -> Result<Offer, StoreError> {
        // This engine's poll took it already: it runs or ran here, and if
        // this process dies its lease lapses and any worker's poll takes it.
        if self.claimed().set.contains(&id) {
            return Ok(Offer::Gone);
        }
        let Ok(permit) = self.permits.clone().acquire_owned().await else { return Ok(Offer::Gone) };
        let t = now();
        match self.store.claim_job(id, &self.worker_id, t, self.lease_until(t)).await? {
            Some(job) => {
                self.claimed().insert(job.id);
                self.events.changed(job.id);
                let engine = self.clone();
                tokio::spawn(async move {
                    engine.execute(job).await;
                    drop(permit);
                });
                Ok(Offer::Started)
            }
            None => {
                drop(permit);
                let job = match self.store.get_job_internal(id).await {
                    Ok(job) => job,
                    Err(StoreError::NotFound) => return Ok(Offer::Gone),
                    Err(e) => return Err(e),
                };
                if job.status == crate::model::JobStatus::Queued && job.run_after > t {
                    Ok(Offer::NotDue((job.run_after - t).to_std().unwrap_or_default()))
                } else {
                    Ok(Offer::Gone)
                }
            }
        }
    }

    /// Runs until `shutdown` turns true, then waits for jobs in flight.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let permits = self.permits.clone();
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut tasks = tokio::task::JoinSet::new();
        tracing::info!(worker = %self.worker_id, concurrency = self.config.concurrency, "job engine started");
        if self.config.worker_id.is_some() {
            // A previous run under this name died holding leases: its jobs
            // need not wait for them to lapse.
            match self.store.release_leases(&self.worker_id, now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "took back the leases of this worker's previous run"),
                Err(e) => tracing::warn!(error = %e, "cannot take back this worker's previous leases"),
            }
        }
        loop {
            if *shutdown.borrow() {
                break;
            }
            let first = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => break,
            };
            // Every free slot at once: a burst is claimed in one statement.
            let mut slots = vec![first];
            while let Ok(p) = permits.clone().try_acquire_owned() {
                slots.push(p);
            }
            let t = now();
            match self.store.claim_next_jobs(&self.worker_id, t, self.lease_until(t), slots.len()).await {
                Ok(jobs) if !jobs.is_empty() => {
                    {
                        let mut claimed = self.claimed();
                        for job in &jobs {
                            claimed.insert(job.id);
                        }
                    }
                    for job in jobs {
                        let Some(permit) = slots.pop() else { break };
                        self.events.changed(job.id);
                        let engine = self.clone();
                        tasks.spawn(async move {
                            engine.execute(job).await;
                            drop(permit);
                        });
                    }
                    // Reap finished tasks so the set does not grow.
                    while tasks.try_join_next().is_some() {}
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot claim jobs"),
            }
            drop(slots);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.changed() => break,
            }
        }
        // Jobs in flight may finish within the grace period. Jobs started
        // from queue messages hold permits too: all permits back means all
        // done. Past the grace period the rest are abandoned where they are
        // and their leases handed back, so another worker resumes them at
        // once from their recorded steps (each step is idempotent).
        let grace = Duration::from_secs(self.config.shutdown_grace_seconds);
        let all = u32::try_from(self.config.concurrency).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(grace, async {
            while tasks.join_next().await.is_some() {}
            let _ = permits.acquire_many(all).await;
        })
        .await;
        if drained.is_err() {
            let _ = self.abandon.send(true);
            while tasks.join_next().await.is_some() {}
            let _ = permits.acquire_many(all).await;
        }
        match self.store.release_leases(&self.worker_id, now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "handed back the leases of unfinished jobs"),
            Err(e) => tracing::warn!(error = %e, "cannot hand back leases; they lapse by themselves"),
        }
        tracing::info!(worker = %self.worker_id, "job engine stopped");
    }

    fn lease_until(&self, from: DateTime<Utc>) -> DateTime<Utc> {
        if self.config.unsafe_disable_leases {
            // Test-only: a lease that has already lapsed lets any worker
            // take the job while this one runs it.
            return from;
        }
        from + chrono::Duration::seconds(self.config.lease_seconds as i64)
    }

    /// Runs one leased job to an outcome (or until the lease is lost).
    pub async fn execute(&self, job: Job) {
        let span = tracing::info_span!(
            "job",
            job_id = %job.id,
            vm_id = job.vm_id.map(|v| v.to_string()),
            volume_id = job.volume_id.map(|v| v.to_string()),
            kind = %job.kind,
            attempt = job.attempts,
            trace_id = tracing::field::Empty,
        );
        hcp_telemetry::set_parent_from_traceparent(&span, job.traceparent.as_deref());
        if let Some(t) = hcp_telemetry::trace_id_of(&span) {
            span.record("trace_id", t);
        }
        self.execute_in_span(job).instrument(span).await
    }

    async fn execute_in_span(&self, job: Job) {
        // Heartbeat: renew the lease at a third of its length; if it cannot
        // be renewed, tell the attempt to stop.
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let heartbeat = {
            let store = self.store.clone();
            let worker = self.worker_id.clone();
            let every = Duration::from_secs(self.config.lease_seconds) / 3;
            let lease = self.config.lease_seconds as i64;
            let id = job.id;
            let disabled = self.config.unsafe_disable_leases;
            tokio::spawn(async move {
                if disabled {
                    return;
                }
                loop {
                    tokio::time::sleep(every).await;
                    let until = now() + chrono::Duration::seconds(lease);
                    match store.renew_lease(id, &worker, until).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = lost_tx.send(true);
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot renew lease"),
                    }
                }
            })
        };

        // Cancellation: the job's change notification wakes the check, and
        // it also runs every `cancel_check_ms`, so a lost notification (or
        // one from another process without NATS) delays it by that at most.
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let cancel_watch = {
            let store = self.store.clone();
            let mut changes = self.events.subscribe();
            let every = Duration::from_millis(self.config.cancel_check_ms);
            let id = job.id;
            tokio::spawn(async move {
                loop {
                    match store.cancel_requested(id).await {
                        Ok(true) => {
                            let _ = cancel_tx.send(true);
                            return;
                        }
                        Ok(false) => {}
                        Err(e) => tracing::debug!(error = %e, "cannot read the job's cancellation"),
                    }
                    let deadline = tokio::time::sleep(every);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            changed = changes.recv() => match changed {
                                Ok(changed) if changed == id => break,
                                Ok(_) => {}
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                    (&mut deadline).await;
                                    break;
                                }
                            },
                        }
                    }
                }
            })
        };

        let attempt = async {
            if job.attempts > job.max_attempts {
                // The previous holder died during the last allowed attempt.
                return Ok(Attempt::failed(
                    ErrorCode::Internal,
                    format!("gave up after {} attempts", job.max_attempts),
                ));
            }
            self.run_steps(&job, cancel_rx).await
        };
        let mut abandon = self.abandon.subscribe();
        let result = tokio::select! {
            r = attempt => r,
            _ = abandon.wait_for(|a| *a) => Err(Abort::Abandoned),
            _ = async {
                // A heartbeat that ends without reporting a loss (leases
                // switched off) must not end the attempt.
                if lost_rx.wait_for(|lost| *lost).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => Err(Abort::LeaseLost),
        };
        heartbeat.abort();
        cancel_watch.abort();

        let outcome = match result {
            Ok(outcome) => outcome,
            Err(Abort::LeaseLost) => {
                tracing::warn!("lease lost; another worker owns the job now");
                return;
            }
            Err(Abort::Abandoned) => {
                tracing::info!("shutting down: the job is handed back unfinished");
                return;
            }
            Err(Abort::Store(e)) => {
                tracing::warn!(error = %e, "store failed during the job; it will run again");
                return;
            }
        };
        self.finish(&job, outcome).await;
    }

    async fn finish(&self, job: &Job, attempt: Attempt) {
        let t = now();
        let audit = match attempt.outcome {
            Outcome::Retry(code) => {
                tracing::info!(%code, message = %attempt.message, run_after = ?attempt.run_after, "attempt failed; will retry");
                None
            }
            Outcome::Succeeded { .. } => Some(self.audit(job, AuditOutcome::Succeeded, "")),
            Outcome::Failed(code) => {
                tracing::warn!(%code, message = %attempt.message, "job failed");
                Some(self.audit(job, AuditOutcome::Failed, code.as_str()))
            }
            Outcome::Cancelled => None,
            Outcome::Interrupted(step) => {
                tracing::info!(%step, "job cancelled while running");
                Some(self.audit(job, AuditOutcome::Failed, &format!("CANCELLED: {step} interrupted")))
            }
        };
        let interrupted = match attempt.outcome {
            Outcome::Interrupted(step) => Some(step),
            _ => None,
        };
        let finish = Finish {
            transition: job.transition(attempt.outcome),
            error: match attempt.outcome {
                Outcome::Failed(code) | Outcome::Retry(code) => Some((code, attempt.message.clone())),
                Outcome::Interrupted(_) => Some((ErrorCode::Cancelled, attempt.message.clone())),
                Outcome::Succeeded { .. } | Outcome::Cancelled => None,
            },
            run_after: attempt.run_after,
            networks: attempt.networks,
            host: attempt.host,
            size: attempt.size,
            volume: attempt.volume,
            interrupted,
        };
        match self.store.finish_job(job, &self.worker_id, &finish, t, audit.as_ref()).await {
            Ok(()) => {
                self.events.changed(job.id);
                let outcome = match attempt.outcome {
                    Outcome::Succeeded { .. } => "succeeded",
                    Outcome::Failed(_) => "failed",
                    Outcome::Retry(_) => "retried",
                    Outcome::Cancelled | Outcome::Interrupted(_) => "cancelled",
                };
                metrics::counter!("hcp_jobs_finished_total", "kind" => job.kind.as_str(), "outcome" => outcome)
                    .increment(1);
                if outcome != "retried" {
                    // From acceptance to the end: what the tenant waited.
                    let waited = (t - job.created_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                    metrics::histogram!("hcp_job_duration_seconds", "kind" => job.kind.as_str(), "outcome" => outcome)
                        .record(waited);
                }
                if let Some(run_after) = attempt.run_after {
                    self.claimed().remove(job.id);
                    // Wake a local worker when the backoff is over.
                    let wake = self.wake.clone();
                    let delay = (run_after - t).to_std().unwrap_or_default();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        wake.notify_one();
                    });
                } else {
                    tracing::info!(outcome = ?attempt.outcome, "job finished");
                }
            }
            Err(StoreError::Conflict(msg)) => tracing::warn!(%msg, "job not finished"),
            Err(e) => tracing::warn!(error = %e, "cannot finish job; it will run again"),
        }
    }

    fn audit(&self, job: &Job, outcome: AuditOutcome<'_>, detail: &str) -> AuditEvent {
        let resource = match (job.volume_id, job.vm_id) {
            (Some(volume), _) => Resource::Volume(volume),
            (None, Some(vm)) => Resource::Vm(vm),
            (None, None) => Resource::Job(job.id),
        };
        let mut event = AuditEvent::new("system:worker", AuditAction::Job(job.kind), resource, outcome);
        event.tenant_id = job.tenant_id.clone();
        event.project_id = job.project_id.clone();
        event.job_id = job.id.to_string();
        event.trace_id = hcp_telemetry::current_trace_id().unwrap_or_default();
        event.detail = detail.to_owned();
        event
    }

    /// Returns the delay before attempt `attempts + 1`: exponential from
    /// `backoff_base_ms`, capped, with "equal jitter" (half fixed, half
    /// random) so retries of many jobs spread out.
    pub fn backoff(config: &JobsConfig, attempts: u32) -> Duration {
        use rand::Rng;
        let exp = attempts.saturating_sub(1).min(20);
        let full = config.backoff_base_ms.saturating_mul(1u64 << exp).min(config.backoff_max_ms);
        let half = full / 2;
        let jitter = if half > 0 { rand::thread_rng().gen_range(0..=half) } else { 0 };
        Duration::from_millis(half + jitter)
    }

    async fn run_steps(&self, job: &Job, cancel: watch::Receiver<bool>) -> Result<Attempt, Abort> {
        if job.kind.is_volume_job() {
            return self.run_volume_steps(job, cancel).await;
        }
        if job.kind.is_image_job() {
            return self.run_image_steps(job, cancel).await;
        }
        let attempt = self.run_vm_steps(job, cancel).await;
        if let (crate::model::JobKind::CaptureVm, Ok(a)) = (job.kind, &attempt)
            && matches!(a.outcome, Outcome::Failed(_) | Outcome::Interrupted(_))
        {
            // A capture that ends without its image leaves nothing of it
            // on the provider.
            self.unstore_capture(job).await;
        }
        attempt
    }

    /// Runs a VM job's steps against the VM's provider.
    async fn run_vm_steps(&self, job: &Job, cancel: watch::Receiver<bool>) -> Result<Attempt, Abort> {
        let Some(vm_id) = job.vm_id else {
            return Ok(Attempt::failed(ErrorCode::Internal, format!("{} job without a vm", job.kind)));
        };
        let vm = self.store.get_vm_internal(vm_id).await.map_err(Abort::Store)?;
        // From the in-memory catalog (kept coherent, see store::cache); the
        // database when the copy does not have it.
        let provider = self.store.provider_cached(vm.provider_id).await.map_err(Abort::Store)?;
        // A graceful stop may wait for the guest as long as the tenant asked,
        // and the call must outlive that wait.
        let longest = match job.params {
            JobParams::Stop { force: false, timeout_seconds } => {
                Duration::from_secs(u64::from(timeout_seconds) + STOP_CALL_MARGIN_SECS)
            }
            // A capture copies a whole disk.
            _ if job.kind == crate::model::JobKind::CaptureVm => self.images.provider_timeout(),
            _ => Duration::ZERO,
        };
        let mut compute = match self.clients.compute_for(&provider, longest) {
            Ok(c) => c,
            Err(e) => return Ok(Attempt::failed(e.code, e.message)),
        };
        let steps = job.kind.steps();
        // The last step is never recorded: finishing the job records that it
        // happened, and a crash between the two re-runs it, which the
        // provider's idempotency allows (just as a crash between the call and
        // its record would). So only multi-step jobs have steps to skip.
        // A job's first claim (attempts counts claims) has nothing recorded
        // yet: only a retry or a takeover reads what an earlier attempt did.
        let done: Vec<RecordedStep> = if steps.len() > 1 && job.attempts > 1 {
            self.store.completed_steps(job.id).await.map_err(Abort::Store)?
        } else {
            Vec::new()
        };
        let snapshot = match job.snapshot_id {
            Some(id) => Some(self.store.get_snapshot_internal(id).await.map_err(Abort::Store)?),
            None => None,
        };
        let networks = if job.kind == crate::model::JobKind::CreateVm {
            let catalog = self.store.catalog().await.map_err(Abort::Store)?;
            self.backings(&vm, &provider.name, &catalog.networks).await.map_err(Abort::Store)?
        } else {
            Vec::new()
        };
        let image = match job.image_id {
            Some(id) => Some(self.store.get_image(id).await.map_err(Abort::Store)?),
            None => None,
        };
        let call = Call {
            vm: &vm,
            snapshot: snapshot.as_ref(),
            params: &job.params,
            networks: &networks,
            image: image.as_ref(),
        };
        let mut power = None;
        let mut nics = Vec::new();
        let mut host = None;
        for (i, &step) in steps.iter().enumerate() {
            if done.iter().any(|d| d.step == step) {
                tracing::debug!(%step, "step already done");
                continue;
            }
            let result = match cancelled(&cancel, self.call_provider(&mut compute, &call, step)).await {
                Some(result) => result,
                None => return self.interrupted(job, step).await,
            };
            match result {
                Ok(output) => {
                    if let (Step::Capture, Some(image)) = (step, &image) {
                        // The capture's backing: the image is on this
                        // provider, and nowhere else.
                        self.store
                            .record_image_backing(image.id, &provider.name, &output.native)
                            .await
                            .map_err(Abort::Store)?;
                        let size = output.image_bytes.unwrap_or(0);
                        self.store.set_image_size(image.id, size, vm.disk_gib).await.map_err(Abort::Store)?;
                    }
                    if i + 1 < steps.len() {
                        self.store
                            .record_step(job.id, &self.worker_id, step, &output.native, now())
                            .await
                            .map_err(Abort::Store)?;
                    }
                    power = output.power.or(power);
                    nics = output.interfaces;
                    host = output.host.or(host);
                }
                Err(e) => return Ok(self.failure_outcome(job, step, e)),
            }
        }
        // Addresses as the provider sees them now: from the last call's
        // answer, else (for a VM with networks) from GetVm. A provider that
        // cannot tell, or a call that fails, leaves the stored ones as they are.
        let networks = if job.kind == crate::model::JobKind::DeleteVm {
            None
        } else if !nics.is_empty() {
            merge_interfaces(&vm.networks, &nics)
        } else if !vm.networks.is_empty() {
            observe_networks(&mut compute, &vm).await
        } else {
            None
        };
        Ok(Attempt {
            outcome: Outcome::Succeeded { power },
            message: String::new(),
            run_after: None,
            networks,
            host,
            size: Some(lifecycle::Size {
                flavor: vm.flavor.clone(),
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
                disk_gib: vm.disk_gib,
            }),
            volume: None,
        })
    }

    /// The attempt of a job whose `step` a cancellation cut.
    async fn interrupted(&self, job: &Job, step: Step) -> Result<Attempt, Abort> {
        let by = match self.store.get_job_internal(job.id).await {
            Ok(j) => j.cancel_requested_by,
            Err(e) => return Err(Abort::Store(e)),
        };
        Ok(Attempt::interrupted(step, by.as_deref()))
    }

    /// The VM's attachments with what each network is on `provider`.
    async fn backings(
        &self,
        vm: &Vm,
        provider: &str,
        cached: &[crate::model::Network],
    ) -> Result<Vec<provider::NetworkAttachment>, StoreError> {
        if vm.networks.is_empty() {
            return Ok(Vec::new());
        }
        let in_zone = |list: &[crate::model::Network]| -> Vec<crate::model::Network> {
            list.iter().filter(|c| c.zone == vm.zone).cloned().collect()
        };
        // A network the copy lacks may be newer than it.
        let mut catalog = in_zone(cached);
        if !vm.networks.iter().all(|n| catalog.iter().any(|c| c.name == n.network)) {
            catalog = self.store.list_networks(Some(&vm.zone)).await?;
        }
        Ok(vm
            .networks
            .iter()
            .map(|n| provider::NetworkAttachment {
                network: n.network.clone(),
                backing: catalog
                    .iter()
                    .find(|c| c.name == n.network)
                    .map(|c| c.backing_on(provider).to_owned())
                    .unwrap_or_default(),
            })
            .collect())
    }

    fn failure_outcome(&self, job: &Job, step: Step, e: ProviderCallError) -> Attempt {
        let message = format!("{step}: {}", e.message);
        if e.retryable && job.attempts < job.max_attempts {
            let delay = Self::backoff(&self.config, job.attempts);
            Attempt {
                outcome: Outcome::Retry(e.code),
                message,
                run_after: Some(now() + chrono::Duration::from_std(delay).unwrap_or_default()),
                networks: None,
                host: None,
                size: None,
                volume: None,
            }
        } else {
            Attempt::failed(e.code, message)
        }
    }

    async fn call_provider(
        &self,
        compute: &mut crate::providers::Compute,
        call: &Call<'_>,
        step: Step,
    ) -> Result<StepOutput, ProviderCallError> {
        let vm = call.vm;
        let vm_id = vm.id.to_string();
        let started = std::time::Instant::now();
        let snapshot = || {
            call.snapshot.map(|s| (s.id.to_string(), s.name.clone())).ok_or_else(|| ProviderCallError {
                code: ErrorCode::Internal,
                retryable: false,
                message: "snapshot job without a snapshot".to_owned(),
            })
        };
        let info = |r: tonic::Response<provider::VmInfo>| {
            let info = r.into_inner();
            let host = Some(info.host).filter(|h| !h.is_empty());
            StepOutput {
                native: info.native_id,
                power: None,
                interfaces: info.interfaces,
                host,
                image_bytes: None,
            }
        };
        let result = match step {
            Step::Create => {
                let mut spec = vm_spec(vm);
                spec.networks = call.networks.to_vec();
                if let JobParams::CreateWithVolumes { boot, boot_storage, data } = call.params {
                    spec.boot_volume_id = boot.map(|b| b.to_string()).unwrap_or_default();
                    spec.boot_storage = boot_storage.clone();
                    spec.volumes = data
                        .iter()
                        .map(|(id, slot)| provider::VolumeAttachment {
                            volume_id: id.to_string(),
                            slot: *slot,
                        })
                        .collect();
                }
                compute
                    .create_vm(req(provider::CreateVmRequest { vm_id, spec: Some(spec), start: false }))
                    .await
                    .map(info)
            }
            Step::Start => compute.start_vm(req(provider::VmRef { vm_id })).await.map(info),
            Step::Stop => {
                let (force, timeout_seconds) = match call.params {
                    JobParams::Stop { force, timeout_seconds } => (*force, *timeout_seconds),
                    _ => (false, 0),
                };
                compute
                    .stop_vm(req(provider::StopVmRequest { vm_id, force, timeout_seconds }))
                    .await
                    .map(info)
            }
            Step::Reboot => {
                let hard = matches!(call.params, JobParams::Reboot { hard: true });
                compute.reboot_vm(req(provider::RebootVmRequest { vm_id, hard })).await.map(info)
            }
            Step::Resize => {
                // The VM row already carries the new size (applied at
                // accept). The disk is named only when it grows: an image
                // larger than the old flavor's disk must not be "shrunk".
                let grows = match call.params {
                    JobParams::Resize { from, to } => to.disk_gib > from.disk_gib,
                    _ => false,
                };
                compute
                    .resize_vm(req(provider::ResizeVmRequest {
                        vm_id,
                        vcpus: vm.vcpus,
                        memory_mib: vm.memory_mib,
                        disk_gib: if grows { vm.disk_gib } else { 0 },
                    }))
                    .await
                    .map(info)
            }
            Step::Delete => compute
                .delete_vm(req(provider::VmRef { vm_id }))
                .await
                .map(|r| StepOutput::native(Step::deletion_output(r.into_inner().existed))),
            Step::SnapshotCreate => {
                let (snapshot_id, name) = snapshot()?;
                compute
                    .create_snapshot(req(provider::CreateSnapshotRequest { vm_id, snapshot_id, name }))
                    .await
                    .map(|r| StepOutput::native(r.into_inner().native_id))
            }
            Step::SnapshotRevert => {
                let (snapshot_id, _) = snapshot()?;
                compute.revert_snapshot(req(provider::SnapshotRef { vm_id, snapshot_id })).await.map(|r| {
                    let info = r.into_inner();
                    let state = provider::PowerState::try_from(info.power_state)
                        .unwrap_or(provider::PowerState::Unspecified);
                    let running = state == provider::PowerState::Running;
                    StepOutput {
                        native: state.as_str_name().to_owned(),
                        power: Some(if running { Power::Running } else { Power::Off }),
                        interfaces: info.interfaces,
                        host: None,
                        image_bytes: None,
                    }
                })
            }
            Step::Migrate => match call.params {
                JobParams::Migrate { to, live, .. } => compute
                    .migrate_vm(req(provider::MigrateVmRequest {
                        vm_id,
                        target_host: to.clone(),
                        live: *live,
                    }))
                    .await
                    .map(info),
                // A host that is down: rebuild the VM on `to` from storage
                // both reach (a cold move; the VM is not running).
                JobParams::Recover { to: Some(to), .. } => compute
                    .migrate_vm(req(provider::MigrateVmRequest {
                        vm_id,
                        target_host: to.clone(),
                        live: false,
                    }))
                    .await
                    .map(info),
                // Recovered where it is: nothing to move.
                _ => Ok(StepOutput::native("in place")),
            },
            Step::SnapshotDelete => {
                let (snapshot_id, _) = snapshot()?;
                compute
                    .delete_snapshot(req(provider::SnapshotRef { vm_id, snapshot_id }))
                    .await
                    .map(|r| StepOutput::native(Step::deletion_output(r.into_inner().existed)))
            }
            // A VM's deletion: then its boot volume, when it goes with it
            // (DeleteVm left it behind, detached).
            Step::VolumeDelete => {
                let held = self.store.volumes_of_vm(vm.id).await.map_err(|e| ProviderCallError {
                    code: ErrorCode::Unavailable,
                    retryable: true,
                    message: format!("cannot read the vm's volumes: {e}"),
                })?;
                let mut deleted = Vec::new();
                for v in held
                    .iter()
                    .filter(|v| v.delete_on_vm_delete && v.attachment.is_some_and(|a| a.device_index == 0))
                {
                    let volume_id = v.id.to_string();
                    compute
                        .delete_volume(req(provider::VolumeRef { volume_id: volume_id.clone() }))
                        .await
                        .map_err(|s| ProviderCallError::from_status(&s))?;
                    deleted.push(volume_id);
                }
                Ok(StepOutput::native(deleted.join(",")))
            }
            Step::Capture => {
                let image = call.image.ok_or_else(|| ProviderCallError {
                    code: ErrorCode::Internal,
                    retryable: false,
                    message: "capture job without an image".to_owned(),
                })?;
                compute
                    .capture_image(req(provider::CaptureImageRequest {
                        vm_id: vm_id.clone(),
                        image_id: image.id.to_string(),
                        name: image.name.clone(),
                    }))
                    .await
                    // The source is the step's output.
                    .map(|r| {
                        let i = r.into_inner();
                        StepOutput { image_bytes: Some(i.size_bytes), ..StepOutput::native(i.source) }
                    })
            }
            Step::VolumeCreate
            | Step::VolumeExtend
            | Step::VolumeAttach
            | Step::VolumeDetach
            | Step::ImageImport
            | Step::ImageDelete => {
                return Err(ProviderCallError {
                    code: ErrorCode::Internal,
                    retryable: false,
                    message: format!("{step} is not a step of a vm job"),
                });
            }
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(out) => {
                tracing::debug!(%step, elapsed_ms, "provider call done");
                Ok(out)
            }
            Err(status) => {
                let e = ProviderCallError::from_status(&status);
                tracing::info!(%step, elapsed_ms, code = %e.code, retryable = e.retryable, message = %e.message, "provider call failed");
                Err(e)
            }
        }
    }
}

/// Runs `call` unless `cancel` trips first: `None` then, and the call's
/// future is dropped (a gRPC call's stream is reset, which tells the
/// provider). A cancel that tripped before the call starts it not at all.
async fn cancelled<T>(cancel: &watch::Receiver<bool>, call: impl Future<Output = T>) -> Option<T> {
    let mut cancel = cancel.clone();
    tokio::select! {
        biased;
        _ = async {
            // A watcher that ended without tripping never trips.
            if cancel.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        } => None,
        r = call => Some(r),
    }
}

/// How much longer than the guest's shutdown time a stop call may take
/// (the hard power-off after it, and the answer).
const STOP_CALL_MARGIN_SECS: u64 = 60;

/// What one job's provider calls need besides the client.
struct Call<'a> {
    vm: &'a Vm,
    snapshot: Option<&'a crate::model::Snapshot>,
    params: &'a JobParams,
    /// The create's attachments with their backings on this provider.
    networks: &'a [provider::NetworkAttachment],
    /// The image a capture makes.
    image: Option<&'a crate::model::Image>,
}

/// What a step returns: the recorded output, the power state a revert left
/// the VM in, the NICs and the host the provider's answer carried.
struct StepOutput {
    native: String,
    power: Option<Power>,
    interfaces: Vec<provider::InterfaceInfo>,
    host: Option<String>,
    /// What a capture stored, bytes.
    image_bytes: Option<u64>,
}

impl StepOutput {
    fn native(s: impl Into<String>) -> Self {
        StepOutput { native: s.into(), power: None, interfaces: Vec::new(), host: None, image_bytes: None }
    }
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    hcp_telemetry::inject_request(&mut r);
    r
}

/// Asks the provider for the VM's NICs and merges them into its
/// attachments; `None` when it cannot tell.
async fn observe_networks(
    compute: &mut crate::providers::Compute,
    vm: &Vm,
) -> Option<Vec<NetworkAttachment>> {
    let info = compute.get_vm(req(provider::VmRef { vm_id: vm.id.to_string() })).await.ok()?.into_inner();
    merge_interfaces(&vm.networks, &info.interfaces)
}

/// Puts reported interfaces on attachments by position (interface i is the
/// NIC of attachment i); interfaces beyond the attachments are kept with the
/// network the provider named. `None` when nothing was reported.
pub fn merge_interfaces(
    attachments: &[NetworkAttachment],
    interfaces: &[provider::InterfaceInfo],
) -> Option<Vec<NetworkAttachment>> {
    if interfaces.is_empty() {
        return None;
    }
    let n = attachments.len().max(interfaces.len());
    let merged: Vec<NetworkAttachment> = (0..n)
        .map(|i| {
            let mut a = attachments.get(i).cloned().unwrap_or_default();
            if let Some(nic) = interfaces.get(i) {
                if a.network.is_empty() {
                    a.network = nic.network.clone();
                }
                a.mac = nic.mac.to_ascii_lowercase();
                a.ipv4 = nic.ipv4.clone();
                a.ipv6 = nic.ipv6.clone();
            }
            a
        })
        .collect();
    (merged != attachments).then_some(merged)
}

/// The provider's view of a VM: sizes and image resolved, no tenant data
/// beyond what the guest needs.
pub fn vm_spec(vm: &Vm) -> provider::VmSpec {
    let mut labels = std::collections::HashMap::new();
    labels.insert("hcp.vm_id".to_owned(), vm.id.to_string());
    labels.insert("hcp.name".to_owned(), vm.name.clone());
    provider::VmSpec {
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
        image: Some(provider::ImageRef { name: vm.image.clone(), source: vm.image_source.clone() }),
        networks: vm
            .networks
            .iter()
            .map(|n| provider::NetworkAttachment { network: n.network.clone(), backing: String::new() })
            .collect(),
        user_data: vm.user_data.clone(),
        hostname: vm.hostname.clone(),
        labels,
        host: vm.host.clone(),
        // Boot volumes and volumes at create come with the create path's
        // volume work; a VM's root disk is its own until then.
        boot_volume_id: String::new(),
        boot_storage: String::new(),
        volumes: Vec::new(),
        ssh_authorized_keys: vm.ssh_keys.iter().map(|k| k.public_key.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let c = JobsConfig { backoff_base_ms: 100, backoff_max_ms: 1000, ..JobsConfig::default() };
        for _ in 0..50 {
            let d1 = Engine::backoff(&c, 1).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d3 = Engine::backoff(&c, 3).as_millis();
            assert!((200..=400).contains(&d3), "{d3}");
            let d10 = Engine::backoff(&c, 10).as_millis();
            assert!((500..=1000).contains(&d10), "{d10}");
        }
    }
}
