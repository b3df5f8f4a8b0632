//! HCP on a NATS cluster: three JetStream servers, core given every node's
//! URL, HCP's streams replicated three times. Under create load from
//! clients that retry with their Idempotency-Key, the job stream's leader
//! is killed (JetStream elects another and goes on), then a second node
//! (JetStream has no quorum: creates are still accepted, the outbox holds
//! their jobs); the killed nodes are started again and every accepted
//! create's job is delivered and runs once. A stream an earlier
//! deployment made with one replica is moved to three, its consumer with it.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hcp_testkit::db::Backend;
use hcp_testkit::load::{self, Load, create_body as body, vms};
use hcp_testkit::nats::NatsCluster;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::Value;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const JOBS: &str = "HCP_JOBS";
const USAGE: &str = "HCP_USAGE";

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

    // Two clients, one per gateway, about 10 creates a second in all: a
    // steady load rather than a backlog that would hide the time JetStream
    // takes to deliver again behind the workers'.
    let load = Load::paced(&s, &token, "demo", "c", 2, 1000, Duration::from_millis(200));
    load.accepts(20, Duration::from_secs(30)).await.unwrap();

    // The job stream's leader dies; the two others elect a new one.
    let cluster = s.nats_cluster.as_mut().unwrap();
    let first = leader(cluster, JOBS, &[]).await;
    let killed_at = Instant::now();
    cluster.kill(first).await;
    let second = leader(cluster, JOBS, &[first]).await;
    let election = killed_at.elapsed();
    load.accepts(20, Duration::from_secs(30)).await.unwrap();

    // A second node dies: no quorum. Creates are accepted all the same and
    // their jobs wait in the outbox.
    cluster.kill(second).await;
    let before_no_quorum = load.count("202");
    load.accepts(30, Duration::from_secs(30)).await.unwrap();
    let pending = store.count_pending_outbox().await.unwrap();
    assert!(pending > 0, "jobs accepted without quorum wait in the outbox");

    // Both nodes come back; the load stops.
    let accepted_no_quorum = load.count("202") - before_no_quorum;
    cluster.restart(first).await.unwrap();
    cluster.restart(second).await.unwrap();
    let restarted_at = Instant::now();
    leader(cluster, JOBS, &[]).await;
    let quorum_at = Instant::now();
    let answers = load.seen.lock().unwrap().clone();
    let accepted = load.finish().await;
    wait_until(Duration::from_secs(60), "the outbox to drain", || async {
        Ok((store.count_pending_outbox().await? == 0).then_some(()))
    })
    .await
    .unwrap();
    let published = quorum_at.elapsed();

    // Everything is delivered (by JetStream: workers do not poll) and runs
    // exactly once.
    let jobs: Vec<String> = accepted.iter().map(|(_, j)| j.clone()).collect();
    load::all_succeed(&s.rest, &token, &jobs, Duration::from_secs(90)).await.unwrap();
    let delivered = quorum_at.elapsed();
    let (lost, duplicated) = load::exactly_once(&s, &token, &accepted).await.unwrap();

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
    load::all_succeed(&s.rest, &token, &[r.str("job_id")], Duration::from_secs(30)).await.unwrap();
}
