//! System tests: core, gateway and sim providers run as separate OS
//! processes on ephemeral ports; every step goes through the REST gateway
//! the way a tenant or operator would.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::db::Backend;
use hcp_testkit::rest::{Reply, Rest};
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const WAIT: Duration = Duration::from_secs(30);

async fn stack(opts: StackOptions) -> TestStack {
    TestStack::start(Path::new(HCP), opts).await.expect("stack starts")
}

fn vms(project: &str) -> String {
    format!("/api/hcp/tenant/v1/projects/{project}/vms")
}

/// Waits until the job is finished and returns it.
async fn finished_job(rest: &Rest, token: &str, job_id: &str) -> Value {
    rest.finished_job(token, job_id, WAIT).await.expect("job finishes")
}

async fn vm_status(rest: &Rest, token: &str, project: &str, vm_id: &str) -> String {
    let r = rest.get(&format!("{}/{vm_id}", vms(project)), token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.str("status")
}

/// Runs an accepted operation to completion, checking the 202 body, the
/// job and the VM's status afterwards.
async fn operate(rest: &Rest, token: &str, vm_id: &str, action: &str, expect: &str) -> String {
    let path = match action {
        "delete" => format!("{}/{vm_id}", vms("demo")),
        _ => format!("{}/{vm_id}:{action}", vms("demo")),
    };
    let r = if action == "delete" {
        rest.delete(&path, token).await
    } else {
        rest.post(&path, token, &json!({})).await
    }
    .unwrap();
    assert_eq!(r.status, 202, "{action}: {}", r.body);
    assert_eq!(r.str("vm_id"), vm_id);
    let job_id = r.str("job_id");
    let job = finished_job(rest, token, &job_id).await;
    assert_eq!(job["status"], "SUCCEEDED", "{action}: {job}");
    assert_eq!(job["kind"], format!("vm.{action}"));
    assert_eq!(job["resource_id"], vm_id);
    assert!(job["finished_at"].is_string());
    assert_eq!(vm_status(rest, token, "demo", vm_id).await, expect, "after {action}");
    job_id
}

async fn lifecycle(backend: Backend) {
    let s = stack(StackOptions { backend, ..Default::default() }).await;
    let token = s.tenant_token("acme", &["demo"]);
    let body = json!({
        "name": "web-1",
        "flavor": "small",
        "image": "debian-12",
        "zone": "zone-1",
        "networks": [{"network": "default"}],
        "metadata": {"owner": "team-a"},
        "tags": ["web", "prod"],
        "user_data": "#cloud-config\nhostname: web-1\n"
    });
    let r = s.rest.post(&vms("demo"), &token, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm_id = r.str("vm_id");
    let create_job = r.str("job_id");
    let job = finished_job(&s.rest, &token, &create_job).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert_eq!(job["attempts"], 1);
    let vm = s.rest.get(&format!("{}/{vm_id}", vms("demo")), &token).await.unwrap().body;
    assert_eq!(vm["status"], "ACTIVE");
    assert_eq!(vm["flavor"], "small");
    assert_eq!(vm["tags"], json!(["prod", "web"]));
    assert_eq!(vm["has_user_data"], true);
    // Nothing about the hypervisor side reaches the tenant.
    for hidden in ["provider_id", "native_id", "host", "node", "datastore", "endpoint"] {
        assert!(vm.get(hidden).is_none(), "{hidden} leaked: {vm}");
    }
    assert!(!vm.to_string().contains(&s.sim.to_string()));

    let stop_job = operate(&s.rest, &token, &vm_id, "stop", "STOPPED").await;
    let start_job = operate(&s.rest, &token, &vm_id, "start", "ACTIVE").await;
    let reboot_job = operate(&s.rest, &token, &vm_id, "reboot", "ACTIVE").await;
    let delete_job = operate(&s.rest, &token, &vm_id, "delete", "DELETED").await;

    // The provider holds no VM any more, and created exactly one.
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await.unwrap());
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.vm_count, 0);
    assert_eq!(stats.creations.get(&vm_id), Some(&1));

    // Every action left an audit trail: accepted by the API, then finished
    // by the worker, with the job and a trace id.
    let ops = s.ops_token();
    let audit = s
        .rest
        .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={vm_id}&page_size=100"), &ops)
        .await
        .unwrap();
    assert_eq!(audit.status, 200, "{}", audit.body);
    let events = audit.body["events"].as_array().unwrap().clone();
    for (action, job) in [
        ("vm.create", &create_job),
        ("vm.stop", &stop_job),
        ("vm.start", &start_job),
        ("vm.reboot", &reboot_job),
        ("vm.delete", &delete_job),
    ] {
        for outcome in ["accepted", "succeeded"] {
            let found = events.iter().any(|e| {
                e["action"] == action
                    && e["outcome"] == outcome
                    && e["job_id"] == job.as_str()
                    && e["trace_id"].as_str().is_some_and(|t| t.len() == 32)
            });
            assert!(found, "no {action} {outcome} audit event for job {job}: {events:#?}");
        }
    }
    let accepted = events.iter().find(|e| e["action"] == "vm.create" && e["outcome"] == "accepted").unwrap();
    assert_eq!(accepted["actor"], "test-user");
    assert_eq!(accepted["tenant_id"], "acme");

    // A deleted VM accepts nothing more.
    let r = s.rest.post(&format!("{}/{vm_id}:start", vms("demo")), &token, &json!({})).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.str("code"), "CONFLICT");
    // It is still readable, and listed only when asked for.
    let listed = s.rest.get(&vms("demo"), &token).await.unwrap();
    assert_eq!(listed.body["vms"], json!([]));
    let deleted = s.rest.get(&format!("{}?status=DELETED", vms("demo")), &token).await.unwrap();
    assert_eq!(deleted.body["vms"].as_array().unwrap().len(), 1);

    // One trace runs from the gateway through core into the worker: the
    // create's trace id appears in core's log on the worker's job span.
    let trace = accepted["trace_id"].as_str().unwrap();
    let core_log = s.log("core-api-0");
    assert!(
        core_log.lines().any(|l| l.contains(trace) && l.contains("job")),
        "trace {trace} not in core log"
    );
}

#[tokio::test]
async fn lifecycle_on_sqlite() {
    lifecycle(Backend::Sqlite).await;
}

#[tokio::test]
async fn lifecycle_on_postgres() {
    lifecycle(Backend::Postgres).await;
}

#[tokio::test]
async fn tokens_roles_and_tenancy() {
    let s = stack(StackOptions::default()).await;
    let acme = s.tenant_token("acme", &["demo"]);
    let r = s
        .rest
        .post(&vms("demo"), &acme, &json!({"name": "a", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let (vm_id, job_id) = (r.str("vm_id"), r.str("job_id"));

    let check = |r: Reply, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.str("code"), code, "{}", r.body);
        assert_eq!(r.body["trace_id"].as_str().map(str::len), Some(32), "{}", r.body);
    };
    // No token, a forged one, an expired one, a malformed header.
    let path = format!("{}/{vm_id}", vms("demo"));
    check(s.rest.raw("GET", &path, None, None).await.unwrap(), 401, "UNAUTHENTICATED");
    let forged = {
        let mut parts: Vec<String> = acme.split('.').map(str::to_owned).collect();
        parts[2] = parts[2].chars().rev().collect();
        parts.join(".")
    };
    let r = s.rest.get(&path, &forged).await.unwrap();
    check(r.clone(), 401, "UNAUTHENTICATED");
    assert!(r.str("message").contains("signature") || r.str("message").contains("malformed"), "{}", r.body);
    let expired = s.token(Some("acme"), &["demo"], &["tenant.member"], 0);
    let expired = {
        // ttl 0 expires now; core tolerates 30 s of skew, so sign one in the past.
        let _ = expired;
        let secret = std::fs::read(s.dir().join("jwt-secret")).unwrap();
        let claims = hcp_core::auth::Claims {
            sub: "x".into(),
            iss: "hcp-dev".into(),
            aud: "hcp".into(),
            exp: (chrono::Utc::now().timestamp() - 3600) as u64,
            iat: 0,
            tenant: Some("acme".into()),
            projects: vec!["demo".into()],
            roles: vec!["tenant.member".into()],
        };
        hcp_core::auth::sign_hs256(&secret, &claims).unwrap()
    };
    let r = s.rest.get(&path, &expired).await.unwrap();
    check(r.clone(), 401, "UNAUTHENTICATED");
    assert!(r.str("message").contains("expired"), "{}", r.body);
    let r = s.rest.raw_with("GET", &path, None, None, &[("authorization", "Basic abc")]).await.unwrap();
    check(r, 401, "UNAUTHENTICATED");

    // A tenant token on the ops namespace.
    check(s.rest.get("/api/hcp/ops/v1/providers", &acme).await.unwrap(), 403, "PERMISSION_DENIED");
    check(
        s.rest.post("/api/hcp/ops/v1/zones", &acme, &json!({"name": "z9"})).await.unwrap(),
        403,
        "PERMISSION_DENIED",
    );
    // A viewer cannot change anything.
    let viewer = s.token(Some("acme"), &["demo"], &["tenant.viewer"], 600);
    assert_eq!(s.rest.get(&path, &viewer).await.unwrap().status, 200);
    check(s.rest.post(&format!("{path}:stop"), &viewer, &json!({})).await.unwrap(), 403, "PERMISSION_DENIED");

    // Another tenant (even using the same project name) sees nothing.
    let evil = s.tenant_token("evil", &["demo"]);
    check(s.rest.get(&path, &evil).await.unwrap(), 404, "NOT_FOUND");
    check(s.rest.delete(&path, &evil).await.unwrap(), 404, "NOT_FOUND");
    check(s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job_id}"), &evil).await.unwrap(), 404, "NOT_FOUND");
    let listed = s.rest.get(&vms("demo"), &evil).await.unwrap();
    assert_eq!(listed.body["vms"], json!([]));
    // A project the token does not grant.
    check(s.rest.get(&vms("other"), &acme).await.unwrap(), 403, "PERMISSION_DENIED");
    // A job of another project of the same tenant is hidden too.
    let other_project = s.tenant_token("acme", &["other"]);
    check(
        s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job_id}"), &other_project).await.unwrap(),
        404,
        "NOT_FOUND",
    );
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let s = stack(StackOptions::default()).await;
    let t = s.tenant_token("acme", &["demo"]);
    let field = |r: Reply| {
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.str("code"), "INVALID_ARGUMENT", "{}", r.body);
        r.body["details"]["field"].as_str().unwrap_or_default().to_owned()
    };
    let post =
        |body: &'static str| s.rest.raw("POST", "/api/hcp/tenant/v1/projects/demo/vms", Some(&t), Some(body));
    assert_eq!(field(post(r#"{"name": "a", "#).await.unwrap()), "body");
    assert_eq!(
        field(post(r#"{"name":"a","flavor":"small","image":"debian-12","colour":"red"}"#).await.unwrap()),
        "colour"
    );
    assert_eq!(field(post(r#"{"name":"a","image":"debian-12"}"#).await.unwrap()), "flavor");
    assert_eq!(field(post(r#"{"name":"a","flavor":"huge","image":"debian-12"}"#).await.unwrap()), "flavor");
    assert_eq!(field(post(r#"{"name":"a","flavor":"small"}"#).await.unwrap()), "image");
    assert_eq!(
        field(post(r#"{"name":"-bad-","flavor":"small","image":"debian-12"}"#).await.unwrap()),
        "name"
    );
    assert_eq!(
        field(post(r#"{"name":"a","flavor":"small","image":"debian-12","zone":"mars"}"#).await.unwrap()),
        "zone"
    );
    assert_eq!(
        field(
            post(r#"{"name":"a","flavor":"small","image":"debian-12","networks":[{"network":7}]}"#)
                .await
                .unwrap()
        ),
        "networks[0].network"
    );
    assert_eq!(
        field(
            post(r#"{"name":"a","flavor":"small","image":"debian-12","metadata":{"hcp.x":"y"}}"#)
                .await
                .unwrap()
        ),
        "metadata"
    );
    let get = |p: String| {
        let s = &s;
        let t = t.clone();
        async move { s.rest.get(&p, &t).await.unwrap() }
    };
    assert_eq!(field(get(format!("{}/not-a-uuid", vms("demo"))).await), "vm_id");
    assert_eq!(field(get("/api/hcp/tenant/v1/jobs/1234".into()).await), "job_id");
    assert_eq!(field(get(format!("{}?status=SLEEPING", vms("demo"))).await), "status");
    assert_eq!(field(get(format!("{}?page_size=5000", vms("demo"))).await), "page_size");
    assert_eq!(field(get(format!("{}?page_token=zzz", vms("demo"))).await), "page_token");
    assert_eq!(field(get(format!("{}?colour=red", vms("demo"))).await), "colour");
    let r = s.rest.post(&format!("{}/{}:start", vms("demo"), "x"), &t, &json!({})).await.unwrap();
    assert_eq!(field(r), "vm_id");
    // No route: 404 in the same error shape.
    let r = s.rest.get("/api/hcp/tenant/v1/nothing", &t).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (404, "NOT_FOUND"));
    // Nothing was created by any of this.
    assert_eq!(s.rest.get(&vms("demo"), &t).await.unwrap().body["vms"], json!([]));
}

#[tokio::test]
async fn missing_capability_is_refused_before_any_job() {
    // The only provider lacks cloud-init.
    let s = stack(StackOptions { sim_capabilities: "console_vnc".into(), ..Default::default() }).await;
    let t = s.tenant_token("acme", &["demo"]);
    let body = json!({"name": "a", "flavor": "small", "image": "debian-12", "user_data": "#cloud-config\n"});
    let r = s.rest.post(&vms("demo"), &t, &body).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.str("code"), "FEATURE_NOT_SUPPORTED");
    assert_eq!(r.body["details"]["capability"], "supports_cloud_init");
    // No VM, no job, no provider call, no vm.create audit event.
    assert_eq!(s.rest.get(&vms("demo"), &t).await.unwrap().body["vms"], json!([]));
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await.unwrap());
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.calls.get("CreateVm"), None);
    let audit = s.rest.get("/api/hcp/ops/v1/audit-events?action=vm.create", &s.ops_token()).await.unwrap();
    assert_eq!(audit.body["events"], json!([]));
    // Without user_data the same request is accepted.
    let ok = s
        .rest
        .post(&vms("demo"), &t, &json!({"name": "a", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!(ok.status, 202, "{}", ok.body);
    // Console on a provider without VNC support... this one has VNC; a
    // SPICE console is not offered.
    finished_job(&s.rest, &t, &ok.str("job_id")).await;
    let c = s
        .rest
        .post(&format!("{}/{}:console", vms("demo"), ok.str("vm_id")), &t, &json!({"type": "spice"}))
        .await
        .unwrap();
    assert_eq!((c.status, c.str("code").as_str()), (409, "FEATURE_NOT_SUPPORTED"), "{}", c.body);
    assert_eq!(c.body["details"]["capability"], "supports_console_spice");
    let c =
        s.rest.post(&format!("{}/{}:console", vms("demo"), ok.str("vm_id")), &t, &json!({})).await.unwrap();
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.str("type"), "vnc");
    assert!(c.str("url").contains("token=") && !c.str("url").contains(&s.sim.to_string()), "{}", c.body);
    assert!(c.body["expires_at"].is_string());
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use hcp_proto::tenant::vm_service_client::VmServiceClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s = stack(StackOptions::default()).await;
    let list = |channel| async move {
        let mut client = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream =
            client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        match resp.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    };
    let core = list(s.core_channel().await.unwrap()).await;
    for name in hcp_proto::NORTHBOUND_SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(core.iter().any(|s| s == name), "{name} missing from {core:?}");
    }
    let provider = list(s.sim_channel().await.unwrap()).await;
    for name in [
        "hcp.provider.v1.Identity",
        "hcp.provider.v1.Compute",
        "hcp.sim.v1.SimControl",
        "grpc.health.v1.Health",
    ] {
        assert!(provider.iter().any(|s| s == name), "{name} missing from {provider:?}");
    }

    // The same API answers over gRPC directly, with the same error model.
    let mut vm = VmServiceClient::new(s.core_channel().await.unwrap());
    let mut req = tonic::Request::new(hcp_proto::tenant::GetVmRequest {
        project_id: "demo".into(),
        vm_id: "nope".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {}", s.tenant_token("acme", &["demo"])).parse().unwrap());
    let status = vm.get_vm(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let err = hcp_proto::error::ApiError::from_status(&status);
    assert_eq!(err.details.get("field").map(String::as_str), Some("vm_id"));
}

#[tokio::test]
async fn grpc_web_reaches_core_through_the_gateway() {
    use prost::Message;
    let s = stack(StackOptions::default()).await;
    let msg = hcp_proto::common::ListZonesRequest {}.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let body = String::from_utf8(frame).unwrap();
    let token = format!("Bearer {}", s.tenant_token("acme", &["demo"]));
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{}/hcp.common.v1.CatalogService/ListZones", s.gateway))
        .header("content-type", "application/grpc-web+proto")
        .header("authorization", token)
        .body(http_body_util::Full::new(bytes::Bytes::from(body.into_bytes())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes[0], 0, "first frame is data");
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let zones = hcp_proto::common::ListZonesResponse::decode(&bytes[5..5 + len]).unwrap();
    assert_eq!(zones.zones.iter().map(|z| z.name.as_str()).collect::<Vec<_>>(), vec!["zone-1"]);
    let trailers = String::from_utf8_lossy(&bytes[5 + len..]);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
}

#[tokio::test]
async fn accepted_answers_carry_exactly_vm_id_and_job_id() {
    let s = stack(StackOptions::default()).await;
    let t = s.tenant_token("acme", &["demo"]);
    let r = s
        .rest
        .post(&vms("demo"), &t, &json!({"name": "a", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["job_id", "vm_id"], "{}", r.body);
}
