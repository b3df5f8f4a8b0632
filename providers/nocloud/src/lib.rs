//! The cloud-init NoCloud seed: an ISO 9660 image labelled `cidata` holding
//! `meta-data` (instance id, hostname, the SSH `public-keys` the guest
//! authorizes) and `user-data` (the tenant's, as given; cloud-init merges
//! the meta-data keys with any the user data adds). Built with genisoimage into a temporary file and renamed into
//! place, so a crash never leaves a half-written seed behind.

use std::path::Path;

/// Why a seed could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Writing the inputs failed.
    #[error("cannot write the seed files in {dir}")]
    Io {
        /// Where.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// genisoimage is missing or failed.
    #[error("genisoimage failed: {0}")]
    Tool(String),
}

/// The `meta-data` document: each public key (an OpenSSH line) one
/// double-quoted item of `public-keys`, so no key text can change the
/// document's shape.
pub fn meta_data(vm_id: &str, hostname: &str, public_keys: &[String]) -> String {
    let mut out = format!("instance-id: {vm_id}\n");
    if !hostname.is_empty() {
        out.push_str(&format!("local-hostname: {}\n", yaml_scalar(hostname)));
    }
    if !public_keys.is_empty() {
        out.push_str("public-keys:\n");
        for key in public_keys {
            out.push_str(&format!("  - {}\n", quoted(key.trim())));
        }
    }
    out
}

/// A YAML scalar: plain when it is a hostname-like word, else double-quoted
/// (JSON string syntax is valid YAML).
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        && !s.starts_with(['-', '.']);
    if plain { s.to_owned() } else { quoted(s) }
}

/// A double-quoted YAML scalar (JSON string syntax, which is valid YAML).
fn quoted(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Whether genisoimage can be run.
pub fn tool_available() -> bool {
    std::process::Command::new("genisoimage")
        .arg("-version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Writes `dest` (an ISO) from the documents, atomically.
pub async fn build(
    dest: &Path,
    vm_id: &str,
    hostname: &str,
    user_data: &str,
    public_keys: &[String],
) -> Result<(), SeedError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let work = dir.join(".seed-src");
    let io = |source| SeedError::Io { dir: dir.display().to_string(), source };
    tokio::fs::create_dir_all(&work).await.map_err(io)?;
    tokio::fs::write(work.join("meta-data"), meta_data(vm_id, hostname, public_keys)).await.map_err(io)?;
    let user_data = if user_data.is_empty() { "#cloud-config\n{}\n" } else { user_data };
    tokio::fs::write(work.join("user-data"), user_data).await.map_err(io)?;
    let tmp = dir.join(".seed.iso.tmp");
    let out = tokio::process::Command::new("genisoimage")
        .arg("-quiet")
        .arg("-output")
        .arg(&tmp)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(work.join("user-data"))
        .arg(work.join("meta-data"))
        .output()
        .await
        .map_err(|e| SeedError::Tool(e.to_string()))?;
    if !out.status.success() {
        return Err(SeedError::Tool(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    tokio::fs::rename(&tmp, dest).await.map_err(io)?;
    let _ = tokio::fs::remove_dir_all(&work).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_quotes_what_is_not_a_hostname() {
        assert_eq!(meta_data("id-1", "web-1", &[]), "instance-id: id-1\nlocal-hostname: web-1\n");
        assert_eq!(meta_data("id-1", "", &[]), "instance-id: id-1\n");
        assert_eq!(
            meta_data("id-1", "a: b\n\"c\"", &[]),
            "instance-id: id-1\nlocal-hostname: \"a: b\\u000a\\\"c\\\"\"\n"
        );
        assert_eq!(meta_data("id-1", "-x", &[]), "instance-id: id-1\nlocal-hostname: \"-x\"\n");
    }

    #[test]
    fn public_keys_are_a_list_of_quoted_lines() {
        let keys = vec![
            "ssh-ed25519 AAAAC3Nza alice@example\n".to_owned(),
            "ssh-rsa AAAAB3 \"odd\" # comment: x".to_owned(),
        ];
        assert_eq!(
            meta_data("id-1", "web-1", &keys),
            "instance-id: id-1\nlocal-hostname: web-1\npublic-keys:\n  \
             - \"ssh-ed25519 AAAAC3Nza alice@example\"\n  \
             - \"ssh-rsa AAAAB3 \\\"odd\\\" # comment: x\"\n"
        );
    }
}
