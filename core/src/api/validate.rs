//! Input validation shared by the services. The rules of every request
//! field are stated in the proto (`(hcp.common.v1.field)`) and checked by
//! [`hcp_proto::rules::check`], which handlers call ([`super::checked`], or
//! after the in-flight check for operations on a VM); the checks here use
//! the same grammars ([`StringFormat`]) for values that are not a request
//! field as such (a typed id parsed for a lookup, a defaulted hostname).
//! Every check names the field it is about and the rule (`details.rule`).
//! Messages quote at most a short excerpt of the caller's value
//! ([`excerpt`]), so an error never echoes a long input.
//!
//! The limits (also in the README's "Limits" table):
//!
//! | input | rule |
//! |---|---|
//! | names (VM, snapshot, hostname, flavor, image, zone, network, provider) | [`label`]: 1–63 of `[A-Za-z0-9-]`, a letter first, not ending in `-` |
//! | tenant and project ids | [`scope_id`]: 1–64 of `[A-Za-z0-9._-]`, a letter or digit first |
//! | ids (VM, job, snapshot, provider) | canonical UUID |
//! | tags | at most [`MAX_TAGS`], each 1–64 visible ASCII characters, no `,` |
//! | metadata | at most [`MAX_METADATA`] entries; keys 1–128 of `[A-Za-z0-9._:/-]`, not `hcp.`; values ≤ 1024 characters of text |
//! | network attachments | at most [`MAX_NETWORKS`] |
//! | key pairs of a create (`key_names`) | at most [`MAX_KEY_NAMES`], each a name |
//! | user data | at most [`MAX_USER_DATA`] characters |
//! | descriptions | at most [`MAX_DESCRIPTION`] characters of text |
//! | page size | 1–1000 (0: the default) |
//!
//! "Text" is UTF-8 without control characters other than tab, line feed
//! and carriage return (so no NUL, which PostgreSQL cannot store either).

use std::str::FromStr;

use hcp_proto::error::{ApiError, excerpt};
use hcp_proto::rules::{Keyword, StringFormat, violation};

/// Most metadata entries on a VM.
pub const MAX_METADATA: usize = 64;
/// Longest metadata key, characters.
pub const MAX_METADATA_KEY: usize = 128;
/// Longest metadata value, characters.
pub const MAX_METADATA_VALUE: usize = 1024;
/// Most tags on a VM.
pub const MAX_TAGS: usize = 32;
/// Most network attachments on a VM.
pub const MAX_NETWORKS: usize = 8;
/// Most key pairs a VM is created with.
pub const MAX_KEY_NAMES: usize = 8;
/// Largest user data, characters.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Longest catalog description, characters.
pub const MAX_DESCRIPTION: usize = 1024;
/// Longest host name (providers promise at most 255 characters).
pub const MAX_HOST: usize = 255;

/// Parses a typed id, naming `field` on failure.
pub fn id<T: FromStr>(field: &str, value: &str) -> Result<T, ApiError> {
    if value.is_empty() {
        return Err(violation(field, Keyword::Required, format!("{field} is required")));
    }
    value.parse().map_err(|_| {
        violation(field, Keyword::Pattern, format!("{field} must be a UUID, got {}", excerpt(value)))
    })
}

/// A required non-empty string.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.trim().is_empty() {
        Err(violation(field, Keyword::Required, format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// A required string of `format` (the grammar the proto's field rules
/// name, [`StringFormat`]).
pub fn format(field: &str, value: &str, format: StringFormat) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(violation(field, Keyword::Required, format!("{field} is required")));
    }
    if let Some(max) = format.max_length()
        && value.chars().count() > max
    {
        return Err(violation(
            field,
            Keyword::MaxLength,
            format!("{field} is {} characters long; at most {max} are allowed", value.chars().count()),
        ));
    }
    if format.matches(value) {
        Ok(())
    } else {
        Err(violation(
            field,
            Keyword::Pattern,
            format!("{field} must be {}, got {}", format.describe(), excerpt(value)),
        ))
    }
}

/// A DNS-label-like name ([`StringFormat::Label`]).
pub fn label(field: &str, value: &str) -> Result<(), ApiError> {
    format(field, value, StringFormat::Label)
}

/// A tenant or project id ([`StringFormat::ScopeId`]: never `.` or `..`).
pub fn scope_id(field: &str, value: &str) -> Result<(), ApiError> {
    format(field, value, StringFormat::ScopeId)
}

/// A project id ([`scope_id`] naming `project_id`).
pub fn project_id(value: &str) -> Result<(), ApiError> {
    scope_id("project_id", value)
}

/// A tag ([`StringFormat::Tag`]).
pub fn tag(field: &str, value: &str) -> Result<(), ApiError> {
    format(field, value, StringFormat::Tag)
}

/// Tags: at most [`MAX_TAGS`], each a [`tag`]; `field` names the list.
pub fn tags(field: &str, values: &[String]) -> Result<(), ApiError> {
    count(field, values.len(), MAX_TAGS)?;
    values.iter().enumerate().try_for_each(|(i, t)| tag(&format!("{field}[{i}]"), t))
}

/// At most `max` items in the list `field`.
pub fn count(field: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        Err(violation(field, Keyword::MaxItems, format!("at most {max} {field} are allowed, got {n}")))
    } else {
        Ok(())
    }
}

/// Free text of at most `max` characters ([`StringFormat::Text`]: no
/// control characters but tab, line feed and carriage return).
pub fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars > max {
        return Err(violation(
            field,
            Keyword::MaxLength,
            format!("{field} is {chars} characters long; at most {max} are allowed"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(violation(
            field,
            Keyword::Pattern,
            format!("{field} must not contain control characters, found {c:?}"),
        ));
    }
    Ok(())
}

/// Metadata: at most [`MAX_METADATA`] entries; keys
/// [`StringFormat::MetadataKey`]; values [`text`] of at most
/// [`MAX_METADATA_VALUE`] characters.
pub fn metadata<'a>(
    entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), ApiError> {
    if entries.len() > MAX_METADATA {
        return Err(violation(
            "metadata",
            Keyword::MaxProperties,
            format!("at most {MAX_METADATA} metadata are allowed, got {}", entries.len()),
        ));
    }
    for (k, v) in entries {
        if !StringFormat::MetadataKey.matches(k) {
            return Err(violation(
                "metadata",
                Keyword::Pattern,
                format!("metadata keys must be {}, got {}", StringFormat::MetadataKey.describe(), excerpt(k)),
            ));
        }
        text(&format!("metadata.{k}"), v, MAX_METADATA_VALUE)?;
    }
    Ok(())
}

/// Page size: 0 means `default`; otherwise 1 to 1000.
pub fn page_size(value: u32, default: u32) -> Result<u32, ApiError> {
    match value {
        0 => Ok(default),
        1..=1000 => Ok(value),
        _ => Err(violation(
            "page_size",
            Keyword::Maximum,
            format!("page_size must be at most 1000, got {value}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hcp_proto::error::{MAX_DETAIL_BYTES, MAX_MESSAGE_BYTES};
    use proptest::prelude::*;

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
    fn scope_ids() {
        let cases =
            [("demo", true), ("p1", true), ("a.b_c-d", true), ("..", false), (".x", false), ("", false)];
        for (input, ok) in cases {
            assert_eq!(scope_id("tenant_id", input).is_ok(), ok, "{input:?}");
        }
        assert!(scope_id("tenant_id", &"a".repeat(65)).is_err());
    }

    #[test]
    fn ids_name_the_field() {
        let e = id::<hcp_proto::ids::VmId>("vm_id", "nope").unwrap_err();
        assert_eq!(e.details.get("field").map(String::as_str), Some("vm_id"));
        assert!(e.message.contains("UUID"));
    }

    #[test]
    fn metadata_rules() {
        let check = |k: &str, v: &str| {
            let m = BTreeMap::from([(k.to_owned(), v.to_owned())]);
            metadata(m.iter())
        };
        assert!(check("owner", "team-a").is_ok());
        assert!(check("app.kubernetes.io/name", "line 1\nline 2").is_ok());
        assert!(check("hcp.vm_id", "x").is_err());
        assert!(check("nul\0key", "x").is_err());
        assert!(check("k", "nul\0value").is_err());
        assert_eq!(field_of(check("k", "nul\0value")).as_deref(), Some("metadata.k"));
        assert!(check("k", &"v".repeat(MAX_METADATA_VALUE + 1)).is_err());
        let many: BTreeMap<String, String> =
            (0..=MAX_METADATA).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(metadata(many.iter()).is_err());
    }

    /// Every check on any input: no panic, a bounded error that names a
    /// field, and acceptance only of what the documented grammar allows.
    fn assert_bounded(r: &Result<(), ApiError>) {
        if let Err(e) = r {
            assert!(e.message.len() <= MAX_MESSAGE_BYTES);
            let field = e.details.get("field").expect("the error names a field");
            assert!(!field.is_empty() && field.len() <= MAX_DETAIL_BYTES);
        }
    }

    proptest! {
        #[test]
        fn label_accepts_exactly_its_grammar(s in "\\PC{0,80}|[a-zA-Z][a-zA-Z0-9-]{0,70}") {
            let r = label("name", &s);
            assert_bounded(&r);
            let grammar = regex_lite_label(&s);
            prop_assert_eq!(r.is_ok(), grammar);
        }

        #[test]
        fn scope_ids_never_accept_dots_first(s in "[.a-z0-9_-]{0,70}") {
            let r = scope_id("project_id", &s);
            assert_bounded(&r);
            if r.is_ok() {
                prop_assert!(!s.starts_with('.') && !s.is_empty() && s.len() <= 64);
            }
        }

        #[test]
        fn any_input_gets_a_bounded_error(s in "\\PC{0,3000}|\\p{Cc}{0,50}|.{5000,6000}") {
            assert_bounded(&label("name", &s));
            assert_bounded(&scope_id("tenant_id", &s));
            assert_bounded(&tag("tags[0]", &s));
            assert_bounded(&text("description", &s, MAX_DESCRIPTION));
            assert_bounded(&id::<hcp_proto::ids::VmId>("vm_id", &s).map(|_| ()));
            let m = BTreeMap::from([(s.clone(), s.clone())]);
            assert_bounded(&metadata(m.iter()));
        }

        #[test]
        fn accepted_text_has_no_control_characters(s in "\\PC{0,40}|[\\x00-\\x1f]{1,4}") {
            if text("description", &s, MAX_DESCRIPTION).is_ok() {
                prop_assert!(s.chars().all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r')));
            }
        }
    }

    /// The values the proto allows a string field (`one_of`, which the
    /// OpenAPI document states as `enum`) are exactly those core knows.
    #[test]
    fn the_protos_enumerated_strings_are_the_domains_names() {
        use crate::lifecycle::ConsoleType;
        use crate::model::{JobKind, PlacementPolicy};
        let rules = hcp_proto::rules::Rules::get();
        let one_of = |message: &str, field: &str| -> Vec<String> {
            let m = rules.message(message).unwrap();
            let f = m.get_field_by_name(field).unwrap();
            rules.of(&f).map(|r| r.rules.one_of.clone()).unwrap_or_default()
        };
        let names = |n: Vec<&str>| n.into_iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            one_of("hcp.tenant.v1.ListJobsRequest", "kind"),
            names(JobKind::ALL.iter().map(|k| k.as_str()).collect())
        );
        assert_eq!(
            one_of("hcp.tenant.v1.CreateConsoleRequest", "type"),
            names(ConsoleType::names().collect())
        );
        assert_eq!(
            one_of("hcp.ops.v1.SetZonePlacementRequest", "policy"),
            // Exhaustive: a new policy fails to compile here until listed.
            names(
                [PlacementPolicy::Spread, PlacementPolicy::Pack]
                    .iter()
                    .map(|p| match p {
                        PlacementPolicy::Spread | PlacementPolicy::Pack => p.as_str(),
                    })
                    .collect()
            )
        );
    }

    /// The image enumerations the proto states are the domain's.
    #[test]
    fn the_image_enumerations_are_the_domains_names() {
        use crate::lifecycle::image::ImportFormat;
        use crate::model::{Architecture, ImageStatus};
        let rules = hcp_proto::rules::Rules::get();
        let one_of = |message: &str, field: &str| -> Vec<String> {
            let m = rules.message(message).unwrap();
            let f = m.get_field_by_name(field).unwrap();
            rules.of(&f).map(|r| r.rules.one_of.clone()).unwrap_or_default()
        };
        let architectures: Vec<String> =
            [Architecture::X86_64, Architecture::Aarch64].iter().map(|a| a.as_str().to_owned()).collect();
        assert_eq!(one_of("hcp.common.v1.ListImagesRequest", "architecture"), architectures);
        assert_eq!(one_of("hcp.common.v1.Image", "architecture"), architectures);
        assert_eq!(one_of("hcp.ops.v1.ImportImageRequest", "architecture"), architectures);
        let statuses: Vec<String> =
            [ImageStatus::Importing, ImageStatus::Available, ImageStatus::Error, ImageStatus::Deleting]
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect();
        assert_eq!(one_of("hcp.common.v1.ListImagesRequest", "status"), statuses);
        let formats: Vec<String> = ImportFormat::NAMES.iter().map(|f| (*f).to_owned()).collect();
        assert_eq!(one_of("hcp.ops.v1.ImportImageRequest", "format"), formats);
    }

    /// The label grammar, written independently of [`label`].
    fn regex_lite_label(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphabetic()
            && *b.last().unwrap() != b'-'
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    }
}
