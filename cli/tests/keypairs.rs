//! SSH key pairs end to end over REST on the simulator: a public key made
//! by `ssh-keygen` is imported with the fingerprint `ssh-keygen` prints;
//! weak, malformed, oversized and multi-line keys are refused naming
//! `public_key`; names are unique per project (409) and another tenant's or
//! project's key pair is 404; a project holds at most 100 (429 naming the
//! limit); a VM created with `key_names` shows them and its provider
//! receives the public keys, which a later key-pair delete does not take
//! back, also when a create that failed is retried after the delete; an
//! unknown key name is refused before any job, and so is a key on a
//! provider without cloud-init (409 naming `supports_cloud_init`).

use std::path::Path;
use std::time::Duration;

use hcp_proto::sim::sim_control_client::SimControlClient;
use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::json;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const T: &str = "/api/hcp/tenant/v1/projects";

/// A key pair made by `ssh-keygen` in a directory of the test's own.
struct Keygen {
    dir: hcp_testkit::TempDir,
}

impl Keygen {
    fn new() -> Self {
        Self { dir: hcp_testkit::TempDir::new().unwrap() }
    }

    /// Makes `name` (`ssh-keygen -t <kind> [-b bits]`) and returns its
    /// public key line.
    fn make(&self, name: &str, kind: &str, bits: Option<u32>) -> String {
        let path = self.dir.path().join(name);
        let mut cmd = std::process::Command::new("ssh-keygen");
        cmd.args(["-q", "-N", "", "-C", &format!("{name}@test"), "-t", kind, "-f"]).arg(&path);
        if let Some(b) = bits {
            cmd.args(["-b", &b.to_string()]);
        }
        let out = cmd.output().expect("ssh-keygen runs");
        assert!(out.status.success(), "ssh-keygen {kind}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(path.with_extension("pub")).unwrap()
    }

    /// What `ssh-keygen -l -E sha256` prints as the fingerprint of `name`.
    fn fingerprint(&self, name: &str) -> String {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(self.dir.path().join(format!("{name}.pub")))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().nth(1).unwrap().to_owned()
    }
}

fn has_ssh_keygen() -> bool {
    std::process::Command::new("ssh-keygen").arg("-?").output().is_ok()
}

async fn stack(caps: &str) -> TestStack {
    let opts = StackOptions { sim_capabilities: caps.to_owned(), ..Default::default() };
    TestStack::start(Path::new(HCP), opts).await.unwrap()
}

async fn import(s: &TestStack, token: &str, project: &str, name: &str, key: &str) -> Reply {
    s.rest
        .post(&format!("{T}/{project}/key-pairs"), token, &json!({"name": name, "public_key": key}))
        .await
        .unwrap()
}

fn refusal(r: &Reply) -> (u16, String, String) {
    (r.status, r.str("code"), r.body["details"]["field"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn key_pairs_are_checked_scoped_limited_and_reach_the_provider() {
    if !has_ssh_keygen() {
        eprintln!("SKIP: ssh-keygen is not installed");
        return;
    }
    let keys = Keygen::new();
    let ed25519 = keys.make("laptop", "ed25519", None);
    let ecdsa = keys.make("ec", "ecdsa", Some(521));
    let rsa = keys.make("rsa", "rsa", Some(2048));
    let weak = keys.make("weak", "rsa", Some(1024));
    let s = stack("cloud_init,console_vnc").await;
    let token = s.tenant_token("acme", &["demo", "other"]);

    // Imported, typed and fingerprinted exactly as ssh-keygen does.
    let r = import(&s, &token, "demo", "laptop", &ed25519).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.str("fingerprint"), keys.fingerprint("laptop"));
    assert_eq!(
        (r.str("key_type"), r.body["bits"].as_u64(), r.str("comment"), r.str("public_key")),
        ("ssh-ed25519".to_owned(), Some(256), "laptop@test".to_owned(), ed25519.trim().to_owned())
    );
    for (name, key, kind, bits) in
        [("ec", &ecdsa, "ecdsa-sha2-nistp521", 521), ("rsa", &rsa, "ssh-rsa", 2048)]
    {
        let r = import(&s, &token, "demo", name, key).await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!((r.str("key_type").as_str(), r.body["bits"].as_u64()), (kind, Some(bits)));
        assert_eq!(r.str("fingerprint"), keys.fingerprint(name));
    }

    // Weak, malformed, oversized and multi-line keys name public_key.
    let two = format!("{}\n{}", ed25519.trim(), rsa.trim());
    let big = format!("{} {}", ed25519.trim(), "x".repeat(16 * 1024));
    for (why, key) in [
        ("rsa 1024", weak.as_str()),
        ("garbage", "not a key"),
        ("two lines", two.as_str()),
        ("over 16 KiB", big.as_str()),
    ] {
        let r = import(&s, &token, "demo", "bad", key).await;
        assert_eq!(refusal(&r), (400, "INVALID_ARGUMENT".into(), "public_key".into()), "{why}: {}", r.body);
    }
    // The same name twice in a project: 409.
    let r = import(&s, &token, "demo", "laptop", &rsa).await;
    assert_eq!(refusal(&r), (409, "ALREADY_EXISTS".into(), "name".into()), "{}", r.body);

    // An Idempotency-Key replays the first answer.
    let body = json!({"name": "replayed", "public_key": ed25519}).to_string();
    let path = format!("{T}/demo/key-pairs");
    let send = || s.rest.raw_with("POST", &path, Some(&token), Some(&body), &[("idempotency-key", "kp-1")]);
    let (first, again) = (send().await.unwrap(), send().await.unwrap());
    assert_eq!((first.status, again.status), (201, 201), "{}", again.body);
    assert_eq!(first.body, again.body);

    // Listed by name; another tenant's or project's key pair is 404.
    let list = s.rest.get(&path, &token).await.unwrap();
    let names: Vec<&str> =
        list.body["key_pairs"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ec", "laptop", "replayed", "rsa"]);
    let globex = s.tenant_token("globex", &["demo"]);
    for (t, project) in [(&globex, "demo"), (&token, "other")] {
        let r = s.rest.get(&format!("{T}/{project}/key-pairs/laptop"), t).await.unwrap();
        assert_eq!(r.status, 404, "{}", r.body);
        let r = s.rest.delete(&format!("{T}/{project}/key-pairs/laptop"), t).await.unwrap();
        assert_eq!(r.status, 404, "{}", r.body);
    }
    assert!(
        s.rest.get(&format!("{T}/demo/key-pairs"), &globex).await.unwrap().body["key_pairs"]
            .as_array()
            .is_none_or(|a| a.is_empty())
    );

    // A VM created with key pairs shows their names; the provider got the
    // public keys.
    let vm = json!({"name": "web-1", "flavor": "small", "image": "debian-12", "key_names": ["laptop", "ec"]});
    let r = s.rest.post(&format!("{T}/demo/vms"), &token, &vm).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.str("vm_id");
    let job = s.rest.finished_job(&token, &r.str("job_id"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    let shown = s.rest.get(&format!("{T}/demo/vms/{id}"), &token).await.unwrap();
    assert_eq!(shown.body["key_names"], json!(["laptop", "ec"]));
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.ssh_authorized_keys[&id], format!("{}\n{}", ed25519.trim(), ecdsa.trim()));

    // Deleting the key pair leaves the VM's keys as they were.
    let r = s.rest.delete(&format!("{T}/demo/key-pairs/laptop"), &token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.rest.get(&format!("{T}/demo/key-pairs/laptop"), &token).await.unwrap().status, 404);
    let shown = s.rest.get(&format!("{T}/demo/vms/{id}"), &token).await.unwrap();
    assert_eq!(shown.body["key_names"], json!(["laptop", "ec"]));

    // A key name the project lacks (deleted, or another tenant's) is
    // refused naming it, before any job.
    let jobs_before = s.rest.get(&format!("{T}/demo/jobs"), &token).await.unwrap().body["jobs"].clone();
    let r = import(&s, &globex, "demo", "globex-key", &ed25519).await;
    assert_eq!(r.status, 201, "{}", r.body);
    for (name, field) in [("laptop", "key_names[1]"), ("globex-key", "key_names[1]")] {
        let vm = json!({"name": "web-2", "flavor": "small", "image": "debian-12", "key_names": ["ec", name]});
        let r = s.rest.post(&format!("{T}/demo/vms"), &token, &vm).await.unwrap();
        assert_eq!(refusal(&r), (400, "INVALID_ARGUMENT".into(), field.into()), "{}", r.body);
    }
    let jobs_after = s.rest.get(&format!("{T}/demo/jobs"), &token).await.unwrap().body["jobs"].clone();
    assert_eq!(jobs_before, jobs_after, "no job was made");

    // At most 100 key pairs per project; the refusal names the limit.
    for i in 0..100 {
        let r = import(&s, &token, "other", &format!("k{i}"), &ed25519).await;
        assert_eq!(r.status, 201, "k{i}: {}", r.body);
    }
    let r = import(&s, &token, "other", "k100", &ed25519).await;
    assert_eq!((r.status, r.str("code").as_str()), (429, "QUOTA_EXCEEDED"), "{}", r.body);
    assert_eq!(r.body["details"]["limit"], "100");
    assert!(r.str("message").contains("100"), "{}", r.body);

    // Clean up what the test made.
    let r = s.rest.delete(&format!("{T}/demo/vms/{id}"), &token).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    s.rest.finished_job(&token, &r.str("job_id"), Duration::from_secs(20)).await.unwrap();
}

#[tokio::test]
async fn a_provider_without_cloud_init_refuses_keys_before_any_job() {
    let s = stack("console_vnc").await;
    let token = s.tenant_token("acme", &["demo"]);
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 alice@example";
    let r = import(&s, &token, "demo", "laptop", key).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let vm = json!({"name": "web-1", "flavor": "small", "image": "debian-12", "key_names": ["laptop"]});
    let r = s.rest.post(&format!("{T}/demo/vms"), &token, &vm).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (409, "FEATURE_NOT_SUPPORTED"), "{}", r.body);
    assert_eq!(r.body["details"]["capability"], "supports_cloud_init");
    let jobs = s.rest.get(&format!("{T}/demo/jobs"), &token).await.unwrap();
    assert!(jobs.body["jobs"].as_array().is_none_or(|j| j.is_empty()), "no job: {}", jobs.body);
    // Without keys the same create is accepted.
    let vm = json!({"name": "web-1", "flavor": "small", "image": "debian-12"});
    let r = s.rest.post(&format!("{T}/demo/vms"), &token, &vm).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    wait_until(Duration::from_secs(20), "the create to finish", || async {
        let job = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{}", r.str("job_id")), &token).await?;
        Ok((job.str("status") == "SUCCEEDED").then_some(()))
    })
    .await
    .unwrap();
}

/// A create whose first attempt fails is retried after its key pair was
/// deleted: the retry sends the key read when the create was accepted.
#[tokio::test]
async fn a_retried_create_sends_the_keys_it_was_accepted_with() {
    let opts = StackOptions {
        sim_capabilities: "cloud_init,console_vnc".into(),
        // The create fails until the fault is cleared (after the key pair
        // is deleted), then its next attempt, within 2 s, succeeds.
        jobs_toml: "max_attempts = 20\nbackoff_base_ms = 1000\nbackoff_max_ms = 2000\n".into(),
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 alice@example";
    assert_eq!(import(&s, &token, "demo", "laptop", key).await.status, 201);
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    let fault = hcp_proto::sim::Fault {
        operation: "CreateVm".into(),
        code: "UNAVAILABLE".into(),
        ..Default::default()
    };
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest { fault: Some(fault) }).await.unwrap();
    let vm = json!({"name": "web-1", "flavor": "small", "image": "debian-12", "key_names": ["laptop"]});
    let r = s.rest.post(&format!("{T}/demo/vms"), &token, &vm).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let (id, job) = (r.str("vm_id"), r.str("job_id"));
    wait_until(Duration::from_secs(20), "the create to fail once and wait for its retry", || async {
        let j = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &token).await?;
        Ok((j.body["attempts"].as_u64() >= Some(1) && j.str("status") == "QUEUED").then_some(()))
    })
    .await
    .unwrap();
    let r = s.rest.delete(&format!("{T}/demo/key-pairs/laptop"), &token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    sim.clear(hcp_proto::sim::ClearRequest {}).await.unwrap();
    let done = s.rest.finished_job(&token, &job, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert!(done["attempts"].as_u64() >= Some(2), "the create was retried: {done}");
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.ssh_authorized_keys[&id], key);
}
