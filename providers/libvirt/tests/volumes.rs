//! Volumes on real QEMU (TCG) guests, through the provider's gRPC API (and,
//! for boot volumes, which the proto's `VmSpec` cannot carry yet, through
//! `Libvirt::create_vm_with_volumes` on the same provider). The guests'
//! own reports on their serial port are the proof: a user-data script
//! watches the virtio disks and prints each one's serial, size in sectors
//! and first bytes whenever they change; on the guest named `vol-writer` it
//! also writes a marker onto every fresh data disk.

mod common;

use common::{USER_DATA, report};

use std::path::Path;

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::identity_client::IdentityClient;
use hcp_proto::provider::{
    AttachVolumeRequest, CreateVmRequest, CreateVolumeRequest, DetachVolumeRequest, ExtendVolumeRequest,
    GetCapabilitiesRequest, ImageRef, ListVolumesRequest, NetworkAttachment, ResizeVmRequest, VmRef, VmSpec,
    VolumeInfo, VolumeRef, VolumeSpec,
};
use hcp_provider_libvirt::storage::disk_serial;
use hcp_provider_libvirt::{VmVolumes, VolumeAttachment};
use tonic::transport::Channel;

const BANNER: &str = "HCP-GUEST-READY";

fn spec(hostname: &str) -> VmSpec {
    VmSpec {
        name: hostname.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        image: Some(ImageRef { name: "tiny".into(), source: "tiny".into() }),
        networks: vec![NetworkAttachment { network: "default".into(), backing: String::new() }],
        user_data: Some(USER_DATA.into()),
        hostname: hostname.into(),
        labels: Default::default(),
        host: String::new(),
        ..Default::default()
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn virtual_size(disk: &Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

struct Api {
    compute: ComputeClient<Channel>,
}

impl Api {
    async fn create(&mut self, id: &str, gib: u32) -> VolumeInfo {
        let spec = VolumeSpec { name: "data".into(), size_gib: gib, ..Default::default() };
        let req = CreateVolumeRequest { volume_id: id.into(), spec: Some(spec) };
        self.compute.create_volume(req).await.unwrap().into_inner()
    }

    async fn get(&mut self, id: &str) -> Result<VolumeInfo, tonic::Status> {
        self.compute.get_volume(VolumeRef { volume_id: id.into() }).await.map(|r| r.into_inner())
    }

    async fn attach(&mut self, id: &str, vm: &str, slot: u32) -> Result<VolumeInfo, tonic::Status> {
        let req = AttachVolumeRequest { volume_id: id.into(), vm_id: vm.into(), slot };
        self.compute.attach_volume(req).await.map(|r| r.into_inner())
    }

    async fn detach(&mut self, id: &str, vm: &str) -> Result<VolumeInfo, tonic::Status> {
        let req = DetachVolumeRequest { volume_id: id.into(), vm_id: vm.into() };
        self.compute.detach_volume(req).await.map(|r| r.into_inner())
    }

    async fn extend(&mut self, id: &str, gib: u32) -> Result<VolumeInfo, tonic::Status> {
        let req = ExtendVolumeRequest { volume_id: id.into(), size_gib: gib };
        self.compute.extend_volume(req).await.map(|r| r.into_inner())
    }

    async fn delete(&mut self, id: &str) -> Result<bool, tonic::Status> {
        self.compute.delete_volume(VolumeRef { volume_id: id.into() }).await.map(|r| r.into_inner().existed)
    }

    async fn list(&mut self) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .compute
                .list_volumes(ListVolumesRequest { page_size: 2, page_token: token })
                .await
                .unwrap()
                .into_inner();
            out.extend(page.volumes);
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
    }

    async fn delete_vm(&mut self, vm: &str) {
        self.compute.delete_vm(VmRef { vm_id: vm.into() }).await.unwrap();
    }
}

fn code(r: Result<impl std::fmt::Debug, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

/// (vm_id, slot) of a volume in a listing.
fn where_listed(list: &[VolumeInfo], id: &str) -> Option<(String, u32)> {
    list.iter().find(|v| v.volume_id == id).map(|v| (v.vm_id.clone(), v.slot))
}

/// What a guest reported about its disks (shown with `--nocapture`).
fn print_reports(bed: &common::Testbed, vm: &str) {
    for line in bed.serial(vm).lines().filter(|l| l.contains("HCP-VOL:")) {
        println!("guest {vm}: {}", line.trim());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_on_real_guests() {
    let bed = common::Testbed::new();
    let provider = bed.start_in_process("qemu:///system").await;
    let mut identity = IdentityClient::connect(provider.endpoint.clone()).await.unwrap();
    let caps = identity.get_capabilities(GetCapabilitiesRequest {}).await.unwrap().into_inner();
    assert!(caps.supports_volumes && caps.supports_hot_attach && caps.supports_volume_extend_in_use);
    assert!(caps.volumes_host_local);
    assert_eq!(caps.max_volumes_per_vm, 16);
    let mut api = Api { compute: ComputeClient::connect(provider.endpoint.clone()).await.unwrap() };

    // The writer guest, running.
    let a = new_id();
    let req = CreateVmRequest { vm_id: a.clone(), spec: Some(spec("vol-writer")), start: true };
    api.compute.create_vm(req).await.unwrap();

    // A volume: created once, in the test's pool, under its HCP name.
    let v = new_id();
    let created = api.create(&v, 1).await;
    assert_eq!(api.create(&v, 1).await, created, "a repeated create returns the same volume");
    let file = bed.pool_dir.join(format!("hcp-vol-{v}.qcow2"));
    assert_eq!(created.native_id, file.display().to_string());
    assert_eq!((created.size_gib, created.vm_id.as_str(), created.slot), (1, "", 0));
    assert_eq!(virtual_size(&file), 1 << 30);
    let unknown_storage = CreateVolumeRequest {
        volume_id: new_id(),
        spec: Some(VolumeSpec { size_gib: 1, storage: "no-such-pool".into(), ..Default::default() }),
    };
    let err = api.compute.create_volume(unknown_storage).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("storage:"), "{}", err.message());

    // Hot attach (twice) once the guest runs: live and persistent.
    bed.serial_shows(&a, BANNER, 1).await;
    let attached = api.attach(&v, &a, 1).await.unwrap();
    assert_eq!(api.attach(&v, &a, 1).await.unwrap(), attached, "a repeated attach is the same");
    assert_eq!((attached.vm_id.as_str(), attached.slot), (a.as_str(), 1));
    let dom = format!("hcp-{a}");
    let path = file.display().to_string();
    assert!(common::virsh(&["dumpxml", &dom]).contains(&path), "live XML has the volume");
    assert!(common::virsh(&["dumpxml", "--inactive", &dom]).contains(&path), "so has the definition");
    // The guest sees a 1 GiB disk with the volume's serial and writes on it.
    bed.serial_shows(&a, &report(&v, 1, ""), 1).await;
    bed.serial_shows(&a, &format!("HCP-VOL: wrote serial={} ", disk_serial(&v)), 1).await;

    // What attached volumes refuse.
    assert_eq!(code(api.delete(&v).await), tonic::Code::FailedPrecondition);
    assert_eq!(code(api.attach(&v, &a, 2).await), tonic::Code::FailedPrecondition);
    assert_eq!(code(api.attach(&v, &new_id(), 1).await), tonic::Code::NotFound);
    assert_eq!(code(api.attach(&v, &a, 17).await), tonic::Code::InvalidArgument);
    assert_eq!(code(api.attach(&new_id(), &a, 2).await), tonic::Code::NotFound);

    // Extended in use (blockResize): the running guest sees 2 GiB.
    assert_eq!(api.extend(&v, 2).await.unwrap().size_gib, 2);
    assert_eq!(api.extend(&v, 2).await.unwrap().size_gib, 2, "a size reached succeeds");
    assert_eq!(code(api.extend(&v, 1).await), tonic::Code::InvalidArgument);
    let marker = format!("HCP-DATA-{}", disk_serial(&v));
    bed.serial_shows(&a, &report(&v, 2, &marker), 1).await;

    // Hot detach (twice): gone from the guest's domain, live and persistent.
    let detached = api.detach(&v, &a).await.unwrap();
    assert_eq!((detached.vm_id.as_str(), detached.slot), ("", 0));
    assert_eq!(api.detach(&v, &a).await.unwrap(), detached, "a repeated detach is the same");
    assert!(!common::virsh(&["dumpxml", &dom]).contains(&path));
    assert!(!common::virsh(&["dumpxml", "--inactive", &dom]).contains(&path));

    // Extended detached (virStorageVolResize).
    assert_eq!(api.extend(&v, 3).await.unwrap().size_gib, 3);
    assert_eq!(virtual_size(&file), 3 << 30);

    // Deleting the VM leaves the volume as it was.
    print_reports(&bed, &a);
    api.delete_vm(&a).await;
    assert!(common::virsh(&["dominfo", &dom]).trim().is_empty(), "the domain is gone");
    assert!(file.is_file(), "the volume's file survives its VM");
    assert_eq!(api.get(&v).await.unwrap().size_gib, 3);

    // The reader guest boots from a boot volume made from the image.
    let boot = new_id();
    let b = new_id();
    let volumes =
        VmVolumes { boot_volume_id: Some(boot.clone()), boot_storage: String::new(), volumes: Vec::new() };
    let req = CreateVmRequest { vm_id: b.clone(), spec: Some(spec("vol-reader")), start: true };
    provider.provider.create_vm_with_volumes(req.clone(), volumes.clone()).await.unwrap();
    provider.provider.create_vm_with_volumes(req, volumes).await.expect("a repeated create is fine");
    let boot_file = bed.pool_dir.join(format!("hcp-vol-{boot}.qcow2"));
    let boot_info = api.get(&boot).await.unwrap();
    assert_eq!((boot_info.vm_id.as_str(), boot_info.slot), (b.as_str(), 0));
    assert_eq!(boot_info.native_id, boot_file.display().to_string());
    bed.serial_shows(&b, BANNER, 1).await;
    bed.serial_shows(&b, &format!("dev=vda {}", report(&boot, 1, "")), 1).await;

    // The data volume, hot-attached to the second guest, holds what the
    // first one wrote, at the size it was extended to.
    api.attach(&v, &b, 2).await.unwrap();
    bed.serial_shows(&b, &report(&v, 3, &marker), 1).await;
    assert_eq!(code(api.delete(&boot).await), tonic::Code::FailedPrecondition);
    assert_eq!(code(api.detach(&boot, &b).await), tonic::Code::FailedPrecondition);

    // ListVolumes: exactly HCP's volumes, one HCP does not know included.
    let stray = new_id();
    let stray_name = format!("hcp-vol-{stray}.qcow2");
    common::virsh(&["vol-create-as", &bed.pool, &stray_name, "1M", "--format", "qcow2"]);
    common::virsh(&["vol-create-as", &bed.pool, "not-hcp.qcow2", "1M", "--format", "qcow2"]);
    let list = api.list().await;
    assert_eq!(where_listed(&list, &v), Some((b.clone(), 2)));
    assert_eq!(where_listed(&list, &boot), Some((b.clone(), 0)));
    assert_eq!(where_listed(&list, &stray), Some((String::new(), 0)));
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(api.delete(&stray).await.unwrap());

    // Deleting the VM leaves both volumes, detached.
    print_reports(&bed, &b);
    api.delete_vm(&b).await;
    let list = api.list().await;
    assert_eq!(where_listed(&list, &v), Some((String::new(), 0)));
    assert_eq!(where_listed(&list, &boot), Some((String::new(), 0)));
    assert!(boot_file.is_file() && file.is_file());

    // A third VM from the same boot volume, stopped, the data volume
    // attached from the start; detach and attach on a stopped VM touch its
    // definition only.
    let c = new_id();
    let volumes = VmVolumes {
        boot_volume_id: Some(boot.clone()),
        boot_storage: String::new(),
        volumes: vec![VolumeAttachment { volume_id: v.clone(), slot: 3 }],
    };
    let req = CreateVmRequest { vm_id: c.clone(), spec: Some(spec("vol-third")), start: false };
    provider.provider.create_vm_with_volumes(req, volumes).await.unwrap();
    let xml = common::virsh(&["dumpxml", "--inactive", &format!("hcp-{c}")]);
    let disks = hcp_provider_libvirt::storage::disks_of(&xml);
    let disks: Vec<_> = disks.iter().map(|d| (d.file.as_path(), d.target.as_str())).collect();
    assert_eq!(disks, [(boot_file.as_path(), "vda"), (file.as_path(), "vdd")]);
    assert_eq!(api.get(&v).await.unwrap().slot, 3);
    assert_eq!(api.get(&boot).await.unwrap().vm_id, c);
    // Its root disk is the boot volume: a resize grows that.
    let resize = ResizeVmRequest { vm_id: c.clone(), vcpus: 1, memory_mib: 256, disk_gib: 2 };
    api.compute.resize_vm(resize).await.unwrap();
    assert_eq!(api.get(&boot).await.unwrap().size_gib, 2);
    assert_eq!(api.detach(&v, &c).await.unwrap().vm_id, "");
    assert_eq!(api.attach(&v, &c, 1).await.unwrap().slot, 1);
    assert_eq!(api.detach(&v, &c).await.unwrap().vm_id, "");
    api.delete_vm(&c).await;

    // DeleteVolume removes the files; a second time says it was gone.
    assert!(api.delete(&v).await.unwrap());
    assert!(api.delete(&boot).await.unwrap());
    assert!(!file.exists() && !boot_file.exists());
    assert!(!api.delete(&v).await.unwrap());
    assert_eq!(code(api.get(&v).await), tonic::Code::NotFound);
    assert!(api.detach(&v, &c).await.is_ok(), "detaching what is gone succeeds");
}
