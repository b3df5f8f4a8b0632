//! Idempotency keys of every mutating call, tenant and ops alike: a request
//! repeated with the same `Idempotency-Key` gets the first answer (the
//! encoded reply message, so any reply type replays), a different request
//! with it 422 IDEMPOTENCY_KEY_REUSED, for `idempotency_key_ttl_seconds`
//! (24 h by default).
//!
//! Keys live per scope: a tenant's calls share the tenant's keys; an
//! operator's calls are keyed by the token's subject (`@ops:<subject>`,
//! which no tenant id can spell), so two operators never see each other's
//! answers. An operation that accepts a job records its key in the job's
//! transaction ([`record`] handed to the store); every other one goes
//! through [`finish`]: the key is recorded right after the change commits.
//! A crash in between leaves the change without its record, so a retry
//! runs the request again (a create then meets its own resource: 409).

use base64::Engine;
use hcp_proto::error::{ApiError, ErrorCode};
use prost::Message;

use super::ApiContext;
use crate::auth::Principal;
use crate::error::from_store;
use crate::model::now;
use crate::store::{IdempotencyRecord, StoreError};

/// A live idempotency key of one request: where it is kept and the
/// fingerprint of the request it was given with.
#[derive(Debug, Clone)]
pub struct Key {
    scope: String,
    key: String,
    hash: String,
}

impl Key {
    /// A key whose request is fingerprinted as canonical JSON (serde_json
    /// maps are sorted); `request` names the method among its fields.
    pub fn json(scope: &str, key: Option<String>, request: &serde_json::Value) -> Option<Key> {
        let hash = sha256_hex(request.to_string().as_bytes());
        key.map(|key| Key { scope: scope.to_owned(), key, hash })
    }

    /// A key whose request is fingerprinted as `method` and its encoded
    /// message. Only for messages without maps: prost encodes a map in its
    /// hash order, which differs between equal maps.
    pub fn message<M: Message>(scope: &str, key: Option<String>, method: &str, request: &M) -> Option<Key> {
        let mut bytes = method.as_bytes().to_vec();
        bytes.push(0);
        request.encode(&mut bytes).ok()?;
        let hash = sha256_hex(&bytes);
        key.map(|key| Key { scope: scope.to_owned(), key, hash })
    }
}

/// The scope an operator's keys live in.
pub fn ops_scope(p: &Principal) -> String {
    format!("@ops:{}", p.subject)
}

/// Reads the `idempotency-key` metadata (the REST `Idempotency-Key`
/// header): 1 to 255 visible ASCII characters.
pub fn idempotency_key<T>(req: &tonic::Request<T>) -> Result<Option<String>, ApiError> {
    let Some(value) = req.metadata().get("idempotency-key") else { return Ok(None) };
    if !hcp_proto::rules::key_header_ok(value.as_bytes()) {
        return Err(hcp_proto::rules::violation(
            "Idempotency-Key",
            hcp_proto::rules::key_header_keyword(value.as_bytes()),
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(value.to_str().unwrap_or_default().to_owned()))
}

/// Returns the recorded answer for a live key: the original answer for the
/// same request, 422 for another.
pub async fn replay<M: Message + Default>(
    ctx: &ApiContext,
    idem: Option<&Key>,
) -> Result<Option<M>, ApiError> {
    let Some(k) = idem else { return Ok(None) };
    let record = ctx
        .store
        .get_idempotency(&k.scope, &k.key, now())
        .await
        .map_err(|e| from_store(e, "idempotency key"))?;
    let Some(record) = record else { return Ok(None) };
    if record.request_hash != k.hash {
        return Err(ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used for a different request",
        )
        .with_detail("field", "Idempotency-Key"));
    }
    let answer = decode(&record.response).ok_or_else(|| {
        tracing::error!(key = %k.key, "an idempotency record cannot be read");
        ApiError::internal()
    })?;
    tracing::info!(key = %k.key, "idempotent replay");
    Ok(Some(answer))
}

/// A concurrent request with the same key committed first: answer as it did.
pub async fn replay_after_race<M: Message + Default>(
    ctx: &ApiContext,
    idem: Option<&Key>,
) -> Result<M, ApiError> {
    replay(ctx, idem).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            "a concurrent request with this Idempotency-Key is in progress; retry",
        )
    })
}

/// The record of `answer` under `idem`, for the store to write with the
/// change.
pub fn record<M: Message>(ctx: &ApiContext, idem: Option<&Key>, answer: &M) -> Option<IdempotencyRecord> {
    let k = idem?;
    let t = now();
    let reply = base64::engine::general_purpose::STANDARD.encode(answer.encode_to_vec());
    Some(IdempotencyRecord {
        tenant_id: k.scope.clone(),
        key: k.key.clone(),
        request_hash: k.hash.clone(),
        response: serde_json::json!({ "reply": reply }).to_string(),
        created_at: t,
        expires_at: t + chrono::Duration::seconds(ctx.config.idempotency_key_ttl_seconds as i64),
    })
}

/// Runs `op` once per key: a live key is answered from its record without
/// running it; otherwise see [`finish`].
pub async fn once<M: Message + Default>(
    ctx: &ApiContext,
    idem: Option<Key>,
    op: impl Future<Output = Result<M, ApiError>>,
) -> Result<M, ApiError> {
    if let Some(answer) = replay(ctx, idem.as_ref()).await? {
        return Ok(answer);
    }
    finish(ctx, idem.as_ref(), op.await).await
}

/// Ends an operation that has no transaction of its own to record its key
/// in: a success is recorded now (when a concurrent request with the key
/// recorded first, its answer is given), and a failure is answered from
/// the key's record when a concurrent twin succeeded meanwhile.
pub async fn finish<M: Message + Default>(
    ctx: &ApiContext,
    idem: Option<&Key>,
    result: Result<M, ApiError>,
) -> Result<M, ApiError> {
    finish_until(ctx, idem, result, None).await
}

/// [`finish`], with the record kept only until `until` when that is
/// sooner than the keys' lifetime: an answer that carries a secret of its
/// own (a console session's token) lives in the database no longer than
/// the secret does.
pub async fn finish_until<M: Message + Default>(
    ctx: &ApiContext,
    idem: Option<&Key>,
    result: Result<M, ApiError>,
    until: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<M, ApiError> {
    let Some(k) = idem else { return result };
    match result {
        Ok(answer) => {
            let Some(mut rec) = record(ctx, Some(k), &answer) else { return Ok(answer) };
            if let Some(until) = until {
                rec.expires_at = rec.expires_at.min(until);
            }
            match ctx.store.put_idempotency(&rec).await {
                Ok(()) => Ok(answer),
                Err(StoreError::IdempotencyRace) => replay_after_race(ctx, Some(k)).await,
                Err(e) => {
                    // The change is made; only its replay is lost.
                    tracing::warn!(key = %k.key, error = %e, "cannot record an idempotency key");
                    Ok(answer)
                }
            }
        }
        Err(e) => match replay(ctx, Some(k)).await? {
            Some(answer) => Ok(answer),
            None => Err(e),
        },
    }
}

/// A stored answer: `{"reply": base64}`, or the form written before every
/// reply type could replay (a `VmOperationAccepted` as JSON).
fn decode<M: Message + Default>(response: &str) -> Option<M> {
    let v: serde_json::Value = serde_json::from_str(response).ok()?;
    let bytes = match v.get("reply").and_then(|r| r.as_str()) {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).ok()?,
        None => {
            let field = |k: &str| v.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            hcp_proto::tenant::VmOperationAccepted {
                vm_id: field("vm_id"),
                job_id: field("job_id"),
                snapshot_id: Some(field("snapshot_id")).filter(|s| !s.is_empty()),
                volume_id: None,
                image_id: None,
            }
            .encode_to_vec()
        }
    };
    M::decode(bytes.as_slice()).ok()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_proto::tenant::VmOperationAccepted;

    #[test]
    fn answers_decode_in_both_forms() {
        let a = VmOperationAccepted {
            vm_id: "v".into(),
            job_id: "j".into(),
            snapshot_id: Some("s".into()),
            volume_id: None,
            image_id: None,
        };
        let reply = base64::engine::general_purpose::STANDARD.encode(a.encode_to_vec());
        let new = serde_json::json!({ "reply": reply }).to_string();
        assert_eq!(decode::<VmOperationAccepted>(&new), Some(a.clone()));
        let old = r#"{"vm_id":"v","job_id":"j","snapshot_id":"s"}"#;
        assert_eq!(decode::<VmOperationAccepted>(old), Some(a));
        assert_eq!(decode::<VmOperationAccepted>("not json"), None);
    }

    #[test]
    fn fingerprints_tell_requests_apart() {
        let k = |m: &str, r: &VmOperationAccepted| Key::message("t", Some("k".into()), m, r).unwrap().hash;
        let a = VmOperationAccepted { vm_id: "a".into(), ..Default::default() };
        let b = VmOperationAccepted { vm_id: "b".into(), ..Default::default() };
        assert_eq!(k("M", &a), k("M", &a));
        assert_ne!(k("M", &a), k("M", &b));
        assert_ne!(k("M", &a), k("N", &a));
        assert!(Key::message("t", None, "M", &a).is_none());
    }
}
