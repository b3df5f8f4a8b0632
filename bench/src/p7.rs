//! P7: draining a host. 100 running VMs on one simulated host (zero
//! latency), a drain through REST, timed to the host being DRAINED; with
//! the provider's own time per move (the simulator's busy time), the share
//! of each move the control plane takes (accept, queue, lease, the job's
//! steps and finish), and CPU by process.

use std::path::Path;
use std::time::{Duration, Instant};

use hcp_testkit::db::Backend;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::json;

use crate::{Figure, cpu_all, cpu_per, percentile, provider_id};

const N: u64 = 100;
const CONCURRENCY: u32 = 8;

pub(crate) async fn p7(exe: &Path) -> anyhow::Result<Figure> {
    let opts = StackOptions {
        backend: Backend::Postgres,
        nats: true,
        core_toml: format!(
            "[telemetry]\nlog_filter = \"warn\"\n[drain]\nconcurrency = {CONCURRENCY}\ninterval_ms = 50\n"
        ),
        sim_capabilities: "live_migration,cold_migration,console_vnc".into(),
        ..Default::default()
    };
    let s = TestStack::start(exe, opts).await?;
    let provider = provider_id(&s).await?;
    // The VMs exist in the store on sim-host-1 and on the simulator (which
    // puts VMs added out of band on its first host).
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&s.db.url).await?;
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO vms (id, tenant_id, project_id, name, flavor, vcpus, memory_mib, disk_gib, image, \
         image_source, zone, provider_id, networks, metadata, tags, user_data, hostname, status, \
         current_job_id, error_code, error_message, created_at, updated_at, host) \
         SELECT gen_random_uuid(), 'bench', 'p7', 'vm-' || g, 'small', 1, 512, 10, 'debian-12', 'x', \
         'zone-1', $1::uuid, '[]', '{}', '[]', NULL, 'vm-' || g, 'ACTIVE', NULL, NULL, NULL, \
         now() - interval '1 hour', now() - interval '1 hour', 'sim-host-1' FROM generate_series(1, $2) g \
         RETURNING id",
    )
    .bind(&provider)
    .bind(N as i64)
    .fetch_all(&mut conn)
    .await?;
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await?);
    sim.add_vms(hcp_proto::sim::AddVmsRequest {
        vm_ids: ids.iter().map(|u| u.to_string()).collect(),
        power_state: hcp_proto::provider::PowerState::Running as i32,
    })
    .await?;
    let hosts = format!("/api/hcp/ops/v1/providers/{provider}/hosts");
    let before = s.sim_stats().await?;
    let cpu_before = cpu_all(&s);
    let started = Instant::now();
    let r = s.rest.post(&format!("{hosts}/sim-host-1:drain"), &s.ops_token(), &json!({})).await?;
    anyhow::ensure!(r.status == 200, "drain: {} {}", r.status, r.body);
    loop {
        let r = s.rest.get(&hosts, &s.ops_token()).await?;
        let h =
            r.body["hosts"].as_array().and_then(|a| a.iter().find(|h| h["name"] == "sim-host-1")).cloned();
        if h.as_ref().is_some_and(|h| h["drain"] == "DRAINED") {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "drain did not finish: {h:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_per(&cpu_before, &cpu_all(&s), N as usize);
    let after = s.sim_stats().await?;
    let moves = after.calls.get("MigrateVm").copied().unwrap_or(0)
        - before.calls.get("MigrateVm").copied().unwrap_or(0);
    anyhow::ensure!(moves == N, "{moves} MigrateVm calls for {N} VMs");
    // Each move's time from accept to finish, from the jobs.
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT status, EXTRACT(EPOCH FROM (finished_at - created_at))::float8 * 1000 FROM jobs \
         WHERE kind = 'vm.migrate'",
    )
    .fetch_all(&mut conn)
    .await?;
    anyhow::ensure!(
        rows.len() as u64 == N && rows.iter().all(|(st, _)| st == "SUCCEEDED"),
        "moves: {rows:?}"
    );
    let mut lat: Vec<f64> = rows.iter().map(|(_, t)| *t).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let provider_ms = (after.busy_micros - before.busy_micros) as f64 / 1000.0 / N as f64;
    let p50 = percentile(&lat, 0.5);
    let share = if p50 > 0.0 { (1.0 - provider_ms / p50).clamp(0.0, 1.0) } else { 1.0 };
    Ok(Figure {
        id: "P7",
        what: format!(
            "drain a host of {N} running VMs on the sim (zero latency), {CONCURRENCY} moves at a time"
        ),
        value: secs,
        unit: "s",
        target: "report".into(),
        met: None,
        detail: json!({
            "seconds": secs, "moves_per_s": N as f64 / secs,
            "move_ms_p50": p50, "move_ms_p99": percentile(&lat, 0.99),
            "provider_ms_per_move": provider_ms, "control_plane_share_of_a_move": share,
            "cpu_ms_per_move": cpu, "concurrency": CONCURRENCY,
        }),
    })
}
