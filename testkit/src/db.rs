//! A fresh, migrated database per test.

use hcp_store::Store;

use crate::TempDir;

/// Environment variable naming the PostgreSQL server used by tests (a URL
/// of a database the test user may connect to and create databases from).
pub const ENV_TEST_POSTGRES_URL: &str = "HCP_TEST_POSTGRES_URL";

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A new PostgreSQL database.
    Postgres,
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDb {
    /// URL to give core or [`Store::connect`].
    pub url: String,
    backend: Backend,
    pg_admin: Option<(String, String)>,
    _dir: Option<TempDir>,
}

fn admin_url() -> String {
    std::env::var(ENV_TEST_POSTGRES_URL)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl TestDb {
    /// Creates an empty database of `backend` (not migrated).
    pub async fn new(backend: Backend) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = TempDir::new()?;
                let url = format!("sqlite://{}", dir.path().join("hcp.db").display());
                Ok(Self { url, backend, pg_admin: None, _dir: Some(dir) })
            }
            Backend::Postgres => Self::on_server(&admin_url()).await,
        }
    }

    /// Creates an empty PostgreSQL database on the server `admin` names (a
    /// URL of a database the test user may create databases from).
    pub async fn on_server(admin: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        let name = format!("hcp_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin).await.map_err(|e| {
            anyhow::anyhow!("cannot reach PostgreSQL at {admin} ({ENV_TEST_POSTGRES_URL}): {e}")
        })?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
        let url = format!("{base}/{name}");
        Ok(Self { url, backend: Backend::Postgres, pg_admin: Some((admin.to_owned(), name)), _dir: None })
    }

    /// Which backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Connects and migrates.
    pub async fn store(&self) -> anyhow::Result<Store> {
        let store = Store::connect(&self.url, 8).await?;
        store.migrate().await?;
        Ok(store)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop the PostgreSQL database from a helper thread: Drop cannot be
        // async, and the test's runtime may already be shutting down.
        if let Some((admin, name)) = self.pg_admin.take()
            && !std::thread::panicking()
        {
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}
