//! The development stack and dev tokens.
//!
//! The dev key is a random HS256 secret kept in `<data-dir>/dev-jwt-secret`
//! (created on first use, mode 0600). It is for local use only: anyone with
//! the file can mint any token for that stack. Production verifies tokens
//! from your identity provider (`auth.public_key_pem_file`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use hcp_core::auth::{Claims, ROLE_CONSOLE_PROXY, ROLE_OPS_ADMIN, ROLE_TENANT_MEMBER, sign_hs256};
use hcp_proto::common;
use hcp_proto::ops;
use hcp_proto::ops::catalog_admin_service_client::CatalogAdminServiceClient;
use hcp_proto::ops::provider_admin_service_client::ProviderAdminServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Issuer of dev tokens (core's default `auth.issuer`).
pub const DEV_ISSUER: &str = "hcp-dev";
/// Audience of dev tokens (core's default `auth.audience`).
pub const DEV_AUDIENCE: &str = "hcp";

/// Flags of `hcp up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where the dev key, configuration and SQLite database live.
    #[arg(long, default_value = ".hcp")]
    data_dir: PathBuf,
    /// Gateway (REST) address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway: SocketAddr,
    /// The gateway's RDP relay for native RDP clients (consoles of type
    /// rdp).
    #[arg(long, default_value = "127.0.0.1:3390")]
    rdp: SocketAddr,
    /// Prometheus `/metrics` of core, the gateway and the sim provider:
    /// this port and the next two.
    #[arg(long, default_value_t = 9464)]
    metrics_port: u16,
    /// Core (gRPC) address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    core: SocketAddr,
    /// Simulated provider address.
    #[arg(long, default_value = "127.0.0.1:50061")]
    sim: SocketAddr,
    /// Database URL; default: a SQLite file in the data dir.
    #[arg(long)]
    database_url: Option<String>,
}

/// Flags of `hcp token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Directory holding the dev key.
    #[arg(long, default_value = ".hcp")]
    data_dir: PathBuf,
    /// Subject.
    #[arg(long, default_value = "dev-user")]
    subject: String,
    /// Tenant (omit for an operator token).
    #[arg(long)]
    tenant: Option<String>,
    /// Project granted (repeatable).
    #[arg(long = "project")]
    projects: Vec<String>,
    /// Role (repeatable): tenant.member, tenant.viewer, ops.admin, ops.viewer.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

/// Returns the dev secret in `data_dir`, creating it on first use.
pub fn dev_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join("dev-jwt-secret");
    if !path.exists() {
        use rand::RngCore;
        std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        std::fs::write(&path, hex::encode(bytes))
            .with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(hcp_core::auth::read_hs256_secret(&path)?)
}

/// Mints a dev token.
pub fn mint(
    secret: &[u8],
    subject: &str,
    tenant: Option<&str>,
    projects: &[&str],
    roles: &[&str],
    ttl: u64,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp() as u64;
    let claims = Claims {
        sub: subject.to_owned(),
        iss: DEV_ISSUER.to_owned(),
        aud: DEV_AUDIENCE.into(),
        exp: now + ttl,
        iat: now,
        tenant: tenant.map(str::to_owned),
        projects: projects.iter().map(|s| s.to_string()).collect(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
    };
    Ok(sign_hs256(secret, &claims)?)
}

/// `hcp token`.
#[allow(clippy::print_stdout)]
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = dev_secret(&args.data_dir)?;
    let projects: Vec<&str> = args.projects.iter().map(String::as_str).collect();
    let roles: Vec<&str> = if args.roles.is_empty() {
        vec![if args.tenant.is_some() { ROLE_TENANT_MEMBER } else { ROLE_OPS_ADMIN }]
    } else {
        args.roles.iter().map(String::as_str).collect()
    };
    println!("{}", mint(&secret, &args.subject, args.tenant.as_deref(), &projects, &roles, args.ttl)?);
    Ok(())
}

/// A child process that announced its address.
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// The address from its readiness line (unspecified when it announced
    /// something else, such as a unix socket path).
    pub addr: SocketAddr,
    /// The readiness line's address as announced.
    pub announced: String,
    /// The whole readiness object (`hcp_ready`), with any other addresses
    /// the process announced (the gateway's `rdp_addr`).
    pub ready: serde_json::Value,
}

/// Starts `exe args...`, waits up to `timeout` for its readiness line
/// (`{"hcp_ready":{...,"addr":...}}` on stdout) and returns its address.
/// Later stdout lines are discarded; stderr goes where `stderr` says.
pub async fn spawn(
    exe: &Path,
    args: &[String],
    env: &[(&str, String)],
    stderr: Stdio,
    timeout: Duration,
) -> anyhow::Result<Spawned> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::piped()).stderr(stderr).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child =
        cmd.spawn().with_context(|| format!("cannot start {} {}", exe.display(), args.join(" ")))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v.pointer("/hcp_ready/addr").is_some_and(serde_json::Value::is_string)
            {
                return Ok::<_, anyhow::Error>(v["hcp_ready"].clone());
            }
        }
        bail!("{} exited before it was ready", args.first().map(String::as_str).unwrap_or("process"))
    })
    .await
    .with_context(|| format!("{} did not become ready in {timeout:?}", args.join(" ")))??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let announced = ready["addr"].as_str().unwrap_or_default().to_owned();
    let addr = announced.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    Ok(Spawned { child, addr, announced, ready })
}

/// Adds the volume type `standard` (up to 1 TiB) for the quick start, unless
/// it exists. Not part of [`bootstrap`]: tests make the types they need.
async fn standard_volume_type(core: &str, ops_token: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(core.to_owned())?.connect().await?;
    let mut catalog = CatalogAdminServiceClient::new(channel);
    let mut req = tonic::Request::new(ops::CreateVolumeTypeRequest {
        volume_type: Some(common::VolumeType {
            name: "standard".into(),
            description: "the simulator's default storage".into(),
            max_size_gib: 1024,
            ..Default::default()
        }),
    });
    req.metadata_mut().insert("authorization", format!("Bearer {ops_token}").parse()?);
    match catalog.create_volume_type(req).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    }
}

/// Seeds a stack through its ops API: a zone and its "default" network, flavors, an image and the
/// provider at `provider_endpoint` (each skipped when it already exists).
pub async fn bootstrap(
    core: &str,
    ops_token: &str,
    zone: &str,
    provider_endpoint: &str,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(core.to_owned())?.connect().await?;
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {ops_token}").parse()?;
    fn authed<T>(auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", auth.clone());
        r
    }
    let mut catalog = CatalogAdminServiceClient::new(channel.clone());
    let mut providers = ProviderAdminServiceClient::new(channel);
    let ok_or_exists = |r: Result<(), tonic::Status>| match r {
        Ok(()) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    };
    ok_or_exists(
        catalog
            .create_zone(authed(
                &auth,
                ops::CreateZoneRequest {
                    zone: Some(common::Zone {
                        name: zone.to_owned(),
                        description: "development zone".into(),
                        created_at: None,
                    }),
                },
            ))
            .await
            .map(|_| ()),
    )?;
    for (name, vcpus, memory_mib, disk_gib) in
        [("small", 1, 512, 10), ("medium", 2, 2048, 20), ("large", 4, 8192, 40)]
    {
        ok_or_exists(
            catalog
                .create_flavor(authed(
                    &auth,
                    ops::CreateFlavorRequest {
                        flavor: Some(common::Flavor {
                            name: name.into(),
                            vcpus,
                            memory_mib,
                            disk_gib,
                            description: format!("{vcpus} vCPU, {memory_mib} MiB"),
                            created_at: None,
                        }),
                    },
                ))
                .await
                .map(|_| ()),
        )?;
    }
    ok_or_exists(
        catalog
            .create_image(authed(
                &auth,
                ops::CreateImageRequest {
                    image: Some(common::Image {
                        name: "debian-12".into(),
                        os_type: "linux".into(),
                        source: "debian-12-genericcloud".into(),
                        min_disk_gib: 2,
                        description: "Debian 12".into(),
                        created_at: None,
                        os_version: "12".into(),
                        ..Default::default()
                    }),
                },
            ))
            .await
            .map(|_| ()),
    )?;
    // One network in the zone, "default", which every provider resolves
    // under its own name (no backing set).
    catalog
        .create_network(authed(
            &auth,
            ops::CreateNetworkRequest {
                network: Some(ops::NetworkDefinition {
                    name: "default".into(),
                    zone: zone.to_owned(),
                    description: "the zone's default network".into(),
                    backings: Default::default(),
                    created_at: None,
                }),
            },
        ))
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
    let existing = providers.list_providers(authed(&auth, ops::ListProvidersRequest {})).await?.into_inner();
    if !existing.providers.iter().any(|p| p.endpoint == provider_endpoint) {
        providers
            .register_provider(authed(
                &auth,
                ops::RegisterProviderRequest {
                    name: format!("sim-{}", existing.providers.len() + 1),
                    zone: zone.to_owned(),
                    endpoint: provider_endpoint.to_owned(),
                    credentials: Default::default(),
                    // The simulator `hcp up` starts listens on loopback.
                    tls: None,
                    allow_plaintext: false,
                },
            ))
            .await
            .map_err(|s| anyhow::anyhow!("cannot register the provider: {}", s.message()))?;
    }
    Ok(())
}

/// Where the gateway `hcp up` starts finds the console pages (its default,
/// relative to the repository's root, where `hcp up` is run).
const CONSOLE_ASSETS: &str = "gateway/console";
/// The npm packages the console pages load at run time.
const CONSOLE_MODULES: &[&str] = &["@novnc/novnc", "@xterm/xterm", "@xterm/addon-fit"];

/// Installs the console pages' modules (noVNC, xterm.js) from the lockfile
/// when they are missing, so a console opens in the browser on a fresh
/// clone; says what to run when it cannot. Never fails `hcp up`: without
/// them the API and every other console (the CLI's serial terminal, RDP)
/// still work.
#[allow(clippy::print_stdout)]
async fn console_assets() {
    let dir = std::path::Path::new(CONSOLE_ASSETS);
    let missing: Vec<&str> = CONSOLE_MODULES
        .iter()
        .copied()
        .filter(|m| !dir.join("node_modules").join(m).join("package.json").is_file())
        .collect();
    if missing.is_empty() || !dir.join("package-lock.json").is_file() {
        return;
    }
    let fix = "run `bash scripts/console-assets.sh` from the repository's root";
    println!(
        "installing the console pages' modules ({}) from {CONSOLE_ASSETS}/package-lock.json",
        missing.join(", ")
    );
    let installed = tokio::process::Command::new("npm")
        .args(["ci", "--prefix", CONSOLE_ASSETS, "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund"])
        .args(["--loglevel=error"])
        .stdin(Stdio::null())
        .status()
        .await;
    match installed {
        Ok(s) if s.success() => {}
        Ok(s) => println!("warning: npm ci failed ({s}): consoles in the browser answer 503 until you {fix}"),
        Err(e) => {
            println!("warning: cannot run npm ({e}): consoles in the browser answer 503 until you {fix}")
        }
    }
}

/// `hcp up`.
pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(up_async(args))
}

#[allow(clippy::print_stdout)]
async fn up_async(args: UpArgs) -> anyhow::Result<()> {
    let data = &args.data_dir;
    let secret = dev_secret(data)?;
    let secret_file = std::fs::canonicalize(data.join("dev-jwt-secret"))?;
    let db = match &args.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", std::fs::canonicalize(data)?.join("hcp.db").display()),
    };
    let key_file = data.join("secrets.key");
    if !key_file.exists() {
        std::fs::write(&key_file, hcp_core::secrets::SecretBox::generate_key_hex())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    let core_toml = format!(
        "listen = \"{core}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\ndatabase_url = \"{db}\"\n\n[auth]\nhs256_secret_file = \"{secret}\"\n\n\
         [console]\npublic_base_url = \"ws://{gw}\"\nrdp_address = \"{rdp}\"\n\n[providers]\nprobe_interval_seconds = 5\n\n\
         [secrets]\nkey_file = \"{key}\"\n\n\
         # Development mode: webhooks may use plain http (internal addresses stay refused).\n\
         [egress]\nallow_http = true\n",
        core = args.core,
        secret = secret_file.display(),
        gw = args.gateway,
        rdp = args.rdp,
        metrics = args.metrics_port,
        key = std::fs::canonicalize(&key_file)?.display(),
    );
    let core_config = data.join("core.toml");
    std::fs::write(&core_config, core_toml)?;
    let exe = std::env::current_exe()?;
    let wait = Duration::from_secs(60);

    println!("starting HCP (data in {})", data.display());
    let sim = spawn(
        &exe,
        &["provider-sim".into(), "--listen".into(), args.sim.to_string()],
        &[("HCP_PROVIDER_METRICS_LISTEN", format!("127.0.0.1:{}", args.metrics_port.saturating_add(2)))],
        Stdio::inherit(),
        wait,
    )
    .await?;
    let core = spawn(
        &exe,
        &["core".into(), "--config".into(), core_config.display().to_string()],
        &[],
        Stdio::inherit(),
        wait,
    )
    .await?;
    // The gateway's service account for the console proxy.
    let proxy_token_file = data.join("console-proxy.jwt");
    std::fs::write(
        &proxy_token_file,
        mint(&secret, "console-proxy", None, &[], &[ROLE_CONSOLE_PROXY], 30 * 86400)?,
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&proxy_token_file, std::fs::Permissions::from_mode(0o600))?;
    }
    console_assets().await;
    let gateway = spawn(
        &exe,
        &[
            "gateway".into(),
            "--listen".into(),
            args.gateway.to_string(),
            "--core".into(),
            format!("http://{}", core.addr),
            "--service-token-file".into(),
            proxy_token_file.display().to_string(),
            "--console-rdp-listen".into(),
            args.rdp.to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", args.metrics_port.saturating_add(1)),
        ],
        &[],
        Stdio::inherit(),
        wait,
    )
    .await?;

    let ops_token = mint(&secret, "dev-operator", None, &[], &[ROLE_OPS_ADMIN], 24 * 3600)?;
    bootstrap(&format!("http://{}", core.addr), &ops_token, "zone-1", &format!("http://{}", sim.addr))
        .await?;
    standard_volume_type(&format!("http://{}", core.addr), &ops_token).await?;
    let tenant_token = mint(&secret, "dev-user", Some("acme"), &["demo"], &[ROLE_TENANT_MEMBER], 24 * 3600)?;
    let gw = gateway.addr;
    println!(
        "\nHCP is up.\n  REST gateway  http://{gw}\n  RDP relay     {rdp}\n  metrics       http://127.0.0.1:{m0}/metrics (core), :{m1} (gateway), :{m2} (sim)\n  core gRPC     {core}\n  sim provider  {sim}\n\n\
         DEV KEY: tokens below are signed with the development key in {data}/dev-jwt-secret.\n\
         It is for local use only.\n\n\
         export TOKEN={tenant_token}\nexport OPS_TOKEN={ops_token}\n\n\
         For the hcp command:\n  export HCP_ENDPOINT=http://{gw} HCP_PROJECT=demo HCP_TOKEN=$TOKEN\n  \
         hcp vm create web-1 --flavor small --image debian-12 --wait\n  \
         hcp vm console web-1 --type serial     # the guest's shell, here; Ctrl-] leaves\n  \
         hcp vm console web-1 --type web        # a page with its screen, for the browser\n  \
         hcp vm console-log web-1               # its boot log\n\n\
         Try:\n  curl -s -X POST -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n    \
         -d '{{\"name\":\"web-1\",\"flavor\":\"small\",\"image\":\"debian-12\"}}' \\\n    \
         http://{gw}/api/hcp/tenant/v1/projects/demo/vms\n\nPress ctrl-c to stop.",
        core = core.addr,
        sim = sim.addr,
        rdp = args.rdp,
        m0 = args.metrics_port,
        m1 = args.metrics_port.saturating_add(1),
        m2 = args.metrics_port.saturating_add(2),
        data = data.display(),
    );

    hcp_telemetry::shutdown_signal().await;
    println!("stopping");
    for mut child in [gateway.child, core.child, sim.child] {
        terminate(&mut child).await;
    }
    Ok(())
}

/// Sends SIGTERM and waits up to 10 s, then kills.
pub async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}
