//! Finding HCP's VMs on vSphere and reading them: the inventory path
//! lookups, the resolved placement, `FindByUuid`, the paged container view
//! of every VM, and a VM's power state and NICs as the protocol says them.

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::errors::map_error;
use crate::soap::{VIM25, VimError};
use crate::vim::{self, Device, MoRef, ObjectContent};
use crate::{Vsphere, vm_name};

/// The properties read of a VM.
pub(crate) const VM_PROPS: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.cpuHotAddEnabled",
    "config.memoryHotAddEnabled",
    "runtime.powerState",
    "runtime.host",
    "guest.net",
];

/// A VM of ours as vSphere describes it.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) moref: MoRef,
    pub(crate) name: String,
    pub(crate) instance_uuid: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) devices: Vec<Device>,
    pub(crate) cpu_hot_add: bool,
    pub(crate) memory_hot_add: bool,
    pub(crate) power: String,
    /// The moid of the HostSystem it runs on.
    pub(crate) host_ref: String,
    pub(crate) guest: Vec<vim::GuestNic>,
    pub(crate) extra_config: Vec<(String, String)>,
}

impl Vm {
    pub(crate) fn of(o: &ObjectContent) -> Self {
        let text = |p: &str| o.prop(p).map(|v| v.text.trim().to_owned()).unwrap_or_default();
        let num = |p: &str| text(p).parse::<u32>().unwrap_or_default();
        let mut devices: Vec<Device> = o
            .prop("config.hardware.device")
            .map(|d| d.children.iter().map(Device::from_xml).collect())
            .unwrap_or_default();
        devices.sort_by_key(|d| d.key);
        Self {
            moref: o.obj.clone(),
            name: text("name"),
            instance_uuid: text("config.instanceUuid"),
            vcpus: num("config.hardware.numCPU"),
            memory_mib: num("config.hardware.memoryMB"),
            devices,
            cpu_hot_add: text("config.cpuHotAddEnabled") == "true",
            memory_hot_add: text("config.memoryHotAddEnabled") == "true",
            power: text("runtime.powerState"),
            host_ref: o
                .prop("runtime.host")
                .and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok())
                .map(|m| m.value)
                .unwrap_or_default(),
            guest: o.prop("guest.net").map(vim::guest_nics).unwrap_or_default(),
            extra_config: o
                .prop("config.extraConfig")
                .map(|x| {
                    x.children
                        .iter()
                        .map(|c| (c.text_of("key").to_owned(), c.text_of("value").to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.power == "poweredOn"
    }

    /// The root disk: the one at unit 0 (a boot volume is put there, after
    /// data volumes in the device list), else the first.
    pub(crate) fn disk(&self) -> Option<&Device> {
        self.devices
            .iter()
            .find(|d| d.is_disk() && d.unit_number == Some(0))
            .or_else(|| self.devices.iter().find(|d| d.is_disk()))
    }

    pub(crate) fn nics(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.is_nic())
    }

    /// What the protocol says of it; `host` is the moid of its host
    /// ([`Vsphere::info`] puts the host's name there).
    pub(crate) fn info_raw(&self, vm_id: &str) -> pb::VmInfo {
        let power = match self.power.as_str() {
            "poweredOn" => pb::PowerState::Running,
            "poweredOff" => pb::PowerState::Shutoff,
            "suspended" => pb::PowerState::Paused,
            _ => pb::PowerState::Unspecified,
        };
        let interfaces = self
            .nics()
            .map(|nic| {
                let mac = nic.mac_address.clone().unwrap_or_default();
                let addresses: Vec<String> = self
                    .guest
                    .iter()
                    .filter(|g| !mac.is_empty() && g.mac == mac)
                    .flat_map(|g| g.addresses.iter().cloned())
                    .collect();
                pb::InterfaceInfo {
                    network: String::new(),
                    mac,
                    ipv4: addresses.iter().filter(|a| !a.contains(':')).cloned().collect(),
                    ipv6: addresses.iter().filter(|a| a.contains(':')).cloned().collect(),
                }
            })
            .collect();
        let disk_gib =
            self.disk().map_or(0, |d| u32::try_from((d.disk_bytes() as u64).div_ceil(1 << 30)).unwrap_or(0));
        pb::VmInfo {
            vm_id: vm_id.to_owned(),
            power_state: power as i32,
            native_id: self.moref.value.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            interfaces,
            disk_gib,
            host: self.host_ref.clone(),
        }
    }
}

/// Where new VMs go, resolved once from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Places {
    pub(crate) datacenter: MoRef,
    pub(crate) folder: MoRef,
    pub(crate) pool: MoRef,
    pub(crate) datastore: Option<MoRef>,
}

impl Vsphere {
    pub(crate) async fn find_path(&self, path: &str) -> Result<Option<MoRef>, VimError> {
        let si = self.soap.content().await?.search_index.clone();
        let req = vim::FindByInventoryPath { xmlns: VIM25, this: &si, inventory_path: path };
        self.soap.invoke("FindByInventoryPath", &req, true).await
    }

    pub(crate) async fn places(&self) -> Result<&Places, ProviderError> {
        self.places
            .get_or_try_init(|| async {
                let dc = &self.config.datacenter;
                let need = |what: &'static str, path: String| async move {
                    self.find_path(&path).await.map_err(map_error)?.ok_or_else(|| {
                        ProviderError::new(
                            ErrorKind::Unavailable,
                            format!("{what} {path:?} is not in the vSphere inventory (check the provider's configuration)"),
                        )
                    })
                };
                let datacenter = need("datacenter", dc.clone()).await?;
                let folder = match &self.config.folder {
                    Some(f) => need("folder", format!("{dc}/vm/{}", f.trim_matches('/'))).await?,
                    None => need("folder", format!("{dc}/vm")).await?,
                };
                let pool = need("resource_pool", format!("{dc}/{}", self.config.resource_pool.trim_matches('/'))).await?;
                let datastore = match &self.config.datastore {
                    Some(d) => Some(need("datastore", format!("{dc}/datastore/{d}")).await?),
                    None => None,
                };
                Ok(Places { datacenter, folder, pool, datastore })
            })
            .await
    }

    pub(crate) async fn properties(
        &self,
        obj: &MoRef,
        paths: &[&str],
    ) -> Result<Option<ObjectContent>, VimError> {
        let pc = self.soap.content().await?.property_collector.clone();
        let req = vim::RetrievePropertiesEx {
            xmlns: VIM25,
            this: &pc,
            spec_set: vec![vim::PropertyFilterSpec::one(obj, paths)],
            options: vim::RetrieveOptions { max_objects: 1 },
        };
        match self.soap.invoke::<_, vim::RetrieveResult>("RetrievePropertiesEx", &req, true).await {
            Ok(r) => Ok(r.objects.into_iter().next()),
            // Deleted between the lookup and the read.
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Our VM, found by its instance UUID (the HCP VM id).
    pub(crate) async fn find(&self, vm_id: &str, extra: &[&str]) -> Result<Option<Vm>, ProviderError> {
        let places = self.places().await?;
        let si = self.soap.content().await.map_err(map_error)?.search_index.clone();
        let req = vim::FindByUuid {
            xmlns: VIM25,
            this: &si,
            datacenter: Some(&places.datacenter),
            uuid: vm_id,
            vm_search: true,
            instance_uuid: true,
        };
        let Some(moref) =
            self.soap.invoke::<_, Option<MoRef>>("FindByUuid", &req, true).await.map_err(map_error)?
        else {
            return Ok(None);
        };
        let paths: Vec<&str> = VM_PROPS.iter().chain(extra).copied().collect();
        let Some(o) = self.properties(&moref, &paths).await.map_err(map_error)? else { return Ok(None) };
        let vm = Vm::of(&o);
        // The instance UUID is ours; the name says it is HCP's.
        if !vm.instance_uuid.eq_ignore_ascii_case(vm_id) || vm.name != vm_name(vm_id) {
            tracing::warn!(vm = %vm.name, moref = %moref.value, "a VM carries an HCP VM id as instance UUID but not HCP's name");
            return Ok(None);
        }
        Ok(Some(vm))
    }

    pub(crate) async fn require(&self, vm_id: &str) -> Result<Vm, ProviderError> {
        self.find(vm_id, &[]).await?.ok_or_else(|| ProviderError::not_found(vm_id))
    }

    pub(crate) async fn reread(&self, vm: &Vm) -> Result<Vm, ProviderError> {
        let o = self.properties(&vm.moref, VM_PROPS).await.map_err(map_error)?;
        o.map(|o| Vm::of(&o)).ok_or_else(|| ProviderError::not_found(&vm.instance_uuid))
    }

    /// Every HCP VM in the datacenter, through a container view, paged.
    pub(crate) async fn inventory(&self) -> Result<Vec<Vm>, ProviderError> {
        let places = self.places().await?;
        let content = self.soap.content().await.map_err(map_error)?;
        let (vm_mgr, pc) = (content.view_manager.clone(), content.property_collector.clone());
        let create = vim::CreateContainerView {
            xmlns: VIM25,
            this: &vm_mgr,
            container: &places.datacenter,
            kinds: vec!["VirtualMachine"],
            recursive: true,
        };
        let view: MoRef = self.soap.invoke("CreateContainerView", &create, false).await.map_err(map_error)?;
        let result = async {
            let req = vim::RetrievePropertiesEx {
                xmlns: VIM25,
                this: &pc,
                spec_set: vec![vim::PropertyFilterSpec::view(&view, "VirtualMachine", VM_PROPS)],
                options: vim::RetrieveOptions { max_objects: 200 },
            };
            let mut page: vim::RetrieveResult = self.soap.invoke("RetrievePropertiesEx", &req, true).await?;
            let mut vms = Vec::new();
            loop {
                vms.extend(page.objects.iter().map(Vm::of).filter(|vm| {
                    vm.name
                        .strip_prefix("hcp-")
                        .is_some_and(|id| is_uuid(id) && vm.instance_uuid.eq_ignore_ascii_case(id))
                }));
                let Some(token) = page.token.take() else { break };
                let next = vim::ContinueRetrievePropertiesEx { xmlns: VIM25, this: &pc, token: &token };
                page = self.soap.invoke("ContinueRetrievePropertiesEx", &next, true).await?;
            }
            Ok::<_, VimError>(vms)
        }
        .await;
        if let Err(e) = self.soap.invoke_this::<vim::Nothing>("DestroyView", &view, false).await {
            tracing::debug!(error = %e, "could not destroy a container view");
        }
        result.map_err(map_error)
    }

    /// The protocol's view of a VM, its host named as ListHosts names it.
    pub(crate) fn info(&self, vm: &Vm, vm_id: &str) -> pb::VmInfo {
        let mut info = vm.info_raw(vm_id);
        if let Some(name) = self.host_names.lock().unwrap_or_else(|e| e.into_inner()).get(&info.host) {
            info.host = name.clone();
        }
        info
    }
}
