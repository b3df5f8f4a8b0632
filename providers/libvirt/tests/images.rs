//! Images on real QEMU (TCG) guests, straight over the provider's gRPC API:
//! the test bed's self-booting disk (`boot.qcow2`: SYSLINUX, the tiny
//! guest's kernel and initramfs) is imported through ImportImage, a VM made
//! from it boots from its disk (no kernel in the domain) and writes a
//! marker 512 MiB into its disk; stopped, it is captured, and a VM made from
//! the capture reads the marker back. Everything is deleted; the pool is
//! left empty.

mod common;

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::import_image_chunk::Part;
use hcp_proto::provider::{
    CaptureImageRequest, CreateVmRequest, DeleteImageRequest, DiskFormat, ImageRef, ImportImageChunk,
    ImportImageHeader, ListVolumesRequest, NetworkAttachment, StopVmRequest, VmRef, VmSpec,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn spec(name: &str, source: &str, user_data: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        image: Some(ImageRef { name: name.into(), source: source.into() }),
        networks: vec![NetworkAttachment { network: "default".into(), backing: String::new() }],
        user_data: Some(user_data.into()),
        hostname: name.into(),
        ..Default::default()
    }
}

/// Writes `HCP-MARK-` and a tag raw at 512 MiB into the root disk (the
/// guest runs from RAM; its disk is free), flushed before the banner.
const WRITE_MARKER: &str = "#!/bin/sh\nprintf 'HCP-MARK-%s' 7f3a > /tmp/mark\n\
dd if=/tmp/mark of=/dev/vda bs=1M seek=512 conv=notrunc 2>/dev/null && sync && \
echo \"HCP-TEST: marker written\" > /dev/ttyS0\n";

/// Reads 13 bytes at 512 MiB of the root disk back to the serial port.
const READ_MARKER: &str = "#!/bin/sh\n\
echo \"HCP-TEST: read back [$(dd if=/dev/vda bs=1M skip=512 count=1 2>/dev/null | head -c 13)]\" > /dev/ttyS0\n";

async fn delete_image(
    compute: &mut ComputeClient<Channel>,
    id: &str,
    source: &str,
) -> Result<bool, tonic::Status> {
    let req = DeleteImageRequest { image_id: id.into(), source: source.into() };
    compute.delete_image(req).await.map(|r| r.into_inner().existed)
}

fn import_messages(id: &str, bytes: &[u8]) -> Vec<ImportImageChunk> {
    let header = ImportImageHeader {
        image_id: id.into(),
        name: "image".into(),
        format: DiskFormat::Qcow2 as i32,
        size_bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
        min_disk_gib: 1,
    };
    let mut messages = vec![ImportImageChunk { part: Some(Part::Header(header)) }];
    messages.extend(bytes.chunks(1 << 20).map(|c| ImportImageChunk { part: Some(Part::Data(c.to_vec())) }));
    messages
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imported_image_boots_from_its_disk_and_a_capture_keeps_what_the_guest_wrote() {
    let bed = common::Testbed::new();
    let boot = bed.guest.join("boot.qcow2");
    assert!(boot.is_file(), "{} is missing: run `bash scripts/testbed.sh`", boot.display());
    let provider = bed.start_in_process("qemu:///system").await;
    let mut compute = ComputeClient::connect(provider.endpoint.clone()).await.unwrap();

    // ImportImage of the self-booting disk, in 1 MiB messages.
    let bytes = std::fs::read(&boot).unwrap();
    let image = new_id();
    let messages = import_messages(&image, &bytes);
    let imported = compute.import_image(futures::stream::iter(messages)).await.unwrap().into_inner();
    assert_eq!(imported.image_id, image);
    assert_eq!(imported.size_bytes, bytes.len() as u64);
    // Stored in the volumes' pool as an image, never listed as a volume.
    let vols = common::virsh(&["vol-list", &bed.pool]);
    assert!(vols.contains(&format!("hcp-image-{image}.qcow2")), "{vols}");
    assert!(vols.contains(&format!("hcp-image-{image}.complete")), "{vols}");
    let listed = compute.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.volumes.is_empty(), "images listed as volumes: {:?}", listed.volumes);

    // A VM from it boots by the disk's bootloader and writes the marker.
    let writer = new_id();
    let req = CreateVmRequest {
        vm_id: writer.clone(),
        spec: Some(spec("img-writer", &imported.source, WRITE_MARKER)),
        start: true,
    };
    compute.create_vm(req).await.unwrap();
    let xml = common::virsh(&["dumpxml", &format!("hcp-{writer}")]);
    assert!(!xml.contains("<kernel>") && !xml.contains("<initrd>"), "direct kernel boot: {xml}");
    assert!(xml.contains("<boot dev='hd'/>"), "{xml}");
    bed.serial_shows(&writer, "HCP-GUEST-READY hostname=img-writer", 1).await;
    bed.serial_shows(&writer, "HCP-TEST: marker written", 1).await;

    // Running: no capture; its overlay rests on the image: no delete.
    let capture = new_id();
    let req = CaptureImageRequest { vm_id: writer.clone(), image_id: capture.clone(), name: "cap".into() };
    assert_eq!(code(compute.capture_image(req.clone()).await), tonic::Code::FailedPrecondition);
    assert_eq!(
        code(delete_image(&mut compute, &image, &imported.source).await),
        tonic::Code::FailedPrecondition
    );
    let stop = StopVmRequest { vm_id: writer.clone(), force: false, timeout_seconds: 60 };
    compute.stop_vm(stop).await.unwrap();
    let captured = compute.capture_image(req.clone()).await.unwrap().into_inner();
    assert_eq!(captured.image_id, capture);
    assert_ne!(captured.source, imported.source);
    let again = compute.capture_image(req).await.unwrap().into_inner();
    assert_eq!(again, captured);

    // A VM from the capture reads the marker back.
    let reader = new_id();
    let req = CreateVmRequest {
        vm_id: reader.clone(),
        spec: Some(spec("img-reader", &captured.source, READ_MARKER)),
        start: true,
    };
    compute.create_vm(req).await.unwrap();
    bed.serial_shows(&reader, "HCP-TEST: read back [HCP-MARK-7f3a]", 1).await;
    let xml = common::virsh(&["dumpxml", &format!("hcp-{reader}")]);
    assert!(!xml.contains("<kernel>"), "direct kernel boot: {xml}");

    // Everything goes; deletes are idempotent; the pool is left empty.
    for vm in [&reader, &writer] {
        compute.delete_vm(VmRef { vm_id: vm.to_string() }).await.unwrap();
    }
    for (id, source) in [(&capture, &captured.source), (&image, &imported.source)] {
        assert!(delete_image(&mut compute, id, source).await.unwrap(), "{id}");
        assert!(!delete_image(&mut compute, id, source).await.unwrap(), "{id}");
    }
    let vols = common::virsh(&["vol-list", &bed.pool]);
    assert!(!vols.contains("hcp-"), "left in the pool: {vols}");
    let left: Vec<_> = std::fs::read_dir(&bed.pool_dir).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "files left in the pool: {left:?}");
}

/// What a provider that crashed mid upload leaves (the data volume without
/// its completion marker) is no image: CreateVm refuses its source, an
/// import of the same id replaces it, DeleteImage removes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_partial_upload_is_no_image_and_is_replaced() {
    let bed = common::Testbed::new();
    let provider = bed.start_in_process("qemu:///system").await;
    let mut compute = ComputeClient::connect(provider.endpoint.clone()).await.unwrap();
    let partial = |id: &str| {
        let name = format!("hcp-image-{id}.qcow2");
        common::virsh(&["vol-create-as", &bed.pool, &name, "1M", "--format", "raw"]);
        assert!(common::virsh(&["vol-list", &bed.pool]).contains(&name));
    };
    let image = new_id();
    let source = format!("hcp-image-{image}");
    partial(&image);
    let req = CreateVmRequest { vm_id: new_id(), spec: Some(spec("partial", &source, "")), start: false };
    let refused = compute.create_vm(req).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("image.source"), "{refused:?}");

    let file = std::env::temp_dir().join(format!("hcp-image-test-{image}.qcow2"));
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&file)
        .arg("1M")
        .status()
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(made.success());
    let imported = compute.import_image(futures::stream::iter(import_messages(&image, &bytes))).await;
    let imported = imported.unwrap().into_inner();
    assert_eq!((imported.source.as_str(), imported.size_bytes), (source.as_str(), bytes.len() as u64));
    let pool_file = bed.pool_dir.join(format!("hcp-image-{image}.qcow2"));
    assert_eq!(std::fs::read(&pool_file).unwrap(), bytes, "the pool holds the uploaded bytes");
    assert!(delete_image(&mut compute, &image, &source).await.unwrap());
    assert!(!delete_image(&mut compute, &image, &source).await.unwrap());

    // Bytes that are not the announced format: refused, nothing kept.
    let junk = new_id();
    let refused =
        compute.import_image(futures::stream::iter(import_messages(&junk, b"not a qcow2 image"))).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(!common::virsh(&["vol-list", &bed.pool]).contains(&junk));

    // A capture cut short leaves its hidden file; DeleteImage removes it.
    let cut = new_id();
    let part = bed.pool_dir.join(format!(".hcp-image-{cut}.qcow2.part"));
    std::fs::write(&part, b"half").unwrap();
    assert!(delete_image(&mut compute, &cut, "").await.unwrap());
    assert!(!part.exists());

    let other = new_id();
    partial(&other);
    assert!(delete_image(&mut compute, &other, "").await.unwrap());
    let vols = common::virsh(&["vol-list", &bed.pool]);
    assert!(!vols.contains("hcp-"), "left in the pool: {vols}");
}

/// A provider process that aborts after an upload, before marking the
/// image complete, leaves a partial image that the next provider on the
/// same pool treats as none, and the import repeated then succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_cut_by_a_crash_is_done_again() {
    let bed = common::Testbed::new();
    let config = std::env::temp_dir().join(format!("hcp-images-crash-{}.toml", new_id()));
    std::fs::write(&config, bed.config_toml("qemu:///system")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(common::PROVIDER)
        .args(common::args(&config, &listen))
        .env(hcp_provider_libvirt::FAILPOINTS_ENV, "image:import:after-upload")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://{listen}");
    let connected = hcp_testkit::wait_until(common::SLOW, "the provider process answers", || async {
        Ok(ComputeClient::connect(endpoint.clone()).await.ok())
    })
    .await;
    let Ok(mut compute) = connected else {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&config);
        panic!("the provider process did not answer on {listen}");
    };
    let image = new_id();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut raw = import_messages(&image, &bytes);
    if let Some(ImportImageChunk { part: Some(Part::Header(h)) }) = raw.first_mut() {
        h.format = DiskFormat::Raw as i32;
    }
    let cut = compute.import_image(futures::stream::iter(raw.clone())).await;
    let status = child.wait().unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(cut.is_err(), "the import answered although the provider aborted: {cut:?}");
    assert!(!status.success(), "the provider did not abort at the failpoint: {status}");
    let vols = common::virsh(&["vol-list", &bed.pool]);
    assert!(vols.contains(&format!("hcp-image-{image}.raw")), "{vols}");
    assert!(!vols.contains(".complete"), "{vols}");

    let provider = bed.start_in_process("qemu:///system").await;
    let mut compute = ComputeClient::connect(provider.endpoint.clone()).await.unwrap();
    let source = format!("hcp-image-{image}");
    let req = CreateVmRequest { vm_id: new_id(), spec: Some(spec("cut", &source, "")), start: false };
    assert_eq!(code(compute.create_vm(req).await), tonic::Code::InvalidArgument);
    let imported = compute.import_image(futures::stream::iter(raw)).await.unwrap().into_inner();
    assert_eq!(imported.source, source);
    let stored = std::fs::read(bed.pool_dir.join(format!("hcp-image-{image}.raw"))).unwrap();
    assert!(stored == bytes, "the pool does not hold the uploaded bytes");
    assert!(delete_image(&mut compute, &image, &source).await.unwrap());
    let vols = common::virsh(&["vol-list", &bed.pool]);
    assert!(!vols.contains("hcp-"), "left in the pool: {vols}");
}
