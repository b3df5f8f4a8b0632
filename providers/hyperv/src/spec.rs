//! The VM spec translated for Hyper-V: the parent VHDX of an image and the
//! VM's differencing VHDX grown to the flavor, the virtual switches of HCP
//! networks, CPUs and memory, and adding resource settings.

use hcp_provider_sdk::kit::BackingError;
use hcp_provider_sdk::{ProviderError, pb};

use crate::cim::{Instance, wql_literal};
use crate::errors::{HvError, invalid, map_error};
use crate::inventory::Devices;
use crate::wsman::{Epr, Param};
use crate::{Hyperv, IMS, VSMS, rv, vm_name};

impl Hyperv {
    pub(crate) fn vhd_path(&self, vm_id: &str) -> String {
        format!("{}\\{}.vhdx", self.config.vm_dir.trim_end_matches('\\'), vm_name(vm_id))
    }

    pub(crate) fn parent_vhd(&self, source: &str) -> Result<String, ProviderError> {
        if let Some(p) = self.config.images.get(source) {
            return Ok(p.clone());
        }
        // An imported or captured image: its file on the image share.
        if self.is_share_image(source) {
            return Ok(source.to_owned());
        }
        match &self.config.image_dir {
            Some(dir)
                if !source.is_empty() && !source.contains(['\\', '/', ':']) && !source.contains("..") =>
            {
                Ok(format!("{}\\{source}.vhdx", dir.trim_end_matches('\\')))
            }
            _ => Err(invalid("spec.image.source", format!("no parent VHDX for image source {source:?}"))),
        }
    }

    pub(crate) async fn switch_path(&self, name: &str) -> Result<String, ProviderError> {
        let wql =
            format!("SELECT * FROM Msvm_VirtualEthernetSwitch WHERE ElementName = {}", wql_literal(name));
        let found = self.host.query(&wql).await.map_err(|e| map_error(e.into()))?;
        let sw =
            found.first().ok_or_else(|| invalid("spec.networks", format!("no virtual switch {name:?}")))?;
        let guid = sw.get("Name").unwrap_or_default();
        let host = self.host_name().await.map_err(map_error)?;
        Ok(format!(
            "\\\\{host}\\root\\virtualization\\v2:Msvm_VirtualEthernetSwitch.CreationClassName=\"Msvm_VirtualEthernetSwitch\",Name=\"{guid}\""
        ))
    }

    pub(crate) async fn switches(&self, spec: &pb::VmSpec) -> Result<Vec<String>, ProviderError> {
        if spec.networks.len() > 8 {
            return Err(invalid("spec.networks", "at most 8 networks"));
        }
        let names = self.config.backings().resolve_names(&spec.networks).map_err(|e| match e {
            BackingError::UnknownNetwork { network, .. } => {
                invalid("spec.networks", format!("network {network:?} has no switch on this provider"))
            }
            other => invalid("spec.networks", other),
        })?;
        let mut out = Vec::new();
        for n in names {
            out.push(self.switch_path(&n).await?);
        }
        Ok(out)
    }

    pub(crate) async fn add(&self, vssd: &Instance, setting: Instance) -> Result<Option<Epr>, HvError> {
        let target = Epr::new(
            "Msvm_VirtualSystemSettingData",
            &[("InstanceID", vssd.get("InstanceID").unwrap_or_default())],
        );
        let out = self
            .call(
                &Self::service(VSMS),
                "AddResourceSettings",
                &[
                    ("AffectedConfiguration", Param::Ref(target)),
                    ("ResourceSettings", Param::Instance(setting)),
                ],
            )
            .await?;
        Ok(out.reference("ResultingResourceSettings").cloned())
    }

    /// Sets vCPUs and memory (MB, rounded up to even as Hyper-V wants).
    pub(crate) async fn size(&self, d: &Devices, vcpus: u32, memory_mib: u32) -> Result<(), HvError> {
        let memory = u64::from(memory_mib.div_ceil(2) * 2);
        let mut changes = Vec::new();
        if let Some(p) = &d.processor
            && p.num("VirtualQuantity") != Some(u64::from(vcpus))
        {
            let mut i = Instance::new("Msvm_ProcessorSettingData");
            i.set("InstanceID", "string", p.get("InstanceID").unwrap_or_default());
            i.set("VirtualQuantity", "uint64", vcpus.to_string());
            changes.push(("ResourceSettings", Param::Instance(i)));
        }
        if let Some(m) = &d.memory
            && m.num("VirtualQuantity") != Some(memory)
        {
            let mut i = Instance::new("Msvm_MemorySettingData");
            i.set("InstanceID", "string", m.get("InstanceID").unwrap_or_default());
            i.set("VirtualQuantity", "uint64", memory.to_string());
            changes.push(("ResourceSettings", Param::Instance(i)));
        }
        if !changes.is_empty() {
            self.call(&Self::service(VSMS), "ModifyResourceSettings", &changes).await?;
        }
        Ok(())
    }

    pub(crate) async fn resize_vhd(&self, path: &str, gib: u32) -> Result<(), HvError> {
        let bytes = u64::from(gib) << 30;
        self.call(
            &Self::service(IMS),
            "ResizeVirtualHardDisk",
            &[("Path", Param::Text(path.to_owned())), ("MaxInternalSize", Param::Text(bytes.to_string()))],
        )
        .await
        .map(|_| ())
    }

    /// The VM's differencing VHDX on `parent`, grown to `disk_gib`: made,
    /// or found made by an attempt that died before attaching it.
    pub(crate) async fn ensure_vhd(
        &self,
        vhd: &str,
        parent: &str,
        disk_gib: u32,
    ) -> Result<(), ProviderError> {
        let mut settings = Instance::new("Msvm_VirtualHardDiskSettingData");
        settings
            .set("Type", "uint16", "4")
            .set("Format", "uint16", "3")
            .set("Path", "string", vhd.to_owned())
            .set("ParentPath", "string", parent.to_owned());
        let made = self
            .call(
                &Self::service(IMS),
                "CreateVirtualHardDisk",
                &[("VirtualDiskSettingData", Param::Instance(settings))],
            )
            .await;
        let refused = match made {
            Ok(_) => {
                self.failpoints.hit("create:after-vhd");
                None
            }
            // Made by an attempt that died before attaching it (the resize
            // below tells), or not makeable (the parent is missing).
            Err(e @ (HvError::Job { .. } | HvError::Method { .. })) => {
                tracing::info!(error = %e, vhd, "the VHDX was not made now; it may exist from an earlier attempt");
                Some(e)
            }
            Err(e) => return Err(map_error(e)),
        };
        // The resize is also the check that the VHDX exists.
        match self.resize_vhd(vhd, disk_gib.max(1)).await {
            Ok(()) => {}
            // The image is larger than the flavor: keep its size.
            Err(HvError::Method { code: rv::INVALID_PARAMETER, .. }) => {}
            Err(HvError::Method { code: rv::FILE_NOT_FOUND, .. }) if refused.is_some() => {
                let why = refused.map(|e| e.to_string()).unwrap_or_default();
                return Err(invalid(
                    "spec.image.source",
                    format!("no disk could be made on the image's parent VHDX {parent}: {why}"),
                ));
            }
            Err(e) => return Err(map_error(e)),
        }
        Ok(())
    }
}
