//! Placement: which provider gets a new VM. A candidate is registered in the
//! requested zone (any zone when none is given), healthy, and has every
//! capability the request needs. Among candidates the one with the fewest
//! live VMs wins (ties by name), which spreads load without a scheduler.
//!
//! The outcome is decided before any job exists: no candidate with the
//! capability is FEATURE_NOT_SUPPORTED naming it; no healthy provider at all
//! is PROVIDER_UNAVAILABLE.

use std::collections::HashMap;

use hcp_proto::error::{ApiError, ErrorCode};

use crate::error::from_store;
use crate::lifecycle::Capability;
use crate::model::Provider;
use crate::store::Store;

/// Picks a provider for a VM in `zone` (any of `zones` when none is given)
/// needing the capability flags `needs`.
pub async fn choose(
    store: &Store,
    zone: Option<&str>,
    zones: Option<&[String]>,
    needs: &[Capability],
) -> Result<Provider, ApiError> {
    let providers = store.list_providers().await.map_err(|e| from_store(e, "providers"))?;
    let in_zone: Vec<&Provider> = providers
        .iter()
        .filter(|p| zone.is_none_or(|z| p.zone == z))
        .filter(|p| zones.is_none_or(|zs| zs.contains(&p.zone)))
        .collect();
    let healthy: Vec<&Provider> = in_zone.iter().copied().filter(|p| p.healthy).collect();
    if healthy.is_empty() {
        let where_ = zone.map(|z| format!("zone {z}")).unwrap_or_else(|| "any zone".to_owned());
        return Err(ApiError::new(
            ErrorCode::ProviderUnavailable,
            format!("no healthy provider in {where_}; retry later"),
        ));
    }
    let mut capable = healthy.clone();
    for &need in needs {
        capable.retain(|p| need.of(&p.capabilities));
        if capable.is_empty() {
            return Err(ApiError::feature_not_supported(
                need.flag(),
                format!("no provider for this request supports {need}"),
            ));
        }
    }
    if capable.len() == 1 {
        return Ok(capable[0].clone());
    }
    let load: HashMap<_, _> = store
        .count_live_vms_by_provider()
        .await
        .map_err(|e| from_store(e, "providers"))?
        .into_iter()
        .collect();
    capable.sort_by_key(|p| (load.get(&p.id).copied().unwrap_or(0), p.name.clone()));
    Ok(capable[0].clone())
}
