//! Records the store suites write as they are, without the API in front:
//! one shape each, so that a field added to a domain type is filled in one
//! place.

use hcp_domain::model::{Capabilities, Provider, ProviderTls, now};
use hcp_proto::ids::ProviderId;

/// A healthy simulated provider `name` in zone `z1`, declaring no
/// capability (set `capabilities` with struct update syntax).
pub fn sim_provider(name: &str) -> Provider {
    let now = now();
    Provider {
        id: ProviderId::new(),
        name: name.into(),
        zone: "z1".into(),
        endpoint: "http://127.0.0.1:1".into(),
        plugin_name: "sim.hcp.dev".into(),
        plugin_version: "0".into(),
        hypervisor: "sim".into(),
        protocol_version: "1".into(),
        capabilities: Capabilities::default(),
        healthy: true,
        health_message: "ready".into(),
        last_probe_at: Some(now),
        created_at: now,
        has_credentials: false,
        tls: ProviderTls::default(),
        allow_plaintext: false,
    }
}
