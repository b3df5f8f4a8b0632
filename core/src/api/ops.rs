//! `hcp.ops.v1`: provider registration, catalog management, project quotas
//! and the audit trail. Every call needs an ops role; writes need `ops.admin`.

use hcp_proto::common;
use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::ProviderId;
use hcp_proto::ops::audit_service_server::AuditService;
use hcp_proto::ops::catalog_admin_service_server::CatalogAdminService;
use hcp_proto::ops::job_admin_service_server::JobAdminService;
use hcp_proto::ops::provider_admin_service_server::ProviderAdminService;
use hcp_proto::ops::quota_admin_service_server::QuotaAdminService;
use hcp_proto::ops::{
    AuditChainProblem, CancelOpsJobRequest, CreateFlavorRequest, CreateImageRequest, CreateVolumeTypeRequest,
    CreateZoneRequest, DeleteFlavorRequest, DeleteFlavorResponse, DeleteImageRequest, DeleteImageResponse,
    DeleteVolumeTypeRequest, DeleteVolumeTypeResponse, DeleteZoneRequest, DeleteZoneResponse,
    GetOpsJobRequest, GetProjectQuotaRequest, GetProviderRequest, ImageOperationAccepted, ImportImageRequest,
    ListAuditEventsRequest, ListAuditEventsResponse, ListProvidersRequest, ListProvidersResponse, OpsJob,
    ProjectQuota, Provider, ProviderTls, QuotaUsage, RegisterProviderRequest, RemoveProviderRequest,
    RemoveProviderResponse, SetImageBackingRequest, SetProjectQuotaRequest, UpdateProjectQuotaRequest,
    VerifyAuditChainRequest, VerifyAuditChainResponse,
};

use super::idempotency::{self, Key, idempotency_key};
use super::page::Binding;
use super::{ApiContext, ApiResult, checked, handle, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal, principal};
use crate::convert;
use crate::error::from_store;
use crate::model::{self, ProviderTransport, now};
use crate::providers::Target;
use crate::providers::trust::{TlsSettings, TlsText};
use crate::store::{AuditQuery, NetworkReplace, Quota, QuotaUpdate, StoreError};

/// Implements the three ops services.
#[derive(Clone)]
pub struct OpsApi {
    ctx: ApiContext,
}

impl OpsApi {
    /// Creates the services.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    /// Runs an ops write: the `ops.admin` role, then the Idempotency-Key
    /// (a live one is answered from its record; a new one recorded with the
    /// answer, see [`idempotency`]), then `op`. `canonical` fingerprints a
    /// request with a map (prost encodes maps in hash order); others are
    /// fingerprinted as their encoded message. The request's field rules
    /// are checked before the key.
    async fn write<Req, M, Fut>(
        &self,
        req: tonic::Request<Req>,
        method: &str,
        canonical: Option<fn(&Req) -> serde_json::Value>,
        op: impl FnOnce(Principal, Req) -> Fut,
    ) -> ApiResult<M>
    where
        Req: prost::Message + prost::Name,
        M: prost::Message + Default,
        Fut: Future<Output = Result<M, ApiError>>,
    {
        self.write_with(req, method, canonical, Rules::First, op).await
    }

    /// [`Self::write`], with the field rules checked where `rules` says.
    async fn write_with<Req, M, Fut>(
        &self,
        req: tonic::Request<Req>,
        method: &str,
        canonical: Option<fn(&Req) -> serde_json::Value>,
        rules: Rules,
        op: impl FnOnce(Principal, Req) -> Fut,
    ) -> ApiResult<M>
    where
        Req: prost::Message + prost::Name,
        M: prost::Message + Default,
        Fut: Future<Output = Result<M, ApiError>>,
    {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let r = req.into_inner();
        handle(async {
            p.ops(Access::Write)?;
            let key = key?;
            if rules == Rules::First {
                hcp_proto::rules::check(&r)?;
            }
            let scope = idempotency::ops_scope(&p);
            let idem = match canonical {
                Some(f) => Key::json(&scope, key, &serde_json::json!({"method": method, "request": f(&r)})),
                None => Key::message(&scope, key, method, &r),
            };
            idempotency::once(&self.ctx, idem, op(p, r)).await
        })
        .await
    }

    /// Registers a provider; the request has passed its field rules
    /// ([`Self::write`]), so what is checked here is what no rule states.
    async fn register(&self, p: Principal, req: RegisterProviderRequest) -> Result<Provider, ApiError> {
        let transport = ProviderTransport::of(&req.endpoint).ok_or_else(|| {
            ApiError::invalid_field(
                "endpoint",
                format!(
                    "endpoint must be http://host:port, https://host:port or unix:///path, got {}",
                    excerpt(&req.endpoint)
                ),
            )
        })?;
        let tls = registered_tls(req.tls.as_ref());
        if tls.is_some() && transport != ProviderTransport::Tls {
            return Err(ApiError::invalid_field(
                "tls",
                format!("tls is for https:// endpoints; {} is not one", excerpt(&req.endpoint)),
            ));
        }
        // Refused before any connection: the handshake would already send
        // the credentials, and every later call VM specs, in clear.
        if transport == ProviderTransport::Plaintext {
            if !req.allow_plaintext {
                return Err(ApiError::invalid_field(
                    "endpoint",
                    format!(
                        "{} is plaintext TCP to a host that is not loopback, so credentials and VM specs would \
                         cross the network in clear; use https:// (with tls), a unix:// socket, or set \
                         allow_plaintext to register it anyway",
                        excerpt(&req.endpoint)
                    ),
                ));
            }
            tracing::warn!(
                endpoint = %req.endpoint,
                provider = %req.name,
                "registering a plaintext provider endpoint that is not loopback (allow_plaintext): its \
                 credentials and calls cross the network in clear"
            );
        }
        let zones = self.ctx.store.list_zones().await.map_err(|e| from_store(e, "zones"))?;
        if !zones.iter().any(|z| z.name == req.zone) {
            return Err(ApiError::invalid_field("zone", format!("unknown zone {}", excerpt(&req.zone))));
        }
        let creds = (!req.credentials.is_empty()).then_some(&req.credentials);
        let no_key = |field: &str, what: &str| {
            ApiError::invalid_field(
                field,
                format!("this core has no secrets key (secrets.key_file), so it cannot store {what}"),
            )
        };
        if self.ctx.secrets.is_none() {
            if creds.is_some() {
                return Err(no_key("credentials", "credentials"));
            }
            if tls.as_ref().is_some_and(|t| !t.client_key_pem.is_empty()) {
                return Err(no_key("tls.client_key_pem", "a client key"));
            }
        }
        let settings = match transport {
            ProviderTransport::Tls => {
                let t = tls.clone().unwrap_or_default();
                let text = TlsText {
                    ca_pem: non_empty(&t.ca_pem),
                    client_cert_pem: non_empty(&t.client_cert_pem),
                    client_key_pem: non_empty(&t.client_key_pem),
                    server_name: non_empty(&t.server_name),
                };
                let settings = TlsSettings::new(&req.endpoint, &text, self.ctx.clients.tls_defaults())
                    .map_err(|e| ApiError::invalid_field(e.field(), hcp_telemetry::error_chain(&e)))?;
                Some(settings)
            }
            _ => None,
        };
        let target = Target::new(&req.endpoint, settings);
        let hs = self.ctx.clients.handshake(&target, creds).await?;
        let t = now();
        let id = ProviderId::new();
        let secrets = self.ctx.secrets.as_ref();
        let sealed = match (creds, secrets) {
            (Some(c), Some(b)) => Some(b.seal(id.0.as_bytes(), c)),
            _ => None,
        };
        let tls = tls.as_ref().map(|t| model::ProviderTls {
            ca_pem: non_empty(&t.ca_pem).map(str::to_owned),
            client_cert_pem: non_empty(&t.client_cert_pem).map(str::to_owned),
            client_key: match (non_empty(&t.client_key_pem), secrets) {
                (Some(key), Some(b)) => Some(model::Sealed(b.seal_bytes(id.0.as_bytes(), key.as_bytes()))),
                _ => None,
            },
            server_name: non_empty(&t.server_name).map(str::to_owned),
        });
        let provider = model::Provider {
            id,
            name: req.name.clone(),
            zone: req.zone.clone(),
            endpoint: req.endpoint.clone(),
            plugin_name: hs.info.name.clone(),
            plugin_version: hs.info.vendor_version.clone(),
            hypervisor: hs.info.hypervisor.clone(),
            protocol_version: hs.protocol_version.clone(),
            capabilities: hs.capabilities.clone(),
            healthy: hs.ready,
            health_message: hs.message.clone(),
            last_probe_at: Some(t),
            created_at: t,
            has_credentials: sealed.is_some(),
            tls: tls.unwrap_or_default(),
            allow_plaintext: req.allow_plaintext,
        };
        let mut audit = self.ctx.audit(
            &p,
            AuditAction::ProviderRegister,
            Resource::Provider(provider.id),
            AuditOutcome::Succeeded,
        );
        audit.detail = format!(
            "{} at {} in zone {}; {}",
            provider.plugin_name,
            provider.endpoint,
            provider.zone,
            channel_detail(&provider, transport)
        );
        self.ctx
            .store
            .insert_provider(&provider, sealed.as_deref(), &audit)
            .await
            .map_err(|e| from_store(e, "provider"))?;
        if let Err(e) = self.ctx.clients.refresh_hosts(&self.ctx.store, &provider).await {
            tracing::warn!(
                provider = %provider.name,
                error = %hcp_telemetry::error_chain(&e),
                "cannot read the new provider's hosts yet"
            );
        }
        tracing::info!(provider = %provider.name, plugin = %provider.plugin_name, "provider registered");
        Ok(convert::provider_to_proto(&provider))
    }

    async fn remove(
        &self,
        p: Principal,
        req: RemoveProviderRequest,
    ) -> Result<RemoveProviderResponse, ApiError> {
        let id: ProviderId = validate::id("provider_id", &req.provider_id)?;
        let audit =
            self.ctx.audit(&p, AuditAction::ProviderRemove, Resource::Provider(id), AuditOutcome::Succeeded);
        self.ctx
            .store
            .remove_provider(id, &audit)
            .await
            .map_err(|e| from_store(e, &format!("provider {id}")))?;
        self.ctx.clients.forget(id);
        Ok(RemoveProviderResponse {})
    }

    async fn create_flavor(
        &self,
        p: Principal,
        req: CreateFlavorRequest,
    ) -> Result<common::Flavor, ApiError> {
        // Its name, sizes and description passed the request's rules.
        let f = req.flavor.ok_or_else(|| ApiError::invalid_field("flavor", "flavor is required"))?;
        let flavor = model::Flavor {
            name: f.name.clone(),
            vcpus: f.vcpus,
            memory_mib: f.memory_mib,
            disk_gib: f.disk_gib,
            description: f.description.clone(),
            created_at: now(),
        };
        let audit =
            self.ctx.audit(&p, AuditAction::FlavorCreate, Resource::Flavor(&f.name), AuditOutcome::Succeeded);
        self.ctx.store.create_flavor(&flavor, &audit).await.map_err(|e| from_store(e, "flavor"))?;
        Ok(convert::flavor_to_proto(&flavor))
    }

    async fn create_zone(&self, p: Principal, req: CreateZoneRequest) -> Result<common::Zone, ApiError> {
        let z = req.zone.ok_or_else(|| ApiError::invalid_field("zone", "zone is required"))?;
        let zone =
            model::Zone { name: z.name.clone(), description: z.description.clone(), created_at: now() };
        let audit =
            self.ctx.audit(&p, AuditAction::ZoneCreate, Resource::Zone(&z.name), AuditOutcome::Succeeded);
        self.ctx.store.create_zone(&zone, &audit).await.map_err(|e| from_store(e, "zone"))?;
        Ok(convert::zone_to_proto(&zone))
    }

    async fn delete_entry(&self, p: Principal, kind: &str, name: String) -> Result<(), ApiError> {
        validate::label("name", &name)?;
        let (action, resource) = match kind {
            "flavor" => (AuditAction::FlavorDelete, Resource::Flavor(&name)),
            _ => (AuditAction::ZoneDelete, Resource::Zone(&name)),
        };
        let audit = self.ctx.audit(&p, action, resource, AuditOutcome::Succeeded);
        let r = match kind {
            "flavor" => self.ctx.store.delete_flavor(&name, &audit).await,
            _ => self.ctx.store.delete_zone(&name, &audit).await,
        };
        // A zone still named by a provider is a Conflict, like one named by a VM.
        r.map_err(|e| from_store(e, &format!("{kind} {name}")))
    }
}

#[tonic::async_trait]
impl ProviderAdminService for OpsApi {
    async fn list_hosts(
        &self,
        req: tonic::Request<hcp_proto::ops::ListHostsRequest>,
    ) -> ApiResult<hcp_proto::ops::ListHostsResponse> {
        let p = checked(&req)?;
        handle(super::hosts::list(&self.ctx, &p, &req.get_ref().provider_id)).await
    }

    async fn drain_host(
        &self,
        req: tonic::Request<hcp_proto::ops::HostRequest>,
    ) -> ApiResult<hcp_proto::ops::Host> {
        let ctx = &self.ctx;
        self.write(
            req,
            "DrainHost",
            None,
            |p, r| async move { super::hosts::set_drain(ctx, &p, r, true).await },
        )
        .await
    }

    async fn undrain_host(
        &self,
        req: tonic::Request<hcp_proto::ops::HostRequest>,
    ) -> ApiResult<hcp_proto::ops::Host> {
        let ctx = &self.ctx;
        self.write(req, "UndrainHost", None, |p, r| async move {
            super::hosts::set_drain(ctx, &p, r, false).await
        })
        .await
    }

    async fn register_provider(&self, req: tonic::Request<RegisterProviderRequest>) -> ApiResult<Provider> {
        let canonical: fn(&RegisterProviderRequest) -> serde_json::Value =
            |r| with_map(r, |r| std::mem::take(&mut r.credentials));
        self.write(req, "RegisterProvider", Some(canonical), |p, r| self.register(p, r)).await
    }

    async fn list_providers(
        &self,
        req: tonic::Request<ListProvidersRequest>,
    ) -> ApiResult<ListProvidersResponse> {
        let p = checked(&req)?;
        handle(async {
            p.ops(Access::Read)?;
            let providers = self.ctx.store.list_providers().await.map_err(|e| from_store(e, "providers"))?;
            Ok(ListProvidersResponse {
                providers: providers.iter().map(convert::provider_to_proto).collect(),
            })
        })
        .await
    }

    async fn get_provider(&self, req: tonic::Request<GetProviderRequest>) -> ApiResult<Provider> {
        let p = checked(&req)?;
        handle(async {
            p.ops(Access::Read)?;
            let id: ProviderId = validate::id("provider_id", &req.get_ref().provider_id)?;
            let provider = self
                .ctx
                .store
                .get_provider(id)
                .await
                .map_err(|e| from_store(e, &format!("provider {id}")))?;
            Ok(convert::provider_to_proto(&provider))
        })
        .await
    }

    async fn remove_provider(
        &self,
        req: tonic::Request<RemoveProviderRequest>,
    ) -> ApiResult<RemoveProviderResponse> {
        self.write(req, "RemoveProvider", None, |p, r| self.remove(p, r)).await
    }
}

#[tonic::async_trait]
impl CatalogAdminService for OpsApi {
    async fn get_zone_placement(
        &self,
        req: tonic::Request<hcp_proto::ops::GetZonePlacementRequest>,
    ) -> ApiResult<hcp_proto::ops::ZonePlacement> {
        let p = checked(&req)?;
        handle(super::hosts::get_zone_placement(&self.ctx, &p, &req.get_ref().zone)).await
    }

    async fn set_zone_placement(
        &self,
        req: tonic::Request<hcp_proto::ops::SetZonePlacementRequest>,
    ) -> ApiResult<hcp_proto::ops::ZonePlacement> {
        let ctx = &self.ctx;
        self.write(req, "SetZonePlacement", None, |p, r| async move {
            super::hosts::set_zone_placement(ctx, &p, r).await
        })
        .await
    }

    async fn create_flavor(&self, req: tonic::Request<CreateFlavorRequest>) -> ApiResult<common::Flavor> {
        self.write(req, "CreateFlavor", None, |p, r| self.create_flavor(p, r)).await
    }

    async fn delete_flavor(
        &self,
        req: tonic::Request<DeleteFlavorRequest>,
    ) -> ApiResult<DeleteFlavorResponse> {
        self.write(req, "DeleteFlavor", None, |p, r| async move {
            self.delete_entry(p, "flavor", r.name).await?;
            Ok(DeleteFlavorResponse {})
        })
        .await
    }

    async fn create_volume_type(
        &self,
        req: tonic::Request<CreateVolumeTypeRequest>,
    ) -> ApiResult<common::VolumeType> {
        self.write(req, "CreateVolumeType", None, |p, r| async move {
            // Its name, size and description passed the request's rules.
            let t = r
                .volume_type
                .ok_or_else(|| ApiError::invalid_field("volume_type", "volume_type is required"))?;
            let vtype = model::VolumeType {
                name: t.name.clone(),
                description: t.description.clone(),
                max_size_gib: t.max_size_gib,
                storage: t.storage.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                created_at: now(),
            };
            let audit = self.ctx.audit(
                &p,
                AuditAction::VolumeTypeCreate,
                Resource::VolumeType(&t.name),
                AuditOutcome::Succeeded,
            );
            self.ctx
                .store
                .create_volume_type(&vtype, &audit)
                .await
                .map_err(|e| from_store(e, "volume type"))?;
            Ok(convert::volume_type_to_proto(&vtype, true))
        })
        .await
    }

    async fn delete_volume_type(
        &self,
        req: tonic::Request<DeleteVolumeTypeRequest>,
    ) -> ApiResult<DeleteVolumeTypeResponse> {
        self.write(req, "DeleteVolumeType", None, |p, r| async move {
            let audit = self.ctx.audit(
                &p,
                AuditAction::VolumeTypeDelete,
                Resource::VolumeType(&r.name),
                AuditOutcome::Succeeded,
            );
            self.ctx
                .store
                .delete_volume_type(&r.name, &audit)
                .await
                .map_err(|e| from_store(e, &format!("volume type {}", excerpt(&r.name))))?;
            Ok(DeleteVolumeTypeResponse {})
        })
        .await
    }

    async fn create_image(&self, req: tonic::Request<CreateImageRequest>) -> ApiResult<common::Image> {
        let canonical: fn(&CreateImageRequest) -> serde_json::Value = |r| {
            with_map(r, |r| r.image.as_mut().map(|i| std::mem::take(&mut i.backings)).unwrap_or_default())
        };
        self.write(req, "CreateImage", Some(canonical), |p, r| async move {
            super::images::create(&self.ctx, &p, r).await
        })
        .await
    }

    async fn delete_image(&self, req: tonic::Request<DeleteImageRequest>) -> ApiResult<DeleteImageResponse> {
        let request_id = super::tenant::request_id(&req);
        self.write(req, "DeleteImage", None, |p, r| async move {
            let image = self
                .ctx
                .store
                .get_image_by_name(&r.name, None)
                .await
                .map_err(|e| from_store(e, &format!("image {}", excerpt(&r.name))))?;
            let job = super::images::delete(&self.ctx, &p, &image, request_id).await?;
            Ok(DeleteImageResponse { job_id: job.map(|j| j.to_string()).unwrap_or_default() })
        })
        .await
    }

    async fn import_image(
        &self,
        req: tonic::Request<ImportImageRequest>,
    ) -> ApiResult<ImageOperationAccepted> {
        let request_id = super::tenant::request_id(&req);
        self.write(req, "ImportImage", None, |p, r| async move {
            super::images::import(&self.ctx, &p, r, request_id).await
        })
        .await
    }

    async fn set_image_backing(
        &self,
        req: tonic::Request<SetImageBackingRequest>,
    ) -> ApiResult<common::Image> {
        self.write(req, "SetImageBacking", None, |p, r| async move {
            super::images::set_backing(&self.ctx, &p, r).await
        })
        .await
    }

    async fn create_zone(&self, req: tonic::Request<CreateZoneRequest>) -> ApiResult<common::Zone> {
        self.write(req, "CreateZone", None, |p, r| self.create_zone(p, r)).await
    }

    async fn delete_zone(&self, req: tonic::Request<DeleteZoneRequest>) -> ApiResult<DeleteZoneResponse> {
        self.write(req, "DeleteZone", None, |p, r| async move {
            self.delete_entry(p, "zone", r.name).await?;
            Ok(DeleteZoneResponse {})
        })
        .await
    }

    async fn create_network(
        &self,
        req: tonic::Request<hcp_proto::ops::CreateNetworkRequest>,
    ) -> ApiResult<hcp_proto::ops::NetworkDefinition> {
        let canonical: fn(&hcp_proto::ops::CreateNetworkRequest) -> serde_json::Value = |r| {
            with_map(r, |r| r.network.as_mut().map(|n| std::mem::take(&mut n.backings)).unwrap_or_default())
        };
        self.write(req, "CreateNetwork", Some(canonical), |p, r| async move {
            let n = r.network.ok_or_else(|| ApiError::invalid_field("network", "network is required"))?;
            let network = network_definition(n);
            let (zone, name) = (network.zone.as_str(), network.name.as_str());
            let mut audit = self.ctx.audit(
                &p,
                AuditAction::NetworkCreate,
                Resource::Network { zone, name },
                AuditOutcome::Succeeded,
            );
            audit.detail = format!("{:?}", network.backings);
            self.ctx.store.create_network(&network, &audit).await.map_err(|e| match e {
                StoreError::NotFound => {
                    ApiError::invalid_field("network.zone", format!("unknown zone {}", excerpt(zone)))
                }
                StoreError::AlreadyExists { .. } => ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "zone {zone} already has a network {name}; PUT /api/hcp/ops/v1/zones/{zone}/networks/{name} \
                         (ReplaceNetwork) changes it"
                    ),
                )
                .with_detail("field", "network.name"),
                e => from_store(e, "network"),
            })?;
            Ok(convert::network_to_ops(&network))
        })
        .await
    }

    async fn replace_network(
        &self,
        req: tonic::Request<hcp_proto::ops::ReplaceNetworkRequest>,
    ) -> ApiResult<hcp_proto::ops::ReplaceNetworkResponse> {
        let canonical: fn(&hcp_proto::ops::ReplaceNetworkRequest) -> serde_json::Value =
            |r| with_map(r, |r| std::mem::take(&mut r.backings));
        self.write(req, "ReplaceNetwork", Some(canonical), |p, r| async move {
            let n = hcp_proto::ops::NetworkDefinition {
                name: r.name.clone(),
                zone: r.zone.clone(),
                description: r.description,
                backings: r.backings,
                created_at: None,
            };
            let network = network_definition(n);
            let (zone, name) = (r.zone.as_str(), r.name.as_str());
            let mut audit = self.ctx.audit(
                &p,
                AuditAction::NetworkCreate,
                Resource::Network { zone, name },
                AuditOutcome::Succeeded,
            );
            audit.detail = format!("replaced: {:?}", network.backings);
            let done = self
                .ctx
                .store
                .replace_network(&network, &audit)
                .await
                .map_err(|e| from_store(e, &format!("network {zone}/{name}")))?;
            let attached = match done {
                NetworkReplace::Replaced { attached } => attached,
                NetworkReplace::InUse { provider, vms } => {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "network {zone}/{name} is attached to {vms} vm(s) on provider {provider}: its backing there \
                             cannot be removed while they exist (it may be changed: they keep the backing \
                             they were created with)"
                        ),
                    )
                    .with_detail("provider", provider.clone())
                    .with_detail("vms", vms.to_string())
                    .with_detail("field", "network.backings"));
                }
            };
            let stored = self
                .ctx
                .store
                .list_networks(Some(zone))
                .await
                .map_err(|e| from_store(e, "networks"))?
                .into_iter()
                .find(|n| n.name == name)
                .unwrap_or(network);
            Ok(hcp_proto::ops::ReplaceNetworkResponse {
                network: Some(convert::network_to_ops(&stored)),
                attached_vms: u32::try_from(attached).unwrap_or(u32::MAX),
                applies_to: format!(
                    "vms created from now on (and creates accepted but not yet run); the {attached} vm(s) \
                     attached keep the backing they were created with"
                ),
            })
        })
        .await
    }

    async fn list_network_definitions(
        &self,
        req: tonic::Request<hcp_proto::ops::ListNetworkDefinitionsRequest>,
    ) -> ApiResult<hcp_proto::ops::ListNetworkDefinitionsResponse> {
        let p = checked(&req)?;
        handle(async {
            p.ops(Access::Read)?;
            let zone = req.into_inner().zone;
            if !zone.is_empty() {
                validate::label("zone", &zone)?;
            }
            let zone = Some(zone.as_str()).filter(|z| !z.is_empty());
            let networks = self.ctx.store.list_networks(zone).await.map_err(|e| from_store(e, "networks"))?;
            Ok(hcp_proto::ops::ListNetworkDefinitionsResponse {
                networks: networks.iter().map(convert::network_to_ops).collect(),
            })
        })
        .await
    }

    async fn delete_network(
        &self,
        req: tonic::Request<hcp_proto::ops::DeleteNetworkRequest>,
    ) -> ApiResult<hcp_proto::ops::DeleteNetworkResponse> {
        self.write(req, "DeleteNetwork", None, |p, r| async move {
            validate::label("zone", &r.zone)?;
            validate::label("name", &r.name)?;
            let what = format!("network {}/{}", r.zone, r.name);
            let audit = self.ctx.audit(
                &p,
                AuditAction::NetworkDelete,
                Resource::Network { zone: &r.zone, name: &r.name },
                AuditOutcome::Succeeded,
            );
            self.ctx
                .store
                .delete_network(&r.zone, &r.name, &audit)
                .await
                .map_err(|e| from_store(e, &what))?;
            Ok(hcp_proto::ops::DeleteNetworkResponse {})
        })
        .await
    }
}

/// A network definition as stored (the request passed its field rules).
fn network_definition(n: hcp_proto::ops::NetworkDefinition) -> model::Network {
    model::Network {
        name: n.name,
        zone: n.zone,
        description: n.description,
        backings: n.backings.into_iter().collect(),
        created_at: now(),
    }
}

/// The fingerprint of a request with one map: the rest as its encoded
/// message and the map sorted (prost encodes a map in hash order).
fn with_map<R: prost::Message + Clone>(
    r: &R,
    take: impl FnOnce(&mut R) -> std::collections::HashMap<String, String>,
) -> serde_json::Value {
    let mut rest = r.clone();
    let map: std::collections::BTreeMap<String, String> = take(&mut rest).into_iter().collect();
    serde_json::json!({"rest": hex::encode(rest.encode_to_vec()), "map": map})
}

/// The registration's `tls` (its sizes and characters passed the
/// request's rules); None when it sets nothing.
fn registered_tls(tls: Option<&ProviderTls>) -> Option<ProviderTls> {
    let t = tls?;
    let empty =
        [&t.ca_pem, &t.client_cert_pem, &t.client_key_pem, &t.server_name].iter().all(|v| v.is_empty());
    (!empty).then(|| t.clone())
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// What the audit event says of a new provider's channel (nothing secret).
fn channel_detail(p: &model::Provider, transport: ProviderTransport) -> String {
    match transport {
        ProviderTransport::Tls => {
            let mut parts = vec!["tls".to_owned()];
            if let Some(ca) = &p.tls.ca_pem {
                parts.push(format!("ca sha256 {}", convert::fingerprints(ca).join(",")));
            }
            if let Some(name) = &p.tls.server_name {
                parts.push(format!("server name {name}"));
            }
            if p.tls.client_cert_pem.is_some() {
                parts.push("own client certificate".to_owned());
            }
            parts.join(", ")
        }
        ProviderTransport::Unix => "unix socket".to_owned(),
        ProviderTransport::Loopback => "plaintext on loopback".to_owned(),
        ProviderTransport::Plaintext => {
            "PLAINTEXT to another host, allowed by the operator (allow_plaintext)".to_owned()
        }
    }
}

/// Where an ops write checks its request's field rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rules {
    /// Before anything else.
    First,
    /// In the operation, which checks them itself (after the VM's job in
    /// flight).
    InOperation,
}

#[tonic::async_trait]
impl hcp_proto::ops::vm_admin_service_server::VmAdminService for OpsApi {
    async fn get_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::GetOpsVmRequest>,
    ) -> ApiResult<hcp_proto::ops::OpsVm> {
        let p = checked(&req)?;
        handle(super::hosts::get_vm(&self.ctx, &p, &req.get_ref().vm_id)).await
    }

    async fn migrate_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::MigrateVmRequest>,
    ) -> ApiResult<hcp_proto::tenant::VmOperationAccepted> {
        let request_id = super::tenant::request_id(&req);
        let ctx = &self.ctx;
        // A job in flight on the VM is named before the request's rules.
        self.write_with(req, "MigrateVm", None, Rules::InOperation, |p, r| async move {
            super::hosts::migrate(ctx, &p, &request_id, r).await
        })
        .await
    }

    async fn list_vms(
        &self,
        req: tonic::Request<hcp_proto::ops::ListOpsVmsRequest>,
    ) -> ApiResult<hcp_proto::ops::ListOpsVmsResponse> {
        let p = checked(&req)?;
        handle(super::fleet::list(&self.ctx, &p, req.get_ref())).await
    }

    async fn start_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::OpsVmActionRequest>,
    ) -> ApiResult<hcp_proto::tenant::VmOperationAccepted> {
        let request_id = super::tenant::request_id(&req);
        let ctx = &self.ctx;
        self.write_with(req, "StartVm", None, Rules::InOperation, |p, r| async move {
            let rules = hcp_proto::rules::check(&r);
            super::fleet::operate(ctx, &p, request_id, &r.vm_id, super::fleet::Action::Start, rules).await
        })
        .await
    }

    async fn stop_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::OpsStopVmRequest>,
    ) -> ApiResult<hcp_proto::tenant::VmOperationAccepted> {
        let request_id = super::tenant::request_id(&req);
        let ctx = &self.ctx;
        self.write_with(req, "StopVm", None, Rules::InOperation, |p, r| async move {
            let rules = hcp_proto::rules::check(&r);
            let action = super::fleet::Action::Stop { force: r.force, timeout_seconds: r.timeout_seconds };
            super::fleet::operate(ctx, &p, request_id, &r.vm_id, action, rules).await
        })
        .await
    }

    async fn reboot_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::OpsRebootVmRequest>,
    ) -> ApiResult<hcp_proto::tenant::VmOperationAccepted> {
        let request_id = super::tenant::request_id(&req);
        let ctx = &self.ctx;
        self.write_with(req, "RebootVm", None, Rules::InOperation, |p, r| async move {
            let rules = hcp_proto::rules::check(&r);
            let action = super::fleet::Action::Reboot { hard: r.hard };
            super::fleet::operate(ctx, &p, request_id, &r.vm_id, action, rules).await
        })
        .await
    }

    async fn delete_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::OpsVmActionRequest>,
    ) -> ApiResult<hcp_proto::tenant::VmOperationAccepted> {
        let request_id = super::tenant::request_id(&req);
        let ctx = &self.ctx;
        self.write_with(req, "DeleteVm", None, Rules::InOperation, |p, r| async move {
            let rules = hcp_proto::rules::check(&r);
            super::fleet::operate(ctx, &p, request_id, &r.vm_id, super::fleet::Action::Delete, rules).await
        })
        .await
    }

    async fn reset_vm_state(
        &self,
        req: tonic::Request<hcp_proto::ops::ResetVmStateRequest>,
    ) -> ApiResult<hcp_proto::ops::ResetVmStateResponse> {
        let ctx = &self.ctx;
        // Not a job: the request's rules come first, then (named) a job in
        // flight.
        self.write(
            req,
            "ResetVmState",
            None,
            |p, r| async move { super::fleet::reset_state(ctx, &p, r).await },
        )
        .await
    }

    async fn force_delete_vm(
        &self,
        req: tonic::Request<hcp_proto::ops::ForceDeleteVmRequest>,
    ) -> ApiResult<hcp_proto::ops::ForceDeleteVmResponse> {
        let ctx = &self.ctx;
        // `force` decides whether a job in flight is refused: the request's
        // rules come first.
        self.write(
            req,
            "ForceDeleteVm",
            None,
            |p, r| async move { super::fleet::force_delete(ctx, &p, r).await },
        )
        .await
    }

    async fn list_vm_leftovers(
        &self,
        req: tonic::Request<hcp_proto::ops::ListVmLeftoversRequest>,
    ) -> ApiResult<hcp_proto::ops::ListVmLeftoversResponse> {
        let p = checked(&req)?;
        handle(super::fleet::leftovers(&self.ctx, &p, req.get_ref())).await
    }
}

#[tonic::async_trait]
impl JobAdminService for OpsApi {
    async fn get_job(&self, req: tonic::Request<GetOpsJobRequest>) -> ApiResult<OpsJob> {
        let p = checked(&req)?;
        handle(async {
            p.ops(Access::Read)?;
            let id: hcp_proto::ids::JobId = validate::id("job_id", &req.get_ref().job_id)?;
            self.ops_job(id).await
        })
        .await
    }

    async fn cancel_job(&self, req: tonic::Request<CancelOpsJobRequest>) -> ApiResult<OpsJob> {
        self.write(req, "CancelJob", None, |p, r| async move {
            let id: hcp_proto::ids::JobId = validate::id("job_id", &r.job_id)?;
            let job =
                self.ctx.store.get_job_internal(id).await.map_err(|e| from_store(e, &format!("job {id}")))?;
            let mut audit =
                self.ctx.audit(&p, AuditAction::JobCancel, Resource::Job(id), AuditOutcome::Succeeded);
            audit.tenant_id = job.tenant_id.clone();
            audit.project_id = job.project_id.clone();
            audit.job_id = id.to_string();
            let job = self
                .ctx
                .store
                .cancel_job(None, id, &audit)
                .await
                .map_err(|e| from_store(e, &format!("job {id}")))?;
            self.ctx.events.changed(id);
            let steps =
                self.ctx.store.job_steps(id).await.map_err(|e| from_store(e, &format!("job {id}")))?;
            Ok(OpsJob { steps: convert::job_steps_to_ops(&steps), ..convert::job_to_ops(&job) })
        })
        .await
    }
}

impl OpsApi {
    /// The operator's view of a job, with its step log.
    async fn ops_job(&self, id: hcp_proto::ids::JobId) -> Result<OpsJob, ApiError> {
        let job =
            self.ctx.store.get_job_internal(id).await.map_err(|e| from_store(e, &format!("job {id}")))?;
        let steps = self.ctx.store.job_steps(id).await.map_err(|e| from_store(e, &format!("job {id}")))?;
        Ok(OpsJob { steps: convert::job_steps_to_ops(&steps), ..convert::job_to_ops(&job) })
    }
}

#[tonic::async_trait]
impl hcp_proto::ops::usage_service_server::UsageService for OpsApi {
    async fn get_usage(
        &self,
        req: tonic::Request<hcp_proto::ops::GetUsageRequest>,
    ) -> ApiResult<hcp_proto::tenant::UsageReport> {
        let p = checked(&req)?;
        let r = req.into_inner();
        handle(async {
            p.ops(Access::Read)?;
            hcp_proto::rules::check(&r)?;
            if !r.project_id.is_empty() && r.tenant_id.is_empty() {
                return Err(ApiError::invalid_field("project_id", "project_id is given only with tenant_id"));
            }
            fn nonempty(s: &str) -> Option<&str> {
                (!s.is_empty()).then_some(s)
            }
            let query = super::usage::Query::new(
                &r.from,
                &r.to,
                &r.group_by,
                nonempty(&r.tenant_id),
                nonempty(&r.project_id),
            )?;
            super::usage::report(&self.ctx, &query).await
        })
        .await
    }
}

#[tonic::async_trait]
impl AuditService for OpsApi {
    async fn verify_audit_chain(
        &self,
        req: tonic::Request<VerifyAuditChainRequest>,
    ) -> ApiResult<VerifyAuditChainResponse> {
        let p = checked(&req)?;
        let r = req.into_inner();
        handle(async {
            p.ops(Access::Read)?;
            let against = match r.against.as_str() {
                "" => None,
                text => Some(
                    text.parse::<crate::audit_chain::Anchor>()
                        .map_err(|e| ApiError::invalid_field("against", e.to_string()))?,
                ),
            };
            let r = crate::audit_chain::verify(&self.ctx.store, &self.ctx.audit_keys, against)
                .await
                .map_err(|e| from_store(e, "audit chain"))?;
            Ok(VerifyAuditChainResponse {
                intact: r.intact(),
                sealed: r.sealed,
                unsealed: r.unsealed,
                unkeyed: r.unkeyed,
                head_seq: r.head_seq,
                head_hash: r.head_hash,
                head_key_id: match (r.sealed, r.head_key_id) {
                    (0, _) => String::new(),
                    (_, Some(id)) => id,
                    (_, None) => crate::audit_chain::UNKEYED.to_owned(),
                },
                problems: r
                    .problems
                    .into_iter()
                    .map(|p| AuditChainProblem { seq: p.seq, event_id: p.event_id, problem: p.what })
                    .collect(),
            })
        })
        .await
    }

    async fn list_audit_events(
        &self,
        req: tonic::Request<ListAuditEventsRequest>,
    ) -> ApiResult<ListAuditEventsResponse> {
        let p = checked(&req)?;
        let r = req.into_inner();
        handle(async {
            p.ops(Access::Read)?;
            let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            let mut binding = Binding::new("audit");
            binding.push(&r.resource_id).push(&r.project_id).push(&r.action);
            let query = AuditQuery {
                resource_id: non_empty(&r.resource_id),
                project_id: non_empty(&r.project_id),
                action: non_empty(&r.action),
                page_size: validate::page_size(r.page_size, 100)?,
                after: self.ctx.pages.open(&binding, &r.page_token)?,
            };
            let (events, next) =
                self.ctx.store.list_audit_events(&query).await.map_err(|e| from_store(e, "audit events"))?;
            Ok(ListAuditEventsResponse {
                events: events.iter().map(convert::audit_to_proto).collect(),
                next_page_token: next.map(|last| self.ctx.pages.seal(&binding, last)).unwrap_or_default(),
            })
        })
        .await
    }
}

/// What an UpdateProjectQuota's mask asks for: each named limit set, or
/// unlimited when left unset; a limit set but not named is refused, so no
/// value is dropped silently.
fn quota_update(r: &UpdateProjectQuotaRequest) -> Result<QuotaUpdate, ApiError> {
    let paths = r.update_mask.as_ref().map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() {
        return Err(ApiError::invalid_field(
            "update_mask",
            "update_mask must name the limits to change: max_instances, max_vcpus, max_memory_mib, max_volumes, \
             max_volume_gib, max_images and/or max_image_gib",
        ));
    }
    let mut update = QuotaUpdate::default();
    for path in paths {
        match path.as_str() {
            "max_instances" => update.max_instances = Some(r.max_instances),
            "max_vcpus" => update.max_vcpus = Some(r.max_vcpus),
            "max_memory_mib" => update.max_memory_mib = Some(r.max_memory_mib),
            "max_volumes" => update.max_volumes = Some(r.max_volumes),
            "max_volume_gib" => update.max_volume_gib = Some(r.max_volume_gib),
            "max_images" => update.max_images = Some(r.max_images),
            "max_image_gib" => update.max_image_gib = Some(r.max_image_gib),
            other => {
                return Err(ApiError::invalid_field(
                    "update_mask",
                    format!(
                        "update_mask may name max_instances, max_vcpus, max_memory_mib, max_volumes, \
                         max_volume_gib, max_images and max_image_gib, not {}",
                        excerpt(other)
                    ),
                ));
            }
        }
    }
    for (field, set, named) in [
        ("max_instances", r.max_instances.is_some(), update.max_instances.is_some()),
        ("max_vcpus", r.max_vcpus.is_some(), update.max_vcpus.is_some()),
        ("max_memory_mib", r.max_memory_mib.is_some(), update.max_memory_mib.is_some()),
        ("max_volumes", r.max_volumes.is_some(), update.max_volumes.is_some()),
        ("max_volume_gib", r.max_volume_gib.is_some(), update.max_volume_gib.is_some()),
        ("max_images", r.max_images.is_some(), update.max_images.is_some()),
        ("max_image_gib", r.max_image_gib.is_some(), update.max_image_gib.is_some()),
    ] {
        if set && !named {
            return Err(ApiError::invalid_field(
                "update_mask",
                format!("{field} is set but update_mask does not name it"),
            ));
        }
    }
    Ok(update)
}

impl OpsApi {
    /// The audit event of a quota change.
    fn quota_audit(&self, p: &Principal, tenant: &str, project: &str) -> crate::model::AuditEvent {
        let mut audit =
            self.ctx.audit(p, AuditAction::QuotaSet, Resource::Project(project), AuditOutcome::Succeeded);
        audit.tenant_id = tenant.to_owned();
        audit.project_id = project.to_owned();
        audit
    }

    /// A project's quota and usage as the API answers them.
    async fn quota_answer(&self, tenant: &str, project: &str) -> Result<ProjectQuota, ApiError> {
        let scope = crate::model::Scope::new(tenant, project);
        let (q, u) = self.ctx.store.get_quota(&scope).await.map_err(|e| from_store(e, "quota"))?;
        Ok(ProjectQuota {
            tenant_id: tenant.to_owned(),
            project_id: project.to_owned(),
            max_instances: q.max_instances,
            max_vcpus: q.max_vcpus,
            max_memory_mib: q.max_memory_mib,
            usage: Some(QuotaUsage {
                instances: u.instances,
                vcpus: u.vcpus,
                memory_mib: u.memory_mib,
                volumes: u.volumes,
                volume_gib: u.volume_gib,
                images: u.images,
                image_gib: u.image_gib,
            }),
            max_volumes: q.max_volumes,
            max_volume_gib: q.max_volume_gib,
            max_images: q.max_images,
            max_image_gib: q.max_image_gib,
        })
    }
}

#[tonic::async_trait]
impl QuotaAdminService for OpsApi {
    async fn set_project_quota(
        &self,
        req: tonic::Request<SetProjectQuotaRequest>,
    ) -> ApiResult<ProjectQuota> {
        self.write(req, "SetProjectQuota", None, |p, r| async move {
            validate::scope_id("tenant_id", &r.tenant_id)?;
            validate::project_id(&r.project_id)?;
            let quota = Quota {
                max_instances: r.max_instances,
                max_vcpus: r.max_vcpus,
                max_memory_mib: r.max_memory_mib,
                max_volumes: r.max_volumes,
                max_volume_gib: r.max_volume_gib,
                max_images: r.max_images,
                max_image_gib: r.max_image_gib,
            };
            let mut audit = self.quota_audit(&p, &r.tenant_id, &r.project_id);
            audit.detail = format!("{quota:?}");
            self.ctx
                .store
                .set_quota(&crate::model::Scope::new(&r.tenant_id, &r.project_id), &quota, &audit)
                .await
                .map_err(|e| from_store(e, "quota"))?;
            self.quota_answer(&r.tenant_id, &r.project_id).await
        })
        .await
    }

    async fn update_project_quota(
        &self,
        req: tonic::Request<UpdateProjectQuotaRequest>,
    ) -> ApiResult<ProjectQuota> {
        self.write(req, "UpdateProjectQuota", None, |p, r| async move {
            validate::scope_id("tenant_id", &r.tenant_id)?;
            validate::project_id(&r.project_id)?;
            let update = quota_update(&r)?;
            let mut audit = self.quota_audit(&p, &r.tenant_id, &r.project_id);
            audit.detail = format!("{update:?}");
            self.ctx
                .store
                .update_quota(&crate::model::Scope::new(&r.tenant_id, &r.project_id), &update, &audit)
                .await
                .map_err(|e| from_store(e, "quota"))?;
            self.quota_answer(&r.tenant_id, &r.project_id).await
        })
        .await
    }

    async fn get_project_quota(
        &self,
        req: tonic::Request<GetProjectQuotaRequest>,
    ) -> ApiResult<ProjectQuota> {
        let p = checked(&req)?;
        let r = req.into_inner();
        handle(async {
            p.ops(Access::Read)?;
            validate::scope_id("tenant_id", &r.tenant_id)?;
            validate::project_id(&r.project_id)?;
            self.quota_answer(&r.tenant_id, &r.project_id).await
        })
        .await
    }
}
