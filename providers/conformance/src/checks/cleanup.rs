//! Leaving nothing behind: every VM the kit made is deleted and proven gone
//! from the provider's inventory and, with [`crate::Hooks`], from the
//! hypervisor's; a create that fails after its first effect is cleaned up
//! by `DeleteVm`.

use hcp_proto::provider::{StopVmRequest, VmRef};

use crate::kit::{CheckError, CheckResult, Kit, call, hook};

impl Kit {
    /// Deletes every VM the kit made (stopping it first) and proves them gone.
    pub(crate) async fn cleanup(&mut self) -> CheckResult {
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
            return Err(CheckError::Violation(format!("could not delete: {}", left.join(", "))));
        }
        self.nothing_left(&ids, "after cleanup").await
    }

    /// Fails when the provider's inventory, or the hypervisor's if the kit
    /// can look, still holds any of `ids`.
    async fn nothing_left(&mut self, ids: &[String], when: &str) -> CheckResult {
        let listed = self.list_ids().await?;
        let mut left: Vec<&String> = ids.iter().filter(|id| listed.contains(id)).collect();
        if !left.is_empty() {
            return Err(CheckError::Violation(format!("{when}, the provider still lists {left:?}")));
        }
        if let Some(look) = self.options.hooks.as_ref().and_then(|h| h.hypervisor_vm_ids()) {
            let on_hypervisor = look.await.map_err(hook("look at the hypervisor"))?;
            left = ids.iter().filter(|id| on_hypervisor.contains(id)).collect();
            if !left.is_empty() {
                return Err(CheckError::Violation(format!(
                    "{when}, the hypervisor still holds {left:?} (the provider no longer lists them)"
                )));
            }
        }
        Ok(())
    }

    /// A create that fails after its first effect, then DeleteVm: nothing
    /// may be left. `Ok(None)` when the test bed cannot arrange the fault.
    pub(crate) async fn half_made_create(&mut self) -> Result<Option<()>, CheckError> {
        let Some(hooks) = self.options.hooks.clone() else { return Ok(None) };
        let Some(arm) = hooks.fail_next_create_after_first_effect() else { return Ok(None) };
        arm.await.map_err(hook("arm the fault"))?;
        let result = self.create("conformance-half", None).await;
        hooks.clear_faults().await.map_err(hook("clear the fault"))?;
        let id = self.created.last().cloned().unwrap_or_default();
        if result.is_ok() {
            return Err(CheckError::Violation(
                "CreateVm succeeded although the test bed made it fail after its first effect".to_owned(),
            ));
        }
        self.compute
            .delete_vm(VmRef { vm_id: id.clone() })
            .await
            .map_err(call("DeleteVm after a failed create"))?;
        self.nothing_left(std::slice::from_ref(&id), "after a failed create and DeleteVm").await?;
        Ok(Some(()))
    }
}
