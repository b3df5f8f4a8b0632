//! Finding HCP's VMs in `/cluster/resources` (by their tags, or a clone's
//! description), their power state, and their NICs with the guest agent's
//! addresses, as the protocol says them.

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ProviderError, pb};
use serde_json::Value;

use crate::Proxmox;
use crate::client::{Method, PveError, encode_segment, lenient};
use crate::errors::map_error;

/// A VM of ours as `/cluster/resources` shows it.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) node: String,
    pub(crate) vmid: u64,
    pub(crate) status: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    /// The root image's size (`maxdisk`), whole GiB rounded up; 0 unknown.
    pub(crate) disk_gib: u32,
    pub(crate) configured: bool,
}

impl Found {
    pub(crate) fn info(&self, vm_id: &str) -> pb::VmInfo {
        let power = match self.status.as_str() {
            "running" => pb::PowerState::Running,
            "paused" => pb::PowerState::Paused,
            "stopped" => pb::PowerState::Shutoff,
            _ => pb::PowerState::Unspecified,
        };
        pb::VmInfo {
            vm_id: vm_id.to_owned(),
            power_state: power as i32,
            native_id: format!("{}/{}", self.node, self.vmid),
            host: self.node.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            // NICs need the VM's config: GetVm adds them (`described`).
            ..Default::default()
        }
    }

    pub(crate) fn path(&self) -> String {
        format!("/nodes/{}/qemu/{}", encode_segment(&self.node), self.vmid)
    }
}

/// The NIC keys a VM of ours may have, in order.
pub(crate) const NICS: [&str; 8] = ["net0", "net1", "net2", "net3", "net4", "net5", "net6", "net7"];

/// One `key=value` option of a `netN` value.
pub(crate) fn net_option<'a>(net: &'a str, key: &str) -> Option<&'a str> {
    net.split(',').find_map(|p| p.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// The MAC of a `netN` value (`virtio=BC:24:11:AA:BB:CC,bridge=vmbr0`, or
/// `macaddr=` in the long form), lower case; empty when PVE assigned none.
pub(crate) fn mac_of(net: &str) -> String {
    let is_mac = |v: &str| v.len() == 17 && v.split(':').count() == 6;
    net.split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(k, v)| *k != "bridge" && is_mac(v))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The tag naming one HCP VM.
pub(crate) fn id_tag(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

/// The tag a clone carries from the moment it exists until its
/// configuration is complete: HCP's inventory, delete and a retried create
/// all see it, so a create that fails half-way leaks nothing.
pub(crate) const PENDING_TAG: &str = "hcp-pending";

/// The tags of a clone whose configuration is not complete.
pub(crate) fn pending_tags(vm_id: &str) -> String {
    format!("hcp;{};{PENDING_TAG}", id_tag(vm_id))
}

/// The description line naming one HCP VM.
pub(crate) fn id_line(vm_id: &str) -> String {
    format!("hcp-vm-id={vm_id}")
}

/// Whether a tag names an HCP VM (`hcp-<uuid>`), any VM's.
fn is_id_tag(tag: &str) -> bool {
    tag.strip_prefix("hcp-").is_some_and(is_uuid)
}

/// Where [`Proxmox::find`] looks for a clone whose tags were never written
/// (the first config update after the clone failed), beyond the tagged VMs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Untagged<'a> {
    /// Nowhere: such a clone is not the VM yet (power, snapshots, GetVm).
    Ignore,
    /// The VMs with this name: a create knows the name it gave the clone.
    Named(&'a str),
    /// Every VM without an HCP id tag: a delete knows no name, so it reads
    /// the config of each VM HCP does not own (only when the tags found
    /// nothing, i.e. for a half-made clone or a VM already gone).
    Any,
}

pub(crate) fn tags_of(item: &Value) -> Vec<String> {
    item["tags"].as_str().unwrap_or_default().split([';', ',', ' ']).map(str::to_owned).collect()
}

impl Proxmox {
    pub(crate) async fn resources(&self, kind: &str) -> Result<Vec<Value>, ProviderError> {
        let data = self
            .pve
            .call(Method::Get, "/cluster/resources", vec![("type", kind.to_owned())])
            .await
            .map_err(map_error)?;
        Ok(data.as_array().cloned().unwrap_or_default())
    }

    pub(crate) fn found(item: &Value, configured: bool) -> Found {
        Found {
            node: item["node"].as_str().unwrap_or_default().to_owned(),
            vmid: lenient::u64(&item["vmid"]).unwrap_or_default(),
            status: item["status"].as_str().unwrap_or_default().to_owned(),
            vcpus: lenient::u64(&item["maxcpu"]).unwrap_or_default() as u32,
            memory_mib: (lenient::u64(&item["maxmem"]).unwrap_or_default() / (1024 * 1024)) as u32,
            disk_gib: u32::try_from(lenient::u64(&item["maxdisk"]).unwrap_or_default().div_ceil(1 << 30))
                .unwrap_or(u32::MAX),
            configured,
        }
    }

    /// Finds our VM by its tag (a clone still being configured carries
    /// [`PENDING_TAG`] too) and, as `untagged` says, a clone the tags never
    /// reached: its description names the VM (the clone itself wrote it),
    /// which only the VM's config shows, so each candidate costs a read.
    pub(crate) async fn find(
        &self,
        vm_id: &str,
        untagged: Untagged<'_>,
    ) -> Result<Option<Found>, ProviderError> {
        let items = self.resources("vm").await?;
        let tag = id_tag(vm_id);
        let qemu =
            items.iter().filter(|i| i["type"].as_str() == Some("qemu") && !lenient::flag(&i["template"]));
        if let Some(item) = qemu.clone().find(|i| tags_of(i).contains(&tag)) {
            let configured = !tags_of(item).iter().any(|t| t == PENDING_TAG);
            return Ok(Some(Self::found(item, configured)));
        }
        let candidate = |item: &&Value| match untagged {
            Untagged::Ignore => false,
            Untagged::Named(name) => item["name"].as_str() == Some(name),
            Untagged::Any => !tags_of(item).iter().any(|t| is_id_tag(t)),
        };
        for item in qemu.filter(candidate) {
            let f = Self::found(item, false);
            let config = match self.pve.call(Method::Get, &format!("{}/config", f.path()), Vec::new()).await {
                Ok(c) => c,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(map_error(e)),
            };
            let description = config["description"].as_str().unwrap_or_default();
            if description.lines().any(|l| l.trim() == id_line(vm_id)) {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    pub(crate) async fn require(&self, vm_id: &str) -> Result<Found, ProviderError> {
        self.find(vm_id, Untagged::Ignore).await?.ok_or_else(|| ProviderError::not_found(vm_id))
    }

    /// The NICs in order (MAC and bridge from `netN`), with the addresses
    /// the guest agent reports for a running VM. No agent, or one that
    /// does not answer: NICs without addresses.
    pub(crate) async fn interfaces(&self, f: &Found) -> Result<Vec<pb::InterfaceInfo>, ProviderError> {
        let config = self
            .pve
            .call(Method::Get, &format!("{}/config", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        let mut nics: Vec<pb::InterfaceInfo> = NICS
            .iter()
            .filter_map(|key| config[*key].as_str())
            .map(|net| pb::InterfaceInfo {
                network: net_option(net, "bridge").unwrap_or_default().to_owned(),
                mac: mac_of(net),
                ..Default::default()
            })
            .collect();
        if f.status != "running" || nics.is_empty() {
            return Ok(nics);
        }
        let path = format!("{}/agent/network-get-interfaces", f.path());
        let reported = match self.pve.call(Method::Get, &path, Vec::new()).await {
            Ok(v) => v,
            // No agent configured, or not running (yet): no addresses.
            Err(PveError::Status { status: 500, .. }) => return Ok(nics),
            Err(e) => return Err(map_error(e)),
        };
        for iface in reported["result"].as_array().into_iter().flatten() {
            let mac = iface["hardware-address"].as_str().unwrap_or_default().to_ascii_lowercase();
            let Some(nic) = nics.iter_mut().find(|n| !mac.is_empty() && n.mac == mac) else { continue };
            for a in iface["ip-addresses"].as_array().into_iter().flatten() {
                let Some(addr) = a["ip-address"].as_str() else { continue };
                match a["ip-address-type"].as_str() {
                    Some("ipv4") => nic.ipv4.push(addr.to_owned()),
                    Some("ipv6") => nic.ipv6.push(addr.to_owned()),
                    _ => {}
                }
            }
        }
        Ok(nics)
    }

    /// The VM as GetVm answers it: power and size, NICs and addresses.
    pub(crate) async fn described(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let f = self.require(vm_id).await?;
        let mut info = f.info(vm_id);
        info.interfaces = self.interfaces(&f).await?;
        Ok(info)
    }

    pub(crate) async fn refreshed(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        Ok(self.require(vm_id).await?.info(vm_id))
    }
}
