//! `hcp.common.v1.CatalogService`: the read-only catalog any authenticated
//! caller may read. Tenants do not see an image's provider-side `source`.

use hcp_proto::common::catalog_service_server::CatalogService;
use hcp_proto::common::{
    Flavor, GetFlavorRequest, GetImageRequest, Image, ListFlavorsRequest, ListFlavorsResponse,
    ListImagesRequest, ListImagesResponse, ListZonesRequest, ListZonesResponse,
};

use super::{ApiContext, ApiResult, checked, handle, validate};
use crate::auth::Access;
use crate::convert;
use crate::error::from_store;
use crate::model::{Architecture, ImageStatus};
use crate::store::ImageQuery;

/// Implements `CatalogService`.
#[derive(Clone)]
pub struct CatalogApi {
    ctx: ApiContext,
}

impl CatalogApi {
    /// Creates the service.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl CatalogService for CatalogApi {
    async fn list_volume_types(
        &self,
        req: tonic::Request<hcp_proto::common::ListVolumeTypesRequest>,
    ) -> ApiResult<hcp_proto::common::ListVolumeTypesResponse> {
        checked(&req)?;
        handle(async {
            let types =
                self.ctx.store.list_volume_types().await.map_err(|e| from_store(e, "volume types"))?;
            Ok(hcp_proto::common::ListVolumeTypesResponse {
                volume_types: types.iter().map(|t| convert::volume_type_to_proto(t, false)).collect(),
            })
        })
        .await
    }

    async fn list_flavors(&self, req: tonic::Request<ListFlavorsRequest>) -> ApiResult<ListFlavorsResponse> {
        checked(&req)?;
        handle(async {
            let flavors = self.ctx.store.list_flavors().await.map_err(|e| from_store(e, "flavors"))?;
            Ok(ListFlavorsResponse { flavors: flavors.iter().map(convert::flavor_to_proto).collect() })
        })
        .await
    }

    async fn get_flavor(&self, req: tonic::Request<GetFlavorRequest>) -> ApiResult<Flavor> {
        checked(&req)?;
        let name = req.into_inner().name;
        handle(async {
            validate::label("name", &name)?;
            let f = self
                .ctx
                .store
                .get_flavor(&name)
                .await
                .map_err(|e| from_store(e, &format!("flavor {name}")))?;
            Ok(convert::flavor_to_proto(&f))
        })
        .await
    }

    async fn list_images(&self, req: tonic::Request<ListImagesRequest>) -> ApiResult<ListImagesResponse> {
        let p = checked(&req)?;
        let for_ops = p.ops(Access::Read).is_ok();
        let r = req.into_inner();
        handle(async {
            // A project's private images need the project; operators see
            // every project's without naming one.
            let scope = match r.project_id.as_str() {
                "" => None,
                project => Some(p.scope(project, Access::Read)?),
            };
            let query = ImageQuery {
                every_project: for_ops && scope.is_none(),
                scope,
                os_type: Some(r.os_type).filter(|s| !s.is_empty()),
                architecture: Architecture::parse(&r.architecture),
                status: ImageStatus::parse(&r.status),
            };
            let images = self.ctx.store.list_images(&query).await.map_err(|e| from_store(e, "images"))?;
            Ok(ListImagesResponse {
                images: images.iter().map(|i| convert::image_to_proto(i, for_ops)).collect(),
            })
        })
        .await
    }

    async fn get_image(&self, req: tonic::Request<GetImageRequest>) -> ApiResult<Image> {
        let p = checked(&req)?;
        let for_ops = p.ops(Access::Read).is_ok();
        let r = req.into_inner();
        handle(async {
            let scope = match r.project_id.as_str() {
                "" => None,
                project => Some(p.scope(project, Access::Read)?),
            };
            let name = &r.name;
            let i = self
                .ctx
                .store
                .get_image_by_name(name, scope.as_ref())
                .await
                .map_err(|e| from_store(e, &format!("image {name}")))?;
            Ok(convert::image_to_proto(&i, for_ops))
        })
        .await
    }

    async fn list_zones(&self, req: tonic::Request<ListZonesRequest>) -> ApiResult<ListZonesResponse> {
        checked(&req)?;
        handle(async {
            let zones = self.ctx.store.list_zones().await.map_err(|e| from_store(e, "zones"))?;
            Ok(ListZonesResponse { zones: zones.iter().map(convert::zone_to_proto).collect() })
        })
        .await
    }

    async fn list_networks(
        &self,
        req: tonic::Request<hcp_proto::common::ListNetworksRequest>,
    ) -> ApiResult<hcp_proto::common::ListNetworksResponse> {
        checked(&req)?;
        let r = req.into_inner();
        handle(async {
            if !r.zone.is_empty() {
                super::validate::label("zone", &r.zone)?;
            }
            let zone = Some(r.zone.as_str()).filter(|z| !z.is_empty());
            let networks = self.ctx.store.list_networks(zone).await.map_err(|e| from_store(e, "networks"))?;
            Ok(hcp_proto::common::ListNetworksResponse {
                networks: networks.iter().map(convert::network_to_proto).collect(),
            })
        })
        .await
    }
}
