//! Images in the store, on SQLite and PostgreSQL: a catalog from before
//! per-provider backings keeps working after migration 0023 (its one source
//! stays what every provider resolves, and the previous release's inserts
//! still work), and a project's
//! private image shadows a public one of the same name for that project
//! only.

use std::borrow::Cow;

use hcp_domain::model::*;
use hcp_proto::ids::EventId;
use hcp_store::{ImageQuery, Store};
use hcp_testkit::db::{Backend, TestDb};
use hcp_testkit::fixtures::sim_provider;

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(hcp_testkit::db::Backend::Sqlite).await }) *
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(hcp_testkit::db::Backend::Postgres).await }) *
        }
    };
}

store_tests!(
    an_image_catalog_from_before_backings_keeps_working,
    a_private_image_shadows_a_public_one_in_its_project
);

fn audit(action: &str, resource: &str) -> AuditEvent {
    AuditEvent {
        id: EventId::new(),
        at: now(),
        actor: "ops".into(),
        tenant_id: String::new(),
        project_id: String::new(),
        action: action.into(),
        resource_type: "image".into(),
        resource_id: resource.into(),
        outcome: "succeeded".into(),
        job_id: String::new(),
        trace_id: String::new(),
        detail: String::new(),
    }
}

/// Writes a zone and an image the way the schema before 0023 held them.
macro_rules! old_image {
    ($pool:expr) => {{
        let t = now().to_rfc3339();
        for sql in [
            format!("INSERT INTO zones (name, description, created_at) VALUES ('z1', '', '{t}')"),
            format!(
                "INSERT INTO images (name, os_type, source, min_disk_gib, description, created_at) \
                 VALUES ('legacy', 'linux', 'legacy-template', 2, 'from before', '{t}')"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute($pool).await.unwrap();
        }
    }};
}

/// The schema as it was before images had backings (migrations up to
/// 0022), with an image whose one source every provider resolved.
async fn before_backings(db: &TestDb) -> Store {
    macro_rules! migrate_until {
        ($dir:literal, $pool:expr) => {{
            let mut m = sqlx::migrate!($dir);
            m.migrations = Cow::Owned(m.migrations.iter().filter(|x| x.version < 23).cloned().collect());
            m.run($pool).await.unwrap();
        }};
    }
    match db.backend() {
        Backend::Sqlite => {
            let opts: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
            let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true)).await.unwrap();
            migrate_until!("../../migrations/sqlite", &pool);
            old_image!(&pool);
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            migrate_until!("../../migrations/postgres", &pool);
            old_image!(&pool);
        }
    }
    Store::connect(&db.url, 4).await.unwrap()
}

async fn an_image_catalog_from_before_backings_keeps_working(backend: Backend) {
    let db = TestDb::new(backend).await.unwrap();
    let store = before_backings(&db).await;
    for name in ["p-one", "p-two"] {
        store.insert_provider(&sim_provider(name), None, &audit("provider.register", name)).await.unwrap();
    }
    store.migrate().await.unwrap();
    let image = store.get_image_by_name("legacy", None).await.unwrap();
    assert_eq!((image.status, image.visibility), (ImageStatus::Available, ImageVisibility::Public));
    // Its one source stays what every provider resolves (the previous
    // release's processes read it during an upgrade), registered before
    // the migration or after.
    assert_eq!(image.source, "legacy-template");
    assert!(image.backings.is_empty(), "{:?}", image.backings);
    assert_eq!((image.min_disk_gib, image.description.as_str()), (2, "from before"));
    assert_eq!(image.updated_at, image.created_at);
    store
        .insert_provider(&sim_provider("p-three"), None, &audit("provider.register", "p-three"))
        .await
        .unwrap();
    let image = store.get_image_by_name("legacy", None).await.unwrap();
    assert_eq!(image.backing_on("p-three"), Some("legacy-template"));
    let image = store
        .set_image_backing("legacy", "p-three", "tpl-3", &audit("image.backing.set", "legacy"))
        .await
        .unwrap();
    assert_eq!(image.backing_on("p-three"), Some("tpl-3"));
    assert_eq!(image.backing_on("p-one"), Some("legacy-template"));
    // The previous release's processes still insert images their way after
    // 0023 (no id, no updated_at), and a public name stays unique to them.
    let t = now().to_rfc3339();
    let old_insert = |name: &str| {
        format!(
            "INSERT INTO images (name, os_type, source, min_disk_gib, description, created_at) \
             VALUES ('{name}', 'linux', 'tpl-{name}', 1, '', '{t}')"
        )
    };
    let run = |sql: String| {
        let url = db.url.clone();
        async move {
            match backend {
                Backend::Sqlite => {
                    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.map(|_| ())
                }
                Backend::Postgres => {
                    let pool = sqlx::PgPool::connect(&url).await.unwrap();
                    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.map(|_| ())
                }
            }
        }
    };
    run(old_insert("by-old")).await.unwrap();
    assert!(run(old_insert("by-old")).await.is_err(), "a second public image of one name");
    let image = store.get_image_by_name("by-old", None).await.unwrap();
    assert_eq!((image.source.as_str(), image.status), ("tpl-by-old", ImageStatus::Available));
    assert_eq!(image.updated_at, image.created_at);
    assert!(store.list_images(&ImageQuery::default()).await.unwrap().iter().any(|i| i.id == image.id));
}

async fn a_private_image_shadows_a_public_one_in_its_project(backend: Backend) {
    let db = TestDb::new(backend).await.unwrap();
    let store = db.store().await.unwrap();
    let public = Image::public("base", "public-tpl", now());
    store.create_image(&public, &audit("image.create", "base")).await.unwrap();
    let private = Image {
        visibility: ImageVisibility::Private,
        tenant_id: "acme".into(),
        project_id: "demo".into(),
        ..Image::public("base", "private-tpl", now())
    };
    store.create_image(&private, &audit("image.create", "base")).await.unwrap();
    let demo = Scope::new("acme", "demo");
    assert_eq!(store.get_image_by_name("base", Some(&demo)).await.unwrap().id, private.id);
    assert_eq!(
        store.get_image_by_name("base", Some(&Scope::new("acme", "other"))).await.unwrap().id,
        public.id
    );
    assert_eq!(
        store.get_image_by_name("base", Some(&Scope::new("evil", "demo"))).await.unwrap().id,
        public.id
    );
    assert_eq!(store.get_image_by_name("base", None).await.unwrap().id, public.id);
    let listed = |q: ImageQuery| {
        let store = &store;
        async move { store.list_images(&q).await.unwrap().into_iter().map(|i| i.id).collect::<Vec<_>>() }
    };
    assert_eq!(listed(ImageQuery::default()).await, vec![public.id]);
    assert_eq!(listed(ImageQuery { scope: Some(demo.clone()), ..Default::default() }).await.len(), 2);
    assert_eq!(
        listed(ImageQuery { scope: Some(Scope::new("evil", "demo")), ..Default::default() }).await,
        vec![public.id]
    );
    assert_eq!(listed(ImageQuery { every_project: true, ..Default::default() }).await.len(), 2);
    // One name per project: a second private image of the name is refused.
    let twin = Image { id: hcp_proto::ids::ImageId::new(), ..private.clone() };
    assert!(matches!(
        store.create_image(&twin, &audit("image.create", "base")).await,
        Err(hcp_store::StoreError::AlreadyExists { .. })
    ));
}
