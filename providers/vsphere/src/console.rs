//! Consoles: a WebMKS ticket served as a websocket VNC endpoint, carrying the
//! trust the console proxy needs towards the host.

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Vsphere;
use crate::errors::map_error;
use crate::soap::VIM25;
use crate::vim;

impl Vsphere {
    /// The WebMKS console of a running VM.
    pub(crate) async fn console(
        &self,
        req: pb::GetConsoleRequest,
    ) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol != "vnc" {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!("{} consoles are not supported (vSphere offers WebMKS, served as vnc)", req.protocol),
            ));
        }
        let vm = self.require(&req.vm_id).await?;
        if !vm.running() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not running", req.vm_id),
            ));
        }
        let acquire = vim::AcquireTicket { xmlns: VIM25, this: &vm.moref, ticket_type: "webmks" };
        let ticket: vim::Ticket =
            self.soap.invoke("AcquireTicket", &acquire, false).await.map_err(map_error)?;
        // wss://host:port/ticket/<ticket>; older servers give only host,
        // port and ticket.
        let (host, port, path) = match ticket.url.strip_prefix("wss://").and_then(|rest| {
            let (authority, path) = rest.split_at(rest.find('/')?);
            let (h, p) = authority.rsplit_once(':')?;
            Some((h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().ok()?, path.to_owned()))
        }) {
            Some(parts) => parts,
            None if !ticket.host.is_empty() => {
                (ticket.host.clone(), ticket.port, format!("/ticket/{}", ticket.ticket))
            }
            None => {
                return Err(ProviderError::new(ErrorKind::Internal, "AcquireTicket gave no WebMKS address"));
            }
        };
        let (tls_ca_pem, tls_fingerprint_sha256) = match &self.console_trust {
            hcp_tls::Trust::Ca(pem) => (String::from_utf8_lossy(pem).into_owned(), String::new()),
            hcp_tls::Trust::Fingerprint(f) => (String::new(), hcp_tls::format_fingerprint(f)),
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".to_owned(),
            host,
            port: u32::from(port),
            // The ticket in the path is the credential; RFB asks for none.
            password: String::new(),
            tls: true,
            path,
            transport: pb::ConsoleTransport::Websocket as i32,
            headers: Vec::new(),
            tls_ca_pem,
            tls_fingerprint_sha256,
            websocket_subprotocol: "binary".to_owned(),
            preconnection_blob: String::new(),
        })
    }
}
