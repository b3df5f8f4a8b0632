//! WS-Management over SOAP 1.2: the envelope checks, Get, Enumerate, Pull,
//! Release and Invoke, and the fault shape of hyperv-wsman.md §3 (HTTP 500,
//! `s:Code`/`s:Subcode`, `s:Reason`, `w:FaultDetail` when one applies, and
//! always `f:WSManFault` with its `Code`).
//!
//! Every refusal caused by a request that breaks the contract (WIRE.md and
//! hyperv-wsman.md §7) is also recorded as a violation; refusals that a
//! correct client can meet (an instance that is gone, an expired job) are
//! not.

use std::collections::VecDeque;
use std::time::Instant;

use roxmltree::Node;

use crate::catalog::{Catalog, CimType, ClassDef, Namespace};
use crate::methods::{self, Output, PVal, Params};
use crate::model::{
    ANONYMOUS, CIMV2_PREFIX, Epr, Instance, NS_A, NS_CIM, NS_MSWSMAN, NS_N, NS_S, NS_S11, NS_W, NS_XSI,
    URI_PREFIX, class_uri, esc,
};
use crate::state::{Enumeration, State};
use crate::wql::{self, Query, WqlError};

const ACTION_GET: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get";
const ACTION_PUT: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Put";
const ACTION_CREATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create";
const ACTION_DELETE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete";
const ACTION_ENUMERATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate";
const ACTION_PULL: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull";
const ACTION_RELEASE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Release";
const DIALECT_WQL: &str = "http://schemas.microsoft.com/wbem/wsman/1/WQL";
const FAULT_DETAIL: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman/faultDetail/";

/// WinRM's error codes used in `f:WSManFault/@Code`.
pub(crate) mod code {
    pub(crate) const RESOURCE_NOT_FOUND: u32 = 0x8033_8000;
    pub(crate) const SOAP_VERSION_MISMATCH: u32 = 0x8033_800D;
    pub(crate) const INVALID_HEADER: u32 = 0x8033_800F;
    pub(crate) const MUST_UNDERSTAND: u32 = 0x8033_8010;
    pub(crate) const HEADER_REQUIRED: u32 = 0x8033_8011;
    pub(crate) const ACTION_NOT_SUPPORTED: u32 = 0x8033_8013;
    pub(crate) const FILTER_DIALECT_UNAVAILABLE: u32 = 0x8033_8019;
    pub(crate) const INVALID_ENUMERATION_CONTEXT: u32 = 0x8033_801B;
    pub(crate) const INVALID_SOAP_BODY: u32 = 0x8033_8027;
    pub(crate) const INVALID_RESOURCE_URI: u32 = 0x8033_803B;
    pub(crate) const SCHEMA_VALIDATION: u32 = 0x8033_8041;
    pub(crate) const INVALID_XML: u32 = 0x8033_8043;
    pub(crate) const MAX_ENVELOPE_SIZE_EXCEEDED: u32 = 0x8033_8048;
    pub(crate) const PARAMETER_TYPE_MISMATCH: u32 = 0x8033_8054;
    pub(crate) const INVALID_PARAMETER_NAME: u32 = 0x8033_8055;
    pub(crate) const INSUFFICIENT_SELECTORS: u32 = 0x8033_805A;
    pub(crate) const UNEXPECTED_SELECTORS: u32 = 0x8033_805B;
    pub(crate) const SELECTOR_TYPE_MISMATCH: u32 = 0x8033_805C;
    pub(crate) const AMBIGUOUS_SELECTORS: u32 = 0x8033_805E;
    pub(crate) const DUPLICATE_SELECTORS: u32 = 0x8033_805F;
    pub(crate) const INVALID_URI_WMI_ENUM_WQL: u32 = 0x8033_80FB;
    pub(crate) const ENUMERATE_WMI_INVALID_KEY: u32 = 0x8033_8108;
    pub(crate) const CANNOT_PROCESS_FILTER: u32 = 0x8033_8122;
}

/// A SOAP fault.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    /// `s:Sender`, `s:Receiver`, `s:MustUnderstand`, `s:VersionMismatch`.
    pub(crate) code: &'static str,
    /// A qualified subcode (`w:InvalidSelectors`), if any.
    pub(crate) subcode: Option<&'static str>,
    pub(crate) reason: String,
    /// The last segment of a `faultDetail` URI, if any.
    pub(crate) detail: Option<&'static str>,
    pub(crate) wsman_code: u32,
    /// The header not understood (namespace, local name).
    pub(crate) not_understood: Option<Box<(String, String)>>,
}

impl Fault {
    pub(crate) fn sender(subcode: &'static str, wsman_code: u32, reason: impl Into<String>) -> Self {
        Self {
            code: "s:Sender",
            subcode: Some(subcode),
            reason: reason.into(),
            detail: None,
            wsman_code,
            not_understood: None,
        }
    }

    pub(crate) fn detail(mut self, d: &'static str) -> Self {
        self.detail = Some(d);
        self
    }

    /// The instance named by the URI and selectors does not exist.
    pub(crate) fn not_found() -> Self {
        Self::sender(
            "a:DestinationUnreachable",
            code::RESOURCE_NOT_FOUND,
            "The WS-Management service cannot process the request. The service cannot find the resource identified by the resource URI and selectors.",
        )
        .detail("InvalidResourceURI")
    }

    /// An embedded instance is not CIM-XML (a WS-CIM tree, say).
    pub(crate) fn schema(reason: impl Into<String>) -> Self {
        Self::sender("w:SchemaValidationError", code::SCHEMA_VALIDATION, reason)
    }

    fn action(&self) -> &'static str {
        match self.subcode {
            Some(s) if s.starts_with("w:") => "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault",
            Some(s) if s.starts_with("n:") => "http://schemas.xmlsoap.org/ws/2004/09/enumeration/fault",
            _ => "http://schemas.xmlsoap.org/ws/2004/08/addressing/fault",
        }
    }

    fn render(&self, relates_to: Option<&str>, host: &str) -> String {
        let mut header = format!(
            "<a:Action>{}</a:Action><a:MessageID>uuid:{}</a:MessageID><a:To>{ANONYMOUS}</a:To>",
            self.action(),
            new_id()
        );
        if let Some(r) = relates_to {
            header.push_str(&format!("<a:RelatesTo>{}</a:RelatesTo>", esc(r)));
        }
        if let Some((ns, local)) = self.not_understood.as_deref() {
            header.push_str(&format!(
                "<s:NotUnderstood qname=\"q:{}\" xmlns:q=\"{}\"/>",
                esc(local),
                esc(ns)
            ));
        }
        let mut code = format!("<s:Code><s:Value>{}</s:Value>", self.code);
        if let Some(sub) = self.subcode {
            code.push_str(&format!("<s:Subcode><s:Value>{sub}</s:Value></s:Subcode>"));
        }
        code.push_str("</s:Code>");
        let mut detail = String::from("<s:Detail>");
        if let Some(d) = self.detail {
            detail.push_str(&format!("<w:FaultDetail>{FAULT_DETAIL}{d}</w:FaultDetail>"));
        }
        detail.push_str(&format!(
            "<f:WSManFault xmlns:f=\"{}\" Code=\"{}\" Machine=\"{}\"><f:Message>{}</f:Message></f:WSManFault></s:Detail>",
            crate::model::NS_F,
            self.wsman_code,
            esc(host),
            esc(&self.reason)
        ));
        envelope(
            &header,
            &format!(
                "<s:Fault>{code}<s:Reason><s:Text xml:lang=\"en-US\">{}</s:Text></s:Reason>{detail}</s:Fault>",
                esc(&self.reason)
            ),
        )
    }
}

/// An HTTP answer to a SOAP request.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
    /// What the request log says about it.
    pub(crate) outcome: String,
    pub(crate) action: String,
    pub(crate) resource_uri: String,
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string().to_uppercase()
}

fn envelope(header: &str, body: &str) -> String {
    format!(
        "<s:Envelope xmlns:s=\"{NS_S}\" xmlns:a=\"{NS_A}\" xmlns:w=\"{NS_W}\" xmlns:n=\"{NS_N}\" xmlns:xsi=\"{NS_XSI}\" xmlns:cim=\"{NS_CIM}\" xml:lang=\"en-US\"><s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    )
}

/// The request header fields.
#[derive(Debug, Default)]
struct Header {
    message_id: Option<String>,
    action: Option<String>,
    resource_uri: Option<String>,
    to: Option<String>,
    reply_to: Option<String>,
    selectors: Vec<(String, String)>,
    selector_errors: Vec<String>,
    max_envelope: Option<usize>,
}

/// Header blocks the simulated service understands.
const KNOWN_HEADERS: &[(&str, &str)] = &[
    (NS_A, "To"),
    (NS_A, "Action"),
    (NS_A, "ReplyTo"),
    (NS_A, "MessageID"),
    (NS_A, "FaultTo"),
    (NS_W, "ResourceURI"),
    (NS_W, "MaxEnvelopeSize"),
    (NS_W, "OperationTimeout"),
    (NS_W, "SelectorSet"),
    (NS_W, "OptionSet"),
    (NS_W, "Locale"),
    (NS_MSWSMAN, "DataLocale"),
    (NS_MSWSMAN, "SessionId"),
    (NS_MSWSMAN, "OperationID"),
    (NS_MSWSMAN, "SequenceId"),
];

fn is(n: &Node<'_, '_>, ns: &str, local: &str) -> bool {
    n.is_element() && n.tag_name().namespace() == Some(ns) && n.tag_name().name() == local
}

fn child<'a, 'i>(n: Node<'a, 'i>, ns: &str, local: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| is(c, ns, local))
}

fn text(n: Node<'_, '_>) -> String {
    n.children().filter(Node::is_text).filter_map(|t| t.text()).collect::<String>()
}

/// Handles one SOAP request.
pub(crate) fn handle(s: &mut State, body: &str) -> Reply {
    let host = s.config.host_name.clone();
    let mut reply = Reply {
        status: 200,
        body: String::new(),
        outcome: String::new(),
        action: String::new(),
        resource_uri: String::new(),
    };
    let doc = match roxmltree::Document::parse(body) {
        Ok(d) => d,
        Err(e) => {
            let f = Fault::sender(
                "w:SchemaValidationError",
                code::INVALID_XML,
                format!("The request is not well-formed XML: {e}"),
            );
            return fault_reply(s, reply, f, None, &host, true);
        }
    };
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" || root.tag_name().namespace() != Some(NS_S) {
        let mut f = Fault::sender(
            "w:SchemaValidationError",
            code::SOAP_VERSION_MISMATCH,
            "The request is not a SOAP 1.2 envelope.",
        );
        if root.tag_name().namespace() == Some(NS_S11) {
            f.code = "s:VersionMismatch";
            f.subcode = None;
        }
        return fault_reply(s, reply, f, None, &host, true);
    }
    let header_node = child(root, NS_S, "Header");
    let body_node = child(root, NS_S, "Body");
    let mut h = Header::default();
    if let Some(hn) = header_node {
        for block in hn.children().filter(Node::is_element) {
            let must = block.attribute((NS_S, "mustUnderstand")).is_some_and(|v| v == "true" || v == "1");
            let tag = block.tag_name();
            let known = KNOWN_HEADERS.iter().any(|(ns, l)| tag.namespace() == Some(*ns) && tag.name() == *l);
            if must && !known {
                let f = Fault {
                    code: "s:MustUnderstand",
                    subcode: None,
                    reason: format!(
                        "The WS-Management service cannot process a SOAP header in the request that is marked as mustUnderstand: {}",
                        tag.name()
                    ),
                    detail: None,
                    wsman_code: code::MUST_UNDERSTAND,
                    not_understood: Some(Box::new((
                        tag.namespace().unwrap_or("").to_owned(),
                        tag.name().to_owned(),
                    ))),
                };
                let relates = hn.children().find(|c| is(c, NS_A, "MessageID")).map(text);
                return fault_reply(s, reply, f, relates.as_deref(), &host, true);
            }
            match (tag.namespace(), tag.name()) {
                (Some(NS_A), "MessageID") => h.message_id = Some(text(block).trim().to_owned()),
                (Some(NS_A), "Action") => h.action = Some(text(block).trim().to_owned()),
                (Some(NS_A), "To") => h.to = Some(text(block).trim().to_owned()),
                (Some(NS_A), "ReplyTo") => {
                    h.reply_to = child(block, NS_A, "Address").map(|a| text(a).trim().to_owned())
                }
                (Some(NS_W), "ResourceURI") => h.resource_uri = Some(text(block).trim().to_owned()),
                (Some(NS_W), "MaxEnvelopeSize") => {
                    h.max_envelope = text(block).trim().parse().ok().or(Some(0))
                }
                (Some(NS_W), "SelectorSet") => {
                    for sel in block.children().filter(Node::is_element) {
                        if !is(&sel, NS_W, "Selector") {
                            h.selector_errors
                                .push(format!("unexpected <{}> in the SelectorSet", sel.tag_name().name()));
                            continue;
                        }
                        if sel.children().any(|c| c.is_element()) {
                            h.selector_errors.push("an EPR-valued selector is not simulated".to_owned());
                            continue;
                        }
                        match sel.attribute("Name") {
                            Some(n) => h.selectors.push((n.to_owned(), text(sel))),
                            None => h.selector_errors.push("a Selector without Name".to_owned()),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    reply.action = h.action.clone().unwrap_or_default();
    reply.resource_uri = h.resource_uri.clone().unwrap_or_default();
    let relates = h.message_id.clone();
    let missing: Vec<&str> = [
        ("a:To", h.to.is_none()),
        ("a:Action", h.action.is_none()),
        ("a:MessageID", h.message_id.is_none()),
        ("a:ReplyTo/a:Address", h.reply_to.is_none()),
        ("w:ResourceURI", h.resource_uri.is_none()),
    ]
    .into_iter()
    .filter(|(_, m)| *m)
    .map(|(n, _)| n)
    .collect();
    if !missing.is_empty() {
        let f = Fault::sender(
            "a:MessageInformationHeaderRequired",
            code::HEADER_REQUIRED,
            format!(
                "The request does not have all the expected SOAP headers: {} missing.",
                missing.join(", ")
            ),
        );
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    }
    if h.reply_to.as_deref() != Some(ANONYMOUS) {
        let f = Fault::sender(
            "a:InvalidMessageInformationHeader",
            code::INVALID_HEADER,
            "a:ReplyTo/a:Address must be the anonymous address.",
        );
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    }
    if !h.message_id.as_deref().is_some_and(|m| m.starts_with("uuid:") && m.len() > 5) {
        let f = Fault::sender(
            "a:InvalidMessageInformationHeader",
            code::INVALID_HEADER,
            "a:MessageID must be uuid:<id>.",
        );
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    }
    if h.max_envelope == Some(0) {
        let f = Fault::sender(
            "w:EncodingLimit",
            code::INVALID_HEADER,
            "w:MaxEnvelopeSize must be a positive number.",
        );
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    }
    let Some(body_node) = body_node else {
        let f = Fault::sender("w:InvalidBody", code::INVALID_SOAP_BODY, "The request has no SOAP body.");
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    };
    let action = h.action.clone().unwrap_or_default();
    let uri = h.resource_uri.clone().unwrap_or_default();
    // The resource URI: the v2 prefix, then `*` or a known class.
    let Some((namespace, class_part)) = split_uri(&uri) else {
        let f = Fault::sender(
            "a:DestinationUnreachable",
            code::INVALID_RESOURCE_URI,
            format!("The resource URI {uri} is not in root/virtualization/v2 (or root/cimv2/CIM_DataFile)."),
        )
        .detail("InvalidResourceURI");
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    };
    let class: Option<&ClassDef> = if class_part == "*" {
        None
    } else {
        match Catalog::get().class_nocase(class_part).filter(|c| !c.embedded_only && c.namespace == namespace)
        {
            Some(c) => Some(c),
            None => {
                let f = Fault::sender(
                    "a:DestinationUnreachable",
                    code::RESOURCE_NOT_FOUND,
                    format!(
                        "The WS-Management service cannot process the request. The class {class_part} does not exist in the root/virtualization/v2 namespace."
                    ),
                );
                return fault_reply(s, reply, f, relates.as_deref(), &host, true);
            }
        }
    };
    if let Some(e) = h.selector_errors.first() {
        let f = Fault::sender("w:InvalidSelectors", code::SELECTOR_TYPE_MISMATCH, e.clone())
            .detail("TypeMismatch");
        return fault_reply(s, reply, f, relates.as_deref(), &host, true);
    }
    let result = match action.as_str() {
        ACTION_GET => get(s, class, &h),
        ACTION_ENUMERATE => enumerate(s, namespace, class, &h, body_node),
        ACTION_PULL => pull(s, body_node),
        ACTION_RELEASE => release(s, body_node),
        ACTION_PUT | ACTION_CREATE | ACTION_DELETE => Err((
            Fault::sender(
                "a:ActionNotSupported",
                code::ACTION_NOT_SUPPORTED,
                format!("{action} is not supported on root/virtualization/v2 classes: use their methods."),
            ),
            true,
        )),
        _ => match class {
            Some(c)
                if action.len() > uri.len() + 1
                    && action[..uri.len()] == uri[..]
                    && action.as_bytes()[uri.len()] == b'/' =>
            {
                invoke(s, c, &h, &action[uri.len() + 1..], body_node)
            }
            _ => Err((
                Fault::sender(
                    "a:ActionNotSupported",
                    code::ACTION_NOT_SUPPORTED,
                    format!("The action {action} is not supported for the resource URI {uri}."),
                ),
                true,
            )),
        },
    };
    match result {
        Ok((body, outcome)) => {
            let header = format!(
                "<a:To>{ANONYMOUS}</a:To><a:Action>{}Response</a:Action><a:MessageID>uuid:{}</a:MessageID><a:RelatesTo>{}</a:RelatesTo>",
                esc(&action),
                new_id(),
                esc(relates.as_deref().unwrap_or(""))
            );
            let text = envelope(&header, &body);
            if let Some(max) = h.max_envelope
                && text.len() > max
            {
                let f = Fault::sender(
                    "w:EncodingLimit",
                    code::MAX_ENVELOPE_SIZE_EXCEEDED,
                    format!("The response ({} bytes) exceeds w:MaxEnvelopeSize ({max}).", text.len()),
                )
                .detail("MaxEnvelopeSize");
                return fault_reply(s, reply, f, relates.as_deref(), &host, false);
            }
            reply.body = text;
            reply.outcome = outcome;
            reply
        }
        Err((f, violation)) => fault_reply(s, reply, f, relates.as_deref(), &host, violation),
    }
}

/// The namespace and class part (`*` or a class name) of a resource URI.
fn split_uri(uri: &str) -> Option<(Namespace, &str)> {
    strip_prefix_nocase(uri, URI_PREFIX)
        .map(|c| (Namespace::V2, c))
        .or_else(|| strip_prefix_nocase(uri, CIMV2_PREFIX).map(|c| (Namespace::Cimv2, c)))
}

fn strip_prefix_nocase<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix))
    .then(|| &s[prefix.len()..])
}

fn fault_reply(
    s: &mut State,
    mut reply: Reply,
    f: Fault,
    relates: Option<&str>,
    host: &str,
    violation: bool,
) -> Reply {
    let subject = if reply.action.is_empty() { "request".to_owned() } else { reply.action.clone() };
    if violation {
        s.violations.push(format!(
            "{subject} ({}): {}: {}",
            reply.resource_uri,
            f.subcode.unwrap_or(f.code),
            f.reason
        ));
    }
    reply.status = 500;
    reply.outcome = format!("fault {} {}", f.subcode.unwrap_or(f.code), f.wsman_code);
    reply.body = f.render(relates, host);
    reply
}

type OpResult = Result<(String, String), (Fault, bool)>;

/// Resolves the instance named by a class and selectors.
fn resolve(s: &State, class: &ClassDef, selectors: &[(String, String)]) -> Result<Instance, (Fault, bool)> {
    let invalid = |c: u32, d: &'static str, msg: String| {
        Err((Fault::sender("w:InvalidSelectors", c, msg).detail(d), true))
    };
    if selectors.iter().any(|(n, _)| n.eq_ignore_ascii_case("__cimnamespace")) {
        return invalid(
            code::UNEXPECTED_SELECTORS,
            "UnexpectedSelectors",
            "The __cimnamespace selector is refused on .../wmi/root/virtualization/v2/ resource URIs."
                .to_owned(),
        );
    }
    let mut seen: Vec<&str> = Vec::new();
    for (n, _) in selectors {
        if seen.contains(&n.as_str()) {
            return invalid(
                code::DUPLICATE_SELECTORS,
                "DuplicateSelectors",
                format!("The selector {n} appears twice."),
            );
        }
        seen.push(n);
    }
    if selectors.is_empty() && !class.keys.is_empty() {
        return invalid(
            code::INSUFFICIENT_SELECTORS,
            "InsufficientSelectors",
            format!("{} needs the selectors {}.", class.name, class.keys.join(", ")),
        );
    }
    if let Some((n, _)) = selectors.iter().find(|(n, _)| !class.keys.contains(n)) {
        return invalid(
            code::UNEXPECTED_SELECTORS,
            "UnexpectedSelectors",
            format!("{n} is not a key of {} (keys: {}).", class.name, class.keys.join(", ")),
        );
    }
    let catalog = Catalog::get();
    let candidates: Vec<Instance> = s
        .instances()
        .into_iter()
        .filter(|i| catalog.is_a(&i.class, &class.name))
        .filter(|i| selectors.iter().all(|(k, v)| i.key(k).eq_ignore_ascii_case(v)))
        .collect();
    if selectors.len() < class.keys.len() {
        // A partial key set: accepted for the services when it names one
        // instance (libvirt addresses them by CreationClassName alone).
        let service = catalog.is_a(&class.name, "CIM_Service");
        if !service {
            let missing: Vec<&String> =
                class.keys.iter().filter(|k| !selectors.iter().any(|(n, _)| n == *k)).collect();
            return invalid(
                code::INSUFFICIENT_SELECTORS,
                "InsufficientSelectors",
                format!("{} needs the selectors {:?}.", class.name, missing),
            );
        }
        return match candidates.len() {
            1 => Ok(candidates.into_iter().next().unwrap_or_else(|| Instance::new(&class.name))),
            0 => Err((Fault::not_found(), false)),
            _ => invalid(
                code::AMBIGUOUS_SELECTORS,
                "AmbiguousSelectors",
                "The selectors match several instances.".to_owned(),
            ),
        };
    }
    candidates.into_iter().next().ok_or((Fault::not_found(), false))
}

fn get(s: &mut State, class: Option<&ClassDef>, h: &Header) -> OpResult {
    let Some(class) = class else {
        return Err((
            Fault::sender(
                "a:DestinationUnreachable",
                code::INVALID_RESOURCE_URI,
                "Get needs a class resource URI, not .../v2/*.",
            )
            .detail("InvalidResourceURI"),
            true,
        ));
    };
    let inst = resolve(s, class, &h.selectors)?;
    Ok((inst.render(), format!("get {}", inst.class)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Objects,
    Eprs,
    Both,
}

fn render_item(i: &Instance, mode: Mode) -> String {
    let epr = || format!("<a:EndpointReference>{}</a:EndpointReference>", i.epr().render());
    match mode {
        Mode::Objects => i.render(),
        Mode::Eprs => epr(),
        Mode::Both => format!("<w:Item>{}{}</w:Item>", i.render(), epr()),
    }
}

fn enumerate(
    s: &mut State,
    namespace: Namespace,
    class: Option<&ClassDef>,
    h: &Header,
    body: Node<'_, '_>,
) -> OpResult {
    let Some(en) = child(body, NS_N, "Enumerate") else {
        return Err((
            Fault::sender("w:SchemaValidationError", code::INVALID_SOAP_BODY, "The body has no n:Enumerate."),
            true,
        ));
    };
    let optimize = child(en, NS_W, "OptimizeEnumeration").is_some();
    let max = match child(en, NS_W, "MaxElements") {
        None => 1,
        Some(m) => match text(m).trim().parse::<usize>() {
            Ok(v) if v > 0 => v,
            _ => {
                return Err((
                    Fault::sender(
                        "w:SchemaValidationError",
                        code::SCHEMA_VALIDATION,
                        "w:MaxElements must be a positive integer.",
                    ),
                    true,
                ));
            }
        },
    };
    let mode = match child(en, NS_W, "EnumerationMode").map(|m| text(m).trim().to_owned()).as_deref() {
        None => Mode::Objects,
        Some("EnumerateEPR") => Mode::Eprs,
        Some("EnumerateObjectAndEPR") => Mode::Both,
        Some(other) => {
            return Err((
                Fault::sender(
                    "w:SchemaValidationError",
                    code::SCHEMA_VALIDATION,
                    format!("Unknown w:EnumerationMode {other}."),
                ),
                true,
            ));
        }
    };
    let filter = child(en, NS_W, "Filter").or_else(|| child(en, NS_N, "Filter"));
    let instances = match (class, filter) {
        (None, None) => {
            return Err((
                Fault::sender(
                    "w:CannotProcessFilter",
                    code::INVALID_URI_WMI_ENUM_WQL,
                    "Enumerating .../v2/* needs a WQL filter.",
                ),
                true,
            ));
        }
        (Some(c), Some(_)) => {
            return Err((
                Fault::sender(
                    "w:CannotProcessFilter",
                    code::INVALID_URI_WMI_ENUM_WQL,
                    format!("A WQL filter needs the resource URI .../v2/*, not {}.", c.name),
                ),
                true,
            ));
        }
        (None, Some(f)) => {
            if !h.selectors.is_empty() {
                return Err((
                    Fault::sender(
                        "w:InvalidSelectors",
                        code::ENUMERATE_WMI_INVALID_KEY,
                        "Enumerate with a WQL filter takes no selectors.",
                    )
                    .detail("UnexpectedSelectors"),
                    true,
                ));
            }
            let dialect = f.attribute("Dialect").unwrap_or("");
            if dialect != DIALECT_WQL {
                return Err((
                    Fault::sender(
                        "n:FilterDialectRequestedUnavailable",
                        code::FILTER_DIALECT_UNAVAILABLE,
                        format!("The filter dialect '{dialect}' is not simulated; use {DIALECT_WQL}."),
                    ),
                    true,
                ));
            }
            run_query(s, namespace, &text(f))?
        }
        (Some(c), None) => {
            if !h.selectors.is_empty() {
                return Err((
                    Fault::sender(
                        "w:InvalidSelectors",
                        code::ENUMERATE_WMI_INVALID_KEY,
                        "Enumerate takes no selectors.",
                    )
                    .detail("UnexpectedSelectors"),
                    true,
                ));
            }
            let catalog = Catalog::get();
            s.instances().into_iter().filter(|i| catalog.is_a(&i.class, &c.name)).collect()
        }
    };
    let count = instances.len();
    let mut items: VecDeque<String> = instances.iter().map(|i| render_item(i, mode)).collect();
    let context = format!("uuid:{}", new_id());
    let mut body = String::from("<n:EnumerateResponse>");
    if optimize {
        let first: Vec<String> = items.drain(..max.min(items.len())).collect();
        if items.is_empty() {
            body.push_str(&format!(
                "<n:EnumerationContext/><w:Items>{}</w:Items><w:EndOfSequence/>",
                first.concat()
            ));
        } else {
            body.push_str(&format!(
                "<n:EnumerationContext>{context}</n:EnumerationContext><w:Items>{}</w:Items>",
                first.concat()
            ));
            s.enumerations.insert(context, Enumeration { items, last_used: Instant::now() });
        }
    } else {
        body.push_str(&format!("<n:EnumerationContext>{context}</n:EnumerationContext>"));
        s.enumerations.insert(context, Enumeration { items, last_used: Instant::now() });
    }
    body.push_str("</n:EnumerateResponse>");
    Ok((body, format!("enumerate {count} items")))
}

/// The fault for a refused query (the only place a [`WqlError`] becomes one).
fn filter_fault(q: &str, e: &WqlError) -> (Fault, bool) {
    (
        Fault::sender(
            "w:CannotProcessFilter",
            code::CANNOT_PROCESS_FILTER,
            format!("The WQL query '{q}' cannot be processed: {e}"),
        ),
        true,
    )
}

fn run_query(s: &State, namespace: Namespace, q: &str) -> Result<Vec<Instance>, (Fault, bool)> {
    let refuse = |e: WqlError| filter_fault(q, &e);
    let query = wql::parse(q).map_err(refuse)?;
    let catalog = Catalog::get();
    // A query names classes of the namespace its resource URI is in.
    let named = match &query {
        Query::Select { class, .. } => class.clone(),
        Query::Associators(a) => a.source.class.clone(),
    };
    if catalog.class_nocase(&named).is_some_and(|c| c.namespace != namespace) {
        return Err(refuse(WqlError::InvalidClass { class: named }));
    }
    match query {
        Query::Select { class, filter } => Ok(s
            .instances()
            .into_iter()
            .filter(|i| catalog.is_a(&i.class, &class))
            .filter(|i| catalog.class(&i.class).is_some_and(|c| c.namespace == namespace))
            .filter(|i| filter.as_ref().is_none_or(|f| wql::matches(f, i)))
            .collect()),
        Query::Associators(a) => {
            if let Some(ns) = &a.source.namespace
                && !ns.replace('/', "\\").eq_ignore_ascii_case("root\\virtualization\\v2")
            {
                return Err(refuse(WqlError::Namespace { namespace: ns.clone() }));
            }
            let def = catalog
                .class_nocase(&a.source.class)
                .ok_or_else(|| refuse(WqlError::InvalidClass { class: a.source.class.clone() }))?;
            let mut names: Vec<&str> = a.source.keys.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            let mut keys: Vec<&str> = def.keys.iter().map(String::as_str).collect();
            keys.sort_unstable();
            if names != keys {
                return Err(refuse(WqlError::Keys { class: def.name.clone(), keys: def.keys.clone() }));
            }
            let source = Epr { class: def.name.clone(), selectors: a.source.keys.clone() };
            let same = |e: &Epr| {
                catalog.is_a(&e.class, &source.class)
                    && source.selectors.iter().all(|(k, v)| {
                        e.selectors
                            .iter()
                            .any(|(k2, v2)| k2.eq_ignore_ascii_case(k) && v2.eq_ignore_ascii_case(v))
                    })
            };
            let mut results: Vec<Epr> = Vec::new();
            for (class, (r1, e1), (r2, e2)) in s.associations() {
                if a.assoc_class.as_ref().is_some_and(|c| !catalog.is_a(class, c)) {
                    continue;
                }
                for (role, end, result_role, other) in [(r1, &e1, r2, &e2), (r2, &e2, r1, &e1)] {
                    if !same(end) {
                        continue;
                    }
                    if a.role.as_ref().is_some_and(|r| !r.eq_ignore_ascii_case(role))
                        || a.result_role.as_ref().is_some_and(|r| !r.eq_ignore_ascii_case(result_role))
                        || a.result_class.as_ref().is_some_and(|c| !catalog.is_a(&other.class, c))
                    {
                        continue;
                    }
                    if !results.contains(other) {
                        results.push(other.clone());
                    }
                }
            }
            let all = s.instances();
            Ok(results.iter().filter_map(|e| all.iter().find(|i| &i.epr() == e).cloned()).collect())
        }
    }
}

fn context_of<'a, 'i>(body: Node<'a, 'i>, op: &str) -> Result<(Node<'a, 'i>, String), (Fault, bool)> {
    let Some(op_node) = child(body, NS_N, op) else {
        return Err((
            Fault::sender(
                "w:SchemaValidationError",
                code::INVALID_SOAP_BODY,
                format!("The body has no n:{op}."),
            ),
            true,
        ));
    };
    let ctx =
        child(op_node, NS_N, "EnumerationContext").map(|c| text(c).trim().to_owned()).unwrap_or_default();
    Ok((op_node, ctx))
}

fn invalid_context(ctx: &str) -> (Fault, bool) {
    (
        Fault {
            code: "s:Receiver",
            subcode: Some("n:InvalidEnumerationContext"),
            reason: format!(
                "The enumeration context '{ctx}' is not valid: the enumeration ended, expired or never existed."
            ),
            detail: None,
            wsman_code: code::INVALID_ENUMERATION_CONTEXT,
            not_understood: None,
        },
        true,
    )
}

fn pull(s: &mut State, body: Node<'_, '_>) -> OpResult {
    let (op, ctx) = context_of(body, "Pull")?;
    let max = match child(op, NS_N, "MaxElements") {
        None => 1,
        Some(m) => text(m).trim().parse::<usize>().ok().filter(|v| *v > 0).ok_or_else(|| {
            (
                Fault::sender(
                    "w:SchemaValidationError",
                    code::SCHEMA_VALIDATION,
                    "n:MaxElements must be a positive integer.",
                ),
                true,
            )
        })?,
    };
    let Some(e) = s.enumerations.get_mut(&ctx) else {
        return Err(invalid_context(&ctx));
    };
    let items: Vec<String> = e.items.drain(..max.min(e.items.len())).collect();
    e.last_used = Instant::now();
    let done = e.items.is_empty();
    let mut body = String::from("<n:PullResponse>");
    if done {
        s.enumerations.remove(&ctx);
    } else {
        body.push_str(&format!("<n:EnumerationContext>{ctx}</n:EnumerationContext>"));
    }
    body.push_str(&format!("<n:Items>{}</n:Items>", items.concat()));
    if done {
        body.push_str("<n:EndOfSequence/>");
    }
    body.push_str("</n:PullResponse>");
    Ok((body, format!("pull {} items", items.len())))
}

fn release(s: &mut State, body: Node<'_, '_>) -> OpResult {
    let (_, ctx) = context_of(body, "Release")?;
    if s.enumerations.remove(&ctx).is_none() {
        return Err(invalid_context(&ctx));
    }
    Ok((String::new(), "release".to_owned()))
}

/// Why a reference parameter is not an EPR of a simulated class (a
/// `w:InvalidParameter` type mismatch in `invoke`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum EprError {
    /// A required element of the reference is absent.
    #[error("the reference has no {element}")]
    Missing {
        /// The element, with its usual prefix (`a:Address`).
        element: &'static str,
    },
    /// The resource URI is not under the v2 namespace's prefix.
    #[error("{uri} is not a v2 resource URI")]
    NotV2 {
        /// The URI.
        uri: String,
    },
    /// The resource URI names no class of the catalogue.
    #[error("{class} is not a class")]
    NoClass {
        /// The class part of the URI.
        class: String,
    },
    /// A `w:Selector` without its `Name` attribute.
    #[error("a Selector without Name")]
    SelectorWithoutName,
}

/// Parses an EPR: `a:Address` + `a:ReferenceParameters`, directly or inside
/// `a:EndpointReference`.
fn parse_epr(n: Node<'_, '_>) -> Result<Epr, EprError> {
    let missing = |element| EprError::Missing { element };
    let n = child(n, NS_A, "EndpointReference").unwrap_or(n);
    if child(n, NS_A, "Address").is_none() {
        return Err(missing("a:Address"));
    }
    let rp = child(n, NS_A, "ReferenceParameters").ok_or_else(|| missing("a:ReferenceParameters"))?;
    let uri = child(rp, NS_W, "ResourceURI").map(text).ok_or_else(|| missing("w:ResourceURI"))?;
    let (namespace, class_part) =
        split_uri(uri.trim()).ok_or_else(|| EprError::NotV2 { uri: uri.clone() })?;
    let class = Catalog::get()
        .class_nocase(class_part)
        .filter(|c| c.namespace == namespace)
        .ok_or_else(|| EprError::NoClass { class: class_part.to_owned() })?;
    let mut selectors = Vec::new();
    if let Some(set) = child(rp, NS_W, "SelectorSet") {
        for sel in set.children().filter(|c| is(c, NS_W, "Selector")) {
            let name = sel.attribute("Name").ok_or(EprError::SelectorWithoutName)?;
            selectors.push((name.to_owned(), text(sel)));
        }
    }
    Ok(Epr { class: class.name.clone(), selectors })
}

fn invoke(s: &mut State, class: &ClassDef, h: &Header, method_name: &str, body: Node<'_, '_>) -> OpResult {
    let Some(method) = class.method(method_name) else {
        return Err((
            Fault::sender(
                "a:ActionNotSupported",
                code::ACTION_NOT_SUPPORTED,
                format!("{} has no method {method_name} (names are case-sensitive).", class.name),
            ),
            true,
        ));
    };
    let target = resolve(s, class, &h.selectors)?;
    let uri = h.resource_uri.clone().unwrap_or_default();
    let elements: Vec<Node<'_, '_>> = body.children().filter(Node::is_element).collect();
    let input_name = format!("{method_name}_INPUT");
    let [input] = elements.as_slice() else {
        return Err((Fault::schema(format!("The body must hold exactly one <{input_name}>.")), true));
    };
    if input.tag_name().name() != input_name || input.tag_name().namespace() != Some(uri.as_str()) {
        return Err((
            Fault::schema(format!(
                "The body root must be <{input_name}> in the namespace {uri}, not <{}> in {}.",
                input.tag_name().name(),
                input.tag_name().namespace().unwrap_or("no namespace")
            )),
            true,
        ));
    }
    let mut params = Params::default();
    for p in input.children().filter(Node::is_element) {
        let name = p.tag_name().name();
        let Some(def) = method.params.iter().find(|d| d.name == name && d.input) else {
            return Err((
                Fault::sender(
                    "w:InvalidParameter",
                    code::INVALID_PARAMETER_NAME,
                    format!("{method_name} has no input parameter {name} (names are case-sensitive)."),
                )
                .detail("InvalidName"),
                true,
            ));
        };
        if p.tag_name().namespace() != Some(uri.as_str()) {
            return Err((
                Fault::sender(
                    "w:InvalidParameter",
                    code::INVALID_PARAMETER_NAME,
                    format!("The parameter {name} must be in the namespace {uri}."),
                )
                .detail("InvalidName"),
                true,
            ));
        }
        let mismatch = |msg: String| {
            (
                Fault::sender("w:InvalidParameter", code::PARAMETER_TYPE_MISMATCH, msg)
                    .detail("TypeMismatch"),
                true,
            )
        };
        if !def.array && params.values.contains_key(name) {
            return Err(mismatch(format!("{name} is not an array but was sent twice.")));
        }
        let nil = p.attribute((NS_XSI, "nil")).is_some_and(|v| v == "true" || v == "1");
        let value = if nil {
            PVal::Nil
        } else {
            match &def.ty {
                CimType::Ref(_) => PVal::Ref(parse_epr(p).map_err(|e| mismatch(format!("{name}: {e}")))?),
                ty => {
                    if p.children().any(|c| c.is_element()) {
                        if ty == &CimType::Datetime {
                            let inner =
                                p.children().find(|c| is(c, NS_CIM, "Datetime") || is(c, NS_CIM, "Interval"));
                            match inner {
                                Some(i) => PVal::Text(text(i)),
                                None => {
                                    return Err(mismatch(format!(
                                        "{name} must be a cim:Datetime or cim:Interval."
                                    )));
                                }
                            }
                        } else if def.embedded.is_some() {
                            return Err((
                                Fault::schema(format!(
                                    "{name} is a string holding an embedded CIM-XML instance; an element tree is not accepted."
                                )),
                                true,
                            ));
                        } else {
                            return Err(mismatch(format!(
                                "{name} must be a {}, not elements.",
                                ty.cim_name()
                            )));
                        }
                    } else {
                        let t = text(p);
                        if ty != &CimType::Datetime || !t.trim().is_empty() {
                            ty.check_lexical(&t).map_err(|e| mismatch(format!("{name}: {e}")))?;
                        }
                        PVal::Text(t)
                    }
                }
            }
        };
        params.values.entry(name.to_owned()).or_default().push(value);
    }
    let out = methods::invoke(s, &target, class, method, &params).map_err(|f| (f, true))?;
    let outcome = format!("{} -> {}", method_name, out.return_value);
    Ok((render_output(class, method_name, &out), outcome))
}

fn render_output(class: &ClassDef, method: &str, out: &Output) -> String {
    let uri = class_uri(&class.name);
    let mut s = format!("<p:{method}_OUTPUT xmlns:p=\"{}\">", esc(&uri));
    for (n, e) in &out.refs {
        debug_assert!(
            class.method(method).is_some_and(|m| m.params.iter().any(|p| p.output && &p.name == n)),
            "{method} has no out parameter {n}"
        );
        s.push_str(&format!("<p:{n}>{}</p:{n}>", e.render()));
    }
    for (n, t) in &out.texts {
        debug_assert!(
            class.method(method).is_some_and(|m| m.params.iter().any(|p| p.output && &p.name == n)),
            "{method} has no out parameter {n}"
        );
        s.push_str(&format!("<p:{n}>{}</p:{n}>", esc(t)));
    }
    s.push_str(&format!("<p:ReturnValue>{}</p:ReturnValue></p:{method}_OUTPUT>", out.return_value));
    s
}
