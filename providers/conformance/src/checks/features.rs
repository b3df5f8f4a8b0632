//! The optional features, checked as the capabilities say (or refused
//! when not declared): cloud-init user data, consoles, the NICs `GetVm`
//! reports, resize and snapshots.

use hcp_proto::provider::{
    ConsoleTransport, CreateSnapshotRequest, CreateVmRequest, GetConsoleLogRequest, GetConsoleRequest,
    NetworkAttachment, PowerState, ResizeVmRequest, SnapshotRef, StopVmRequest, VmInfo, VmRef,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::kit::{CheckResult, Kit, call, ensure, expect_code, power};

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

/// A public key the kit's cloud-init VM is given (no one holds its private
/// key: it was made for this and thrown away).
const CONFORMANCE_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 conformance";

impl Kit {
    /// A create with user data and SSH keys (`ssh_authorized_keys`)
    /// succeeds when declared, else is UNIMPLEMENTED.
    pub(crate) async fn cloud_init(&mut self, declared: bool) -> CheckResult {
        let ud = Some("#cloud-config\nhostname: conf\n".to_owned());
        if declared {
            let id = uuid::Uuid::now_v7().to_string();
            self.created.push(id.clone());
            let mut spec = self.spec("conf-ci", ud);
            spec.ssh_authorized_keys = vec![CONFORMANCE_KEY.to_owned()];
            self.compute
                .create_vm(CreateVmRequest { vm_id: id, spec: Some(spec), start: false })
                .await
                .map(|_| ())
                .map_err(call("CreateVm with user data and SSH keys"))
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

    /// `GetConsole` of a running VM gives an endpoint when declared, else is
    /// UNIMPLEMENTED.
    pub(crate) async fn console(&mut self, protocol: &str, declared: bool) -> CheckResult {
        let (id, _) = self.create("conf-console", None).await?;
        self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm"))?;
        let r = self
            .compute
            .get_console(GetConsoleRequest { vm_id: id.clone(), protocol: protocol.to_owned() })
            .await;
        if declared {
            let ep = r.map_err(call(format!("GetConsole {protocol}")))?.into_inner();
            ensure(!ep.host.is_empty() && ep.port > 0, || {
                format!("GetConsole {protocol} gave no endpoint: {ep:?}")
            })?;
            ensure(ep.protocol == protocol, || format!("asked for {protocol}, got {:?}", ep.protocol))?;
            if protocol == "serial" && ep.transport() == ConsoleTransport::Tcp && !ep.password.is_empty() {
                serial_line(&ep).await?;
            }
            Ok(())
        } else {
            expect_code(
                r,
                tonic::Code::Unimplemented,
                &format!("GetConsole {protocol} without the capability"),
            )
        }
    }

    /// `GetConsoleLog` of a running VM answers at most the lines asked for,
    /// and NOT_FOUND for a VM the provider does not know, when declared;
    /// else it is UNIMPLEMENTED.
    pub(crate) async fn console_log(&mut self, declared: bool) -> CheckResult {
        let (id, _) = self.create("conf-log", None).await?;
        self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm"))?;
        let r = self.compute.get_console_log(GetConsoleLogRequest { vm_id: id.clone(), tail_lines: 3 }).await;
        if !declared {
            return expect_code(r, tonic::Code::Unimplemented, "GetConsoleLog without the capability");
        }
        let log = r.map_err(call("GetConsoleLog"))?.into_inner();
        let lines = log.output.strip_suffix('\n').unwrap_or(&log.output).split('\n').count();
        ensure(log.lines <= 3 && (log.output.is_empty() || lines <= 3), || {
            format!(
                "GetConsoleLog with tail_lines 3 gave {} lines ({lines} in output): {:?}",
                log.lines, log.output
            )
        })?;
        let unknown = uuid::Uuid::now_v7().to_string();
        let r = self.compute.get_console_log(GetConsoleLogRequest { vm_id: unknown, tail_lines: 3 }).await;
        expect_code(r, tonic::Code::NotFound, "GetConsoleLog of a VM the provider does not know")
    }

    /// GetVm reports one well-formed NIC per requested network (the kit
    /// attaches its network twice), in order, or none when the provider
    /// cannot tell; the MACs are distinct and do not change when the VM
    /// starts; the addresses of the running VM are well-formed.
    pub(crate) async fn interfaces(&mut self) -> CheckResult {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let mut spec = self.spec("conf-nics", None);
        spec.networks
            .push(NetworkAttachment { network: self.options.network.clone(), backing: String::new() });
        self.compute
            .create_vm(CreateVmRequest { vm_id: id.clone(), spec: Some(spec), start: false })
            .await
            .map_err(call("CreateVm with two NICs"))?;
        let stopped = self.get(&id).await?;
        check_nics(&stopped, 2)?;
        if let [a, b] = &stopped.interfaces[..] {
            ensure(a.mac != b.mac, || format!("both NICs have MAC {}", a.mac))?;
        }
        self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm"))?;
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
            .map_err(call("forced StopVm"))?;
        Ok(())
    }

    /// ResizeVm of a stopped VM (idempotent, disks only grow, a refused
    /// request changes nothing), and of a running one as the capabilities
    /// say.
    pub(crate) async fn resize(&mut self, hot: bool) -> CheckResult {
        let (id, created) = self.create("conf-resize", None).await?;
        let (vcpus, memory_mib) = (created.vcpus.max(self.options.vcpus) + 1, self.options.memory_mib + 128);
        // One GiB more than the disk the provider made (at least the 1 GiB
        // asked for; a template may have made it larger).
        let disk_gib = self.get(&id).await?.disk_gib.max(1) + 1;
        let grow = ResizeVmRequest { vm_id: id.clone(), vcpus, memory_mib, disk_gib };
        for round in 0..2 {
            let r = self
                .compute
                .resize_vm(grow.clone())
                .await
                .map_err(call(format!("ResizeVm #{round} of a stopped VM")))?;
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
        self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm"))?;
        let running = ResizeVmRequest { vm_id: id.clone(), vcpus: vcpus + 1, memory_mib, disk_gib: 0 };
        if hot {
            let r = self
                .compute
                .resize_vm(running)
                .await
                .map_err(call("ResizeVm of a running VM (supports_hot_resize)"))?;
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

    /// Snapshots: idempotent create and delete, list, revert, and a running VM's
    /// snapshot as `supports_snapshot_running` says.
    pub(crate) async fn snapshots(&mut self, running_too: bool) -> CheckResult {
        let (id, _) = self.create("conf-snap", None).await?;
        let snap = uuid::Uuid::now_v7().to_string();
        let req =
            CreateSnapshotRequest { vm_id: id.clone(), snapshot_id: snap.clone(), name: "conf".to_owned() };
        let first = self.compute.create_snapshot(req.clone()).await.map_err(call("CreateSnapshot"))?;
        let second =
            self.compute.create_snapshot(req).await.map_err(call("repeated CreateSnapshot failed"))?;
        ensure(first.get_ref().native_id == second.get_ref().native_id, || {
            "repeated CreateSnapshot made another snapshot: not idempotent".to_owned()
        })?;
        let listed = self
            .compute
            .list_snapshots(VmRef { vm_id: id.clone() })
            .await
            .map_err(call("ListSnapshots"))?
            .into_inner();
        let n = listed.snapshots.iter().filter(|s| s.snapshot_id == snap).count();
        ensure(n == 1, || format!("ListSnapshots shows the snapshot {n} times"))?;
        self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm"))?;
        let live = CreateSnapshotRequest {
            vm_id: id.clone(),
            snapshot_id: uuid::Uuid::now_v7().to_string(),
            name: "live".into(),
        };
        let r = self.compute.create_snapshot(live).await;
        if running_too {
            r.map_err(call("CreateSnapshot of a running VM"))?;
        } else {
            expect_code(
                r,
                tonic::Code::FailedPrecondition,
                "CreateSnapshot of a running VM without supports_snapshot_running",
            )?;
        }
        // The first snapshot recorded a stopped VM: reverting stops it.
        let sref = SnapshotRef { vm_id: id.clone(), snapshot_id: snap.clone() };
        let reverted = self.compute.revert_snapshot(sref.clone()).await.map_err(call("RevertSnapshot"))?;
        ensure(power(reverted.get_ref()) == PowerState::Shutoff, || {
            format!("after reverting to a stopped snapshot the VM is {:?}", power(reverted.get_ref()))
        })?;
        let ghost = SnapshotRef { vm_id: id.clone(), snapshot_id: uuid::Uuid::now_v7().to_string() };
        expect_code(
            self.compute.revert_snapshot(ghost).await,
            tonic::Code::NotFound,
            "RevertSnapshot of an unknown snapshot",
        )?;
        let d1 = self.compute.delete_snapshot(sref.clone()).await.map_err(call("DeleteSnapshot"))?;
        let d2 = self.compute.delete_snapshot(sref).await.map_err(call("repeated DeleteSnapshot failed"))?;
        ensure(d1.get_ref().existed && !d2.get_ref().existed, || {
            "DeleteSnapshot is not idempotent".to_owned()
        })
    }
}

/// A serial endpoint of the SDK's relay carries the guest's line: after
/// the ticket, a carriage return brings something back (a prompt, an echo);
/// the ticket opens nothing a second time.
async fn serial_line(ep: &hcp_proto::provider::ConsoleEndpoint) -> CheckResult {
    let wait = std::time::Duration::from_secs(60);
    let addr = format!("{}:{}", ep.host, ep.port);
    let connect = || async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| {
            crate::kit::CheckError::Violation(format!("cannot reach the serial endpoint: {e}"))
        })?;
        s.write_all(format!("{}\n\r", ep.password).as_bytes()).await.map_err(|e| {
            crate::kit::CheckError::Violation(format!("cannot write to the serial endpoint: {e}"))
        })?;
        Ok::<_, crate::kit::CheckError>(s)
    };
    let mut line = connect().await?;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(wait, line.read(&mut buf)).await;
    ensure(matches!(n, Ok(Ok(1..))), || format!("nothing came back on the serial line in {wait:?}: {n:?}"))?;
    drop(line);
    let mut again = connect().await?;
    let n = tokio::time::timeout(wait, again.read(&mut buf)).await;
    ensure(matches!(n, Ok(Ok(0) | Err(_))), || format!("a used serial ticket opened the line again: {n:?}"))
}
