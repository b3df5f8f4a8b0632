//! # hcp-provider-sdk
//!
//! What a vendor writes to plug a hypervisor into HCP: implement
//! [`Provider`] and call [`serve`]. The harness serves the
//! `hcp.provider.v1` Identity and Compute services over gRPC, plus the
//! standard health service and server reflection; it continues the caller's
//! trace (W3C `traceparent`), maps [`ProviderError`] into the gRPC codes the
//! protocol defines, prints the readiness line, and shuts down gracefully.
//!
//! ```no_run
//! use hcp_provider_sdk::{Provider, ProviderError, ProviderInfo, pb, serve, ServeConfig};
//!
//! struct MyHypervisor;
//!
//! #[hcp_provider_sdk::async_trait]
//! impl Provider for MyHypervisor {
//!     fn info(&self) -> ProviderInfo {
//!         ProviderInfo::new("my.vendor.example", "1.0.0", "myhv")
//!     }
//!     async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
//!         Ok(pb::Capabilities::default())
//!     }
//!     // ... create_vm, get_vm, list_vms, start_vm, stop_vm, reboot_vm,
//!     // delete_vm, get_console
//! #   async fn create_vm(&self, _: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> { todo!() }
//! #   async fn get_vm(&self, _: &str) -> Result<pb::VmInfo, ProviderError> { todo!() }
//! #   async fn list_vms(&self, _: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> { todo!() }
//! #   async fn start_vm(&self, _: &str) -> Result<pb::VmInfo, ProviderError> { todo!() }
//! #   async fn stop_vm(&self, _: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> { todo!() }
//! #   async fn reboot_vm(&self, _: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> { todo!() }
//! #   async fn delete_vm(&self, _: &str) -> Result<bool, ProviderError> { todo!() }
//! #   async fn get_console(&self, _: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> { todo!() }
//! }
//!
//! # async fn example() -> Result<(), hcp_provider_sdk::ServeError> {
//! serve(MyHypervisor, ServeConfig::default(), hcp_telemetry::shutdown_signal(), |_| {}).await
//! # }
//! ```
//!
//! [`kit`] turns that into a whole process: the command line (`--config`,
//! `--listen`, `--json-logs`), a strict TOML configuration validated at
//! start ([`kit::ProviderConfig`]; a value out of range is refused with the
//! field and the range, never clamped), the runtime, telemetry and
//! serving, with a typed [`kit::KitError`]; plus retry [`kit::Backoff`],
//! [`kit::split_https_url`] and network [`kit::Backings`]. Every in-tree
//! provider runs on it; `examples/minimal.rs` is a complete provider.
//!
//! [`ServeConfig`] says where: TCP, optionally TLS ([`ServerTls`]: PEM in
//! memory, or files read again while serving so a rotated certificate is
//! served without a restart, optionally requiring client certificates), or
//! a unix socket with its [`SocketMode`]. TLS is rustls (ring), handshaken
//! per connection outside the accept loop; `tests/serving.rs` rotates
//! certificates under traffic.
//!
//! The SDK depends on neither a database nor a message queue;
//! `tests/boundary.rs` checks it from `cargo metadata`.

use std::net::SocketAddr;
use std::sync::Arc;

pub use hcp_proto::provider as pb;

pub mod image;
pub mod kit;
pub mod serial;
mod socket;
pub mod support;
mod tls;
use hcp_proto::provider::compute_server::{Compute, ComputeServer};
use hcp_proto::provider::identity_server::{Identity, IdentityServer};
pub use socket::{SocketMode, SocketModeError};
pub use tls::{ServerTls, TlsError, TlsFiles, TlsPart, TlsPem};
pub use tonic::async_trait;

/// Identity of a provider implementation.
#[derive(Debug, Clone)]
pub struct ProviderInfo {
    /// DNS-style name, at most 63 characters.
    pub name: String,
    /// The implementation's version.
    pub vendor_version: String,
    /// Hypervisor family.
    pub hypervisor: String,
    /// Protocol revisions spoken; defaults to the one this SDK implements.
    pub protocol_versions: Vec<String>,
}

impl ProviderInfo {
    /// Builds an identity speaking this SDK's protocol revision.
    pub fn new(name: &str, vendor_version: &str, hypervisor: &str) -> Self {
        Self {
            name: name.to_owned(),
            vendor_version: vendor_version.to_owned(),
            hypervisor: hypervisor.to_owned(),
            protocol_versions: vec![hcp_proto::PROVIDER_PROTOCOL_VERSION.to_owned()],
        }
    }
}

/// The kinds of failure the protocol distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No VM with that id.
    NotFound,
    /// Not possible in the VM's current state.
    InvalidState,
    /// The request is malformed.
    InvalidArgument,
    /// The provider does not offer this (never retried).
    Unsupported,
    /// The hypervisor is unreachable or busy (retried).
    Unavailable,
    /// Lock contention or a similar transient conflict (retried).
    Busy,
    /// Credentials were refused (not retried).
    PermissionDenied,
    /// Anything else.
    Internal,
}

/// An error returned by a [`Provider`] method.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ProviderError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A message for operators and tenants; no secrets.
    pub message: String,
    /// Overrides whether core may retry (default follows `kind`).
    pub retryable: Option<bool>,
}

impl ProviderError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retryable: None }
    }

    /// No such VM.
    pub fn not_found(vm_id: &str) -> Self {
        Self::new(ErrorKind::NotFound, format!("vm {vm_id} not found"))
    }

    /// Converts to the protocol's gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self.kind {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::InvalidState => Code::FailedPrecondition,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::Unsupported => Code::Unimplemented,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Busy => Code::Aborted,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::Internal => Code::Internal,
        };
        match self.retryable {
            None => tonic::Status::new(code, self.message.clone()),
            Some(r) => {
                let mut details = tonic_types::ErrorDetails::new();
                let mut meta = std::collections::HashMap::new();
                meta.insert("retryable".to_owned(), r.to_string());
                details.set_error_info(format!("{:?}", self.kind), "hcp.provider", meta);
                use tonic_types::StatusExt;
                tonic::Status::with_error_details(code, self.message.clone(), details)
            }
        }
    }
}

/// What a hypervisor adapter implements. Every method keyed by `vm_id` must
/// be idempotent: repeating a call with the same id has the effect of one.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Who this provider is.
    fn info(&self) -> ProviderInfo;
    /// What it can do now (may depend on the hypervisor's configuration).
    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError>;
    /// Whether it is ready to serve (can reach its hypervisor). The default
    /// says ready.
    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        Ok((true, "ready".to_owned()))
    }
    /// Receives the credentials the operator registered for this provider
    /// (at registration, and again after [`Provider::needs_configuration`]
    /// says so). Keep them in memory; never log them. The default refuses:
    /// a provider that needs no credentials answers UNIMPLEMENTED.
    async fn configure(
        &self,
        credentials: std::collections::HashMap<String, String>,
    ) -> Result<(), ProviderError> {
        let _ = credentials;
        Err(ProviderError::new(ErrorKind::Unsupported, "this provider takes no credentials"))
    }
    /// True while the provider waits for credentials (e.g. after a restart);
    /// core then calls [`Provider::configure`] again. Default false.
    fn needs_configuration(&self) -> bool {
        false
    }
    /// Creates the VM `req.vm_id`, or returns it if it exists.
    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError>;
    /// Returns one VM.
    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError>;
    /// Lists the VMs this provider manages for HCP.
    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError>;
    /// Powers a VM on (success if already running).
    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError>;
    /// Powers a VM off (success if already off).
    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError>;
    /// Reboots a running VM: through the guest, or with `req.hard` a reset.
    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError>;
    /// Sets a VM's vCPUs, memory and (growing only) disk. Default: not
    /// supported; declare `supports_resize` (stopped VMs) and
    /// `supports_hot_resize` (running VMs) when implementing it.
    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "resize is not supported"))
    }
    /// Deletes a VM; returns whether it existed.
    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError>;
    /// Returns where a console for the VM can be reached.
    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError>;
    /// The end of what the VM's guest wrote on its first serial port. Default:
    /// not supported; declare `supports_console_log` when implementing it
    /// ([`serial::tail`] and [`serial::tail_file`] cut the lines).
    async fn get_console_log(&self, req: pb::GetConsoleLogRequest) -> Result<pb::ConsoleLog, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "console logs are not supported"))
    }
    /// Snapshots a VM under `req.snapshot_id` (idempotent). Default: not
    /// supported; declare `supports_snapshot` when implementing these.
    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "snapshots are not supported"))
    }
    /// Lists a VM's snapshots.
    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let _ = vm_id;
        Err(ProviderError::new(ErrorKind::Unsupported, "snapshots are not supported"))
    }
    /// Returns a VM to a snapshot.
    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "snapshots are not supported"))
    }
    /// Deletes a snapshot; returns whether it existed (idempotent).
    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "snapshots are not supported"))
    }
    /// The hosts VMs can be placed on, with capacity and state. Default:
    /// none to tell about (UNIMPLEMENTED; core treats the provider as one
    /// host of unknown size and places nothing by host).
    async fn list_hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        Err(ProviderError::new(ErrorKind::Unsupported, "the provider reports no hosts"))
    }
    /// Moves a VM to `req.target_host` (idempotent: a VM already there
    /// succeeds). Default: not supported; declare
    /// `supports_live_migration` / `supports_cold_migration` when
    /// implementing it.
    async fn migrate_vm(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "migration is not supported"))
    }
    /// Creates the volume `req.volume_id`, or returns it if it exists.
    /// Default for every volume call: not supported; declare
    /// `supports_volumes` (and `max_volumes_per_vm`) when implementing them.
    async fn create_volume(&self, req: pb::CreateVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        let _ = req;
        Err(volumes_unsupported())
    }
    /// Returns one volume (NOT_FOUND when it does not exist).
    async fn get_volume(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        let _ = volume_id;
        Err(volumes_unsupported())
    }
    /// Lists every volume this provider made for HCP (boot volumes too),
    /// those HCP no longer knows included.
    async fn list_volumes(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        let _ = req;
        Err(volumes_unsupported())
    }
    /// Grows a volume (a size already reached succeeds; a smaller one is
    /// INVALID_ARGUMENT).
    async fn extend_volume(&self, req: pb::ExtendVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        let _ = req;
        Err(volumes_unsupported())
    }
    /// Attaches a volume to a VM at a slot (already there succeeds).
    async fn attach_volume(&self, req: pb::AttachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        let _ = req;
        Err(volumes_unsupported())
    }
    /// Detaches a volume from a VM, keeping its data (not attached
    /// succeeds).
    async fn detach_volume(&self, req: pb::DetachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        let _ = req;
        Err(volumes_unsupported())
    }
    /// Deletes a detached volume; returns whether it existed.
    async fn delete_volume(&self, volume_id: &str) -> Result<bool, ProviderError> {
        let _ = volume_id;
        Err(volumes_unsupported())
    }
    /// Stores an image from core's stream (supports_image_import). The SDK
    /// checked the header; `upload.chunk()` hands out the bytes and fails
    /// when they are not what the header announced, so commit only after it
    /// answered `Ok(None)`, and remove what was written on an error.
    async fn import_image(&self, upload: image::ImageUpload) -> Result<pb::ImageInfo, ProviderError> {
        let _ = upload;
        Err(ProviderError::new(ErrorKind::Unsupported, "image import is not supported"))
    }
    /// Makes an image of a stopped VM's root disk (supports_capture).
    async fn capture_image(&self, req: pb::CaptureImageRequest) -> Result<pb::ImageInfo, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "capture is not supported"))
    }
    /// Removes an imported or captured image; returns whether it existed.
    async fn delete_image(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        let _ = req;
        Err(ProviderError::new(ErrorKind::Unsupported, "images are not supported"))
    }
}

/// Refuses a CreateVm that asks for a boot volume or volumes at create,
/// for a provider that has volumes but not (yet) these: UNIMPLEMENTED,
/// never a VM made without them (whose root disk DeleteVm would take).
pub fn refuse_volumes_at_create(req: &pb::CreateVmRequest) -> Result<(), ProviderError> {
    match &req.spec {
        Some(spec) if !spec.boot_volume_id.is_empty() || !spec.volumes.is_empty() => Err(ProviderError::new(
            ErrorKind::Unsupported,
            "this provider does not create VMs with a boot volume or volumes attached at create yet",
        )),
        _ => Ok(()),
    }
}

fn volumes_unsupported() -> ProviderError {
    ProviderError::new(ErrorKind::Unsupported, "volumes are not supported")
}

/// One page of `volumes` for a ListVolumes request, as [`page_of`] pages
/// VMs: ordered by id, those after `page_token`, at most `page_size`
/// (default 1000).
pub fn volume_page_of(
    mut volumes: Vec<pb::VolumeInfo>,
    req: &pb::ListVolumesRequest,
) -> pb::ListVolumesResponse {
    volumes.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    volumes.retain(|v| v.volume_id > req.page_token);
    let size = if req.page_size == 0 { 1000 } else { req.page_size as usize };
    let next_page_token = if volumes.len() > size {
        volumes.truncate(size);
        volumes.last().map(|v| v.volume_id.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    pb::ListVolumesResponse { volumes, next_page_token }
}

/// One page of `vms` for a ListVms request: VMs ordered by id, those after
/// `page_token`, at most `page_size` (default 1000), and the token of the
/// next page (the last id given) when more remain. For providers that list
/// their whole inventory and page it themselves.
pub fn page_of(mut vms: Vec<pb::VmInfo>, req: &pb::ListVmsRequest) -> pb::ListVmsResponse {
    vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    vms.retain(|v| v.vm_id > req.page_token);
    let size = if req.page_size == 0 { 1000 } else { req.page_size as usize };
    let next_page_token = if vms.len() > size {
        vms.truncate(size);
        vms.last().map(|v| v.vm_id.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    pb::ListVmsResponse { vms, next_page_token }
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// TCP listen address; port 0 picks one. Default `127.0.0.1:50061`.
    pub listen: SocketAddr,
    /// Serve on this unix socket instead of TCP (core registers it as
    /// `unix:///path`). A file already at the path is removed first.
    pub unix_socket: Option<std::path::PathBuf>,
    /// The permission bits the unix socket gets right after it is bound,
    /// before the server announces itself; default `0600`.
    pub unix_socket_mode: SocketMode,
    /// Serve TLS (TCP only), optionally requiring client certificates:
    /// from PEM in memory, or from files read again while serving, so a
    /// rotated certificate is picked up without a restart.
    pub tls: Option<ServerTls>,
    /// Serve Prometheus `/metrics` (gRPC calls by method and code, and
    /// whatever the provider records with the `metrics` crate) here.
    /// When `None`, the address in `HCP_PROVIDER_METRICS_LISTEN`, if any,
    /// so a provider gets its metrics without code (a malformed address
    /// refuses to start).
    pub metrics_listen: Option<SocketAddr>,
}

/// The environment variable [`ServeConfig::default`] reads
/// `metrics_listen` from.
pub const ENV_METRICS_LISTEN: &str = "HCP_PROVIDER_METRICS_LISTEN";

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            unix_socket: None,
            unix_socket_mode: SocketMode::DEFAULT,
            tls: None,
            metrics_listen: None,
        }
    }
}

/// The provider server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The unix socket could not be bound.
    #[error("cannot listen on {}", path.display())]
    BindUnix {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The unix socket's mode could not be set.
    #[error("cannot set mode {mode} on {}", path.display())]
    SocketMode {
        /// The socket's path.
        path: std::path::PathBuf,
        /// The mode.
        mode: SocketMode,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The server failed.
    #[error("grpc server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The TLS configuration cannot be served.
    #[error("invalid TLS configuration")]
    Tls(#[source] TlsError),
    /// TLS was asked for on a unix socket.
    #[error("TLS is served on TCP only, not on the unix socket")]
    TlsOnUnixSocket,
    /// The metrics listener could not start.
    #[error(transparent)]
    Metrics(hcp_telemetry::metrics::MetricsListenError),
    /// `HCP_PROVIDER_METRICS_LISTEN` is not an address.
    #[error("{ENV_METRICS_LISTEN} must be host:port, got {0:?}")]
    MetricsAddress(String),
}

/// Serves `provider` until `shutdown` resolves. `ready` gets the bound
/// address (`host:port`, or the unix socket path) once the server listens.
pub async fn serve<P: Provider>(
    provider: P,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), ServeError> {
    serve_inner(provider, None::<IdentityServer<Adapter<P>>>, config, shutdown, ready).await
}

/// Serves a provider alongside one extra gRPC service (e.g. a simulator's
/// control service) on the same port.
pub async fn serve_with<P: Provider, S>(
    provider: P,
    extra: S,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), ServeError>
where
    S: tonic::server::NamedService
        + tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    serve_inner(provider, Some(extra), config, shutdown, ready).await
}

async fn serve_inner<P: Provider, S>(
    provider: P,
    extra: Option<S>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), ServeError>
where
    S: tonic::server::NamedService
        + tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let adapter = Adapter { inner: Arc::new(provider) };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IdentityServer<Adapter<P>>>().await;
    health.set_serving::<ComputeServer<Adapter<P>>>().await;
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hcp_proto::FILE_DESCRIPTOR_SET)
        .with_service_name("hcp.provider.v1.Identity")
        .with_service_name("hcp.provider.v1.Compute")
        .with_service_name("grpc.health.v1.Health");
    if extra.is_some() {
        reflection = reflection.with_service_name(S::NAME);
    }
    let reflection = reflection.build_v1().map_err(ServeError::Reflection)?;
    let name = adapter.inner.info().name;
    let metrics_listen = match (config.metrics_listen, std::env::var(ENV_METRICS_LISTEN)) {
        (Some(at), _) => Some(at),
        (None, Ok(v)) if !v.is_empty() => Some(v.parse().map_err(|_| ServeError::MetricsAddress(v))?),
        (None, _) => None,
    };
    let _metrics = match metrics_listen {
        Some(at) => Some(hcp_telemetry::metrics::serve(at, None).await.map_err(ServeError::Metrics)?.1),
        None => None,
    };
    // TLS is not tonic's: `tls::Tls` handshakes each connection with the
    // configuration current at accept time, so certificates can change.
    let router = tonic::transport::Server::builder()
        .layer(hcp_telemetry::GrpcTraceLayer::new("provider").with_methods(hcp_proto::method_label))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(IdentityServer::new(adapter.clone()))
        .add_service(ComputeServer::new(adapter))
        .add_optional_service(extra);
    match (&config.unix_socket, &config.tls) {
        (Some(_), Some(_)) => Err(ServeError::TlsOnUnixSocket),
        (Some(path), None) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(|source| ServeError::BindUnix { path: path.clone(), source })?;
            let mode = config.unix_socket_mode;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode.bits()))
                .map_err(|source| ServeError::SocketMode { path: path.clone(), mode, source })?;
            ready(path.display().to_string());
            tracing::info!(socket = %path.display(), %mode, provider = %name, "provider listening");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown,
                )
                .await
                .map_err(ServeError::Serve)
        }
        (None, tls) => {
            // The certificate is checked before the port is bound, so a
            // provider that cannot serve it never announces itself.
            let tls = match tls {
                Some(tls) => Some(tls::Tls::start(tls).await.map_err(ServeError::Tls)?),
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
            let addr =
                listener.local_addr().map_err(|source| ServeError::Bind { addr: config.listen, source })?;
            ready(addr.to_string());
            tracing::info!(%addr, provider = %name, tls = tls.is_some(), "provider listening");
            match tls {
                Some(tls) => {
                    let (incoming, _accepting) = tls.incoming(listener);
                    router.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(ServeError::Serve)
                }
                None => router
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                        shutdown,
                    )
                    .await
                    .map_err(ServeError::Serve),
            }
        }
    }
}

/// Bridges a [`Provider`] to the generated gRPC service traits.
struct Adapter<P> {
    inner: Arc<P>,
}

impl<P> Clone for Adapter<P> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

fn reply<T>(r: Result<T, ProviderError>) -> Reply<T> {
    r.map(tonic::Response::new).map_err(|e| e.to_status())
}

fn vm_id(id: &str) -> Result<&str, tonic::Status> {
    if id.parse::<hcp_proto::ids::VmId>().is_ok() {
        Ok(id)
    } else {
        Err(tonic::Status::invalid_argument(format!("vm_id must be a UUID, got {id:?}")))
    }
}

fn volume_id(id: &str) -> Result<&str, tonic::Status> {
    if id.parse::<uuid::Uuid>().is_ok() && id.len() == 36 {
        Ok(id)
    } else {
        Err(tonic::Status::invalid_argument(format!("volume_id must be a UUID, got {id:?}")))
    }
}

fn image_id(id: &str) -> Result<&str, tonic::Status> {
    if id.parse::<uuid::Uuid>().is_ok() && id.len() == 36 {
        Ok(id)
    } else {
        Err(tonic::Status::invalid_argument(format!("image_id must be a UUID, got {id:?}")))
    }
}

fn snapshot_id(id: &str) -> Result<&str, tonic::Status> {
    if id.parse::<uuid::Uuid>().is_ok() && id.len() == 36 {
        Ok(id)
    } else {
        Err(tonic::Status::invalid_argument(format!("snapshot_id must be a UUID, got {id:?}")))
    }
}

#[async_trait]
impl<P: Provider> Identity for Adapter<P> {
    async fn get_plugin_info(&self, _: tonic::Request<pb::GetPluginInfoRequest>) -> Reply<pb::PluginInfo> {
        let info = self.inner.info();
        Ok(tonic::Response::new(pb::PluginInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            protocol_versions: info.protocol_versions,
            hypervisor: info.hypervisor,
        }))
    }

    async fn get_capabilities(
        &self,
        _: tonic::Request<pb::GetCapabilitiesRequest>,
    ) -> Reply<pb::Capabilities> {
        reply(self.inner.capabilities().await)
    }

    async fn probe(&self, _: tonic::Request<pb::ProbeRequest>) -> Reply<pb::ProbeResponse> {
        let needs_configuration = self.inner.needs_configuration();
        reply(self.inner.probe().await.map(|(ready, message)| pb::ProbeResponse {
            ready: ready && !needs_configuration,
            message,
            needs_configuration,
        }))
    }

    async fn configure(&self, req: tonic::Request<pb::ConfigureRequest>) -> Reply<pb::ConfigureResponse> {
        reply(self.inner.configure(req.into_inner().credentials).await.map(|()| pb::ConfigureResponse {}))
    }
}

#[async_trait]
impl<P: Provider> Compute for Adapter<P> {
    async fn create_vm(&self, req: tonic::Request<pb::CreateVmRequest>) -> Reply<pb::VmInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        if req.spec.is_none() {
            return Err(tonic::Status::invalid_argument("spec is required"));
        }
        reply(self.inner.create_vm(req).await)
    }

    async fn get_vm(&self, req: tonic::Request<pb::VmRef>) -> Reply<pb::VmInfo> {
        let id = req.into_inner().vm_id;
        reply(self.inner.get_vm(vm_id(&id)?).await)
    }

    async fn list_vms(&self, req: tonic::Request<pb::ListVmsRequest>) -> Reply<pb::ListVmsResponse> {
        reply(self.inner.list_vms(req.into_inner()).await)
    }

    async fn start_vm(&self, req: tonic::Request<pb::VmRef>) -> Reply<pb::VmInfo> {
        let id = req.into_inner().vm_id;
        reply(self.inner.start_vm(vm_id(&id)?).await)
    }

    async fn stop_vm(&self, req: tonic::Request<pb::StopVmRequest>) -> Reply<pb::VmInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        reply(self.inner.stop_vm(req).await)
    }

    async fn reboot_vm(&self, req: tonic::Request<pb::RebootVmRequest>) -> Reply<pb::VmInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        reply(self.inner.reboot_vm(req).await)
    }

    async fn resize_vm(&self, req: tonic::Request<pb::ResizeVmRequest>) -> Reply<pb::VmInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        if req.vcpus == 0 || req.memory_mib == 0 {
            return Err(tonic::Status::invalid_argument("vcpus and memory_mib must be positive"));
        }
        reply(self.inner.resize_vm(req).await)
    }

    async fn delete_vm(&self, req: tonic::Request<pb::VmRef>) -> Reply<pb::DeleteVmResponse> {
        let id = req.into_inner().vm_id;
        reply(self.inner.delete_vm(vm_id(&id)?).await.map(|existed| pb::DeleteVmResponse { existed }))
    }

    async fn get_console(&self, req: tonic::Request<pb::GetConsoleRequest>) -> Reply<pb::ConsoleEndpoint> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        reply(self.inner.get_console(req).await)
    }

    async fn get_console_log(&self, req: tonic::Request<pb::GetConsoleLogRequest>) -> Reply<pb::ConsoleLog> {
        let mut req = req.into_inner();
        vm_id(&req.vm_id)?;
        if req.tail_lines > serial::MAX_LOG_LINES {
            return Err(tonic::Status::invalid_argument(format!(
                "tail_lines: at most {}, got {}",
                serial::MAX_LOG_LINES,
                req.tail_lines
            )));
        }
        req.tail_lines = req.tail_lines.max(1);
        reply(self.inner.get_console_log(req).await)
    }

    async fn create_snapshot(
        &self,
        req: tonic::Request<pb::CreateSnapshotRequest>,
    ) -> Reply<pb::SnapshotInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        snapshot_id(&req.snapshot_id)?;
        reply(self.inner.create_snapshot(req).await)
    }

    async fn list_snapshots(&self, req: tonic::Request<pb::VmRef>) -> Reply<pb::ListSnapshotsResponse> {
        let id = req.into_inner().vm_id;
        reply(
            self.inner
                .list_snapshots(vm_id(&id)?)
                .await
                .map(|snapshots| pb::ListSnapshotsResponse { snapshots }),
        )
    }

    async fn revert_snapshot(&self, req: tonic::Request<pb::SnapshotRef>) -> Reply<pb::VmInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        snapshot_id(&req.snapshot_id)?;
        reply(self.inner.revert_snapshot(req).await)
    }

    async fn delete_snapshot(
        &self,
        req: tonic::Request<pb::SnapshotRef>,
    ) -> Reply<pb::DeleteSnapshotResponse> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        snapshot_id(&req.snapshot_id)?;
        reply(self.inner.delete_snapshot(req).await.map(|existed| pb::DeleteSnapshotResponse { existed }))
    }

    async fn list_hosts(&self, _: tonic::Request<pb::ListHostsRequest>) -> Reply<pb::ListHostsResponse> {
        reply(self.inner.list_hosts().await.map(|hosts| pb::ListHostsResponse { hosts }))
    }

    async fn migrate_vm(&self, req: tonic::Request<pb::MigrateVmRequest>) -> Reply<pb::VmInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        if req.target_host.is_empty() || req.target_host.len() > 255 {
            return Err(tonic::Status::invalid_argument(
                "target_host must name a host (1 to 255 characters)",
            ));
        }
        reply(self.inner.migrate_vm(req).await)
    }

    async fn create_volume(&self, req: tonic::Request<pb::CreateVolumeRequest>) -> Reply<pb::VolumeInfo> {
        let req = req.into_inner();
        volume_id(&req.volume_id)?;
        match &req.spec {
            Some(spec) if spec.size_gib > 0 => {}
            _ => return Err(tonic::Status::invalid_argument("spec.size_gib must be at least 1")),
        }
        reply(self.inner.create_volume(req).await)
    }

    async fn get_volume(&self, req: tonic::Request<pb::VolumeRef>) -> Reply<pb::VolumeInfo> {
        let id = req.into_inner().volume_id;
        reply(self.inner.get_volume(volume_id(&id)?).await)
    }

    async fn list_volumes(
        &self,
        req: tonic::Request<pb::ListVolumesRequest>,
    ) -> Reply<pb::ListVolumesResponse> {
        reply(self.inner.list_volumes(req.into_inner()).await)
    }

    async fn extend_volume(&self, req: tonic::Request<pb::ExtendVolumeRequest>) -> Reply<pb::VolumeInfo> {
        let req = req.into_inner();
        volume_id(&req.volume_id)?;
        if req.size_gib == 0 {
            return Err(tonic::Status::invalid_argument("size_gib must be at least 1"));
        }
        reply(self.inner.extend_volume(req).await)
    }

    async fn attach_volume(&self, req: tonic::Request<pb::AttachVolumeRequest>) -> Reply<pb::VolumeInfo> {
        let req = req.into_inner();
        volume_id(&req.volume_id)?;
        vm_id(&req.vm_id)?;
        if req.slot == 0 {
            return Err(tonic::Status::invalid_argument("slot must be at least 1 (0 is the boot disk)"));
        }
        reply(self.inner.attach_volume(req).await)
    }

    async fn detach_volume(&self, req: tonic::Request<pb::DetachVolumeRequest>) -> Reply<pb::VolumeInfo> {
        let req = req.into_inner();
        volume_id(&req.volume_id)?;
        vm_id(&req.vm_id)?;
        reply(self.inner.detach_volume(req).await)
    }

    async fn delete_volume(&self, req: tonic::Request<pb::VolumeRef>) -> Reply<pb::DeleteVolumeResponse> {
        let id = req.into_inner().volume_id;
        reply(
            self.inner
                .delete_volume(volume_id(&id)?)
                .await
                .map(|existed| pb::DeleteVolumeResponse { existed }),
        )
    }

    async fn import_image(
        &self,
        req: tonic::Request<tonic::Streaming<pb::ImportImageChunk>>,
    ) -> Reply<pb::ImageInfo> {
        let upload = image::ImageUpload::start(req.into_inner()).await.map_err(|e| e.to_status())?;
        reply(self.inner.import_image(upload).await)
    }

    async fn capture_image(&self, req: tonic::Request<pb::CaptureImageRequest>) -> Reply<pb::ImageInfo> {
        let req = req.into_inner();
        vm_id(&req.vm_id)?;
        image_id(&req.image_id)?;
        reply(self.inner.capture_image(req).await)
    }

    async fn delete_image(
        &self,
        req: tonic::Request<pb::DeleteImageRequest>,
    ) -> Reply<pb::DeleteImageResponse> {
        let req = req.into_inner();
        image_id(&req.image_id)?;
        reply(self.inner.delete_image(req).await.map(|existed| pb::DeleteImageResponse { existed }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_the_inventory_in_id_order() {
        let vms: Vec<pb::VmInfo> = ["c", "a", "e", "b", "d"]
            .iter()
            .map(|id| pb::VmInfo { vm_id: (*id).into(), ..Default::default() })
            .collect();
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let page = page_of(vms.clone(), &pb::ListVmsRequest { page_size: 2, page_token: token });
            assert!(page.vms.len() <= 2);
            seen.extend(page.vms.into_iter().map(|v| v.vm_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        assert_eq!(
            page_of(vms, &pb::ListVmsRequest::default()).vms.len(),
            5,
            "page_size 0 means the default"
        );
    }

    /// A provider that implements only what the trait requires.
    struct Bare;

    #[async_trait]
    impl Provider for Bare {
        fn info(&self) -> ProviderInfo {
            ProviderInfo::new("bare.example", "0", "bare")
        }
        async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
            Ok(pb::Capabilities::default())
        }
        async fn create_vm(&self, _: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
            unreachable!()
        }
        async fn get_vm(&self, _: &str) -> Result<pb::VmInfo, ProviderError> {
            unreachable!()
        }
        async fn list_vms(&self, _: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
            unreachable!()
        }
        async fn start_vm(&self, _: &str) -> Result<pb::VmInfo, ProviderError> {
            unreachable!()
        }
        async fn stop_vm(&self, _: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
            unreachable!()
        }
        async fn reboot_vm(&self, _: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
            unreachable!()
        }
        async fn delete_vm(&self, _: &str) -> Result<bool, ProviderError> {
            unreachable!()
        }
        async fn get_console(&self, _: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
            unreachable!()
        }
    }

    /// A provider written before ResizeVm existed still compiles, and
    /// answers UNIMPLEMENTED (never retried by core); malformed requests are
    /// refused before the provider sees them.
    #[tokio::test]
    async fn resize_defaults_to_unimplemented_and_is_validated_first() {
        let adapter = Adapter { inner: Arc::new(Bare) };
        let call = |vm_id: &str, vcpus, memory_mib| {
            let req = pb::ResizeVmRequest { vm_id: vm_id.to_owned(), vcpus, memory_mib, disk_gib: 0 };
            let adapter = adapter.clone();
            async move { adapter.resize_vm(tonic::Request::new(req)).await.unwrap_err().code() }
        };
        let id = "0190b5f2-0000-7000-8000-000000000001";
        for (vm_id, vcpus, memory_mib, want) in [
            (id, 2, 1024, tonic::Code::Unimplemented),
            ("not-a-uuid", 2, 1024, tonic::Code::InvalidArgument),
            (id, 0, 1024, tonic::Code::InvalidArgument),
            (id, 2, 0, tonic::Code::InvalidArgument),
        ] {
            assert_eq!(call(vm_id, vcpus, memory_mib).await, want, "{vm_id} {vcpus} {memory_mib}");
        }
    }
}
