//! Steady create load for the tests that break things underneath HCP
//! (workers, the database, NATS, an upgrade): clients that retry with
//! their Idempotency-Key as a well-behaved client does, answers counted by
//! status, and the end check that every accepted create made exactly one
//! VM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::rest::Rest;
use crate::stack::TestStack;
use crate::wait_until;

/// The VM collection of `project`.
pub fn vms(project: &str) -> String {
    format!("/api/hcp/tenant/v1/projects/{project}/vms")
}

/// A small VM named `name` from the stack's seeded catalog.
pub fn create_body(name: &str) -> Value {
    json!({"name": name, "flavor": "small", "image": "debian-12"})
}

/// Answers seen, by status (`"202"`, `"503"`, `"connection refused"`).
pub type Answers = Arc<Mutex<BTreeMap<String, usize>>>;

/// Creates VM `name` in `project` with one Idempotency-Key, retrying on
/// 503/504 or a refused connection until it gets 202; returns (vm, job)
/// ids. Any other answer, or a 503 without Retry-After, fails the test.
pub async fn create_until_accepted(
    rest: &Rest,
    token: &str,
    project: &str,
    name: &str,
    seen: &Answers,
) -> (String, String) {
    let key = uuid::Uuid::new_v4().to_string();
    let payload = create_body(name).to_string();
    for _ in 0..1200 {
        let r = rest
            .raw_with("POST", &vms(project), Some(token), Some(&payload), &[("idempotency-key", &key)])
            .await;
        let label = match &r {
            Ok(r) => r.status.to_string(),
            Err(_) => "connection refused".to_owned(),
        };
        *seen.lock().unwrap().entry(label).or_default() += 1;
        match r {
            Ok(r) if r.status == 202 => return (r.str("vm_id"), r.str("job_id")),
            Ok(r) if r.status == 503 || r.status == 504 => {
                assert!(r.headers.contains_key("retry-after") || r.status == 504, "503 without Retry-After");
            }
            Ok(r) => panic!("create {name}: {} {}", r.status, r.body),
            Err(_) => {}
        }
        // The scenario, not synchronisation: a client's pause before it
        // tries again (1200 tries bound the wait).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("create {name} never accepted");
}

/// Creators running in the background: `clients` tasks, client `c` on
/// gateway `c % gateways`, each creating VMs named `<prefix><c>-<i>` one
/// after another (at most `max_each`) until [`Load::finish`].
pub struct Load {
    /// Every answer the creators have had.
    pub seen: Answers,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<Vec<(String, String)>>,
}

impl Load {
    /// Starts the creators, each making its next create as soon as the last
    /// is accepted.
    pub fn start(
        s: &TestStack,
        token: &str,
        project: &str,
        prefix: &str,
        clients: usize,
        max_each: usize,
    ) -> Self {
        Self::paced(s, token, project, prefix, clients, max_each, Duration::ZERO)
    }

    /// Starts the creators, each pausing `pause` after each accepted create:
    /// a steady load rather than a backlog.
    pub fn paced(
        s: &TestStack,
        token: &str,
        project: &str,
        prefix: &str,
        clients: usize,
        max_each: usize,
        pause: Duration,
    ) -> Self {
        let (seen, stop) = (Answers::default(), Arc::new(AtomicBool::new(false)));
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let rest = s.rests[c % s.rests.len()].clone();
            let (token, project, prefix) = (token.to_owned(), project.to_owned(), prefix.to_owned());
            let (seen, stop) = (seen.clone(), stop.clone());
            tasks.spawn(async move {
                let mut accepted = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < max_each {
                    let name = format!("{prefix}{c}-{i}");
                    accepted.push(create_until_accepted(&rest, &token, &project, &name, &seen).await);
                    i += 1;
                    if !pause.is_zero() {
                        // The scenario, not synchronisation: the client's pace.
                        tokio::time::sleep(pause).await;
                    }
                }
                accepted
            });
        }
        Self { seen, stop, tasks }
    }

    /// Count of `status` among the answers so far.
    pub fn count(&self, status: &str) -> usize {
        self.seen.lock().unwrap().get(status).copied().unwrap_or(0)
    }

    /// Waits until `n` more creates than now have been accepted.
    pub async fn accepts(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let target = self.count("202") + n;
        wait_until(timeout, &format!("{n} more creates accepted"), || async {
            Ok((self.count("202") >= target).then_some(()))
        })
        .await
    }

    /// Stops the creators (each ends its create in flight) and returns
    /// every accepted (vm, job).
    pub async fn finish(mut self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut accepted = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            accepted.extend(r.expect("a creator panicked"));
        }
        accepted
    }
}

/// Waits until every job has SUCCEEDED; fails on a FAILED one.
pub async fn all_succeed(rest: &Rest, token: &str, jobs: &[String], timeout: Duration) -> anyhow::Result<()> {
    wait_until(timeout, "every job to succeed", || async {
        let mut done = 0;
        for j in jobs {
            let r = rest.get(&format!("/api/hcp/tenant/v1/jobs/{j}"), token).await?;
            match r.str("status").as_str() {
                "SUCCEEDED" => done += 1,
                "FAILED" => anyhow::bail!("job {j} failed: {}", r.body),
                _ => {}
            }
        }
        Ok((done == jobs.len()).then_some(()))
    })
    .await
}

/// After every accepted create's job SUCCEEDED: (lost, duplicated) from
/// the sim's own records. Lost: an accepted VM the sim never made;
/// duplicated: a VM made twice, or more VMs than accepted creates.
pub async fn exactly_once(
    s: &TestStack,
    token: &str,
    accepted: &[(String, String)],
) -> anyhow::Result<(usize, usize)> {
    let jobs: Vec<String> = accepted.iter().map(|(_, j)| j.clone()).collect();
    all_succeed(&s.rest, token, &jobs, Duration::from_secs(180)).await?;
    let stats = s.sim_stats().await?;
    let lost = accepted.iter().filter(|(vm, _)| !stats.creations.contains_key(vm)).count();
    let duplicated = stats.creations.values().filter(|n| **n > 1).count()
        + (stats.vm_count as usize).saturating_sub(accepted.len());
    anyhow::ensure!(stats.overlapping_calls == 0, "two workers ran one job at once");
    Ok((lost, duplicated))
}
