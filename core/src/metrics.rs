//! Core's Prometheus metrics. Events are counted where they happen
//! (`hcp_jobs_finished_total` and `hcp_job_duration_seconds` in the job
//! engine, `hcp_reconciler_drift_total` in the reconciler,
//! `hcp_provider_calls_total` and `hcp_provider_call_duration_seconds` in
//! the provider clients, `hcp_console_sessions_total` in the console
//! broker, `hcp_rate_limit_claims_total` and `hcp_rate_limit_fallback_total`
//! in admission; gRPC calls by [`hcp_telemetry::GrpcTraceLayer`]); what is state
//! is read from the store at each scrape ([`refresh`]), so every core
//! process reports the same numbers for it.

use std::collections::HashSet;
use std::sync::Arc;

use crate::model::{JobKind, JobStatus, VmStatus};
use crate::store::Store;

/// Sets the state gauges from the store; a failed read leaves them as they
/// were and counts `hcp_metrics_refresh_errors_total`.
pub async fn refresh(store: &Store) {
    let g = match store.metric_gauges().await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the metrics' gauges");
            metrics::counter!("hcp_metrics_refresh_errors_total").increment(1);
            return;
        }
    };
    // Statuses and kinds with no row read 0, not their last value.
    for status in VmStatus::ALL {
        let n = g.vms_by_status.iter().find(|(s, _)| s == status.as_str()).map_or(0, |(_, n)| *n);
        metrics::gauge!("hcp_vms", "status" => status.as_str()).set(n as f64);
    }
    for status in crate::model::VolumeStatus::ALL {
        let (n, gib) = g
            .volumes_by_status
            .iter()
            .find(|(s, ..)| s == status.as_str())
            .map_or((0, 0), |(_, n, gib)| (*n, *gib));
        metrics::gauge!("hcp_volumes", "status" => status.as_str()).set(n as f64);
        metrics::gauge!("hcp_volume_gib", "status" => status.as_str()).set(gib as f64);
    }
    for kind in JobKind::ALL {
        for status in [JobStatus::Queued, JobStatus::Running].map(JobStatus::as_str) {
            let n = g
                .open_jobs
                .iter()
                .find(|(k, s, _)| k == kind.as_str() && s == status)
                .map_or(0, |(_, _, n)| *n);
            metrics::gauge!("hcp_jobs_open", "kind" => kind.as_str(), "status" => status).set(n as f64);
        }
    }
    metrics::gauge!("hcp_outbox_pending").set(g.outbox_pending as f64);
    let lag =
        g.outbox_oldest.map_or(0.0, |t| (crate::model::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
    metrics::gauge!("hcp_outbox_lag_seconds").set(lag);
    // Label sets seen before but gone now (a removed provider, a project
    // whose last VM was deleted) read 0 rather than their last value.
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let providers: HashSet<String> = g.providers.iter().map(|(n, _)| n.clone()).collect();
    for gone in seen.providers.difference(&providers) {
        metrics::gauge!("hcp_provider_up", "provider" => gone.clone()).set(0.0);
    }
    for (name, healthy) in g.providers {
        metrics::gauge!("hcp_provider_up", "provider" => name).set(if healthy { 1.0 } else { 0.0 });
    }
    let projects: HashSet<(String, String)> =
        g.project_use.iter().map(|(t, p, ..)| (t.clone(), p.clone())).collect();
    let quota = |tenant: &str, project: &str, vms: i64, vcpus: i64, memory: i64| {
        for (resource, n) in [("vms", vms), ("vcpus", vcpus), ("memory_mib", memory)] {
            metrics::gauge!("hcp_quota_used", "tenant" => tenant.to_owned(), "project" => project.to_owned(), "resource" => resource)
                .set(n as f64);
        }
    };
    for (tenant, project) in seen.projects.difference(&projects) {
        quota(tenant, project, 0, 0, 0);
    }
    for (tenant, project, vms, vcpus, memory) in &g.project_use {
        quota(tenant, project, *vms, *vcpus, *memory);
    }
    seen.providers.extend(providers);
    seen.projects.extend(projects);
}

/// Label sets of the state gauges reported so far.
#[derive(Default)]
struct Seen {
    providers: HashSet<String>,
    projects: HashSet<(String, String)>,
}

static SEEN: std::sync::LazyLock<std::sync::Mutex<Seen>> = std::sync::LazyLock::new(Default::default);

/// The refresh hook for [`hcp_telemetry::metrics::serve`].
pub fn refresher(store: Store) -> hcp_telemetry::metrics::Refresh {
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { refresh(&store).await })
    })
}
