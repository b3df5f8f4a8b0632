//! Snapshots (Hyper-V checkpoints), named `hcp-<snapshot id>`: created and
//! renamed, listed, applied (a VM running when taken comes back running) and
//! destroyed.

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::cim::{Instance, wql_literal};
use crate::errors::{HvError, map_error};
use crate::inventory::Vm;
use crate::wsman::{Epr, Param};
use crate::{Hyperv, VSMS, VSSS, state};

fn snapshot_name(snapshot_id: &str) -> String {
    format!("hcp-{snapshot_id}")
}

impl Hyperv {
    pub(crate) async fn snapshots(&self, vm: &Vm) -> Result<Vec<Instance>, HvError> {
        let wql = format!(
            "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = {} \
             AND VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Realized'",
            wql_literal(&vm.guid)
        );
        Ok(self.host.query(&wql).await?)
    }

    pub(crate) async fn snapshot(&self, vm: &Vm, snapshot_id: &str) -> Result<Option<Instance>, HvError> {
        let name = snapshot_name(snapshot_id);
        Ok(self.snapshots(vm).await?.into_iter().find(|s| s.get("ElementName") == Some(name.as_str())))
    }

    pub(crate) fn snapshot_epr(s: &Instance) -> Epr {
        Epr::new("Msvm_VirtualSystemSettingData", &[("InstanceID", s.get("InstanceID").unwrap_or_default())])
    }

    /// Takes the snapshot of `req`, or finds it taken.
    pub(crate) async fn snapshot_create(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let info = |s: &Instance| pb::SnapshotInfo {
            snapshot_id: req.snapshot_id.clone(),
            vm_id: req.vm_id.clone(),
            name: req.name.clone(),
            native_id: s.get("InstanceID").unwrap_or_default().to_owned(),
        };
        if let Some(s) = self.snapshot(&vm, &req.snapshot_id).await.map_err(map_error)? {
            return Ok(info(&s));
        }
        let before: Vec<String> = self
            .snapshots(&vm)
            .await
            .map_err(map_error)?
            .iter()
            .filter_map(|s| s.get("InstanceID").map(str::to_owned))
            .collect();
        let out = self
            .call(
                &Self::service(VSSS),
                "CreateSnapshot",
                &[
                    ("AffectedSystem", Param::Ref(vm.epr())),
                    ("SnapshotSettings", Param::Text(String::new())),
                    ("SnapshotType", Param::Text("2".into())),
                ],
            )
            .await
            .map_err(map_error)?;
        // The new snapshot: named by the method, or the one that was not
        // there before.
        let made = match out.reference("ResultingSnapshot").and_then(|e| e.selector("InstanceID")) {
            Some(id) => id.to_owned(),
            None => self
                .snapshots(&vm)
                .await
                .map_err(map_error)?
                .into_iter()
                .filter_map(|s| s.get("InstanceID").map(str::to_owned))
                .find(|id| !before.contains(id))
                .ok_or_else(|| ProviderError::new(ErrorKind::Internal, "CreateSnapshot made no snapshot"))?,
        };
        let mut rename = Instance::new("Msvm_VirtualSystemSettingData");
        rename.set("InstanceID", "string", made.clone()).set(
            "ElementName",
            "string",
            snapshot_name(&req.snapshot_id),
        );
        self.call(
            &Self::service(VSMS),
            "ModifySystemSettings",
            &[("SystemSettings", Param::Instance(rename))],
        )
        .await
        .map_err(map_error)?;
        let mut s = Instance::new("Msvm_VirtualSystemSettingData");
        s.set("InstanceID", "string", made);
        Ok(info(&s))
    }

    /// The VM's HCP snapshots.
    pub(crate) async fn snapshot_list(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let vm = self.require(vm_id).await?;
        Ok(self
            .snapshots(&vm)
            .await
            .map_err(map_error)?
            .into_iter()
            .filter_map(|s| {
                let name = s.get("ElementName")?.to_owned();
                let id = name.strip_prefix("hcp-").filter(|id| is_uuid(id))?.to_owned();
                Some(pb::SnapshotInfo {
                    snapshot_id: id,
                    vm_id: vm_id.to_owned(),
                    name,
                    native_id: s.get("InstanceID").unwrap_or_default().to_owned(),
                })
            })
            .collect())
    }

    /// Applies a snapshot, leaving the VM as it was when it was taken.
    pub(crate) async fn snapshot_revert(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let snap = self.snapshot(&vm, &req.snapshot_id).await.map_err(map_error)?.ok_or_else(|| {
            ProviderError::new(ErrorKind::NotFound, format!("snapshot {} not found", req.snapshot_id))
        })?;
        // Hyper-V applies a snapshot only to a VM that is off or saved.
        if !vm.off() && vm.enabled_state != u64::from(state::SAVED) {
            self.request_state(&vm, state::OFF).await.map_err(map_error)?;
        }
        self.call(
            &Self::service(VSSS),
            "ApplySnapshot",
            &[("Snapshot", Param::Ref(Self::snapshot_epr(&snap)))],
        )
        .await
        .map_err(map_error)?;
        // A snapshot of a running VM comes back saved: resume it, so the
        // VM is as it was when the snapshot was taken.
        let mut vm = self.reread(&vm).await.map_err(map_error)?;
        if vm.enabled_state == u64::from(state::SAVED) {
            self.request_state(&vm, state::RUNNING).await.map_err(map_error)?;
            vm = self.reread(&vm).await.map_err(map_error)?;
        }
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    /// Destroys a snapshot; false when there is none.
    pub(crate) async fn snapshot_delete(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let Some(vm) = self.find(&req.vm_id).await.map_err(map_error)? else { return Ok(false) };
        let Some(snap) = self.snapshot(&vm, &req.snapshot_id).await.map_err(map_error)? else {
            return Ok(false);
        };
        self.call(
            &Self::service(VSSS),
            "DestroySnapshot",
            &[("AffectedSnapshot", Param::Ref(Self::snapshot_epr(&snap)))],
        )
        .await
        .map_err(map_error)?;
        Ok(true)
    }
}
