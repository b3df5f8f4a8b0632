//! A domain as the protocol says it: power state, size, NICs with the
//! addresses libvirt can tell, and the listing of HCP's domains (those
//! carrying its metadata).

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use virt::domain::{Domain, DomainState};

use crate::Libvirt;
use crate::domain::{self, METADATA_NS};

impl Libvirt {
    pub(crate) async fn info(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let id = vm_id.to_owned();
        self.call(&format!("vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    /// Whether the domain exists (and is active).
    pub(crate) async fn presence(&self, vm_id: &str) -> Result<Option<bool>, ProviderError> {
        let id = vm_id.to_owned();
        match self
            .call(&format!("vm {vm_id}"), move |c| Ok(c.lookup_domain_by_uuid_string(&id)?.is_active()?))
            .await
        {
            Ok(active) => Ok(Some(active)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn list(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let vms = self
            .call("list vms", |c| {
                let mut out = Vec::new();
                for d in c.list_all_domains(0)? {
                    let meta =
                        match d.metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0)
                        {
                            Ok(m) => m,
                            // Not ours, or gone since the listing.
                            Err(_) => continue,
                        };
                    let Some(id) = domain::vm_id_of_metadata(&meta) else { continue };
                    match info_of(&id, &d) {
                        Ok(info) => out.push(info),
                        Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }
}

fn power_of(state: DomainState) -> pb::PowerState {
    match state {
        DomainState::Running | DomainState::Blocked | DomainState::Shutdown => pb::PowerState::Running,
        DomainState::Paused | DomainState::PMSuspended => pb::PowerState::Paused,
        DomainState::Crashed => pb::PowerState::Crashed,
        DomainState::Shutoff | DomainState::NoState => pb::PowerState::Shutoff,
    }
}

pub(crate) fn info_of(vm_id: &str, d: &Domain) -> Result<pb::VmInfo, virt::error::Error> {
    let info = d.info()?;
    let power = power_of(info.state.unwrap_or(DomainState::NoState));
    let xml = d.xml_desc(0)?;
    Ok(pb::VmInfo {
        vm_id: vm_id.to_owned(),
        power_state: power as i32,
        native_id: d.name()?,
        vcpus: info.nr_virt_cpu,
        memory_mib: u32::try_from(info.max_mem / 1024).unwrap_or(u32::MAX),
        interfaces: interfaces_of(d, &xml, power == pb::PowerState::Running),
        disk_gib: if domain::type_of(&xml).as_deref() == Some("test") { 0 } else { disk_gib_of(d) },
        host: String::new(),
    })
}

/// The size of the root disk (`vda`) in whole GiB, rounded up; 0 when
/// libvirt cannot tell. (The test driver answers a made-up terabyte, so it
/// is not asked.)
fn disk_gib_of(d: &Domain) -> u32 {
    d.block_info("vda", 0)
        .map(|b| u32::try_from(b.capacity.div_ceil(1 << 30)).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// The domain's NICs in definition order (the order of the spec's
/// networks), with the addresses libvirt can tell for a running domain:
/// from its network's DHCP leases, else from the guest agent. Addresses are
/// best effort: a NIC whose address is unknown is listed without one.
fn interfaces_of(d: &Domain, xml: &str, running: bool) -> Vec<pb::InterfaceInfo> {
    let mut nics = domain::interfaces_of_xml(xml);
    if running && !nics.is_empty() {
        for source in [
            virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        ] {
            let Ok(found) = d.interface_addresses(source, 0) else { continue };
            let mut any = false;
            for iface in found {
                let Some(mac) = iface.hwaddr.map(|m| m.to_ascii_lowercase()) else { continue };
                let Some(nic) = nics.iter_mut().find(|n| n.mac == mac) else { continue };
                for a in iface.addrs {
                    any = true;
                    if a.typed == i64::from(virt::sys::VIR_IP_ADDR_TYPE_IPV6) {
                        nic.ipv6.push(a.addr);
                    } else {
                        nic.ipv4.push(a.addr);
                    }
                }
            }
            if any {
                break;
            }
        }
    }
    nics
}
