//! `hcp keypair`: a project's SSH key pairs (public keys imported into HCP,
//! which never sees a private key), named at VM create with
//! `hcp vm create ... --key NAME`.

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::human::{Common, T};
use crate::output;

const COLUMNS: &[&str] = &["name", "key_type", "bits", "fingerprint", "comment", "created_at"];

/// `hcp keypair`.
#[derive(Subcommand, Debug)]
pub enum KeyPair {
    /// Import a public key (`ssh-keygen -t ed25519` writes one to `~/.ssh/id_ed25519.pub`).
    Create {
        name: String,
        /// The OpenSSH public key file (one line).
        #[arg(long)]
        public_key_file: std::path::PathBuf,
    },
    /// The project's key pairs.
    List,
    /// One key pair, with its public key.
    Show { name: String },
    /// Delete a key pair (VMs created with it keep the key).
    Delete { name: String },
}

/// `hcp keypair ...`.
pub async fn keypair(common: Common, cmd: KeyPair) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    let project = c.project()?.to_owned();
    let keys = format!("{T}/projects/{project}/key-pairs");
    match cmd {
        KeyPair::Create { name, public_key_file } => {
            let public_key = std::fs::read_to_string(&public_key_file)
                .with_context(|| format!("cannot read {}", public_key_file.display()))?;
            let body = json!({"name": name, "public_key": public_key});
            let v = c.call("POST", &keys, Some(&body)).await?;
            output::print(out, &v, None, COLUMNS);
        }
        KeyPair::List => {
            let v = c.call("GET", &keys, None).await?;
            output::print(out, &v, Some("key_pairs"), COLUMNS);
        }
        KeyPair::Show { name } => {
            let v = c.call("GET", &format!("{keys}/{name}"), None).await?;
            output::print(
                out,
                &v,
                None,
                &["name", "key_type", "bits", "fingerprint", "comment", "public_key"],
            );
        }
        KeyPair::Delete { name } => {
            c.call("DELETE", &format!("{keys}/{name}"), None).await?;
            eprintln!("deleted key pair {name}");
        }
    }
    Ok(())
}
