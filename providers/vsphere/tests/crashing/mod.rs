//! The provider binary as its own process with a failpoint, for the crash
//! tests of `volumes.rs` and `images.rs`.

use hcp_provider_sdk::pb;

/// The provider as its own process with one failpoint, configured and
/// ready for calls; it aborts when a call reaches the failpoint.
pub(crate) struct Crashing {
    child: tokio::process::Child,
    pub(crate) compute: hcp_proto::provider::compute_client::ComputeClient<tonic::transport::Channel>,
}

impl Crashing {
    pub(crate) async fn start(config: &std::path::Path, failpoint: &str) -> Self {
        use hcp_proto::provider::compute_client::ComputeClient;
        use hcp_proto::provider::identity_client::IdentityClient;
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcp-provider-vsphere"))
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env(hcp_provider_vsphere::FAILPOINTS_ENV, failpoint)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The provider announces its address on stdout.
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(i) = l.find("127.0.0.1:") {
                addr = l[i..].split(|c: char| c.is_whitespace() || c == '"').next().map(str::to_owned);
                break;
            }
        }
        let addr = addr.expect("the provider printed its address");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        IdentityClient::new(channel.clone())
            .configure(pb::ConfigureRequest {
                credentials: [
                    ("username".to_owned(), "hcp".to_owned()),
                    ("password".to_owned(), "secret".to_owned()),
                ]
                .into(),
            })
            .await
            .unwrap();
        Self { child, compute: ComputeClient::new(channel) }
    }

    /// Waits for the process to have died (it must have).
    pub(crate) async fn died(mut self, step: &str) {
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{step}: the provider is still running"))
            .unwrap();
        assert!(!status.success(), "{step}: {status}");
    }
}
