//! Core trusts each provider explicitly and never sends credentials in
//! clear. A PKI made at run time (two CAs, provider certificates for the
//! right and a wrong name, core's client certificates from each CA) in a
//! directory removed afterwards:
//! - a provider requiring mutual TLS, registered with its own CA, server
//!   name and core's client certificate, gets its credentials over that
//!   channel and runs a VM from create to delete; nothing secret is shown,
//!   logged or stored in clear;
//! - a registration the provider would refuse (no client certificate, one
//!   from the other CA, a certificate for another name, an unknown CA) is
//!   refused naming the endpoint, the cause and the field to fix;
//! - plaintext TCP to a host that is not loopback is refused before any
//!   connection, naming `endpoint`; with `allow_plaintext` it is attempted,
//!   logged, audited and shown; a row stored before the rule is sent no
//!   credentials, and its health says why.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_testkit::db::Backend;
use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const WAIT: Duration = Duration::from_secs(30);
const PROVIDERS: &str = "/api/hcp/ops/v1/providers";

/// A directory of certificates and keys, removed when dropped, also when
/// the test fails (it holds private keys).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("hcp-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        Self { dir }
    }

    /// Writes `text` to `name`; returns the path as a flag value.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("writable");
        path.display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` signed by this CA: (certificate, key) PEM.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// SHA-256 fingerprint as `AA:BB:…`.
    fn fingerprint(&self) -> String {
        hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(self.issuer.der()))
    }
}

/// Starts a sim serving TLS with `cert`, requiring client certificates
/// signed by `client_ca` when given; returns its `https://` endpoint.
async fn tls_sim(
    s: &mut TestStack,
    pki: &Pki,
    name: &str,
    (cert, key): &(String, String),
    client_ca: Option<&Ca>,
    extra: &[&str],
) -> String {
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--tls-cert".to_owned(),
        pki.write(&format!("{name}.pem"), cert),
        "--tls-key".to_owned(),
        pki.write(&format!("{name}.key"), key),
    ];
    if let Some(ca) = client_ca {
        args.extend(["--tls-client-ca".to_owned(), pki.write(&format!("{name}-client-ca.pem"), &ca.pem())]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let addr = s.start_sim_args(name, &args).await.expect("the sim starts");
    format!("https://{addr}")
}

async fn register(s: &TestStack, body: Value) -> Reply {
    s.rest.post(PROVIDERS, &s.ops_token(), &body).await.expect("an answer")
}

async fn provider_names(s: &TestStack) -> Vec<String> {
    let r = s.rest.get(PROVIDERS, &s.ops_token()).await.unwrap();
    r.body["providers"]
        .as_array()
        .map(|a| a.iter().map(|p| p["name"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

/// Asserts an INVALID_ARGUMENT naming `field` whose message holds every
/// one of `words`.
fn refused(r: &Reply, field: &str, words: &[&str]) {
    assert_eq!((r.status, r.str("code").as_str()), (400, "INVALID_ARGUMENT"), "{}", r.body);
    assert_eq!(r.body["details"]["field"], field, "{}", r.body);
    let message = r.str("message");
    for w in words {
        assert!(message.contains(w), "{w:?} not in {message:?}");
    }
}

/// The middle line of a PEM: base64 of secret bytes, if it is a key.
fn body_line(pem: &str) -> String {
    pem.lines().nth(1).expect("a PEM body").to_owned()
}

fn stack_logs(s: &TestStack) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(s.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    logs
}

#[tokio::test]
async fn a_provider_over_mutual_tls_with_its_own_trust_runs_a_vm() {
    let pki = Pki::new();
    let ca = Ca::new("provider-ca");
    let core_cert = ca.leaf(&["hcp-core"]);
    let opts = StackOptions { backend: Backend::Postgres, ..Default::default() };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let ops = s.ops_token();
    let r = s.rest.post("/api/hcp/ops/v1/zones", &ops, &json!({"name": "secure"})).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    // The provider's certificate names a DNS name, not the address core
    // dials: the registration says which name to expect.
    let endpoint = tls_sim(
        &mut s,
        &pki,
        "sim-mtls",
        &ca.leaf(&["sim.provider.test"]),
        Some(&ca),
        &["--require-credentials"],
    )
    .await;
    let secret = format!("hv-token-{}", uuid::Uuid::new_v4().simple());
    let r = register(
        &s,
        json!({
            "name": "mtls", "zone": "secure", "endpoint": endpoint,
            "credentials": {"token": secret},
            "tls": {"ca_pem": ca.pem(), "client_cert_pem": core_cert.0, "client_key_pem": core_cert.1,
                    "server_name": "sim.provider.test"},
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["transport"], "PROVIDER_TRANSPORT_TLS");
    assert_eq!(
        r.body["tls"],
        json!({"ca_sha256_fingerprints": [ca.fingerprint()], "server_name": "sim.provider.test",
               "has_client_certificate": true})
    );
    assert_eq!(
        (r.body["allow_plaintext"].clone(), r.body["has_credentials"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(r.body["health"], "HEALTHY", "configured over the channel before the first probe");
    let provider_id = r.str("provider_id");

    // The provider got its credentials: asked over its own mutual TLS.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
        .identity(tonic::transport::Identity::from_pem(&core_cert.0, &core_cert.1))
        .domain_name("sim.provider.test");
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(channel);
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.credential_keys, vec!["token"]);

    // A VM placed on it runs its whole lifecycle over that channel.
    let token = s.tenant_token("acme", &["demo"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms";
    let r = s
        .rest
        .post(
            vms,
            &token,
            &json!({"name": "tls-vm", "flavor": "small", "image": "debian-12", "zone": "secure"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm_id = r.str("vm_id");
    let job = s.rest.finished_job(&token, &r.str("job_id"), WAIT).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    let vm = s.rest.get(&format!("{vms}/{vm_id}"), &token).await.unwrap();
    assert_eq!(vm.str("status"), "ACTIVE", "{}", vm.body);
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.creations.get(&vm_id), Some(&1), "created on the TLS provider");
    let r = s.rest.delete(&format!("{vms}/{vm_id}"), &token).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = s.rest.finished_job(&token, &r.str("job_id"), WAIT).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert_eq!(s.rest.get(&format!("{vms}/{vm_id}"), &token).await.unwrap().str("status"), "DELETED");
    assert_eq!(sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner().vm_count, 0);

    // The audit event says what the channel is, and nothing secret.
    let audit =
        s.rest.get(&format!("/api/hcp/ops/v1/audit-events?resource_id={provider_id}"), &ops).await.unwrap();
    let detail = audit.body["events"][0]["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains(&ca.fingerprint()) && detail.contains("sim.provider.test"), "{}", audit.body);

    // The client key and the credentials are in no answer, log line or
    // database byte.
    let key = body_line(&core_cert.1);
    let listed = s.rest.get(PROVIDERS, &ops).await.unwrap().body.to_string();
    assert!(!listed.contains(&key) && !listed.contains(&secret) && !listed.contains("PRIVATE KEY"));
    let logs = stack_logs(&s);
    assert!(!logs.contains(&key) && !logs.contains(&secret), "a log holds a secret");
    let dump = std::process::Command::new("pg_dump").arg("--dbname").arg(&s.db.url).output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("sim.provider.test"), "the dump holds the provider's trust");
    assert!(!dump.contains(&key) && !dump.contains(&secret), "a secret in clear in the database");
}

#[tokio::test]
async fn registrations_the_provider_would_refuse_name_the_endpoint_and_the_cause() {
    let pki = Pki::new();
    let (ca, other_ca) = (Ca::new("provider-ca"), Ca::new("someone-else"));
    let (core_cert, foreign_cert) = (ca.leaf(&["hcp-core"]), other_ca.leaf(&["hcp-core"]));
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let mtls = tls_sim(&mut s, &pki, "sim-mtls", &ca.leaf(&["127.0.0.1"]), Some(&ca), &[]).await;
    let misnamed = tls_sim(&mut s, &pki, "sim-misnamed", &ca.leaf(&["wrong.example"]), None, &[]).await;
    let tls =
        |endpoint: &str, tls: Value| json!({"name": "p", "zone": "zone-1", "endpoint": endpoint, "tls": tls});

    // No client certificate: the provider demands one.
    let r = register(&s, tls(&mtls, json!({"ca_pem": ca.pem()}))).await;
    refused(&r, "tls.client_cert_pem", &[&mtls, "requires a client certificate"]);

    // A client certificate from a CA the provider does not trust.
    let r = register(
        &s,
        tls(
            &mtls,
            json!({"ca_pem": ca.pem(), "client_cert_pem": foreign_cert.0, "client_key_pem": foreign_cert.1}),
        ),
    )
    .await;
    refused(&r, "tls.client_cert_pem", &[&mtls, "refused core's client certificate"]);

    // A provider certificate for another name.
    let r = register(&s, tls(&misnamed, json!({"ca_pem": ca.pem()}))).await;
    refused(&r, "tls.server_name", &[&misnamed, "not valid for 127.0.0.1 (it names wrong.example)"]);

    // A provider certificate signed by a CA core was not told to trust.
    let with_core_cert =
        json!({"ca_pem": other_ca.pem(), "client_cert_pem": core_cert.0, "client_key_pem": core_cert.1});
    let r = register(&s, tls(&mtls, with_core_cert)).await;
    refused(&r, "tls.ca_pem", &[&mtls, "not signed by a CA core trusts"]);

    // Settings that cannot be right are refused before any connection.
    let r = register(&s, tls(&mtls, json!({"ca_pem": "not a certificate"}))).await;
    refused(&r, "tls.ca_pem", &["tls.ca_pem"]);
    let r = register(&s, tls(&mtls, json!({"ca_pem": ca.pem(), "client_cert_pem": core_cert.0}))).await;
    refused(&r, "tls.client_key_pem", &["tls.client_key_pem"]);
    let r = register(&s, tls(&mtls, json!({"ca_pem": ca.pem(), "client_cert_pem": core_cert.0, "client_key_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}))).await;
    refused(&r, "tls.client_key_pem", &["tls.client_key_pem"]);
    let r = register(&s, tls(&mtls, json!({}))).await;
    refused(&r, "tls.ca_pem", &["tls.ca_pem", "providers.tls_ca_file"]);
    let r = register(&s, tls(&format!("http://{}", s.sim), json!({"ca_pem": ca.pem()}))).await;
    refused(&r, "tls", &["https://"]);

    // The same provider, registered as it needs, is accepted.
    let r = register(
        &s,
        tls(
            &mtls,
            json!({"ca_pem": ca.pem(), "client_cert_pem": core_cert.0, "client_key_pem": core_cert.1}),
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(provider_names(&s).await, vec!["p", "sim-1"], "only the good registration is stored");
}

/// The address this host would send from towards 192.0.2.10 (no packet
/// is sent to learn it), when it is not loopback.
fn own_address() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.10:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[tokio::test]
async fn plaintext_to_another_host_is_refused_before_any_connection() {
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let remote = "http://192.0.2.10:50061";
    let r = register(&s, json!({"name": "remote", "zone": "zone-1", "endpoint": remote})).await;
    refused(&r, "endpoint", &["192.0.2.10:50061", "plaintext", "https://", "unix://", "allow_plaintext"]);

    // With the override the handshake is attempted (and fails: nothing
    // answers there), and the override is logged naming the endpoint.
    let r = register(
        &s,
        json!({"name": "remote", "zone": "zone-1", "endpoint": remote, "allow_plaintext": true}),
    )
    .await;
    assert_eq!((r.status, r.str("code").as_str()), (503, "PROVIDER_UNAVAILABLE"), "{}", r.body);
    assert!(r.str("message").contains(remote), "{}", r.body);
    let log = s.log("core-api-0");
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(remote) && l.contains("allow_plaintext")),
        "no warning names the override: {log}"
    );
    // Loopback plaintext (what `hcp up` uses) still registers.
    let local = s.start_sim("sim-local", "cloud_init").await.unwrap();
    let r = register(
        &s,
        json!({"name": "local", "zone": "zone-1", "endpoint": format!("http://localhost:{}", local.port())}),
    )
    .await;
    assert_eq!(
        (r.status, r.body["transport"].clone()),
        (201, json!("PROVIDER_TRANSPORT_PLAINTEXT")),
        "{}",
        r.body
    );

    // A listener on this host's own network address sees no connection
    // from a refused registration, and a provider there registers with the
    // override, shown and audited.
    let Some(ip) = own_address() else {
        // CI's machine has one (the test bed's libvirt network at least).
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this host has no network address besides loopback, which CI must have"
        );
        eprintln!("SKIP: this host has no network address besides loopback");
        return;
    };
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let r = register(&s, json!({"name": "watched", "zone": "zone-1", "endpoint": endpoint})).await;
    refused(&r, "endpoint", &[&endpoint]);
    listener.set_nonblocking(true).unwrap();
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "core connected to a refused endpoint: {accepted:?}"
    );
    let open = s.start_sim_at("sim-open", "0.0.0.0:0", &[]).await.unwrap();
    let endpoint = format!("http://{}", SocketAddr::new(ip, open.port()));
    let r = register(
        &s,
        json!({"name": "open", "zone": "zone-1", "endpoint": endpoint, "allow_plaintext": true}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (r.body["allow_plaintext"].clone(), r.body["transport"].clone()),
        (json!(true), json!("PROVIDER_TRANSPORT_PLAINTEXT"))
    );
    let audit = s
        .rest
        .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={}", r.str("provider_id")), &s.ops_token())
        .await
        .unwrap();
    let detail = audit.body["events"][0]["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains(&endpoint) && detail.contains("allow_plaintext"), "{}", audit.body);

    // A row stored before this rule (plaintext to another host, no
    // override) is sent no credentials: the provider stays unconfigured and
    // its health says why.
    let legacy = s.start_sim_at("sim-legacy", "0.0.0.0:0", &["--require-credentials".into()]).await.unwrap();
    let endpoint = format!("http://{}", SocketAddr::new(ip, legacy.port()));
    store_legacy_row(&s, "legacy", &endpoint).await;
    let message = hcp_testkit::wait_until(WAIT, "the legacy provider to be probed", || async {
        let r = s.rest.get(PROVIDERS, &s.ops_token()).await?;
        let p =
            r.body["providers"].as_array().and_then(|a| a.iter().find(|p| p["name"] == "legacy").cloned());
        let message =
            p.map(|p| p["health_message"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
        Ok(message.contains("cannot configure").then_some(message))
    })
    .await
    .unwrap();
    assert!(
        message.contains("refusing to send credentials in clear") && message.contains(&endpoint),
        "{message}"
    );
    let log = s.log("core-api-0");
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("provider not configured") && l.contains(&endpoint))
    );
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{legacy}")).unwrap().connect().await.unwrap();
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(channel);
    let stats = sim.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.credential_keys.is_empty(), "credentials were sent in clear: {:?}", stats.credential_keys);
}

/// Writes a provider row as a core from before per-provider trust did: a
/// plaintext endpoint on another host, sealed credentials, no override.
async fn store_legacy_row(s: &TestStack, name: &str, endpoint: &str) {
    use hcp_core::model::{AuditEvent, Capabilities, Provider, now};
    let store = hcp_core::store::Store::connect(&s.db.url, 2).await.unwrap();
    let key = hcp_core::secrets::SecretBox::from_file(&s.dir().join("secrets.key")).unwrap();
    let id = hcp_proto::ids::ProviderId::new();
    let sealed = key.seal(id.0.as_bytes(), &[("token".to_owned(), "hunter2".to_owned())].into());
    let provider = Provider {
        id,
        name: name.into(),
        zone: "zone-1".into(),
        endpoint: endpoint.into(),
        plugin_name: "sim.hcp.dev".into(),
        plugin_version: "0".into(),
        hypervisor: "sim".into(),
        protocol_version: "1".into(),
        capabilities: Capabilities::default(),
        healthy: false,
        health_message: String::new(),
        last_probe_at: None,
        created_at: now(),
        has_credentials: true,
        tls: Default::default(),
        allow_plaintext: false,
    };
    let audit = AuditEvent {
        id: hcp_proto::ids::EventId::new(),
        at: now(),
        actor: "test:legacy".into(),
        tenant_id: String::new(),
        project_id: String::new(),
        action: "provider.register".into(),
        resource_type: "provider".into(),
        resource_id: id.to_string(),
        outcome: "succeeded".into(),
        job_id: String::new(),
        trace_id: String::new(),
        detail: String::new(),
    };
    store.insert_provider(&provider, Some(&sealed), &audit).await.unwrap();
}
