//! The console: VMConnect (`rdp`), reached over TCP 2179 with the VM's GUID
//! as the preconnection blob the gateway sends.

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Hyperv;

impl Hyperv {
    /// The VMConnect console of a VM.
    pub(crate) async fn console(
        &self,
        req: pb::GetConsoleRequest,
    ) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol != "rdp" {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!(
                    "{} consoles are not offered by Hyper-V; its console is VMConnect (rdp)",
                    req.protocol
                ),
            ));
        }
        let vm = self.require(&req.vm_id).await?;
        let host = match &self.config.vmconnect.host {
            Some(h) => h.clone(),
            None => self.config.url().map(|u| u.host).unwrap_or_default(),
        };
        // VMConnect does its own TLS and CredSSP with the client: the proxy
        // only names the VM (its GUID) in the preconnection PDU.
        Ok(pb::ConsoleEndpoint {
            protocol: "rdp".to_owned(),
            host,
            port: u32::from(self.config.vmconnect.port),
            transport: pb::ConsoleTransport::Tcp.into(),
            preconnection_blob: vm.guid,
            ..Default::default()
        })
    }
}
