//! The store test suite. Every test runs twice, on SQLite and on
//! PostgreSQL, each time against a fresh, freshly migrated database.

use std::collections::BTreeMap;

use chrono::Duration;
use hcp_domain::lifecycle::{self, JobParams, Outcome};
use hcp_domain::model::*;
use hcp_proto::error::ErrorCode;
use hcp_proto::ids::{EventId, ProviderId, VmId};
use hcp_store::{
    AcceptOperation, AuditQuery, CapacityGuard, Finish, HostChange, HostReport, IdempotencyRecord,
    ListVmsQuery, NetworkReplace, Quota, QuotaUpdate, RateLimit, RecordedStep, SUBJECT_JOBS,
    SUBJECT_USAGE_PREFIX, Store, StoreError,
};
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
    migrations_create_the_schema,
    create_is_atomic_and_tenant_scoped,
    operations_follow_the_state_rules,
    leases_are_exclusive_and_lapse,
    bursts_are_claimed_in_one_statement,
    steps_are_recorded_once,
    list_paginates_and_filters,
    catalog_rules,
    audit_is_listed_in_order,
    console_tokens_redeem_once,
    console_channels_join_an_open_session,
    providers_with_vms_cannot_be_removed,
    a_providers_trust_reads_back_as_registered,
    idempotency_keys_admit_one_request,
    quotas_hold_under_concurrency,
    usage_events_follow_transitions,
    a_running_jobs_cancellation_is_recorded_and_its_step_interrupted,
    usage_totals_follow_a_known_sequence_to_the_second,
    outbox_rows_commit_with_the_change,
    shared_keys_are_made_once,
    the_audit_chain_names_what_was_changed,
    tampering_with_recomputed_links_is_named,
    an_exported_head_anchors_the_chain,
    unkeyed_events_are_pinned_by_keyed_ones_and_keys_rotate,
    a_resize_holds_its_quota_and_a_failure_gives_the_size_back,
    jobs_are_listed_newest_first_with_filters,
    networks_are_per_zone_and_in_use_ones_stay,
    the_catalog_copy_follows_this_process_writes,
    first_hosts_are_recorded_in_bulk_and_only_where_unknown,
    host_counts_follow_every_change_of_the_vms_on_them,
    a_hosts_room_holds_under_concurrent_creates_and_resizes,
    rate_buckets_grant_the_burst_per_tenant_and_refill,
    concurrent_rate_claims_never_get_more_than_the_bucket_holds,
    key_pairs_are_per_project_unique_and_limited,
    webhook_deliveries_commit_with_the_change_and_go_out_in_order,
);

/// Polls `f` every 20 ms for up to 10 s; true once it held.
async fn eventually(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

async fn fresh(backend: Backend) -> (TestDb, Store) {
    let db = TestDb::new(backend).await.expect("test database");
    let store = db.store().await.expect("store");
    (db, store)
}

fn audit(action: &str, resource: &str) -> AuditEvent {
    AuditEvent {
        id: EventId::new(),
        at: now(),
        actor: "tester".into(),
        tenant_id: "acme".into(),
        project_id: "p1".into(),
        action: action.into(),
        resource_type: "vm".into(),
        resource_id: resource.into(),
        outcome: "accepted".into(),
        job_id: String::new(),
        trace_id: String::new(),
        detail: String::new(),
    }
}

/// Seeds a zone, a flavor, an image and a provider; returns the provider.
async fn seed(store: &Store) -> Provider {
    store
        .create_zone(
            &Zone { name: "z1".into(), description: String::new(), created_at: now() },
            &audit("zone.create", "z1"),
        )
        .await
        .unwrap();
    store
        .create_flavor(
            &Flavor {
                name: "small".into(),
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                description: String::new(),
                created_at: now(),
            },
            &audit("flavor.create", "small"),
        )
        .await
        .unwrap();
    store
        .create_image(
            &Image { min_disk_gib: 1, ..Image::public("img", "img-src", now()) },
            &audit("image.create", "img"),
        )
        .await
        .unwrap();
    let p = Provider {
        capabilities: Capabilities { supports_cloud_init: true, ..Default::default() },
        ..sim_provider("sim-1")
    };
    store.insert_provider(&p, None, &audit("provider.register", "p")).await.unwrap();
    p
}

fn new_job(tenant: &str, project: &str, vm: VmId, kind: JobKind) -> Job {
    Job::queued(kind, &Scope::new(tenant, project), Some(vm), "tester", 3, None, "req-1")
}

/// What the engine hands the store when `job` ends with `outcome`.
fn finish(
    job: &Job,
    outcome: Outcome,
    message: &str,
    run_after: Option<chrono::DateTime<chrono::Utc>>,
) -> Finish {
    Finish {
        transition: job.transition(outcome),
        error: match outcome {
            Outcome::Failed(c) | Outcome::Retry(c) => Some((c, message.to_owned())),
            _ => None,
        },
        run_after,
        networks: None,
        host: None,
        size: None,
        volume: None,
        interrupted: None,
    }
}

fn new_vm(provider: &Provider, tenant: &str, project: &str, name: &str, tags: &[&str]) -> Vm {
    let t = now();
    Vm {
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
        provider_id: provider.id,
        host: String::new(),
        restart_policy: hcp_domain::model::RestartPolicy::Never,
        placement_group_id: None,
        networks: vec![NetworkAttachment { network: "default".into(), ..Default::default() }],
        metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        tags: tags.iter().map(|s| s.to_string()).collect(),
        user_data: Some("#cloud-config".into()),
        ssh_keys: vec![VmKey { name: "laptop".into(), public_key: "ssh-ed25519 AAAA laptop".into() }],
        hostname: name.into(),
        status: VmStatus::Pending,
        current_job_id: None,
        error_code: None,
        error_message: None,
        created_at: t,
        updated_at: t,
    }
}

/// Inserts a VM with its create job; returns both.
async fn create(
    store: &Store,
    p: &Provider,
    tenant: &str,
    project: &str,
    name: &str,
    tags: &[&str],
) -> (Vm, Job) {
    let mut vm = new_vm(p, tenant, project, name, tags);
    let job = new_job(tenant, project, vm.id, JobKind::CreateVm);
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
    (vm, job)
}

/// Claims and finishes a job successfully.
async fn complete(store: &Store, job: &Job, status: VmStatus) {
    let t = now();
    let claimed =
        store.claim_job(job.id, "w", t, t + Duration::seconds(30)).await.unwrap().expect("claimable");
    let mut done = finish(&claimed, Outcome::Succeeded { power: None }, "", None);
    assert_eq!(done.transition.vm, Some(status), "{} ends {status}", job.kind);
    // As the engine does: the size of the VM the job found, for metering
    // without another read (one statement on PostgreSQL).
    let vm = store.get_vm_internal(job.vm_id.unwrap()).await.unwrap();
    done.size = Some(lifecycle::Size {
        flavor: vm.flavor,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
    });
    store.finish_job(&claimed, "w", &done, now(), None).await.unwrap();
}

/// Deletes the public image `name` as an operator would.
async fn delete_image_named(store: &Store, name: &str) -> Result<hcp_store::ImageDeletion, StoreError> {
    let image = store.get_image_by_name(name, None).await?;
    let job = Job::queued(JobKind::DeleteImage, &Scope::new("", ""), None, "ops", 5, None, "");
    store.delete_image(image.id, &job, &audit("image.delete", name)).await
}

async fn migrations_create_the_schema(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    // Migrating again is a no-op, and every table answers.
    store.migrate().await.unwrap();
    assert!(store.list_zones().await.unwrap().is_empty());
    assert!(store.list_flavors().await.unwrap().is_empty());
    assert!(store.list_images(&Default::default()).await.unwrap().is_empty());
    assert!(store.list_providers().await.unwrap().is_empty());
    let (events, _) =
        store.list_audit_events(&AuditQuery { page_size: 10, ..Default::default() }).await.unwrap();
    assert!(events.is_empty());
    let (vms, next) = store
        .list_vms(&Scope::new("t", "p"), &ListVmsQuery { page_size: 10, ..Default::default() })
        .await
        .unwrap();
    assert!(vms.is_empty() && next.is_none());
    assert!(store.claim_next_jobs("w", now(), now(), 1).await.unwrap().pop().is_none());
}

async fn create_is_atomic_and_tenant_scoped(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, job) = create(&store, &p, "acme", "p1", "web-1", &["a"]).await;
    let got = store.get_vm(&Scope::new("acme", "p1"), vm.id).await.unwrap();
    assert_eq!(got, vm, "a VM reads back exactly as written");
    assert!(matches!(store.get_vm(&Scope::new("other", "p1"), vm.id).await, Err(StoreError::NotFound)));
    assert!(matches!(store.get_vm(&Scope::new("acme", "p2"), vm.id).await, Err(StoreError::NotFound)));
    assert_eq!(store.get_job("acme", job.id).await.unwrap().status, JobStatus::Queued);
    assert!(matches!(store.get_job("other", job.id).await, Err(StoreError::NotFound)));

    // A create whose job cannot be inserted (duplicate job id) leaves no VM.
    let mut vm2 = new_vm(&p, "acme", "p1", "web-2", &[]);
    let mut job2 = new_job("acme", "p1", vm2.id, JobKind::CreateVm);
    job2.id = job.id;
    vm2.current_job_id = Some(job2.id);
    let err = store
        .accept_create(&vm2, &job2, &audit("vm.create", "x"), None, None, None, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    assert!(matches!(store.get_vm(&Scope::new("acme", "p1"), vm2.id).await, Err(StoreError::NotFound)));
}

async fn operations_follow_the_state_rules(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    let op = |kind| AcceptOperation {
        scope: Scope::new("acme", "p1"),
        vm_id: vm.id,
        kind,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    let stop = new_job("acme", "p1", vm.id, JobKind::StopVm);
    // The create job is still operating on the VM.
    let err =
        store.accept_operation(&op(JobKind::StopVm), &stop, &audit("vm.stop", ""), None).await.unwrap_err();
    // ... and the refusal names it, so a client can wait on it.
    assert!(matches!(err, StoreError::Busy { job: j, .. } if j == job.id), "{err:?}");
    complete(&store, &job, VmStatus::Active).await;
    assert_eq!(store.get_vm(&Scope::new("acme", "p1"), vm.id).await.unwrap().status, VmStatus::Active);

    // Start of an ACTIVE VM is refused; stop is accepted and moves to STOPPING.
    let start = new_job("acme", "p1", vm.id, JobKind::StartVm);
    assert!(matches!(
        store.accept_operation(&op(JobKind::StartVm), &start, &audit("vm.start", ""), None).await,
        Err(StoreError::Conflict(_))
    ));
    let after =
        store.accept_operation(&op(JobKind::StopVm), &stop, &audit("vm.stop", ""), None).await.unwrap();
    assert_eq!(after.status, VmStatus::Stopping);
    assert_eq!(after.current_job_id, Some(stop.id));
    // A second operation while one is in flight is refused.
    let reboot = new_job("acme", "p1", vm.id, JobKind::RebootVm);
    assert!(matches!(
        store.accept_operation(&op(JobKind::RebootVm), &reboot, &audit("vm.reboot", ""), None).await,
        Err(StoreError::Busy { job, .. }) if job == stop.id
    ));
    // Another tenant sees nothing.
    let other = AcceptOperation { scope: Scope::new("evil", "p1"), ..op(JobKind::DeleteVm) };
    let del = new_job("evil", "p1", vm.id, JobKind::DeleteVm);
    assert!(matches!(
        store.accept_operation(&other, &del, &audit("vm.delete", ""), None).await,
        Err(StoreError::NotFound)
    ));
    complete(&store, &stop, VmStatus::Stopped).await;

    // Delete, then nothing else is allowed.
    let del = new_job("acme", "p1", vm.id, JobKind::DeleteVm);
    store.accept_operation(&op(JobKind::DeleteVm), &del, &audit("vm.delete", ""), None).await.unwrap();
    complete(&store, &del, VmStatus::Deleted).await;
    let start = new_job("acme", "p1", vm.id, JobKind::StartVm);
    let err = store
        .accept_operation(&op(JobKind::StartVm), &start, &audit("vm.start", ""), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(ref m) if m.contains("DELETED")), "{err:?}");
}

async fn leases_are_exclusive_and_lapse(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (_vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    let t = now();
    let a = store.claim_next_jobs("a", t, t + Duration::seconds(30), 1).await.unwrap().pop().expect("job a");
    assert_eq!((a.id, a.attempts, a.status), (job.id, 1, JobStatus::Running));
    assert!(store.claim_next_jobs("b", t, t + Duration::seconds(30), 1).await.unwrap().pop().is_none());
    assert!(store.claim_job(job.id, "b", t, t + Duration::seconds(30)).await.unwrap().is_none());
    assert!(store.renew_lease(job.id, "a", t + Duration::seconds(60)).await.unwrap());
    assert!(!store.renew_lease(job.id, "b", t + Duration::seconds(60)).await.unwrap());

    // After the lease lapses, b takes over; a can neither renew nor finish.
    let later = t + Duration::seconds(61);
    let b = store
        .claim_next_jobs("b", later, later + Duration::seconds(30), 1)
        .await
        .unwrap()
        .pop()
        .expect("job b");
    assert_eq!(b.attempts, 2);
    assert!(!store.renew_lease(job.id, "a", later + Duration::seconds(90)).await.unwrap());
    let err = store
        .finish_job(&a, "a", &finish(&a, Outcome::Succeeded { power: None }, "", None), later, None)
        .await;
    assert!(matches!(err, Err(StoreError::Conflict(_))));

    // A retry goes back to the queue with a due time.
    let due = later + Duration::seconds(5);
    store
        .finish_job(
            &b,
            "b",
            &finish(&b, Outcome::Retry(ErrorCode::ProviderUnavailable), "x", Some(due)),
            later,
            None,
        )
        .await
        .unwrap();
    assert!(
        store.claim_next_jobs("c", later, later, 1).await.unwrap().pop().is_none(),
        "not before run_after"
    );
    let c =
        store.claim_next_jobs("c", due, due + Duration::seconds(30), 1).await.unwrap().pop().expect("due");
    assert_eq!(c.error_code, Some(ErrorCode::ProviderUnavailable));
    store
        .finish_job(
            &c,
            "c",
            &finish(&c, Outcome::Failed(ErrorCode::ProviderError), "boom", None),
            due,
            Some(&audit("vm.create", "")),
        )
        .await
        .unwrap();
    let vm = store.get_vm_internal(job.vm_id.unwrap()).await.unwrap();
    assert_eq!(
        (vm.status, vm.error_code, vm.current_job_id),
        (VmStatus::Error, Some(ErrorCode::ProviderError), None)
    );
    let j = store.get_job_internal(job.id).await.unwrap();
    assert_eq!((j.status, j.attempts), (JobStatus::Failed, 3));
    assert!(j.finished_at.is_some() && j.lease_owner.is_none());
}

async fn bursts_are_claimed_in_one_statement(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_vm, job) = create(&store, &p, "acme", "p1", &format!("web-{i}"), &[]).await;
        ids.push(job.id);
    }
    let t = now();
    let lease = t + Duration::seconds(30);
    let first = store.claim_next_jobs("a", t, lease, 3).await.unwrap();
    assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), ids[..3], "the three oldest, in order");
    assert!(first.iter().all(|j| j.status == JobStatus::Running && j.lease_owner.as_deref() == Some("a")));
    let rest = store.claim_next_jobs("b", t, lease, 10).await.unwrap();
    assert_eq!(rest.iter().map(|j| j.id).collect::<Vec<_>>(), ids[3..], "only what is left");
    assert!(store.claim_next_jobs("c", t, lease, 10).await.unwrap().is_empty());
}

async fn steps_are_recorded_once(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (_vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    let t = now();
    // Without the lease nothing is recorded.
    store.record_step(job.id, "w", lifecycle::Step::Create, "x", t).await.unwrap();
    assert!(store.completed_steps(job.id).await.unwrap().is_empty());
    store.claim_job(job.id, "w", t, t + Duration::seconds(30)).await.unwrap().unwrap();
    store.record_step(job.id, "w", lifecycle::Step::Create, "first", t).await.unwrap();
    store.record_step(job.id, "w", lifecycle::Step::Create, "second", t).await.unwrap();
    store.record_step(job.id, "w", lifecycle::Step::Start, "", t + Duration::milliseconds(1)).await.unwrap();
    let steps = store.completed_steps(job.id).await.unwrap();
    assert_eq!(
        steps,
        vec![
            RecordedStep { step: lifecycle::Step::Create, output: "first".to_owned() },
            RecordedStep { step: lifecycle::Step::Start, output: String::new() }
        ]
    );
}

async fn list_paginates_and_filters(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let tags: &[&str] = if i % 2 == 0 { &["even", "all"] } else { &["all"] };
        let (vm, job) = create(&store, &p, "acme", "p1", &format!("vm-{i}"), tags).await;
        if i < 3 {
            complete(&store, &job, VmStatus::Active).await;
        }
        ids.push(vm.id);
    }
    create(&store, &p, "acme", "p2", "elsewhere", &["all"]).await;
    create(&store, &p, "other", "p1", "theirs", &["all"]).await;

    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let q = ListVmsQuery { page_size: 3, after: token, ..Default::default() };
        let (page, next) = store.list_vms(&Scope::new("acme", "p1"), &q).await.unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|v| v.id));
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every VM once, in creation order");

    let even = ListVmsQuery { page_size: 100, tags: vec!["even".into()], ..Default::default() };
    assert_eq!(store.list_vms(&Scope::new("acme", "p1"), &even).await.unwrap().0.len(), 4);
    let both = ListVmsQuery { page_size: 100, tags: vec!["even".into(), "all".into()], ..Default::default() };
    assert_eq!(store.list_vms(&Scope::new("acme", "p1"), &both).await.unwrap().0.len(), 4);
    let active = ListVmsQuery { page_size: 100, status: Some(VmStatus::Active), ..Default::default() };
    assert_eq!(store.list_vms(&Scope::new("acme", "p1"), &active).await.unwrap().0.len(), 3);
    let pending_even = ListVmsQuery {
        page_size: 100,
        status: Some(VmStatus::Pending),
        tags: vec!["even".into()],
        ..Default::default()
    };
    assert_eq!(store.list_vms(&Scope::new("acme", "p1"), &pending_even).await.unwrap().0.len(), 2);
}

async fn catalog_rules(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let dup = Flavor {
        name: "small".into(),
        vcpus: 2,
        memory_mib: 1,
        disk_gib: 1,
        description: String::new(),
        created_at: now(),
    };
    assert!(matches!(
        store.create_flavor(&dup, &audit("flavor.create", "small")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(store.get_flavor("small").await.unwrap().vcpus, 1);
    let (_vm, _job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    assert!(matches!(
        store.delete_flavor("small", &audit("flavor.delete", "small")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(delete_image_named(&store, "img").await, Err(StoreError::Conflict(_))));
    assert!(matches!(
        store.delete_flavor("nope", &audit("flavor.delete", "nope")).await,
        Err(StoreError::NotFound)
    ));
    // The zone is named by a provider: the foreign key refuses the delete.
    assert!(matches!(
        store.delete_zone("z1", &audit("zone.delete", "z1")).await,
        Err(StoreError::Conflict(_))
    ));
}

async fn audit_is_listed_in_order(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    for i in 0..5 {
        store.append_audit(&audit("vm.stop", &format!("r{}", i % 2))).await.unwrap();
    }
    let q = AuditQuery { resource_id: Some("r0".into()), page_size: 2, ..Default::default() };
    let (first, next) = store.list_audit_events(&q).await.unwrap();
    assert_eq!(first.len(), 2);
    let (rest, end) = store.list_audit_events(&AuditQuery { after: next, ..q }).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(end.is_none());
    assert!(first[0].id < first[1].id && first[1].id < rest[0].id);
}

/// An unused console session of `acme`/`p1`, issued at `t` for a minute.
fn console_session(
    token_hash: &str,
    vm_id: VmId,
    protocol: &str,
    t: chrono::DateTime<chrono::Utc>,
) -> ConsoleSession {
    ConsoleSession {
        token_hash: token_hash.into(),
        tenant_id: "acme".into(),
        project_id: "p1".into(),
        vm_id,
        protocol: protocol.into(),
        expires_at: t + Duration::seconds(60),
        used_at: None,
        revoked_at: None,
        created_at: t,
        client_address: None,
        ended_at: None,
    }
}

async fn console_tokens_redeem_once(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, _) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    let t = now();
    let session = console_session("h1", vm.id, "vnc", t);
    store.insert_console_session(&session, &audit("vm.console", "")).await.unwrap();
    let expired =
        ConsoleSession { token_hash: "h2".into(), expires_at: t + Duration::seconds(1), ..session.clone() };
    store.insert_console_session(&expired, &audit("vm.console", "")).await.unwrap();
    let got = store.redeem_console_session("h1", t, "192.0.2.7").await.unwrap();
    assert_eq!(got.vm_id, vm.id);
    assert_eq!(got.client_address.as_deref(), Some("192.0.2.7"));
    assert!(
        matches!(store.redeem_console_session("h1", t, "192.0.2.7").await, Err(StoreError::NotFound)),
        "single use"
    );
    assert!(
        matches!(
            store.redeem_console_session("h2", t + Duration::seconds(2), "192.0.2.7").await,
            Err(StoreError::NotFound)
        ),
        "expired"
    );
    assert!(matches!(store.redeem_console_session("nope", t, "192.0.2.7").await, Err(StoreError::NotFound)));
}

/// A SPICE session's further channels join it from its client's address
/// while it is open; its end (or revocation) shows in `revoked_consoles`.
async fn console_channels_join_an_open_session(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, _) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    let t = now();
    let session = console_session("s1", vm.id, "spice", t);
    store.insert_console_session(&session, &audit("vm.console", "")).await.unwrap();
    let before = t - Duration::seconds(3600);
    assert!(
        matches!(store.join_console_session("s1", "192.0.2.7", before).await, Err(StoreError::NotFound)),
        "no channel joins an unopened session"
    );
    store.redeem_console_session("s1", t, "192.0.2.7").await.unwrap();
    let joined = store.join_console_session("s1", "192.0.2.7", before).await.unwrap();
    assert_eq!((joined.vm_id, joined.protocol.as_str()), (vm.id, "spice"));
    for (address, after, why) in [
        ("198.51.100.9", before, "another client"),
        ("192.0.2.7", t + Duration::seconds(1), "past its maximum time"),
    ] {
        assert!(
            matches!(store.join_console_session("s1", address, after).await, Err(StoreError::NotFound)),
            "{why}"
        );
    }
    assert!(store.revoked_consoles(&["s1".into()]).await.unwrap().is_empty());
    store.end_console_session("s1", t).await.unwrap();
    assert!(
        matches!(store.join_console_session("s1", "192.0.2.7", before).await, Err(StoreError::NotFound)),
        "ended"
    );
    let got = store.console_session("s1").await.unwrap().unwrap();
    assert_eq!(got.ended_at.map(|e| e.timestamp()), Some(t.timestamp()));
    assert_eq!(
        store.revoked_consoles(&["s1".into()]).await.unwrap(),
        [("s1".to_owned(), "the console session ended".to_owned())]
    );
}

async fn providers_with_vms_cannot_be_removed(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (_vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    assert!(matches!(
        store.remove_provider(p.id, &audit("provider.remove", "")).await,
        Err(StoreError::Conflict(_))
    ));
    store.update_provider_health(p.id, false, "probe timed out", None, now()).await.unwrap();
    let got = store.get_provider(p.id).await.unwrap();
    assert!(!got.healthy && got.health_message == "probe timed out");
    assert_eq!(got.capabilities, p.capabilities, "capabilities kept when the probe reports none");
    complete(&store, &job, VmStatus::Active).await;
    assert!(matches!(
        store.remove_provider(ProviderId::new(), &audit("provider.remove", "")).await,
        Err(StoreError::NotFound)
    ));
}

async fn a_providers_trust_reads_back_as_registered(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let plain = seed(&store).await;
    let got = store.get_provider(plain.id).await.unwrap();
    assert_eq!(got, plain, "no trust registered: nothing read back");
    assert!(got.tls.is_empty() && !got.allow_plaintext && !got.has_credentials);

    let tls = Provider {
        id: ProviderId::new(),
        name: "secure".into(),
        endpoint: "https://provider.example:50061".into(),
        has_credentials: true,
        tls: ProviderTls {
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n".into()),
            client_cert_pem: Some("-----BEGIN CERTIFICATE-----\ncore\n-----END CERTIFICATE-----\n".into()),
            client_key: Some(Sealed(vec![0, 1, 2, 255])),
            server_name: Some("provider.internal".into()),
        },
        ..plain.clone()
    };
    store.insert_provider(&tls, Some(&[9, 9, 9]), &audit("provider.register", "secure")).await.unwrap();
    let remote = Provider {
        id: ProviderId::new(),
        name: "remote".into(),
        endpoint: "http://192.0.2.10:50061".into(),
        allow_plaintext: true,
        ..plain.clone()
    };
    store.insert_provider(&remote, None, &audit("provider.register", "remote")).await.unwrap();
    assert_eq!(store.get_provider(tls.id).await.unwrap(), tls);
    assert_eq!(store.get_provider(remote.id).await.unwrap(), remote);
    assert_eq!(store.provider_credentials(tls.id).await.unwrap(), Some(vec![9, 9, 9]));
    let listed = store.list_providers().await.unwrap();
    assert_eq!(listed.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["remote", "secure", "sim-1"]);
    assert_eq!(listed[1], tls, "the list reads the same columns");
}

fn idem(key: &str, hash: &str, response: &str) -> IdempotencyRecord {
    let t = now();
    IdempotencyRecord {
        tenant_id: "acme".into(),
        key: key.into(),
        request_hash: hash.into(),
        response: response.into(),
        created_at: t,
        expires_at: t + Duration::hours(24),
    }
}

async fn idempotency_keys_admit_one_request(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    // 20 concurrent accepts with one key: one wins, the rest lose the race
    // and nothing of theirs is left behind.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (store, p) = (store.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            let mut vm = new_vm(&p, "acme", "p1", &format!("vm-{i}"), &[]);
            let job = new_job("acme", "p1", vm.id, JobKind::CreateVm);
            vm.current_job_id = Some(job.id);
            let rec = idem("k1", "h", &format!("{{\"vm_id\":\"{}\"}}", vm.id));
            store
                .accept_create(
                    &vm,
                    &job,
                    &audit("vm.create", ""),
                    Some(&rec),
                    None,
                    None,
                    &Default::default(),
                )
                .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::IdempotencyRace) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
    let (vms, _) = store
        .list_vms(&Scope::new("acme", "p1"), &ListVmsQuery { page_size: 100, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(vms.len(), 1);
    let rec = store.get_idempotency("acme", "k1", now()).await.unwrap().expect("recorded");
    assert!(rec.response.contains(&vms[0].id.to_string()));
    // The key is per tenant, and an expired key is free again.
    assert!(store.get_idempotency("other", "k1", now()).await.unwrap().is_none());
    assert!(store.get_idempotency("acme", "k1", now() + Duration::hours(25)).await.unwrap().is_none());
    // An accept after expiry takes the key over (before any purge), in place.
    let mut vm = new_vm(&p, "acme", "p1", "late", &[]);
    let job = new_job("acme", "p1", vm.id, JobKind::CreateVm);
    vm.current_job_id = Some(job.id);
    let mut late = idem("k1", "h2", &format!("{{\"vm_id\":\"{}\"}}", vm.id));
    late.created_at = now() + Duration::hours(25);
    late.expires_at = late.created_at + Duration::hours(24);
    store
        .accept_create(&vm, &job, &audit("vm.create", ""), Some(&late), None, None, &Default::default())
        .await
        .unwrap();
    let rec = store.get_idempotency("acme", "k1", late.created_at).await.unwrap().expect("taken over");
    assert_eq!(rec.request_hash, "h2");
    assert_eq!(
        store.purge_idempotency(now() + Duration::hours(25)).await.unwrap(),
        0,
        "nothing expired is left"
    );
    // A key recorded after its change (no job transaction): the first
    // record holds it, a second loses the race, an expired one is taken over.
    let ops = idem("k2", "h", "{}");
    let ops = IdempotencyRecord { tenant_id: "@ops:alice".into(), ..ops };
    store.put_idempotency(&ops).await.unwrap();
    assert!(matches!(store.put_idempotency(&ops).await, Err(StoreError::IdempotencyRace)));
    let mut later = IdempotencyRecord { request_hash: "h3".into(), ..ops.clone() };
    later.created_at = now() + Duration::hours(25);
    later.expires_at = later.created_at + Duration::hours(24);
    store.put_idempotency(&later).await.unwrap();
    let rec = store.get_idempotency("@ops:alice", "k2", later.created_at).await.unwrap().expect("taken over");
    assert_eq!(rec.request_hash, "h3");
}

async fn quotas_hold_under_concurrency(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let quota = Quota { max_instances: Some(5), max_vcpus: None, max_memory_mib: None, ..Quota::default() };
    store.set_quota(&Scope::new("acme", "p1"), &quota, &audit("quota.set", "p1")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (store, p) = (store.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            let mut vm = new_vm(&p, "acme", "p1", &format!("vm-{i}"), &[]);
            let job = new_job("acme", "p1", vm.id, JobKind::CreateVm);
            vm.current_job_id = Some(job.id);
            store
                .accept_create(&vm, &job, &audit("vm.create", ""), None, None, None, &Default::default())
                .await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => accepted += 1,
            Err(StoreError::QuotaExceeded(_)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(accepted, 5);
    let (q, u) = store.get_quota(&Scope::new("acme", "p1")).await.unwrap();
    assert_eq!((q, u.instances, u.vcpus, u.memory_mib), (quota.clone(), 5, 5, 2560));
    // An update changes the limits it names and keeps the others.
    let scope = Scope::new("acme", "p1");
    let update = QuotaUpdate { max_vcpus: Some(Some(8)), ..Default::default() };
    store.update_quota(&scope, &update, &audit("quota.update", "p1")).await.unwrap();
    let (q, _) = store.get_quota(&scope).await.unwrap();
    assert_eq!(
        q,
        Quota { max_instances: Some(5), max_vcpus: Some(8), max_memory_mib: None, ..Quota::default() }
    );
    let update = QuotaUpdate { max_instances: Some(None), ..Default::default() };
    store.update_quota(&scope, &update, &audit("quota.update", "p1")).await.unwrap();
    let (q, _) = store.get_quota(&scope).await.unwrap();
    assert_eq!(
        q,
        Quota { max_instances: None, max_vcpus: Some(8), max_memory_mib: None, ..Quota::default() }
    );
    store.set_quota(&scope, &quota, &audit("quota.set", "p1")).await.unwrap();
    // A project without a row gets one.
    let fresh_scope = Scope::new("acme", "p9");
    let update = QuotaUpdate { max_memory_mib: Some(Some(64)), ..Default::default() };
    store.update_quota(&fresh_scope, &update, &audit("quota.update", "p9")).await.unwrap();
    assert_eq!(
        store.get_quota(&fresh_scope).await.unwrap().0,
        Quota { max_memory_mib: Some(64), ..Default::default() }
    );
    // Other projects are not limited; memory limits count too.
    create(&store, &p, "acme", "p2", "free", &[]).await;
    store
        .set_quota(
            &Scope::new("acme", "p3"),
            &Quota { max_memory_mib: Some(1000), ..Default::default() },
            &audit("quota.set", "p3"),
        )
        .await
        .unwrap();
    create(&store, &p, "acme", "p3", "fits", &[]).await;
    let mut vm = new_vm(&p, "acme", "p3", "too-big", &[]);
    let job = new_job("acme", "p3", vm.id, JobKind::CreateVm);
    vm.current_job_id = Some(job.id);
    let err = store
        .accept_create(&vm, &job, &audit("vm.create", ""), None, None, None, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::QuotaExceeded(ref m) if m.contains("memory_mib")), "{err:?}");
}

async fn usage_events_follow_transitions(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    complete(&store, &job, VmStatus::Active).await;
    let op = |kind| AcceptOperation {
        scope: Scope::new("acme", "p1"),
        vm_id: vm.id,
        kind,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    for (kind, status) in [
        (JobKind::RebootVm, VmStatus::Active),
        (JobKind::StopVm, VmStatus::Stopped),
        (JobKind::DeleteVm, VmStatus::Deleted),
    ] {
        let j = new_job("acme", "p1", vm.id, kind);
        store.accept_operation(&op(kind), &j, &audit(kind.as_str(), ""), None).await.unwrap();
        complete(&store, &j, status).await;
    }
    let events = store.list_usage_events(&Scope::new("acme", "p1")).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, vec!["started", "stopped", "deleted"]);
    assert!(
        events.iter().all(|e| e.vm_id == vm.id && e.flavor == "small" && e.vcpus == 1 && e.job_id.is_some())
    );
}

/// Runs `job` to success as the engine would, finishing it at `at`.
async fn complete_at(store: &Store, job: &Job, status: VmStatus, at: chrono::DateTime<chrono::Utc>) {
    let claimed =
        store.claim_job(job.id, "w", at, at + Duration::seconds(30)).await.unwrap().expect("claimable");
    let mut done = finish(&claimed, Outcome::Succeeded { power: None }, "", None);
    assert_eq!(done.transition.vm, Some(status), "{} ends {status}", job.kind);
    let vm = store.get_vm_internal(job.vm_id.unwrap()).await.unwrap();
    done.size = Some(lifecycle::Size {
        flavor: vm.flavor,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
    });
    store.finish_job(&claimed, "w", &done, at, None).await.unwrap();
}

fn op_on(vm: VmId, kind: JobKind) -> AcceptOperation {
    AcceptOperation {
        scope: Scope::new("acme", "p1"),
        vm_id: vm,
        kind,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    }
}

async fn a_running_jobs_cancellation_is_recorded_and_its_step_interrupted(backend: Backend) {
    use hcp_domain::lifecycle::{Step, StepStatus};
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    complete(&store, &job, VmStatus::Active).await;
    let stop = new_job("acme", "p1", vm.id, JobKind::StopVm);
    store.accept_operation(&op_on(vm.id, JobKind::StopVm), &stop, &audit("vm.stop", ""), None).await.unwrap();
    let t = now();
    let running = store.claim_job(stop.id, "w", t, t + Duration::seconds(30)).await.unwrap().unwrap();
    assert!(!store.cancel_requested(stop.id).await.unwrap());

    // Another tenant's cancel finds nothing; the tenant's is recorded and
    // answered with the job still RUNNING; asking again keeps the first.
    let err = store.cancel_job(Some("evil"), stop.id, &audit("job.cancel", "")).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let first = store.cancel_job(Some("acme"), stop.id, &audit("job.cancel", "")).await.unwrap();
    assert_eq!(first.status, JobStatus::Running);
    assert_eq!(first.cancel_requested_by.as_deref(), Some("tester"));
    let requested_at = first.cancel_requested_at.expect("recorded");
    let mut by_ops = audit("job.cancel", "");
    by_ops.actor = "operator".into();
    let again = store.cancel_job(None, stop.id, &by_ops).await.unwrap();
    assert_eq!(
        (again.cancel_requested_at, again.cancel_requested_by.as_deref()),
        (Some(requested_at), Some("tester"))
    );
    assert!(store.cancel_requested(stop.id).await.unwrap());

    // The worker cuts the stop: the job ends CANCELLED, the step log names
    // the interrupted step (which a resumed job would not skip), the VM is
    // ERROR as the lifecycle says.
    let mut done = finish(&running, Outcome::Interrupted(Step::Stop), "", None);
    done.error = Some((ErrorCode::Cancelled, "cancelled by tester while provider.stop ran".into()));
    done.interrupted = Some(Step::Stop);
    store.finish_job(&running, "w", &done, now(), None).await.unwrap();
    let ended = store.get_job("acme", stop.id).await.unwrap();
    assert_eq!((ended.status, ended.error_code), (JobStatus::Cancelled, Some(ErrorCode::Cancelled)));
    let steps = store.job_steps(stop.id).await.unwrap();
    assert_eq!(
        steps.iter().map(|s| (s.step, s.status)).collect::<Vec<_>>(),
        [(Step::Stop, StepStatus::Interrupted)]
    );
    assert!(store.completed_steps(stop.id).await.unwrap().is_empty());
    let vm_now = store.get_vm_internal(vm.id).await.unwrap();
    assert_eq!(
        (vm_now.status, vm_now.error_code, vm_now.current_job_id),
        (VmStatus::Error, Some(ErrorCode::Cancelled), None)
    );

    // A finished job cannot be cancelled.
    let err = store.cancel_job(Some("acme"), stop.id, &audit("job.cancel", "")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(ref m) if m.contains("CANCELLED")), "{err:?}");
    // A queued job is cancelled at once, also by an operator (no tenant).
    let start = new_job("acme", "p1", vm.id, JobKind::StartVm);
    store
        .accept_operation(&op_on(vm.id, JobKind::StartVm), &start, &audit("vm.start", ""), None)
        .await
        .unwrap();
    let by_ops = AuditEvent { id: EventId::new(), ..by_ops };
    let cancelled = store.cancel_job(None, start.id, &by_ops).await.unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
}

async fn usage_totals_follow_a_known_sequence_to_the_second(backend: Backend) {
    use hcp_domain::usage::{GroupBy, Window, usage};
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    // Times after now: a job is claimable from its acceptance on.
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
    // Created (running) at 10:00, stopped 10:20:30, started 11:00, deleted
    // 11:00:45; another project's VM runs all along.
    let (vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    complete_at(&store, &job, VmStatus::Active, at("2031-01-01T10:00:00Z")).await;
    let (other, other_job) = create(&store, &p, "acme", "p2", "web-2", &[]).await;
    complete_at(&store, &other_job, VmStatus::Active, at("2031-01-01T09:00:00Z")).await;
    for (kind, status, when) in [
        (JobKind::StopVm, VmStatus::Stopped, "2031-01-01T10:20:30Z"),
        (JobKind::StartVm, VmStatus::Active, "2031-01-01T11:00:00Z"),
        (JobKind::DeleteVm, VmStatus::Deleted, "2031-01-01T11:00:45Z"),
    ] {
        let j = new_job("acme", "p1", vm.id, kind);
        store.accept_operation(&op_on(vm.id, kind), &j, &audit(kind.as_str(), ""), None).await.unwrap();
        complete_at(&store, &j, status, at(when)).await;
    }
    // The window starts while the VM runs: the event before it counts.
    let window = Window::new(at("2031-01-01T10:10:00Z"), at("2031-01-01T12:00:00Z")).unwrap();
    let (vms, volumes) =
        store.usage_report_events(window.from(), window.to(), Some("acme"), Some("p1")).await.unwrap();
    assert_eq!(vms.len(), 4, "{vms:?}");
    assert!(vms.iter().all(|e| e.vm == vm.id.to_string() && e.disk_gib == 10), "{vms:?}");
    assert!(volumes.is_empty());
    let rows = usage(&vms, &volumes, window, &[GroupBy::Resource]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    // Running 10:10:00-10:20:30 and 11:00:00-11:00:45; existing until 11:00:45.
    assert_eq!(
        (r.vm_seconds, r.vcpu_seconds, r.memory_mib_seconds, r.disk_gib_seconds),
        (675, 675, 675 * 512, 3045 * 10)
    );
    // Every project of the tenant: the other VM's 3 hours (from 09:00) clip to the window.
    let (vms, volumes) =
        store.usage_report_events(window.from(), window.to(), Some("acme"), None).await.unwrap();
    let rows = usage(&vms, &volumes, window, &[GroupBy::Project]);
    assert_eq!(
        rows.iter().map(|r| (r.project.as_str(), r.vm_seconds)).collect::<Vec<_>>(),
        [("p1", 675), ("p2", 6600)]
    );
    let _ = other;
}

async fn outbox_rows_commit_with_the_change(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let plain = store.clone();
    let store = store.with_outbox(true);
    let p = seed(&store).await;
    let (_vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    let pending = store.pending_outbox(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].subject.as_str(), pending[0].payload.clone()), (SUBJECT_JOBS, job.id.to_string()));
    complete(&store, &job, VmStatus::Active).await;
    let pending = store.pending_outbox(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[1].subject, format!("{SUBJECT_USAGE_PREFIX}started"));
    let usage: serde_json::Value = serde_json::from_str(&pending[1].payload).unwrap();
    assert_eq!(
        (
            usage["event"].as_str(),
            usage["flavor"].as_str(),
            usage["vcpus"].as_u64(),
            usage["job_id"].as_str()
        ),
        (Some("started"), Some("small"), Some(1), Some(job.id.to_string().as_str())),
        "{usage}"
    );
    assert_eq!(store.get_vm_internal(job.vm_id.unwrap()).await.unwrap().status, VmStatus::Active);
    store.mark_outbox_published(&[pending[0].id, pending[1].id], now()).await.unwrap();
    assert_eq!(store.count_pending_outbox().await.unwrap(), 0);
    // Without the outbox (embedded mode) nothing is queued.
    create(&plain, &p, "acme", "p1", "web-2", &[]).await;
    assert_eq!(store.count_pending_outbox().await.unwrap(), 0);
}

async fn shared_keys_are_made_once(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    // Two processes asking at once agree on the first key stored.
    let (a, b) =
        tokio::join!(store.shared_key("page-tokens", [1; 32]), store.shared_key("page-tokens", [2; 32]));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    assert!(a == [1; 32] || a == [2; 32]);
    assert_eq!(store.shared_key("page-tokens", [3; 32]).await.unwrap(), a);
    assert_eq!(store.shared_key("other", [4; 32]).await.unwrap(), [4; 32]);
}

/// The database's clock as the rate buckets read it, seconds since the
/// Unix epoch.
async fn db_clock(db: &TestDb) -> f64 {
    match db.backend() {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let now = sqlx::query_scalar("SELECT unixepoch('subsec')").fetch_one(&pool).await.unwrap();
            pool.close().await;
            now
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let now = sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            now
        }
    }
}

/// The most a bucket may grant over `seconds` of the database's clock:
/// `rate × seconds + burst` (with room for the float arithmetic).
fn most_granted(limit: RateLimit, seconds: f64) -> u64 {
    (limit.rate_per_second() * seconds + limit.burst() + 1e-6).floor() as u64
}

async fn rate_buckets_grant_the_burst_per_tenant_and_refill(backend: Backend) {
    let (db, store) = fresh(backend).await;
    // One token every 1000 s: nothing refills while this part runs.
    let slow = RateLimit::new(0.001, 5.0).unwrap();
    let first = store.claim_rate_tokens("acme", 3, slow).await.unwrap();
    assert_eq!(first.granted, 3, "a new bucket is full");
    // Three tokens of 1000 s each are now ahead of the clock.
    assert!((first.backlog.as_secs_f64() - 3000.0).abs() < 1e-3, "{first:?}");
    assert_eq!(first.wait_for(2, slow), std::time::Duration::ZERO, "two are left");
    let second = store.claim_rate_tokens("acme", 3, slow).await.unwrap();
    assert_eq!(second.granted, 2, "never more than the burst at once");
    let empty = store.claim_rate_tokens("acme", 3, slow).await.unwrap();
    assert_eq!(empty.granted, 0);
    // The next token is free 1000 s after the bucket ran dry, less the
    // moment since; three of them 2000 s later.
    let one = empty.wait_for(1, slow).as_secs_f64();
    assert!(one > 990.0 && one <= 1000.0, "{one}");
    assert!((empty.wait_for(3, slow).as_secs_f64() - one - 2000.0).abs() < 1e-3);
    // Asking for more than the burst gets the burst; each tenant has its own.
    assert_eq!(store.claim_rate_tokens("other", 50, slow).await.unwrap().granted, 5);
    assert_eq!(store.claim_rate_tokens("acme", 1, slow).await.unwrap().granted, 0);
    assert_eq!(store.claim_rate_tokens("third", 0, slow).await.unwrap().granted, 0);

    // 200 tokens a second: the bucket refills, and never faster than that.
    let fast = RateLimit::new(200.0, 5.0).unwrap();
    let start = db_clock(&db).await;
    let mut granted = u64::from(store.claim_rate_tokens("refills", 1000, fast).await.unwrap().granted);
    assert_eq!(granted, 5);
    let refilled = eventually(async || {
        let claim = store.claim_rate_tokens("refills", 1000, fast).await.unwrap();
        granted += u64::from(claim.granted);
        // Each claim took all there was: less than one token is left.
        assert!(claim.wait_for(1, fast) > std::time::Duration::ZERO, "{claim:?}");
        granted >= 50
    })
    .await;
    let elapsed = db_clock(&db).await - start;
    assert!(refilled, "only {granted} tokens in {elapsed} s");
    assert!(granted <= most_granted(fast, elapsed), "{granted} tokens in {elapsed} s");
}

async fn concurrent_rate_claims_never_get_more_than_the_bucket_holds(backend: Backend) {
    let (db, store) = fresh(backend).await;
    let limit = RateLimit::new(50.0, 20.0).unwrap();
    let start = db_clock(&db).await;
    // As many claimers as the pool has connections and more, each claiming
    // again and again, as API processes do under a flood.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut granted = 0u64;
            for _ in 0..20 {
                granted += u64::from(store.claim_rate_tokens("acme", 3, limit).await.unwrap().granted);
            }
            granted
        });
    }
    let mut granted = 0;
    while let Some(t) = tasks.join_next().await {
        granted += t.unwrap();
    }
    let elapsed = db_clock(&db).await - start;
    assert!(granted >= 20, "the full bucket's burst was granted, got {granted}");
    assert!(granted <= most_granted(limit, elapsed), "{granted} tokens in {elapsed} s");
    // Another tenant's bucket is untouched.
    assert_eq!(store.claim_rate_tokens("other", 20, limit).await.unwrap().granted, 20);
}

/// Runs raw SQL against the test database, as someone with database access
/// (and no business editing the audit trail) would.
async fn tamper(db: &TestDb, sql: &str) {
    match db.backend() {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

/// The key ring of a core whose secrets key file holds `bytes`' keys.
fn ring(bytes: &[u8]) -> hcp_core::audit_chain::KeyRing {
    let text: String = bytes.iter().map(|b| format!("{}\n", hex_key(*b))).collect();
    hcp_core::audit_chain::KeyRing::new(&hcp_core::secrets::SecretKeys::parse(&text, "test").unwrap())
}

fn hex_key(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

/// Seals everything unsealed, as the sealer does.
async fn seal_all(store: &Store, ring: &hcp_core::audit_chain::KeyRing) -> usize {
    hcp_core::audit_chain::seal(store, ring).await.unwrap()
}

async fn the_audit_chain_names_what_was_changed(backend: Backend) {
    use hcp_core::audit_chain::verify;
    let (db, store) = fresh(backend).await;
    let ring = ring(&[1]);
    for i in 0..6 {
        store.append_audit(&audit("vm.stop", &format!("r{i}"))).await.unwrap();
    }
    assert_eq!(seal_all(&store, &ring).await, 6);
    let r = verify(&store, &ring, None).await.unwrap();
    assert!(r.intact(), "{r:?}");
    assert_eq!((r.sealed, r.unsealed, r.head_seq, r.unkeyed), (6, 0, 6, 0));
    let head = store.audit_chain_head().await.unwrap().unwrap();
    assert_eq!((head.seq, &head.hash, &head.key_id), (6, &r.head_hash, &r.head_key_id));
    assert_eq!(head.key_id.as_deref(), ring.current().map(|k| k.id()));
    // New events wait for the sealer, then extend the chain.
    store.append_audit(&audit("vm.start", "r6")).await.unwrap();
    store.append_audit(&audit("vm.start", "r7")).await.unwrap();
    assert_eq!(verify(&store, &ring, None).await.unwrap().unsealed, 2);
    let key = ring.current().unwrap();
    assert_eq!(store.seal_audit_events(1, Some(key.id()), |p, s, e| key.link(p, s, e)).await.unwrap(), 1);
    assert_eq!(seal_all(&store, &ring).await, 1);
    let intact = verify(&store, &ring, None).await.unwrap();
    assert!(intact.intact() && intact.head_seq == 8, "{intact:?}");

    // An edited event.
    tamper(&db, "UPDATE audit_events SET outcome = 'denied' WHERE seq = 3").await;
    let r = verify(&store, &ring, None).await.unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert_eq!(r.problems[0].seq, 3);
    assert!(r.problems[0].what.contains("changed"), "{r:?}");
    tamper(&db, "UPDATE audit_events SET outcome = 'accepted' WHERE seq = 3").await;
    assert!(verify(&store, &ring, None).await.unwrap().intact());

    // Two events swapped.
    tamper(&db, "UPDATE audit_events SET seq = -1 WHERE seq = 4; UPDATE audit_events SET seq = 4 WHERE seq = 5; UPDATE audit_events SET seq = 5 WHERE seq = -1").await;
    let r = verify(&store, &ring, None).await.unwrap();
    assert_eq!(r.problems[0].seq, 4, "{r:?}");
    assert!(r.problems[0].what.contains("moved"), "{r:?}");
    tamper(&db, "UPDATE audit_events SET seq = -1 WHERE seq = 4; UPDATE audit_events SET seq = 4 WHERE seq = 5; UPDATE audit_events SET seq = 5 WHERE seq = -1").await;
    assert!(verify(&store, &ring, None).await.unwrap().intact());

    // A hash set to NULL is named, not a failed read.
    let seventh = store.chained_audit_events(6, 1).await.unwrap().remove(0);
    tamper(&db, "UPDATE audit_events SET hash = NULL WHERE seq = 7").await;
    let r = verify(&store, &ring, None).await.unwrap();
    assert_eq!(r.problems[0].seq, 7, "{r:?}");
    tamper(&db, &format!("UPDATE audit_events SET hash = '{}' WHERE seq = 7", seventh.hash)).await;
    assert!(verify(&store, &ring, None).await.unwrap().intact());

    // A deleted event.
    tamper(&db, "DELETE FROM audit_events WHERE seq = 2").await;
    let r = verify(&store, &ring, None).await.unwrap();
    assert_eq!(r.problems[0].seq, 3, "{r:?}");
    assert!(r.problems[0].what.contains("deleted"), "{r:?}");
    // The head still names the last event: recorded elsewhere, it anchors.
    assert_eq!(r.head_hash, intact.head_hash);
}

/// How someone without the audit key recomputes the links after tampering.
#[derive(Debug, Clone, Copy)]
enum Recompute {
    /// Plain SHA-256, marked as sealed without a key.
    Unkeyed,
    /// Plain SHA-256, keeping the real key's id.
    Sha256ClaimingTheKey,
    /// HMAC under a key of their own, with its id.
    OtherKey,
    /// HMAC under a key of their own, claiming the real key's id.
    OtherKeyClaimingTheKey,
}

/// Rewrites the links of the stored chain from `from` on, in sequence
/// order, as `how` computes them, with SQL only (the attacker has the
/// database, not the key).
async fn recompute(db: &TestDb, store: &Store, from: i64, how: Recompute, real_key_id: &str) {
    use hcp_core::audit_chain::{AuditKey, unkeyed_link};
    let other = AuditKey::derive(&[0xee; 32]);
    let chain = store.chained_audit_events(0, 1000).await.unwrap();
    let mut prev = String::new();
    let mut sql = String::new();
    for c in &chain {
        if c.seq >= from {
            let (hash, key_id) = match how {
                Recompute::Unkeyed => (unkeyed_link(&prev, c.seq, &c.event), None),
                Recompute::Sha256ClaimingTheKey => (unkeyed_link(&prev, c.seq, &c.event), Some(real_key_id)),
                Recompute::OtherKey => (other.link(&prev, c.seq, &c.event), Some(other.id())),
                Recompute::OtherKeyClaimingTheKey => (other.link(&prev, c.seq, &c.event), Some(real_key_id)),
            };
            let key_id = key_id.map_or("NULL".to_owned(), |k| format!("'{k}'"));
            sql.push_str(&format!(
                "UPDATE audit_events SET prev_hash = '{prev}', hash = '{hash}', key_id = {key_id} WHERE seq = {};\n",
                c.seq
            ));
            prev = hash;
        } else {
            prev = c.hash.clone();
        }
    }
    tamper(db, &sql).await;
}

/// Each of the four tamperings, with the links recomputed afterwards by
/// someone without the key, each way they could, on a real database: the
/// check names the tampered place every time.
async fn tampering_with_recomputed_links_is_named(backend: Backend) {
    use hcp_core::audit_chain::verify;
    let (db, store) = fresh(backend).await;
    let ring = ring(&[1]);
    let real = ring.current().unwrap().id().to_owned();
    let tamperings = [
        ("edited", "UPDATE audit_events SET detail = 'nothing happened' WHERE seq = 3"),
        (
            "deleted",
            "DELETE FROM audit_events WHERE seq = 3; UPDATE audit_events SET seq = seq + 1000 WHERE seq > 3; \
             UPDATE audit_events SET seq = seq - 1001 WHERE seq > 1000",
        ),
        (
            "reordered",
            "UPDATE audit_events SET seq = -1 WHERE seq = 3; UPDATE audit_events SET seq = 3 WHERE seq = 4; \
             UPDATE audit_events SET seq = 4 WHERE seq = -1",
        ),
        (
            "inserted",
            "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 3; \
             UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000; \
             UPDATE audit_events SET seq = 3 WHERE seq IS NULL",
        ),
    ];
    let hows = [
        Recompute::Unkeyed,
        Recompute::Sha256ClaimingTheKey,
        Recompute::OtherKey,
        Recompute::OtherKeyClaimingTheKey,
    ];
    for (what, sql) in tamperings {
        for how in hows {
            for from in [3, 1] {
                tamper(&db, "DELETE FROM audit_events").await;
                for i in 0..6 {
                    store.append_audit(&audit("vm.stop", &format!("r{i}"))).await.unwrap();
                }
                assert_eq!(seal_all(&store, &ring).await, 6);
                assert!(verify(&store, &ring, None).await.unwrap().intact());
                if what == "inserted" {
                    store.append_audit(&audit("vm.delete", "forged")).await.unwrap();
                }
                tamper(&db, sql).await;
                recompute(&db, &store, from, how, &real).await;
                let r = verify(&store, &ring, None).await.unwrap();
                let case = format!("{what}, recomputed from {from} with {how:?}");
                let sealed = match what {
                    "deleted" => 5,
                    "inserted" => 7,
                    _ => 6,
                };
                assert_eq!((r.sealed, r.unsealed), (sealed, 0), "{case}: {r:?}");
                assert!(!r.intact(), "{case}: {r:?}");
                assert_eq!(r.problems[0].seq, from, "{case}: {r:?}");
            }
        }
    }
}

/// Anchors: a head exported outside the database (here the anchor file)
/// is held by the untouched chain, and not by one cut off after it or
/// rewritten up to it, even under the key itself.
async fn an_exported_head_anchors_the_chain(backend: Backend) {
    use hcp_core::audit_chain::{Anchor, AuditKey, HeadExport, verify};
    let (db, store) = fresh(backend).await;
    let ring = ring(&[1]);
    let dir = hcp_testkit::TempDir::new().unwrap();
    let file = dir.path().join("anchors");
    let mut export = HeadExport::new(Some(file.clone()), std::time::Duration::ZERO);
    export.check().unwrap();
    for i in 0..4 {
        store.append_audit(&audit("vm.stop", &format!("r{i}"))).await.unwrap();
    }
    seal_all(&store, &ring).await;
    export.tick(&store).await;
    export.tick(&store).await; // the head did not move: no second line
    for i in 4..8 {
        store.append_audit(&audit("vm.stop", &format!("r{i}"))).await.unwrap();
    }
    seal_all(&store, &ring).await;
    export.tick(&store).await;
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let field = |line: &str, name: &str| {
        line.split(' ').find_map(|f| f.strip_prefix(&format!("{name}="))).unwrap().to_owned()
    };
    assert!(lines[0].starts_with("audit_head seq=4 "), "{text}");
    assert_eq!(field(lines[0], "key_id"), ring.current().unwrap().id());
    let anchor: Anchor = format!("{}:{}", field(lines[0], "seq"), field(lines[0], "hash")).parse().unwrap();
    let later: Anchor = format!("{}:{}", field(lines[1], "seq"), field(lines[1], "hash")).parse().unwrap();
    assert_eq!(later.seq, 8);
    for a in [&anchor, &later] {
        let r = verify(&store, &ring, Some(a.clone())).await.unwrap();
        assert!(r.intact(), "{r:?}");
    }

    // The tail cut off from the first anchor's event on: what is left is a
    // valid chain, but it no longer reaches the anchor.
    tamper(&db, "DELETE FROM audit_events WHERE seq >= 4").await;
    assert!(verify(&store, &ring, None).await.unwrap().intact(), "a cut tail alone is not visible");
    let r = verify(&store, &ring, Some(anchor.clone())).await.unwrap();
    assert!(!r.intact(), "{r:?}");
    assert!(r.problems[0].seq == 4 && r.problems[0].what.contains("truncated"), "{r:?}");

    // Rewritten from the first event under another key (with its id): the
    // links are named, and so is the anchor.
    tamper(&db, "DELETE FROM audit_events").await;
    for i in 0..6 {
        store.append_audit(&audit("vm.stop", &format!("r{i}"))).await.unwrap();
    }
    seal_all(&store, &ring).await;
    let head = store.audit_chain_head().await.unwrap().unwrap();
    let anchor = Anchor { seq: head.seq, hash: head.hash };
    assert!(verify(&store, &ring, Some(anchor.clone())).await.unwrap().intact());
    tamper(&db, "UPDATE audit_events SET actor = 'nobody' WHERE seq = 2").await;
    recompute(&db, &store, 1, Recompute::OtherKey, "").await;
    let r = verify(&store, &ring, Some(anchor.clone())).await.unwrap();
    assert!(r.problems[0].seq == 6 && r.problems[0].what.contains("rewritten"), "{r:?}");
    assert!(r.problems.len() > 1, "the links are named too: {r:?}");

    // Rewritten by someone holding the key itself: every link verifies,
    // only the anchor tells.
    let key = AuditKey::derive(&[1; 32]);
    let chain = store.chained_audit_events(0, 1000).await.unwrap();
    let mut prev = String::new();
    let mut sql = String::new();
    for c in &chain {
        let hash = key.link(&prev, c.seq, &c.event);
        sql.push_str(&format!(
            "UPDATE audit_events SET prev_hash = '{prev}', hash = '{hash}', key_id = '{}' WHERE seq = {};\n",
            key.id(),
            c.seq
        ));
        prev = hash;
    }
    tamper(&db, &sql).await;
    assert!(verify(&store, &ring, None).await.unwrap().intact(), "the key holder's rewrite verifies");
    let r = verify(&store, &ring, Some(anchor)).await.unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert!(r.problems[0].what.contains("rewritten"), "{r:?}");
}

/// Events sealed without a key (before migration 0011, or by a core with
/// no secrets key) are not intact alone, are pinned by the first keyed
/// event after them, and a core without the key does not extend a keyed
/// chain. Older keys in the ring keep their events verifiable.
async fn unkeyed_events_are_pinned_by_keyed_ones_and_keys_rotate(backend: Backend) {
    use hcp_core::audit_chain::{KeyRing, SealError, verify};
    let (db, store) = fresh(backend).await;
    let keyless = KeyRing::unkeyed();
    for i in 0..3 {
        store.append_audit(&audit("vm.stop", &format!("r{i}"))).await.unwrap();
    }
    assert_eq!(seal_all(&store, &keyless).await, 3);
    let r = verify(&store, &keyless, None).await.unwrap();
    assert!(!r.intact() && r.problems[0].what.contains("unkeyed"), "{r:?}");
    assert_eq!((r.unkeyed, r.head_key_id.as_deref()), (3, None));

    // The key arrives: the next event pins the three before it.
    let old = ring(&[1]);
    store.append_audit(&audit("vm.stop", "r3")).await.unwrap();
    assert_eq!(seal_all(&store, &old).await, 1);
    let r = verify(&store, &old, None).await.unwrap();
    assert!(r.intact(), "{r:?}");
    assert_eq!(r.unkeyed, 3);

    // A core without the key leaves new events unsealed.
    store.append_audit(&audit("vm.stop", "r4")).await.unwrap();
    let err = hcp_core::audit_chain::seal(&store, &keyless).await.unwrap_err();
    assert!(matches!(err, SealError::Keyless { .. }), "{err:?}");
    assert_eq!(verify(&store, &old, None).await.unwrap().unsealed, 1);

    // The key rotates: the new key first, the old one after it.
    let rotated = ring(&[2, 1]);
    assert_eq!(seal_all(&store, &rotated).await, 1);
    let r = verify(&store, &rotated, None).await.unwrap();
    assert!(r.intact(), "{r:?}");
    assert_eq!(r.head_key_id.as_deref(), rotated.current().map(|k| k.id()));
    // Without the old key its event cannot be checked.
    let r = verify(&store, &ring(&[2]), None).await.unwrap();
    assert!(!r.intact() && r.problems[0].seq == 4, "{r:?}");

    // The unkeyed prefix edited and recomputed with SHA-256: the first
    // keyed event no longer follows it.
    tamper(&db, "UPDATE audit_events SET actor = 'nobody' WHERE seq = 2").await;
    let chain = store.chained_audit_events(0, 1000).await.unwrap();
    let mut prev = chain[0].hash.clone();
    let mut sql = String::new();
    for c in &chain[1..3] {
        let hash = hcp_core::audit_chain::unkeyed_link(&prev, c.seq, &c.event);
        sql.push_str(&format!(
            "UPDATE audit_events SET prev_hash = '{prev}', hash = '{hash}' WHERE seq = {};\n",
            c.seq
        ));
        prev = hash;
    }
    tamper(&db, &sql).await;
    let r = verify(&store, &rotated, None).await.unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert!(r.problems[0].seq == 4 && r.problems[0].what.contains("does not follow"), "{r:?}");
}

async fn a_resize_holds_its_quota_and_a_failure_gives_the_size_back(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (vm, job) = create(&store, &p, "acme", "p1", "web-1", &[]).await;
    complete(&store, &job, VmStatus::Active).await;
    let scope = Scope::new("acme", "p1");
    store
        .set_quota(&scope, &Quota { max_vcpus: Some(3), ..Default::default() }, &audit("quota.set", "p1"))
        .await
        .unwrap();
    let size = |flavor: &str, vcpus: u32, disk_gib: u32| lifecycle::Size {
        flavor: flavor.into(),
        vcpus,
        memory_mib: 512 * vcpus,
        disk_gib,
    };
    let op = |to: lifecycle::Size| AcceptOperation {
        scope: scope.clone(),
        vm_id: vm.id,
        kind: JobKind::ResizeVm,
        require_status: None,
        snapshot: None,
        image: None,
        resize: Some(to),
        host_change: None,
        capacity: None,
    };
    // Past the quota by the difference (1 in use, 3 more asked, 3 allowed).
    let j = new_job("acme", "p1", vm.id, JobKind::ResizeVm);
    let err = store.accept_operation(&op(size("xl", 4, 10)), &j, &audit("vm.resize", ""), None).await;
    assert!(matches!(err, Err(StoreError::QuotaExceeded(ref m)) if m.contains("vcpus")), "{err:?}");
    // A smaller disk is refused: disks only grow.
    let err = store.accept_operation(&op(size("tiny", 1, 5)), &j, &audit("vm.resize", ""), None).await;
    assert!(matches!(err, Err(StoreError::Conflict(ref m)) if m.contains("only grow")), "{err:?}");
    // Within the quota: the size is the VM's at once and counts as used.
    let after =
        store.accept_operation(&op(size("large", 3, 20)), &j, &audit("vm.resize", ""), None).await.unwrap();
    assert_eq!((after.status, after.flavor.as_str(), after.vcpus), (VmStatus::Resizing, "large", 3));
    let (_, usage) = store.get_quota(&scope).await.unwrap();
    assert_eq!(usage.vcpus, 3);
    // The job fails: the VM is ERROR and back at its old size.
    let t = now();
    let claimed = store.claim_job(j.id, "w", t, t + Duration::seconds(30)).await.unwrap().expect("claimable");
    assert!(matches!(&claimed.params, JobParams::Resize { from, .. } if from.flavor == "small"));
    store
        .finish_job(
            &claimed,
            "w",
            &finish(&claimed, Outcome::Failed(ErrorCode::ProviderError), "no", None),
            t,
            None,
        )
        .await
        .unwrap();
    let vm = store.get_vm(&scope, vm.id).await.unwrap();
    assert_eq!((vm.status, vm.flavor.as_str(), vm.vcpus, vm.disk_gib), (VmStatus::Error, "small", 1, 10));
    assert_eq!(store.get_quota(&scope).await.unwrap().1.vcpus, 1);
}

async fn jobs_are_listed_newest_first_with_filters(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let scope = Scope::new("acme", "p1");
    let (a, ja) = create(&store, &p, "acme", "p1", "a", &[]).await;
    let (_b, jb) = create(&store, &p, "acme", "p1", "b", &[]).await;
    create(&store, &p, "acme", "p2", "elsewhere", &[]).await;
    complete(&store, &ja, VmStatus::Active).await;
    let op = AcceptOperation {
        scope: scope.clone(),
        vm_id: a.id,
        kind: JobKind::StopVm,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    let stop = new_job("acme", "p1", a.id, JobKind::StopVm);
    store.accept_operation(&op, &stop, &audit("vm.stop", ""), None).await.unwrap();
    let q = |f: &dyn Fn(&mut hcp_store::ListJobsQuery)| {
        let mut q = hcp_store::ListJobsQuery { page_size: 10, ..Default::default() };
        f(&mut q);
        q
    };
    let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let (all, next) = store.list_jobs(&scope, &q(&|_| {})).await.unwrap();
    assert_eq!((ids(all), next), (vec![stop.id, jb.id, ja.id], None));
    let (of_a, _) = store.list_jobs(&scope, &q(&|q| q.vm_id = Some(a.id))).await.unwrap();
    assert_eq!(ids(of_a), vec![stop.id, ja.id]);
    let (stops, _) = store.list_jobs(&scope, &q(&|q| q.kind = Some(JobKind::StopVm))).await.unwrap();
    assert_eq!(stops[0].request_id, "req-1");
    assert_eq!(ids(stops), vec![stop.id]);
    let (done, _) = store.list_jobs(&scope, &q(&|q| q.status = Some(JobStatus::Succeeded))).await.unwrap();
    assert_eq!(ids(done), vec![ja.id]);
    // Pages follow one another without gaps or repeats.
    let (first, next) = store.list_jobs(&scope, &q(&|q| q.page_size = 2)).await.unwrap();
    assert_eq!(ids(first), vec![stop.id, jb.id]);
    let (rest, end) = store
        .list_jobs(
            &scope,
            &q(&|q| {
                q.page_size = 2;
                q.before = next;
            }),
        )
        .await
        .unwrap();
    assert_eq!((ids(rest), end), (vec![ja.id], None));
}

async fn networks_are_per_zone_and_in_use_ones_stay(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let net = |zone: &str, name: &str, backings: &[(&str, &str)]| Network {
        name: name.into(),
        zone: zone.into(),
        description: String::new(),
        backings: backings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        created_at: now(),
    };
    store.create_network(&net("z1", "default", &[]), &audit("network.create", "default")).await.unwrap();
    store
        .create_network(&net("z1", "prod", &[("pve-1", "vmbr1")]), &audit("network.create", "prod"))
        .await
        .unwrap();
    // A zone that does not exist has no networks.
    assert!(matches!(
        store.create_network(&net("nowhere", "x", &[]), &audit("network.create", "x")).await,
        Err(StoreError::NotFound)
    ));
    // Creating never replaces.
    assert!(matches!(
        store.create_network(&net("z1", "prod", &[]), &audit("network.create", "prod")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    // Replacing keeps one row; only an existing network is replaced.
    assert_eq!(
        store
            .replace_network(&net("z1", "prod", &[("pve-1", "vmbr2")]), &audit("network.replace", "prod"))
            .await
            .unwrap(),
        NetworkReplace::Replaced { attached: 0 }
    );
    assert!(matches!(
        store.replace_network(&net("z1", "nope", &[]), &audit("network.replace", "nope")).await,
        Err(StoreError::NotFound)
    ));
    let all = store.list_networks(Some("z1")).await.unwrap();
    assert_eq!(all.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["default", "prod"]);
    assert_eq!(all[1].backing_on("pve-1"), "vmbr2");
    assert_eq!(all[1].backing_on("other"), "prod");
    assert!(store.list_networks(Some("z2")).await.unwrap().is_empty());
    // The VM made by `create` is attached to "default".
    create(&store, &p, "acme", "p1", "web-1", &[]).await;
    // A backing may be added while VMs use the network, not taken from
    // their provider.
    let with = net("z1", "default", &[(p.name.as_str(), "br0")]);
    assert_eq!(
        store.replace_network(&with, &audit("network.replace", "default")).await.unwrap(),
        NetworkReplace::Replaced { attached: 1 }
    );
    assert_eq!(
        store
            .replace_network(&net("z1", "default", &[]), &audit("network.replace", "default"))
            .await
            .unwrap(),
        NetworkReplace::InUse { provider: p.name.clone(), vms: 1 }
    );
    assert_eq!(store.list_networks(Some("z1")).await.unwrap()[0].backing_on(&p.name), "br0");
    assert!(matches!(
        store.delete_network("z1", "default", &audit("network.delete", "default")).await,
        Err(StoreError::Conflict(ref m)) if m.contains("1 vm")
    ));
    store.delete_network("z1", "prod", &audit("network.delete", "prod")).await.unwrap();
    assert!(matches!(
        store.delete_network("z1", "prod", &audit("network.delete", "prod")).await,
        Err(StoreError::NotFound)
    ));
}

/// The in-memory catalog sees every write made through the same store at
/// once, with no notification needed.
async fn the_catalog_copy_follows_this_process_writes(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    // On PostgreSQL the notifications of the seeding writes come back to
    // this store too, a little later; the copy settles after them.
    let settle = async || {
        if backend == Backend::Postgres {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    };
    if backend == Backend::Postgres {
        assert!(eventually(async || store.catalog_cached()).await, "the listener never came up");
    }
    settle().await;
    let first = store.catalog().await.unwrap();
    assert!(
        first.flavors.contains_key("small")
            && first.images.contains_key(&(String::new(), String::new(), "img".to_owned()))
    );
    assert_eq!(first.providers.iter().map(|x| x.id).collect::<Vec<_>>(), [p.id]);
    // Read twice, the copy is the same copy.
    assert!(std::sync::Arc::ptr_eq(&first, &store.catalog().await.unwrap()));
    store.delete_flavor("small", &audit("flavor.delete", "small")).await.unwrap();
    assert!(!store.catalog().await.unwrap().flavors.contains_key("small"));
    // A probe that changes nothing placement reads keeps the copy; one
    // that turns the provider unhealthy does not.
    settle().await;
    let before = store.catalog().await.unwrap();
    store.update_provider_health(p.id, true, "still fine", None, now()).await.unwrap();
    settle().await;
    assert!(std::sync::Arc::ptr_eq(&before, &store.catalog().await.unwrap()));
    store.update_provider_health(p.id, false, "gone", None, now()).await.unwrap();
    assert!(!store.catalog().await.unwrap().providers[0].healthy);
}

/// Two core processes on one PostgreSQL: a change committed by one reaches
/// the other's copy through NOTIFY, a change made in psql too, and while the
/// listening connection is down the copy is not used.
#[tokio::test]
async fn postgres_catalog_copies_are_kept_coherent_across_processes() {
    let (db, a) = fresh(Backend::Postgres).await;
    let b = db.store().await.unwrap();
    let p = seed(&a).await;
    for s in [&a, &b] {
        assert!(eventually(async || s.catalog_cached()).await, "a listener never came up");
    }
    assert!(b.catalog().await.unwrap().flavors.contains_key("small"));

    // A write through the other process.
    delete_image_named(&a, "img").await.unwrap();
    let public = |name: &str| (String::new(), String::new(), name.to_owned());
    assert!(eventually(async || !b.catalog().await.unwrap().images.contains_key(&public("img"))).await);
    a.update_provider_health(p.id, false, "down", None, now()).await.unwrap();
    assert!(eventually(async || !b.catalog().await.unwrap().providers[0].healthy).await);

    // A write by hand, outside HCP.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE flavors SET vcpus = 3 WHERE name = 'small'").execute(&mut conn).await.unwrap();
    assert!(eventually(async || b.catalog().await.unwrap().flavors["small"].vcpus == 3).await);

    // The listening connections are cut: until they are back, the copies
    // are not trusted, and a change made meanwhile is seen after.
    let cut: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query = 'LISTEN \"hcp_catalog\"'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(cut, 2, "two listening connections");
    sqlx::query("UPDATE flavors SET vcpus = 4 WHERE name = 'small'").execute(&mut conn).await.unwrap();
    assert!(eventually(async || b.catalog().await.unwrap().flavors["small"].vcpus == 4).await);
    for s in [&a, &b] {
        assert!(eventually(async || s.catalog_cached()).await, "a listener did not come back");
    }
    assert_eq!(b.catalog().await.unwrap().flavors["small"].vcpus, 4);
}

/// The reconciler records, in bulk, where VMs whose host HCP did not know
/// are; a VM that has a host, or that a job holds, keeps what it has.
async fn first_hosts_are_recorded_in_bulk_and_only_where_unknown(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let (a, ja) = create(&store, &p, "acme", "p1", "a", &[]).await;
    complete(&store, &ja, VmStatus::Active).await;
    let (b, jb) = create(&store, &p, "acme", "p1", "b", &[]).await;
    complete(&store, &jb, VmStatus::Active).await;
    // Held by its create job.
    let (c, _) = create(&store, &p, "acme", "p1", "c", &[]).await;
    let hosts = [(a.id, "h1".to_owned()), (b.id, "h2".to_owned()), (c.id, "h3".to_owned())];
    assert_eq!(store.set_first_hosts(&hosts).await.unwrap(), 2);
    let host = async |id| store.get_vm_internal(id).await.unwrap().host;
    assert_eq!(
        (host(a.id).await, host(b.id).await, host(c.id).await),
        ("h1".into(), "h2".into(), String::new())
    );
    // Known now: a later report of another host is a move, not this.
    assert_eq!(store.set_first_hosts(&[(a.id, "h9".to_owned())]).await.unwrap(), 0);
    assert_eq!(host(a.id).await, "h1");
}

/// A transaction PostgreSQL aborts for a serialization failure or a
/// deadlock runs again, whole, up to the bound: here a trigger aborts the
/// first two tries of a flavor's insert with 40001 and 40P01, and the flavor
/// and its audit event exist once afterwards; a transaction that keeps
/// losing fails after `1 + MAX_CONFLICT_RETRIES` tries with `Contention`,
/// leaving nothing behind.
#[tokio::test]
async fn postgres_transactions_run_again_after_a_conflict_within_a_bound() {
    let (db, store) = fresh(Backend::Postgres).await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.unwrap();
    // The tries are counted outside the aborted transactions (dblink is
    // not needed: a sequence's nextval survives a rollback).
    sqlx::raw_sql(sqlx::AssertSqlSafe(
        "CREATE SEQUENCE tries; \
         CREATE TABLE fail_first (n INT NOT NULL); \
         CREATE FUNCTION conflict() RETURNS trigger LANGUAGE plpgsql AS $$ \
         DECLARE try BIGINT := nextval('tries'); \
         BEGIN \
           IF try <= (SELECT n FROM fail_first) THEN \
             IF try % 2 = 1 THEN RAISE EXCEPTION 'made to fail' USING ERRCODE = '40001'; \
             ELSE RAISE EXCEPTION 'made to fail' USING ERRCODE = '40P01'; END IF; \
           END IF; \
           RETURN NEW; \
         END $$; \
         CREATE TRIGGER conflict BEFORE INSERT ON flavors FOR EACH ROW EXECUTE FUNCTION conflict(); \
         INSERT INTO fail_first VALUES (2);"
            .to_owned(),
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let flavor = |name: &str| Flavor {
        name: name.into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 10,
        description: String::new(),
        created_at: now(),
    };
    let store = &store;
    let audited = async |name: &str| {
        let q = AuditQuery { resource_id: Some(name.into()), page_size: 100, ..Default::default() };
        store.list_audit_events(&q).await.unwrap().0.len()
    };
    store.create_flavor(&flavor("tiny"), &audit("flavor.create", "tiny")).await.unwrap();
    let tries: i64 = sqlx::query_scalar("SELECT last_value FROM tries").fetch_one(&mut conn).await.unwrap();
    assert_eq!(tries, 3, "two aborted tries and the one that committed");
    assert_eq!(store.list_flavors().await.unwrap().iter().filter(|f| f.name == "tiny").count(), 1);
    assert_eq!(audited("tiny").await, 1);

    // Always aborted: the bound holds, and nothing is written.
    sqlx::query("UPDATE fail_first SET n = 1000").execute(&mut conn).await.unwrap();
    sqlx::query("SELECT setval('tries', 1, false)").execute(&mut conn).await.unwrap();
    let err = store.create_flavor(&flavor("never"), &audit("flavor.create", "never")).await.unwrap_err();
    assert!(matches!(err, StoreError::Contention(_)), "{err:?}");
    let tries: i64 = sqlx::query_scalar("SELECT last_value FROM tries").fetch_one(&mut conn).await.unwrap();
    assert_eq!(tries, 1 + i64::from(hcp_store::MAX_CONFLICT_RETRIES));
    assert!(store.list_flavors().await.unwrap().iter().all(|f| f.name != "never"));
    assert_eq!(audited("never").await, 0);
}

/// What the hosts' rows count (migration 0014's triggers) and what a count of
/// the VMs gives, per (provider, host) with a row, as (vms, vcpus, memory).
async fn host_counts(
    db: &TestDb,
    store: &Store,
) -> (BTreeMap<String, (u64, u64, u64)>, BTreeMap<String, (u64, u64, u64)>) {
    let sql = "SELECT name, placed_vms, placed_vcpus, placed_memory_mib FROM hosts";
    let rows: Vec<(String, i64, i64, i64)> = match db.backend() {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows
        }
    };
    let kept =
        rows.into_iter().map(|(h, n, v, m)| (h, (n as u64, v as u64, m as u64))).collect::<BTreeMap<_, _>>();
    let counted = store
        .host_loads()
        .await
        .unwrap()
        .into_iter()
        .filter(|((_, h), _)| kept.contains_key(h))
        .map(|((_, h), l)| (h, (u64::from(l.vms), l.vcpus, l.memory_mib)))
        .collect::<BTreeMap<_, _>>();
    let kept = kept.into_iter().filter(|(_, c)| *c != (0, 0, 0)).collect();
    (kept, counted)
}

fn report(name: &str, vcpus: u32) -> HostReport {
    HostReport { name: name.into(), vcpus, memory_mib: 65536, state: HostState::Up }
}

/// Accepts a VM of `vcpus` onto `host` of `p`, with the host's room checked
/// (`room` vCPUs) when given.
async fn create_on(
    store: &Store,
    p: &Provider,
    project: &str,
    host: &str,
    vcpus: u32,
    room: Option<u64>,
) -> Result<(Vm, Job), StoreError> {
    let mut vm = new_vm(p, "acme", project, &format!("vm-{}", VmId::new()), &[]);
    vm.host = host.into();
    vm.vcpus = vcpus;
    let job = new_job("acme", project, vm.id, JobKind::CreateVm);
    vm.current_job_id = Some(job.id);
    let guard = room.map(|vcpus| CapacityGuard {
        provider_id: p.id,
        host: host.into(),
        room: Room { vcpus, memory_mib: 1 << 30 },
    });
    store
        .accept_create(&vm, &job, &audit("vm.create", ""), None, guard.as_ref(), None, &Default::default())
        .await?;
    Ok((vm, job))
}

/// The counts on each host's row stay equal to the VMs placed there through
/// every way a VM's row changes: a create, a resize and its failure, a move,
/// a first host recorded, a deletion; and a host first seen starts with the
/// VMs already there.
async fn host_counts_follow_every_change_of_the_vms_on_them(backend: Backend) {
    let (db, store) = fresh(backend).await;
    let p = seed(&store).await;
    store.record_hosts(p.id, &[report("h1", 8), report("h2", 8)], now()).await.unwrap();
    let check = async |step: &str| {
        let (kept, counted) = host_counts(&db, &store).await;
        assert_eq!(kept, counted, "after {step}");
        kept
    };
    let (a, ja) = create_on(&store, &p, "p1", "h1", 1, None).await.unwrap();
    complete(&store, &ja, VmStatus::Active).await;
    let (b, jb) = create_on(&store, &p, "p1", "h1", 2, None).await.unwrap();
    complete(&store, &jb, VmStatus::Active).await;
    assert_eq!(check("two creates").await.get("h1"), Some(&(2, 3, 1024)));

    let scope = Scope::new("acme", "p1");
    let op = |vm: VmId, kind| AcceptOperation {
        scope: scope.clone(),
        vm_id: vm,
        kind,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: None,
        capacity: None,
    };
    // A resize counts at once; its failure gives the size back.
    let resize = new_job("acme", "p1", a.id, JobKind::ResizeVm);
    let grow = lifecycle::Size { flavor: "big".into(), vcpus: 4, memory_mib: 4096, disk_gib: 10 };
    store
        .accept_operation(
            &AcceptOperation { resize: Some(grow), ..op(a.id, JobKind::ResizeVm) },
            &resize,
            &audit("vm.resize", ""),
            None,
        )
        .await
        .unwrap();
    assert_eq!(check("a resize").await.get("h1"), Some(&(2, 6, 4608)));
    let t = now();
    let claimed = store.claim_job(resize.id, "w", t, t + Duration::seconds(30)).await.unwrap().unwrap();
    store
        .finish_job(
            &claimed,
            "w",
            &finish(&claimed, Outcome::Failed(ErrorCode::ProviderError), "no", None),
            t,
            None,
        )
        .await
        .unwrap();
    assert_eq!(check("the resize failed").await.get("h1"), Some(&(2, 3, 1024)));

    // A move counts on the target from its accept.
    let migrate = new_job("acme", "p1", b.id, JobKind::MigrateVm);
    let to_h2 = HostChange { to: Some("h2".into()), live: true, group: None, capacity: None };
    store
        .accept_operation(
            &AcceptOperation { host_change: Some(to_h2), ..op(b.id, JobKind::MigrateVm) },
            &migrate,
            &audit("vm.migrate", ""),
            None,
        )
        .await
        .unwrap();
    let kept = check("a move").await;
    assert_eq!((kept.get("h1"), kept.get("h2")), (Some(&(1, 1, 512)), Some(&(1, 2, 512))));
    complete(&store, &migrate, VmStatus::Active).await;

    // A VM whose host is recorded later, on a host not yet reported: the
    // host's row starts with it.
    let (c, jc) = create_on(&store, &p, "p1", "", 1, None).await.unwrap();
    complete(&store, &jc, VmStatus::Active).await;
    assert_eq!(store.set_first_hosts(&[(c.id, "h3".to_owned())]).await.unwrap(), 1);
    store.record_hosts(p.id, &[report("h1", 8), report("h2", 8), report("h3", 8)], now()).await.unwrap();
    assert_eq!(check("a first host").await.get("h3"), Some(&(1, 1, 512)));

    // A deletion leaves the count when the VM is DELETED.
    let delete = new_job("acme", "p1", b.id, JobKind::DeleteVm);
    store
        .accept_operation(&op(b.id, JobKind::DeleteVm), &delete, &audit("vm.delete", ""), None)
        .await
        .unwrap();
    assert_eq!(check("a delete accepted").await.get("h2"), Some(&(1, 2, 512)));
    complete(&store, &delete, VmStatus::Deleted).await;
    assert_eq!(check("a delete done").await.get("h2"), None);
    assert_eq!(check("the end").await.get("h1"), Some(&(1, 1, 512)));
}

/// Twenty concurrent creates onto a host with room for three: three are
/// accepted and seventeen refused with NoRoom, whether the create takes the
/// one-statement path (no quota) or the transaction (a quota); then three
/// concurrent resizes on a host with room for one more vCPU: one is.
async fn a_hosts_room_holds_under_concurrent_creates_and_resizes(backend: Backend) {
    let (db, store) = fresh(backend).await;
    let p = seed(&store).await;
    store.record_hosts(p.id, &[report("h1", 8), report("h2", 8), report("h3", 8)], now()).await.unwrap();
    store
        .set_quota(
            &Scope::new("acme", "quota"),
            &Quota { max_instances: Some(100), ..Default::default() },
            &audit("quota.set", "quota"),
        )
        .await
        .unwrap();
    for (project, host) in [("free", "h1"), ("quota", "h2")] {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (store, p) = (store.clone(), p.clone());
                tokio::spawn(async move { create_on(&store, &p, project, host, 1, Some(3)).await })
            })
            .collect();
        let (mut accepted, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => accepted += 1,
                Err(StoreError::NoRoom(m)) => {
                    assert!(m.contains(host), "{m}");
                    refused += 1;
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!((accepted, refused), (3, 17), "{project} on {host}");
    }
    let (kept, counted) = host_counts(&db, &store).await;
    assert_eq!(kept, counted);
    assert_eq!((kept.get("h1"), kept.get("h2")), (Some(&(3, 3, 1536)), Some(&(3, 3, 1536))));

    // Three VMs of one vCPU on h3, whose room is four: each grows by one.
    let mut vms = Vec::new();
    for _ in 0..3 {
        let (vm, job) = create_on(&store, &p, "p1", "h3", 1, Some(4)).await.unwrap();
        complete(&store, &job, VmStatus::Active).await;
        vms.push(vm);
    }
    let guard =
        CapacityGuard { provider_id: p.id, host: "h3".into(), room: Room { vcpus: 4, memory_mib: 1 << 30 } };
    let tasks: Vec<_> = vms
        .iter()
        .map(|vm| {
            let store = store.clone();
            let op = AcceptOperation {
                scope: Scope::new("acme", "p1"),
                vm_id: vm.id,
                kind: JobKind::ResizeVm,
                require_status: None,
                snapshot: None,
                image: None,
                resize: Some(lifecycle::Size {
                    flavor: "two".into(),
                    vcpus: 2,
                    memory_mib: 512,
                    disk_gib: 10,
                }),
                host_change: None,
                capacity: Some(guard.clone()),
            };
            let job = new_job("acme", "p1", vm.id, JobKind::ResizeVm);
            tokio::spawn(
                async move { store.accept_operation(&op, &job, &audit("vm.resize", ""), None).await },
            )
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(match t.await.unwrap() {
            Ok(_) => "accepted",
            Err(StoreError::NoRoom(_)) => "no room",
            Err(e) => panic!("unexpected {e:?}"),
        });
    }
    outcomes.sort();
    assert_eq!(outcomes, ["accepted", "no room", "no room"]);
    assert_eq!(host_counts(&db, &store).await.0.get("h3"), Some(&(3, 4, 1536)));
    // A move onto a full host is refused the same way.
    let (d, jd) = create_on(&store, &p, "p1", "h1x", 1, None).await.unwrap();
    complete(&store, &jd, VmStatus::Active).await;
    let change = HostChange { to: Some("h3".into()), live: true, group: None, capacity: Some(guard) };
    let op = AcceptOperation {
        scope: Scope::new("acme", "p1"),
        vm_id: d.id,
        kind: JobKind::MigrateVm,
        require_status: None,
        snapshot: None,
        image: None,
        resize: None,
        host_change: Some(change),
        capacity: None,
    };
    let err = store
        .accept_operation(
            &op,
            &new_job("acme", "p1", d.id, JobKind::MigrateVm),
            &audit("vm.migrate", ""),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoRoom(ref m) if m.contains("h3")), "{err:?}");
}

fn key_pair(tenant: &str, project: &str, name: &str) -> KeyPair {
    KeyPair {
        tenant_id: tenant.into(),
        project_id: project.into(),
        name: name.into(),
        public_key: format!("ssh-ed25519 AAAA {name}"),
        fingerprint: "SHA256:x".into(),
        key_type: "ssh-ed25519".into(),
        bits: 256,
        comment: name.into(),
        created_at: now(),
    }
}

async fn key_pairs_are_per_project_unique_and_limited(backend: Backend) {
    let (_db, store) = fresh(backend).await;
    let scope = Scope::new("acme", "p1");
    let k = key_pair("acme", "p1", "laptop");
    store.create_key_pair(&k, 3, &audit("key_pair.create", "laptop")).await.unwrap();
    assert_eq!(store.get_key_pair(&scope, "laptop").await.unwrap(), k, "reads back as written");
    // The same name in the project is taken; in another project or tenant it is not.
    let again = store.create_key_pair(&k, 3, &audit("key_pair.create", "laptop")).await.unwrap_err();
    assert!(matches!(again, StoreError::AlreadyExists { .. }), "{again:?}");
    store.create_key_pair(&key_pair("acme", "p2", "laptop"), 3, &audit("a", "b")).await.unwrap();
    store.create_key_pair(&key_pair("other", "p1", "laptop"), 3, &audit("a", "b")).await.unwrap();
    for other in [Scope::new("other", "p2"), Scope::new("acme", "p3")] {
        assert!(matches!(store.get_key_pair(&other, "laptop").await, Err(StoreError::NotFound)));
        let gone = store.delete_key_pair(&other, "laptop", &audit("a", "b")).await;
        assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");
    }
    // At most `max` per project.
    store.create_key_pair(&key_pair("acme", "p1", "b"), 3, &audit("a", "b")).await.unwrap();
    store.create_key_pair(&key_pair("acme", "p1", "a"), 3, &audit("a", "b")).await.unwrap();
    let full = store.create_key_pair(&key_pair("acme", "p1", "c"), 3, &audit("a", "b")).await.unwrap_err();
    assert!(matches!(&full, StoreError::QuotaExceeded(m) if m.contains('3')), "{full:?}");
    let names: Vec<String> =
        store.list_key_pairs(&scope).await.unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["a", "b", "laptop"], "by name, this project's only");
    store.delete_key_pair(&scope, "laptop", &audit("key_pair.delete", "laptop")).await.unwrap();
    assert!(matches!(store.get_key_pair(&scope, "laptop").await, Err(StoreError::NotFound)));
    store.create_key_pair(&key_pair("acme", "p1", "c"), 3, &audit("a", "b")).await.unwrap();
    let (events, _) =
        store.list_audit_events(&AuditQuery { page_size: 100, ..Default::default() }).await.unwrap();
    assert!(events.iter().any(|e| e.action == "key_pair.delete"), "each change is audited");
}

fn webhook(tenant: &str, project: &str, events: &[WebhookEvent]) -> hcp_domain::webhook::WebhookEndpoint {
    hcp_domain::webhook::WebhookEndpoint {
        id: hcp_proto::ids::WebhookId::new(),
        tenant_id: tenant.into(),
        project_id: project.into(),
        url: "https://hooks.example.com/in".into(),
        events: hcp_domain::webhook::EventTypes::of(events.iter().copied()),
        description: "d".into(),
        sealed_secret: vec![1, 2, 3],
        enabled: true,
        disabled_reason: String::new(),
        consecutive_failures: 0,
        failing_since: None,
        created_at: now(),
    }
}

async fn webhook_deliveries_commit_with_the_change_and_go_out_in_order(backend: Backend) {
    use hcp_domain::webhook::{AttemptResult, Subject};
    use hcp_store::AttemptOutcome;
    let (_db, store) = fresh(backend).await;
    let p = seed(&store).await;
    let scope = Scope::new("acme", "p1");
    let jobs_only = webhook("acme", "p1", &[WebhookEvent::JobFinished]);
    let both = webhook("acme", "p1", &[WebhookEvent::JobFinished, WebhookEvent::VmStatusChanged]);
    let elsewhere = webhook("acme", "p2", &[WebhookEvent::JobFinished]);
    for w in [&jobs_only, &both, &elsewhere] {
        store.create_webhook(w, 2, &audit("webhook.create", &w.id.to_string())).await.unwrap();
    }
    assert_eq!(store.get_webhook(&scope, both.id).await.unwrap(), both, "reads back as written");
    let full =
        store.create_webhook(&webhook("acme", "p1", &[WebhookEvent::JobFinished]), 2, &audit("a", "b")).await;
    assert!(matches!(&full, Err(StoreError::QuotaExceeded(m)) if m.contains('2')), "{full:?}");
    assert!(matches!(store.get_webhook(&Scope::new("acme", "p2"), both.id).await, Err(StoreError::NotFound)));

    // Two VMs created: each finish writes its events to the project's
    // endpoints that take them (the one-statement finish on PostgreSQL).
    let (a, job_a) = create(&store, &p, "acme", "p1", "a", &[]).await;
    let (b, job_b) = create(&store, &p, "acme", "p1", "b", &[]).await;
    assert!(store.due_webhook_deliveries(now(), 100).await.unwrap().is_empty(), "nothing before a job ends");
    complete(&store, &job_a, VmStatus::Active).await;
    complete(&store, &job_b, VmStatus::Active).await;
    let listed = store.list_webhook_deliveries(&scope, both.id, 10).await.unwrap();
    let kinds: Vec<(Subject, WebhookEvent)> = listed.iter().rev().map(|d| (d.subject, d.event)).collect();
    assert_eq!(
        kinds,
        [
            (Subject::Vm(a.id), WebhookEvent::JobFinished),
            (Subject::Vm(a.id), WebhookEvent::VmStatusChanged),
            (Subject::Vm(b.id), WebhookEvent::JobFinished),
            (Subject::Vm(b.id), WebhookEvent::VmStatusChanged)
        ],
        "oldest first in order, newest first as listed"
    );
    let payload: serde_json::Value = serde_json::from_str(&listed[3].payload).unwrap();
    assert_eq!(payload["type"], "job.finished");
    assert_eq!(payload["data"]["job"]["kind"], "vm.create");
    assert_eq!(payload["data"]["vm_status"], "ACTIVE");
    assert_eq!(payload["vm_id"], a.id.to_string());
    assert_eq!(store.list_webhook_deliveries(&scope, jobs_only.id, 10).await.unwrap().len(), 2);
    let other = Scope::new("acme", "p2");
    assert!(
        store.list_webhook_deliveries(&other, elsewhere.id, 10).await.unwrap().is_empty(),
        "another project's"
    );

    // Due: the oldest undelivered one per endpoint and VM.
    let heads = |due: Vec<(hcp_domain::webhook::WebhookDelivery, hcp_domain::webhook::WebhookEndpoint)>| {
        let mut v: Vec<(hcp_proto::ids::WebhookId, VmId, WebhookEvent)> = due
            .into_iter()
            .map(|(d, e)| match d.subject {
                Subject::Vm(vm) => (e.id, vm, d.event),
                Subject::Volume(_) => panic!("no volume here: {d:?}"),
            })
            .collect();
        v.sort_by_key(|(e, vm, _)| (e.0, vm.0));
        v
    };
    let mut expected = vec![
        (jobs_only.id, a.id, WebhookEvent::JobFinished),
        (jobs_only.id, b.id, WebhookEvent::JobFinished),
        (both.id, a.id, WebhookEvent::JobFinished),
        (both.id, b.id, WebhookEvent::JobFinished),
    ];
    expected.sort_by_key(|(e, vm, _)| (e.0, vm.0));
    let due = store.due_webhook_deliveries(now(), 100).await.unwrap();
    let first_of_both_a =
        due.iter().find(|(d, e)| e.id == both.id && d.subject == Subject::Vm(a.id)).unwrap().0.clone();
    let first_of_jobs_a =
        due.iter().find(|(d, e)| e.id == jobs_only.id && d.subject == Subject::Vm(a.id)).unwrap().0.clone();
    assert_eq!(heads(due), expected);
    let ok = AttemptResult { at: now(), status_code: Some(204), error: String::new(), duration_ms: 7 };
    let state = store
        .record_webhook_attempt(first_of_both_a.seq, both.id, &ok, AttemptOutcome::Delivered)
        .await
        .unwrap();
    assert_eq!(state, (0, None));
    let failed = AttemptResult { at: now(), status_code: Some(503), error: String::new(), duration_ms: 9 };
    let later = now() + Duration::hours(1);
    let state = store
        .record_webhook_attempt(first_of_jobs_a.seq, jobs_only.id, &failed, AttemptOutcome::Retry(later))
        .await
        .unwrap();
    assert_eq!(state, (1, Some(failed.at)), "the endpoint counts its failures");
    let due = heads(store.due_webhook_deliveries(now(), 100).await.unwrap());
    assert!(due.contains(&(both.id, a.id, WebhookEvent::VmStatusChanged)), "the next one of the VM: {due:?}");
    assert!(!due.iter().any(|(e, vm, _)| *e == jobs_only.id && *vm == a.id), "waits for its retry: {due:?}");
    let retried = store.list_webhook_deliveries(&scope, jobs_only.id, 10).await.unwrap();
    let r = retried.iter().find(|d| d.seq == first_of_jobs_a.seq).unwrap();
    assert_eq!(
        (r.status, r.attempts, r.last_status_code, r.next_attempt_at),
        (DeliveryStatus::Pending, 1, Some(503), later)
    );

    // Disabled: nothing of it is due; enabled again: all of it at once.
    store.disable_webhook(jobs_only.id, "disabled after 1 failed attempts").await.unwrap();
    let off = store.get_webhook(&scope, jobs_only.id).await.unwrap();
    assert!(!off.enabled && off.disabled_reason.contains("1 failed"), "{off:?}");
    let due = heads(store.due_webhook_deliveries(now(), 100).await.unwrap());
    assert!(!due.iter().any(|(e, _, _)| *e == jobs_only.id), "{due:?}");
    let on = store.enable_webhook(&scope, jobs_only.id, now(), &audit("webhook.enable", "x")).await.unwrap();
    assert!(
        on.enabled
            && on.disabled_reason.is_empty()
            && on.consecutive_failures == 0
            && on.failing_since.is_none()
    );
    let due = heads(store.due_webhook_deliveries(now(), 100).await.unwrap());
    assert!(due.contains(&(jobs_only.id, a.id, WebhookEvent::JobFinished)), "due again at once: {due:?}");

    // A disabled endpoint gets no new deliveries; a deleted one loses its own.
    store.disable_webhook(jobs_only.id, "off").await.unwrap();
    let (_c, job_c) = create(&store, &p, "acme", "p1", "c", &[]).await;
    complete(&store, &job_c, VmStatus::Active).await;
    assert_eq!(
        store.list_webhook_deliveries(&scope, jobs_only.id, 10).await.unwrap().len(),
        2,
        "disabled: none new"
    );
    assert_eq!(
        store.list_webhook_deliveries(&scope, both.id, 10).await.unwrap().len(),
        6,
        "enabled: two more"
    );
    // Old delivered events are removed; pending ones stay whatever their age.
    assert_eq!(
        store.purge_webhook_deliveries(now() + Duration::seconds(1)).await.unwrap(),
        1,
        "the delivered one"
    );
    assert_eq!(store.list_webhook_deliveries(&scope, both.id, 10).await.unwrap().len(), 5);
    store.delete_webhook(&scope, both.id, &audit("webhook.delete", "x")).await.unwrap();
    assert!(matches!(store.list_webhook_deliveries(&scope, both.id, 10).await, Err(StoreError::NotFound)));
    assert_eq!(store.list_webhook_deliveries(&scope, jobs_only.id, 10).await.unwrap().len(), 2);
    let (events, _) =
        store.list_audit_events(&AuditQuery { page_size: 100, ..Default::default() }).await.unwrap();
    assert!(events.iter().any(|e| e.action == "webhook.delete"), "each change is audited");
}
