//! Input validation shared by the services. Every check names the field it
//! is about, with the field's name as it appears in the request.

use std::str::FromStr;

use hcp_proto::error::ApiError;

/// Most metadata entries on a VM.
pub const MAX_METADATA: usize = 64;
/// Most tags on a VM.
pub const MAX_TAGS: usize = 32;
/// Largest user data, bytes.
pub const MAX_USER_DATA: usize = 64 * 1024;

/// Parses a typed id, naming `field` on failure.
pub fn id<T: FromStr>(field: &str, value: &str) -> Result<T, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid_field(field, format!("{field} is required")));
    }
    value
        .parse()
        .map_err(|_| ApiError::invalid_field(field, format!("{field} must be a UUID, got {value:?}")))
}

/// A required non-empty string.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.trim().is_empty() {
        Err(ApiError::invalid_field(field, format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// A DNS-label-like name: 1 to 63 of `[a-z0-9-]` (any case), starting with a
/// letter, not ending with '-'.
pub fn label(field: &str, value: &str) -> Result<(), ApiError> {
    required(field, value)?;
    let ok = value.len() <= 63
        && value.starts_with(|c: char| c.is_ascii_alphabetic())
        && !value.ends_with('-')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            field,
            format!(
                "{field} must be 1 to 63 letters, digits or '-', start with a letter and not end \
                 with '-', got {value:?}"
            ),
        ))
    }
}

/// A project id: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn project_id(value: &str) -> Result<(), ApiError> {
    required("project_id", value)?;
    if value.len() <= 64 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "project_id",
            format!("project_id must be 1 to 64 letters, digits, '.', '_' or '-', got {value:?}"),
        ))
    }
}

/// A tag: 1 to 64 printable characters without spaces or commas.
pub fn tag(field: &str, value: &str) -> Result<(), ApiError> {
    let ok =
        !value.is_empty() && value.len() <= 64 && value.chars().all(|c| c.is_ascii_graphic() && c != ',');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            field,
            format!("{field} must be 1 to 64 printable characters without spaces or commas, got {value:?}"),
        ))
    }
}

/// Metadata: at most [`MAX_METADATA`] entries, keys 1 to 128 characters and
/// not in the reserved `hcp.` namespace, values at most 1024 characters.
pub fn metadata<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> Result<(), ApiError> {
    let mut n = 0;
    for (k, v) in entries {
        n += 1;
        if k.is_empty() || k.len() > 128 {
            return Err(ApiError::invalid_field(
                "metadata",
                format!("metadata keys must be 1 to 128 characters, got {k:?}"),
            ));
        }
        if k.starts_with("hcp.") {
            return Err(ApiError::invalid_field(
                "metadata",
                format!("metadata key {k:?} is in the reserved hcp. namespace"),
            ));
        }
        if v.len() > 1024 {
            return Err(ApiError::invalid_field(
                "metadata",
                format!("metadata value of {k:?} is longer than 1024 characters"),
            ));
        }
    }
    if n > MAX_METADATA {
        return Err(ApiError::invalid_field(
            "metadata",
            format!("at most {MAX_METADATA} metadata entries are allowed, got {n}"),
        ));
    }
    Ok(())
}

/// Page size: 0 means `default`; otherwise 1 to 1000.
pub fn page_size(value: u32, default: u32) -> Result<u32, ApiError> {
    match value {
        0 => Ok(default),
        1..=1000 => Ok(value),
        _ => Err(ApiError::invalid_field("page_size", format!("page_size must be 1 to 1000, got {value}"))),
    }
}

/// A page token, which must be one HCP issued.
pub fn page_token(value: &str) -> Result<Option<String>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    match crate::store::decode_page_token(value) {
        Some(_) => Ok(Some(value.to_owned())),
        None => Err(ApiError::invalid_field("page_token", "page_token is not a token HCP issued")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<(), ApiError>) -> Option<String> {
        r.err().and_then(|e| e.details.get("field").cloned())
    }

    #[test]
    fn labels() {
        let cases =
            [("web-1", true), ("a", true), ("1web", false), ("web-", false), ("", false), ("wé", false)];
        for (input, ok) in cases {
            assert_eq!(label("name", input).is_ok(), ok, "{input:?}");
        }
        assert_eq!(field_of(label("name", "-x")).as_deref(), Some("name"));
        assert!(label("name", &"a".repeat(64)).is_err());
    }

    #[test]
    fn ids_name_the_field() {
        let e = id::<hcp_proto::ids::VmId>("vm_id", "nope").unwrap_err();
        assert_eq!(e.details.get("field").map(String::as_str), Some("vm_id"));
        assert!(e.message.contains("UUID"));
    }

    #[test]
    fn reserved_metadata() {
        let k = "hcp.vm_id".to_owned();
        let v = "x".to_owned();
        assert!(metadata([(&k, &v)].into_iter()).is_err());
    }
}
