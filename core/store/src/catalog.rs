//! The catalog: flavors, images, zones and their networks. Written by ops,
//! read by everyone.

use std::collections::BTreeMap;

use sqlx::types::Json;

use super::{Quoted, sql};
use super::{StoreError, StoreResult, col, on_pool, to_i32, to_u32};
use hcp_domain::model::{AuditEvent, Flavor, Network, VmStatus, VolumeStatus, VolumeType, Zone};

/// What [`super::Store::replace_network`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkReplace {
    /// Replaced; `attached` VMs (not deleted) use the network.
    Replaced {
        /// VMs attached to the network, on any provider.
        attached: u64,
    },
    /// Refused, nothing changed: the replacement drops the backing of
    /// `provider`, which has `vms` VMs attached to the network.
    InUse {
        /// The provider whose backing would go.
        provider: String,
        /// Its VMs attached to the network.
        vms: u64,
    },
}

impl super::Store {
    /// Inserts a flavor and its audit event.
    pub async fn create_flavor(&self, f: &Flavor, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO flavors (name, vcpus, memory_mib, disk_gib, description, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&f.name)
            .bind(to_i32(f.vcpus))
            .bind(to_i32(f.memory_mib))
            .bind(to_i32(f.disk_gib))
            .bind(&f.description)
            .bind(f.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, &format!("flavor {}", f.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        Ok(())
    }

    /// Returns every flavor, by name.
    pub async fn list_flavors(&self) -> StoreResult<Vec<Flavor>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT name, vcpus, memory_mib, disk_gib, description, created_at FROM flavors \
                 ORDER BY name",
            )
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "flavors"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(Flavor {
                    name: col!(row, "name"),
                    vcpus: to_u32(col!(row, "vcpus"), "vcpus")?,
                    memory_mib: to_u32(col!(row, "memory_mib"), "memory_mib")?,
                    disk_gib: to_u32(col!(row, "disk_gib"), "disk_gib")?,
                    description: col!(row, "description"),
                    created_at: col!(row, "created_at"),
                });
            }
            Ok(out)
        })
    }

    /// Returns one flavor.
    pub async fn get_flavor(&self, name: &str) -> StoreResult<Flavor> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT name, vcpus, memory_mib, disk_gib, description, created_at FROM flavors WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "flavor"))?
            .ok_or(StoreError::NotFound)?;
            Ok(Flavor {
                name: col!(&row, "name"),
                vcpus: to_u32(col!(&row, "vcpus"), "vcpus")?,
                memory_mib: to_u32(col!(&row, "memory_mib"), "memory_mib")?,
                disk_gib: to_u32(col!(&row, "disk_gib"), "disk_gib")?,
                description: col!(&row, "description"),
                created_at: col!(&row, "created_at"),
            })
        })
    }

    /// Deletes a flavor unless a VM that is not deleted uses it.
    pub async fn delete_flavor(&self, name: &str, audit: &AuditEvent) -> StoreResult<()> {
        self.delete_catalog_entry("flavors", "flavor", name, audit).await
    }

    /// Inserts a zone and its audit event.
    pub async fn create_zone(&self, z: &Zone, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query("INSERT INTO zones (name, description, created_at) VALUES ($1, $2, $3)")
                .bind(&z.name)
                .bind(&z.description)
                .bind(z.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, &format!("zone {}", z.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        Ok(())
    }

    /// Returns every zone, by name.
    pub async fn list_zones(&self) -> StoreResult<Vec<Zone>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query("SELECT name, description, created_at FROM zones ORDER BY name")
                .fetch_all(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "zones"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(Zone {
                    name: col!(row, "name"),
                    description: col!(row, "description"),
                    created_at: col!(row, "created_at"),
                });
            }
            Ok(out)
        })
    }

    /// Deletes a zone unless a provider or a VM that is not deleted is in it.
    pub async fn delete_zone(&self, name: &str, audit: &AuditEvent) -> StoreResult<()> {
        self.delete_catalog_entry("zones", "zone", name, audit).await
    }

    async fn delete_catalog_entry(
        &self,
        table: &'static str,
        vm_column: &'static str,
        name: &str,
        audit: &AuditEvent,
    ) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let in_use: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM vms WHERE {vm_column} = $1 AND status <> {vm_deleted}", vm_deleted = Quoted(VmStatus::Deleted.as_str())
            )))
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, table))?;
            if in_use > 0 {
                return Err(StoreError::Conflict(format!("{vm_column} {name} is used by {in_use} vm(s)")));
            }
            if table == "zones" {
                // A zone without VMs takes its networks with it.
                sqlx::query("DELETE FROM networks WHERE zone = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "networks"))?;
            }
            let done = sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE name = $1")))
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, &format!("{vm_column} {name}")))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            self.catalog_changed();
            Ok(())
        })
    }
}

impl super::Store {
    /// Creates a network of a zone (backings included) with its audit
    /// event. NotFound when the zone does not exist, AlreadyExists when the
    /// zone has a network of that name (it is never replaced here: see
    /// [`Self::replace_network`]).
    pub async fn create_network(&self, n: &Network, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let zone: Option<String> = sqlx::query_scalar("SELECT name FROM zones WHERE name = $1")
                .bind(&n.zone)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "zone"))?;
            if zone.is_none() {
                return Err(StoreError::NotFound);
            }
            sqlx::query(
                "INSERT INTO networks (zone, name, description, backings, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&n.zone)
            .bind(&n.name)
            .bind(&n.description)
            .bind(Json(&n.backings))
            .bind(n.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, &format!("network {}/{}", n.zone, n.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            self.catalog_changed();
            Ok(())
        })
    }

    /// Replaces an existing network's description and backings (its
    /// `created_at` stays) with its audit event, unless that removes the
    /// backing of a provider whose VMs (not deleted) are attached to the
    /// network: then nothing changes and the answer names the provider.
    /// NotFound when the zone has no such network.
    pub async fn replace_network(&self, n: &Network, audit: &AuditEvent) -> StoreResult<NetworkReplace> {
        on_pool!(transaction self, |tx| {
            let old: Option<Json<BTreeMap<String, String>>> =
                sqlx::query_scalar("SELECT backings FROM networks WHERE zone = $1 AND name = $2")
                    .bind(&n.zone)
                    .bind(&n.name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "network"))?;
            let Some(Json(old)) = old else { return Err(StoreError::NotFound) };
            let rows = sqlx::query(sql!(
                "SELECT vms.networks, providers.name AS provider FROM vms \
                 JOIN providers ON providers.id = vms.provider_id \
                 WHERE vms.zone = $1 AND vms.status <> {vm_deleted}",
                vm_deleted = VmStatus::Deleted
            ))
            .bind(&n.zone)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            // VMs attached to the network, by provider name.
            let mut attached: BTreeMap<String, u64> = BTreeMap::new();
            for row in &rows {
                let nets: Json<Vec<hcp_domain::model::NetworkAttachment>> = col!(row, "networks");
                if nets.0.iter().any(|a| a.network == n.name) {
                    *attached.entry(col!(row, "provider")).or_default() += 1;
                }
            }
            for provider in old.keys().filter(|p| !n.backings.contains_key(*p)) {
                if let Some(&vms) = attached.get(provider) {
                    return Ok(NetworkReplace::InUse { provider: provider.clone(), vms });
                }
            }
            sqlx::query("UPDATE networks SET description = $1, backings = $2 WHERE zone = $3 AND name = $4")
                .bind(&n.description)
                .bind(Json(&n.backings))
                .bind(&n.zone)
                .bind(&n.name)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, &format!("network {}/{}", n.zone, n.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            self.catalog_changed();
            Ok(NetworkReplace::Replaced { attached: attached.values().sum() })
        })
    }

    /// Lists networks by zone and name, of one zone when given.
    pub async fn list_networks(&self, zone: Option<&str>) -> StoreResult<Vec<Network>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT zone, name, description, backings, created_at FROM networks \
                 WHERE ($1 IS NULL OR zone = $1) ORDER BY zone, name",
            )
            .bind(zone)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "networks"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let backings: Json<BTreeMap<String, String>> = col!(row, "backings");
                out.push(Network {
                    zone: col!(row, "zone"),
                    name: col!(row, "name"),
                    description: col!(row, "description"),
                    backings: backings.0,
                    created_at: col!(row, "created_at"),
                });
            }
            Ok(out)
        })
    }

    /// Deletes a network unless a VM that is not deleted in its zone is
    /// attached to it.
    pub async fn delete_network(&self, zone: &str, name: &str, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let rows = sqlx::query(sql!("SELECT networks FROM vms WHERE zone = $1 AND status <> {vm_deleted}", vm_deleted = VmStatus::Deleted))
                .bind(zone)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut in_use = 0;
            for row in &rows {
                let nets: Json<Vec<hcp_domain::model::NetworkAttachment>> = col!(row, "networks");
                if nets.0.iter().any(|n| n.network == name) {
                    in_use += 1;
                }
            }
            if in_use > 0 {
                return Err(StoreError::Conflict(format!("network {name} is used by {in_use} vm(s)")));
            }
            let done = sqlx::query("DELETE FROM networks WHERE zone = $1 AND name = $2")
                .bind(zone)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, &format!("network {name}")))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            self.catalog_changed();
            Ok(())
        })
    }
}

impl super::Store {
    /// Inserts a volume type and its audit event.
    pub async fn create_volume_type(&self, t: &VolumeType, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO volume_types (name, description, max_size_gib, storage, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&t.name)
            .bind(&t.description)
            .bind(to_i32(t.max_size_gib))
            .bind(Json(&t.storage))
            .bind(t.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, &format!("volume type {}", t.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Returns every volume type, by name.
    pub async fn list_volume_types(&self) -> StoreResult<Vec<VolumeType>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT name, description, max_size_gib, storage, created_at FROM volume_types ORDER BY name",
            )
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume types"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let storage: Json<BTreeMap<String, String>> = col!(row, "storage");
                out.push(VolumeType {
                    name: col!(row, "name"),
                    description: col!(row, "description"),
                    max_size_gib: to_u32(col!(row, "max_size_gib"), "max_size_gib")?,
                    storage: storage.0,
                    created_at: col!(row, "created_at"),
                });
            }
            Ok(out)
        })
    }

    /// Returns one volume type.
    pub async fn get_volume_type(&self, name: &str) -> StoreResult<VolumeType> {
        self.list_volume_types().await?.into_iter().find(|t| t.name == name).ok_or(StoreError::NotFound)
    }

    /// Deletes a volume type unless a volume that is not deleted uses it.
    pub async fn delete_volume_type(&self, name: &str, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let used: i64 = sqlx::query_scalar(sql!(
                "SELECT COUNT(*) FROM volumes WHERE volume_type = $1 AND status <> {deleted}",
                deleted = VolumeStatus::Deleted
            ))
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume type"))?;
            if used > 0 {
                return Err(StoreError::Conflict(format!("volume type {name} is used by {used} volumes")));
            }
            let done = sqlx::query("DELETE FROM volume_types WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "volume type"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }
}
