//! The console: the domain's VNC and SPICE servers (on a local address,
//! each with its own password) and its serial port, which only core's
//! console proxy is told about.

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::connection::not_running;
use crate::errors::check_uuid;
use crate::{Libvirt, domain};

impl Libvirt {
    pub(crate) async fn console(
        &self,
        req: pb::GetConsoleRequest,
    ) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol == "serial" && self.inner.capabilities.supports_console_serial {
            check_uuid("vm_id", &req.vm_id)?;
            let id = req.vm_id.clone();
            self.call(&format!("console of vm {}", req.vm_id), move |c| {
                if !c.lookup_domain_by_uuid_string(&id)?.is_active()? {
                    return Err(not_running());
                }
                Ok(())
            })
            .await?;
            return self.serial_console(&req.vm_id);
        }
        let caps = &self.inner.capabilities;
        let read: fn(&str) -> Option<domain::Vnc> = match req.protocol.as_str() {
            "vnc" if caps.supports_console_vnc => domain::vnc_of,
            "spice" if caps.supports_console_spice => domain::spice_of,
            _ => {
                return Err(ProviderError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "protocol: {:?} consoles are not supported; use \"vnc\", \"spice\" or \"serial\"",
                        req.protocol
                    ),
                ));
            }
        };
        check_uuid("vm_id", &req.vm_id)?;
        let id = req.vm_id.clone();
        let server = self
            .call(&format!("console of vm {}", req.vm_id), move |c| {
                let d = c.lookup_domain_by_uuid_string(&id)?;
                if !d.is_active()? {
                    return Err(not_running());
                }
                Ok(read(&d.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE)?))
            })
            .await?;
        // A domain defined before SPICE was added has none until it is
        // defined again.
        let Some(domain::Vnc { port: Some(port), password }) = server else {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("the vm has no {} server", req.protocol),
            ));
        };
        Ok(pb::ConsoleEndpoint {
            protocol: req.protocol.clone(),
            host: self.inner.config.console_host(),
            port: u32::from(port),
            password,
            tls: false,
            path: String::new(),
            ..Default::default()
        })
    }
}
