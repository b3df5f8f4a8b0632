//! The store's fleet operations (SRS-FLT): the listing across tenants with
//! its filters, pages and counts, a state reset by hand, a force-delete and
//! its leftovers. Every test runs on SQLite and on PostgreSQL, each against
//! a fresh, freshly migrated database.

use std::collections::BTreeMap;

use chrono::Duration;
use hcp_domain::lifecycle::{Metering, Outcome};
use hcp_domain::model::*;
use hcp_proto::ids::{EventId, ProviderId, VmId, VolumeId};
use hcp_store::{Finish, FleetQuery, ForceDelete, Quota, Store, StoreError};
use hcp_testkit::db::{Backend, TestDb};
use hcp_testkit::fixtures::sim_provider;

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(hcp_testkit::db::Backend::Sqlite).await }) *
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(hcp_testkit::db::Backend::Postgres).await }) *
        }
    };
}

store_tests!(
    the_fleet_is_listed_across_tenants_with_filters_and_pages,
    fleet_counts_group_by_status_provider_and_host,
    a_state_reset_is_compare_and_set_and_audited,
    a_force_delete_releases_quota_keeps_volumes_and_records_a_leftover,
    a_force_delete_ends_a_job_in_flight_only_when_forced,
    a_volumes_jobs_reach_webhooks_in_order_per_volume,
);

async fn fresh(backend: Backend) -> (TestDb, Store) {
    let db = TestDb::new(backend).await.expect("test database");
    let store = db.store().await.expect("store");
    (db, store)
}

fn audit(action: &str, resource: &str) -> AuditEvent {
    AuditEvent {
        id: EventId::new(),
        at: now(),
        actor: "ops-alice".into(),
        tenant_id: String::new(),
        project_id: String::new(),
        action: action.into(),
        resource_type: "vm".into(),
        resource_id: resource.into(),
        outcome: "succeeded".into(),
        job_id: String::new(),
        trace_id: String::new(),
        detail: String::new(),
    }
}

async fn seed(store: &Store, name: &str) -> Provider {
    if store.list_zones().await.unwrap().is_empty() {
        let z = Zone { name: "z1".into(), description: String::new(), created_at: now() };
        store.create_zone(&z, &audit("zone.create", "z1")).await.unwrap();
        let f = Flavor {
            name: "small".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 10,
            description: String::new(),
            created_at: now(),
        };
        store.create_flavor(&f, &audit("flavor.create", "small")).await.unwrap();
        let i = Image { min_disk_gib: 1, ..Image::public("img", "img-src", now()) };
        store.create_image(&i, &audit("image.create", "img")).await.unwrap();
    }
    let p = sim_provider(name);
    store.insert_provider(&p, None, &audit("provider.register", "p")).await.unwrap();
    p
}

/// Creates a VM (its create job finished: ACTIVE) on `p`'s `host`.
async fn active(store: &Store, p: &Provider, tenant: &str, project: &str, name: &str, host: &str) -> Vm {
    let t = now();
    let mut vm = Vm {
        id: VmId::new(),
        tenant_id: tenant.into(),
        project_id: project.into(),
        name: name.into(),
        flavor: "small".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 10,
        image: "img".into(),
        image_source: "img-src".into(),
        zone: "z1".into(),
        provider_id: p.id,
        host: host.into(),
        restart_policy: RestartPolicy::Never,
        placement_group_id: None,
        networks: vec![],
        metadata: BTreeMap::new(),
        tags: vec![],
        user_data: None,
        ssh_keys: vec![],
        hostname: name.into(),
        status: VmStatus::Pending,
        current_job_id: None,
        error_code: None,
        error_message: None,
        created_at: t,
        updated_at: t,
    };
    let job = Job::queued(JobKind::CreateVm, &Scope::new(tenant, project), Some(vm.id), "t", 3, None, "r");
    vm.current_job_id = Some(job.id);
    store
        .accept_create(
            &vm,
            &job,
            &audit("vm.create", &vm.id.to_string()),
            None,
            None,
            None,
            &Default::default(),
        )
        .await
        .unwrap();
    succeed(store, &job, None).await;
    store.get_vm_internal(vm.id).await.unwrap()
}

/// Finishes a claimable job successfully, as the engine does.
async fn succeed(store: &Store, job: &Job, volume: Option<hcp_store::VolumeReport>) {
    let t = now();
    let claimed = store.claim_job(job.id, "w", t, t + Duration::seconds(30)).await.unwrap().unwrap();
    let done = Finish {
        transition: claimed.transition(Outcome::Succeeded { power: None }),
        error: None,
        run_after: None,
        networks: None,
        host: None,
        size: None,
        volume,
        interrupted: None,
    };
    store.finish_job(&claimed, "w", &done, now(), None).await.unwrap();
}

/// Creates a data volume and attaches it to `vm`; returns its id.
async fn attached_volume(store: &Store, p: &Provider, vm: &Vm) -> VolumeId {
    let vt = VolumeType {
        name: "standard".into(),
        description: String::new(),
        max_size_gib: 100,
        storage: BTreeMap::new(),
        created_at: now(),
    };
    store.create_volume_type(&vt, &audit("volume_type.create", "standard")).await.unwrap();
    let scope = Scope::new(&vm.tenant_id, &vm.project_id);
    let mut job = Job::queued(JobKind::CreateVolume, &scope, None, "t", 3, None, "r");
    let t = now();
    let volume = Volume {
        id: VolumeId::new(),
        tenant_id: vm.tenant_id.clone(),
        project_id: vm.project_id.clone(),
        name: "data".into(),
        size_gib: 1,
        zone: "z1".into(),
        volume_type: "standard".into(),
        provider_id: p.id,
        storage: String::new(),
        host: String::new(),
        native_id: None,
        status: VolumeStatus::Creating,
        attachment: None,
        delete_on_vm_delete: false,
        current_job_id: Some(job.id),
        error_code: None,
        error_message: None,
        metadata: BTreeMap::new(),
        tags: vec![],
        created_at: t,
        updated_at: t,
    };
    job.volume_id = Some(volume.id);
    store.accept_volume_create(&volume, &job, &audit("volume.create", ""), None).await.unwrap();
    let report = hcp_store::VolumeReport { native_id: "disk-1".into(), host: String::new() };
    succeed(store, &job, Some(report)).await;
    let mut attach = Job::queued(JobKind::AttachVolume, &scope, Some(vm.id), "t", 3, None, "r");
    attach.volume_id = Some(volume.id);
    let op = hcp_store::VolumeOperation {
        scope,
        volume_id: volume.id,
        kind: JobKind::AttachVolume,
        attach: Some(hcp_store::AttachTarget {
            vm_id: vm.id,
            host: vm.host.clone(),
            host_local: false,
            max_volumes: 8,
        }),
        extend_to: None,
        require_vm_status: Some(vm.status),
    };
    store.accept_volume_operation(&op, &attach, &audit("volume.attach", ""), None).await.unwrap();
    succeed(store, &attach, None).await;
    let got = store.get_volume_internal(volume.id).await.unwrap();
    assert_eq!((got.status, got.attachment.map(|a| a.vm_id)), (VolumeStatus::InUse, Some(vm.id)));
    volume.id
}

fn ids(rows: &[hcp_store::FleetVm]) -> Vec<VmId> {
    rows.iter().map(|r| r.vm.id).collect()
}

async fn the_fleet_is_listed_across_tenants_with_filters_and_pages(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p1 = seed(&store, "sim-1").await;
    let p2 = seed(&store, "sim-2").await;
    let a = active(&store, &p1, "acme", "web", "web-1", "h1").await;
    let b = active(&store, &p1, "globex", "db", "db-1", "h2").await;
    let c = active(&store, &p2, "acme", "web", "web-2", "h1").await;
    let all = FleetQuery { page_size: 100, ..Default::default() };
    let (rows, next) = store.list_fleet(&all).await.unwrap();
    assert_eq!((ids(&rows), next), (vec![a.id, b.id, c.id], None), "every tenant's VMs, in id order");
    assert!(rows.iter().all(|r| r.status_since >= r.vm.created_at));

    for (q, want) in [
        (FleetQuery { tenant: Some("acme".into()), ..all.clone() }, vec![a.id, c.id]),
        (FleetQuery { project: Some("db".into()), ..all.clone() }, vec![b.id]),
        (FleetQuery { provider: Some(p1.id), ..all.clone() }, vec![a.id, b.id]),
        (FleetQuery { provider: Some(p1.id), host: Some("h1".into()), ..all.clone() }, vec![a.id]),
        (FleetQuery { zone: Some("z1".into()), ..all.clone() }, vec![a.id, b.id, c.id]),
        (FleetQuery { zone: Some("z9".into()), ..all.clone() }, vec![]),
        (
            FleetQuery { image: Some("img".into()), flavor: Some("small".into()), ..all.clone() },
            vec![a.id, b.id, c.id],
        ),
        (FleetQuery { name_prefix: Some("web-".into()), ..all.clone() }, vec![a.id, c.id]),
        (FleetQuery { name_prefix: Some("WEB".into()), ..all.clone() }, vec![]),
        (FleetQuery { status: Some(VmStatus::Error), ..all.clone() }, vec![]),
        (FleetQuery { created_after: Some(b.created_at), ..all.clone() }, vec![b.id, c.id]),
        (FleetQuery { created_before: Some(b.created_at), ..all.clone() }, vec![a.id]),
    ] {
        assert_eq!(ids(&store.list_fleet(&q).await.unwrap().0), want, "{q:?}");
    }

    // Keyset pages: two, then one, then nothing past the end.
    let page = FleetQuery { page_size: 2, ..all.clone() };
    let (first, next) = store.list_fleet(&page).await.unwrap();
    assert_eq!(ids(&first), vec![a.id, b.id]);
    let (second, end) = store.list_fleet(&FleetQuery { after: next, ..page.clone() }).await.unwrap();
    assert_eq!((ids(&second), end), (vec![c.id], None));
    let (past, end) = store.list_fleet(&FleetQuery { after: Some(c.id.0), ..page }).await.unwrap();
    assert!(past.is_empty() && end.is_none());

    // "In ERROR for more than N minutes": when it entered ERROR counts.
    let at = now();
    let mut ev = audit("vm.reset_state", &a.id.to_string());
    ev.at = at;
    store.reset_vm_state(a.id, VmStatus::Active, VmStatus::Error, "broken", None, None, &ev).await.unwrap();
    let errored = |cutoff| FleetQuery {
        status: Some(VmStatus::Error),
        status_since_before: Some(cutoff),
        ..all.clone()
    };
    assert_eq!(ids(&store.list_fleet(&errored(at)).await.unwrap().0), vec![a.id]);
    assert!(store.list_fleet(&errored(at - Duration::minutes(5))).await.unwrap().0.is_empty());
    let row = store.list_fleet(&FleetQuery { status: Some(VmStatus::Error), ..all.clone() }).await.unwrap().0;
    assert_eq!(row[0].status_since, at, "status_since is when the status changed");
    // DELETED VMs only when asked for.
    store
        .force_delete_vm(&ForceDelete {
            vm: b.id,
            end_job: false,
            leftover: false,
            reason: "gone".into(),
            audit: audit("vm.force_delete", &b.id.to_string()),
        })
        .await
        .unwrap();
    assert_eq!(ids(&store.list_fleet(&all).await.unwrap().0), vec![a.id, c.id]);
    let deleted = FleetQuery { status: Some(VmStatus::Deleted), ..all.clone() };
    assert_eq!(ids(&store.list_fleet(&deleted).await.unwrap().0), vec![b.id]);
}

async fn fleet_counts_group_by_status_provider_and_host(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p1 = seed(&store, "sim-1").await;
    let p2 = seed(&store, "sim-2").await;
    active(&store, &p1, "acme", "web", "web-1", "h1").await;
    active(&store, &p1, "acme", "web", "web-2", "h1").await;
    let e = active(&store, &p2, "globex", "db", "db-1", "h9").await;
    store
        .reset_vm_state(
            e.id,
            VmStatus::Active,
            VmStatus::Error,
            "x",
            None,
            None,
            &audit("vm.reset_state", ""),
        )
        .await
        .unwrap();
    let counts = store.count_fleet(&FleetQuery::default()).await.unwrap();
    let got: Vec<(VmStatus, ProviderId, String, i64)> =
        counts.into_iter().map(|c| (c.status, c.provider, c.host, c.vms)).collect();
    let mut want =
        vec![(VmStatus::Active, p1.id, "h1".to_owned(), 2), (VmStatus::Error, p2.id, "h9".to_owned(), 1)];
    want.sort_by(|x, y| (x.0.as_str(), x.1.0, &x.2).cmp(&(y.0.as_str(), y.1.0, &y.2)));
    let mut got = got;
    got.sort_by(|x, y| (x.0.as_str(), x.1.0, &x.2).cmp(&(y.0.as_str(), y.1.0, &y.2)));
    assert_eq!(got, want);
    let acme =
        store.count_fleet(&FleetQuery { tenant: Some("acme".into()), ..Default::default() }).await.unwrap();
    assert_eq!(acme.iter().map(|c| c.vms).sum::<i64>(), 2, "counts follow the filters");
}

async fn a_state_reset_is_compare_and_set_and_audited(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store, "sim-1").await;
    let vm = active(&store, &p, "acme", "web", "web-1", "h1").await;
    let ev = audit("vm.reset_state", &vm.id.to_string());
    store
        .reset_vm_state(
            vm.id,
            VmStatus::Active,
            VmStatus::Error,
            "stuck: ticket 42",
            Some(Metering::Stopped),
            Some("reset"),
            &ev,
        )
        .await
        .unwrap();
    let got = store.get_vm_internal(vm.id).await.unwrap();
    assert_eq!(got.status, VmStatus::Error);
    assert_eq!(got.error_message.as_deref(), Some("stuck: ticket 42"));
    assert!(got.error_code.is_some());
    // A reset from a state the VM is no longer in changes nothing.
    let again = store
        .reset_vm_state(
            vm.id,
            VmStatus::Active,
            VmStatus::Stopped,
            "",
            None,
            None,
            &audit("vm.reset_state", ""),
        )
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::Conflict(_)), "{again:?}");
    store
        .reset_vm_state(
            vm.id,
            VmStatus::Error,
            VmStatus::Stopped,
            "",
            None,
            None,
            &audit("vm.reset_state", ""),
        )
        .await
        .unwrap();
    let got = store.get_vm_internal(vm.id).await.unwrap();
    assert_eq!((got.status, got.error_code, got.error_message), (VmStatus::Stopped, None, None));
    // The usage event was written with the change.
    let usage = store.list_usage_events(&Scope::new("acme", "web")).await.unwrap();
    assert!(usage.iter().any(|u| u.event == Metering::Stopped.as_str()), "{usage:?}");
    // A VM with a job in flight: Busy, naming the job.
    let scope = Scope::new("acme", "web");
    let start = Job::queued(JobKind::StartVm, &scope, Some(vm.id), "t", 3, None, "r");
    let op = hcp_store::AcceptOperation {
        scope: scope.clone(),
        vm_id: vm.id,
        kind: JobKind::StartVm,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    store.accept_operation(&op, &start, &audit("vm.start", ""), None).await.unwrap();
    let busy = store
        .reset_vm_state(
            vm.id,
            VmStatus::Starting,
            VmStatus::Active,
            "",
            None,
            None,
            &audit("vm.reset_state", ""),
        )
        .await
        .unwrap_err();
    assert!(matches!(busy, StoreError::Busy { job, .. } if job == start.id), "{busy:?}");
    assert!(matches!(
        store.reset_vm_state(VmId::new(), VmStatus::Active, VmStatus::Error, "", None, None, &ev).await,
        Err(StoreError::NotFound)
    ));
}

async fn a_force_delete_releases_quota_keeps_volumes_and_records_a_leftover(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store, "sim-1").await;
    let scope = Scope::new("acme", "web");
    let quota = Quota { max_instances: Some(1), ..Quota::default() };
    store.set_quota(&scope, &quota, &audit("quota.set", "web")).await.unwrap();
    let vm = active(&store, &p, "acme", "web", "web-1", "h1").await;
    let volume = attached_volume(&store, &p, &vm).await;
    assert_eq!(store.get_quota(&scope).await.unwrap().1.instances, 1);
    let mut ev = audit("vm.force_delete", &vm.id.to_string());
    ev.tenant_id = "acme".into();
    let done = store
        .force_delete_vm(&ForceDelete {
            vm: vm.id,
            end_job: false,
            leftover: true,
            reason: "rack burned".into(),
            audit: ev,
        })
        .await
        .unwrap();
    assert_eq!((done.vm.id, done.ended_job, done.detached_volumes), (vm.id, None, 1));
    // Its volume is detached in HCP's records and kept.
    let kept = store.get_volume_internal(volume).await.unwrap();
    assert_eq!((kept.status, kept.attachment, kept.current_job_id), (VolumeStatus::Available, None, None));
    assert_eq!(store.get_vm_internal(vm.id).await.unwrap().status, VmStatus::Deleted);
    assert_eq!(store.get_quota(&scope).await.unwrap().1.instances, 0, "its quota is released");
    let usage = store.list_usage_events(&scope).await.unwrap();
    assert!(usage.iter().any(|u| u.vm_id == vm.id && u.event == Metering::Deleted.as_str()));
    // Twice: the VM is gone.
    let again = ForceDelete {
        vm: vm.id,
        end_job: true,
        leftover: true,
        reason: String::new(),
        audit: audit("vm.force_delete", ""),
    };
    assert!(matches!(store.force_delete_vm(&again).await, Err(StoreError::NotFound)));

    // The leftover is open until the reconciler cleans it, once.
    let open = store.list_leftovers(Some(p.id), true).await.unwrap();
    assert_eq!(open.len(), 1);
    let l = &open[0];
    assert_eq!(
        (
            l.vm_id,
            l.provider_id,
            l.host.as_str(),
            l.tenant_id.as_str(),
            l.recorded_by.as_str(),
            l.reason.as_str()
        ),
        (vm.id, p.id, "h1", "acme", "ops-alice", "rack burned")
    );
    assert!(l.cleaned_at.is_none());
    assert!(store.list_leftovers(Some(ProviderId::new()), false).await.unwrap().is_empty());
    let cleaned = audit("reconcile.leftover", &vm.id.to_string());
    assert!(store.mark_leftover_cleaned(vm.id, LeftoverCleanup::Removed, &cleaned).await.unwrap());
    assert!(!store.mark_leftover_cleaned(vm.id, LeftoverCleanup::Removed, &cleaned).await.unwrap());
    assert!(store.list_leftovers(Some(p.id), true).await.unwrap().is_empty());
    let all = store.list_leftovers(None, false).await.unwrap();
    assert_eq!(all[0].cleaned_how, Some(LeftoverCleanup::Removed));
    assert!(all[0].cleaned_at.is_some());

    // Without a leftover (the operator knows it is gone), none is recorded.
    let vm2 = active(&store, &p, "acme", "web", "web-2", "h1").await;
    let fd = ForceDelete {
        vm: vm2.id,
        end_job: false,
        leftover: false,
        reason: "gone".into(),
        audit: audit("vm.force_delete", ""),
    };
    store.force_delete_vm(&fd).await.unwrap();
    assert_eq!(store.list_leftovers(None, false).await.unwrap().len(), 1);
}

async fn a_force_delete_ends_a_job_in_flight_only_when_forced(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store, "sim-1").await;
    let vm = active(&store, &p, "acme", "web", "web-1", "h1").await;
    let scope = Scope::new("acme", "web");
    let stop = Job::queued(JobKind::StopVm, &scope, Some(vm.id), "t", 3, None, "r");
    // The tenant's webhook hears of what the operator did.
    let hook = hcp_domain::webhook::WebhookEndpoint {
        id: hcp_proto::ids::WebhookId::new(),
        tenant_id: "acme".into(),
        project_id: "web".into(),
        url: "https://hooks.example.com/in".into(),
        events: hcp_domain::webhook::EventTypes::of(WebhookEvent::ALL),
        description: String::new(),
        sealed_secret: vec![1],
        enabled: true,
        disabled_reason: String::new(),
        consecutive_failures: 0,
        failing_since: None,
        created_at: now(),
    };
    store.create_webhook(&hook, 10, &audit("webhook.create", "")).await.unwrap();
    let op = hcp_store::AcceptOperation {
        scope: scope.clone(),
        vm_id: vm.id,
        kind: JobKind::StopVm,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    store.accept_operation(&op, &stop, &audit("vm.stop", ""), None).await.unwrap();
    let t = now();
    let claimed = store.claim_job(stop.id, "w", t, t + Duration::seconds(30)).await.unwrap().unwrap();
    let fd = |end_job| ForceDelete {
        vm: vm.id,
        end_job,
        leftover: true,
        reason: "host gone".into(),
        audit: audit("vm.force_delete", &vm.id.to_string()),
    };
    let busy = store.force_delete_vm(&fd(false)).await.unwrap_err();
    assert!(matches!(busy, StoreError::Busy { job, .. } if job == stop.id), "{busy:?}");
    assert_eq!(store.get_vm_internal(vm.id).await.unwrap().status, VmStatus::Stopping);
    let done = store.force_delete_vm(&fd(true)).await.unwrap();
    assert_eq!(done.ended_job, Some(stop.id));
    let job = store.get_job_internal(stop.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.error_message.as_deref().unwrap_or_default().contains("force-deleted by ops-alice"));
    // Its cancellation is requested too, so the worker drops its provider call.
    assert!(store.cancel_requested(stop.id).await.unwrap());
    let events: Vec<(String, String)> = store
        .list_webhook_deliveries(&scope, hook.id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            let p: serde_json::Value = serde_json::from_str(&d.payload).unwrap();
            (d.event.as_str().to_owned(), p["data"].to_string())
        })
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().any(|(e, d)| e == "job.finished" && d.contains("FAILED")), "{events:?}");
    assert!(
        events
            .iter()
            .any(|(e, d)| e == "vm.status_changed" && d.contains("DELETED") && d.contains("STOPPING")),
        "{events:?}"
    );
    // The worker still running it cannot finish it, nor bring the VM back.
    let late = Finish {
        transition: claimed.transition(Outcome::Succeeded { power: None }),
        error: None,
        run_after: None,
        networks: None,
        host: None,
        size: None,
        volume: None,
        interrupted: None,
    };
    assert!(matches!(
        store.finish_job(&claimed, "w", &late, now(), None).await,
        Err(StoreError::Conflict(_))
    ));
    let got = store.get_vm_internal(vm.id).await.unwrap();
    assert_eq!((got.status, got.current_job_id), (VmStatus::Deleted, None));
}

fn hook(project: &str, events: &[WebhookEvent]) -> hcp_domain::webhook::WebhookEndpoint {
    hcp_domain::webhook::WebhookEndpoint {
        id: hcp_proto::ids::WebhookId::new(),
        tenant_id: "acme".into(),
        project_id: project.into(),
        url: "https://hooks.example.com/in".into(),
        events: hcp_domain::webhook::EventTypes::of(events.iter().copied()),
        description: String::new(),
        sealed_secret: vec![1],
        enabled: true,
        disabled_reason: String::new(),
        consecutive_failures: 0,
        failing_since: None,
        created_at: now(),
    }
}

/// A volume's jobs (create, attach, detach, delete: none of them held by a
/// VM job) write `job.finished` and `volume.status_changed` with their
/// change, under the volume: an endpoint hears of the volume's events in
/// order, beside (not behind) the VM's.
async fn a_volumes_jobs_reach_webhooks_in_order_per_volume(backend: Backend) {
    use hcp_domain::webhook::{AttemptResult, Subject};
    let (_db, store) = fresh(backend).await;
    let p = seed(&store, "sim-1").await;
    let vm = active(&store, &p, "acme", "web", "web-1", "h1").await;
    let scope = Scope::new("acme", "web");
    let all = hook("web", &WebhookEvent::ALL);
    let volumes_only = hook("web", &[WebhookEvent::VolumeStatusChanged]);
    let vms_only = hook("web", &[WebhookEvent::VmStatusChanged]);
    for h in [&all, &volumes_only, &vms_only] {
        store.create_webhook(h, 10, &audit("webhook.create", "")).await.unwrap();
    }
    let volume = attached_volume(&store, &p, &vm).await;
    let op = |kind, vm_status| hcp_store::VolumeOperation {
        scope: scope.clone(),
        volume_id: volume,
        kind,
        attach: None,
        extend_to: None,
        require_vm_status: vm_status,
    };
    let mut detach = Job::queued(JobKind::DetachVolume, &scope, Some(vm.id), "t", 3, None, "r");
    detach.volume_id = Some(volume);
    let (_, detach) = store
        .accept_volume_operation(&op(JobKind::DetachVolume, Some(vm.status)), &detach, &audit("a", ""), None)
        .await
        .unwrap();
    succeed(&store, &detach, None).await;
    let mut delete = Job::queued(JobKind::DeleteVolume, &scope, None, "t", 3, None, "r");
    delete.volume_id = Some(volume);
    let (_, delete) = store
        .accept_volume_operation(&op(JobKind::DeleteVolume, None), &delete, &audit("a", ""), None)
        .await
        .unwrap();
    succeed(&store, &delete, None).await;
    // Then a VM job: its events are the VM's.
    let stop = Job::queued(JobKind::StopVm, &scope, Some(vm.id), "t", 3, None, "r");
    let stop_op = hcp_store::AcceptOperation {
        scope: scope.clone(),
        vm_id: vm.id,
        kind: JobKind::StopVm,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    store.accept_operation(&stop_op, &stop, &audit("vm.stop", ""), None).await.unwrap();
    succeed(&store, &stop, None).await;

    // Oldest first: each volume job's end and the volume's new status.
    let mut heard = store.list_webhook_deliveries(&scope, all.id, 50).await.unwrap();
    heard.reverse();
    let seen: Vec<(WebhookEvent, Subject, String, String, String)> = heard
        .iter()
        .map(|d| {
            let p: serde_json::Value = serde_json::from_str(&d.payload).unwrap();
            assert_eq!(p["type"], d.event.as_str(), "{p}");
            let id = |k: &str| p[k].as_str().unwrap_or("-").to_owned();
            let change = format!(
                "{}>{}",
                p["data"]["previous_volume_status"].as_str().unwrap_or("-"),
                p["data"]["volume_status"].as_str().unwrap_or("-")
            );
            (d.event, d.subject, p["data"]["job"]["kind"].as_str().unwrap().to_owned(), id("vm_id"), change)
        })
        .collect();
    let (vol, v) = (Subject::Volume(volume), vm.id.to_string());
    let none = || "-".to_owned();
    use WebhookEvent::{JobFinished as Done, VmStatusChanged as VmMoved, VolumeStatusChanged as VolMoved};
    let expected = vec![
        (Done, vol, "volume.create".into(), none(), "->AVAILABLE".into()),
        (VolMoved, vol, "volume.create".into(), none(), "->AVAILABLE".into()),
        (Done, vol, "volume.attach".into(), v.clone(), "->IN_USE".into()),
        (VolMoved, vol, "volume.attach".into(), v.clone(), "AVAILABLE>IN_USE".into()),
        (Done, vol, "volume.detach".into(), v.clone(), "->AVAILABLE".into()),
        (VolMoved, vol, "volume.detach".into(), v.clone(), "IN_USE>AVAILABLE".into()),
        (Done, vol, "volume.delete".into(), none(), "->DELETED".into()),
        (VolMoved, vol, "volume.delete".into(), none(), "AVAILABLE>DELETED".into()),
        (Done, Subject::Vm(vm.id), "vm.stop".into(), v.clone(), "->-".into()),
        (VmMoved, Subject::Vm(vm.id), "vm.stop".into(), v.clone(), "->-".into()),
    ];
    assert_eq!(seen, expected);
    assert!(heard.iter().all(|d| {
        serde_json::from_str::<serde_json::Value>(&d.payload).unwrap()["volume_id"]
            .as_str()
            .map(str::to_owned)
            == match d.subject {
                Subject::Volume(id) => Some(id.to_string()),
                Subject::Vm(_) => None,
            }
    }));
    for (id, want) in [(volumes_only.id, vec![VolMoved; 4]), (vms_only.id, vec![VmMoved])] {
        let d = store.list_webhook_deliveries(&scope, id, 50).await.unwrap();
        let types: Vec<WebhookEvent> = d.iter().map(|d| d.event).collect();
        assert_eq!(types, want, "only what it takes; a volume's events are not a VM's");
    }

    // Due: the oldest of each endpoint and subject, the volume's beside
    // the VM's; the volume's next one only once its first is delivered.
    let heads = |due: Vec<(hcp_domain::webhook::WebhookDelivery, hcp_domain::webhook::WebhookEndpoint)>| {
        due.into_iter().filter(|(_, e)| e.id == all.id).map(|(d, _)| d).collect::<Vec<_>>()
    };
    let due = heads(store.due_webhook_deliveries(now(), 100).await.unwrap());
    let mut got: Vec<(Subject, WebhookEvent, i64)> =
        due.iter().map(|d| (d.subject, d.event, d.seq)).collect();
    got.sort_by_key(|(_, _, seq)| *seq);
    assert_eq!(got, [(vol, Done, heard[0].seq), (Subject::Vm(vm.id), Done, heard[8].seq)]);
    let ok = AttemptResult { at: now(), status_code: Some(204), error: String::new(), duration_ms: 1 };
    store
        .record_webhook_attempt(heard[0].seq, all.id, &ok, hcp_store::AttemptOutcome::Delivered)
        .await
        .unwrap();
    let due = heads(store.due_webhook_deliveries(now(), 100).await.unwrap());
    let got: Vec<i64> = due.iter().map(|d| d.seq).collect();
    assert_eq!(got, [heard[1].seq, heard[8].seq], "the volume's next one, the VM's still first");
}
