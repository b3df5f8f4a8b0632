//! The rules a request's fields must follow, read from the proto: each
//! field's `(hcp.common.v1.field)` option ([`FieldRules`]) states them once.
//! Core checks every request against them ([`check`]) and the gateway writes
//! them into the OpenAPI document ([`Rule`], [`StringFormat::pattern`]), so
//! what the document promises and what the server enforces come from the
//! same definitions.
//!
//! A broken rule is `INVALID_ARGUMENT` with `details.field` (the field's path:
//! `name`, `flavor.vcpus`, `networks[0].network`, `metadata.owner`) and
//! `details.rule`, the JSON Schema keyword the document states the rule
//! with ([`Keyword`]). Lengths count characters, as JSON Schema does.
//!
//! The rules of a message are read from the descriptors once per process
//! ([`Rules::get`]); checking a request walks it as a
//! [`prost_reflect::DynamicMessage`].

use std::collections::HashMap;
use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MapKey, MessageDescriptor,
    ReflectMessage, Value,
};

pub use crate::common::{FieldRules, StringFormat};
use crate::error::{ApiError, excerpt};

/// The longest `Idempotency-Key` (and `x-request-id`), characters.
pub const MAX_KEY_HEADER: usize = 255;

/// The grammar of the `Idempotency-Key` and `x-request-id` headers: 1 to
/// [`MAX_KEY_HEADER`] visible ASCII characters.
pub const KEY_HEADER_PATTERN: &str = "^[\\x21-\\x7E]{1,255}$";

/// Whether `value` is a usable `Idempotency-Key` or `x-request-id`.
pub fn key_header_ok(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_KEY_HEADER && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Which rule a bad `Idempotency-Key` or `x-request-id` breaks.
pub fn key_header_keyword(value: &[u8]) -> Keyword {
    if value.is_empty() {
        Keyword::MinLength
    } else if value.len() > MAX_KEY_HEADER {
        Keyword::MaxLength
    } else {
        Keyword::Pattern
    }
}

/// The JSON Schema keyword a broken rule is named by in `details.rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    /// A required field is missing or empty.
    Required,
    /// A string does not follow its grammar.
    Pattern,
    /// A string is too short.
    MinLength,
    /// A string is too long.
    MaxLength,
    /// A list has too many items.
    MaxItems,
    /// A map has too many entries.
    MaxProperties,
    /// A number is too small.
    Minimum,
    /// A number is too large.
    Maximum,
    /// A value is not one of those allowed.
    Enum,
    /// An output-only field was set.
    ReadOnly,
    /// A number is not finite (NaN or an infinity).
    Type,
}

impl Keyword {
    /// The keyword as `details.rule` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::Pattern => "pattern",
            Self::MinLength => "minLength",
            Self::MaxLength => "maxLength",
            Self::MaxItems => "maxItems",
            Self::MaxProperties => "maxProperties",
            Self::Minimum => "minimum",
            Self::Maximum => "maximum",
            Self::Enum => "enum",
            Self::ReadOnly => "readOnly",
            Self::Type => "type",
        }
    }
}

/// The error for a broken rule.
pub fn violation(field: &str, keyword: Keyword, message: impl Into<String>) -> ApiError {
    ApiError::invalid_field(field, message).with_detail("rule", keyword.as_str())
}

impl StringFormat {
    /// The grammar as an ECMA 262 regular expression, anchored (the same
    /// text is valid for Rust's `regex`, which the tests compare against).
    pub fn pattern(self) -> Option<&'static str> {
        Some(match self {
            Self::Unspecified => return None,
            Self::Label => "^[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$",
            Self::ScopeId => "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
            Self::Uuid => "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$",
            Self::Tag => "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$",
            Self::Text => "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$",
            Self::MetadataKey => "^[A-Za-z0-9._:/-]{1,128}$",
            Self::CredentialKey => "^[A-Za-z0-9._-]{1,128}$",
            Self::AuditAnchor => "^[1-9][0-9]{0,17}:[0-9A-Fa-f]{64}$",
        })
    }

    /// A prefix the grammar refuses although the pattern matches it (the
    /// document states it as `not: {pattern: "^<prefix>"}`).
    pub fn reserved_prefix(self) -> Option<&'static str> {
        (self == Self::MetadataKey).then_some("hcp.")
    }

    /// The longest value the grammar allows, characters.
    pub fn max_length(self) -> Option<usize> {
        Some(match self {
            Self::Label => 63,
            Self::ScopeId | Self::Tag => 64,
            Self::Uuid => 36,
            Self::MetadataKey | Self::CredentialKey => 128,
            Self::AuditAnchor => 83,
            Self::Unspecified | Self::Text => return None,
        })
    }

    /// Whether `s` follows the grammar (what [`Self::pattern`] matches,
    /// less [`Self::reserved_prefix`]).
    pub fn matches(self, s: &str) -> bool {
        let b = s.as_bytes();
        let all = |f: fn(u8) -> bool| b.iter().all(|c| f(*c));
        match self {
            Self::Unspecified => true,
            Self::Label => {
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphabetic()
                    && b[b.len() - 1] != b'-'
                    && all(|c| c.is_ascii_alphanumeric() || c == b'-')
            }
            Self::ScopeId => {
                !b.is_empty()
                    && b.len() <= 64
                    && b[0].is_ascii_alphanumeric()
                    && all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
            }
            Self::Uuid => {
                b.len() == 36
                    && b.iter().enumerate().all(|(i, c)| match i {
                        8 | 13 | 18 | 23 => *c == b'-',
                        _ => c.is_ascii_hexdigit(),
                    })
            }
            Self::Tag => !b.is_empty() && b.len() <= 64 && all(|c| c.is_ascii_graphic() && c != b','),
            Self::Text => !s.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')),
            Self::MetadataKey => {
                !b.is_empty()
                    && b.len() <= 128
                    && all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'/' | b'-'))
                    && !s.starts_with("hcp.")
            }
            Self::CredentialKey => {
                !b.is_empty()
                    && b.len() <= 128
                    && all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
            }
            Self::AuditAnchor => match s.split_once(':') {
                Some((seq, hash)) => {
                    let seq = seq.as_bytes();
                    (1..=18).contains(&seq.len())
                        && seq[0] != b'0'
                        && seq.iter().all(u8::is_ascii_digit)
                        && hash.len() == 64
                        && hash.bytes().all(|c| c.is_ascii_hexdigit())
                }
                None => false,
            },
        }
    }

    /// What a value must be, for messages ("must be …").
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "a string",
            Self::Label => "1 to 63 letters, digits or '-', start with a letter and not end with '-'",
            Self::ScopeId => "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            Self::Uuid => "a UUID",
            Self::Tag => "1 to 64 printable characters without spaces or commas",
            Self::Text => "text without control characters (tab, line feed and carriage return are allowed)",
            Self::MetadataKey => {
                "1 to 128 letters, digits, '.', '_', ':', '/' or '-', outside the reserved hcp. namespace"
            }
            Self::CredentialKey => "1 to 128 letters, digits, '.', '_' or '-'",
            Self::AuditAnchor => {
                "SEQ:HASH, a sequence number from 1, ':' and 64 hex digits (as in an audit_head line)"
            }
        }
    }
}

/// One field's rules, as read from its option.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The option as written in the proto.
    pub rules: FieldRules,
}

impl Rule {
    /// The string grammar, if any.
    pub fn format(&self) -> StringFormat {
        StringFormat::try_from(self.rules.format).unwrap_or(StringFormat::Unspecified)
    }

    /// The map key grammar, if any.
    pub fn key_format(&self) -> StringFormat {
        StringFormat::try_from(self.rules.key_format).unwrap_or(StringFormat::Unspecified)
    }

    /// The longest string allowed: the option's `max_length`, else the
    /// format's own.
    pub fn max_length(&self) -> Option<usize> {
        match self.rules.max_length {
            0 => self.format().max_length(),
            n => Some(n as usize),
        }
    }
}

/// Every request field's rules, read from HCP's descriptors once.
pub struct Rules {
    pool: DescriptorPool,
    by_field: HashMap<String, Rule>,
}

impl Rules {
    /// The process's rules, from [`crate::FILE_DESCRIPTOR_SET`].
    pub fn get() -> &'static Rules {
        static RULES: OnceLock<Rules> = OnceLock::new();
        RULES.get_or_init(|| {
            // The descriptor set is this crate's own build output: it
            // decodes, and it has the extension.
            let pool =
                DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).expect("HCP's descriptor set decodes");
            Self::from_pool(pool)
        })
    }

    /// The rules in `pool` (which must hold `hcp.common.v1.field`).
    pub fn from_pool(pool: DescriptorPool) -> Self {
        let mut by_field = HashMap::new();
        if let Some(ext) = pool.get_extension_by_name("hcp.common.v1.field") {
            for m in pool.all_messages() {
                for f in m.fields() {
                    if let Some(rule) = rule_of(&ext, &f) {
                        by_field.insert(f.full_name().to_owned(), rule);
                    }
                }
            }
        }
        Self { pool, by_field }
    }

    /// The rules of `field`, if it has any.
    pub fn of(&self, field: &FieldDescriptor) -> Option<&Rule> {
        self.by_field.get(field.full_name())
    }

    /// The descriptor of the message named `full_name`.
    pub fn message(&self, full_name: &str) -> Option<MessageDescriptor> {
        self.pool.get_message_by_name(full_name)
    }
}

fn rule_of(ext: &ExtensionDescriptor, f: &FieldDescriptor) -> Option<Rule> {
    let options = f.options();
    if !options.has_extension(ext) {
        return None;
    }
    let value = options.get_extension(ext);
    let message = value.as_message()?;
    let rules: FieldRules = message.transcode_to().ok()?;
    Some(Rule { rules })
}

/// Checks `request` against its message's rules: the first broken one, in
/// field order, is the error.
pub fn check<M: prost::Message + prost::Name>(request: &M) -> Result<(), ApiError> {
    let rules = Rules::get();
    let Some(desc) = rules.message(&M::full_name()) else { return Ok(()) };
    let bytes = request.encode_to_vec();
    let message = DynamicMessage::decode(desc, bytes.as_slice()).map_err(|_| ApiError::internal())?;
    check_message(rules, &message, "")
}

/// Checks a dynamic message (the gateway's, tests') against the rules.
pub fn check_dynamic(message: &DynamicMessage) -> Result<(), ApiError> {
    check_message(Rules::get(), message, "")
}

fn path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") }
}

fn check_message(rules: &Rules, message: &DynamicMessage, prefix: &str) -> Result<(), ApiError> {
    for field in message.descriptor().fields() {
        let at = path(prefix, field.name());
        let rule = rules.of(&field);
        let value = message.get_field(&field);
        if let Some(rule) = rule {
            let set = message.has_field(&field);
            if rule.rules.output_only && set {
                return Err(violation(
                    &at,
                    Keyword::ReadOnly,
                    format!("{at} is set by HCP and cannot be given in a request"),
                ));
            }
            if rule.rules.required && !set {
                return Err(violation(&at, Keyword::Required, format!("{at} is required")));
            }
            check_value(rule, &field, &value, &at, set)?;
        } else if let Kind::Enum(_) = field.kind() {
            // Every enum field takes only the values its enum defines.
            match &*value {
                Value::List(items) => {
                    for (i, item) in items.iter().enumerate() {
                        check_enum(&field, item, &format!("{at}[{i}]"))?;
                    }
                }
                v => check_enum(&field, v, &at)?,
            }
        }
        // Nested messages have rules of their own.
        match &*value {
            Value::Message(m) if m.descriptor().full_name() == FIELD_MASK => {
                if let Some(rule) = rule {
                    check_mask(rule, m, &at)?;
                }
            }
            Value::Message(m) if message.has_field(&field) => check_message(rules, m, &at)?,
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        check_message(rules, m, &format!("{at}[{i}]"))?;
                    }
                }
            }
            Value::Map(entries) => {
                for (k, v) in entries {
                    if let (MapKey::String(k), Value::Message(m)) = (k, v) {
                        check_message(rules, m, &format!("{at}.{k}"))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_value(
    rule: &Rule,
    field: &FieldDescriptor,
    value: &Value,
    at: &str,
    set: bool,
) -> Result<(), ApiError> {
    match value {
        Value::List(items) => {
            check_count(rule, at, items.len(), Keyword::MaxItems)?;
            for (i, item) in items.iter().enumerate() {
                check_scalar(rule, field, item, &format!("{at}[{i}]"), true)?;
            }
            Ok(())
        }
        Value::Map(entries) => {
            check_count(rule, at, entries.len(), Keyword::MaxProperties)?;
            let key_format = rule.key_format();
            // Sorted, so the first error is the same on every call.
            let mut keys: Vec<(&MapKey, &Value)> = entries.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in keys {
                let MapKey::String(k) = k else { continue };
                if !key_format.matches(k) {
                    return Err(violation(
                        at,
                        Keyword::Pattern,
                        format!("{at} keys must be {}, got {}", key_format.describe(), excerpt(k)),
                    ));
                }
                check_scalar(rule, field, v, &format!("{at}.{k}"), true)?;
            }
            Ok(())
        }
        // An unset optional scalar has nothing to check.
        _ if field.supports_presence() && !set => Ok(()),
        v => check_scalar(rule, field, v, at, rule.rules.required),
    }
}

fn check_count(rule: &Rule, at: &str, n: usize, keyword: Keyword) -> Result<(), ApiError> {
    let max = rule.rules.max_items as usize;
    if max > 0 && n > max {
        return Err(violation(at, keyword, format!("at most {max} {at} are allowed, got {n}")));
    }
    Ok(())
}

/// One value: `strict` checks an empty string too (list items, map values,
/// required fields); otherwise empty means "not given".
fn check_scalar(
    rule: &Rule,
    field: &FieldDescriptor,
    value: &Value,
    at: &str,
    strict: bool,
) -> Result<(), ApiError> {
    let r = &rule.rules;
    match value {
        Value::String(s) => {
            if s.is_empty() && !strict {
                return Ok(());
            }
            let chars = s.chars().count();
            if let Some(max) = rule.max_length()
                && chars > max
            {
                return Err(violation(
                    at,
                    Keyword::MaxLength,
                    format!("{at} is {chars} characters long; at most {max} are allowed"),
                ));
            }
            let min = r.min_length as usize;
            if chars < min {
                return Err(violation(
                    at,
                    Keyword::MinLength,
                    format!("{at} is {chars} characters long; at least {min} are needed"),
                ));
            }
            let format = rule.format();
            if !format.matches(s) {
                return Err(violation(
                    at,
                    Keyword::Pattern,
                    format!("{at} must be {}, got {}", format.describe(), excerpt(s)),
                ));
            }
            if !r.one_of.is_empty() && !r.one_of.iter().any(|o| o == s) {
                return Err(violation(
                    at,
                    Keyword::Enum,
                    format!("{at} must be one of {}, got {}", r.one_of.join(", "), excerpt(s)),
                ));
            }
            Ok(())
        }
        Value::EnumNumber(_) => check_enum(field, value, at),
        v => {
            let Some(x) = number(v) else { return Ok(()) };
            if !x.is_finite() {
                return Err(violation(at, Keyword::Type, format!("{at} must be a finite number")));
            }
            if let Some(min) = r.minimum
                && x < min
            {
                // proto3 cannot tell 0 from a number left out: with a
                // minimum above 0 the document lists the field as required.
                if x == 0.0 && !field.supports_presence() {
                    return Err(violation(
                        at,
                        Keyword::Required,
                        format!("{at} is required (at least {min})"),
                    ));
                }
                return Err(violation(at, Keyword::Minimum, format!("{at} must be at least {min}, got {x}")));
            }
            if let Some(max) = r.maximum
                && x > max
            {
                return Err(violation(at, Keyword::Maximum, format!("{at} must be at most {max}, got {x}")));
            }
            Ok(())
        }
    }
}

/// The full name of the field mask type.
pub const FIELD_MASK: &str = "google.protobuf.FieldMask";

/// A field mask names only the paths its rule allows.
fn check_mask(rule: &Rule, mask: &DynamicMessage, at: &str) -> Result<(), ApiError> {
    let allowed = &rule.rules.one_of;
    if allowed.is_empty() {
        return Ok(());
    }
    let paths = mask.get_field_by_name("paths");
    let Some(Value::List(paths)) = paths.as_deref() else { return Ok(()) };
    for p in paths {
        let p = p.as_str().unwrap_or_default();
        if !allowed.iter().any(|a| a == p) {
            return Err(violation(
                at,
                Keyword::Pattern,
                format!("{at} may name {}, not {}", allowed.join(", "), excerpt(p)),
            ));
        }
    }
    Ok(())
}

fn check_enum(field: &FieldDescriptor, value: &Value, at: &str) -> Result<(), ApiError> {
    if let (Kind::Enum(e), Value::EnumNumber(n)) = (field.kind(), value)
        && e.get_value(*n).is_none()
    {
        let names: Vec<String> =
            e.values().map(|v| v.name().to_owned()).filter(|n| !n.ends_with("_UNSPECIFIED")).collect();
        return Err(violation(
            at,
            Keyword::Enum,
            format!("{at} must be one of {}, got {n}", names.join(", ")),
        ));
    }
    Ok(())
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::I32(n) => f64::from(*n),
        Value::U32(n) => f64::from(*n),
        Value::I64(n) => *n as f64,
        Value::U64(n) => *n as f64,
        Value::F32(n) => f64::from(*n),
        Value::F64(n) => *n,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::tenant::{CreateVmRequest, NetworkAttachment, StopVmRequest};

    const FORMATS: &[StringFormat] = &[
        StringFormat::Label,
        StringFormat::ScopeId,
        StringFormat::Uuid,
        StringFormat::Tag,
        StringFormat::Text,
        StringFormat::MetadataKey,
        StringFormat::CredentialKey,
        StringFormat::AuditAnchor,
    ];

    /// What the document says a value of `format` may be: its pattern, less
    /// its reserved prefix.
    fn documented(format: StringFormat, s: &str) -> bool {
        let re = regex::Regex::new(format.pattern().unwrap()).unwrap();
        re.is_match(s) && !format.reserved_prefix().is_some_and(|p| s.starts_with(p))
    }

    proptest! {
        #[test]
        fn each_format_accepts_exactly_what_its_pattern_documents(
            s in "\\PC{0,70}|[a-zA-Z0-9._:/-]{0,130}|[\\x00-\\x7f]{0,70}|[\\u{80}-\\u{a0}]{0,3}|hcp\\.[a-z]{0,5}|[0-9a-fA-F-]{36}"
        ) {
            for f in FORMATS {
                prop_assert_eq!(f.matches(&s), documented(*f, &s), "{:?} on {:?}", f, s);
            }
        }
    }

    #[test]
    fn formats_agree_with_their_patterns_on_the_edges() {
        let cases = [
            "",
            "a",
            "a-",
            "-a",
            "1a",
            "a1",
            "é",
            "web-1",
            "a.b",
            "..",
            ".x",
            "hcp.x",
            "hcp",
            "a b",
            "a,b",
            "\t",
            "x\ny",
            "x\u{0}",
            "x\u{7f}",
            "x\u{85}",
            "0190a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b",
            "0190A2B4-5C6D-7E8F-9A0B-1C2D3E4F5A6B",
            "0190a2b45c6d7e8f9a0b1c2d3e4f5a6b",
        ];
        let long = ["a".repeat(63), "a".repeat(64), "a".repeat(65), "a".repeat(128), "a".repeat(129)];
        for f in FORMATS {
            for s in cases.iter().map(|s| s.to_string()).chain(long.iter().cloned()) {
                assert_eq!(f.matches(&s), documented(*f, &s), "{f:?} on {s:?}");
            }
        }
    }

    #[test]
    fn formats_longest_values_are_their_max_length() {
        for f in FORMATS {
            if let Some(max) = f.max_length() {
                let inside = match f {
                    StringFormat::Uuid => "0190a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b".to_owned(),
                    StringFormat::AuditAnchor => format!("{}:{}", "9".repeat(18), "a".repeat(64)),
                    _ => "a".repeat(max),
                };
                assert!(f.matches(&inside), "{f:?}");
                assert!(!f.matches(&format!("{inside}a")), "{f:?}");
            }
        }
    }

    /// Every rule fits the field it is on: grammars on strings, counts on
    /// lists and maps, ranges on numbers, `required` where emptiness can be
    /// told from absence.
    #[test]
    fn every_rule_fits_its_field() {
        let rules = Rules::get();
        assert!(rules.by_field.len() > 60, "the rules were read: {}", rules.by_field.len());
        for m in rules.pool.all_messages() {
            for f in m.fields() {
                let Some(rule) = rules.of(&f) else { continue };
                let r = &rule.rules;
                let name = f.full_name();
                let string = matches!(f.kind(), Kind::String) || (f.is_map() && map_value_is_string(&f));
                let mask = matches!(f.kind(), Kind::Message(m) if m.full_name() == FIELD_MASK);
                if r.format != 0 || r.max_length != 0 || r.min_length != 0 || !r.one_of.is_empty() {
                    assert!(
                        string || (mask && r.format == 0),
                        "{name}: a string rule on a field that is not a string"
                    );
                }
                if r.max_items != 0 || r.key_format != 0 {
                    assert!(f.is_list() || f.is_map(), "{name}: a count on a single value");
                }
                if r.key_format != 0 {
                    assert!(f.is_map(), "{name}: key_format on a field that is not a map");
                }
                if r.minimum.is_some() || r.maximum.is_some() {
                    assert!(
                        !matches!(f.kind(), Kind::String | Kind::Bytes | Kind::Message(_) | Kind::Enum(_)),
                        "{name}: a range on a field that is not a number"
                    );
                }
                if r.required {
                    assert!(!f.supports_presence() || matches!(f.kind(), Kind::Message(_)), "{name}");
                }
            }
        }
    }

    fn map_value_is_string(f: &FieldDescriptor) -> bool {
        matches!(f.kind(), Kind::Message(e) if matches!(e.map_entry_value_field().kind(), Kind::String))
    }

    fn violated(r: Result<(), ApiError>) -> (String, String) {
        let e = r.expect_err("refused");
        assert_eq!(e.code, crate::error::ErrorCode::InvalidArgument, "{e}");
        (e.details["field"].clone(), e.details["rule"].clone())
    }

    fn create() -> CreateVmRequest {
        CreateVmRequest {
            project_id: "demo".into(),
            name: "web-1".into(),
            flavor: "small".into(),
            image: "debian-12".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_request_is_checked_against_its_rules_naming_field_and_rule() {
        check(&create()).unwrap();
        let field = |f: fn(&mut CreateVmRequest)| {
            let mut r = create();
            f(&mut r);
            violated(check(&r))
        };
        assert_eq!(field(|r| r.name.clear()), ("name".into(), "required".into()));
        assert_eq!(field(|r| r.name = "-x".into()), ("name".into(), "pattern".into()));
        assert_eq!(field(|r| r.name = "a".repeat(64)), ("name".into(), "maxLength".into()));
        assert_eq!(field(|r| r.project_id = "..".into()), ("project_id".into(), "pattern".into()));
        assert_eq!(
            field(|r| r.networks = vec![NetworkAttachment { network: "n_1".into(), ..Default::default() }]),
            ("networks[0].network".into(), "pattern".into())
        );
        assert_eq!(
            field(|r| r.networks = vec![NetworkAttachment {
                network: "n1".into(),
                mac: "52:54:00:00:00:01".into(),
                ..Default::default()
            }]),
            ("networks[0].mac".into(), "readOnly".into())
        );
        assert_eq!(
            field(|r| r.networks =
                (0..9).map(|_| NetworkAttachment { network: "n".into(), ..Default::default() }).collect()),
            ("networks".into(), "maxItems".into())
        );
        assert_eq!(field(|r| r.tags = vec!["a,b".into()]), ("tags[0]".into(), "pattern".into()));
        assert_eq!(field(|r| r.tags = vec![String::new()]), ("tags[0]".into(), "pattern".into()));
        assert_eq!(
            field(|r| {
                r.metadata.insert("hcp.x".into(), "v".into());
            }),
            ("metadata".into(), "pattern".into())
        );
        assert_eq!(
            field(|r| {
                r.metadata.insert("k".into(), "nul\0".into());
            }),
            ("metadata.k".into(), "pattern".into())
        );
        assert_eq!(
            field(|r| r.user_data = Some("x".repeat(65537))),
            ("user_data".into(), "maxLength".into())
        );
        assert_eq!(field(|r| r.restart_policy = 9), ("restart_policy".into(), "enum".into()));
        assert_eq!(
            field(|r| r.placement_group_id = "0".into()),
            ("placement_group_id".into(), "pattern".into())
        );
        // Optional fields may be empty; lengths count characters.
        let mut r = create();
        r.zone = String::new();
        r.user_data = Some("é".repeat(65536));
        check(&r).unwrap();
    }

    #[test]
    fn numbers_are_checked_against_their_range() {
        let stop = |t| StopVmRequest {
            project_id: "demo".into(),
            vm_id: "0190a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b".into(),
            timeout_seconds: t,
            ..Default::default()
        };
        check(&stop(3600)).unwrap();
        assert_eq!(violated(check(&stop(3601))), ("timeout_seconds".into(), "maximum".into()));
        let flavor = |vcpus| crate::ops::CreateFlavorRequest {
            flavor: Some(crate::common::Flavor {
                name: "f".into(),
                vcpus,
                memory_mib: 16,
                ..Default::default()
            }),
        };
        check(&flavor(1)).unwrap();
        assert_eq!(violated(check(&flavor(0))), ("flavor.vcpus".into(), "required".into()));
        assert_eq!(
            violated(check(&crate::ops::CreateFlavorRequest::default())),
            ("flavor".into(), "required".into())
        );
    }
}
