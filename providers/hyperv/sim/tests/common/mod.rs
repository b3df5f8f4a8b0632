//! A raw WS-Management client for the simulator's tests: envelopes written
//! by hand as WIRE.md shows them, sent over HTTPS trusting the simulator's
//! certificate, and the replies read with roxmltree.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub const S: &str = "http://www.w3.org/2003/05/soap-envelope";
pub const A: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
pub const W: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
pub const N: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration";
pub const F: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault";
pub const V2: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/";
pub const CIMV2: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/cimv2/";
pub const ANON: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";
pub const GET: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get";
pub const ENUMERATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate";
pub const PULL: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull";
pub const VSMS: &str = "Msvm_VirtualSystemManagementService";
pub const IMS: &str = "Msvm_ImageManagementService";
pub const VSSS: &str = "Msvm_VirtualSystemSnapshotService";

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    /// The reply as XML (panics when it is not).
    pub fn xml(&self) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(&self.body).unwrap_or_else(|e| panic!("not XML ({e}): {}", self.body))
    }

    /// The `f:WSManFault/@Code` of a fault reply.
    pub fn wsman_code(&self) -> Option<u32> {
        let doc = self.xml();
        let f = doc.descendants().find(|n| n.has_tag_name((F, "WSManFault")))?;
        f.attribute("Code")?.parse().ok()
    }

    /// The `s:Subcode/s:Value` of a fault reply.
    pub fn subcode(&self) -> Option<String> {
        let doc = self.xml();
        let sub = doc.descendants().find(|n| n.has_tag_name((S, "Subcode")))?;
        sub.children().find(|n| n.has_tag_name((S, "Value")))?.text().map(str::to_owned)
    }

    /// The `w:FaultDetail` text.
    pub fn detail(&self) -> Option<String> {
        let doc = self.xml();
        doc.descendants().find(|n| n.has_tag_name((W, "FaultDetail")))?.text().map(str::to_owned)
    }

    /// The text of the first element with this local name.
    pub fn first(&self, local: &str) -> Option<String> {
        let doc = self.xml();
        doc.descendants()
            .find(|n| n.is_element() && n.tag_name().name() == local)
            .map(|n| n.text().unwrap_or("").to_owned())
    }

    /// The text of every element with this local name.
    pub fn all(&self, local: &str) -> Vec<String> {
        let doc = self.xml();
        doc.descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == local)
            .map(|n| n.text().unwrap_or("").to_owned())
            .collect()
    }

    /// `ReturnValue` of an Invoke reply.
    pub fn return_value(&self) -> u32 {
        self.first("ReturnValue")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no ReturnValue: {}", self.body))
    }

    /// The InstanceID selectors of the out parameter `name` (one per
    /// element).
    pub fn out_instance_ids(&self, name: &str) -> Vec<String> {
        let doc = self.xml();
        doc.descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == name)
            .filter_map(|n| {
                n.descendants()
                    .find(|s| s.has_tag_name((W, "Selector")) && s.attribute("Name") == Some("InstanceID"))
                    .and_then(|s| s.text())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// The selector `sel` inside the out parameter `name`.
    pub fn out_selector(&self, name: &str, sel: &str) -> Option<String> {
        let doc = self.xml();
        let p = doc.descendants().find(|n| n.is_element() && n.tag_name().name() == name)?;
        p.descendants()
            .find(|s| s.has_tag_name((W, "Selector")) && s.attribute("Name") == Some(sel))
            .and_then(|s| s.text())
            .map(str::to_owned)
    }
}

/// A client of one simulator.
pub struct Client {
    pub addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    pub user: String,
    pub password: String,
}

impl Client {
    pub fn new(running: &hcp_hyperv_sim::Running) -> Self {
        Self::from_parts(running.addr, running.cert_der.clone())
    }

    /// A client of a simulator at `addr` whose certificate is `cert_der`.
    pub fn from_parts(addr: std::net::SocketAddr, cert_der: Vec<u8>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(cert_der)).expect("the simulator's certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            user: "hcp".into(),
            password: "s3cret".into(),
        }
    }

    /// Sends a request with the given method, path, headers and body.
    pub async fn raw(&self, method: &str, path: &str, headers: &[(&str, String)], body: &str) -> Answer {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = self.tls.connect(name, tcp).await.expect("TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .expect("an answer in time")
            .expect("an answer");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Answer { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }

    fn auth(&self) -> String {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.user, self.password));
        format!("Basic {token}")
    }

    /// POSTs a SOAP envelope to /wsman.
    pub async fn post(&self, envelope: &str) -> Answer {
        let headers = [
            ("authorization", self.auth()),
            ("content-type", "application/soap+xml;charset=UTF-8".to_owned()),
        ];
        self.raw("POST", "/wsman", &headers, envelope).await
    }

    /// Get of an instance.
    pub async fn get(&self, class: &str, selectors: &[(&str, &str)]) -> Answer {
        self.post(&envelope(
            GET,
            &format!("{V2}{class}"),
            selectors,
            "",
            "uuid:0A1B2C3D-0000-0000-0000-000000000001",
        ))
        .await
    }

    /// WQL enumeration with OptimizeEnumeration and MaxElements 100, then
    /// Pulls until the end: the instances' XML texts (`p:` elements).
    pub async fn query(&self, wql: &str) -> Vec<Answer> {
        self.query_in(V2, wql).await
    }

    /// [`Client::query`] in the namespace whose resource URI prefix is `ns`.
    pub async fn query_in(&self, ns: &str, wql: &str) -> Vec<Answer> {
        let body = format!(
            "<n:Enumerate><w:OptimizeEnumeration/><w:MaxElements>100</w:MaxElements><w:Filter Dialect=\"http://schemas.microsoft.com/wbem/wsman/1/WQL\">{}</w:Filter></n:Enumerate>",
            esc(wql)
        );
        let first = self.post(&envelope(ENUMERATE, &format!("{ns}*"), &[], &body, &new_id())).await;
        assert_eq!(first.status, 200, "{wql}: {}", first.body);
        let mut ctx = first.first("EnumerationContext").unwrap_or_default();
        let mut out = vec![first];
        while !ctx.is_empty() && out.last().is_none_or(|a| a.first("EndOfSequence").is_none()) {
            let body = format!(
                "<n:Pull><n:EnumerationContext>{ctx}</n:EnumerationContext><n:MaxElements>100</n:MaxElements></n:Pull>"
            );
            let a = self.post(&envelope(PULL, &format!("{ns}*"), &[], &body, &new_id())).await;
            assert_eq!(a.status, 200, "pull: {}", a.body);
            ctx = a.first("EnumerationContext").unwrap_or_default();
            out.push(a);
        }
        out
    }

    /// The values of property `prop` of every instance a query returns.
    pub async fn query_prop(&self, wql: &str, prop: &str) -> Vec<String> {
        self.query(wql).await.iter().flat_map(|a| a.all(prop)).collect()
    }

    /// Invokes a method.
    pub async fn invoke(
        &self,
        class: &str,
        selectors: &[(&str, &str)],
        method: &str,
        params: &str,
    ) -> Answer {
        self.invoke_in(V2, class, selectors, method, params).await
    }

    /// [`Client::invoke`] in the namespace whose resource URI prefix is `ns`.
    pub async fn invoke_in(
        &self,
        ns: &str,
        class: &str,
        selectors: &[(&str, &str)],
        method: &str,
        params: &str,
    ) -> Answer {
        let uri = format!("{ns}{class}");
        let body = format!("<p:{method}_INPUT xmlns:p=\"{uri}\">{params}</p:{method}_INPUT>");
        self.post(&envelope(&format!("{uri}/{method}"), &uri, selectors, &body, &new_id())).await
    }

    /// Invokes a method of a service addressed by CreationClassName alone.
    pub async fn service(&self, class: &str, method: &str, params: &str) -> Answer {
        self.invoke(class, &[("CreationClassName", class)], method, params).await
    }

    /// Waits for a job to end; returns (JobState, ErrorCode, ErrorDescription).
    pub async fn wait_job(&self, id: &str) -> (u16, u16, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let a = self.get("Msvm_ConcreteJob", &[("InstanceID", id)]).await;
            assert_eq!(a.status, 200, "job {id}: {}", a.body);
            let state: u16 = a.first("JobState").and_then(|v| v.parse().ok()).expect("JobState");
            if state != 4 && state != 3 {
                let code = a.first("ErrorCode").and_then(|v| v.parse().ok()).unwrap_or(0);
                return (state, code, a.first("ErrorDescription").unwrap_or_default());
            }
            assert!(tokio::time::Instant::now() < deadline, "job {id} still running");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Expects 4096 and a job that completes; returns the reply.
    pub async fn expect_done(&self, a: Answer) -> Answer {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.return_value(), 4096, "{}", a.body);
        let job = a.out_instance_ids("Job").pop().expect("a Job reference");
        let (state, code, msg) = self.wait_job(&job).await;
        assert_eq!((state, code), (7, 0), "job failed: {msg}");
        a
    }
}

pub fn new_id() -> String {
    format!("uuid:{}", uuid::Uuid::new_v4().to_string().to_uppercase())
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A request envelope as WIRE.md lists its headers.
pub fn envelope(action: &str, uri: &str, selectors: &[(&str, &str)], body: &str, message_id: &str) -> String {
    let mut sel = String::new();
    if !selectors.is_empty() {
        sel.push_str("<w:SelectorSet>");
        for (k, v) in selectors {
            sel.push_str(&format!("<w:Selector Name=\"{k}\">{}</w:Selector>", esc(v)));
        }
        sel.push_str("</w:SelectorSet>");
    }
    format!(
        r#"<s:Envelope xmlns:s="{S}" xmlns:a="{A}" xmlns:w="{W}" xmlns:n="{N}" xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"><s:Header><a:To>https://localhost:5986/wsman</a:To><w:ResourceURI s:mustUnderstand="true">{uri}</w:ResourceURI><a:ReplyTo><a:Address s:mustUnderstand="true">{ANON}</a:Address></a:ReplyTo><a:Action s:mustUnderstand="true">{action}</a:Action><w:MaxEnvelopeSize s:mustUnderstand="true">153600</w:MaxEnvelopeSize><a:MessageID>{message_id}</a:MessageID><w:Locale xml:lang="en-US" s:mustUnderstand="false"/><w:OperationTimeout>PT60S</w:OperationTimeout>{sel}</s:Header><s:Body>{body}</s:Body></s:Envelope>"#
    )
}

/// A CIM-XML property.
pub enum P<'a> {
    S(&'a str, &'a str, &'a str),
    A(&'a str, &'a str, Vec<String>),
}

/// An embedded CIM-XML instance, XML-escaped for a parameter element.
pub fn embedded(class: &str, props: &[P<'_>]) -> String {
    let mut s = format!("<INSTANCE CLASSNAME=\"{class}\">");
    for p in props {
        match p {
            P::S(name, ty, v) => s.push_str(&format!(
                "<PROPERTY NAME=\"{name}\" TYPE=\"{ty}\"><VALUE>{}</VALUE></PROPERTY>",
                esc(v)
            )),
            P::A(name, ty, vs) => {
                s.push_str(&format!("<PROPERTY.ARRAY NAME=\"{name}\" TYPE=\"{ty}\"><VALUE.ARRAY>"));
                for v in vs {
                    s.push_str(&format!("<VALUE>{}</VALUE>", esc(v)));
                }
                s.push_str("</VALUE.ARRAY></PROPERTY.ARRAY>");
            }
        }
    }
    s.push_str("</INSTANCE>");
    esc(&s)
}

/// An EPR's children (libvirt's shape).
pub fn epr(class: &str, selectors: &[(&str, &str)]) -> String {
    let mut s = format!(
        "<a:Address>{ANON}</a:Address><a:ReferenceParameters><w:ResourceURI>{V2}{class}</w:ResourceURI><w:SelectorSet>"
    );
    for (k, v) in selectors {
        s.push_str(&format!("<w:Selector Name=\"{k}\">{}</w:Selector>", esc(v)));
    }
    s.push_str("</w:SelectorSet></a:ReferenceParameters>");
    s
}

/// A WMI object path for `Parent`/`HostResource`.
pub fn path(class: &str, keys: &[(&str, &str)]) -> String {
    let keys: Vec<String> =
        keys.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\"))).collect();
    format!("\\\\HVSIM01\\root\\virtualization\\v2:{class}.{}", keys.join(","))
}

/// Starts a simulator with the test settings.
pub async fn start() -> (hcp_hyperv_sim::Running, Client) {
    start_with(hcp_hyperv_sim::SimConfig::default()).await
}

pub async fn start_with(config: hcp_hyperv_sim::SimConfig) -> (hcp_hyperv_sim::Running, Client) {
    let running = hcp_hyperv_sim::start(config).await.expect("the simulator starts");
    let client = Client::new(&running);
    (running, client)
}
