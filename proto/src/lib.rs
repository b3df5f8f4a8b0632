//! HCP's wire contract, shared by every process: the Rust types generated
//! from `proto/`, the encoded descriptor set (for gRPC reflection and REST
//! transcoding), typed ids, and the one error taxonomy with its single mapping
//! to gRPC codes and HTTP statuses.
//!
//! This crate changes only when the contract changes; it knows nothing about
//! storage, queues or any hypervisor.

pub mod error;
pub mod ids;
pub mod rules;

/// Generated code, laid out by protobuf package so that the cross-package
/// paths prost emits resolve.
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod generated {
    pub mod google {
        pub mod api {
            include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
        }
    }
    pub mod hcp {
        pub mod common {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/hcp.common.v1.rs"));
            }
        }
        pub mod tenant {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/hcp.tenant.v1.rs"));
            }
        }
        pub mod ops {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/hcp.ops.v1.rs"));
            }
        }
        pub mod provider {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/hcp.provider.v1.rs"));
            }
        }
        pub mod sim {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/hcp.sim.v1.rs"));
            }
        }
        pub mod console {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/hcp.console.v1.rs"));
            }
        }
    }
}

pub use generated::google;
/// `hcp.common.v1`: catalog reads and HTTP options.
pub use generated::hcp::common::v1 as common;
/// `hcp.console.v1`: the console proxy's calls to core (not northbound).
pub use generated::hcp::console::v1 as console;
/// `hcp.ops.v1`: providers, catalog management, audit.
pub use generated::hcp::ops::v1 as ops;
/// `hcp.provider.v1`: the southbound provider plugin protocol.
pub use generated::hcp::provider::v1 as provider;
/// `hcp.sim.v1`: the simulated hypervisor's control surface.
pub use generated::hcp::sim::v1 as sim;
/// `hcp.tenant.v1`: VMs and jobs as tenants see them.
pub use generated::hcp::tenant::v1 as tenant;

/// The encoded `FileDescriptorSet` of every HCP proto file and its imports,
/// with custom options (`google.api.http`, `hcp.common.v1.http_success_status`)
/// preserved.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hcp_descriptor.bin"));

/// The provider protocol revision this build of HCP speaks.
pub const PROVIDER_PROTOCOL_VERSION: &str = "1";

/// Fully qualified names of the northbound services (those the gateway
/// exposes over REST and gRPC-web).
pub const NORTHBOUND_SERVICES: &[&str] = &[
    "hcp.tenant.v1.VmService",
    "hcp.tenant.v1.VolumeService",
    "hcp.tenant.v1.KeyPairService",
    "hcp.tenant.v1.WebhookService",
    "hcp.tenant.v1.JobService",
    "hcp.tenant.v1.QuotaService",
    "hcp.common.v1.CatalogService",
    "hcp.common.v1.CallerService",
    "hcp.ops.v1.ProviderAdminService",
    "hcp.ops.v1.CatalogAdminService",
    "hcp.ops.v1.AuditService",
    "hcp.ops.v1.QuotaAdminService",
    "hcp.ops.v1.JobAdminService",
    "hcp.ops.v1.VmAdminService",
    "hcp.ops.v1.UsageService",
];

/// Whether `path` (`/package.Service/Method`) names a method of HCP's
/// protocol, or of the gRPC health and reflection services every HCP
/// server runs: a bounded set, so metrics can label calls by method and
/// put everything else under one label.
pub fn is_method(path: &str) -> bool {
    method_label(path).is_some()
}

/// The method's path as a `&'static str` when [`is_method`] accepts it: a
/// metric label that costs no allocation per call.
pub fn method_label(path: &str) -> Option<&'static str> {
    use prost::Message;
    // The set is bounded and built once, so its strings live for the
    // process.
    static METHODS: std::sync::OnceLock<std::collections::HashSet<&'static str>> = std::sync::OnceLock::new();
    let methods = METHODS.get_or_init(|| {
        let mut out = std::collections::HashSet::new();
        if let Ok(set) = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        let path = format!("/{package}.{}/{}", service.name(), method.name());
                        out.insert(&*Box::leak(path.into_boxed_str()));
                    }
                }
            }
        }
        for m in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            out.insert(m);
        }
        out
    });
    methods.get(path).copied()
}

/// Shows credential keys, never their values.
struct RedactedCredentials<'a>(&'a std::collections::HashMap<String, String>);

impl std::fmt::Debug for RedactedCredentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        f.debug_map().entries(keys.into_iter().map(|k| (k, "<redacted>"))).finish()
    }
}

impl std::fmt::Debug for provider::ConsoleEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleEndpoint")
            .field("protocol", &self.protocol)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .field("tls", &self.tls)
            // A query may hold a ticket (Proxmox's vncticket).
            .field("path", &self.path.split_once('?').map_or(self.path.as_str(), |(p, _)| p))
            .field("transport", &self.transport())
            .field("headers", &self.headers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>())
            .field("tls_ca_pem", &!self.tls_ca_pem.is_empty())
            .field("tls_fingerprint_sha256", &self.tls_fingerprint_sha256)
            .field("websocket_subprotocol", &self.websocket_subprotocol)
            .finish()
    }
}

impl std::fmt::Debug for tenant::CreateWebhookResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateWebhookResponse")
            .field("webhook", &self.webhook)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for console::RedeemConsoleRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedeemConsoleRequest")
            .field("token", &"<redacted>")
            .field("protocol", &self.protocol)
            .field("client_address", &self.client_address)
            .field("channel", &self.channel)
            .finish()
    }
}

impl std::fmt::Debug for ops::RegisterProviderRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterProviderRequest")
            .field("name", &self.name)
            .field("zone", &self.zone)
            .field("endpoint", &self.endpoint)
            .field("credentials", &RedactedCredentials(&self.credentials))
            .field("tls", &self.tls)
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

impl std::fmt::Debug for ops::ProviderTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderTls")
            .field("ca_pem", &self.ca_pem.len())
            .field("client_cert_pem", &self.client_cert_pem.len())
            .field("client_key_pem", &if self.client_key_pem.is_empty() { "" } else { "<redacted>" })
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl std::fmt::Debug for provider::ConfigureRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigureRequest")
            .field("credentials", &RedactedCredentials(&self.credentials))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn debug_output_redacts_credentials() {
        let mut r = super::ops::RegisterProviderRequest::default();
        r.credentials.insert("token".into(), "hunter2".into());
        r.tls = Some(super::ops::ProviderTls {
            client_key_pem: "-----BEGIN PRIVATE KEY-----\nhunter2\n".into(),
            server_name: "provider.example".into(),
            ..Default::default()
        });
        let shown = format!("{r:?}");
        assert!(shown.contains("token") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("provider.example") && shown.contains("<redacted>"), "{shown}");
        let c = super::provider::ConfigureRequest { credentials: r.credentials.clone() };
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = super::provider::ConsoleEndpoint {
            password: "hunter2".into(),
            port: 5900,
            path: "/api2/json/nodes/n/qemu/100/vncwebsocket?port=5900&vncticket=hunter2".into(),
            headers: vec![super::provider::ConsoleHeader {
                name: "authorization".into(),
                value: "PVEAPIToken=root@pam!hcp=hunter2".into(),
            }],
            ..Default::default()
        };
        let shown = format!("{e:?}");
        assert!(
            shown.contains("5900") && shown.contains("authorization") && !shown.contains("hunter2"),
            "{shown}"
        );
        let redeemed = super::console::RedeemedConsole { endpoint: Some(e), ..Default::default() };
        assert!(!format!("{redeemed:?}").contains("hunter2"));
        let t = super::console::RedeemConsoleRequest {
            token: "hunter2".into(),
            protocol: "vnc".into(),
            ..Default::default()
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn methods_are_known_by_their_path() {
        assert!(super::is_method("/hcp.tenant.v1.VmService/CreateVm"));
        assert!(super::is_method("/hcp.provider.v1.Compute/CreateVm"));
        assert!(super::is_method("/grpc.health.v1.Health/Check"));
        assert!(!super::is_method("/hcp.tenant.v1.VmService/NoSuchMethod"));
        assert!(!super::is_method("/x"));
    }

    #[test]
    fn descriptor_set_decodes_and_keeps_http_options() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let names: Vec<_> = set.file.iter().filter_map(|f| f.name.clone()).collect();
        assert!(names.iter().any(|n| n == "hcp/tenant/v1/tenant.proto"));
        // prost-types drops extension options when decoding, so look in the
        // raw bytes for a path that only appears inside a google.api.http option.
        let raw = super::FILE_DESCRIPTOR_SET;
        let needle = b"/api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}:start";
        assert!(raw.windows(needle.len()).any(|w| w == needle));
    }
}
