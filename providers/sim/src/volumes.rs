//! The simulator's volumes: block storage that outlives VMs, kept in memory
//! with the rules of the contract (`hcp.provider.v1`, the volume section):
//! every call idempotent by HCP volume id, slots 1 to
//! `max_volumes_per_vm` (0 is a boot volume), one VM per volume, attach and
//! detach of a running VM only with `supports_hot_attach`, extend only
//! grows, delete only when detached, and with `volumes_host_local` a volume
//! attached only to VMs on its own host. DeleteVm leaves every volume
//! behind, detached.
//!
//! Each rule is a [`State`] method that runs under the simulator's one lock,
//! so a call checks everything before it changes anything: a refused call
//! changes nothing, and an accepted one is applied whole (which is what
//! makes a fault injected "after the effect" a clean lost reply).

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::{SimVm, State};

/// The storage a volume goes to when its spec names none.
pub const DEFAULT_STORAGE: &str = "default";

/// A volume on the simulated hypervisor.
#[derive(Debug, Clone)]
pub(crate) struct SimVolume {
    /// `<storage>:sim-vol-<n>`, as a volid names its storage.
    pub(crate) native_id: String,
    pub(crate) size_gib: u32,
    /// The host whose storage holds it; empty unless volumes are host-local.
    pub(crate) host: String,
    /// The VM it is attached to and its slot there (0: the VM boots from it).
    pub(crate) attached: Option<(String, u32)>,
}

/// The volumes a VM is created with: what `VmSpec.boot_volume_id`,
/// `VmSpec.boot_storage` and `VmSpec.volumes` carry in CreateVm.
///
/// The capability comments of `provider.proto` name those fields, but the
/// `VmSpec` message of this protocol revision does not have them, so a
/// CreateVm over the wire always brings none; [`crate::Sim::create_vm_with`]
/// takes them directly until the message grows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmVolumes {
    /// Boot from this volume (slot 0): used as it is when it exists, else
    /// created from the image at the spec's `disk_gib`.
    pub boot: Option<BootVolume>,
    /// Data volumes to attach at create, each at its slot.
    pub data: Vec<VolumeSlot>,
}

/// A VM's boot volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootVolume {
    /// Its HCP volume id.
    pub volume_id: String,
    /// Where to create it when it does not exist yet; empty: the default.
    pub storage: String,
}

/// A data volume at a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSlot {
    /// Its HCP volume id.
    pub volume_id: String,
    /// 1 to `max_volumes_per_vm`.
    pub slot: u32,
}

impl VmVolumes {
    /// What a CreateVm's spec asks for.
    pub fn of(spec: Option<&pb::VmSpec>) -> Self {
        let Some(spec) = spec else { return Self::default() };
        VmVolumes {
            boot: Some(&spec.boot_volume_id)
                .filter(|id| !id.is_empty())
                .map(|id| BootVolume { volume_id: id.clone(), storage: spec.boot_storage.clone() }),
            data: spec
                .volumes
                .iter()
                .map(|v| VolumeSlot { volume_id: v.volume_id.clone(), slot: v.slot })
                .collect(),
        }
    }
}

fn unsupported() -> ProviderError {
    ProviderError::new(ErrorKind::Unsupported, "volumes are not supported")
}

fn volume_not_found(id: &str) -> ProviderError {
    ProviderError::new(ErrorKind::NotFound, format!("volume {id} not found"))
}

fn invalid_state(msg: String) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidState, msg)
}

/// What the volume calls need to know of the capabilities.
pub(crate) fn require_volumes(caps: &pb::Capabilities) -> Result<(), ProviderError> {
    if caps.supports_volumes { Ok(()) } else { Err(unsupported()) }
}

pub(crate) fn info_of(id: &str, v: &SimVolume) -> pb::VolumeInfo {
    let (vm_id, slot) = v.attached.clone().unwrap_or_default();
    pb::VolumeInfo {
        volume_id: id.to_owned(),
        size_gib: v.size_gib,
        native_id: v.native_id.clone(),
        vm_id,
        slot,
        host: v.host.clone(),
    }
}

impl State {
    fn volume(&self, id: &str) -> Result<&SimVolume, ProviderError> {
        self.volumes.get(id).ok_or_else(|| volume_not_found(id))
    }

    /// The storage a spec names, checked against those the simulator has.
    fn storage_of(&self, asked: &str) -> Result<String, ProviderError> {
        let storage = if asked.is_empty() { DEFAULT_STORAGE } else { asked };
        if self.storages.iter().any(|s| s == storage) {
            Ok(storage.to_owned())
        } else {
            Err(ProviderError::new(ErrorKind::InvalidArgument, format!("no storage {storage:?}")))
        }
    }

    fn new_volume(&mut self, id: &str, volume: SimVolume) -> pb::VolumeInfo {
        *self.volume_creations.entry(id.to_owned()).or_default() += 1;
        let info = info_of(id, &volume);
        self.volumes.insert(id.to_owned(), volume);
        info
    }

    fn next_volume_native(&mut self, storage: &str) -> String {
        self.next_native += 1;
        format!("{storage}:sim-vol-{}", self.next_native)
    }

    /// CreateVolume: the existing volume as it is, or a new one.
    pub(crate) fn create_volume(
        &mut self,
        caps: &pb::Capabilities,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        require_volumes(caps)?;
        if let Some(v) = self.volumes.get(&req.volume_id) {
            return Ok(info_of(&req.volume_id, v));
        }
        let spec = req.spec.unwrap_or_default();
        if spec.size_gib == 0 {
            return Err(ProviderError::new(ErrorKind::InvalidArgument, "size_gib must be at least 1"));
        }
        let storage = self.storage_of(&spec.storage)?;
        let host = if caps.volumes_host_local { self.host_for(&spec.host)? } else { String::new() };
        // The simulator holds nothing but HCP's volumes, so every volume
        // is marked as HCP's; the name and labels have nowhere to go.
        let volume = SimVolume {
            native_id: self.next_volume_native(&storage),
            size_gib: spec.size_gib,
            host,
            attached: None,
        };
        Ok(self.new_volume(&req.volume_id, volume))
    }

    /// GetVolume.
    pub(crate) fn get_volume(
        &self,
        caps: &pb::Capabilities,
        id: &str,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        require_volumes(caps)?;
        self.volume(id).map(|v| info_of(id, v))
    }

    /// Every volume, for ListVolumes to page.
    pub(crate) fn all_volumes(&self, caps: &pb::Capabilities) -> Result<Vec<pb::VolumeInfo>, ProviderError> {
        require_volumes(caps)?;
        Ok(self.volumes.iter().map(|(id, v)| info_of(id, v)).collect())
    }

    /// Whether the VM `vm_id` runs (false when it does not exist).
    fn running(&self, vm_id: &str) -> bool {
        self.vms.get(vm_id).is_some_and(|vm| vm.power == pb::PowerState::Running)
    }

    /// ExtendVolume: grows, never shrinks; a running VM's volume only with
    /// `supports_volume_extend_in_use`. A boot volume's VM sees the new
    /// size as its disk's.
    pub(crate) fn extend_volume(
        &mut self,
        caps: &pb::Capabilities,
        req: &pb::ExtendVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        require_volumes(caps)?;
        let v = self.volume(&req.volume_id)?;
        if req.size_gib < v.size_gib {
            return Err(ProviderError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "size_gib {} is below the volume's {} GiB; volumes only grow",
                    req.size_gib, v.size_gib
                ),
            ));
        }
        if req.size_gib == v.size_gib {
            return Ok(info_of(&req.volume_id, v));
        }
        let attached = v.attached.clone();
        if let Some((vm_id, _)) = &attached
            && self.running(vm_id)
            && !caps.supports_volume_extend_in_use
        {
            return Err(invalid_state(format!(
                "volume {} is attached to running vm {vm_id}; extending it in use is not supported",
                req.volume_id
            )));
        }
        if let Some((vm_id, 0)) = &attached
            && let Some(vm) = self.vms.get_mut(vm_id)
        {
            vm.disk_gib = req.size_gib;
        }
        let v = self.volumes.get_mut(&req.volume_id).ok_or_else(|| volume_not_found(&req.volume_id))?;
        v.size_gib = req.size_gib;
        Ok(info_of(&req.volume_id, v))
    }

    /// Checks that volume `id` may be attached to `vm` at `slot` (already
    /// there included), without changing anything.
    fn check_attach(
        &self,
        caps: &pb::Capabilities,
        id: &str,
        vm_id: &str,
        vm: &SimVm,
        slot: u32,
    ) -> Result<(), ProviderError> {
        let v = self.volume(id)?;
        match &v.attached {
            Some((on, at)) if on == vm_id && *at == slot => return Ok(()),
            Some((on, at)) if on == vm_id => {
                return Err(invalid_state(format!("volume {id} is attached to vm {vm_id} at slot {at}")));
            }
            Some((on, _)) => return Err(invalid_state(format!("volume {id} is attached to vm {on}"))),
            None => {}
        }
        if slot > caps.max_volumes_per_vm {
            return Err(ProviderError::new(
                ErrorKind::InvalidArgument,
                format!("slot {slot} is beyond the last, {}", caps.max_volumes_per_vm),
            ));
        }
        if let Some((other, _)) = self
            .volumes
            .iter()
            .find(|(_, o)| o.attached.as_ref().is_some_and(|(on, at)| on == vm_id && *at == slot))
        {
            return Err(invalid_state(format!("slot {slot} of vm {vm_id} holds volume {other}")));
        }
        if caps.volumes_host_local && v.host != vm.host {
            return Err(invalid_state(format!(
                "volume {id} is on host {}, vm {vm_id} on host {}",
                v.host, vm.host
            )));
        }
        Ok(())
    }

    /// AttachVolume.
    pub(crate) fn attach_volume(
        &mut self,
        caps: &pb::Capabilities,
        req: &pb::AttachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        require_volumes(caps)?;
        let vm = self.vms.get(&req.vm_id).ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
        self.check_attach(caps, &req.volume_id, &req.vm_id, vm, req.slot)?;
        let v = self.volume(&req.volume_id)?;
        if v.attached.is_some() {
            // Already there: check_attach refuses every other attachment.
            return Ok(info_of(&req.volume_id, v));
        }
        if vm.power == pb::PowerState::Running && !caps.supports_hot_attach {
            return Err(invalid_state(format!(
                "vm {} is running; attaching to a running vm is not supported",
                req.vm_id
            )));
        }
        let v = self.volumes.get_mut(&req.volume_id).ok_or_else(|| volume_not_found(&req.volume_id))?;
        v.attached = Some((req.vm_id.clone(), req.slot));
        Ok(info_of(&req.volume_id, v))
    }

    /// DetachVolume: not attached to that VM (or gone) succeeds; a boot
    /// volume stays with its VM until DeleteVm.
    pub(crate) fn detach_volume(
        &mut self,
        caps: &pb::Capabilities,
        req: &pb::DetachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        require_volumes(caps)?;
        let Some(v) = self.volumes.get(&req.volume_id) else {
            // Gone: there is nothing to describe but its id.
            return Ok(pb::VolumeInfo { volume_id: req.volume_id.clone(), ..Default::default() });
        };
        match &v.attached {
            Some((on, 0)) if *on == req.vm_id => {
                return Err(invalid_state(format!(
                    "volume {} is the boot volume of vm {on}; it is detached when the vm is deleted",
                    req.volume_id
                )));
            }
            Some((on, _)) if *on == req.vm_id => {}
            _ => return Ok(info_of(&req.volume_id, v)),
        }
        if self.running(&req.vm_id) && !caps.supports_hot_attach {
            return Err(invalid_state(format!(
                "vm {} is running; detaching from a running vm is not supported",
                req.vm_id
            )));
        }
        let v = self.volumes.get_mut(&req.volume_id).ok_or_else(|| volume_not_found(&req.volume_id))?;
        v.attached = None;
        Ok(info_of(&req.volume_id, v))
    }

    /// DeleteVolume: whether it existed; attached is refused.
    pub(crate) fn delete_volume(&mut self, caps: &pb::Capabilities, id: &str) -> Result<bool, ProviderError> {
        require_volumes(caps)?;
        let Some(v) = self.volumes.get(id) else { return Ok(false) };
        if let Some((vm_id, slot)) = &v.attached {
            return Err(invalid_state(format!(
                "volume {id} is attached to vm {vm_id} at slot {slot}; detach it first"
            )));
        }
        self.volumes.remove(id);
        Ok(true)
    }

    /// Leaves every volume of `vm_id` behind, detached (DeleteVm, and a VM
    /// removed behind HCP's back).
    pub(crate) fn detach_all(&mut self, vm_id: &str) {
        for v in self.volumes.values_mut() {
            if v.attached.as_ref().is_some_and(|(on, _)| on == vm_id) {
                v.attached = None;
            }
        }
    }

    /// Attaches volume `id` to `vm_id` at `slot`, or detaches it (empty
    /// `vm_id`), behind HCP's back: no capability or power state is
    /// checked, only what the hypervisor itself enforces.
    pub(crate) fn set_attachment(&mut self, id: &str, vm_id: &str, slot: u32) -> Result<(), ProviderError> {
        self.volume(id)?;
        let attached = if vm_id.is_empty() {
            None
        } else {
            if !self.vms.contains_key(vm_id) {
                return Err(ProviderError::not_found(vm_id));
            }
            let taken = self.volumes.iter().any(|(other, v)| {
                other != id && v.attached.as_ref().is_some_and(|(on, at)| on == vm_id && *at == slot)
            });
            if taken {
                return Err(invalid_state(format!("slot {slot} of vm {vm_id} is taken")));
            }
            Some((vm_id.to_owned(), slot))
        };
        let v = self.volumes.get_mut(id).ok_or_else(|| volume_not_found(id))?;
        v.attached = attached;
        Ok(())
    }

    /// Adds a detached volume marked as HCP's that HCP never created.
    pub(crate) fn add_unknown_volume(&mut self, id: &str, size_gib: u32, host: String) {
        let volume =
            SimVolume { native_id: self.next_volume_native(DEFAULT_STORAGE), size_gib, host, attached: None };
        self.volumes.insert(id.to_owned(), volume);
    }

    /// Whether any volume is attached to `vm_id`.
    pub(crate) fn has_volumes(&self, vm_id: &str) -> bool {
        self.volumes.values().any(|v| v.attached.as_ref().is_some_and(|(on, _)| on == vm_id))
    }

    /// Checks the volumes a new VM `vm_id` (to be `vm`) is created with and
    /// returns the size of its disk: the boot volume's when it exists.
    /// Changes nothing; [`State::attach_new_vm_volumes`] applies them.
    pub(crate) fn check_new_vm_volumes(
        &self,
        caps: &pb::Capabilities,
        vm_id: &str,
        vm: &SimVm,
        volumes: &VmVolumes,
    ) -> Result<u32, ProviderError> {
        if volumes.boot.is_none() && volumes.data.is_empty() {
            return Ok(vm.disk_gib);
        }
        require_volumes(caps)?;
        let mut disk_gib = vm.disk_gib;
        if let Some(boot) = &volumes.boot {
            match self.volumes.get(&boot.volume_id) {
                Some(v) => {
                    if let Some((on, _)) = &v.attached {
                        return Err(invalid_state(format!(
                            "boot volume {} is attached to vm {on}",
                            boot.volume_id
                        )));
                    }
                    if caps.volumes_host_local && v.host != vm.host {
                        return Err(invalid_state(format!(
                            "boot volume {} is on host {}, the vm goes to host {}",
                            boot.volume_id, v.host, vm.host
                        )));
                    }
                    disk_gib = v.size_gib;
                }
                None => {
                    self.storage_of(&boot.storage)?;
                    if vm.disk_gib == 0 {
                        return Err(ProviderError::new(
                            ErrorKind::InvalidArgument,
                            "disk_gib must be at least 1 to create a boot volume",
                        ));
                    }
                }
            }
        }
        let mut slots = std::collections::BTreeSet::new();
        for d in &volumes.data {
            if d.slot == 0 {
                return Err(ProviderError::new(ErrorKind::InvalidArgument, "slot 0 is the boot disk"));
            }
            if !slots.insert(d.slot) {
                return Err(ProviderError::new(
                    ErrorKind::InvalidArgument,
                    format!("slot {} is given twice", d.slot),
                ));
            }
            if volumes.boot.as_ref().is_some_and(|b| b.volume_id == d.volume_id)
                || volumes.data.iter().filter(|o| o.volume_id == d.volume_id).count() > 1
            {
                return Err(ProviderError::new(
                    ErrorKind::InvalidArgument,
                    format!("volume {} is given twice", d.volume_id),
                ));
            }
            self.check_attach(caps, &d.volume_id, vm_id, vm, d.slot)?;
        }
        Ok(disk_gib)
    }

    /// Applies what [`State::check_new_vm_volumes`] accepted: creates a
    /// missing boot volume (from the image, at the disk's size) and
    /// attaches everything.
    pub(crate) fn attach_new_vm_volumes(
        &mut self,
        vm_id: &str,
        vm: &SimVm,
        volumes: &VmVolumes,
        host_local: bool,
    ) {
        if let Some(boot) = &volumes.boot {
            if !self.volumes.contains_key(&boot.volume_id) {
                let storage = self.storage_of(&boot.storage).unwrap_or_else(|_| DEFAULT_STORAGE.to_owned());
                let volume = SimVolume {
                    native_id: self.next_volume_native(&storage),
                    size_gib: vm.disk_gib,
                    host: if host_local { vm.host.clone() } else { String::new() },
                    attached: None,
                };
                self.new_volume(&boot.volume_id, volume);
            }
            if let Some(v) = self.volumes.get_mut(&boot.volume_id) {
                v.attached = Some((vm_id.to_owned(), 0));
            }
        }
        for d in &volumes.data {
            if let Some(v) = self.volumes.get_mut(&d.volume_id) {
                v.attached = Some((vm_id.to_owned(), d.slot));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hcp_provider_sdk::{ErrorKind, Provider, pb};

    use super::*;
    use crate::{ActiveFault, Sim, SimConfig, parse_capabilities, sim};

    const VM: &str = "0190b5f2-0000-7000-8000-0000000000a1";
    const OTHER_VM: &str = "0190b5f2-0000-7000-8000-0000000000a2";
    const VOL: &str = "0190b5f2-0000-7000-8000-0000000000b1";
    const VOL2: &str = "0190b5f2-0000-7000-8000-0000000000b2";
    const BOOT: &str = "0190b5f2-0000-7000-8000-0000000000b3";

    fn sim_with(caps: &str) -> Sim {
        Sim::new(&SimConfig { capabilities: parse_capabilities(caps).unwrap(), ..Default::default() })
    }

    fn full() -> Sim {
        Sim::new(&SimConfig::default())
    }

    fn create_vm(id: &str, host: &str) -> pb::CreateVmRequest {
        pb::CreateVmRequest {
            vm_id: id.into(),
            spec: Some(pb::VmSpec {
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                host: host.into(),
                ..Default::default()
            }),
            start: false,
        }
    }

    fn volume(id: &str, size_gib: u32) -> pb::CreateVolumeRequest {
        pb::CreateVolumeRequest {
            volume_id: id.into(),
            spec: Some(pb::VolumeSpec { name: "data".into(), size_gib, ..Default::default() }),
        }
    }

    fn attach(volume_id: &str, vm_id: &str, slot: u32) -> pb::AttachVolumeRequest {
        pb::AttachVolumeRequest { volume_id: volume_id.into(), vm_id: vm_id.into(), slot }
    }

    fn detach(volume_id: &str, vm_id: &str) -> pb::DetachVolumeRequest {
        pb::DetachVolumeRequest { volume_id: volume_id.into(), vm_id: vm_id.into() }
    }

    fn extend(size_gib: u32) -> pb::ExtendVolumeRequest {
        pb::ExtendVolumeRequest { volume_id: VOL.into(), size_gib }
    }

    fn kind<T: std::fmt::Debug>(r: Result<T, ProviderError>) -> ErrorKind {
        r.unwrap_err().kind
    }

    fn creations(sim: &Sim, id: &str) -> u32 {
        sim.lock().volume_creations.get(id).copied().unwrap_or_default()
    }

    #[tokio::test]
    async fn create_is_idempotent_and_get_and_list_show_the_volume() {
        let sim = full();
        let a = sim.create_volume(volume(VOL, 5)).await.unwrap();
        // The repeat returns the volume as it is, whatever it asks for.
        let b = sim.create_volume(volume(VOL, 7)).await.unwrap();
        assert_eq!(a, b);
        assert_eq!((a.volume_id.as_str(), a.size_gib, a.vm_id.as_str(), a.host.as_str()), (VOL, 5, "", ""));
        assert_eq!(creations(&sim, VOL), 1);
        assert_eq!(sim.get_volume(VOL).await.unwrap(), a);
        assert_eq!(kind(sim.get_volume(VOL2).await), ErrorKind::NotFound);
        sim.create_volume(volume(VOL2, 1)).await.unwrap();
        let first = sim
            .list_volumes(pb::ListVolumesRequest { page_size: 1, page_token: String::new() })
            .await
            .unwrap();
        assert_eq!(first.volumes.len(), 1);
        let rest = sim
            .list_volumes(pb::ListVolumesRequest { page_size: 1, page_token: first.next_page_token })
            .await
            .unwrap();
        let ids: Vec<_> = first.volumes.iter().chain(&rest.volumes).map(|v| v.volume_id.as_str()).collect();
        assert_eq!(ids, [VOL, VOL2]);
        assert!(rest.next_page_token.is_empty());
        let mut unknown = volume(VOL2, 1);
        unknown.volume_id = BOOT.into();
        unknown.spec.as_mut().unwrap().storage = "nowhere".into();
        assert_eq!(kind(sim.create_volume(unknown).await), ErrorKind::InvalidArgument);
    }

    #[tokio::test]
    async fn attach_is_idempotent_and_refuses_another_vm_a_taken_slot_and_a_slot_too_far() {
        let sim = full();
        sim.create_vm(create_vm(VM, "")).await.unwrap();
        sim.create_vm(create_vm(OTHER_VM, "")).await.unwrap();
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        sim.create_volume(volume(VOL2, 5)).await.unwrap();
        for _ in 0..2 {
            let v = sim.attach_volume(attach(VOL, VM, 1)).await.unwrap();
            assert_eq!((v.vm_id.as_str(), v.slot), (VM, 1));
        }
        assert_eq!(kind(sim.attach_volume(attach(VOL, OTHER_VM, 1)).await), ErrorKind::InvalidState);
        assert_eq!(kind(sim.attach_volume(attach(VOL, VM, 2)).await), ErrorKind::InvalidState);
        assert_eq!(kind(sim.attach_volume(attach(VOL2, VM, 1)).await), ErrorKind::InvalidState);
        assert_eq!(kind(sim.attach_volume(attach(VOL2, VM, 17)).await), ErrorKind::InvalidArgument);
        assert_eq!(kind(sim.attach_volume(attach(BOOT, VM, 2)).await), ErrorKind::NotFound);
        let ghost = "0190b5f2-0000-7000-8000-0000000000ff";
        assert_eq!(kind(sim.attach_volume(attach(VOL2, ghost, 2)).await), ErrorKind::NotFound);
        // Every refusal left the volumes as they were.
        assert_eq!(sim.get_volume(VOL).await.unwrap().slot, 1);
        assert!(sim.get_volume(VOL2).await.unwrap().vm_id.is_empty());
        let v = sim.attach_volume(attach(VOL2, VM, 16)).await.unwrap();
        assert_eq!(v.slot, 16);
    }

    #[tokio::test]
    async fn detach_of_a_volume_not_attached_or_gone_succeeds() {
        let sim = full();
        sim.create_vm(create_vm(VM, "")).await.unwrap();
        sim.create_vm(create_vm(OTHER_VM, "")).await.unwrap();
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        sim.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        // Not attached to that VM: nothing to do, the attachment stays.
        assert_eq!(sim.detach_volume(detach(VOL, OTHER_VM)).await.unwrap().vm_id, VM);
        for _ in 0..2 {
            let v = sim.detach_volume(detach(VOL, VM)).await.unwrap();
            assert!(v.vm_id.is_empty() && v.slot == 0, "{v:?}");
        }
        let gone = sim.detach_volume(detach(VOL2, VM)).await.unwrap();
        assert_eq!(gone.volume_id, VOL2);
    }

    #[tokio::test]
    async fn hot_attach_follows_its_flag() {
        let cold = sim_with("volumes");
        cold.create_vm(create_vm(VM, "")).await.unwrap();
        cold.create_volume(volume(VOL, 5)).await.unwrap();
        cold.start_vm(VM).await.unwrap();
        assert_eq!(kind(cold.attach_volume(attach(VOL, VM, 1)).await), ErrorKind::InvalidState);
        cold.stop_vm(pb::StopVmRequest { vm_id: VM.into(), force: true, timeout_seconds: 0 }).await.unwrap();
        cold.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        cold.start_vm(VM).await.unwrap();
        // Already attached succeeds even so: nothing changes.
        cold.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        assert_eq!(kind(cold.detach_volume(detach(VOL, VM)).await), ErrorKind::InvalidState);
        assert_eq!(cold.get_volume(VOL).await.unwrap().vm_id, VM);

        let hot = full();
        hot.create_vm(create_vm(VM, "")).await.unwrap();
        hot.create_volume(volume(VOL, 5)).await.unwrap();
        hot.start_vm(VM).await.unwrap();
        hot.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        assert!(hot.detach_volume(detach(VOL, VM)).await.unwrap().vm_id.is_empty());
    }

    #[tokio::test]
    async fn extend_only_grows_and_in_use_follows_its_flag() {
        let sim = sim_with("volumes,hot_attach");
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        assert_eq!(sim.extend_volume(extend(8)).await.unwrap().size_gib, 8);
        assert_eq!(sim.extend_volume(extend(8)).await.unwrap().size_gib, 8);
        assert_eq!(kind(sim.extend_volume(extend(7)).await), ErrorKind::InvalidArgument);
        sim.create_vm(create_vm(VM, "")).await.unwrap();
        sim.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        // Attached to a stopped VM: supports_volumes is enough.
        sim.extend_volume(extend(9)).await.unwrap();
        sim.start_vm(VM).await.unwrap();
        assert_eq!(kind(sim.extend_volume(extend(10)).await), ErrorKind::InvalidState);
        // Reached already: succeeds even in use.
        sim.extend_volume(extend(9)).await.unwrap();
        assert_eq!(sim.get_volume(VOL).await.unwrap().size_gib, 9);

        let in_use = full();
        in_use.create_vm(create_vm(VM, "")).await.unwrap();
        in_use.create_volume(volume(VOL, 5)).await.unwrap();
        in_use.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        in_use.start_vm(VM).await.unwrap();
        assert_eq!(in_use.extend_volume(extend(10)).await.unwrap().size_gib, 10);
    }

    #[tokio::test]
    async fn delete_refuses_an_attached_volume_and_answers_whether_it_existed() {
        let sim = full();
        sim.create_vm(create_vm(VM, "")).await.unwrap();
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        sim.attach_volume(attach(VOL, VM, 1)).await.unwrap();
        assert_eq!(kind(sim.delete_volume(VOL).await), ErrorKind::InvalidState);
        sim.detach_volume(detach(VOL, VM)).await.unwrap();
        assert!(sim.delete_volume(VOL).await.unwrap());
        assert!(!sim.delete_volume(VOL).await.unwrap());
        assert_eq!(kind(sim.get_volume(VOL).await), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn delete_vm_leaves_its_volumes_behind_detached() {
        let sim = full();
        sim.create_vm(create_vm(VM, "")).await.unwrap();
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        sim.attach_volume(attach(VOL, VM, 3)).await.unwrap();
        assert!(sim.delete_vm(VM).await.unwrap());
        let v = sim.get_volume(VOL).await.unwrap();
        assert!(v.vm_id.is_empty() && v.slot == 0 && v.size_gib == 5, "{v:?}");
        // Free again for another VM, at any slot.
        sim.create_vm(create_vm(OTHER_VM, "")).await.unwrap();
        sim.attach_volume(attach(VOL, OTHER_VM, 1)).await.unwrap();
    }

    #[tokio::test]
    async fn a_boot_volume_is_made_from_the_image_once_and_booted_as_is_after() {
        let sim = full();
        let boot = VmVolumes {
            boot: Some(BootVolume { volume_id: BOOT.into(), storage: String::new() }),
            data: Vec::new(),
        };
        let vm = sim.create_vm_with(create_vm(VM, ""), boot.clone()).await.unwrap();
        // Repeated: the same VM, the same volume.
        let again = sim.create_vm_with(create_vm(VM, ""), boot.clone()).await.unwrap();
        assert_eq!(vm.native_id, again.native_id);
        let v = sim.get_volume(BOOT).await.unwrap();
        assert_eq!((v.vm_id.as_str(), v.slot, v.size_gib), (VM, 0, 10));
        assert_eq!(creations(&sim, BOOT), 1);
        // The boot disk cannot be detached from its VM; DeleteVm frees it.
        assert_eq!(kind(sim.detach_volume(detach(BOOT, VM)).await), ErrorKind::InvalidState);
        // It is not free for another VM while its own exists.
        assert_eq!(
            kind(sim.create_vm_with(create_vm(OTHER_VM, ""), boot.clone()).await),
            ErrorKind::InvalidState
        );
        assert!(!sim.lock().vms.contains_key(OTHER_VM), "a refused create makes nothing");
        // Grown through the VM, and directly.
        sim.resize_vm(pb::ResizeVmRequest { vm_id: VM.into(), vcpus: 1, memory_mib: 512, disk_gib: 12 })
            .await
            .unwrap();
        assert_eq!(sim.get_volume(BOOT).await.unwrap().size_gib, 12);
        sim.delete_vm(VM).await.unwrap();
        let left = sim.get_volume(BOOT).await.unwrap();
        assert!(left.vm_id.is_empty() && left.size_gib == 12, "{left:?}");
        // Another VM boots from it as it is: its size, not the spec's.
        let reborn = sim.create_vm_with(create_vm(OTHER_VM, ""), boot).await.unwrap();
        assert_eq!(reborn.disk_gib, 12);
        assert_eq!(sim.get_volume(BOOT).await.unwrap().vm_id, OTHER_VM);
        assert_eq!(creations(&sim, BOOT), 1, "booted as is, never made again");
    }

    #[tokio::test]
    async fn volumes_given_at_create_are_attached_or_the_create_makes_nothing() {
        let sim = full();
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        sim.create_volume(volume(VOL2, 5)).await.unwrap();
        let with = |data: Vec<(&str, u32)>| VmVolumes {
            boot: Some(BootVolume { volume_id: BOOT.into(), storage: String::new() }),
            data: data.into_iter().map(|(v, slot)| VolumeSlot { volume_id: v.into(), slot }).collect(),
        };
        // A taken slot, a slot given twice, a missing volume: nothing made,
        // the boot volume included.
        for bad in [vec![(VOL, 1), (VOL2, 1)], vec![(VOL, 0)], vec![(OTHER_VM, 2)], vec![(VOL, 40)]] {
            sim.create_vm_with(create_vm(VM, ""), with(bad.clone())).await.unwrap_err();
            assert!(sim.lock().vms.is_empty(), "{bad:?}");
            assert_eq!(creations(&sim, BOOT), 0, "{bad:?}");
        }
        sim.create_vm_with(create_vm(VM, ""), with(vec![(VOL, 1), (VOL2, 2)])).await.unwrap();
        let slots: Vec<_> =
            [BOOT, VOL, VOL2].iter().map(|id| sim.lock().volumes[*id].attached.clone()).collect();
        assert_eq!(slots, [Some((VM.into(), 0)), Some((VM.into(), 1)), Some((VM.into(), 2))]);
    }

    #[tokio::test]
    async fn host_local_volumes_attach_only_to_vms_on_their_host() {
        let sim = sim_with("volumes,volumes_host_local,cold_migration");
        let mut on_2 = volume(VOL, 5);
        on_2.spec.as_mut().unwrap().host = "sim-host-2".into();
        assert_eq!(sim.create_volume(on_2).await.unwrap().host, "sim-host-2");
        let mut nowhere = volume(VOL2, 5);
        nowhere.spec.as_mut().unwrap().host = "sim-host-9".into();
        assert_eq!(kind(sim.create_volume(nowhere).await), ErrorKind::InvalidArgument);
        sim.create_vm(create_vm(VM, "sim-host-1")).await.unwrap();
        sim.create_vm(create_vm(OTHER_VM, "sim-host-2")).await.unwrap();
        assert_eq!(kind(sim.attach_volume(attach(VOL, VM, 1)).await), ErrorKind::InvalidState);
        sim.attach_volume(attach(VOL, OTHER_VM, 1)).await.unwrap();
        // Its VM cannot leave the host while the volume is attached.
        let mv =
            pb::MigrateVmRequest { vm_id: OTHER_VM.into(), target_host: "sim-host-1".into(), live: false };
        assert_eq!(kind(sim.migrate_vm(mv.clone()).await), ErrorKind::InvalidState);
        sim.detach_volume(detach(VOL, OTHER_VM)).await.unwrap();
        sim.migrate_vm(mv).await.unwrap();
        // A boot volume made at create is on the VM's host.
        let boot = VmVolumes {
            boot: Some(BootVolume { volume_id: BOOT.into(), storage: String::new() }),
            data: Vec::new(),
        };
        let third = "0190b5f2-0000-7000-8000-0000000000a3";
        sim.create_vm_with(create_vm(third, "sim-host-3"), boot).await.unwrap();
        assert_eq!(sim.get_volume(BOOT).await.unwrap().host, "sim-host-3");
    }

    #[tokio::test]
    async fn without_volumes_every_volume_call_is_unsupported() {
        let sim = sim_with("resize");
        assert_eq!(kind(sim.create_volume(volume(VOL, 1)).await), ErrorKind::Unsupported);
        assert_eq!(kind(sim.get_volume(VOL).await), ErrorKind::Unsupported);
        assert_eq!(kind(sim.list_volumes(pb::ListVolumesRequest::default()).await), ErrorKind::Unsupported);
        assert_eq!(kind(sim.extend_volume(extend(2)).await), ErrorKind::Unsupported);
        assert_eq!(kind(sim.attach_volume(attach(VOL, VM, 1)).await), ErrorKind::Unsupported);
        assert_eq!(kind(sim.detach_volume(detach(VOL, VM)).await), ErrorKind::Unsupported);
        assert_eq!(kind(sim.delete_volume(VOL).await), ErrorKind::Unsupported);
        let boot = VmVolumes {
            boot: Some(BootVolume { volume_id: BOOT.into(), storage: String::new() }),
            data: Vec::new(),
        };
        assert_eq!(kind(sim.create_vm_with(create_vm(VM, ""), boot).await), ErrorKind::Unsupported);
    }

    fn arm(sim: &Sim, operation: &str, after_effect: bool) {
        sim.lock().faults.push(ActiveFault {
            fault: sim::Fault {
                operation: operation.into(),
                code: "UNAVAILABLE".into(),
                count: 1,
                message: String::new(),
                after_effect,
            },
            left: Some(1),
        });
    }

    #[tokio::test]
    async fn faults_hit_volume_calls_before_or_after_their_effect_and_retries_converge() {
        let sim = full();
        arm(&sim, "CreateVolume", false);
        assert_eq!(kind(sim.create_volume(volume(VOL, 5)).await), ErrorKind::Unavailable);
        assert_eq!(creations(&sim, VOL), 0, "failed before the effect: nothing made");
        arm(&sim, "CreateVolume", true);
        assert_eq!(kind(sim.create_volume(volume(VOL, 5)).await), ErrorKind::Unavailable);
        assert_eq!(creations(&sim, VOL), 1, "the reply was lost, the volume made");
        sim.create_volume(volume(VOL, 5)).await.unwrap();
        assert_eq!(creations(&sim, VOL), 1, "the retry found it");

        sim.create_vm(create_vm(VM, "")).await.unwrap();
        arm(&sim, "AttachVolume", true);
        sim.attach_volume(attach(VOL, VM, 1)).await.unwrap_err();
        assert_eq!(sim.attach_volume(attach(VOL, VM, 1)).await.unwrap().vm_id, VM);
        arm(&sim, "ExtendVolume", true);
        sim.extend_volume(extend(6)).await.unwrap_err();
        assert_eq!(sim.extend_volume(extend(6)).await.unwrap().size_gib, 6);
        arm(&sim, "DetachVolume", true);
        sim.detach_volume(detach(VOL, VM)).await.unwrap_err();
        assert!(sim.detach_volume(detach(VOL, VM)).await.unwrap().vm_id.is_empty());
        arm(&sim, "DeleteVolume", true);
        sim.delete_volume(VOL).await.unwrap_err();
        assert!(!sim.delete_volume(VOL).await.unwrap(), "the first delete did it");
        arm(&sim, "ListVolumes", false);
        sim.list_volumes(pb::ListVolumesRequest::default()).await.unwrap_err();
        arm(&sim, "GetVolume", false);
        sim.get_volume(VOL).await.unwrap_err();
        let s = sim.lock();
        assert_eq!(s.calls["CreateVolume"], 3);
        assert_eq!((s.calls["AttachVolume"], s.calls["DeleteVolume"], s.calls["GetVolume"]), (2, 2, 1));
    }

    #[test]
    fn out_of_band_changes_keep_the_hypervisors_own_rules() {
        let sim = full();
        let mut s = sim.lock();
        s.add_unknown_volume(VOL, 3, String::new());
        s.add_unknown_volume(VOL2, 3, String::new());
        assert!(s.set_attachment(VOL, VM, 1).is_err(), "no such vm");
        drop(s);
        let caps = sim.capabilities.clone();
        let mut s = sim.lock();
        s.vms.insert(
            VM.into(),
            crate::SimVm {
                native_id: "sim-x".into(),
                power: pb::PowerState::Running,
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                nics: Vec::new(),
                host: String::new(),
                ..crate::SimVm::default()
            },
        );
        // Running and hot attach aside, the slot must be free.
        s.set_attachment(VOL, VM, 1).unwrap();
        assert_eq!(s.set_attachment(VOL2, VM, 1).unwrap_err().kind, ErrorKind::InvalidState);
        s.set_attachment(VOL, "", 0).unwrap();
        assert!(s.get_volume(&caps, VOL).unwrap().vm_id.is_empty());
        assert!(s.volume_creations.is_empty(), "HCP never created them");
    }
}
