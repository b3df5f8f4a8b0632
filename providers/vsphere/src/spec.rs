//! The VM spec translated for vSphere: the template for an image, the port
//! groups for HCP networks, and the one reconfiguration (CPUs, memory, disk
//! growth, VMXNET3 NICs, cloud-init's `guestinfo` keys) that brings a VM to
//! its spec.

use base64::Engine as _;
use hcp_provider_sdk::kit::BackingError;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::errors::{invalid, map_error};
use crate::inventory::Vm;
use crate::vim::{self, Device, MoRef, OptionValue};
use crate::{ID_KEY, Vsphere};

/// What a NIC's backing should be.
#[derive(Debug, Clone)]
pub(crate) struct PortGroup {
    /// What [`Device::nic_target`] reads back: the name of a standard port
    /// group, the key of a distributed one.
    target: String,
    backing: vim::Backing,
}

impl Vsphere {
    /// Resolves an image source to a template.
    pub(crate) async fn template(&self, source: &str) -> Result<MoRef, ProviderError> {
        let name = self.config.templates.get(source).map_or(source, String::as_str);
        if name.is_empty() || name.contains("..") {
            return Err(invalid("spec.image.source", "empty or invalid"));
        }
        let path = format!("{}/vm/{}", self.config.datacenter, name.trim_matches('/'));
        match self.find_path(&path).await.map_err(map_error)? {
            Some(t) if t.kind == "VirtualMachine" => Ok(t),
            _ => {
                Err(invalid("spec.image.source", format!("no vSphere template for image source {source:?}")))
            }
        }
    }

    /// The port group for one network: its backing in HCP's catalog, this
    /// provider's own table, or (without networks) the default.
    async fn port_group(&self, name: &str) -> Result<PortGroup, ProviderError> {
        let path = format!("{}/network/{name}", self.config.datacenter);
        let net = self
            .find_path(&path)
            .await
            .map_err(map_error)?
            .ok_or_else(|| invalid("spec.networks", format!("no port group {name:?} on vSphere")))?;
        let backing = |xsi: &str| vim::Backing {
            xsi_type: xsi.to_owned(),
            file_name: None,
            datastore: None,
            device_name: None,
            network: None,
            port: None,
            disk_mode: None,
            thin_provisioned: None,
        };
        if net.kind == "DistributedVirtualPortgroup" {
            let o = self
                .properties(&net, &["key", "config.distributedVirtualSwitch"])
                .await
                .map_err(map_error)?
                .ok_or_else(|| invalid("spec.networks", format!("port group {name:?} vanished")))?;
            let key = o.prop("key").map(|k| k.text.clone()).unwrap_or_else(|| net.value.clone());
            let dvs = o
                .prop("config.distributedVirtualSwitch")
                .and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok())
                .ok_or_else(|| invalid("spec.networks", format!("port group {name:?} has no switch")))?;
            let uuid = self
                .properties(&dvs, &["uuid"])
                .await
                .map_err(map_error)?
                .and_then(|o| o.prop("uuid").map(|u| u.text.clone()))
                .unwrap_or_default();
            let mut b = backing("VirtualEthernetCardDistributedVirtualPortBackingInfo");
            b.port = Some(vim::PortConnection { switch_uuid: uuid, portgroup_key: key.clone() });
            Ok(PortGroup { target: key, backing: b })
        } else {
            let mut b = backing("VirtualEthernetCardNetworkBackingInfo");
            b.device_name = Some(name.to_owned());
            b.network = Some(net);
            Ok(PortGroup { target: name.to_owned(), backing: b })
        }
    }

    pub(crate) async fn port_groups(&self, spec: &pb::VmSpec) -> Result<Vec<PortGroup>, ProviderError> {
        if spec.networks.len() > 10 {
            return Err(invalid("spec.networks", "at most 10 networks"));
        }
        let names = self.config.backings().resolve_names(&spec.networks).map_err(|e| match e {
            BackingError::UnknownNetwork { network, .. } => {
                invalid("spec.networks", format!("network {network:?} has no port group on this provider"))
            }
            other => invalid("spec.networks", other),
        })?;
        let mut out = Vec::new();
        for name in names {
            out.push(self.port_group(&name).await?);
        }
        Ok(out)
    }

    /// The reconfiguration that brings `vm` to `spec` (empty when it is
    /// there already).
    pub(crate) async fn desired(
        &self,
        vm: &Vm,
        vm_id: &str,
        spec: &pb::VmSpec,
    ) -> Result<vim::ConfigSpec, ProviderError> {
        let mut change = vim::ConfigSpec::default();
        if vm.vcpus != spec.vcpus {
            change.num_cpus = Some(spec.vcpus as i32);
        }
        if vm.memory_mib != spec.memory_mib {
            change.memory_mb = Some(i64::from(spec.memory_mib));
        }
        if self.config.hot_add && !(vm.cpu_hot_add && vm.memory_hot_add) {
            change.cpu_hot_add = Some(true);
            change.memory_hot_add = Some(true);
        }
        // A boot volume's size is settled when it is made (an existing one
        // is booted as it is): the clone's own disk is about to go.
        if spec.boot_volume_id.is_empty()
            && let Some(grow) = grow_disk(vm, spec.disk_gib)?
        {
            change.device_change.push(grow);
        }
        let wanted = self.port_groups(spec).await?;
        let have: Vec<&str> = vm.nics().map(|n| n.nic_target().unwrap_or_default()).collect();
        if have != wanted.iter().map(|w| w.target.as_str()).collect::<Vec<_>>() {
            for nic in vm.nics() {
                change.device_change.push(vim::DeviceChange::new("remove", nic.clone()));
            }
            for (i, pg) in wanted.into_iter().enumerate() {
                change.device_change.push(vim::DeviceChange {
                    operation: "add",
                    file_operation: None,
                    device: Device {
                        xsi_type: "VirtualVmxnet3".to_owned(),
                        key: -100 - i as i32,
                        device_info: None,
                        backing: Some(pg.backing),
                        connectable: Some(vim::Connectable {
                            start_connected: true,
                            allow_guest_control: true,
                            connected: false,
                        }),
                        controller_key: None,
                        unit_number: None,
                        address_type: Some("generated".to_owned()),
                        mac_address: None,
                        capacity_kb: None,
                        capacity_bytes: None,
                    },
                });
            }
        }
        let mut extra = vec![(ID_KEY.to_owned(), vm_id.to_owned())];
        if spec.user_data.is_some() || !spec.ssh_authorized_keys.is_empty() {
            if !self.config.cloud_init {
                return Err(ProviderError::new(
                    ErrorKind::Unsupported,
                    "user data and SSH keys need cloud_init = true in the vSphere provider's configuration",
                ));
            }
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            let hostname = if spec.hostname.is_empty() { &spec.name } else { &spec.hostname };
            // cloud-init's VMware datasource reads the same meta-data
            // document as NoCloud, SSH keys as `public-keys`.
            let metadata = hcp_nocloud::meta_data(vm_id, hostname, &spec.ssh_authorized_keys);
            if let Some(user_data) = &spec.user_data {
                extra.extend([
                    ("guestinfo.userdata".to_owned(), b64(user_data)),
                    ("guestinfo.userdata.encoding".to_owned(), "base64".to_owned()),
                ]);
            }
            extra.extend([
                ("guestinfo.metadata".to_owned(), b64(&metadata)),
                ("guestinfo.metadata.encoding".to_owned(), "base64".to_owned()),
            ]);
        }
        for (k, v) in extra {
            if !vm.extra_config.iter().any(|(ek, ev)| *ek == k && *ev == v) {
                change.extra_config.push(OptionValue::new(&k, &v));
            }
        }
        Ok(change)
    }
}

/// The disk edit that grows the first disk to `gib` (None when it is that
/// size already, or `gib` is 0); shrinking is refused.
pub(crate) fn grow_disk(vm: &Vm, gib: u32) -> Result<Option<vim::DeviceChange>, ProviderError> {
    if gib == 0 {
        return Ok(None);
    }
    let Some(disk) = vm.disk() else {
        return Err(invalid("spec.disk_gib", "the template has no disk to grow"));
    };
    let want = i64::from(gib) << 30;
    let have = disk.disk_bytes();
    if want < have {
        return Err(invalid(
            "disk_gib",
            format!("{gib} GiB is smaller than the disk ({} GiB); disks only grow", have >> 30),
        ));
    }
    if want == have {
        return Ok(None);
    }
    let mut grown = disk.clone();
    grown.capacity_kb = Some(want / 1024);
    grown.capacity_bytes = Some(want);
    if grown.device_info.is_none() {
        grown.device_info = Some(vim::Description { label: "Hard disk 1".into(), summary: String::new() });
    }
    Ok(Some(vim::DeviceChange::new("edit", grown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_only_grow() {
        let disk = Device {
            xsi_type: "VirtualDisk".into(),
            key: 2000,
            device_info: None,
            backing: None,
            connectable: None,
            controller_key: Some(1000),
            unit_number: Some(0),
            address_type: None,
            mac_address: None,
            capacity_kb: Some(10 << 20),
            capacity_bytes: None,
        };
        let vm = Vm {
            moref: MoRef::new("VirtualMachine", "vm-1"),
            name: String::new(),
            instance_uuid: String::new(),
            vcpus: 1,
            memory_mib: 1,
            devices: vec![disk],
            cpu_hot_add: false,
            memory_hot_add: false,
            power: "poweredOff".into(),
            host_ref: String::new(),
            guest: Vec::new(),
            extra_config: Vec::new(),
        };
        assert!(grow_disk(&vm, 0).unwrap().is_none());
        assert!(grow_disk(&vm, 10).unwrap().is_none());
        let grown = grow_disk(&vm, 20).unwrap().unwrap();
        assert_eq!((grown.operation, grown.device.capacity_bytes), ("edit", Some(20 << 30)));
        assert!(grown.device.device_info.is_some(), "vSphere needs the device's description on an edit");
        assert_eq!(grow_disk(&vm, 5).unwrap_err().kind, ErrorKind::InvalidArgument);
    }
}
