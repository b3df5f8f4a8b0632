//! Images through HCP on real QEMU guests: an operator imports the test
//! bed's self-booting disk with `hcp ops image import` from a URL (a file
//! server the test runs); a tenant's VM boots from it by its own bootloader
//! (no kernel in the domain) and writes a marker raw into its disk; the
//! tenant captures the stopped VM into a private image, and a VM from that
//! image reads the marker back. Everything is deleted through the API and
//! the pool holds no image afterwards.

mod common;

use std::time::Duration;

use common::{Kvm, domstate};
use hcp_testkit::files::{FileServer, Serve};
use hcp_testkit::stack::StackOptions;
use serde_json::{Value, json};
use sha2::Digest;

const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const SLOW: Duration = Duration::from_secs(300);

/// Writes `HCP-MARK-` and a tag raw at 512 MiB into the root disk (the
/// guest runs from RAM; its disk is free), flushed before the banner.
const WRITE_MARKER: &str = "#!/bin/sh\nprintf 'HCP-MARK-%s' 51c2 > /tmp/mark\n\
dd if=/tmp/mark of=/dev/vda bs=1M seek=512 conv=notrunc 2>/dev/null && sync && \
echo \"HCP-TEST: marker written\" > /dev/ttyS0\n";

/// Reads 13 bytes at 512 MiB of the root disk back to the serial port.
const READ_MARKER: &str = "#!/bin/sh\n\
echo \"HCP-TEST: read back [$(dd if=/dev/vda bs=1M skip=512 count=1 2>/dev/null | head -c 13)]\" > /dev/ttyS0\n";

async fn create(kvm: &Kvm, name: &str, image: &str, user_data: &str) -> String {
    let body =
        json!({"name": name, "flavor": "small", "image": image, "zone": "kvm-1", "user_data": user_data});
    let r = kvm.stack.rest.post(VMS, &kvm.tenant, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    r.str("vm_id")
}

async fn ops_job(kvm: &Kvm, job: &str) -> Value {
    hcp_testkit::wait_until(SLOW, &format!("job {job}"), || async {
        let j = kvm.stack.rest.get(&format!("/api/hcp/ops/v1/jobs/{job}"), &kvm.ops).await?;
        Ok(["SUCCEEDED", "FAILED", "CANCELLED"].contains(&j.str("status").as_str()).then_some(j.body))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_imported_with_the_cli_boots_a_guest_and_a_capture_keeps_its_disk() {
    let kvm = Kvm::start_with(StackOptions {
        core_toml: hcp_testkit::flows::LOOPBACK_EGRESS.to_owned(),
        ..Default::default()
    })
    .await;
    let boot = kvm.bed.guest.join("boot.qcow2");
    assert!(boot.is_file(), "{} is missing: run `bash scripts/testbed.sh`", boot.display());
    let bytes = std::fs::read(&boot).unwrap();
    let sum = format!("{:x}", sha2::Sha256::digest(&bytes));
    let files = FileServer::start(vec![("/debian-tiny.qcow2", Serve::File(bytes))]).await.unwrap();

    // The operator's command, as the README shows it.
    let out = std::process::Command::new(common::hcp_exe())
        .args(["ops", "image", "import", "debian-tiny", "--url", &files.url("/debian-tiny.qcow2")])
        .args(["--sha256", &sum, "--format", "qcow2", "--provider", "kvm-1-libvirt", "--wait", "-o", "json"])
        .env("HCP_ENDPOINT", format!("http://{}", kvm.stack.gateway))
        .env("HCP_TOKEN", &kvm.ops)
        .env("HCP_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hcp ops image import: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let image: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(image["status"], "AVAILABLE", "{image}");
    let backing = image["backings"]["kvm-1-libvirt"].as_str().unwrap().to_owned();
    let vols = common::virsh(&["vol-list", &kvm.bed.pool]);
    assert!(vols.contains(&format!("{backing}.qcow2")), "the image is a volume of the pool: {vols}");

    // A tenant's VM boots from it by the disk's own bootloader.
    let writer = create(&kvm, "writer", "debian-tiny", WRITE_MARKER).await;
    let xml = common::virsh(&["dumpxml", &format!("hcp-{writer}")]);
    assert!(!xml.contains("<kernel>") && !xml.contains("<initrd>"), "direct kernel boot: {xml}");
    kvm.serial_shows(&writer, "HCP-GUEST-READY hostname=writer", 1).await;
    kvm.serial_shows(&writer, "HCP-TEST: marker written", 1).await;

    // Stopped, it is captured into the project's private image.
    let r = kvm
        .stack
        .rest
        .post(&format!("{VMS}/{writer}:capture"), &kvm.tenant, &json!({"image_name": "golden"}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "a running VM is not captured: {}", r.body);
    let r = kvm
        .stack
        .rest
        .post(&format!("{VMS}/{writer}:stop"), &kvm.tenant, &json!({"force": true}))
        .await
        .unwrap();
    kvm.succeed(&r.str("job_id")).await;
    let r = kvm
        .stack
        .rest
        .post(&format!("{VMS}/{writer}:capture"), &kvm.tenant, &json!({"image_name": "golden"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    assert_eq!(domstate(&writer), "shut off", "the captured VM is as it was");

    // A VM from the capture reads the marker back.
    let reader = create(&kvm, "reader", "golden", READ_MARKER).await;
    kvm.serial_shows(&reader, "HCP-TEST: read back [HCP-MARK-51c2]", 1).await;

    // Everything goes through the API; the pool keeps no image.
    for vm in [&writer, &reader] {
        let r = kvm.stack.rest.delete(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap();
        kvm.succeed(&r.str("job_id")).await;
    }
    let r =
        kvm.stack.rest.delete("/api/hcp/tenant/v1/projects/demo/images/golden", &kvm.tenant).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    let r = kvm.stack.rest.delete("/api/hcp/ops/v1/images/debian-tiny", &kvm.ops).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let j = ops_job(&kvm, r.body["job_id"].as_str().unwrap()).await;
    assert_eq!(j["status"], "SUCCEEDED", "{j}");
    let vols = common::virsh(&["vol-list", &kvm.bed.pool]);
    assert!(!vols.contains("hcp-image-"), "images left in the pool: {vols}");
}
