//! Usage totals for billing: from the usage events a VM's and a volume's
//! jobs append (started, stopped, resized, deleted; created, extended,
//! deleted, ...) to seconds of use within a time window, grouped as asked.
//!
//! A VM is billed for running time (VM seconds by flavor, vCPU seconds,
//! memory MiB seconds) at the size the last event before each moment gave
//! it, and for its disk (disk GiB seconds) for as long as it exists,
//! running or not. A volume is billed for its size (volume GiB seconds)
//! from its creation to its deletion. Intervals are clipped to the window
//! `[from, to)`, so the state at `from` must be known: the caller passes,
//! besides the events in the window, each resource's last event before
//! `from`.
//!
//! Seconds are computed from microsecond timestamps and reported as whole
//! seconds (rounded down from the exact total, per row): the integer fields
//! are exact to the second; hours are those seconds divided by 3600.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};

use crate::lifecycle::{Metering, VolumeMetering};

/// The longest window one usage query may span.
pub const MAX_WINDOW_DAYS: i64 = 366;

/// A VM's usage event, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Tenant billed.
    pub tenant: String,
    /// Project billed.
    pub project: String,
    /// The VM.
    pub vm: String,
    /// What happened.
    pub event: Metering,
    /// The VM's size from then on.
    pub flavor: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// Disk.
    pub disk_gib: u32,
}

/// A volume's usage event, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeEvent {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Tenant billed.
    pub tenant: String,
    /// Project billed.
    pub project: String,
    /// The volume.
    pub volume: String,
    /// What happened.
    pub event: VolumeMetering,
    /// Its size from then on.
    pub size_gib: u32,
}

/// What usage rows are grouped by. Without any, one row totals everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupBy {
    /// The tenant.
    Tenant,
    /// The tenant's project.
    Project,
    /// The VM's flavor (volumes have none).
    Flavor,
    /// The resource: a VM or a volume.
    Resource,
    /// The UTC day.
    Day,
}

impl GroupBy {
    /// Every grouping.
    pub const ALL: &'static [GroupBy] =
        &[GroupBy::Tenant, GroupBy::Project, GroupBy::Flavor, GroupBy::Resource, GroupBy::Day];

    /// The spelling in `group_by`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Tenant => "tenant",
            GroupBy::Project => "project",
            GroupBy::Flavor => "flavor",
            GroupBy::Resource => "resource",
            GroupBy::Day => "day",
        }
    }

    /// The grouping spelled `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|g| g.as_str() == s)
    }
}

/// Why a usage query is refused; each names the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// `to` is not after `from`.
    #[error("to must be after from")]
    Inverted,
    /// The window is longer than [`MAX_WINDOW_DAYS`].
    #[error("the window from from to to is longer than {MAX_WINDOW_DAYS} days")]
    TooLong,
    /// `group_by` names something unknown.
    #[error("unknown group_by {0}; known: tenant, project, flavor, resource, day")]
    UnknownGroup(String),
}

impl UsageError {
    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            UsageError::Inverted | UsageError::TooLong => "to",
            UsageError::UnknownGroup(_) => "group_by",
        }
    }
}

/// A checked usage window `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

impl Window {
    /// The window `[from, to)`: `to` after `from`, at most
    /// [`MAX_WINDOW_DAYS`] long.
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Self, UsageError> {
        if to <= from {
            return Err(UsageError::Inverted);
        }
        if to - from > Duration::days(MAX_WINDOW_DAYS) {
            return Err(UsageError::TooLong);
        }
        Ok(Window { from, to })
    }

    /// Its start.
    pub fn from(&self) -> DateTime<Utc> {
        self.from
    }

    /// Its end (excluded).
    pub fn to(&self) -> DateTime<Utc> {
        self.to
    }

    /// The part of it that has happened by `now`: nothing is used in the
    /// future, so a window reaching past `now` ends there (and one wholly
    /// after it is empty, ending where it starts).
    pub fn as_of(self, now: DateTime<Utc>) -> Self {
        Window { from: self.from, to: self.to.min(now).max(self.from) }
    }
}

/// Parses `group_by` values (each may hold several, comma-separated),
/// without duplicates, in a fixed order.
pub fn parse_group_by<S: AsRef<str>>(values: &[S]) -> Result<Vec<GroupBy>, UsageError> {
    let mut out = Vec::new();
    for v in values {
        for name in v.as_ref().split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let g = GroupBy::parse(name).ok_or_else(|| UsageError::UnknownGroup(name.to_owned()))?;
            if !out.contains(&g) {
                out.push(g);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One row of a usage report. A key field the grouping does not name is
/// empty (`day`: `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    /// The tenant, when grouped by tenant, project or resource.
    pub tenant: String,
    /// The project, when grouped by project or resource.
    pub project: String,
    /// The VM flavor, when grouped by flavor (empty for volumes).
    pub flavor: String,
    /// The VM or volume id, when grouped by resource.
    pub resource: String,
    /// The UTC day, when grouped by day.
    pub day: Option<NaiveDate>,
    /// Seconds VMs ran.
    pub vm_seconds: u64,
    /// Seconds VMs ran times their vCPUs.
    pub vcpu_seconds: u64,
    /// Seconds VMs ran times their memory in MiB.
    pub memory_mib_seconds: u64,
    /// Seconds VMs existed times their disk in GiB.
    pub disk_gib_seconds: u64,
    /// Seconds volumes existed times their size in GiB.
    pub volume_gib_seconds: u64,
}

/// The key of a row: what the grouping keeps of a resource and a day.
type Key = (String, String, String, String, Option<NaiveDate>);

/// Exact totals in microseconds (times the size), before rounding.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    vm: u128,
    vcpu: u128,
    memory: u128,
    disk: u128,
    volume: u128,
}

/// What a resource's usage is charged to.
struct Owner<'a> {
    tenant: &'a str,
    project: &'a str,
    resource: &'a str,
}

struct Report<'a> {
    window: Window,
    group_by: &'a [GroupBy],
    rows: BTreeMap<Key, Totals>,
}

impl Report<'_> {
    /// Charges `[start, end)` clipped to the window, split by UTC day when
    /// grouped by day; `add` says what one microsecond costs.
    fn charge(
        &mut self,
        owner: &Owner<'_>,
        flavor: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        add: impl Fn(&mut Totals, u128),
    ) {
        let mut start = start.max(self.window.from);
        let end = end.min(self.window.to);
        let by = |g| self.group_by.contains(&g);
        let (tenant, project, resource, flavor_key, daily) = (
            by(GroupBy::Tenant) || by(GroupBy::Project) || by(GroupBy::Resource),
            by(GroupBy::Project) || by(GroupBy::Resource),
            by(GroupBy::Resource),
            by(GroupBy::Flavor),
            by(GroupBy::Day),
        );
        while start < end {
            let day = start.date_naive();
            let next_day = day.succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|d| d.and_utc());
            let piece_end = match next_day {
                Some(midnight) if daily => end.min(midnight),
                _ => end,
            };
            let micros = (piece_end - start).num_microseconds().unwrap_or(0).max(0) as u128;
            let key: Key = (
                if tenant { owner.tenant.to_owned() } else { String::new() },
                if project { owner.project.to_owned() } else { String::new() },
                if flavor_key { flavor.to_owned() } else { String::new() },
                if resource { owner.resource.to_owned() } else { String::new() },
                daily.then_some(day),
            );
            add(self.rows.entry(key).or_default(), micros);
            start = piece_end;
        }
    }
}

/// Computes the usage in `window` from each VM's and volume's events: all
/// of those in the window and at least the last one before it (earlier ones
/// change nothing). Events of one resource may come in any order; they are
/// applied by time. Rows come sorted by their key.
pub fn usage(
    vms: &[VmEvent],
    volumes: &[VolumeEvent],
    window: Window,
    group_by: &[GroupBy],
) -> Vec<UsageRow> {
    let mut report = Report { window, group_by, rows: BTreeMap::new() };

    let mut by_vm: BTreeMap<&str, Vec<&VmEvent>> = BTreeMap::new();
    for e in vms {
        by_vm.entry(e.vm.as_str()).or_default().push(e);
    }
    for (vm, mut events) in by_vm {
        events.sort_by_key(|e| e.at);
        // The state since `since`: whether it exists and runs, at what size.
        let mut current: Option<(&VmEvent, bool)> = None;
        let mut since = window.from;
        for e in &events {
            if let Some((size, running)) = current {
                charge_vm(&mut report, vm, size, running, since, e.at.min(window.to));
            }
            current = match e.event {
                Metering::Started => Some((*e, true)),
                Metering::Stopped => Some((*e, false)),
                Metering::Resized => Some((*e, current.is_some_and(|(_, running)| running))),
                Metering::Deleted => None,
            };
            since = e.at;
        }
        if let Some((size, running)) = current {
            charge_vm(&mut report, vm, size, running, since, window.to);
        }
    }

    let mut by_volume: BTreeMap<&str, Vec<&VolumeEvent>> = BTreeMap::new();
    for e in volumes {
        by_volume.entry(e.volume.as_str()).or_default().push(e);
    }
    for (volume, mut events) in by_volume {
        events.sort_by_key(|e| e.at);
        let mut current: Option<&VolumeEvent> = None;
        let mut since = window.from;
        for e in &events {
            if let Some(size) = current {
                charge_volume(&mut report, volume, size, since, e.at.min(window.to));
            }
            current = match e.event {
                VolumeMetering::Deleted => None,
                VolumeMetering::Created
                | VolumeMetering::Extended
                | VolumeMetering::Attached
                | VolumeMetering::Detached => Some(*e),
            };
            since = e.at;
        }
        if let Some(size) = current {
            charge_volume(&mut report, volume, size, since, window.to);
        }
    }

    let seconds = |micros: u128| u64::try_from(micros / 1_000_000).unwrap_or(u64::MAX);
    report
        .rows
        .into_iter()
        .map(|((tenant, project, flavor, resource, day), t)| UsageRow {
            tenant,
            project,
            flavor,
            resource,
            day,
            vm_seconds: seconds(t.vm),
            vcpu_seconds: seconds(t.vcpu),
            memory_mib_seconds: seconds(t.memory),
            disk_gib_seconds: seconds(t.disk),
            volume_gib_seconds: seconds(t.volume),
        })
        .collect()
}

fn charge_vm(
    report: &mut Report<'_>,
    vm: &str,
    size: &VmEvent,
    running: bool,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) {
    let owner = Owner { tenant: &size.tenant, project: &size.project, resource: vm };
    let (vcpus, memory, disk) =
        (u128::from(size.vcpus), u128::from(size.memory_mib), u128::from(size.disk_gib));
    report.charge(&owner, &size.flavor, start, end, |t, us| {
        t.disk += us * disk;
        if running {
            t.vm += us;
            t.vcpu += us * vcpus;
            t.memory += us * memory;
        }
    });
}

fn charge_volume(
    report: &mut Report<'_>,
    volume: &str,
    size: &VolumeEvent,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) {
    let owner = Owner { tenant: &size.tenant, project: &size.project, resource: volume };
    let gib = u128::from(size.size_gib);
    report.charge(&owner, "", start, end, |t, us| t.volume += us * gib);
}

/// Hours from seconds, for display (the seconds are the exact figure).
pub fn hours(seconds: u64) -> f64 {
    seconds as f64 / 3600.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A VM event of VM `vm` at `at`: `(event, flavor, vcpus, memory, disk)`.
    fn vm(vm: &str, at: &str, event: Metering, size: (&str, u32, u32, u32)) -> VmEvent {
        VmEvent {
            at: t(at),
            tenant: "acme".into(),
            project: if vm.starts_with('b') { "beta".into() } else { "demo".into() },
            vm: vm.into(),
            event,
            flavor: size.0.into(),
            vcpus: size.1,
            memory_mib: size.2,
            disk_gib: size.3,
        }
    }

    fn vol(volume: &str, at: &str, event: VolumeMetering, size_gib: u32) -> VolumeEvent {
        VolumeEvent {
            at: t(at),
            tenant: "acme".into(),
            project: "demo".into(),
            volume: volume.into(),
            event,
            size_gib,
        }
    }

    const SMALL: (&str, u32, u32, u32) = ("small", 2, 2048, 20);
    const LARGE: (&str, u32, u32, u32) = ("large", 4, 8192, 40);

    fn window() -> Window {
        Window::new(t("2026-01-01T00:00:00Z"), t("2026-01-03T00:00:00Z")).unwrap()
    }

    /// Totals without grouping: `(vm, vcpu, memory MiB, disk GiB, volume GiB)` seconds.
    fn totals(vms: &[VmEvent], volumes: &[VolumeEvent]) -> (u64, u64, u64, u64, u64) {
        let rows = usage(vms, volumes, window(), &[]);
        match rows.as_slice() {
            [] => (0, 0, 0, 0, 0),
            [r] => {
                (r.vm_seconds, r.vcpu_seconds, r.memory_mib_seconds, r.disk_gib_seconds, r.volume_gib_seconds)
            }
            more => panic!("ungrouped usage has one row, got {more:?}"),
        }
    }

    #[test]
    fn usage_adds_up_to_the_second() {
        use Metering::{Deleted, Resized, Started, Stopped};
        use VolumeMetering as V;
        const W: u64 = 48 * 3600; // the window's seconds
        type Row = (&'static str, Vec<VmEvent>, Vec<VolumeEvent>, (u64, u64, u64, u64, u64));
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("started before from, stopped 1h30m in: billed from `from`; the disk for the whole window",
                vec![vm("a", "2025-12-31T12:00:00Z", Started, SMALL), vm("a", "2026-01-01T01:30:00Z", Stopped, SMALL)],
                vec![],
                (5400, 10800, 5400 * 2048, W * 20, 0)),
            ("partial hours and a resize mid-run: 20m30s small, 39m30s large, stopped, 45s more, deleted",
                vec![vm("a", "2026-01-01T10:00:00Z", Started, SMALL), vm("a", "2026-01-01T10:20:30Z", Resized, LARGE),
                     vm("a", "2026-01-01T11:00:00Z", Stopped, LARGE), vm("a", "2026-01-01T12:00:00Z", Started, LARGE),
                     vm("a", "2026-01-01T12:00:45Z", Deleted, LARGE)],
                vec![],
                (1230 + 2370 + 45, 1230 * 2 + (2370 + 45) * 4, 1230 * 2048 + (2370 + 45) * 8192,
                 1230 * 20 + (2370 + 3600 + 45) * 40, 0)),
            ("a resize while stopped changes the disk only",
                vec![vm("a", "2026-01-01T00:00:00Z", Started, SMALL), vm("a", "2026-01-01T00:00:10Z", Stopped, SMALL),
                     vm("a", "2026-01-01T00:00:20Z", Resized, LARGE), vm("a", "2026-01-01T00:00:30Z", Deleted, LARGE)],
                vec![],
                (10, 20, 10 * 2048, 20 * 20 + 10 * 40, 0)),
            ("running across `to`: the last minute",
                vec![vm("a", "2026-01-02T23:59:00Z", Started, SMALL)],
                vec![],
                (60, 120, 60 * 2048, 60 * 20, 0)),
            ("started after `to`: nothing",
                vec![vm("a", "2026-01-03T00:00:00Z", Started, SMALL)],
                vec![],
                (0, 0, 0, 0, 0)),
            ("deleted before `from`: nothing",
                vec![vm("a", "2025-12-30T00:00:00Z", Started, SMALL), vm("a", "2025-12-31T00:00:00Z", Deleted, SMALL)],
                vec![],
                (0, 0, 0, 0, 0)),
            ("stopped before `from`, started inside: the disk all along, running from the start",
                vec![vm("a", "2025-12-31T00:00:00Z", Stopped, SMALL), vm("a", "2026-01-02T00:00:00Z", Started, SMALL)],
                vec![],
                (86400, 2 * 86400, 2048 * 86400, 20 * W, 0)),
            ("sub-second timestamps: the exact total is rounded down once",
                vec![vm("a", "2026-01-01T00:00:00.400Z", Started, SMALL), vm("a", "2026-01-01T00:00:01.000Z", Stopped, SMALL),
                     vm("a", "2026-01-01T00:00:02.000Z", Started, SMALL), vm("a", "2026-01-01T00:00:02.700Z", Deleted, SMALL)],
                vec![],
                (1, 2, 2662, 46, 0)),
            ("a volume created, extended and deleted in the window",
                vec![],
                vec![vol("v", "2026-01-01T00:00:10Z", V::Created, 10), vol("v", "2026-01-01T01:00:10Z", V::Extended, 20),
                     vol("v", "2026-01-01T02:00:10Z", V::Deleted, 20)],
                (0, 0, 0, 0, 3600 * 10 + 3600 * 20)),
            ("a volume made before `from` and attached inside: billed the whole window at its size",
                vec![],
                vec![vol("v", "2025-12-30T00:00:00Z", V::Created, 5), vol("v", "2026-01-01T08:00:00Z", V::Attached, 5),
                     vol("v", "2026-01-01T09:00:00Z", V::Detached, 5)],
                (0, 0, 0, 0, W * 5)),
            ("two VMs add up",
                vec![vm("a", "2026-01-01T00:00:00Z", Started, SMALL), vm("a", "2026-01-01T00:01:00Z", Deleted, SMALL),
                     vm("b", "2026-01-01T00:00:00Z", Started, LARGE), vm("b", "2026-01-01T00:00:30Z", Deleted, LARGE)],
                vec![],
                (90, 60 * 2 + 30 * 4, 60 * 2048 + 30 * 8192, 60 * 20 + 30 * 40, 0)),
        ];
        for (what, vms, volumes, expected) in rows {
            assert_eq!(totals(&vms, &volumes), expected, "{what}");
            // The order events come in does not matter.
            let mut reversed = vms.clone();
            reversed.reverse();
            assert_eq!(totals(&reversed, &volumes), expected, "{what} (events reversed)");
        }
    }

    #[test]
    fn usage_groups_by_day_flavor_project_and_resource() {
        use Metering::{Resized, Started};
        let vms = [
            // Runs from 23:00 on the 1st across midnight; large from 00:30.
            vm("a", "2026-01-01T23:00:00Z", Started, SMALL),
            vm("a", "2026-01-02T00:30:00Z", Resized, LARGE),
            vm("b", "2026-01-02T23:00:00Z", Started, SMALL),
        ];
        let volumes = [vol("v", "2026-01-02T12:00:00Z", VolumeMetering::Created, 10)];
        let row = |project: &str, flavor: &str, resource: &str, day: Option<&str>, s: [u64; 5]| UsageRow {
            tenant: if project.is_empty() && resource.is_empty() { String::new() } else { "acme".into() },
            project: project.into(),
            flavor: flavor.into(),
            resource: resource.into(),
            day: day.map(|d| d.parse().unwrap()),
            vm_seconds: s[0],
            vcpu_seconds: s[1],
            memory_mib_seconds: s[2],
            disk_gib_seconds: s[3],
            volume_gib_seconds: s[4],
        };
        let by_day = usage(&vms, &volumes, window(), &[GroupBy::Day]);
        let day2_vm = 1800 + 84600 + 3600; // a: small then large; b: the last hour
        assert_eq!(
            by_day,
            vec![
                row("", "", "", Some("2026-01-01"), [3600, 7200, 3600 * 2048, 3600 * 20, 0]),
                row(
                    "",
                    "",
                    "",
                    Some("2026-01-02"),
                    [
                        day2_vm,
                        1800 * 2 + 84600 * 4 + 3600 * 2,
                        1800 * 2048 + 84600 * 8192 + 3600 * 2048,
                        1800 * 20 + 84600 * 40 + 3600 * 20,
                        43200 * 10,
                    ]
                ),
            ]
        );
        let by_flavor = usage(&vms, &volumes, window(), &[GroupBy::Flavor]);
        assert_eq!(
            by_flavor,
            vec![
                row("", "", "", None, [0, 0, 0, 0, 43200 * 10]),
                row("", "large", "", None, [84600, 84600 * 4, 84600 * 8192, 84600 * 40, 0]),
                row("", "small", "", None, [9000, 18000, 9000 * 2048, 9000 * 20, 0]),
            ]
        );
        let by_project = usage(&vms, &volumes, window(), &parse_group_by(&["project"]).unwrap());
        assert_eq!(
            by_project.iter().map(|r| (r.project.as_str(), r.vm_seconds)).collect::<Vec<_>>(),
            [("beta", 3600), ("demo", 90000)]
        );
        let by_resource = usage(&vms, &volumes, window(), &[GroupBy::Resource]);
        assert_eq!(
            by_resource.iter().map(|r| (r.resource.as_str(), r.vm_seconds)).collect::<Vec<_>>(),
            [
                // Sorted by tenant and project first: b is in project beta.
                ("b", 3600),
                ("a", 90000),
                ("v", 0)
            ]
        );
    }

    /// Nothing is used in the future: a window reaching past the time of
    /// the report ends there, one wholly after it is empty.
    #[test]
    fn a_window_reaching_past_now_ends_now() {
        let now = t("2026-01-02T00:00:00Z");
        let running = [vm("a", "2026-01-01T23:00:00Z", Metering::Started, SMALL)];
        #[rustfmt::skip]
        let rows: &[(&str, &str, &str, u64)] = &[
            // from, to, the window's end as of `now`, VM seconds
            ("2026-01-01T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-02T00:00:00Z", 3600),
            ("2026-01-01T00:00:00Z", "2026-01-01T23:30:00Z", "2026-01-01T23:30:00Z", 1800),
            ("2026-01-02T00:00:00Z", "2026-01-02T01:00:00Z", "2026-01-02T00:00:00Z", 0),
            ("2026-01-02T06:00:00Z", "2026-01-02T07:00:00Z", "2026-01-02T06:00:00Z", 0),
        ];
        for &(from, to, end, seconds) in rows {
            let w = Window::new(t(from), t(to)).unwrap().as_of(now);
            assert_eq!((w.from(), w.to()), (t(from), t(end)), "{from}..{to}");
            let used: u64 = usage(&running, &[], w, &[]).iter().map(|r| r.vm_seconds).sum();
            assert_eq!(used, seconds, "{from}..{to}");
        }
    }

    #[test]
    fn bad_windows_and_groupings_name_their_field() {
        let from = t("2026-01-01T00:00:00Z");
        for (to, err) in [
            (from, UsageError::Inverted),
            (t("2025-12-31T00:00:00Z"), UsageError::Inverted),
            (from + Duration::days(MAX_WINDOW_DAYS) + Duration::seconds(1), UsageError::TooLong),
        ] {
            assert_eq!(Window::new(from, to), Err(err.clone()));
            assert_eq!(err.field(), "to");
        }
        assert!(Window::new(from, from + Duration::days(MAX_WINDOW_DAYS)).is_ok());
        assert_eq!(parse_group_by(&["day,flavor", "day"]), Ok(vec![GroupBy::Flavor, GroupBy::Day]));
        let err = parse_group_by(&["tenant,colour"]).unwrap_err();
        assert_eq!((err.field(), err.to_string().starts_with("unknown group_by colour")), ("group_by", true));
    }
}
