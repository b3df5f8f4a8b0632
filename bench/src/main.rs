//! `hcp-bench`: measures how close HCP runs to the limits of the machine,
//! each figure as a ratio against a limit measured in the same run (see
//! issue "Benchmarks"), on real PostgreSQL and NATS JetStream (P1 and P2
//! also on RabbitMQ, in the same run). Prints a
//! table and writes JSON (`--out`, default `bench-results.json`).
//!
//! The binary doubles as the `hcp` command (`hcp-bench core ...`), so the
//! stack it starts runs the same release build as the benchmark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use hcp_testkit::db::Backend;
use hcp_testkit::queues::Queue;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::{Value, json};

mod p4;
mod p7;

/// One figure of the report.
struct Figure {
    id: &'static str,
    what: String,
    value: f64,
    unit: &'static str,
    target: String,
    met: Option<bool>,
    detail: Value,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // Re-executed by the stack as the `hcp` command.
    if let Some(cmd) = args.get(1)
        && ["core", "gateway", "provider-sim", "up", "token"].contains(&cmd.as_str())
    {
        return hcp_cli::main(args);
    }
    if args.get(1).map(String::as_str) == Some("provider-libvirt") {
        return Ok(hcp_provider_libvirt::cli::main(args[1..].iter().cloned())?);
    }
    let which = args.get(1).map(String::as_str).unwrap_or("all").to_owned();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench-results.json"));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(&which, &out))
}

async fn run(which: &str, out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let mut figures = Vec::new();
    let all = which == "all";
    // `queues`: P1 and P2 on both brokers, nothing else.
    let queues = which == "queues";
    if all || queues || ["p1", "p2", "p3", "rss"].contains(&which) {
        let s = TestStack::start(&exe, full_speed(Queue::Nats)).await?;
        let idle = rss_all(&s);
        if all || queues || which == "p1" {
            let p1 = p1(&s).await?;
            let cpu = p1.detail["cpu_ms_per_request"].clone();
            figures.push(p1);
            figures.push(cpu_figure("CPU/create", "per accepted create with its job (P1)", &cpu, Some(0.35)));
            // P1 accepts faster than the workers finish; P2 must not start
            // behind that backlog.
            drain(&s).await?;
        }
        if all || queues || which == "p2" {
            figures.extend(p2(&s).await?);
        }
        if all || which == "p3" {
            figures.extend(p3(&s).await?);
        }
        let loaded = rss_all(&s);
        figures.push(Figure {
            id: "RSS",
            what: "resident memory, idle and after the load above (VmHWM)".into(),
            value: loaded.get("core").copied().unwrap_or_default() as f64 / 1024.0,
            unit: "MiB core peak",
            target: "report".into(),
            met: None,
            detail: json!({"idle_kib": idle, "peak_kib": loaded}),
        });
    }
    // P1 and P2 again on RabbitMQ, in the same run, for the README's
    // side-by-side table.
    if all || queues || ["p1", "p2"].contains(&which) {
        let s = TestStack::start(&exe, full_speed(Queue::RabbitMq)).await?;
        let mut on_rabbitmq = Vec::new();
        if all || queues || which == "p1" {
            let p1 = p1(&s).await?;
            let cpu = p1.detail["cpu_ms_per_request"].clone();
            on_rabbitmq.push(p1);
            on_rabbitmq.push(cpu_figure(
                "CPU/create",
                "per accepted create with its job (P1)",
                &cpu,
                Some(0.35),
            ));
            drain(&s).await?;
        }
        if all || queues || which == "p2" {
            on_rabbitmq.extend(p2(&s).await?);
        }
        figures.extend(on_rabbitmq.into_iter().map(|mut f| {
            f.id = on_rabbitmq_id(f.id);
            f.what = format!("{} on RabbitMQ", f.what);
            f
        }));
    }
    if all || which == "p4" {
        figures.push(p4::p4(&exe).await?);
    }
    if all || which == "p5" {
        figures.push(p5(&exe).await?);
    }
    if all || which == "p6" {
        figures.push(p6(&exe).await?);
    }
    if all || which == "p7" {
        figures.push(p7::p7(&exe).await?);
    }
    let elapsed = started.elapsed();
    report(&figures, elapsed, out).await
}

/// The P1-P3 stack: one tenant at full speed (no rate limit) on PostgreSQL
/// and `queue`.
fn full_speed(queue: Queue) -> StackOptions {
    StackOptions {
        backend: Backend::Postgres,
        core_toml: "database_max_connections = 32\n[telemetry]\nlog_filter = \"warn\"\n\
                    [limits]\nrate_per_second = 1e9\nburst = 1e9\n"
            .into(),
        jobs_toml: "concurrency = 32\n".into(),
        ..Default::default()
    }
    .with_queue(queue)
}

/// A figure's id when measured on RabbitMQ.
fn on_rabbitmq_id(id: &'static str) -> &'static str {
    match id {
        "P1" => "P1-rabbitmq",
        "CPU/create" => "CPU/create-rabbitmq",
        "P2" => "P2-rabbitmq",
        "P2-single" => "P2-single-rabbitmq",
        "CPU/job" => "CPU/job-rabbitmq",
        other => other,
    }
}

/// Waits until no job is queued or running.
async fn drain(s: &TestStack) -> anyhow::Result<()> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&s.db.url).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status IN ('QUEUED', 'RUNNING')")
            .fetch_one(&mut conn)
            .await?;
        if open == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{open} jobs still open");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads VmHWM (peak resident set) of a process, KiB.
fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of a process so far, milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), 1-based from
    // field 3: utime is 14, stime 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // `rest` starts at field 3 (state, not a number), so utime is f[10].
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 * 10.0 // 100 ticks per second on Linux
}

/// CPU milliseconds of the stack's processes, PostgreSQL's backends (all
/// `postgres` processes) and this benchmark process.
fn cpu_all(s: &TestStack) -> BTreeMap<&'static str, f64> {
    let mut m = BTreeMap::new();
    for (key, name) in [("core", "core-api-0"), ("gateway", "gateway-0"), ("sim", "sim")] {
        if let Some(pid) = s.pid(name) {
            m.insert(key, cpu_ms(pid));
        }
    }
    let mut pg = 0.0;
    let mut nats = 0.0;
    let mut rabbitmq = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        match comm.trim() {
            "postgres" => pg += cpu_ms(pid),
            "nats-server" => nats += cpu_ms(pid),
            // RabbitMQ's Erlang VM.
            "beam.smp" => rabbitmq += cpu_ms(pid),
            _ => {}
        }
    }
    m.insert("postgres", pg);
    m.insert("nats", nats);
    m.insert("rabbitmq", rabbitmq);
    m.insert("bench", cpu_ms(std::process::id()));
    m
}

/// CPU milliseconds per request of each process between two snapshots.
fn cpu_per(before: &BTreeMap<&'static str, f64>, after: &BTreeMap<&'static str, f64>, n: usize) -> Value {
    let mut out = serde_json::Map::new();
    let mut total = 0.0;
    for (k, a) in after {
        let d = (a - before.get(k).copied().unwrap_or(0.0)).max(0.0) / n as f64;
        total += d;
        out.insert((*k).to_owned(), json!((d * 1000.0).round() / 1000.0));
    }
    out.insert("total".to_owned(), json!((total * 1000.0).round() / 1000.0));
    Value::Object(out)
}

fn rss_all(s: &TestStack) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for (key, name) in [("core", "core-api-0"), ("gateway", "gateway-0"), ("sim", "sim")] {
        if let Some(pid) = s.pid(name) {
            m.insert(key, hwm_kib(pid));
        }
    }
    m
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `total` requests with `concurrency` workers; returns requests/s and
/// per-request latencies in ms (sorted).
async fn load<F, Fut>(total: usize, concurrency: usize, f: F) -> anyhow::Result<(f64, Vec<f64>)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                f(i).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    Ok((rate, all))
}

fn create_body(i: usize) -> String {
    json!({"name": format!("b{i}"), "flavor": "small", "image": "debian-12"}).to_string()
}

async fn p1(s: &TestStack) -> anyhow::Result<Figure> {
    const N: usize = 4000;
    const C: usize = 64;
    let token = s.tenant_token("acme", &["p1"]);
    let rest = s.rest.clone();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let cpu_before = cpu_all(s);
    let (accept_rate, lat) = load(N, C, move |i| {
        let (rest, token, key) = (rest.clone(), token.clone(), format!("{run_id}-{i}"));
        async move {
            let r = rest
                .raw_with(
                    "POST",
                    "/api/hcp/tenant/v1/projects/p1/vms",
                    Some(&token),
                    Some(&create_body(i)),
                    &[("idempotency-key", &key)],
                )
                .await?;
            anyhow::ensure!(r.status == 202, "create answered {}: {}", r.status, r.body);
            Ok(())
        }
    })
    .await?;
    // Where each accepted create's CPU went (the jobs' work runs meanwhile
    // too: it is counted, since it competes for the same two cores).
    let cpu_ms_per_request = cpu_per(&cpu_before, &cpu_all(s), N);

    // The limit: pgbench's single-row insert transactions on the same server
    // and concurrency.
    let db = &s.db.url;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_insert (id UUID PRIMARY KEY, payload TEXT NOT NULL)")
        .execute(&mut conn)
        .await?;
    let script = std::env::temp_dir().join(format!("hcp-pgbench-{}.sql", uuid::Uuid::new_v4().simple()));
    std::fs::write(&script, "INSERT INTO bench_insert (id, payload) VALUES (gen_random_uuid(), 'x');\n")?;
    let output = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", &C.to_string(), "-j", "2", "-T", "10", "-f"])
        .arg(&script)
        .arg(db)
        .output()
        .await
        .context("pgbench")?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&output.stdout);
    let tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .with_context(|| {
            format!("no tps in pgbench output: {text} {}", String::from_utf8_lossy(&output.stderr))
        })?;
    let ratio = accept_rate / tps;
    Ok(Figure {
        id: "P1",
        what: format!("REST creates accepted/s ({C} clients, idempotency keys) / pgbench 1-row inserts/s"),
        value: ratio,
        unit: "ratio",
        target: ">= 0.5".into(),
        met: Some(ratio >= 0.5),
        detail: json!({"accepted_per_s": accept_rate, "pgbench_tps": tps, "p50_ms": percentile(&lat, 0.5),
                       "p99_ms": percentile(&lat, 0.99), "requests": N,
                       "cpu_ms_per_request": cpu_ms_per_request}),
    })
}

/// What the job path adds to a job: accept to SUCCEEDED minus the
/// provider's own time, in waves of `c` concurrent creates.
struct JobOverhead {
    to_claim_p50: f64,
    claim_to_finish_p50: f64,
    p50: f64,
    p99: f64,
    jobs: usize,
    provider_ms_per_job: f64,
    cpu_ms_per_job: Value,
}

async fn p2(s: &TestStack) -> anyhow::Result<Vec<Figure>> {
    let waves = job_overhead(s, "p2", 64, 8).await?;
    let single = job_overhead(s, "p2-single", 1, 200).await?;
    let mut figures = vec![
        Figure {
            id: "P2",
            what:
                "accept -> SUCCEEDED minus provider time, waves of 64 concurrent creates, sim at zero latency"
                    .into(),
            value: waves.p50,
            unit: "ms p50",
            target: "p50 <= 10 ms, p99 <= 30 ms".into(),
            met: Some(waves.p50 <= 10.0 && waves.p99 <= 30.0),
            detail: waves.detail(),
        },
        Figure {
            id: "P2-single",
            what: "the same, one create at a time: a job's own overhead with nothing else running".into(),
            value: single.p50,
            unit: "ms p50",
            target: "p50 <= 2 ms (p99 reported)".into(),
            met: Some(single.p50 <= 2.0),
            detail: single.detail(),
        },
    ];
    figures.push(cpu_figure("CPU/job", "per job (P2 waves)", &waves.cpu_ms_per_job, None));
    Ok(figures)
}

impl JobOverhead {
    fn detail(&self) -> Value {
        json!({"p50_ms": self.p50, "p99_ms": self.p99, "jobs": self.jobs,
               "accepted_to_claimed_p50_ms": self.to_claim_p50, "claimed_to_finished_p50_ms": self.claim_to_finish_p50,
               "provider_ms_per_job": self.provider_ms_per_job, "cpu_ms_per_job": self.cpu_ms_per_job})
    }
}

/// A CPU figure: the total per request, and in `what` each process's part.
fn cpu_figure(id: &'static str, per: &str, cpu: &Value, target: Option<f64>) -> Figure {
    let total = cpu["total"].as_f64().unwrap_or_default();
    let parts: Vec<String> = cpu
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| *k != "total" && v.as_f64().unwrap_or_default() > 0.0)
        .map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or_default()))
        .collect();
    Figure {
        id,
        what: format!("CPU ms {per}, by process: {}", parts.join(", ")),
        value: total,
        unit: "ms CPU",
        target: target.map_or_else(|| "report".to_owned(), |t| format!("<= {t} ms")),
        met: target.map(|t| total <= t),
        detail: cpu.clone(),
    }
}

/// Waves of `c` concurrent creates; each wave waits until its jobs are
/// done (watched with one SQL count, so watching adds no API load). The
/// jobs' own timestamps (accept, finish) give the times.
async fn job_overhead(s: &TestStack, project: &str, c: usize, waves: usize) -> anyhow::Result<JobOverhead> {
    let token = s.tenant_token("acme", &[project]);
    let path = format!("/api/hcp/tenant/v1/projects/{project}/vms");
    let before = s.sim_stats().await?;
    let cpu_before = cpu_all(s);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&s.db.url).await?;
    let mut all_jobs: Vec<uuid::Uuid> = Vec::new();
    for wave in 0..waves {
        let mut tasks = Vec::new();
        for i in 0..c {
            let (rest, token, path) = (s.rest.clone(), token.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                rest.raw("POST", &path, Some(&token), Some(&create_body(wave * c + i))).await
            }));
        }
        let mut jobs = Vec::new();
        for t in tasks {
            let r = t.await??;
            anyhow::ensure!(r.status == 202, "create answered {}", r.status);
            jobs.push(r.str("job_id").parse::<uuid::Uuid>()?);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE id = ANY($1) AND status IN ('SUCCEEDED', 'FAILED')",
            )
            .bind(&jobs)
            .fetch_one(&mut conn)
            .await?;
            if done as usize == jobs.len() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "wave {wave} did not finish");
            // Short waits: a single job takes about a millisecond.
            tokio::time::sleep(Duration::from_millis(if c == 1 { 1 } else { 20 })).await;
        }
        all_jobs.extend(jobs);
    }
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT status, EXTRACT(EPOCH FROM (finished_at - created_at))::float8 * 1000 FROM jobs WHERE id = ANY($1)",
    )
    .bind(&all_jobs)
    .fetch_all(&mut conn)
    .await?;
    anyhow::ensure!(rows.iter().all(|(st, _)| st == "SUCCEEDED"), "some jobs failed");
    let cpu_ms_per_job = cpu_per(&cpu_before, &cpu_all(s), rows.len());
    let after = s.sim_stats().await?;
    let provider_ms_per_job = (after.busy_micros - before.busy_micros) as f64 / 1000.0 / rows.len() as f64;
    let mut overhead: Vec<f64> = rows.iter().map(|(_, t)| (t - provider_ms_per_job).max(0.0)).collect();
    overhead.sort_by(|a, b| a.total_cmp(b));
    // Where the time goes: accepted to claimed by a worker, and claimed to
    // finished.
    let mut split: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (started_at - created_at))::float8 * 1000, \
         EXTRACT(EPOCH FROM (finished_at - started_at))::float8 * 1000 FROM jobs WHERE id = ANY($1)",
    )
    .bind(&all_jobs)
    .fetch_all(&mut conn)
    .await?;
    split.sort_by(|a, b| a.0.total_cmp(&b.0));
    let to_claim_p50 = split.get(split.len() / 2).map_or(0.0, |s| s.0);
    split.sort_by(|a, b| a.1.total_cmp(&b.1));
    let claim_to_finish_p50 = split.get(split.len() / 2).map_or(0.0, |s| s.1);
    Ok(JobOverhead {
        to_claim_p50,
        claim_to_finish_p50,
        p50: percentile(&overhead, 0.5),
        p99: percentile(&overhead, 0.99),
        jobs: rows.len(),
        provider_ms_per_job,
        cpu_ms_per_job,
    })
}

async fn p3(s: &TestStack) -> anyhow::Result<Vec<Figure>> {
    use hcp_proto::tenant::vm_service_client::VmServiceClient;
    const N: usize = 4000;
    const C: usize = 64;
    let token = s.tenant_token("acme", &["p3"]);
    let r =
        s.rest.raw("POST", "/api/hcp/tenant/v1/projects/p3/vms", Some(&token), Some(&create_body(0))).await?;
    let vm = r.str("vm_id");
    let channel = s.core_channel().await?;
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;

    // Rounds alternate gRPC and REST, each after the job backlog is
    // drained, so that background work and drift fall on both sides alike;
    // the figure is the ratio of the medians.
    const ROUNDS: usize = 3;
    let grpc_get = {
        let (channel, auth, vm) = (channel.clone(), auth.clone(), vm.clone());
        move |_| {
            let (mut c, auth, vm) = (VmServiceClient::new(channel.clone()), auth.clone(), vm.clone());
            async move {
                let mut req = tonic::Request::new(hcp_proto::tenant::GetVmRequest {
                    project_id: "p3".into(),
                    vm_id: vm,
                });
                req.metadata_mut().insert("authorization", auth);
                c.get_vm(req).await?;
                Ok(())
            }
        }
    };
    let rest_get = {
        let (rest, token, vm) = (s.rest.clone(), token.clone(), vm.clone());
        move |_| {
            let (rest, token, vm) = (rest.clone(), token.clone(), vm.clone());
            async move {
                let r = rest.get(&format!("/api/hcp/tenant/v1/projects/p3/vms/{vm}"), &token).await?;
                anyhow::ensure!(r.status == 200, "get answered {}", r.status);
                Ok(())
            }
        }
    };
    let (mut grpc_gets, mut rest_gets) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        drain(s).await?;
        grpc_gets.push(load(N, C, grpc_get.clone()).await?.0);
        rest_gets.push(load(N, C, rest_get.clone()).await?.0);
    }

    let grpc_create = {
        let (channel, auth) = (channel.clone(), auth.clone());
        move |i: usize, round: usize| {
            let (mut c, auth) = (VmServiceClient::new(channel.clone()), auth.clone());
            async move {
                let mut req = tonic::Request::new(hcp_proto::tenant::CreateVmRequest {
                    project_id: "p3".into(),
                    name: format!("g{round}-{i}"),
                    flavor: "small".into(),
                    image: "debian-12".into(),
                    ..Default::default()
                });
                req.metadata_mut().insert("authorization", auth);
                c.create_vm(req).await?;
                Ok(())
            }
        }
    };
    let rest_create = {
        let (rest, token) = (s.rest.clone(), token.clone());
        move |i: usize, round: usize| {
            let (rest, token) = (rest.clone(), token.clone());
            async move {
                let body = json!({"name": format!("r{round}-{i}"), "flavor": "small", "image": "debian-12"});
                let r = rest
                    .raw("POST", "/api/hcp/tenant/v1/projects/p3/vms", Some(&token), Some(&body.to_string()))
                    .await?;
                anyhow::ensure!(r.status == 202, "create answered {}", r.status);
                Ok(())
            }
        }
    };
    let (mut grpc_creates, mut rest_creates) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        drain(s).await?;
        let g = grpc_create.clone();
        grpc_creates.push(load(N / 4, C, move |i| g(i, round)).await?.0);
        drain(s).await?;
        let r = rest_create.clone();
        rest_creates.push(load(N / 4, C, move |i| r(i, round)).await?.0);
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (grpc_rate, rest_rate) = (median(&grpc_gets), median(&rest_gets));
    let (grpc_c, rest_c) = (median(&grpc_creates), median(&rest_creates));
    Ok(vec![
        Figure {
            id: "P3-get",
            what: format!(
                "GET vm: REST via gateway / direct gRPC throughput, median of {ROUNDS} alternating rounds"
            ),
            value: rest_rate / grpc_rate,
            unit: "ratio",
            target: ">= 0.85".into(),
            met: Some(rest_rate / grpc_rate >= 0.85),
            detail: json!({"rest_per_s": rest_rate, "grpc_per_s": grpc_rate,
                           "rounds": {"rest_per_s": rest_gets, "grpc_per_s": grpc_gets}}),
        },
        Figure {
            id: "P3-create",
            what: format!(
                "create VM: REST via gateway / direct gRPC throughput, median of {ROUNDS} alternating rounds"
            ),
            value: rest_c / grpc_c,
            unit: "ratio",
            target: ">= 0.85".into(),
            met: Some(rest_c / grpc_c >= 0.85),
            detail: json!({"rest_per_s": rest_c, "grpc_per_s": grpc_c,
                           "rounds": {"rest_per_s": rest_creates, "grpc_per_s": grpc_creates}}),
        },
    ])
}

/// Inserts `n` ACTIVE VMs of tenant `bench` / `project` on `provider` with SQL.
async fn bulk_vms(db: &str, provider: &str, project: &str, n: u64) -> anyhow::Result<Vec<uuid::Uuid>> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db).await?;
    let sql = "INSERT INTO vms (id, tenant_id, project_id, name, flavor, vcpus, memory_mib, disk_gib, image, \
               image_source, zone, provider_id, networks, metadata, tags, user_data, hostname, status, \
               current_job_id, error_code, error_message, created_at, updated_at) \
               SELECT gen_random_uuid(), 'bench', $1, 'vm-' || g, 'small', 1, 512, 10, 'debian-12', 'x', \
               'zone-1', $2::uuid, '[]', '{}', '[]', NULL, 'vm-' || g, 'ACTIVE', NULL, NULL, NULL, \
               now() - interval '1 hour', now() - interval '1 hour' FROM generate_series(1, $3) g RETURNING id";
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar(sql).bind(project).bind(provider).bind(n as i64).fetch_all(&mut conn).await?;
    sqlx::query("ANALYZE vms").execute(&mut conn).await?;
    Ok(ids)
}

async fn provider_id(s: &TestStack) -> anyhow::Result<String> {
    let r = s.rest.get("/api/hcp/ops/v1/providers", &s.ops_token()).await?;
    Ok(r.body["providers"][0]["provider_id"].as_str().unwrap_or_default().to_owned())
}

async fn p5(exe: &Path) -> anyhow::Result<Figure> {
    const N: u64 = 100_000;
    let s = TestStack::start(exe, StackOptions { backend: Backend::Postgres, ..Default::default() }).await?;
    let provider = provider_id(&s).await?;
    let ids = bulk_vms(&s.db.url, &provider, "p5", N).await?;
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await?);
    for chunk in ids.chunks(10_000) {
        sim.add_vms(hcp_proto::sim::AddVmsRequest {
            vm_ids: chunk.iter().map(|u| u.to_string()).collect(),
            power_state: hcp_proto::provider::PowerState::Running as i32,
        })
        .await?;
    }
    // The reconciler runs in this process against the same store and
    // provider, so its time and memory are measured alone.
    let store = hcp_core::store::Store::connect(&s.db.url, 4).await?;
    let clients = hcp_core::providers::ProviderClients::new(
        Duration::from_secs(120),
        Duration::from_secs(5),
        Default::default(),
    );
    let reconciler = hcp_core::reconciler::Reconciler::new(
        store.clone(),
        clients,
        hcp_core::config::ReconcilerConfig::default(),
        "bench".into(),
        hcp_core::moves::Moves::new(
            store.clone(),
            std::sync::Arc::new(hcp_core::jobs::LocalQueue::default()),
            1,
        ),
    );
    let p = store.list_providers().await?.into_iter().next().context("no provider")?;
    let rss_before = hwm_kib(std::process::id());
    // The first pass also learns each VM's host (bulk-made VMs have none):
    // a one-off, reported apart; the figure is a pass in steady state.
    let t = Instant::now();
    reconciler.reconcile(&p).await.map_err(|e| anyhow::anyhow!(e))?;
    let first_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let report = reconciler.reconcile(&p).await.map_err(|e| anyhow::anyhow!(e))?;
    let secs = t.elapsed().as_secs_f64();
    let rss_after = hwm_kib(std::process::id());
    anyhow::ensure!(report.listed as u64 >= N && report.known as u64 >= N, "reconciled {report:?}");
    let mib = rss_after as f64 / 1024.0;
    Ok(Figure {
        id: "P5",
        what: format!("reconcile one provider with {N} VMs: list + diff"),
        value: secs,
        unit: "s",
        target: "<= 2 s and <= 200 MB".into(),
        met: Some(secs <= 2.0 && mib <= 200.0),
        detail: json!({"seconds": secs, "first_pass_seconds": first_secs, "peak_rss_mib": mib, "rss_before_mib": rss_before as f64 / 1024.0,
                       "listed": report.listed, "known": report.known, "drift": report.missing + report.power + report.orphans}),
    })
}

async fn p6(exe: &Path) -> anyhow::Result<Figure> {
    const N: u64 = 1_000_000;
    const PAGES: usize = 500;
    let s = TestStack::start(exe, StackOptions { backend: Backend::Postgres, ..Default::default() }).await?;
    let provider = provider_id(&s).await?;
    bulk_vms(&s.db.url, &provider, "big", N).await?;
    let token = s.token(Some("bench"), &["big"], &["tenant.member"], 3600);
    // Random positions take page tokens, which HCP signs (core/src/api/
    // page.rs): the benchmark holds the database, so it signs them with the
    // deployment's own key, as core would for a walk to that position.
    let store = hcp_core::store::Store::connect(&s.db.url, 2).await?;
    // Core made the key at start; the value offered here is never stored.
    let mut unused = [0u8; 32];
    unused[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let pages = hcp_core::api::page::PageTokens::new(store.shared_key("page-tokens", unused).await?);
    store.close().await;
    let mut binding = hcp_core::api::page::Binding::new("vms");
    binding.push("bench").push("big").push("");
    // Walk pages from the start, then from random positions.
    let mut lat = Vec::with_capacity(PAGES);
    let mut next = String::new();
    for i in 0..PAGES {
        let page_token = if i % 2 == 0 { next.clone() } else { pages.seal(&binding, uuid::Uuid::new_v4()) };
        let path = if page_token.is_empty() {
            "/api/hcp/tenant/v1/projects/big/vms?page_size=100".to_owned()
        } else {
            format!("/api/hcp/tenant/v1/projects/big/vms?page_size=100&page_token={page_token}")
        };
        let t = Instant::now();
        let r = s.rest.get(&path, &token).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(r.status == 200, "list answered {}: {}", r.status, r.body);
        if i % 2 == 0 {
            next = r.str("next_page_token");
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p99 = percentile(&lat, 0.99);
    Ok(Figure {
        id: "P6",
        what: format!("list VMs through REST, keyset pages of 100, {N} VMs in PostgreSQL"),
        value: p99,
        unit: "ms p99",
        target: "<= 10 ms".into(),
        met: Some(p99 <= 10.0),
        detail: json!({"p50_ms": percentile(&lat, 0.5), "p99_ms": p99, "pages": PAGES}),
    })
}

#[allow(clippy::print_stdout)]
async fn report(figures: &[Figure], elapsed: Duration, out: &Path) -> anyhow::Result<()> {
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_owned())
            .unwrap_or_default()
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("{:<10} {:>12} {:<14} {:<28} {:<4} what", "figure", "value", "unit", "target", "met");
    for f in figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("{:<10} {:>12.3} {:<14} {:<28} {:<4} {}", f.id, f.value, f.unit, f.target, met, f.what);
    }
    println!("({} cores, {:.0} s)", cores, elapsed.as_secs_f64());
    let json = json!({
        "machine": {"cores": cores},
        "versions": {
            "hcp": env!("CARGO_PKG_VERSION"),
            "rustc": version("rustc", "--version"),
            "postgres": version("psql", "--version"),
            "nats_server": version("nats-server", "--version"),
            "pgbench": version("pgbench", "--version"),
        },
        "elapsed_seconds": elapsed.as_secs_f64(),
        "figures": figures.iter().map(|f| json!({
            "id": f.id, "what": f.what, "value": f.value, "unit": f.unit, "target": f.target,
            "met": f.met, "detail": f.detail,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
