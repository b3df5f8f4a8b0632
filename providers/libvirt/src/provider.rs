//! The `Provider` implementation: every call checks its ids, takes the VM's
//! lock where it changes the VM, and runs in its module.

use hcp_provider_sdk::{Provider, ProviderError, ProviderInfo, pb};

use crate::Libvirt;
use crate::errors::check_uuid;

#[hcp_provider_sdk::async_trait]
impl Provider for Libvirt {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("hcp.libvirt", env!("CARGO_PKG_VERSION"), "kvm")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(self.inner.capabilities.clone())
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        match self.call("probe", |c| Ok(c.is_alive()?)).await {
            Ok(true) => Ok((true, format!("connected to {}", self.inner.config.uri))),
            Ok(false) => Ok((false, "the libvirt connection is not alive".to_owned())),
            Err(e) => Ok((false, e.message)),
        }
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.create(req).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        self.info(vm_id).await
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        self.list(req).await
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        let lock = self.lock(vm_id);
        let _held = lock.lock().await;
        self.start(vm_id).await
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.stop(req).await
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.reboot(req).await
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.resize(req).await
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        let lock = self.lock(vm_id);
        let existed = {
            let _held = lock.lock().await;
            self.delete(vm_id).await?
        };
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(vm_id);
        Ok(existed)
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        self.console(req).await
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_create(req).await
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        self.snapshot_list(vm_id).await
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_revert(req).await
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_delete(req).await
    }
}
