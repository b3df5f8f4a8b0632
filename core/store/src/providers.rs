//! Registered provider endpoints: what the handshake learned, and the health
//! and capabilities each probe refreshes.

use hcp_proto::ids::ProviderId;
use sqlx::types::Json;

use super::sql;
use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::{AuditEvent, Capabilities, Provider, ProviderTls, Sealed, VmStatus};

const PROVIDER_COLUMNS: &str = "id, name, zone, endpoint, plugin_name, plugin_version, \
     hypervisor, protocol_version, capabilities, healthy, health_message, last_probe_at, created_at, \
     (credentials IS NOT NULL) AS has_credentials, tls_ca_pem, tls_client_cert_pem, tls_client_key, \
     tls_server_name, allow_plaintext";

macro_rules! provider_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let caps: Json<Capabilities> = col!(row, "capabilities");
        let client_key: Option<Vec<u8>> = col!(row, "tls_client_key");
        Provider {
            id: ProviderId(id),
            name: col!(row, "name"),
            zone: col!(row, "zone"),
            endpoint: col!(row, "endpoint"),
            plugin_name: col!(row, "plugin_name"),
            plugin_version: col!(row, "plugin_version"),
            hypervisor: col!(row, "hypervisor"),
            protocol_version: col!(row, "protocol_version"),
            capabilities: caps.0,
            healthy: col!(row, "healthy"),
            health_message: col!(row, "health_message"),
            last_probe_at: col!(row, "last_probe_at"),
            created_at: col!(row, "created_at"),
            has_credentials: col!(row, "has_credentials"),
            tls: ProviderTls {
                ca_pem: col!(row, "tls_ca_pem"),
                client_cert_pem: col!(row, "tls_client_cert_pem"),
                client_key: client_key.map(Sealed),
                server_name: col!(row, "tls_server_name"),
            },
            allow_plaintext: col!(row, "allow_plaintext"),
        }
    }};
}

impl super::Store {
    /// Inserts a provider after a successful handshake, with its sealed
    /// credentials if it has any (its TLS trust, with the sealed client key,
    /// is part of `p`).
    pub async fn insert_provider(
        &self,
        p: &Provider,
        sealed_credentials: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO providers (id, name, zone, endpoint, plugin_name, plugin_version, \
                 hypervisor, protocol_version, capabilities, healthy, health_message, \
                 last_probe_at, created_at, credentials, tls_ca_pem, tls_client_cert_pem, tls_client_key, \
                 tls_server_name, allow_plaintext) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
                 $12, $13, $14, $15, $16, $17, $18, $19)",
            )
            .bind(p.id.0)
            .bind(&p.name)
            .bind(&p.zone)
            .bind(&p.endpoint)
            .bind(&p.plugin_name)
            .bind(&p.plugin_version)
            .bind(&p.hypervisor)
            .bind(&p.protocol_version)
            .bind(Json(&p.capabilities))
            .bind(p.healthy)
            .bind(&p.health_message)
            .bind(p.last_probe_at)
            .bind(p.created_at)
            .bind(sealed_credentials)
            .bind(&p.tls.ca_pem)
            .bind(&p.tls.client_cert_pem)
            .bind(p.tls.client_key.as_ref().map(|k| k.0.as_slice()))
            .bind(&p.tls.server_name)
            .bind(p.allow_plaintext)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, &format!("provider {}", p.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        Ok(())
    }

    /// Returns every provider, by name.
    pub async fn list_providers(&self) -> StoreResult<Vec<Provider>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PROVIDER_COLUMNS} FROM providers ORDER BY name"
            )))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "providers"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(provider_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Returns one provider.
    pub async fn get_provider(&self, id: ProviderId) -> StoreResult<Provider> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PROVIDER_COLUMNS} FROM providers WHERE id = $1"
            )))
            .bind(id.0)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "provider"))?
            .ok_or(StoreError::NotFound)?;
            Ok(provider_from_row!(&row))
        })
    }

    /// Returns a provider's sealed credentials, if any.
    pub async fn provider_credentials(&self, id: ProviderId) -> StoreResult<Option<Vec<u8>>> {
        on_pool!(self, |pool| {
            let v: Option<Option<Vec<u8>>> =
                sqlx::query_scalar("SELECT credentials FROM providers WHERE id = $1")
                    .bind(id.0)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "provider"))?;
            v.ok_or(StoreError::NotFound)
        })
    }

    /// Stores the result of a health probe.
    pub async fn update_provider_health(
        &self,
        id: ProviderId,
        healthy: bool,
        message: &str,
        capabilities: Option<&Capabilities>,
        at: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<()> {
        on_pool!(self, |pool| {
            let q = match capabilities {
                Some(caps) => sqlx::query(
                    "UPDATE providers SET healthy = $1, health_message = $2, last_probe_at = $3, \
                     capabilities = $5 WHERE id = $4",
                )
                .bind(healthy)
                .bind(message)
                .bind(at)
                .bind(id.0)
                .bind(Json(caps)),
                None => sqlx::query(
                    "UPDATE providers SET healthy = $1, health_message = $2, last_probe_at = $3 \
                     WHERE id = $4",
                )
                .bind(healthy)
                .bind(message)
                .bind(at)
                .bind(id.0),
            };
            q.execute(pool).await.map_err(|e| StoreError::from_sqlx(e, "provider"))?;
        });
        // Placement reads health and capabilities, not the probe's time or
        // message (the PostgreSQL trigger draws the same line).
        if self.cache.catalog_differs(id, healthy, capabilities) {
            self.catalog_changed();
        }
        Ok(())
    }

    /// Removes a provider unless VMs that are not deleted live on it.
    pub async fn remove_provider(&self, id: ProviderId, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let live: i64 =
                sqlx::query_scalar(sql!("SELECT COUNT(*) FROM vms WHERE provider_id = $1 AND status <> {vm_deleted}", vm_deleted = VmStatus::Deleted))
                    .bind(id.0)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "provider"))?;
            if live > 0 {
                return Err(StoreError::Conflict(format!(
                    "provider {id} still hosts {live} vm(s); delete them first"
                )));
            }
            let any: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE provider_id = $1")
                .bind(id.0)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "provider"))?;
            if any > 0 {
                // Deleted VMs keep their history, which names the provider;
                // the row stays, marked unreachable for placement.
                return Err(StoreError::Conflict(format!(
                    "provider {id} has vm history; it cannot be removed, only left unhealthy"
                )));
            }
            let done = sqlx::query("DELETE FROM providers WHERE id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "provider"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            sqlx::query("DELETE FROM hosts WHERE provider_id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "hosts"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            self.catalog_changed();
            Ok(())
        })
    }
}
