//! What every create reads and operators rarely change, kept in memory: the
//! catalog (flavors, images, zones, networks, zone placement settings) with
//! the providers and their hosts, as one [`Catalog`] snapshot; and the load
//! placed on each host.
//!
//! Coherence. Each write through this store invalidates its own process's
//! copy before it returns ([`Store::catalog_changed`]). On PostgreSQL,
//! triggers (migration 0010) send `NOTIFY hcp_catalog` when a change
//! commits, from any process or from psql, and every store listens: a
//! notification invalidates, and while the listening connection is down the
//! copy is not used at all (every read goes to the database) and is reloaded
//! once it is back, so a missed notification cannot leave it stale. Changes
//! placement does not read (a provider's probe time, a host report that
//! changes nothing) do not notify. An entry is also never older than
//! [`MAX_AGE`]. Between a commit in one process and the notification
//! reaching another (milliseconds), the other may still see the old catalog;
//! it never fails to see something new, because a name missing from the
//! snapshot is looked up in the database.
//!
//! Host loads are a sum over every VM, too costly per create: they are read
//! at most every [`LOADS_MAX_AGE`], and a create placed by this process adds
//! to its copy at once. Placement reads loads to rank hosts and leave out
//! full ones; a refusal is given only after the loads were summed again,
//! and the accepting transaction checks the chosen host's room, the strict
//! placement group rules and the quota once more, under locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hcp_proto::ids::ProviderId;

use super::{Store, StoreResult};
use hcp_domain::model::{Flavor, Host, HostLoad, Image, Network, Provider, Zone, ZonePlacement};

/// The longest a catalog snapshot is used, notifications or not.
pub const MAX_AGE: Duration = Duration::from_secs(30);
/// The longest the host loads are used before they are summed again.
pub const LOADS_MAX_AGE: Duration = Duration::from_secs(1);
/// The channel the triggers notify on.
pub(super) const CHANNEL: &str = "hcp_catalog";

/// One consistent read of the catalog, providers and hosts.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By name.
    pub flavors: HashMap<String, Flavor>,
    /// Every image, public and private, by (tenant, project, name); a
    /// public image's tenant and project are empty. See [`Catalog::image`].
    pub images: HashMap<(String, String, String), Image>,
    /// Every zone.
    pub zones: Vec<Zone>,
    /// Every network of every zone.
    pub networks: Vec<Network>,
    /// Every provider.
    pub providers: Vec<Provider>,
    /// Every host of every provider.
    pub hosts: Vec<Host>,
    /// Each zone's placement settings, by zone.
    pub placement: HashMap<String, ZonePlacement>,
}

impl Catalog {
    /// The image `name` as `scope` sees it: the project's private one,
    /// else the public one.
    pub fn image(&self, scope: &hcp_domain::model::Scope, name: &str) -> Option<&Image> {
        self.images
            .get(&(scope.tenant.clone(), scope.project.clone(), name.to_owned()))
            .or_else(|| self.images.get(&(String::new(), String::new(), name.to_owned())))
    }
}

/// What placement has put on each host, by provider and host name.
pub type Loads = HashMap<(ProviderId, String), HostLoad>;

struct Snapshot {
    generation: u64,
    at: Instant,
    catalog: Arc<Catalog>,
}

/// The shared state behind every clone of a [`Store`].
#[derive(Default)]
pub(super) struct Cache {
    /// Bumped by every invalidation; a snapshot is good while it matches.
    generation: AtomicU64,
    /// Whether invalidations reach this process (always with SQLite; with
    /// PostgreSQL while the listening connection is up).
    live: AtomicBool,
    snapshot: Mutex<Option<Snapshot>>,
    /// One reload at a time; the others wait for it and use its result.
    reload: tokio::sync::Mutex<()>,
    loads: Mutex<Option<(Instant, Arc<Loads>)>>,
    loads_reload: tokio::sync::Mutex<()>,
    /// Dropped with the cache, which ends the listener.
    stop: Option<tokio::sync::watch::Sender<()>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A cache every write reaches (one process: SQLite).
    pub(super) fn local() -> Arc<Self> {
        Arc::new(Self { live: AtomicBool::new(true), ..Self::default() })
    }

    /// A cache kept by listening on `pool` (PostgreSQL); not used until
    /// the listener is up.
    pub(super) fn listening(pool: sqlx::PgPool) -> Arc<Self> {
        let (stop, stopped) = tokio::sync::watch::channel(());
        let cache = Arc::new(Self { stop: Some(stop), ..Self::default() });
        tokio::spawn(listen(pool, Arc::downgrade(&cache), stopped));
        cache
    }

    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        *self.loads.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
        self.invalidate();
    }

    fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    fn current(&self) -> Option<Arc<Catalog>> {
        if !self.is_live() {
            return None;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let guard = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .filter(|s| s.generation == generation && s.at.elapsed() < MAX_AGE)
            .map(|s| Arc::clone(&s.catalog))
    }

    fn current_loads(&self) -> Option<Arc<Loads>> {
        let guard = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().filter(|(at, _)| at.elapsed() < LOADS_MAX_AGE).map(|(_, l)| Arc::clone(l))
    }

    /// Whether a provider's health or capabilities differ from the copy's
    /// (true when there is no copy or no such provider in it).
    pub(super) fn catalog_differs(
        &self,
        id: ProviderId,
        healthy: bool,
        capabilities: Option<&hcp_domain::model::Capabilities>,
    ) -> bool {
        let guard = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = guard.as_ref() else { return true };
        match s.catalog.providers.iter().find(|p| p.id == id) {
            Some(p) => p.healthy != healthy || capabilities.is_some_and(|c| *c != p.capabilities),
            None => true,
        }
    }

    /// Stops the listener (closing the store).
    pub(super) fn stop(&self) {
        self.live.store(false, Ordering::Release);
        if let Some(stop) = &self.stop {
            stop.send_replace(());
        }
    }
}

/// Keeps the cache coherent with PostgreSQL: listens on [`CHANNEL`] and
/// invalidates on every notification; while not listening, the cache is
/// not used. Ends when the cache is dropped or the store closed.
async fn listen(pool: sqlx::PgPool, cache: Weak<Cache>, mut stopped: tokio::sync::watch::Receiver<()>) {
    stopped.mark_unchanged();
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            l = connected => l,
            _ = stopped.changed() => return,
        };
        match listener.as_mut() {
            Ok(l) => {
                let Some(c) = cache.upgrade() else { return };
                c.set_live(true);
                drop(c);
                delay = Duration::from_millis(100);
                loop {
                    let next = tokio::select! {
                        n = l.try_recv() => n,
                        _ = stopped.changed() => return,
                    };
                    let Some(c) = cache.upgrade() else { return };
                    match next {
                        Ok(Some(_)) => c.invalidate(),
                        Ok(None) | Err(_) => {
                            // Notifications may have been lost: do not use
                            // the copy until listening again.
                            c.set_live(false);
                            tracing::warn!(
                                "catalog cache: lost the notification connection; reading the database until it is back"
                            );
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if let Some(c) = cache.upgrade() {
                    c.set_live(false);
                }
                tracing::warn!(error = %e, "catalog cache: cannot listen for changes; reading the database");
            }
        }
        drop(listener);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stopped.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

impl Store {
    /// Invalidates this process's copy of the catalog. Every store method
    /// that writes the catalog, providers or hosts calls it after commit.
    pub fn catalog_changed(&self) {
        self.cache.invalidate();
    }

    /// Whether the catalog copy is in use (for tests and diagnostics).
    pub fn catalog_cached(&self) -> bool {
        self.cache.is_live()
    }

    /// The catalog, providers and hosts: the in-memory copy when it is good,
    /// else read (once for all concurrent callers) and kept.
    pub async fn catalog(&self) -> StoreResult<Arc<Catalog>> {
        if let Some(c) = self.cache.current() {
            return Ok(c);
        }
        let _one = self.cache.reload.lock().await;
        if let Some(c) = self.cache.current() {
            return Ok(c);
        }
        let generation = self.cache.generation.load(Ordering::Acquire);
        let catalog = Arc::new(self.read_catalog().await?);
        if self.cache.is_live() {
            // Stored under the generation it was read at: an invalidation
            // during the read makes it stale at once.
            *self.cache.snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Snapshot { generation, at: Instant::now(), catalog: Arc::clone(&catalog) });
        }
        Ok(catalog)
    }

    /// A provider from the copy, else from the database (one registered
    /// after the copy was read).
    pub async fn provider_cached(&self, id: ProviderId) -> StoreResult<Provider> {
        match self.catalog().await?.providers.iter().find(|p| p.id == id) {
            Some(p) => Ok(p.clone()),
            None => self.get_provider(id).await,
        }
    }

    /// The catalog read from the database now, bypassing the copy.
    pub async fn catalog_uncached(&self) -> StoreResult<Catalog> {
        self.read_catalog().await
    }

    async fn read_catalog(&self) -> StoreResult<Catalog> {
        let zones = self.list_zones().await?;
        let mut placement = HashMap::new();
        for p in self.zone_placements().await? {
            placement.insert(p.zone.clone(), p);
        }
        Ok(Catalog {
            flavors: self.list_flavors().await?.into_iter().map(|f| (f.name.clone(), f)).collect(),
            images: self
                .list_images(&super::ImageQuery { every_project: true, ..Default::default() })
                .await?
                .into_iter()
                .map(|i| ((i.tenant_id.clone(), i.project_id.clone(), i.name.clone()), i))
                .collect(),
            zones,
            networks: self.list_networks(None).await?,
            providers: self.list_providers().await?,
            hosts: self.list_hosts(None).await?,
            placement,
        })
    }

    /// What is placed on each host, at most [`LOADS_MAX_AGE`] old plus what
    /// this process placed since.
    pub async fn placed_loads(&self) -> StoreResult<Arc<Loads>> {
        if let Some(l) = self.cache.current_loads() {
            return Ok(l);
        }
        let _one = self.cache.loads_reload.lock().await;
        if let Some(l) = self.cache.current_loads() {
            return Ok(l);
        }
        self.sum_loads().await
    }

    /// What is placed on each host, summed now (and kept as the copy): for
    /// a refusal, which is only given on what the database says.
    pub async fn placed_loads_now(&self) -> StoreResult<Arc<Loads>> {
        let _one = self.cache.loads_reload.lock().await;
        self.sum_loads().await
    }

    async fn sum_loads(&self) -> StoreResult<Arc<Loads>> {
        let loads: Arc<Loads> = Arc::new(self.host_loads().await?.into_iter().collect());
        *self.cache.loads.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), Arc::clone(&loads)));
        Ok(loads)
    }

    /// Adds a VM this process just placed to its copy of the host loads.
    pub fn note_placed(&self, provider: ProviderId, host: &str, vcpus: u32, memory_mib: u32) {
        let mut guard = self.cache.loads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, loads)) = guard.as_mut() {
            let l = Arc::make_mut(loads).entry((provider, host.to_owned())).or_default();
            l.vms += 1;
            l.vcpus += u64::from(vcpus);
            l.memory_mib += u64::from(memory_mib);
        }
    }
}
