//! Snapshots, named by their HCP id on libvirt: created (once), listed,
//! reverted and deleted.

use hcp_provider_sdk::{ProviderError, pb};
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;

use crate::errors::check_uuid;
use crate::inventory::info_of;
use crate::{Libvirt, domain};

impl Libvirt {
    pub(crate) async fn snapshot_create(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        check_uuid("snapshot_id", &req.snapshot_id)?;
        let (id, snap, name) = (req.vm_id.clone(), req.snapshot_id.clone(), req.name.clone());
        self.call(&format!("snapshot of vm {}", req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let s = match Domain::lookup_snapshot_by_name(&d, &snap, 0) {
                Ok(s) => s,
                Err(_) => d.create_snapshot_xml(&domain::snapshot_xml(&snap, &name), 0)?,
            };
            Ok(snapshot_info(&id, &s)?)
        })
        .await
    }

    pub(crate) async fn snapshot_list(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let id = vm_id.to_owned();
        self.call(&format!("snapshots of vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let mut out = Vec::new();
            for s in d.list_all_snapshots(0)? {
                if uuid::Uuid::parse_str(&s.name()?).is_ok() {
                    out.push(snapshot_info(&id, &s)?);
                }
            }
            out.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
            Ok(out)
        })
        .await
    }

    pub(crate) async fn snapshot_revert(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let (id, snap) = (req.vm_id.clone(), req.snapshot_id.clone());
        self.call(&format!("snapshot {} of vm {}", req.snapshot_id, req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let s = Domain::lookup_snapshot_by_name(&d, &snap, 0)?;
            s.revert(0)?;
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    pub(crate) async fn snapshot_delete(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let (id, snap) = (req.vm_id.clone(), req.snapshot_id.clone());
        self.call(&format!("snapshot {} of vm {}", req.snapshot_id, req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            match Domain::lookup_snapshot_by_name(&d, &snap, 0) {
                Ok(s) => {
                    s.delete(0)?;
                    Ok(true)
                }
                Err(e) if e.code().is(virt::error::ErrorNumber::NoDomainSnapshot) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

fn snapshot_info(vm_id: &str, s: &DomainSnapshot) -> Result<pb::SnapshotInfo, virt::error::Error> {
    let name = s.name()?;
    Ok(pb::SnapshotInfo {
        snapshot_id: name.clone(),
        vm_id: vm_id.to_owned(),
        name: domain::snapshot_description(&s.xml_desc(0)?),
        native_id: name,
    })
}
