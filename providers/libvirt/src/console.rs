//! The console: the domain's VNC server (on a local address, with its
//! password), which only core's console proxy is told about.

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
        if req.protocol != "vnc" || !self.inner.capabilities.supports_console_vnc {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!("protocol: {:?} consoles are not supported; use \"vnc\" or \"serial\"", req.protocol),
            ));
        }
        let id = req.vm_id.clone();
        let vnc = self
            .call(&format!("console of vm {}", req.vm_id), move |c| {
                let d = c.lookup_domain_by_uuid_string(&id)?;
                if !d.is_active()? {
                    return Err(not_running());
                }
                Ok(domain::vnc_of(&d.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE)?))
            })
            .await?;
        let Some(domain::Vnc { port: Some(port), password }) = vnc else {
            return Err(ProviderError::new(ErrorKind::InvalidState, "the vm has no vnc server"));
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".into(),
            host: self.inner.config.console_host(),
            port: u32::from(port),
            password,
            tls: false,
            path: String::new(),
            ..Default::default()
        })
    }
}
