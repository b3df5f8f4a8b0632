//! HCP's domain: what a VM, a job and a provider are ([`model`]), and how
//! jobs move VMs between states ([`lifecycle`]), and what their usage
//! events add up to ([`usage`]). Pure data and rules: no
//! I/O, no runtime, no SQL; the store and core both build on it.

pub mod audit;
pub mod lifecycle;
pub mod model;
pub mod usage;
pub mod webhook;
