//! The class catalogue: the part of `root/virtualization/v2` the simulator
//! serves, written as simplified MOF in `catalog.mof` (the syntax blocks of
//! Microsoft's `hyperv_v2` class pages, with keys, the class hierarchy and
//! the methods' signatures) and parsed here once. Everything the simulator checks about names and types (
//! selectors, WQL properties, method parameters, embedded instances) is
//! looked up here, so a class or a parameter the catalogue does not know is
//! refused the way a host refuses it.
//!
//! The hierarchy follows the MOF `class X : Parent` lines of the docs, not
//! the names: `Msvm_ProcessorSettingData` and `Msvm_MemorySettingData`
//! derive from `CIM_ResourceAllocationSettingData` directly, so a query for
//! `Msvm_ResourceAllocationSettingData` does not return them;
//! `Msvm_SyntheticEthernetPortSettingData` derives from
//! `CIM_EthernetPortAllocationSettingData`, a sibling of
//! `Msvm_EthernetPortAllocationSettingData`, not a subclass of it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// A CIM type of a property or a method parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CimType {
    String,
    Boolean,
    Uint8,
    Sint8,
    Uint16,
    Uint32,
    Uint64,
    Datetime,
    /// A reference to an instance of the class (or a subclass).
    Ref(String),
}

impl CimType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "string" => Self::String,
            "boolean" => Self::Boolean,
            "uint8" => Self::Uint8,
            "sint8" => Self::Sint8,
            "uint16" => Self::Uint16,
            "uint32" => Self::Uint32,
            "uint64" => Self::Uint64,
            "datetime" => Self::Datetime,
            _ => return None,
        })
    }

    /// The name CIM-XML uses in `TYPE="..."`.
    pub(crate) fn cim_name(&self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Boolean => "boolean",
            Self::Uint8 => "uint8",
            Self::Sint8 => "sint8",
            Self::Uint16 => "uint16",
            Self::Uint32 => "uint32",
            Self::Uint64 => "uint64",
            Self::Datetime => "datetime",
            Self::Ref(_) => "reference",
        }
    }

    /// Checks a scalar's lexical form (XML Schema / CIM), for method
    /// parameters and embedded properties.
    pub(crate) fn check_lexical(&self, text: &str) -> Result<(), LexicalError> {
        let t = text.trim();
        let text = || text.to_owned();
        let range = |max: u64| -> Result<(), LexicalError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(LexicalError::NotUnsigned { text: text() });
            }
            match t.parse::<u64>() {
                Ok(v) if v <= max => Ok(()),
                _ => Err(LexicalError::OutOfRange { text: text(), ty: self.cim_name() }),
            }
        };
        match self {
            Self::String | Self::Ref(_) => Ok(()),
            Self::Boolean => match t {
                "true" | "false" | "1" | "0" => Ok(()),
                _ => Err(LexicalError::NotBoolean { text: text() }),
            },
            Self::Uint8 => range(u8::MAX.into()),
            Self::Uint16 => range(u16::MAX.into()),
            Self::Uint32 => range(u32::MAX.into()),
            Self::Uint64 => range(u64::MAX),
            Self::Sint8 => {
                t.parse::<i8>().map(|_| ()).map_err(|source| LexicalError::NotSint8 { text: text(), source })
            }
            Self::Datetime => {
                if crate::model::parse_cim_datetime(t) {
                    Ok(())
                } else {
                    Err(LexicalError::NotDatetime { text: text() })
                }
            }
        }
    }
}

/// Why a scalar's text is not of its CIM type (the caller names the
/// property or parameter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LexicalError {
    /// Not digits only, for an unsigned type.
    #[error("'{text}' is not an unsigned integer")]
    NotUnsigned {
        /// The text as sent.
        text: String,
    },
    /// Digits, but too large for the type.
    #[error("'{text}' is out of range for {ty}")]
    OutOfRange {
        /// The text as sent.
        text: String,
        /// The CIM type's name.
        ty: &'static str,
    },
    /// Not one of `xs:boolean`'s four forms.
    #[error("'{text}' is not an xs:boolean (true, false, 1, 0)")]
    NotBoolean {
        /// The text as sent.
        text: String,
    },
    /// Not a signed 8-bit integer.
    #[error("'{text}' is not a sint8")]
    NotSint8 {
        /// The text as sent.
        text: String,
        /// Why it does not parse.
        #[source]
        source: std::num::ParseIntError,
    },
    /// Neither a CIM timestamp nor an interval.
    #[error("'{text}' is not a CIM datetime (yyyymmddHHMMSS.mmmmmm+UUU or an interval)")]
    NotDatetime {
        /// The text as sent.
        text: String,
    },
}

/// A property of a class.
#[derive(Debug, Clone)]
pub(crate) struct PropDef {
    pub(crate) name: String,
    pub(crate) ty: CimType,
    pub(crate) array: bool,
}

/// A method parameter.
#[derive(Debug, Clone)]
pub(crate) struct ParamDef {
    pub(crate) name: String,
    pub(crate) ty: CimType,
    pub(crate) array: bool,
    pub(crate) input: bool,
    pub(crate) output: bool,
    /// The host refuses a call without it.
    pub(crate) required: bool,
    /// The string carries an embedded instance of this class (or a
    /// subclass).
    pub(crate) embedded: Option<String>,
}

/// A method of a class.
#[derive(Debug, Clone)]
pub(crate) struct MethodDef {
    pub(crate) name: String,
    pub(crate) params: Vec<ParamDef>,
}

/// A class.
#[derive(Debug, Clone)]
pub(crate) struct ClassDef {
    pub(crate) name: String,
    pub(crate) parent: Option<String>,
    pub(crate) keys: Vec<String>,
    pub(crate) props: Vec<PropDef>,
    pub(crate) methods: Vec<MethodDef>,
    /// An association (its properties are references).
    pub(crate) association: bool,
    /// Only ever seen embedded in strings (`[AMENDMENT]` classes without a
    /// provider): no instances, no resource URI of its own.
    pub(crate) embedded_only: bool,
    /// The WMI namespace it is served from.
    pub(crate) namespace: Namespace,
}

/// The WMI namespaces the simulator serves: `root/virtualization/v2`, and
/// of `root/cimv2` only `CIM_DataFile` (volume files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Namespace {
    /// `root/virtualization/v2`.
    V2,
    /// `root/cimv2`.
    Cimv2,
}

impl ClassDef {
    pub(crate) fn prop(&self, name: &str) -> Option<&PropDef> {
        self.props.iter().find(|p| p.name == name)
    }

    pub(crate) fn method(&self, name: &str) -> Option<&MethodDef> {
        self.methods.iter().find(|m| m.name == name)
    }
}

/// All classes by name.
#[derive(Debug)]
pub(crate) struct Catalog {
    classes: BTreeMap<String, ClassDef>,
}

impl Catalog {
    /// The catalogue (parsed once).
    pub(crate) fn get() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| parse(MOF).expect("the built-in catalogue parses"))
    }

    /// A class by exact name.
    pub(crate) fn class(&self, name: &str) -> Option<&ClassDef> {
        self.classes.get(name)
    }

    /// A class by name, ignoring case (WQL and resource URIs are not case
    /// sensitive; XML element names are).
    pub(crate) fn class_nocase(&self, name: &str) -> Option<&ClassDef> {
        self.classes.get(name).or_else(|| self.classes.values().find(|c| c.name.eq_ignore_ascii_case(name)))
    }

    /// Whether `class` is `ancestor` or derives from it.
    pub(crate) fn is_a(&self, class: &str, ancestor: &str) -> bool {
        let mut cur = Some(class.to_owned());
        while let Some(c) = cur {
            if c.eq_ignore_ascii_case(ancestor) {
                return true;
            }
            cur = self.classes.get(&c).and_then(|d| d.parent.clone());
        }
        false
    }
}

#[derive(Debug, thiserror::Error)]
#[error("catalogue line {line}: {msg}")]
pub(crate) struct CatalogError {
    line: usize,
    msg: String,
}

fn parse(text: &str) -> Result<Catalog, CatalogError> {
    let mut classes: BTreeMap<String, ClassDef> = BTreeMap::new();
    let mut current: Option<ClassDef> = None;
    let err = |line: usize, msg: &str| CatalogError { line, msg: msg.to_owned() };
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = l.split_whitespace().collect();
        match words[0] {
            "class" => {
                if let Some(c) = current.take() {
                    classes.insert(c.name.clone(), c);
                }
                let name = words.get(1).ok_or_else(|| err(line, "class without a name"))?;
                let mut c = ClassDef {
                    name: (*name).to_owned(),
                    parent: None,
                    keys: Vec::new(),
                    props: Vec::new(),
                    methods: Vec::new(),
                    association: false,
                    embedded_only: false,
                    namespace: Namespace::V2,
                };
                let mut rest = words[2..].iter();
                while let Some(w) = rest.next() {
                    match *w {
                        ":" => c.parent = rest.next().map(|s| (*s).to_owned()),
                        "key" => {
                            c.keys.extend(rest.by_ref().take_while(|w| **w != ";").map(|s| (*s).to_owned()))
                        }
                        "association" => c.association = true,
                        "embedded" => c.embedded_only = true,
                        "cimv2" => c.namespace = Namespace::Cimv2,
                        other => return Err(err(line, &format!("unexpected '{other}'"))),
                    }
                }
                current = Some(c);
            }
            "method" => {
                let c = current.as_mut().ok_or_else(|| err(line, "method outside a class"))?;
                let name = words.get(1).ok_or_else(|| err(line, "method without a name"))?;
                c.methods.push(MethodDef { name: (*name).to_owned(), params: Vec::new() });
            }
            "in" | "out" | "inout" => {
                let c = current.as_mut().ok_or_else(|| err(line, "parameter outside a class"))?;
                let m = c.methods.last_mut().ok_or_else(|| err(line, "parameter outside a method"))?;
                let (ty, name, rest) =
                    type_and_name(&words[1..]).ok_or_else(|| err(line, "bad parameter"))?;
                let (name, array) = array_name(name);
                let mut p = ParamDef {
                    name,
                    ty,
                    array,
                    input: words[0] != "out",
                    output: words[0] != "in",
                    required: false,
                    embedded: None,
                };
                let mut rest = rest.iter();
                while let Some(w) = rest.next() {
                    match *w {
                        "required" => p.required = true,
                        "embedded" => p.embedded = rest.next().map(|s| (*s).to_owned()),
                        other => return Err(err(line, &format!("unexpected '{other}'"))),
                    }
                }
                m.params.push(p);
            }
            _ => {
                let c = current.as_mut().ok_or_else(|| err(line, "property outside a class"))?;
                let (ty, name, rest) = type_and_name(&words).ok_or_else(|| err(line, "bad property"))?;
                if !rest.is_empty() {
                    return Err(err(line, "trailing words after a property"));
                }
                let (name, array) = array_name(name);
                c.props.push(PropDef { name, ty, array });
            }
        }
    }
    if let Some(c) = current.take() {
        classes.insert(c.name.clone(), c);
    }
    for c in classes.values() {
        for k in &c.keys {
            if c.prop(k).is_none() {
                return Err(err(0, &format!("{}: key {k} is not a property", c.name)));
            }
        }
    }
    Ok(Catalog { classes })
}

fn type_and_name<'a>(words: &'a [&'a str]) -> Option<(CimType, &'a str, &'a [&'a str])> {
    if words.first() == Some(&"ref") {
        let class = words.get(1)?;
        let name = words.get(2)?;
        return Some((CimType::Ref((*class).to_owned()), name, &words[3..]));
    }
    let ty = CimType::parse(words.first()?)?;
    Some((ty, words.get(1)?, &words[2..]))
}

fn array_name(name: &str) -> (String, bool) {
    match name.strip_suffix("[]") {
        Some(n) => (n.to_owned(), true),
        None => (name.to_owned(), false),
    }
}

/// The classes (`catalog.mof` says its syntax). Property lists and method
/// signatures are those of the `hyperv_v2` pages (MicrosoftDocs/win32,
/// `desktop-src/HyperV_v2`); CIM superclasses appear only to give the
/// hierarchy.
const MOF: &str = include_str!("catalog.mof");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchy_follows_the_mof_lines_not_the_names() {
        let c = Catalog::get();
        let check = |class: &str, ancestor: &str, expected: bool| {
            assert_eq!(c.is_a(class, ancestor), expected, "{class} is a {ancestor}");
        };
        check("Msvm_ProcessorSettingData", "CIM_ResourceAllocationSettingData", true);
        check("Msvm_ProcessorSettingData", "Msvm_ResourceAllocationSettingData", false);
        check("Msvm_MemorySettingData", "Msvm_ResourceAllocationSettingData", false);
        check("Msvm_StorageAllocationSettingData", "CIM_ResourceAllocationSettingData", true);
        check("Msvm_SyntheticEthernetPortSettingData", "Msvm_EthernetPortAllocationSettingData", false);
        check("Msvm_SyntheticEthernetPortSettingData", "CIM_EthernetPortAllocationSettingData", true);
        check("Msvm_ComputerSystem", "CIM_System", true);
        check("Msvm_VirtualEthernetSwitch", "Msvm_ComputerSystem", false);
    }

    #[test]
    fn keys_and_methods_are_known() {
        let c = Catalog::get();
        assert_eq!(c.class("Msvm_ShutdownComponent").unwrap().keys.len(), 4);
        let m =
            c.class("Msvm_VirtualSystemManagementService").unwrap().method("AddResourceSettings").unwrap();
        let rs = m.params.iter().find(|p| p.name == "ResourceSettings").unwrap();
        assert!(rs.array && rs.input && rs.required);
        assert_eq!(rs.embedded.as_deref(), Some("CIM_ResourceAllocationSettingData"));
        assert!(c.class_nocase("msvm_computersystem").is_some());
    }

    #[test]
    fn lexical_forms() {
        assert!(CimType::Uint16.check_lexical("65535").is_ok());
        assert!(CimType::Uint16.check_lexical("65536").is_err());
        assert!(CimType::Uint16.check_lexical("-1").is_err());
        assert!(CimType::Boolean.check_lexical("false").is_ok());
        assert!(CimType::Boolean.check_lexical("False").is_err());
        assert!(CimType::Uint64.check_lexical("12a").is_err());
        assert!(CimType::Datetime.check_lexical("20240102030405.000000+000").is_ok());
        assert!(CimType::Datetime.check_lexical("2024-01-02T03:04:05Z").is_err());
    }
}
