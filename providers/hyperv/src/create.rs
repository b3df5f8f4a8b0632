//! CreateVM: the root disk (a differencing VHDX of the VM's own, or the
//! boot volume, found or made), `DefineSystem`, then every device (SCSI
//! controller, disk drive and VHDX, the NoCloud seed on a DVD drive, NICs
//! and their switch connections), then the data volumes at their slots,
//! each step looking before it acts.

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::cim::Instance;
use crate::errors::{HvError, invalid, map_error};
use crate::inventory::{Devices, Vm};
use crate::wsman::Param;
use crate::{
    CONNECTION, DISK_DRIVE, DVD_DRIVE, DVD_LOCATION, Hyperv, ISO, MAX_VOLUMES, NIC, SCSI, VHD, VSMS, state,
    vm_name,
};

/// The VM's root disk.
enum Root {
    /// Its own differencing VHDX (`<vm_dir>\\hcp-<id>.vhdx`) on this parent.
    Own { parent: String },
    /// The boot volume's VHDX, found or made before the VM.
    Volume { path: String },
}

/// The volumes a CreateVm names, checked.
struct VolumesAtCreate {
    boot: Option<String>,
    /// Data volumes and their slots.
    data: Vec<(String, u32)>,
}

impl VolumesAtCreate {
    fn of(spec: &pb::VmSpec) -> Result<Self, ProviderError> {
        let boot = Some(spec.boot_volume_id.clone()).filter(|id| !id.is_empty());
        if boot.as_deref().is_some_and(|id| !is_uuid(id)) {
            return Err(invalid("spec.boot_volume_id", "must be a UUID"));
        }
        let mut data: Vec<(String, u32)> = Vec::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            let field = format!("spec.volumes[{i}]");
            if !is_uuid(&v.volume_id) {
                return Err(invalid(&field, "volume_id must be a UUID"));
            }
            if v.slot == 0 || v.slot > MAX_VOLUMES {
                return Err(invalid(&field, format!("slot must be 1 to {MAX_VOLUMES}")));
            }
            if boot.as_deref() == Some(v.volume_id.as_str()) || data.iter().any(|(id, _)| *id == v.volume_id)
            {
                return Err(invalid(&field, format!("volume {} is named twice", v.volume_id)));
            }
            if data.iter().any(|(_, slot)| *slot == v.slot) {
                return Err(invalid(&field, format!("slot {} is named twice", v.slot)));
            }
            data.push((v.volume_id.clone(), v.slot));
        }
        Ok(Self { boot, data })
    }

    fn ids(&self) -> impl Iterator<Item = &str> {
        self.boot.iter().map(String::as_str).chain(self.data.iter().map(|(id, _)| id.as_str()))
    }
}

impl Hyperv {
    /// Creates the VM of `req`, or finishes a create that was interrupted.
    pub(crate) async fn create(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        if !is_uuid(&vm_id) {
            return Err(invalid("vm_id", "must be a UUID"));
        }
        let spec = req.spec.ok_or_else(|| invalid("spec", "required"))?;
        if spec.vcpus == 0 || spec.memory_mib == 0 {
            return Err(invalid("spec", "vcpus and memory_mib must be positive"));
        }
        if (spec.user_data.is_some() || !spec.ssh_authorized_keys.is_empty())
            && self.config.cloud_init.is_none()
        {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "user data and SSH keys need [cloud_init] in the Hyper-V provider's configuration",
            ));
        }
        let volumes = VolumesAtCreate::of(&spec)?;
        let parent_of = |spec: &pb::VmSpec| {
            let image = spec.image.as_ref().ok_or_else(|| invalid("spec.image", "required"))?;
            self.parent_vhd(&image.source)
        };
        // Without a boot volume the image is needed whatever happens; with
        // one, only to make the volume.
        let own_parent = if volumes.boot.is_none() { Some(parent_of(&spec)?) } else { None };
        // Volumes before the VM, as the volume calls take them.
        let mut keys: Vec<String> = volumes.ids().map(|id| format!("volume:{id}")).collect();
        keys.sort();
        let mut volume_turns = Vec::new();
        for key in &keys {
            volume_turns.push(self.locks.lock(key).await);
        }
        let _serial = self.locks.lock(&vm_id).await;
        // Checked before anything is made: the data volumes, the switches.
        let data = self.data_volume_files(&vm_id, &volumes.data).await?;
        let existing = self.find(&vm_id).await.map_err(map_error)?;
        if existing.is_none() {
            self.switches(&spec).await?;
        }
        let mut vhd_ready = false;
        let root = match (&volumes.boot, own_parent) {
            (Some(boot), _) => {
                let path = self
                    .boot_volume_file(&vm_id, boot, &spec.boot_storage, || parent_of(&spec), spec.disk_gib)
                    .await?;
                Root::Volume { path }
            }
            (None, Some(parent)) => {
                if existing.is_none() {
                    // The differencing disk is made first: it checks the image.
                    self.ensure_vhd(&self.vhd_path(&vm_id), &parent, spec.disk_gib).await?;
                    vhd_ready = true;
                }
                Root::Own { parent }
            }
            (None, None) => return Err(invalid("spec.image", "required")),
        };
        let vm = match existing {
            Some(vm) => vm,
            None => {
                let mut vssd = Instance::new("Msvm_VirtualSystemSettingData");
                vssd.set("ElementName", "string", vm_name(&vm_id))
                    .set_array("Notes", "string", vec![format!("hcp-vm-id={vm_id}"), spec.name.clone()])
                    .set("VirtualSystemSubType", "string", "Microsoft:Hyper-V:SubType:2");
                self.call(&Self::service(VSMS), "DefineSystem", &[("SystemSettings", Param::Instance(vssd))])
                    .await
                    .map_err(map_error)?;
                self.failpoints.hit("create:after-define");
                self.find(&vm_id).await.map_err(map_error)?.ok_or_else(|| {
                    ProviderError::new(
                        ErrorKind::Internal,
                        "DefineSystem finished but the VM cannot be found",
                    )
                })?
            }
        };
        self.build(&vm, &vm_id, &spec, &root, vhd_ready).await?;
        // Data volumes after the devices: the SCSI controller is there.
        self.attach_at_create(&vm, &vm_id, &data).await?;
        let mut vm = self.reread(&vm).await.map_err(map_error)?;
        if req.start && !vm.running() {
            self.request_state(&vm, state::RUNNING).await.map_err(map_error)?;
            vm = self.reread(&vm).await.map_err(map_error)?;
        }
        self.info(&vm_id, &vm).await.map_err(map_error)
    }

    /// Everything after the define, each step skipped when done.
    async fn build(
        &self,
        vm: &Vm,
        vm_id: &str,
        spec: &pb::VmSpec,
        root: &Root,
        vhd_ready: bool,
    ) -> Result<(), ProviderError> {
        let err = |e: HvError| map_error(e);
        let vssd = self.settings(vm).await.map_err(err)?;
        let d = self.devices(&vssd).await.map_err(err)?;
        self.size(&d, spec.vcpus, spec.memory_mib).await.map_err(err)?;
        // The disk: a differencing VHDX on the image, grown to the flavor,
        // or the boot volume, on drive 0 of a SCSI controller.
        let vhd = match root {
            Root::Own { .. } => self.vhd_path(vm_id),
            Root::Volume { path } => path.clone(),
        };
        let attached =
            d.storage.iter().any(|s| s.all("HostResource").iter().any(|h| h.eq_ignore_ascii_case(&vhd)));
        if !attached {
            let controller = match d.controller() {
                Some(c) => c.clone(),
                None => {
                    let mut c = Instance::new("Msvm_ResourceAllocationSettingData");
                    c.set("ResourceType", "uint16", "6").set("ResourceSubType", "string", SCSI);
                    self.add(&vssd, c).await.map_err(err)?;
                    self.failpoints.hit("create:after-controller");
                    let d = self.devices(&vssd).await.map_err(err)?;
                    d.controller().cloned().ok_or_else(|| {
                        err(HvError::Unexpected("the SCSI controller is missing after its add".into()))
                    })?
                }
            };
            let controller_path = self.path_of(&controller).await.map_err(err)?;
            let d = self.devices(&vssd).await.map_err(err)?;
            let drive = match d.drive_on(&controller_path) {
                Some(dr) => dr.clone(),
                None => {
                    let mut dr = Instance::new("Msvm_ResourceAllocationSettingData");
                    dr.set("ResourceType", "uint16", "17")
                        .set("ResourceSubType", "string", DISK_DRIVE)
                        .set("Parent", "string", controller_path.clone())
                        .set("AddressOnParent", "string", "0");
                    self.add(&vssd, dr).await.map_err(err)?;
                    self.failpoints.hit("create:after-drive");
                    let d = self.devices(&vssd).await.map_err(err)?;
                    d.drive_on(&controller_path).cloned().ok_or_else(|| {
                        err(HvError::Unexpected("the disk drive is missing after its add".into()))
                    })?
                }
            };
            // A boot volume was found or made before the VM was looked up.
            if let (Root::Own { parent }, false) = (root, vhd_ready) {
                self.ensure_vhd(&vhd, parent, spec.disk_gib).await?;
            }
            let mut sasd = Instance::new("Msvm_StorageAllocationSettingData");
            sasd.set("ResourceType", "uint16", "31")
                .set("ResourceSubType", "string", VHD)
                .set("Parent", "string", self.path_of(&drive).await.map_err(err)?)
                .set_array("HostResource", "string", vec![vhd.clone()]);
            self.add(&vssd, sasd).await.map_err(err)?;
            self.failpoints.hit("create:after-disk");
        }
        // User data and SSH keys: a NoCloud seed ISO on a DVD drive at the
        // controller's last location, leaving 1..=62 to volumes.
        if let Some(ci) = &self.config.cloud_init
            && (spec.user_data.is_some() || !spec.ssh_authorized_keys.is_empty())
        {
            let user_data = spec.user_data.as_deref().unwrap_or_default();
            let iso_name = format!("{}-seed.iso", vm_name(vm_id));
            let host_iso = format!("{}\\{iso_name}", ci.host_dir.trim_end_matches('\\'));
            let d = self.devices(&vssd).await.map_err(err)?;
            if !d
                .storage
                .iter()
                .any(|s| s.all("HostResource").iter().any(|h| h.eq_ignore_ascii_case(&host_iso)))
            {
                let hostname = if spec.hostname.is_empty() { &spec.name } else { &spec.hostname };
                let keys = &spec.ssh_authorized_keys;
                hcp_nocloud::build(&ci.local_dir.join(&iso_name), vm_id, hostname, user_data, keys)
                    .await
                    .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("the seed ISO: {e}")))?;
                let controller = d
                    .controller()
                    .cloned()
                    .ok_or_else(|| err(HvError::Unexpected("no SCSI controller for the seed".into())))?;
                let controller_path = self.path_of(&controller).await.map_err(err)?;
                let dvd_of = |d: &Devices| {
                    d.rasds
                        .iter()
                        .find(|r| {
                            r.get("ResourceSubType") == Some(DVD_DRIVE)
                                && r.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(&controller_path))
                        })
                        .cloned()
                };
                let drive = match dvd_of(&d) {
                    Some(dr) => dr,
                    None => {
                        let mut dr = Instance::new("Msvm_ResourceAllocationSettingData");
                        dr.set("ResourceType", "uint16", "16")
                            .set("ResourceSubType", "string", DVD_DRIVE)
                            .set("Parent", "string", controller_path.clone())
                            .set("AddressOnParent", "string", DVD_LOCATION.to_string());
                        self.add(&vssd, dr).await.map_err(err)?;
                        self.failpoints.hit("create:after-dvd");
                        dvd_of(&self.devices(&vssd).await.map_err(err)?).ok_or_else(|| {
                            err(HvError::Unexpected("the DVD drive is missing after its add".into()))
                        })?
                    }
                };
                let mut sasd = Instance::new("Msvm_StorageAllocationSettingData");
                sasd.set("ResourceType", "uint16", "31")
                    .set("ResourceSubType", "string", ISO)
                    .set("Parent", "string", self.path_of(&drive).await.map_err(err)?)
                    .set_array("HostResource", "string", vec![host_iso]);
                self.add(&vssd, sasd).await.map_err(err)?;
                self.failpoints.hit("create:after-seed");
            }
        }
        // NICs: port i named hcp-nic-i, connected to switch i.
        let switches = self.switches(spec).await?;
        for (i, switch) in switches.iter().enumerate() {
            let name = format!("hcp-nic-{i}");
            let d = self.devices(&vssd).await.map_err(err)?;
            let port = match d.ports.iter().find(|p| p.get("ElementName") == Some(name.as_str())) {
                Some(p) => p.clone(),
                None => {
                    let mut p = Instance::new("Msvm_SyntheticEthernetPortSettingData");
                    p.set("ResourceType", "uint16", "10")
                        .set("ResourceSubType", "string", NIC)
                        .set("ElementName", "string", name.clone())
                        .set_array(
                            "VirtualSystemIdentifiers",
                            "string",
                            vec![format!("{{{}}}", uuid::Uuid::new_v4())],
                        );
                    self.add(&vssd, p).await.map_err(err)?;
                    self.failpoints.hit("create:after-nic");
                    let d = self.devices(&vssd).await.map_err(err)?;
                    d.ports
                        .iter()
                        .find(|p| p.get("ElementName") == Some(name.as_str()))
                        .cloned()
                        .ok_or_else(|| err(HvError::Unexpected(format!("{name} is missing after its add"))))?
                }
            };
            let port_path = self.path_of(&port).await.map_err(err)?;
            if !d
                .connections
                .iter()
                .any(|c| c.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(&port_path)))
            {
                let mut c = Instance::new("Msvm_EthernetPortAllocationSettingData");
                c.set("ResourceType", "uint16", "33")
                    .set("ResourceSubType", "string", CONNECTION)
                    .set("Parent", "string", port_path)
                    .set_array("HostResource", "string", vec![switch.clone()]);
                self.add(&vssd, c).await.map_err(err)?;
                self.failpoints.hit("create:after-connection");
            }
        }
        Ok(())
    }
}
