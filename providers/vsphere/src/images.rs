//! Images as templates: an imported image is a template made from an OVF
//! descriptor this module writes (one disk, the VMDK core sent), through
//! `OvfManager.CreateImportSpec`, `ResourcePool.ImportVApp` and the
//! bytes sent to the NFC lease's device URL; a captured image is a
//! `CloneVM_Task` of a stopped VM with `template = true`. Both are named
//! `hcp-image-<image id>` in the VM folder, so every call is idempotent by
//! image id: a template of that name is the image, a VM of that name that
//! is not (yet) a template is an import or capture that did not finish,
//! and is destroyed and made again.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hcp_provider_sdk::image::ImageUpload;
use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use http_body_util::BodyExt as _;

use crate::errors::{invalid, map_error};
use crate::inventory::Vm;
use crate::soap::{VIM25, VimError, parse_returnval};
use crate::vim::{self, FromXml as _, MoRef, OptionValue, Xml};
use crate::{Vsphere, vm_name};

/// The `extraConfig` key naming the image of a template.
const IMAGE_KEY: &str = "hcp.image_id";
/// The `extraConfig` key holding the image's size in bytes.
const IMAGE_BYTES_KEY: &str = "hcp.image_bytes";
/// How often a running upload tells the lease how far it got (vSphere
/// ends a lease that hears nothing for its timeout, five minutes).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const GIB: u64 = 1 << 30;

/// A template's name on vSphere.
pub(crate) fn image_name(image_id: &str) -> String {
    format!("hcp-image-{image_id}")
}

/// The capacity in bytes a sparse (streamOptimized) VMDK declares in its
/// header (`KDMV`, then version, flags and the capacity in sectors), or
/// None when `head` is not the start of one.
pub(crate) fn vmdk_capacity(head: &[u8]) -> Option<u64> {
    if head.len() < 20 || &head[..4] != b"KDMV" {
        return None;
    }
    let sectors = u64::from_le_bytes(head[12..20].try_into().ok()?);
    sectors.checked_mul(512)
}

/// The OVF descriptor of an image: one VM with one SCSI disk of
/// `capacity_gib` whose content is the file `disk.vmdk` of `file_bytes`.
pub(crate) fn ovf_descriptor(name: &str, file_bytes: u64, capacity_gib: u64) -> String {
    let name = vim::escape(name);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
    <File ovf:id="file1" ovf:href="disk.vmdk" ovf:size="{file_bytes}"/>
  </References>
  <DiskSection>
    <Info>The image's disk</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{capacity_gib}" ovf:capacityAllocationUnits="byte * 2^30" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>An HCP image</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// An image's template (or what is left of a half-made one).
struct Template {
    vm: Vm,
    template: bool,
    size_bytes: u64,
}

fn image_key(image_id: &str) -> String {
    format!("image:{image_id}")
}

fn check_image_id(image_id: &str) -> Result<(), ProviderError> {
    if is_uuid(image_id) { Ok(()) } else { Err(invalid("image_id", "must be a UUID")) }
}

impl Vsphere {
    /// What CreateVm resolves to the template (see `Vsphere::template`): its
    /// name below the datacenter's VM folder.
    fn image_source(&self, image_id: &str) -> String {
        match self.config.folder.as_deref().map(|f| f.trim_matches('/')).filter(|f| !f.is_empty()) {
            Some(folder) => format!("{folder}/{}", image_name(image_id)),
            None => image_name(image_id),
        }
    }

    async fn find_image(&self, image_id: &str) -> Result<Option<Template>, ProviderError> {
        let path = format!("{}/vm/{}", self.config.datacenter, self.image_source(image_id));
        let Some(moref) = self.find_path(&path).await.map_err(map_error)? else { return Ok(None) };
        if moref.kind != "VirtualMachine" {
            return Ok(None);
        }
        let mut paths: Vec<&str> = crate::inventory::VM_PROPS.to_vec();
        paths.extend(["config.template", "config.extraConfig"]);
        let Some(o) = self.properties(&moref, &paths).await.map_err(map_error)? else { return Ok(None) };
        let vm = Vm::of(&o);
        let template = o.prop("config.template").is_some_and(|t| t.text.trim() == "true");
        let recorded =
            vm.extra_config.iter().find(|(k, _)| k == IMAGE_BYTES_KEY).and_then(|(_, v)| v.parse().ok());
        let size_bytes = recorded.unwrap_or_else(|| vm.disk().map_or(0, |d| d.disk_bytes().max(0) as u64));
        Ok(Some(Template { vm, template, size_bytes }))
    }

    async fn destroy(&self, vm: &MoRef) -> Result<(), ProviderError> {
        match self.soap.task_this("Destroy_Task", vm).await {
            Ok(_) => Ok(()),
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// Removes whatever an unfinished import or capture of `image_id` left.
    async fn remove_half_made(&self, image_id: &str) {
        match self.find_image(image_id).await {
            Ok(Some(t)) => {
                if let Err(e) = self.destroy(&t.vm.moref).await {
                    tracing::warn!(image_id, error = %e.message, "could not remove a half-made image");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(image_id, error = %e.message, "could not look for a half-made image"),
        }
    }

    fn image_info(&self, image_id: &str, size_bytes: u64) -> pb::ImageInfo {
        pb::ImageInfo { image_id: image_id.to_owned(), source: self.image_source(image_id), size_bytes }
    }

    /// ImportImage: the VMDK in `upload` becomes the template
    /// `hcp-image-<id>`.
    pub(crate) async fn image_import(&self, mut upload: ImageUpload) -> Result<pb::ImageInfo, ProviderError> {
        let header = upload.header().clone();
        let id = header.image_id.clone();
        if upload.format() != pb::DiskFormat::Vmdk {
            return Err(invalid(
                "format",
                format!("{:?} is not one of image_formats (VMDK)", upload.format()),
            ));
        }
        let _serial = self.locks.lock(&image_key(&id)).await;
        match self.find_image(&id).await? {
            Some(t) if t.template => {
                upload.drain().await?;
                return Ok(self.image_info(&id, t.size_bytes));
            }
            Some(t) => {
                tracing::info!(image_id = id, "replacing a half-made image");
                self.destroy(&t.vm.moref).await?;
            }
            None => {}
        }
        // The disk's header says its capacity; the template's disk is at
        // least that and min_disk_gib.
        let mut head = BytesMut::new();
        while head.len() < 512 {
            match upload.chunk().await? {
                Some(b) => head.extend_from_slice(&b),
                None => break,
            }
        }
        let capacity = vmdk_capacity(&head).ok_or_else(|| {
            invalid("format", "the image is not a sparse (streamOptimized) VMDK: no KDMV header")
        })?;
        let gib = capacity.div_ceil(GIB).max(u64::from(header.min_disk_gib)).max(1);
        let name = image_name(&id);
        let ovf = ovf_descriptor(&name, header.size_bytes, gib);
        let places = self.places().await?.clone();
        let datastore = self.import_datastore(&places).await?;
        let ovf_manager =
            self.soap.content().await.map_err(map_error)?.ovf_manager.clone().ok_or_else(|| {
                ProviderError::new(ErrorKind::Unsupported, "this vSphere endpoint has no OvfManager")
            })?;
        let req = vim::CreateImportSpec {
            xmlns: VIM25,
            this: &ovf_manager,
            ovf_descriptor: &ovf,
            resource_pool: &places.pool,
            datastore: &datastore,
            cisp: vim::ImportSpecParams {
                locale: "",
                deployment_option: "",
                entity_name: &name,
                disk_provisioning: "thin",
            },
        };
        let result: Xml = self.soap.invoke("CreateImportSpec", &req, true).await.map_err(map_error)?;
        if let Some(e) = result.child("error") {
            return Err(map_error(vim::fault_of(e)));
        }
        let spec = result.child("importSpec").ok_or_else(|| {
            ProviderError::new(ErrorKind::Internal, "CreateImportSpec answered no import spec")
        })?;
        let item = result.child("fileItem").ok_or_else(|| {
            ProviderError::new(ErrorKind::Internal, "CreateImportSpec answered no file to upload")
        })?;
        let (device_id, create) =
            (item.text_of("deviceId").to_owned(), item.text_of("create").trim() == "true");
        let body = format!(
            "<ImportVApp xmlns=\"{VIM25}\">{}{}{}</ImportVApp>",
            places.pool.render("_this"),
            spec.render("spec"),
            places.folder.render("folder"),
        );
        let lease = match self.soap.call_raw("ImportVApp", &body, false).await {
            Ok(text) => parse_returnval::<MoRef>(&text),
            Err(e) => Err(e),
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(e) => {
                // The answer may be lost while the VM was made.
                self.remove_half_made(&id).await;
                return Err(map_error(e));
            }
        };
        self.failpoints.hit("image-import:after-lease");
        // From here on, what was made goes again on any error.
        let made = async {
            let info = self.lease_ready(&lease).await?;
            let urls = vim::device_urls(&info);
            let target = urls
                .iter()
                .find(|u| u.import_key == device_id)
                .or_else(|| urls.iter().find(|u| u.disk))
                .ok_or_else(|| {
                    ProviderError::new(ErrorKind::Internal, "the import lease offers no disk to upload")
                })?
                .clone();
            self.send_disk(&lease, &target.url, create, header.size_bytes, head.freeze(), &mut upload)
                .await?;
            self.soap
                .invoke_this::<vim::Nothing>("HttpNfcLeaseComplete", &lease, false)
                .await
                .map_err(map_error)?;
            self.failpoints.hit("image-import:after-complete");
            let vm = info.moref_of("entity").ok_or_else(|| {
                ProviderError::new(ErrorKind::Internal, "the import lease names no virtual machine")
            })?;
            let mark = vim::ConfigSpec {
                annotation: Some(format!("HCP image {id} ({})", header.name)),
                extra_config: vec![
                    OptionValue::new(IMAGE_KEY, &id),
                    OptionValue::new(IMAGE_BYTES_KEY, &header.size_bytes.to_string()),
                ],
                ..Default::default()
            };
            let req = vim::ReconfigVm { xmlns: VIM25, this: &vm, spec: mark };
            self.soap.task("ReconfigVM_Task", &req).await.map_err(map_error)?;
            self.soap.invoke_this::<vim::Nothing>("MarkAsTemplate", &vm, false).await.map_err(map_error)?;
            Ok::<_, ProviderError>(())
        }
        .await;
        if let Err(e) = made {
            tracing::info!(image_id = id, error = %e.message, "import failed; removing what it made");
            if let Err(abort) =
                self.soap.invoke_this::<vim::Nothing>("HttpNfcLeaseAbort", &lease, false).await
            {
                tracing::debug!(error = %abort, "could not abort the import lease (it may have ended)");
            }
            self.remove_half_made(&id).await;
            return Err(e);
        }
        tracing::info!(image_id = id, capacity_gib = gib, "image imported as a template");
        Ok(self.image_info(&id, header.size_bytes))
    }

    /// The datastore an import goes to: the configured one, else the
    /// datacenter's first.
    async fn import_datastore(&self, places: &crate::inventory::Places) -> Result<MoRef, ProviderError> {
        if let Some(ds) = &places.datastore {
            return Ok(ds.clone());
        }
        self.properties(&places.datacenter, &["datastore"])
            .await
            .map_err(map_error)?
            .and_then(|o| {
                o.prop("datastore").and_then(|d| d.children.first().and_then(|c| MoRef::from_xml(c).ok()))
            })
            .ok_or_else(|| {
                ProviderError::new(ErrorKind::Unavailable, "the datacenter has no datastore for images")
            })
    }

    /// Waits until the lease is ready; its info.
    async fn lease_ready(&self, lease: &MoRef) -> Result<Xml, ProviderError> {
        let timeout = Duration::from_secs(self.config.timing.task_timeout_seconds);
        let state = self
            .soap
            .watch(lease, &["state"], timeout, |c| {
                c.val.as_ref().map(|v| v.text.trim().to_owned()).filter(|s| s == "ready" || s == "error")
            })
            .await
            .map_err(map_error)?
            .ok_or_else(|| {
                map_error(VimError::Timeout(format!("the import lease was not ready in {timeout:?}")))
            })?;
        let o = self.properties(lease, &["info", "error"]).await.map_err(map_error)?;
        let o = o.ok_or_else(|| ProviderError::new(ErrorKind::Internal, "the import lease vanished"))?;
        if state == "error" {
            let e = o.prop("error").map(vim::fault_of).unwrap_or_else(|| VimError::Fault {
                fault: "SystemError".into(),
                message: "the import lease failed".into(),
            });
            return Err(map_error(e));
        }
        o.prop("info")
            .cloned()
            .ok_or_else(|| ProviderError::new(ErrorKind::Internal, "the import lease has no info"))
    }

    /// Streams the image to `url` (POST of a stream-optimized VMDK, or PUT
    /// when the file item says `create`), `head` first. A piece is sent only
    /// once the next one arrived, so the last bytes go only after the SDK
    /// checked the whole image: a refused image never arrives whole.
    async fn send_disk(
        &self,
        lease: &MoRef,
        url: &str,
        create: bool,
        size: u64,
        head: Bytes,
        upload: &mut ImageUpload,
    ) -> Result<(), ProviderError> {
        use hyper::body::Frame;
        let https = self.soap.https();
        let url = url.replacen("https://*", &format!("https://{}", https.authority()), 1);
        let target = hcp_provider_sdk::kit::split_https_url(&url, 443, "/")
            .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("the lease's device URL: {e}")))?;
        let unavailable = |what: String| ProviderError::new(ErrorKind::Unavailable, what);
        let server_name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| unavailable(format!("device URL host {:?}: {e}", target.host)))?;
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| unavailable(format!("connect {}:{}: {e}", target.host, target.port)))?;
        let tls = https
            .connector()
            .connect(server_name, tcp)
            .await
            .map_err(|e| unavailable(format!("tls with {}: {e}", target.host)))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
        let frames = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let body = http_body_util::StreamBody::new(frames);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| unavailable(format!("http: {e}")))?;
        let conn = tokio::spawn(conn);
        let authority =
            if target.port == 443 { target.host.clone() } else { format!("{}:{}", target.host, target.port) };
        let mut req = http::Request::builder()
            .method(if create { http::Method::PUT } else { http::Method::POST })
            .uri(&target.path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_LENGTH, size)
            .header(http::header::CONTENT_TYPE, "application/x-vnd.vmware-streamVmdk");
        if create {
            req = req.header("overwrite", "t");
        }
        let req = req
            .body(body)
            .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("upload request: {e}")))?;
        let answer = tokio::spawn(async move {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let text = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            Ok::<_, hyper::Error>((status, text))
        });
        let fed = async {
            let (mut sent, mut reported) = (0u64, Instant::now());
            let mut held = Some(head).filter(|h| !h.is_empty());
            loop {
                let next = upload.chunk().await?;
                if let Some(piece) = held.take() {
                    sent += piece.len() as u64;
                    if tx.send(Ok(Frame::data(piece))).await.is_err() {
                        // The server ended the request early: its answer says why.
                        return Ok(());
                    }
                }
                match next {
                    Some(b) => held = Some(b),
                    None => return Ok(()),
                }
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    let percent = (sent.saturating_mul(100) / size.max(1)).min(99) as i32;
                    let p = vim::LeaseProgress { xmlns: VIM25, this: lease, percent };
                    if let Err(e) =
                        self.soap.invoke::<_, vim::Nothing>("HttpNfcLeaseProgress", &p, false).await
                    {
                        tracing::warn!(error = %e, "could not report the upload's progress");
                    }
                }
            }
        }
        .await;
        if let Err(e) = fed {
            // Cut the body short: the server never sees a whole disk.
            let _ = tx.try_send(Err(std::io::Error::other("the image was refused")));
            drop(tx);
            answer.abort();
            conn.abort();
            return Err(e);
        }
        drop(tx);
        // The whole body is sent: the answer comes at once, or something
        // is wrong on the other side.
        let patience = Duration::from_secs(self.config.timing.task_timeout_seconds);
        let Ok(result) = tokio::time::timeout(patience, answer).await else {
            conn.abort();
            return Err(map_error(VimError::Timeout(format!(
                "the disk upload got no answer in {patience:?}"
            ))));
        };
        conn.abort();
        match result {
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, text))) => Err(unavailable(format!(
                "uploading the disk: HTTP {status}: {}",
                String::from_utf8_lossy(&text[..text.len().min(200)])
            ))),
            Ok(Err(e)) => Err(unavailable(format!("uploading the disk: {e}"))),
            Err(e) => Err(ProviderError::new(ErrorKind::Internal, format!("the upload task failed: {e}"))),
        }
    }

    /// CaptureImage: a stopped VM cloned into the template
    /// `hcp-image-<id>`; the VM stays as it was.
    pub(crate) async fn image_capture(
        &self,
        req: pb::CaptureImageRequest,
    ) -> Result<pb::ImageInfo, ProviderError> {
        check_image_id(&req.image_id)?;
        if !is_uuid(&req.vm_id) {
            return Err(invalid("vm_id", "must be a UUID"));
        }
        let _image = self.locks.lock(&image_key(&req.image_id)).await;
        let _serial = self.locks.lock(&req.vm_id).await;
        // A captured image is answered even when its VM is gone since.
        let half_made = match self.find_image(&req.image_id).await? {
            Some(t) if t.template => return Ok(self.image_info(&req.image_id, t.size_bytes)),
            Some(t) => Some(t.vm.moref),
            None => None,
        };
        let vm = self.require(&req.vm_id).await?;
        if let Some(moref) = half_made {
            self.destroy(&moref).await?;
        }
        if vm.power != "poweredOff" {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not stopped: only a stopped VM is captured", req.vm_id),
            ));
        }
        let root = vm.disk().ok_or_else(|| {
            ProviderError::new(ErrorKind::InvalidState, format!("vm {} has no disk to capture", req.vm_id))
        })?;
        let size = root.disk_bytes().max(0) as u64;
        // The image is the root disk: the VM's other disks (data volumes)
        // are left out of the clone's configuration, so not copied.
        let others: Vec<vim::DeviceChange> = vm
            .devices
            .iter()
            .filter(|d| d.is_disk() && d.key != root.key)
            .map(|d| vim::DeviceChange::new("remove", d.clone()))
            .collect();
        let places = self.places().await?.clone();
        let name = image_name(&req.image_id);
        let clone = vim::CloneVm {
            xmlns: VIM25,
            this: &vm.moref,
            folder: &places.folder,
            name: &name,
            spec: vim::CloneSpec {
                // A template belongs to no resource pool.
                location: vim::RelocateSpec { datastore: places.datastore.clone(), pool: None, host: None },
                template: true,
                config: vim::ConfigSpec {
                    annotation: Some(format!(
                        "HCP image {} ({}) of vm {}",
                        req.image_id, req.name, req.vm_id
                    )),
                    extra_config: vec![
                        OptionValue::new(IMAGE_KEY, &req.image_id),
                        OptionValue::new(IMAGE_BYTES_KEY, &size.to_string()),
                    ],
                    device_change: others,
                    ..Default::default()
                },
                power_on: false,
            },
        };
        if let Err(e) = self.soap.task("CloneVM_Task", &clone).await {
            self.remove_half_made(&req.image_id).await;
            return Err(map_error(e));
        }
        self.failpoints.hit("capture:after-clone");
        tracing::info!(image_id = req.image_id, vm_id = req.vm_id, vm = vm_name(&req.vm_id), "captured");
        Ok(self.image_info(&req.image_id, size))
    }

    /// DeleteImage: the template goes; false when there was none.
    pub(crate) async fn image_delete(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        check_image_id(&req.image_id)?;
        let _serial = self.locks.lock(&image_key(&req.image_id)).await;
        let Some(t) = self.find_image(&req.image_id).await? else { return Ok(false) };
        self.destroy(&t.vm.moref).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmdk_header_says_its_capacity() {
        let mut head = b"KDMV".to_vec();
        head.extend(3u32.to_le_bytes());
        head.extend(0u32.to_le_bytes());
        head.extend((2048u64 * 1024).to_le_bytes());
        assert_eq!(vmdk_capacity(&head), Some(GIB));
        assert_eq!(vmdk_capacity(&head[..19]), None);
        assert_eq!(vmdk_capacity(b"QFI\xfb............................"), None);
    }

    #[test]
    fn the_descriptor_names_one_disk_of_the_capacity() {
        let ovf = ovf_descriptor("hcp-image-x", 1234, 3);
        let doc = roxmltree::Document::parse(&ovf).unwrap();
        let ovf_ns = "http://schemas.dmtf.org/ovf/envelope/1";
        let disk = doc.descendants().find(|n| n.has_tag_name((ovf_ns, "Disk"))).unwrap();
        assert_eq!(disk.attribute((ovf_ns, "capacity")), Some("3"));
        let file = doc.descendants().find(|n| n.has_tag_name((ovf_ns, "File"))).unwrap();
        assert_eq!(file.attribute((ovf_ns, "size")), Some("1234"));
    }
}
