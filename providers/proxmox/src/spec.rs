//! The VM spec translated for PVE: the template for an image, a free vmid,
//! a DNS-safe name, and the one config update (cores, memory, NICs on
//! bridges, cloud-init and its user-data snippet) with the boot disk grown
//! to the flavor.

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Proxmox;
use crate::client::{self, Method, Params, PveError, lenient};
use crate::errors::{invalid, map_error};
use crate::inventory::{Found, NICS, id_tag};

/// A VM name PVE accepts (dns-name): letters, digits and dashes.
pub(crate) fn dns_name(spec: &pb::VmSpec, vm_id: &str) -> String {
    let raw = if spec.hostname.is_empty() { &spec.name } else { &spec.hostname };
    let cleaned: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() { format!("hcp-{}", &vm_id[..8]) } else { trimmed.chars().take(63).collect() }
}

/// GiB in a PVE size (`32G`, `512M`, `1T`).
pub(crate) fn gib_of(size: &str) -> Option<f64> {
    let (num, unit) = size.split_at(size.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(size.len()));
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "T" => n * 1024.0,
        "G" => n,
        "M" => n / 1024.0,
        "K" => n / (1024.0 * 1024.0),
        "" => n / (1024.0 * 1024.0 * 1024.0),
        _ => return None,
    })
}

impl Proxmox {
    /// Resolves an image source to a template `(node, vmid)`.
    pub(crate) async fn template(&self, source: &str) -> Result<(String, u64), ProviderError> {
        let items = self.resources("vm").await?;
        let wanted = self.config.templates.get(source).map(|v| u64::from(*v)).or_else(|| source.parse().ok());
        let hit = items.iter().find(|i| {
            lenient::flag(&i["template"])
                && match wanted {
                    Some(id) => lenient::u64(&i["vmid"]) == Some(id),
                    None => i["name"].as_str() == Some(source),
                }
        });
        match hit {
            Some(i) => {
                Ok((i["node"].as_str().unwrap_or_default().to_owned(), lenient::u64(&i["vmid"]).unwrap_or(0)))
            }
            None => {
                Err(invalid("spec.image.source", format!("no proxmox template for image source {source:?}")))
            }
        }
    }

    pub(crate) async fn next_vmid(&self) -> Result<u64, ProviderError> {
        let params: Params = match self.config.vmid_range {
            Some((lo, hi)) => {
                vec![("vmid", (u64::from(lo) + rand::random::<u64>() % u64::from(hi - lo + 1)).to_string())]
            }
            None => Vec::new(),
        };
        match self.pve.call(Method::Get, "/cluster/nextid", params.clone()).await {
            Ok(v) => {
                lenient::u64(&v).ok_or_else(|| map_error(PveError::Decode(format!("nextid answered {v}"))))
            }
            // A random pick that is taken: the caller tries another.
            Err(PveError::Status { status: 400, .. }) if !params.is_empty() => Ok(0),
            Err(e) => Err(map_error(e)),
        }
    }

    pub(crate) fn snippet_name(vm_id: &str) -> String {
        format!("hcp-{vm_id}-user.yaml")
    }

    /// Cores, memory, network, cloud-init and the identifying tags, in one
    /// config update (the tags last to land mark the VM configured).
    pub(crate) async fn configure_vm(
        &self,
        f: &Found,
        vm_id: &str,
        spec: &pb::VmSpec,
    ) -> Result<(), ProviderError> {
        let ci = &self.config.cloud_init;
        // One NIC per network, in order: the operator's mapping (backing)
        // names the bridge; else this provider's own table; else its
        // default bridge. No network: one NIC on the default bridge.
        let bridges =
            self.config.backings().resolve_names(&spec.networks).map_err(|e| invalid("spec.networks", e))?;
        if bridges.len() > NICS.len() {
            return Err(invalid("spec.networks", format!("at most {} networks", NICS.len())));
        }
        let mut params: Params = vec![
            ("cores", spec.vcpus.to_string()),
            ("memory", spec.memory_mib.to_string()),
            ("ipconfig0", ci.ipconfig0.clone().unwrap_or_else(|| "ip=dhcp".to_owned())),
            // Addresses come from the guest agent.
            ("agent", "1".to_owned()),
            // A serial port as a unix socket on the node, for the serial
            // console (termproxy). The display stays VGA (`vga` unset), so
            // the VNC console is unchanged; guests that log to ttyS0 (cloud
            // images do) show their boot there.
            (crate::serial::SERIAL_PORT, crate::serial::SERIAL_SOCKET.to_owned()),
            // Last of all, the clone is no longer pending.
            ("tags", format!("hcp;{}", id_tag(vm_id))),
        ];
        for (key, bridge) in NICS.iter().zip(&bridges) {
            params.push((key, format!("virtio,bridge={bridge}")));
        }
        if let Some(user) = &ci.user {
            params.push(("ciuser", user.clone()));
        }
        // The operator's keys, then the tenant's (from its key pairs).
        let keys: Vec<&str> = ci
            .ssh_keys
            .iter()
            .chain(&spec.ssh_authorized_keys)
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .collect();
        if !keys.is_empty() {
            params.push(("sshkeys", client::urlencode(&keys.join("\n"))));
        }
        if let (Some(user_data), Some(storage), Some(dir)) =
            (&spec.user_data, &ci.snippets_storage, &ci.snippets_dir)
        {
            let name = Self::snippet_name(vm_id);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, user_data).and_then(|()| std::fs::rename(&tmp, dir.join(&name))).map_err(
                |e| {
                    ProviderError::new(
                        ErrorKind::Unavailable,
                        format!("cannot write the user data snippet: {e}"),
                    )
                },
            )?;
            params.push(("cicustom", format!("user={storage}:snippets/{name}")));
        }
        // The disk first: the configuration update that follows drops the
        // pending tag, so it must be the last step.
        self.grow_disk(f, spec.disk_gib).await?;
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }

    /// The boot disk's key and its size in GiB.
    pub(crate) async fn boot_disk(&self, f: &Found) -> Result<(String, f64), ProviderError> {
        let config = self
            .pve
            .call(Method::Get, &format!("{}/config", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        let boot_order = config["boot"].as_str().and_then(|b| b.strip_prefix("order=")).unwrap_or_default();
        let disk = boot_order
            .split(';')
            .chain(["scsi0", "virtio0", "sata0", "ide0"])
            .find(|d| config[*d].as_str().is_some_and(|v| !v.contains("media=cdrom")))
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::new(ErrorKind::Internal, "the vm has no boot disk"))?;
        let size = config[disk.as_str()]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .find_map(|p| p.strip_prefix("size="))
            .and_then(gib_of)
            .unwrap_or(0.0);
        Ok((disk, size))
    }

    /// Grows the boot disk to `gib` (never shrinks it; a template disk that
    /// is already larger stays as it is).
    pub(crate) async fn grow_disk(&self, f: &Found, gib: u32) -> Result<(), ProviderError> {
        if gib == 0 {
            return Ok(());
        }
        let (disk, current) = self.boot_disk(f).await?;
        if current >= f64::from(gib) {
            return Ok(());
        }
        let params: Params = vec![("disk", disk), ("size", format!("{gib}G"))];
        self.pve.task(Method::Put, &format!("{}/resize", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_dns_names() {
        let id = "0190b5f2-0000-7000-8000-000000000001";
        let spec = |name: &str, host: &str| pb::VmSpec {
            name: name.into(),
            hostname: host.into(),
            ..Default::default()
        };
        for (s, want) in [
            (spec("web-1", ""), "web-1"),
            (spec("Web_1", "db.prod"), "db-prod"),
            (spec("__", ""), "hcp-0190b5f2"),
        ] {
            assert_eq!(dns_name(&s, id), want);
        }
    }
}
