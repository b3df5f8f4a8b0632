//! Secrets in a provider's configuration: a value given inline (`password`)
//! or read from a file (`password_file`, trimmed), and the error that names
//! which field is missing or which file could not be read.

use std::path::{Path, PathBuf};

/// A secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file named by `field` could not be read.
    #[error("{field} {}", path.display())]
    Read {
        /// The field naming the file (`auth.password_file`).
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `field` is needed because `with` is set.
    #[error("{field}: required with {with}")]
    Missing {
        /// The missing field (`auth.password`).
        field: &'static str,
        /// The field that needs it (`auth.username`).
        with: &'static str,
    },
}

/// Where one secret comes from: the fields that may hold it.
#[derive(Debug, Clone, Copy)]
pub struct Secret<'a> {
    /// The inline value's field (`auth.password`).
    pub field: &'static str,
    /// The inline value.
    pub inline: Option<&'a str>,
    /// The file's field (`auth.password_file`).
    pub file_field: &'static str,
    /// The file.
    pub file: Option<&'a Path>,
}

impl Secret<'_> {
    /// The inline value, else the file's content (trimmed), else `None`.
    pub fn read(&self) -> Result<Option<String>, SecretError> {
        match (self.inline, self.file) {
            (Some(v), _) => Ok(Some(v.to_owned())),
            (None, Some(path)) => {
                std::fs::read_to_string(path).map(|text| Some(text.trim().to_owned())).map_err(|source| {
                    SecretError::Read { field: self.file_field, path: path.to_owned(), source }
                })
            }
            (None, None) => Ok(None),
        }
    }

    /// [`Secret::read`], required because the field `with` is set.
    pub fn require(&self, with: &'static str) -> Result<String, SecretError> {
        self.read()?.ok_or(SecretError::Missing { field: self.field, with })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_file_and_missing() {
        let dir = std::env::temp_dir().join(format!("hcp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let secret =
            |inline, file| Secret { field: "auth.password", inline, file_field: "auth.password_file", file };
        assert_eq!(secret(Some("inline"), Some(file.as_path())).require("auth.username").unwrap(), "inline");
        assert_eq!(secret(None, Some(file.as_path())).require("auth.username").unwrap(), "s3cret");
        assert_eq!(secret(None, None).read().unwrap(), None);
        let missing = secret(None, None).require("auth.username").unwrap_err();
        assert_eq!(missing.to_string(), "auth.password: required with auth.username");
        let gone = dir.join("gone");
        let unreadable = secret(None, Some(gone.as_path())).read().unwrap_err();
        assert_eq!(unreadable.to_string(), format!("auth.password_file {}", gone.display()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
