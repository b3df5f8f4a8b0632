//! Images: operators' public catalog entries (with a backing per provider),
//! imports from a URL and their removal (`hcp.ops.v1.CatalogAdminService`),
//! and a project's private images, made by capturing a VM and deleted by
//! the tenant (`hcp.tenant.v1.VmService`). Each request is checked here
//! into typed values once; the lifecycle (`lifecycle::image`) and the store
//! decide the rest.

use std::collections::BTreeMap;

use hcp_proto::common;
use hcp_proto::error::{ApiError, excerpt};
use hcp_proto::ids::ImageId;
use hcp_proto::ops::{
    CreateImageRequest, ImageOperationAccepted, ImportImageRequest, SetImageBackingRequest,
};

use super::ApiContext;
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::Principal;
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::image::ImportFormat;
use crate::lifecycle::{Capability, JobParams};
use crate::model::{
    self, Architecture, Image, ImageBacking, ImageStatus, ImageVisibility, JobKind, Scope, VmStatus, now,
};
use crate::store::{ImageDeletion, StoreError};

/// The scope of operators' jobs (they belong to no tenant).
fn ops_scope() -> Scope {
    Scope { tenant: String::new(), project: String::new() }
}

/// A new image's properties from the request's (checked) fields.
struct Properties {
    os_type: String,
    os_version: String,
    architecture: Architecture,
    min_disk_gib: u32,
    min_memory_mib: u32,
    description: String,
}

fn new_image(name: &str, props: Properties, visibility: ImageVisibility, scope: &Scope) -> Image {
    let t = now();
    Image {
        id: ImageId::new(),
        name: name.to_owned(),
        visibility,
        tenant_id: scope.tenant.clone(),
        project_id: scope.project.clone(),
        status: ImageStatus::Available,
        os_type: if props.os_type.is_empty() { "linux".to_owned() } else { props.os_type },
        os_version: props.os_version,
        architecture: props.architecture,
        source: String::new(),
        backings: BTreeMap::new(),
        min_disk_gib: props.min_disk_gib,
        min_memory_mib: props.min_memory_mib,
        description: props.description,
        size_bytes: 0,
        sha256: String::new(),
        error_message: None,
        job_id: None,
        captured_from: None,
        created_at: t,
        updated_at: t,
    }
}

/// The architecture a request names (its rule allows only known ones);
/// x86_64 when it names none.
fn architecture(text: &str) -> Architecture {
    Architecture::parse(text).unwrap_or(Architecture::X86_64)
}

/// The registered provider names, for checking backings and import targets.
async fn providers(ctx: &ApiContext) -> Result<Vec<model::Provider>, ApiError> {
    ctx.store.list_providers().await.map_err(|e| from_store(e, "providers"))
}

/// A public image an operator describes: `source` for every provider
/// without its own backing, `backings` per provider (each naming a
/// registered provider). Neither given: the image's name, everywhere (as
/// before backings existed).
pub(super) async fn create(
    ctx: &ApiContext,
    p: &Principal,
    req: CreateImageRequest,
) -> Result<common::Image, ApiError> {
    let i = req.image.ok_or_else(|| ApiError::invalid_field("image", "image is required"))?;
    let known = providers(ctx).await?;
    let mut backings = BTreeMap::new();
    for (provider, source) in &i.backings {
        if !known.iter().any(|k| &k.name == provider) {
            return Err(ApiError::invalid_field(
                &format!("image.backings.{provider}"),
                format!("no provider {} is registered", excerpt(provider)),
            ));
        }
        backings.insert(provider.clone(), ImageBacking { source: source.clone(), stored: false });
    }
    let props = Properties {
        os_type: i.os_type.clone(),
        os_version: i.os_version.clone(),
        architecture: architecture(&i.architecture),
        min_disk_gib: i.min_disk_gib,
        min_memory_mib: i.min_memory_mib,
        description: i.description.clone(),
    };
    let mut image = new_image(&i.name, props, ImageVisibility::Public, &ops_scope());
    image.source = match (i.source.is_empty(), backings.is_empty()) {
        (true, true) => i.name.clone(),
        _ => i.source.clone(),
    };
    image.backings = backings;
    let audit = ctx.audit(p, AuditAction::ImageCreate, Resource::Image(&i.name), AuditOutcome::Succeeded);
    ctx.store.create_image(&image, &audit).await.map_err(|e| from_store(e, "image"))?;
    Ok(convert::image_to_proto(&image, true))
}

/// Sets one provider's backing of a public image.
pub(super) async fn set_backing(
    ctx: &ApiContext,
    p: &Principal,
    req: SetImageBackingRequest,
) -> Result<common::Image, ApiError> {
    if !req.source.is_empty() && !providers(ctx).await?.iter().any(|k| k.name == req.provider) {
        return Err(ApiError::invalid_field(
            "provider",
            format!("no provider {} is registered", excerpt(&req.provider)),
        ));
    }
    let mut audit =
        ctx.audit(p, AuditAction::ImageBackingSet, Resource::Image(&req.name), AuditOutcome::Succeeded);
    audit.detail = if req.source.is_empty() {
        format!("provider {}: removed", req.provider)
    } else {
        format!("provider {}: {}", req.provider, req.source)
    };
    let image = ctx
        .store
        .set_image_backing(&req.name, &req.provider, &req.source, &audit)
        .await
        .map_err(|e| from_store(e, &format!("image {}", req.name)))?;
    Ok(convert::image_to_proto(&image, true))
}

/// Accepts an import: the URL passes the egress policy's static checks
/// now (the addresses are checked again when the job connects), the
/// checksum is 64 lower-case hex digits, and each provider named is
/// registered and declares `supports_image_import`.
pub(super) async fn import(
    ctx: &ApiContext,
    p: &Principal,
    req: ImportImageRequest,
    request_id: String,
) -> Result<ImageOperationAccepted, ApiError> {
    ctx.egress
        .policy()
        .check_url(&req.url)
        .map_err(|e| ApiError::invalid_field("url", format!("url {e}")))?;
    if !req.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ApiError::invalid_field("sha256", "sha256 must be 64 lower-case hex digits"));
    }
    let format = ImportFormat::parse(&req.format).ok_or_else(|| {
        ApiError::invalid_field("format", format!("format must be one of {}", ImportFormat::NAMES.join(", ")))
    })?;
    let known = providers(ctx).await?;
    for (i, name) in req.providers.iter().enumerate() {
        let field = format!("providers[{i}]");
        if req.providers[..i].contains(name) {
            return Err(ApiError::invalid_field(&field, format!("provider {name} is named twice")));
        }
        let provider = known.iter().find(|k| &k.name == name).ok_or_else(|| {
            ApiError::invalid_field(&field, format!("no provider {} is registered", excerpt(name)))
        })?;
        if !Capability::ImageImport.of(&provider.capabilities) {
            return Err(ApiError::feature_not_supported(
                Capability::ImageImport.flag(),
                format!("provider {name} does not store imported images (supports_image_import)"),
            )
            .with_detail("field", field));
        }
    }
    let props = Properties {
        os_type: req.os_type.clone(),
        os_version: req.os_version.clone(),
        architecture: architecture(&req.architecture),
        min_disk_gib: req.min_disk_gib,
        min_memory_mib: req.min_memory_mib,
        description: req.description.clone(),
    };
    let scope = ops_scope();
    let mut image = new_image(&req.name, props, ImageVisibility::Public, &scope);
    let mut job = model::Job::queued(
        JobKind::ImportImage,
        &scope,
        None,
        &p.subject,
        ctx.config.jobs.max_attempts,
        hcp_telemetry::current_traceparent(),
        &request_id,
    );
    job.image_id = Some(image.id);
    job.params = JobParams::ImportImage {
        url: req.url.clone(),
        sha256: req.sha256.clone(),
        format: format.as_str().to_owned(),
        providers: req.providers.clone(),
    };
    image.status = ImageStatus::Importing;
    image.sha256 = req.sha256.clone();
    image.job_id = Some(job.id);
    let mut audit = ctx.audit(
        p,
        AuditAction::Job(JobKind::ImportImage),
        Resource::Image(&req.name),
        AuditOutcome::Accepted,
    );
    audit.job_id = job.id.to_string();
    audit.detail = format!("from {} to {}", excerpt(&req.url), req.providers.join(", "));
    ctx.store.accept_image_job(&image, &job, &audit, None).await.map_err(|e| from_store(e, "image"))?;
    ctx.announce(job.id);
    tracing::info!(image = %image.name, image_id = %image.id, job_id = %job.id, "image import accepted");
    Ok(ImageOperationAccepted {
        image_id: image.id.to_string(),
        job_id: job.id.to_string(),
        name: image.name,
    })
}

/// Deletes `image` (a public one for operators, a project's private one for
/// its tenant): at once when no provider stores it, else by a job.
pub(super) async fn delete(
    ctx: &ApiContext,
    p: &Principal,
    image: &Image,
    request_id: String,
) -> Result<Option<hcp_proto::ids::JobId>, ApiError> {
    let scope = Scope { tenant: image.tenant_id.clone(), project: image.project_id.clone() };
    let mut job = model::Job::queued(
        JobKind::DeleteImage,
        &scope,
        None,
        &p.subject,
        ctx.config.jobs.max_attempts,
        hcp_telemetry::current_traceparent(),
        &request_id,
    );
    job.image_id = Some(image.id);
    let mut audit =
        ctx.audit(p, AuditAction::ImageDelete, Resource::Image(&image.name), AuditOutcome::Succeeded);
    audit.tenant_id.clone_from(&image.tenant_id);
    audit.project_id.clone_from(&image.project_id);
    let done = ctx
        .store
        .delete_image(image.id, &job, &audit)
        .await
        .map_err(|e| from_store(e, &format!("image {}", image.name)))?;
    match done {
        ImageDeletion::Removed => Ok(None),
        ImageDeletion::Job(id) => {
            ctx.announce(id);
            Ok(Some(id))
        }
    }
}

/// The private image a capture of `vm` makes in `scope`, IMPORTING: its
/// name must not be a public image's (the project would no longer reach
/// that one), its properties are the VM's image's, and until the capture
/// ends it counts at the VM's disk size (the most it can store).
pub(super) async fn capture_image(
    ctx: &ApiContext,
    scope: &Scope,
    vm: &model::Vm,
    name: &str,
    description: &str,
) -> Result<Image, ApiError> {
    match ctx.store.get_image_by_name(name, None).await {
        Ok(_) => {
            return Err(ApiError::conflict(format!("{name} is the name of a public image; choose another"))
                .with_detail("field", "image_name"));
        }
        Err(StoreError::NotFound) => {}
        Err(e) => return Err(from_store(e, "image")),
    }
    let from = ctx.store.get_image_by_name(&vm.image, Some(scope)).await.ok();
    let props = Properties {
        os_type: from.as_ref().map(|i| i.os_type.clone()).unwrap_or_default(),
        os_version: from.as_ref().map(|i| i.os_version.clone()).unwrap_or_default(),
        architecture: from.as_ref().map_or(Architecture::X86_64, |i| i.architecture),
        min_disk_gib: vm.disk_gib,
        min_memory_mib: from.as_ref().map_or(0, |i| i.min_memory_mib),
        description: description.to_owned(),
    };
    let mut image = new_image(name, props, ImageVisibility::Private, scope);
    image.status = ImageStatus::Importing;
    image.captured_from = Some(vm.id);
    image.size_bytes = u64::from(vm.disk_gib) << 30;
    Ok(image)
}

/// Whether `vm` may be captured now (the store checks again).
pub(super) fn capturable(vm: &model::Vm) -> Result<(), ApiError> {
    if vm.status != VmStatus::Stopped {
        return Err(ApiError::conflict(format!("vm {} is {}; a capture needs it STOPPED", vm.id, vm.status)));
    }
    Ok(())
}
