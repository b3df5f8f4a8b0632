//! The deployment kit in `deploy/`: the systemd units verify against a root
//! where HCP's binaries are installed where the units expect them, every
//! unit carries the hardening the guide promises, the example configurations
//! are accepted by the processes' own parsers and name the credentials their
//! units load, and `deploy/hcp-token.sh` mints tokens core accepts.
//!
//! systemd is not PID 1 on the test machines, so `systemd-analyze verify
//! --root=DIR` checks the units offline: it loads them and the host's own
//! targets from DIR, and reports unknown keys, values it cannot parse and
//! commands that are not executable in DIR. Two broken units show that it
//! really does (its exit status alone is 0 for an unknown key: the words on
//! stderr are what the test reads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hcp_core::auth::Verifier;
use hcp_core::config::AuthConfig;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A unit file of `deploy/systemd/`, read as `key -> values` of its
/// `[Service]` section (a key may repeat).
struct Unit {
    name: String,
    text: String,
    service: BTreeMap<String, Vec<String>>,
}

impl Unit {
    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap();
        let mut service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                section = line.to_owned();
                continue;
            }
            if section == "[Service]"
                && let Some((k, v)) = line.split_once('=')
            {
                service.entry(k.to_owned()).or_default().push(v.to_owned());
            }
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        Self { name, text, service }
    }

    fn one(&self, key: &str) -> Option<&str> {
        self.service.get(key).and_then(|v| v.last()).map(String::as_str)
    }

    /// The binary `ExecStart=` runs, as an absolute path.
    fn exec(&self) -> &str {
        self.one("ExecStart").and_then(|c| c.split_whitespace().next()).unwrap()
    }

    /// `LoadCredential=ID:PATH` as ID -> PATH.
    fn credentials(&self) -> BTreeMap<String, String> {
        self.service
            .get("LoadCredential")
            .into_iter()
            .flatten()
            .map(|c| {
                let (id, path) = c.split_once(':').unwrap();
                (id.to_owned(), path.to_owned())
            })
            .collect()
    }

    /// Where the process reads credential `id`.
    fn credential_path(&self, id: &str) -> PathBuf {
        assert!(self.credentials().contains_key(id), "{} loads no credential {id}", self.name);
        PathBuf::from(format!("/run/credentials/{}/{id}", self.name))
    }
}

fn units() -> Vec<Unit> {
    let mut units: Vec<Unit> = std::fs::read_dir(deploy_dir().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .map(|p| Unit::read(&p))
        .collect();
    units.sort_by(|a, b| a.name.cmp(&b.name));
    units
}

fn unit(name: &str) -> Unit {
    units().into_iter().find(|u| u.name == name).unwrap_or_else(|| panic!("no unit {name}"))
}

/// True when `systemd-analyze` runs; otherwise says why the test is skipped
/// (and fails under CI, which must run it).
fn systemd_analyze_or_skip(what: &str) -> bool {
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{what}: systemd-analyze is missing under CI");
    eprintln!("SKIP {what}: systemd-analyze is not installed (Debian's systemd package)");
    false
}

/// The host's unit directory (targets and the like, which verify loads as
/// the units' dependencies).
fn host_unit_dir() -> PathBuf {
    ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("multi-user.target").exists())
        .expect("the host's systemd units (multi-user.target)")
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            // Unit aliases and `.wants` links: kept as they are, since verify
            // resolves them inside the root.
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Installs `bin` at `at` inside the root: a hard link when the root is on
/// the same file system as the build (no copy of a large debug binary),
/// else a copy.
fn install_binary(bin: &Path, at: &Path) {
    // Core's API and worker units run one binary: installed once. (A copy
    // onto the hard link made for the first would truncate the build's own
    // binary.)
    if at.exists() {
        return;
    }
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    if std::fs::hard_link(bin, at).is_err() {
        std::fs::copy(bin, at).unwrap();
    }
}

/// `systemd-analyze verify --root=ROOT UNIT...`.
fn verify(root: &Path, units: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .output()
        .unwrap()
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn units_verify_against_a_root_with_the_binaries_installed() {
    if !systemd_analyze_or_skip("the systemd units' verification") {
        return;
    }
    let dir = hcp_testkit::TempDir::new().unwrap();
    let root = dir.path().join("root");
    copy_tree(&host_unit_dir(), &root.join("usr/lib/systemd/system"));
    let system = root.join("etc/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    let units = units();
    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "hcp-core-api.service",
            "hcp-core-worker.service",
            "hcp-gateway.service",
            "hcp-provider-hyperv.service",
            "hcp-provider-libvirt.service",
            "hcp-provider-proxmox.service",
            "hcp-provider-vsphere.service",
        ],
        "a unit for core's two roles, the gateway and each provider"
    );
    for u in &units {
        std::fs::write(system.join(&u.name), &u.text).unwrap();
        let exec = Path::new(u.exec());
        let bin =
            hcp_testkit::workspace_bin(Path::new(HCP), &exec.file_name().unwrap().to_string_lossy()).unwrap();
        // The binary is the process the unit names, and it runs: verify only
        // checks that the path is executable (an empty file would pass).
        let out = Command::new(&bin).arg("--version").output().unwrap();
        assert!(out.status.success(), "{} --version: {}", bin.display(), said(&out));
        install_binary(&bin, &root.join(exec.strip_prefix("/").unwrap()));
    }

    let out = verify(&root, &names);
    let text = said(&out);
    eprintln!(
        "systemd-analyze verify --root {}: {}",
        names.join(" "),
        if text.is_empty() { "no warnings" } else { &text }
    );
    assert!(out.status.success(), "verify failed: {text}");
    assert!(text.trim().is_empty(), "verify warned about our units: {text}");

    // Negative controls in the same root: an unknown key and a value that
    // does not parse are reported, and so is a binary that is not there.
    let api = &units[0].text;
    let misspelt = api
        .replace("ProtectSystem=strict", "ProtectSystem=stricter")
        .replace("NoNewPrivileges=", "NoNewPrivilege=");
    std::fs::write(system.join("hcp-broken.service"), misspelt).unwrap();
    let text = said(&verify(&root, &["hcp-broken.service"]));
    assert!(
        text.contains("Unknown key") && text.contains("NoNewPrivilege"),
        "the unknown key was not reported: {text}"
    );
    assert!(text.contains("stricter"), "the bad value was not reported: {text}");
    let missing = api.replace("/usr/local/bin/hcp-core", "/usr/local/bin/hcp-core-missing");
    std::fs::write(system.join("hcp-missing.service"), missing).unwrap();
    let out = verify(&root, &["hcp-missing.service"]);
    assert!(!out.status.success(), "a missing binary passed: {}", said(&out));
    assert!(said(&out).contains("hcp-core-missing"), "{}", said(&out));

    // The libvirt provider's user, made by systemd-sysusers from our file in
    // the same root: a system user in group libvirt.
    let sysusers = deploy_dir().join("systemd/hcp-libvirt.sysusers.conf");
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg(&sysusers)
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-sysusers: {}", said(&out));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd.lines().find(|l| l.starts_with("hcp-libvirt:")).unwrap_or_else(|| panic!("{passwd}"));
    assert!(user.ends_with(":/var/lib/hcp-libvirt:/usr/sbin/nologin"), "{user}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let libvirt = group.lines().find(|l| l.starts_with("libvirt:")).unwrap_or_else(|| panic!("{group}"));
    assert!(libvirt.ends_with(":hcp-libvirt"), "{libvirt}");

    // The exposure systemd itself computes for each unit, for the report.
    for name in &names {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(name)
            .output()
            .unwrap();
        let text = said(&out);
        let overall =
            text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("(no figure)").trim();
        eprintln!("{name}: {overall}");
    }
}

/// Each row: a hardening setting and the value every unit must give it.
#[test]
fn every_unit_is_hardened() {
    let required: &[(&str, &str)] = &[
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", ""),
    ];
    for u in units() {
        for (key, value) in required {
            let got = u.one(key).unwrap_or_else(|| panic!("{} has no {key}=", u.name));
            assert!(value.is_empty() || got == *value, "{}: {key}={got}, want {value}", u.name);
        }
        let filters = &u.service["SystemCallFilter"];
        assert!(filters.iter().any(|f| f == "@system-service"), "{}: {filters:?}", u.name);
        assert!(u.one("ExecStart").unwrap().starts_with("/usr/local/bin/hcp-"), "{}", u.name);
        if u.name == "hcp-provider-libvirt.service" {
            // A static user in group libvirt; one capability, for the
            // guests' ptys and virtlogd's files.
            assert_eq!(u.one("User"), Some("hcp-libvirt"));
            assert_eq!(u.one("SupplementaryGroups"), Some("libvirt"));
            assert_eq!(u.one("CapabilityBoundingSet"), Some("CAP_DAC_OVERRIDE"));
            assert_eq!(u.one("AmbientCapabilities"), Some("CAP_DAC_OVERRIDE"));
            let sysusers =
                std::fs::read_to_string(deploy_dir().join("systemd/hcp-libvirt.sysusers.conf")).unwrap();
            assert!(sysusers.lines().any(|l| l.starts_with("u hcp-libvirt ")), "{sysusers}");
            assert!(sysusers.lines().any(|l| l == "m hcp-libvirt libvirt"), "{sysusers}");
        } else {
            assert_eq!(u.one("DynamicUser"), Some("yes"), "{}", u.name);
            assert_eq!(u.one("CapabilityBoundingSet"), Some(""), "{}: no capabilities", u.name);
            assert_eq!(u.one("AmbientCapabilities"), Some(""), "{}", u.name);
            assert_eq!(u.one("PrivateDevices"), Some("yes"), "{}", u.name);
            assert_eq!(u.one("ProcSubset"), Some("pid"), "{}", u.name);
        }
        // Writable places are named, never the whole file system.
        assert!(!u.text.contains("ReadWritePaths=/\n"), "{}", u.name);
    }
}

/// Core's example configurations are accepted by core's parser (unknown
/// keys and out-of-range values refused), run the roles their units are
/// named for, read their secrets from the credentials their units load, and
/// write only where their units let them.
#[test]
fn core_example_configs_are_accepted_and_read_their_units_credentials() {
    let dir = deploy_dir().join("systemd/hcp");
    for (file, unit_name, api, worker) in [
        ("core-api.toml", "hcp-core-api.service", true, false),
        ("core-worker.toml", "hcp-core-worker.service", false, true),
    ] {
        let config = hcp_core::Config::from_file(&dir.join(file)).unwrap_or_else(|e| {
            panic!("{file}: {}", hcp_telemetry::error_chain(&e));
        });
        assert_eq!((config.roles.api, config.roles.worker), (api, worker), "{file}");
        let u = unit(unit_name);
        assert!(u.one("ExecStart").unwrap().ends_with(&format!("--config /etc/hcp/{file}")), "{unit_name}");
        assert_eq!(config.auth.hs256_secret_file, Some(u.credential_path("jwt-secret")), "{file}");
        assert_eq!(config.secrets.key_file, Some(u.credential_path("secrets-key")), "{file}");
        assert_eq!(
            config.providers.tls_client_key_file,
            Some(u.credential_path("provider-client-key")),
            "{file}"
        );
        assert!(config.database_url.starts_with("postgres://"), "{file}: production runs on PostgreSQL");
        assert!(config.queue.nats_url.is_some(), "{file}: production runs with NATS");
        // Every credential source is a file in /etc/credstore, which only
        // root reads.
        for (id, path) in u.credentials() {
            assert!(path.starts_with("/etc/credstore/hcp-"), "{unit_name}: credential {id} from {path}");
        }
        if worker {
            let cache = format!("/var/cache/{}", u.one("CacheDirectory").unwrap());
            let state = format!("/var/lib/{}", u.one("StateDirectory").unwrap());
            assert!(config.images.staging_dir.starts_with(&cache), "{file}: staging_dir outside {cache}");
            assert!(config.audit.anchor_file.as_deref().is_some_and(|a| a.starts_with(&state)), "{file}");
        } else {
            assert!(u.one("StateDirectory").is_none() && u.one("CacheDirectory").is_none(), "{unit_name}");
        }
    }
}

/// The providers' example configurations are accepted by each provider's
/// own parser and serve TLS with the key their unit loads.
#[test]
fn provider_example_configs_are_accepted_and_read_their_units_credentials() {
    use hcp_provider_sdk::kit::ProviderConfig;
    use hcp_provider_sdk::kit::config::from_toml;
    let dir = deploy_dir().join("systemd/hcp");
    let read = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
    let server = |name: &str, config: Result<Option<hcp_provider_sdk::kit::ServerConfig>, String>| {
        let server = config.unwrap_or_else(|e| panic!("{name}.toml: {e}"));
        let server = server.unwrap_or_else(|| panic!("{name}.toml has no [server] table"));
        let u = unit(&format!("hcp-provider-{name}.service"));
        assert!(u.one("ExecStart").unwrap().contains(&format!("--config /etc/hcp/{name}.toml")));
        assert_eq!(server.tls_key_file, Some(u.credential_path("tls-key")), "{name}.toml");
        assert!(server.tls_client_ca_file.is_some(), "{name}.toml: only core's certificate may call it");
    };
    let libvirt = from_toml::<hcp_provider_libvirt::Config>(&read("libvirt"));
    server("libvirt", libvirt.map(|c| c.server().cloned()).map_err(|e| e.to_string()));
    let proxmox = from_toml::<hcp_provider_proxmox::config::Config>(&read("proxmox"));
    server("proxmox", proxmox.map(|c| c.server().cloned()).map_err(|e| e.to_string()));
    let vsphere = from_toml::<hcp_provider_vsphere::config::Config>(&read("vsphere"));
    server("vsphere", vsphere.map(|c| c.server().cloned()).map_err(|e| e.to_string()));
    let hyperv = from_toml::<hcp_provider_hyperv::config::Config>(&read("hyperv"));
    server("hyperv", hyperv.map(|c| c.server().cloned()).map_err(|e| e.to_string()));
    // The libvirt provider's state lives in its unit's StateDirectory.
    let libvirt = from_toml::<hcp_provider_libvirt::Config>(&read("libvirt")).unwrap();
    let u = unit("hcp-provider-libvirt.service");
    assert_eq!(libvirt.state_dir, Path::new("/var/lib").join(u.one("StateDirectory").unwrap()));
}

/// `deploy/hcp-token.sh` mints tokens that core's verifier accepts with the
/// issuer and secret of the example configuration, carrying the role,
/// tenant and projects asked for; another secret's are refused.
#[tokio::test]
async fn the_token_script_mints_what_core_accepts() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = hcp_testkit::TempDir::new().unwrap();
    let write_secret = |name: &str, text: &str| {
        let path = dir.path().join(name);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        path
    };
    // As an operator makes it: 32 random bytes in hex, with a newline.
    let secret = write_secret("jwt-secret", &format!("{}\n", hex::encode(rand::random::<[u8; 32]>())));
    let other = write_secret("other", &hex::encode(rand::random::<[u8; 32]>()));
    let example = hcp_core::Config::from_file(&deploy_dir().join("systemd/hcp/core-api.toml")).unwrap();
    let auth = AuthConfig { hs256_secret_file: Some(secret.clone()), ..example.auth.clone() };
    let verifier = Verifier::from_config(&auth).unwrap();
    let mint = |secret: &Path, args: &[&str]| {
        let out = Command::new("bash")
            .arg(deploy_dir().join("hcp-token.sh"))
            .arg(secret)
            .arg(&auth.issuer)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", said(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };

    let ops = verifier.verify(&mint(&secret, &["ops-alice", "600", "ops.admin"])).await.unwrap();
    assert_eq!((ops.subject.as_str(), ops.tenant_id.as_deref()), ("ops-alice", None));
    assert_eq!(ops.roles, ["ops.admin"]);
    let tenant =
        verifier.verify(&mint(&secret, &["bob", "600", "tenant.member", "acme", "web", "db"])).await.unwrap();
    assert_eq!(tenant.tenant_id.as_deref(), Some("acme"));
    assert_eq!(tenant.projects, ["web", "db"]);
    assert!(
        verifier.verify(&mint(&other, &["eve", "600", "ops.admin"])).await.is_err(),
        "another key's token"
    );
    // Values that would need escaping in JSON are refused, not escaped.
    let out = Command::new("bash")
        .arg(deploy_dir().join("hcp-token.sh"))
        .args([secret.to_str().unwrap(), "iss", "a\"b", "60", "ops.admin"])
        .output()
        .unwrap();
    assert!(!out.status.success() && said(&out).contains("refusing"), "{}", said(&out));
}
