//! The hosts of the resource pool's cluster and migration between them
//! (`RelocateVM_Task`).

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Vsphere;
use crate::errors::{invalid, map_error};
use crate::soap::VIM25;
use crate::vim::{self, MoRef};

impl Vsphere {
    /// The hosts of the compute resource that owns the resource pool (a
    /// cluster's hosts, or a standalone host): moid, name, capacity, state.
    pub(crate) async fn hosts(&self) -> Result<Vec<(MoRef, pb::HostInfo)>, ProviderError> {
        let places = self.places().await?.clone();
        let owner = self
            .properties(&places.pool, &["owner"])
            .await
            .map_err(map_error)?
            .and_then(|o| o.prop("owner").and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok()))
            .ok_or_else(|| ProviderError::new(ErrorKind::Unavailable, "the resource pool has no owner"))?;
        let refs: Vec<MoRef> = self
            .properties(&owner, &["host"])
            .await
            .map_err(map_error)?
            .and_then(|o| {
                o.prop("host").map(|h| {
                    h.children.iter().filter_map(|c| <MoRef as vim::FromXml>::from_xml(c).ok()).collect()
                })
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let props = [
                "name",
                "summary.hardware.numCpuThreads",
                "summary.hardware.memorySize",
                "runtime.connectionState",
                "runtime.inMaintenanceMode",
            ];
            let Some(o) = self.properties(&r, &props).await.map_err(map_error)? else { continue };
            let text = |p: &str| o.prop(p).map(|v| v.text.trim().to_owned()).unwrap_or_default();
            let state = match (
                text("runtime.connectionState").as_str(),
                text("runtime.inMaintenanceMode").as_str(),
            ) {
                ("connected", "true") => pb::HostState::HostMaintenance,
                ("connected", _) => pb::HostState::HostUp,
                _ => pb::HostState::HostDown,
            };
            let info = pb::HostInfo {
                name: text("name"),
                vcpus: text("summary.hardware.numCpuThreads").parse().unwrap_or(0),
                memory_mib: text("summary.hardware.memorySize").parse::<u64>().unwrap_or(0) / (1024 * 1024),
                state: state as i32,
            };
            out.push((r, info));
        }
        let mut names = self.host_names.lock().unwrap_or_else(|e| e.into_inner());
        names.clear();
        names.extend(out.iter().map(|(r, h)| (r.value.clone(), h.name.clone())));
        Ok(out)
    }

    /// The HostSystem named `name`; INVALID_ARGUMENT when there is none.
    pub(crate) async fn host_ref(&self, name: &str) -> Result<MoRef, ProviderError> {
        self.hosts()
            .await?
            .into_iter()
            .find(|(_, h)| h.name == name)
            .map(|(r, _)| r)
            .ok_or_else(|| invalid("host", format!("no host {name} in the resource pool's cluster")))
    }

    /// Moves a VM to another host: live when it runs, cold when it is off.
    pub(crate) async fn migrate(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let target = self.host_ref(&req.target_host).await?;
        if vm.host_ref == target.value {
            return Ok(self.info(&vm, &req.vm_id));
        }
        if req.live != vm.running() {
            let why = if vm.running() {
                "the vm is powered on; migrate it live"
            } else {
                "a live migration needs a powered-on vm"
            };
            return Err(ProviderError::new(ErrorKind::InvalidState, why));
        }
        let places = self.places().await?.clone();
        let relocate = vim::RelocateVm {
            xmlns: VIM25,
            this: &vm.moref,
            spec: vim::RelocateSpec { datastore: None, pool: Some(places.pool.clone()), host: Some(target) },
        };
        self.soap.task("RelocateVM_Task", &relocate).await.map_err(map_error)?;
        tracing::info!(vm = %vm.name, to = %req.target_host, live = req.live, "relocated");
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }
}
