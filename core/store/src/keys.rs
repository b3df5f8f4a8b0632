//! Keys shared by every core process (`core_keys`): made once by whichever
//! process first asks, then read by all.

use chrono::Utc;

use super::{StoreError, StoreResult, on_pool};

impl super::Store {
    /// The 32-byte key named `name`, made from `fresh` if no process has
    /// made it yet. Concurrent first calls agree: the first insert wins and
    /// everyone reads the winner.
    pub async fn shared_key(&self, name: &str, fresh: [u8; 32]) -> StoreResult<[u8; 32]> {
        let stored: Vec<u8> = on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO core_keys (name, key, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(fresh.as_slice())
            .bind(Utc::now())
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "core key"))?;
            sqlx::query_scalar("SELECT key FROM core_keys WHERE name = $1")
                .bind(name)
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "core key"))?
        });
        stored.try_into().map_err(|_| StoreError::Corrupt(format!("core key {name} is not 32 bytes")))
    }
}
