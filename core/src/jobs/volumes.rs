//! Running volume jobs: the volume's provider calls, step by step, with
//! the same step log, retries and idempotency as VM jobs.

use std::time::Duration;

use hcp_proto::error::ErrorCode;
use hcp_proto::provider;

use super::{Abort, Attempt, Engine, req};
use crate::lifecycle::{Outcome, Step};
use crate::model::{Job, JobKind, Volume, now};
use crate::providers::ProviderCallError;
use crate::store::{RecordedStep, VolumeReport};

impl Engine {
    /// Runs a volume job's steps against the volume's provider.
    pub(super) async fn run_volume_steps(
        &self,
        job: &Job,
        cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Attempt, Abort> {
        let Some(volume_id) = job.volume_id else {
            return Ok(Attempt::failed(ErrorCode::Internal, format!("{} job without a volume", job.kind)));
        };
        let volume = self.store.get_volume_internal(volume_id).await.map_err(Abort::Store)?;
        let provider = self.store.provider_cached(volume.provider_id).await.map_err(Abort::Store)?;
        let mut compute = match self.clients.compute_for(&provider, Duration::ZERO) {
            Ok(c) => c,
            Err(e) => return Ok(Attempt::failed(e.code, e.message)),
        };
        let steps = job.kind.steps();
        let done: Vec<RecordedStep> = if steps.len() > 1 && job.attempts > 1 {
            self.store.completed_steps(job.id).await.map_err(Abort::Store)?
        } else {
            Vec::new()
        };
        let host_local = provider.capabilities.volumes_host_local;
        let mut report: Option<VolumeReport> = None;
        for (i, &step) in steps.iter().enumerate() {
            if let Some(d) = done.iter().find(|d| d.step == step) {
                tracing::debug!(%step, "step already done");
                if step == Step::VolumeCreate && !d.output.is_empty() {
                    report = Some(VolumeReport { native_id: d.output.clone(), host: volume.host.clone() });
                }
                continue;
            }
            let made = volume.native_id.is_some() || report.is_some();
            // A host-local volume waits for the host of its first
            // attachment: its create job makes nothing on the hypervisor,
            // the attach's first step does.
            let deferred = job.kind == JobKind::CreateVolume && host_local && volume.host.is_empty();
            let call = match step {
                Step::VolumeCreate if made || deferred => continue,
                // Never made on the hypervisor: the change is HCP's alone.
                Step::VolumeDelete | Step::VolumeExtend if !made => continue,
                _ => match super::cancelled(&cancel, self.call_volume(&mut compute, &volume, step)).await {
                    Some(result) => result,
                    None => return self.interrupted(job, step).await,
                },
            };
            match call {
                Ok(info) => {
                    if step == Step::VolumeCreate {
                        report = Some(VolumeReport { native_id: info.native_id.clone(), host: info.host });
                    }
                    if i + 1 < steps.len() {
                        let output = if step == Step::VolumeCreate { info.native_id } else { String::new() };
                        self.store
                            .record_step(job.id, &self.worker_id, step, &output, now())
                            .await
                            .map_err(Abort::Store)?;
                    }
                }
                Err(e) => return Ok(self.failure_outcome(job, step, e)),
            }
        }
        Ok(Attempt {
            outcome: Outcome::Succeeded { power: None },
            message: String::new(),
            run_after: None,
            networks: None,
            host: None,
            size: None,
            volume: report,
        })
    }

    /// One provider call of a volume job.
    async fn call_volume(
        &self,
        compute: &mut crate::providers::Compute,
        volume: &Volume,
        step: Step,
    ) -> Result<provider::VolumeInfo, ProviderCallError> {
        let volume_id = volume.id.to_string();
        let attached_to = || {
            volume.attachment.ok_or_else(|| ProviderCallError {
                code: ErrorCode::Internal,
                retryable: false,
                message: format!("{step} of volume {} that is attached to nothing", volume.id),
            })
        };
        let started = std::time::Instant::now();
        let result = match step {
            Step::VolumeCreate => {
                let spec = provider::VolumeSpec {
                    name: volume.name.clone(),
                    size_gib: volume.size_gib,
                    storage: volume.storage.clone(),
                    host: volume.host.clone(),
                    labels: Default::default(),
                };
                compute
                    .create_volume(req(provider::CreateVolumeRequest { volume_id, spec: Some(spec) }))
                    .await
            }
            Step::VolumeExtend => {
                compute
                    .extend_volume(req(provider::ExtendVolumeRequest {
                        volume_id,
                        size_gib: volume.size_gib,
                    }))
                    .await
            }
            Step::VolumeAttach => {
                let a = attached_to()?;
                compute
                    .attach_volume(req(provider::AttachVolumeRequest {
                        volume_id,
                        vm_id: a.vm_id.to_string(),
                        slot: a.device_index,
                    }))
                    .await
            }
            Step::VolumeDetach => {
                let a = attached_to()?;
                compute
                    .detach_volume(req(provider::DetachVolumeRequest {
                        volume_id,
                        vm_id: a.vm_id.to_string(),
                    }))
                    .await
            }
            Step::VolumeDelete => compute
                .delete_volume(req(provider::VolumeRef { volume_id: volume_id.clone() }))
                .await
                .map(|r| {
                    r.map(|d| provider::VolumeInfo {
                        volume_id,
                        native_id: Step::deletion_output(d.existed).to_owned(),
                        ..Default::default()
                    })
                }),
            _ => {
                return Err(ProviderCallError {
                    code: ErrorCode::Internal,
                    retryable: false,
                    message: format!("{step} is not a volume step"),
                });
            }
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(r) => {
                tracing::debug!(%step, elapsed_ms, "provider call done");
                Ok(r.into_inner())
            }
            Err(status) => {
                let e = ProviderCallError::from_status(&status);
                tracing::info!(%step, elapsed_ms, code = %e.code, retryable = e.retryable, message = %e.message, "provider call failed");
                Err(e)
            }
        }
    }
}
