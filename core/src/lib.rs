//! HCP core: the control plane. It serves the northbound gRPC API (tenant,
//! ops, common), keeps desired state, jobs and the audit trail in the store,
//! places VMs on providers, and runs jobs against provider processes over
//! the `hcp.provider.v1` protocol.
//!
//! Layout: `api` (handlers) -> `store` (all SQL) and `jobs` (engine) ->
//! `providers` (southbound client). `server::run` wires them together.

pub mod admission;
pub mod api;
pub mod audit_chain;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod convert;
pub mod drain;
pub mod egress;
pub mod error;
pub mod events;
pub mod images;
pub mod jobs;
pub mod jwks;
pub mod metrics;
pub mod moves;
pub mod placement;
pub mod providers;
pub mod queue;
pub mod reconciler;
pub mod secrets;
pub mod server;
pub mod webhooks;

pub use hcp_domain::{audit, lifecycle, model, usage};
pub use hcp_store as store;

pub use config::Config;
pub use server::{Listening, run};
