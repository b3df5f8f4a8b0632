//! Identity and readiness: `GetPluginInfo` names the provider and its
//! protocol versions, `GetCapabilities` answers the same twice, `Probe`
//! says ready.

use hcp_proto::provider::{GetCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};

use crate::kit::{CheckResult, Kit, call, ensure};

impl Kit {
    /// `GetPluginInfo`: a DNS-like name, a version, the protocol version.
    pub(crate) async fn identity(&mut self) -> CheckResult {
        let info = self
            .identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .map_err(call("GetPluginInfo"))?
            .into_inner();
        ensure(!info.name.is_empty() && info.name.len() <= 63, || {
            format!("name {:?} must be 1 to 63 characters", info.name)
        })?;
        ensure(info.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'), || {
            format!("name {:?} must be DNS-like", info.name)
        })?;
        ensure(!info.vendor_version.is_empty(), || "vendor_version is empty".to_owned())?;
        ensure(info.protocol_versions.iter().any(|v| v == hcp_proto::PROVIDER_PROTOCOL_VERSION), || {
            format!(
                "protocol_versions {:?} lack {}",
                info.protocol_versions,
                hcp_proto::PROVIDER_PROTOCOL_VERSION
            )
        })
    }

    /// `GetCapabilities` answers the same twice (kept for the later checks);
    /// `Probe` says ready.
    pub(crate) async fn capabilities(&mut self) -> CheckResult {
        let caps = self
            .identity
            .get_capabilities(GetCapabilitiesRequest {})
            .await
            .map_err(call("GetCapabilities"))?
            .into_inner();
        let again = self
            .identity
            .get_capabilities(GetCapabilitiesRequest {})
            .await
            .map_err(call("GetCapabilities"))?
            .into_inner();
        ensure(caps == again, || "capabilities changed between two calls".to_owned())?;
        self.caps = caps;
        let probe = self.identity.probe(ProbeRequest {}).await.map_err(call("Probe"))?.into_inner();
        ensure(probe.ready, || format!("Probe says not ready: {}", probe.message))
    }
}
