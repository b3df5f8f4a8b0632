//! Snapshots, named `hcp-<snapshot id>` on vSphere: taken with memory when
//! the VM runs, listed, reverted to the power state they were taken in, and
//! removed.

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Vsphere;
use crate::errors::map_error;
use crate::inventory::Vm;
use crate::soap::VIM25;
use crate::vim;

/// A snapshot's name on vSphere.
fn snapshot_name(snapshot_id: &str) -> String {
    format!("hcp-{snapshot_id}")
}

impl Vsphere {
    pub(crate) async fn snapshots(&self, vm: &Vm) -> Result<Vec<vim::SnapshotNode>, ProviderError> {
        let o = self.properties(&vm.moref, &["snapshot"]).await.map_err(map_error)?;
        Ok(o.and_then(|o| o.prop("snapshot").map(vim::snapshots_of)).unwrap_or_default())
    }

    pub(crate) async fn snapshot(
        &self,
        vm: &Vm,
        snapshot_id: &str,
    ) -> Result<Option<vim::SnapshotNode>, ProviderError> {
        let name = snapshot_name(snapshot_id);
        Ok(self.snapshots(vm).await?.into_iter().find(|s| s.name == name))
    }

    /// Takes the snapshot of `req`, or finds it taken.
    pub(crate) async fn snapshot_create(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let info = |s: &vim::SnapshotNode| pb::SnapshotInfo {
            snapshot_id: req.snapshot_id.clone(),
            vm_id: req.vm_id.clone(),
            name: req.name.clone(),
            native_id: s.snapshot.value.clone(),
        };
        if let Some(existing) = self.snapshot(&vm, &req.snapshot_id).await? {
            return Ok(info(&existing));
        }
        let name = snapshot_name(&req.snapshot_id);
        let create = vim::CreateSnapshot {
            xmlns: VIM25,
            this: &vm.moref,
            name: &name,
            description: &req.name,
            // A running VM's memory too, so a revert returns it running.
            memory: vm.running(),
            quiesce: false,
        };
        let made = self.soap.task("CreateSnapshot_Task", &create).await.map_err(map_error)?;
        let node = match made {
            Some(snapshot) => vim::SnapshotNode { snapshot, name, state: vm.power.clone() },
            None => self.snapshot(&vm, &req.snapshot_id).await?.ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Internal,
                    "the snapshot task finished but the snapshot is missing",
                )
            })?,
        };
        Ok(info(&node))
    }

    /// The VM's HCP snapshots.
    pub(crate) async fn snapshot_list(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let vm = self.require(vm_id).await?;
        Ok(self
            .snapshots(&vm)
            .await?
            .into_iter()
            .filter_map(|s| {
                let id = s.name.strip_prefix("hcp-").filter(|id| is_uuid(id))?.to_owned();
                Some(pb::SnapshotInfo {
                    snapshot_id: id,
                    vm_id: vm_id.to_owned(),
                    name: s.name.clone(),
                    native_id: s.snapshot.value.clone(),
                })
            })
            .collect())
    }

    /// Reverts a VM to a snapshot, in the power state it was taken in.
    pub(crate) async fn snapshot_revert(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let snap = self.snapshot(&vm, &req.snapshot_id).await?.ok_or_else(|| {
            ProviderError::new(ErrorKind::NotFound, format!("snapshot {} not found", req.snapshot_id))
        })?;
        self.soap.task_this("RevertToSnapshot_Task", &snap.snapshot).await.map_err(map_error)?;
        // The VM is as it was when the snapshot was taken, running or not.
        // vSphere does this itself; vcsim 0.24.2 leaves the power state
        // alone, so the provider makes sure.
        let vm = self.reread(&vm).await?;
        match (snap.state.as_str(), vm.running()) {
            ("poweredOff", true) => self.power_off(&vm).await?,
            ("poweredOn", false) => self.power_on(&vm).await?,
            _ => return Ok(self.info(&vm, &req.vm_id)),
        }
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    /// Removes a snapshot; false when there is none.
    pub(crate) async fn snapshot_delete(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let Some(vm) = self.find(&req.vm_id, &[]).await? else { return Ok(false) };
        let Some(snap) = self.snapshot(&vm, &req.snapshot_id).await? else { return Ok(false) };
        let remove = vim::RemoveSnapshot { xmlns: VIM25, this: &snap.snapshot, remove_children: false };
        match self.soap.task("RemoveSnapshot_Task", &remove).await {
            Ok(_) => Ok(true),
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(false),
            Err(e) => Err(map_error(e)),
        }
    }
}
