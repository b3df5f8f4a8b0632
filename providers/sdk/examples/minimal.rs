//! The smallest complete provider: an in-memory hypervisor. Everything a
//! vendor writes is the `Provider` implementation and the few lines of
//! `main` at the bottom; the SDK does the rest. `GUIDE.md` walks through it.

use std::collections::HashMap;
use std::sync::Mutex;

use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, ServeConfig, pb, serve};

#[derive(Default)]
struct Memory {
    vms: Mutex<HashMap<String, pb::PowerState>>,
}

impl Memory {
    fn info(&self, id: &str) -> Result<pb::VmInfo, ProviderError> {
        let vms = self.vms.lock().map_err(|_| ProviderError::new(ErrorKind::Internal, "lock poisoned"))?;
        let power = vms.get(id).ok_or_else(|| ProviderError::not_found(id))?;
        Ok(pb::VmInfo {
            vm_id: id.to_owned(),
            power_state: *power as i32,
            native_id: id.to_owned(),
            ..Default::default()
        })
    }

    fn set(&self, id: &str, power: pb::PowerState) -> Result<pb::VmInfo, ProviderError> {
        if let Ok(mut vms) = self.vms.lock() {
            *vms.get_mut(id).ok_or_else(|| ProviderError::not_found(id))? = power;
        }
        self.info(id)
    }
}

#[hcp_provider_sdk::async_trait]
impl Provider for Memory {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("memory.example.com", "0.1.0", "memory")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(pb::Capabilities::default())
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.spec.as_ref().is_some_and(|s| s.user_data.is_some()) {
            return Err(ProviderError::new(ErrorKind::Unsupported, "no cloud-init"));
        }
        let initial = if req.start { pb::PowerState::Running } else { pb::PowerState::Shutoff };
        if let Ok(mut vms) = self.vms.lock() {
            vms.entry(req.vm_id.clone()).or_insert(initial); // idempotent by HCP id
        }
        self.info(&req.vm_id)
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.info(vm_id)
    }

    async fn list_vms(&self, _: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let ids: Vec<String> = self.vms.lock().map(|v| v.keys().cloned().collect()).unwrap_or_default();
        let vms = ids.iter().filter_map(|id| self.info(id).ok()).collect();
        Ok(pb::ListVmsResponse { vms, next_page_token: String::new() })
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.set(vm_id, pb::PowerState::Running)
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.set(&req.vm_id, pb::PowerState::Shutoff)
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm = self.info(&req.vm_id)?;
        if vm.power_state != pb::PowerState::Running as i32 {
            return Err(ProviderError::new(ErrorKind::InvalidState, "vm is not running"));
        }
        Ok(vm)
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        Ok(self.vms.lock().map(|mut v| v.remove(vm_id).is_some()).unwrap_or(false))
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        Err(ProviderError::new(ErrorKind::Unsupported, format!("no {} console", req.protocol)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = ServeConfig { listen: "127.0.0.1:50081".parse()?, ..Default::default() };
    serve(Memory::default(), config, hcp_telemetry::shutdown_signal(), |addr| println!("serving on {addr}"))
        .await?;
    Ok(())
}
