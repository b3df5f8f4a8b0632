//! Tenants' webhooks end to end (issue 30): an HTTPS receiver the test
//! starts on 127.0.0.1, a range the stack's `[egress]` configuration
//! explicitly allows (not development mode), with a certificate from the
//! test's own CA passed as `egress.ca_file`.
//!
//! 100 VMs are created, stopped and deleted: every `job.finished` event
//! arrives once or more, in order per VM, signed with the endpoint's
//! secret. Then the receiver is gone for 30 s while more jobs run; the
//! deliveries record the failed attempts (visible to the tenant) and
//! everything arrives once it is back. The README's Python verification
//! code accepts a real delivery and rejects an altered, a forged and an
//! old one. A volume created, attached, detached and deleted is heard of
//! too: each job's `job.finished` and each `volume.status_changed`, in
//! order for the volume, signed. A receiver answering every delivery with
//! a redirect gets the endpoint disabled by the delivery worker after a few
//! attempts (the reason shown to the tenant, the redirect never followed),
//! and enabling it delivers what waited. In a stack without the allowance,
//! URLs at 127.0.0.1,
//! 169.254.169.254, 10.0.0.0/8 and a name resolving to loopback are
//! refused with 400 naming `url`, and the receiver sees no connection.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const T: &str = "/api/hcp/tenant/v1/projects/demo";
const WAIT: Duration = Duration::from_secs(120);
/// How long the receiver is away (the issue's figure).
const OUTAGE: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// An HTTPS (or, for the refusal test, plain TCP) receiver on 127.0.0.1
/// that records every request and counts every connection.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicU64>,
    /// While set, every request is answered 302 to this URL (and not
    /// recorded in `got`).
    redirect_to: Arc<Mutex<Option<String>>>,
}

impl Receiver {
    /// Serves on `listener` until the task is aborted: each connection is
    /// one request, answered 200.
    fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                me.connections.fetch_add(1, Ordering::SeqCst);
                let (me, tls) = (me.clone(), tls.clone());
                conns.spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(tcp).await {
                                me.one(stream).await;
                            }
                        }
                        None => drop(tcp),
                    }
                });
            }
        })
    }

    /// Reads one HTTP/1.1 request with a Content-Length body and answers
    /// 200, or 302 while `redirect_to` is set.
    async fn one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(&self, mut s: S) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            let Ok(n) = s.read(&mut chunk).await else { return };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let headers: HashMap<String, String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while buf.len() < head_end + length {
            let Ok(n) = s.read(&mut chunk).await else { return };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + length].to_vec();
        let redirect = self.redirect_to.lock().unwrap().clone();
        let answer = match redirect {
            Some(to) => format!(
                "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            ),
            None => {
                self.got.lock().unwrap().push(Received { headers, body });
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
            }
        };
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.shutdown().await;
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Whether `header` (HCP-Signature) signs `body` with `secret`, checked
/// here independently of core's code.
fn signed(secret: &str, body: &[u8], header: &str) -> bool {
    let parts: HashMap<&str, &str> = header.split(',').filter_map(|p| p.split_once('=')).collect();
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let age = chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap_or(0);
    hex::encode(mac.finalize().into_bytes()) == *v1 && (0..300).contains(&age)
}

/// Per VM, the job kinds of its `job.finished` events in arrival order;
/// every delivery's signature checked.
fn by_vm(got: &[Received], secret: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in got {
        let sig = r.headers.get("hcp-signature").cloned().unwrap_or_default();
        assert!(signed(secret, &r.body, &sig), "a delivery with a bad signature: {sig} {}", r.json());
        let v = r.json();
        assert_eq!(r.headers.get("hcp-event-type").map(String::as_str), Some("job.finished"));
        assert_eq!(r.headers.get("hcp-event-id").map(String::as_str), v["id"].as_str(), "{v}");
        assert!(v.get("provider_id").is_none() && v["data"].get("host").is_none(), "tenant view only: {v}");
        out.entry(v["vm_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(v["data"]["job"]["kind"].as_str().unwrap().to_owned());
    }
    out
}

/// Every VM of `vms` has heard `kinds` in this order, each at least once
/// (a repeat comes only before the next kind: at least once, in order).
fn in_order(seen: &BTreeMap<String, Vec<String>>, vms: &[String], kinds: &[&str]) -> Result<(), String> {
    for vm in vms {
        let got = seen.get(vm).cloned().unwrap_or_default();
        let mut deduped: Vec<&str> = Vec::new();
        for k in &got {
            if deduped.last() != Some(&k.as_str()) {
                deduped.push(k);
            }
        }
        if deduped != kinds {
            return Err(format!("VM {vm} heard {got:?}, expected {kinds:?} in order"));
        }
    }
    Ok(())
}

/// Runs `op` on every VM, 16 at a time, and waits for each job.
async fn each(s: &TestStack, t: &str, vms: &[String], op: impl Fn(&str) -> (&'static str, String)) {
    futures::stream::iter(vms.iter().cloned())
        .for_each_concurrent(16, |vm| {
            let (method, path) = op(&vm);
            async move {
                let body = (method == "POST").then(|| json!({}).to_string());
                let r = s.rest.raw(method, &path, Some(t), body.as_deref()).await.unwrap();
                assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
                let job = s.rest.finished_job(t, &r.str("job_id"), WAIT).await.unwrap();
                assert_eq!(job["status"], "SUCCEEDED", "{job}");
            }
        })
        .await;
}

/// Creates `n` VMs, 16 at a time; their ids once created.
async fn create(s: &TestStack, t: &str, prefix: &str, n: usize) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let body = json!({"name": format!("{prefix}-{i}"), "flavor": "small", "image": "debian-12"});
            let r = s.rest.post(&format!("{T}/vms"), t, &body).await.unwrap();
            assert_eq!(r.status, 202, "{}", r.body);
            let job = s.rest.finished_job(t, &r.str("job_id"), WAIT).await.unwrap();
            assert_eq!(job["status"], "SUCCEEDED", "{job}");
            r.str("vm_id")
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// The README's receiver code (the Python block defining `verify`).
fn readme_verifier() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    readme
        .split("```python")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("def verify("))
        .expect("the README shows the Python verification code")
        .to_owned()
}

/// Runs the README's `verify` on (secret, body, header) cases; its answers.
fn python_verdicts(dir: &Path, cases: &[(String, Vec<u8>, String)]) -> Vec<bool> {
    let code = readme_verifier();
    let cases_json: Vec<Value> = cases.iter().map(|(s, b, h)| json!([s, hex::encode(b), h])).collect();
    let script = format!(
        "{code}\nimport json, sys\ncases = json.load(open(sys.argv[1]))\n\
         print(json.dumps([verify(s, bytes.fromhex(b), h) for s, b, h in cases]))\n"
    );
    std::fs::write(dir.join("verify.py"), script).unwrap();
    std::fs::write(dir.join("cases.json"), Value::Array(cases_json).to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .arg(dir.join("verify.py"))
        .arg(dir.join("cases.json"))
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "python3: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn every_job_is_delivered_signed_in_order_and_survives_a_receiver_outage() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let (ca_file, acceptor) = hcp_testkit::tls::loopback_server(dir.path(), "webhook test CA").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::default();
    let serving = receiver.serve(listener, Some(acceptor.clone()));
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            // Loopback is allowed explicitly; plain http is not.
            core_toml: format!(
                "[egress]\nallow_networks = [\"127.0.0.0/8\"]\nca_file = \"{}\"\n\n\
                 [webhooks]\nbackoff_base_ms = 200\nbackoff_max_ms = 2000\npoll_interval_ms = 200\n\
                 disable_after_failures = 1000000\n",
                ca_file.display()
            ),
            jobs_toml: "concurrency = 32\n".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let url = format!("https://127.0.0.1:{port}/hook");
    let plain = s
        .rest
        .post(
            &format!("{T}/webhooks"),
            &t,
            &json!({"url": format!("http://127.0.0.1:{port}/"), "event_types": ["job.finished"]}),
        )
        .await
        .unwrap();
    assert_eq!(
        (plain.status, plain.body["details"]["field"].as_str()),
        (400, Some("url")),
        "http outside development mode: {}",
        plain.body
    );
    let r = s
        .rest
        .post(
            &format!("{T}/webhooks"),
            &t,
            &json!({"url": url, "event_types": ["job.finished"], "description": "test"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.str("secret");
    assert!(secret.starts_with("whsec_") && secret.len() == 70, "{secret}");
    let id = r.body["webhook"]["id"].as_str().unwrap().to_owned();
    let shown = s.rest.get(&format!("{T}/webhooks/{id}"), &t).await.unwrap();
    assert_eq!(shown.status, 200);
    assert!(!shown.body.to_string().contains(&secret), "the secret is shown once: {}", shown.body);
    assert_eq!(shown.body["enabled"], true);

    // 100 VMs created, stopped and deleted.
    let vms = create(&s, &t, "wh", 100).await;
    each(&s, &t, &vms, |vm| ("POST", format!("{T}/vms/{vm}:stop"))).await;
    each(&s, &t, &vms, |vm| ("DELETE", format!("{T}/vms/{vm}"))).await;
    let kinds = ["vm.create", "vm.stop", "vm.delete"];
    wait_until(WAIT, "every job's event to arrive", || async {
        Ok(in_order(&by_vm(&receiver.received(), &secret), &vms, &kinds).is_ok().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", in_order(&by_vm(&receiver.received(), &secret), &vms, &kinds)));
    let before = receiver.received();

    // The receiver goes away for 30 s while more jobs run.
    serving.abort();
    let _ = serving.await;
    let connections = receiver.connections.load(Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let more = create(&s, &t, "wh-late", 10).await;
    each(&s, &t, &more, |vm| ("DELETE", format!("{T}/vms/{vm}"))).await;
    wait_until(WAIT, "failed attempts to show in the deliveries", || async {
        let d = s.rest.get(&format!("{T}/webhooks/{id}/deliveries?page_size=500"), &t).await?;
        let failing = d.body["deliveries"].as_array().map_or(0, |a| {
            a.iter()
                .filter(|d| {
                    d["status"] == "PENDING" && d["attempts"].as_u64() > Some(0) && d["last_error"] != ""
                })
                .count()
        });
        Ok((failing > 0).then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep_until(started + OUTAGE).await; // the scenario: the receiver stays away 30 s
    assert_eq!(receiver.received().len(), before.len(), "nothing arrives while the receiver is away");
    assert_eq!(receiver.connections.load(Ordering::SeqCst), connections);
    let hook = s.rest.get(&format!("{T}/webhooks/{id}"), &t).await.unwrap();
    assert_eq!(hook.body["enabled"], true, "still enabled: {}", hook.body);
    assert!(hook.body["consecutive_failures"].as_u64() > Some(0), "{}", hook.body);

    // Back on the same port: everything arrives, in order.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let serving = receiver.serve(listener, Some(acceptor));
    wait_until(WAIT, "the events of the outage to arrive", || async {
        Ok(in_order(&by_vm(&receiver.received(), &secret), &more, &["vm.create", "vm.delete"])
            .is_ok()
            .then_some(()))
    })
    .await
    .unwrap();
    in_order(&by_vm(&receiver.received(), &secret), &vms, &kinds).unwrap();
    let hook = s.rest.get(&format!("{T}/webhooks/{id}"), &t).await.unwrap();
    assert_eq!(hook.body["consecutive_failures"], 0, "a success resets the count: {}", hook.body);
    let d = s.rest.get(&format!("{T}/webhooks/{id}/deliveries?page_size=5"), &t).await.unwrap();
    assert_eq!(d.body["deliveries"].as_array().map(Vec::len), Some(5), "{}", d.body);

    // The README's verification code on a real delivery and its forgeries.
    let real = receiver.received().last().cloned().unwrap();
    let header = real.headers["hcp-signature"].clone();
    let mut altered = real.body.clone();
    altered[0] = b' ';
    let forged = {
        let t_now = chrono::Utc::now().timestamp();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_not-the-secret").unwrap();
        mac.update(format!("{t_now}.").as_bytes());
        mac.update(&real.body);
        format!("t={t_now},v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    let old = {
        let t_old = chrono::Utc::now().timestamp() - 600;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t_old}.").as_bytes());
        mac.update(&real.body);
        format!("t={t_old},v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    let verdicts = python_verdicts(
        dir.path(),
        &[
            (secret.clone(), real.body.clone(), header.clone()),
            (secret.clone(), altered, header.clone()),
            (secret.clone(), real.body.clone(), forged),
            (secret.clone(), real.body.clone(), old),
            ("whsec_wrong".into(), real.body.clone(), header),
        ],
    );
    assert_eq!(verdicts, [true, false, false, false, false], "accepted, altered, forged, old, wrong secret");

    let gone = s.rest.delete(&format!("{T}/webhooks/{id}"), &t).await.unwrap();
    assert_eq!(gone.status, 200, "{}", gone.body);
    serving.abort();
}

/// Sends an accepted operation and waits for its job to succeed; the
/// answer's body.
async fn accepted(s: &TestStack, t: &str, method: &str, path: &str, body: Value) -> Value {
    let body = (!body.is_null()).then(|| body.to_string());
    let r = s.rest.raw(method, path, Some(t), body.as_deref()).await.unwrap();
    assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
    let job = s.rest.finished_job(t, &r.str("job_id"), WAIT).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{method} {path}: {job}");
    r.body
}

#[tokio::test]
async fn a_volumes_jobs_and_status_changes_are_delivered_in_order() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let (ca_file, acceptor) = hcp_testkit::tls::loopback_server(dir.path(), "webhook test CA").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::default();
    let serving = receiver.serve(listener, Some(acceptor));
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            core_toml: format!(
                "[egress]\nallow_networks = [\"127.0.0.0/8\"]\nca_file = \"{}\"\n\n\
                 [webhooks]\npoll_interval_ms = 200\n",
                ca_file.display()
            ),
            sim_capabilities: "cloud_init,volumes,hot_attach".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ops = s.ops_token();
    let vt = json!({"name": "standard", "max_size_gib": 10, "description": "disks", "storage": {"sim-1": "default"}});
    let r = s.rest.post("/api/hcp/ops/v1/volume-types", &ops, &vt).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let t = s.tenant_token("acme", &["demo"]);
    let events = json!(["job.finished", "volume.status_changed"]);
    let url = format!("https://127.0.0.1:{port}/hook");
    let r =
        s.rest.post(&format!("{T}/webhooks"), &t, &json!({"url": url, "event_types": events})).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["webhook"]["event_types"], events, "{}", r.body);
    let (secret, id) = (r.str("secret"), r.body["webhook"]["id"].as_str().unwrap().to_owned());

    let vm = create(&s, &t, "vol", 1).await.remove(0);
    let body = json!({"name": "data", "size_gib": 1, "volume_type": "standard"});
    let volume = accepted(&s, &t, "POST", &format!("{T}/volumes"), body).await["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let attach = json!({"volume_id": volume});
    accepted(&s, &t, "POST", &format!("{T}/vms/{vm}:attach"), attach.clone()).await;
    accepted(&s, &t, "POST", &format!("{T}/vms/{vm}:detach"), attach).await;
    accepted(&s, &t, "DELETE", &format!("{T}/volumes/{volume}"), Value::Null).await;

    // The volume's events, signed, each once or more, in order.
    let expected = [
        "job.finished volume.create AVAILABLE",
        "volume.status_changed volume.create AVAILABLE",
        "job.finished volume.attach IN_USE",
        "volume.status_changed volume.attach IN_USE",
        "job.finished volume.detach AVAILABLE",
        "volume.status_changed volume.detach AVAILABLE",
        "job.finished volume.delete DELETED",
        "volume.status_changed volume.delete DELETED",
    ];
    let heard = || {
        let mut out: Vec<String> = Vec::new();
        for r in receiver.received() {
            let sig = r.headers.get("hcp-signature").cloned().unwrap_or_default();
            assert!(signed(&secret, &r.body, &sig), "a delivery with a bad signature: {sig} {}", r.json());
            let v = r.json();
            assert_eq!(
                r.headers.get("hcp-event-type").and_then(|t| v["type"].as_str().map(|v| v == t)),
                Some(true)
            );
            if v["volume_id"] != volume.as_str() {
                continue;
            }
            let line = format!(
                "{} {} {}",
                v["type"].as_str().unwrap(),
                v["data"]["job"]["kind"].as_str().unwrap(),
                v["data"]["volume_status"].as_str().unwrap()
            );
            if out.last() != Some(&line) {
                out.push(line);
            }
        }
        out
    };
    wait_until(WAIT, "the volume's events to arrive", || async { Ok((heard() == expected).then_some(())) })
        .await
        .unwrap_or_else(|e| panic!("{e:#}: {:?}", heard()));
    let attached = receiver
        .received()
        .into_iter()
        .map(|r| r.json())
        .find(|v| v["type"] == "volume.status_changed" && v["data"]["job"]["kind"] == "volume.attach");
    let attached = attached.unwrap();
    assert_eq!(
        (attached["vm_id"].as_str(), attached["data"]["previous_volume_status"].as_str()),
        (Some(vm.as_str()), Some("AVAILABLE")),
        "{attached}"
    );
    let d = s.rest.get(&format!("{T}/webhooks/{id}/deliveries?page_size=20"), &t).await.unwrap();
    let listed = d.body["deliveries"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        listed
            .iter()
            .filter(|d| d["volume_id"] == volume.as_str() && d["vm_id"].as_str().is_none_or(str::is_empty))
            .count(),
        8,
        "the tenant sees each delivery under its volume: {}",
        d.body
    );
    serving.abort();
}

#[tokio::test]
async fn urls_at_internal_addresses_are_refused_before_any_connection() {
    // A receiver that counts connections, on loopback, which this stack
    // does not allow.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::default();
    let serving = receiver.serve(listener, None);
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let urls = [
        format!("https://127.0.0.1:{port}/hook"),
        format!("https://127.0.0.2:{port}/hook"),
        format!("https://localhost:{port}/hook"),
        format!("https://[::1]:{port}/hook"),
        format!("https://[::ffff:127.0.0.1]:{port}/hook"),
        "https://169.254.169.254/latest/meta-data/".to_owned(),
        "https://10.0.0.1/hook".to_owned(),
        "https://10.255.255.254:8443/hook".to_owned(),
        "https://192.168.1.1/hook".to_owned(),
        format!("http://127.0.0.1:{port}/hook"),
        "http://example.com/hook".to_owned(),
        "file:///etc/passwd".to_owned(),
        format!("https://user:pw@127.0.0.1:{port}/"),
        "https:///nohost".to_owned(),
    ];
    for url in &urls {
        let r = s
            .rest
            .post(&format!("{T}/webhooks"), &t, &json!({"url": url, "event_types": ["job.finished"]}))
            .await
            .unwrap();
        assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("url")), "{url}: {}", r.body);
    }
    let r = s
        .rest
        .post(
            &format!("{T}/webhooks"),
            &t,
            &json!({"url": "https://example.com/", "event_types": ["job.finished", "vm.nope"]}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("event_types[1]")), "{}", r.body);
    let r = s
        .rest
        .post(&format!("{T}/webhooks"), &t, &json!({"url": "https://example.com/", "event_types": []}))
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("event_types")), "{}", r.body);
    assert_eq!(receiver.connections.load(Ordering::SeqCst), 0, "no connection was attempted");
    let list = s.rest.get(&format!("{T}/webhooks"), &t).await.unwrap();
    assert_eq!(
        list.body["webhooks"].as_array().map_or(0, Vec::len),
        0,
        "nothing was registered: {}",
        list.body
    );
    serving.abort();
}

/// `hcp` run as the tenant against a stack, `-o json`; its output.
async fn hcp_json(s: &TestStack, token: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(HCP)
        .args(args)
        .args(["-o", "json"])
        .env_remove("HCP_PROFILE")
        .env_remove("HCP_OUTPUT")
        .env("HCP_ENDPOINT", format!("http://{}", s.gateway))
        .env("HCP_TOKEN", token)
        .env("HCP_PROJECT", "demo")
        .env("HCP_CONFIG", s.dir().join("no-config.toml"))
        .output()
        .await
        .expect("hcp runs");
    assert!(out.status.success(), "hcp {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The delivery worker itself disables an endpoint whose receiver keeps
/// failing: here it answers every delivery with a redirect, which is a
/// failed attempt (never followed: its target sees no connection). After
/// `disable_after_failures` attempts the endpoint is disabled, the tenant
/// sees why (`hcp webhook show`), nothing more is sent, and `hcp webhook
/// enable` brings it back: the pending event then arrives.
#[tokio::test]
async fn the_worker_disables_an_endpoint_that_keeps_failing_and_enable_brings_it_back() {
    const FAILURES: u64 = 3;
    let dir = hcp_testkit::TempDir::new().unwrap();
    let (ca_file, acceptor) = hcp_testkit::tls::loopback_server(dir.path(), "webhook test CA").unwrap();
    let target_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_port = target_listener.local_addr().unwrap().port();
    let target = Receiver::default();
    let target_serving = target.serve(target_listener, Some(acceptor.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::default();
    *receiver.redirect_to.lock().unwrap() = Some(format!("https://127.0.0.1:{target_port}/caught"));
    let serving = receiver.serve(listener, Some(acceptor));
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            core_toml: format!(
                "[egress]\nallow_networks = [\"127.0.0.0/8\"]\nca_file = \"{}\"\n\n\
                 [webhooks]\nbackoff_base_ms = 50\nbackoff_max_ms = 200\npoll_interval_ms = 100\n\
                 disable_after_failures = {FAILURES}\n",
                ca_file.display()
            ),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let r = s
        .rest
        .post(
            &format!("{T}/webhooks"),
            &t,
            &json!({"url": format!("https://127.0.0.1:{port}/hook"), "event_types": ["job.finished"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["webhook"]["id"].as_str().unwrap().to_owned();
    let vm = create(&s, &t, "dis", 1).await.remove(0);

    // The worker fails the event's attempts and disables the endpoint.
    let hook = wait_until(Duration::from_secs(30), "the worker to disable the endpoint", || async {
        let h = s.rest.get(&format!("{T}/webhooks/{id}"), &t).await?;
        Ok((h.body["enabled"] == false).then_some(h.body))
    })
    .await
    .unwrap();
    let reason = hook["disabled_reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains(&format!("disabled after {FAILURES} failed attempts in a row"))
            && reason.contains("302")
            && reason.contains("not followed"),
        "{hook}"
    );
    assert_eq!(hook["consecutive_failures"], FAILURES, "{hook}");
    let shown = hcp_json(&s, &t, &["webhook", "show", &id]).await;
    assert_eq!(
        (shown["enabled"].as_bool(), shown["disabled_reason"].as_str()),
        (Some(false), Some(reason.as_str()))
    );
    let d = s.rest.get(&format!("{T}/webhooks/{id}/deliveries"), &t).await.unwrap();
    let delivery = &d.body["deliveries"][0];
    assert_eq!(
        (delivery["status"].as_str(), delivery["attempts"].as_u64(), delivery["last_status_code"].as_u64()),
        (Some("PENDING"), Some(FAILURES), Some(302)),
        "{}",
        d.body
    );
    assert!(delivery["last_error"].as_str().unwrap_or_default().contains("redirect"), "{}", d.body);
    // Disabled, nothing more is sent (ten poll intervals).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.connections.load(Ordering::SeqCst),
        FAILURES,
        "one connection per attempt, then none"
    );
    assert_eq!(target.connections.load(Ordering::SeqCst), 0, "the redirect was not followed");

    // The receiver is fixed; the tenant enables the endpoint again.
    *receiver.redirect_to.lock().unwrap() = None;
    let enabled = hcp_json(&s, &t, &["webhook", "enable", &id]).await;
    assert_eq!(
        (enabled["enabled"].as_bool(), enabled["disabled_reason"].as_str().unwrap_or_default()),
        (Some(true), ""),
        "{enabled}"
    );
    wait_until(Duration::from_secs(30), "the pending event to arrive", || async {
        Ok((receiver.received().len() == 1).then_some(()))
    })
    .await
    .unwrap();
    let got = receiver.received().remove(0).json();
    assert_eq!(
        (got["vm_id"].as_str(), got["data"]["job"]["kind"].as_str()),
        (Some(vm.as_str()), Some("vm.create"))
    );
    let d = s.rest.get(&format!("{T}/webhooks/{id}/deliveries"), &t).await.unwrap();
    assert_eq!(d.body["deliveries"][0]["status"], "DELIVERED", "{}", d.body);
    let hook = s.rest.get(&format!("{T}/webhooks/{id}"), &t).await.unwrap();
    assert_eq!(hook.body["consecutive_failures"], 0, "{}", hook.body);
    assert_eq!(target.connections.load(Ordering::SeqCst), 0);
    serving.abort();
    target_serving.abort();
}
