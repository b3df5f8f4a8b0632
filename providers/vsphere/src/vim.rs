//! The vim25 types HCP uses: requests as serde structs (rendered by
//! quick-xml in the element order the vim25 schema requires), answers read
//! from an owned XML tree into typed values. Only the methods and
//! properties the provider calls are here.

use serde::Serialize;

use crate::soap::VimError;

/// The XML Schema instance namespace (`xsi:type`).
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// An owned XML element: name, `xsi:type`, `type` attribute (morefs),
/// text and children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Xml {
    /// Local name.
    pub name: String,
    /// `xsi:type` without its prefix.
    pub xsi_type: Option<String>,
    /// The `type` attribute (a managed object reference's type).
    pub type_attr: Option<String>,
    /// The element's own text.
    pub text: String,
    /// Child elements.
    pub children: Vec<Xml>,
}

impl Xml {
    /// Copies a roxmltree node.
    pub fn of(node: roxmltree::Node<'_, '_>) -> Self {
        Self {
            name: node.tag_name().name().to_owned(),
            xsi_type: node.attribute((XSI, "type")).map(|t| t.rsplit(':').next().unwrap_or(t).to_owned()),
            type_attr: node.attribute("type").map(str::to_owned),
            text: node.children().filter(|c| c.is_text()).filter_map(|c| c.text()).collect::<String>(),
            children: node.children().filter(|c| c.is_element()).map(Self::of).collect(),
        }
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Xml> {
        self.children.iter().find(|c| c.name == name)
    }

    /// All children named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Xml> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the child `name`, empty when absent.
    pub fn text_of(&self, name: &str) -> &str {
        self.child(name).map_or("", |c| c.text.as_str())
    }

    /// The child `name` as a number.
    pub fn num_of<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.child(name).and_then(|c| c.text.trim().parse().ok())
    }

    /// The child `name` as a moref.
    pub fn moref_of(&self, name: &str) -> Option<MoRef> {
        self.child(name).and_then(|c| MoRef::from_xml(c).ok())
    }

    /// Back to XML under the name `as_name` (for data passed back to
    /// vSphere as it came): `xsi:type`s of XML Schema's own types get the
    /// `xsd:` prefix, vim25's stay unprefixed (the default namespace).
    pub fn render(&self, as_name: &str) -> String {
        let mut out = String::new();
        self.render_into(as_name, &mut out);
        out
    }

    fn render_into(&self, name: &str, out: &mut String) {
        out.push('<');
        out.push_str(name);
        if let Some(t) = &self.xsi_type {
            let xsd = matches!(
                t.as_str(),
                "string"
                    | "int"
                    | "long"
                    | "short"
                    | "byte"
                    | "boolean"
                    | "float"
                    | "double"
                    | "dateTime"
                    | "base64Binary"
                    | "anyURI"
            );
            out.push_str(&format!(" xsi:type=\"{}{}\"", if xsd { "xsd:" } else { "" }, escape(t)));
        }
        if let Some(t) = &self.type_attr {
            out.push_str(&format!(" type=\"{}\"", escape(t)));
        }
        out.push('>');
        if self.children.is_empty() {
            out.push_str(&escape(&self.text));
        }
        for c in &self.children {
            c.render_into(&c.name, out);
        }
        out.push_str(&format!("</{name}>"));
    }
}

/// Text or an attribute value escaped for XML.
pub fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

impl MoRef {
    /// The reference as the element `name`.
    pub fn render(&self, name: &str) -> String {
        format!("<{name} type=\"{}\">{}</{name}>", escape(&self.kind), escape(&self.value))
    }
}

impl FromXml for Xml {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        Ok(x.clone())
    }
}

/// Why an answer could not be read into vim25 types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The answer is not well-formed XML (roxmltree says where).
    #[error(transparent)]
    Xml(#[from] roxmltree::Error),
    /// The answer's bytes are not UTF-8.
    #[error("{method}: the answer is not UTF-8")]
    NotUtf8 {
        /// The method called.
        method: String,
        /// Where the bytes stop being UTF-8.
        #[source]
        source: std::str::Utf8Error,
    },
    /// The envelope has no `Body`.
    #[error("no SOAP body")]
    NoBody,
    /// The `Body` has no response element.
    #[error("empty SOAP body")]
    EmptyBody,
    /// `Login` answered without setting the session cookie.
    #[error("Login set no session cookie")]
    NoSessionCookie,
    /// A method that returns a value answered without a `returnval`.
    #[error("the answer has no returnval")]
    NoReturnval,
    /// An element read as a managed object reference has no `type`.
    #[error("{element} is not a moref")]
    NotMoRef {
        /// The element's local name.
        element: String,
    },
    /// A required child element is absent.
    #[error("{parent} without {child}")]
    Missing {
        /// What was being read (`service content`, `objects`).
        parent: &'static str,
        /// The absent element's name.
        child: &'static str,
    },
    /// A child element's value is not of its type.
    #[error("{parent}: {child} {value:?} is not valid")]
    Invalid {
        /// What was being read.
        parent: &'static str,
        /// The element's name.
        child: &'static str,
        /// Its text.
        value: String,
    },
}

/// Decoding from an answer.
pub trait FromXml: Sized {
    /// From one element.
    fn from_xml(x: &Xml) -> Result<Self, DecodeError>;

    /// From a response's `returnval` elements (most methods return one).
    fn from_returnvals(nodes: Vec<roxmltree::Node<'_, '_>>) -> Result<Self, DecodeError> {
        match nodes.first() {
            Some(n) => Self::from_xml(&Xml::of(*n)),
            None => Err(DecodeError::NoReturnval),
        }
    }
}

impl<T: FromXml> FromXml for Option<T> {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        T::from_xml(x).map(Some)
    }

    fn from_returnvals(nodes: Vec<roxmltree::Node<'_, '_>>) -> Result<Self, DecodeError> {
        if nodes.is_empty() { Ok(None) } else { T::from_returnvals(nodes).map(Some) }
    }
}

/// Methods without a result.
#[derive(Debug)]
pub struct Nothing;

impl FromXml for Nothing {
    fn from_xml(_: &Xml) -> Result<Self, DecodeError> {
        Ok(Self)
    }

    fn from_returnvals(_: Vec<roxmltree::Node<'_, '_>>) -> Result<Self, DecodeError> {
        Ok(Self)
    }
}

/// A managed object reference: `<x type="VirtualMachine">vm-42</x>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct MoRef {
    /// The managed object type.
    #[serde(rename = "@type")]
    pub kind: String,
    /// Its id (the moid).
    #[serde(rename = "$text")]
    pub value: String,
}

impl MoRef {
    /// A reference.
    pub fn new(kind: &str, value: &str) -> Self {
        Self { kind: kind.to_owned(), value: value.to_owned() }
    }
}

impl FromXml for MoRef {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        let kind = x.type_attr.clone().ok_or_else(|| DecodeError::NotMoRef { element: x.name.clone() })?;
        Ok(Self { kind, value: x.text.trim().to_owned() })
    }
}

/// What `RetrieveServiceContent` says (the parts HCP uses).
#[derive(Debug, Clone)]
pub struct ServiceContent {
    /// The inventory root.
    pub root_folder: MoRef,
    /// The session's property collector.
    pub property_collector: MoRef,
    /// Container views.
    pub view_manager: MoRef,
    /// Inventory paths and UUID lookups.
    pub search_index: MoRef,
    /// Login.
    pub session_manager: MoRef,
    /// Datastore folders and files (volumes' folder).
    pub file_manager: Option<MoRef>,
    /// OVF descriptors to import specs (image import).
    pub ovf_manager: Option<MoRef>,
    /// Virtual disk files (volumes).
    pub virtual_disk_manager: Option<MoRef>,
    /// `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// e.g. `6.5`.
    pub api_version: String,
    /// e.g. `VMware vCenter Server 6.5.0 build-5973321`.
    pub full_name: String,
}

impl FromXml for ServiceContent {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        let missing = |child| DecodeError::Missing { parent: "service content", child };
        let m = |n: &'static str| x.moref_of(n).ok_or_else(|| missing(n));
        let about = x.child("about").ok_or_else(|| missing("about"))?;
        Ok(Self {
            root_folder: m("rootFolder")?,
            property_collector: m("propertyCollector")?,
            view_manager: m("viewManager")?,
            search_index: m("searchIndex")?,
            session_manager: m("sessionManager")?,
            file_manager: x.moref_of("fileManager"),
            ovf_manager: x.moref_of("ovfManager"),
            virtual_disk_manager: x.moref_of("virtualDiskManager"),
            api_type: about.text_of("apiType").to_owned(),
            api_version: about.text_of("apiVersion").to_owned(),
            full_name: about.text_of("fullName").to_owned(),
        })
    }
}

// ---- property collector ----

/// `PropertySpec`.
#[derive(Debug, Clone, Serialize)]
pub struct PropertySpec {
    /// Managed object type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Property paths.
    #[serde(rename = "pathSet")]
    pub path_set: Vec<String>,
}

/// `TraversalSpec` (a `SelectionSpec` subtype).
#[derive(Debug, Clone, Serialize)]
pub struct TraversalSpec {
    #[serde(rename = "@xsi:type")]
    xsi_type: &'static str,
    /// The type the path is on.
    #[serde(rename = "type")]
    pub kind: String,
    /// The property to follow.
    pub path: String,
    /// Whether to skip the object found.
    pub skip: bool,
}

/// `ObjectSpec`.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectSpec {
    /// Where to start.
    pub obj: MoRef,
    /// Whether to skip `obj` itself.
    pub skip: bool,
    /// How to go on from it.
    #[serde(rename = "selectSet", skip_serializing_if = "Vec::is_empty")]
    pub select_set: Vec<TraversalSpec>,
}

/// `PropertyFilterSpec`.
#[derive(Debug, Clone, Serialize)]
pub struct PropertyFilterSpec {
    /// What to read.
    #[serde(rename = "propSet")]
    pub prop_set: Vec<PropertySpec>,
    /// Of which objects.
    #[serde(rename = "objectSet")]
    pub object_set: Vec<ObjectSpec>,
}

impl PropertyFilterSpec {
    /// `paths` of one object.
    pub fn one(obj: &MoRef, paths: &[&str]) -> Self {
        Self {
            prop_set: vec![PropertySpec {
                kind: obj.kind.clone(),
                path_set: paths.iter().map(|p| (*p).to_owned()).collect(),
            }],
            object_set: vec![ObjectSpec { obj: obj.clone(), skip: false, select_set: Vec::new() }],
        }
    }

    /// `paths` of every `kind` object in a container view.
    pub fn view(view: &MoRef, kind: &str, paths: &[&str]) -> Self {
        Self {
            prop_set: vec![PropertySpec {
                kind: kind.to_owned(),
                path_set: paths.iter().map(|p| (*p).to_owned()).collect(),
            }],
            object_set: vec![ObjectSpec {
                obj: view.clone(),
                skip: true,
                select_set: vec![TraversalSpec {
                    xsi_type: "TraversalSpec",
                    kind: "ContainerView".to_owned(),
                    path: "view".to_owned(),
                    skip: false,
                }],
            }],
        }
    }
}

/// `RetrieveOptions`.
#[derive(Debug, Clone, Serialize)]
pub struct RetrieveOptions {
    /// Page size.
    #[serde(rename = "maxObjects")]
    pub max_objects: i32,
}

/// `RetrievePropertiesEx`.
#[derive(Debug, Serialize)]
pub struct RetrievePropertiesEx<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "specSet")]
    pub spec_set: Vec<PropertyFilterSpec>,
    pub options: RetrieveOptions,
}

/// `ContinueRetrievePropertiesEx`.
#[derive(Debug, Serialize)]
pub struct ContinueRetrievePropertiesEx<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub token: &'a str,
}

/// One object's properties.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    /// The object.
    pub obj: MoRef,
    /// (path, value).
    pub props: Vec<(String, Xml)>,
}

impl ObjectContent {
    /// The value at `path`.
    pub fn prop(&self, path: &str) -> Option<&Xml> {
        self.props.iter().find(|(n, _)| n == path).map(|(_, v)| v)
    }
}

/// A page of `RetrievePropertiesEx`.
#[derive(Debug, Clone, Default)]
pub struct RetrieveResult {
    /// For `ContinueRetrievePropertiesEx`; None on the last page.
    pub token: Option<String>,
    /// The objects.
    pub objects: Vec<ObjectContent>,
}

impl FromXml for RetrieveResult {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        let token = x.child("token").map(|t| t.text.clone()).filter(|t| !t.is_empty());
        let mut objects = Vec::new();
        for o in x.all("objects") {
            let obj = o.moref_of("obj").ok_or(DecodeError::Missing { parent: "objects", child: "obj" })?;
            let props = o
                .all("propSet")
                .filter_map(|p| Some((p.text_of("name").to_owned(), p.child("val")?.clone())))
                .collect();
            objects.push(ObjectContent { obj, props });
        }
        Ok(Self { token, objects })
    }

    fn from_returnvals(nodes: Vec<roxmltree::Node<'_, '_>>) -> Result<Self, DecodeError> {
        // No returnval: nothing matched.
        match nodes.first() {
            Some(n) => Self::from_xml(&Xml::of(*n)),
            None => Ok(Self::default()),
        }
    }
}

/// `CreateFilter`.
#[derive(Debug, Serialize)]
pub struct CreateFilter<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub spec: PropertyFilterSpec,
    #[serde(rename = "partialUpdates")]
    pub partial_updates: bool,
}

/// `WaitOptions`.
#[derive(Debug, Serialize)]
pub struct WaitOptions {
    #[serde(rename = "maxWaitSeconds")]
    pub max_wait_seconds: i32,
}

/// `WaitForUpdatesEx`.
#[derive(Debug, Serialize)]
pub struct WaitForUpdatesEx<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub version: &'a str,
    pub options: WaitOptions,
}

/// One property change in an update.
#[derive(Debug, Clone)]
pub struct Change {
    /// The property path.
    pub name: String,
    /// `assign`, `modify`, `add`, `remove`...
    pub op: String,
    /// The new value.
    pub val: Option<Xml>,
}

/// An `UpdateSet`.
#[derive(Debug, Clone)]
pub struct UpdateSet {
    /// For the next wait.
    pub version: String,
    changes: Vec<Change>,
}

impl UpdateSet {
    /// Every change, in order.
    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter()
    }
}

impl FromXml for UpdateSet {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        let mut changes = Vec::new();
        for f in x.all("filterSet") {
            for o in f.all("objectSet") {
                for c in o.all("changeSet") {
                    changes.push(Change {
                        name: c.text_of("name").to_owned(),
                        op: c.text_of("op").to_owned(),
                        val: c.child("val").cloned(),
                    });
                }
            }
        }
        Ok(Self { version: x.text_of("version").to_owned(), changes })
    }
}

/// What a task's updates have said so far.
#[derive(Debug, Default)]
pub struct TaskState {
    /// `queued`, `running`, `success`, `error`.
    pub state: Option<String>,
    /// The result (a moref), when the task has one.
    pub result: Option<MoRef>,
    /// The result as it came, for results that are not morefs (a
    /// datastore search's).
    pub result_xml: Option<Xml>,
    /// The fault, when it failed.
    pub error: Option<VimError>,
}

impl TaskState {
    /// Takes in one change of `info.*`.
    pub fn apply(&mut self, c: &Change) {
        match c.name.as_str() {
            "info.state" => self.state = c.val.as_ref().map(|v| v.text.trim().to_owned()),
            "info.result" => {
                self.result = c.val.as_ref().and_then(|v| MoRef::from_xml(v).ok());
                self.result_xml = c.val.clone();
            }
            "info.error" => self.error = c.val.as_ref().map(fault_of),
            "info" => {
                if let Some(v) = &c.val {
                    self.state = v.child("state").map(|s| s.text.trim().to_owned());
                    self.result = v.moref_of("result");
                    self.result_xml = v.child("result").cloned();
                    self.error = v.child("error").map(fault_of);
                }
            }
            _ => {}
        }
    }
}

/// A `LocalizedMethodFault` as an error.
pub fn fault_of(x: &Xml) -> VimError {
    let fault = x.child("fault");
    let kind = fault.and_then(|f| f.xsi_type.clone()).unwrap_or_else(|| "SystemError".to_owned());
    let mut message = x.text_of("localizedMessage").to_owned();
    if message.is_empty() || message.starts_with("*types.") {
        message = format!("the task failed with {kind}");
    }
    VimError::Fault { fault: kind, message }
}

// ---- inventory ----

/// `CreateContainerView`.
#[derive(Debug, Serialize)]
pub struct CreateContainerView<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub container: &'a MoRef,
    #[serde(rename = "type")]
    pub kinds: Vec<&'static str>,
    pub recursive: bool,
}

/// `FindByInventoryPath`.
#[derive(Debug, Serialize)]
pub struct FindByInventoryPath<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "inventoryPath")]
    pub inventory_path: &'a str,
}

/// `FindByUuid` (instance UUIDs of VMs).
#[derive(Debug, Serialize)]
pub struct FindByUuid<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<&'a MoRef>,
    pub uuid: &'a str,
    #[serde(rename = "vmSearch")]
    pub vm_search: bool,
    #[serde(rename = "instanceUuid")]
    pub instance_uuid: bool,
}

// ---- VM configuration ----

/// `Description`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Description {
    pub label: String,
    pub summary: String,
}

/// `SharesInfo`-free `VirtualDeviceConnectInfo`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Connectable {
    #[serde(rename = "startConnected")]
    pub start_connected: bool,
    #[serde(rename = "allowGuestControl")]
    pub allow_guest_control: bool,
    pub connected: bool,
}

/// `DistributedVirtualSwitchPortConnection`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PortConnection {
    #[serde(rename = "switchUuid")]
    pub switch_uuid: String,
    #[serde(rename = "portgroupKey")]
    pub portgroup_key: String,
}

/// A device's backing: a disk file, a standard port group or a
/// distributed port group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Backing {
    #[serde(rename = "@xsi:type")]
    pub xsi_type: String,
    #[serde(rename = "fileName", skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    #[serde(rename = "datastore", skip_serializing_if = "Option::is_none")]
    pub datastore: Option<MoRef>,
    #[serde(rename = "deviceName", skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    #[serde(rename = "network", skip_serializing_if = "Option::is_none")]
    pub network: Option<MoRef>,
    #[serde(rename = "port", skip_serializing_if = "Option::is_none")]
    pub port: Option<PortConnection>,
    #[serde(rename = "diskMode", skip_serializing_if = "Option::is_none")]
    pub disk_mode: Option<String>,
    #[serde(rename = "thinProvisioned", skip_serializing_if = "Option::is_none")]
    pub thin_provisioned: Option<bool>,
}

impl Backing {
    fn from_xml(x: &Xml) -> Self {
        Self {
            xsi_type: x.xsi_type.clone().unwrap_or_default(),
            file_name: x.child("fileName").map(|c| c.text.clone()),
            datastore: x.moref_of("datastore"),
            device_name: x.child("deviceName").map(|c| c.text.clone()),
            network: x.moref_of("network"),
            port: x.child("port").map(|p| PortConnection {
                switch_uuid: p.text_of("switchUuid").to_owned(),
                portgroup_key: p.text_of("portgroupKey").to_owned(),
            }),
            disk_mode: x.child("diskMode").map(|c| c.text.clone()),
            thin_provisioned: x.child("thinProvisioned").map(|c| c.text == "true"),
        }
    }
}

/// A virtual device, as read and as sent in a `deviceChange` (the fields
/// of `VirtualDevice`, `VirtualEthernetCard` and `VirtualDisk` that HCP
/// uses, in schema order).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Device {
    #[serde(rename = "@xsi:type")]
    pub xsi_type: String,
    pub key: i32,
    #[serde(rename = "deviceInfo", skip_serializing_if = "Option::is_none")]
    pub device_info: Option<Description>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<Backing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connectable: Option<Connectable>,
    #[serde(rename = "controllerKey", skip_serializing_if = "Option::is_none")]
    pub controller_key: Option<i32>,
    #[serde(rename = "unitNumber", skip_serializing_if = "Option::is_none")]
    pub unit_number: Option<i32>,
    #[serde(rename = "addressType", skip_serializing_if = "Option::is_none")]
    pub address_type: Option<String>,
    #[serde(rename = "macAddress", skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    #[serde(rename = "capacityInKB", skip_serializing_if = "Option::is_none")]
    pub capacity_kb: Option<i64>,
    #[serde(rename = "capacityInBytes", skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
}

/// The NIC types of vim25 (all extend `VirtualEthernetCard`).
const NIC_TYPES: &[&str] = &[
    "VirtualVmxnet3",
    "VirtualVmxnet2",
    "VirtualVmxnet",
    "VirtualE1000",
    "VirtualE1000e",
    "VirtualPCNet32",
    "VirtualSriovEthernetCard",
];

impl Device {
    /// Reads one element of `config.hardware.device`.
    pub fn from_xml(x: &Xml) -> Self {
        Self {
            xsi_type: x.xsi_type.clone().unwrap_or_default(),
            key: x.num_of("key").unwrap_or_default(),
            device_info: x.child("deviceInfo").map(|d| Description {
                label: d.text_of("label").to_owned(),
                summary: d.text_of("summary").to_owned(),
            }),
            backing: x.child("backing").map(Backing::from_xml),
            connectable: x.child("connectable").map(|c| Connectable {
                start_connected: c.text_of("startConnected") == "true",
                allow_guest_control: c.text_of("allowGuestControl") == "true",
                connected: c.text_of("connected") == "true",
            }),
            controller_key: x.num_of("controllerKey"),
            unit_number: x.num_of("unitNumber"),
            address_type: x.child("addressType").map(|c| c.text.clone()),
            mac_address: x.child("macAddress").map(|c| c.text.to_ascii_lowercase()),
            capacity_kb: x.num_of("capacityInKB"),
            capacity_bytes: x.num_of("capacityInBytes"),
        }
    }

    /// A network card.
    pub fn is_nic(&self) -> bool {
        NIC_TYPES.contains(&self.xsi_type.as_str())
    }

    /// A disk.
    pub fn is_disk(&self) -> bool {
        self.xsi_type == "VirtualDisk"
    }

    /// The disk's size in bytes.
    pub fn disk_bytes(&self) -> i64 {
        self.capacity_bytes.filter(|b| *b > 0).unwrap_or(self.capacity_kb.unwrap_or_default() * 1024)
    }

    /// What a NIC is connected to: the port group's name, or the
    /// distributed port group's key.
    pub fn nic_target(&self) -> Option<&str> {
        let b = self.backing.as_ref()?;
        b.device_name.as_deref().or(b.port.as_ref().map(|p| p.portgroup_key.as_str()))
    }
}

/// `VirtualDeviceConfigSpec`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceChange {
    /// `add`, `remove` or `edit`.
    pub operation: &'static str,
    /// `create`, `destroy` or `replace`; None: the device's file is
    /// neither made nor deleted.
    #[serde(rename = "fileOperation", skip_serializing_if = "Option::is_none")]
    pub file_operation: Option<&'static str>,
    pub device: Device,
}

impl DeviceChange {
    /// A change of the device alone, no file operation.
    pub fn new(operation: &'static str, device: Device) -> Self {
        Self { operation, file_operation: None, device }
    }
}

/// `OptionValue` with a string value.
#[derive(Debug, Clone, Serialize)]
pub struct OptionValue {
    #[serde(rename = "@xsi:type")]
    xsi_type: &'static str,
    pub key: String,
    pub value: StringValue,
}

/// An `xsd:string` in an `anyType` slot.
#[derive(Debug, Clone, Serialize)]
pub struct StringValue {
    #[serde(rename = "@xsi:type")]
    xsi_type: &'static str,
    #[serde(rename = "$text")]
    pub text: String,
}

impl OptionValue {
    /// `key = value`.
    pub fn new(key: &str, value: &str) -> Self {
        Self {
            xsi_type: "OptionValue",
            key: key.to_owned(),
            value: StringValue { xsi_type: "xsd:string", text: value.to_owned() },
        }
    }
}

/// `VirtualMachineConfigSpec` (the fields HCP sets, in schema order).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigSpec {
    #[serde(rename = "instanceUuid", skip_serializing_if = "Option::is_none")]
    pub instance_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
    #[serde(rename = "numCPUs", skip_serializing_if = "Option::is_none")]
    pub num_cpus: Option<i32>,
    #[serde(rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<i64>,
    #[serde(rename = "memoryHotAddEnabled", skip_serializing_if = "Option::is_none")]
    pub memory_hot_add: Option<bool>,
    #[serde(rename = "cpuHotAddEnabled", skip_serializing_if = "Option::is_none")]
    pub cpu_hot_add: Option<bool>,
    #[serde(rename = "deviceChange", skip_serializing_if = "Vec::is_empty")]
    pub device_change: Vec<DeviceChange>,
    #[serde(rename = "extraConfig", skip_serializing_if = "Vec::is_empty")]
    pub extra_config: Vec<OptionValue>,
}

impl ConfigSpec {
    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.instance_uuid.is_none()
            && self.annotation.is_none()
            && self.num_cpus.is_none()
            && self.memory_mb.is_none()
            && self.memory_hot_add.is_none()
            && self.cpu_hot_add.is_none()
            && self.device_change.is_empty()
            && self.extra_config.is_empty()
    }
}

/// `VirtualMachineRelocateSpec`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelocateSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datastore: Option<MoRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<MoRef>,
    /// After `pool` (the schema's sequence order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<MoRef>,
}

/// `RelocateVM_Task`.
#[derive(Debug, Serialize)]
pub struct RelocateVm<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub spec: RelocateSpec,
}

/// `VirtualMachineCloneSpec`.
#[derive(Debug, Clone, Serialize)]
pub struct CloneSpec {
    pub location: RelocateSpec,
    pub template: bool,
    pub config: ConfigSpec,
    #[serde(rename = "powerOn")]
    pub power_on: bool,
}

/// `CloneVM_Task`.
#[derive(Debug, Serialize)]
pub struct CloneVm<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub folder: &'a MoRef,
    pub name: &'a str,
    pub spec: CloneSpec,
}

/// `ReconfigVM_Task`.
#[derive(Debug, Serialize)]
pub struct ReconfigVm<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub spec: ConfigSpec,
}

/// `CreateSnapshot_Task`.
#[derive(Debug, Serialize)]
pub struct CreateSnapshot<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub name: &'a str,
    pub description: &'a str,
    pub memory: bool,
    pub quiesce: bool,
}

/// `RemoveSnapshot_Task`.
#[derive(Debug, Serialize)]
pub struct RemoveSnapshot<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "removeChildren")]
    pub remove_children: bool,
}

/// `AcquireTicket`.
#[derive(Debug, Serialize)]
pub struct AcquireTicket<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "ticketType")]
    pub ticket_type: &'a str,
}

/// `VirtualMachineTicket`: the ticket and where to use it. vSphere may
/// leave out the host ("the client is assumed to know it"), the port and
/// the URL (which only WebMKS tickets of newer servers carry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The ticket itself, never empty.
    pub ticket: String,
    /// The host to connect to.
    pub host: Option<String>,
    /// The port to connect to.
    pub port: Option<u16>,
    /// The whole address, `wss://host:port/ticket/<ticket>` for WebMKS.
    pub url: Option<String>,
}

impl FromXml for Ticket {
    fn from_xml(x: &Xml) -> Result<Self, DecodeError> {
        let text = |name: &str| Some(x.text_of(name).trim()).filter(|t| !t.is_empty()).map(str::to_owned);
        let ticket =
            text("ticket").ok_or(DecodeError::Missing { parent: "VirtualMachineTicket", child: "ticket" })?;
        let port = match text("port") {
            Some(p) => Some(p.parse().map_err(|_| DecodeError::Invalid {
                parent: "VirtualMachineTicket",
                child: "port",
                value: p.clone(),
            })?),
            None => None,
        };
        Ok(Self { ticket, host: text("host"), port, url: text("url") })
    }
}

// ---- volumes: disk files ----

/// `MakeDirectory` (FileManager).
#[derive(Debug, Serialize)]
pub struct MakeDirectory<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub name: &'a str,
    pub datacenter: &'a MoRef,
    #[serde(rename = "createParentDirectories")]
    pub create_parents: bool,
}

/// `FileBackedVirtualDiskSpec`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskSpec {
    #[serde(rename = "@xsi:type")]
    xsi_type: &'static str,
    /// `thin`, `preallocated`, `eagerZeroedThick`...
    #[serde(rename = "diskType")]
    pub disk_type: &'static str,
    /// `lsiLogic`, `busLogic`, `ide`.
    #[serde(rename = "adapterType")]
    pub adapter_type: &'static str,
    #[serde(rename = "capacityKb")]
    pub capacity_kb: i64,
}

impl DiskSpec {
    /// A thin disk of `capacity_kb`.
    pub fn thin(capacity_kb: i64) -> Self {
        Self {
            xsi_type: "FileBackedVirtualDiskSpec",
            disk_type: "thin",
            adapter_type: "lsiLogic",
            capacity_kb,
        }
    }
}

/// `CreateVirtualDisk_Task`.
#[derive(Debug, Serialize)]
pub struct CreateVirtualDisk<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub name: &'a str,
    pub datacenter: &'a MoRef,
    pub spec: DiskSpec,
}

/// `CopyVirtualDisk_Task` (no `destSpec`: the copy is like the source).
#[derive(Debug, Serialize)]
pub struct CopyVirtualDisk<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "sourceName")]
    pub source_name: &'a str,
    #[serde(rename = "sourceDatacenter")]
    pub source_datacenter: &'a MoRef,
    #[serde(rename = "destName")]
    pub dest_name: &'a str,
    #[serde(rename = "destDatacenter")]
    pub dest_datacenter: &'a MoRef,
    pub force: bool,
}

/// `MoveVirtualDisk_Task`.
#[derive(Debug, Serialize)]
pub struct MoveVirtualDisk<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "sourceName")]
    pub source_name: &'a str,
    #[serde(rename = "sourceDatacenter")]
    pub source_datacenter: &'a MoRef,
    #[serde(rename = "destName")]
    pub dest_name: &'a str,
    #[serde(rename = "destDatacenter")]
    pub dest_datacenter: &'a MoRef,
    pub force: bool,
}

/// `DeleteVirtualDisk_Task`.
#[derive(Debug, Serialize)]
pub struct DeleteVirtualDisk<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub name: &'a str,
    pub datacenter: &'a MoRef,
}

/// `ExtendVirtualDisk_Task`.
#[derive(Debug, Serialize)]
pub struct ExtendVirtualDisk<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub name: &'a str,
    pub datacenter: &'a MoRef,
    #[serde(rename = "newCapacityKb")]
    pub new_capacity_kb: i64,
    #[serde(rename = "eagerZero")]
    pub eager_zero: bool,
}

/// `VmDiskFileQueryFlags`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskQueryFlags {
    #[serde(rename = "diskType")]
    pub disk_type: bool,
    #[serde(rename = "capacityKb")]
    pub capacity_kb: bool,
    #[serde(rename = "hardwareVersion")]
    pub hardware_version: bool,
}

/// `VmDiskFileQuery`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskQuery {
    #[serde(rename = "@xsi:type")]
    xsi_type: &'static str,
    pub details: DiskQueryFlags,
}

/// `FileQueryFlags`.
#[derive(Debug, Clone, Serialize)]
pub struct FileQueryFlags {
    #[serde(rename = "fileType")]
    pub file_type: bool,
    #[serde(rename = "fileSize")]
    pub file_size: bool,
    pub modification: bool,
    #[serde(rename = "fileOwner")]
    pub file_owner: bool,
}

/// `HostDatastoreBrowserSearchSpec`.
#[derive(Debug, Clone, Serialize)]
pub struct SearchSpec {
    pub query: Vec<DiskQuery>,
    pub details: FileQueryFlags,
    #[serde(rename = "matchPattern")]
    pub match_pattern: Vec<String>,
}

impl SearchSpec {
    /// Virtual disks named like `pattern`, with their capacity.
    pub fn disks(pattern: &str) -> Self {
        Self {
            query: vec![DiskQuery {
                xsi_type: "VmDiskFileQuery",
                details: DiskQueryFlags { disk_type: true, capacity_kb: true, hardware_version: false },
            }],
            details: FileQueryFlags {
                file_type: true,
                file_size: true,
                modification: false,
                file_owner: false,
            },
            match_pattern: vec![pattern.to_owned()],
        }
    }
}

/// `SearchDatastore_Task` (HostDatastoreBrowser).
#[derive(Debug, Serialize)]
pub struct SearchDatastore<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "datastorePath")]
    pub datastore_path: &'a str,
    #[serde(rename = "searchSpec")]
    pub search_spec: SearchSpec,
}

/// One disk file a datastore search found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFile {
    /// The file's name in its folder.
    pub path: String,
    /// Its capacity (0 when the server did not say).
    pub capacity_kb: i64,
}

/// The disk files of a `HostDatastoreBrowserSearchResults`.
pub fn disk_files(results: &Xml) -> Vec<DiskFile> {
    results
        .all("file")
        .map(|f| DiskFile {
            path: f.text_of("path").to_owned(),
            capacity_kb: f.num_of("capacityKb").unwrap_or(0),
        })
        .collect()
}

/// One node of `snapshot.rootSnapshotList`, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotNode {
    pub snapshot: MoRef,
    pub name: String,
    /// The VM's power state when it was taken.
    pub state: String,
}

/// Flattens a `VirtualMachineSnapshotInfo` into its snapshots.
pub fn snapshots_of(info: &Xml) -> Vec<SnapshotNode> {
    fn walk(tree: &Xml, out: &mut Vec<SnapshotNode>) {
        if let Some(snapshot) = tree.moref_of("snapshot") {
            out.push(SnapshotNode {
                snapshot,
                name: tree.text_of("name").to_owned(),
                state: tree.text_of("state").to_owned(),
            });
        }
        for child in tree.all("childSnapshotList") {
            walk(child, out);
        }
    }
    let mut out = Vec::new();
    for root in info.all("rootSnapshotList") {
        walk(root, &mut out);
    }
    out
}

/// One `GuestNicInfo` of `guest.net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    pub mac: String,
    pub addresses: Vec<String>,
}

/// Reads `guest.net`.
pub fn guest_nics(net: &Xml) -> Vec<GuestNic> {
    net.children
        .iter()
        .map(|n| GuestNic {
            mac: n.text_of("macAddress").to_ascii_lowercase(),
            addresses: n
                .all("ipAddress")
                .map(|a| a.text.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_from_vsphere_renders_back_as_it_came() {
        let text = r#"<spec xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xsi:type="VirtualMachineImportSpec"><configSpec><name>a &amp; b</name><extraConfig xsi:type="OptionValue"><key>k</key><value xsi:type="xsd:string">v</value></extraConfig></configSpec><resPoolEntity type="ResourcePool">resgroup-9</resPoolEntity></spec>"#;
        let doc = roxmltree::Document::parse(text).unwrap();
        let x = Xml::of(doc.root_element());
        assert_eq!(
            x.render("spec"),
            r#"<spec xsi:type="VirtualMachineImportSpec"><configSpec><name>a &amp; b</name><extraConfig xsi:type="OptionValue"><key>k</key><value xsi:type="xsd:string">v</value></extraConfig></configSpec><resPoolEntity type="ResourcePool">resgroup-9</resPoolEntity></spec>"#
        );
        assert_eq!(
            MoRef::new("Folder", "group-v3").render("folder"),
            r#"<folder type="Folder">group-v3</folder>"#
        );
    }

    fn render<T: Serialize>(root: &str, v: &T) -> String {
        quick_xml::se::to_string_with_root(root, v).unwrap()
    }

    #[test]
    fn requests_render_in_schema_order_with_their_types() {
        let vm = MoRef::new("VirtualMachine", "vm-42");
        let spec = ConfigSpec {
            num_cpus: Some(2),
            memory_mb: Some(1024),
            device_change: vec![DeviceChange {
                operation: "add",
                file_operation: None,
                device: Device {
                    xsi_type: "VirtualVmxnet3".into(),
                    key: -100,
                    device_info: None,
                    backing: Some(Backing {
                        xsi_type: "VirtualEthernetCardNetworkBackingInfo".into(),
                        file_name: None,
                        datastore: None,
                        device_name: Some("VM Network".into()),
                        network: Some(MoRef::new("Network", "network-7")),
                        port: None,
                        disk_mode: None,
                        thin_provisioned: None,
                    }),
                    connectable: None,
                    controller_key: None,
                    unit_number: None,
                    address_type: Some("generated".into()),
                    mac_address: None,
                    capacity_kb: None,
                    capacity_bytes: None,
                },
            }],
            extra_config: vec![OptionValue::new("hcp.vm_id", "a<b&c")],
            ..Default::default()
        };
        let xml = render("ReconfigVM_Task", &ReconfigVm { xmlns: "urn:vim25", this: &vm, spec });
        assert_eq!(
            xml,
            "<ReconfigVM_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">vm-42</_this><spec>\
             <numCPUs>2</numCPUs><memoryMB>1024</memoryMB><deviceChange><operation>add</operation>\
             <device xsi:type=\"VirtualVmxnet3\"><key>-100</key><backing xsi:type=\"VirtualEthernetCardNetworkBackingInfo\">\
             <deviceName>VM Network</deviceName><network type=\"Network\">network-7</network></backing>\
             <addressType>generated</addressType></device></deviceChange><extraConfig xsi:type=\"OptionValue\">\
             <key>hcp.vm_id</key><value xsi:type=\"xsd:string\">a&lt;b&amp;c</value></extraConfig></spec></ReconfigVM_Task>"
        );
    }

    #[test]
    fn answers_decode_into_types() {
        let text = r#"<r xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><returnval>
            <objects><obj type="VirtualMachine">vm-1</obj>
              <propSet><name>name</name><val xsi:type="xsd:string">hcp-x</val></propSet>
              <propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice">
                <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><capacityInKB>1048576</capacityInKB></VirtualDevice>
                <VirtualDevice xsi:type="VirtualVmxnet3"><key>4000</key><backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName></backing><macAddress>00:50:56:AA:BB:CC</macAddress></VirtualDevice>
              </val></propSet></objects><token>t1</token></returnval></r>"#;
        let doc = roxmltree::Document::parse(text).unwrap();
        let r = RetrieveResult::from_returnvals(
            doc.root_element().children().filter(|n| n.is_element()).collect(),
        )
        .unwrap();
        assert_eq!(r.token.as_deref(), Some("t1"));
        let o = &r.objects[0];
        assert_eq!(o.obj, MoRef::new("VirtualMachine", "vm-1"));
        assert_eq!(o.prop("name").unwrap().text, "hcp-x");
        let devices: Vec<Device> =
            o.prop("config.hardware.device").unwrap().children.iter().map(Device::from_xml).collect();
        assert!(devices[0].is_disk() && devices[0].disk_bytes() == 1 << 30);
        assert!(devices[1].is_nic());
        assert_eq!(devices[1].mac_address.as_deref(), Some("00:50:56:aa:bb:cc"));
        assert_eq!(devices[1].nic_target(), Some("VM Network"));
    }
}

// ---- image import (OVF, NFC lease) and templates ----

/// `OvfCreateImportSpecParams` (the fields HCP sets, in schema order).
#[derive(Debug, Serialize)]
pub struct ImportSpecParams<'a> {
    pub locale: &'a str,
    #[serde(rename = "deploymentOption")]
    pub deployment_option: &'a str,
    #[serde(rename = "entityName")]
    pub entity_name: &'a str,
    #[serde(rename = "diskProvisioning")]
    pub disk_provisioning: &'a str,
}

/// `CreateImportSpec`.
#[derive(Debug, Serialize)]
pub struct CreateImportSpec<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    #[serde(rename = "ovfDescriptor")]
    pub ovf_descriptor: &'a str,
    #[serde(rename = "resourcePool")]
    pub resource_pool: &'a MoRef,
    pub datastore: &'a MoRef,
    pub cisp: ImportSpecParams<'a>,
}

/// `HttpNfcLeaseProgress`.
#[derive(Debug, Serialize)]
pub struct LeaseProgress<'a> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    #[serde(rename = "_this")]
    pub this: &'a MoRef,
    pub percent: i32,
}

/// One `HttpNfcLeaseDeviceUrl` of a lease's info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUrl {
    /// Matches an `OvfFileItem`'s `deviceId`.
    pub import_key: String,
    /// Where the bytes go (`https://*/nfc/...`: `*` is the SDK's host).
    pub url: String,
    /// Whether the device is a disk.
    pub disk: bool,
}

/// The device URLs of an `HttpNfcLeaseInfo`.
pub fn device_urls(info: &Xml) -> Vec<DeviceUrl> {
    info.all("deviceUrl")
        .map(|d| DeviceUrl {
            import_key: d.text_of("importKey").to_owned(),
            url: d.text_of("url").trim().to_owned(),
            disk: d.text_of("disk").trim() == "true",
        })
        .collect()
}
