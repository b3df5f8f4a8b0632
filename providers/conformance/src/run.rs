//! The check runner: connects to the provider and runs every check in
//! order, skipping visibly what the provider does not declare, and cleans
//! up last.

use std::time::Duration;

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::identity_client::IdentityClient;
use hcp_proto::provider::{Capabilities, CreateSnapshotRequest, ResizeVmRequest};

use crate::kit::{Kit, expect_code};
use crate::options::Options;
use crate::report::Report;

/// Why the kit could not run at all (a failed check is in the [`Report`]
/// instead).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The endpoint is not a URI tonic accepts.
    #[error("{endpoint} is not a valid endpoint")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// tonic's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// Nothing answers at the endpoint.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The endpoint given.
        endpoint: String,
        /// tonic's reason.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Runs every check against `options.endpoint`.
pub async fn run(options: Options) -> Result<Report, RunError> {
    let endpoint = || options.endpoint.clone();
    let channel = tonic::transport::Endpoint::from_shared(options.endpoint.clone())
        .map_err(|source| RunError::Endpoint { endpoint: endpoint(), source })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(options.call_timeout)
        .connect()
        .await
        .map_err(|source| RunError::Connect { endpoint: endpoint(), source })?;
    let mut kit = Kit {
        options,
        identity: IdentityClient::new(channel.clone()),
        compute: ComputeClient::new(channel),
        caps: Capabilities::default(),
        created: Vec::new(),
        volumes: Vec::new(),
        volume_host: String::new(),
        report: Report::default(),
    };
    let r = kit.identity().await;
    kit.record("identity", r);
    let r = kit.capabilities().await;
    kit.record("capabilities and readiness", r);
    let r = kit.create_is_idempotent().await;
    kit.record("create is idempotent", r);
    kit.lifecycle().await;
    let r = kit.delete_is_idempotent().await;
    kit.record("delete is idempotent", r);
    let r = kit.missing_vms().await;
    kit.record("missing VMs are NOT_FOUND", r);
    let r = kit.invalid_arguments().await;
    kit.record("invalid arguments are INVALID_ARGUMENT", r);
    let caps = kit.caps.clone();
    let r = kit.cloud_init(caps.supports_cloud_init).await;
    kit.record(
        if caps.supports_cloud_init {
            "cloud-init user data"
        } else {
            "user data refused without supports_cloud_init"
        },
        r,
    );
    for (protocol, declared) in [
        ("vnc", caps.supports_console_vnc),
        ("spice", caps.supports_console_spice),
        ("rdp", caps.supports_console_rdp),
        ("serial", caps.supports_console_serial),
    ] {
        let name = format!("{protocol} console");
        if declared {
            let r = kit.console(protocol, true).await;
            kit.record(&name, r);
        } else {
            kit.skip(&name, &format!("the provider does not declare supports_console_{protocol}"));
            let r = kit.console(protocol, false).await;
            kit.record(&format!("{protocol} console refused as UNIMPLEMENTED"), r);
        }
    }
    if caps.supports_console_log {
        let r = kit.console_log(true).await;
        kit.record("console log", r);
    } else {
        kit.skip("console log", "the provider does not declare supports_console_log");
        let r = kit.console_log(false).await;
        kit.record("console log refused as UNIMPLEMENTED", r);
    }
    const NICS: &str = "interfaces: one well-formed NIC per network, stable MACs";
    if kit.options.network.is_empty() {
        kit.skip(NICS, "the kit was given no network to attach");
    } else {
        let r = kit.interfaces().await;
        kit.record(NICS, r);
    }
    if caps.supports_resize {
        let r = kit.resize(caps.supports_hot_resize).await;
        kit.record(
            if caps.supports_hot_resize {
                "resize: stopped and running, idempotent, disks only grow"
            } else {
                "resize: stopped, idempotent, disks only grow; running refused"
            },
            r,
        );
        if !caps.supports_hot_resize {
            kit.skip("hot resize", "the provider does not declare supports_hot_resize");
        }
    } else {
        kit.skip("resize", "the provider does not declare supports_resize");
        let req = ResizeVmRequest {
            vm_id: uuid::Uuid::now_v7().to_string(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 0,
        };
        let r = expect_code(
            kit.compute.resize_vm(req).await,
            tonic::Code::Unimplemented,
            "ResizeVm without the capability",
        );
        kit.record("resize refused as UNIMPLEMENTED", r);
    }
    if caps.supports_snapshot {
        let r = kit.snapshots(caps.supports_snapshot_running).await;
        kit.record("snapshots: idempotent create and delete, list, revert", r);
    } else {
        kit.skip("snapshots", "the provider does not declare supports_snapshot");
        let id = uuid::Uuid::now_v7().to_string();
        let req = CreateSnapshotRequest { vm_id: id.clone(), snapshot_id: id, name: "x".into() };
        let r = expect_code(
            kit.compute.create_snapshot(req).await,
            tonic::Code::Unimplemented,
            "CreateSnapshot without the capability",
        );
        kit.record("snapshots refused as UNIMPLEMENTED", r);
    }
    kit.hosts_and_migration().await;
    kit.volumes().await;
    kit.images().await;
    match kit.half_made_create().await {
        Ok(Some(())) => {
            kit.record("a create failed after its first effect, then DeleteVm: nothing left", Ok(()))
        }
        Ok(None) => kit.skip(
            "a create failed after its first effect, then DeleteVm: nothing left",
            "the test bed gave no Hooks::fail_next_create_after_first_effect (see providers/GUIDE.md)",
        ),
        Err(e) => kit.record("a create failed after its first effect, then DeleteVm: nothing left", Err(e)),
    }
    // Volumes first: a volume attached to a kit VM is detached before the
    // VM goes, so the volume cleanup does not lean on DeleteVm's rule.
    kit.volume_cleanup().await;
    let r = kit.cleanup().await;
    kit.record("cleanup: nothing left in the inventory or on the hypervisor", r);
    Ok(kit.report)
}
