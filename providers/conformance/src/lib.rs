//! # hcp-provider-conformance
//!
//! Checks any provider endpoint against the `hcp.provider.v1` contract, the
//! way csi-sanity checks CSI drivers: identity and capabilities, every
//! mutating call repeated to prove idempotency, the lifecycle state
//! machine (soft and hard reboots, a graceful stop with a timeout, a
//! forced stop), resize (stopped, and running as the flags say), the NICs
//! `GetVm` reports, the hosts a provider reports and the host of each VM,
//! a create on a named host, live and cold migration between hosts, the
//! error codes for missing VMs, invalid states and unsupported features. A check that needs a capability the provider does
//! not declare is skipped with the reason printed, never silently passed.
//! Every VM the kit creates is deleted at the end, whatever happened, and
//! the kit then proves nothing is left: the provider's own inventory
//! (`ListVms`), and the hypervisor's when the kit is given a way to look
//! ([`Hooks`]), hold none of its VMs. With [`Hooks`] that can drive the
//! provider into a create that fails after its first effect, the kit also
//! checks that `DeleteVm` then removes the half-made VM.
//!
//! Use it as a library ([`run`]) or as the `hcp-provider-conformance`
//! command.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::identity_client::IdentityClient;
use hcp_proto::provider::{
    Capabilities, CreateSnapshotRequest, CreateVmRequest, GetCapabilitiesRequest, GetConsoleRequest,
    GetPluginInfoRequest, HostInfo, HostState, ImageRef, ListHostsRequest, ListVmsRequest, MigrateVmRequest,
    NetworkAttachment, PowerState, ProbeRequest, RebootVmRequest, ResizeVmRequest, SnapshotRef,
    StopVmRequest, VmInfo, VmRef, VmSpec,
};
use tonic::transport::Channel;

/// A boxed future, for [`Hooks`] without an async-trait dependency.
pub type HookFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What the kit may ask of the test bed around the provider, beyond the
/// provider protocol. Every method is optional: the defaults say "cannot",
/// and the checks that need them are skipped visibly.
pub trait Hooks: Send + Sync {
    /// The HCP VM ids the hypervisor itself holds, found the way the
    /// provider marks its VMs (a tag, a name, a metadata key), without
    /// asking the provider. `None`: the kit cannot look.
    fn hypervisor_vm_ids(&self) -> Option<HookFuture<'_, Vec<String>>> {
        None
    }

    /// Arranges that the provider's next `CreateVm` fails after its first
    /// effect on the hypervisor (e.g. the clone exists, its configuration
    /// is refused). `None`: this test bed cannot.
    fn fail_next_create_after_first_effect(&self) -> Option<HookFuture<'_, ()>> {
        None
    }

    /// Undoes [`Hooks::fail_next_create_after_first_effect`].
    fn clear_faults(&self) -> HookFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// What to create VMs from on the provider under test.
#[derive(Clone)]
pub struct Options {
    /// The provider's endpoint, e.g. `http://127.0.0.1:50061`.
    pub endpoint: String,
    /// Image source the provider can boot (template, base file).
    pub image_source: String,
    /// Network to attach, empty for none.
    pub network: String,
    /// vCPUs and memory of test VMs.
    pub vcpus: u32,
    /// Memory of test VMs.
    pub memory_mib: u32,
    /// Deadline of one call (real hypervisors are slow).
    pub call_timeout: Duration,
    /// A look at the hypervisor and a way to inject faults, if the test bed
    /// offers them.
    pub hooks: Option<Arc<dyn Hooks>>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("endpoint", &self.endpoint)
            .field("image_source", &self.image_source)
            .field("network", &self.network)
            .field("hooks", &self.hooks.is_some())
            .finish_non_exhaustive()
    }
}

impl Options {
    /// Defaults for `endpoint`: a tiny VM from image source `test`.
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            image_source: "test".to_owned(),
            network: String::new(),
            vcpus: 1,
            memory_mib: 128,
            call_timeout: Duration::from_secs(300),
            hooks: None,
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider behaved as the contract says.
    Pass,
    /// It did not; the message says how.
    Fail(String),
    /// Not applicable; the message says why.
    Skip(String),
}

/// All checks, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// (check name, outcome).
    pub checks: Vec<(String, Outcome)>,
}

impl Report {
    /// Number of checks with this kind of outcome.
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.checks.iter().filter(|(_, o)| f(o)).count()
    }

    /// True when no check failed.
    pub fn passed(&self) -> bool {
        self.count(|o| matches!(o, Outcome::Fail(_))) == 0
    }

    /// The failures, as `(check, message)`.
    pub fn failures(&self) -> Vec<(&str, &str)> {
        self.checks
            .iter()
            .filter_map(|(n, o)| match o {
                Outcome::Fail(m) => Some((n.as_str(), m.as_str())),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, outcome) in &self.checks {
            match outcome {
                Outcome::Pass => writeln!(f, "PASS {name}")?,
                Outcome::Fail(m) => writeln!(f, "FAIL {name}: {m}")?,
                Outcome::Skip(m) => writeln!(f, "SKIP {name}: {m}")?,
            }
        }
        write!(
            f,
            "conformance: {} passed, {} failed, {} skipped",
            self.count(|o| *o == Outcome::Pass),
            self.count(|o| matches!(o, Outcome::Fail(_))),
            self.count(|o| matches!(o, Outcome::Skip(_))),
        )
    }
}

type CheckResult = Result<(), String>;

struct Kit {
    options: Options,
    identity: IdentityClient<Channel>,
    compute: ComputeClient<Channel>,
    caps: Capabilities,
    created: Vec<String>,
    report: Report,
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> CheckResult {
    if cond { Ok(()) } else { Err(msg()) }
}

fn expect_code<T: fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code, what: &str) -> CheckResult {
    match r {
        Err(s) if s.code() == code => Ok(()),
        Err(s) => Err(format!("{what}: expected {code:?}, got {:?} ({})", s.code(), s.message())),
        Ok(v) => Err(format!("{what}: expected {code:?}, got success {v:?}")),
    }
}

fn power(vm: &VmInfo) -> PowerState {
    PowerState::try_from(vm.power_state).unwrap_or(PowerState::Unspecified)
}

/// `vm` reports no NICs (unknown) or exactly `want`, each with a
/// lower-case colon-separated MAC and well-formed addresses.
fn check_nics(vm: &VmInfo, want: usize) -> CheckResult {
    let n = vm.interfaces.len();
    ensure(n == 0 || n == want, || format!("{want} networks were requested, GetVm reports {n} interfaces"))?;
    for nic in &vm.interfaces {
        let octets: Vec<&str> = nic.mac.split(':').collect();
        let well_formed = octets.len() == 6
            && octets.iter().all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
            && nic.mac == nic.mac.to_ascii_lowercase();
        ensure(well_formed, || format!("MAC {:?} is not lower-case aa:bb:cc:dd:ee:ff", nic.mac))?;
        for a in &nic.ipv4 {
            ensure(a.parse::<std::net::Ipv4Addr>().is_ok(), || format!("ipv4 {a:?} is not an IPv4 address"))?;
        }
        for a in &nic.ipv6 {
            ensure(a.parse::<std::net::Ipv6Addr>().is_ok(), || format!("ipv6 {a:?} is not an IPv6 address"))?;
        }
    }
    Ok(())
}

impl Kit {
    fn record(&mut self, name: &str, r: CheckResult) {
        let outcome = match r {
            Ok(()) => Outcome::Pass,
            Err(m) => Outcome::Fail(m),
        };
        self.report.checks.push((name.to_owned(), outcome));
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.report.checks.push((name.to_owned(), Outcome::Skip(why.to_owned())));
    }

    fn spec(&self, name: &str, user_data: Option<String>) -> VmSpec {
        VmSpec {
            name: name.to_owned(),
            vcpus: self.options.vcpus,
            memory_mib: self.options.memory_mib,
            disk_gib: 1,
            image: Some(ImageRef {
                name: "conformance".to_owned(),
                source: self.options.image_source.clone(),
            }),
            networks: if self.options.network.is_empty() {
                Vec::new()
            } else {
                vec![NetworkAttachment { network: self.options.network.clone(), backing: String::new() }]
            },
            user_data,
            hostname: name.to_owned(),
            labels: [("hcp.conformance".to_owned(), "true".to_owned())].into_iter().collect(),
            host: String::new(),
        }
    }

    async fn create(&mut self, name: &str, user_data: Option<String>) -> Result<(String, VmInfo), String> {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let vm = self
            .compute
            .create_vm(CreateVmRequest {
                vm_id: id.clone(),
                spec: Some(self.spec(name, user_data)),
                start: false,
            })
            .await
            .map_err(|s| format!("CreateVm failed: {:?} {}", s.code(), s.message()))?
            .into_inner();
        Ok((id, vm))
    }

    async fn get(&mut self, id: &str) -> Result<VmInfo, String> {
        self.compute
            .get_vm(VmRef { vm_id: id.to_owned() })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("GetVm failed: {:?} {}", s.code(), s.message()))
    }

    async fn list_ids(&mut self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .compute
                .list_vms(ListVmsRequest { page_size: 500, page_token: token.clone() })
                .await
                .map_err(|s| format!("ListVms failed: {:?} {}", s.code(), s.message()))?
                .into_inner();
            out.extend(page.vms.into_iter().map(|v| v.vm_id));
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    async fn identity(&mut self) -> CheckResult {
        let info = self
            .identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        ensure(!info.name.is_empty() && info.name.len() <= 63, || {
            format!("name {:?} must be 1 to 63 characters", info.name)
        })?;
        ensure(info.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'), || {
            format!("name {:?} must be DNS-like", info.name)
        })?;
        ensure(!info.vendor_version.is_empty(), || "vendor_version is empty".to_owned())?;
        ensure(info.protocol_versions.iter().any(|v| v == hcp_proto::PROVIDER_PROTOCOL_VERSION), || {
            format!(
                "protocol_versions {:?} lack {}",
                info.protocol_versions,
                hcp_proto::PROVIDER_PROTOCOL_VERSION
            )
        })
    }

    async fn capabilities(&mut self) -> CheckResult {
        let caps = self
            .identity
            .get_capabilities(GetCapabilitiesRequest {})
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        let again = self
            .identity
            .get_capabilities(GetCapabilitiesRequest {})
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        ensure(caps == again, || "capabilities changed between two calls".to_owned())?;
        self.caps = caps;
        let probe = self.identity.probe(ProbeRequest {}).await.map_err(|s| s.to_string())?.into_inner();
        ensure(probe.ready, || format!("Probe says not ready: {}", probe.message))
    }

    async fn create_is_idempotent(&mut self) -> CheckResult {
        let (id, first) = self.create("conf-idem", None).await?;
        ensure(first.vm_id == id, || format!("CreateVm answered vm_id {:?} for {id}", first.vm_id))?;
        let second = self
            .compute
            .create_vm(CreateVmRequest {
                vm_id: id.clone(),
                spec: Some(self.spec("conf-idem", None)),
                start: false,
            })
            .await
            .map_err(|s| format!("repeated CreateVm failed: {:?} {}", s.code(), s.message()))?
            .into_inner();
        ensure(second.native_id == first.native_id, || {
            format!(
                "repeated CreateVm made another VM (native id {:?}, then {:?}): create is not idempotent",
                first.native_id, second.native_id
            )
        })?;
        let listed = self.list_ids().await?;
        let n = listed.iter().filter(|v| **v == id).count();
        ensure(n == 1, || format!("ListVms shows {n} VMs with id {id} after two creates; expected 1"))?;
        let got = self.get(&id).await?;
        ensure(power(&got) == PowerState::Shutoff, || {
            format!("created with start=false but power is {:?}", power(&got))
        })
    }

    /// Start (twice), reboot (soft and hard), stop (graceful with a timeout,
    /// then with the default timeout, repeated) and a forced stop, on one VM
    /// and recorded as four checks. A step that cannot run because an
    /// earlier one failed fails naming it.
    async fn lifecycle(&mut self) {
        const CHECKS: [&str; 4] = [
            "lifecycle: start (repeated)",
            "reboot: soft and hard (RebootVm.hard), refused when stopped",
            "stop: graceful with a timeout, then the default timeout (repeated)",
            "stop: forced (StopVm.force), repeated",
        ];
        let id = match self.create("conf-life", None).await {
            Ok((id, _)) => id,
            Err(e) => {
                for name in CHECKS {
                    self.record(name, Err(format!("no VM to work on: {e}")));
                }
                return;
            }
        };
        let r = self.start_twice(&id).await;
        let started = r.is_ok();
        self.record(CHECKS[0], r);
        if !started {
            for name in &CHECKS[1..] {
                self.record(name, Err("StartVm failed (see above)".to_owned()));
            }
            return;
        }
        // The reboots run while the VM runs; their refusal once it is
        // stopped is part of the same check.
        let reboots = self.reboots(&id).await;
        let stops = self.graceful_stops(&id).await;
        let reboots = match reboots {
            Ok(()) if stops.is_ok() => self.reboots_refused_when_stopped(&id).await,
            other => other,
        };
        self.record(CHECKS[1], reboots);
        self.record(CHECKS[2], stops);
        let r = self.forced_stops(&id).await;
        self.record(CHECKS[3], r);
    }

    async fn start_twice(&mut self, id: &str) -> CheckResult {
        for round in 0..2 {
            let r = self
                .compute
                .start_vm(VmRef { vm_id: id.to_owned() })
                .await
                .map_err(|s| format!("StartVm #{round}: {:?} {}", s.code(), s.message()))?;
            ensure(power(r.get_ref()) == PowerState::Running, || {
                format!("after StartVm #{round} power is {:?}", power(r.get_ref()))
            })?;
        }
        Ok(())
    }

    /// A soft and a hard reboot of the running VM leave it running.
    async fn reboots(&mut self, id: &str) -> CheckResult {
        for hard in [false, true] {
            let kind = if hard { "hard" } else { "soft" };
            let r = self
                .compute
                .reboot_vm(RebootVmRequest { vm_id: id.to_owned(), hard })
                .await
                .map_err(|s| format!("{kind} RebootVm: {:?} {}", s.code(), s.message()))?;
            ensure(power(r.get_ref()) == PowerState::Running, || {
                format!("after a {kind} RebootVm the VM is {:?}, not running", power(r.get_ref()))
            })?;
        }
        Ok(())
    }

    /// A graceful stop with a timeout, then one with the provider's default
    /// (repeated on a stopped VM: it succeeds).
    async fn graceful_stops(&mut self, id: &str) -> CheckResult {
        for (round, timeout_seconds) in [(0, 60), (1, 0)] {
            let stop = StopVmRequest { vm_id: id.to_owned(), force: false, timeout_seconds };
            let r = self.compute.stop_vm(stop).await.map_err(|s| {
                format!("StopVm #{round} (timeout {timeout_seconds} s): {:?} {}", s.code(), s.message())
            })?;
            ensure(power(r.get_ref()) == PowerState::Shutoff, || {
                format!(
                    "after StopVm #{round} (timeout {timeout_seconds} s) power is {:?}",
                    power(r.get_ref())
                )
            })?;
        }
        let got = self.get(id).await?;
        ensure(power(&got) == PowerState::Shutoff, || {
            format!("StopVm answered SHUTOFF but GetVm says {:?}", power(&got))
        })
    }

    /// Neither a soft nor a hard reboot of a stopped VM: FAILED_PRECONDITION.
    async fn reboots_refused_when_stopped(&mut self, id: &str) -> CheckResult {
        for hard in [false, true] {
            expect_code(
                self.compute.reboot_vm(RebootVmRequest { vm_id: id.to_owned(), hard }).await,
                tonic::Code::FailedPrecondition,
                &format!("{} RebootVm of a stopped VM", if hard { "hard" } else { "soft" }),
            )?;
        }
        Ok(())
    }

    /// A forced stop of a running VM (with a long timeout the provider must
    /// not wait for), repeated on the stopped VM.
    async fn forced_stops(&mut self, id: &str) -> CheckResult {
        self.compute
            .start_vm(VmRef { vm_id: id.to_owned() })
            .await
            .map_err(|s| format!("StartVm: {:?} {}", s.code(), s.message()))?;
        for round in 0..2 {
            let forced = StopVmRequest { vm_id: id.to_owned(), force: true, timeout_seconds: 3600 };
            let r = self
                .compute
                .stop_vm(forced)
                .await
                .map_err(|s| format!("forced StopVm #{round}: {:?} {}", s.code(), s.message()))?;
            ensure(power(r.get_ref()) == PowerState::Shutoff, || {
                format!("after forced StopVm #{round} power is {:?}", power(r.get_ref()))
            })?;
        }
        Ok(())
    }

    /// GetVm reports one well-formed NIC per requested network (the kit
    /// attaches its network twice), in order, or none when the provider
    /// cannot tell; the MACs are distinct and do not change when the VM
    /// starts; the addresses of the running VM are well-formed.
    async fn interfaces(&mut self) -> CheckResult {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let mut spec = self.spec("conf-nics", None);
        spec.networks
            .push(NetworkAttachment { network: self.options.network.clone(), backing: String::new() });
        self.compute
            .create_vm(CreateVmRequest { vm_id: id.clone(), spec: Some(spec), start: false })
            .await
            .map_err(|s| format!("CreateVm with two NICs: {:?} {}", s.code(), s.message()))?;
        let stopped = self.get(&id).await?;
        check_nics(&stopped, 2)?;
        if let [a, b] = &stopped.interfaces[..] {
            ensure(a.mac != b.mac, || format!("both NICs have MAC {}", a.mac))?;
        }
        self.compute
            .start_vm(VmRef { vm_id: id.clone() })
            .await
            .map_err(|s| format!("StartVm: {:?} {}", s.code(), s.message()))?;
        let running = self.get(&id).await?;
        check_nics(&running, 2)?;
        if !stopped.interfaces.is_empty() && !running.interfaces.is_empty() {
            let macs = |vm: &VmInfo| vm.interfaces.iter().map(|n| n.mac.clone()).collect::<Vec<_>>();
            ensure(macs(&stopped) == macs(&running), || {
                format!(
                    "the MACs changed when the VM started: {:?}, then {:?}",
                    macs(&stopped),
                    macs(&running)
                )
            })?;
        }
        self.compute
            .stop_vm(StopVmRequest { vm_id: id.clone(), force: true, timeout_seconds: 0 })
            .await
            .map_err(|s| format!("forced StopVm: {:?} {}", s.code(), s.message()))?;
        Ok(())
    }

    /// ResizeVm of a stopped VM (idempotent, disks only grow, a refused
    /// request changes nothing), and of a running one as the capabilities
    /// say.
    async fn resize(&mut self, hot: bool) -> CheckResult {
        let (id, created) = self.create("conf-resize", None).await?;
        let (vcpus, memory_mib) = (created.vcpus.max(self.options.vcpus) + 1, self.options.memory_mib + 128);
        // One GiB more than the disk the provider made (at least the 1 GiB
        // asked for; a template may have made it larger).
        let disk_gib = self.get(&id).await?.disk_gib.max(1) + 1;
        let grow = ResizeVmRequest { vm_id: id.clone(), vcpus, memory_mib, disk_gib };
        for round in 0..2 {
            let r =
                self.compute.resize_vm(grow.clone()).await.map_err(|s| {
                    format!("ResizeVm #{round} of a stopped VM: {:?} {}", s.code(), s.message())
                })?;
            ensure(power(r.get_ref()) == PowerState::Shutoff, || "ResizeVm started the VM".to_owned())?;
        }
        let got = self.get(&id).await?;
        ensure(got.vcpus == vcpus && got.memory_mib == memory_mib, || {
            format!(
                "after ResizeVm to {vcpus} vCPUs / {memory_mib} MiB GetVm says {} / {}",
                got.vcpus, got.memory_mib
            )
        })?;
        ensure(got.disk_gib == 0 || got.disk_gib == disk_gib, || {
            format!("after growing to {disk_gib} GiB GetVm says the disk is {} GiB", got.disk_gib)
        })?;
        expect_code(
            self.compute
                .resize_vm(ResizeVmRequest { vcpus: vcpus + 1, disk_gib: disk_gib - 1, ..grow.clone() })
                .await,
            tonic::Code::InvalidArgument,
            "ResizeVm shrinking the disk",
        )?;
        let got = self.get(&id).await?;
        ensure(got.vcpus == vcpus, || {
            format!("a ResizeVm refused for its disk still changed the vCPUs to {}", got.vcpus)
        })?;
        self.compute
            .start_vm(VmRef { vm_id: id.clone() })
            .await
            .map_err(|s| format!("StartVm: {}", s.message()))?;
        let running = ResizeVmRequest { vm_id: id.clone(), vcpus: vcpus + 1, memory_mib, disk_gib: 0 };
        if hot {
            let r =
                self.compute.resize_vm(running).await.map_err(|s| {
                    format!("ResizeVm of a running VM (supports_hot_resize): {}", s.message())
                })?;
            ensure(power(r.get_ref()) == PowerState::Running && r.get_ref().vcpus == vcpus + 1, || {
                "a hot resize stopped the VM or did not take".to_owned()
            })?;
            let got = self.get(&id).await?;
            ensure(got.vcpus == vcpus + 1, || format!("after a hot resize GetVm says {} vCPUs", got.vcpus))
        } else {
            expect_code(
                self.compute.resize_vm(running).await,
                tonic::Code::FailedPrecondition,
                "ResizeVm of a running VM without supports_hot_resize",
            )
        }
    }

    async fn delete_is_idempotent(&mut self) -> CheckResult {
        let (id, _) = self.create("conf-del", None).await?;
        let vm = VmRef { vm_id: id.clone() };
        let first =
            self.compute.delete_vm(vm.clone()).await.map_err(|s| format!("DeleteVm: {}", s.message()))?;
        ensure(first.get_ref().existed, || "DeleteVm of an existing VM says it did not exist".to_owned())?;
        let second = self
            .compute
            .delete_vm(vm.clone())
            .await
            .map_err(|s| format!("repeated DeleteVm failed: {}", s.message()))?;
        ensure(!second.get_ref().existed, || "repeated DeleteVm says the VM still existed".to_owned())?;
        expect_code(self.compute.get_vm(vm).await, tonic::Code::NotFound, "GetVm after DeleteVm")?;
        ensure(!self.list_ids().await?.contains(&id), || "ListVms still shows a deleted VM".to_owned())
    }

    async fn missing_vms(&mut self) -> CheckResult {
        let ghost = VmRef { vm_id: uuid::Uuid::now_v7().to_string() };
        expect_code(
            self.compute.get_vm(ghost.clone()).await,
            tonic::Code::NotFound,
            "GetVm of an unknown VM",
        )?;
        expect_code(
            self.compute.start_vm(ghost.clone()).await,
            tonic::Code::NotFound,
            "StartVm of an unknown VM",
        )?;
        expect_code(
            self.compute
                .stop_vm(StopVmRequest { vm_id: ghost.vm_id.clone(), force: false, timeout_seconds: 0 })
                .await,
            tonic::Code::NotFound,
            "StopVm of an unknown VM",
        )?;
        for hard in [false, true] {
            expect_code(
                self.compute.reboot_vm(RebootVmRequest { vm_id: ghost.vm_id.clone(), hard }).await,
                tonic::Code::NotFound,
                "RebootVm of an unknown VM",
            )?;
        }
        expect_code(
            self.compute
                .stop_vm(StopVmRequest { vm_id: ghost.vm_id.clone(), force: true, timeout_seconds: 0 })
                .await,
            tonic::Code::NotFound,
            "forced StopVm of an unknown VM",
        )?;
        if self.caps.supports_resize || self.caps.supports_hot_resize {
            let resize =
                ResizeVmRequest { vm_id: ghost.vm_id.clone(), vcpus: 1, memory_mib: 512, disk_gib: 0 };
            expect_code(
                self.compute.resize_vm(resize).await,
                tonic::Code::NotFound,
                "ResizeVm of an unknown VM",
            )?;
        }
        let deleted = self
            .compute
            .delete_vm(ghost)
            .await
            .map_err(|s| format!("DeleteVm of an unknown VM must succeed: {}", s.message()))?;
        ensure(!deleted.get_ref().existed, || "DeleteVm of an unknown VM says it existed".to_owned())
    }

    async fn invalid_arguments(&mut self) -> CheckResult {
        let bad = CreateVmRequest {
            vm_id: "not-a-uuid".to_owned(),
            spec: Some(self.spec("conf-bad", None)),
            start: false,
        };
        expect_code(
            self.compute.create_vm(bad).await,
            tonic::Code::InvalidArgument,
            "CreateVm with a malformed vm_id",
        )?;
        let no_spec = CreateVmRequest { vm_id: uuid::Uuid::now_v7().to_string(), spec: None, start: false };
        expect_code(
            self.compute.create_vm(no_spec).await,
            tonic::Code::InvalidArgument,
            "CreateVm without a spec",
        )
    }

    async fn console(&mut self, protocol: &str, declared: bool) -> CheckResult {
        let (id, _) = self.create("conf-console", None).await?;
        self.compute
            .start_vm(VmRef { vm_id: id.clone() })
            .await
            .map_err(|s| format!("StartVm: {}", s.message()))?;
        let r = self
            .compute
            .get_console(GetConsoleRequest { vm_id: id.clone(), protocol: protocol.to_owned() })
            .await;
        if declared {
            let ep =
                r.map_err(|s| format!("GetConsole {protocol}: {:?} {}", s.code(), s.message()))?.into_inner();
            ensure(!ep.host.is_empty() && ep.port > 0, || {
                format!("GetConsole {protocol} gave no endpoint: {ep:?}")
            })?;
            ensure(ep.protocol == protocol, || format!("asked for {protocol}, got {:?}", ep.protocol))
        } else {
            expect_code(
                r,
                tonic::Code::Unimplemented,
                &format!("GetConsole {protocol} without the capability"),
            )
        }
    }

    async fn cloud_init(&mut self, declared: bool) -> CheckResult {
        let ud = Some("#cloud-config\nhostname: conf\n".to_owned());
        if declared {
            self.create("conf-ci", ud).await.map(|_| ())
        } else {
            let id = uuid::Uuid::now_v7().to_string();
            self.created.push(id.clone());
            let r = self
                .compute
                .create_vm(CreateVmRequest { vm_id: id, spec: Some(self.spec("conf-ci", ud)), start: false })
                .await;
            expect_code(r, tonic::Code::Unimplemented, "CreateVm with user_data without supports_cloud_init")
        }
    }

    async fn snapshots(&mut self, running_too: bool) -> CheckResult {
        let (id, _) = self.create("conf-snap", None).await?;
        let snap = uuid::Uuid::now_v7().to_string();
        let req =
            CreateSnapshotRequest { vm_id: id.clone(), snapshot_id: snap.clone(), name: "conf".to_owned() };
        let first = self
            .compute
            .create_snapshot(req.clone())
            .await
            .map_err(|s| format!("CreateSnapshot: {}", s.message()))?;
        let second = self
            .compute
            .create_snapshot(req)
            .await
            .map_err(|s| format!("repeated CreateSnapshot failed: {}", s.message()))?;
        ensure(first.get_ref().native_id == second.get_ref().native_id, || {
            "repeated CreateSnapshot made another snapshot: not idempotent".to_owned()
        })?;
        let listed = self
            .compute
            .list_snapshots(VmRef { vm_id: id.clone() })
            .await
            .map_err(|s| format!("ListSnapshots: {}", s.message()))?
            .into_inner();
        let n = listed.snapshots.iter().filter(|s| s.snapshot_id == snap).count();
        ensure(n == 1, || format!("ListSnapshots shows the snapshot {n} times"))?;
        self.compute
            .start_vm(VmRef { vm_id: id.clone() })
            .await
            .map_err(|s| format!("StartVm: {}", s.message()))?;
        let live = CreateSnapshotRequest {
            vm_id: id.clone(),
            snapshot_id: uuid::Uuid::now_v7().to_string(),
            name: "live".into(),
        };
        let r = self.compute.create_snapshot(live).await;
        if running_too {
            r.map_err(|s| format!("CreateSnapshot of a running VM: {}", s.message()))?;
        } else {
            expect_code(
                r,
                tonic::Code::FailedPrecondition,
                "CreateSnapshot of a running VM without supports_snapshot_running",
            )?;
        }
        // The first snapshot recorded a stopped VM: reverting stops it.
        let sref = SnapshotRef { vm_id: id.clone(), snapshot_id: snap.clone() };
        let reverted = self
            .compute
            .revert_snapshot(sref.clone())
            .await
            .map_err(|s| format!("RevertSnapshot: {}", s.message()))?;
        ensure(power(reverted.get_ref()) == PowerState::Shutoff, || {
            format!("after reverting to a stopped snapshot the VM is {:?}", power(reverted.get_ref()))
        })?;
        let ghost = SnapshotRef { vm_id: id.clone(), snapshot_id: uuid::Uuid::now_v7().to_string() };
        expect_code(
            self.compute.revert_snapshot(ghost).await,
            tonic::Code::NotFound,
            "RevertSnapshot of an unknown snapshot",
        )?;
        let d1 = self
            .compute
            .delete_snapshot(sref.clone())
            .await
            .map_err(|s| format!("DeleteSnapshot: {}", s.message()))?;
        let d2 = self
            .compute
            .delete_snapshot(sref)
            .await
            .map_err(|s| format!("repeated DeleteSnapshot failed: {}", s.message()))?;
        ensure(d1.get_ref().existed && !d2.get_ref().existed, || {
            "DeleteSnapshot is not idempotent".to_owned()
        })
    }

    /// The hosts (ListHosts), the host of a VM, a create on a named host,
    /// and migration as the flags say, each a check of its own; skipped
    /// with the reason when the provider reports no hosts or one.
    async fn hosts_and_migration(&mut self) {
        const HOSTS: &str = "hosts: named, unique, with capacity and state; VMs report theirs";
        const PLACED: &str = "create on a named host";
        const LIVE: &str = "live migration: running VM to another host, repeated";
        const COLD: &str = "cold migration: stopped VM to another host, repeated";
        let caps = self.caps.clone();
        let hosts = match self.compute.list_hosts(ListHostsRequest {}).await {
            Ok(r) => r.into_inner().hosts,
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                for name in [HOSTS, PLACED, LIVE, COLD] {
                    self.skip(name, "the provider reports no hosts (ListHosts is UNIMPLEMENTED)");
                }
                let r = self.migration_refused(&caps).await;
                self.record("migration without hosts refused", r);
                return;
            }
            Err(s) => {
                self.record(HOSTS, Err(format!("ListHosts failed: {:?} {}", s.code(), s.message())));
                return;
            }
        };
        let r = self.hosts_well_formed(&hosts).await;
        self.record(HOSTS, r);
        let up: Vec<String> = hosts
            .iter()
            .filter(|h| HostState::try_from(h.state) == Ok(HostState::HostUp))
            .map(|h| h.name.clone())
            .collect();
        if up.len() < 2 {
            for name in [PLACED, LIVE, COLD] {
                self.skip(name, &format!("the provider reports {} host(s) up; moves need two", up.len()));
            }
            return;
        }
        let r = self.placed_on(&up[1]).await;
        self.record(PLACED, r);
        if caps.supports_live_migration {
            let r = self.migration(true, &up).await;
            self.record(LIVE, r);
        } else {
            self.skip(LIVE, "the provider does not declare supports_live_migration");
        }
        if caps.supports_cold_migration {
            let r = self.migration(false, &up).await;
            self.record(COLD, r);
        } else {
            self.skip(COLD, "the provider does not declare supports_cold_migration");
        }
        if !caps.supports_live_migration || !caps.supports_cold_migration {
            let r = self.migration_refused(&caps).await;
            self.record("migration refused without its flag", r);
        }
    }

    async fn hosts_well_formed(&mut self, hosts: &[HostInfo]) -> CheckResult {
        ensure(!hosts.is_empty(), || "ListHosts answered no hosts; answer UNIMPLEMENTED instead".to_owned())?;
        let mut names = std::collections::HashSet::new();
        for h in hosts {
            ensure(!h.name.is_empty() && h.name.len() <= 255, || {
                format!("host name {:?} is empty or too long", h.name)
            })?;
            ensure(names.insert(h.name.clone()), || format!("host {} is listed twice", h.name))?;
            ensure(h.vcpus > 0 && h.memory_mib > 0, || format!("host {} reports no capacity", h.name))?;
            ensure(HostState::try_from(h.state).is_ok_and(|s| s != HostState::Unspecified), || {
                format!("host {} has no state", h.name)
            })?;
        }
        let (id, created) = self.create("conf-host", None).await?;
        ensure(names.contains(&created.host), || {
            format!("CreateVm reports host {:?}, which ListHosts does not list", created.host)
        })?;
        let got = self.get(&id).await?;
        ensure(got.host == created.host, || {
            format!("GetVm reports host {:?}, CreateVm {:?}", got.host, created.host)
        })
    }

    async fn placed_on(&mut self, host: &str) -> CheckResult {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let mut spec = self.spec("conf-placed", None);
        spec.host = host.to_owned();
        let vm = self
            .compute
            .create_vm(CreateVmRequest { vm_id: id.clone(), spec: Some(spec), start: false })
            .await
            .map_err(|s| format!("CreateVm on host {host} failed: {:?} {}", s.code(), s.message()))?
            .into_inner();
        ensure(vm.host == host, || format!("asked for host {host}, CreateVm reports {:?}", vm.host))?;
        let mut spec = self.spec("conf-placed", None);
        spec.host = "no-such-host-conformance".to_owned();
        let other = uuid::Uuid::now_v7().to_string();
        self.created.push(other.clone());
        expect_code(
            self.compute.create_vm(CreateVmRequest { vm_id: other, spec: Some(spec), start: false }).await,
            tonic::Code::InvalidArgument,
            "CreateVm on a host the provider does not have",
        )
    }

    /// Moves a VM (running for `live`, stopped otherwise) to another up
    /// host, repeats the call, and checks the refusals around it.
    async fn migration(&mut self, live: bool, up: &[String]) -> CheckResult {
        let (id, vm) = self.create(if live { "conf-live" } else { "conf-cold" }, None).await?;
        if live {
            self.compute
                .start_vm(VmRef { vm_id: id.clone() })
                .await
                .map_err(|s| format!("StartVm failed: {:?} {}", s.code(), s.message()))?;
        }
        let target = up.iter().find(|h| **h != vm.host).cloned().unwrap_or_default();
        // The wrong kind of move for the VM's power state is refused.
        expect_code(
            self.compute
                .migrate_vm(MigrateVmRequest { vm_id: id.clone(), target_host: target.clone(), live: !live })
                .await,
            tonic::Code::FailedPrecondition,
            if live { "a cold MigrateVm of a running VM" } else { "a live MigrateVm of a stopped VM" },
        )?;
        for attempt in ["MigrateVm", "repeated MigrateVm"] {
            let moved = self
                .compute
                .migrate_vm(MigrateVmRequest { vm_id: id.clone(), target_host: target.clone(), live })
                .await
                .map_err(|s| format!("{attempt} to {target} failed: {:?} {}", s.code(), s.message()))?
                .into_inner();
            ensure(moved.host == target, || {
                format!("{attempt} to {target}: the VM reports host {:?}", moved.host)
            })?;
        }
        let got = self.get(&id).await?;
        ensure(got.host == target, || format!("after MigrateVm, GetVm reports host {:?}", got.host))?;
        let want = if live { PowerState::Running } else { PowerState::Shutoff };
        ensure(power(&got) == want, || {
            format!("after the move the VM is {:?}, expected {want:?}", power(&got))
        })?;
        expect_code(
            self.compute
                .migrate_vm(MigrateVmRequest {
                    vm_id: id.clone(),
                    target_host: "no-such-host-conformance".into(),
                    live,
                })
                .await,
            tonic::Code::InvalidArgument,
            "MigrateVm to a host the provider does not have",
        )?;
        expect_code(
            self.compute
                .migrate_vm(MigrateVmRequest {
                    vm_id: uuid::Uuid::now_v7().to_string(),
                    target_host: target,
                    live,
                })
                .await,
            tonic::Code::NotFound,
            "MigrateVm of a VM that does not exist",
        )
    }

    /// A move the provider does not declare is refused: UNIMPLEMENTED, or
    /// FAILED_PRECONDITION (it can move other VMs, not this one).
    async fn migration_refused(&mut self, caps: &Capabilities) -> CheckResult {
        let (id, _) = self.create("conf-nomove", None).await?;
        let live = !caps.supports_live_migration;
        if live {
            self.compute
                .start_vm(VmRef { vm_id: id.clone() })
                .await
                .map_err(|s| format!("StartVm failed: {:?} {}", s.code(), s.message()))?;
        }
        let r = self
            .compute
            .migrate_vm(MigrateVmRequest { vm_id: id, target_host: "conformance-elsewhere".into(), live })
            .await;
        match r {
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unimplemented
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                ) =>
            {
                Ok(())
            }
            Err(s) => {
                Err(format!("an undeclared move: expected UNIMPLEMENTED, got {:?} {}", s.code(), s.message()))
            }
            Ok(v) => {
                Err(format!("an undeclared {} move succeeded: {v:?}", if live { "live" } else { "cold" }))
            }
        }
    }

    async fn cleanup(&mut self) -> CheckResult {
        let mut left = Vec::new();
        let ids = std::mem::take(&mut self.created);
        for id in ids.clone() {
            let vm = VmRef { vm_id: id.clone() };
            let _ = self
                .compute
                .stop_vm(StopVmRequest { vm_id: id.clone(), force: true, timeout_seconds: 0 })
                .await;
            if let Err(s) = self.compute.delete_vm(vm).await {
                left.push(format!("{id} ({})", s.message()));
            }
        }
        if !left.is_empty() {
            return Err(format!("could not delete: {}", left.join(", ")));
        }
        self.nothing_left(&ids, "after cleanup").await
    }

    /// Fails when the provider's inventory, or the hypervisor's if the kit
    /// can look, still holds any of `ids`.
    async fn nothing_left(&mut self, ids: &[String], when: &str) -> CheckResult {
        let listed = self.list_ids().await?;
        let mut left: Vec<&String> = ids.iter().filter(|id| listed.contains(id)).collect();
        if !left.is_empty() {
            return Err(format!("{when}, the provider still lists {left:?}"));
        }
        if let Some(look) = self.options.hooks.as_ref().and_then(|h| h.hypervisor_vm_ids()) {
            let on_hypervisor = look.await.map_err(|e| format!("cannot look at the hypervisor: {e}"))?;
            left = ids.iter().filter(|id| on_hypervisor.contains(id)).collect();
            if !left.is_empty() {
                return Err(format!(
                    "{when}, the hypervisor still holds {left:?} (the provider no longer lists them)"
                ));
            }
        }
        Ok(())
    }

    /// A create that fails after its first effect, then DeleteVm: nothing
    /// may be left. `Ok(None)` when the test bed cannot arrange the fault.
    async fn half_made_create(&mut self) -> Result<Option<()>, String> {
        let Some(hooks) = self.options.hooks.clone() else { return Ok(None) };
        let Some(arm) = hooks.fail_next_create_after_first_effect() else { return Ok(None) };
        arm.await.map_err(|e| format!("cannot arm the fault: {e}"))?;
        let result = self.create("conformance-half", None).await;
        hooks.clear_faults().await.map_err(|e| format!("cannot clear the fault: {e}"))?;
        let id = self.created.last().cloned().unwrap_or_default();
        if result.is_ok() {
            return Err("CreateVm succeeded although the test bed made it fail after its first effect".into());
        }
        self.compute
            .delete_vm(VmRef { vm_id: id.clone() })
            .await
            .map_err(|s| format!("DeleteVm after a failed create: {:?} {}", s.code(), s.message()))?;
        self.nothing_left(std::slice::from_ref(&id), "after a failed create and DeleteVm").await?;
        Ok(Some(()))
    }
}

/// Runs every check against `options.endpoint`.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let channel = tonic::transport::Endpoint::from_shared(options.endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(options.call_timeout)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", options.endpoint))?;
    let mut kit = Kit {
        options,
        identity: IdentityClient::new(channel.clone()),
        compute: ComputeClient::new(channel),
        caps: Capabilities::default(),
        created: Vec::new(),
        report: Report::default(),
    };
    let r = kit.identity().await;
    kit.record("identity", r);
    let r = kit.capabilities().await;
    kit.record("capabilities and readiness", r);
    let r = kit.create_is_idempotent().await;
    kit.record("create is idempotent", r);
    kit.lifecycle().await;
    let r = kit.delete_is_idempotent().await;
    kit.record("delete is idempotent", r);
    let r = kit.missing_vms().await;
    kit.record("missing VMs are NOT_FOUND", r);
    let r = kit.invalid_arguments().await;
    kit.record("invalid arguments are INVALID_ARGUMENT", r);
    let caps = kit.caps.clone();
    let r = kit.cloud_init(caps.supports_cloud_init).await;
    kit.record(
        if caps.supports_cloud_init {
            "cloud-init user data"
        } else {
            "user data refused without supports_cloud_init"
        },
        r,
    );
    for (protocol, declared) in [
        ("vnc", caps.supports_console_vnc),
        ("spice", caps.supports_console_spice),
        ("rdp", caps.supports_console_rdp),
        ("serial", caps.supports_console_serial),
    ] {
        let name = format!("{protocol} console");
        if declared {
            let r = kit.console(protocol, true).await;
            kit.record(&name, r);
        } else {
            kit.skip(&name, &format!("the provider does not declare supports_console_{protocol}"));
            let r = kit.console(protocol, false).await;
            kit.record(&format!("{protocol} console refused as UNIMPLEMENTED"), r);
        }
    }
    const NICS: &str = "interfaces: one well-formed NIC per network, stable MACs";
    if kit.options.network.is_empty() {
        kit.skip(NICS, "the kit was given no network to attach");
    } else {
        let r = kit.interfaces().await;
        kit.record(NICS, r);
    }
    if caps.supports_resize {
        let r = kit.resize(caps.supports_hot_resize).await;
        kit.record(
            if caps.supports_hot_resize {
                "resize: stopped and running, idempotent, disks only grow"
            } else {
                "resize: stopped, idempotent, disks only grow; running refused"
            },
            r,
        );
        if !caps.supports_hot_resize {
            kit.skip("hot resize", "the provider does not declare supports_hot_resize");
        }
    } else {
        kit.skip("resize", "the provider does not declare supports_resize");
        let req = ResizeVmRequest {
            vm_id: uuid::Uuid::now_v7().to_string(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 0,
        };
        let r = expect_code(
            kit.compute.resize_vm(req).await,
            tonic::Code::Unimplemented,
            "ResizeVm without the capability",
        );
        kit.record("resize refused as UNIMPLEMENTED", r);
    }
    if caps.supports_snapshot {
        let r = kit.snapshots(caps.supports_snapshot_running).await;
        kit.record("snapshots: idempotent create and delete, list, revert", r);
    } else {
        kit.skip("snapshots", "the provider does not declare supports_snapshot");
        let id = uuid::Uuid::now_v7().to_string();
        let req = CreateSnapshotRequest { vm_id: id.clone(), snapshot_id: id, name: "x".into() };
        let r = expect_code(
            kit.compute.create_snapshot(req).await,
            tonic::Code::Unimplemented,
            "CreateSnapshot without the capability",
        );
        kit.record("snapshots refused as UNIMPLEMENTED", r);
    }
    kit.hosts_and_migration().await;
    match kit.half_made_create().await {
        Ok(Some(())) => {
            kit.record("a create failed after its first effect, then DeleteVm: nothing left", Ok(()))
        }
        Ok(None) => kit.skip(
            "a create failed after its first effect, then DeleteVm: nothing left",
            "the test bed gave no Hooks::fail_next_create_after_first_effect (see providers/GUIDE.md)",
        ),
        Err(e) => kit.record("a create failed after its first effect, then DeleteVm: nothing left", Err(e)),
    }
    let r = kit.cleanup().await;
    kit.record("cleanup: nothing left in the inventory or on the hypervisor", r);
    Ok(kit.report)
}
