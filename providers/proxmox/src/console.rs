//! Consoles: `vncproxy` served as a websocket VNC endpoint that carries the
//! provider's own API authentication and TLS trust, which the gateway opens;
//! and the serial console (`serial.rs`).

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Proxmox;
use crate::client::{Method, Params, PveError, Trust, lenient};
use crate::errors::map_error;

impl Proxmox {
    /// The VNC or serial console of a running VM.
    pub(crate) async fn console(
        &self,
        req: pb::GetConsoleRequest,
    ) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol == "serial" {
            return self.serial_console(&req.vm_id).await;
        }
        if req.protocol != "vnc" {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!("{} consoles are not supported; use \"vnc\" or \"serial\"", req.protocol),
            ));
        }
        let f = self.require(&req.vm_id).await?;
        if f.status != "running" {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not running", req.vm_id),
            ));
        }
        let params: Params = vec![("websocket", "1".to_owned()), ("generate-password", "1".to_owned())];
        let data = self
            .pve
            .call(Method::Post, &format!("{}/vncproxy", f.path()), params)
            .await
            .map_err(map_error)?;
        let port = lenient::u64(&data["port"])
            .ok_or_else(|| map_error(PveError::Decode("vncproxy without port".into())))?;
        let ticket = data["ticket"]
            .as_str()
            .ok_or_else(|| map_error(PveError::Decode("vncproxy without ticket".into())))?;
        let (host, api_port) = self.pve.endpoint();
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("port", &port.to_string())
            .append_pair("vncticket", ticket)
            .finish();
        // The websocket is opened by the console proxy, as this provider:
        // same credentials, same trust in the API's certificate.
        let headers = self
            .pve
            .delegated_auth_headers()
            .await
            .map_err(map_error)?
            .into_iter()
            .map(|(name, value)| pb::ConsoleHeader { name: name.to_owned(), value })
            .collect();
        let (tls_ca_pem, tls_fingerprint_sha256) = match self.pve.trust() {
            Trust::Ca(pem) => (String::from_utf8_lossy(pem).into_owned(), String::new()),
            Trust::Fingerprint(f) => (String::new(), hcp_tls::format_fingerprint(f)),
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".to_owned(),
            host: host.to_owned(),
            port: u32::from(api_port),
            // PVE's VNC authentication takes the password vncproxy
            // generated, or the ticket when it generated none.
            password: data["password"].as_str().unwrap_or(ticket).to_owned(),
            tls: true,
            path: format!("/api2/json{}/vncwebsocket?{query}", f.path()),
            transport: pb::ConsoleTransport::Websocket.into(),
            headers,
            tls_ca_pem,
            tls_fingerprint_sha256,
            websocket_subprotocol: "binary".to_owned(),
            preconnection_blob: String::new(),
        })
    }
}
