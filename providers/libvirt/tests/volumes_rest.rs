//! A volume through HCP on real guests: a tenant makes a 5 GiB volume over
//! REST, attaches it to a running libvirt guest (TCG), the guest sees the
//! disk at its size and writes to it; the VM is deleted, the volume stays,
//! and a new VM it is attached to reads what the first wrote. The guests'
//! reports on their serial ports are the proof (the disk watcher of
//! `common::USER_DATA`).

mod common;

use common::{Kvm, USER_DATA, VMS, report};
use serde_json::{Value, json};

const VOLUMES: &str = "/api/hcp/tenant/v1/projects/demo/volumes";

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_written_by_one_guest_is_read_by_the_next() {
    let kvm = Kvm::start("").await;
    let r = kvm
        .stack
        .rest
        .post("/api/hcp/ops/v1/volume-types", &kvm.ops, &json!({"name": "standard", "max_size_gib": 100}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let caps = kvm.stack.rest.get("/api/hcp/ops/v1/providers", &kvm.ops).await.unwrap();
    let libvirt = caps.body["providers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "kvm-1-libvirt")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(libvirt["capabilities"]["supports_volumes"], true, "{libvirt}");

    let (writer, job) =
        kvm.create("vol-writer", json!({"hostname": "vol-writer", "user_data": USER_DATA})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&writer, "HCP-GUEST-READY", 1).await;

    let body = json!({"name": "data", "size_gib": 5, "volume_type": "standard", "zone": "kvm-1"});
    let created = kvm.op("POST", VOLUMES, &body.to_string()).await;
    let volume = created["volume_id"].as_str().unwrap().to_owned();
    // Hot attach to the running guest: it sees a 5 GiB disk, empty, and
    // writes its marker on it.
    kvm.op("POST", &format!("{VMS}/{writer}:attach"), &json!({"volume_id": volume}).to_string()).await;
    kvm.serial_shows(&writer, &report(&volume, 5, ""), 1).await;
    kvm.serial_shows(&writer, "HCP-VOL: wrote serial=", 1).await;
    let v = kvm.stack.rest.get(&format!("{VOLUMES}/{volume}"), &kvm.tenant).await.unwrap();
    assert_eq!(
        (v.str("status"), &v.body["attachments"][0]["vm_id"]),
        ("IN_USE".into(), &json!(writer)),
        "{}",
        v.body
    );

    // The VM goes; the volume stays, detached, with its data.
    let r = kvm.stack.rest.raw("DELETE", &format!("{VMS}/{writer}"), Some(&kvm.tenant), None).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    let v = kvm.stack.rest.get(&format!("{VOLUMES}/{volume}"), &kvm.tenant).await.unwrap();
    assert_eq!((v.str("status"), &v.body["attachments"]), ("AVAILABLE".into(), &json!([])), "{}", v.body);

    // A new guest gets it and reads the first one's marker.
    let (reader, job) =
        kvm.create("vol-reader", json!({"hostname": "vol-reader", "user_data": USER_DATA})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&reader, "HCP-GUEST-READY", 1).await;
    kvm.op("POST", &format!("{VMS}/{reader}:attach"), &json!({"volume_id": volume}).to_string()).await;
    let marker = format!("HCP-DATA-{}", hcp_provider_libvirt::storage::disk_serial(&volume));
    kvm.serial_shows(&reader, &report(&volume, 5, &marker), 1).await;

    // Clean up through HCP: detach, delete both.
    kvm.op("POST", &format!("{VMS}/{reader}:detach"), &json!({"volume_id": volume}).to_string()).await;
    let r =
        kvm.stack.rest.raw("DELETE", &format!("{VOLUMES}/{volume}"), Some(&kvm.tenant), None).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    let r = kvm.stack.rest.raw("DELETE", &format!("{VMS}/{reader}"), Some(&kvm.tenant), None).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    let left = common::virsh(&["vol-list", &kvm.bed.pool]);
    assert!(!left.contains(&volume), "the volume's file is gone from the pool: {left}");
}

/// The provider process dies at each volume step, after its effect and
/// before its answer; core's job runs again against the restarted
/// provider and ends as asked, with exactly one volume file and the disk
/// on the domain exactly when attached: nothing lost, duplicated or leaked.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_volume_step_converges() {
    let mut kvm = Kvm::start("max_attempts = 100\nbackoff_max_ms = 500\n").await;
    let r = kvm
        .stack
        .rest
        .post("/api/hcp/ops/v1/volume-types", &kvm.ops, &json!({"name": "standard", "max_size_gib": 100}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let (vm, job) = kvm.create("crashy", json!({})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&vm, "HCP-GUEST-READY", 1).await;
    let body = json!({"name": "data", "size_gib": 1, "volume_type": "standard", "zone": "kvm-1"});
    let volume = kvm.op("POST", VOLUMES, &body.to_string()).await["volume_id"].as_str().unwrap().to_owned();
    let attach = (format!("{VMS}/{vm}:attach"), json!({"volume_id": volume}).to_string());
    let detach = (format!("{VMS}/{vm}:detach"), json!({"volume_id": volume}).to_string());
    let extend = (format!("{VOLUMES}/{volume}:extend"), json!({"size_gib": 2}).to_string());
    let delete = (format!("{VOLUMES}/{volume}"), String::new());
    // libvirt's volumes are host-local: the first attach makes the file.
    let steps = [
        ("volume:create:after-create", "POST", &attach, "IN_USE", true),
        ("volume:extend:after-resize", "POST", &extend, "IN_USE", true),
        ("volume:detach:after-detach", "POST", &detach, "AVAILABLE", false),
        ("volume:attach:after-attach", "POST", &attach, "IN_USE", true),
    ];
    for (failpoint, method, (path, body), status, attached) in steps {
        crash_and_finish(&mut kvm, failpoint, method, path, body).await;
        let v = kvm.stack.rest.get(&format!("{VOLUMES}/{volume}"), &kvm.tenant).await.unwrap();
        assert_eq!(v.str("status"), status, "after a crash at {failpoint}: {}", v.body);
        assert_eq!(volume_files(&kvm), vec![format!("hcp-vol-{volume}.qcow2")], "one file after {failpoint}");
        let on_domain =
            common::virsh(&["domblklist", &format!("hcp-{vm}"), "--details"]).matches(&volume).count();
        assert_eq!(on_domain, usize::from(attached), "the disk on the domain after {failpoint}");
    }
    assert_eq!(
        kvm.stack.rest.get(&format!("{VOLUMES}/{volume}"), &kvm.tenant).await.unwrap().body["size_gib"],
        2
    );
    kvm.op("POST", &detach.0, &detach.1).await;
    crash_and_finish(&mut kvm, "volume:delete:after-delete", "DELETE", &delete.0, &delete.1).await;
    let v = kvm.stack.rest.get(&format!("{VOLUMES}/{volume}"), &kvm.tenant).await.unwrap();
    assert_eq!(v.str("status"), "DELETED", "{}", v.body);
    assert!(volume_files(&kvm).is_empty(), "the file is gone: {:?}", volume_files(&kvm));
    let r = kvm.stack.rest.raw("DELETE", &format!("{VMS}/{vm}"), Some(&kvm.tenant), None).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
}

/// Restarts the provider with `failpoint`, sends the operation, waits for
/// the provider to die of it, restarts it clean and waits for the job.
async fn crash_and_finish(kvm: &mut Kvm, failpoint: &str, method: &str, path: &str, body: &str) {
    kvm.restart_provider(Some(failpoint)).await;
    let body = (!body.is_empty()).then_some(body);
    let r = kvm.stack.rest.raw(method, path, Some(&kvm.tenant), body).await.unwrap();
    assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
    let exit = kvm.stack.wait_exit("libvirt", common::SLOW).await.unwrap();
    assert!(!exit.success(), "the provider should have died at {failpoint}: {exit}");
    kvm.restart_provider(None).await;
    kvm.succeed(&r.str("job_id")).await;
}

/// The HCP volume files in the test's pool directory.
fn volume_files(kvm: &Kvm) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(&kvm.bed.pool_dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    files.retain(|f| f.starts_with("hcp-vol-"));
    files.sort();
    files
}

/// A boot volume through HCP on real guests: the VM's root disk made as a
/// volume from the image, kept when the VM goes, and booting a new VM.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_boot_volume_boots_the_next_vm() {
    let kvm = Kvm::start("").await;
    let r = kvm
        .stack
        .rest
        .post("/api/hcp/ops/v1/volume-types", &kvm.ops, &json!({"name": "standard", "max_size_gib": 100}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let boot = json!({"volume_type": "standard", "delete_on_vm_delete": false});
    let (first, job) = kvm.create("boot-1", json!({"hostname": "boot-one", "boot_volume": boot})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&first, "HCP-GUEST-READY hostname=boot-one", 1).await;
    let held = kvm.stack.rest.get(&format!("{VOLUMES}?vm_id={first}"), &kvm.tenant).await.unwrap();
    let volume = held.body["volumes"][0]["volume_id"].as_str().unwrap().to_owned();
    assert_eq!(held.body["volumes"][0]["attachments"][0]["device_index"], 0, "{}", held.body);
    let r = kvm.stack.rest.raw("DELETE", &format!("{VMS}/{first}"), Some(&kvm.tenant), None).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
    let v = kvm.stack.rest.get(&format!("{VOLUMES}/{volume}"), &kvm.tenant).await.unwrap();
    assert_eq!(v.str("status"), "AVAILABLE", "{}", v.body);

    // The next VM boots from it (its hostname comes from its own seed).
    let (second, job) =
        kvm.create("boot-2", json!({"hostname": "boot-two", "boot_volume": {"volume_id": volume}})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&second, "HCP-GUEST-READY hostname=boot-two", 1).await;
    let disks = common::virsh(&["domblklist", &format!("hcp-{second}"), "--details"]);
    assert!(disks.contains(&format!("hcp-vol-{volume}")), "the root disk is the volume: {disks}");
    let r = kvm.stack.rest.raw("DELETE", &format!("{VMS}/{second}"), Some(&kvm.tenant), None).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
    let r =
        kvm.stack.rest.raw("DELETE", &format!("{VOLUMES}/{volume}"), Some(&kvm.tenant), None).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
    assert!(!common::virsh(&["vol-list", &kvm.bed.pool]).contains(&volume));
}
