//! Volumes on vSphere, against vcsim (govmomi 0.24.2 with HCP's overlay,
//! built by `scripts/vcsim.sh`): a volume is a disk file in the datastore's
//! `hcp-volumes` folder that outlives the VMs it is attached to. What the
//! provider says is checked against vcsim's own inventory, read over SOAP
//! in a separate session: the datastore browser's files and the VMs'
//! device lists.

use hcp_provider_sdk::{ErrorKind, Provider, pb};
use hcp_provider_vsphere::Vsphere;
use hcp_provider_vsphere::config::Config;
use hcp_provider_vsphere::soap::{Soap, VIM25};
use hcp_provider_vsphere::vim::{self, MoRef};
use hcp_testkit::vcsim::{Vcsim, VcsimOptions, present_or_skip};

mod crashing;
use crashing::Crashing;

const TIMING: &str = "[timing]\nretry_base_ms = 10\nretry_attempts = 3\nrequest_timeout_seconds = 5\ntask_timeout_seconds = 60\n";

const GIB_KB: i64 = 1 << 20;

async fn vcsim() -> Option<Vcsim> {
    if !present_or_skip("vsphere volume test") {
        return None;
    }
    Some(Vcsim::start(VcsimOptions::default()).await.expect("vcsim starts"))
}

async fn provider(sim: &Vcsim) -> Vsphere {
    let p = Vsphere::new(Config::from_toml(&sim.provider_toml(TIMING)).unwrap()).await.unwrap();
    p.configure(
        [("username".to_owned(), "hcp".to_owned()), ("password".to_owned(), "secret".to_owned())].into(),
    )
    .await
    .unwrap();
    p
}

/// A separate vim25 session for looking at vCenter the test's own way.
async fn look(sim: &Vcsim) -> Soap {
    let soap = Soap::new(&sim.url, &hcp_tls::Trust::Ca(sim.ca_pem.clone().into_bytes()), Default::default())
        .unwrap();
    soap.set_credentials("look".into(), "x".into()).await;
    soap
}

async fn find(soap: &Soap, path: &str) -> MoRef {
    let si = soap.content().await.unwrap().search_index.clone();
    let req = vim::FindByInventoryPath { xmlns: VIM25, this: &si, inventory_path: path };
    let found: Option<MoRef> = soap.invoke("FindByInventoryPath", &req, true).await.unwrap();
    found.unwrap_or_else(|| panic!("{path} is in vcsim's inventory"))
}

async fn property(soap: &Soap, obj: &MoRef, path: &str) -> Option<vim::Xml> {
    let pc = soap.content().await.unwrap().property_collector.clone();
    let req = vim::RetrievePropertiesEx {
        xmlns: VIM25,
        this: &pc,
        spec_set: vec![vim::PropertyFilterSpec::one(obj, &[path])],
        options: vim::RetrieveOptions { max_objects: 1 },
    };
    let r: vim::RetrieveResult = soap.invoke("RetrievePropertiesEx", &req, true).await.unwrap();
    r.objects.into_iter().next().and_then(|o| o.prop(path).cloned())
}

/// The disk files in LocalDS_0's `hcp-volumes` folder, by the datastore
/// browser: (name, capacity in KB).
async fn volume_files(soap: &Soap) -> Vec<(String, i64)> {
    let ds = find(soap, "DC0/datastore/LocalDS_0").await;
    let browser = MoRef::from_xml_ref(&property(soap, &ds, "browser").await.unwrap());
    let req = vim::SearchDatastore {
        xmlns: VIM25,
        this: &browser,
        datastore_path: "[LocalDS_0] hcp-volumes",
        search_spec: vim::SearchSpec::disks("*.vmdk"),
    };
    match soap.task_xml("SearchDatastore_Task", &req).await {
        Ok(r) => r
            .map(|r| vim::disk_files(&r))
            .unwrap_or_default()
            .into_iter()
            .map(|f| (f.path, f.capacity_kb))
            .collect(),
        Err(e) if e.fault() == Some("FileNotFound") => Vec::new(),
        Err(e) => panic!("search: {e}"),
    }
}

/// The disks of a VM (by its moid): (file, unit number, capacity in KB).
async fn disks_of(soap: &Soap, moid: &str) -> Vec<(String, i32, i64)> {
    let vm = MoRef::new("VirtualMachine", moid);
    let devices = property(soap, &vm, "config.hardware.device").await.unwrap();
    devices
        .children
        .iter()
        .map(vim::Device::from_xml)
        .filter(|d| d.is_disk())
        .map(|d| {
            let file = d.backing.as_ref().and_then(|b| b.file_name.clone()).unwrap_or_default();
            (file, d.unit_number.unwrap_or(-1), d.capacity_kb.unwrap_or_default())
        })
        .collect()
}

fn vm_spec() -> pb::VmSpec {
    pb::VmSpec {
        name: "db".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 0,
        image: Some(pb::ImageRef { name: "debian-12".into(), source: "debian-12".into() }),
        networks: vec![pb::NetworkAttachment { network: "default".into(), backing: String::new() }],
        user_data: None,
        hostname: "db".into(),
        labels: Default::default(),
        host: String::new(),
        ..Default::default()
    }
}

fn volume_spec(gib: u32, storage: &str) -> pb::VolumeSpec {
    pb::VolumeSpec {
        name: "data".into(),
        size_gib: gib,
        storage: storage.into(),
        host: String::new(),
        labels: Default::default(),
    }
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

trait FromXmlRef {
    fn from_xml_ref(x: &vim::Xml) -> Self;
}

impl FromXmlRef for MoRef {
    fn from_xml_ref(x: &vim::Xml) -> Self {
        <MoRef as vim::FromXml>::from_xml(x).unwrap()
    }
}

#[tokio::test]
async fn a_volume_outlives_the_vms_it_was_attached_to() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_volumes && caps.supports_hot_attach && caps.supports_volume_extend_in_use);
    assert!(!caps.volumes_host_local);
    assert_eq!(caps.max_volumes_per_vm, 14);

    let (a, b, vol) = (id(), id(), id());
    let vm_a = p
        .create_vm(pb::CreateVmRequest { vm_id: a.clone(), spec: Some(vm_spec()), start: true })
        .await
        .unwrap();
    let vm_b = p
        .create_vm(pb::CreateVmRequest { vm_id: b.clone(), spec: Some(vm_spec()), start: true })
        .await
        .unwrap();
    let file = format!("{vol}.vmdk");
    let path = format!("[LocalDS_0] hcp-volumes/{vol}.vmdk");

    // Created without a VM, in the configured datastore's volume folder;
    // a repeated create is the same volume.
    let create = pb::CreateVolumeRequest { volume_id: vol.clone(), spec: Some(volume_spec(3, "")) };
    let made = p.create_volume(create.clone()).await.unwrap();
    assert_eq!(
        (made.size_gib, made.native_id.as_str(), made.vm_id.as_str(), made.slot),
        (3, path.as_str(), "", 0)
    );
    assert_eq!(p.create_volume(create.clone()).await.unwrap(), made);
    assert_eq!(volume_files(&soap).await, [(file.clone(), 3 * GIB_KB)]);

    // Attached to a running VM at slot 1 (SCSI unit 1), repeatably.
    let attach_a = pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: a.clone(), slot: 1 };
    let on_a = p.attach_volume(attach_a.clone()).await.unwrap();
    assert_eq!((on_a.vm_id.as_str(), on_a.slot, on_a.size_gib), (a.as_str(), 1, 3));
    assert_eq!(p.attach_volume(attach_a.clone()).await.unwrap(), on_a);
    assert!(disks_of(&soap, &vm_a.native_id).await.contains(&(path.clone(), 1, 3 * GIB_KB)));
    // Not twice, not elsewhere, not deleted while attached.
    let elsewhere = pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: b.clone(), slot: 1 };
    assert_eq!(p.attach_volume(elsewhere).await.unwrap_err().kind, ErrorKind::InvalidState);
    let other_slot = pb::AttachVolumeRequest { slot: 2, ..attach_a.clone() };
    assert_eq!(p.attach_volume(other_slot).await.unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(p.delete_volume(&vol).await.unwrap_err().kind, ErrorKind::InvalidState);

    // Grown while attached to the running VM: through the device.
    let grow = pb::ExtendVolumeRequest { volume_id: vol.clone(), size_gib: 4 };
    assert_eq!(p.extend_volume(grow.clone()).await.unwrap().size_gib, 4);
    assert_eq!(p.extend_volume(grow.clone()).await.unwrap().size_gib, 4);
    let shrink = pb::ExtendVolumeRequest { volume_id: vol.clone(), size_gib: 2 };
    assert_eq!(p.extend_volume(shrink).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    assert!(disks_of(&soap, &vm_a.native_id).await.contains(&(path.clone(), 1, 4 * GIB_KB)));

    // Detached from the running VM: the file stays, with its size.
    let detach_a = pb::DetachVolumeRequest { volume_id: vol.clone(), vm_id: a.clone() };
    let off = p.detach_volume(detach_a.clone()).await.unwrap();
    assert_eq!((off.vm_id.as_str(), off.size_gib), ("", 4));
    assert_eq!(p.detach_volume(detach_a).await.unwrap(), off);
    assert!(!disks_of(&soap, &vm_a.native_id).await.iter().any(|(f, _, _)| *f == path));
    assert_eq!(volume_files(&soap).await, [(file.clone(), 4 * GIB_KB)]);

    // Attached to the second VM at slot 7: unit 8, past the controller's 7.
    let on_b = p
        .attach_volume(pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: b.clone(), slot: 7 })
        .await
        .unwrap();
    assert_eq!((on_b.vm_id.as_str(), on_b.slot), (b.as_str(), 7));
    assert!(disks_of(&soap, &vm_b.native_id).await.contains(&(path.clone(), 8, 4 * GIB_KB)));
    let listed = p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap();
    assert_eq!(listed.volumes, [on_b]);

    // Deleting the VM (running, volume attached) leaves the volume: vcsim's
    // Destroy_Task, like vSphere's, deletes the disks still attached, so
    // the provider unplugs them first.
    assert!(p.delete_vm(&b).await.unwrap());
    assert_eq!(volume_files(&soap).await, [(file.clone(), 4 * GIB_KB)]);
    let left = p.get_volume(&vol).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.slot, left.size_gib), ("", 0, 4));

    // Grown while detached: ExtendVirtualDisk_Task.
    let grow = pb::ExtendVolumeRequest { volume_id: vol.clone(), size_gib: 5 };
    assert_eq!(p.extend_volume(grow).await.unwrap().size_gib, 5);
    assert_eq!(volume_files(&soap).await, [(file.clone(), 5 * GIB_KB)]);

    // Deleted: the file is gone; again: it was not there.
    assert!(p.delete_volume(&vol).await.unwrap());
    assert!(!p.delete_volume(&vol).await.unwrap());
    assert!(volume_files(&soap).await.is_empty());
    assert_eq!(p.get_volume(&vol).await.unwrap_err().kind, ErrorKind::NotFound);
    let gone = pb::DetachVolumeRequest { volume_id: vol.clone(), vm_id: a.clone() };
    assert_eq!(p.detach_volume(gone).await.unwrap().vm_id, "");
    assert!(p.delete_vm(&a).await.unwrap());
}

#[tokio::test]
async fn bad_volume_requests_are_refused_before_anything_is_made() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let vol = id();
    let unknown = pb::CreateVolumeRequest { volume_id: vol.clone(), spec: Some(volume_spec(1, "NoSuchDS")) };
    assert_eq!(p.create_volume(unknown).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    let empty = pb::CreateVolumeRequest { volume_id: vol.clone(), spec: Some(volume_spec(0, "")) };
    assert_eq!(p.create_volume(empty).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    assert!(volume_files(&soap).await.is_empty());
    let vm = id();
    let missing = pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: vm.clone(), slot: 1 };
    assert_eq!(p.attach_volume(missing).await.unwrap_err().kind, ErrorKind::NotFound);
    for slot in [0, 15] {
        let bad = pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: vm.clone(), slot };
        assert_eq!(p.attach_volume(bad).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    }
    let grow = pb::ExtendVolumeRequest { volume_id: vol.clone(), size_gib: 2 };
    assert_eq!(p.extend_volume(grow).await.unwrap_err().kind, ErrorKind::NotFound);
}

#[tokio::test]
async fn a_create_interrupted_half_way_converges_on_one_volume() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let content = soap.content().await.unwrap().clone();
    let dc = find(&soap, "DC0").await;
    // A crash after the folder was made: the next create makes the disk.
    let mkdir = vim::MakeDirectory {
        xmlns: VIM25,
        this: content.file_manager.as_ref().unwrap(),
        name: "[LocalDS_0] hcp-volumes",
        datacenter: &dc,
        create_parents: true,
    };
    let _: vim::Nothing = soap.invoke("MakeDirectory", &mkdir, false).await.unwrap();
    let first = id();
    let req = pb::CreateVolumeRequest { volume_id: first.clone(), spec: Some(volume_spec(2, "LocalDS_0")) };
    assert_eq!(p.create_volume(req).await.unwrap().size_gib, 2);
    // A crash after the disk was made, its answer lost: the next create
    // finds it and makes nothing.
    let second = id();
    let path = format!("[LocalDS_0] hcp-volumes/{second}.vmdk");
    let made = vim::CreateVirtualDisk {
        xmlns: VIM25,
        this: content.virtual_disk_manager.as_ref().unwrap(),
        name: &path,
        datacenter: &dc,
        spec: vim::DiskSpec::thin(2 * GIB_KB),
    };
    soap.task("CreateVirtualDisk_Task", &made).await.unwrap();
    let req = pb::CreateVolumeRequest { volume_id: second.clone(), spec: Some(volume_spec(2, "")) };
    assert_eq!(p.create_volume(req).await.unwrap().native_id, path);
    let mut names: Vec<String> = volume_files(&soap).await.into_iter().map(|(n, _)| n).collect();
    names.sort();
    let mut want = vec![format!("{first}.vmdk"), format!("{second}.vmdk")];
    want.sort();
    assert_eq!(names, want);
    // ListVolumes reports exactly HCP's files, paged.
    let page =
        p.list_volumes(pb::ListVolumesRequest { page_size: 1, page_token: String::new() }).await.unwrap();
    assert_eq!(page.volumes.len(), 1);
    let rest = p
        .list_volumes(pb::ListVolumesRequest { page_size: 1, page_token: page.next_page_token })
        .await
        .unwrap();
    assert_eq!(rest.volumes.len(), 1);
    for v in [first, second] {
        assert!(p.delete_volume(&v).await.unwrap());
    }
    assert!(volume_files(&soap).await.is_empty());
}

#[tokio::test]
async fn volumes_on_stopped_vms_race_slots_and_what_destroy_would_do() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let (a, c, v1, v2) = (id(), id(), id(), id());
    let mut native = std::collections::HashMap::new();
    for vm in [&a, &c] {
        let made = p
            .create_vm(pb::CreateVmRequest { vm_id: vm.clone(), spec: Some(vm_spec()), start: false })
            .await
            .unwrap();
        assert_eq!(made.power_state, pb::PowerState::Shutoff as i32);
        native.insert(vm.clone(), made.native_id);
    }
    for v in [&v1, &v2] {
        p.create_volume(pb::CreateVolumeRequest { volume_id: v.clone(), spec: Some(volume_spec(1, "")) })
            .await
            .unwrap();
    }

    // Two attaches of one volume to two VMs at once: one wins, the other is
    // refused, and the volume is on one VM.
    let (x, y) = tokio::join!(
        p.attach_volume(pb::AttachVolumeRequest { volume_id: v1.clone(), vm_id: a.clone(), slot: 1 }),
        p.attach_volume(pb::AttachVolumeRequest { volume_id: v1.clone(), vm_id: c.clone(), slot: 1 }),
    );
    let (winner, loser) = match (x, y) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        other => panic!("exactly one attach wins: {other:?}"),
    };
    assert_eq!(loser.kind, ErrorKind::InvalidState);
    let holder = winner.vm_id.clone();
    let other = if holder == a { c.clone() } else { a.clone() };
    let path1 = format!("[LocalDS_0] hcp-volumes/{v1}.vmdk");
    let path2 = format!("[LocalDS_0] hcp-volumes/{v2}.vmdk");
    assert!(disks_of(&soap, &native[&holder]).await.contains(&(path1.clone(), 1, GIB_KB)));
    assert!(!disks_of(&soap, &native[&other]).await.iter().any(|(f, _, _)| *f == path1));

    // A slot taken by another volume is refused; the last slot is unit 15.
    let taken = pb::AttachVolumeRequest { volume_id: v2.clone(), vm_id: holder.clone(), slot: 1 };
    assert_eq!(p.attach_volume(taken).await.unwrap_err().kind, ErrorKind::InvalidState);
    let last = pb::AttachVolumeRequest { volume_id: v2.clone(), vm_id: holder.clone(), slot: 14 };
    assert_eq!(p.attach_volume(last).await.unwrap().slot, 14);
    assert!(disks_of(&soap, &native[&holder]).await.contains(&(path2.clone(), 15, GIB_KB)));

    // Grown while attached to a stopped VM: through the device.
    let grow = pb::ExtendVolumeRequest { volume_id: v1.clone(), size_gib: 2 };
    assert_eq!(p.extend_volume(grow).await.unwrap().size_gib, 2);
    assert!(disks_of(&soap, &native[&holder]).await.contains(&(path1.clone(), 1, 2 * GIB_KB)));

    // Why DeleteVm unplugs volumes first: vcsim's Destroy_Task, like
    // vSphere's, deletes every disk still attached. Called directly, not
    // through the provider, it takes both volumes with the VM.
    let mut files: Vec<String> = volume_files(&soap).await.into_iter().map(|(n, _)| n).collect();
    files.sort();
    let mut want = vec![format!("{v1}.vmdk"), format!("{v2}.vmdk")];
    want.sort();
    assert_eq!(files, want);
    soap.task_this("Destroy_Task", &MoRef::new("VirtualMachine", &native[&holder])).await.unwrap();
    assert!(volume_files(&soap).await.is_empty());
    assert!(p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes.is_empty());
    assert!(!p.delete_volume(&v1).await.unwrap());
    assert!(!p.delete_vm(&holder).await.unwrap());
    assert!(p.delete_vm(&other).await.unwrap());
}

#[tokio::test]
async fn a_crash_after_every_volume_step_converges_when_the_call_is_repeated() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let dir = hcp_testkit::TempDir::new().unwrap();
    let config = dir.path().join("provider.toml");
    std::fs::write(&config, sim.provider_toml(TIMING)).unwrap();
    let (a, v1, v2) = (id(), id(), id());
    let vm = p
        .create_vm(pb::CreateVmRequest { vm_id: a.clone(), spec: Some(vm_spec()), start: true })
        .await
        .unwrap();
    let path1 = format!("[LocalDS_0] hcp-volumes/{v1}.vmdk");
    let disks_with =
        |disks: Vec<(String, i32, i64)>, path: &str| disks.into_iter().filter(|(f, _, _)| f == path).count();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    // Each call dies after its first effect; the same call, repeated (by
    // core, against the restarted provider), finishes it.
    let create =
        |v: &str| pb::CreateVolumeRequest { volume_id: v.to_owned(), spec: Some(volume_spec(1, "")) };
    for (step, v) in [("volume-create:after-mkdir", &v1), ("volume-create:after-disk", &v2)] {
        let mut c = Crashing::start(&config, step).await;
        assert!(c.compute.create_volume(create(v)).await.is_err(), "{step}");
        c.died(step).await;
        assert_eq!(p.create_volume(create(v)).await.unwrap().size_gib, 1, "{step}");
    }
    let names: Vec<String> = volume_files(&soap).await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(sorted(names), sorted(vec![format!("{v1}.vmdk"), format!("{v2}.vmdk")]));

    let step = "volume-attach:after-reconfigure";
    let attach = pb::AttachVolumeRequest { volume_id: v1.clone(), vm_id: a.clone(), slot: 3 };
    let mut c = Crashing::start(&config, step).await;
    assert!(c.compute.attach_volume(attach.clone()).await.is_err(), "{step}");
    c.died(step).await;
    assert_eq!(p.attach_volume(attach).await.unwrap().slot, 3);
    assert_eq!(disks_with(disks_of(&soap, &vm.native_id).await, &path1), 1, "{step}: attached once");

    let step = "volume-extend:after-grow";
    let grow = pb::ExtendVolumeRequest { volume_id: v1.clone(), size_gib: 2 };
    let mut c = Crashing::start(&config, step).await;
    assert!(c.compute.extend_volume(grow.clone()).await.is_err(), "{step}");
    c.died(step).await;
    assert_eq!(p.extend_volume(grow).await.unwrap().size_gib, 2);

    let step = "volume-detach:after-reconfigure";
    let detach = pb::DetachVolumeRequest { volume_id: v1.clone(), vm_id: a.clone() };
    let mut c = Crashing::start(&config, step).await;
    assert!(c.compute.detach_volume(detach.clone()).await.is_err(), "{step}");
    c.died(step).await;
    assert_eq!(p.detach_volume(detach).await.unwrap().vm_id, "");
    assert_eq!(disks_with(disks_of(&soap, &vm.native_id).await, &path1), 0, "{step}");

    // DeleteVm dies between unplugging the volumes and destroying the VM:
    // repeated, it destroys the VM, and the volume is left.
    let step = "delete:after-detach";
    p.attach_volume(pb::AttachVolumeRequest { volume_id: v2.clone(), vm_id: a.clone(), slot: 1 })
        .await
        .unwrap();
    let mut c = Crashing::start(&config, step).await;
    assert!(c.compute.delete_vm(pb::VmRef { vm_id: a.clone() }).await.is_err(), "{step}");
    c.died(step).await;
    assert!(p.delete_vm(&a).await.unwrap(), "{step}: the VM was still there");
    let left = p.get_volume(&v2).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.size_gib), ("", 1));

    let step = "volume-delete:after-disk";
    let mut c = Crashing::start(&config, step).await;
    assert!(c.compute.delete_volume(pb::VolumeRef { volume_id: v1.clone() }).await.is_err(), "{step}");
    c.died(step).await;
    // The file went with the first call: the repeat finds nothing to delete.
    assert!(!p.delete_volume(&v1).await.unwrap());
    assert!(p.delete_volume(&v2).await.unwrap());
    assert!(volume_files(&soap).await.is_empty());
}

/// A boot volume: made from the image at CreateVm, the VM's root disk
/// (unit 0), left detached by DeleteVm with its size, and booted from as
/// it is by a second VM; a data volume named at create is plugged in at its
/// slot; a repeated create converges.
#[tokio::test]
async fn a_boot_volume_is_made_at_create_and_outlives_its_vm() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let (a, b, boot, data) = (id(), id(), id(), id());
    let boot_path = format!("[LocalDS_0] hcp-volumes/{boot}.vmdk");
    let data_path = format!("[LocalDS_0] hcp-volumes/{data}.vmdk");

    // A new boot volume, 3 GiB, on the named datastore.
    let spec = pb::VmSpec {
        disk_gib: 3,
        boot_volume_id: boot.clone(),
        boot_storage: "LocalDS_0".into(),
        ..vm_spec()
    };
    let create = pb::CreateVmRequest { vm_id: a.clone(), spec: Some(spec), start: true };
    let vm_a = p.create_vm(create.clone()).await.unwrap();
    assert_eq!(vm_a.disk_gib, 3);
    let info = p.get_volume(&boot).await.unwrap();
    assert_eq!((info.vm_id.as_str(), info.slot, info.size_gib), (a.as_str(), 0, 3));
    assert_eq!(
        p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes,
        std::slice::from_ref(&info)
    );
    let disks = disks_of(&soap, &vm_a.native_id).await;
    assert_eq!(disks, [(boot_path.clone(), 0, 3 * GIB_KB)], "the clone's own disk is gone");
    // Repeated: the same VM, the same one boot volume.
    assert_eq!(p.create_vm(create).await.unwrap().native_id, vm_a.native_id);
    assert_eq!(volume_files(&soap).await, [(format!("{boot}.vmdk"), 3 * GIB_KB)]);
    assert_eq!(disks_of(&soap, &vm_a.native_id).await, disks);

    // Slot 0 leaves only with DeleteVm.
    let detach = pb::DetachVolumeRequest { volume_id: boot.clone(), vm_id: a.clone() };
    assert_eq!(p.detach_volume(detach).await.unwrap_err().kind, ErrorKind::InvalidState);
    // ResizeVm grows the boot volume.
    let resize = pb::ResizeVmRequest { vm_id: a.clone(), vcpus: 1, memory_mib: 512, disk_gib: 4 };
    assert_eq!(p.resize_vm(resize).await.unwrap().disk_gib, 4);
    assert_eq!(p.get_volume(&boot).await.unwrap().size_gib, 4);

    assert!(p.delete_vm(&a).await.unwrap());
    let left = p.get_volume(&boot).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.slot, left.size_gib), ("", 0, 4));
    assert_eq!(volume_files(&soap).await, [(format!("{boot}.vmdk"), 4 * GIB_KB)]);

    // A second VM boots from the existing volume as it is (disk_gib 0:
    // no growth asked, and none made), with a data volume at slot 2.
    p.create_volume(pb::CreateVolumeRequest { volume_id: data.clone(), spec: Some(volume_spec(1, "")) })
        .await
        .unwrap();
    let spec = pb::VmSpec {
        boot_volume_id: boot.clone(),
        volumes: vec![pb::VolumeAttachment { volume_id: data.clone(), slot: 2 }],
        ..vm_spec()
    };
    let create = pb::CreateVmRequest { vm_id: b.clone(), spec: Some(spec), start: false };
    let vm_b = p.create_vm(create.clone()).await.unwrap();
    assert_eq!(p.create_vm(create).await.unwrap().native_id, vm_b.native_id);
    let mut disks = disks_of(&soap, &vm_b.native_id).await;
    disks.sort();
    let mut want = vec![(boot_path.clone(), 0, 4 * GIB_KB), (data_path.clone(), 2, GIB_KB)];
    want.sort();
    assert_eq!(disks, want);
    let on_b = p.get_volume(&data).await.unwrap();
    assert_eq!((on_b.vm_id.as_str(), on_b.slot), (b.as_str(), 2));
    assert_eq!(p.get_volume(&boot).await.unwrap().vm_id, b);
    // A third VM cannot take either.
    let c = id();
    let spec = pb::VmSpec { boot_volume_id: boot.clone(), ..vm_spec() };
    let taken = p.create_vm(pb::CreateVmRequest { vm_id: c.clone(), spec: Some(spec), start: false }).await;
    assert_eq!(taken.unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(p.get_vm(&c).await.unwrap_err().kind, ErrorKind::NotFound, "nothing was made");

    p.start_vm(&b).await.unwrap();
    assert!(p.delete_vm(&b).await.unwrap());
    for v in [&boot, &data] {
        assert_eq!(p.get_volume(v).await.unwrap().vm_id, "");
        assert!(p.delete_volume(v).await.unwrap());
    }
    assert!(volume_files(&soap).await.is_empty());
}

/// A create with a boot volume and a data volume dies after each of its
/// steps (the image copied under its temporary name, the copy moved to the
/// volume's name, the root disk swapped); repeated, it converges on one VM
/// with one boot volume, no half-made copy left, the data volume once.
#[tokio::test]
async fn a_create_with_volumes_interrupted_at_every_step_converges() {
    let Some(sim) = vcsim().await else { return };
    let p = provider(&sim).await;
    let soap = look(&sim).await;
    let dir = hcp_testkit::TempDir::new().unwrap();
    let config = dir.path().join("provider.toml");
    std::fs::write(&config, sim.provider_toml(TIMING)).unwrap();
    let data = id();
    p.create_volume(pb::CreateVolumeRequest { volume_id: data.clone(), spec: Some(volume_spec(1, "")) })
        .await
        .unwrap();
    for step in ["boot-volume:after-copy", "boot-volume:after-move", "create:after-reconfigure"] {
        let (vm, boot) = (id(), id());
        let spec = pb::VmSpec {
            disk_gib: 2,
            boot_volume_id: boot.clone(),
            volumes: vec![pb::VolumeAttachment { volume_id: data.clone(), slot: 1 }],
            ..vm_spec()
        };
        let create = pb::CreateVmRequest { vm_id: vm.clone(), spec: Some(spec), start: false };
        let mut c = Crashing::start(&config, step).await;
        assert!(c.compute.create_vm(create.clone()).await.is_err(), "{step}");
        c.died(step).await;
        let made = p.create_vm(create).await.unwrap();
        let mut disks = disks_of(&soap, &made.native_id).await;
        disks.sort();
        let mut want = vec![
            (format!("[LocalDS_0] hcp-volumes/{boot}.vmdk"), 0, 2 * GIB_KB),
            (format!("[LocalDS_0] hcp-volumes/{data}.vmdk"), 1, GIB_KB),
        ];
        want.sort();
        assert_eq!(disks, want, "{step}");
        let mut files: Vec<String> = volume_files(&soap).await.into_iter().map(|(n, _)| n).collect();
        files.sort();
        let mut want = vec![format!("{boot}.vmdk"), format!("{data}.vmdk")];
        want.sort();
        assert_eq!(files, want, "{step}: one boot volume, no half-made copy");
        let vms = p.list_vms(pb::ListVmsRequest::default()).await.unwrap().vms;
        assert_eq!(vms.iter().filter(|v| v.vm_id == vm).count(), 1, "{step}");
        assert!(p.delete_vm(&vm).await.unwrap());
        assert!(p.delete_volume(&boot).await.unwrap());
    }
    assert!(p.delete_volume(&data).await.unwrap());
    assert!(volume_files(&soap).await.is_empty());
}
