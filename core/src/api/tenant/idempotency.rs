//! Idempotency keys: a request repeated with the same `Idempotency-Key` gets
//! the first answer, a different request with it 422; the record is written
//! in the accepting transaction.

use hcp_proto::error::{ApiError, ErrorCode};
use hcp_proto::tenant::VmOperationAccepted;

use super::TenantApi;
use crate::error::from_store;
use crate::model::now;
use crate::store::IdempotencyRecord;

impl TenantApi {
    /// Returns the recorded answer for an idempotency key, if the key is
    /// live: the original answer for the same request, 422 for another.
    pub(super) async fn replay(
        &self,
        tenant: &str,
        idem: Option<&(String, String)>,
    ) -> Result<Option<VmOperationAccepted>, ApiError> {
        let Some((key, hash)) = idem else { return Ok(None) };
        let record = self
            .ctx
            .store
            .get_idempotency(tenant, key, now())
            .await
            .map_err(|e| from_store(e, "idempotency key"))?;
        let Some(record) = record else { return Ok(None) };
        if record.request_hash != *hash {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request",
            )
            .with_detail("field", "Idempotency-Key"));
        }
        let answer: serde_json::Value =
            serde_json::from_str(&record.response).map_err(|_| ApiError::internal())?;
        let field = |k: &str| answer.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        tracing::info!(key = %key, "idempotent replay");
        Ok(Some(VmOperationAccepted {
            vm_id: field("vm_id"),
            job_id: field("job_id"),
            snapshot_id: Some(field("snapshot_id")).filter(|s| !s.is_empty()),
        }))
    }

    /// A concurrent request with the same key committed first: answer as it did.
    pub(super) async fn replay_after_race(
        &self,
        tenant: &str,
        idem: Option<&(String, String)>,
    ) -> Result<VmOperationAccepted, ApiError> {
        self.replay(tenant, idem).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                "a concurrent request with this Idempotency-Key is in progress; retry",
            )
        })
    }

    pub(super) fn record(
        &self,
        tenant: &str,
        idem: Option<&(String, String)>,
        answer: &VmOperationAccepted,
    ) -> Option<IdempotencyRecord> {
        let (key, hash) = idem?;
        let t = now();
        Some(IdempotencyRecord {
            tenant_id: tenant.to_owned(),
            key: key.clone(),
            request_hash: hash.clone(),
            response: serde_json::json!({
                "vm_id": answer.vm_id,
                "job_id": answer.job_id,
                "snapshot_id": answer.snapshot_id,
            })
            .to_string(),
            created_at: t,
            expires_at: t + chrono::Duration::seconds(self.ctx.config.idempotency_key_ttl_seconds as i64),
        })
    }
}

/// Reads the `idempotency-key` metadata (the REST `Idempotency-Key`
/// header): 1 to 255 visible ASCII characters.
pub fn idempotency_key<T>(req: &tonic::Request<T>) -> Result<Option<String>, ApiError> {
    let Some(value) = req.metadata().get("idempotency-key") else { return Ok(None) };
    if !hcp_proto::rules::key_header_ok(value.as_bytes()) {
        let rule = if value.is_empty() {
            hcp_proto::rules::Keyword::Required
        } else if value.len() > hcp_proto::rules::MAX_KEY_HEADER {
            hcp_proto::rules::Keyword::MaxLength
        } else {
            hcp_proto::rules::Keyword::Pattern
        };
        return Err(hcp_proto::rules::violation(
            "Idempotency-Key",
            rule,
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(value.to_str().unwrap_or_default().to_owned()))
}

/// SHA-256 of a canonical JSON value (serde_json maps are sorted).
pub(super) fn fingerprint(v: &serde_json::Value) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}
