//! vim25 over SOAP: the envelope, the session, faults, retries and tasks.
//!
//! Requests are typed structs ([`crate::vim`]) rendered by quick-xml's serde
//! serializer; answers are read with roxmltree into typed values. This
//! module knows nothing of HCP: `lib.rs` maps HCP operations onto it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hcp_provider_sdk::kit::{Backoff, HttpsUrl, UrlError, split_https_url};
use http_body_util::Full;
use serde::Serialize;

use crate::config::TimingConfig;
use crate::vim::{self, DecodeError, FromXml, MoRef, XSI};

/// The vim25 namespace every request element carries.
pub const VIM25: &str = "urn:vim25";

/// A failed vim25 call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VimError {
    /// Configure has not given the provider credentials yet.
    #[error("no credentials: core has not configured the provider yet")]
    NoCredentials,
    /// Connecting, TLS or HTTP failed.
    #[error("vSphere unreachable: {0}")]
    Transport(String),
    /// No answer in time, or a task that did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A SOAP fault or a task's error: `fault` is the vim25 fault type
    /// (`InvalidPowerState`, `NotAuthenticated`, ...).
    #[error("{fault}: {message}")]
    Fault {
        /// The fault's type name.
        fault: String,
        /// vSphere's message.
        message: String,
    },
    /// A request could not be rendered as XML.
    #[error("rendering {method}")]
    Encode {
        /// The method whose body failed to render.
        method: String,
        /// quick-xml's reason.
        #[source]
        source: quick_xml::SeError,
    },
    /// The answer could not be read.
    #[error("unexpected answer from vSphere")]
    Decode(#[from] DecodeError),
}

impl VimError {
    /// The fault type, when this is a fault.
    pub fn fault(&self) -> Option<&str> {
        match self {
            Self::Fault { fault, .. } => Some(fault),
            _ => None,
        }
    }

    /// True for faults that say "try again later".
    pub fn is_busy(&self) -> bool {
        matches!(
            self.fault(),
            Some("TaskInProgress" | "ResourceInUse" | "ConcurrentAccess" | "HostCommunication")
        )
    }
}

/// Why a client for the SDK cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse.
    #[error("sdk_url")]
    Url(#[source] UrlError),
    /// The trust settings cannot be used.
    #[error(transparent)]
    Tls(#[from] hcp_tls::TrustError),
}

/// The session cookie.
const COOKIE: &str = "vmware_soap_session";

/// A vim25 endpoint with one login session.
pub struct Soap {
    http: hcp_tls::Https,
    path: String,
    credentials: std::sync::RwLock<Option<(String, String)>>,
    /// The session cookie; None until the first login.
    session: tokio::sync::Mutex<Option<String>>,
    content: tokio::sync::OnceCell<vim::ServiceContent>,
    timing: TimingConfig,
    /// Requests sent (tests read it).
    pub requests_sent: AtomicU64,
    /// Logins made (tests read it).
    pub logins: AtomicU64,
}

impl std::fmt::Debug for Soap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Soap").field("http", &self.http).field("path", &self.path).finish_non_exhaustive()
    }
}

/// `_this` and nothing else: the body of most methods.
#[derive(Serialize)]
struct This<'a> {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "_this")]
    this: &'a MoRef,
}

impl Soap {
    /// A client for the SDK at `url` (`https://vcenter/sdk`).
    pub fn new(url: &str, trust: &hcp_tls::Trust, timing: TimingConfig) -> Result<Self, ClientError> {
        let HttpsUrl { host, port, path } = split_https_url(url, 443, "/sdk").map_err(ClientError::Url)?;
        // `timing` was validated with the configuration: at least 1 s.
        let timeout = Duration::from_secs(timing.request_timeout_seconds);
        let http = hcp_tls::Https::new(&host, port, trust, timeout)?;
        Ok(Self {
            http,
            path,
            credentials: std::sync::RwLock::new(None),
            session: tokio::sync::Mutex::new(None),
            content: tokio::sync::OnceCell::new(),
            timing,
            requests_sent: AtomicU64::new(0),
            logins: AtomicU64::new(0),
        })
    }

    /// The HTTPS client (its host, port and TLS connector).
    pub fn https(&self) -> &hcp_tls::Https {
        &self.http
    }

    /// Installs credentials and drops the session.
    pub async fn set_credentials(&self, username: String, password: String) {
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some((username, password));
        *self.session.lock().await = None;
    }

    /// True once credentials are installed.
    pub fn has_credentials(&self) -> bool {
        self.credentials.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The service content (read once; it does not change).
    pub async fn content(&self) -> Result<&vim::ServiceContent, VimError> {
        self.content
            .get_or_try_init(|| async {
                let this = MoRef::new("ServiceInstance", "ServiceInstance");
                let body = This { xmlns: VIM25, this: &this };
                let text = self.once("RetrieveServiceContent", &body, None).await?;
                parse_returnval(&text)
            })
            .await
    }

    async fn login(&self) -> Result<String, VimError> {
        let (user, password) = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(VimError::NoCredentials)?;
        let sm = self.content().await?.session_manager.clone();
        #[derive(Serialize)]
        struct Login<'a> {
            #[serde(rename = "@xmlns")]
            xmlns: &'static str,
            #[serde(rename = "_this")]
            this: &'a MoRef,
            #[serde(rename = "userName")]
            user: &'a str,
            password: &'a str,
        }
        let body = Login { xmlns: VIM25, this: &sm, user: &user, password: &password };
        let (text, headers) = self.exchange("Login", &body, None).await?;
        check_fault(&text)?;
        let cookie = headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .find(|kv| kv.trim_start().starts_with(&format!("{COOKIE}=")))
            .ok_or(DecodeError::NoSessionCookie)?
            .trim()
            .to_owned();
        self.logins.fetch_add(1, Ordering::Relaxed);
        tracing::info!(user = user.as_str(), "vSphere session opened");
        Ok(cookie)
    }

    /// The session cookie, logging in first when there is none (or when
    /// `stale` is the cookie vSphere just refused).
    async fn cookie(&self, stale: Option<&str>) -> Result<String, VimError> {
        let mut session = self.session.lock().await;
        match session.as_deref() {
            Some(c) if Some(c) != stale => Ok(c.to_owned()),
            _ => {
                let fresh = self.login().await?;
                *session = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// One HTTP exchange: the envelope around `body` (rendered as element
    /// `method`), and the answer's text and headers, whatever the status.
    async fn exchange<B: Serialize>(
        &self,
        method: &str,
        body: &B,
        cookie: Option<&str>,
    ) -> Result<(String, http::HeaderMap), VimError> {
        self.exchange_raw(method, &render(method, body)?, cookie).await
    }

    /// [`Soap::exchange`] of a body already rendered (its root element
    /// included).
    async fn exchange_raw(
        &self,
        method: &str,
        inner: &str,
        cookie: Option<&str>,
    ) -> Result<(String, http::HeaderMap), VimError> {
        let envelope = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:xsi=\"{XSI}\">\
             <soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"
        );
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(&self.path)
            .header("host", self.http.authority())
            .header("content-type", "text/xml; charset=utf-8")
            .header("soapaction", "urn:vim25/6.5");
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let req =
            req.body(Full::new(Bytes::from(envelope))).map_err(|e| VimError::Transport(e.to_string()))?;
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        let answer = self.http.send(req).await.map_err(|e| match e {
            hcp_tls::HttpError::Transport(m) => VimError::Transport(m),
            hcp_tls::HttpError::Timeout(d) => VimError::Timeout(format!("{method}: no answer within {d:?}")),
        })?;
        if answer.status >= 500 && !looks_like_soap(&answer.body) {
            return Err(VimError::Transport(format!("{method}: HTTP {}", answer.status)));
        }
        let text = String::from_utf8(answer.body.to_vec())
            .map_err(|e| DecodeError::NotUtf8 { method: method.to_owned(), source: e.utf8_error() })?;
        Ok((text, answer.headers))
    }

    /// One call without retries; the answer's text after fault checking.
    async fn once<B: Serialize>(
        &self,
        method: &str,
        body: &B,
        cookie: Option<&str>,
    ) -> Result<String, VimError> {
        self.once_raw(method, &render(method, body)?, cookie).await
    }

    async fn once_raw(&self, method: &str, inner: &str, cookie: Option<&str>) -> Result<String, VimError> {
        let (text, _) = self.exchange_raw(method, inner, cookie).await?;
        check_fault(&text)?;
        Ok(text)
    }

    /// Calls `method` in the session: logs in first when needed and again
    /// once when vSphere says the session is gone; retries transport
    /// failures of reads and "busy" faults with backoff. `read_only`
    /// methods may be resent after a transport failure; others are not
    /// (their effect may have happened), and the caller decides.
    pub async fn call<B: Serialize>(
        &self,
        method: &str,
        body: &B,
        read_only: bool,
    ) -> Result<String, VimError> {
        self.call_raw(method, &render(method, body)?, read_only).await
    }

    /// [`Soap::call`] with a body rendered by the caller: the element
    /// `<method xmlns="urn:vim25">...</method>` (for data passed back as
    /// vSphere gave it, such as an import spec).
    pub async fn call_raw(&self, method: &str, inner: &str, read_only: bool) -> Result<String, VimError> {
        tracing::debug!(method, "vSphere call");
        let mut attempt = 0;
        let mut relogged = false;
        let mut stale: Option<String> = None;
        loop {
            let cookie = self.cookie(stale.as_deref()).await?;
            match self.once_raw(method, inner, Some(&cookie)).await {
                Ok(text) => return Ok(text),
                Err(e) if e.fault() == Some("NotAuthenticated") && !relogged => {
                    tracing::info!(method, "vSphere session expired; logging in again");
                    relogged = true;
                    stale = Some(cookie);
                }
                Err(e)
                    if (e.is_busy()
                        || (read_only && matches!(e, VimError::Transport(_) | VimError::Timeout(_))))
                        && attempt + 1 < self.timing.retry_attempts =>
                {
                    tracing::warn!(error = %e, attempt, method, "retrying vSphere call");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn backoff(&self, attempt: u32) {
        Backoff::from_millis(self.timing.retry_base_ms).wait(attempt).await;
    }

    /// Calls a method and decodes its `returnval`.
    pub async fn invoke<B: Serialize, R: FromXml>(
        &self,
        method: &str,
        body: &B,
        read_only: bool,
    ) -> Result<R, VimError> {
        let text = self.call(method, body, read_only).await?;
        parse_returnval(&text)
    }

    /// Calls a method whose only argument is `_this`.
    pub async fn invoke_this<R: FromXml>(
        &self,
        method: &str,
        this: &MoRef,
        read_only: bool,
    ) -> Result<R, VimError> {
        self.invoke(method, &This { xmlns: VIM25, this }, read_only).await
    }

    /// Calls a `..._Task` method and waits for its task; the task's result
    /// (a moref for clones and snapshots), if any.
    pub async fn task<B: Serialize>(&self, method: &str, body: &B) -> Result<Option<MoRef>, VimError> {
        let task: MoRef = self.invoke(method, body, false).await?;
        self.wait(&task, Duration::ZERO).await
    }

    /// [`Soap::task`] for a method whose only argument is `_this`.
    pub async fn task_this(&self, method: &str, this: &MoRef) -> Result<Option<MoRef>, VimError> {
        self.task(method, &This { xmlns: VIM25, this }).await
    }

    /// Submits a `..._Task` method without waiting.
    pub async fn submit<B: Serialize>(&self, method: &str, body: &B) -> Result<MoRef, VimError> {
        self.invoke(method, body, false).await
    }

    /// Waits for a task through a private PropertyCollector
    /// (`WaitForUpdatesEx` on `info.state`, `info.error`, `info.result`),
    /// for the configured task timeout plus `extra`.
    pub async fn wait(&self, task: &MoRef, extra: Duration) -> Result<Option<MoRef>, VimError> {
        Ok(self.wait_state(task, extra).await?.result)
    }

    /// Calls a `..._Task` method and waits for it; the task's result as it
    /// came (for results that are data, not morefs).
    pub async fn task_xml<B: Serialize>(&self, method: &str, body: &B) -> Result<Option<vim::Xml>, VimError> {
        let task: MoRef = self.invoke(method, body, false).await?;
        if let Some(result) = self.wait_state(&task, Duration::ZERO).await?.result_xml {
            return Ok(Some(result));
        }
        // The update that said "success" may have come before the one
        // carrying the result: read it.
        let pc = self.content().await?.property_collector.clone();
        let req = vim::RetrievePropertiesEx {
            xmlns: VIM25,
            this: &pc,
            spec_set: vec![vim::PropertyFilterSpec::one(&task, &["info.result"])],
            options: vim::RetrieveOptions { max_objects: 1 },
        };
        let r: vim::RetrieveResult = self.invoke("RetrievePropertiesEx", &req, true).await?;
        Ok(r.objects.into_iter().next().and_then(|o| o.prop("info.result").cloned()))
    }

    async fn wait_state(&self, task: &MoRef, extra: Duration) -> Result<vim::TaskState, VimError> {
        let timeout = Duration::from_secs(self.timing.task_timeout_seconds) + extra;
        let mut state = vim::TaskState::default();
        let done = self
            .watch(task, &["info.state", "info.error", "info.result"], timeout, |change| {
                state.apply(change);
                match state.state.as_deref() {
                    Some("success") => Some(Ok(std::mem::take(&mut state))),
                    // The fault may come after the state in the same
                    // update (vSphere sets both at once): read on.
                    Some("error") => state.error.take().map(Err),
                    _ => None,
                }
            })
            .await?;
        done.unwrap_or_else(|| {
            Err(VimError::Timeout(format!("task {} did not finish in {timeout:?}", task.value)))
        })
    }

    /// Watches `paths` of `obj` through a private PropertyCollector until
    /// `until` says done (its value) or `timeout` passes (None). A private
    /// collector, because updates of the session's own collector would go
    /// to whichever call waits on it.
    pub async fn watch<T>(
        &self,
        obj: &MoRef,
        paths: &[&str],
        timeout: Duration,
        mut until: impl FnMut(&vim::Change) -> Option<T>,
    ) -> Result<Option<T>, VimError> {
        let root = self.content().await?.property_collector.clone();
        let pc: MoRef = self.invoke_this("CreatePropertyCollector", &root, false).await?;
        let result = async {
            let filter = vim::CreateFilter {
                xmlns: VIM25,
                this: &pc,
                spec: vim::PropertyFilterSpec::one(obj, paths),
                partial_updates: false,
            };
            let _: MoRef = self.invoke("CreateFilter", &filter, false).await?;
            let deadline = Instant::now() + timeout;
            let mut version = String::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let wait = vim::WaitForUpdatesEx {
                    xmlns: VIM25,
                    this: &pc,
                    version: &version,
                    options: vim::WaitOptions { max_wait_seconds: left.as_secs().clamp(1, 30) as i32 },
                };
                let update: Option<vim::UpdateSet> = self.invoke("WaitForUpdatesEx", &wait, true).await?;
                let Some(update) = update else { continue };
                version = update.version.clone();
                for change in update.changes() {
                    if let Some(v) = until(change) {
                        return Ok(Some(v));
                    }
                }
            }
        }
        .await;
        if let Err(e) = self.invoke_this::<vim::Nothing>("DestroyPropertyCollector", &pc, false).await {
            tracing::debug!(error = %e, "could not destroy a private property collector");
        }
        result
    }
}

/// The element `method` with `body`'s fields.
fn render<B: Serialize>(method: &str, body: &B) -> Result<String, VimError> {
    quick_xml::se::to_string_with_root(method, body)
        .map_err(|source| VimError::Encode { method: method.to_owned(), source })
}

fn looks_like_soap(body: &[u8]) -> bool {
    let head = &body[..body.len().min(512)];
    head.windows(8).any(|w| w.eq_ignore_ascii_case(b"envelope"))
}

/// The fault in an answer, if it is one.
fn check_fault(text: &str) -> Result<(), VimError> {
    if !text.contains("Fault") {
        return Ok(());
    }
    let doc = roxmltree::Document::parse(text).map_err(DecodeError::from)?;
    let Some(fault) =
        doc.descendants().find(|n| n.has_tag_name(("http://schemas.xmlsoap.org/soap/envelope/", "Fault")))
    else {
        return Ok(());
    };
    let message = fault
        .children()
        .find(|n| n.has_tag_name("faultstring"))
        .and_then(|n| n.text())
        .unwrap_or_default()
        .to_owned();
    // <detail><XFault xsi:type="X">: the type names the fault.
    let kind = fault
        .children()
        .find(|n| n.has_tag_name("detail"))
        .and_then(|d| d.children().find(|n| n.is_element()))
        .map(|n| {
            n.attribute((XSI, "type"))
                .map(|t| t.rsplit(':').next().unwrap_or(t).to_owned())
                .unwrap_or_else(|| n.tag_name().name().trim_end_matches("Fault").to_owned())
        })
        .unwrap_or_else(|| "SystemError".to_owned());
    Err(VimError::Fault { fault: kind, message })
}

/// Decodes the `returnval` of an answer (absent: `R::from_xml(None)`).
pub fn parse_returnval<R: FromXml>(text: &str) -> Result<R, VimError> {
    let doc = roxmltree::Document::parse(text).map_err(DecodeError::from)?;
    let body = doc
        .descendants()
        .find(|n| n.has_tag_name(("http://schemas.xmlsoap.org/soap/envelope/", "Body")))
        .ok_or(DecodeError::NoBody)?;
    let response = body.children().find(|n| n.is_element()).ok_or(DecodeError::EmptyBody)?;
    Ok(R::from_returnvals(response.children().filter(|n| n.has_tag_name("returnval")).collect())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_named_by_their_type() {
        let text = r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The attempted operation cannot be performed in the current state (Powered off).</faultstring><detail><InvalidPowerStateFault xmlns="urn:vim25" xsi:type="InvalidPowerState"><requestedState>poweredOn</requestedState></InvalidPowerStateFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let e = check_fault(text).unwrap_err();
        assert_eq!(e.fault(), Some("InvalidPowerState"));
        assert!(e.to_string().contains("Powered off"));
        let bare = text.replace(r#" xsi:type="InvalidPowerState""#, "");
        assert_eq!(check_fault(&bare).unwrap_err().fault(), Some("InvalidPowerState"));
        assert!(check_fault("<a>no fault</a>").is_ok());
    }
}
