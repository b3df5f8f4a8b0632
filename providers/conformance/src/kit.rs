//! The kit's state while it runs, the error a check fails with
//! ([`CheckError`], one report line with its sources), and the helpers
//! every check uses: recording outcomes, the test VM's spec, and create,
//! get and list calls that fail as a check does.

use std::fmt;
use std::sync::Arc;

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::identity_client::IdentityClient;
use hcp_proto::provider::{
    Capabilities, CreateVmRequest, ImageRef, ListVmsRequest, NetworkAttachment, PowerState, VmInfo, VmRef,
    VmSpec,
};
use tonic::transport::Channel;

use crate::options::{HookError, Options};
use crate::report::{Outcome, Report};

/// Why a check failed. Its report line is the error and its sources
/// ([`report_line`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    /// The provider answered, but not as the contract says.
    #[error("{0}")]
    Violation(String),
    /// A call the check needed was refused.
    #[error("{call}: {:?} {}", status.code(), status.message())]
    Call {
        /// The call, as the report names it (`StartVm #1`).
        call: String,
        /// The provider's answer.
        status: tonic::Status,
    },
    /// A call answered another status than the contract says.
    #[error("{what}: expected {expected:?}, got {:?} ({})", got.code(), got.message())]
    WrongCode {
        /// The call and its situation (`GetVm of an unknown VM`).
        what: String,
        /// The code the contract says.
        expected: tonic::Code,
        /// The provider's answer.
        got: tonic::Status,
    },
    /// A call succeeded that the contract says must fail.
    #[error("{what}: expected {expected:?}, got success {answer}")]
    Succeeded {
        /// The call and its situation.
        what: String,
        /// The code the contract says.
        expected: tonic::Code,
        /// The answer, debug-printed.
        answer: String,
    },
    /// The VM a group of checks works on could not be created.
    #[error("no VM to work on")]
    NoVm(#[source] Arc<CheckError>),
    /// An earlier step of the same VM's checks failed.
    #[error("{step} failed (see above)")]
    Blocked {
        /// The step that failed.
        step: &'static str,
    },
    /// A hook of the test bed failed.
    #[error("cannot {action}")]
    Hook {
        /// What the kit asked of it.
        action: &'static str,
        /// The test bed's error.
        #[source]
        source: HookError,
    },
}

/// What a check returns.
pub(crate) type CheckResult = Result<(), CheckError>;

/// A failure's line in the report: the error and its sources, `: `-joined.
fn report_line(e: &CheckError) -> String {
    hcp_telemetry::error_chain(e)
}

/// Maps a refused call to [`CheckError::Call`].
pub(crate) fn call(call: impl Into<String>) -> impl FnOnce(tonic::Status) -> CheckError {
    move |status| CheckError::Call { call: call.into(), status }
}

/// Maps a failed hook to [`CheckError::Hook`].
pub(crate) fn hook(action: &'static str) -> impl FnOnce(HookError) -> CheckError {
    move |source| CheckError::Hook { action, source }
}

/// The kit while it runs: the provider's clients, what it declared, the
/// VMs and volumes the kit made (all deleted at the end) and the report so
/// far.
pub(crate) struct Kit {
    /// What the kit was given.
    pub(crate) options: Options,
    /// The provider's Identity service.
    pub(crate) identity: IdentityClient<Channel>,
    /// The provider's Compute service.
    pub(crate) compute: ComputeClient<Channel>,
    /// What the provider declared (once the capabilities check ran).
    pub(crate) caps: Capabilities,
    /// Every VM id the kit asked to create, for the cleanup.
    pub(crate) created: Vec<String>,
    /// Every volume id the kit asked to create, for the cleanup.
    pub(crate) volumes: Vec<String>,
    /// Where the volume checks put volumes and their VMs: a host when
    /// volumes are host-local, else empty.
    pub(crate) volume_host: String,
    /// The outcomes so far.
    pub(crate) report: Report,
}

/// Fails the check with `msg` unless `cond` holds.
pub(crate) fn ensure(cond: bool, msg: impl FnOnce() -> String) -> CheckResult {
    if cond { Ok(()) } else { Err(CheckError::Violation(msg())) }
}

/// Fails the check unless `r` is the status `code`; `what` names the call.
pub(crate) fn expect_code<T: fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> CheckResult {
    match r {
        Err(s) if s.code() == code => Ok(()),
        Err(got) => Err(CheckError::WrongCode { what: what.to_owned(), expected: code, got }),
        Ok(v) => {
            Err(CheckError::Succeeded { what: what.to_owned(), expected: code, answer: format!("{v:?}") })
        }
    }
}

/// A VM's power state (unspecified when the provider sent an unknown value).
pub(crate) fn power(vm: &VmInfo) -> PowerState {
    PowerState::try_from(vm.power_state).unwrap_or(PowerState::Unspecified)
}

impl Kit {
    /// Records a check's outcome.
    pub(crate) fn record(&mut self, name: &str, r: CheckResult) {
        let outcome = match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(report_line(&e)),
        };
        self.report.checks.push((name.to_owned(), outcome));
    }

    /// Records a check as skipped, saying why.
    pub(crate) fn skip(&mut self, name: &str, why: &str) {
        self.report.checks.push((name.to_owned(), Outcome::Skip(why.to_owned())));
    }

    /// The spec of a test VM named `name`, labelled as the kit's.
    pub(crate) fn spec(&self, name: &str, user_data: Option<String>) -> VmSpec {
        VmSpec {
            name: name.to_owned(),
            vcpus: self.options.vcpus,
            memory_mib: self.options.memory_mib,
            disk_gib: 1,
            image: Some(ImageRef {
                name: "conformance".to_owned(),
                source: self.options.image_source.clone(),
            }),
            networks: if self.options.network.is_empty() {
                Vec::new()
            } else {
                vec![NetworkAttachment { network: self.options.network.clone(), backing: String::new() }]
            },
            user_data,
            hostname: name.to_owned(),
            labels: [("hcp.conformance".to_owned(), "true".to_owned())].into_iter().collect(),
            host: String::new(),
            ..VmSpec::default()
        }
    }

    /// Creates a stopped test VM (remembered for the cleanup).
    pub(crate) async fn create(
        &mut self,
        name: &str,
        user_data: Option<String>,
    ) -> Result<(String, VmInfo), CheckError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.created.push(id.clone());
        let vm = self
            .compute
            .create_vm(CreateVmRequest {
                vm_id: id.clone(),
                spec: Some(self.spec(name, user_data)),
                start: false,
            })
            .await
            .map_err(call("CreateVm failed"))?
            .into_inner();
        Ok((id, vm))
    }

    /// `GetVm`.
    pub(crate) async fn get(&mut self, id: &str) -> Result<VmInfo, CheckError> {
        self.compute
            .get_vm(VmRef { vm_id: id.to_owned() })
            .await
            .map(|r| r.into_inner())
            .map_err(call("GetVm failed"))
    }

    /// Every VM id `ListVms` reports, all pages.
    pub(crate) async fn list_ids(&mut self) -> Result<Vec<String>, CheckError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .compute
                .list_vms(ListVmsRequest { page_size: 500, page_token: token.clone() })
                .await
                .map_err(call("ListVms failed"))?
                .into_inner();
            out.extend(page.vms.into_iter().map(|v| v.vm_id));
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_carry_the_whole_chain() {
        let check = |e: CheckError, want: &str| assert_eq!(report_line(&e), want);
        let refused = || call("CreateVm failed")(tonic::Status::unavailable("down"));
        check(refused(), "CreateVm failed: Unavailable down");
        check(CheckError::NoVm(Arc::new(refused())), "no VM to work on: CreateVm failed: Unavailable down");
        check(hook("arm the fault")("no control plane".into()), "cannot arm the fault: no control plane");
        check(
            expect_code(Err::<(), _>(tonic::Status::internal("boom")), tonic::Code::NotFound, "GetVm")
                .unwrap_err(),
            "GetVm: expected NotFound, got Internal (boom)",
        );
        check(
            expect_code(Ok(1), tonic::Code::NotFound, "GetVm").unwrap_err(),
            "GetVm: expected NotFound, got success 1",
        );
    }
}
