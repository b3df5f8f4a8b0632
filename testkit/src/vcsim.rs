//! VMware's vCenter simulator (vcsim, built by `scripts/vcsim.sh`) as a
//! child process of a test: TLS with a certificate this module makes (a
//! test CA and a leaf for 127.0.0.1), optional per-method delays, killed
//! when dropped.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

/// How to start vcsim.
#[derive(Debug, Clone, Default)]
pub struct VcsimOptions {
    /// Per-method delays (`CloneVM_Task`, 2000 ms).
    pub method_delays: Vec<(String, u64)>,
    /// Listen on this port (0: any).
    pub port: u16,
    /// Only this user and password may log in.
    pub login: Option<(String, String)>,
}

/// A running vcsim.
pub struct Vcsim {
    child: Option<tokio::process::Child>,
    /// `https://127.0.0.1:PORT/sdk`.
    pub url: String,
    /// Its port.
    pub port: u16,
    /// The test CA (PEM) that signed its certificate.
    pub ca_pem: String,
    /// The SHA-256 fingerprint of its certificate, `AA:BB:...`.
    pub fingerprint: String,
    /// The CA's file.
    pub ca_file: PathBuf,
    dir: crate::TempDir,
}

impl std::fmt::Debug for Vcsim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcsim").field("url", &self.url).finish_non_exhaustive()
    }
}

/// The vcsim binary: `HCP_VCSIM`, or where `scripts/vcsim.sh` builds it.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("HCP_VCSIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/hcp-testbed/vcsim/hcp-vcsim"));
    path.exists().then_some(path)
}

/// True when vcsim can run; otherwise says why the test `what` is skipped
/// (and fails under CI, which must run it).
pub fn present_or_skip(what: &str) -> bool {
    if binary().is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what}: vcsim is missing under CI (run scripts/vcsim.sh or set HCP_VCSIM)"
    );
    eprintln!("SKIP {what}: vcsim is not built (run scripts/vcsim.sh, or set HCP_VCSIM)");
    false
}

impl Vcsim {
    /// Starts vcsim and waits until it serves.
    pub async fn start(options: VcsimOptions) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = crate::TempDir::new()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
            .signed_by(&key, &ca)?;
        std::fs::write(dir.path().join("vcsim.pem"), leaf.pem())?;
        std::fs::write(dir.path().join("vcsim.key"), key.serialize_pem())?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        let fingerprint = hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(leaf.der()));
        let mut me = Self {
            child: None,
            url: String::new(),
            port: options.port,
            ca_pem: ca.pem(),
            fingerprint,
            ca_file,
            dir,
        };
        me.spawn(&options).await?;
        Ok(me)
    }

    async fn spawn(&mut self, options: &VcsimOptions) -> anyhow::Result<()> {
        let bin = binary().ok_or_else(|| anyhow::anyhow!("vcsim is not built: run scripts/vcsim.sh"))?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("-l")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("-tls-cert")
            .arg(self.dir.path().join("vcsim.pem"))
            .arg("-tls-key")
            .arg(self.dir.path().join("vcsim.key"));
        if !options.method_delays.is_empty() {
            let delays: Vec<String> =
                options.method_delays.iter().map(|(m, ms)| format!("{m}={ms}")).collect();
            cmd.arg("-method-delay").arg(delays.join(","));
        }
        if let Some((u, p)) = &options.login {
            cmd.arg("-username").arg(u).arg("-password").arg(p);
        }
        // Its log (Go panics of single requests land there) stays with
        // the test's artifacts.
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("vcsim.log"))?;
        // vcsim makes its datastores' directories under the temporary
        // directory and removes them only on a clean exit; a killed vcsim
        // leaves them, so they go in the test's directory, removed with it.
        cmd.env("TMPDIR", self.dir.path());
        cmd.stdout(std::process::Stdio::piped()).stderr(log).kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await? {
                if let Some(url) = l.strip_prefix("HCP_VCSIM_URL=") {
                    return Ok::<_, std::io::Error>(Some(url.to_owned()));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|_| anyhow::anyhow!("vcsim did not start within 30 s"))??
        .ok_or_else(|| anyhow::anyhow!("vcsim exited before serving"))?;
        // https://user:pass@127.0.0.1:PORT/sdk
        let authority = line.split('@').next_back().unwrap_or_default();
        let port: u16 = authority
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("vcsim printed {line}"))?;
        self.port = port;
        self.url = format!("https://127.0.0.1:{port}/sdk");
        // Keep reading stdout so vcsim never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    /// Kills vcsim (SIGKILL) and waits for it to go.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts it again on the same port (a fresh inventory: vcsim keeps
    /// nothing).
    pub async fn restart(&mut self, options: &VcsimOptions) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn(options).await
    }

    /// The TOML of a vSphere provider for this vcsim (its default
    /// inventory: datacenter DC0, cluster DC0_C0, datastore LocalDS_0,
    /// template source `DC0_C0_RP0_VM0`, port group `VM Network`), trusting
    /// it by fingerprint, with `extra` appended.
    pub fn provider_toml(&self, extra: &str) -> String {
        format!(
            "listen = \"127.0.0.1:0\"\nsdk_url = \"{url}\"\ndatacenter = \"DC0\"\n\
             resource_pool = \"host/DC0_C0/Resources\"\ndatastore = \"LocalDS_0\"\n\
             hot_add = true\ncloud_init = true\n\
             [templates]\n\"debian-12\" = \"DC0_C0_RP0_VM0\"\n\
             [networks]\ndefault = \"VM Network\"\nlan = \"DC0_DVPG0\"\n\
             [tls]\nfingerprint = \"{fp}\"\n{extra}\n",
            url = self.url,
            fp = self.fingerprint,
        )
    }
}
