//! The lifecycle of one VM: create and delete, each repeated to prove
//! idempotency, and the power state machine (starts, soft and hard reboots,
//! graceful and forced stops, reboots refused when stopped).

use std::sync::Arc;

use hcp_proto::provider::{CreateVmRequest, PowerState, RebootVmRequest, StopVmRequest, VmRef};

use crate::kit::{CheckError, CheckResult, Kit, call, ensure, expect_code, power};

impl Kit {
    /// A repeated `CreateVm` makes no second VM; `start=false` leaves it off.
    pub(crate) async fn create_is_idempotent(&mut self) -> CheckResult {
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
            .map_err(call("repeated CreateVm failed"))?
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
    pub(crate) async fn lifecycle(&mut self) {
        const CHECKS: [&str; 4] = [
            "lifecycle: start (repeated)",
            "reboot: soft and hard (RebootVm.hard), refused when stopped",
            "stop: graceful with a timeout, then the default timeout (repeated)",
            "stop: forced (StopVm.force), repeated",
        ];
        let id = match self.create("conf-life", None).await {
            Ok((id, _)) => id,
            Err(e) => {
                let e = Arc::new(e);
                for name in CHECKS {
                    self.record(name, Err(CheckError::NoVm(e.clone())));
                }
                return;
            }
        };
        let r = self.start_twice(&id).await;
        let started = r.is_ok();
        self.record(CHECKS[0], r);
        if !started {
            for name in &CHECKS[1..] {
                self.record(name, Err(CheckError::Blocked { step: "StartVm" }));
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

    /// `StartVm`, twice: running both times.
    async fn start_twice(&mut self, id: &str) -> CheckResult {
        for round in 0..2 {
            let r = self
                .compute
                .start_vm(VmRef { vm_id: id.to_owned() })
                .await
                .map_err(call(format!("StartVm #{round}")))?;
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
                .map_err(call(format!("{kind} RebootVm")))?;
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
            let r = self
                .compute
                .stop_vm(stop)
                .await
                .map_err(call(format!("StopVm #{round} (timeout {timeout_seconds} s)")))?;
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
        self.compute.start_vm(VmRef { vm_id: id.to_owned() }).await.map_err(call("StartVm"))?;
        for round in 0..2 {
            let forced = StopVmRequest { vm_id: id.to_owned(), force: true, timeout_seconds: 3600 };
            let r = self.compute.stop_vm(forced).await.map_err(call(format!("forced StopVm #{round}")))?;
            ensure(power(r.get_ref()) == PowerState::Shutoff, || {
                format!("after forced StopVm #{round} power is {:?}", power(r.get_ref()))
            })?;
        }
        Ok(())
    }

    /// A repeated `DeleteVm` succeeds saying the VM no longer existed.
    pub(crate) async fn delete_is_idempotent(&mut self) -> CheckResult {
        let (id, _) = self.create("conf-del", None).await?;
        let vm = VmRef { vm_id: id.clone() };
        let first = self.compute.delete_vm(vm.clone()).await.map_err(call("DeleteVm"))?;
        ensure(first.get_ref().existed, || "DeleteVm of an existing VM says it did not exist".to_owned())?;
        let second = self.compute.delete_vm(vm.clone()).await.map_err(call("repeated DeleteVm failed"))?;
        ensure(!second.get_ref().existed, || "repeated DeleteVm says the VM still existed".to_owned())?;
        expect_code(self.compute.get_vm(vm).await, tonic::Code::NotFound, "GetVm after DeleteVm")?;
        ensure(!self.list_ids().await?.contains(&id), || "ListVms still shows a deleted VM".to_owned())
    }
}
