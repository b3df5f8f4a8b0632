//! Usage and billing export, shared by the operators' `UsageService`
//! (in `ops.rs`) and the tenant's `QuotaService.GetProjectUsage`: a window
//! and a grouping, checked into typed values, the events the store holds
//! for it, and the domain's [`crate::usage::usage`] over them.

use chrono::{DateTime, SecondsFormat, Utc};
use hcp_proto::error::{ApiError, excerpt};
use hcp_proto::tenant::{UsageReport, UsageRow};

use super::ApiContext;
use crate::error::from_store;
use crate::usage::{self as domain, GroupBy, Window};

/// A usage query, validated.
pub struct Query<'a> {
    /// The window.
    pub window: Window,
    /// The grouping.
    pub group_by: Vec<GroupBy>,
    /// Only this tenant's usage.
    pub tenant: Option<&'a str>,
    /// Only this project's (of `tenant`).
    pub project: Option<&'a str>,
}

impl<'a> Query<'a> {
    /// Checks the window and the grouping; errors name their field.
    pub fn new(
        from: &str,
        to: &str,
        group_by: &[String],
        tenant: Option<&'a str>,
        project: Option<&'a str>,
    ) -> Result<Self, ApiError> {
        let (from, to) = (time("from", from)?, time("to", to)?);
        let window = Window::new(from, to).map_err(|e| ApiError::invalid_field(e.field(), e.to_string()))?;
        let group_by = domain::parse_group_by(group_by)
            .map_err(|e| ApiError::invalid_field(e.field(), e.to_string()))?;
        Ok(Query { window, group_by, tenant, project })
    }
}

fn time(field: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).map_err(|_| {
        ApiError::invalid_field(field, format!("{field} must be an RFC 3339 time, got {}", excerpt(text)))
    })
}

/// Computes the report for `query`, up to now: the window's part in the
/// future has no usage, and the reply's `to` says where it ended.
pub async fn report(ctx: &ApiContext, query: &Query<'_>) -> Result<UsageReport, ApiError> {
    let window = query.window.as_of(Utc::now());
    let (vms, volumes) = ctx
        .store
        .usage_report_events(window.from(), window.to(), query.tenant, query.project)
        .await
        .map_err(|e| from_store(e, "usage"))?;
    let rows = domain::usage(&vms, &volumes, window, &query.group_by);
    Ok(UsageReport {
        from: window.from().to_rfc3339_opts(SecondsFormat::AutoSi, true),
        to: window.to().to_rfc3339_opts(SecondsFormat::AutoSi, true),
        group_by: query.group_by.iter().map(|g| g.as_str().to_owned()).collect(),
        rows: rows.into_iter().map(row).collect(),
    })
}

fn row(r: domain::UsageRow) -> UsageRow {
    UsageRow {
        tenant_id: r.tenant,
        project_id: r.project,
        flavor: r.flavor,
        resource_id: r.resource,
        day: r.day.map(|d| d.to_string()).unwrap_or_default(),
        vm_seconds: r.vm_seconds,
        vcpu_seconds: r.vcpu_seconds,
        memory_mib_seconds: r.memory_mib_seconds,
        disk_gib_seconds: r.disk_gib_seconds,
        volume_gib_seconds: r.volume_gib_seconds,
        vm_hours: domain::hours(r.vm_seconds),
        vcpu_hours: domain::hours(r.vcpu_seconds),
        memory_gib_hours: domain::hours(r.memory_mib_seconds) / 1024.0,
        disk_gib_hours: domain::hours(r.disk_gib_seconds),
        volume_gib_hours: domain::hours(r.volume_gib_seconds),
    }
}
