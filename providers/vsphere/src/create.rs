//! CreateVM: clone the template (once, even when an answer is lost), then
//! reconfigure and power on, each step skipped when it is done already.

use std::time::Duration;

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::errors::{invalid, map_error};
use crate::soap::{VIM25, VimError};
use crate::vim::{self, OptionValue};
use crate::volumes::VolumesAtCreate;
use crate::{ID_KEY, Vsphere, vm_name};

impl Vsphere {
    /// Creates the VM of `req`, or finishes a create that was interrupted.
    pub(crate) async fn create(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        if !is_uuid(&vm_id) {
            return Err(invalid("vm_id", "must be a UUID"));
        }
        let spec = req.spec.ok_or_else(|| invalid("spec", "required"))?;
        if spec.vcpus == 0 || spec.memory_mib == 0 {
            return Err(invalid("spec", "vcpus and memory_mib must be positive"));
        }
        let image = spec.image.as_ref().ok_or_else(|| invalid("spec.image", "required"))?;
        // Volumes first, then the VM: the order AttachVolume locks them in.
        let mut _volumes = Vec::new();
        for key in VolumesAtCreate::lock_keys(&spec) {
            _volumes.push(self.locks.lock(&key).await);
        }
        let _serial = self.locks.lock(&vm_id).await;
        let places = self.places().await?.clone();
        // Checked before anything is made.
        let volumes = self.volumes_at_create(&vm_id, &spec).await?;
        let vm = match self.find(&vm_id, &["config.extraConfig"]).await? {
            Some(vm) => {
                self.lost_clones.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm_id);
                vm
            }
            None => {
                let lost = self.lost_clones.lock().unwrap_or_else(|e| e.into_inner()).get(&vm_id).copied();
                let patience = Duration::from_secs(self.config.timing.task_timeout_seconds);
                if let Some(sent) = lost.filter(|t| t.elapsed() < patience) {
                    return Err(ProviderError::new(
                        ErrorKind::Busy,
                        format!(
                            "the clone sent {:?} ago got no answer; waiting for vCenter to finish it before cloning again",
                            sent.elapsed()
                        ),
                    ));
                }
                let template = self.template(&image.source).await?;
                let target_host = match spec.host.as_str() {
                    "" => None,
                    name => Some(self.host_ref(name).await?),
                };
                // Checked before anything is made.
                self.port_groups(&spec).await?;
                let name = vm_name(&vm_id);
                let clone = vim::CloneVm {
                    xmlns: VIM25,
                    this: &template,
                    folder: &places.folder,
                    name: &name,
                    spec: vim::CloneSpec {
                        location: vim::RelocateSpec {
                            datastore: places.datastore.clone(),
                            pool: Some(places.pool.clone()),
                            host: target_host.clone(),
                        },
                        template: false,
                        config: vim::ConfigSpec {
                            instance_uuid: Some(vm_id.clone()),
                            annotation: Some(format!("HCP VM {vm_id} ({})", spec.name)),
                            extra_config: vec![OptionValue::new(ID_KEY, &vm_id)],
                            ..Default::default()
                        },
                        power_on: false,
                    },
                };
                let task = match self.soap.submit("CloneVM_Task", &clone).await {
                    Ok(task) => task,
                    Err(e @ (VimError::Transport(_) | VimError::Timeout(_))) => {
                        self.lost_clones
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(vm_id.clone(), std::time::Instant::now());
                        return Err(map_error(e));
                    }
                    Err(e) => return Err(map_error(e)),
                };
                self.lost_clones.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm_id);
                self.failpoints.hit("create:after-clone-submit");
                self.soap.wait(&task, Duration::ZERO).await.map_err(map_error)?;
                self.failpoints.hit("create:after-clone");
                tracing::info!(vm_id, "cloned");
                self.find(&vm_id, &["config.extraConfig"]).await?.ok_or_else(|| {
                    ProviderError::new(ErrorKind::Internal, "the clone finished but its VM cannot be found")
                })?
            }
        };
        // A boot volume made after the clone: a create interrupted between
        // the two finds the VM and makes (or finds) the volume.
        let boot = self.boot_volume(&volumes, &image.source, spec.disk_gib).await?;
        let mut change = self.desired(&vm, &vm_id, &spec).await?;
        // In the same reconfiguration: the root disk swapped for the boot
        // volume, the data volumes plugged in, all or nothing.
        change.device_change.extend(self.volume_changes(&vm, &vm_id, boot.as_ref(), &volumes).await?);
        let mut vm = vm;
        if !change.is_empty() {
            if vm.running() && !change.device_change.is_empty() {
                // A retried create of a VM that is already running and
                // configured never gets here; a running VM whose devices
                // differ is not HCP's doing.
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!("vm {vm_id} is running with a configuration HCP did not give it"),
                ));
            }
            self.reconfigure(&vm, change).await?;
            self.failpoints.hit("create:after-reconfigure");
            vm = self.reread(&vm).await?;
        }
        if req.start && !vm.running() {
            self.power_on(&vm).await?;
            self.failpoints.hit("create:after-power-on");
            vm = self.reread(&vm).await?;
        }
        Ok(self.info(&vm, &vm_id))
    }
}
