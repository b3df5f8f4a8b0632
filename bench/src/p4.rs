//! P4: a real VM through HCP against libvirt by hand. HCP's create (REST
//! accept, job, provider: overlay disk, cloud-init seed, define, start) is
//! timed to the VM being ACTIVE and to the guest's boot banner on its
//! serial port; the baseline is `virsh define` + `virsh start` of the very
//! domain XML HCP produced (its disk and seed copied beforehand, so the
//! baseline does no disk work), timed to `running` and to the same banner.
//! Runs alternate between the two; the figure is the ratio of medians.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hcp_testkit::db::Backend;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::json;

use crate::{Figure, percentile};

const RUNS: usize = 5;
const VMS: &str = "/api/hcp/tenant/v1/projects/p4/vms";
const BANNER: &str = "HCP-GUEST-READY";

fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output()?;
    if !out.status.success() {
        bail!("virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_for(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn banner_in(log: &Path) -> bool {
    std::fs::read(log).map(|b| String::from_utf8_lossy(&b).contains(BANNER)).unwrap_or(false)
}

pub(crate) async fn p4(exe: &Path) -> anyhow::Result<Figure> {
    let root =
        PathBuf::from(std::env::var("HCP_TESTBED_DIR").unwrap_or_else(|_| "/var/tmp/hcp-testbed".into()));
    let guest = root.join("guest");
    anyhow::ensure!(
        guest.join("vmlinux").is_file(),
        "no tiny guest in {}: run `bash scripts/testbed.sh`",
        guest.display()
    );
    let state = root.join("state").join(format!("bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&state)?;
    for dir in [&root, &root.join("state"), &state] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let opts = StackOptions {
        backend: Backend::Postgres,
        nats: true,
        core_toml: "[telemetry]\nlog_filter = \"warn\"\n".into(),
        jobs_toml: "poll_interval_ms = 20\n".into(),
        ..Default::default()
    };
    let mut s = TestStack::start(exe, opts).await?;
    let config = s.dir().join("libvirt.toml");
    std::fs::write(
        &config,
        format!(
            "uri = \"qemu:///system\"\naccelerator = \"tcg\"\nstate_dir = \"{state}\"\n\n\
             [images.tiny]\ndisk = \"{g}/base.qcow2\"\nkernel = \"{g}/vmlinux\"\ninitrd = \"{g}/initrd.gz\"\n\
             cmdline = \"console=tty0 console=ttyS0 panic=-1 quiet\"\n",
            state = state.display(),
            g = guest.display()
        ),
    )?;
    let args = ["provider-libvirt", "--config", &config.display().to_string(), "--listen", "127.0.0.1:0"]
        .map(str::to_owned);
    let addr = s.start_program("libvirt", exe, &args, &[]).await?;
    let ops = s.ops_token();
    for (path, body) in [
        ("/api/hcp/ops/v1/zones", json!({"name": "kvm-1"})),
        (
            "/api/hcp/ops/v1/images",
            json!({"name": "tiny", "os_type": "linux", "source": "tiny", "min_disk_gib": 1}),
        ),
        (
            "/api/hcp/ops/v1/providers",
            json!({"name": "p4", "zone": "kvm-1", "endpoint": format!("http://{addr}")}),
        ),
    ] {
        let r = s.rest.post(path, &ops, &body).await?;
        anyhow::ensure!(r.status == 201, "{path}: {}", r.body);
    }
    let token = s.tenant_token("acme", &["p4"]);

    let (mut hcp_run, mut hcp_boot, mut virsh_run, mut virsh_boot) = (vec![], vec![], vec![], vec![]);
    for i in 0..RUNS {
        // HCP: REST create with start, to ACTIVE, to the banner.
        let t = Instant::now();
        let body = json!({"name": format!("p4-{i}"), "flavor": "small", "image": "tiny", "zone": "kvm-1",
                          "hostname": format!("p4-{i}")});
        let r = s.rest.post(VMS, &token, &body).await?;
        anyhow::ensure!(r.status == 202, "create: {}", r.body);
        let (vm, job) = (r.str("vm_id"), r.str("job_id"));
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let j = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &token).await?;
            match j.str("status").as_str() {
                "SUCCEEDED" => break,
                "FAILED" => bail!("create failed: {}", j.body),
                _ if Instant::now() > deadline => bail!("create did not finish"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        hcp_run.push(t.elapsed().as_secs_f64());
        let log = state.join(&vm).join("serial.log");
        wait_for("the HCP guest's banner", || Ok(banner_in(&log))).await?;
        hcp_boot.push(t.elapsed().as_secs_f64());

        // Baseline: the same XML under another id, files copied beforehand.
        let xml = virsh(&["dumpxml", "--inactive", "--security-info", &vm])?;
        let other = uuid::Uuid::new_v4().to_string();
        let dir = state.join(&other);
        std::fs::create_dir_all(&dir)?;
        for f in ["disk.qcow2", "seed.iso"] {
            std::fs::copy(state.join(&vm).join(f), dir.join(f)).with_context(|| format!("copy {f}"))?;
        }
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, xml.replace(&vm, &other))?;
        let name = format!("hcp-{other}");
        let t = Instant::now();
        virsh(&["define", &xml_path.display().to_string()])?;
        virsh(&["start", &name])?;
        virsh_run.push(t.elapsed().as_secs_f64());
        let log = dir.join("serial.log");
        wait_for("the virsh guest's banner", || Ok(banner_in(&log))).await?;
        virsh_boot.push(t.elapsed().as_secs_f64());

        virsh(&["destroy", &name])?;
        virsh(&["undefine", "--snapshots-metadata", &name])?;
        std::fs::remove_dir_all(&dir)?;
        let r = s.rest.delete(&format!("{VMS}/{vm}"), &token).await?;
        anyhow::ensure!(r.status == 202, "delete: {}", r.body);
        let job = r.str("job_id");
        loop {
            let j = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &token).await?;
            if j.str("status") == "SUCCEEDED" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    s.kill("libvirt").await;
    let _ = std::fs::remove_dir(&state);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(v, 0.5)
    };
    let (hr, hb, vr, vb) =
        (median(&mut hcp_run), median(&mut hcp_boot), median(&mut virsh_run), median(&mut virsh_boot));
    Ok(Figure {
        id: "P4",
        what: format!(
            "real TCG VM: HCP create+start vs virsh define+start of the same XML, median of {RUNS}"
        ),
        value: hr / vr,
        unit: "x (running)",
        target: "report".into(),
        met: None,
        detail: json!({
            "runs": RUNS,
            "ratio_running": hr / vr, "ratio_banner": hb / vb,
            "hcp_to_active_s": hr, "hcp_to_banner_s": hb,
            "virsh_to_running_s": vr, "virsh_to_banner_s": vb,
            "hcp_to_active_all_s": hcp_run, "virsh_to_running_all_s": virsh_run,
        }),
    })
}
