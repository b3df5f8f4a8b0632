//! Snapshots, named `hcp<32 hex digits>` on PVE (with the VM's memory when
//! it runs): taken, listed, rolled back and deleted.

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Proxmox;
use crate::client::{Method, Params, encode_segment};
use crate::errors::map_error;
use crate::inventory::{Found, Untagged};

/// PVE snapshot names are config ids (letter first, at most 40): `hcp` and
/// the UUID's 32 hex digits.
fn snapname(snapshot_id: &str) -> String {
    format!("hcp{}", snapshot_id.replace('-', ""))
}

fn snapshot_id_of(snapname: &str) -> Option<String> {
    let hex = snapname.strip_prefix("hcp")?;
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]))
}

impl Proxmox {
    pub(crate) async fn snapshots_of(&self, f: &Found) -> Result<Vec<(String, String)>, ProviderError> {
        let list = self
            .pve
            .call(Method::Get, &format!("{}/snapshot", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        Ok(list
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                let name = s["name"].as_str()?;
                Some((name.to_owned(), s["description"].as_str().unwrap_or_default().trim().to_owned()))
            })
            .collect())
    }

    /// Takes the snapshot of `req`, or finds it taken.
    pub(crate) async fn snapshot_create(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        let name = snapname(&req.snapshot_id);
        let existing = self.snapshots_of(&f).await?.into_iter().find(|(n, _)| *n == name);
        let description = match existing {
            Some((_, d)) => d,
            None => {
                let mut params: Params = vec![("snapname", name.clone()), ("description", req.name.clone())];
                if f.status == "running" {
                    params.push(("vmstate", "1".to_owned()));
                }
                self.pve
                    .task(Method::Post, &format!("{}/snapshot", f.path()), params)
                    .await
                    .map_err(map_error)?;
                req.name.clone()
            }
        };
        Ok(pb::SnapshotInfo {
            snapshot_id: req.snapshot_id,
            vm_id: req.vm_id,
            name: description,
            native_id: name,
        })
    }

    /// The VM's HCP snapshots.
    pub(crate) async fn snapshot_list(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let f = self.require(vm_id).await?;
        Ok(self
            .snapshots_of(&f)
            .await?
            .into_iter()
            .filter_map(|(n, d)| {
                Some(pb::SnapshotInfo {
                    snapshot_id: snapshot_id_of(&n)?,
                    vm_id: vm_id.to_owned(),
                    name: d,
                    native_id: n,
                })
            })
            .collect())
    }

    /// Rolls a VM back to a snapshot.
    pub(crate) async fn snapshot_revert(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        let name = snapname(&req.snapshot_id);
        if !self.snapshots_of(&f).await?.iter().any(|(n, _)| *n == name) {
            return Err(ProviderError::new(
                ErrorKind::NotFound,
                format!("snapshot {} not found", req.snapshot_id),
            ));
        }
        let path = format!("{}/snapshot/{}/rollback", f.path(), encode_segment(&name));
        self.pve.task(Method::Post, &path, Vec::new()).await.map_err(map_error)?;
        self.refreshed(&req.vm_id).await
    }

    /// Deletes a snapshot; false when there is none.
    pub(crate) async fn snapshot_delete(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let Some(f) = self.find(&req.vm_id, Untagged::Ignore).await? else {
            return Ok(false);
        };
        let name = snapname(&req.snapshot_id);
        if !self.snapshots_of(&f).await?.iter().any(|(n, _)| *n == name) {
            return Ok(false);
        }
        let path = format!("{}/snapshot/{}", f.path(), encode_segment(&name));
        self.pve.task(Method::Delete, &path, Vec::new()).await.map_err(map_error)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_round_trip() {
        let id = "0190b5f2-0000-7000-8000-000000000001";
        let name = snapname(id);
        assert!(name.len() <= 40 && name.starts_with("hcp"));
        assert_eq!(snapshot_id_of(&name).as_deref(), Some(id));
        assert_eq!(snapshot_id_of("before-upgrade"), None);
    }
}
