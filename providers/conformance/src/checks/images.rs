//! Images: ImportImage (the bytes checked, idempotent, a source CreateVm
//! takes, DeleteImage idempotent) and CaptureImage (of a stopped VM only,
//! idempotent, a source CreateVm takes), or both refused as UNIMPLEMENTED
//! when not declared.
//!
//! The kit imports a small blank disk: 1 MiB of zeros, raw, converted with
//! `qemu-img` when the provider's first format is another one (so checking
//! such a provider needs qemu-img on the kit's machine).

use hcp_proto::provider::{
    CaptureImageRequest, CreateVmRequest, DeleteImageRequest, DiskFormat, ImageInfo, ImageRef,
    ImportImageChunk, ImportImageHeader, StopVmRequest, VmRef, import_image_chunk::Part,
};
use sha2::{Digest, Sha256};

use crate::kit::{CheckError, CheckResult, Kit, call, ensure, expect_code};

/// The blank disk's size.
const BLANK_BYTES: usize = 1 << 20;

/// A blank disk in `format`, made from raw zeros by qemu-img.
fn blank_disk(format: DiskFormat) -> Result<Vec<u8>, CheckError> {
    let raw = vec![0u8; BLANK_BYTES];
    let target = match format {
        DiskFormat::Raw => return Ok(raw),
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Vmdk => "vmdk",
        DiskFormat::Vhdx => "vhdx",
        DiskFormat::Unspecified => {
            return Err(CheckError::Violation("image_formats names DISK_FORMAT_UNSPECIFIED".into()));
        }
    };
    let dir = std::env::temp_dir().join(format!("hcp-conformance-{}", uuid::Uuid::now_v7()));
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        CheckError::Violation(format!("the kit cannot make a {target} disk ({what}: {e}); it needs qemu-img"))
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail("temp dir", &e))?;
    let (src, dst) = (dir.join("blank.raw"), dir.join(format!("blank.{target}")));
    let made = (|| {
        std::fs::write(&src, &raw).map_err(|e| fail("write", &e))?;
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["convert", "-q", "-f", "raw", "-O", target]);
        if target == "vmdk" {
            cmd.args(["-o", "subformat=streamOptimized"]);
        }
        let out = cmd.arg(&src).arg(&dst).output().map_err(|e| fail("qemu-img", &e))?;
        if !out.status.success() {
            return Err(fail("qemu-img", &String::from_utf8_lossy(&out.stderr)));
        }
        std::fs::read(&dst).map_err(|e| fail("read", &e))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    made
}

/// The messages of an ImportImage of `bytes`, announcing `size` and
/// `sha256`.
fn stream(id: &str, format: DiskFormat, bytes: &[u8], size: u64, sha256: String) -> Vec<ImportImageChunk> {
    let header = ImportImageHeader {
        image_id: id.to_owned(),
        name: "conformance".to_owned(),
        format: format as i32,
        size_bytes: size,
        sha256,
        min_disk_gib: 1,
    };
    let mut out = vec![ImportImageChunk { part: Some(Part::Header(header)) }];
    out.extend(bytes.chunks(256 << 10).map(|c| ImportImageChunk { part: Some(Part::Data(c.to_vec())) }));
    out
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Kit {
    /// Runs the image checks as the capabilities say.
    pub(crate) async fn images(&mut self) {
        let caps = self.caps.clone();
        const IMPORT: &str =
            "image import: bytes checked, idempotent, a source CreateVm takes, delete idempotent";
        if caps.supports_image_import {
            let r = self.import_checks().await;
            self.record(IMPORT, r);
        } else {
            self.skip(IMPORT, "the provider does not declare supports_image_import");
            let id = uuid::Uuid::now_v7().to_string();
            let r = expect_code(
                self.compute
                    .import_image(futures_stream(stream(&id, DiskFormat::Raw, b"", 0, digest(b""))))
                    .await,
                tonic::Code::Unimplemented,
                "ImportImage without the capability",
            );
            self.record("image import refused as UNIMPLEMENTED", r);
        }
        const CAPTURE: &str = "capture: a stopped VM only, idempotent, a source CreateVm takes";
        if caps.supports_capture {
            let r = self.capture_checks().await;
            self.record(CAPTURE, r);
        } else {
            self.skip(CAPTURE, "the provider does not declare supports_capture");
            let id = uuid::Uuid::now_v7().to_string();
            let req = CaptureImageRequest { vm_id: id.clone(), image_id: id, name: "x".into() };
            let r = expect_code(
                self.compute.capture_image(req).await,
                tonic::Code::Unimplemented,
                "CaptureImage without the capability",
            );
            self.record("capture refused as UNIMPLEMENTED", r);
        }
    }

    async fn import(
        &mut self,
        messages: Vec<ImportImageChunk>,
    ) -> Result<tonic::Response<ImageInfo>, tonic::Status> {
        self.compute.import_image(futures_stream(messages)).await
    }

    async fn import_checks(&mut self) -> CheckResult {
        let format = self.caps.image_formats().next().unwrap_or(DiskFormat::Unspecified);
        ensure(format != DiskFormat::Unspecified, || {
            "supports_image_import is declared with no image_formats".to_owned()
        })?;
        let bytes = blank_disk(format)?;
        let id = uuid::Uuid::now_v7().to_string();
        let size = bytes.len() as u64;
        let wrong = digest(b"not these bytes");
        let r = self.import(stream(&id, format, &bytes, size, wrong)).await;
        expect_code(r, tonic::Code::InvalidArgument, "ImportImage whose bytes do not match its sha256")?;
        let r = self.import(stream(&id, format, &bytes, size + 1, digest(&bytes))).await;
        expect_code(r, tonic::Code::InvalidArgument, "ImportImage that ends short of its size")?;
        // What the failures left must not stand in the way.
        let first = self
            .import(stream(&id, format, &bytes, size, digest(&bytes)))
            .await
            .map_err(call("ImportImage after two refused tries with the same id"))?
            .into_inner();
        let result = self.use_image(&id, &first).await;
        let again = self.import(stream(&id, format, &bytes, size, digest(&bytes))).await;
        let deleted = self.delete_image(&id, &first.source).await;
        result?;
        let again = again.map_err(call("ImportImage again"))?.into_inner();
        ensure(again.source == first.source, || {
            format!("ImportImage again answered source {:?}, first {:?}", again.source, first.source)
        })?;
        ensure(deleted? == (true, false), || {
            "DeleteImage twice must answer existed true, then false".to_owned()
        })
    }

    /// The image answers its id and a source, and CreateVm takes it.
    async fn use_image(&mut self, id: &str, info: &ImageInfo) -> CheckResult {
        ensure(info.image_id == id && !info.source.is_empty(), || {
            format!("the image {id} was answered as {info:?}")
        })?;
        let vm = uuid::Uuid::now_v7().to_string();
        self.created.push(vm.clone());
        let mut spec = self.spec("conf-image", None);
        spec.image = Some(ImageRef { name: "conformance".into(), source: info.source.clone() });
        self.compute
            .create_vm(CreateVmRequest { vm_id: vm.clone(), spec: Some(spec), start: false })
            .await
            .map_err(call("CreateVm from the image"))?;
        self.compute
            .delete_vm(VmRef { vm_id: vm })
            .await
            .map_err(call("DeleteVm of the VM from the image"))?;
        Ok(())
    }

    async fn delete_image(&mut self, id: &str, source: &str) -> Result<(bool, bool), CheckError> {
        let mut existed = Vec::new();
        for n in ["DeleteImage", "DeleteImage again"] {
            let req = DeleteImageRequest { image_id: id.to_owned(), source: source.to_owned() };
            existed.push(self.compute.delete_image(req).await.map_err(call(n))?.into_inner().existed);
        }
        Ok((existed[0], existed[1]))
    }

    async fn capture_checks(&mut self) -> CheckResult {
        let (vm, _) = self.create("conf-capture", None).await?;
        self.compute.start_vm(VmRef { vm_id: vm.clone() }).await.map_err(call("StartVm"))?;
        let id = uuid::Uuid::now_v7().to_string();
        let req = CaptureImageRequest { vm_id: vm.clone(), image_id: id.clone(), name: "conf".into() };
        let r = self.compute.capture_image(req.clone()).await;
        expect_code(r, tonic::Code::FailedPrecondition, "CaptureImage of a running VM")?;
        let stop = StopVmRequest { vm_id: vm.clone(), force: true, timeout_seconds: 0 };
        self.compute.stop_vm(stop).await.map_err(call("StopVm"))?;
        let first = self.compute.capture_image(req.clone()).await.map_err(call("CaptureImage"))?.into_inner();
        let result = self.use_image(&id, &first).await;
        let again = self.compute.capture_image(req).await;
        let deleted = self.delete_image(&id, &first.source).await;
        result?;
        let again = again.map_err(call("CaptureImage again"))?.into_inner();
        ensure(again.source == first.source, || {
            format!("CaptureImage again answered source {:?}, first {:?}", again.source, first.source)
        })?;
        ensure(deleted? == (true, false), || {
            "DeleteImage twice must answer existed true, then false".to_owned()
        })?;
        let unknown = uuid::Uuid::now_v7().to_string();
        let req = CaptureImageRequest {
            vm_id: unknown,
            image_id: uuid::Uuid::now_v7().to_string(),
            name: "x".into(),
        };
        expect_code(
            self.compute.capture_image(req).await,
            tonic::Code::NotFound,
            "CaptureImage of an unknown VM",
        )
    }
}

fn futures_stream(
    messages: Vec<ImportImageChunk>,
) -> impl tonic::IntoStreamingRequest<Message = ImportImageChunk> {
    tokio_stream::iter(messages)
}
