//! CreateVM: the overlay disk, the NoCloud seed, the domain defined from
//! its plan (UUID = HCP VM id) and started, each step repeatable.

use hcp_provider_sdk::kit::BackingError;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::disks::{make_overlay, set_mode};
use crate::domain::DomainPlan;
use crate::errors::{invalid, io_error};
use crate::{Libvirt, seed};

impl Libvirt {
    pub(crate) async fn create(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let spec = req.spec.ok_or_else(|| invalid("spec: required"))?;
        if spec.user_data.is_some() && !self.inner.capabilities.supports_cloud_init {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "cloud-init is not supported on this host",
            ));
        }
        if let Some(active) = self.presence(&vm_id).await? {
            if req.start && !active {
                self.start(&vm_id).await?;
            }
            return self.info(&vm_id).await;
        }
        let config = &self.inner.config;
        let source = spec.image.as_ref().map(|i| i.source.clone()).unwrap_or_default();
        let image = config.image(&source).ok_or_else(|| {
            invalid(format!("image.source: image {source:?} is not available on this host"))
        })?;
        if spec.vcpus == 0 {
            return Err(invalid("vcpus: must be at least 1"));
        }
        if spec.memory_mib < 32 {
            return Err(invalid("memory_mib: must be at least 32"));
        }
        // The operator's mapping names a key of this host's [networks]
        // table; without one the HCP name is the key.
        let backings = config.backings();
        let nics = backings.resolve(&spec.networks, |key| backings.get(key).cloned()).map_err(|e| {
            let (index, field, key) = match e {
                BackingError::UnknownNetwork { index, network } => (index, "network", network),
                BackingError::UnknownBacking { index, backing } => (index, "backing", backing),
            };
            invalid(format!("networks[{index}].{field}: network {key:?} is not available on this host"))
        })?;
        if !image.disk.is_file() {
            return Err(ProviderError::new(
                ErrorKind::Internal,
                format!("image {source:?}: base disk {} is missing on this host", image.disk.display()),
            ));
        }

        let dir = self.vm_dir(&vm_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_error("create the vm directory", e))?;
        set_mode(&dir, 0o755).map_err(|e| io_error("open the vm directory", e))?;
        let disk = dir.join("disk.qcow2");
        if !disk.exists() {
            make_overlay(&image.disk, &disk, spec.disk_gib).await?;
        }
        self.failpoint("create:after-disk");
        let user_data = spec.user_data.clone().unwrap_or_default();
        let seed = if spec.user_data.is_some() || !spec.hostname.is_empty() {
            let path = dir.join("seed.iso");
            seed::build(&path, &vm_id, &spec.hostname, &user_data)
                .await
                .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("cloud-init seed: {e}")))?;
            Some(path)
        } else {
            None
        };
        self.failpoint("create:after-seed");
        let plan = DomainPlan {
            vm_id: vm_id.clone(),
            vm_name: spec.name.clone(),
            domain_type: self.inner.domain_type,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk,
            seed,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline.clone(),
            nics,
            serial_log: dir.join("serial.log"),
            vnc_listen: config.vnc_listen,
            vnc_password: vnc_password(),
            image: source,
            labels: spec.labels.into_iter().collect(),
        };
        let xml = plan.to_xml();
        let id = vm_id.clone();
        self.call(&format!("define vm {vm_id}"), move |c| match c.define_domain_xml(&xml) {
            Ok(_) => Ok(()),
            // Someone defined it meanwhile (a retry racing a slow first try).
            Err(e) if c.lookup_domain_by_uuid_string(&id).is_ok() => {
                tracing::info!(error = %e.message(), "domain appeared while defining it");
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
        .await?;
        self.failpoint("create:after-define");
        if req.start {
            self.start(&vm_id).await?;
        }
        self.failpoint("create:after-start");
        self.info(&vm_id).await
    }
}

/// A random 8-character VNC password (RFB's DES auth uses 8 bytes).
fn vnc_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..8).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}
