//! Hosts and moves: the hosts `ListHosts` reports and the host of each VM,
//! a create on a named host, live and cold migration, and moves refused
//! without their capability flag.

use hcp_proto::provider::{
    Capabilities, CreateVmRequest, HostInfo, HostState, ListHostsRequest, MigrateVmRequest, PowerState, VmRef,
};

use crate::kit::{CheckError, CheckResult, Kit, call, ensure, expect_code, power};

impl Kit {
    /// The hosts (ListHosts), the host of a VM, a create on a named host,
    /// and migration as the flags say, each a check of its own; skipped
    /// with the reason when the provider reports no hosts or one.
    pub(crate) async fn hosts_and_migration(&mut self) {
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
                self.record(HOSTS, Err(call("ListHosts failed")(s)));
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

    /// The hosts are named, unique, with capacity and state; a new VM reports
    /// one of them.
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

    /// A create on `host` lands there; one on a host that does not exist is
    /// INVALID_ARGUMENT.
    async fn placed_on(&mut self, host: &str) -> CheckResult {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let mut spec = self.spec("conf-placed", None);
        spec.host = host.to_owned();
        let vm = self
            .compute
            .create_vm(CreateVmRequest { vm_id: id.clone(), spec: Some(spec), start: false })
            .await
            .map_err(call(format!("CreateVm on host {host} failed")))?
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
            self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm failed"))?;
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
                .map_err(call(format!("{attempt} to {target} failed")))?
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
    pub(crate) async fn migration_refused(&mut self, caps: &Capabilities) -> CheckResult {
        let (id, _) = self.create("conf-nomove", None).await?;
        let live = !caps.supports_live_migration;
        if live {
            self.compute.start_vm(VmRef { vm_id: id.clone() }).await.map_err(call("StartVm failed"))?;
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
            Err(s) => Err(CheckError::Violation(format!(
                "an undeclared move: expected UNIMPLEMENTED, got {:?} {}",
                s.code(),
                s.message()
            ))),
            Ok(v) => Err(CheckError::Violation(format!(
                "an undeclared {} move succeeded: {v:?}",
                if live { "live" } else { "cold" }
            ))),
        }
    }
}
