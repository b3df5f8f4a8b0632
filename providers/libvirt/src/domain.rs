//! The libvirt domain XML HCP writes, and the few facts it reads back.
//! Pure functions, so that what a VM becomes on the hypervisor is tested
//! without a hypervisor.
//!
//! A domain is named `hcp-<vm id>`, its UUID *is* the HCP VM id (so a
//! repeated create finds the domain instead of making a second one), and
//! its `<metadata>` carries an `hcp:instance` element: inventory lists only
//! domains that have it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::config::Nic;
use crate::storage::{Slot, disk_serial, disk_xml};

/// XML namespace of HCP's domain metadata.
pub const METADATA_NS: &str = "https://hcp.dev/xmlns/libvirt-provider/1";
/// Prefix used for it.
pub const METADATA_PREFIX: &str = "hcp";

/// Everything a domain is built from.
#[derive(Debug, Clone)]
pub struct DomainPlan {
    /// HCP VM id; also the domain UUID.
    pub vm_id: String,
    /// The tenant's VM name (kept in metadata).
    pub vm_name: String,
    /// `kvm`, `qemu` or `test`.
    pub domain_type: &'static str,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// The root disk (`vda`): the VM's own overlay, or its boot volume.
    pub disk: PathBuf,
    /// The boot volume's id, when the root disk is one (its serial).
    pub boot_volume_id: Option<String>,
    /// Data volumes attached from the start.
    pub volumes: Vec<VolumeDisk>,
    /// The NoCloud seed ISO, when there is one.
    pub seed: Option<PathBuf>,
    /// Direct kernel boot.
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot command line.
    pub cmdline: Option<String>,
    /// NICs in order.
    pub nics: Vec<Nic>,
    /// Where the serial port is logged.
    pub serial_log: PathBuf,
    /// VNC and SPICE listen address.
    pub vnc_listen: IpAddr,
    /// VNC password (at most 8 characters: the RFB DES limit).
    pub vnc_password: String,
    /// SPICE password, its own (at most 60 characters: SPICE's ticket
    /// limit), so a VNC password that leaks opens no SPICE session.
    pub spice_password: String,
    /// The catalog image source.
    pub image: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A data volume in a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    /// The HCP volume id.
    pub volume_id: String,
    /// Its file in the pool.
    pub file: PathBuf,
    /// Where it sits.
    pub slot: Slot,
}

/// The domain name for an HCP VM id.
pub fn domain_name(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

/// Escapes text for XML attributes and content.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

fn path(p: &std::path::Path) -> String {
    esc(&p.display().to_string())
}

impl DomainPlan {
    /// The `hcp:instance` metadata element.
    pub fn metadata_xml(&self) -> String {
        let mut labels = String::new();
        for (k, v) in &self.labels {
            labels.push_str(&format!(
                "<{p}:label key='{}'>{}</{p}:label>",
                esc(k),
                esc(v),
                p = METADATA_PREFIX
            ));
        }
        format!(
            "<{p}:instance xmlns:{p}='{ns}'><{p}:vm-id>{id}</{p}:vm-id><{p}:name>{name}</{p}:name>\
             <{p}:image>{image}</{p}:image>{labels}</{p}:instance>",
            p = METADATA_PREFIX,
            ns = METADATA_NS,
            id = esc(&self.vm_id),
            name = esc(&self.vm_name),
            image = esc(&self.image),
        )
    }

    /// The full domain XML.
    pub fn to_xml(&self) -> String {
        let mut os = String::from("<type arch='x86_64' machine='pc'>hvm</type>");
        if let Some(k) = &self.kernel {
            os.push_str(&format!("<kernel>{}</kernel>", path(k)));
            if let Some(i) = &self.initrd {
                os.push_str(&format!("<initrd>{}</initrd>", path(i)));
            }
            if let Some(c) = &self.cmdline {
                os.push_str(&format!("<cmdline>{}</cmdline>", esc(c)));
            }
        } else {
            os.push_str("<boot dev='hd'/>");
        }
        let serial = self
            .boot_volume_id
            .as_deref()
            .map(|id| format!("<serial>{}</serial>", esc(&disk_serial(id))))
            .unwrap_or_default();
        let mut devices = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='vda' bus='virtio'/>{serial}</disk>",
            path(&self.disk)
        );
        for v in &self.volumes {
            devices.push_str(&disk_xml(&v.file, v.slot, &v.volume_id));
        }
        if let Some(seed) = &self.seed {
            devices.push_str(&format!(
                "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/>\
                 <target dev='hdc' bus='ide'/><readonly/></disk>",
                path(seed)
            ));
        }
        for nic in &self.nics {
            let source = match nic {
                Nic::Network(n) => format!("<interface type='network'><source network='{}'/>", esc(n)),
                Nic::Bridge(b) => format!("<interface type='bridge'><source bridge='{}'/>", esc(b)),
                Nic::User => "<interface type='user'>".to_owned(),
            };
            devices.push_str(&source);
            devices.push_str("<model type='virtio'/></interface>");
        }
        devices.push_str(&format!(
            "<serial type='pty'><log file='{}' append='on'/><target port='0'/></serial>\
             <console type='pty'><target type='serial' port='0'/></console>\
             <graphics type='vnc' port='-1' autoport='yes' listen='{listen}' passwd='{pw}'>\
             <listen type='address' address='{listen}'/></graphics>\
             <graphics type='spice' autoport='yes' listen='{listen}' passwd='{spw}'>\
             <listen type='address' address='{listen}'/></graphics>\
             <video><model type='vga'/></video><memballoon model='none'/>",
            path(&self.serial_log),
            listen = self.vnc_listen,
            pw = esc(&self.vnc_password),
            spw = esc(&self.spice_password),
        ));
        format!(
            "<domain type='{ty}'><name>{name}</name><uuid>{uuid}</uuid>\
             <title>{title}</title><metadata>{meta}</metadata>\
             <memory unit='MiB'>{mem}</memory><vcpu>{cpus}</vcpu><os>{os}</os>\
             <features><acpi/><apic/></features>\
             <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
             <devices>{devices}</devices></domain>",
            ty = self.domain_type,
            name = domain_name(&self.vm_id),
            uuid = esc(&self.vm_id),
            title = esc(&self.vm_name),
            meta = self.metadata_xml(),
            mem = self.memory_mib,
            cpus = self.vcpus,
        )
    }
}

/// The live VNC (or SPICE) server of a domain, read from its (secure) XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vnc {
    /// TCP port; None while the domain is not running.
    pub port: Option<u16>,
    /// The password, if any.
    pub password: String,
}

/// Reads the first VNC `<graphics>` of a domain XML.
pub fn vnc_of(xml: &str) -> Option<Vnc> {
    graphics_of(xml, "vnc")
}

/// Reads the first SPICE `<graphics>` of a domain XML: its plain-text
/// port (`port`, not `tlsPort`) and password.
pub fn spice_of(xml: &str) -> Option<Vnc> {
    graphics_of(xml, "spice")
}

fn graphics_of(xml: &str, kind: &str) -> Option<Vnc> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let g = doc.descendants().find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some(kind))?;
    let port = g.attribute("port").and_then(|p| p.parse::<i32>().ok()).and_then(|p| u16::try_from(p).ok());
    Some(Vnc {
        port: port.filter(|p| *p > 0),
        password: g.attribute("passwd").unwrap_or_default().to_owned(),
    })
}

/// The HCP VM id in a domain's `hcp:instance` metadata element: in a whole
/// domain XML (namespaced), or as virDomainGetMetadata returns the element
/// asked for by namespace (without one).
pub fn vm_id_of_metadata(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() == "instance" && root.tag_name().namespace().is_none() {
        let id = root.children().find(|n| n.tag_name().name() == "vm-id")?;
        return id.text().map(|t| t.trim().to_owned());
    }
    let id = doc
        .descendants()
        .find(|n| n.tag_name().name() == "vm-id" && n.tag_name().namespace() == Some(METADATA_NS))?;
    id.text().map(|t| t.trim().to_owned())
}

/// The `type` of a domain XML (`kvm`, `qemu`, `test`).
pub fn type_of(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.root_element().attribute("type").map(str::to_owned)
}

/// The files of a domain's disks (overlay and seed), to check where they are.
pub fn disk_files_of(xml: &str) -> Vec<PathBuf> {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return Vec::new() };
    doc.descendants()
        .filter(|n| n.has_tag_name("disk"))
        .filter_map(|d| d.children().find(|c| c.has_tag_name("source")))
        .filter_map(|s| s.attribute("file"))
        .map(PathBuf::from)
        .collect()
}

/// The `<description>` of a snapshot XML.
pub fn snapshot_description(xml: &str) -> String {
    roxmltree::Document::parse(xml)
        .ok()
        .and_then(|doc| {
            doc.root_element()
                .children()
                .find(|n| n.has_tag_name("description"))
                .and_then(|n| n.text().map(str::to_owned))
        })
        .unwrap_or_default()
}

/// Snapshot XML for a create.
pub fn snapshot_xml(snapshot_id: &str, name: &str) -> String {
    format!(
        "<domainsnapshot><name>{}</name><description>{}</description></domainsnapshot>",
        esc(snapshot_id),
        esc(name)
    )
}

/// The NICs of a domain's XML, in order: MAC (lower case) and what they
/// are attached to (network or bridge name, or "user"), without addresses.
pub fn interfaces_of_xml(xml: &str) -> Vec<hcp_proto::provider::InterfaceInfo> {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return Vec::new() };
    doc.descendants()
        .filter(|n| n.has_tag_name("interface") && n.parent().is_some_and(|p| p.has_tag_name("devices")))
        .map(|n| {
            let child = |tag: &str| n.children().find(|c| c.has_tag_name(tag));
            let mac =
                child("mac").and_then(|m| m.attribute("address")).unwrap_or_default().to_ascii_lowercase();
            let network = child("source")
                .and_then(|s| s.attribute("network").or_else(|| s.attribute("bridge")))
                .unwrap_or_else(|| n.attribute("type").unwrap_or_default())
                .to_owned();
            hcp_proto::provider::InterfaceInfo { network, mac, ipv4: Vec::new(), ipv6: Vec::new() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> DomainPlan {
        DomainPlan {
            vm_id: "0190b3c6-0000-7000-8000-000000000001".into(),
            vm_name: "web <1> & 'two'".into(),
            domain_type: "qemu",
            vcpus: 2,
            memory_mib: 256,
            disk: "/s/vm/disk.qcow2".into(),
            boot_volume_id: None,
            volumes: Vec::new(),
            seed: Some("/s/vm/seed.iso".into()),
            kernel: Some("/img/vmlinux".into()),
            initrd: Some("/img/initrd.gz".into()),
            cmdline: Some("console=ttyS0 quiet".into()),
            nics: vec![Nic::Network("default".into()), Nic::User],
            serial_log: "/s/vm/serial.log".into(),
            vnc_listen: IpAddr::from([127, 0, 0, 1]),
            vnc_password: "pw'<x>".into(),
            spice_password: "sp&ce\"pw".into(),
            image: "tiny".into(),
            labels: [("team".to_owned(), "a&b".to_owned())].into_iter().collect(),
        }
    }

    #[test]
    fn domain_xml_is_well_formed_and_complete() {
        let xml = plan().to_xml();
        let doc = roxmltree::Document::parse(&xml).expect("well-formed");
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        let text = |tag: &str| doc.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text());
        assert_eq!(text("name"), Some("hcp-0190b3c6-0000-7000-8000-000000000001"));
        assert_eq!(text("uuid"), Some("0190b3c6-0000-7000-8000-000000000001"));
        assert_eq!(text("title"), Some("web <1> & 'two'"));
        assert_eq!(text("vcpu"), Some("2"));
        assert_eq!(text("memory"), Some("256"));
        assert_eq!(text("kernel"), Some("/img/vmlinux"));
        assert_eq!(text("cmdline"), Some("console=ttyS0 quiet"));
        assert_eq!(
            disk_files_of(&xml),
            vec![PathBuf::from("/s/vm/disk.qcow2"), PathBuf::from("/s/vm/seed.iso")]
        );
        let ifaces: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("interface"))
            .filter_map(|n| n.attribute("type"))
            .collect();
        assert_eq!(ifaces, ["network", "user"]);
        assert_eq!(vnc_of(&xml), Some(Vnc { port: None, password: "pw'<x>".into() }));
        assert_eq!(spice_of(&xml), Some(Vnc { port: None, password: "sp&ce\"pw".into() }));
        assert_eq!(vm_id_of_metadata(&xml).as_deref(), Some("0190b3c6-0000-7000-8000-000000000001"));
        assert_eq!(type_of(&xml).as_deref(), Some("qemu"));
        let label = doc.descendants().find(|n| n.tag_name().name() == "label").unwrap();
        assert_eq!((label.attribute("key"), label.text()), (Some("team"), Some("a&b")));
    }

    #[test]
    fn self_booting_images_boot_from_disk_without_seed() {
        let mut p = plan();
        p.kernel = None;
        p.initrd = None;
        p.cmdline = None;
        p.seed = None;
        let xml = p.to_xml();
        assert!(xml.contains("<boot dev='hd'/>") && !xml.contains("<kernel>") && !xml.contains("cdrom"));
    }

    #[test]
    fn volumes_are_virtio_disks_with_serials() {
        let mut p = plan();
        p.disk = "/pool/hcp-vol-b.qcow2".into();
        p.boot_volume_id = Some("0190b3c6-0000-7000-8000-00000000000b".into());
        p.volumes = vec![VolumeDisk {
            volume_id: "0190b3c6-0000-7000-8000-00000000000d".into(),
            file: "/pool/hcp-vol-d.qcow2".into(),
            slot: Slot::data(3).unwrap(),
        }];
        let xml = p.to_xml();
        let disks: Vec<_> = crate::storage::disks_of(&xml).into_iter().map(|d| (d.file, d.target)).collect();
        assert_eq!(
            disks,
            [
                (PathBuf::from("/pool/hcp-vol-b.qcow2"), "vda".to_owned()),
                (PathBuf::from("/pool/hcp-vol-d.qcow2"), "vdd".to_owned())
            ]
        );
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let serials: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("serial") && n.text().is_some())
            .filter_map(|n| n.text())
            .collect();
        assert_eq!(serials, ["0190b3c6-0000-7000-8", "0190b3c6-0000-7000-8"]);
    }

    #[test]
    fn live_vnc_port_is_read_back() {
        let live = "<domain><devices><graphics type='spice' port='5901'/>\
                    <graphics type='vnc' port='5903' autoport='yes' passwd='s3cret'/></devices></domain>";
        assert_eq!(vnc_of(live), Some(Vnc { port: Some(5903), password: "s3cret".into() }));
        assert_eq!(spice_of(live), Some(Vnc { port: Some(5901), password: String::new() }));
        let no_spice = "<domain><devices><graphics type='vnc' port='5903'/></devices></domain>";
        assert_eq!(spice_of(no_spice), None);
        assert_eq!(vnc_of("<domain/>"), None);
        assert_eq!(vnc_of("not xml"), None);
    }

    #[test]
    fn metadata_element_as_libvirt_returns_it() {
        let got = "<instance>\n  <vm-id>0190b3c6-0000-7000-8000-000000000001</vm-id>\n</instance>";
        assert_eq!(vm_id_of_metadata(got).as_deref(), Some("0190b3c6-0000-7000-8000-000000000001"));
    }

    #[test]
    fn metadata_from_other_tools_is_not_ours() {
        assert_eq!(
            vm_id_of_metadata("<x:instance xmlns:x='urn:other'><x:vm-id>1</x:vm-id></x:instance>"),
            None
        );
    }

    #[test]
    fn nics_are_read_back_in_order_with_lower_case_macs() {
        let live = "<domain type='qemu'><devices>\
                    <interface type='network'><mac address='52:54:00:AB:cd:01'/>\
                    <source network='default' bridge='virbr0'/></interface>\
                    <interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='br0'/></interface>\
                    <interface type='user'><mac address='52:54:00:00:00:03'/></interface>\
                    </devices></domain>";
        let nics: Vec<(String, String)> =
            interfaces_of_xml(live).into_iter().map(|n| (n.network, n.mac)).collect();
        assert_eq!(
            nics,
            [
                ("default".to_owned(), "52:54:00:ab:cd:01".to_owned()),
                ("br0".to_owned(), "52:54:00:00:00:02".to_owned()),
                ("user".to_owned(), "52:54:00:00:00:03".to_owned()),
            ]
        );
        assert!(interfaces_of_xml("not xml").is_empty());
    }

    #[test]
    fn snapshot_xml_round_trips_the_name() {
        let xml = snapshot_xml("id-1", "before <upgrade>");
        assert_eq!(snapshot_description(&xml), "before <upgrade>");
    }
}
