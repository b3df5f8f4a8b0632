//! The image lifecycle beside the VM's: what an import, a capture or a
//! deletion does to its image when it ends (`image_change`), which images
//! a deletion may take (`accept_image_delete`), which images a create may
//! use (`usable`), and the formats an import may name (`ImportFormat`).
//! Table-tested with literal rows.

use hcp_proto::ids::JobId;

use super::{JobParams, Outcome};
use crate::model::{DiskFormat, Image, ImageStatus, JobKind};

/// What finishing an image job (or a capture) does to its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageChange {
    /// The image takes this state and is released from the job (its
    /// `job_id` cleared); ERROR keeps the job's error message.
    Status(ImageStatus),
    /// The image is gone: its row and backings are removed.
    Removed,
}

/// What `outcome` does to the image of a job of `kind`; `None` for jobs
/// without one and for retries (the image stays held).
pub fn image_change(kind: JobKind, outcome: Outcome, params: &JobParams) -> Option<ImageChange> {
    if matches!(outcome, Outcome::Retry(_)) {
        return None;
    }
    let ok = matches!(outcome, Outcome::Succeeded { .. });
    match kind {
        JobKind::ImportImage | JobKind::CaptureVm => {
            Some(ImageChange::Status(if ok { ImageStatus::Available } else { ImageStatus::Error }))
        }
        JobKind::DeleteImage => Some(match outcome {
            Outcome::Succeeded { .. } => ImageChange::Removed,
            // Cancelled before it ran: nothing was removed.
            Outcome::Cancelled => ImageChange::Status(match params {
                JobParams::DeleteImage { was_available: true } => ImageStatus::Available,
                _ => ImageStatus::Error,
            }),
            // Some providers may have removed theirs already.
            Outcome::Failed(_) | Outcome::Interrupted(_) | Outcome::Retry(_) => {
                ImageChange::Status(ImageStatus::Error)
            }
        }),
        _ => None,
    }
}

/// Why an image cannot be deleted now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRefusal {
    /// A job is importing, capturing or deleting it.
    Busy(JobId),
}

/// Decides whether an image in `status`, held by `job`, may be deleted;
/// returns whether it was AVAILABLE (where a cancelled deletion returns it).
pub fn accept_image_delete(status: ImageStatus, job: Option<JobId>) -> Result<bool, ImageRefusal> {
    match (status, job) {
        (_, Some(job)) => Err(ImageRefusal::Busy(job)),
        (ImageStatus::Available, None) => Ok(true),
        // An image left IMPORTING or DELETING without a job (an earlier
        // build's crash) is deleted like an ERROR one.
        (ImageStatus::Error | ImageStatus::Importing | ImageStatus::Deleting, None) => Ok(false),
    }
}

/// Why a create cannot use an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// It is not AVAILABLE.
    Status(ImageStatus),
}

/// Whether a create may use `image` (placement then keeps to the
/// providers it has a backing on).
pub fn usable(image: &Image) -> Result<(), Unusable> {
    match image.status {
        ImageStatus::Available => Ok(()),
        other => Err(Unusable::Status(other)),
    }
}

/// The format of the file an import fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// A disk as it is.
    Disk(DiskFormat),
    /// An OVF package (a tar): its first disk, a VMDK, is the image.
    Ova,
}

impl ImportFormat {
    /// Every name an import may give.
    pub const NAMES: &'static [&'static str] = &["qcow2", "raw", "vmdk", "vhdx", "ova"];

    /// The format named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ova" => Some(ImportFormat::Ova),
            other => DiskFormat::parse(other).map(ImportFormat::Disk),
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportFormat::Disk(d) => d.as_str(),
            ImportFormat::Ova => "ova",
        }
    }

    /// The format of the disk the file holds.
    pub fn disk(self) -> DiskFormat {
        match self {
            ImportFormat::Disk(d) => d,
            ImportFormat::Ova => DiskFormat::Vmdk,
        }
    }
}

/// The format a provider that takes `formats` (preferred first) is sent.
pub fn target_format(formats: &[DiskFormat]) -> Option<DiskFormat> {
    formats.first().copied()
}

#[cfg(test)]
mod tests {
    use hcp_proto::error::ErrorCode;

    use super::*;
    use crate::lifecycle::Step;

    #[test]
    fn an_image_job_ends_its_image_per_kind_and_outcome() {
        use ImageChange::{Removed, Status};
        use ImageStatus::{Available, Error};
        use JobKind as K;
        let ok = Outcome::Succeeded { power: None };
        let fail = Outcome::Failed(ErrorCode::Internal);
        let retry = Outcome::Retry(ErrorCode::Unavailable);
        let cut = Outcome::Interrupted(Step::ImageImport);
        let was = |available| JobParams::DeleteImage { was_available: available };
        #[rustfmt::skip]
        let rows: &[(JobKind, Outcome, JobParams, Option<ImageChange>)] = &[
            (K::ImportImage, ok, JobParams::None, Some(Status(Available))),
            (K::ImportImage, fail, JobParams::None, Some(Status(Error))),
            (K::ImportImage, retry, JobParams::None, None),
            (K::ImportImage, Outcome::Cancelled, JobParams::None, Some(Status(Error))),
            (K::ImportImage, cut, JobParams::None, Some(Status(Error))),
            (K::CaptureVm, ok, JobParams::None, Some(Status(Available))),
            (K::CaptureVm, fail, JobParams::None, Some(Status(Error))),
            (K::CaptureVm, retry, JobParams::None, None),
            (K::CaptureVm, Outcome::Cancelled, JobParams::None, Some(Status(Error))),
            (K::DeleteImage, ok, was(true), Some(Removed)),
            (K::DeleteImage, fail, was(true), Some(Status(Error))),
            (K::DeleteImage, retry, was(true), None),
            (K::DeleteImage, Outcome::Cancelled, was(true), Some(Status(Available))),
            (K::DeleteImage, Outcome::Cancelled, was(false), Some(Status(Error))),
            (K::DeleteImage, cut, was(true), Some(Status(Error))),
            (K::StartVm, ok, JobParams::None, None),
            (K::CreateVolume, fail, JobParams::None, None),
        ];
        for (kind, outcome, params, want) in rows {
            assert_eq!(image_change(*kind, *outcome, params), *want, "{kind} {outcome:?} {params:?}");
        }
    }

    #[test]
    fn a_deletion_takes_an_image_without_a_job_in_any_state() {
        let job = JobId::new();
        #[rustfmt::skip]
        let rows: &[(ImageStatus, Option<JobId>, Result<bool, ImageRefusal>)] = &[
            (ImageStatus::Available, None, Ok(true)),
            (ImageStatus::Error, None, Ok(false)),
            (ImageStatus::Importing, None, Ok(false)),
            (ImageStatus::Deleting, None, Ok(false)),
            (ImageStatus::Available, Some(job), Err(ImageRefusal::Busy(job))),
            (ImageStatus::Importing, Some(job), Err(ImageRefusal::Busy(job))),
        ];
        for (status, held, want) in rows {
            assert_eq!(accept_image_delete(*status, *held), *want, "{status} {held:?}");
        }
    }

    #[test]
    fn import_formats_name_the_disk_they_hold() {
        let rows = [
            ("qcow2", Some(DiskFormat::Qcow2)),
            ("raw", Some(DiskFormat::Raw)),
            ("vmdk", Some(DiskFormat::Vmdk)),
            ("vhdx", Some(DiskFormat::Vhdx)),
            ("ova", Some(DiskFormat::Vmdk)),
            ("iso", None),
            ("QCOW2", None),
        ];
        for (name, disk) in rows {
            assert_eq!(ImportFormat::parse(name).map(ImportFormat::disk), disk, "{name}");
        }
        for name in ImportFormat::NAMES {
            assert_eq!(ImportFormat::parse(name).map(ImportFormat::as_str), Some(*name));
        }
        assert_eq!(target_format(&[DiskFormat::Vmdk, DiskFormat::Raw]), Some(DiskFormat::Vmdk));
        assert_eq!(target_format(&[]), None);
    }
}
