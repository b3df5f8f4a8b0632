//! Reading VMs back: finding HCP's VM by name, its settings and devices
//! (`Msvm_VirtualSystemSettingData` and its components), its power state and
//! NICs (with the guest's KVP addresses) as the protocol says them.

use hcp_provider_sdk::{ProviderError, pb};

use crate::cim::{Instance, object_path, wql_literal};
use crate::errors::{HvError, map_error};
use crate::wsman::Epr;
use crate::{DISK_DRIVE, Hyperv, SCSI, state, vm_name};

/// A VM of ours, as `Msvm_ComputerSystem` describes it.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    /// The VM's GUID (`Name`).
    pub(crate) guid: String,
    pub(crate) enabled_state: u64,
}

impl Vm {
    pub(crate) fn of(i: &Instance) -> Self {
        Self {
            guid: i.get("Name").unwrap_or_default().to_owned(),
            enabled_state: i.num("EnabledState").unwrap_or(0),
        }
    }

    pub(crate) fn epr(&self) -> Epr {
        Epr::new("Msvm_ComputerSystem", &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", &self.guid)])
    }

    pub(crate) fn running(&self) -> bool {
        self.enabled_state == u64::from(state::RUNNING)
    }

    pub(crate) fn off(&self) -> bool {
        self.enabled_state == u64::from(state::OFF)
    }

    pub(crate) fn power(&self) -> pb::PowerState {
        match self.enabled_state as u16 {
            state::RUNNING => pb::PowerState::Running,
            state::OFF => pb::PowerState::Shutoff,
            state::SAVED | state::PAUSED => pb::PowerState::Paused,
            _ => pb::PowerState::Unspecified,
        }
    }
}

/// What a VM is made of.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    pub(crate) processor: Option<Instance>,
    pub(crate) memory: Option<Instance>,
    /// Controllers and drives.
    pub(crate) rasds: Vec<Instance>,
    /// Attached disks and ISOs.
    pub(crate) storage: Vec<Instance>,
    pub(crate) ports: Vec<Instance>,
    pub(crate) connections: Vec<Instance>,
}

impl Devices {
    pub(crate) fn controller(&self) -> Option<&Instance> {
        self.rasds.iter().find(|r| r.get("ResourceSubType") == Some(SCSI))
    }

    /// The root disk's drive: location 0 of the controller.
    pub(crate) fn drive_on(&self, controller_path: &str) -> Option<&Instance> {
        self.drive_at(controller_path, 0).filter(|r| r.get("ResourceSubType") == Some(DISK_DRIVE))
    }

    /// The drive (disk or DVD) at `location` of the controller.
    pub(crate) fn drive_at(&self, controller_path: &str, location: u32) -> Option<&Instance> {
        self.rasds.iter().find(|r| {
            r.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(controller_path))
                && r.get("AddressOnParent").and_then(|a| a.trim().parse::<u32>().ok()) == Some(location)
        })
    }

    /// The disk image in a drive.
    pub(crate) fn image_in(&self, drive_path: &str) -> Option<&Instance> {
        self.storage.iter().find(|s| s.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(drive_path)))
    }
}

impl Hyperv {
    pub(crate) async fn find(&self, vm_id: &str) -> Result<Option<Vm>, HvError> {
        let wql =
            format!("SELECT * FROM Msvm_ComputerSystem WHERE ElementName = {}", wql_literal(&vm_name(vm_id)));
        let found = self.host.query(&wql).await?;
        if found.len() > 1 {
            return Err(HvError::Unexpected(format!("{} VMs are named {}", found.len(), vm_name(vm_id))));
        }
        Ok(found.first().map(Vm::of))
    }

    pub(crate) async fn require(&self, vm_id: &str) -> Result<Vm, ProviderError> {
        self.find(vm_id).await.map_err(map_error)?.ok_or_else(|| ProviderError::not_found(vm_id))
    }

    pub(crate) async fn reread(&self, vm: &Vm) -> Result<Vm, HvError> {
        Ok(Vm::of(&self.host.get(&vm.epr()).await?))
    }

    pub(crate) async fn settings(&self, vm: &Vm) -> Result<Instance, HvError> {
        let wql = format!(
            "ASSOCIATORS OF {{Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name={}}} \
             WHERE AssocClass = Msvm_SettingsDefineState ResultClass = Msvm_VirtualSystemSettingData",
            wql_literal(&vm.guid)
        );
        self.host
            .query(&wql)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| HvError::Unexpected(format!("VM {} has no settings", vm.guid)))
    }

    pub(crate) async fn components(&self, vssd: &Instance, class: &str) -> Result<Vec<Instance>, HvError> {
        let wql = format!(
            "ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID={}}} \
             WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = {class}",
            wql_literal(vssd.get("InstanceID").unwrap_or_default())
        );
        Ok(self.host.query(&wql).await?)
    }

    pub(crate) async fn devices(&self, vssd: &Instance) -> Result<Devices, HvError> {
        Ok(Devices {
            processor: self.components(vssd, "Msvm_ProcessorSettingData").await?.into_iter().next(),
            memory: self.components(vssd, "Msvm_MemorySettingData").await?.into_iter().next(),
            rasds: self.components(vssd, "Msvm_ResourceAllocationSettingData").await?,
            storage: self.components(vssd, "Msvm_StorageAllocationSettingData").await?,
            ports: self.components(vssd, "Msvm_SyntheticEthernetPortSettingData").await?,
            connections: self.components(vssd, "Msvm_EthernetPortAllocationSettingData").await?,
        })
    }

    /// The file in the disk drive at location 0 of the VM's SCSI
    /// controller: its own VHDX or its boot volume.
    pub(crate) async fn root_disk(&self, vm: &Vm) -> Result<Option<String>, HvError> {
        let vssd = self.settings(vm).await?;
        let d = self.devices(&vssd).await?;
        let Some(controller) = d.controller() else { return Ok(None) };
        let Some(drive) = d.drive_on(&self.path_of(controller).await?) else { return Ok(None) };
        let drive_path = self.path_of(drive).await?;
        Ok(d.image_in(&drive_path).and_then(|i| i.all("HostResource").first().cloned()))
    }

    pub(crate) async fn path_of(&self, i: &Instance) -> Result<String, HvError> {
        let id = i
            .get("InstanceID")
            .ok_or_else(|| HvError::Unexpected(format!("{} without InstanceID", i.class)))?;
        Ok(object_path(self.host_name().await?, &i.class, "InstanceID", id))
    }

    pub(crate) async fn info(&self, vm_id: &str, vm: &Vm) -> Result<pb::VmInfo, HvError> {
        let vssd = self.settings(vm).await?;
        let d = self.devices(&vssd).await?;
        let mut interfaces: Vec<pb::InterfaceInfo> = d
            .ports
            .iter()
            .map(|p| pb::InterfaceInfo {
                network: String::new(),
                mac: mac_of(p.get("Address").unwrap_or_default()),
                ipv4: Vec::new(),
                ipv6: Vec::new(),
            })
            .collect();
        // The guest's addresses (KVP, reported by its integration
        // services) are per VM, not per adapter: shown when it has one NIC.
        if interfaces.len() == 1 && vm.running() {
            let (v4, v6) = self.guest_addresses(vm).await?;
            interfaces[0].ipv4 = v4;
            interfaces[0].ipv6 = v6;
        }
        Ok(pb::VmInfo {
            vm_id: vm_id.to_owned(),
            power_state: vm.power() as i32,
            native_id: vm.guid.clone(),
            vcpus: d.processor.as_ref().and_then(|p| p.num("VirtualQuantity")).unwrap_or(0) as u32,
            memory_mib: d.memory.as_ref().and_then(|m| m.num("VirtualQuantity")).unwrap_or(0) as u32,
            interfaces,
            // The VHDX's size is not read back (GetVirtualHardDiskSettingData
            // is not used yet): unknown.
            disk_gib: 0,
            // One host per provider (ListHosts is not answered).
            host: String::new(),
        })
    }

    /// `NetworkAddressIPv4` and `NetworkAddressIPv6` from the VM's KVP
    /// exchange (empty without integration services).
    pub(crate) async fn guest_addresses(&self, vm: &Vm) -> Result<(Vec<String>, Vec<String>), HvError> {
        let wql =
            format!("SELECT * FROM Msvm_KvpExchangeComponent WHERE SystemName = {}", wql_literal(&vm.guid));
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for kvp in self.host.query(&wql).await? {
            for item in
                kvp.all("GuestIntrinsicExchangeItems").iter().filter_map(|t| Instance::from_cim_xml(t))
            {
                let list = match item.get("Name") {
                    Some("NetworkAddressIPv4") => &mut v4,
                    Some("NetworkAddressIPv6") => &mut v6,
                    _ => continue,
                };
                list.extend(
                    item.get("Data")
                        .unwrap_or_default()
                        .split(';')
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .map(str::to_owned),
                );
            }
        }
        Ok((v4, v6))
    }
}

/// `Address` (12 hex digits) as `aa:bb:cc:dd:ee:ff`.
fn mac_of(address: &str) -> String {
    let hex: String =
        address.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_ascii_lowercase();
    if hex.len() != 12 {
        return String::new();
    }
    hex.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_written_the_usual_way() {
        assert_eq!(mac_of("00155D0A0B0C"), "00:15:5d:0a:0b:0c");
        assert_eq!(mac_of(""), "");
    }
}
