//! The Proxmox provider against the Proxmox VE simulator (built from the
//! official 9.1.3 schema): the conformance kit, and the failures a real
//! cluster produces — vmid collisions under parallel creates, config lock
//! timeouts, tasks ending in error or with warnings, expired tickets, bad
//! tokens, node-proxy errors, guests ignoring ACPI, a wrong certificate.
//! Every test ends by checking that every request the provider sent was
//! valid against the schema.

use std::sync::Arc;

use hcp_provider_proxmox::Proxmox;
use hcp_provider_proxmox::config::Config;
use hcp_provider_sdk::{ErrorKind, Provider, pb};
use hcp_proxmox_sim::{Faults, Running, SimConfig};

const TOKEN_ID: &str = "hcp@pve!provider";
const TOKEN_SECRET: &str = "0b1d4c4e-7d9a-4a39-9c55-5d4f3c0e2a11";

struct Env {
    sim: Running,
    snippets: std::path::PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.snippets);
    }
}

/// The test's simulator, or None (the test is skipped, saying why) when
/// the PVE schema is not beside the repository.
async fn env() -> Option<Env> {
    env_with(|_| {}).await
}

/// [`env`] with a simulator configured by `adjust`.
async fn env_with(adjust: impl FnOnce(&mut SimConfig)) -> Option<Env> {
    if !hcp_proxmox_sim::schema::present_or_skip("proxmox provider test") {
        return None;
    }
    let snippets = std::env::temp_dir().join(format!("hcp-pve-snippets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&snippets).unwrap();
    let mut config = SimConfig { snippets_dir: Some(snippets.clone()), ..Default::default() };
    adjust(&mut config);
    let sim = hcp_proxmox_sim::start(config)
        .await
        .expect("the simulator starts (is ../shared/reference/proxmox beside the repository?)");
    Some(Env { sim, snippets })
}

/// The provider's TOML for this simulator; `auth` is a `[auth]` table.
fn toml(env: &Env, auth: &str, extra_timing: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\napi_url = \"{url}\"\nnode = \"pve1\"\nbridge = \"vmbr0\"\n\
         image_storage = \"local\"\n\
         [networks]\ndefault = \"vmbr1\"\n\
         [templates]\n\"debian-12\" = 9000\n\
         [tls]\nfingerprint = \"{fp}\"\n\
         [cloud_init]\nuser = \"debian\"\nssh_keys = [\"ssh-ed25519 AAAAC3Nza+/x= ops@example\"]\n\
         snippets_storage = \"local\"\nsnippets_dir = \"{dir}\"\n\
         [volumes]\nstorage = \"local-lvm\"\n\
         [timing]\ntask_poll_ms = 10\nretry_base_ms = 10\n{extra_timing}\n{auth}\n",
        url = env.sim.url(),
        fp = env.sim.fingerprint,
        dir = env.snippets.display(),
    )
}

fn token_auth() -> String {
    format!("[auth]\ntoken_id = \"{TOKEN_ID}\"\ntoken_secret = \"{TOKEN_SECRET}\"\n")
}

async fn provider(env: &Env, auth: &str, extra_timing: &str) -> Arc<Proxmox> {
    let config = Config::from_toml(&toml(env, auth, extra_timing)).expect("valid config");
    Arc::new(Proxmox::new(config).await.expect("provider builds"))
}

fn spec(name: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.to_owned(),
        vcpus: 2,
        memory_mib: 1024,
        disk_gib: 10,
        image: Some(pb::ImageRef { name: "debian-12".into(), source: "debian-12".into() }),
        networks: vec![pb::NetworkAttachment { network: "default".into(), backing: String::new() }],
        user_data: Some("#cloud-config\nhostname: web\n".into()),
        hostname: name.to_owned(),
        labels: Default::default(),
        host: String::new(),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK alice@example".into()],
        ..Default::default()
    }
}

fn create(vm_id: &str, name: &str, start: bool) -> pb::CreateVmRequest {
    pb::CreateVmRequest { vm_id: vm_id.to_owned(), spec: Some(spec(name)), start }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Fails on any request the provider sent that the schema refuses; returns
/// how many requests were checked.
fn assert_schema_clean(env: &Env) -> usize {
    let violations = env.sim.sim.violations();
    assert!(violations.is_empty(), "requests that break the PVE 9.1.3 schema: {violations:#?}");
    let checked = env.sim.sim.requests().iter().filter(|r| r.template.is_some()).count();
    println!("{checked} requests validated against the PVE 9.1.3 schema, 0 violations");
    checked
}

/// The kit's look at the simulated cluster, and its way to make a create
/// fail after the clone (the token may not set cloud-init options).
struct PveHooks(hcp_proxmox_sim::Sim);

impl hcp_provider_conformance::Hooks for PveHooks {
    fn hypervisor_vm_ids(&self) -> Option<hcp_provider_conformance::HookFuture<'_, Vec<String>>> {
        // Every VM but the templates, by the id in its tag or description:
        // a clone HCP lost track of still shows here.
        let ids = self
            .0
            .vms()
            .into_iter()
            .filter(|v| !v.template)
            .map(|v| {
                let text = format!(
                    "{} {}",
                    v.config.get("tags").cloned().unwrap_or_default(),
                    v.config.get("description").cloned().unwrap_or_default()
                );
                text.split([';', ' ', '\n', '='])
                    .filter_map(|t| t.strip_prefix("hcp-").or(Some(t)))
                    .find(|t| uuid::Uuid::parse_str(t).is_ok())
                    .unwrap_or("untraceable")
                    .to_owned()
            })
            .collect();
        Some(Box::pin(async move { Ok(ids) }))
    }

    fn fail_next_create_after_first_effect(&self) -> Option<hcp_provider_conformance::HookFuture<'_, ()>> {
        self.0.set_faults(Faults { cloudinit_denied: true, ..Default::default() });
        Some(Box::pin(async { Ok(()) }))
    }

    fn clear_faults(&self) -> hcp_provider_conformance::HookFuture<'_, ()> {
        self.0.set_faults(Faults::default());
        Box::pin(async { Ok(()) })
    }
}

/// VMs that are not templates.
fn guests(env: &Env) -> Vec<hcp_proxmox_sim::Vm> {
    env.sim.sim.vms().into_iter().filter(|v| !v.template).collect()
}

#[tokio::test]
async fn the_provider_passes_the_conformance_kit() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let served = Proxmox::new(Config::from_toml(&toml(&env, &token_auth(), "")).unwrap()).await.unwrap();
    tokio::spawn(hcp_provider_sdk::serve(
        served,
        hcp_provider_sdk::ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    let endpoint = format!("http://{}", rx.await.unwrap());
    let mut options = hcp_provider_conformance::Options::new(&endpoint);
    options.image_source = "debian-12-genericcloud".into();
    options.network = "default".into();
    options.hooks = Some(Arc::new(PveHooks(env.sim.sim.clone())));
    let report = hcp_provider_conformance::run(options).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(
        report
            .checks
            .iter()
            .any(|(n, o)| n.starts_with("snapshots:") && *o == hcp_provider_conformance::Outcome::Pass)
    );
    assert!(
        report
            .checks
            .iter()
            .any(|(n, o)| n == "cloud-init user data" && *o == hcp_provider_conformance::Outcome::Pass)
    );
    // The day-2 checks ran and passed; what Proxmox does not offer here is
    // skipped, visibly.
    for check in ["reboot: soft and hard", "stop: graceful", "stop: forced", "resize: stopped", "interfaces:"]
    {
        assert!(
            report
                .checks
                .iter()
                .any(|(n, o)| n.starts_with(check) && *o == hcp_provider_conformance::Outcome::Pass),
            "{check}"
        );
    }
    let skipped: Vec<&str> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, hcp_provider_conformance::Outcome::Skip(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    // One node: its host is checked, moves need a second.
    assert_eq!(
        skipped,
        [
            "spice console",
            "rdp console",
            // PVE has no API for what a guest wrote on its serial port.
            "console log",
            "hot resize",
            "create on a named host",
            "live migration: running VM to another host, repeated",
            "cold migration: stopped VM to another host, repeated",
        ]
    );
    // The kit cleaned up: only the template is left.
    assert!(guests(&env).is_empty(), "{:#?}", guests(&env));
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_cloud_init && caps.supports_snapshot && caps.supports_console_vnc);
    assert!(!caps.supports_live_migration, "one node and no shared storage");
    assert_eq!(caps.attributes["pve_version"], "9.1.3");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_vm_is_a_configured_full_clone_marked_with_its_hcp_id() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    let vm = p.create_vm(create(&id, "web-1", true)).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Running as i32);
    assert_eq!((vm.vcpus, vm.memory_mib), (2, 1024), "numbers sent as strings are read");
    let g = guests(&env);
    assert_eq!(g.len(), 1);
    let c = &g[0].config;
    assert_eq!(vm.native_id, format!("pve1/{}", g[0].vmid));
    assert_eq!(c["name"], "web-1");
    assert_eq!(c["cores"], "2");
    assert_eq!(c["memory"], "1024");
    // PVE gave the NIC a MAC of its own.
    assert!(c["net0"].starts_with("virtio=BC:24:11:") && c["net0"].ends_with(",bridge=vmbr1"), "{c:?}");
    assert_eq!(c["ipconfig0"], "ip=dhcp");
    assert_eq!(c["ciuser"], "debian");
    // The operator's key from the provider's config, then the tenant's,
    // newline-joined and URL-encoded the PVE way (the simulator checks it
    // against the schema's `urlencoded` format).
    assert_eq!(
        c["sshkeys"],
        "ssh-ed25519%20AAAAC3Nza%2B%2Fx%3D%20ops%40example%0A\
         ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIK%20alice%40example"
    );
    assert_eq!(c["tags"], format!("hcp;hcp-{id}"));
    assert!(c["description"].contains(&format!("hcp-vm-id={id}")));
    assert_eq!(c["cicustom"], format!("user=local:snippets/hcp-{id}-user.yaml"));
    let snippet = std::fs::read_to_string(env.snippets.join(format!("hcp-{id}-user.yaml"))).unwrap();
    assert_eq!(snippet, "#cloud-config\nhostname: web\n");
    // A repeated create returns the same VM.
    let again = p.create_vm(create(&id, "web-1", true)).await.unwrap();
    assert_eq!(again.native_id, vm.native_id);
    assert_eq!(guests(&env).len(), 1);
    // Console: a vncwebsocket on the API port with a fresh ticket, the
    // provider's token and its trust in the API's certificate.
    let console =
        p.get_console(pb::GetConsoleRequest { vm_id: id.clone(), protocol: "vnc".into() }).await.unwrap();
    assert_eq!((console.port, console.tls), (u32::from(env.sim.addr.port()), true));
    assert_eq!(console.transport(), pb::ConsoleTransport::Websocket);
    assert!(
        console.path.starts_with(&format!("/api2/json/nodes/pve1/qemu/{}/vncwebsocket?port=59", g[0].vmid))
            && console.path.contains("&vncticket=PVEVNC"),
        "{console:?}"
    );
    assert_eq!(console.websocket_subprotocol, "binary");
    assert_eq!(console.tls_fingerprint_sha256, env.sim.fingerprint);
    assert!(console.tls_ca_pem.is_empty());
    let headers: Vec<(&str, &str)> =
        console.headers.iter().map(|h| (h.name.as_str(), h.value.as_str())).collect();
    assert_eq!(headers, [("authorization", format!("PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}").as_str())]);
    assert!(!console.password.is_empty());
    assert!(p.delete_vm(&id).await.unwrap());
    assert!(guests(&env).is_empty());
    assert!(!env.snippets.join(format!("hcp-{id}-user.yaml")).exists(), "the snippet is removed too");
    assert_schema_clean(&env);
}

/// Opens `endpoint` as the gateway's console proxy does; returns the
/// ServerInit's desktop name.
async fn open_console(endpoint: &pb::ConsoleEndpoint) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut up = hcp_gateway::console::upstream::connect(endpoint).await.map_err(|e| e.to_string())?;
    hcp_gateway::console::rfb::connect_server(&mut up, &endpoint.password)
        .await
        .map_err(|e| e.to_string())?;
    up.write_all(&[1]).await.map_err(|e| e.to_string())?; // ClientInit
    let mut head = [0u8; 24];
    up.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let mut name = vec![0u8; u32::from_be_bytes([head[20], head[21], head[22], head[23]]) as usize];
    up.read_exact(&mut name).await.map_err(|e| e.to_string())?;
    // The whole screen, raw, in the server's format (32 bits per pixel).
    let (w, h) = (u16::from_be_bytes([head[0], head[1]]), u16::from_be_bytes([head[2], head[3]]));
    let mut request = vec![3, 0, 0, 0, 0, 0];
    request.extend_from_slice(&head[..4]);
    up.write_all(&request).await.map_err(|e| e.to_string())?;
    let mut update = [0u8; 16];
    up.read_exact(&mut update).await.map_err(|e| e.to_string())?;
    assert_eq!(update[..4], [0, 0, 0, 1], "one rectangle");
    assert_eq!(update[8..16], [head[0], head[1], head[2], head[3], 0, 0, 0, 0], "the whole screen, raw");
    let mut pixels = vec![0u8; usize::from(w) * usize::from(h) * 4];
    up.read_exact(&mut pixels).await.map_err(|e| e.to_string())?;
    assert!(pixels.iter().any(|b| *b != 0), "something is on the screen");
    Ok(String::from_utf8_lossy(&name).into_owned())
}

#[tokio::test]
async fn the_console_endpoint_opens_the_vms_screen_with_a_token_or_a_ticket() {
    let Some(env) = env().await else { return };
    let ca = env.snippets.join("pve.pem");
    std::fs::write(&ca, &env.sim.cert_pem).unwrap();
    let tickets = "[auth]\nusername = \"hcp@pve\"\npassword = \"s3cret\"\n";
    for (auth, trust_by_ca) in [(token_auth(), false), (tickets.to_owned(), true)] {
        let mut text = toml(&env, &auth, "");
        if trust_by_ca {
            let pin = format!("fingerprint = \"{}\"", env.sim.fingerprint);
            text = text.replace(&pin, &format!("ca_file = \"{}\"", ca.display()));
        }
        let p = Proxmox::new(Config::from_toml(&text).unwrap()).await.unwrap();
        let id = new_id();
        p.create_vm(create(&id, "screen", true)).await.unwrap();
        let vmid = guests(&env).iter().find(|g| g.config["tags"].contains(&id)).unwrap().vmid;
        let console =
            p.get_console(pb::GetConsoleRequest { vm_id: id.clone(), protocol: "vnc".into() }).await.unwrap();
        if trust_by_ca {
            assert_eq!(
                (console.tls_ca_pem.as_str(), console.tls_fingerprint_sha256.as_str()),
                (env.sim.cert_pem.as_str(), "")
            );
            assert_eq!(console.headers.len(), 1, "a cookie, and no CSRF token for a GET");
            assert_eq!(console.headers[0].name, "cookie");
            assert!(console.headers[0].value.starts_with("PVEAuthCookie=PVE"), "the provider's own ticket");
        }
        // The proxy's way in: websocket, VNC authentication, the VM's screen.
        assert_eq!(open_console(&console).await.unwrap(), hcp_proxmox_sim::vnc::server_name(vmid));
        // The listener took its one connection.
        let again = open_console(&console).await.unwrap_err();
        assert!(again.contains("HTTP 500"), "{again}");
        // A ticket vncproxy never issued is refused.
        let fresh =
            p.get_console(pb::GetConsoleRequest { vm_id: id.clone(), protocol: "vnc".into() }).await.unwrap();
        let forged = pb::ConsoleEndpoint {
            path: fresh.path.replace("vncticket=PVEVNC", "vncticket=PVEVNX"),
            ..fresh.clone()
        };
        let refused = open_console(&forged).await.unwrap_err();
        assert!(refused.contains("HTTP 401"), "{refused}");
        // So is a VNC password that is not the one issued.
        let wrong = pb::ConsoleEndpoint { password: "not-it".into(), ..fresh };
        let refused = open_console(&wrong).await.unwrap_err();
        assert!(refused.contains("Authentication failed"), "{refused}");
        assert!(p.delete_vm(&id).await.unwrap());
    }
    let upgrades = env.sim.sim.requests().iter().filter(|r| r.path.ends_with("/vncwebsocket")).count();
    assert_eq!(upgrades, 8, "each attempt reached the simulator");
    assert_schema_clean(&env);
}

/// Reads from `conn` until `want` has been seen (or 10 s pass); returns
/// everything read.
async fn read_until<R: tokio::io::AsyncRead + Unpin>(conn: &mut R, want: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains(want) {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => seen.extend_from_slice(&buf[..n]),
            other => panic!("{want:?} never came ({other:?}); got {:?}", String::from_utf8_lossy(&seen)),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn the_serial_console_is_termproxy_through_the_relay() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    assert!(p.capabilities().await.unwrap().supports_console_serial);
    let id = new_id();
    p.create_vm(create(&id, "serial-1", true)).await.unwrap();
    let vmid = guests(&env)[0].vmid;
    assert_eq!(guests(&env)[0].config["serial0"], "socket", "every VM gets a serial port");
    assert!(!guests(&env)[0].config.contains_key("vga"), "and keeps its VGA display for VNC");

    // The endpoint: the relay, with a single-use ticket.
    let serial = || pb::GetConsoleRequest { vm_id: id.clone(), protocol: "serial".into() };
    let e = p.get_console(serial()).await.unwrap();
    assert_eq!(
        (e.protocol.as_str(), e.host.as_str(), e.transport()),
        ("serial", "127.0.0.1", pb::ConsoleTransport::Tcp)
    );
    // Core's console proxy: the ticket line, then the raw serial line.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", e.port as u16)).await.unwrap();
    conn.write_all(format!("{}\n", e.password).as_bytes()).await.unwrap();
    let hello = read_until(&mut conn, "root@serial-1:~# ").await;
    assert!(hello.starts_with("starting serial terminal on interface serial0\r\n"), "{hello:?}");
    conn.write_all(b"hostname\r").await.unwrap();
    read_until(&mut conn, "hostname\r\nserial-1\r\n").await;
    // Bytes that look like termproxy's framing are data like any other.
    conn.write_all(b"echo 0:1:x 2 1:80:24:\r").await.unwrap();
    read_until(&mut conn, "\r\n0:1:x 2 1:80:24:\r\n").await;
    drop(conn);
    let requests = env.sim.sim.requests();
    let termproxy: Vec<_> = requests.iter().filter(|r| r.path.ends_with("/termproxy")).collect();
    assert_eq!(termproxy.len(), 1);
    assert_eq!(termproxy[0].params.get("serial").map(String::as_str), Some("serial0"));
    assert_eq!(termproxy[0].status, 200);
    assert!(requests.iter().any(|r| r.path.ends_with("/vncwebsocket") && r.status == 101));

    // The ticket was good once.
    let mut again = tokio::net::TcpStream::connect(("127.0.0.1", e.port as u16)).await.unwrap();
    again.write_all(format!("{}\nhostname\r", e.password).as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), again.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");

    // A VM whose serial port an operator removed: a clear refusal, not a
    // session that prints qm's error.
    env.sim.sim.edit_config(vmid, "serial0", None);
    let err = p.get_console(serial()).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidState, "{err:?}");
    assert!(err.message.contains("no serial port"), "{err:?}");
    env.sim.sim.edit_config(vmid, "serial0", Some("socket"));
    // A stopped VM has no console.
    p.stop_vm(pb::StopVmRequest { vm_id: id.clone(), force: true, ..Default::default() }).await.unwrap();
    let err = p.get_console(serial()).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidState, "{err:?}");
    p.start_vm(&id).await.unwrap();

    // With ticket authentication: the session cookie opens the websocket,
    // and the ticket line names the user.
    let tickets = provider(&env, "[auth]\nusername = \"hcp@pve\"\npassword = \"s3cret\"\n", "").await;
    let e = tickets.get_console(serial()).await.unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", e.port as u16)).await.unwrap();
    conn.write_all(format!("{}\nhostname\r", e.password).as_bytes()).await.unwrap();
    read_until(&mut conn, "\r\nserial-1\r\n").await;
    drop(conn);
    assert!(p.delete_vm(&id).await.unwrap());
    assert_schema_clean(&env);
}

/// PVE's termproxy as the simulator serves it, spoken to directly: the
/// ticket line and OK, and `qm terminal`'s refusals arriving in the session
/// (PVE refuses nothing at `termproxy` itself).
#[tokio::test]
async fn termproxy_sessions_follow_pves_protocol() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    p.create_vm(create(&id, "term-1", true)).await.unwrap();
    let vm = format!("/nodes/pve1/qemu/{}", guests(&env)[0].vmid);
    let pve = p.client();
    let method = hcp_provider_proxmox::client::Method::Post;
    // Opens a session on `serial`, sends `first`, returns all it got.
    let session = |serial: &'static str, first: Option<String>| {
        let vm = vm.clone();
        async move {
            let data = pve
                .call(method, &format!("{vm}/termproxy"), vec![("serial", serial.to_owned())])
                .await
                .unwrap();
            let (port, ticket, user) =
                (&data["port"], data["ticket"].as_str().unwrap(), data["user"].as_str().unwrap());
            assert_eq!(user, TOKEN_ID);
            assert!(ticket.starts_with("PVEVNC:") && data["upid"].as_str().unwrap().contains(":vncproxy:"));
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("port", port.to_string().trim_matches('"'))
                .append_pair("vncticket", ticket)
                .finish();
            let mut ws = pve.websocket(&format!("{vm}/vncwebsocket?{query}")).await.unwrap();
            let line = first.unwrap_or_else(|| format!("{user}:{ticket}\n"));
            ws.send(Message::Binary(line.into_bytes().into())).await.unwrap();
            let mut got = Vec::new();
            while let Ok(Some(Ok(msg))) =
                tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await
            {
                match msg {
                    Message::Binary(b) => got.extend_from_slice(&b),
                    Message::Close(_) => break,
                    _ => {}
                }
                if String::from_utf8_lossy(&got).contains("root@term-1:~# ") {
                    // Data and a ping, then hang up.
                    ws.send(Message::Binary(b"20:9:hostname\r2".to_vec().into())).await.unwrap();
                }
                if String::from_utf8_lossy(&got).contains("\r\nterm-1\r\n") {
                    break;
                }
            }
            String::from_utf8_lossy(&got).into_owned()
        }
    };
    let ok = session("serial0", None).await;
    assert!(ok.starts_with("OKstarting serial terminal on interface serial0\r\n"), "{ok:?}");
    assert!(ok.contains("hostname\r\nterm-1\r\n"), "{ok:?}");
    assert_eq!(session("serial1", None).await, "OKserial interface 'serial1' is not configured\r\n");
    assert_eq!(session("serial0", Some("root@pam:PVEVNC:forged\n".into())).await, "", "a wrong ticket line");
    p.stop_vm(pb::StopVmRequest { vm_id: id.clone(), force: true, ..Default::default() }).await.unwrap();
    let stopped = session("serial0", None).await;
    assert_eq!(stopped, format!("OKVM {} not running\r\n", guests(&env)[0].vmid));
    // The schema holds termproxy to serial0..serial3.
    let bad =
        pve.call(method, &format!("{vm}/termproxy"), vec![("serial", "serial4".into())]).await.unwrap_err();
    assert!(
        matches!(&bad, hcp_provider_proxmox::client::PveError::Status { status: 400, errors, .. } if errors.contains_key("serial")),
        "{bad:?}"
    );
    let violations = env.sim.sim.violations();
    assert_eq!(violations.len(), 1, "only the call made to be refused: {violations:#?}");
    assert!(p.delete_vm(&id).await.unwrap());
}

#[tokio::test]
async fn parallel_creates_with_colliding_vmids_all_succeed_once() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    // nextid reserves nothing, so parallel creates collide on their own;
    // three more collisions come from "someone else" taking the id.
    env.sim.sim.set_faults(Faults { collisions: 3, ..Default::default() });
    let ids: Vec<String> = (0..6).map(|_| new_id()).collect();
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let p = p.clone();
            let req = create(id, &format!("par-{i}"), false);
            tokio::spawn(async move { p.create_vm(req).await })
        })
        .collect();
    let mut natives = std::collections::BTreeSet::new();
    for t in tasks {
        let vm = t.await.unwrap().expect("every create succeeds");
        natives.insert(vm.native_id);
    }
    assert_eq!(natives.len(), 6, "six distinct vmids");
    let ours: Vec<_> = guests(&env)
        .into_iter()
        .filter(|v| v.config.get("name").map(String::as_str) != Some("someone-else"))
        .collect();
    assert_eq!(ours.len(), 6, "no duplicate VM");
    for id in &ids {
        let n = ours.iter().filter(|v| v.config.get("tags").is_some_and(|t| t.contains(id.as_str()))).count();
        assert_eq!(n, 1, "vm {id} exists exactly once");
    }
    let collisions =
        env.sim.sim.requests().iter().filter(|r| r.status == 500 && r.path.ends_with("/clone")).count();
    assert!(collisions >= 3, "the provider met collisions ({collisions}) and retried");
    assert_eq!(env.sim.sim.faults().collisions, 0);
    assert_schema_clean(&env);
}

#[tokio::test]
async fn lock_timeouts_and_proxy_errors_are_retried() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    p.create_vm(create(&id, "locky", false)).await.unwrap();
    env.sim.sim.set_faults(Faults {
        lock_timeouts: 2,
        task_lock_timeouts: 1,
        proxy_errors: 2,
        ..Default::default()
    });
    let vm = p.start_vm(&id).await.expect("start succeeds after the retries");
    assert_eq!(vm.power_state, pb::PowerState::Running as i32);
    let reqs = env.sim.sim.requests();
    let locks = reqs.iter().filter(|r| r.status == 500 && r.path.ends_with("/status/start")).count();
    assert_eq!(locks, 2, "two refused starts");
    assert_eq!(reqs.iter().filter(|r| r.status == 595).count(), 2);
    assert_eq!(env.sim.sim.faults(), Faults::default(), "every injected fault was met");
    assert_eq!(guests(&env)[0].starts, 1, "started once despite the retries");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_task_ending_in_error_fails_with_the_proxmox_message_and_warnings_succeed() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let msg = "storage 'local-lvm' does not have enough free space";
    env.sim.sim.set_faults(Faults {
        task_exits: [("qmclone".to_owned(), msg.to_owned())].into(),
        ..Default::default()
    });
    let err = p.create_vm(create(&new_id(), "doomed", false)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Internal);
    assert_eq!(err.retryable, Some(false));
    assert!(err.message.contains(msg), "{}", err.message);
    assert!(guests(&env).is_empty(), "the failed clone left nothing");

    let id = new_id();
    p.create_vm(create(&id, "warned", false)).await.unwrap();
    env.sim.sim.set_faults(Faults {
        task_exits: [("qmstart".to_owned(), "WARNINGS: 2".to_owned())].into(),
        ..Default::default()
    });
    let vm = p.start_vm(&id).await.expect("WARNINGS is a success");
    assert_eq!(vm.power_state, pb::PowerState::Running as i32);
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_bad_token_is_a_credential_error_without_retries() {
    let Some(env) = env().await else { return };
    let p =
        provider(&env, &format!("[auth]\ntoken_id = \"{TOKEN_ID}\"\ntoken_secret = \"wrong\"\n"), "").await;
    let err = p.create_vm(create(&new_id(), "nope", false)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::PermissionDenied, "{}", err.message);
    assert_eq!(err.retryable, Some(false));
    assert!(err.message.contains("refused the credentials"), "{}", err.message);
    assert_eq!(env.sim.sim.requests().len(), 1, "one request, no retry storm");
    assert_eq!(p.client().requests_sent.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(!p.probe().await.unwrap().0, "not ready with refused credentials");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn tickets_are_renewed_and_an_expired_ticket_is_replaced() {
    let Some(env) = env().await else { return };
    let auth = "[auth]\nusername = \"hcp@pve\"\npassword = \"s3cret\"\n";
    let p = provider(&env, auth, "").await;
    let id = new_id();
    p.create_vm(create(&id, "ticketed", true)).await.unwrap();
    let logins = |env: &Env| env.sim.sim.requests().iter().filter(|r| r.path == "/access/ticket").count();
    assert_eq!(logins(&env), 1, "one ticket serves many calls");
    // The server forgets every ticket: the next call logs in again.
    env.sim.sim.set_faults(Faults { expire_tickets: true, ..Default::default() });
    p.stop_vm(pb::StopVmRequest { vm_id: id.clone(), force: true, timeout_seconds: 0 }).await.unwrap();
    assert_eq!(logins(&env), 2);
    // Renewal before expiry sends the ticket itself as the password.
    let renewing = provider(&env, auth, "ticket_renew_seconds = 0").await;
    renewing.get_vm(&id).await.unwrap();
    renewing.get_vm(&id).await.unwrap();
    let renewals = env
        .sim
        .sim
        .requests()
        .iter()
        .filter(|r| {
            r.path == "/access/ticket" && r.params.get("password").is_some_and(|p| p.starts_with("PVE:"))
        })
        .count();
    assert!(renewals >= 1, "tickets were renewed with the ticket as password");
    // A wrong password: one login attempt, a clear error.
    let before = env.sim.sim.requests().len();
    let bad = provider(&env, "[auth]\nusername = \"hcp@pve\"\npassword = \"nope\"\n", "").await;
    let err = bad.get_vm(&id).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::PermissionDenied);
    assert_eq!(env.sim.sim.requests().len() - before, 1, "no retry storm");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn shutdown_falls_back_to_a_hard_stop_and_delete_stops_first() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    p.create_vm(create(&id, "stubborn", true)).await.unwrap();
    env.sim.sim.set_faults(Faults { acpi_ignored: true, ..Default::default() });
    let vm =
        p.stop_vm(pb::StopVmRequest { vm_id: id.clone(), force: false, timeout_seconds: 5 }).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Shutoff as i32);
    let g = &guests(&env)[0];
    assert_eq!((g.shutdowns, g.stops), (0, 1), "the ACPI request failed, the hard stop worked");
    p.start_vm(&id).await.unwrap();
    assert!(p.delete_vm(&id).await.unwrap(), "a running VM is stopped, then purged");
    assert!(guests(&env).is_empty());
    assert_schema_clean(&env);
}

/// A forced stop is `status/stop` at once, never a shutdown; a graceful
/// one is `status/shutdown` with the request's timeout, or the configured
/// default for 0.
#[tokio::test]
async fn stops_honour_force_and_the_requested_timeout() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "shutdown_timeout_seconds = 45\n").await;
    let id = new_id();
    p.create_vm(create(&id, "stops", true)).await.unwrap();
    let vmid = guests(&env)[0].vmid;
    let sent = |action: &str| {
        let path = format!("/nodes/pve1/qemu/{vmid}/status/{action}");
        env.sim
            .sim
            .requests()
            .into_iter()
            .filter(|r| r.path == path && r.method == "POST")
            .collect::<Vec<_>>()
    };

    let stop = |force, timeout_seconds| pb::StopVmRequest { vm_id: id.clone(), force, timeout_seconds };
    let vm = p.stop_vm(stop(true, 600)).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Shutoff as i32);
    assert!(sent("shutdown").is_empty(), "a forced stop asked the guest");
    assert_eq!(sent("stop").len(), 1);
    assert_eq!((guests(&env)[0].shutdowns, guests(&env)[0].stops), (0, 1));

    for (timeout_seconds, want) in [(7, "7"), (0, "45")] {
        p.start_vm(&id).await.unwrap();
        let vm = p.stop_vm(stop(false, timeout_seconds)).await.unwrap();
        assert_eq!(vm.power_state, pb::PowerState::Shutoff as i32);
        let shutdown = sent("shutdown").pop().expect("a graceful stop asks the guest");
        assert_eq!(shutdown.params.get("timeout").map(String::as_str), Some(want), "{shutdown:?}");
        assert!(!shutdown.params.contains_key("forceStop"), "{shutdown:?}");
    }
    assert_eq!((guests(&env)[0].shutdowns, guests(&env)[0].stops), (2, 1));
    // Stopping a stopped VM asks nothing of PVE.
    p.stop_vm(stop(false, 0)).await.unwrap();
    p.stop_vm(stop(true, 0)).await.unwrap();
    assert_eq!((sent("shutdown").len(), sent("stop").len()), (2, 1));
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_retried_create_adopts_a_clone_whose_configuration_failed() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    env.sim.sim.set_faults(Faults { config_failures: 1, ..Default::default() });
    let err = p.create_vm(create(&id, "half", false)).await.unwrap_err();
    assert!(err.message.contains("unable to write the config"), "{}", err.message);
    assert_eq!(guests(&env).len(), 1, "the clone exists, untagged");
    assert_eq!(p.get_vm(&id).await.unwrap_err().kind, ErrorKind::NotFound);
    let vm = p.create_vm(create(&id, "half", false)).await.unwrap();
    let g = guests(&env);
    assert_eq!(g.len(), 1, "the retry adopted the clone instead of making another");
    assert_eq!(vm.native_id, format!("pve1/{}", g[0].vmid));
    assert_eq!(g[0].config["tags"], format!("hcp;hcp-{id}"));
    assert_eq!(p.list_vms(pb::ListVmsRequest::default()).await.unwrap().vms.len(), 1);
    assert_schema_clean(&env);
}

#[tokio::test]
async fn delete_finds_a_clone_whose_tags_were_never_written() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    // Another VM on the cluster that HCP does not own: delete reads its
    // config, and must leave it alone.
    let other = p.create_vm(create(&new_id(), "neighbour", false)).await.unwrap();
    let id = new_id();
    // The first config update after the clone is the tags write: it fails,
    // so the clone carries only its description.
    env.sim.sim.set_faults(Faults { config_failures: 1, ..Default::default() });
    let err = p.create_vm(create(&id, "orphan", false)).await.unwrap_err();
    assert!(err.message.contains("unable to write the config"), "{}", err.message);
    let orphan: Vec<_> = guests(&env)
        .into_iter()
        .filter(|v| v.config.get("description").is_some_and(|d| d.contains(&id)))
        .collect();
    assert_eq!(orphan.len(), 1, "the clone exists: {:?}", guests(&env));
    assert!(!orphan[0].config.get("tags").is_some_and(|t| t.contains(&id)), "{:?}", orphan[0].config);
    assert_eq!(p.get_vm(&id).await.unwrap_err().kind, ErrorKind::NotFound);

    assert!(p.delete_vm(&id).await.unwrap(), "delete found the clone by its description");
    let left = guests(&env);
    assert!(left.iter().all(|v| v.vmid != orphan[0].vmid), "the clone is gone: {left:?}");
    assert_eq!(left.len(), 1, "only the other VM is left: {left:?}");
    assert_eq!(format!("pve1/{}", left[0].vmid), other.native_id);
    assert!(!p.delete_vm(&id).await.unwrap(), "a second delete finds nothing");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn bad_input_and_wrong_certificates_get_clear_errors() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let mut s = spec("x");
    s.image = Some(pb::ImageRef { name: "nope".into(), source: "no-such-template".into() });
    let err =
        p.create_vm(pb::CreateVmRequest { vm_id: new_id(), spec: Some(s), start: false }).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(err.message.starts_with("spec.image.source:"), "{}", err.message);
    let mut s = spec("x");
    s.vcpus = 0;
    let err =
        p.create_vm(pb::CreateVmRequest { vm_id: new_id(), spec: Some(s), start: false }).await.unwrap_err();
    assert!(err.message.starts_with("spec.vcpus:"), "{}", err.message);

    let wrong_pin = toml(&env, &token_auth(), "").replace(&env.sim.fingerprint, &["00"; 32].join(":"));
    let pinned = Proxmox::new(Config::from_toml(&wrong_pin).unwrap()).await.unwrap();
    let err = pinned.get_vm(&new_id()).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.message.contains("fingerprint"), "{}", err.message);
    // The simulator's own certificate as CA works as well as the pin.
    let ca = env.snippets.join("ca.pem");
    std::fs::write(&ca, &env.sim.cert_pem).unwrap();
    let with_ca = toml(&env, &token_auth(), "").replace(
        &format!("fingerprint = \"{}\"", env.sim.fingerprint),
        &format!("ca_file = \"{}\"", ca.display()),
    );
    let trusted = Proxmox::new(Config::from_toml(&with_ca).unwrap()).await.unwrap();
    assert_eq!(trusted.get_vm(&new_id()).await.unwrap_err().kind, ErrorKind::NotFound);
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_quorum_loss_is_unavailable_and_the_retry_makes_one_vm() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    env.sim.sim.set_faults(Faults { quorum_loss: 1, ..Default::default() });
    let id = new_id();
    let err = p.create_vm(create(&id, "quorum", false)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{}", err.message);
    assert_ne!(err.retryable, Some(false), "core must retry it");
    assert!(err.message.contains("no quorum"), "{}", err.message);
    // Quorum is back: the retry makes the VM, once.
    p.create_vm(create(&id, "quorum", false)).await.unwrap();
    p.create_vm(create(&id, "quorum", false)).await.unwrap();
    assert_eq!(guests(&env).len(), 1);
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_revoked_token_makes_the_probe_not_ready() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    assert!(p.probe().await.unwrap().0, "ready with a valid token");
    env.sim.sim.set_faults(Faults { revoke_tokens: true, ..Default::default() });
    let (ready, message) = p.probe().await.unwrap();
    assert!(!ready, "a revoked token must not be ready: {message}");
    assert!(message.contains("credentials") || message.contains("401"), "{message}");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_create_whose_configuration_fails_for_good_leaves_nothing_after_delete() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    // The token may clone but not set cloud-init options: the create fails
    // after its first effect (the clone), for good.
    env.sim.sim.set_faults(Faults { cloudinit_denied: true, ..Default::default() });
    let id = new_id();
    let err = p.create_vm(create(&id, "half", false)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::PermissionDenied, "{}", err.message);
    // Meanwhile the half-made clone is in HCP's inventory, so the
    // reconciler and an operator can see it.
    let listed = p.list_vms(pb::ListVmsRequest { page_size: 100, page_token: String::new() }).await.unwrap();
    assert!(listed.vms.iter().any(|v| v.vm_id == id), "the half-made VM is listed: {listed:?}");
    // Delete finds it and leaves nothing: no VM, no snippet.
    assert!(p.delete_vm(&id).await.unwrap(), "delete found the half-made VM");
    assert!(guests(&env).is_empty(), "{:?}", guests(&env));
    let snippets: Vec<_> =
        std::fs::read_dir(&env.snippets).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(snippets.is_empty(), "snippets left: {snippets:?}");
    assert!(!p.delete_vm(&id).await.unwrap(), "a second delete finds nothing");
    assert_schema_clean(&env);
}

#[tokio::test]
async fn the_disk_is_grown_to_the_flavor_and_never_shrunk() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    p.create_vm(create(&id, "big-disk", false)).await.unwrap();
    let vm = guests(&env).into_iter().next().unwrap();
    assert!(vm.config["scsi0"].contains("size=10G"), "{:?}", vm.config);
    assert!(!vm.config["tags"].contains("pending"), "{:?}", vm.config);
    // A flavor smaller than the template's disk leaves the disk as it is.
    let small = new_id();
    let mut req = create(&small, "small-disk", false);
    req.spec.as_mut().unwrap().disk_gib = 1;
    p.create_vm(req).await.unwrap();
    let vm = guests(&env).into_iter().find(|v| v.config["tags"].contains(&small)).unwrap();
    assert!(vm.config["scsi0"].contains("size=2G"), "{:?}", vm.config);
    assert_schema_clean(&env);
}

#[tokio::test]
async fn resize_hard_reboot_and_addresses_from_the_guest_agent() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let id = new_id();
    // Two NICs: the first on the bridge HCP's network catalog maps it to,
    // the second on this provider's own mapping of "default".
    let mut req = create(&id, "day-two", false);
    req.spec.as_mut().unwrap().networks = vec![
        pb::NetworkAttachment { network: "prod".into(), backing: "vmbr7".into() },
        pb::NetworkAttachment { network: "default".into(), backing: String::new() },
    ];
    p.create_vm(req).await.unwrap();
    let vm = guests(&env).into_iter().next().unwrap();
    assert!(vm.config["net0"].ends_with(",bridge=vmbr7"), "{:?}", vm.config);
    assert!(vm.config["net1"].ends_with(",bridge=vmbr1"), "{:?}", vm.config);
    assert_eq!(vm.config.get("agent").map(String::as_str), Some("1"));

    // Stopped: MACs from the config, no addresses (no agent to ask).
    let info = p.get_vm(&id).await.unwrap();
    assert_eq!(info.interfaces.len(), 2, "{info:?}");
    let mac0 = vm.config["net0"].split(['=', ',']).nth(1).unwrap().to_ascii_lowercase();
    assert_eq!(info.interfaces[0].mac, mac0);
    assert_eq!(info.interfaces[0].network, "vmbr7");
    assert!(info.interfaces.iter().all(|n| n.ipv4.is_empty()));

    // Resize while stopped: cores and memory in the config, the disk grown;
    // a smaller disk is refused; running, it is refused as the capability says.
    let resize = pb::ResizeVmRequest { vm_id: id.clone(), vcpus: 4, memory_mib: 4096, disk_gib: 20 };
    p.resize_vm(resize.clone()).await.unwrap();
    p.resize_vm(resize.clone()).await.unwrap();
    let vm = guests(&env).into_iter().next().unwrap();
    assert_eq!((vm.config["cores"].as_str(), vm.config["memory"].as_str()), ("4", "4096"));
    assert!(vm.config["scsi0"].contains("size=20G"), "{:?}", vm.config);
    let shrink = p.resize_vm(pb::ResizeVmRequest { disk_gib: 10, ..resize.clone() }).await.unwrap_err();
    assert_eq!(shrink.kind, ErrorKind::InvalidArgument, "{shrink:?}");
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_resize && !caps.supports_hot_resize);

    p.start_vm(&id).await.unwrap();
    let running = p.resize_vm(resize).await.unwrap_err();
    assert_eq!(running.kind, ErrorKind::InvalidState, "{running:?}");
    // Running: the guest agent reports the addresses, matched by MAC.
    let info = p.get_vm(&id).await.unwrap();
    assert_eq!((info.vcpus, info.memory_mib), (4, 4096));
    assert_eq!(info.interfaces.len(), 2);
    for nic in &info.interfaces {
        assert_eq!(nic.ipv4.len(), 1, "{nic:?}");
        assert!(nic.ipv4[0].parse::<std::net::Ipv4Addr>().is_ok() && nic.ipv6.len() == 1, "{nic:?}");
    }
    assert_ne!(info.interfaces[0].ipv4, info.interfaces[1].ipv4);
    // The root disk's size, from `maxdisk`, in the VM read and the inventory.
    assert_eq!(info.disk_gib, 20);
    let listed = p.list_vms(pb::ListVmsRequest::default()).await.unwrap();
    assert_eq!(listed.vms.iter().find(|v| v.vm_id == id).map(|v| v.disk_gib), Some(20));
    // An agent that does not answer ("QEMU guest agent is not running"):
    // the NICs without addresses, not an error.
    env.sim.sim.set_faults(Faults { agent_down: true, ..Default::default() });
    let quiet = p.get_vm(&id).await.unwrap();
    let macs = |vm: &pb::VmInfo| vm.interfaces.iter().map(|n| n.mac.clone()).collect::<Vec<_>>();
    assert_eq!(macs(&quiet), macs(&info));
    assert!(quiet.interfaces.iter().all(|n| n.ipv4.is_empty() && n.ipv6.is_empty()), "{quiet:?}");
    env.sim.sim.set_faults(Faults::default());

    // Hard reboot is a reset, soft a reboot.
    p.reboot_vm(pb::RebootVmRequest { vm_id: id.clone(), hard: true }).await.unwrap();
    p.reboot_vm(pb::RebootVmRequest { vm_id: id.clone(), hard: false }).await.unwrap();
    let vm = guests(&env).into_iter().next().unwrap();
    assert_eq!((vm.resets, vm.reboots), (1, 1));
    assert_schema_clean(&env);
}

fn volume(id: &str, gib: u32) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        volume_id: id.to_owned(),
        spec: Some(pb::VolumeSpec { name: "data".into(), size_gib: gib, ..Default::default() }),
    }
}

fn attach(volume_id: &str, vm_id: &str, slot: u32) -> pb::AttachVolumeRequest {
    pb::AttachVolumeRequest { volume_id: volume_id.to_owned(), vm_id: vm_id.to_owned(), slot }
}

fn detach(volume_id: &str, vm_id: &str) -> pb::DetachVolumeRequest {
    pb::DetachVolumeRequest { volume_id: volume_id.to_owned(), vm_id: vm_id.to_owned() }
}

fn extend(volume_id: &str, size_gib: u32) -> pb::ExtendVolumeRequest {
    pb::ExtendVolumeRequest { volume_id: volume_id.to_owned(), size_gib }
}

/// The simulated config of the HCP VM `vm_id`.
fn config_of(env: &Env, vm_id: &str) -> std::collections::BTreeMap<String, String> {
    guests(env)
        .into_iter()
        .find(|v| v.config.get("tags").is_some_and(|t| t.contains(vm_id)))
        .map(|v| v.config)
        .unwrap_or_default()
}

/// Config entries that name `volid` (drives and unusedN).
fn naming(config: &std::collections::BTreeMap<String, String>, volid: &str) -> Vec<String> {
    config.iter().filter(|(_, v)| v.split(',').next() == Some(volid)).map(|(k, _)| k.clone()).collect()
}

#[tokio::test]
async fn a_volume_moves_between_running_vms_grows_online_and_outlives_both() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_volumes && caps.supports_hot_attach && caps.supports_volume_extend_in_use);
    assert!(caps.volumes_host_local, "local-lvm is not shared");
    assert_eq!(caps.max_volumes_per_vm, 30);

    let vol = new_id();
    let made = p.create_volume(volume(&vol, 4)).await.unwrap();
    let volid = format!("local-lvm:vm-999999999-hcp-{vol}");
    assert_eq!((made.size_gib, made.native_id.as_str(), made.host.as_str()), (4, volid.as_str(), "pve1"));
    assert_eq!(p.create_volume(volume(&vol, 4)).await.unwrap(), made, "a repeated create finds it");
    let images = env.sim.sim.volumes();
    assert_eq!(images.len(), 1);
    assert_eq!((images[0].owner, images[0].size), (999_999_999, 4 << 30));

    let (a, b) = (new_id(), new_id());
    p.create_vm(create(&a, "vol-a", true)).await.unwrap();
    p.create_vm(create(&b, "vol-b", true)).await.unwrap();

    // Hot attach to the running VM a at slot 1: scsi1, twice.
    for _ in 0..2 {
        let on_a = p.attach_volume(attach(&vol, &a, 1)).await.unwrap();
        assert_eq!((on_a.vm_id.as_str(), on_a.slot), (a.as_str(), 1));
    }
    assert_eq!(
        config_of(&env, &a).get("scsi1").map(String::as_str),
        Some(format!("{volid},size=4G").as_str())
    );
    let e = p.attach_volume(attach(&vol, &b, 1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "attached to a: {e:?}");
    let e = p.attach_volume(attach(&vol, &a, 2)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "another slot of a: {e:?}");
    let e = p.delete_volume(&vol).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "attached volumes are not deleted: {e:?}");

    // Grown while a runs: PUT .../resize on scsi1; repeating is a no-op;
    // shrinking is refused.
    for _ in 0..2 {
        assert_eq!(p.extend_volume(extend(&vol, 6)).await.unwrap().size_gib, 6);
    }
    assert_eq!(env.sim.sim.volumes()[0].size, 6 << 30);
    assert!(config_of(&env, &a)["scsi1"].ends_with("size=6G"));
    assert_eq!(p.extend_volume(extend(&vol, 5)).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    let resizes = env
        .sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/resize") && r.params.get("disk").map(String::as_str) == Some("scsi1"))
        .count();
    assert_eq!(resizes, 1, "one resize for two extends");

    // Detached from a (twice): gone from its config, not even as unusedN.
    for _ in 0..2 {
        let off = p.detach_volume(detach(&vol, &a)).await.unwrap();
        assert_eq!((off.vm_id.as_str(), off.slot), ("", 0));
    }
    assert!(naming(&config_of(&env, &a), &volid).is_empty(), "{:?}", config_of(&env, &a));
    // Detached, it grows on a helper VM (PVE resizes only through a VM's
    // drive), which is gone afterwards.
    for _ in 0..2 {
        assert_eq!(p.extend_volume(extend(&vol, 8)).await.unwrap().size_gib, 8);
    }
    assert_eq!(env.sim.sim.volumes()[0].size, 8 << 30);
    assert_eq!(guests(&env).len(), 2, "the helper is gone: {:?}", guests(&env));

    // To VM b at slot 2; GetVolume and ListVolumes say so.
    p.attach_volume(attach(&vol, &b, 2)).await.unwrap();
    let got = p.get_volume(&vol).await.unwrap();
    assert_eq!((got.vm_id.as_str(), got.slot, got.size_gib), (b.as_str(), 2, 8));
    let listed = p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap();
    assert_eq!(listed.volumes, vec![got]);

    // Deleting a (where it was) and then b (where it is, running) keeps it.
    assert!(p.delete_vm(&a).await.unwrap());
    assert!(p.delete_vm(&b).await.unwrap());
    assert!(guests(&env).is_empty());
    let left = p.get_volume(&vol).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.size_gib), ("", 8), "detached, whole");
    assert_eq!(env.sim.sim.volumes().len(), 1);

    assert!(p.delete_volume(&vol).await.unwrap());
    assert!(!p.delete_volume(&vol).await.unwrap(), "already gone");
    assert!(env.sim.sim.volumes().is_empty());
    assert_eq!(p.get_volume(&vol).await.unwrap_err().kind, ErrorKind::NotFound);
    let e = p.attach_volume(attach(&vol, &new_id(), 1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(p.detach_volume(detach(&vol, &new_id())).await.unwrap().vm_id, "");
    assert!(assert_schema_clean(&env) > 0);
}

#[tokio::test]
async fn volume_calls_converge_after_failures_and_restarts() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let (vol, vm) = (new_id(), new_id());
    p.create_vm(create(&vm, "vol-crash", false)).await.unwrap();
    p.create_volume(volume(&vol, 2)).await.unwrap();
    // A restarted provider (nothing in memory) finds the same volume.
    let restarted = provider(&env, &token_auth(), "").await;
    assert_eq!(
        restarted.create_volume(volume(&vol, 2)).await.unwrap().native_id,
        p.get_volume(&vol).await.unwrap().native_id
    );
    assert_eq!(env.sim.sim.volumes().len(), 1);

    // An attach whose config update fails leaves nothing; its retry attaches.
    env.sim.sim.set_faults(Faults { config_failures: 1, ..Default::default() });
    assert!(p.attach_volume(attach(&vol, &vm, 3)).await.is_err());
    assert_eq!(p.get_volume(&vol).await.unwrap().vm_id, "");
    assert_eq!(restarted.attach_volume(attach(&vol, &vm, 3)).await.unwrap().slot, 3);
    // Another VM's volume cannot take the slot.
    let other = new_id();
    p.create_volume(volume(&other, 1)).await.unwrap();
    assert_eq!(p.attach_volume(attach(&other, &vm, 3)).await.unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(p.attach_volume(attach(&other, &vm, 31)).await.unwrap_err().kind, ErrorKind::InvalidArgument);

    // A DeleteVm that fails after releasing the volume (the destroy is
    // refused for a lost quorum) is retried: the VM goes, the volume stays.
    env.sim.sim.set_faults(Faults { quorum_loss: 1, ..Default::default() });
    let mut retried = p.delete_vm(&vm).await;
    for _ in 0..3 {
        if retried.is_ok() {
            break;
        }
        retried = p.delete_vm(&vm).await;
    }
    assert!(retried.unwrap());
    assert!(guests(&env).is_empty());
    assert_eq!(env.sim.sim.volumes().len(), 2, "both volumes survive");
    assert_eq!(p.get_volume(&vol).await.unwrap().vm_id, "");

    // A detached extend cut short (the resize task fails) leaves its helper
    // VM holding the volume: HCP's inventory does not show the helper, the
    // volume is still detached, and the retry reuses the helper, grows the
    // volume and removes the helper.
    let mut exits = std::collections::BTreeMap::new();
    exits.insert("resize".to_owned(), "lvextend failed (injected)".to_owned());
    env.sim.sim.set_faults(Faults { task_exits: exits, ..Default::default() });
    assert_eq!(p.extend_volume(extend(&vol, 3)).await.unwrap_err().kind, ErrorKind::Internal);
    let helpers = guests(&env);
    assert_eq!(helpers.len(), 1, "the helper is left");
    let volid = p.get_volume(&vol).await.unwrap().native_id;
    assert!(helpers[0].config.values().any(|v| v.starts_with(&volid)), "{:?}", helpers[0].config);
    assert!(p.list_vms(pb::ListVmsRequest::default()).await.unwrap().vms.is_empty());
    assert_eq!(p.get_volume(&vol).await.unwrap().vm_id, "");
    assert_eq!(restarted.extend_volume(extend(&vol, 3)).await.unwrap().size_gib, 3);
    assert!(guests(&env).is_empty(), "the helper is gone");
    let creates =
        env.sim.sim.requests().iter().filter(|r| r.method == "POST" && r.path == "/nodes/pve1/qemu").count();
    assert_eq!(creates, 1, "one helper, reused");

    // An image HCP did not make (another owner, or not named hcp-<id>) is
    // not listed; HCP's own are, known to core or not.
    let listed: Vec<String> = p
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .volumes
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    let mut want = vec![vol.clone(), other.clone()];
    want.sort();
    assert_eq!(listed, want);
    let page =
        p.list_volumes(pb::ListVolumesRequest { page_size: 1, page_token: String::new() }).await.unwrap();
    assert_eq!((page.volumes.len(), page.next_page_token.as_str()), (1, want[0].as_str()));

    // Storages: unknown, or without images, are the caller's mistake.
    for storage in ["nope", "local"] {
        let mut req = volume(&new_id(), 1);
        req.spec.as_mut().unwrap().storage = storage.into();
        assert_eq!(p.create_volume(req).await.unwrap_err().kind, ErrorKind::InvalidArgument, "{storage}");
    }
    for id in [&vol, &other] {
        assert!(p.delete_volume(id).await.unwrap());
    }
    assert!(env.sim.sim.volumes().is_empty());
    assert_schema_clean(&env);
}

#[tokio::test]
async fn shared_volumes_are_everywhere_and_local_ones_stay_on_their_node() {
    let Some(env) = env_with(|c| {
        c.nodes = vec!["pve1".into(), "pve2".into()];
        c.storages.push(("shared-nfs".into(), true, "images".into()));
    })
    .await
    else {
        return;
    };
    let text = toml(&env, &token_auth(), "")
        .replace("[volumes]\nstorage = \"local-lvm\"", "[volumes]\nstorage = \"shared-nfs\"");
    let p = Arc::new(Proxmox::new(Config::from_toml(&text).unwrap()).await.unwrap());
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_volumes && !caps.volumes_host_local, "the default volume storage is shared");

    // On the shared storage (a directory: the image has the format's
    // extension): no host, listed once although both nodes see it.
    let shared = new_id();
    let made = p.create_volume(volume(&shared, 1)).await.unwrap();
    assert_eq!(made.native_id, format!("shared-nfs:vm-999999999-hcp-{shared}.raw"));
    assert_eq!(made.host, "");
    // On pve2's local storage, named by the spec.
    let local = new_id();
    let mut req = volume(&local, 1);
    let spec = req.spec.as_mut().unwrap();
    spec.storage = "local-lvm".into();
    spec.host = "pve2".into();
    assert_eq!(p.create_volume(req.clone()).await.unwrap().host, "pve2");
    spec_host_unknown(&p).await;
    let listed = p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes;
    assert_eq!(listed.len(), 2, "{listed:?}");

    // A VM on pve1 takes the shared volume, not pve2's local one.
    let vm = new_id();
    p.create_vm(create(&vm, "vol-nodes", false)).await.unwrap();
    assert_eq!(p.attach_volume(attach(&shared, &vm, 1)).await.unwrap().slot, 1);
    let e = p.attach_volume(attach(&local, &vm, 2)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "{e:?}");
    assert!(p.delete_vm(&vm).await.unwrap());
    for id in [&shared, &local] {
        assert!(p.delete_volume(id).await.unwrap());
    }
    assert!(env.sim.sim.volumes().is_empty());
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_boot_volume_is_copied_from_the_image_outlives_its_vm_and_boots_another() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let (boot, data, a, b) = (new_id(), new_id(), new_id(), new_id());
    p.create_volume(volume(&data, 3)).await.unwrap();
    let with_volumes = |vm_id: &str, name: &str| {
        let mut req = create(vm_id, name, true);
        let spec = req.spec.as_mut().unwrap();
        spec.boot_volume_id = boot.clone();
        spec.volumes = vec![pb::VolumeAttachment { volume_id: data.clone(), slot: 2 }];
        req
    };

    // The copy task fails first (an error, nothing made); the retry, by a
    // restarted provider, makes one VM with one boot volume.
    let mut exits = std::collections::BTreeMap::new();
    exits.insert("imgcopy".to_owned(), "storage migration failed (injected)".to_owned());
    env.sim.sim.set_faults(Faults { task_exits: exits, ..Default::default() });
    assert_eq!(p.create_vm(with_volumes(&a, "boot-a")).await.unwrap_err().kind, ErrorKind::Internal);
    assert_eq!(env.sim.sim.volumes().len(), 1, "only the data volume");
    let restarted = provider(&env, &token_auth(), "").await;
    for provider in [&restarted, &p] {
        let vm = provider.create_vm(with_volumes(&a, "boot-a")).await.unwrap();
        assert_eq!((vm.disk_gib, vm.power_state), (10, pb::PowerState::Running as i32));
    }
    assert_eq!(guests(&env).len(), 1);
    assert_eq!(env.sim.sim.volumes().len(), 2, "the data volume and one boot volume");
    let copies =
        env.sim.sim.requests().iter().filter(|r| r.method == "POST" && r.path.contains("/content/")).count();
    assert_eq!(copies, 2, "the failed copy and one more");

    // The boot volume is scsi0, first to boot, grown to the flavor; the
    // clone's own disk is gone (not even unusedN); the data volume is scsi2.
    let volid = format!("local-lvm:vm-999999999-hcp-{boot}");
    let config = config_of(&env, &a);
    assert_eq!(config.get("scsi0").map(String::as_str), Some(format!("{volid},size=10G").as_str()));
    assert_eq!(config.get("boot").map(String::as_str), Some("order=scsi0"));
    assert!(!config.keys().any(|k| k.starts_with("unused")), "{config:?}");
    assert!(config.get("scsi2").is_some_and(|v| v.contains(&format!("hcp-{data}"))), "{config:?}");
    let listed = p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes;
    let at =
        |id: &str| listed.iter().find(|v| v.volume_id == id).map(|v| (v.vm_id.clone(), v.slot, v.size_gib));
    assert_eq!(at(&boot), Some((a.clone(), 0, 10)));
    assert_eq!(at(&data), Some((a.clone(), 2, 3)));

    // The boot volume leaves only with DeleteVm; a data volume detaches.
    let e = p.detach_volume(detach(&boot, &a)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "{e:?}");
    // It cannot boot a second VM while the first holds it.
    let e = p.create_vm(with_volumes(&b, "boot-b")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "{e:?}");
    assert!(p.delete_vm(&b).await.unwrap(), "the half-made b goes");

    // ResizeVm grows it (stopped VM).
    p.stop_vm(pb::StopVmRequest { vm_id: a.clone(), force: true, timeout_seconds: 0 }).await.unwrap();
    let resize = pb::ResizeVmRequest { vm_id: a.clone(), vcpus: 2, memory_mib: 1024, disk_gib: 12 };
    assert_eq!(p.resize_vm(resize).await.unwrap().disk_gib, 12);
    assert_eq!(p.get_volume(&boot).await.unwrap().size_gib, 12);

    // DeleteVm leaves both volumes, detached and whole.
    assert!(p.delete_vm(&a).await.unwrap());
    assert!(guests(&env).is_empty());
    let left = p.get_volume(&boot).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.slot, left.size_gib), ("", 0, 12));
    assert_eq!(p.get_volume(&data).await.unwrap().vm_id, "");

    // A second VM boots from it as it is: no copy, the image not read.
    let copies_before =
        env.sim.sim.requests().iter().filter(|r| r.path.contains("/content/") && r.method == "POST").count();
    for _ in 0..2 {
        let vm = p.create_vm(with_volumes(&b, "boot-b")).await.unwrap();
        assert_eq!(vm.disk_gib, 12, "the volume's size, above the flavor's 10");
    }
    let copies_after =
        env.sim.sim.requests().iter().filter(|r| r.path.contains("/content/") && r.method == "POST").count();
    assert_eq!(copies_before, copies_after);
    assert_eq!(
        config_of(&env, &b).get("scsi0").map(String::as_str),
        Some(format!("{volid},size=12G").as_str())
    );
    assert_eq!(p.get_volume(&boot).await.unwrap().vm_id, b);
    assert_eq!(p.get_volume(&data).await.unwrap().slot, 2);
    assert_eq!(guests(&env).len(), 1);

    assert!(p.delete_vm(&b).await.unwrap());
    for id in [&boot, &data] {
        assert!(p.delete_volume(id).await.unwrap());
    }
    assert!(guests(&env).is_empty() && env.sim.sim.volumes().is_empty());
    assert_schema_clean(&env);
}

/// A node without the storage is the caller's mistake.
async fn spec_host_unknown(p: &Proxmox) {
    let mut req = volume(&new_id(), 1);
    let spec = req.spec.as_mut().unwrap();
    spec.storage = "local-lvm".into();
    spec.host = "pve9".into();
    assert_eq!(p.create_volume(req).await.unwrap_err().kind, ErrorKind::InvalidArgument);
}

// ---- images ----------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// An ImportImage stream as core sends it: the header, then `data` in
/// chunks; `announced_sha256` is what the header claims.
async fn upload_of(
    image_id: &str,
    data: &[u8],
    announced_sha256: &str,
) -> hcp_provider_sdk::image::ImageUpload {
    use pb::import_image_chunk::Part;
    let mut parts = vec![Ok(pb::ImportImageChunk {
        part: Some(Part::Header(pb::ImportImageHeader {
            image_id: image_id.to_owned(),
            name: "test image".into(),
            format: pb::DiskFormat::Qcow2 as i32,
            size_bytes: data.len() as u64,
            sha256: announced_sha256.to_owned(),
            min_disk_gib: 1,
        })),
    })];
    for c in data.chunks(64 * 1024) {
        parts.push(Ok(pb::ImportImageChunk { part: Some(Part::Data(c.to_vec())) }));
    }
    hcp_provider_sdk::image::ImageUpload::start(futures::stream::iter(parts)).await.expect("a valid header")
}

/// What an image may have left in the simulated cluster: import files, and
/// VMs of the image's name (template or not).
fn image_leftovers(env: &Env, image_id: &str) -> (Vec<String>, Vec<u32>) {
    let files =
        env.sim.sim.volumes().into_iter().filter(|v| v.content == "import").map(|v| v.volid).collect();
    let name = format!("hcp-image-{image_id}");
    let vms = env
        .sim
        .sim
        .vms()
        .into_iter()
        .filter(|v| v.config.get("name") == Some(&name))
        .map(|v| v.vmid)
        .collect();
    (files, vms)
}

/// A PVE client of the simulator's, with the test token.
async fn client(env: &Env) -> hcp_provider_proxmox::client::Pve {
    use hcp_provider_proxmox::client::{Credentials, Pve, Trust, parse_fingerprint};
    let fp = parse_fingerprint(&env.sim.fingerprint).expect("the simulator's fingerprint");
    let timing = Config::from_toml(&toml(env, "", "")).unwrap().timing;
    let pve = Pve::new(&env.sim.url(), Trust::Fingerprint(fp), timing).unwrap();
    pve.set_credentials(Credentials::Token { id: TOKEN_ID.into(), secret: TOKEN_SECRET.into() }).await;
    pve
}

/// One upload through the client: the refusal, or the task's outcome.
async fn upload_file(
    pve: &hcp_provider_proxmox::client::Pve,
    storage: &str,
    content: &str,
    filename: &str,
    data: &[u8],
    checksum: &str,
) -> Result<String, hcp_provider_proxmox::client::PveError> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Ok(bytes::Bytes::copy_from_slice(data))).await.unwrap();
    drop(tx);
    let fields = vec![
        ("content", content.to_owned()),
        ("checksum", checksum.to_owned()),
        ("checksum-algorithm", "sha256".to_owned()),
    ];
    let path = format!("/nodes/pve1/storage/{storage}/upload");
    let upid = pve.upload(&path, fields, filename, data.len() as u64, rx).await?;
    pve.wait(upid.as_str().expect("a UPID")).await
}

#[tokio::test]
async fn the_simulated_upload_refuses_what_pve_refuses() {
    let Some(env) = env().await else { return };
    let pve = client(&env).await;
    let data = b"QFI\xfb not really a qcow2, the simulator reads no headers".repeat(100);
    let good = sha256_hex(&data);
    let listed = |content: &str| {
        env.sim
            .sim
            .volumes()
            .into_iter()
            .filter(|v| v.content == content)
            .map(|v| v.volid)
            .collect::<Vec<_>>()
    };

    // Accepted: the file is in the storage's content, as `import`.
    let exit = upload_file(&pve, "local", "import", "a b.qcow2", &data, &good).await.unwrap();
    assert_eq!(exit, "OK");
    assert_eq!(listed("import"), ["local:import/a_b.qcow2"], "the name is normalized");
    let content = pve
        .call(
            hcp_provider_proxmox::client::Method::Get,
            "/nodes/pve1/storage/local/content",
            vec![("content", "import".into())],
        )
        .await
        .unwrap();
    assert_eq!(content[0]["volid"], "local:import/a_b.qcow2");
    assert_eq!(content[0]["content"], "import");
    assert_eq!(content[0]["size"].to_string().trim_matches('"'), data.len().to_string());

    // A wrong checksum: the task fails and nothing is stored.
    let bad = sha256_hex(b"something else");
    let e = upload_file(&pve, "local", "import", "b.qcow2", &data, &bad).await.unwrap_err();
    assert!(e.message().contains("checksum mismatch"), "{e}");
    // A storage without `import` content, an extension import does not
    // take, a content type the method does not know: refused at once.
    let e = upload_file(&pve, "local-lvm", "import", "c.qcow2", &data, &good).await.unwrap_err();
    assert!(
        matches!(&e, hcp_provider_proxmox::client::PveError::Status { status: 400, errors, .. } if errors.contains_key("content")),
        "{e:?}"
    );
    let e = upload_file(&pve, "local", "import", "c.iso", &data, &good).await.unwrap_err();
    assert!(
        matches!(&e, hcp_provider_proxmox::client::PveError::Status { status: 400, errors, .. } if errors.contains_key("filename")),
        "{e:?}"
    );
    let e = upload_file(&pve, "local", "images", "c.qcow2", &data, &good).await.unwrap_err();
    assert!(
        matches!(&e, hcp_provider_proxmox::client::PveError::Status { status: 400, errors, .. } if errors.contains_key("content")),
        "{e:?}"
    );
    assert_eq!(listed("import"), ["local:import/a_b.qcow2"], "no refused upload left a file");

    // Removed like any volume.
    let upid = pve
        .call(
            hcp_provider_proxmox::client::Method::Delete,
            "/nodes/pve1/storage/local/content/local%3Aimport%2Fa_b.qcow2",
            Vec::new(),
        )
        .await
        .unwrap();
    pve.wait(upid.as_str().unwrap()).await.unwrap();
    assert!(listed("import").is_empty());
}

#[tokio::test]
async fn a_failed_import_leaves_nothing_and_the_same_id_imports_afterwards() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_image_import && caps.supports_capture);
    assert_eq!(caps.image_formats[0], pb::DiskFormat::Qcow2 as i32);
    let data = vec![7u8; 300 * 1024];
    let sha = sha256_hex(&data);
    let id = uuid::Uuid::new_v4().to_string();
    let volumes_before = env.sim.sim.volumes();

    // The stream's bytes are not the announced ones: refused, nothing kept.
    let e = p.import_image(upload_of(&id, &data, &sha256_hex(b"other")).await).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert_eq!(image_leftovers(&env, &id), (vec![], vec![]));

    // PVE fails each step after the upload in turn: the file and any VM
    // made go with the failure.
    for step in ["qmcreate", "qmtemplate"] {
        let mut faults = Faults::default();
        faults.task_exits.insert(step.into(), "unable to create image: no space left on device".into());
        env.sim.sim.set_faults(faults);
        let e = p.import_image(upload_of(&id, &data, &sha).await).await.unwrap_err();
        assert!(e.message.contains("no space left"), "{step}: {e}");
        assert_eq!(image_leftovers(&env, &id), (vec![], vec![]), "after a failed {step}");
        assert_eq!(env.sim.sim.volumes(), volumes_before, "no disk left after a failed {step}");
    }
    env.sim.sim.set_faults(Faults::default());

    // The same id then imports: a template of the image's name, its disk
    // imported from the upload, which is gone.
    let info = p.import_image(upload_of(&id, &data, &sha).await).await.unwrap();
    assert_eq!(info.source, format!("hcp-image-{id}"));
    assert_eq!(info.size_bytes, data.len() as u64);
    let (files, vms) = image_leftovers(&env, &id);
    assert!(files.is_empty(), "{files:?}");
    let template = env.sim.sim.vms().into_iter().find(|v| vms.contains(&v.vmid)).expect("the template");
    assert!(template.template);
    assert!(template.config["scsi0"].starts_with(&format!("local-lvm:vm-{}-disk-0,", template.vmid)));
    // Again: the stored image answers, nothing new is made.
    let again = p.import_image(upload_of(&id, &data, &sha).await).await.unwrap();
    assert_eq!(again, info);
    assert_eq!(image_leftovers(&env, &id).1, vms);

    // Deleted, twice.
    let req = pb::DeleteImageRequest { image_id: id.clone(), source: info.source.clone() };
    assert!(p.delete_image(req.clone()).await.unwrap());
    assert!(!p.delete_image(req).await.unwrap());
    assert_eq!(image_leftovers(&env, &id), (vec![], vec![]));
    assert_schema_clean(&env);
}

#[tokio::test]
async fn a_failed_capture_leaves_nothing_and_the_vm_as_it_was() {
    let Some(env) = env().await else { return };
    let p = provider(&env, &token_auth(), "").await;
    let vm_id = new_id();
    p.create_vm(create(&vm_id, "cap", false)).await.unwrap();
    let before = guests(&env);
    let image_id = uuid::Uuid::new_v4().to_string();
    let req =
        pb::CaptureImageRequest { vm_id: vm_id.clone(), image_id: image_id.clone(), name: "cap".into() };

    let mut faults = Faults::default();
    faults.task_exits.insert("qmtemplate".into(), "unable to rename disk: device busy".into());
    env.sim.sim.set_faults(faults);
    let e = p.capture_image(req.clone()).await.unwrap_err();
    assert!(e.message.contains("device busy"), "{e}");
    assert_eq!(image_leftovers(&env, &image_id), (vec![], vec![]));
    assert_eq!(guests(&env), before, "the VM is left as it was");

    let info = p.capture_image(req.clone()).await.unwrap();
    let template =
        env.sim.sim.vms().into_iter().find(|v| v.config.get("name") == Some(&info.source)).unwrap();
    assert!(template.template);
    for own in ["tags", "sshkeys", "cicustom"] {
        assert!(!template.config.contains_key(own), "{own} stays with the VM: {:?}", template.config);
    }
    assert_eq!(guests(&env), before, "the VM is left as it was");
    assert!(p.delete_image(pb::DeleteImageRequest { image_id, source: info.source }).await.unwrap());
    assert!(p.delete_vm(&vm_id).await.unwrap());
    assert_schema_clean(&env);
}
