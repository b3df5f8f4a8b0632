//! Consoles: a WebMKS ticket served as a websocket VNC endpoint, carrying the
//! trust the console proxy needs towards the host.

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Vsphere;
use crate::errors::map_error;
use crate::soap::VIM25;
use crate::vim;

/// The port a ticket without one is used on (vSphere's "default port").
const DEFAULT_PORT: u16 = 443;

/// Where a WebMKS ticket is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebmksAddress {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The websocket's path, from its `/`.
    pub(crate) path: String,
}

/// A ticket whose address cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TicketError {
    /// The ticket's `url` is not `wss://host[:port]/path`.
    #[error("AcquireTicket answered a WebMKS url that is not wss://host[:port]/path: {url:?}")]
    BadUrl {
        /// The URL as vSphere gave it.
        url: String,
    },
}

/// The address of a WebMKS ticket: its `url` when vSphere gave one; else
/// built from its host (or, when it has none, `vsphere_host`, the host the
/// provider talks to: "the client is assumed to know it"), its port (else
/// 443) and `/ticket/<ticket>`.
pub(crate) fn webmks_address(ticket: &vim::Ticket, vsphere_host: &str) -> Result<WebmksAddress, TicketError> {
    if let Some(url) = &ticket.url {
        return split_wss(url).ok_or_else(|| TicketError::BadUrl { url: url.clone() });
    }
    Ok(WebmksAddress {
        host: ticket.host.clone().unwrap_or_else(|| vsphere_host.to_owned()),
        port: ticket.port.unwrap_or(DEFAULT_PORT),
        path: format!("/ticket/{}", ticket.ticket),
    })
}

/// `wss://host[:port]/path` (an IPv6 host in brackets); the port defaults
/// to 443.
fn split_wss(url: &str) -> Option<WebmksAddress> {
    let rest = url.strip_prefix("wss://")?;
    let (authority, path) = rest.split_at(rest.find('/')?);
    let (host, port) = match authority.rsplit_once(':') {
        // A colon inside brackets belongs to an IPv6 address, not a port.
        Some((h, p)) if !authority.ends_with(']') && (!h.contains(':') || h.starts_with('[')) => {
            (h, p.parse().ok()?)
        }
        _ => (authority, DEFAULT_PORT),
    };
    let host = host.trim_matches(['[', ']']);
    (!host.is_empty()).then(|| WebmksAddress { host: host.to_owned(), port, path: path.to_owned() })
}

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
        let address = webmks_address(&ticket, &self.vsphere_host)
            .map_err(|e| ProviderError::new(ErrorKind::Internal, e.to_string()))?;
        let (tls_ca_pem, tls_fingerprint_sha256) = match &self.console_trust {
            hcp_tls::Trust::Ca(pem) => (String::from_utf8_lossy(pem).into_owned(), String::new()),
            hcp_tls::Trust::Fingerprint(f) => (String::new(), hcp_tls::format_fingerprint(f)),
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".to_owned(),
            host: address.host,
            port: u32::from(address.port),
            // The ticket in the path is the credential; RFB asks for none.
            password: String::new(),
            tls: true,
            path: address.path,
            transport: pb::ConsoleTransport::Websocket as i32,
            headers: Vec::new(),
            tls_ca_pem,
            tls_fingerprint_sha256,
            websocket_subprotocol: "binary".to_owned(),
            preconnection_blob: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(host: Option<&str>, port: Option<u16>, url: Option<&str>) -> vim::Ticket {
        vim::Ticket { ticket: "t-1".into(), host: host.map(Into::into), port, url: url.map(Into::into) }
    }

    fn at(host: &str, port: u16, path: &str) -> Result<WebmksAddress, TicketError> {
        Ok(WebmksAddress { host: host.into(), port, path: path.into() })
    }

    #[test]
    fn a_ticket_is_used_where_its_url_or_its_parts_say() {
        let bad = |url: &str| Err(TicketError::BadUrl { url: url.into() });
        let cases = [
            // The URL wins, whatever else the ticket says or leaves out.
            (
                ticket(Some("esx1"), Some(443), Some("wss://esx1:9443/ticket/t-1")),
                at("esx1", 9443, "/ticket/t-1"),
            ),
            (ticket(None, None, Some("wss://esx1/ticket/t-1")), at("esx1", 443, "/ticket/t-1")),
            (ticket(None, None, Some("wss://[fd00::1]:8443/ticket/t-1")), at("fd00::1", 8443, "/ticket/t-1")),
            // No URL: host, port and ticket.
            (ticket(Some("esx1"), Some(902), None), at("esx1", 902, "/ticket/t-1")),
            (ticket(Some("esx1"), None, None), at("esx1", 443, "/ticket/t-1")),
            // No host either: the host the provider talks to.
            (ticket(None, Some(8989), None), at("vc.example.net", 8989, "/ticket/t-1")),
            (ticket(None, None, None), at("vc.example.net", 443, "/ticket/t-1")),
            // A URL that is not wss://host[:port]/path is refused, not guessed.
            (ticket(Some("esx1"), None, Some("https://esx1/ticket/t-1")), bad("https://esx1/ticket/t-1")),
            (ticket(None, None, Some("wss://esx1")), bad("wss://esx1")),
            (ticket(None, None, Some("wss://esx1:http/ticket/t-1")), bad("wss://esx1:http/ticket/t-1")),
            (ticket(None, None, Some("wss://:443/ticket/t-1")), bad("wss://:443/ticket/t-1")),
        ];
        for (t, want) in cases {
            assert_eq!(webmks_address(&t, "vc.example.net"), want, "{t:?}");
        }
    }

    #[test]
    fn tickets_decode_with_what_vsphere_left_out_as_absent() {
        let decode = |body: &str| {
            let text = format!("<returnval>{body}</returnval>");
            let doc = roxmltree::Document::parse(&text).unwrap();
            <vim::Ticket as vim::FromXml>::from_xml(&vim::Xml::of(doc.root_element()))
        };
        assert_eq!(
            decode("<ticket>t-1</ticket><cfgFile>x.vmx</cfgFile><host>esx1</host><port>902</port><url>wss://esx1:902/ticket/t-1</url>").unwrap(),
            ticket(Some("esx1"), Some(902), Some("wss://esx1:902/ticket/t-1"))
        );
        assert_eq!(decode("<ticket>t-1</ticket><cfgFile>x.vmx</cfgFile>").unwrap(), ticket(None, None, None));
        let e = decode("<ticket>t-1</ticket><port>99999</port>").unwrap_err();
        assert_eq!(e.to_string(), "VirtualMachineTicket: port \"99999\" is not valid");
        let e = decode("<cfgFile>x.vmx</cfgFile>").unwrap_err();
        assert_eq!(e.to_string(), "VirtualMachineTicket without ticket");
    }
}
