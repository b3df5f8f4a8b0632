//! Running image jobs: an import (fetch, verify and convert once, then
//! ImportImage on each provider named, each backing recorded as it is
//! stored) and a deletion (DeleteImage on each provider that stores the
//! image, each backing forgotten as it goes). A failed import removes what
//! any provider stored, so an image in ERROR leaves nothing behind.

use hcp_proto::error::ErrorCode;
use hcp_proto::provider;

use super::{Abort, Attempt, Engine, cancelled, req};
use crate::convert::disk_format_to_proto;
use crate::images::{ImportError, import_stream};
use crate::lifecycle::image::{ImportFormat, target_format};
use crate::lifecycle::{JobParams, Outcome, Step};
use crate::model::{Image, Job, JobKind, Provider};
use crate::providers::ProviderCallError;

impl Engine {
    /// Runs an image job.
    pub(super) async fn run_image_steps(
        &self,
        job: &Job,
        cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Attempt, Abort> {
        let Some(image_id) = job.image_id else {
            return Ok(Attempt::failed(ErrorCode::Internal, format!("{} job without an image", job.kind)));
        };
        let image = match self.store.get_image(image_id).await {
            Ok(i) => i,
            Err(crate::store::StoreError::NotFound) => {
                return Ok(Attempt::failed(ErrorCode::Internal, format!("image {image_id} is gone")));
            }
            Err(e) => return Err(Abort::Store(e)),
        };
        match (&job.kind, &job.params) {
            (JobKind::ImportImage, JobParams::ImportImage { url, sha256, format, providers }) => {
                let Some(format) = ImportFormat::parse(format) else {
                    return Ok(Attempt::failed(
                        ErrorCode::Internal,
                        format!("unknown import format {format}"),
                    ));
                };
                let r = self.import(job, &image, url, sha256, format, providers, &cancel).await;
                if let Ok(attempt) = &r
                    && matches!(attempt.outcome, Outcome::Failed(_) | Outcome::Interrupted(_))
                {
                    // Nothing of a failed import stays on any provider.
                    self.unstore(&image, providers).await;
                }
                r
            }
            (JobKind::DeleteImage, _) => self.unstore_all(job, &image, &cancel).await,
            _ => Ok(Attempt::failed(
                ErrorCode::Internal,
                format!("{} job with params {:?}", job.kind, job.params),
            )),
        }
    }

    /// The provider named `name`, from the catalog.
    async fn provider_named(&self, name: &str) -> Result<Option<Provider>, Abort> {
        let catalog = self.store.catalog().await.map_err(Abort::Store)?;
        if let Some(p) = catalog.providers.iter().find(|p| p.name == name) {
            return Ok(Some(p.clone()));
        }
        let all = self.store.list_providers().await.map_err(Abort::Store)?;
        Ok(all.into_iter().find(|p| p.name == name))
    }

    #[allow(clippy::too_many_arguments)]
    async fn import(
        &self,
        job: &Job,
        image: &Image,
        url: &str,
        sha256: &str,
        format: ImportFormat,
        providers: &[String],
        cancel: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Attempt, Abort> {
        let step = Step::ImageImport;
        let fetched = match cancelled(cancel, self.images.fetch(image.id, url, sha256, format)).await {
            None => return self.interrupted(job, step).await,
            Some(r) => r,
        };
        let mut staged = match fetched {
            Ok(s) => s,
            Err(e) => return Ok(self.import_failure(job, &e)),
        };
        let min_disk = staged.min_disk_gib();
        let mut stored_bytes = 0;
        for name in providers {
            if image.backings.get(name).is_some_and(|b| b.stored) {
                tracing::debug!(provider = %name, "image already stored there");
                continue;
            }
            let Some(provider) = self.provider_named(name).await? else {
                return Ok(Attempt::failed(ErrorCode::NotFound, format!("{step}: provider {name} is gone")));
            };
            let Some(target) = target_format(&provider.capabilities.image_formats)
                .filter(|_| provider.capabilities.supports_image_import)
            else {
                return Ok(Attempt::failed(
                    ErrorCode::FeatureNotSupported,
                    format!("{step}: provider {name} no longer declares supports_image_import"),
                ));
            };
            let ready = match staged.as_format(target).await {
                Ok(c) => c,
                Err(e) => return Ok(self.import_failure(job, &e)),
            };
            let header = provider::ImportImageHeader {
                image_id: image.id.to_string(),
                name: image.name.clone(),
                format: disk_format_to_proto(target) as i32,
                size_bytes: ready.size_bytes,
                sha256: ready.sha256.clone(),
                min_disk_gib: min_disk,
            };
            let mut compute = match self.clients.compute_for(&provider, self.images.provider_timeout()) {
                Ok(c) => c,
                Err(e) => return Ok(Attempt::failed(e.code, format!("{step}: {}", e.message))),
            };
            let started = std::time::Instant::now();
            let call = compute.import_image(req(import_stream(header, ready.path.clone())));
            let answer = match cancelled(cancel, call).await {
                None => return self.interrupted(job, step).await,
                Some(r) => r,
            };
            match answer {
                Ok(info) => {
                    let info = info.into_inner();
                    tracing::info!(provider = %name, format = %target, bytes = ready.size_bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64, "image stored");
                    self.store
                        .record_image_backing(image.id, name, &info.source)
                        .await
                        .map_err(Abort::Store)?;
                    stored_bytes = stored_bytes.max(ready.size_bytes);
                }
                Err(status) => {
                    let e = ProviderCallError::from_status(&status);
                    tracing::info!(provider = %name, code = %e.code, message = %e.message, "ImportImage failed");
                    let e = ProviderCallError { message: format!("provider {name}: {}", e.message), ..e };
                    return Ok(self.failure_outcome(job, step, e));
                }
            }
        }
        self.store.set_image_size(image.id, stored_bytes, min_disk).await.map_err(Abort::Store)?;
        Ok(succeeded())
    }

    /// The attempt of an import whose preparation failed: retried when it
    /// may go better (the network), else failed naming why.
    fn import_failure(&self, job: &Job, e: &ImportError) -> Attempt {
        let code = match e {
            ImportError::Checksum { .. } | ImportError::Format(_) => ErrorCode::InvalidArgument,
            ImportError::Download(_) if !e.retryable() => ErrorCode::InvalidArgument,
            _ => ErrorCode::Unavailable,
        };
        let message = hcp_telemetry::error_chain(e);
        tracing::info!(%message, retryable = e.retryable(), "image import could not get its image ready");
        self.failure_outcome(
            job,
            Step::ImageImport,
            ProviderCallError { code, retryable: e.retryable(), message },
        )
    }

    /// Asks each of `providers` to remove the image (whatever an attempt
    /// left there: stored, or half stored), forgetting each backing that
    /// went. A provider that cannot be reached keeps its backing, so
    /// deleting the image later tries again.
    async fn unstore(&self, image: &Image, providers: &[String]) {
        for name in providers {
            let source = image.backings.get(name).map(|b| b.source.clone()).unwrap_or_default();
            match self.delete_on(image, name, &source).await {
                Ok(_) => {
                    if let Err(e) = self.store.remove_image_backing(image.id, name).await {
                        tracing::warn!(provider = %name, error = %e, "cannot forget an image's backing");
                    }
                }
                Err(e) => tracing::warn!(provider = %name, error = %e.message,
                    "cannot remove a failed import from its provider; deleting the image tries again"),
            }
        }
    }

    /// Removes what a capture that failed may have left on its VM's
    /// provider (best effort: the image is ERROR, and deleting it tries
    /// again where a backing was recorded).
    pub(super) async fn unstore_capture(&self, job: &Job) {
        let (Some(image_id), Some(vm_id)) = (job.image_id, job.vm_id) else { return };
        let (image, vm) =
            match (self.store.get_image(image_id).await, self.store.get_vm_internal(vm_id).await) {
                (Ok(i), Ok(v)) => (i, v),
                _ => return,
            };
        let provider = match self.store.provider_cached(vm.provider_id).await {
            Ok(p) => p.name,
            Err(_) => return,
        };
        self.unstore(&image, &[provider]).await;
    }

    /// DeleteImage on provider `name`; whether it existed.
    async fn delete_on(&self, image: &Image, name: &str, source: &str) -> Result<bool, ProviderCallError> {
        let provider = match self.provider_named(name).await {
            Ok(Some(p)) => p,
            // A provider removed from HCP holds nothing HCP can reach.
            Ok(None) => return Ok(false),
            Err(_) => {
                return Err(ProviderCallError {
                    code: ErrorCode::Unavailable,
                    retryable: true,
                    message: "the database is unavailable".into(),
                });
            }
        };
        let mut compute = self
            .clients
            .compute_for(&provider, self.images.provider_timeout())
            .map_err(|e| ProviderCallError { code: e.code, retryable: false, message: e.message })?;
        compute
            .delete_image(req(provider::DeleteImageRequest {
                image_id: image.id.to_string(),
                source: source.to_owned(),
            }))
            .await
            .map(|r| r.into_inner().existed)
            .map_err(|s| ProviderCallError::from_status(&s))
    }

    /// A deletion: DeleteImage wherever the image is stored.
    async fn unstore_all(
        &self,
        job: &Job,
        image: &Image,
        cancel: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Attempt, Abort> {
        let step = Step::ImageDelete;
        for (name, backing) in image.backings.iter().filter(|(_, b)| b.stored) {
            let answer = match cancelled(cancel, self.delete_on(image, name, &backing.source)).await {
                None => return self.interrupted(job, step).await,
                Some(r) => r,
            };
            match answer {
                Ok(existed) => {
                    tracing::info!(provider = %name, existed, "image removed from its provider");
                    self.store.remove_image_backing(image.id, name).await.map_err(Abort::Store)?;
                }
                Err(e) => {
                    let e = ProviderCallError { message: format!("provider {name}: {}", e.message), ..e };
                    return Ok(self.failure_outcome(job, step, e));
                }
            }
        }
        Ok(succeeded())
    }
}

fn succeeded() -> Attempt {
    Attempt {
        outcome: Outcome::Succeeded { power: None },
        message: String::new(),
        run_after: None,
        networks: None,
        host: None,
        size: None,
        volume: None,
    }
}
