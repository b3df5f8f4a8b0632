//! The error codes of the contract: calls on VMs that do not exist are
//! NOT_FOUND (a delete succeeds), malformed requests INVALID_ARGUMENT.

use hcp_proto::provider::{CreateVmRequest, RebootVmRequest, ResizeVmRequest, StopVmRequest, VmRef};

use crate::kit::{CheckResult, Kit, call, ensure, expect_code};

impl Kit {
    /// Every call on a VM that does not exist is NOT_FOUND; its delete succeeds.
    pub(crate) async fn missing_vms(&mut self) -> CheckResult {
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
        let deleted =
            self.compute.delete_vm(ghost).await.map_err(call("DeleteVm of an unknown VM must succeed"))?;
        ensure(!deleted.get_ref().existed, || "DeleteVm of an unknown VM says it existed".to_owned())
    }

    /// A malformed `vm_id` and a missing spec are INVALID_ARGUMENT.
    pub(crate) async fn invalid_arguments(&mut self) -> CheckResult {
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
}
