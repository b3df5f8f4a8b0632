//! What an HCP volume is on libvirt, as pure functions: its file name in a
//! storage pool (`hcp-vol-<volume id>.qcow2`, which is how ListVolumes
//! tells HCP's volumes from anything else in the pool), its slot on a VM as
//! a virtio target (`vda` is the root disk, slot 1 is `vdb`), the `<disk>`
//! element that attaches it, and the disks read back from a domain's XML.
//!
//! The NoCloud seed is an IDE cdrom (`hdc`), so virtio targets are all
//! ours; the limit on data volumes is PCI slots, not names: the `pc`
//! machine has 32, of which the host bridge, the PIIX3 (IDE, USB), VGA and
//! the root disk take four, and NICs take one each.

use std::path::{Path, PathBuf};

use crate::domain::esc;

/// The most data volumes one VM can have (slots 1 to 16, `vdb` to `vdq`):
/// leaves 12 PCI slots of the `pc` machine for NICs.
pub const MAX_VOLUMES_PER_VM: u32 = 16;

const PREFIX: &str = "hcp-vol-";
const SUFFIX: &str = ".qcow2";

/// A volume's place on a VM: 0 is the boot volume (`vda`), 1 to
/// [`MAX_VOLUMES_PER_VM`] data volumes (`vdb`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slot(u32);

impl Slot {
    /// The boot volume's slot.
    pub const BOOT: Slot = Slot(0);

    /// A data volume's slot, if `n` is one (1 to [`MAX_VOLUMES_PER_VM`]).
    pub fn data(n: u32) -> Option<Slot> {
        (1..=MAX_VOLUMES_PER_VM).contains(&n).then_some(Slot(n))
    }

    /// The slot's number, as VolumeInfo.slot says it.
    pub fn number(self) -> u32 {
        self.0
    }

    /// The virtio target: `vda` for the boot volume, `vdb` for slot 1...
    pub fn target(self) -> String {
        // Slots stop at 16, well inside a to z.
        let letter = char::from(b'a' + u8::try_from(self.0).unwrap_or(25).min(25));
        format!("vd{letter}")
    }

    /// The slot a virtio target stands for (`vdb` → 1), if it is one of ours.
    pub fn of_target(target: &str) -> Option<Slot> {
        let rest = target.strip_prefix("vd")?;
        let [letter] = rest.as_bytes() else { return None };
        let n = u32::from(letter.checked_sub(b'a')?);
        (n <= MAX_VOLUMES_PER_VM).then_some(Slot(n))
    }
}

/// The file name of a volume in its pool.
pub fn volume_file_name(volume_id: &str) -> String {
    format!("{PREFIX}{volume_id}{SUFFIX}")
}

const IMAGE_PREFIX: &str = "hcp-image-";
const IMAGE_MARKER: &str = ".complete";

/// The file name of an image's data in the default pool: `hcp-image-<id>`
/// with the format as its extension (`qcow2`, `raw`).
pub fn image_volume_name(image_id: &str, format: &str) -> String {
    format!("{IMAGE_PREFIX}{image_id}.{format}")
}

/// The empty volume whose presence says an image is stored completely.
pub fn image_marker_name(image_id: &str) -> String {
    format!("{IMAGE_PREFIX}{image_id}{IMAGE_MARKER}")
}

/// The `ImageRef.source` CreateVm takes for an imported or captured image.
pub fn image_source(image_id: &str) -> String {
    format!("{IMAGE_PREFIX}{image_id}")
}

/// The image id a source names, when it is an image of this provider's.
pub fn image_id_of_source(source: &str) -> Option<&str> {
    let id = source.strip_prefix(IMAGE_PREFIX)?;
    hcp_provider_sdk::support::is_uuid(id).then_some(id)
}

/// XML for an image's volume (or its marker) of `bytes`: sparse (nothing
/// allocated up front, the upload writes every byte) and world-readable,
/// since QEMU reads it as the backing file of VMs' overlays. Always
/// created as `raw`: libvirt writes the uploaded bytes as they are, and
/// HCP names the real format itself (file extension, `-F` of overlays).
pub fn image_volume_xml(name: &str, bytes: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity>\
         <allocation unit='bytes'>0</allocation><target><format type='raw'/>\
         <permissions><mode>0644</mode></permissions></target></volume>",
        esc(name)
    )
}

/// The HCP volume id of a pool file name, when the name is one of ours.
pub fn volume_id_of_file(name: &str) -> Option<&str> {
    let id = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    hcp_provider_sdk::support::is_uuid(id).then_some(id)
}

/// The disk serial the guest sees (`/sys/block/vdX/serial`): the first 20
/// characters of the volume id, virtio-blk's limit.
pub fn disk_serial(volume_id: &str) -> String {
    volume_id.chars().take(20).collect()
}

/// XML for creating a volume of `bytes` in a pool.
pub fn volume_xml(volume_id: &str, bytes: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity>\
         <target><format type='qcow2'/></target></volume>",
        esc(&volume_file_name(volume_id))
    )
}

/// The `<disk>` element of a volume at `slot`, for a domain definition and
/// for attach and detach (libvirt finds the disk to detach by its target).
pub fn disk_xml(file: &Path, slot: Slot, volume_id: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='{}' bus='virtio'/><serial>{}</serial></disk>",
        esc(&file.display().to_string()),
        slot.target(),
        esc(&disk_serial(volume_id)),
    )
}

/// A file-backed disk of a domain's XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRef {
    /// Its file.
    pub file: PathBuf,
    /// Its target device (`vda`, `hdc`).
    pub target: String,
}

/// The file-backed disks (not cdroms) of a domain's XML.
pub fn disks_of(xml: &str) -> Vec<DiskRef> {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return Vec::new() };
    doc.descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device").unwrap_or("disk") == "disk")
        .filter_map(|d| {
            let file = d.children().find(|c| c.has_tag_name("source"))?.attribute("file")?;
            let target = d.children().find(|c| c.has_tag_name("target"))?.attribute("dev")?;
            Some(DiskRef { file: PathBuf::from(file), target: target.to_owned() })
        })
        .collect()
}

/// The `<target><path>` of a storage pool's XML.
pub fn pool_path_of(xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let target = doc.root_element().children().find(|c| c.has_tag_name("target"))?;
    let path = target.children().find(|c| c.has_tag_name("path"))?;
    path.text().map(|t| PathBuf::from(t.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190b3c6-0000-7000-8000-000000000001";

    #[test]
    fn slots_are_virtio_targets_after_the_root_disk() {
        assert_eq!(Slot::BOOT.target(), "vda");
        assert_eq!(Slot::data(1).map(Slot::target).as_deref(), Some("vdb"));
        assert_eq!(Slot::data(16).map(Slot::target).as_deref(), Some("vdq"));
        assert_eq!(Slot::data(0), None);
        assert_eq!(Slot::data(17), None);
        for n in 0..=MAX_VOLUMES_PER_VM {
            assert_eq!(Slot::of_target(&Slot(n).target()), Some(Slot(n)));
        }
        for other in ["hdc", "vdr", "vdz", "vd", "vdaa", "sda"] {
            assert_eq!(Slot::of_target(other), None, "{other}");
        }
    }

    #[test]
    fn only_our_file_names_are_volumes() {
        assert_eq!(volume_id_of_file(&volume_file_name(ID)), Some(ID));
        for other in ["hcp-vol-x.qcow2", "disk.qcow2", "hcp-vol-0190b3c6-0000-7000-8000-000000000001.raw", ""]
        {
            assert_eq!(volume_id_of_file(other), None, "{other}");
        }
    }

    #[test]
    fn image_names_are_not_volumes() {
        assert_eq!(image_id_of_source(&image_source(ID)), Some(ID));
        assert_eq!(image_id_of_source("tiny"), None);
        assert_eq!(image_id_of_source("hcp-image-x"), None);
        for name in [image_volume_name(ID, "qcow2"), image_volume_name(ID, "raw"), image_marker_name(ID)] {
            assert_eq!(volume_id_of_file(&name), None, "{name}");
        }
        let xml = image_volume_xml(&image_volume_name(ID, "qcow2"), 5);
        assert!(roxmltree::Document::parse(&xml).is_ok(), "{xml}");
    }

    #[test]
    fn disk_xml_reads_back() {
        let file = PathBuf::from("/pool/hcp-vol-x.qcow2");
        let xml = format!("<domain><devices>{}</devices></domain>", disk_xml(&file, Slot(2), ID));
        assert_eq!(disks_of(&xml), vec![DiskRef { file, target: "vdc".into() }]);
        assert!(xml.contains("<serial>0190b3c6-0000-7000-8</serial>"), "{xml}");
        let cdrom = "<domain><devices><disk type='file' device='cdrom'><source file='/s.iso'/>\
                     <target dev='hdc' bus='ide'/></disk></devices></domain>";
        assert!(disks_of(cdrom).is_empty());
        assert!(disks_of("not xml").is_empty());
    }

    #[test]
    fn volume_xml_is_well_formed() {
        let xml = volume_xml(ID, 1 << 30);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let text = |tag: &str| doc.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text());
        assert_eq!(text("name"), Some("hcp-vol-0190b3c6-0000-7000-8000-000000000001.qcow2"));
        assert_eq!(text("capacity"), Some("1073741824"));
    }

    #[test]
    fn pool_path_is_read() {
        let xml =
            "<pool type='dir'><name>hcp</name><target><path>/var/lib/hcp/volumes</path></target></pool>";
        assert_eq!(pool_path_of(xml), Some(PathBuf::from("/var/lib/hcp/volumes")));
        assert_eq!(pool_path_of("<pool/>"), None);
    }
}
