//! The official Proxmox VE API schema (`apidata.js` of pve-docs, as JSON:
//! path -> method -> info) and the parameter checks PVE's JSONSchema code
//! applies to every request: unknown parameters are refused when the method
//! says `additionalProperties: 0`, required ones must be present, and each
//! value must fit its type (integer, number, boolean, string with
//! pattern/format/enum/length, property strings key by key).
//!
//! The schema is AGPL data that stays outside the repository; it is read at
//! runtime from the path [`default_path`] names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where the schema is read from: `HCP_PROXMOX_SCHEMA`, else
/// `../shared/reference/proxmox/pve-api-schema-9.1.3.json` beside the
/// repository.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HCP_PROXMOX_SCHEMA") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../../shared/reference/proxmox/pve-api-schema-9.1.3.json")
}

/// Whether tests that need the schema can run: true when the file is
/// there. The schema is AGPL data that no package registry this project can
/// reach carries at this version, so on a clone of the repository alone the
/// tests are skipped, each printing the reason; in CI (`CI=true`), where
/// `../shared` is beside the repository, a missing schema fails the test.
pub fn present_or_skip(test: &str) -> bool {
    let path = default_path();
    if path.is_file() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: the PVE API schema is missing at {} (CI must run the Proxmox tests)",
        path.display()
    );
    eprintln!(
        "SKIP {test}: the PVE API schema is not at {}; set HCP_PROXMOX_SCHEMA to a copy of \
         pve-api-schema-9.1.3.json to run it",
        path.display()
    );
    false
}

/// The schema could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file could not be read.
    #[error("cannot read the proxmox schema {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("the proxmox schema {path} is not path -> method -> info JSON")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Variable(String),
}

#[derive(Debug)]
struct Entry {
    template: String,
    segments: Vec<Segment>,
    methods: serde_json::Map<String, Value>,
}

/// The loaded schema.
#[derive(Debug)]
pub struct Schema {
    entries: Vec<Entry>,
}

/// A request path matched to its schema template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The template, e.g. `/nodes/{node}/qemu/{vmid}/status/start`.
    pub template: String,
    /// Values of the template's variables, percent-decoded.
    pub vars: BTreeMap<String, String>,
}

/// Parameter errors as PVE reports them: parameter name -> message.
pub type Violations = BTreeMap<String, String>;

impl Schema {
    /// Reads the schema from `path`.
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let text =
            std::fs::read(path).map_err(|source| SchemaError::Read { path: path.to_owned(), source })?;
        let root: serde_json::Map<String, Value> = serde_json::from_slice(&text)
            .map_err(|source| SchemaError::Parse { path: path.to_owned(), source })?;
        let mut entries: Vec<Entry> = root
            .into_iter()
            .map(|(template, methods)| {
                let segments = template
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(v) => Segment::Variable(v.to_owned()),
                        None => Segment::Literal(s.to_owned()),
                    })
                    .collect();
                let methods = match methods {
                    Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                };
                Entry { template, segments, methods }
            })
            .collect();
        // Literal segments win over variables (`/nodes/{node}/qemu` before
        // a `{x}` at the same place), as in PVE's router.
        entries.sort_by_key(|e| {
            e.segments.iter().map(|s| matches!(s, Segment::Variable(_))).collect::<Vec<_>>()
        });
        Ok(Self { entries })
    }

    /// Number of paths in the schema.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the schema has no paths.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds the template for `path` (without the `/api2/json` prefix).
    pub fn route(&self, path: &str) -> Option<Route> {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        'entries: for e in &self.entries {
            if e.segments.len() != parts.len() {
                continue;
            }
            let mut vars = BTreeMap::new();
            for (seg, part) in e.segments.iter().zip(&parts) {
                match seg {
                    Segment::Literal(l) if l == part => {}
                    Segment::Literal(_) => continue 'entries,
                    Segment::Variable(v) => {
                        let decoded = percent_encoding::percent_decode_str(part).decode_utf8_lossy();
                        vars.insert(v.clone(), decoded.into_owned());
                    }
                }
            }
            return Some(Route { template: e.template.clone(), vars });
        }
        None
    }

    /// The method's schema info, if the path has that method.
    pub fn method(&self, template: &str, method: &str) -> Option<&Value> {
        self.entries.iter().find(|e| e.template == template).and_then(|e| e.methods.get(method))
    }

    /// Checks `params` (path variables included) against the method's
    /// parameter schema, the way PVE does before calling a handler.
    pub fn validate(
        &self,
        template: &str,
        method: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<(), Violations> {
        let Some(info) = self.method(template, method) else {
            return Err([("method".to_owned(), format!("{method} {template} is not in the schema"))].into());
        };
        validate_params(&info["parameters"], params)
    }
}

/// Checks `params` against one method's `parameters` object.
pub fn validate_params(schema: &Value, params: &BTreeMap<String, String>) -> Result<(), Violations> {
    let empty = serde_json::Map::new();
    let props = schema["properties"].as_object().unwrap_or(&empty);
    let additional = truthy(&schema["additionalProperties"]).unwrap_or(true);
    let mut errors = Violations::new();
    for (name, value) in params {
        match lookup(props, name) {
            Some(prop) => {
                if let Err(e) = check_value(prop, value) {
                    errors.insert(name.clone(), message(&e));
                }
            }
            None if !additional => {
                errors.insert(
                    name.clone(),
                    "property is not defined in schema and the schema does not allow additional properties"
                        .to_owned(),
                );
            }
            None => {}
        }
    }
    for (name, prop) in props {
        if name.ends_with("[n]") || truthy(&prop["optional"]).unwrap_or(false) {
            continue;
        }
        if !params.contains_key(name) {
            errors.insert(name.clone(), "property is missing and it is not optional".to_owned());
        }
    }
    for name in params.keys() {
        if let Some(req) = lookup(props, name).and_then(|p| p["requires"].as_str())
            && !params.contains_key(req)
        {
            errors.insert(req.to_owned(), format!("property is missing and it is required by {name}"));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Finds a property, including indexed ones (`net0` -> `net[n]`).
fn lookup<'a>(props: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(p) = props.get(name) {
        return Some(p);
    }
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits == name.len() {
        return None;
    }
    let prop = props.get(&format!("{}[n]", &name[..name.len() - digits]))?;
    // PVE defines `scsi0`..`scsi30` one by one; the schema folds them into
    // `scsi[n]` and says the range in the description ("n is 0 to 30").
    let index: u32 = name[name.len() - digits..].parse().ok()?;
    let max = prop["description"]
        .as_str()
        .and_then(|d| d.split("(n is 0 to ").nth(1))
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.trim().parse::<u32>().ok());
    if max.is_some_and(|max| index > max) {
        return None;
    }
    Some(prop)
}

/// PVE's 0/1 flags in the schema, which may also be JSON booleans.
fn truthy(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => Some(n.as_i64() != Some(0)),
        Value::String(s) => Some(s != "0" && !s.is_empty()),
        _ => None,
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Why a value does not fit its property schema, in PVE's words (the
/// `errors` object of a 400 answer carries them; [`message`] renders one).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// Not a value of the property's JSON type.
    #[error("type check ('{ty}') failed - got '{value}'")]
    Type {
        /// `integer`, `number` or `boolean`.
        ty: &'static str,
        /// The value as sent.
        value: String,
    },
    /// Below the schema's `minimum`.
    #[error("value must have a minimum value of {min}")]
    Minimum {
        /// The minimum.
        min: f64,
    },
    /// Above the schema's `maximum`.
    #[error("value must have a maximum value of {max}")]
    Maximum {
        /// The maximum.
        max: f64,
    },
    /// Longer than `maxLength` characters.
    #[error("value may only be {max} characters long")]
    TooLong {
        /// The `maxLength`.
        max: f64,
    },
    /// Shorter than `minLength` characters.
    #[error("value must be at least {min} characters long")]
    TooShort {
        /// The `minLength`.
        min: f64,
    },
    /// Not one of the schema's `enum` values.
    #[error("value '{value}' does not have a value in the enumeration")]
    NotInEnum {
        /// The value as sent.
        value: String,
    },
    /// Does not match the schema's `pattern`.
    #[error("value does not match the regex pattern")]
    Pattern {
        /// The pattern, as the schema gives it.
        pattern: String,
    },
    /// Does not match a named `format`.
    #[error("value does not match the format '{format}'")]
    Format {
        /// The format's name (`pve-vmid`, ...).
        format: String,
    },
    /// A list entry without `key=`.
    #[error("invalid format - missing key in '{part}'")]
    MissingKey {
        /// The entry.
        part: String,
    },
    /// A key the format does not define.
    #[error("invalid format - unknown key '{key}'")]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// A property-string entry without a key, where the format has no
    /// default key.
    #[error("invalid format - value without key '{part}'")]
    ValueWithoutKey {
        /// The entry.
        part: String,
    },
    /// A key given twice.
    #[error("invalid format - duplicate key '{key}'")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A property-string key's value does not fit the key's schema.
    #[error("invalid format - {key}")]
    Key {
        /// The key.
        key: String,
        /// What is wrong with its value.
        #[source]
        source: Box<ValueError>,
    },
    /// A required property-string key is absent.
    #[error("invalid format - missing value for '{key}'")]
    MissingValue {
        /// The key.
        key: String,
    },
}

/// The message PVE gives for `e` (with the key path of property strings):
/// the one place a [`ValueError`] becomes text.
pub fn message(e: &ValueError) -> String {
    hcp_telemetry::error_chain(e)
}

/// Checks one value against one property schema.
fn check_value(prop: &Value, value: &str) -> Result<(), ValueError> {
    let ty = prop["type"].as_str().unwrap_or("string");
    let type_error = |ty| ValueError::Type { ty, value: value.to_owned() };
    match ty {
        "integer" => {
            let n: i64 =
                value.strip_prefix('+').unwrap_or(value).parse().map_err(|_| type_error("integer"))?;
            range(prop, n as f64)
        }
        "number" => {
            let n: f64 = value.parse().map_err(|_| type_error("number"))?;
            range(prop, n)
        }
        "boolean" => match value.to_ascii_lowercase().as_str() {
            "0" | "1" | "true" | "false" | "yes" | "no" | "on" | "off" => Ok(()),
            _ => Err(type_error("boolean")),
        },
        "array" => Ok(()),
        _ => check_string(prop, value),
    }
}

fn range(prop: &Value, n: f64) -> Result<(), ValueError> {
    if let Some(min) = num(&prop["minimum"])
        && n < min
    {
        return Err(ValueError::Minimum { min });
    }
    if let Some(max) = num(&prop["maximum"])
        && n > max
    {
        return Err(ValueError::Maximum { max });
    }
    Ok(())
}

fn check_string(prop: &Value, value: &str) -> Result<(), ValueError> {
    if let Some(max) = num(&prop["maxLength"])
        && value.chars().count() as f64 > max
    {
        return Err(ValueError::TooLong { max });
    }
    if let Some(min) = num(&prop["minLength"])
        && (value.chars().count() as f64) < min
    {
        return Err(ValueError::TooShort { min });
    }
    if let Some(values) = prop["enum"].as_array()
        && !values.iter().any(|v| v.as_str() == Some(value))
    {
        return Err(ValueError::NotInEnum { value: value.to_owned() });
    }
    if let Some(pattern) = prop["pattern"].as_str() {
        // Perl's `(?^:...)` wrapper means "default flags"; Rust's regex
        // spells that as a plain group.
        let rust_pattern = pattern.replace("(?^:", "(?:").replace("{,", "{0,");
        match regex::Regex::new(&format!("^(?:{rust_pattern})$")) {
            Ok(re) if !re.is_match(value) => {
                return Err(ValueError::Pattern { pattern: pattern.to_owned() });
            }
            _ => {}
        }
    }
    match &prop["format"] {
        Value::String(f) => check_format(f, value),
        Value::Object(keys) => check_property_string(keys, value),
        _ => Ok(()),
    }
}

/// Puts a property-string key's error under its key.
fn in_key(key: &str) -> impl FnOnce(ValueError) -> ValueError + '_ {
    move |e| ValueError::Key { key: key.to_owned(), source: Box::new(e) }
}

/// The named string formats the QEMU lifecycle paths use.
fn check_format(format: &str, value: &str) -> Result<(), ValueError> {
    let ok = |re: &str| regex::Regex::new(re).map(|r| r.is_match(value)).unwrap_or(true);
    let valid = match format {
        "pve-node" => ok(r"^(?i)[a-z0-9]([a-z0-9\-]*[a-z0-9])?$"),
        "pve-vmid" => ok(r"^[1-9][0-9]{2,8}$"),
        "pve-configid" => ok(r"^(?i)[a-z][a-z0-9_\-]+$"),
        "pve-storage-id" | "pve-poolid" => ok(r"^(?i)[a-z][a-z0-9\-_.]*[a-z0-9]$"),
        "dns-name" => ok(r"^(?i)([a-z0-9]([a-z0-9\-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9\-]*[a-z0-9])?$"),
        "urlencoded" => ok(r"^[-%a-zA-Z0-9_.!~*'()]*$"),
        "pve-tag-list" => value.split([';', ',', ' ']).filter(|t| !t.is_empty()).all(|t| {
            regex::Regex::new(r"^(?i)[a-z0-9_][a-z0-9_\-+.]*$").map(|r| r.is_match(t)).unwrap_or(true)
        }),
        "pve-configid-list" => value
            .split([',', ';', ' '])
            .filter(|t| !t.is_empty())
            .all(|t| regex::Regex::new(r"^(?i)[a-z][a-z0-9_\-]+$").map(|r| r.is_match(t)).unwrap_or(true)),
        // `storage:name`, as PVE's parse_volume_id reads it.
        "pve-volume-id" => ok(r"^(?i)[a-z][a-z0-9\-_.]*[a-z0-9]:.+$"),
        // A drive's backing: a volume, an absolute path, `cdrom`/`none`.
        "pve-volume-id-or-qm-path" => {
            value == "none"
                || value == "cdrom"
                || value.starts_with('/')
                || ok(r"^(?i)[a-z][a-z0-9\-_.]*[a-z0-9]:.+$")
        }
        "disk-size" => ok(r"^\d+(\.\d+)?[KMGT]?$"),
        "pve-storage-content" => {
            ["images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import"].contains(&value)
        }
        "pve-qm-ipconfig" => {
            return check_keys(value, &["ip", "gw", "ip6", "gw6"]);
        }
        "pve-qm-cicustom" => {
            return check_keys(value, &["meta", "network", "user", "vendor"]);
        }
        _ => true,
    };
    if valid { Ok(()) } else { Err(ValueError::Format { format: format.to_owned() }) }
}

fn check_keys(value: &str, keys: &[&str]) -> Result<(), ValueError> {
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let Some((k, _)) = part.split_once('=') else {
            return Err(ValueError::MissingKey { part: part.to_owned() });
        };
        if !keys.contains(&k) {
            return Err(ValueError::UnknownKey { key: k.to_owned() });
        }
    }
    Ok(())
}

/// A property string (`virtio,bridge=vmbr0,firewall=1`): each key must be in
/// the format, each value must fit the key's schema.
fn check_property_string(keys: &serde_json::Map<String, Value>, value: &str) -> Result<(), ValueError> {
    let default_key = keys.iter().find(|(_, p)| truthy(&p["default_key"]).unwrap_or(false)).map(|(k, _)| k);
    let mut seen = std::collections::BTreeSet::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (key, val) = match part.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match keys.get(part) {
                // `virtio` alone names the model key.
                Some(p) if p["keyAlias"].is_string() => {
                    (p["keyAlias"].as_str().unwrap_or_default().to_owned(), part.to_owned())
                }
                _ => match default_key {
                    Some(k) => (k.clone(), part.to_owned()),
                    None => return Err(ValueError::ValueWithoutKey { part: part.to_owned() }),
                },
            },
        };
        let Some(prop) = keys.get(&key) else {
            return Err(ValueError::UnknownKey { key });
        };
        let (key, prop) = match (&prop["keyAlias"], &prop["alias"]) {
            // `virtio=MAC`: model virtio, macaddr MAC.
            (Value::String(model), Value::String(alias)) => {
                if let Some(model_prop) = keys.get(model) {
                    check_value(model_prop, &key).map_err(in_key(model))?;
                }
                if !seen.insert(model.clone()) {
                    return Err(ValueError::DuplicateKey { key: model.clone() });
                }
                (alias.clone(), keys.get(alias).unwrap_or(prop))
            }
            (_, Value::String(alias)) => (alias.clone(), keys.get(alias).unwrap_or(prop)),
            _ => (key, prop),
        };
        if !seen.insert(key.clone()) {
            return Err(ValueError::DuplicateKey { key });
        }
        check_value(prop, &val).map_err(in_key(&key))?;
    }
    for (key, prop) in keys {
        let optional = truthy(&prop["optional"]).unwrap_or(false);
        let aliasish = prop["alias"].is_string() || prop["keyAlias"].is_string();
        if !optional && !aliasish && !seen.contains(key) && prop["default"].is_null() {
            return Err(ValueError::MissingValue { key: key.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn check(schema: &Value, pairs: &[(&str, &str)]) -> Result<(), Vec<String>> {
        validate_params(schema, &params(pairs)).map_err(|e| e.into_keys().collect())
    }

    #[test]
    fn parameters_are_checked_like_pve() {
        let schema = json!({
            "additionalProperties": 0,
            "properties": {
                "vmid": {"type": "integer", "minimum": 100, "maximum": 999999999, "format": "pve-vmid"},
                "full": {"type": "boolean", "optional": 1},
                "sshkeys": {"type": "string", "format": "urlencoded", "optional": 1},
                "net[n]": {"type": "string", "optional": 1, "format": {
                    "model": {"type": "string", "default_key": 1, "enum": ["virtio", "e1000"]},
                    "virtio": {"alias": "macaddr", "keyAlias": "model"},
                    "macaddr": {"type": "string", "optional": 1},
                    "bridge": {"type": "string", "optional": 1},
                    "firewall": {"type": "boolean", "optional": 1}
                }}
            }
        });
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<(), Vec<String>>);
        let cases: &[Case<'_>] = &[
            (&[("vmid", "100"), ("full", "1")], Ok(())),
            (&[("vmid", "100"), ("net0", "virtio,bridge=vmbr0,firewall=1")], Ok(())),
            (&[("vmid", "100"), ("net1", "virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0")], Ok(())),
            (&[("vmid", "100"), ("sshkeys", "ssh-ed25519%20AAAA%20me")], Ok(())),
            (&[("vmid", "100"), ("sshkeys", "ssh-ed25519 AAAA me")], Err(vec!["sshkeys".into()])),
            (&[("vmid", "99")], Err(vec!["vmid".into()])),
            (&[("vmid", "abc")], Err(vec!["vmid".into()])),
            (&[], Err(vec!["vmid".into()])),
            (&[("vmid", "100"), ("full", "maybe")], Err(vec!["full".into()])),
            (&[("vmid", "100"), ("overrule", "1")], Err(vec!["overrule".into()])),
            (&[("vmid", "100"), ("net0", "virtio,bridge=vmbr0,speed=9")], Err(vec!["net0".into()])),
            (&[("vmid", "100"), ("net0", "rtl,bridge=vmbr0")], Err(vec!["net0".into()])),
            (&[("vmid", "100"), ("netx", "virtio")], Err(vec!["netx".into()])),
        ];
        for (input, want) in cases {
            assert_eq!(&check(&schema, input), want, "{input:?}");
        }
    }

    #[test]
    fn messages_are_pves_with_the_key_path() {
        let net = json!({"type": "string", "format": {
            "model": {"type": "string", "default_key": 1, "enum": ["virtio", "e1000"]},
            "firewall": {"type": "boolean", "optional": 1}
        }});
        let text = |prop: &Value, value: &str| check_value(prop, value).map_err(|e| message(&e));
        assert_eq!(text(&net, "virtio,firewall=1"), Ok(()));
        assert_eq!(
            text(&net, "virtio,firewall=x"),
            Err("invalid format - firewall: type check ('boolean') failed - got 'x'".to_owned())
        );
        assert_eq!(
            text(&net, "rtl"),
            Err("invalid format - model: value 'rtl' does not have a value in the enumeration".to_owned())
        );
        assert_eq!(
            text(&json!({"type": "integer", "minimum": 100}), "99"),
            Err("value must have a minimum value of 100".to_owned())
        );
    }

    #[test]
    fn indexed_names_need_digits() {
        let props = json!({"net[n]": {}, "name": {}});
        let props = props.as_object().unwrap();
        assert!(lookup(props, "net0").is_some());
        assert!(lookup(props, "net12").is_some());
        assert!(lookup(props, "net").is_none());
        assert!(lookup(props, "0").is_none());
        assert!(lookup(props, "name").is_some());
    }
}
