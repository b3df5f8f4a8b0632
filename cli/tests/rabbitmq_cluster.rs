//! HCP on a RabbitMQ cluster: three nodes, core given every node's URL, the
//! job queue a quorum queue replicated on all three. Under create load from
//! clients that retry with their Idempotency-Key, the node leading the job
//! queue is killed: RabbitMQ elects another leader, core's connections to
//! the dead node move to the others, creates go on being accepted, and
//! every accepted create's job is delivered and runs once. Workers take
//! jobs only from RabbitMQ here (they do not poll the store), so every job
//! that ran came through the cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use hcp_testkit::db::Backend;
use hcp_testkit::load::{self, Load};
use hcp_testkit::rabbitmq::RabbitCluster;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const JOBS: &str = "HCP.jobs";

/// `(type, leader, members)` of `queue` as node `via` reports it.
async fn quorum_of(
    cluster: &RabbitCluster,
    via: usize,
    queue: &str,
) -> anyhow::Result<(String, String, usize)> {
    let out = cluster
        .rabbitmqctl(
            via,
            &["list_queues", "--quiet", "--no-table-headers", "name", "type", "leader", "members"],
        )
        .await?;
    for line in out.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.first() == Some(&queue) && cols.len() >= 4 {
            // members: `[n1@localhost,n2@localhost]`.
            let members = cols[3].trim_matches(|c| c == '[' || c == ']').split(',').filter(|m| !m.is_empty());
            return Ok((cols[1].to_owned(), cols[2].to_owned(), members.count()));
        }
    }
    anyhow::bail!("{queue} not listed: {out}")
}

/// Waits until the job queue has a leader other than `not`, as node `via`
/// sees it; returns the leading node's index.
async fn leader(cluster: &RabbitCluster, via: usize, not: Option<usize>) -> usize {
    wait_until(Duration::from_secs(60), "the job queue to have a leader", || async {
        let Ok((_, leader, _)) = quorum_of(cluster, via, JOBS).await else { return Ok(None) };
        let found = (0..cluster.len()).find(|i| cluster.node_name(*i) == leader);
        Ok(found.filter(|i| Some(*i) != not))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_rabbitmq_cluster_loses_the_job_queues_leader_and_hcp_loses_nothing() {
    let start = Instant::now();
    let opts = StackOptions {
        backend: Backend::Postgres,
        rabbitmq_cluster: 3,
        api_processes: 2,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "100".into()],
        jobs_toml: "concurrency = 8\npoll_interval_ms = 3600000\n".into(),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let store = s.db.store().await.unwrap();

    // Two clients, one per gateway, about 10 creates a second in all.
    let load = Load::paced(&s, &token, "demo", "c", 2, 1000, Duration::from_millis(200));
    load.accepts(20, Duration::from_secs(60)).await.unwrap();

    // Core declared the job queue a quorum queue on all three nodes.
    let cluster = s.rabbitmq_cluster.as_ref().unwrap();
    let (kind, _, members) = quorum_of(cluster, 0, JOBS).await.unwrap();
    assert_eq!((kind.as_str(), members), ("quorum", 3));

    // The job queue's leader dies; the two others elect a new one.
    let first = leader(cluster, 0, None).await;
    let via = (first + 1) % 3;
    let cluster = s.rabbitmq_cluster.as_mut().unwrap();
    let killed_at = Instant::now();
    cluster.kill(first).await;
    let second = leader(cluster, via, Some(first)).await;
    let election = killed_at.elapsed();
    let before = load.count("202");
    load.accepts(30, Duration::from_secs(60)).await.unwrap();
    let after_kill = load.count("202") - before;

    // The node comes back; the load stops.
    cluster.restart(first).await.unwrap();
    let answers = load.seen.lock().unwrap().clone();
    let accepted = load.finish().await;
    wait_until(Duration::from_secs(60), "the outbox to drain", || async {
        Ok((store.count_pending_outbox().await? == 0).then_some(()))
    })
    .await
    .unwrap();
    let (lost, duplicated) = load::exactly_once(&s, &token, &accepted).await.unwrap();
    let cluster = s.rabbitmq_cluster.as_ref().unwrap();
    eprintln!(
        "rabbitmq cluster: {} creates accepted, answers {answers:?}; the job queue's leader {} killed, \
         {} leads {:.1} s later; {after_kill} creates accepted after the kill; lost {lost}, duplicated {duplicated}; \
         {:.0} s in all",
        accepted.len(),
        cluster.node_name(first),
        cluster.node_name(second),
        election.as_secs_f64(),
        start.elapsed().as_secs_f64(),
    );
    assert_eq!((lost, duplicated), (0, 0));
    // The restarted node is a member of the queue again.
    let (_, _, members) = quorum_of(cluster, first, JOBS).await.unwrap();
    assert_eq!(members, 3);
}
