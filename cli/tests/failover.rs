//! PostgreSQL failover under load, on a real cluster from Debian's
//! packages: Patroni with etcd runs two PostgreSQL nodes with synchronous
//! replication, HAProxy in front follows Patroni's view of the primary,
//! and core (two API and two worker processes) is given HAProxy's
//! address. The primary node is killed outright (Patroni and PostgreSQL,
//! SIGKILL both) while clients keep creating VMs, retrying with their
//! Idempotency-Key. Once with NATS JetStream, once with RabbitMQ.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hcp_testkit::db::Backend;
use hcp_testkit::load::{self, Answers, Load};
use hcp_testkit::patroni::PgCluster;
use hcp_testkit::queues::Queue;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const PROJECT: &str = "demo";

/// The backends in LISTEN on the primary (each core process keeps one for
/// the catalog cache's notifications).
async fn listeners(url: &str) -> anyhow::Result<i64> {
    let pool = sqlx::PgPool::connect(url).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok(n)
}

async fn the_primary_dies_under_load_and_nothing_accepted_is_lost(queue: Queue) {
    if let Err(missing) = hcp_testkit::patroni::available() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the failover test; missing {missing}"
        );
        eprintln!(
            "SKIP the PostgreSQL failover test: {missing} not installed (scripts/services.sh ensure_patroni)"
        );
        return;
    }
    let mut cluster = PgCluster::start().await.unwrap();
    let opts = StackOptions {
        backend: Backend::Postgres,
        postgres_admin_url: Some(cluster.admin_url()),
        api_processes: 2,
        worker_processes: 2,
        sim_args: vec!["--latency-ms".into(), "50".into()],
        jobs_toml: "concurrency = 8\n".into(),
        ..Default::default()
    }
    .with_queue(queue);
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &[PROJECT]);
    let ops = s.ops_token();
    let processes = 4;
    let db_url = s.db.url.clone();
    wait_until(Duration::from_secs(30), "every core process to listen for catalog changes", || async {
        Ok((listeners(&db_url).await? >= processes).then_some(()))
    })
    .await
    .unwrap();

    // Steady load: four clients, two per gateway.
    let load = Load::start(&s, &token, PROJECT, "f", 4, 400);
    load.accepts(30, Duration::from_secs(60)).await.unwrap();

    // Kill the primary node outright.
    let old = cluster.leader().await.expect("a leader before the kill");
    let standby = 1 - old;
    let before = load.seen.lock().unwrap().clone();
    let killed = Instant::now();
    cluster.kill_node(old).await.unwrap();

    // The first successful create after the kill, from a client of its own.
    let probe_seen: Answers = Arc::default();
    let probe = load::create_until_accepted(&s.rests[1], &token, PROJECT, "after-kill", &probe_seen).await;
    let recovered = killed.elapsed();
    let during: std::collections::BTreeMap<String, usize> = {
        let now = load.seen.lock().unwrap().clone();
        let mut d = now.clone();
        for (k, v) in &before {
            *d.get_mut(k).unwrap() -= v;
        }
        for (k, v) in probe_seen.lock().unwrap().iter() {
            *d.entry(k.clone()).or_default() += v;
        }
        d.retain(|_, v| *v > 0);
        d
    };
    cluster.wait_leader(standby, Duration::from_secs(5)).await.unwrap();

    // Load goes on against the new primary, then stops.
    load.accepts(30, Duration::from_secs(60)).await.unwrap();
    let answers = load.seen.lock().unwrap().clone();
    let mut accepted = vec![probe];
    accepted.extend(load.finish().await);

    // Nothing lost, nothing twice, nothing stuck.
    let (lost, duplicated) = load::exactly_once(&s, &token, &accepted).await.unwrap();
    let jobs = s
        .rest
        .get(&format!("/api/hcp/tenant/v1/projects/{PROJECT}/jobs?page_size=1000"), &token)
        .await
        .unwrap();
    let unfinished: Vec<_> = jobs.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["status"] != "SUCCEEDED")
        .cloned()
        .collect();
    assert!(unfinished.is_empty(), "jobs not SUCCEEDED after the failover: {unfinished:?}");
    assert_eq!(jobs.body["jobs"].as_array().unwrap().len(), accepted.len(), "one job per accepted create");

    // Every core process listens again, on the new primary.
    wait_until(Duration::from_secs(30), "catalog listeners on the new primary", || async {
        Ok((listeners(&db_url).await? >= processes).then_some(()))
    })
    .await
    .unwrap();
    // A catalog change made through one API process is seen by the other.
    let flavor = serde_json::json!({"name": "after-failover", "vcpus": 1, "memory_mib": 512, "disk_gib": 1});
    let r = s.rests[0].post("/api/hcp/ops/v1/flavors", &ops, &flavor).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s.rests[1].get("/api/hcp/common/v1/flavors", &token).await.unwrap();
    assert!(r.body.to_string().contains("after-failover"), "{}", r.body);

    // The audit trail, sealed across the switch, verifies.
    let verify = wait_until(Duration::from_secs(30), "the audit trail to be sealed", || async {
        let r = s.rest.get("/api/hcp/ops/v1/audit-events:verify", &ops).await?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        let sealed = r.body["unsealed"] == "0" || r.body["unsealed"] == 0;
        Ok(sealed.then_some(r.body))
    })
    .await
    .unwrap();
    assert_eq!(verify["intact"], true, "{verify}");

    eprintln!(
        "PostgreSQL failover (Patroni, synchronous replication, HAProxy): first create accepted {:.1} s after the \
         primary was killed; answers during the switch {during:?}; {} creates accepted in all, answers {:?}; \
         lost {lost}, duplicated {duplicated}",
        recovered.as_secs_f64(),
        accepted.len(),
        answers
    );
    assert!(during.keys().all(|k| k.starts_with('2') || k == "503"), "answers during the switch: {during:?}");
    assert_eq!((lost, duplicated), (0, 0));
    drop(s);
    drop(cluster);
}

hcp_testkit::each_queue!(flavor = "multi_thread"; the_primary_dies_under_load_and_nothing_accepted_is_lost);
