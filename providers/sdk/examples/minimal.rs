//! The smallest complete provider, an in-memory hypervisor: a `Provider`, a
//! `Config` (`listen`, `max_vms`) and `main`; the SDK's kit does the rest
//! (command line, strict config, telemetry, serving). See `GUIDE.md`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use hcp_provider_sdk::kit::{self, ConfigError, ProviderConfig, Spec, config::check_range};
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb, serve};

/// The configuration file; unknown keys are refused.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    listen: SocketAddr,
    max_vms: usize,
}

impl ProviderConfig for Config {
    fn listen(&self) -> SocketAddr {
        self.listen
    }
    fn set_listen(&mut self, listen: SocketAddr) {
        self.listen = listen;
    }
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("max_vms", self.max_vms, 1..=10_000) // refused at start, never clamped
    }
}

struct Memory {
    vms: Mutex<HashMap<String, pb::PowerState>>,
    max_vms: usize,
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
        let initial = if req.start { pb::PowerState::Running } else { pb::PowerState::Shutoff };
        if let Ok(mut vms) = self.vms.lock() {
            if vms.len() >= self.max_vms && !vms.contains_key(&req.vm_id) {
                return Err(ProviderError::new(ErrorKind::Unavailable, "no room"));
            }
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

const SPEC: Spec = Spec {
    binary: "memory-provider",
    ready: "provider-memory",
    about: "An in-memory hypervisor",
    version: "0.1.0",
    config_env: "MEMORY_PROVIDER_CONFIG",
    listen_env: Some("MEMORY_PROVIDER_LISTEN"),
    json_logs_flag: true,
};

fn main() -> std::process::ExitCode {
    kit::cli::exit(kit::cli::main(&SPEC, std::env::args_os(), |config: Config, shutdown, ready| async move {
        let listen = kit::config::serve_config(&config)?;
        let memory = Memory { vms: Mutex::default(), max_vms: config.max_vms };
        Ok::<_, kit::cli::BoxError>(serve(memory, listen, shutdown, ready).await?)
    }))
}
