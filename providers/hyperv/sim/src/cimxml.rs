//! Embedded instances in string parameters: CIM-XML (DSP0201) `<INSTANCE
//! CLASSNAME="...">` text with `PROPERTY`/`PROPERTY.ARRAY` children, as
//! libvirt, os-win and Microsoft's samples send them (the parameter's text,
//! XML-escaped or in CDATA). Checked against the catalogue: the class must
//! be the expected one or a subclass, every property must exist with the
//! MOF's type and array-ness, and values must have their type's lexical
//! form.

use std::collections::BTreeMap;

use crate::catalog::{Catalog, CimType};

/// A property value in an embedded instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EmbVal {
    Null,
    Scalar(String),
    Array(Vec<String>),
}

/// An embedded instance, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Embedded {
    pub(crate) class: String,
    pub(crate) props: BTreeMap<String, EmbVal>,
}

impl Embedded {
    /// A scalar property, `None` when absent or null.
    pub(crate) fn scalar(&self, name: &str) -> Option<&str> {
        match self.props.get(name) {
            Some(EmbVal::Scalar(s)) => Some(s),
            _ => None,
        }
    }

    /// An array property (empty when absent or null).
    pub(crate) fn array(&self, name: &str) -> Vec<String> {
        match self.props.get(name) {
            Some(EmbVal::Array(v)) => v.clone(),
            _ => Vec::new(),
        }
    }

    /// Whether the property is present (null or not).
    pub(crate) fn has(&self, name: &str) -> bool {
        self.props.contains_key(name)
    }

    /// An unsigned property.
    pub(crate) fn uint(&self, name: &str) -> Option<u64> {
        self.scalar(name).and_then(|s| s.trim().parse().ok())
    }

    /// A boolean property.
    pub(crate) fn boolean(&self, name: &str) -> Option<bool> {
        self.scalar(name).map(|s| matches!(s.trim(), "true" | "1"))
    }
}

/// Why an embedded instance was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EmbedError {
    /// Not CIM-XML at all: e.g. a WS-CIM element tree (the host answers
    /// `w:SchemaValidationError`).
    NotCimXml(String),
    /// CIM-XML that does not fit the class (the method answers Invalid
    /// Parameter).
    Invalid(String),
}

impl std::fmt::Display for EmbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotCimXml(m) | Self::Invalid(m) => f.write_str(m),
        }
    }
}

/// Parses and checks an embedded instance that must be `expected` or a
/// subclass of it.
pub(crate) fn parse(text: &str, expected: &str) -> Result<Embedded, EmbedError> {
    let doc = roxmltree::Document::parse(text.trim())
        .map_err(|e| EmbedError::NotCimXml(format!("the embedded instance is not XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "INSTANCE" || root.tag_name().namespace().is_some() {
        return Err(EmbedError::NotCimXml(format!(
            "the embedded text is a <{}> element, not a CIM-XML <INSTANCE>",
            root.tag_name().name()
        )));
    }
    let catalog = Catalog::get();
    let class_name = root
        .attribute("CLASSNAME")
        .ok_or_else(|| EmbedError::Invalid("INSTANCE without CLASSNAME".into()))?;
    let def = catalog
        .class(class_name)
        .ok_or_else(|| EmbedError::Invalid(format!("the embedded class {class_name} does not exist")))?;
    if !catalog.is_a(&def.name, expected) {
        return Err(EmbedError::Invalid(format!("the embedded class {class_name} is not a {expected}")));
    }
    let mut props = BTreeMap::new();
    for child in root.children().filter(roxmltree::Node::is_element) {
        let tag = child.tag_name().name();
        if tag == "QUALIFIER" {
            continue;
        }
        let array = match tag {
            "PROPERTY" => false,
            "PROPERTY.ARRAY" => true,
            "PROPERTY.REFERENCE" => {
                return Err(EmbedError::Invalid("PROPERTY.REFERENCE is not simulated".into()));
            }
            other => return Err(EmbedError::Invalid(format!("unexpected <{other}> in INSTANCE"))),
        };
        let name =
            child.attribute("NAME").ok_or_else(|| EmbedError::Invalid(format!("{tag} without NAME")))?;
        let p = def
            .prop(name)
            .ok_or_else(|| EmbedError::Invalid(format!("{class_name} has no property {name}")))?;
        if p.array != array {
            return Err(EmbedError::Invalid(format!(
                "{class_name}.{name} is {}an array but was sent as {tag}",
                if p.array { "" } else { "not " }
            )));
        }
        let ty =
            child.attribute("TYPE").ok_or_else(|| EmbedError::Invalid(format!("{name} without TYPE")))?;
        if !ty.eq_ignore_ascii_case(p.ty.cim_name()) || matches!(p.ty, CimType::Ref(_)) {
            return Err(EmbedError::Invalid(format!(
                "{class_name}.{name} is {} but was sent as {ty}",
                p.ty.cim_name()
            )));
        }
        let value = if array {
            match child.children().find(|c| c.is_element() && c.tag_name().name() == "VALUE.ARRAY") {
                None => EmbVal::Null,
                Some(va) => {
                    let mut items = Vec::new();
                    for v in va.children().filter(roxmltree::Node::is_element) {
                        if v.tag_name().name() != "VALUE" {
                            return Err(EmbedError::Invalid(format!(
                                "unexpected <{}> in VALUE.ARRAY",
                                v.tag_name().name()
                            )));
                        }
                        let text = v.text().unwrap_or("");
                        p.ty.check_lexical(text).map_err(|e| EmbedError::Invalid(format!("{name}: {e}")))?;
                        items.push(text.to_owned());
                    }
                    EmbVal::Array(items)
                }
            }
        } else {
            match child.children().find(|c| c.is_element() && c.tag_name().name() == "VALUE") {
                None => EmbVal::Null,
                Some(v) => {
                    let text = v.text().unwrap_or("");
                    if !(text.is_empty() && p.ty == CimType::String) {
                        p.ty.check_lexical(text).map_err(|e| EmbedError::Invalid(format!("{name}: {e}")))?;
                    }
                    EmbVal::Scalar(text.to_owned())
                }
            }
        };
        if props.insert(name.to_owned(), value).is_some() {
            return Err(EmbedError::Invalid(format!("{name} appears twice")));
        }
    }
    Ok(Embedded { class: def.name.clone(), props })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_shape_parses() {
        let text = r#"<INSTANCE CLASSNAME="Msvm_StorageAllocationSettingData"><PROPERTY NAME="ResourceType" TYPE="uint16"><VALUE>31</VALUE></PROPERTY><PROPERTY.ARRAY NAME="HostResource" TYPE="string"><VALUE.ARRAY><VALUE>C:\x.vhdx</VALUE></VALUE.ARRAY></PROPERTY.ARRAY></INSTANCE>"#;
        let e = parse(text, "CIM_ResourceAllocationSettingData").unwrap();
        assert_eq!(e.uint("ResourceType"), Some(31));
        assert_eq!(e.array("HostResource"), vec!["C:\\x.vhdx".to_owned()]);
    }

    #[test]
    fn refusals() {
        let check = |text: &str, expected: &str, schema: bool| {
            let err = parse(text, expected).unwrap_err();
            assert_eq!(matches!(err, EmbedError::NotCimXml(_)), schema, "{text}: {err}");
        };
        check(
            r#"<p:Msvm_VirtualSystemSettingData xmlns:p="http://x"><p:ElementName>a</p:ElementName></p:Msvm_VirtualSystemSettingData>"#,
            "Msvm_VirtualSystemSettingData",
            true,
        );
        check("not xml", "Msvm_VirtualSystemSettingData", true);
        check(
            r#"<INSTANCE CLASSNAME="Msvm_VirtualSystemSettingData"><PROPERTY NAME="Nope" TYPE="string"/></INSTANCE>"#,
            "Msvm_VirtualSystemSettingData",
            false,
        );
        check(
            r#"<INSTANCE CLASSNAME="Msvm_ProcessorSettingData"><PROPERTY NAME="VirtualQuantity" TYPE="uint16"><VALUE>2</VALUE></PROPERTY></INSTANCE>"#,
            "CIM_ResourceAllocationSettingData",
            false,
        );
        check(
            r#"<INSTANCE CLASSNAME="Msvm_ProcessorSettingData"><PROPERTY NAME="VirtualQuantity" TYPE="uint64"><VALUE>two</VALUE></PROPERTY></INSTANCE>"#,
            "CIM_ResourceAllocationSettingData",
            false,
        );
        check(
            r#"<INSTANCE CLASSNAME="Msvm_ProcessorSettingData"></INSTANCE>"#,
            "Msvm_VirtualSystemSettingData",
            false,
        );
        check(
            r#"<INSTANCE CLASSNAME="Msvm_VirtualSystemSettingData"><PROPERTY NAME="Notes" TYPE="string"><VALUE>x</VALUE></PROPERTY></INSTANCE>"#,
            "Msvm_VirtualSystemSettingData",
            false,
        );
    }
}
