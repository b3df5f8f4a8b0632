//! Migrations after the previous release are expand-only (README
//! "Upgrades"): during a rolling upgrade the previous release's processes
//! run on the schema this release's first process migrated, so nothing they
//! read or write may go or change. On both backends, the schema the
//! migrations up to the previous release make is compared with the schema
//! after each later migration: no table or column of it is dropped or
//! renamed, none changes its type or becomes NOT NULL, a column added to
//! one of its tables is NULL-able or has a default (the old release inserts
//! rows without it), and no statement rewrites a column the old release
//! reads (`UPDATE t SET c` of one of its columns). A migration whose first
//! line is `-- contract: <why>` is a contraction step, exempt, and allowed
//! only once no supported release reads what it removes; the schema after
//! it is the new baseline. Negative controls show each rule refusing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hcp_testkit::db::{Backend, TestDb};
use sqlx::{Connection, Row};

/// The last migration of the previous release (`PREV_RELEASE` in
/// `scripts/prev-release.sh`); bump them together.
const RELEASED_THROUGH: u32 = 22;

/// A column as the old release sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    ty: String,
    not_null: bool,
    has_default: bool,
}

/// Table -> column -> its definition.
type Schema = BTreeMap<String, BTreeMap<String, Column>>;

/// One database connection of either backend.
enum Conn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Conn {
    async fn open(db: &TestDb) -> Conn {
        match db.backend() {
            Backend::Sqlite => {
                let opts: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
                Conn::Sqlite(
                    sqlx::SqliteConnection::connect_with(&opts.create_if_missing(true)).await.unwrap(),
                )
            }
            Backend::Postgres => Conn::Postgres(sqlx::PgConnection::connect(&db.url).await.unwrap()),
        }
    }

    async fn run(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()));
        match self {
            Conn::Sqlite(c) => sql.execute(c).await.map(|_| ()),
            Conn::Postgres(c) => sql.execute(c).await.map(|_| ()),
        }
    }

    async fn schema(&mut self) -> Schema {
        let mut out = Schema::new();
        match self {
            Conn::Sqlite(c) => {
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                )
                .fetch_all(&mut *c)
                .await
                .unwrap();
                for t in tables {
                    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info(\"{t}\")")))
                        .fetch_all(&mut *c)
                        .await
                        .unwrap();
                    let cols = out.entry(t).or_default();
                    for r in rows {
                        let default: Option<String> = r.get("dflt_value");
                        cols.insert(
                            r.get("name"),
                            Column {
                                ty: r.get::<String, _>("type").to_uppercase(),
                                // A primary key was never NULL to HCP
                                // (SQLite alone allows it in one).
                                not_null: r.get::<i64, _>("notnull") != 0 || r.get::<i64, _>("pk") != 0,
                                has_default: default.is_some(),
                            },
                        );
                    }
                }
            }
            Conn::Postgres(c) => {
                let rows = sqlx::query(
                    "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty, \
                     is_nullable::text AS n, column_default::text AS d \
                     FROM information_schema.columns WHERE table_schema = 'public'",
                )
                .fetch_all(&mut *c)
                .await
                .unwrap();
                for r in rows {
                    let default: Option<String> = r.get("d");
                    out.entry(r.get("t")).or_default().insert(
                        r.get("c"),
                        Column {
                            ty: r.get("ty"),
                            not_null: r.get::<String, _>("n") == "NO",
                            has_default: default.is_some(),
                        },
                    );
                }
            }
        }
        out.remove("_sqlx_migrations");
        out
    }
}

/// The migration files of a backend, by number.
fn migrations(backend: Backend) -> Vec<(u32, PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations").join(match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    });
    let mut out: Vec<(u32, PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u32 = name.split('_').next()?.parse().ok()?;
            Some((n, e.path(), std::fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    out.sort_by_key(|(n, _, _)| *n);
    out
}

fn is_contract(sql: &str) -> bool {
    sql.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.trim_start().starts_with("-- contract:"))
}

/// The columns `UPDATE <table> SET <col> = ...` statements of `sql` write,
/// as (table, column), lower case.
fn updated_columns(sql: &str) -> Vec<(String, String)> {
    let text: String =
        sql.lines().map(|l| l.split("--").next().unwrap_or_default()).collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    for stmt in text.split(';') {
        let words: Vec<&str> = stmt.split_whitespace().collect();
        if words.first().is_none_or(|w| !w.eq_ignore_ascii_case("UPDATE")) || words.len() < 3 {
            continue;
        }
        let table = words[1].trim_matches('"').to_lowercase();
        let lower = stmt.to_lowercase();
        let Some(set) = lower.find(" set ") else { continue };
        let assignments = &lower[set + 5..];
        let assignments = assignments.split(" where ").next().unwrap_or_default();
        for part in assignments.split(',') {
            if let Some((col, _)) = part.split_once('=') {
                let col = col.trim().trim_matches('"');
                if !col.is_empty() && col.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.push((table.clone(), col.to_owned()));
                }
            }
        }
    }
    out
}

/// What in `after` (and the text `sql` that made it) would break the
/// release that knew `before`.
fn violations(before: &Schema, after: &Schema, sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (table, cols) in before {
        let Some(now) = after.get(table) else {
            out.push(format!("table {table} is gone (dropped or renamed)"));
            continue;
        };
        for (name, was) in cols {
            match now.get(name) {
                None => out.push(format!("column {table}.{name} is gone (dropped or renamed)")),
                Some(c) if c.ty != was.ty => {
                    out.push(format!("column {table}.{name} changed type from {} to {}", was.ty, c.ty))
                }
                Some(c) if c.not_null && !was.not_null => {
                    out.push(format!("column {table}.{name} became NOT NULL"))
                }
                Some(_) => {}
            }
        }
        for (name, c) in now.iter().filter(|(n, _)| !cols.contains_key(*n)) {
            if c.not_null && !c.has_default {
                out.push(format!(
                    "new column {table}.{name} is NOT NULL without a default (the old release inserts rows without it)"
                ));
            }
        }
    }
    for (table, col) in updated_columns(sql) {
        if before.get(&table).is_some_and(|cols| cols.contains_key(&col)) {
            out.push(format!("UPDATE rewrites {table}.{col}, which the old release reads"));
        }
    }
    out
}

/// The schema after the released migrations, on a connection left there.
async fn released(db: &TestDb) -> (Conn, Schema) {
    let mut conn = Conn::open(db).await;
    for (n, path, sql) in migrations(db.backend()) {
        if n <= RELEASED_THROUGH {
            conn.run(&sql).await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    let schema = conn.schema().await;
    (conn, schema)
}

async fn every_migration_since_the_release_is_expand_only(backend: Backend) {
    let db = TestDb::new(backend).await.unwrap();
    let (mut conn, mut baseline) = released(&db).await;
    assert!(baseline.contains_key("vms"), "{baseline:?}");
    let mut checked = Vec::new();
    for (n, path, sql) in migrations(backend).into_iter().filter(|(n, _, _)| *n > RELEASED_THROUGH) {
        conn.run(&sql).await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let after = conn.schema().await;
        if is_contract(&sql) {
            baseline = after;
            continue;
        }
        let found = violations(&baseline, &after, &sql);
        assert!(found.is_empty(), "{} is not expand-only: {found:#?}", path.display());
        checked.push(n);
    }
    eprintln!(
        "{backend:?}: migrations {checked:?} are expand-only against release migrations 1..={RELEASED_THROUGH}"
    );
}

async fn each_rule_refuses_what_breaks_the_old_release(backend: Backend) {
    let (not_null_added, type_change) = match backend {
        // SQLite refuses ADD COLUMN ... NOT NULL without a default itself;
        // a rebuild can still drop one in.
        Backend::Sqlite => (
            "CREATE TABLE z2 (name TEXT PRIMARY KEY, description TEXT NOT NULL, created_at TEXT NOT NULL, \
             placement_policy TEXT NOT NULL DEFAULT 'spread', cpu_overcommit REAL NOT NULL DEFAULT 4, \
             memory_overcommit REAL NOT NULL DEFAULT 1, region TEXT NOT NULL); \
             INSERT INTO z2 SELECT *, '' FROM zones; DROP TABLE zones; ALTER TABLE z2 RENAME TO zones",
            "CREATE TABLE z2 (name TEXT PRIMARY KEY, description BLOB NOT NULL, created_at TEXT NOT NULL, \
             placement_policy TEXT NOT NULL DEFAULT 'spread', cpu_overcommit REAL NOT NULL DEFAULT 4, \
             memory_overcommit REAL NOT NULL DEFAULT 1); \
             INSERT INTO z2 SELECT * FROM zones; DROP TABLE zones; ALTER TABLE z2 RENAME TO zones",
        ),
        Backend::Postgres => (
            "ALTER TABLE zones ADD COLUMN region TEXT; UPDATE zones SET region = ''; \
             ALTER TABLE zones ALTER COLUMN region SET NOT NULL",
            "ALTER TABLE zones ALTER COLUMN description TYPE BYTEA USING description::bytea",
        ),
    };
    let cases = [
        ("ALTER TABLE vms DROP COLUMN image_source", "column vms.image_source is gone"),
        ("ALTER TABLE vms RENAME COLUMN image_source TO image_ref", "column vms.image_source is gone"),
        ("DROP TABLE vm_tags", "table vm_tags is gone"),
        ("ALTER TABLE flavors RENAME TO sizes", "table flavors is gone"),
        (not_null_added, "new column zones.region is NOT NULL without a default"),
        (type_change, "column zones.description changed type"),
        ("UPDATE images SET source = ''", "UPDATE rewrites images.source"),
    ];
    for (sql, expected) in cases {
        let db = TestDb::new(backend).await.unwrap();
        let (mut conn, before) = released(&db).await;
        conn.run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let after = conn.schema().await;
        let found = violations(&before, &after, sql);
        assert!(
            found.iter().any(|v| v.starts_with(expected)),
            "{sql}: expected {expected:?}, found {found:?}"
        );
        // Marked as a contraction step, the same file passes.
        assert!(is_contract(&format!("-- contract: a test\n{sql}")));
    }
    // Postgres: SET NOT NULL on a column the old release may leave NULL.
    if backend == Backend::Postgres {
        let db = TestDb::new(backend).await.unwrap();
        let (mut conn, before) = released(&db).await;
        let sql = "ALTER TABLE vms ALTER COLUMN user_data SET NOT NULL";
        conn.run(sql).await.unwrap();
        let found = violations(&before, &conn.schema().await, sql);
        assert_eq!(found, vec!["column vms.user_data became NOT NULL".to_owned()]);
    }
}

/// The release the constant stands for has exactly these migrations (when
/// the history is here: a shallow clone skips this, and says so).
#[test]
fn the_released_migrations_are_the_pinned_releases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = std::fs::read_to_string(root.join("scripts/prev-release.sh")).unwrap();
    let commit = script.lines().find_map(|l| l.strip_prefix("PREV_RELEASE=")).expect("PREV_RELEASE");
    for backend in ["postgres", "sqlite"] {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["ls-tree", "--name-only", commit, &format!("migrations/{backend}/")])
            .output();
        let Some(out) = out.ok().filter(|o| o.status.success()) else {
            eprintln!("SKIP checking RELEASED_THROUGH: commit {commit} is not in this clone's history");
            return;
        };
        let listed = String::from_utf8_lossy(&out.stdout);
        let numbers: Vec<u32> =
            listed.lines().filter_map(|l| l.rsplit('/').next()?.split('_').next()?.parse().ok()).collect();
        assert_eq!(numbers.iter().max(), Some(&RELEASED_THROUGH), "{backend}: {listed}");
        // And they are unchanged since: a released migration is never edited.
        for (n, path, text) in
            migrations(if backend == "sqlite" { Backend::Sqlite } else { Backend::Postgres })
        {
            if n > RELEASED_THROUGH {
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let old = std::process::Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(["show", &format!("{commit}:migrations/{backend}/{name}")])
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&old.stdout),
                text,
                "{backend}/{name} was edited after its release"
            );
        }
    }
}

/// A process of this release starts on a database a newer release has
/// migrated further (a rolling upgrade's old process restarted, or a
/// rollback): migrations it does not know are not an error.
async fn a_database_a_newer_release_migrated_is_accepted(backend: Backend) {
    let db = TestDb::new(backend).await.unwrap();
    db.store().await.unwrap();
    let newer = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, $2, $3, $4, $5)";
    let (version, description, checksum) = (9999i64, "a newer release's", vec![0u8; 48]);
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let q = sqlx::query(newer).bind(version).bind(description).bind(true).bind(checksum).bind(0i64);
            q.execute(&pool).await.unwrap();
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let q = sqlx::query(newer).bind(version).bind(description).bind(true).bind(checksum).bind(0i64);
            q.execute(&pool).await.unwrap();
        }
    }
    let store = hcp_store::Store::connect(&db.url, 2).await.unwrap();
    store.migrate().await.unwrap();
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(hcp_testkit::db::Backend::Sqlite).await }) *
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(hcp_testkit::db::Backend::Postgres).await }) *
        }
    };
}

both_backends!(
    every_migration_since_the_release_is_expand_only,
    each_rule_refuses_what_breaks_the_old_release,
    a_database_a_newer_release_migrated_is_accepted
);
