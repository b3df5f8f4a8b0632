//! What the kit is given: the provider's endpoint, the shape of the test
//! VMs, and the test bed's [`Hooks`] (a look at the hypervisor, a way to
//! inject faults).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// What a hook may fail with: the test bed's own error, whatever its type
/// (a `String` converts into it with `?`).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future, for [`Hooks`] without an async-trait dependency.
pub type HookFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, HookError>> + Send + 'a>>;

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

    /// The HCP volume ids the hypervisor itself holds, found the way the
    /// provider marks its volumes, without asking the provider. `None`:
    /// the kit cannot look.
    fn hypervisor_volume_ids(&self) -> Option<HookFuture<'_, Vec<String>>> {
        None
    }

    /// Arranges that the provider's next `CreateVm` fails after its first
    /// effect on the hypervisor (e.g. the clone exists, its configuration
    /// is refused). `None`: this test bed cannot.
    fn fail_next_create_after_first_effect(&self) -> Option<HookFuture<'_, ()>> {
        None
    }

    /// Waits until the guest of the running VM `vm_id` has booted far
    /// enough to answer a hot unplug (a guest must release a disk before
    /// the hypervisor detaches it; one still in its firmware never does).
    /// `None`: the kit goes on at once.
    fn guest_booted(&self, vm_id: &str) -> Option<HookFuture<'_, ()>> {
        let _ = vm_id;
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
