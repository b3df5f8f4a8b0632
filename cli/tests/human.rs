//! The `hcp` command as people drive it, against a running stack: VMs
//! created, listed, stopped and shown in every output format with `--wait`;
//! jobs listed; errors that show the API's code and name the field; a failed
//! job exiting non-zero with its error; a profile whose token comes from a
//! command; shell completions; and one interactive session under tmux whose
//! screen shows the live progress line and its end.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use hcp_proto::sim::sim_control_client::SimControlClient;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::Value;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

struct Cli {
    env: Vec<(String, String)>,
}

impl Cli {
    fn for_stack(s: &TestStack, token: &str) -> Self {
        Self {
            env: vec![
                ("HCP_ENDPOINT".into(), format!("http://{}", s.gateway)),
                ("HCP_TOKEN".into(), token.into()),
                ("HCP_PROJECT".into(), "demo".into()),
                // Never the config file of whoever runs the tests.
                ("HCP_CONFIG".into(), s.dir().join("no-config.toml").display().to_string()),
            ],
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(HCP);
        cmd.args(args).env_remove("HCP_PROFILE").env_remove("HCP_OUTPUT");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("hcp finishes")
            .expect("hcp runs")
    }

    /// Runs and expects success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "hcp {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.ok(&all).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("hcp {args:?}: not JSON ({e}): {text}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn people_drive_vms_and_jobs_with_the_hcp_command() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);

    // Create and wait: stdout is the VM as it ended; the progress is on stderr.
    let out = cli
        .run(&["vm", "create", "web-1", "--flavor", "small", "--image", "debian-12", "--wait", "-o", "json"])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vm: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((vm["name"].as_str(), vm["status"].as_str()), (Some("web-1"), Some("ACTIVE")), "{vm}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vm.create SUCCEEDED"), "{stderr}");
    let id = vm["vm_id"].as_str().unwrap().to_owned();

    // A table for people, by name or id.
    let table = cli.ok(&["vm", "list"]).await;
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("VM_ID"), "{table}");
    let row = lines.next().unwrap();
    assert!(row.starts_with(&id) && row.contains("web-1") && row.contains("ACTIVE"), "{table}");
    assert_eq!(cli.json(&["vm", "show", "web-1"]).await["vm_id"], id.as_str());

    // Stop by name, waiting; YAML out.
    let yaml = cli.ok(&["vm", "stop", "web-1", "--wait", "-o", "yaml"]).await;
    assert!(yaml.lines().any(|l| l == "status: \"STOPPED\""), "{yaml}");
    let jobs = cli.json(&["job", "list"]).await;
    let kinds: Vec<&str> =
        jobs["jobs"].as_array().unwrap().iter().filter_map(|j| j["kind"].as_str()).collect();
    assert_eq!(kinds, ["vm.stop", "vm.create"], "{jobs}");
    // Without --wait: what was accepted, at once.
    let accepted = cli.json(&["vm", "start", &id]).await;
    let job = accepted["job_id"].as_str().unwrap().to_owned();
    assert_eq!(cli.json(&["job", "watch", &job]).await["status"], "SUCCEEDED");

    // Errors show the API's code and name the field; exit 1.
    let out = cli.run(&["vm", "create", "bad", "--flavor", "nope", "--image", "debian-12"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("(field: flavor)"), "{err}");
    let out = cli.run(&["vm", "show", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named \"nobody\""));

    // A job that fails: --wait exits non-zero with the job's error.
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest {
        fault: Some(hcp_proto::sim::Fault {
            operation: "RebootVm".into(),
            code: "FAILED_PRECONDITION".into(),
            message: "the guest said no".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let out = cli.run(&["vm", "reboot", "web-1", "--wait"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    // Tenants get the job's code and a message without the hypervisor's
    // detail (operators see it with `hcp ops job`).
    assert!(err.contains("FAILED: CONFLICT:"), "{err}");
    let failed_job = err.split_whitespace().skip_while(|w| *w != "job").nth(1).unwrap().to_owned();
    let ops_view = Cli::for_stack(&s, &s.ops_token()).json(&["ops", "job", &failed_job]).await;
    assert!(ops_view.to_string().contains("the guest said no"), "{ops_view}");
    sim.clear(hcp_proto::sim::ClearRequest::default()).await.unwrap();

    // A profile whose token comes from a command; the environment does not
    // name the endpoint, token or project.
    let config = s.dir().join("hcp-config.toml");
    std::fs::write(
        &config,
        format!(
            "default_profile = \"lab\"\n[profiles.lab]\nendpoint = \"http://{}\"\nproject = \"demo\"\ntoken_command = \"printf %s {token}\"\n",
            s.gateway
        ),
    )
    .unwrap();
    let profiled = Cli { env: vec![("HCP_CONFIG".into(), config.display().to_string())] };
    assert_eq!(profiled.json(&["vm", "show", "web-1"]).await["vm_id"], id.as_str());
    let catalog = profiled.ok(&["catalog", "flavors"]).await;
    assert!(catalog.lines().any(|l| l.starts_with("small ")), "{catalog}");

    // Operators: providers and their health.
    let ops = Cli::for_stack(&s, &s.ops_token());
    let providers = ops.ok(&["ops", "provider", "list"]).await;
    assert!(providers.contains("sim-1") && providers.contains("HEALTHY"), "{providers}");
    let flavor = ops
        .json(&["ops", "flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "5"])
        .await;
    assert_eq!(flavor["memory_mib"], 256, "{flavor}");
    assert!(cli.ok(&["catalog", "flavors"]).await.lines().any(|l| l.starts_with("tiny ")));
    ops.ok(&["ops", "flavor", "delete", "tiny"]).await;
    let images = ops.ok(&["ops", "image", "list"]).await;
    assert!(images.lines().any(|l| l.starts_with("debian-12 ")), "{images}");
    // A tenant token cannot do what operators do.
    let out = cli
        .run(&["ops", "flavor", "create", "x", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "5"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let quota = ops.json(&["ops", "quota", "set", "acme", "demo", "--max-instances", "5"]).await;
    assert_eq!(quota["max_instances"], 5, "{quota}");
    let quota = ops.json(&["ops", "quota", "show", "acme", "demo"]).await;
    assert_eq!(
        (quota["max_instances"].as_u64(), quota["usage"]["instances"].as_str()),
        (Some(5), Some("1")),
        "{quota}"
    );
    // An update keeps the limits it does not name.
    let quota = ops.json(&["ops", "quota", "update", "acme", "demo", "--max-vcpus", "9"]).await;
    assert_eq!((quota["max_instances"].as_u64(), quota["max_vcpus"].as_u64()), (Some(5), Some(9)), "{quota}");
    let quota = ops.json(&["ops", "quota", "update", "acme", "demo", "--unlimited", "max_vcpus"]).await;
    assert_eq!((quota["max_instances"].as_u64(), quota["max_vcpus"].as_u64()), (Some(5), None), "{quota}");
    // Networks: created once, replaced on purpose.
    ops.ok(&["ops", "network", "create", "zone-1", "lab", "--backing", "sim-1=br-lab"]).await;
    let out = ops.run(&["ops", "network", "create", "zone-1", "lab"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ALREADY_EXISTS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replaced =
        ops.json(&["ops", "network", "replace", "zone-1", "lab", "--backing", "sim-1=br-new"]).await;
    assert_eq!(replaced["network"]["backings"]["sim-1"], "br-new", "{replaced}");
    ops.ok(&["ops", "network", "delete", "zone-1", "lab"]).await;
    let table = ops.ok(&["ops", "quota", "show", "acme", "demo"]).await;
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("acme ") && l.contains(" 5 ")), "{table}");
    ops.ok(&["ops", "zone", "create", "zone-9", "--description", "spare"]).await;
    assert!(cli.ok(&["catalog", "zones"]).await.lines().any(|l| l.starts_with("zone-9 ")));
    ops.ok(&["ops", "zone", "delete", "zone-9"]).await;
    let audit = ops.json(&["ops", "audit", "--resource", &id]).await;
    let actions: Vec<&str> =
        audit["events"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.contains(&"vm.create") && actions.contains(&"vm.stop"), "{audit}");

    // Jobs: one shown; a finished one cannot be cancelled (the API says why).
    assert_eq!(cli.json(&["job", "show", &job]).await["kind"], "vm.start");
    let out = cli.run(&["job", "cancel", &job]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: CONFLICT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rename and retag (no job), then refer to the new name.
    let updated = cli.json(&["vm", "update", "web-1", "--name", "web-2", "--tag", "blue"]).await;
    assert_eq!(
        (updated["name"].as_str(), updated["tags"][0].as_str()),
        (Some("web-2"), Some("blue")),
        "{updated}"
    );

    // Completions for the shells.
    let bash = cli.ok(&["completions", "bash"]).await;
    assert!(bash.contains("_hcp()") && bash.contains("vm"), "bash completions");
    cli.ok(&["vm", "delete", "web-2", "--wait"]).await;
}

/// Kills a tmux session when dropped.
struct Tmux(String);

impl Tmux {
    /// Runs `script` in a new detached session of `width` x `height`.
    fn start(script: &Path, width: u16, height: u16) -> Self {
        let session = Self(format!("hcp-test-{}", uuid::Uuid::new_v4().simple()));
        let (w, h) = (width.to_string(), height.to_string());
        let script = script.display().to_string();
        let status = std::process::Command::new("tmux")
            .args(["new-session", "-d", "-s", &session.0, "-x", &w, "-y", &h, "sh", &script])
            .status()
            .unwrap();
        assert!(status.success());
        session
    }

    /// What the session's pane shows now (trailing blanks dropped).
    fn screen(&self) -> String {
        let out =
            std::process::Command::new("tmux").args(["capture-pane", "-p", "-t", &self.0]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux").args(["kill-session", "-t", &self.0]).status();
    }
}

fn tmux_available() -> bool {
    std::process::Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interactive_terminal_shows_the_live_progress_and_the_result() {
    if !tmux_available() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run the tmux session");
        eprintln!("SKIP: no tmux");
        return;
    }
    // A slow create, so the live line is on the screen for a while.
    let opts = StackOptions { sim_args: vec!["--latency-ms".into(), "1500".into()], ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let script: PathBuf = s.dir().join("session.sh");
    std::fs::write(
        &script,
        format!(
            "export HCP_ENDPOINT=http://{} HCP_TOKEN={token} HCP_PROJECT=demo HCP_CONFIG=/nonexistent\n\
             {HCP} vm create tty-1 --flavor small --image debian-12 --wait\necho \"exit=$?\"\nsleep 600\n",
            s.gateway
        ),
    )
    .unwrap();
    let session = Tmux::start(&script, 160, 20);
    let screen = || session.screen();
    // While the job runs: the live line, redrawn in place.
    let live = hcp_testkit::wait_until(Duration::from_secs(60), "the live progress line", || async {
        let text = screen();
        Ok(text.lines().find(|l| l.contains("vm.create") && l.contains("attempt 1/")).map(str::to_owned))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", screen()));
    assert!(live.contains("RUNNING") || live.contains("QUEUED"), "{live}");
    // Then the end: a check mark line, the VM's row, exit 0; the live line
    // is gone (it was redrawn, not appended).
    let end = hcp_testkit::wait_until(Duration::from_secs(60), "the end of the create", || async {
        let text = screen();
        Ok(text.contains("exit=").then_some(text))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", screen()));
    assert!(end.lines().any(|l| l.starts_with("✓ vm.create SUCCEEDED in ")), "{end}");
    assert!(end.lines().any(|l| l.contains("tty-1") && l.contains("ACTIVE")), "{end}");
    assert!(end.contains("exit=0"), "{end}");
    assert!(!end.lines().any(|l| l.contains("attempt 1/")), "the live line stays on screen:\n{end}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_serial_console_opens_in_the_users_terminal() {
    if !tmux_available() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run the tmux session");
        eprintln!("SKIP: no tmux");
        return;
    }
    let opts = StackOptions { console_urls_name_the_gateway: true, ..StackOptions::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);
    cli.ok(&["vm", "create", "ser-1", "--flavor", "small", "--image", "debian-12", "--wait"]).await;
    // The boot log, as the guest wrote it.
    let log = cli.ok(&["vm", "console-log", "ser-1", "--tail", "1"]).await;
    assert_eq!(log.trim_end(), "HCP-SIM-READY hostname=ser-1 native_id=sim-1", "{log:?}");

    let script: PathBuf = s.dir().join("serial.sh");
    std::fs::write(
        &script,
        format!(
            "export HCP_ENDPOINT=http://{} HCP_TOKEN={token} HCP_PROJECT=demo HCP_CONFIG=/nonexistent\n\
             {HCP} vm console ser-1 --type serial\necho \"exit=$?\"\nstty -a | grep -o -- '-\\?icanon'\nsleep 600\n",
            s.gateway
        ),
    )
    .unwrap();
    let session = Tmux::start(&script, 120, 30);
    let screen = || session.screen();
    let shows = |what: &'static str| {
        let screen = &screen;
        async move {
            hcp_testkit::wait_until(Duration::from_secs(60), what, || async {
                let text = screen();
                Ok(text.contains(what).then_some(text))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", screen()))
        }
    };
    // (capture-pane drops trailing blanks: the prompt's space is not shown.)
    shows("root@ser-1:~#").await;
    // Keys go to the guest as they are typed (raw mode: the guest echoes).
    let keys = |keys: &[&str]| {
        let mut args = vec!["send-keys", "-t", session.0.as_str()];
        args.extend_from_slice(keys);
        assert!(std::process::Command::new("tmux").args(&args).status().unwrap().success());
    };
    keys(&["echo from-tmux", "Enter"]);
    let text = shows("from-tmux\nroot@ser-1:~#").await;
    assert!(text.contains("root@ser-1:~# echo from-tmux\nfrom-tmux"), "{text}");
    // Ctrl-] leaves; the terminal is itself again (canonical mode back on).
    keys(&["C-]"]);
    let end = shows("exit=").await;
    assert!(end.contains("Left the serial console.") && end.contains("exit=0"), "{end}");
    let end = shows("icanon").await;
    assert!(end.lines().any(|l| l.trim() == "icanon"), "the terminal stayed raw:\n{end}");
}

#[tokio::test(flavor = "multi_thread")]
async fn people_manage_volumes_with_the_hcp_command() {
    let opts = StackOptions {
        sim_capabilities: "cloud_init,console_vnc,volumes,hot_attach,volume_extend_in_use".into(),
        ..StackOptions::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let ops = Cli::for_stack(&s, &s.ops_token());
    let t = ops
        .json(&[
            "ops",
            "volume-type",
            "create",
            "standard",
            "--max-size-gib",
            "50",
            "--storage",
            "sim-1=default",
        ])
        .await;
    assert_eq!(t["storage"], serde_json::json!({"sim-1": "default"}), "operators see where it lives: {t}");
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);
    let types = cli.json(&["catalog", "volume-types"]).await;
    assert_eq!(types["volume_types"][0]["name"], "standard", "{types}");
    assert!(types["volume_types"][0].get("storage").is_none_or(|s| s == &serde_json::json!({})), "{types}");
    cli.ok(&["vm", "create", "app", "--flavor", "small", "--image", "debian-12", "--wait"]).await;

    let v = cli.json(&["volume", "create", "data", "--size", "5", "--type", "standard", "--wait"]).await;
    assert_eq!((v["status"].as_str(), v["size_gib"].as_u64()), (Some("AVAILABLE"), Some(5)), "{v}");
    let id = v["volume_id"].as_str().unwrap().to_owned();
    // By name, with the VM by name too.
    let v = cli.json(&["volume", "attach", "data", "--vm", "app", "--wait"]).await;
    assert_eq!(v["status"], "IN_USE", "{v}");
    let table = cli.ok(&["volume", "list", "--vm", "app"]).await;
    assert!(
        table.lines().nth(1).is_some_and(|row| row.starts_with(&id) && row.contains("IN_USE")),
        "{table}"
    );
    let v = cli.json(&["volume", "extend", &id, "--size", "7", "--wait"]).await;
    assert_eq!(v["size_gib"], 7, "{v}");
    let v = cli.json(&["volume", "update", "data", "--name", "logs", "--tag", "keep"]).await;
    assert_eq!((v["name"].as_str(), &v["tags"]), (Some("logs"), &serde_json::json!(["keep"])), "{v}");
    // Deleting an attached volume is refused with the API's code.
    let out = cli.run(&["volume", "delete", "logs"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CONFLICT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = cli.json(&["volume", "detach", "logs", "--vm", "app", "--wait"]).await;
    assert_eq!(v["status"], "AVAILABLE", "{v}");
    let done = cli.json(&["volume", "delete", "logs", "--wait"]).await;
    assert_eq!(
        (done["kind"].as_str(), done["status"].as_str()),
        (Some("volume.delete"), Some("SUCCEEDED")),
        "{done}"
    );
    assert_eq!(cli.json(&["volume", "show", &id]).await["status"], "DELETED");
}

#[tokio::test(flavor = "multi_thread")]
async fn people_manage_key_pairs_with_the_hcp_command() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 alice@example\n";
    let file = s.dir().join("laptop.pub");
    std::fs::write(&file, key).unwrap();
    let path = file.display().to_string();
    let k = cli.json(&["keypair", "create", "laptop", "--public-key-file", &path]).await;
    assert_eq!(
        (k["fingerprint"].as_str(), k["key_type"].as_str()),
        (Some("SHA256:P360S6ynMxE/PhIHTdyP86IQKz7Pmp+xoIkXYmrY110"), Some("ssh-ed25519")),
        "{k}"
    );
    let table = cli.ok(&["keypair", "list"]).await;
    assert!(table.contains("laptop") && table.contains("SHA256:P360S6"), "{table}");
    assert_eq!(cli.json(&["keypair", "show", "laptop"]).await["public_key"], key.trim());
    // A file that holds no key is refused with the API's code and field.
    std::fs::write(&file, "not a key").unwrap();
    let out = cli.run(&["keypair", "create", "other", "--public-key-file", &path]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("public_key"), "{err}");
    cli.ok(&[
        "vm",
        "create",
        "web",
        "--flavor",
        "small",
        "--image",
        "debian-12",
        "--key",
        "laptop",
        "--wait",
    ])
    .await;
    assert_eq!(cli.json(&["vm", "show", "web"]).await["key_names"], serde_json::json!(["laptop"]));
    cli.ok(&["keypair", "delete", "laptop"]).await;
    assert!(cli.json(&["keypair", "list"]).await["key_pairs"].as_array().is_none_or(|a| a.is_empty()));
}

#[tokio::test(flavor = "multi_thread")]
async fn people_export_usage_with_the_hcp_command() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);
    let ops = Cli::for_stack(&s, &s.ops_token());
    cli.ok(&["vm", "create", "u-1", "--flavor", "small", "--image", "debian-12", "--wait"]).await;
    let from =
        (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to =
        (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // The tenant's project, grouped by flavor: a table, JSON, CSV.
    let table = cli.ok(&["usage", "--from", &from, "--to", &to, "--group-by", "flavor"]).await;
    assert!(table.contains("VM_HOURS") && table.contains("small"), "{table}");
    let json = cli.json(&["usage", "--from", &from, "--to", &to, "--group-by", "flavor,resource"]).await;
    assert_eq!(json["group_by"], serde_json::json!(["flavor", "resource"]), "{json}");
    let csv = cli.ok(&["usage", "--from", &from, "--to", &to, "--csv"]).await;
    assert!(csv.starts_with("tenant_id,project_id,flavor,resource_id,day,vm_seconds,"), "{csv}");
    assert_eq!(csv.lines().count(), 2, "a header and the totals: {csv}");
    // An operator, for one tenant, by tenant.
    let csv = ops
        .ok(&[
            "ops",
            "usage",
            "--from",
            &from,
            "--to",
            &to,
            "--tenant",
            "acme",
            "--group-by",
            "tenant",
            "--csv",
        ])
        .await;
    assert!(csv.lines().nth(1).is_some_and(|l| l.starts_with("acme,")), "{csv}");
    // A refusal names the field.
    let out = cli.run(&["usage", "--from", &to, "--to", &from]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("(field: to)"), "{err}");
}

/// `hcp webhook`: create prints the secret once; list, show, deliveries,
/// enable and delete; a refused URL shows the API's code and field.
#[tokio::test]
async fn people_manage_webhooks_with_the_hcp_command() {
    let opts = StackOptions {
        core_toml: "[egress]\nallow_networks = [\"127.0.0.0/8\"]\n".into(),
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);
    // A port the test holds and never answers: nothing is delivered here.
    let hold = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/hook", hold.local_addr().unwrap().port());
    let out = cli.ok(&["webhook", "create", &url, "--event", "job.finished,vm.status_changed"]).await;
    let secret =
        out.lines().find_map(|l| l.strip_prefix("secret: ")).expect("the secret is printed").to_owned();
    assert!(secret.starts_with("whsec_"), "{out}");
    let list = cli.json(&["webhook", "list"]).await;
    let id = list["webhooks"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list["webhooks"][0]["event_types"], serde_json::json!(["job.finished", "vm.status_changed"]));
    let table = cli.ok(&["webhook", "list"]).await;
    assert!(table.contains(&id) && table.contains(&url) && !table.contains(&secret), "{table}");
    let shown = cli.json(&["webhook", "show", &id]).await;
    assert_eq!((shown["url"].as_str(), shown["enabled"].as_bool()), (Some(url.as_str()), Some(true)));
    assert!(!shown.to_string().contains(&secret), "shown once only: {shown}");
    let deliveries = cli.json(&["webhook", "deliveries", &id]).await;
    assert!(deliveries["deliveries"].as_array().is_none_or(|a| a.is_empty()), "{deliveries}");
    assert_eq!(cli.json(&["webhook", "enable", &id]).await["enabled"], true);
    let out = cli.run(&["webhook", "create", "https://169.254.169.254/latest/meta-data/"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("url"), "{err}");
    cli.ok(&["webhook", "delete", &id]).await;
    assert!(cli.json(&["webhook", "list"]).await["webhooks"].as_array().is_none_or(|a| a.is_empty()));
    drop(hold);
}

#[tokio::test(flavor = "multi_thread")]
async fn people_capture_and_manage_images_with_the_hcp_command() {
    let defaults = StackOptions::default();
    let opts = StackOptions {
        sim_capabilities: format!("{},image_import,capture", defaults.sim_capabilities),
        ..defaults
    };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let cli = Cli::for_stack(&s, &token);
    let ops = Cli::for_stack(&s, &s.ops_token());
    cli.ok(&["vm", "create", "src", "--flavor", "small", "--image", "debian-12", "--wait"]).await;
    cli.ok(&["vm", "stop", "src", "--force", "--wait"]).await;
    let image = cli.json(&["vm", "capture", "src", "--image", "golden", "--wait"]).await;
    assert_eq!(
        (image["status"].as_str(), image["visibility"].as_str()),
        (Some("AVAILABLE"), Some("PRIVATE")),
        "{image}"
    );
    let table = cli.ok(&["image", "list"]).await;
    assert!(table.contains("golden") && table.contains("debian-12"), "{table}");
    // Operators see every project's images with their backings.
    let all = ops.json(&["ops", "image", "list"]).await;
    let golden = all["images"].as_array().unwrap().iter().find(|i| i["name"] == "golden").unwrap().clone();
    assert_eq!(golden["project_id"], "demo", "{golden}");
    assert!(golden["backings"]["sim-1"].as_str().unwrap().starts_with("sim-image-"), "{golden}");
    // An operator's image with a backing per provider, then another backing.
    let created = ops
        .json(&["ops", "image", "create", "multi", "--backing", "sim-1=tpl-a", "--os-version", "12"])
        .await;
    assert_eq!(created["backings"]["sim-1"], "tpl-a", "{created}");
    let out = ops.run(&["ops", "image", "backing", "multi", "--provider", "nobody", "--source", "x"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("provider"), "{err}");
    // Deleting the private image: a job removes it from the provider.
    cli.ok(&["image", "delete", "golden", "--wait"]).await;
    let table = cli.ok(&["image", "list"]).await;
    assert!(!table.contains("golden"), "{table}");
}
