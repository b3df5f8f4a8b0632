//! The job engine's promises, tested against real PostgreSQL and each
//! production broker (NATS JetStream and RabbitMQ: every test that runs
//! with a broker runs once on each, `each_queue!` at the end) with core
//! split into API and worker processes: an accepted
//! request is never lost, never executed twice, never left stuck; retries
//! with the same Idempotency-Key return the first answer; quotas hold under
//! concurrency. Each guarantee has a test that would fail without it, and
//! the negative control shows the kill test catching duplicate execution
//! when leases are switched off.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use hcp_testkit::db::Backend;
use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use rand::Rng;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

use hcp_testkit::load::{Load, create_body as body, vms};
use hcp_testkit::queues::Queue;

async fn job_status(rest: &Rest, token: &str, job_id: &str) -> String {
    let r = rest.get(&format!("/api/hcp/tenant/v1/jobs/{job_id}"), token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.str("status")
}

/// Waits until every job has SUCCEEDED; fails on a FAILED one.
async fn all_succeed(rest: &Rest, token: &str, jobs: &[String], timeout: Duration) {
    hcp_testkit::load::all_succeed(rest, token, jobs, timeout).await.unwrap();
}

/// Checks `check` every 50 ms for `window` (and once at its end); fails
/// with `what` and the check's error the first time it does not hold. The
/// counterpart of `wait_until` for what must stay true.
async fn holds_for<F, Fut>(window: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let end = tokio::time::Instant::now() + window;
    let mut checks = 0;
    loop {
        check().await.map_err(|e| e.context(format!("{what}: failed after {checks} checks")))?;
        checks += 1;
        if tokio::time::Instant::now() >= end {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50).min(end - tokio::time::Instant::now())).await;
    }
}

/// Runs `n` creates through the gateways round-robin; returns (vm, job) ids.
async fn create_many(s: &TestStack, token: &str, n: usize, prefix: &str) -> Vec<(String, String)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let rest = s.rests[i % s.rests.len()].clone();
        let token = token.to_owned();
        let name = format!("{prefix}-{i}");
        tasks.push(tokio::spawn(async move { rest.post(&vms("demo"), &token, &body(&name)).await.unwrap() }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        out.push((r.str("vm_id"), r.str("job_id")));
    }
    out
}

/// The kill tests' stack: two API and two worker processes on PostgreSQL
/// and `queue`, 2 s leases; with a tenant's token and the generator of the
/// random kill schedule (its seed printed, to replay a failure).
async fn kill_test_stack(queue: Queue) -> (TestStack, String, rand::rngs::StdRng) {
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 2,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "60".into()],
        jobs_toml: "lease_seconds = 2\nconcurrency = 8\n".into(),
        ..Default::default()
    }
    .with_queue(queue);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let seed: u64 = rand::thread_rng().r#gen();
    eprintln!("kill schedule seed {seed}");
    (s, token, <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed))
}

/// Kills a worker process picked at random (SIGKILL) after a pause drawn
/// from `pause_ms`, and starts another.
async fn kill_a_worker(s: &mut TestStack, rng: &mut rand::rngs::StdRng, pause_ms: std::ops::Range<u64>) {
    // The scenario, not synchronisation: a kill at a random moment (the
    // seed replays the schedule).
    tokio::time::sleep(Duration::from_millis(rng.gen_range(pause_ms))).await;
    let workers = s.workers();
    let victim = workers[rng.gen_range(0..workers.len())].clone();
    s.kill(&victim).await;
    s.start_worker().await.unwrap();
}

async fn killed_workers_lose_nothing_and_duplicate_nothing(queue: Queue) {
    let (mut s, token, mut rng) = kill_test_stack(queue).await;

    // Creates arrive in waves while workers are killed at random moments.
    let mut accepted = Vec::new();
    let mut kills = 0;
    for wave in 0..6 {
        accepted.extend(create_many(&s, &token, 10, &format!("w{wave}")).await);
        for _ in 0..2 {
            kill_a_worker(&mut s, &mut rng, 50..400).await;
            kills += 1;
        }
    }
    assert!(accepted.len() >= 50 && kills >= 10);
    let jobs: Vec<String> = accepted.iter().map(|(_, j)| j.clone()).collect();
    all_succeed(&s.rest, &token, &jobs, Duration::from_secs(120)).await;

    // Exactly one VM per create on the provider, never two workers on one
    // VM at once, nothing RUNNING, every VM ACTIVE.
    let stats = s.sim_stats().await.unwrap();
    assert_eq!(stats.vm_count as usize, accepted.len());
    for (vm, _) in &accepted {
        assert_eq!(stats.creations.get(vm), Some(&1), "vm {vm} created {:?} times", stats.creations.get(vm));
    }
    assert_eq!(stats.overlapping_calls, 0, "two workers ran one job at once");
    let store = s.db.store().await.unwrap();
    let (list, _) = store
        .list_vms(
            &hcp_core::model::Scope::new("acme", "demo"),
            &hcp_core::store::ListVmsQuery { page_size: 1000, ..Default::default() },
        )
        .await
        .unwrap();
    assert!(list.iter().all(|v| v.status == hcp_core::model::VmStatus::Active && v.current_job_id.is_none()));
    assert_eq!(list.len(), accepted.len());
    // The last completions' rows go out on the publisher's next pass; the
    // outbox must drain, not be empty at this exact instant.
    wait_until(Duration::from_secs(30), "every outbox row to be published", || async {
        Ok((store.count_pending_outbox().await? == 0).then_some(()))
    })
    .await
    .unwrap();
}

async fn without_leases_the_kill_test_sees_duplicates(queue: Queue) {
    // Negative control: with leases switched off, two workers take the same
    // job and the simulator's overlap counter (used above) catches it.
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 1,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "150".into()],
        jobs_toml: "unsafe_disable_leases = true\n".into(),
        ..Default::default()
    }
    .with_queue(queue);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    create_many(&s, &token, 20, "dup").await;
    wait_until(Duration::from_secs(60), "overlapping provider calls", || async {
        Ok((s.sim_stats().await?.overlapping_calls > 0).then_some(()))
    })
    .await
    .unwrap();
}

async fn a_broker_outage_delays_jobs_and_loses_none(queue: Queue) {
    // Workers do not poll the store here (1 h), so only the broker can
    // deliver: the jobs must wait in the outbox through the outage.
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 1,
        worker_processes: 1,
        jobs_toml: "poll_interval_ms = 3600000\n".into(),
        ..Default::default()
    }
    .with_queue(queue);
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    // On RabbitMQ usage events go to an exchange operators bind their own
    // queues to: this test binds one, as an operator's metering would.
    let tap = match queue {
        Queue::RabbitMq => Some(UsageTap::bind(&s.rabbitmq.as_ref().unwrap().url()).await),
        Queue::Nats => None,
    };
    s.stop_broker().await.unwrap();
    let accepted = create_many(&s, &token, 10, "outage").await;
    let jobs: Vec<String> = accepted.iter().map(|(_, j)| j.clone()).collect();
    let store = s.db.store().await.unwrap();
    // While the broker is down the jobs wait, and the outbox holds them:
    // checked again and again for as long as the outage lasts. A property
    // that must not change has no event to wait for; the window is the
    // outage's length (the scenario), and no check in it may fail.
    holds_for(
        Duration::from_millis(1500),
        "the jobs to wait in the outbox while the broker is down",
        || async {
            for j in &jobs {
                let status = job_status(&s.rest, &token, j).await;
                anyhow::ensure!(status == "QUEUED", "job {j} is {status}");
            }
            let pending = store.count_pending_outbox().await?;
            anyhow::ensure!(pending >= 10, "{pending} outbox rows pending");
            Ok(())
        },
    )
    .await
    .unwrap();

    s.resume_broker().await.unwrap();
    all_succeed(&s.rest, &token, &jobs, Duration::from_secs(60)).await;
    wait_until(Duration::from_secs(20), "the outbox to drain", || async {
        Ok((store.count_pending_outbox().await? == 0).then_some(()))
    })
    .await
    .unwrap();

    // Metering: one "started" usage event per VM, in the table and on the
    // broker.
    let events = store.list_usage_events(&hcp_core::model::Scope::new("acme", "demo")).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.event == "started").count(), 10);
    let (subject, payload) = match tap {
        Some(tap) => {
            let got = tap.take(10).await;
            assert_eq!(got.len(), 10, "usage events published once each");
            got[0].clone()
        }
        None => {
            let client = async_nats::connect(s.nats.as_ref().unwrap().url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let mut stream = js.get_stream("HCP_USAGE").await.unwrap();
            let info = stream.info().await.unwrap();
            assert_eq!(info.state.messages, 10, "usage events published once each");
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
                .await
                .unwrap();
            let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
            let first = batch.next().await.unwrap().unwrap();
            (first.subject.to_string(), first.payload.to_vec())
        }
    };
    assert_eq!(subject, "hcp.usage.started");
    let payload: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(payload["flavor"], "small");
    assert_eq!(payload["tenant_id"], "acme");
}

/// An operator's durable queue bound to HCP's usage exchange on RabbitMQ
/// (the exchange declared here too: binding must not depend on core
/// having connected first).
struct UsageTap {
    url: String,
}

/// The tap's queue.
const TAP: &str = "metering-tap";

impl UsageTap {
    async fn bind(url: &str) -> Self {
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
        use lapin::types::FieldTable;
        let connection =
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                "HCP.usage".into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                TAP.into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                TAP.into(),
                "HCP.usage".into(),
                "hcp.usage.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "bound".into()).await;
        Self { url: url.to_owned() }
    }

    /// The messages in the queue (routing key, body): at least `n`, taken
    /// as they arrive, then whatever else is there (a duplicate would be).
    async fn take(self, n: usize) -> Vec<(String, Vec<u8>)> {
        use lapin::options::{BasicAckOptions, BasicGetOptions};
        // A new connection: the broker's restart cut the first.
        let connection =
            lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut got = Vec::new();
        // Polled like wait_until, which cannot lend `got` to its check.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(m) = channel.basic_get(TAP.into(), BasicGetOptions::default()).await.unwrap() {
                m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
                got.push((m.delivery.routing_key.to_string(), m.delivery.data.clone()));
            }
            if got.len() >= n {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{} usage events of {n} after 20 s", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        got
    }
}

#[tokio::test]
async fn same_idempotency_key_gives_one_vm_and_one_answer() {
    let s =
        TestStack::start(Path::new(HCP), StackOptions { backend: Backend::Postgres, ..Default::default() })
            .await
            .unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let payload = body("once").to_string();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (rest, token, payload) = (s.rest.clone(), token.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            rest.raw_with(
                "POST",
                &vms("demo"),
                Some(&token),
                Some(&payload),
                &[("idempotency-key", "create-once")],
            )
            .await
            .unwrap()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        answers.push(r.body);
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "all 200 answers identical");
    let job = answers[0]["job_id"].as_str().unwrap().to_owned();
    all_succeed(&s.rest, &token, std::slice::from_ref(&job), Duration::from_secs(30)).await;
    let listed = s.rest.get(&vms("demo"), &token).await.unwrap();
    assert_eq!(listed.body["vms"].as_array().unwrap().len(), 1);
    let stats = s.sim_stats().await.unwrap();
    assert_eq!(stats.creations.len(), 1);
    assert_eq!(stats.calls.get("CreateVm"), Some(&1));

    // The same key with another body is refused; another tenant's key space
    // is its own.
    let other = body("twice").to_string();
    let r = s
        .rest
        .raw_with("POST", &vms("demo"), Some(&token), Some(&other), &[("idempotency-key", "create-once")])
        .await
        .unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (422, "IDEMPOTENCY_KEY_REUSED"), "{}", r.body);
    let evil = s.tenant_token("evil", &["demo"]);
    let r = s
        .rest
        .raw_with("POST", &vms("demo"), Some(&evil), Some(&payload), &[("idempotency-key", "create-once")])
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_ne!(r.body["vm_id"], answers[0]["vm_id"]);
    // Operations are idempotent too: a repeated stop with its key returns
    // the first stop's job instead of a 409.
    let vm_id = answers[0]["vm_id"].as_str().unwrap();
    let stop = |key: &'static str| {
        let (rest, token) = (s.rest.clone(), token.clone());
        let path = format!("{}/{vm_id}:stop", vms("demo"));
        async move {
            rest.raw_with("POST", &path, Some(&token), Some("{}"), &[("idempotency-key", key)]).await.unwrap()
        }
    };
    let first = stop("stop-1").await;
    let again = stop("stop-1").await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(again.body, first.body);
    // A failure a retry could fix is not stored under the key: a key whose
    // request was refused can be used once the refusal is gone.
    let bad = s
        .rest
        .raw_with(
            "POST",
            &vms("demo"),
            Some(&token),
            Some(r#"{"name":"x","flavor":"nope","image":"debian-12"}"#),
            &[("idempotency-key", "k2")],
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    let good = s
        .rest
        .raw_with(
            "POST",
            &vms("demo"),
            Some(&token),
            Some(&body("x").to_string()),
            &[("idempotency-key", "k2")],
        )
        .await
        .unwrap();
    assert_eq!(good.status, 202, "{}", good.body);
    let bad_key = s
        .rest
        .raw_with("POST", &vms("demo"), Some(&token), Some("{}"), &[("idempotency-key", "has space")])
        .await
        .unwrap();
    assert_eq!(bad_key.body["details"]["field"], "Idempotency-Key");
}

#[tokio::test]
async fn quota_admits_exactly_its_limit_under_concurrency() {
    let s =
        TestStack::start(Path::new(HCP), StackOptions { backend: Backend::Postgres, ..Default::default() })
            .await
            .unwrap();
    let ops = s.ops_token();
    let set = s
        .rest
        .raw(
            "PUT",
            "/api/hcp/ops/v1/tenants/acme/projects/demo/quota",
            Some(&ops),
            Some(r#"{"max_instances":10}"#),
        )
        .await
        .unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.body["max_instances"], 10);
    let token = s.tenant_token("acme", &["demo"]);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (rest, token) = (s.rest.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            rest.post(&vms("demo"), &token, &body(&format!("q{i}"))).await.unwrap()
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match (r.status, r.str("code").as_str()) {
            (202, _) => ok += 1,
            (429, "QUOTA_EXCEEDED") => refused += 1,
            other => panic!("unexpected answer {other:?}: {}", r.body),
        }
    }
    assert_eq!((ok, refused), (10, 90));
    let got = s.rest.get("/api/hcp/ops/v1/tenants/acme/projects/demo/quota", &ops).await.unwrap();
    assert_eq!(got.body["usage"]["instances"], "10", "{}", got.body);
}

#[tokio::test]
async fn a_job_can_be_watched_to_its_end() {
    use http_body_util::BodyExt;
    let opts = StackOptions { sim_args: vec!["--latency-ms".into(), "300".into()], ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let r = s.rest.post(&vms("demo"), &token, &body("watched")).await.unwrap();
    let job = r.str("job_id");

    // REST: server-sent events until the job ends, then the stream closes.
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{}/api/hcp/tenant/v1/jobs/{job}:watch", s.gateway))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    let statuses: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .map(|j| j["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(statuses.len() >= 2, "saw {statuses:?}");
    assert_eq!(statuses.last().map(String::as_str), Some("SUCCEEDED"));
    assert!(statuses.iter().any(|s| s == "RUNNING" || s == "QUEUED"), "{statuses:?}");

    // gRPC: the same watch as a server stream; a finished job gives one message.
    let mut jobs =
        hcp_proto::tenant::job_service_client::JobServiceClient::new(s.core_channel().await.unwrap());
    let mut req = tonic::Request::new(hcp_proto::tenant::GetJobRequest { job_id: job.clone() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = jobs.watch_job(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, hcp_proto::tenant::JobStatus::Succeeded as i32);
    assert!(stream.message().await.unwrap().is_none());

    // Another tenant cannot watch it.
    let evil = s.tenant_token("evil", &["demo"]);
    let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}:watch"), &evil).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test]
async fn a_queued_job_can_be_cancelled() {
    // A long backoff keeps a failed attempt's job QUEUED for its retry.
    let opts = StackOptions {
        jobs_toml: "backoff_base_ms = 60000\nbackoff_max_ms = 60000\n".into(),
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let r = s.rest.post(&vms("demo"), &token, &body("c")).await.unwrap();
    let vm = r.str("vm_id");
    all_succeed(&s.rest, &token, &[r.str("job_id")], Duration::from_secs(20)).await;

    inject_fault(&s, "StopVm", "UNAVAILABLE").await;
    let stop = s.rest.post(&format!("{}/{vm}:stop", vms("demo")), &token, &json!({})).await.unwrap();
    let job = stop.str("job_id");
    let waiting = wait_until(Duration::from_secs(20), "the stop to wait for its retry", || async {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &token).await?;
        Ok((r.str("status") == "QUEUED" && r.body["attempts"] == 1).then_some(r.body))
    })
    .await
    .unwrap();
    assert_eq!(waiting["error"]["code"], "PROVIDER_UNAVAILABLE", "the last attempt's error is shown");

    let evil = s.tenant_token("evil", &["demo"]);
    let r = s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &evil, &json!({})).await.unwrap();
    assert_eq!(r.status, 404);
    let r = s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.str("status"), "CANCELLED");
    let vm_now = s.rest.get(&format!("{}/{vm}", vms("demo")), &token).await.unwrap();
    assert_eq!(vm_now.str("status"), "ACTIVE", "the vm is back where it was");
    assert_eq!(vm_now.str("job_id"), "");
    let again =
        s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    assert_eq!((again.status, again.str("code").as_str()), (409, "CONFLICT"));
    // The VM accepts operations again.
    let r = s.rest.post(&format!("{}/{vm}:reboot", vms("demo")), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
}

#[tokio::test]
async fn retries_back_off_then_fail_with_the_providers_code() {
    use hcp_proto::sim::sim_control_client::SimControlClient;
    let opts = StackOptions { jobs_toml: "max_attempts = 3\n".into(), ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    let fault = |op: &str, code: &str| hcp_proto::sim::InjectFaultRequest {
        fault: Some(hcp_proto::sim::Fault { operation: op.into(), code: code.into(), ..Default::default() }),
    };
    // Retryable: three attempts, then FAILED and the VM ERROR with the code.
    sim.inject_fault(fault("StartVm", "UNAVAILABLE")).await.unwrap();
    let r = s.rest.post(&vms("demo"), &token, &body("flaky")).await.unwrap();
    let job = failed(&s.rest, &token, &r.str("job_id"), Duration::from_secs(30)).await;
    assert_eq!(job["attempts"], 3);
    assert_eq!(job["error"]["code"], "PROVIDER_UNAVAILABLE");
    let vm = s.rest.get(&format!("{}/{}", vms("demo"), r.str("vm_id")), &token).await.unwrap();
    assert_eq!(vm.str("status"), "ERROR");
    assert_eq!(vm.body["error"]["code"], "PROVIDER_UNAVAILABLE");
    // The create step ran once: retries skip recorded steps.
    let stats = s.sim_stats().await.unwrap();
    assert_eq!(stats.calls.get("CreateVm"), Some(&1));
    assert_eq!(stats.calls.get("StartVm"), Some(&3));

    // Not retryable: one attempt.
    sim.clear(hcp_proto::sim::ClearRequest {}).await.unwrap();
    sim.inject_fault(fault("CreateVm", "INVALID_ARGUMENT")).await.unwrap();
    let r = s.rest.post(&vms("demo"), &token, &body("refused")).await.unwrap();
    let job = failed(&s.rest, &token, &r.str("job_id"), Duration::from_secs(30)).await;
    assert_eq!(
        (job["attempts"].as_u64(), job["error"]["code"].as_str()),
        (Some(1), Some("INVALID_ARGUMENT"))
    );
}

async fn a_rolling_restart_under_load_loses_and_duplicates_nothing(queue: Queue) {
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 2,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "100".into()],
        jobs_toml: "concurrency = 8\nshutdown_grace_seconds = 2\n".into(),
        ..Default::default()
    }
    .with_queue(queue);
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    // Two clients, one per gateway, create VMs until told to stop.
    let load = Load::start(&s, &token, "demo", "c", 2, 200);

    // Restart every process, one at a time, each with SIGTERM.
    for w in s.workers() {
        let status = s.stop(&w, Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{w} exited with {status}");
        s.start_worker().await.unwrap();
    }
    for i in 0..2 {
        s.restart_api(i, Duration::from_secs(30)).await.unwrap();
    }
    // Load continues a moment on the restarted processes, then stops.
    load.accepts(20, Duration::from_secs(30)).await.unwrap();
    let answers = load.seen.lock().unwrap().clone();
    let accepted = load.finish().await;
    let (lost, duplicated) = hcp_testkit::load::exactly_once(&s, &token, &accepted).await.unwrap();
    eprintln!(
        "rolling restart of 2 API and 2 worker processes: {} creates accepted, answers {answers:?}, lost {lost}, duplicated {duplicated}",
        accepted.len(),
    );
    assert_eq!((lost, duplicated), (0, 0));
}

async fn a_database_outage_is_503_and_service_returns_without_a_restart(queue: Queue) {
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 2,
        worker_processes: 2,
        db_proxy: true,
        ..Default::default()
    }
    .with_queue(queue);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let during = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let outage = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Readers and writers on both gateways, all through the outage.
    let mut load = tokio::task::JoinSet::new();
    for c in 0..4 {
        let rest = s.rests[c % 2].clone();
        let (token, stop, during, outage) = (token.clone(), stop.clone(), during.clone(), outage.clone());
        let seen = seen.clone();
        load.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = if c < 2 {
                    rest.get(&vms("demo"), &token).await
                } else {
                    rest.post(&vms("demo"), &token, &body(&format!("o{c}-{i}"))).await
                };
                let status = r.map(|r| r.status).unwrap_or(0);
                *seen.lock().unwrap().entry(status.to_string()).or_default() += 1;
                if outage.load(std::sync::atomic::Ordering::Relaxed) {
                    *during.lock().unwrap().entry(status).or_default() += 1;
                }
                assert!(status != 500 && status != 0, "a request got {status}");
                i += 1;
                // The scenario, not synchronisation: the load's pace (four
                // clients, each a request per 20 ms plus its answer).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    wait_until(Duration::from_secs(30), "load to run", || async {
        Ok((seen.lock().unwrap().get("202").copied().unwrap_or(0) >= 10).then_some(()))
    })
    .await
    .unwrap();

    // The outage: transactions in flight are terminated by the server
    // (57P01), then the database cannot be reached at all.
    outage.store(true, std::sync::atomic::Ordering::Relaxed);
    let admin = sqlx::PgPool::connect(&s.db.url).await.unwrap();
    let name = s.db.url.rsplit('/').next().unwrap().to_owned();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    s.db_proxy.as_ref().unwrap().set_up(false);
    wait_until(Duration::from_secs(30), "requests to meet the outage", || async {
        Ok((during.lock().unwrap().get(&503).copied().unwrap_or(0) >= 20).then_some(()))
    })
    .await
    .unwrap();

    // Back: service returns by itself.
    s.db_proxy.as_ref().unwrap().set_up(true);
    outage.store(false, std::sync::atomic::Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    wait_until(Duration::from_secs(60), "service to return", || async {
        let r = s.rests[1].post(&vms("demo"), &token, &body("after")).await?;
        Ok((r.status == 202).then_some(()))
    })
    .await
    .unwrap();
    let back = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r.expect("no request got a 500");
    }
    let during = during.lock().unwrap().clone();
    eprintln!(
        "database outage: answers during it by status {during:?}; service back {back:?} after the database"
    );
    assert!(during.keys().all(|s| matches!(s, 200 | 202 | 503)), "{during:?}");
    for log in ["core-api-0", "core-api-1"] {
        let text = s.log(log);
        let warns = text.lines().filter(|l| l.contains("database unavailable")).count();
        let errors = text.lines().filter(|l| l.contains("ERROR") && l.contains("database")).count();
        assert_eq!(errors, 0, "{log} logged database ERRORs:\n{text}");
        assert!(warns <= 10, "{log}: {warns} database warnings for one outage");
    }
}

async fn a_crashed_workers_jobs_resume_within_seconds(queue: Queue) {
    crashed_worker(queue, "").await;
}

async fn a_restarted_worker_takes_back_its_jobs_at_once(queue: Queue) {
    // A stable name: the restarted worker hands back its previous run's
    // leases at start instead of waiting for them to lapse.
    crashed_worker(queue, "worker_id = \"worker-a\"\n").await;
}

async fn crashed_worker(queue: Queue, jobs_toml: &str) {
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 1,
        worker_processes: 1,
        sim_args: vec!["--latency-ms".into(), "1500".into()],
        jobs_toml: jobs_toml.to_owned(),
        ..Default::default()
    }
    .with_queue(queue);
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let accepted = create_many(&s, &token, 4, "crash").await;
    // All four are RUNNING on the one worker, which then dies.
    wait_until(Duration::from_secs(30), "the jobs to be running", || async {
        let mut running = 0;
        for (_, j) in &accepted {
            running += usize::from(job_status(&s.rest, &token, j).await == "RUNNING");
        }
        Ok((running == accepted.len()).then_some(()))
    })
    .await
    .unwrap();
    let victim = s.workers()[0].clone();
    s.kill(&victim).await;
    let killed = std::time::Instant::now();
    s.start_worker().await.unwrap();
    let jobs: Vec<String> = accepted.iter().map(|(_, j)| j.clone()).collect();
    all_succeed(&s.rest, &token, &jobs, Duration::from_secs(60)).await;
    let resumed = killed.elapsed();
    eprintln!(
        "jobs of a SIGKILLed worker ({}) finished {resumed:?} after the kill (lease 6 s, two provider calls of 1.5 s)",
        if jobs_toml.is_empty() { "random name" } else { "stable name" }
    );
    let stats = s.sim_stats().await.unwrap();
    for (vm, _) in &accepted {
        assert_eq!(stats.creations.get(vm), Some(&1), "vm {vm}");
    }
}

async fn a_watcher_is_woken_when_another_process_finishes_its_job(queue: Queue) {
    // The watchers' fallback re-read is an hour away: only a notification
    // (from the worker process, over NATS, to the other API process) can
    // end the watch within the test's deadline.
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 2,
        worker_processes: 2,
        core_toml: "[limits]\njob_watch_fallback_seconds = 3600\n".into(),
        sim_args: vec!["--latency-ms".into(), "1000".into()],
        ..Default::default()
    }
    .with_queue(queue);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let r = s.rests[0].post(&vms("demo"), &token, &body("watched")).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.str("job_id");
    let path = format!("/api/hcp/tenant/v1/jobs/{job}:watch");
    let r = tokio::time::timeout(Duration::from_secs(60), s.rests[1].get(&path, &token))
        .await
        .expect("the watch ends")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(job_status(&s.rest, &token, &job).await, "SUCCEEDED");
}

/// Waits until the job has FAILED; returns it.
async fn failed(rest: &Rest, token: &str, job_id: &str, timeout: Duration) -> Value {
    wait_until(timeout, "the job to fail", || async {
        let j = rest.get(&format!("/api/hcp/tenant/v1/jobs/{job_id}"), token).await?;
        Ok((j.str("status") == "FAILED").then_some(j.body))
    })
    .await
    .unwrap()
}

/// Makes the simulator fail every call of `operation` with `code`.
async fn inject_fault(s: &TestStack, operation: &str, code: &str) {
    use hcp_proto::sim::sim_control_client::SimControlClient;
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    let fault =
        hcp_proto::sim::Fault { operation: operation.into(), code: code.into(), ..Default::default() };
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest { fault: Some(fault) }).await.unwrap();
}

/// Sets the simulator's latency of one operation.
async fn sim_latency(s: &TestStack, operation: &str, latency_ms: u32) {
    use hcp_proto::sim::sim_control_client::SimControlClient;
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    sim.set_latency(hcp_proto::sim::SetLatencyRequest { operation: operation.into(), latency_ms })
        .await
        .unwrap();
}

/// Waits until the job is RUNNING.
async fn running(s: &TestStack, token: &str, job: &str) {
    wait_until(Duration::from_secs(20), "the job to run", || async {
        Ok((job_status(&s.rest, token, job).await == "RUNNING").then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_running_job_is_cancelled_and_a_provider_that_never_answers_is_cut() {
    // The provider takes a minute to stop the VM and ignores the
    // cancellation; the worker checks for it every 200 ms and does not wait.
    let opts = StackOptions { jobs_toml: "cancel_check_ms = 200\n".into(), ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let r = s.rest.post(&vms("demo"), &token, &body("c")).await.unwrap();
    let vm = r.str("vm_id");
    all_succeed(&s.rest, &token, &[r.str("job_id")], Duration::from_secs(20)).await;
    sim_latency(&s, "StopVm", 60_000).await;
    let stop = s.rest.post(&format!("{}/{vm}:stop", vms("demo")), &token, &json!({})).await.unwrap();
    let job = stop.str("job_id");
    running(&s, &token, &job).await;

    // Another tenant's cancel finds nothing; the tenant's is answered with
    // the job still RUNNING and the request recorded; asking again is fine.
    let evil = s.tenant_token("evil", &["demo"]);
    let r = s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &evil, &json!({})).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let asked = std::time::Instant::now();
    let r = s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.str("status").as_str(), r.body["cancel_requested"].as_bool()),
        ("RUNNING", Some(true)),
        "{}",
        r.body
    );
    // Asking again while it runs answers the same; the worker may have
    // finished it already (it hears of the request at once), then CONFLICT.
    let again =
        s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    match again.status {
        200 => assert_eq!(again.body["cancel_requested"].as_bool(), Some(true), "{}", again.body),
        409 => assert!(again.str("message").contains("CANCELLED"), "{}", again.body),
        other => panic!("a repeated cancel answered {other}: {}", again.body),
    }

    let ended = wait_until(Duration::from_secs(10), "the job to end", || async {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &token).await?;
        Ok((r.str("status") != "RUNNING").then_some(r.body))
    })
    .await
    .unwrap();
    let took = asked.elapsed();
    assert_eq!(ended["status"], "CANCELLED", "{ended}");
    assert_eq!(ended["error"]["code"], "CANCELLED", "{ended}");
    assert!(took < Duration::from_secs(10), "the provider's minute was not waited for: {took:?}");
    // The step log names the interrupted step; the VM is ERROR (whether the
    // stop happened is not known), released from the job.
    let ops = s.ops_token();
    let o = s.rest.get(&format!("/api/hcp/ops/v1/jobs/{job}"), &ops).await.unwrap();
    assert_eq!(
        o.body["steps"],
        json!([{"step": "provider.stop", "status": "interrupted",
        "finished_at": o.body["steps"][0]["finished_at"]}]),
        "{}",
        o.body
    );
    assert!(o.str("error_message").contains("provider.stop"), "{}", o.body);
    let vm_now = s.rest.get(&format!("{}/{vm}", vms("demo")), &token).await.unwrap();
    assert_eq!(
        (vm_now.str("status").as_str(), vm_now.str("job_id").as_str()),
        ("ERROR", ""),
        "{}",
        vm_now.body
    );
    // A finished job: CONFLICT.
    let late =
        s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    assert_eq!((late.status, late.str("code").as_str()), (409, "CONFLICT"));
}

#[tokio::test]
async fn an_operator_cancels_a_running_create_after_its_first_step() {
    let opts = StackOptions { jobs_toml: "cancel_check_ms = 200\n".into(), ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    // The create's second call (StartVm) hangs.
    sim_latency(&s, "StartVm", 60_000).await;
    let r = s.rest.post(&vms("demo"), &token, &body("slow")).await.unwrap();
    let (vm, job) = (r.str("vm_id"), r.str("job_id"));
    let steps = wait_until(Duration::from_secs(20), "the create to reach its start", || async {
        let o = s.rest.get(&format!("/api/hcp/ops/v1/jobs/{job}"), &ops).await?;
        Ok((o.body["steps"].as_array().is_some_and(|a| !a.is_empty())).then_some(o.body))
    })
    .await
    .unwrap();
    assert_eq!(steps["steps"][0]["step"], "provider.create", "{steps}");

    let tenant_only =
        s.rest.post(&format!("/api/hcp/ops/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    assert_eq!(tenant_only.status, 403, "{}", tenant_only.body);
    let r = s.rest.post(&format!("/api/hcp/ops/v1/jobs/{job}:cancel"), &ops, &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["cancel_requested"].as_bool(), r.str("cancel_requested_by").as_str()),
        (Some(true), "test-user")
    );
    let ended = wait_until(Duration::from_secs(10), "the create to end", || async {
        let o = s.rest.get(&format!("/api/hcp/ops/v1/jobs/{job}"), &ops).await?;
        Ok((o.str("status") == "CANCELLED").then_some(o.body))
    })
    .await
    .unwrap();
    let log: Vec<(String, String)> = ended["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap().to_owned(), s["status"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        log,
        [
            ("provider.create".to_owned(), "done".to_owned()),
            ("provider.start".to_owned(), "interrupted".to_owned())
        ]
    );
    let vm_now = s.rest.get(&format!("{}/{vm}", vms("demo")), &token).await.unwrap();
    assert_eq!(vm_now.str("status"), "ERROR", "a create cut short may half exist: {}", vm_now.body);
    // Audited with the operator as the actor, under the job's tenant.
    let audit = s.rest.get("/api/hcp/ops/v1/audit-events?action=job.cancel", &ops).await.unwrap();
    let event =
        audit.body["events"].as_array().unwrap().iter().find(|e| e["job_id"] == job.as_str()).cloned();
    let event = event.unwrap_or_else(|| panic!("no job.cancel event: {}", audit.body));
    assert_eq!(
        (event["actor"].as_str(), event["tenant_id"].as_str()),
        (Some("test-user"), Some("acme")),
        "{event}"
    );
}

#[tokio::test]
async fn a_worker_in_another_process_hears_of_a_cancel_within_its_check_interval() {
    // API and worker in separate processes without NATS: no notification
    // crosses between them, so the worker's own check (every 300 ms) is
    // what finds the request.
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 1,
        worker_processes: 1,
        jobs_toml: "cancel_check_ms = 300\n".into(),
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let r = s.rest.post(&vms("demo"), &token, &body("far")).await.unwrap();
    let vm = r.str("vm_id");
    all_succeed(&s.rest, &token, &[r.str("job_id")], Duration::from_secs(30)).await;
    sim_latency(&s, "RebootVm", 60_000).await;
    let reboot = s.rest.post(&format!("{}/{vm}:reboot", vms("demo")), &token, &json!({})).await.unwrap();
    let job = reboot.str("job_id");
    running(&s, &token, &job).await;
    let r = s.rest.post(&format!("/api/hcp/tenant/v1/jobs/{job}:cancel"), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let asked = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "the reboot to be cancelled", || async {
        Ok((job_status(&s.rest, &token, &job).await == "CANCELLED").then_some(()))
    })
    .await
    .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    // A reboot cut short leaves the VM where it was.
    let vm_now = s.rest.get(&format!("{}/{vm}", vms("demo")), &token).await.unwrap();
    assert_eq!(vm_now.str("status"), "ACTIVE", "{}", vm_now.body);
}

async fn workers_killed_and_the_broker_down_for_20_s_lose_and_duplicate_nothing(queue: Queue) {
    // The chaos run: paced creates through both gateways while workers are
    // killed (SIGKILL) and started again, before, during and after a 20 s
    // outage of the broker. The figures it prints are the README's, side by
    // side for the two brokers.
    let (mut s, token, mut rng) = kill_test_stack(queue).await;
    let store = s.db.store().await.unwrap();
    // Two clients, one per gateway, about 10 creates a second in all.
    let load = Load::paced(&s, &token, "demo", "x", 2, 1000, Duration::from_millis(200));
    let mut kills = 0;
    let mut kill_some = async |s: &mut TestStack, n: usize| {
        for _ in 0..n {
            kill_a_worker(s, &mut rng, 200..1500).await;
        }
        n
    };
    kills += kill_some(&mut s, 3).await;
    s.stop_broker().await.unwrap();
    let down = std::time::Instant::now();
    let before = load.count("202");
    kills += kill_some(&mut s, 4).await;
    // The rest of the outage's 20 s: the scenario's length.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down.elapsed())).await;
    let during = load.count("202") - before;
    s.resume_broker().await.unwrap();
    kills += kill_some(&mut s, 3).await;
    load.accepts(20, Duration::from_secs(60)).await.unwrap();
    let answers = load.seen.lock().unwrap().clone();
    let accepted = load.finish().await;
    let (lost, duplicated) = hcp_testkit::load::exactly_once(&s, &token, &accepted).await.unwrap();
    wait_until(Duration::from_secs(60), "the outbox to drain", || async {
        Ok((store.count_pending_outbox().await? == 0).then_some(()))
    })
    .await
    .unwrap();
    eprintln!(
        "chaos on {queue}: {} creates accepted ({during} while the broker was down), answers {answers:?}, \
         {kills} workers killed, every job SUCCEEDED and the outbox drained; lost {lost}, duplicated {duplicated}",
        accepted.len(),
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert!(during > 0, "creates were accepted while the broker was down");
    assert_eq!(kills, 10);
}

async fn a_retry_waits_its_backoff_on_the_broker(queue: Queue) {
    // Workers do not poll the store (1 h): each retry can only come back
    // through the broker, after its backoff (JetStream: a nak with a
    // delay; RabbitMQ: a delay queue that dead-letters it back).
    let opts = StackOptions {
        backend: Backend::Postgres,
        api_processes: 1,
        worker_processes: 1,
        jobs_toml:
            "max_attempts = 3\nbackoff_base_ms = 1500\nbackoff_max_ms = 1500\npoll_interval_ms = 3600000\n"
                .into(),
        ..Default::default()
    }
    .with_queue(queue);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    inject_fault(&s, "StartVm", "UNAVAILABLE").await;
    let started = std::time::Instant::now();
    let r = s.rest.post(&vms("demo"), &token, &body("flaky")).await.unwrap();
    let job = failed(&s.rest, &token, &r.str("job_id"), Duration::from_secs(60)).await;
    assert_eq!(job["attempts"], 3);
    assert_eq!(job["error"]["code"], "PROVIDER_UNAVAILABLE");
    let stats = s.sim_stats().await.unwrap();
    assert_eq!(stats.calls.get("StartVm"), Some(&3));
    // Workers do not poll: the two retries came back through the broker.
    eprintln!("on {queue}: 3 attempts in {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test]
async fn a_message_that_is_not_a_job_is_dead_lettered_on_rabbitmq_and_work_goes_on() {
    // RabbitMQ only (JetStream has no dead-letter queue: such a message is
    // terminated, `queue/nats.rs`).
    use lapin::options::{BasicGetOptions, BasicPublishOptions};
    let opts = StackOptions { backend: Backend::Postgres, worker_processes: 1, ..Default::default() }
        .with_queue(Queue::RabbitMq);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    // Core declares its topology once a worker attaches: a first job
    // through the broker shows it did.
    let first = create_many(&s, &token, 1, "before").await;
    all_succeed(&s.rest, &token, &[first[0].1.clone()], Duration::from_secs(30)).await;
    let url = s.rabbitmq.as_ref().unwrap().url();
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "HCP.jobs".into(),
            "hcp.jobs.dispatch".into(),
            BasicPublishOptions::default(),
            b"not a job id",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    let dead = wait_until(Duration::from_secs(20), "the message in HCP.jobs.dead", || async {
        Ok(channel
            .basic_get("HCP.jobs.dead".into(), BasicGetOptions { no_ack: true })
            .await?
            .map(|m| m.delivery.data.clone()))
    })
    .await
    .unwrap();
    assert_eq!(dead, b"not a job id");
    let next = create_many(&s, &token, 3, "after").await;
    let jobs: Vec<String> = next.iter().map(|(_, j)| j.clone()).collect();
    all_succeed(&s.rest, &token, &jobs, Duration::from_secs(30)).await;
}

// The tests above that run with a broker, once on each.
hcp_testkit::each_queue!(
    killed_workers_lose_nothing_and_duplicate_nothing,
    without_leases_the_kill_test_sees_duplicates,
    a_broker_outage_delays_jobs_and_loses_none,
    a_rolling_restart_under_load_loses_and_duplicates_nothing,
    a_database_outage_is_503_and_service_returns_without_a_restart,
    a_crashed_workers_jobs_resume_within_seconds,
    a_restarted_worker_takes_back_its_jobs_at_once,
    a_watcher_is_woken_when_another_process_finishes_its_job,
    workers_killed_and_the_broker_down_for_20_s_lose_and_duplicate_nothing,
    a_retry_waits_its_backoff_on_the_broker,
);
