//! Tenants' webhooks as data: an endpoint (URL, the event types it takes,
//! enabled or disabled with why), a delivery of one event to one endpoint,
//! the payload sent, and the rule that decides what a failed attempt does
//! (when to try again, when to disable the endpoint). Pure: the delivery
//! worker passes the clock and the jitter in.
//!
//! Every event has a [`Subject`], a VM or a volume: an endpoint hears of
//! one subject's events in the order they happened. A volume job's events
//! (attach and detach included, which also name the VM) are its volume's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hcp_proto::ids::{EventId, JobId, VmId, VolumeId, WebhookId};
use serde::Serialize;

use crate::model::{DeliveryStatus, Job, JobStatus, VmStatus, VolumeStatus, WebhookEvent};

/// What an event concerns, and so what its deliveries are ordered by: an
/// endpoint hears of one subject's events in the order they happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A VM: its jobs and its status.
    Vm(VmId),
    /// A volume: its jobs (attach and detach included) and its status.
    Volume(VolumeId),
}

/// A set of [`WebhookEvent`]s, stored as a bit mask so that the
/// transaction finishing a job selects the endpoints that take an event
/// with one comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventTypes(i64);

impl EventTypes {
    /// The set of `events`.
    pub fn of(events: impl IntoIterator<Item = WebhookEvent>) -> Self {
        Self(events.into_iter().fold(0, |bits, e| bits | e.bit()))
    }

    /// The stored mask.
    pub fn bits(self) -> i64 {
        self.0
    }

    /// The set a stored mask holds (bits of unknown types are dropped).
    pub fn from_bits(bits: i64) -> Self {
        Self::of(WebhookEvent::ALL.into_iter().filter(|e| bits & e.bit() != 0))
    }

    /// Whether the set holds `event`.
    pub fn contains(self, event: WebhookEvent) -> bool {
        self.0 & event.bit() != 0
    }

    /// The types held, in [`WebhookEvent::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = WebhookEvent> {
        WebhookEvent::ALL.into_iter().filter(move |e| self.contains(*e))
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// A tenant's webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// Its id.
    pub id: WebhookId,
    /// Owning tenant.
    pub tenant_id: String,
    /// Owning project.
    pub project_id: String,
    /// Where deliveries are POSTed (checked against the egress policy).
    pub url: String,
    /// What it is told about.
    pub events: EventTypes,
    /// The tenant's note.
    pub description: String,
    /// The signing secret, sealed with core's secrets key (the endpoint id
    /// is the associated data).
    pub sealed_secret: Vec<u8>,
    /// Deliveries are sent only while enabled.
    pub enabled: bool,
    /// Why it was disabled (empty while enabled).
    pub disabled_reason: String,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// The first failed attempt since the last success.
    pub failing_since: Option<DateTime<Utc>>,
    /// When registered.
    pub created_at: DateTime<Utc>,
}

/// One event on its way to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// Its row number: the order of deliveries of one endpoint and subject.
    pub seq: i64,
    /// The event (the same for every endpoint it goes to).
    pub event_id: EventId,
    /// The endpoint.
    pub endpoint_id: WebhookId,
    /// The VM or volume the event concerns.
    pub subject: Subject,
    /// Its type.
    pub event: WebhookEvent,
    /// The JSON body sent.
    pub payload: String,
    /// Pending or delivered.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: DateTime<Utc>,
    /// The last attempt's time.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last attempt's HTTP status, when one came back.
    pub last_status_code: Option<u16>,
    /// The last attempt's error, when it failed (empty otherwise).
    pub last_error: String,
    /// The last attempt's duration, milliseconds.
    pub last_duration_ms: u32,
    /// When the event happened.
    pub created_at: DateTime<Utc>,
    /// When the receiver accepted it.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    /// When it started.
    pub at: DateTime<Utc>,
    /// The HTTP status, when one came back.
    pub status_code: Option<u16>,
    /// Why it failed (empty for a 2xx).
    pub error: String,
    /// How long it took, milliseconds.
    pub duration_ms: u32,
}

impl AttemptResult {
    /// Whether the receiver accepted the event (a 2xx).
    pub fn delivered(&self) -> bool {
        matches!(self.status_code, Some(200..=299))
    }
}

/// When attempts are retried and when an endpoint is given up on
/// (`[webhooks]` in core's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait after the first failure; each further one doubles it.
    pub backoff_base: Duration,
    /// The longest wait.
    pub backoff_max: Duration,
    /// Failed attempts in a row that disable an endpoint.
    pub disable_after_failures: u32,
    /// Failing for this long without a success disables it.
    pub disable_after: Duration,
}

/// When a delivery whose `attempts`-th attempt (counted from 1) failed at
/// `at` is tried again: the base wait doubled per earlier failure, capped,
/// and spread by `jitter` (in `0.0..=1.0`) over the upper half of the wait,
/// so receivers coming back are not hit by every retry at once.
pub fn retry_at(policy: &RetryPolicy, attempts: u32, at: DateTime<Utc>, jitter: f64) -> DateTime<Utc> {
    let doublings = attempts.saturating_sub(1).min(20);
    let full = policy.backoff_base.saturating_mul(1 << doublings).min(policy.backoff_max);
    let wait = full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    at + chrono::Duration::from_std(wait).unwrap_or_default()
}

/// Whether an endpoint that has now failed `consecutive_failures` attempts
/// in a row, failing since `failing_since`, is to be disabled after
/// `failure`: the reason the tenant sees, or None.
pub fn disable_reason(
    policy: &RetryPolicy,
    consecutive_failures: u32,
    failing_since: DateTime<Utc>,
    failure: &AttemptResult,
) -> Option<String> {
    let failing_for = (failure.at - failing_since).to_std().unwrap_or_default();
    let what = match (failure.status_code, failure.error.as_str()) {
        (Some(code), "") => format!("the last answer was HTTP {code}"),
        (_, error) => format!("the last attempt failed: {error}"),
    };
    if consecutive_failures >= policy.disable_after_failures {
        Some(format!("disabled after {consecutive_failures} failed attempts in a row; {what}"))
    } else if failing_for >= policy.disable_after {
        Some(format!(
            "disabled after failing for {} seconds without a success; {what}",
            failing_for.as_secs()
        ))
    } else {
        None
    }
}

/// The JSON body of a delivery, built from the tenant's view of the job,
/// VM and volume: never a provider, host or native id.
#[derive(Debug, Clone, Serialize)]
pub struct Payload {
    /// The event id (`HCP-Event-Id`), the receiver's key for duplicates.
    pub id: EventId,
    /// The event type (`HCP-Event-Type`).
    #[serde(rename = "type")]
    pub event: &'static str,
    /// When it happened (RFC 3339).
    pub created_at: DateTime<Utc>,
    /// The project.
    pub project_id: String,
    /// The VM (absent for a volume job that held none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<VmId>,
    /// The volume (volume jobs and `volume.status_changed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<VolumeId>,
    /// What its deliveries are ordered by (not sent).
    #[serde(skip)]
    pub subject: Subject,
    /// What happened.
    pub data: PayloadData,
}

/// The event's particulars.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PayloadData {
    /// The job that ended (`job.finished`), or that moved the VM or volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<PayloadJob>,
    /// The VM's status after the event (when it has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_status: Option<&'static str>,
    /// The VM's status before it (`vm.status_changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_vm_status: Option<&'static str>,
    /// The volume's status after the event (volume jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_status: Option<&'static str>,
    /// The volume's status before it (`volume.status_changed`; absent for
    /// a create).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_volume_status: Option<&'static str>,
}

/// A job as a payload shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PayloadJob {
    /// Its id.
    pub id: JobId,
    /// Its kind (`vm.create`, `volume.attach`, ...).
    pub kind: &'static str,
    /// How it ended.
    pub status: &'static str,
    /// Its error code when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
}

/// The events a job ending as `status` announces, the VM moving to `vm`
/// and the volume to `volume` (each `None` when the job leaves it as it
/// is): always `job.finished`; `vm.status_changed` when the VM's status is
/// set to one that differs from the one it held before the job was
/// accepted; `volume.status_changed` likewise for the job's volume (a
/// create's always). A volume job's `job.finished` is its volume's (see
/// [`Subject`]) and names the VM it held beside it. Empty for a job with
/// neither a VM nor a volume, and for a requeued attempt.
pub fn job_events(
    job: &Job,
    status: JobStatus,
    error_code: Option<&'static str>,
    vm: Option<VmStatus>,
    volume: Option<VolumeStatus>,
    at: DateTime<Utc>,
) -> Vec<Payload> {
    let subject = match (job.volume_id, job.vm_id) {
        (Some(volume_id), _) => Subject::Volume(volume_id),
        (None, Some(vm_id)) => Subject::Vm(vm_id),
        (None, None) => return Vec::new(),
    };
    if status == JobStatus::Queued {
        // A requeued attempt has not finished.
        return Vec::new();
    }
    let pj = PayloadJob { id: job.id, kind: job.kind.as_str(), status: status.as_str(), error_code };
    let vm = job.vm_id.and(vm);
    let volume = job.volume_id.and(volume);
    let event = |event: WebhookEvent, subject: Subject, data: PayloadData| Payload {
        id: EventId::new(),
        event: event.as_str(),
        created_at: at,
        project_id: job.project_id.clone(),
        vm_id: job.vm_id,
        volume_id: job.volume_id,
        subject,
        data: PayloadData { job: Some(pj.clone()), ..data },
    };
    let mut out = vec![event(
        WebhookEvent::JobFinished,
        subject,
        PayloadData {
            vm_status: vm.map(VmStatus::as_str),
            volume_status: volume.map(VolumeStatus::as_str),
            ..PayloadData::default()
        },
    )];
    if let (Some(vm_id), Some(new)) = (job.vm_id, vm.filter(|new| Some(*new) != job.prior_status)) {
        out.push(event(
            WebhookEvent::VmStatusChanged,
            Subject::Vm(vm_id),
            PayloadData {
                vm_status: Some(new.as_str()),
                previous_vm_status: job.prior_status.map(VmStatus::as_str),
                ..PayloadData::default()
            },
        ));
    }
    if let (Some(volume_id), Some(new)) =
        (job.volume_id, volume.filter(|new| Some(*new) != job.prior_volume_status))
    {
        out.push(event(
            WebhookEvent::VolumeStatusChanged,
            Subject::Volume(volume_id),
            PayloadData {
                volume_status: Some(new.as_str()),
                previous_volume_status: job.prior_volume_status.map(VolumeStatus::as_str),
                ..PayloadData::default()
            },
        ));
    }
    out
}

/// The `vm.status_changed` event of a reconciler's correction.
pub fn correction_event(
    project_id: &str,
    vm_id: VmId,
    from: VmStatus,
    to: VmStatus,
    at: DateTime<Utc>,
) -> Payload {
    Payload {
        id: EventId::new(),
        event: WebhookEvent::VmStatusChanged.as_str(),
        created_at: at,
        project_id: project_id.to_owned(),
        vm_id: Some(vm_id),
        volume_id: None,
        subject: Subject::Vm(vm_id),
        data: PayloadData {
            vm_status: Some(to.as_str()),
            previous_vm_status: Some(from.as_str()),
            ..PayloadData::default()
        },
    }
}

impl Payload {
    /// The event type as an enum.
    pub fn event_type(&self) -> WebhookEvent {
        WebhookEvent::parse(self.event).unwrap_or(WebhookEvent::JobFinished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobKind, Scope};

    const POLICY: RetryPolicy = RetryPolicy {
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        disable_after_failures: 10,
        disable_after: Duration::from_secs(3600),
    };

    #[test]
    fn event_type_sets_round_trip_through_their_mask() {
        let both = EventTypes::of(WebhookEvent::ALL);
        assert_eq!(EventTypes::from_bits(both.bits()), both);
        assert_eq!(EventTypes::from_bits(both.bits() | 64), both, "unknown bits dropped");
        let one = EventTypes::of([WebhookEvent::VmStatusChanged]);
        assert!(one.contains(WebhookEvent::VmStatusChanged) && !one.contains(WebhookEvent::JobFinished));
        assert_eq!(one.iter().collect::<Vec<_>>(), [WebhookEvent::VmStatusChanged]);
        assert!(EventTypes::default().is_empty());
    }

    /// One row: the job's kind, VM (with its status before) and volume
    /// (with its status before), how it ended, the VM's and volume's new
    /// status → each event's type and subject kind ("vm" or "volume").
    type EventRow = (
        JobKind,
        Option<VmStatus>,
        Option<Option<VolumeStatus>>,
        JobStatus,
        Option<VmStatus>,
        Option<VolumeStatus>,
        &'static [(WebhookEvent, &'static str)],
    );

    #[test]
    fn a_job_announces_its_end_and_the_statuses_it_changed_under_its_subject() {
        use VolumeStatus as V;
        use WebhookEvent::{
            JobFinished as Done, VmStatusChanged as VmMoved, VolumeStatusChanged as VolMoved,
        };
        let rows: &[EventRow] = &[
            (
                JobKind::StopVm,
                Some(VmStatus::Active),
                None,
                JobStatus::Succeeded,
                Some(VmStatus::Stopped),
                None,
                &[(Done, "vm"), (VmMoved, "vm")],
            ),
            (
                JobKind::RebootVm,
                Some(VmStatus::Active),
                None,
                JobStatus::Succeeded,
                Some(VmStatus::Active),
                None,
                &[(Done, "vm")],
            ),
            (
                JobKind::CreateVolume,
                None,
                Some(None),
                JobStatus::Succeeded,
                None,
                Some(V::Available),
                &[(Done, "volume"), (VolMoved, "volume")],
            ),
            (
                JobKind::AttachVolume,
                Some(VmStatus::Active),
                Some(Some(V::Available)),
                JobStatus::Succeeded,
                Some(VmStatus::Active),
                Some(V::InUse),
                &[(Done, "volume"), (VolMoved, "volume")],
            ),
            (
                JobKind::ExtendVolume,
                None,
                Some(Some(V::Available)),
                JobStatus::Succeeded,
                None,
                Some(V::Available),
                &[(Done, "volume")],
            ),
            (
                JobKind::DeleteVolume,
                None,
                Some(Some(V::Available)),
                JobStatus::Failed,
                None,
                Some(V::Error),
                &[(Done, "volume"), (VolMoved, "volume")],
            ),
            (JobKind::DeleteVolume, None, Some(Some(V::Available)), JobStatus::Queued, None, None, &[]),
            (JobKind::ImportImage, None, None, JobStatus::Succeeded, None, None, &[]),
        ];
        for (kind, vm_before, volume, status, vm_after, volume_after, want) in rows {
            let mut job = Job::queued(*kind, &Scope::new("t", "p"), None, "a", 3, None, "r");
            if let Some(before) = vm_before {
                job.vm_id = Some(VmId::new());
                job.prior_status = Some(*before);
            }
            if let Some(before) = volume {
                job.volume_id = Some(VolumeId::new());
                job.prior_volume_status = *before;
            }
            let got = job_events(&job, *status, None, *vm_after, *volume_after, Utc::now());
            let kinds: Vec<(WebhookEvent, &str)> = got
                .iter()
                .map(|p| {
                    let subject = match p.subject {
                        Subject::Vm(id) if Some(id) == job.vm_id => "vm",
                        Subject::Volume(id) if Some(id) == job.volume_id => "volume",
                        _ => "another",
                    };
                    (p.event_type(), subject)
                })
                .collect();
            assert_eq!(kinds, *want, "{kind} {status}");
            for p in &got {
                let json = serde_json::to_value(p).unwrap();
                assert_eq!(
                    json["vm_id"].as_str().map(str::to_owned),
                    job.vm_id.map(|v| v.to_string()),
                    "{json}"
                );
                assert_eq!(
                    json["volume_id"].as_str().map(str::to_owned),
                    job.volume_id.map(|v| v.to_string()),
                    "{json}"
                );
                assert_eq!(json["data"]["job"]["kind"], kind.as_str(), "{json}");
                if p.event_type() == VolMoved {
                    assert_eq!(json["data"]["volume_status"], volume_after.unwrap().as_str(), "{json}");
                    let before = volume.flatten().map(|v| v.as_str());
                    assert_eq!(json["data"]["previous_volume_status"].as_str(), before, "{json}");
                }
            }
        }
    }

    /// Each row: the attempt that failed, jitter → wait (ms).
    #[test]
    fn failed_attempts_back_off_exponentially_with_jitter_up_to_the_cap() {
        let rows: &[(u32, f64, i64)] = &[
            (1, 1.0, 1000),
            (1, 0.0, 500),
            (2, 1.0, 2000),
            (3, 1.0, 4000),
            (3, 0.5, 3000),
            (7, 1.0, 60_000),
            (40, 1.0, 60_000),
        ];
        for &(attempts, jitter, wait_ms) in rows {
            let at = Utc::now();
            assert_eq!(
                (retry_at(&POLICY, attempts, at, jitter) - at).num_milliseconds(),
                wait_ms,
                "{attempts} {jitter}"
            );
        }
    }

    /// One row: failures in a row (this one counted), failing for (s),
    /// status, error → disabled, a word of the reason.
    type DisableRow = (u32, i64, Option<u16>, &'static str, bool, &'static str);

    #[test]
    fn an_endpoint_is_disabled_at_either_limit_with_a_reason() {
        let rows: &[DisableRow] = &[
            (1, 0, Some(503), "", false, ""),
            (9, 100, Some(503), "", false, ""),
            (10, 100, Some(503), "", true, "10 failed attempts in a row; the last answer was HTTP 503"),
            (
                2,
                3600,
                None,
                "cannot connect",
                true,
                "failing for 3600 seconds without a success; the last attempt failed: cannot connect",
            ),
            (2, 3599, None, "x", false, ""),
        ];
        for &(failures, failing_for, code, error, disabled, word) in rows {
            let at = Utc::now();
            let failure = AttemptResult { at, status_code: code, error: error.to_owned(), duration_ms: 3 };
            let got =
                disable_reason(&POLICY, failures, at - chrono::Duration::seconds(failing_for), &failure);
            assert_eq!(got.is_some(), disabled, "{failures} {failing_for}");
            assert!(got.unwrap_or_default().contains(word), "{failures} {failing_for}");
        }
    }

    #[test]
    fn a_success_is_a_2xx_only() {
        let r =
            |code| AttemptResult { at: Utc::now(), status_code: code, error: String::new(), duration_ms: 0 };
        assert!(r(Some(200)).delivered() && r(Some(204)).delivered());
        assert!(!r(Some(302)).delivered() && !r(Some(500)).delivered() && !r(None).delivered());
    }
}
