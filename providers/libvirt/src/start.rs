//! Start-up: connecting to libvirt (retrying for a while), the domain type
//! the host offers for the configured accelerator, the capabilities this
//! host has, `run`, and [`StartError`] saying why it could not start.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcp_provider_sdk::pb;
use virt::connect::Connect;

use crate::config::{Accelerator, Config};
use crate::connection::open;
use crate::disks::set_mode;
use crate::{FAILPOINTS_ENV, Inner, Libvirt, seed};

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// libvirt did not answer.
    #[error("cannot connect to {uri}: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// The configured accelerator is not offered by the host.
    #[error("accelerator: {0}")]
    Accelerator(String),
    /// The state directory is unusable.
    #[error("state_dir {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The serial console relay could not listen.
    #[error("serial relay on {listen}")]
    SerialRelay {
        /// The address (`vnc_listen`, `serial_port`).
        listen: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The volume pool could not be made ready.
    #[error("volume pool")]
    Pool(#[from] crate::pool::PoolError),
    /// The configuration is unusable (its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

/// The domain type the host offers for `accelerator` (from libvirt's
/// capabilities XML), and the accelerator's name as reported.
fn domain_type(
    conn: &Connect,
    uri: &str,
    accelerator: Accelerator,
) -> Result<(&'static str, &'static str), StartError> {
    if uri.starts_with("test:") {
        return Ok(("test", "test"));
    }
    let caps = conn
        .capabilities()
        .map_err(|e| StartError::Connect { uri: uri.into(), message: e.message().into() })?;
    let doc = roxmltree::Document::parse(&caps).map_err(|e| StartError::Accelerator(e.to_string()))?;
    let offered: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("guest"))
        .filter(|g| g.descendants().any(|a| a.has_tag_name("arch") && a.attribute("name") == Some("x86_64")))
        .flat_map(|g| {
            g.descendants().filter(|d| d.has_tag_name("domain")).filter_map(|d| d.attribute("type"))
        })
        .collect();
    let kvm = offered.contains(&"kvm");
    match accelerator {
        Accelerator::Kvm if !kvm => {
            Err(StartError::Accelerator("kvm requested but the host offers none".into()))
        }
        Accelerator::Kvm => Ok(("kvm", "kvm")),
        Accelerator::Auto if kvm => Ok(("kvm", "kvm")),
        Accelerator::Auto | Accelerator::Tcg if offered.contains(&"qemu") => Ok(("qemu", "tcg")),
        _ => {
            Err(StartError::Accelerator(format!("the host offers no x86_64 qemu domains (has {offered:?})")))
        }
    }
}

impl Libvirt {
    /// Connects to libvirt (retrying for up to ten seconds) and reads what
    /// the host offers.
    pub async fn connect(config: Config) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.state_dir)
            .and_then(|()| set_mode(&config.state_dir, 0o755))
            .map_err(|source| StartError::StateDir { path: config.state_dir.clone(), source })?;
        virt::error::clear_error_callback();
        let uri = config.uri.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            let target = uri.clone();
            match tokio::task::spawn_blocking(move || open(&target)).await {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if Instant::now() < deadline => {
                    tracing::warn!(uri = %config.uri, error = %e.message(), "libvirt not answering yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(Err(e)) => return Err(StartError::Connect { uri, message: e.message().into() }),
                Err(e) => return Err(StartError::Connect { uri, message: e.to_string() }),
            }
        };
        let (domain_type, accelerator) = domain_type(&conn, &uri, config.accelerator)?;
        // Volumes need a storage pool; the test driver's pools live inside
        // one connection, out of virsh's reach, so it offers no volumes.
        let volumes = domain_type != "test";
        if volumes {
            let (c, name, dir) = (conn.clone(), config.volume_pool.clone(), config.volume_pool_dir());
            let (target, extra) = (uri.clone(), config.extra_volume_pools.clone());
            tokio::task::spawn_blocking(move || crate::pool::prepare(&c, &target, &name, &dir, &extra))
                .await
                .map_err(|e| StartError::Connect { uri: uri.clone(), message: e.to_string() })??;
        }
        let lib_version = conn.lib_version().unwrap_or_default();
        let cloud_init = seed::tool_available();
        if !cloud_init {
            tracing::warn!("genisoimage is missing: cloud-init is not offered");
        }
        let mut attributes = HashMap::new();
        attributes.insert("accelerator".to_owned(), accelerator.to_owned());
        attributes.insert(
            "libvirt_version".to_owned(),
            format!("{}.{}.{}", lib_version / 1_000_000, lib_version / 1000 % 1000, lib_version % 1000),
        );
        attributes.insert("uri".to_owned(), uri.clone());
        let capabilities = pb::Capabilities {
            // Images are volumes of the default pool (images.rs), so
            // like volumes they need a real pool.
            supports_image_import: volumes,
            supports_capture: volumes,
            image_formats: if volumes {
                vec![pb::DiskFormat::Qcow2 as i32, pb::DiskFormat::Raw as i32]
            } else {
                Vec::new()
            },
            supports_cloud_init: cloud_init,
            supports_snapshot: true,
            supports_snapshot_running: true,
            // Migration between libvirt hosts is not implemented (see the
            // README): the flags stay off until it is, whatever
            // `migration_peer` says.
            supports_live_migration: false,
            supports_cold_migration: false,
            // qcow2 volumes in a local storage pool, attached as virtio
            // disks; hot attach, detach and blockResize work on QEMU (under
            // TCG too: tests/volumes.rs).
            supports_volumes: volumes,
            supports_hot_attach: volumes,
            supports_volume_extend_in_use: volumes,
            volumes_host_local: volumes,
            max_volumes_per_vm: if volumes { crate::storage::MAX_VOLUMES_PER_VM } else { 0 },
            // The test driver runs no VNC servers.
            supports_console_vnc: domain_type != "test",
            supports_console_spice: domain_type != "test",
            supports_console_rdp: false,
            // The guest's first serial port is a pty with a log file:
            // relayed by the serial relay, read for the boot log.
            supports_console_serial: domain_type != "test",
            supports_console_log: domain_type != "test",
            supports_gpu_passthrough: false,
            // vCPUs, memory and disk of a stopped domain. Not of a running
            // one: hotplug needs domains defined with spare vCPU and memory
            // slots (and a guest that onlines them), which HCP's domains
            // are not.
            supports_resize: true,
            supports_hot_resize: false,
            attributes,
        };
        tracing::info!(%uri, domain_type, accelerator, cloud_init, volumes, "connected to libvirt");
        let failpoints = hcp_provider_sdk::support::Failpoints::from_env(FAILPOINTS_ENV);
        let serial_listen = std::net::SocketAddr::new(config.vnc_listen, config.serial_port);
        let console_host = config.console_host();
        let provider = Self {
            inner: Arc::new(Inner {
                config,
                conn: Mutex::new(Some(conn)),
                domain_type,
                capabilities,
                locks: Mutex::new(HashMap::new()),
                failpoints,
                serial: std::sync::OnceLock::new(),
            }),
        };
        if domain_type != "test" {
            let ports = Arc::new(provider.clone());
            let relay = hcp_provider_sdk::serial::SerialRelay::bind(serial_listen, &console_host, ports)
                .await
                .map_err(|source| StartError::SerialRelay { listen: serial_listen, source })?;
            let _ = provider.inner.serial.set(relay);
        }
        Ok(provider)
    }

    /// The directory of a VM's files.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.inner.config.state_dir.join(vm_id)
    }
}

/// Connects and serves until `shutdown`; `ready` gets the bound address.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), StartError> {
    let serve = hcp_provider_sdk::kit::config::serve_config(&config)?;
    let provider = Libvirt::connect(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}
