//! Instances as WS-Management shows them: property values, endpoint
//! references, and their XML (`p:<Class>` elements in the class URI's
//! namespace with a child per property, arrays as repeated children, nulls
//! as `xsi:nil`, datetimes as `cim:Datetime`/`cim:Interval`) and CIM-XML
//! (`<INSTANCE>` text, for embedded results such as KVP items).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::catalog::Catalog;

/// SOAP 1.2.
pub(crate) const NS_S: &str = "http://www.w3.org/2003/05/soap-envelope";
/// SOAP 1.1 (refused with a VersionMismatch).
pub(crate) const NS_S11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// WS-Addressing 2004/08.
pub(crate) const NS_A: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
/// WS-Management (DMTF).
pub(crate) const NS_W: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
/// WS-Enumeration 2004/09.
pub(crate) const NS_N: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration";
/// Microsoft's WS-Management extensions (`p:` in request headers).
pub(crate) const NS_MSWSMAN: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd";
/// XML Schema instance.
pub(crate) const NS_XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// WS-CIM common types (`cim:Datetime`).
pub(crate) const NS_CIM: &str = "http://schemas.dmtf.org/wbem/wscim/1/common";
/// The `f:WSManFault` namespace.
pub(crate) const NS_F: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault";
/// The resource URI prefix of `root/virtualization/v2`.
pub(crate) const URI_PREFIX: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/";
/// The resource URI prefix of `root/cimv2` (only `CIM_DataFile` is served
/// there).
pub(crate) const CIMV2_PREFIX: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/cimv2/";
/// The anonymous reply address.
pub(crate) const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";

/// Escapes text for XML content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The resource URI of a class.
pub(crate) fn class_uri(class: &str) -> String {
    let prefix = match crate::catalog::Catalog::get().class(class).map(|c| c.namespace) {
        Some(crate::catalog::Namespace::Cimv2) => CIMV2_PREFIX,
        _ => URI_PREFIX,
    };
    format!("{prefix}{class}")
}

/// A property value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    Str(String),
    Bool(bool),
    U(u64),
    Dt(DateTime<Utc>),
    Interval(Duration),
    Ref(Epr),
    Arr(Vec<Val>),
}

impl Val {
    pub(crate) fn str(s: impl Into<String>) -> Self {
        Self::Str(s.into())
    }

    pub(crate) fn strs<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Self {
        Self::Arr(items.into_iter().map(|s| Self::Str(s.into())).collect())
    }

    pub(crate) fn u16s(items: &[u16]) -> Self {
        Self::Arr(items.iter().map(|v| Self::U((*v).into())).collect())
    }

    /// The scalar as text (WQL comparisons, selectors).
    pub(crate) fn text(&self) -> Option<String> {
        match self {
            Self::Str(s) => Some(s.clone()),
            Self::Bool(b) => Some(b.to_string()),
            Self::U(v) => Some(v.to_string()),
            Self::Dt(d) => Some(cim_datetime(d)),
            Self::Interval(d) => Some(cim_interval(*d)),
            Self::Null | Self::Ref(_) | Self::Arr(_) => None,
        }
    }
}

/// An endpoint reference: a class and its key values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Epr {
    pub(crate) class: String,
    pub(crate) selectors: Vec<(String, String)>,
}

impl Epr {
    /// `a:Address` and `a:ReferenceParameters`, the children of an EPR
    /// element (libvirt's shape, WIRE.md).
    pub(crate) fn render(&self) -> String {
        let mut s = format!(
            "<a:Address>{ANONYMOUS}</a:Address><a:ReferenceParameters><w:ResourceURI>{}</w:ResourceURI><w:SelectorSet>",
            esc(&class_uri(&self.class))
        );
        for (k, v) in &self.selectors {
            s.push_str(&format!("<w:Selector Name=\"{}\">{}</w:Selector>", esc(k), esc(v)));
        }
        s.push_str("</w:SelectorSet></a:ReferenceParameters>");
        s
    }

    /// The WMI object path (`\\HOST\root\virtualization\v2:Class.K="v"`),
    /// as `Parent` and `HostResource` carry it.
    pub(crate) fn wmi_path(&self, host: &str) -> String {
        let keys: Vec<String> = self
            .selectors
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        format!("\\\\{host}\\root\\virtualization\\v2:{}.{}", self.class, keys.join(","))
    }
}

/// An instance of a catalogue class.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Instance {
    pub(crate) class: String,
    pub(crate) props: BTreeMap<String, Val>,
}

impl Instance {
    pub(crate) fn new(class: &str) -> Self {
        Self { class: class.to_owned(), props: BTreeMap::new() }
    }

    /// Sets a property (the name must be one of the class's; checked in
    /// debug builds, where the tests run).
    pub(crate) fn set(mut self, name: &str, v: Val) -> Self {
        debug_assert!(
            Catalog::get().class(&self.class).and_then(|c| c.prop(name)).is_some(),
            "{}.{name} is not in the catalogue",
            self.class
        );
        self.props.insert(name.to_owned(), v);
        self
    }

    pub(crate) fn get(&self, name: &str) -> &Val {
        self.props.get(name).unwrap_or(&Val::Null)
    }

    /// The key property's text.
    pub(crate) fn key(&self, name: &str) -> String {
        self.get(name).text().unwrap_or_default()
    }

    /// Its reference (the class's keys as selectors).
    pub(crate) fn epr(&self) -> Epr {
        let keys = Catalog::get().class(&self.class).map(|c| c.keys.clone()).unwrap_or_default();
        Epr { class: self.class.clone(), selectors: keys.iter().map(|k| (k.clone(), self.key(k))).collect() }
    }

    /// The `p:<Class>` element, every property of the class in MOF order.
    pub(crate) fn render(&self) -> String {
        let uri = class_uri(&self.class);
        let mut s = format!(
            "<p:{c} xmlns:p=\"{u}\" xmlns:cim=\"{NS_CIM}\" xmlns:xsi=\"{NS_XSI}\" xsi:type=\"p:{c}_Type\">",
            c = self.class,
            u = esc(&uri)
        );
        let Some(def) = Catalog::get().class(&self.class) else {
            return s + &format!("</p:{}>", self.class);
        };
        for p in &def.props {
            let v = self.get(&p.name);
            match v {
                Val::Arr(items) if items.is_empty() => {
                    s.push_str(&format!("<p:{} xsi:nil=\"true\"/>", p.name));
                }
                Val::Arr(items) => {
                    for item in items {
                        s.push_str(&render_value(&p.name, item));
                    }
                }
                v => s.push_str(&render_value(&p.name, v)),
            }
        }
        s.push_str(&format!("</p:{}>", self.class));
        s
    }

    /// CIM-XML `<INSTANCE>` text (DSP0201), as Hyper-V puts embedded
    /// instances into string results.
    pub(crate) fn to_cimxml(&self) -> String {
        let mut s = format!("<INSTANCE CLASSNAME=\"{}\">", esc(&self.class));
        if let Some(def) = Catalog::get().class(&self.class) {
            for p in &def.props {
                let ty = p.ty.cim_name();
                match (self.get(&p.name), p.array) {
                    (Val::Arr(items), true) => {
                        s.push_str(&format!(
                            "<PROPERTY.ARRAY NAME=\"{}\" TYPE=\"{ty}\"><VALUE.ARRAY>",
                            p.name
                        ));
                        for i in items {
                            s.push_str(&format!("<VALUE>{}</VALUE>", esc(&i.text().unwrap_or_default())));
                        }
                        s.push_str("</VALUE.ARRAY></PROPERTY.ARRAY>");
                    }
                    (_, true) => s.push_str(&format!(
                        "<PROPERTY.ARRAY NAME=\"{}\" TYPE=\"{ty}\"></PROPERTY.ARRAY>",
                        p.name
                    )),
                    (Val::Null, false) => {
                        s.push_str(&format!("<PROPERTY NAME=\"{}\" TYPE=\"{ty}\"></PROPERTY>", p.name))
                    }
                    (v, false) => s.push_str(&format!(
                        "<PROPERTY NAME=\"{}\" TYPE=\"{ty}\"><VALUE>{}</VALUE></PROPERTY>",
                        p.name,
                        esc(&v.text().unwrap_or_default())
                    )),
                }
            }
        }
        s.push_str("</INSTANCE>");
        s
    }
}

fn render_value(name: &str, v: &Val) -> String {
    match v {
        Val::Null | Val::Arr(_) => format!("<p:{name} xsi:nil=\"true\"/>"),
        Val::Str(s) => format!("<p:{name}>{}</p:{name}>", esc(s)),
        Val::Bool(b) => format!("<p:{name}>{b}</p:{name}>"),
        Val::U(n) => format!("<p:{name}>{n}</p:{name}>"),
        Val::Dt(d) => format!("<p:{name}><cim:Datetime>{}</cim:Datetime></p:{name}>", xs_datetime(d)),
        Val::Interval(d) => format!("<p:{name}><cim:Interval>{}</cim:Interval></p:{name}>", xs_duration(*d)),
        Val::Ref(e) => format!("<p:{name}>{}</p:{name}>", e.render()),
    }
}

/// `2024-01-02T03:04:05.123456Z` (xs:dateTime, inside `cim:Datetime`).
pub(crate) fn xs_datetime(d: &DateTime<Utc>) -> String {
    d.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// `P0DT0H5M0S` (xs:duration, inside `cim:Interval`).
pub(crate) fn xs_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let micros = d.subsec_micros();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    if micros == 0 { format!("P{days}DT{h}H{m}M{s}S") } else { format!("P{days}DT{h}H{m}M{s}.{micros:06}S") }
}

/// The DMTF datetime text `yyyymmddHHMMSS.mmmmmm+000`.
pub(crate) fn cim_datetime(d: &DateTime<Utc>) -> String {
    d.format("%Y%m%d%H%M%S%.6f+000").to_string()
}

/// The DMTF interval text `ddddddddHHMMSS.mmmmmm:000`.
pub(crate) fn cim_interval(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    format!("{days:08}{:02}{:02}{:02}.{:06}:000", rem / 3600, (rem % 3600) / 60, rem % 60, d.subsec_micros())
}

/// Whether `s` is a DMTF datetime (`yyyymmddHHMMSS.mmmmmm±UUU`) or interval
/// (`ddddddddHHMMSS.mmmmmm:000`).
pub(crate) fn parse_cim_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 25 || b[14] != b'.' {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if !digits(0..14) || !digits(15..21) || !digits(22..25) {
        return false;
    }
    match b[21] {
        b'+' | b'-' => {
            let month: u32 = s[4..6].parse().unwrap_or(0);
            let day: u32 = s[6..8].parse().unwrap_or(0);
            let hour: u32 = s[8..10].parse().unwrap_or(99);
            (1..=12).contains(&month) && (1..=31).contains(&day) && hour < 24
        }
        b':' => &s[22..25] == "000",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_render_every_property() {
        let i = Instance::new("Msvm_ConcreteJob")
            .set("InstanceID", Val::str("J<1>"))
            .set("JobState", Val::U(7))
            .set("OperationalStatus", Val::u16s(&[2]))
            .set("TimeBeforeRemoval", Val::Interval(Duration::from_secs(300)));
        let x = i.render();
        assert!(x.starts_with("<p:Msvm_ConcreteJob xmlns:p=\"http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/Msvm_ConcreteJob\""));
        assert!(x.contains("<p:InstanceID>J&lt;1&gt;</p:InstanceID>"));
        assert!(x.contains("<p:Caption xsi:nil=\"true\"/>"));
        assert!(
            x.contains("<p:TimeBeforeRemoval><cim:Interval>P0DT0H5M0S</cim:Interval></p:TimeBeforeRemoval>")
        );
        assert!(x.contains("<p:OperationalStatus>2</p:OperationalStatus>"));
        assert!(roxmltree::Document::parse(&x).is_ok());
        assert_eq!(i.epr().selectors, vec![("InstanceID".to_owned(), "J<1>".to_owned())]);
    }

    #[test]
    fn wmi_paths_double_backslashes() {
        let e = Epr {
            class: "Msvm_ResourceAllocationSettingData".into(),
            selectors: vec![("InstanceID".into(), "Microsoft:A\\B".into())],
        };
        assert_eq!(
            e.wmi_path("H"),
            "\\\\H\\root\\virtualization\\v2:Msvm_ResourceAllocationSettingData.InstanceID=\"Microsoft:A\\\\B\""
        );
    }

    #[test]
    fn datetimes() {
        assert!(parse_cim_datetime("20240102030405.000000+000"));
        assert!(parse_cim_datetime("00000000000500.000000:000"));
        assert!(!parse_cim_datetime("20241302030405.000000+000"));
        assert_eq!(cim_interval(Duration::from_secs(300)), "00000000000500.000000:000");
        assert_eq!(xs_duration(Duration::from_millis(1500)), "P0DT0H0M1.500000S");
    }
}
