//! HCP on a NATS cluster: three JetStream servers, core given every node's
//! URL, HCP's streams replicated three times. Under create load from
//! clients that retry with their Idempotency-Key, the job stream's leader
//! is killed (JetStream elects another and goes on), then a second node
//! (JetStream has no quorum: creates are still accepted, the outbox holds
//! their jobs); the killed nodes are started again and every accepted
//! create's job is delivered and runs once. A stream an earlier
//! deployment made with one replica is moved to three, its consumer with it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcp_testkit::db::Backend;
use hcp_testkit::nats::NatsCluster;
use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const JOBS: &str = "HCP_JOBS";
const USAGE: &str = "HCP_USAGE";

fn vms(project: &str) -> String {
    format!("/api/hcp/tenant/v1/projects/{project}/vms")
}

fn body(name: &str) -> Value {
    json!({"name": name, "flavor": "small", "image": "debian-12"})
}

async fn job_status(rest: &Rest, token: &str, job_id: &str) -> String {
    let r = rest.get(&format!("/api/hcp/tenant/v1/jobs/{job_id}"), token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.str("status")
}

/// Answers seen by the clients, by status.
type Seen = Arc<Mutex<BTreeMap<String, usize>>>;

/// A client under outages: the create carries an Idempotency-Key and is
/// retried with it on 503 (which must carry Retry-After) until it gets 202.
/// Any other answer fails the test. Returns the (vm, job) ids.
async fn create_until_accepted(rest: &Rest, token: &str, name: &str, seen: &Seen) -> (String, String) {
    let key = uuid::Uuid::new_v4().to_string();
    let payload = body(name).to_string();
    for _ in 0..600 {
        let r = rest
            .raw_with("POST", &vms("demo"), Some(token), Some(&payload), &[("idempotency-key", &key)])
            .await;
        let label = match &r {
            Ok(r) => r.status.to_string(),
            Err(_) => "connection refused".to_owned(),
        };
        *seen.lock().unwrap().entry(label).or_default() += 1;
        match r {
            Ok(r) if r.status == 202 => return (r.str("vm_id"), r.str("job_id")),
            Ok(r) if r.status == 503 => {
                assert!(r.headers.contains_key("retry-after"), "503 without Retry-After")
            }
            Ok(r) => panic!("create {name}: {} {}", r.status, r.body),
            Err(e) => panic!("create {name}: {e}"),
        }
        // The scenario, not synchronisation: a client's pause before it
        // tries again (600 tries bound the wait).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("create {name} never accepted");
}

fn accepted_so_far(seen: &Seen) -> usize {
    seen.lock().unwrap().get("202").copied().unwrap_or(0)
}

/// Waits until `n` creates in all were accepted.
async fn accepted_at_least(seen: &Seen, n: usize, what: &str) {
    wait_until(Duration::from_secs(30), what, || async { Ok((accepted_so_far(seen) >= n).then_some(())) })
        .await
        .unwrap();
}

/// Waits until `stream` has a leader other than `not`; returns it.
async fn leader(cluster: &NatsCluster, stream: &str, not: &[usize]) -> usize {
    wait_until(Duration::from_secs(30), "the stream to have a leader", || async {
        // No answer while JetStream has no quorum: not yet.
        Ok(cluster.stream_leader(stream).await.ok().flatten().filter(|l| !not.contains(l)))
    })
    .await
    .unwrap()
}

/// Waits until the JetStream object `info` asks about (`STREAM.INFO.<s>`
/// or `CONSUMER.INFO.<s>.<c>`) has a leader and two peers, all caught up;
/// returns its info. A failure shows the last answer.
async fn three_current_replicas(cluster: &NatsCluster, info: &str) -> Value {
    let last = Mutex::new(Value::Null);
    let found = wait_until(Duration::from_secs(30), info, || async {
        // No answer while it has no leader: not yet.
        let Ok(answer) = cluster.jetstream_api(info).await else { return Ok(None) };
        let peers = answer["cluster"]["replicas"].as_array().cloned().unwrap_or_default();
        let current = peers.iter().all(|p| p["current"] == true);
        let done = answer["cluster"]["leader"].is_string() && peers.len() == 2 && current;
        *last.lock().unwrap() = answer.clone();
        Ok(done.then_some(answer))
    })
    .await;
    match found {
        Ok(answer) => answer,
        Err(e) => panic!("{e}; last answer {}", last.lock().unwrap()),
    }
}

#[tokio::test]
async fn a_nats_cluster_loses_its_leader_then_its_quorum_and_hcp_loses_nothing() {
    let start = Instant::now();
    // Workers do not poll the store here (1 h): only JetStream delivers,
    // so every job run after the outage came through the cluster.
    let opts = StackOptions {
        backend: Backend::Postgres,
        nats_cluster: 3,
        api_processes: 2,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "100".into()],
        jobs_toml: "concurrency = 8\npoll_interval_ms = 3600000\n".into(),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let store = s.db.store().await.unwrap();

    // Core chose 3 replicas by itself (no stream_replicas configured).
    let cluster = s.nats_cluster.as_ref().unwrap();
    let info = three_current_replicas(cluster, &format!("STREAM.INFO.{JOBS}")).await;
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");
    let info = three_current_replicas(cluster, &format!("STREAM.INFO.{USAGE}")).await;
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");

    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    // Two clients, one per gateway, create VMs until told to stop.
    for c in 0..2 {
        let (rest, token, seen, stop) = (s.rests[c].clone(), token.clone(), seen.clone(), stop.clone());
        clients.spawn(async move {
            let mut accepted = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 1000 {
                accepted.push(create_until_accepted(&rest, &token, &format!("c{c}-{i}"), &seen).await);
                i += 1;
                // The scenario: steady load (about 10 creates a second in
                // all) rather than a backlog that would hide the time
                // JetStream takes to deliver again behind the workers'.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            accepted
        });
    }
    accepted_at_least(&seen, 20, "creates before the first kill").await;

    // The job stream's leader dies; the two others elect a new one.
    let cluster = s.nats_cluster.as_mut().unwrap();
    let first = leader(cluster, JOBS, &[]).await;
    let killed_at = Instant::now();
    cluster.kill(first).await;
    let second = leader(cluster, JOBS, &[first]).await;
    let election = killed_at.elapsed();
    let n = accepted_so_far(&seen);
    accepted_at_least(&seen, n + 20, "creates after the leader's death").await;

    // A second node dies: no quorum. Creates are accepted all the same and
    // their jobs wait in the outbox.
    cluster.kill(second).await;
    let before_no_quorum = accepted_so_far(&seen);
    accepted_at_least(&seen, before_no_quorum + 30, "creates while JetStream has no quorum").await;
    let pending = store.count_pending_outbox().await.unwrap();
    assert!(pending > 0, "jobs accepted without quorum wait in the outbox");

    // Both nodes come back; the load stops.
    let accepted_no_quorum = accepted_so_far(&seen) - before_no_quorum;
    cluster.restart(first).await.unwrap();
    cluster.restart(second).await.unwrap();
    let restarted_at = Instant::now();
    leader(cluster, JOBS, &[]).await;
    let quorum_at = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut accepted = Vec::new();
    while let Some(r) = clients.join_next().await {
        accepted.extend(r.unwrap());
    }
    wait_until(Duration::from_secs(60), "the outbox to drain", || async {
        Ok((store.count_pending_outbox().await? == 0).then_some(()))
    })
    .await
    .unwrap();
    let published = quorum_at.elapsed();

    // Everything is delivered (by JetStream: workers do not poll) and runs
    // exactly once.
    let jobs: Vec<String> = accepted.iter().map(|(_, j)| j.clone()).collect();
    wait_until(Duration::from_secs(90), "every job to succeed", || async {
        let mut done = 0;
        for j in &jobs {
            match job_status(&s.rest, &token, j).await.as_str() {
                "SUCCEEDED" => done += 1,
                "FAILED" => anyhow::bail!("job {j} failed"),
                _ => {}
            }
        }
        Ok((done == jobs.len()).then_some(()))
    })
    .await
    .unwrap();
    let delivered = quorum_at.elapsed();
    let stats = s.sim_stats().await.unwrap();
    let lost = accepted.iter().filter(|(vm, _)| !stats.creations.contains_key(vm)).count();
    let duplicated = stats.creations.values().filter(|n| **n > 1).count()
        + (stats.vm_count as usize).saturating_sub(accepted.len());
    assert_eq!(stats.overlapping_calls, 0, "two workers ran one job at once");

    // The streams and the workers' consumer still have 3 replicas, all
    // caught up after the restarts.
    let cluster = s.nats_cluster.as_ref().unwrap();
    for request in [
        format!("STREAM.INFO.{JOBS}"),
        format!("STREAM.INFO.{USAGE}"),
        format!("CONSUMER.INFO.{JOBS}.{}", hcp_core::queue::WORKER_CONSUMER),
    ] {
        let info = three_current_replicas(cluster, &request).await;
        let replicas = &info["config"]["num_replicas"];
        // A consumer inherits the stream's count (its own says 0).
        assert!(replicas == 3 || request.starts_with("CONSUMER"), "{request}: {info}");
    }

    let answers = seen.lock().unwrap().clone();
    eprintln!(
        "NATS cluster of 3, 2 API + 2 worker processes, 2 clients: {} creates accepted, answers {answers:?}; \
         leader {} killed, new leader {} after {election:?}; {accepted_no_quorum} creates accepted while \
         JetStream had no quorum ({pending} outbox rows pending); quorum back {:?} after the restarts, \
         then the outbox drained (all published) after {published:?} and every job SUCCEEDED after {delivered:?}; lost {lost}, duplicated {duplicated}; whole test {:?}",
        accepted.len(),
        cluster.name(first),
        cluster.name(second),
        quorum_at - restarted_at,
        start.elapsed(),
    );
    assert!(answers.keys().all(|k| k == "202" || k == "503"), "answers {answers:?}");
    assert_eq!((lost, duplicated), (0, 0));
}

#[tokio::test]
async fn a_stream_with_one_replica_is_moved_to_three_with_its_consumer() {
    // An earlier deployment ran its streams with one replica.
    let opts = StackOptions {
        backend: Backend::Postgres,
        nats_cluster: 3,
        api_processes: 1,
        worker_processes: 1,
        queue_toml: "stream_replicas = 1\n".into(),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let consumer = format!("CONSUMER.INFO.{JOBS}.{}", hcp_core::queue::WORKER_CONSUMER);
    let cluster = s.nats_cluster.as_ref().unwrap();
    wait_until(Duration::from_secs(30), "the worker's consumer on a stream of one replica", || async {
        let stream = cluster.jetstream_api(&format!("STREAM.INFO.{JOBS}")).await.ok();
        let consumer = cluster.jetstream_api(&consumer).await.ok();
        Ok(match (stream, consumer) {
            (Some(stream), Some(consumer)) if consumer["cluster"]["leader"].is_string() => {
                assert_eq!(stream["config"]["num_replicas"], 1, "{stream}");
                Some(())
            }
            _ => None,
        })
    })
    .await
    .unwrap();

    // The worker restarts with the count unset: on a cluster of three the
    // stream is moved to 3 replicas, and the consumer with it.
    s.set_queue_toml("");
    for w in s.workers() {
        let status = s.stop(&w, Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{w} exited with {status}");
    }
    s.start_worker().await.unwrap();
    let cluster = s.nats_cluster.as_ref().unwrap();
    let info = three_current_replicas(cluster, &format!("STREAM.INFO.{JOBS}")).await;
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");
    three_current_replicas(cluster, &consumer).await;

    // Jobs still flow through it.
    let r = s.rest.post(&vms("demo"), &token, &body("after-scale")).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.str("job_id");
    wait_until(Duration::from_secs(30), "the job to succeed", || async {
        Ok((job_status(&s.rest, &token, &job).await == "SUCCEEDED").then_some(()))
    })
    .await
    .unwrap();
}
