//! CIM instances both ways: read from WS-Management answers (an element
//! per property, arrays repeated, `xsi:nil`, `cim:Datetime`), and written
//! as CIM-XML (DSP0201) `INSTANCE` text, the form Hyper-V takes in its
//! `string` parameters that carry settings (`SystemSettings`,
//! `ResourceSettings[]`, `VirtualDiskSettingData`).

use serde::Serialize;

/// One property: its CIM type (when writing) and values (one for a
/// scalar; several for an array; none for null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// Name (case-sensitive).
    pub name: String,
    /// CIM type (`string`, `uint16`, `uint64`, `boolean`, ...).
    pub cim_type: String,
    /// Values.
    pub values: Vec<String>,
    /// An array property (written as `PROPERTY.ARRAY`).
    pub array: bool,
}

/// An instance of a class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    /// The class.
    pub class: String,
    /// The properties, in order.
    pub properties: Vec<Property>,
}

#[derive(Serialize)]
struct InstanceXml<'a> {
    #[serde(rename = "@CLASSNAME")]
    class: &'a str,
    #[serde(rename = "$value")]
    properties: Vec<PropertyXml<'a>>,
}

#[derive(Serialize)]
enum PropertyXml<'a> {
    #[serde(rename = "PROPERTY")]
    Scalar {
        #[serde(rename = "@NAME")]
        name: &'a str,
        #[serde(rename = "@TYPE")]
        cim_type: &'a str,
        #[serde(rename = "VALUE")]
        value: &'a str,
    },
    #[serde(rename = "PROPERTY.ARRAY")]
    Array {
        #[serde(rename = "@NAME")]
        name: &'a str,
        #[serde(rename = "@TYPE")]
        cim_type: &'a str,
        #[serde(rename = "VALUE.ARRAY")]
        values: ValueArray<'a>,
    },
}

#[derive(Serialize)]
struct ValueArray<'a> {
    #[serde(rename = "VALUE")]
    values: &'a [String],
}

impl Instance {
    /// An empty instance of `class`.
    pub fn new(class: &str) -> Self {
        Self { class: class.to_owned(), properties: Vec::new() }
    }

    /// Sets a scalar.
    pub fn set(&mut self, name: &str, cim_type: &str, value: impl Into<String>) -> &mut Self {
        self.properties.retain(|p| p.name != name);
        self.properties.push(Property {
            name: name.to_owned(),
            cim_type: cim_type.to_owned(),
            values: vec![value.into()],
            array: false,
        });
        self
    }

    /// Sets an array.
    pub fn set_array(&mut self, name: &str, cim_type: &str, values: Vec<String>) -> &mut Self {
        self.properties.retain(|p| p.name != name);
        self.properties.push(Property {
            name: name.to_owned(),
            cim_type: cim_type.to_owned(),
            values,
            array: true,
        });
        self
    }

    /// A scalar's value (the first of an array).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|p| p.name == name).and_then(|p| p.values.first()).map(String::as_str)
    }

    /// All values of a property.
    pub fn all(&self, name: &str) -> &[String] {
        self.properties.iter().find(|p| p.name == name).map_or(&[], |p| p.values.as_slice())
    }

    /// A number.
    pub fn num(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| v.trim().parse().ok())
    }

    /// The CIM-XML `INSTANCE` text.
    pub fn to_cim_xml(&self) -> String {
        let properties = self
            .properties
            .iter()
            .map(|p| {
                if p.array {
                    PropertyXml::Array {
                        name: &p.name,
                        cim_type: &p.cim_type,
                        values: ValueArray { values: &p.values },
                    }
                } else {
                    PropertyXml::Scalar {
                        name: &p.name,
                        cim_type: &p.cim_type,
                        value: p.values.first().map_or("", String::as_str),
                    }
                }
            })
            .collect();
        quick_xml::se::to_string_with_root("INSTANCE", &InstanceXml { class: &self.class, properties })
            .unwrap_or_default()
    }

    /// Reads an instance element of a WS-Management answer.
    pub fn from_wsman(node: roxmltree::Node<'_, '_>) -> Self {
        let mut me = Self::new(node.tag_name().name());
        for child in node.children().filter(|c| c.is_element()) {
            let name = child.tag_name().name();
            let nil = child.attribute((crate::wsman::XSI, "nil")) == Some("true");
            // Datetimes and intervals come wrapped (`cim:Datetime`).
            let text = match child.children().find(|c| c.is_element()) {
                Some(inner) => inner.text().unwrap_or_default(),
                None => child.text().unwrap_or_default(),
            };
            match me.properties.iter_mut().find(|p| p.name == name) {
                Some(p) => {
                    p.array = true;
                    if !nil {
                        p.values.push(text.to_owned());
                    }
                }
                None => me.properties.push(Property {
                    name: name.to_owned(),
                    cim_type: String::new(),
                    values: if nil { Vec::new() } else { vec![text.to_owned()] },
                    array: false,
                }),
            }
        }
        me
    }
}

impl Instance {
    /// Reads CIM-XML `INSTANCE` text (Hyper-V's embedded results, e.g.
    /// KVP items); None when it is not an instance.
    pub fn from_cim_xml(text: &str) -> Option<Self> {
        let doc = roxmltree::Document::parse(text).ok()?;
        let root = doc.root_element();
        if root.tag_name().name() != "INSTANCE" {
            return None;
        }
        let mut me = Self::new(root.attribute("CLASSNAME")?);
        for p in root.children().filter(|c| c.is_element()) {
            let name = p.attribute("NAME").unwrap_or_default();
            let cim_type = p.attribute("TYPE").unwrap_or_default();
            match p.tag_name().name() {
                "PROPERTY" => {
                    let value =
                        p.children().find(|v| v.has_tag_name("VALUE")).map(|v| v.text().unwrap_or_default());
                    me.properties.push(Property {
                        name: name.to_owned(),
                        cim_type: cim_type.to_owned(),
                        values: value.map(|v| vec![v.to_owned()]).unwrap_or_default(),
                        array: false,
                    });
                }
                "PROPERTY.ARRAY" => {
                    let values = p
                        .descendants()
                        .filter(|v| v.has_tag_name("VALUE"))
                        .map(|v| v.text().unwrap_or_default().to_owned())
                        .collect();
                    me.properties.push(Property {
                        name: name.to_owned(),
                        cim_type: cim_type.to_owned(),
                        values,
                        array: true,
                    });
                }
                _ => {}
            }
        }
        Some(me)
    }
}

/// A WMI object path for an embedded instance's `Parent` or
/// `HostResource`: `\\HOST\root\virtualization\v2:Class.Key="value"`, with
/// backslashes in the value doubled.
pub fn object_path(host: &str, class: &str, key: &str, value: &str) -> String {
    format!("\\\\{host}\\root\\virtualization\\v2:{class}.{key}=\"{}\"", value.replace('\\', "\\\\"))
}

/// A WQL string literal: quoted, with `\` and `'` escaped.
pub fn wql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_render_as_cim_xml() {
        let mut i = Instance::new("Msvm_VirtualSystemSettingData");
        i.set("ElementName", "string", "hcp-1 <x>");
        i.set_array("Notes", "string", vec!["a".into(), "b&c".into()]);
        assert_eq!(
            i.to_cim_xml(),
            "<INSTANCE CLASSNAME=\"Msvm_VirtualSystemSettingData\"><PROPERTY NAME=\"ElementName\" TYPE=\"string\">\
             <VALUE>hcp-1 &lt;x&gt;</VALUE></PROPERTY><PROPERTY.ARRAY NAME=\"Notes\" TYPE=\"string\"><VALUE.ARRAY>\
             <VALUE>a</VALUE><VALUE>b&amp;c</VALUE></VALUE.ARRAY></PROPERTY.ARRAY></INSTANCE>"
        );
    }

    #[test]
    fn wsman_instances_read_arrays_nils_and_datetimes() {
        let xml = r#"<p:Msvm_ComputerSystem xmlns:p="u" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
            <p:ElementName>hcp-1</p:ElementName><p:EnabledState>2</p:EnabledState>
            <p:OperationalStatus>2</p:OperationalStatus><p:OperationalStatus>32768</p:OperationalStatus>
            <p:InstallDate><cim:Datetime>2026-11-26T10:00:00Z</cim:Datetime></p:InstallDate>
            <p:OtherEnabledState xsi:nil="true"/></p:Msvm_ComputerSystem>"#;
        let doc = roxmltree::Document::parse(xml).unwrap();
        let i = Instance::from_wsman(doc.root_element());
        assert_eq!(i.class, "Msvm_ComputerSystem");
        assert_eq!(i.num("EnabledState"), Some(2));
        assert_eq!(i.all("OperationalStatus"), ["2", "32768"]);
        assert_eq!(i.get("InstallDate"), Some("2026-11-26T10:00:00Z"));
        assert_eq!(i.get("OtherEnabledState"), None);
    }

    #[test]
    fn embedded_results_read_back() {
        let mut i = Instance::new("Msvm_KvpExchangeDataItem");
        i.set("Name", "string", "NetworkAddressIPv4").set("Data", "string", "10.0.0.5;10.0.0.6");
        let back = Instance::from_cim_xml(&i.to_cim_xml()).unwrap();
        assert_eq!(back.get("Name"), Some("NetworkAddressIPv4"));
        assert_eq!(back.get("Data"), Some("10.0.0.5;10.0.0.6"));
        assert!(Instance::from_cim_xml("<p:Msvm_X xmlns:p=\"u\"/>").is_none());
    }

    #[test]
    fn paths_and_literals_escape_backslashes() {
        assert_eq!(
            object_path("HV1", "Msvm_ResourceAllocationSettingData", "InstanceID", "Microsoft:G\\X"),
            "\\\\HV1\\root\\virtualization\\v2:Msvm_ResourceAllocationSettingData.InstanceID=\"Microsoft:G\\\\X\""
        );
        assert_eq!(wql_literal("it's a\\b"), "'it\\'s a\\\\b'");
    }
}
