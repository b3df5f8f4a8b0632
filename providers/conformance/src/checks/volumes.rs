//! Volumes (`supports_volumes`): create, get and list, each create repeated
//! to prove idempotency; extend; attach and detach at a slot, repeated, with
//! the refusals around them (another VM, a taken slot, delete while
//! attached); hot attach as `supports_hot_attach` says and extend in use as
//! `supports_volume_extend_in_use` says; DeleteVm leaving its volumes
//! behind; and the cleanup that proves every volume the kit made is gone
//! from ListVolumes and, with [`crate::Hooks`], from the hypervisor.
//!
//! Each check works on volumes and VMs of its own, so one failure does not
//! hide the others; the attach group shares one volume and names the step
//! that blocked it.

use hcp_proto::provider::{
    AttachVolumeRequest, CreateVmRequest, CreateVolumeRequest, DetachVolumeRequest, ExtendVolumeRequest,
    HostState, ListHostsRequest, ListVolumesRequest, StopVmRequest, VmRef, VolumeInfo, VolumeRef, VolumeSpec,
};

use crate::kit::{CheckError, CheckResult, Kit, call, ensure, expect_code, hook};

const CREATE: &str = "volumes: create is idempotent, GetVolume and ListVolumes show it";
const EXTEND: &str = "volumes: extend grows, the same size succeeds, a smaller one is INVALID_ARGUMENT";
const ATTACH: &str = "volumes: attach to a stopped VM at slot 1 (repeated), GetVolume shows it; \
                      another VM or a taken slot is FAILED_PRECONDITION";
const DELETE_ATTACHED: &str = "volumes: DeleteVolume of an attached volume is FAILED_PRECONDITION";
const DETACH: &str = "volumes: detach (repeated) leaves the volume detached";
const HOT: &str = "volumes: hot attach and detach on a running VM";
const HOT_REFUSED: &str = "volumes: attach to a running VM refused without supports_hot_attach";
const IN_USE: &str = "volumes: extend while attached to a running VM";
const IN_USE_REFUSED: &str = "volumes: extend in use refused without supports_volume_extend_in_use";
const DELETE_VM: &str = "volumes: DeleteVm leaves an attached volume behind, detached";
const BOOT: &str = "volumes: a boot volume is at slot 0 and survives DeleteVm";
/// The cleanup's check, recorded by the runner after every other check.
pub(crate) const CLEANUP: &str = "volumes: cleanup deletes every volume (again: existed=false); \
                                  none left in ListVolumes or on the hypervisor";

impl Kit {
    /// Every volume check, or, without `supports_volumes`, each skipped with
    /// the reason and CreateVolume checked to be UNIMPLEMENTED.
    pub(crate) async fn volumes(&mut self) {
        let caps = self.caps.clone();
        if !caps.supports_volumes {
            let why = "the provider does not declare supports_volumes";
            for name in
                [CREATE, EXTEND, ATTACH, DELETE_ATTACHED, DETACH, HOT, IN_USE, DELETE_VM, BOOT, CLEANUP]
            {
                self.skip(name, why);
            }
            let req = CreateVolumeRequest {
                volume_id: uuid::Uuid::now_v7().to_string(),
                spec: Some(VolumeSpec { name: "conf".into(), size_gib: 1, ..Default::default() }),
            };
            let r = expect_code(
                self.compute.create_volume(req).await,
                tonic::Code::Unimplemented,
                "CreateVolume without supports_volumes",
            );
            self.record("volumes refused as UNIMPLEMENTED", r);
            return;
        }
        if caps.volumes_host_local {
            // Host-local volumes and the VMs they attach to share one host.
            match self.first_up_host().await {
                Ok(host) => self.volume_host = host,
                Err(e) => {
                    self.record(CREATE, Err(e));
                    return;
                }
            }
        }
        let r = self.volume_create_get_list().await;
        self.record(CREATE, r);
        let r = self.volume_extend().await;
        self.record(EXTEND, r);
        match self.volume_attach().await {
            Ok((volume, vm)) => {
                self.record(ATTACH, Ok(()));
                let r = expect_code(
                    self.compute.delete_volume(VolumeRef { volume_id: volume.clone() }).await,
                    tonic::Code::FailedPrecondition,
                    "DeleteVolume of an attached volume",
                );
                self.record(DELETE_ATTACHED, r);
                let r = self.volume_detach(&volume, &vm).await;
                self.record(DETACH, r);
            }
            Err(e) => {
                self.record(ATTACH, Err(e));
                self.record(DELETE_ATTACHED, Err(CheckError::Blocked { step: "AttachVolume" }));
                self.record(DETACH, Err(CheckError::Blocked { step: "AttachVolume" }));
            }
        }
        let r = self.volume_running_attach(caps.supports_hot_attach).await;
        self.record(if caps.supports_hot_attach { HOT } else { HOT_REFUSED }, r);
        if !caps.supports_hot_attach {
            self.skip(HOT, "the provider does not declare supports_hot_attach");
        }
        let r = self.volume_extend_in_use(caps.supports_volume_extend_in_use).await;
        self.record(if caps.supports_volume_extend_in_use { IN_USE } else { IN_USE_REFUSED }, r);
        if !caps.supports_volume_extend_in_use {
            self.skip(IN_USE, "the provider does not declare supports_volume_extend_in_use");
        }
        let r = self.volume_outlives_its_vm().await;
        self.record(DELETE_VM, r);
        match self.boot_volume().await {
            Ok(None) => self.skip(
                BOOT,
                "CreateVm with VmSpec.boot_volume_id answered UNIMPLEMENTED (the provider makes no boot volumes yet)",
            ),
            Ok(Some(())) => self.record(BOOT, Ok(())),
            Err(e) => self.record(BOOT, Err(e)),
        }
    }

    /// A VM created with `boot_volume_id`: the volume is listed at slot 0 on
    /// the VM and is still there, detached, after DeleteVm. `Ok(None)` when
    /// the provider answers UNIMPLEMENTED (a visible skip, not a pass).
    async fn boot_volume(&mut self) -> Result<Option<()>, CheckError> {
        let volume = uuid::Uuid::now_v7().to_string();
        let vm = uuid::Uuid::now_v7().to_string();
        let mut spec = self.spec("conf-boot", None);
        spec.host = self.volume_host.clone();
        spec.boot_volume_id = volume.clone();
        self.volumes.push(volume.clone());
        self.created.push(vm.clone());
        match self
            .compute
            .create_vm(CreateVmRequest { vm_id: vm.clone(), spec: Some(spec), start: false })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(s) => return Err(call("CreateVm with a boot volume failed")(s)),
        }
        let boot = self.get_volume(&volume).await?;
        ensure(boot.vm_id == vm && boot.slot == 0, || {
            format!("GetVolume of the boot volume answers {boot:?}, not attached to {vm} at slot 0")
        })?;
        self.compute.delete_vm(VmRef { vm_id: vm.clone() }).await.map_err(call("DeleteVm failed"))?;
        let listed = self.listed_once(&volume).await.map_err(|e| match e {
            CheckError::Violation(m) => CheckError::Violation(format!("DeleteVm took its boot volume: {m}")),
            other => other,
        })?;
        ensure(listed.vm_id.is_empty(), || format!("after DeleteVm the boot volume reads {listed:?}"))?;
        Ok(Some(()))
    }

    /// Detaches and deletes every volume the kit made (each delete
    /// repeated: the second answers existed=false) and proves them gone.
    /// Nothing to do, and no check, without `supports_volumes`.
    pub(crate) async fn volume_cleanup(&mut self) {
        if self.caps.supports_volumes {
            let r = self.delete_kit_volumes().await;
            self.record(CLEANUP, r);
        }
    }

    /// The first host `ListHosts` reports up; empty when the provider
    /// reports no hosts.
    async fn first_up_host(&mut self) -> Result<String, CheckError> {
        match self.compute.list_hosts(ListHostsRequest {}).await {
            Ok(r) => Ok(r
                .into_inner()
                .hosts
                .into_iter()
                .find(|h| HostState::try_from(h.state) == Ok(HostState::HostUp))
                .map(|h| h.name)
                .unwrap_or_default()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(String::new()),
            Err(s) => Err(call("ListHosts for the volumes' host")(s)),
        }
    }

    fn volume_spec(&self, name: &str, size_gib: u32) -> VolumeSpec {
        VolumeSpec {
            name: name.to_owned(),
            size_gib,
            storage: String::new(),
            host: self.volume_host.clone(),
            labels: [("hcp.conformance".to_owned(), "true".to_owned())].into_iter().collect(),
        }
    }

    /// Creates a volume (remembered for the cleanup).
    async fn new_volume(&mut self, name: &str, size_gib: u32) -> Result<(String, VolumeInfo), CheckError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.volumes.push(id.clone());
        let req = CreateVolumeRequest { volume_id: id.clone(), spec: Some(self.volume_spec(name, size_gib)) };
        let v = self.compute.create_volume(req).await.map_err(call("CreateVolume failed"))?.into_inner();
        Ok((id, v))
    }

    /// Creates a stopped VM where the kit's volumes can attach (their host,
    /// when volumes are host-local).
    async fn volume_vm(&mut self, name: &str) -> Result<String, CheckError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let mut spec = self.spec(name, None);
        spec.host = self.volume_host.clone();
        self.compute
            .create_vm(CreateVmRequest { vm_id: id.clone(), spec: Some(spec), start: false })
            .await
            .map_err(call("CreateVm for the volume checks failed"))?;
        Ok(id)
    }

    async fn get_volume(&mut self, id: &str) -> Result<VolumeInfo, CheckError> {
        self.compute
            .get_volume(VolumeRef { volume_id: id.to_owned() })
            .await
            .map(|r| r.into_inner())
            .map_err(call("GetVolume failed"))
    }

    async fn attach(
        &mut self,
        volume: &str,
        vm: &str,
        slot: u32,
    ) -> Result<tonic::Response<VolumeInfo>, tonic::Status> {
        let req = AttachVolumeRequest { volume_id: volume.to_owned(), vm_id: vm.to_owned(), slot };
        self.compute.attach_volume(req).await
    }

    async fn detach(&mut self, volume: &str, vm: &str) -> Result<tonic::Response<VolumeInfo>, tonic::Status> {
        let req = DetachVolumeRequest { volume_id: volume.to_owned(), vm_id: vm.to_owned() };
        self.compute.detach_volume(req).await
    }

    /// Every volume `ListVolumes` reports, all pages.
    async fn list_volumes(&mut self) -> Result<Vec<VolumeInfo>, CheckError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .compute
                .list_volumes(ListVolumesRequest { page_size: 500, page_token: token.clone() })
                .await
                .map_err(call("ListVolumes failed"))?
                .into_inner();
            out.extend(page.volumes);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// The volume as ListVolumes shows it: exactly once.
    async fn listed_once(&mut self, id: &str) -> Result<VolumeInfo, CheckError> {
        let listed: Vec<VolumeInfo> =
            self.list_volumes().await?.into_iter().filter(|v| v.volume_id == id).collect();
        ensure(listed.len() == 1, || {
            format!("ListVolumes shows volume {id} {} times; expected once", listed.len())
        })?;
        Ok(listed.into_iter().next().unwrap_or_default())
    }

    async fn volume_create_get_list(&mut self) -> CheckResult {
        ensure(self.caps.max_volumes_per_vm >= 1, || {
            "supports_volumes is declared with max_volumes_per_vm 0 (at least 1)".to_owned()
        })?;
        let (id, first) = self.new_volume("conf-vol", 1).await?;
        ensure(first.volume_id == id && first.size_gib >= 1, || {
            format!("CreateVolume of a 1 GiB volume {id} answered {first:?}")
        })?;
        let req = CreateVolumeRequest { volume_id: id.clone(), spec: Some(self.volume_spec("conf-vol", 1)) };
        let second =
            self.compute.create_volume(req).await.map_err(call("repeated CreateVolume failed"))?.into_inner();
        ensure(second.native_id == first.native_id && second.size_gib == first.size_gib, || {
            format!("repeated CreateVolume made another volume ({first:?}, then {second:?}): not idempotent")
        })?;
        let got = self.get_volume(&id).await?;
        ensure(got.volume_id == id && got.size_gib == first.size_gib && got.vm_id.is_empty(), || {
            format!("GetVolume of the new volume answered {got:?}")
        })?;
        if self.caps.volumes_host_local && !self.volume_host.is_empty() {
            ensure(got.host == self.volume_host, || {
                format!("asked for host {}, GetVolume reports {:?}", self.volume_host, got.host)
            })?;
        }
        self.listed_once(&id).await?;
        expect_code(
            self.compute.get_volume(VolumeRef { volume_id: uuid::Uuid::now_v7().to_string() }).await,
            tonic::Code::NotFound,
            "GetVolume of a volume that does not exist",
        )
    }

    async fn volume_extend(&mut self) -> CheckResult {
        let (id, v) = self.new_volume("conf-extend", 1).await?;
        let size = v.size_gib + 1;
        for attempt in ["ExtendVolume", "ExtendVolume to the size reached"] {
            let got = self
                .compute
                .extend_volume(ExtendVolumeRequest { volume_id: id.clone(), size_gib: size })
                .await
                .map_err(call(format!("{attempt} failed")))?
                .into_inner();
            ensure(got.size_gib == size, || {
                format!("{attempt} to {size} GiB answered {} GiB", got.size_gib)
            })?;
        }
        expect_code(
            self.compute
                .extend_volume(ExtendVolumeRequest { volume_id: id.clone(), size_gib: size - 1 })
                .await,
            tonic::Code::InvalidArgument,
            "ExtendVolume to a smaller size",
        )?;
        let got = self.get_volume(&id).await?;
        ensure(got.size_gib == size, || {
            format!("after the extends GetVolume says {} GiB, not {size}", got.size_gib)
        })
    }

    /// Attaches a volume to a stopped VM at slot 1 twice, then checks the
    /// refusals; returns the volume and the VM for the checks that follow.
    async fn volume_attach(&mut self) -> Result<(String, String), CheckError> {
        let (volume, _) = self.new_volume("conf-attach", 1).await?;
        let vm = self.volume_vm("conf-attach").await?;
        for attempt in ["AttachVolume", "repeated AttachVolume"] {
            let got =
                self.attach(&volume, &vm, 1).await.map_err(call(format!("{attempt} failed")))?.into_inner();
            ensure(got.vm_id == vm && got.slot == 1, || {
                format!("{attempt} at slot 1 of {vm} answered vm {:?} slot {}", got.vm_id, got.slot)
            })?;
        }
        let got = self.get_volume(&volume).await?;
        ensure(got.vm_id == vm && got.slot == 1, || {
            format!("after AttachVolume GetVolume says vm {:?} slot {}", got.vm_id, got.slot)
        })?;
        let listed = self.listed_once(&volume).await?;
        ensure(listed.vm_id == vm && listed.slot == 1, || {
            format!("after AttachVolume ListVolumes says vm {:?} slot {}", listed.vm_id, listed.slot)
        })?;
        let other = self.volume_vm("conf-attach-2").await?;
        expect_code(
            self.attach(&volume, &other, 1).await,
            tonic::Code::FailedPrecondition,
            "AttachVolume of a volume attached to another VM",
        )?;
        let (second, _) = self.new_volume("conf-attach-2", 1).await?;
        expect_code(
            self.attach(&second, &vm, 1).await,
            tonic::Code::FailedPrecondition,
            "AttachVolume at a slot another volume holds",
        )?;
        expect_code(
            self.attach(&uuid::Uuid::now_v7().to_string(), &vm, 2).await,
            tonic::Code::NotFound,
            "AttachVolume of a volume that does not exist",
        )?;
        let got = self.get_volume(&volume).await?;
        ensure(got.vm_id == vm && got.slot == 1, || {
            format!("a refused AttachVolume moved the volume: vm {:?} slot {}", got.vm_id, got.slot)
        })?;
        Ok((volume, vm))
    }

    async fn volume_detach(&mut self, volume: &str, vm: &str) -> CheckResult {
        for attempt in ["DetachVolume", "repeated DetachVolume"] {
            let got = self.detach(volume, vm).await.map_err(call(format!("{attempt} failed")))?.into_inner();
            ensure(got.vm_id.is_empty(), || {
                format!("{attempt} answered the volume attached to {:?}", got.vm_id)
            })?;
        }
        let got = self.get_volume(volume).await?;
        ensure(got.vm_id.is_empty(), || format!("after DetachVolume GetVolume says vm {:?}", got.vm_id))
    }

    /// Attach and detach on a running VM: done with `hot`, else refused as
    /// FAILED_PRECONDITION.
    async fn volume_running_attach(&mut self, hot: bool) -> CheckResult {
        let (volume, _) = self.new_volume("conf-hot", 1).await?;
        let vm = self.volume_vm("conf-hot").await?;
        self.compute.start_vm(VmRef { vm_id: vm.clone() }).await.map_err(call("StartVm failed"))?;
        if !hot {
            expect_code(
                self.attach(&volume, &vm, 1).await,
                tonic::Code::FailedPrecondition,
                "AttachVolume to a running VM without supports_hot_attach",
            )?;
            let got = self.get_volume(&volume).await?;
            return ensure(got.vm_id.is_empty(), || {
                format!("a refused hot attach attached it to {:?}", got.vm_id)
            });
        }
        if let Some(booted) = self.options.hooks.as_ref().and_then(|h| h.guest_booted(&vm)) {
            booted.await.map_err(hook("wait for the guest to boot"))?;
        }
        for attempt in ["AttachVolume to a running VM", "repeated AttachVolume to a running VM"] {
            let got =
                self.attach(&volume, &vm, 1).await.map_err(call(format!("{attempt} failed")))?.into_inner();
            ensure(got.vm_id == vm && got.slot == 1, || format!("{attempt} answered {got:?}"))?;
        }
        let got = self.detach(&volume, &vm).await.map_err(call("DetachVolume from a running VM failed"))?;
        ensure(got.get_ref().vm_id.is_empty(), || "a hot DetachVolume left the volume attached".to_owned())?;
        let running = self.get(&vm).await?;
        ensure(crate::kit::power(&running) == hcp_proto::provider::PowerState::Running, || {
            format!("hot attach and detach left the VM {:?}", crate::kit::power(&running))
        })
    }

    /// Extend of a volume attached to a running VM: done with `in_use`,
    /// else refused as FAILED_PRECONDITION and left as it was.
    async fn volume_extend_in_use(&mut self, in_use: bool) -> CheckResult {
        let (volume, v) = self.new_volume("conf-in-use", 1).await?;
        let vm = self.volume_vm("conf-in-use").await?;
        self.attach(&volume, &vm, 1).await.map_err(call("AttachVolume to a stopped VM failed"))?;
        self.compute.start_vm(VmRef { vm_id: vm.clone() }).await.map_err(call("StartVm failed"))?;
        let req = ExtendVolumeRequest { volume_id: volume.clone(), size_gib: v.size_gib + 1 };
        let r = self.compute.extend_volume(req).await;
        let want = if in_use {
            r.map_err(call("ExtendVolume of a volume in use failed"))?;
            v.size_gib + 1
        } else {
            expect_code(
                r,
                tonic::Code::FailedPrecondition,
                "ExtendVolume in use without supports_volume_extend_in_use",
            )?;
            v.size_gib
        };
        let got = self.get_volume(&volume).await?;
        ensure(got.size_gib == want, || {
            format!("after ExtendVolume in use GetVolume says {} GiB, not {want}", got.size_gib)
        })
    }

    /// DeleteVm of a VM with a volume attached: the volume stays, detached,
    /// with its size.
    async fn volume_outlives_its_vm(&mut self) -> CheckResult {
        let (volume, v) = self.new_volume("conf-outlives", 1).await?;
        let vm = self.volume_vm("conf-outlives").await?;
        self.attach(&volume, &vm, 1).await.map_err(call("AttachVolume failed"))?;
        self.compute.delete_vm(VmRef { vm_id: vm.clone() }).await.map_err(call("DeleteVm failed"))?;
        let listed = self.listed_once(&volume).await.map_err(|e| match e {
            CheckError::Violation(m) => {
                CheckError::Violation(format!("DeleteVm took the volume with it: {m}"))
            }
            other => other,
        })?;
        ensure(listed.vm_id.is_empty() && listed.size_gib == v.size_gib, || {
            format!("after DeleteVm of its VM ListVolumes shows the volume as {listed:?}")
        })
    }

    async fn delete_kit_volumes(&mut self) -> CheckResult {
        let ids = std::mem::take(&mut self.volumes);
        let mut left = Vec::new();
        let mut loud = Vec::new();
        for id in &ids {
            if let Err(e) = self.delete_one_volume(id).await {
                left.push(format!("{id} ({})", hcp_telemetry::error_chain(&e)));
                continue;
            }
            match self.compute.delete_volume(VolumeRef { volume_id: id.clone() }).await {
                Ok(r) if r.get_ref().existed => loud.push(id.clone()),
                Ok(_) => {}
                Err(s) => left.push(format!("{id} (repeated DeleteVolume: {:?} {})", s.code(), s.message())),
            }
        }
        ensure(left.is_empty(), || format!("could not delete: {}", left.join(", ")))?;
        ensure(loud.is_empty(), || {
            format!("DeleteVolume of a deleted volume answered existed=true: {loud:?}")
        })?;
        let listed = self.list_volumes().await?;
        let still: Vec<&String> =
            ids.iter().filter(|id| listed.iter().any(|v| v.volume_id == **id)).collect();
        ensure(still.is_empty(), || format!("after cleanup, the provider still lists volumes {still:?}"))?;
        if let Some(look) = self.options.hooks.as_ref().and_then(|h| h.hypervisor_volume_ids()) {
            let on_hypervisor = look.await.map_err(hook("look at the hypervisor's volumes"))?;
            let still: Vec<&String> = ids.iter().filter(|id| on_hypervisor.contains(id)).collect();
            ensure(still.is_empty(), || {
                format!(
                    "after cleanup, the hypervisor still holds volumes {still:?} (the provider no longer lists them)"
                )
            })?;
        }
        Ok(())
    }

    /// Detaches volume `id` if attached (its VM stopped first, or deleted
    /// when the volume is its boot disk) and deletes it.
    async fn delete_one_volume(&mut self, id: &str) -> CheckResult {
        let v = match self.compute.get_volume(VolumeRef { volume_id: id.to_owned() }).await {
            Ok(v) => v.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(call("GetVolume")(s)),
        };
        if !v.vm_id.is_empty() {
            let vm = v.vm_id.clone();
            let _ = self
                .compute
                .stop_vm(StopVmRequest { vm_id: vm.clone(), force: true, timeout_seconds: 0 })
                .await;
            if v.slot == 0 {
                self.compute.delete_vm(VmRef { vm_id: vm }).await.map_err(call("DeleteVm of its boot VM"))?;
            } else {
                self.detach(id, &vm).await.map_err(call("DetachVolume"))?;
            }
        }
        self.compute
            .delete_volume(VolumeRef { volume_id: id.to_owned() })
            .await
            .map_err(call("DeleteVolume"))?;
        Ok(())
    }
}
