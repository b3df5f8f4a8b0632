//! `hcp.common.v1.CallerService`: who the caller is, as [`crate::auth`]
//! verified its token. Any valid token may ask; the answer holds what the
//! token grants and nothing secret. The gateway asks it before refusing a
//! request it could not transcode, so that an unauthenticated caller gets
//! 401 before any other rule is applied to its request.

use hcp_proto::common::caller_service_server::CallerService;
use hcp_proto::common::{Caller, GetCallerRequest};

use super::ApiResult;
use crate::auth::principal;

/// Implements `CallerService`; it needs nothing but the principal.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallerApi;

#[tonic::async_trait]
impl CallerService for CallerApi {
    async fn get_caller(&self, req: tonic::Request<GetCallerRequest>) -> ApiResult<Caller> {
        let p = principal(&req)?;
        Ok(tonic::Response::new(Caller {
            subject: p.subject,
            tenant_id: p.tenant_id.unwrap_or_default(),
            projects: p.projects,
            roles: p.roles,
        }))
    }
}
