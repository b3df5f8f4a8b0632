//! Hosts, migration, drains, placement groups and restart policies, end to
//! end on the simulator (three hosts, `sim-host-1..3`): a running VM moves
//! live and stays ACTIVE while its host changes in the ops view and its
//! console tokens stop working; a drain empties a host and new creates
//! avoid it; twenty concurrent creates into a strict anti-affinity group
//! give three VMs on three hosts and seventeen refusals; a VM that should
//! always run comes back on another host after its host dies.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use hcp_proto::provider::{HostState, PowerState};
use hcp_proto::sim::sim_control_client::SimControlClient;
use hcp_testkit::db::Backend;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const MIGRATING_SIM: &str = "cloud_init,console_vnc,live_migration,cold_migration";

async fn stack(backend: Backend, core_toml: &str) -> TestStack {
    let opts = StackOptions {
        backend,
        sim_capabilities: MIGRATING_SIM.to_owned(),
        core_toml: core_toml.to_owned(),
        ..Default::default()
    };
    TestStack::start(Path::new(HCP), opts).await.unwrap()
}

async fn create(s: &TestStack, token: &str, body: Value) -> String {
    let r = s.rest.post(VMS, token, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.str("vm_id");
    wait_status(s, token, &id, "ACTIVE").await;
    id
}

async fn status(s: &TestStack, token: &str, id: &str) -> String {
    s.rest.get(&format!("{VMS}/{id}"), token).await.unwrap().str("status")
}

async fn wait_status(s: &TestStack, token: &str, id: &str, want: &str) {
    wait_until(Duration::from_secs(20), &format!("vm {id} {want}"), || async {
        Ok((status(s, token, id).await == want).then_some(()))
    })
    .await
    .unwrap();
}

/// The VM as operators see it.
async fn ops_vm(s: &TestStack, id: &str) -> Value {
    let r = s.rest.get(&format!("/api/hcp/ops/v1/vms/{id}"), &s.ops_token()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn host_of(s: &TestStack, id: &str) -> String {
    ops_vm(s, id).await["host"].as_str().unwrap().to_owned()
}

async fn provider_id(s: &TestStack) -> String {
    let r = s.rest.get("/api/hcp/ops/v1/providers", &s.ops_token()).await.unwrap();
    r.body["providers"][0]["provider_id"].as_str().unwrap().to_owned()
}

async fn hosts(s: &TestStack, provider: &str) -> Vec<Value> {
    let r = s.rest.get(&format!("/api/hcp/ops/v1/providers/{provider}/hosts"), &s.ops_token()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["hosts"].as_array().unwrap().clone()
}

async fn migrate(s: &TestStack, id: &str, body: Value) -> hcp_testkit::rest::Reply {
    s.rest.post(&format!("/api/hcp/ops/v1/vms/{id}:migrate"), &s.ops_token(), &body).await.unwrap()
}

async fn power(s: &TestStack, id: &str) -> PowerState {
    let mut c = hcp_proto::provider::compute_client::ComputeClient::new(s.sim_channel().await.unwrap());
    let vm = c.get_vm(hcp_proto::provider::VmRef { vm_id: id.to_owned() }).await.unwrap().into_inner();
    PowerState::try_from(vm.power_state).unwrap()
}

#[tokio::test]
async fn a_running_vm_moves_live_stays_active_and_its_console_token_is_revoked() {
    let s = stack(Backend::Sqlite, "").await;
    let token = s.tenant_token("acme", &["demo"]);
    let id = create(&s, &token, json!({"name": "web", "flavor": "small", "image": "debian-12"})).await;
    let before = host_of(&s, &id).await;
    assert!(before.starts_with("sim-host-"), "{before}");
    // Tenants never see the host.
    let tenant_view = s.rest.get(&format!("{VMS}/{id}"), &token).await.unwrap();
    assert!(!tenant_view.body.to_string().contains("sim-host"), "{}", tenant_view.body);

    let console = s.console(&format!("{VMS}/{id}"), &token, &json!({"type": "vnc"})).await.unwrap();
    let console_token = console["token"].as_str().unwrap().to_owned();

    let r = migrate(&s, &id, json!({})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(status(&s, &token, &id).await, "ACTIVE", "a moving vm stays ACTIVE");
    let job = s.rest.finished_job(&token, &r.str("job_id"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (job["status"].as_str(), job["kind"].as_str()),
        (Some("SUCCEEDED"), Some("vm.migrate")),
        "{job}"
    );
    let after = host_of(&s, &id).await;
    assert_ne!(after, before, "the host changed");
    assert_eq!(status(&s, &token, &id).await, "ACTIVE");
    assert_eq!(power(&s, &id).await, PowerState::Running, "moved live: still running");

    // The token issued before the move opens nothing now.
    let proxy = s.token(None, &[], &["console.proxy"], 300);
    let mut broker = hcp_proto::console::console_broker_service_client::ConsoleBrokerServiceClient::new(
        s.core_channel().await.unwrap(),
    );
    let mut req = tonic::Request::new(hcp_proto::console::RedeemConsoleRequest {
        token: console_token,
        protocol: "vnc".into(),
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {proxy}").parse().unwrap());
    let err = broker.redeem_console(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());

    // Back to the named host.
    let r = migrate(&s, &id, json!({"target_host": before})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = s.rest.finished_job(&token, &r.str("job_id"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert_eq!(host_of(&s, &id).await, before);

    // A move that fails leaves the VM where it was, ACTIVE.
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest {
        fault: Some(hcp_proto::sim::Fault {
            operation: "MigrateVm".into(),
            code: "FAILED_PRECONDITION".into(),
            count: 1,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let r = migrate(&s, &id, json!({})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = s.rest.finished_job(&token, &r.str("job_id"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(job["status"], "FAILED", "{job}");
    assert_eq!(host_of(&s, &id).await, before, "the host before the failed move is back");
    assert_eq!(status(&s, &token, &id).await, "ACTIVE");

    // Bad requests name the field; tenants may not move VMs.
    for (body, field) in [
        (json!({"target_host": "nowhere"}), "target_host"),
        (json!({"target_host": before}), "target_host"),
        (json!({"target_host": "x".repeat(300)}), "target_host"),
        (json!({"live": false}), "live"),
    ] {
        let r = migrate(&s, &id, body.clone()).await;
        assert!(matches!(r.status, 400 | 409), "{body}: {} {}", r.status, r.body);
        assert_eq!(r.body["details"]["field"], field, "{body}: {}", r.body);
    }
    let r = s.rest.post(&format!("/api/hcp/ops/v1/vms/{id}:migrate"), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let r = migrate(&s, "not-a-uuid", json!({})).await;
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("vm_id")), "{}", r.body);
}

#[tokio::test]
async fn a_drain_empties_the_host_and_new_creates_avoid_it() {
    let s = stack(Backend::Postgres, "[drain]\nconcurrency = 2\ninterval_ms = 100\n").await;
    let token = s.tenant_token("acme", &["demo"]);
    let provider = provider_id(&s).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            create(&s, &token, json!({"name": format!("vm-{i}"), "flavor": "small", "image": "debian-12"}))
                .await,
        );
    }
    // Spread: two on each host.
    let mut by_host: HashMap<String, Vec<String>> = HashMap::new();
    for id in &ids {
        by_host.entry(host_of(&s, id).await).or_default().push(id.clone());
    }
    assert_eq!(by_host.len(), 3, "{by_host:?}");
    assert!(by_host.values().all(|v| v.len() == 2), "{by_host:?}");
    let (target, on_target) = by_host.iter().next().map(|(h, v)| (h.clone(), v.clone())).unwrap();
    // One of them stopped: it moves cold.
    let r = s.rest.post(&format!("{VMS}/{}:stop", on_target[0]), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    wait_status(&s, &token, &on_target[0], "STOPPED").await;

    let r = s
        .rest
        .post(
            &format!("/api/hcp/ops/v1/providers/{provider}/hosts/{target}:drain"),
            &s.ops_token(),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.str("drain")), (200, "DRAINING".to_owned()), "{}", r.body);
    wait_until(Duration::from_secs(30), "host drained", || async {
        let h = hosts(&s, &provider).await.into_iter().find(|h| h["name"] == target.as_str()).unwrap();
        Ok((h["drain"] == "DRAINED" && h["vms"].as_u64().unwrap_or(0) == 0).then_some(()))
    })
    .await
    .unwrap();
    for id in &ids {
        assert_ne!(host_of(&s, id).await, target, "{id} left the host");
    }
    assert_eq!(status(&s, &token, &on_target[0]).await, "STOPPED");
    assert_eq!(status(&s, &token, &on_target[1]).await, "ACTIVE");
    assert_eq!(power(&s, &on_target[1]).await, PowerState::Running);
    // Each move was a job the drain started.
    for id in &on_target {
        let r = s
            .rest
            .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={id}&action=vm.migrate"), &s.ops_token())
            .await
            .unwrap();
        let events = r.body["events"].as_array().unwrap();
        assert!(
            events.iter().any(|e| e["actor"] == "system:drain" && e["outcome"] == "accepted"),
            "{}",
            r.body
        );
        assert!(events.iter().any(|e| e["outcome"] == "succeeded"), "{}", r.body);
    }
    // New VMs avoid the drained host.
    for i in 0..4 {
        let id =
            create(&s, &token, json!({"name": format!("new-{i}"), "flavor": "small", "image": "debian-12"}))
                .await;
        assert_ne!(host_of(&s, &id).await, target);
    }
    let r = s
        .rest
        .post(
            &format!("/api/hcp/ops/v1/providers/{provider}/hosts/{target}:undrain"),
            &s.ops_token(),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.str("drain")), (200, String::new()), "{}", r.body);
    // In service again, and empty: the next create goes there.
    let id = create(&s, &token, json!({"name": "back", "flavor": "small", "image": "debian-12"})).await;
    assert_eq!(host_of(&s, &id).await, target);

    // Bad input names the field; unknown hosts are 404; tenants get 403.
    let r = s
        .rest
        .post(
            &format!("/api/hcp/ops/v1/providers/{provider}/hosts/nowhere:drain"),
            &s.ops_token(),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let r = s
        .rest
        .post("/api/hcp/ops/v1/providers/not-a-uuid/hosts/x:drain", &s.ops_token(), &json!({}))
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("provider_id")), "{}", r.body);
    let r = s.rest.get(&format!("/api/hcp/ops/v1/providers/{provider}/hosts"), &token).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
}

#[tokio::test]
async fn twenty_concurrent_creates_into_a_strict_anti_affinity_group_over_three_hosts() {
    let s = stack(Backend::Postgres, "").await;
    let token = s.tenant_token("acme", &["demo"]);
    let groups = "/api/hcp/tenant/v1/projects/demo/placement-groups";
    let r = s
        .rest
        .post(groups, &token, &json!({"name": "web", "policy": "ANTI_AFFINITY", "strict": true}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let group = r.str("placement_group_id");

    let creates = (0..20).map(|i| {
        let s = &s;
        let token = &token;
        let group = &group;
        async move {
            let body = json!({"name": format!("web-{i}"), "flavor": "small", "image": "debian-12",
                "placement_group_id": group});
            s.rest.post(VMS, token, &body).await.unwrap()
        }
    });
    let replies = futures::future::join_all(creates).await;
    let accepted: Vec<String> = replies.iter().filter(|r| r.status == 202).map(|r| r.str("vm_id")).collect();
    let refused: Vec<&hcp_testkit::rest::Reply> = replies.iter().filter(|r| r.status == 409).collect();
    assert_eq!(
        (accepted.len(), refused.len()),
        (3, 17),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &refused {
        assert_eq!(r.body["code"], "CONFLICT", "{}", r.body);
        assert_eq!(r.body["details"]["reason"], "placement_group", "{}", r.body);
    }
    let mut hosts = BTreeSet::new();
    for id in &accepted {
        wait_status(&s, &token, id, "ACTIVE").await;
        hosts.insert(host_of(&s, id).await);
    }
    assert_eq!(hosts.len(), 3, "three different hosts: {hosts:?}");
    let g = s.rest.get(&format!("{groups}/{group}"), &token).await.unwrap();
    assert_eq!(g.body["vm_ids"].as_array().unwrap().len(), 3, "{}", g.body);

    // A group with members stays; another project's tenant cannot use it.
    let r = s.rest.delete(&format!("{groups}/{group}"), &token).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    let other = s.tenant_token("other", &["demo"]);
    let r = s
        .rest
        .post(
            VMS,
            &other,
            &json!({"name": "x", "flavor": "small", "image": "debian-12", "placement_group_id": group}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["details"]["field"].as_str()),
        (400, Some("placement_group_id")),
        "{}",
        r.body
    );
    // Bad input names the field.
    for (body, field) in [
        (json!({"name": "g2"}), "placement_group.policy"),
        (json!({"name": "bad name", "policy": "AFFINITY"}), "placement_group.name"),
        (json!({"name": "g3", "policy": "AFFINITY", "vm_ids": [accepted[0]]}), "placement_group.vm_ids"),
    ] {
        let r = s.rest.post(groups, &token, &body).await.unwrap();
        assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some(field)), "{body}: {}", r.body);
    }
    let r = s.rest.post(groups, &token, &json!({"name": "web", "policy": "AFFINITY"})).await.unwrap();
    assert_eq!(r.status, 409, "a taken name: {}", r.body);
    let r = s
        .rest
        .post(
            VMS,
            &token,
            &json!({"name": "y", "flavor": "small", "image": "debian-12", "restart_policy": 9}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("restart_policy")), "{}", r.body);

    // Members deleted, the group goes.
    for id in &accepted {
        let r = s.rest.delete(&format!("{VMS}/{id}"), &token).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        wait_status(&s, &token, id, "DELETED").await;
    }
    let r = s.rest.delete(&format!("{groups}/{group}"), &token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn a_vm_that_should_always_run_comes_back_on_another_host_after_its_host_dies() {
    let s = stack(Backend::Sqlite, "[reconciler]\ninterval_seconds = 1\n").await;
    let token = s.tenant_token("acme", &["demo"]);
    // A soft affinity group puts both on one host.
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/demo/placement-groups",
            &token,
            &json!({"name": "pair", "policy": "AFFINITY"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let group = r.str("placement_group_id");
    let keep = create(
        &s,
        &token,
        json!({"name": "keep", "flavor": "small", "image": "debian-12", "placement_group_id": group,
            "restart_policy": "ALWAYS"}),
    )
    .await;
    let leave = create(
        &s,
        &token,
        json!({"name": "leave", "flavor": "small", "image": "debian-12", "placement_group_id": group}),
    )
    .await;
    let dead = host_of(&s, &keep).await;
    assert_eq!(host_of(&s, &leave).await, dead, "soft affinity put them together");
    let vm = s.rest.get(&format!("{VMS}/{keep}"), &token).await.unwrap();
    assert_eq!(vm.body["restart_policy"], "ALWAYS", "{}", vm.body);

    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    sim.set_host_state(hcp_proto::sim::SetHostStateRequest {
        host: dead.clone(),
        state: HostState::HostDown as i32,
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "keep running elsewhere", || async {
        let here = host_of(&s, &keep).await;
        Ok((here != dead && power(&s, &keep).await == PowerState::Running).then_some(()))
    })
    .await
    .unwrap();
    wait_status(&s, &token, &keep, "ACTIVE").await;
    // The decision and its outcome are in the audit trail.
    let r = s
        .rest
        .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={keep}&action=vm.recover"), &s.ops_token())
        .await
        .unwrap();
    let events = r.body["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["actor"] == "system:reconciler"
            && e["outcome"] == "accepted"
            && e["detail"].as_str().unwrap_or_default().contains("restart policy always")),
        "{}",
        r.body
    );
    assert!(events.iter().any(|e| e["outcome"] == "succeeded"), "{}", r.body);
    // The VM without a restart policy stays down where it was, reported.
    assert_eq!(power(&s, &leave).await, PowerState::Crashed);
    assert_eq!(host_of(&s, &leave).await, dead);
    // The dead host takes nothing new.
    let h = hosts(&s, &provider_id(&s).await).await.into_iter().find(|h| h["name"] == dead.as_str()).unwrap();
    assert_eq!(h["state"], "DOWN", "{h}");
    let id = create(&s, &token, json!({"name": "new", "flavor": "small", "image": "debian-12"})).await;
    assert_ne!(host_of(&s, &id).await, dead);
}

#[tokio::test]
async fn a_packing_zone_fills_hosts_in_turn_up_to_its_overcommit() {
    // Three hosts of 2 vCPUs and 2 GiB; "small" is 1 vCPU and 512 MiB.
    let opts = StackOptions {
        sim_capabilities: MIGRATING_SIM.to_owned(),
        sim_args: vec!["--host-vcpus".into(), "2".into(), "--host-memory-mib".into(), "2048".into()],
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let placement = "/api/hcp/ops/v1/zones/zone-1/placement";
    let r = s.rest.get(placement, &s.ops_token()).await.unwrap();
    assert_eq!((r.status, r.str("policy")), (200, "spread".to_owned()), "{}", r.body);
    let put = |body: Value| {
        let s = &s;
        async move { s.rest.raw("PUT", placement, Some(&s.ops_token()), Some(&body.to_string())).await.unwrap() }
    };
    let r = put(json!({"policy": "pack", "cpu_overcommit": 1, "memory_overcommit": 1})).await;
    assert_eq!((r.status, r.str("policy")), (200, "pack".to_owned()), "{}", r.body);

    let mut order = Vec::new();
    for i in 0..6 {
        let id =
            create(&s, &token, json!({"name": format!("p-{i}"), "flavor": "small", "image": "debian-12"}))
                .await;
        order.push(host_of(&s, &id).await);
    }
    // Pack: the fullest host that fits first, so two on one before the next.
    assert_eq!(order[0], order[1], "{order:?}");
    assert_eq!(order[2], order[3], "{order:?}");
    assert_eq!(order[4], order[5], "{order:?}");
    assert_eq!(order.iter().collect::<BTreeSet<_>>().len(), 3, "{order:?}");
    // Every vCPU taken at overcommit 1: the next create is refused, before
    // any job exists, saying why.
    let r = s
        .rest
        .post(VMS, &token, &json!({"name": "full", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["reason"].as_str()), (409, Some("capacity")), "{}", r.body);
    // Overcommit 2 makes room.
    let r = put(json!({"policy": "pack", "cpu_overcommit": 2})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    create(&s, &token, json!({"name": "fits", "flavor": "small", "image": "debian-12"})).await;

    // Bad settings name the field.
    for (body, field) in [
        (json!({"policy": "random"}), "policy"),
        (json!({"cpu_overcommit": 0.5}), "cpu_overcommit"),
        (json!({"memory_overcommit": 1000}), "memory_overcommit"),
    ] {
        let r = put(body.clone()).await;
        assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some(field)), "{body}: {}", r.body);
    }
    let r = s
        .rest
        .raw("PUT", "/api/hcp/ops/v1/zones/nowhere/placement", Some(&s.ops_token()), Some("{}"))
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

/// Runs `hcp` with the stack's gateway and `token`; returns stdout as JSON.
async fn hcp_json(s: &TestStack, token: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(HCP)
        .args(args)
        .args(["-o", "json"])
        .env("HCP_ENDPOINT", format!("http://{}", s.gateway))
        .env("HCP_TOKEN", token)
        .env("HCP_PROJECT", "demo")
        .env("HCP_CONFIG", s.dir().join("no-config.toml"))
        .env_remove("HCP_PROFILE")
        .env_remove("HCP_OUTPUT")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "hcp {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("hcp {args:?}: {e}"))
}

#[tokio::test]
async fn operators_see_hosts_drain_and_move_vms_with_the_hcp_command() {
    let s = stack(Backend::Sqlite, "[drain]\ninterval_ms = 100\n").await;
    let token = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    let provider = provider_id(&s).await;
    let created = hcp_json(
        &s,
        &token,
        &[
            "vm",
            "create",
            "cli-vm",
            "--flavor",
            "small",
            "--image",
            "debian-12",
            "--restart-policy",
            "on-failure",
            "--wait",
        ],
    )
    .await;
    let id = created["vm_id"].as_str().unwrap_or_else(|| panic!("{created}")).to_owned();
    let vm = hcp_json(&s, &ops, &["ops", "vm", "show", &id]).await;
    assert_eq!(vm["restart_policy"], "on-failure", "{vm}");
    let from = vm["host"].as_str().unwrap().to_owned();
    let hosts = hcp_json(&s, &ops, &["ops", "host", "list", &provider]).await;
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 3, "{hosts}");

    let moved = hcp_json(&s, &ops, &["ops", "vm", "migrate", &id]).await;
    s.rest.finished_job(&token, moved["job_id"].as_str().unwrap(), Duration::from_secs(20)).await.unwrap();
    let to = host_of(&s, &id).await;
    assert_ne!(to, from);
    let drained = hcp_json(&s, &ops, &["ops", "host", "drain", &provider, &to]).await;
    assert_eq!(drained["drain"], "DRAINING", "{drained}");
    wait_until(Duration::from_secs(20), "the vm off the drained host", || async {
        Ok((host_of(&s, &id).await != to).then_some(()))
    })
    .await
    .unwrap();
    let back = hcp_json(&s, &ops, &["ops", "host", "undrain", &provider, &to]).await;
    assert_eq!(back["drain"], "", "{back}");
}

/// Sends `n` requests at once; the statuses and bodies of their answers.
async fn at_once<F, Fut>(n: usize, f: F) -> Vec<hcp_testkit::rest::Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = hcp_testkit::rest::Reply>,
{
    futures::future::join_all((0..n).map(f)).await
}

/// The ids of the accepted answers; every other answer is a 409 whose
/// reason is one of `reasons`.
fn accepted_and_refused(replies: &[hcp_testkit::rest::Reply], reasons: &[&str]) -> Vec<String> {
    let mut accepted = Vec::new();
    for r in replies {
        match r.status {
            202 => accepted.push(r.str("vm_id")),
            409 => {
                let reason = r.body["details"]["reason"].as_str().unwrap_or_default();
                assert!(reasons.contains(&reason), "{}", r.body);
            }
            _ => panic!("neither accepted nor 409: {} {}", r.status, r.body),
        }
    }
    accepted
}

/// Host capacity is checked in the transaction that accepts: twenty
/// concurrent creates onto three hosts with room for four small VMs each
/// get exactly twelve accepted and eight 409 `capacity`; twenty into a
/// strict affinity group (one host) get exactly four; three concurrent
/// resizes that each need one more vCPU on a host with one left get one.
#[tokio::test]
async fn concurrent_creates_group_joins_and_resizes_never_overfill_a_host() {
    // Three hosts of 4 vCPUs; "small" is 1 vCPU, "medium" 2; overcommit 1.
    let opts = StackOptions {
        backend: Backend::Postgres,
        sim_capabilities: format!("{MIGRATING_SIM},resize,hot_resize"),
        sim_args: vec!["--host-vcpus".into(), "4".into(), "--host-memory-mib".into(), "65536".into()],
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let placement = "/api/hcp/ops/v1/zones/zone-1/placement";
    let set_policy = |policy: &'static str| {
        let s = &s;
        async move {
            let body = json!({"policy": policy, "cpu_overcommit": 1, "memory_overcommit": 1}).to_string();
            let r = s.rest.raw("PUT", placement, Some(&s.ops_token()), Some(&body)).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    let delete_all = |ids: Vec<String>| {
        let (s, token) = (&s, &token);
        async move {
            for id in &ids {
                let r = s.rest.delete(&format!("{VMS}/{id}"), token).await.unwrap();
                assert_eq!(r.status, 202, "{}", r.body);
            }
            for id in &ids {
                wait_status(s, token, id, "DELETED").await;
            }
        }
    };
    set_policy("spread").await;

    let replies = at_once(20, |i| {
        let (s, token) = (&s, &token);
        async move {
            let body = json!({"name": format!("c-{i}"), "flavor": "small", "image": "debian-12"});
            s.rest.post(VMS, token, &body).await.unwrap()
        }
    })
    .await;
    let accepted = accepted_and_refused(&replies, &["capacity"]);
    assert_eq!(accepted.len(), 12, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    let mut per_host: HashMap<String, usize> = HashMap::new();
    for id in &accepted {
        wait_status(&s, &token, id, "ACTIVE").await;
        *per_host.entry(host_of(&s, id).await).or_default() += 1;
    }
    assert_eq!(per_host.values().copied().collect::<Vec<_>>(), [4, 4, 4], "{per_host:?}");
    delete_all(accepted).await;

    // A strict affinity group: every member on one host, which holds four.
    let groups = "/api/hcp/tenant/v1/projects/demo/placement-groups";
    let r = s
        .rest
        .post(groups, &token, &json!({"name": "together", "policy": "AFFINITY", "strict": true}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let group = r.str("placement_group_id");
    let replies = at_once(20, |i| {
        let (s, token, group) = (&s, &token, &group);
        async move {
            let body = json!({"name": format!("g-{i}"), "flavor": "small", "image": "debian-12",
                "placement_group_id": group});
            s.rest.post(VMS, token, &body).await.unwrap()
        }
    })
    .await;
    let accepted = accepted_and_refused(&replies, &["capacity", "placement_group"]);
    assert_eq!(accepted.len(), 4, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    let mut hosts = BTreeSet::new();
    for id in &accepted {
        wait_status(&s, &token, id, "ACTIVE").await;
        hosts.insert(host_of(&s, id).await);
    }
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    delete_all(accepted).await;

    // Pack puts three small VMs on one host (3 of 4 vCPUs); each resize to
    // medium needs one more, and one is left.
    set_policy("pack").await;
    let mut vms = Vec::new();
    for i in 0..3 {
        vms.push(
            create(&s, &token, json!({"name": format!("r-{i}"), "flavor": "small", "image": "debian-12"}))
                .await,
        );
    }
    let first = host_of(&s, &vms[0]).await;
    for id in &vms[1..] {
        assert_eq!(host_of(&s, id).await, first);
    }
    let replies = at_once(3, |i| {
        let (s, token, id) = (&s, &token, &vms[i]);
        async move {
            s.rest.post(&format!("{VMS}/{id}:resize"), token, &json!({"flavor": "medium"})).await.unwrap()
        }
    })
    .await;
    let mut statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [202, 409, 409],
        "{:?}",
        replies.iter().map(|r| r.body.to_string()).collect::<Vec<_>>()
    );
    for r in replies.iter().filter(|r| r.status == 409) {
        assert_eq!(r.body["details"]["reason"], "capacity", "{}", r.body);
    }
    for id in &vms {
        wait_status(&s, &token, id, "ACTIVE").await;
    }
}
