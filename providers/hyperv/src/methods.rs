//! Invoking Hyper-V's methods: the host's name for object paths, the
//! service endpoints, and a call followed through its `Msvm_ConcreteJob`,
//! retried with backoff while the object is in use.

use std::time::{Duration, Instant};

use hcp_provider_sdk::kit::Backoff;

use crate::errors::HvError;
use crate::wsman::{self, Epr, Param};
use crate::{Hyperv, rv};

impl Hyperv {
    pub(crate) async fn backoff(&self, attempt: u32) {
        Backoff::from_millis(self.config.timing.retry_base_ms).wait(attempt).await;
    }

    /// The host's computer name (object paths name it).
    pub(crate) async fn host_name(&self) -> Result<&str, HvError> {
        self.host_name
            .get_or_try_init(|| async {
                if let Some(h) = &self.config.host_name {
                    return Ok(h.clone());
                }
                let hosts = self
                    .host
                    .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'")
                    .await?;
                hosts
                    .first()
                    .and_then(|h| h.get("Name"))
                    .map(str::to_owned)
                    .ok_or_else(|| HvError::Unexpected("the host does not name itself".into()))
            })
            .await
            .map(String::as_str)
    }

    /// Invokes a method and follows its job; "in use" is retried.
    pub(crate) async fn call(
        &self,
        target: &Epr,
        method: &str,
        params: &[(&str, Param)],
    ) -> Result<wsman::Output, HvError> {
        let mut attempt = 0;
        loop {
            let out = self.host.invoke(target, method, params).await?;
            match out.return_value {
                rv::OK => return Ok(out),
                rv::JOB => {
                    let job = out
                        .reference("Job")
                        .ok_or_else(|| {
                            HvError::Unexpected(format!("{method} started a job without naming it"))
                        })?
                        .clone();
                    self.wait_job(method, &job).await?;
                    return Ok(out);
                }
                rv::IN_USE if attempt + 1 < self.config.timing.retry_attempts => {
                    tracing::warn!(method, attempt, "the host says the object is in use; retrying");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                code => return Err(HvError::Method { method: method.to_owned(), code }),
            }
        }
    }

    pub(crate) async fn wait_job(&self, method: &str, job: &Epr) -> Result<(), HvError> {
        let deadline = Instant::now() + Duration::from_secs(self.config.timing.job_timeout_seconds);
        let poll = Duration::from_millis(self.config.timing.job_poll_ms);
        loop {
            let j = self.host.get(job).await?;
            let job_state = j.num("JobState").unwrap_or(0);
            let code = j.num("ErrorCode").unwrap_or(0);
            match job_state {
                7 if code == 0 => return Ok(()),
                7..=10 => {
                    let message = j
                        .get("ErrorDescription")
                        .or(j.get("ErrorSummaryDescription"))
                        .unwrap_or("no description")
                        .to_owned();
                    return Err(HvError::Job { method: method.to_owned(), state: job_state, code, message });
                }
                _ if Instant::now() >= deadline => return Err(HvError::JobTimeout(method.to_owned())),
                _ => tokio::time::sleep(poll).await,
            }
        }
    }

    pub(crate) fn service(class: &str) -> Epr {
        Epr::new(class, &[("CreationClassName", class)])
    }
}
