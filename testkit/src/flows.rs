//! Scenarios every hypervisor's system test runs the same way through
//! HCP's REST API, so each test bed shows the same flow as far as it can.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};

use crate::rest::Rest;

const T: &str = "/api/hcp/tenant/v1/projects/demo";

/// A volume's life across two VMs of `zone`: a 5 GiB volume of a new type
/// is hot-attached to a running VM, outlives that VM's deletion, is
/// attached to a second VM, detached, grown while detached, and deleted;
/// a VM made with a kept boot volume is deleted and the boot volume boots
/// a third VM. Everything it made is deleted at the end.
///
/// `vm` holds what the test bed's VMs need besides name, flavor, image
/// and zone (networks, user data).
pub async fn volume_outlives_its_vm(
    rest: &Rest,
    ops: &str,
    tenant: &str,
    zone: &str,
    vm: &Value,
    wait: Duration,
) -> anyhow::Result<()> {
    let r =
        rest.post("/api/hcp/ops/v1/volume-types", ops, &json!({"name": "flow", "max_size_gib": 100})).await?;
    ensure!(r.status == 201 || r.str("code") == "ALREADY_EXISTS", "volume type: {}", r.body);
    let base = vm;
    let vm = |name: &str, extra: Value| {
        let mut body = json!({"name": name, "flavor": "small", "image": "debian-12", "zone": zone});
        for more in [base, &extra] {
            if let (Some(b), Some(e)) = (body.as_object_mut(), more.as_object()) {
                b.extend(e.clone());
            }
        }
        body
    };
    let accepted = |r: crate::rest::Reply, what: String| async move {
        ensure!(r.status == 202, "{what}: {} {}", r.status, r.body);
        let job = rest.finished_job(tenant, &r.str("job_id"), wait).await?;
        ensure!(job["status"] == "SUCCEEDED", "{what}: {job}");
        Ok::<Value, anyhow::Error>(r.body)
    };
    let post = |path: String, body: Value| async move { rest.post(&path, tenant, &body).await };
    let delete = |path: String| async move { rest.raw("DELETE", &path, Some(tenant), None).await };
    let volume_status = |id: String| async move {
        let v = rest.get(&format!("{T}/volumes/{id}"), tenant).await?;
        Ok::<(String, Value), anyhow::Error>((v.str("status"), v.body["attachments"].clone()))
    };

    let first = accepted(post(format!("{T}/vms"), vm("vol-a", json!({}))).await?, "vm a".into()).await?;
    let first = first["vm_id"].as_str().context("vm id")?.to_owned();
    let body = json!({"name": "flow-data", "size_gib": 5, "volume_type": "flow", "zone": zone});
    let v = accepted(post(format!("{T}/volumes"), body).await?, "volume create".into()).await?;
    let volume = v["volume_id"].as_str().context("volume id")?.to_owned();
    accepted(
        post(format!("{T}/vms/{first}:attach"), json!({"volume_id": volume})).await?,
        "hot attach".into(),
    )
    .await?;
    let (status, at) = volume_status(volume.clone()).await?;
    ensure!(status == "IN_USE" && at[0]["vm_id"] == first.as_str(), "after attach: {status} {at}");
    accepted(delete(format!("{T}/vms/{first}")).await?, "vm a's deletion".into()).await?;
    let (status, at) = volume_status(volume.clone()).await?;
    ensure!(status == "AVAILABLE" && at == json!([]), "the volume outlives its vm: {status} {at}");

    let second = accepted(post(format!("{T}/vms"), vm("vol-b", json!({}))).await?, "vm b".into()).await?;
    let second = second["vm_id"].as_str().context("vm id")?.to_owned();
    accepted(
        post(format!("{T}/vms/{second}:attach"), json!({"volume_id": volume})).await?,
        "attach to b".into(),
    )
    .await?;
    accepted(post(format!("{T}/vms/{second}:detach"), json!({"volume_id": volume})).await?, "detach".into())
        .await?;
    accepted(post(format!("{T}/volumes/{volume}:extend"), json!({"size_gib": 6})).await?, "extend".into())
        .await?;
    let v = rest.get(&format!("{T}/volumes/{volume}"), tenant).await?;
    ensure!(v.body["size_gib"] == 6, "after extend: {}", v.body);
    accepted(delete(format!("{T}/volumes/{volume}")).await?, "volume delete".into()).await?;
    accepted(delete(format!("{T}/vms/{second}")).await?, "vm b's deletion".into()).await?;

    // A kept boot volume boots the next VM.
    let boot = json!({"boot_volume": {"volume_type": "flow", "delete_on_vm_delete": false}});
    let third =
        accepted(post(format!("{T}/vms"), vm("vol-c", boot)).await?, "vm c on a boot volume".into()).await?;
    let third = third["vm_id"].as_str().context("vm id")?.to_owned();
    let held = rest.get(&format!("{T}/volumes?vm_id={third}"), tenant).await?;
    let boot_id = held.body["volumes"][0]["volume_id"].as_str().context("the boot volume")?.to_owned();
    accepted(delete(format!("{T}/vms/{third}")).await?, "vm c's deletion".into()).await?;
    let (status, _) = volume_status(boot_id.clone()).await?;
    ensure!(status == "AVAILABLE", "a kept boot volume outlives its vm: {status}");
    let from = json!({"boot_volume": {"volume_id": boot_id}});
    let fourth = accepted(post(format!("{T}/vms"), vm("vol-d", from)).await?, "vm d from it".into()).await?;
    let fourth = fourth["vm_id"].as_str().context("vm id")?.to_owned();
    let (status, at) = volume_status(boot_id.clone()).await?;
    ensure!(
        status == "IN_USE" && at[0]["vm_id"] == fourth.as_str() && at[0]["device_index"] == 0,
        "{status} {at}"
    );
    accepted(delete(format!("{T}/vms/{fourth}")).await?, "vm d's deletion".into()).await?;
    accepted(delete(format!("{T}/volumes/{boot_id}")).await?, "boot volume delete".into()).await?;
    Ok(())
}

/// Core's `[egress]` for tests that import from a file server on loopback
/// (`crate::files`): plain http, and 127.0.0.0/8 opted in.
pub const LOOPBACK_EGRESS: &str = "[egress]\nallow_http = true\nallow_networks = [\"127.0.0.0/8\"]\n";

/// A small qcow2 disk made by qemu-img (64 MiB of virtual size), its bytes.
pub fn small_qcow2() -> anyhow::Result<Vec<u8>> {
    let dir = crate::TempDir::new()?;
    let path = dir.path().join("small.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .output()
        .context("qemu-img runs")?;
    ensure!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    Ok(std::fs::read(path)?)
}

/// Imports `bytes` (a `format` file served at `url`) as image `name` onto
/// provider `provider` through the ops API, waits for the job, and checks
/// the image is AVAILABLE with a backing on the provider and no other;
/// then creates a VM of `zone` from it (`vm` holds what the test bed's VMs
/// need besides name, flavor, image and zone), waits for it to be ACTIVE,
/// and deletes the VM and the image (the provider's copy with it).
/// Returns the backing the provider answered.
#[allow(clippy::too_many_arguments)]
pub async fn image_imported_and_used(
    rest: &Rest,
    ops: &str,
    tenant: &str,
    (name, url, bytes, format): (&str, &str, &[u8], &str),
    provider: &str,
    zone: &str,
    vm: &Value,
    wait: Duration,
) -> anyhow::Result<String> {
    use sha2::Digest;
    let sum = format!("{:x}", sha2::Sha256::digest(bytes));
    let r = rest
        .post(
            "/api/hcp/ops/v1/images:import",
            ops,
            &json!({"name": name, "url": url, "sha256": sum, "format": format, "providers": [provider]}),
        )
        .await?;
    ensure!(r.status == 202, "import: {} {}", r.status, r.body);
    let job = r.str("job_id");
    let done = crate::wait_until(wait, &format!("import job {job}"), || async {
        let j = rest.get(&format!("/api/hcp/ops/v1/jobs/{job}"), ops).await?;
        Ok(["SUCCEEDED", "FAILED", "CANCELLED"].contains(&j.str("status").as_str()).then_some(j.body))
    })
    .await?;
    ensure!(done["status"] == "SUCCEEDED", "import: {done}");
    let image = rest.get(&format!("/api/hcp/common/v1/images/{name}"), ops).await?.body;
    ensure!(image["status"] == "AVAILABLE", "image: {image}");
    let backings = image["backings"].as_object().context("backings")?;
    ensure!(backings.len() == 1, "one backing: {image}");
    let backing =
        backings.get(provider).and_then(|b| b.as_str()).context("the provider's backing")?.to_owned();
    let mut body = vm.clone();
    body["name"] = json!(format!("{name}-vm"));
    body["flavor"] = json!("small");
    body["image"] = json!(name);
    body["zone"] = json!(zone);
    let r = rest.post(&format!("{T}/vms"), tenant, &body).await?;
    ensure!(r.status == 202, "create: {} {}", r.status, r.body);
    let vm_id = r.str("vm_id");
    let j = rest.finished_job(tenant, &r.str("job_id"), wait).await?;
    ensure!(j["status"] == "SUCCEEDED", "create from the image: {j}");
    let r = rest.delete(&format!("{T}/vms/{vm_id}"), tenant).await?;
    let j = rest.finished_job(tenant, &r.str("job_id"), wait).await?;
    ensure!(j["status"] == "SUCCEEDED", "delete: {j}");
    let r = rest.delete(&format!("/api/hcp/ops/v1/images/{name}"), ops).await?;
    ensure!(r.status == 200, "image delete: {} {}", r.status, r.body);
    let job = r.body["job_id"].as_str().context("a job removes the stored image")?.to_owned();
    let done = crate::wait_until(wait, &format!("image delete job {job}"), || async {
        let j = rest.get(&format!("/api/hcp/ops/v1/jobs/{job}"), ops).await?;
        Ok(["SUCCEEDED", "FAILED", "CANCELLED"].contains(&j.str("status").as_str()).then_some(j.body))
    })
    .await?;
    ensure!(done["status"] == "SUCCEEDED", "image delete: {done}");
    Ok(backing)
}
