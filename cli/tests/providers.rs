//! Provider registration and lifecycle in core: the handshake refuses an
//! incompatible protocol version, health probes take a provider that stops
//! answering out of placement and bring it back when it recovers, and
//! changed capabilities are picked up.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

async fn providers(s: &TestStack) -> Vec<Value> {
    let r = s.rest.get("/api/hcp/ops/v1/providers", &s.ops_token()).await.unwrap();
    r.body["providers"].as_array().cloned().unwrap_or_default()
}

async fn health_of(s: &TestStack, name: &str) -> String {
    providers(s)
        .await
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| p["health"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

async fn sim_creations(addr: std::net::SocketAddr) -> usize {
    let ch =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut c = hcp_proto::sim::sim_control_client::SimControlClient::new(ch);
    c.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner().creations.len()
}

async fn create_active(s: &TestStack, token: &str, name: &str) {
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/demo/vms",
            token,
            &json!({"name": name, "flavor": "small", "image": "debian-12"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let path = format!("/api/hcp/tenant/v1/jobs/{}", r.str("job_id"));
    wait_until(Duration::from_secs(20), "create to succeed", || async {
        Ok((s.rest.get(&path, token).await?.str("status") == "SUCCEEDED").then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_incompatible_protocol_version_is_refused() {
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let future =
        s.start_sim_at("sim-v2", "127.0.0.1:0", &["--protocol-versions".into(), "2,3".into()]).await.unwrap();
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &s.ops_token(),
            &json!({"name": "future", "zone": "zone-1", "endpoint": format!("http://{future}")}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (400, "INVALID_ARGUMENT"), "{}", r.body);
    assert_eq!(r.body["details"]["field"], "endpoint");
    let msg = r.str("message");
    assert!(msg.contains("[2, 3]") && msg.contains("speaks 1"), "{msg}");
    assert_eq!(providers(&s).await.len(), 1, "nothing was registered");

    // An endpoint that does not answer is refused as unavailable.
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &s.ops_token(),
            &json!({"name": "ghost", "zone": "zone-1", "endpoint": "http://127.0.0.1:9"}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (503, "PROVIDER_UNAVAILABLE"), "{}", r.body);
}

#[tokio::test]
async fn a_provider_that_stops_answering_gets_no_placements_until_it_recovers() {
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let second = s.start_sim("sim-2", "cloud_init,console_vnc").await.unwrap();
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &s.ops_token(),
            &json!({"name": "sim-2", "zone": "zone-1", "endpoint": format!("http://{second}")}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let token = s.tenant_token("acme", &["demo"]);

    // The first provider freezes: its probes time out.
    s.signal("sim", "STOP").unwrap();
    wait_until(Duration::from_secs(15), "sim-1 to be unhealthy", || async {
        Ok((health_of(&s, "sim-1").await == "UNHEALTHY").then_some(()))
    })
    .await
    .unwrap();
    for i in 0..4 {
        create_active(&s, &token, &format!("while-down-{i}")).await;
    }
    assert_eq!(sim_creations(second).await, 4, "every create went to the healthy provider");

    // It recovers and, having the fewest VMs, gets the next one.
    s.signal("sim", "CONT").unwrap();
    wait_until(Duration::from_secs(15), "sim-1 to be healthy", || async {
        Ok((health_of(&s, "sim-1").await == "HEALTHY").then_some(()))
    })
    .await
    .unwrap();
    create_active(&s, &token, "after-recovery").await;
    assert_eq!(sim_creations(s.sim).await, 1);
    assert_eq!(sim_creations(second).await, 4);
}

#[tokio::test]
async fn changed_capabilities_are_picked_up() {
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let with_ud =
        json!({"name": "ud", "flavor": "small", "image": "debian-12", "user_data": "#cloud-config\n"});
    let r = s.rest.post("/api/hcp/tenant/v1/projects/demo/vms", &token, &with_ud).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);

    // The provider is redeployed at the same address without cloud-init.
    let addr = s.sim.to_string();
    s.kill("sim").await;
    s.start_sim_at("sim", &addr, &["--capabilities".into(), "console_vnc".into()]).await.unwrap();
    wait_until(Duration::from_secs(15), "capabilities to be refreshed", || async {
        let p = providers(&s).await;
        Ok((p[0]["capabilities"]["supports_cloud_init"] == false && p[0]["health"] == "HEALTHY")
            .then_some(()))
    })
    .await
    .unwrap();
    let r = s.rest.post("/api/hcp/tenant/v1/projects/demo/vms", &token, &with_ud).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (409, "FEATURE_NOT_SUPPORTED"), "{}", r.body);
    assert_eq!(r.body["details"]["capability"], "supports_cloud_init");
}

#[tokio::test]
async fn credentials_are_sealed_and_never_shown() {
    let opts = StackOptions {
        backend: hcp_testkit::db::Backend::Postgres,
        core_toml: "[telemetry]\nlog_filter = \"debug\"\n".into(),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let secret = format!("pve-token-{}", uuid::Uuid::new_v4().simple());
    let vault = s.start_sim("vault", "cloud_init").await.unwrap();
    // The provider is not usable until it has its credentials.
    s.kill("vault").await;
    let vault = s.start_sim_at("vault", &vault.to_string(), &["--require-credentials".into()]).await.unwrap();
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &s.ops_token(),
            &json!({"name": "vault", "zone": "zone-1", "endpoint": format!("http://{vault}"),
                    "credentials": {"token": secret, "user": "root@pam"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["has_credentials"], true);
    assert_eq!(r.body["health"], "HEALTHY", "configured before the first probe");
    let stats = |addr: std::net::SocketAddr| async move {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = hcp_proto::sim::sim_control_client::SimControlClient::new(ch);
        c.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner()
    };
    assert_eq!(stats(vault).await.credential_keys, vec!["token", "user"]);

    // A restarted provider has forgotten them; the health probe sends them again.
    s.kill("vault").await;
    s.start_sim_at("vault", &vault.to_string(), &["--require-credentials".into()]).await.unwrap();
    wait_until(Duration::from_secs(15), "credentials to be sent again", || async {
        let keys = stats(vault).await.credential_keys;
        Ok((keys == vec!["token", "user"] && health_of(&s, "vault").await == "HEALTHY").then_some(()))
    })
    .await
    .unwrap();

    // No API answer, no database byte and no log line holds the secret.
    let listed = s.rest.get("/api/hcp/ops/v1/providers", &s.ops_token()).await.unwrap();
    assert!(!listed.body.to_string().contains(&secret));
    let dump = std::process::Command::new("pg_dump").arg("--dbname").arg(&s.db.url).output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("vault"), "the dump holds the provider row");
    assert!(
        !dump.contains(&secret) && !dump.contains("root@pam"),
        "plaintext credential in the database dump"
    );
    let mut logs = String::new();
    for entry in std::fs::read_dir(s.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    assert!(logs.contains("DEBUG"), "core logged at debug level");
    assert!(!logs.contains(&secret), "a log holds the secret");
}

/// Writes a CA, a server certificate for 127.0.0.1 and a client
/// certificate into `dir`; returns the CA's path.
fn write_pki(dir: &Path) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, stem: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    };
    leaf(vec!["127.0.0.1".into(), "localhost".into()], "server");
    leaf(vec!["hcp-core".into()], "client");
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    dir.join("ca.pem")
}

#[tokio::test]
async fn providers_over_mutual_tls_and_unix_sockets() {
    let pki = hcp_testkit::TempDir::new().unwrap();
    let ca = write_pki(pki.path());
    let file = |n: &str| pki.path().join(n).display().to_string();
    let opts = StackOptions {
        providers_toml: format!(
            "tls_ca_file = \"{}\"\ntls_client_cert_file = \"{}\"\ntls_client_key_file = \"{}\"\n",
            ca.display(),
            file("client.pem"),
            file("client.key")
        ),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let ops = s.ops_token();
    let token = s.tenant_token("acme", &["demo"]);
    for zone in ["secure", "local"] {
        let r = s.rest.post("/api/hcp/ops/v1/zones", &ops, &json!({"name": zone})).await.unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // A provider that only speaks TLS and requires a client certificate.
    let tls = s
        .start_sim_args(
            "sim-tls",
            &[
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--tls-cert".into(),
                file("server.pem"),
                "--tls-key".into(),
                file("server.key"),
                "--tls-client-ca".into(),
                ca.display().to_string(),
            ],
        )
        .await
        .unwrap();
    let plain = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &ops,
            &json!({"name": "tls-plain", "zone": "secure", "endpoint": format!("http://{tls}")}),
        )
        .await
        .unwrap();
    assert_eq!(plain.status, 503, "plain HTTP/2 to a TLS port fails: {}", plain.body);
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &ops,
            &json!({"name": "tls", "zone": "secure", "endpoint": format!("https://{tls}")}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);

    // A provider on a unix socket.
    let socket = s.dir().join("sim.sock");
    let announced =
        s.start_sim_args("sim-unix", &["--unix-socket".into(), socket.display().to_string()]).await.unwrap();
    assert_eq!(announced, socket.display().to_string());
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/providers",
            &ops,
            &json!({"name": "unix", "zone": "local", "endpoint": format!("unix://{}", socket.display())}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);

    // VMs placed on each run their whole job through that transport.
    for zone in ["secure", "local"] {
        let r = s
            .rest
            .post(
                "/api/hcp/tenant/v1/projects/demo/vms",
                &token,
                &json!({"name": zone, "flavor": "small", "image": "debian-12", "zone": zone}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        let path = format!("/api/hcp/tenant/v1/jobs/{}", r.str("job_id"));
        wait_until(Duration::from_secs(20), "create over the transport", || async {
            Ok((s.rest.get(&path, &token).await?.str("status") == "SUCCEEDED").then_some(()))
        })
        .await
        .unwrap();
    }
    wait_until(Duration::from_secs(10), "both providers healthy after probes", || async {
        let p = providers(&s).await;
        let healthy = |n: &str| p.iter().any(|x| x["name"] == n && x["health"] == "HEALTHY");
        Ok((healthy("tls") && healthy("unix")).then_some(()))
    })
    .await
    .unwrap();
}
