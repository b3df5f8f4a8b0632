//! `hcp image`: the images a project can create VMs from (the public
//! catalog and the project's private images, made with `hcp vm capture`),
//! and deleting a private one. Operators import and back images with
//! `hcp ops image`.

use clap::Subcommand;

use crate::client::Client;
use crate::human::{Common, T, Wait, follow_path};
use crate::output;

/// What a listing shows of an image (tenants never see backings).
pub(crate) const COLUMNS: &[&str] =
    &["name", "status", "visibility", "os_type", "os_version", "architecture", "min_disk_gib", "size_bytes"];

/// `hcp image`.
#[derive(Subcommand, Debug)]
pub enum Image {
    /// The public images and the project's private ones.
    List {
        /// Only images in this state (IMPORTING, AVAILABLE, ERROR, DELETING).
        #[arg(long)]
        status: Option<String>,
    },
    /// One image: the project's private one of that name, else the public one.
    Show { name: String },
    /// Delete one of the project's private images (a job removes it from its provider).
    Delete {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `hcp image ...`.
pub async fn image(common: Common, cmd: Image) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    let project = c.project()?.to_owned();
    match cmd {
        Image::List { status } => {
            let mut path = format!("/api/hcp/common/v1/images?project_id={project}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", crate::human::enc(&s)));
            }
            let v = c.call("GET", &path, None).await?;
            output::print(out, &v, Some("images"), COLUMNS);
        }
        Image::Show { name } => {
            let v = c
                .call("GET", &format!("/api/hcp/common/v1/images/{name}?project_id={project}"), None)
                .await?;
            output::print(out, &v, None, &[COLUMNS, &["image_id", "error_message", "created_at"]].concat());
        }
        Image::Delete { name, wait } => {
            let v = c.call("DELETE", &format!("{T}/projects/{project}/images/{name}"), None).await?;
            match v["job_id"].as_str().filter(|j| !j.is_empty()) {
                Some(job) if wait.wait => {
                    let done = follow_path(
                        &c,
                        &format!("{T}/jobs/{job}"),
                        std::time::Duration::from_secs(wait.timeout),
                    )
                    .await?;
                    output::print(out, &done, None, &["job_id", "kind", "status"]);
                }
                _ => output::print(out, &v, None, &["image_id", "job_id"]),
            }
        }
    }
    Ok(())
}
