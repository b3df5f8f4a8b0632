//! WS-Management (MS-WSMV) over HTTPS: the SOAP 1.2 envelope with
//! WS-Addressing headers, Get, Enumerate/Pull with WQL, method invocation,
//! faults, and Basic authentication. Envelopes are typed structs rendered
//! by quick-xml's serde serializer; answers are read with roxmltree.
//! It knows nothing of Hyper-V: `hyperv.rs` maps the Msvm classes onto it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hcp_provider_sdk::kit::{HttpsUrl, UrlError, split_https_url};
use http_body_util::Full;
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::cim::{self, Instance};

/// SOAP 1.2.
pub const S: &str = "http://www.w3.org/2003/05/soap-envelope";
/// WS-Addressing 2004/08.
pub const A: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
/// WS-Management.
pub const W: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
/// WS-Enumeration 2004/09.
pub const N: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration";
/// XML Schema instance.
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// The anonymous reply address.
pub const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";
/// The resource URI prefix of `root/virtualization/v2`.
pub const V2: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/";
/// The resource URI prefix of `root/cimv2` (files: `CIM_DataFile`).
pub const CIMV2: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/cimv2/";
/// The WQL filter dialect.
pub const WQL: &str = "http://schemas.microsoft.com/wbem/wsman/1/WQL";

const GET: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get";
const ENUMERATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate";
const PULL: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull";
const RELEASE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Release";

/// The resource URI of a class.
pub fn class_uri(class: &str) -> String {
    format!("{V2}{class}")
}

/// A failed WS-Management exchange.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WsmanError {
    /// No credentials yet.
    #[error("no credentials: core has not configured the provider yet")]
    NoCredentials,
    /// The host refused the credentials (HTTP 401).
    #[error("the Hyper-V host refused the credentials (HTTP 401)")]
    Unauthorized,
    /// Connecting, TLS or HTTP failed.
    #[error("Hyper-V host unreachable: {0}")]
    Transport(String),
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A SOAP fault: its subcode (`a:DestinationUnreachable`,
    /// `w:InvalidSelectors`, ...), the WSManFault code and the reason.
    #[error("WS-Management fault {subcode} ({code}): {reason}")]
    Fault {
        /// The subcode's value (prefix and local name).
        subcode: String,
        /// `WSManFault/@Code`, 0 when absent.
        code: u64,
        /// The reason text.
        reason: String,
    },
    /// The answer could not be read.
    #[error("unexpected answer from the Hyper-V host: {0}")]
    Decode(String),
}

impl WsmanError {
    /// "Nothing there" (Get of a missing instance, an unknown class).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Fault { subcode, code, .. } if subcode.ends_with("DestinationUnreachable") || *code == 2_150_858_752)
    }
}

/// A managed object: its resource URI and key selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epr {
    /// The class's resource URI.
    pub resource_uri: String,
    /// (key, value), in the order given.
    pub selectors: Vec<(String, String)>,
}

impl Epr {
    /// An EPR of `class` with `selectors`.
    pub fn new(class: &str, selectors: &[(&str, &str)]) -> Self {
        Self {
            resource_uri: class_uri(class),
            selectors: selectors.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    /// An EPR of a `root/cimv2` class.
    pub fn cimv2(class: &str, selectors: &[(&str, &str)]) -> Self {
        Self {
            resource_uri: format!("{CIMV2}{class}"),
            selectors: selectors.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    /// The class name (the URI's last segment).
    pub fn class(&self) -> &str {
        self.resource_uri.rsplit('/').next().unwrap_or_default()
    }

    /// The value of a selector.
    pub fn selector(&self, name: &str) -> Option<&str> {
        self.selectors.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Reads an EPR element: `a:Address` + `a:ReferenceParameters` as
    /// children, or wrapped in `a:EndpointReference`.
    pub fn from_node(node: roxmltree::Node<'_, '_>) -> Option<Self> {
        let node = node.children().find(|c| c.has_tag_name((A, "EndpointReference"))).unwrap_or(node);
        let params = node.children().find(|c| c.has_tag_name((A, "ReferenceParameters")))?;
        let resource_uri =
            params.children().find(|c| c.has_tag_name((W, "ResourceURI")))?.text()?.trim().to_owned();
        let selectors = params
            .children()
            .find(|c| c.has_tag_name((W, "SelectorSet")))
            .map(|set| {
                set.children()
                    .filter(|c| c.has_tag_name((W, "Selector")))
                    .filter_map(|s| {
                        Some((s.attribute("Name")?.to_owned(), s.text().unwrap_or_default().to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self { resource_uri, selectors })
    }
}

// ---- the envelope ----

#[derive(Serialize)]
struct Envelope<'a, B: Serialize> {
    #[serde(rename = "@xmlns:s")]
    s: &'static str,
    #[serde(rename = "@xmlns:a")]
    a: &'static str,
    #[serde(rename = "@xmlns:w")]
    w: &'static str,
    #[serde(rename = "@xmlns:n")]
    n: &'static str,
    #[serde(rename = "@xmlns:xsi")]
    xsi: &'static str,
    #[serde(rename = "s:Header")]
    header: Header<'a>,
    #[serde(rename = "s:Body")]
    body: B,
}

#[derive(Serialize)]
struct Must<T: Serialize> {
    #[serde(rename = "@s:mustUnderstand")]
    must: bool,
    #[serde(rename = "$text")]
    value: T,
}

#[derive(Serialize)]
struct ReplyTo {
    #[serde(rename = "a:Address")]
    address: Must<&'static str>,
}

#[derive(Serialize)]
struct Locale {
    #[serde(rename = "@xml:lang")]
    lang: &'static str,
    #[serde(rename = "@s:mustUnderstand")]
    must: bool,
}

#[derive(Serialize)]
struct Selector<'a> {
    #[serde(rename = "@Name")]
    name: &'a str,
    #[serde(rename = "$text")]
    value: &'a str,
}

#[derive(Serialize)]
struct SelectorSet<'a> {
    #[serde(rename = "w:Selector")]
    selectors: Vec<Selector<'a>>,
}

impl<'a> SelectorSet<'a> {
    fn of(epr: &'a Epr) -> Self {
        Self { selectors: epr.selectors.iter().map(|(k, v)| Selector { name: k, value: v }).collect() }
    }
}

#[derive(Serialize)]
struct Header<'a> {
    #[serde(rename = "a:To")]
    to: &'a str,
    #[serde(rename = "w:ResourceURI")]
    resource_uri: Must<&'a str>,
    #[serde(rename = "a:ReplyTo")]
    reply_to: ReplyTo,
    #[serde(rename = "a:Action")]
    action: Must<&'a str>,
    #[serde(rename = "w:MaxEnvelopeSize")]
    max_envelope: Must<u32>,
    #[serde(rename = "a:MessageID")]
    message_id: &'a str,
    #[serde(rename = "w:Locale")]
    locale: Locale,
    #[serde(rename = "w:OperationTimeout")]
    timeout: &'a str,
    #[serde(rename = "w:SelectorSet", skip_serializing_if = "Option::is_none")]
    selectors: Option<SelectorSet<'a>>,
}

/// An EPR as a parameter or in a reference: `a:Address` and
/// `a:ReferenceParameters` as direct children.
#[derive(Serialize)]
struct EprXml<'a> {
    #[serde(rename = "a:Address")]
    address: &'static str,
    #[serde(rename = "a:ReferenceParameters")]
    params: RefParams<'a>,
}

#[derive(Serialize)]
struct RefParams<'a> {
    #[serde(rename = "w:ResourceURI")]
    resource_uri: &'a str,
    #[serde(rename = "w:SelectorSet")]
    selectors: SelectorSet<'a>,
}

#[derive(Serialize)]
struct Filter<'a> {
    #[serde(rename = "@Dialect")]
    dialect: &'static str,
    #[serde(rename = "$text")]
    query: &'a str,
}

#[derive(Serialize)]
struct EnumerateBody<'a> {
    #[serde(rename = "n:Enumerate")]
    enumerate: Enumerate<'a>,
}

#[derive(Serialize)]
struct Enumerate<'a> {
    #[serde(rename = "w:OptimizeEnumeration")]
    optimize: (),
    #[serde(rename = "w:MaxElements")]
    max_elements: u32,
    #[serde(rename = "w:Filter")]
    filter: Filter<'a>,
}

#[derive(Serialize)]
struct PullBody<'a> {
    #[serde(rename = "n:Pull")]
    pull: Pull<'a>,
}

#[derive(Serialize)]
struct Pull<'a> {
    #[serde(rename = "n:EnumerationContext")]
    context: &'a str,
    #[serde(rename = "n:MaxElements")]
    max_elements: u32,
}

#[derive(Serialize)]
struct ReleaseBody<'a> {
    #[serde(rename = "n:Release")]
    release: Release<'a>,
}

#[derive(Serialize)]
struct Release<'a> {
    #[serde(rename = "n:EnumerationContext")]
    context: &'a str,
}

/// One method parameter value.
#[derive(Debug, Clone)]
pub enum Param {
    /// A scalar in its CIM text form (`2`, `true`, a string).
    Text(String),
    /// An embedded instance (CIM-XML `INSTANCE` text).
    Instance(Instance),
    /// A reference.
    Ref(Epr),
}

/// A method's input: `p:<Method>_INPUT` with `xmlns:p` = the resource URI
/// and one element per parameter (repeated for arrays).
struct Input<'a> {
    uri: &'a str,
    params: &'a [(&'a str, Param)],
}

impl Serialize for Input<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut map = ser.serialize_map(None)?;
        map.serialize_entry("@xmlns:p", self.uri)?;
        for (name, value) in self.params {
            let key = format!("p:{name}");
            match value {
                Param::Text(t) => map.serialize_entry(&key, t)?,
                Param::Instance(i) => map.serialize_entry(&key, &i.to_cim_xml())?,
                Param::Ref(epr) => map.serialize_entry(
                    &key,
                    &EprXml {
                        address: ANONYMOUS,
                        params: RefParams {
                            resource_uri: &epr.resource_uri,
                            selectors: SelectorSet::of(epr),
                        },
                    },
                )?,
            }
        }
        map.end()
    }
}

struct InvokeBody<'a> {
    method: &'a str,
    input: Input<'a>,
}

impl Serialize for InvokeBody<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut map = ser.serialize_map(Some(1))?;
        map.serialize_entry(&format!("p:{}_INPUT", self.method), &self.input)?;
        map.end()
    }
}

/// What a method answered: `ReturnValue` and its out parameters.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// `ReturnValue`.
    pub return_value: u32,
    /// EPR out parameters by name (`Job`, `ResultingSystem`,
    /// `ResultingResourceSettings` repeated).
    pub refs: Vec<(String, Epr)>,
    /// Other out parameters by name, as text (`SettingData`: an embedded
    /// instance's CIM-XML).
    pub texts: Vec<(String, String)>,
}

impl Output {
    /// The first EPR named `name`.
    pub fn reference(&self, name: &str) -> Option<&Epr> {
        self.refs.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }

    /// The text out parameter `name`.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.texts.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }
}

/// Credentials for Basic authentication.
#[derive(Clone)]
pub struct Credentials {
    /// `HOST\user` or `user`.
    pub username: String,
    /// The password.
    pub password: String,
}

/// How the provider authenticates to WinRM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// NTLM under `Negotiate` (WinRM's default; Basic is off by default).
    #[default]
    Negotiate,
    /// `Authorization: Basic` on every request.
    Basic,
}

/// A WS-Management endpoint.
pub struct Wsman {
    http: hcp_tls::Https,
    url: String,
    path: String,
    scheme: Scheme,
    /// The connection NTLM authenticated; requests take turns on it.
    ntlm: tokio::sync::Mutex<Option<hcp_tls::Connection>>,
    credentials: std::sync::RwLock<Option<Credentials>>,
    /// Requests sent (tests read it).
    pub requests_sent: AtomicU64,
}

impl std::fmt::Debug for Wsman {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wsman").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Why a client for a WinRM listener cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse.
    #[error("url")]
    Url(#[source] UrlError),
    /// The trust settings cannot be used.
    #[error(transparent)]
    Tls(#[from] hcp_tls::TrustError),
}

impl Wsman {
    /// A client for `url`, trusting `trust`, with `timeout` per request.
    pub fn new(
        url: &str,
        trust: &hcp_tls::Trust,
        timeout: Duration,
        scheme: Scheme,
    ) -> Result<Self, ClientError> {
        let HttpsUrl { host, port, path } = split_https_url(url, 5986, "/wsman").map_err(ClientError::Url)?;
        let http = hcp_tls::Https::new(&host, port, trust, timeout)?;
        Ok(Self {
            http,
            url: url.to_owned(),
            path,
            scheme,
            ntlm: tokio::sync::Mutex::new(None),
            credentials: std::sync::RwLock::new(None),
            requests_sent: AtomicU64::new(0),
        })
    }

    /// Installs credentials.
    pub fn set_credentials(&self, c: Credentials) {
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    /// True once credentials are installed.
    pub fn has_credentials(&self) -> bool {
        self.credentials.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    async fn exchange<B: Serialize>(
        &self,
        resource_uri: &str,
        action: &str,
        selectors: Option<&Epr>,
        body: B,
    ) -> Result<String, WsmanError> {
        let creds = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(WsmanError::NoCredentials)?;
        let message_id = format!("uuid:{}", uuid::Uuid::new_v4().to_string().to_uppercase());
        let envelope = Envelope {
            s: S,
            a: A,
            w: W,
            n: N,
            xsi: XSI,
            header: Header {
                to: &self.url,
                resource_uri: Must { must: true, value: resource_uri },
                reply_to: ReplyTo { address: Must { must: true, value: ANONYMOUS } },
                action: Must { must: true, value: action },
                max_envelope: Must { must: true, value: 153_600 },
                message_id: &message_id,
                locale: Locale { lang: "en-US", must: false },
                timeout: "PT60S",
                selectors: selectors.map(SelectorSet::of),
            },
            body,
        };
        let xml = quick_xml::se::to_string_with_root("s:Envelope", &envelope)
            .map_err(|e| WsmanError::Decode(format!("rendering {action}: {e}")))?;
        let answer = match self.scheme {
            Scheme::Basic => {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", creds.username, creds.password));
                self.http
                    .send(self.request(Some(format!("Basic {basic}")), xml)?)
                    .await
                    .map_err(http_error)?
            }
            Scheme::Negotiate => self.negotiated(&creds, xml).await?,
        };
        if answer.status == 401 {
            return Err(WsmanError::Unauthorized);
        }
        let text = String::from_utf8(answer.body.to_vec())
            .map_err(|_| WsmanError::Decode("the answer is not UTF-8".into()))?;
        if answer.status != 200 && !text.contains("Envelope") {
            return Err(WsmanError::Transport(format!("HTTP {}", answer.status)));
        }
        check(&text, &message_id)?;
        Ok(text)
    }

    fn request(
        &self,
        authorization: Option<String>,
        body: String,
    ) -> Result<http::Request<Full<Bytes>>, WsmanError> {
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(&self.path)
            .header("host", self.http.authority())
            .header("content-type", "application/soap+xml;charset=UTF-8");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        req.body(Full::new(Bytes::from(body))).map_err(|e| WsmanError::Transport(e.to_string()))
    }

    /// Sends on the NTLM-authenticated connection, authenticating one
    /// first (NEGOTIATE, the host's CHALLENGE, AUTHENTICATE with the
    /// request itself) when there is none or the host asks again.
    async fn negotiated(&self, creds: &Credentials, xml: String) -> Result<hcp_tls::Answer, WsmanError> {
        let mut held = self.ntlm.lock().await;
        if let Some(conn) = held.as_mut().filter(|c| !c.is_closed()) {
            match self.http.send_on(conn, self.request(None, xml.clone())?).await {
                Ok(a) if a.status != 401 => return Ok(a),
                // The host forgot the connection's authentication.
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the authenticated connection failed; negotiating a new one")
                }
            }
        }
        *held = None;
        let mut conn = self.http.connection().await.map_err(http_error)?;
        let (mut handshake, negotiate) =
            crate::ntlm::Handshake::start(&creds.username, &creds.password).map_err(WsmanError::Decode)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let first = self
            .http
            .send_on(
                &mut conn,
                self.request(Some(format!("Negotiate {}", b64.encode(negotiate))), String::new())?,
            )
            .await
            .map_err(http_error)?;
        let challenge = first
            .headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix("Negotiate "))
            .and_then(|t| b64.decode(t.trim()).ok());
        let Some(challenge) = challenge.filter(|_| first.status == 401) else {
            // No NTLM challenge: Negotiate is off, or the host refuses us.
            return Err(WsmanError::Unauthorized);
        };
        let authenticate = handshake.answer(&challenge).map_err(WsmanError::Decode)?;
        let answer = self
            .http
            .send_on(&mut conn, self.request(Some(format!("Negotiate {}", b64.encode(authenticate))), xml)?)
            .await
            .map_err(http_error)?;
        if answer.status != 401 {
            *held = Some(conn);
        }
        Ok(answer)
    }

    /// `Get` of one instance.
    pub async fn get(&self, epr: &Epr) -> Result<Instance, WsmanError> {
        let text = self.exchange(&epr.resource_uri, GET, Some(epr), ()).await?;
        let doc = parse(&text)?;
        let body = body_of(&doc)?;
        let node = body
            .children()
            .find(|n| n.is_element())
            .ok_or_else(|| WsmanError::Decode("empty Get answer".into()))?;
        Ok(cim::Instance::from_wsman(node))
    }

    /// Every instance a WQL query selects (Enumerate, then Pull until the
    /// end).
    pub async fn query(&self, wql: &str) -> Result<Vec<Instance>, WsmanError> {
        self.query_in(V2, wql).await
    }

    /// [`Wsman::query`] in another namespace, by its resource URI prefix
    /// ([`CIMV2`]).
    pub async fn query_in(&self, namespace: &str, wql: &str) -> Result<Vec<Instance>, WsmanError> {
        let uri = format!("{namespace}*");
        let body = EnumerateBody {
            enumerate: Enumerate {
                optimize: (),
                max_elements: 100,
                filter: Filter { dialect: WQL, query: wql },
            },
        };
        let text = self.exchange(&uri, ENUMERATE, None, body).await?;
        let (mut items, mut context, mut end) = {
            let doc = parse(&text)?;
            read_items(body_of(&doc)?, "EnumerateResponse")?
        };
        while !end {
            let Some(ctx) = context.clone() else { break };
            let body = PullBody { pull: Pull { context: &ctx, max_elements: 100 } };
            let text = self.exchange(&uri, PULL, None, body).await?;
            let doc = parse(&text)?;
            let (more, next, done) = read_items(body_of(&doc)?, "PullResponse")?;
            items.extend(more);
            context = next.or(Some(ctx));
            end = done;
        }
        if !end && let Some(ctx) = context {
            let _ =
                self.exchange(&uri, RELEASE, None, ReleaseBody { release: Release { context: &ctx } }).await;
        }
        Ok(items)
    }

    /// Invokes `method` on `target` with `params`.
    pub async fn invoke(
        &self,
        target: &Epr,
        method: &str,
        params: &[(&str, Param)],
    ) -> Result<Output, WsmanError> {
        let action = format!("{}/{method}", target.resource_uri);
        let body = InvokeBody { method, input: Input { uri: &target.resource_uri, params } };
        let text = self.exchange(&target.resource_uri, &action, Some(target), body).await?;
        let doc = parse(&text)?;
        let body = body_of(&doc)?;
        let out = body
            .children()
            .find(|n| n.is_element() && n.tag_name().name() == format!("{method}_OUTPUT"))
            .ok_or_else(|| WsmanError::Decode(format!("no {method}_OUTPUT")))?;
        let mut output = Output::default();
        for child in out.children().filter(|c| c.is_element()) {
            let name = child.tag_name().name();
            if name == "ReturnValue" {
                output.return_value = child
                    .text()
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or_else(|| WsmanError::Decode(format!("{method}: ReturnValue is not a number")))?;
            } else if let Some(epr) = Epr::from_node(child) {
                output.refs.push((name.to_owned(), epr));
            } else if child.attribute((XSI, "nil")).is_none() {
                output.texts.push((name.to_owned(), child.text().unwrap_or_default().to_owned()));
            }
        }
        Ok(output)
    }
}

fn http_error(e: hcp_tls::HttpError) -> WsmanError {
    match e {
        hcp_tls::HttpError::Transport(m) => WsmanError::Transport(m),
        hcp_tls::HttpError::Timeout(d) => WsmanError::Timeout(format!("no answer within {d:?}")),
    }
}

fn parse(text: &str) -> Result<roxmltree::Document<'_>, WsmanError> {
    roxmltree::Document::parse(text).map_err(|e| WsmanError::Decode(e.to_string()))
}

fn body_of<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> Result<roxmltree::Node<'a, 'i>, WsmanError> {
    doc.root_element()
        .children()
        .find(|n| n.has_tag_name((S, "Body")))
        .ok_or_else(|| WsmanError::Decode("no SOAP body".into()))
}

fn read_items(
    body: roxmltree::Node<'_, '_>,
    response: &str,
) -> Result<(Vec<Instance>, Option<String>, bool), WsmanError> {
    let r = body
        .children()
        .find(|n| n.has_tag_name((N, response)))
        .ok_or_else(|| WsmanError::Decode(format!("no {response}")))?;
    let context = r
        .children()
        .find(|n| n.has_tag_name((N, "EnumerationContext")))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let end = r.children().any(|n| n.tag_name().name() == "EndOfSequence");
    let items = r
        .children()
        .find(|n| n.tag_name().name() == "Items")
        .map(|items| items.children().filter(|n| n.is_element()).map(Instance::from_wsman).collect())
        .unwrap_or_default();
    Ok((items, context, end))
}

/// Checks the answer: a fault becomes an error; `RelatesTo` must name our
/// message.
fn check(text: &str, message_id: &str) -> Result<(), WsmanError> {
    let doc = parse(text)?;
    let env = doc.root_element();
    if let Some(fault) = env.descendants().find(|n| n.has_tag_name((S, "Fault"))) {
        let subcode = fault
            .descendants()
            .find(|n| n.has_tag_name((S, "Subcode")))
            .and_then(|s| s.children().find(|c| c.has_tag_name((S, "Value"))))
            .and_then(|v| v.text())
            .unwrap_or_default()
            .trim()
            .to_owned();
        let reason = fault
            .descendants()
            .find(|n| n.has_tag_name((S, "Text")))
            .and_then(|t| t.text())
            .unwrap_or_default()
            .trim()
            .to_owned();
        let code = fault
            .descendants()
            .find(|n| n.tag_name().name() == "WSManFault")
            .and_then(|f| f.attribute("Code"))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        return Err(WsmanError::Fault { subcode, code, reason });
    }
    let relates =
        env.descendants().find(|n| n.has_tag_name((A, "RelatesTo"))).and_then(|n| n.text()).map(str::trim);
    if relates != Some(message_id) {
        return Err(WsmanError::Decode(format!("the answer relates to {relates:?}, not to {message_id}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invoke_renders_parameters_in_the_method_namespace() {
        let target =
            Epr::new("Msvm_ComputerSystem", &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", "G-1")]);
        let params = [("RequestedState", Param::Text("2".into()))];
        let body = InvokeBody {
            method: "RequestStateChange",
            input: Input { uri: &target.resource_uri, params: &params },
        };
        let xml = quick_xml::se::to_string_with_root("s:Body", &body).unwrap();
        assert_eq!(
            xml,
            format!(
                "<s:Body><p:RequestStateChange_INPUT xmlns:p=\"{V2}Msvm_ComputerSystem\">\
                 <p:RequestedState>2</p:RequestedState></p:RequestStateChange_INPUT></s:Body>"
            )
        );
    }

    #[test]
    fn references_and_embedded_instances_render_as_wsman_and_cim_xml() {
        let vssd = Epr::new("Msvm_VirtualSystemSettingData", &[("InstanceID", "Microsoft:G-1")]);
        let mut nic = Instance::new("Msvm_SyntheticEthernetPortSettingData");
        nic.set("ElementName", "string", "a<b");
        let params =
            [("AffectedConfiguration", Param::Ref(vssd)), ("ResourceSettings", Param::Instance(nic))];
        let body = InvokeBody { method: "AddResourceSettings", input: Input { uri: "u", params: &params } };
        let xml = quick_xml::se::to_string_with_root("s:Body", &body).unwrap();
        assert!(xml.contains(&format!(
            "<p:AffectedConfiguration><a:Address>{ANONYMOUS}</a:Address><a:ReferenceParameters>\
             <w:ResourceURI>{V2}Msvm_VirtualSystemSettingData</w:ResourceURI><w:SelectorSet>\
             <w:Selector Name=\"InstanceID\">Microsoft:G-1</w:Selector></w:SelectorSet></a:ReferenceParameters>\
             </p:AffectedConfiguration>"
        )), "{xml}");
        // The CIM-XML text is escaped once more inside the parameter.
        assert!(
            xml.contains(
                "<p:ResourceSettings>&lt;INSTANCE CLASSNAME=\"Msvm_SyntheticEthernetPortSettingData\"&gt;"
            ),
            "{xml}"
        );
        assert!(xml.contains("a&amp;lt;b"), "{xml}");
    }

    #[test]
    fn faults_and_foreign_answers_are_errors() {
        let fault = format!(
            "<s:Envelope xmlns:s=\"{S}\" xmlns:a=\"{A}\"><s:Header><a:RelatesTo>uuid:X</a:RelatesTo></s:Header><s:Body><s:Fault>\
             <s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>a:DestinationUnreachable</s:Value></s:Subcode></s:Code>\
             <s:Reason><s:Text xml:lang=\"en-US\">not found</s:Text></s:Reason>\
             <s:Detail><f:WSManFault xmlns:f=\"http://schemas.microsoft.com/wbem/wsman/1/wsmanfault\" Code=\"2150858752\" Machine=\"h\"/></s:Detail>\
             </s:Fault></s:Body></s:Envelope>"
        );
        let e = check(&fault, "uuid:X").unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        let ok = format!(
            "<s:Envelope xmlns:s=\"{S}\" xmlns:a=\"{A}\"><s:Header><a:RelatesTo>uuid:Y</a:RelatesTo></s:Header><s:Body/></s:Envelope>"
        );
        assert!(check(&ok, "uuid:Y").is_ok());
        assert!(matches!(check(&ok, "uuid:X"), Err(WsmanError::Decode(_))));
    }
}
