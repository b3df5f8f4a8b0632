//! The cluster's nodes as hosts, and migration between them (`qmigrate`,
//! online for a running VM).

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Proxmox;
use crate::client::{Method, Params, lenient};
use crate::errors::{invalid, map_error};
use crate::inventory::Found;

impl Proxmox {
    /// The cluster's nodes.
    pub(crate) async fn hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        let nodes = self.resources("node").await?;
        Ok(nodes
            .iter()
            .filter_map(|n| {
                let name = n["node"].as_str()?.to_owned();
                let state = match n["status"].as_str() {
                    Some("online") => pb::HostState::HostUp,
                    _ => pb::HostState::HostDown,
                };
                Some(pb::HostInfo {
                    name,
                    vcpus: u32::try_from(lenient::u64(&n["maxcpu"]).unwrap_or_default()).unwrap_or(u32::MAX),
                    memory_mib: lenient::u64(&n["maxmem"]).unwrap_or_default() / (1024 * 1024),
                    state: state as i32,
                })
            })
            .collect())
    }

    /// Moves a VM to another node (`online` for a running VM) and waits
    /// for the `qmigrate` task.
    pub(crate) async fn migrate(&self, f: &Found, target: &str, online: bool) -> Result<(), ProviderError> {
        let mut params: Params = vec![("target", target.to_owned())];
        if online {
            params.push(("online", "1".to_owned()));
        }
        let path = format!("{}/migrate", f.path());
        self.pve.task(Method::Post, &path, params).await.map_err(map_error)?;
        tracing::info!(vmid = f.vmid, from = %f.node, to = target, online, "migrated");
        Ok(())
    }

    /// Moves a VM to the node `req` names: live when it runs, offline when not.
    pub(crate) async fn move_to_host(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        if f.node == req.target_host {
            return self.described(&req.vm_id).await;
        }
        let running = f.status == "running";
        if req.live != running {
            let why = if running {
                "the vm is running; migrate it live"
            } else {
                "a live migration needs a running vm"
            };
            return Err(ProviderError::new(ErrorKind::InvalidState, why));
        }
        let nodes = self.resources("node").await?;
        let online = |name: &str| {
            nodes.iter().any(|n| n["node"].as_str() == Some(name) && n["status"].as_str() == Some("online"))
        };
        if !nodes.iter().any(|n| n["node"].as_str() == Some(req.target_host.as_str())) {
            return Err(invalid("target_host", format!("the cluster has no node {}", req.target_host)));
        }
        if !online(&req.target_host) {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("node {} is offline", req.target_host),
            ));
        }
        if !online(&f.node) {
            // PVE moves a dead node's VMs only through its HA manager.
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("node {} is offline; its VMs are recovered by the cluster's HA manager", f.node),
            ));
        }
        self.migrate(&f, &req.target_host, req.live).await?;
        self.described(&req.vm_id).await
    }
}
