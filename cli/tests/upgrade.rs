//! Upgrades from the previous release (`scripts/prev-release.sh` pins and
//! builds it): the old release's processes run on PostgreSQL and NATS under
//! steady load, and are replaced by this release's one at a time, workers
//! first, while the first new process migrates the schema under the old
//! ones still serving; nothing is lost or run twice, clients see only 2xx
//! and 503 with Retry-After, and images made before, during and after keep
//! making VMs with their source. And version skew the other way: the old
//! release's simulator (no image calls, no image capability flags) under
//! this release's core keeps doing what it declares, and core refuses only
//! what it cannot do there, before any job exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcp_testkit::db::Backend;
use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const OPS: &str = "/api/hcp/ops/v1";
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";

/// The previous release's `hcp`, where `scripts/prev-release.sh` caches it
/// (its pinned commit read from the script: one place names it), or
/// `HCP_PREV_RELEASE`. Missing: the test is skipped and says so, except
/// under CI, where it fails.
fn previous_release(what: &str) -> Option<PathBuf> {
    let path = std::env::var_os("HCP_PREV_RELEASE").map(PathBuf::from).unwrap_or_else(|| {
        let script = include_str!("../../scripts/prev-release.sh");
        let commit = script
            .lines()
            .find_map(|l| l.strip_prefix("PREV_RELEASE="))
            .expect("scripts/prev-release.sh names PREV_RELEASE");
        let dir = std::env::var("HCP_TESTBED_DIR").unwrap_or_else(|_| "/var/tmp/hcp-testbed".to_owned());
        Path::new(&dir).join(format!("prev-{commit}")).join("hcp")
    });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what}: the previous release is not built at {} under CI (run scripts/prev-release.sh)",
        path.display()
    );
    eprintln!(
        "SKIP {what}: the previous release is not built at {} (run scripts/prev-release.sh)",
        path.display()
    );
    None
}

/// Answers seen, by the step of the upgrade they came in and their status
/// ("connection refused" when a gateway was down).
type Seen = Arc<Mutex<BTreeMap<(String, String), usize>>>;

/// Answers by status alone.
fn by_status(seen: &Seen) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for ((_, status), n) in seen.lock().unwrap().iter() {
        *out.entry(status.clone()).or_default() += n;
    }
    out
}

/// What a client behind a load balancer does: each create carries an
/// Idempotency-Key and is retried with it, on the next gateway when one
/// refuses the connection, after a 503 (which must say Retry-After) or a
/// 504 until it gets 202. Any other answer fails the test. Returns (vm,
/// job).
async fn create_until_accepted(
    rests: &[Rest],
    first: usize,
    token: &str,
    body: &Value,
    seen: &Seen,
    step: &Mutex<String>,
) -> (String, String) {
    let key = uuid::Uuid::new_v4().to_string();
    let payload = body.to_string();
    let mut at = first;
    for _ in 0..600 {
        let r = rests[at % rests.len()]
            .raw_with("POST", VMS, Some(token), Some(&payload), &[("idempotency-key", &key)])
            .await;
        let label = match &r {
            Ok(r) => r.status.to_string(),
            Err(_) => "connection refused".to_owned(),
        };
        let at_step = step.lock().unwrap().clone();
        *seen.lock().unwrap().entry((at_step, label)).or_default() += 1;
        match r {
            Ok(r) if r.status == 202 => return (r.str("vm_id"), r.str("job_id")),
            Ok(r) if r.status == 503 => {
                assert!(r.headers.contains_key("retry-after"), "503 without Retry-After: {}", r.body);
            }
            // Counted, and reported: a call cut off by a process stopping.
            Ok(r) if r.status == 504 => {}
            Ok(r) => panic!("create {body}: {} {}", r.status, r.body),
            Err(_) => at += 1,
        }
        // The scenario, not synchronisation: a client's pause before it
        // tries again (600 tries bound the wait).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("create {body} never accepted");
}

/// An operator's catalog write through gateway `rest` (old or new).
async fn ops_post(rest: &Rest, ops: &str, path: &str, body: Value) -> Value {
    let r = rest.post(&format!("{OPS}/{path}"), ops, &body).await.unwrap();
    assert_eq!(r.status, 201, "POST {path} {body}: {}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_from_the_previous_release_loses_nothing() {
    let Some(prev) = previous_release("the rolling upgrade test") else { return };
    let opts = StackOptions {
        backend: Backend::Postgres,
        nats: true,
        api_processes: 2,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "100".into()],
        jobs_toml: "concurrency = 8\nshutdown_grace_seconds = 2\n".into(),
        core_exe: Some(prev),
        ..Default::default()
    };
    // Every core and gateway process runs the previous release: its core
    // migrates the new database to its own schema.
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    // An image the old release made (bootstrap made debian-12 through it
    // too), with the one source every provider resolves.
    ops_post(&s.rest, &ops, "images", json!({"name": "old-img", "os_type": "linux", "source": "tpl-old"}))
        .await;
    // Images and their sources, in the order they were made.
    let sources = Arc::new(Mutex::new(vec![
        ("debian-12".to_owned(), "debian-12-genericcloud".to_owned()),
        ("old-img".to_owned(), "tpl-old".to_owned()),
    ]));

    let seen: Seen = Arc::new(Mutex::new(BTreeMap::new()));
    let step = Arc::new(Mutex::new("all old".to_owned()));
    let set_step = |what: &str| *step.lock().unwrap() = what.to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    // Two clients create VMs until told to stop: every other one from the
    // newest image, the others from each image in turn.
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..2 {
        let (rests, token, seen, stop, sources, step) =
            (s.rests.clone(), token.clone(), seen.clone(), stop.clone(), sources.clone(), step.clone());
        clients.spawn(async move {
            let mut accepted = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 300 {
                let image = {
                    let images = sources.lock().unwrap();
                    let at = if i % 2 == 0 { images.len() - 1 } else { (i / 2) % images.len() };
                    images[at].0.clone()
                };
                let body = json!({"name": format!("c{c}-{i}"), "flavor": "small", "image": image});
                let (vm, job) = create_until_accepted(&rests, c, &token, &body, &seen, &step).await;
                accepted.push((vm, job, image));
                i += 1;
            }
            accepted
        });
    }
    // Waits until `n` more creates are accepted.
    let accepted = |seen: &Seen| by_status(seen).get("202").copied().unwrap_or(0);
    let more_accepted = |n: usize| {
        let seen = seen.clone();
        let want = accepted(&seen) + n;
        async move {
            wait_until(Duration::from_secs(60), &format!("{n} more creates accepted"), || async {
                Ok((accepted(&seen) >= want).then_some(()))
            })
            .await
            .unwrap()
        }
    };
    more_accepted(10).await;

    // The upgrade, one process at a time: the workers first (the first new
    // one applies the new migrations while both old API processes and the
    // other old worker keep serving), then each API process and its
    // gateway.
    s.set_core_exe(Path::new(HCP));
    for w in s.workers() {
        set_step(&format!("replacing {w}"));
        let status = s.stop(&w, Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{w} exited with {status}");
        s.start_worker().await.unwrap();
        more_accepted(10).await;
    }
    // Schema 0023 is in; the old API processes still make images the old
    // way, and VMs from them.
    ops_post(
        &s.rests[1],
        &ops,
        "images",
        json!({"name": "mid-img", "os_type": "linux", "source": "tpl-mid"}),
    )
    .await;
    sources.lock().unwrap().push(("mid-img".into(), "tpl-mid".into()));
    more_accepted(10).await;
    for i in 0..2 {
        set_step(&format!("replacing core-api-{i}"));
        s.restart_api(i, Duration::from_secs(30)).await.unwrap();
        more_accepted(10).await;
        set_step(&format!("replacing gateway-{i}"));
        s.restart_gateway(i, Duration::from_secs(30)).await.unwrap();
        more_accepted(10).await;
    }
    set_step("all new");
    // All new: an image made by this release, used by the same load.
    ops_post(&s.rest, &ops, "images", json!({"name": "new-img", "os_type": "linux", "source": "tpl-new"}))
        .await;
    sources.lock().unwrap().push(("new-img".into(), "tpl-new".into()));
    more_accepted(20).await;
    stop.store(true, Ordering::Relaxed);
    let mut accepted = Vec::new();
    while let Some(r) = clients.join_next().await {
        accepted.extend(r.unwrap());
    }

    // Every accepted create ran once, with its image's source.
    let jobs: Vec<String> = accepted.iter().map(|(_, j, _)| j.clone()).collect();
    wait_until(Duration::from_secs(180), "every job to end", || async {
        let mut done = 0;
        for j in &jobs {
            let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{j}"), &token).await?;
            anyhow::ensure!(r.status == 200, "job {j}: {}", r.body);
            match r.str("status").as_str() {
                "SUCCEEDED" => done += 1,
                "FAILED" | "CANCELLED" => anyhow::bail!("job {j}: {}", r.body),
                _ => {}
            }
        }
        Ok((done == jobs.len()).then_some(()))
    })
    .await
    .unwrap();
    let stats = s.sim_stats().await.unwrap();
    let lost = accepted.iter().filter(|(vm, _, _)| !stats.creations.contains_key(vm)).count();
    let duplicated = stats.creations.values().filter(|n| **n > 1).count()
        + (stats.vm_count as usize).saturating_sub(accepted.len());
    assert_eq!(stats.overlapping_calls, 0, "two workers ran one job at once");
    let sources: BTreeMap<String, String> = sources.lock().unwrap().iter().cloned().collect();
    let mut by_image: BTreeMap<&str, usize> = BTreeMap::new();
    for (vm, _, image) in &accepted {
        assert_eq!(
            stats.image_sources.get(vm).map(String::as_str),
            Some(sources[image].as_str()),
            "vm {vm} from {image} was made with another source"
        );
        *by_image.entry(image.as_str()).or_default() += 1;
    }
    // This release reads what the old one wrote: its images, as images.
    for name in ["old-img", "mid-img", "debian-12"] {
        let r = s.rest.get(&format!("/api/hcp/common/v1/images/{name}"), &ops).await.unwrap();
        assert_eq!((r.status, r.str("status")), (200, "AVAILABLE".to_owned()), "{name}: {}", r.body);
        assert_eq!(r.str("source"), sources[name], "{}", r.body);
    }
    let answers = by_status(&seen);
    let steps = seen.lock().unwrap().clone();
    eprintln!(
        "rolling upgrade from the previous release (workers, then API + gateway, one at a time): \
         {} creates accepted (by image {by_image:?}), answers {answers:?}, by step {steps:?}, \
         lost {lost}, duplicated {duplicated}",
        accepted.len()
    );
    assert_eq!((lost, duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_a_protocol_revision_behind_does_what_it_declares() {
    let Some(prev) = previous_release("the provider version skew test") else { return };
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let ops = s.ops_token();
    let tenant = s.tenant_token("acme", &["demo"]);
    // The previous release's simulator: no ImportImage, CaptureImage or
    // DeleteImage, and no supports_image_import / supports_capture flags.
    let args: Vec<String> =
        ["provider-sim", "--listen", "127.0.0.1:0", "--capabilities", "cloud_init,snapshot"]
            .into_iter()
            .map(str::to_owned)
            .collect();
    let addr = s.start_program("sim-old", &prev, &args, &[]).await.unwrap();
    let provider = s
        .register_provider("zone-old", "sim-old", &format!("http://{addr}"), json!({}), "default")
        .await
        .unwrap();
    let flag = |name: &str| provider["capabilities"][name].as_bool().unwrap_or(false);
    assert_eq!(
        (flag("supports_snapshot"), flag("supports_image_import"), flag("supports_capture")),
        (true, false, false),
        "{provider}"
    );

    // A VM's life on it.
    let r = s
        .rest
        .post(
            VMS,
            &tenant,
            &json!({"name": "skew", "flavor": "small", "image": "debian-12", "zone": "zone-old"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.str("vm_id");
    let path = format!("{VMS}/{vm}");
    let mut jobs = vec![r.str("job_id")];
    let finished = |job: String| {
        let (rest, tenant) = (s.rest.clone(), tenant.clone());
        async move {
            let done = rest.finished_job(&tenant, &job, Duration::from_secs(30)).await.unwrap();
            assert_eq!(done["status"], "SUCCEEDED", "{done}");
        }
    };
    finished(jobs[0].clone()).await;
    for op in ["stop", "start", "stop"] {
        let r = s.rest.post(&format!("{path}:{op}"), &tenant, &json!({})).await.unwrap();
        assert_eq!(r.status, 202, "{op}: {}", r.body);
        jobs.push(r.str("job_id"));
        finished(r.str("job_id")).await;
    }
    let vm_jobs = |s: &TestStack| {
        let (rest, tenant, path) = (s.rest.clone(), tenant.clone(), path.clone());
        async move {
            let r = rest.get(&format!("{path}/jobs"), &tenant).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            r.body["jobs"].as_array().map(Vec::len).unwrap_or(0)
        }
    };
    let before = vm_jobs(&s).await;
    assert_eq!(before, jobs.len());

    // What it lacks is refused before any job exists: a capture of its
    // (stopped) VM, and an import naming it.
    let r = s.rest.post(&format!("{path}:capture"), &tenant, &json!({"image_name": "golden"})).await.unwrap();
    assert_eq!((r.status, r.str("code")), (409, "FEATURE_NOT_SUPPORTED".to_owned()), "{}", r.body);
    assert_eq!(vm_jobs(&s).await, before, "a refused capture made a job");
    let sha = "0".repeat(64);
    let r = s
        .rest
        .post(
            &format!("{OPS}/images:import"),
            &ops,
            &json!({"name": "imp", "url": "https://images.example/x.qcow2", "sha256": sha, "format": "qcow2",
                    "providers": ["sim-old"], "os_type": "linux"}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.str("code")), (409, "FEATURE_NOT_SUPPORTED".to_owned()), "{}", r.body);
    assert_eq!(r.body["details"]["field"], "providers[0]", "{}", r.body);
    // An import's and a capture's image is inserted with its job: none.
    for name in ["golden", "imp"] {
        let r =
            s.rest.get(&format!("/api/hcp/common/v1/images/{name}?project_id=demo"), &tenant).await.unwrap();
        assert_eq!(r.status, 404, "a refused {name} left an image: {}", r.body);
    }
    // And the VM goes as it came.
    let r = s.rest.delete(&path, &tenant).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    finished(r.str("job_id")).await;
    let mut old = hcp_proto::sim::sim_control_client::SimControlClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap(),
    );
    let stats = old.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.creations.get(&vm), stats.vm_count), (Some(&1), 0), "{stats:?}");
    eprintln!("the previous release's simulator under this core: calls {:?}", stats.calls);
    s.kill("sim-old").await;
}
