//! # hcp-provider-conformance
//!
//! Checks any provider endpoint against the `hcp.provider.v1` contract, the
//! way csi-sanity checks CSI drivers: identity and capabilities, every
//! mutating call repeated to prove idempotency, the lifecycle state
//! machine (soft and hard reboots, a graceful stop with a timeout, a
//! forced stop), resize (stopped, and running as the flags say), the NICs
//! `GetVm` reports, the hosts a provider reports and the host of each VM,
//! a create on a named host, live and cold migration between hosts,
//! volumes (idempotent create, extend, attach and detach at slots with
//! their refusals, hot attach, extend in use, DeleteVm leaving volumes
//! behind), the error codes for missing VMs, invalid states and
//! unsupported features. A check that needs a capability the provider does
//! not declare is skipped with the reason printed, never silently passed.
//! Every VM and volume the kit creates is deleted at the end, whatever
//! happened, and the kit then proves nothing is left: the provider's own
//! inventory (`ListVms`, `ListVolumes`), and the hypervisor's when the kit
//! is given a way to look ([`Hooks`]), hold none of them. With [`Hooks`] that can drive the
//! provider into a create that fails after its first effect, the kit also
//! checks that `DeleteVm` then removes the half-made VM.
//!
//! Use it as a library ([`run`]) or as the `hcp-provider-conformance`
//! command.
//!
//! Code map: `options` (what the kit is given), `report` (what it found),
//! `kit` (its state while it runs, the error a check fails with, the
//! helpers checks share), `checks` (the checks, a module per area) and
//! `run` (the runner, which calls them in order).

mod checks;
mod kit;
mod options;
mod report;
mod run;

pub use crate::options::{HookError, HookFuture, Hooks, Options};
pub use crate::report::{Outcome, Report};
pub use crate::run::{RunError, run};
