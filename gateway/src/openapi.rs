//! The OpenAPI 3.1 description of the REST API, generated from the same
//! descriptors and route table the gateway transcodes with, so it cannot
//! describe another API than the one served. Served at
//! `/api/hcp/openapi.json`; committed as `gateway/openapi.json`, and a test
//! fails when the two differ.
//!
//! Schemas follow what the transcoder does: the proto3 JSON mapping with
//! field names as in the proto; replies carry every field except messages
//! and `optional` fields that are not set (which may be absent; a `null`
//! is allowed too), 64-bit integers as strings in replies and either in
//! requests, enums by name; unknown request fields refused (so request
//! objects allow no other properties). Errors share one schema. The
//! transcoder also accepts what proto3 JSON parsers accept beyond this
//! (lowerCamelCase names, numbers as strings, enum numbers); the document
//! describes the canonical form.
//!
//! Every rule core enforces on a request field comes from the field's
//! `(hcp.common.v1.field)` option through [`hcp_proto::rules`], the same
//! definitions core checks requests with: grammars become `pattern`,
//! lengths `maxLength`, counts `maxItems`/`maxProperties`, ranges
//! `minimum`/`maximum`, allowed strings `enum`, required fields `required`,
//! output-only fields are left out of request schemas. Path and query
//! parameters are never empty. Comments in the proto become descriptions.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use hcp_proto::rules::{self, Rule, StringFormat};
use prost_reflect::FileDescriptor;

use crate::routes::Route;

/// What the document says of `Idempotency-Key`.
const IDEMPOTENCY_KEY: &str = "Makes a retry safe: a request repeated with the same key and the same \
     parameters within 24 hours gets the first answer (its status and body) and does nothing again; \
     the same key with other parameters gets 422 IDEMPOTENCY_KEY_REUSED. Keys belong to the caller's \
     tenant (operators: to the operator scope). 1 to 255 visible ASCII characters.";

/// The document for `routes`.
pub fn document(routes: &[Route]) -> Value {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut operation_ids: BTreeMap<String, usize> = BTreeMap::new();
    for route in routes {
        let (service, method) = route.grpc_path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
        let short_service = service.rsplit('.').next().unwrap_or(service);
        let method_desc = route
            .input
            .parent_pool()
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == method));
        let path_fields: Vec<&str> = route.template.variables().collect();
        let operation_id = operation_id(service, method, &path_fields, &mut operation_ids);

        let mut parameters = Vec::new();
        for name in &path_fields {
            let schema =
                route.input.get_field_by_name(name).map_or(json!({"type": "string", "minLength": 1}), |f| {
                    field_schema(&f, Direction::Request, Place::Url, &mut schemas)
                });
            let mut param = json!({"name": name, "in": "path", "required": true, "schema": schema});
            if let Some(d) = route.input.get_field_by_name(name).and_then(|f| comment_of_field(&f)) {
                param["description"] = json!(d);
            }
            parameters.push(param);
        }
        if route.body.is_empty() {
            for f in route.input.fields() {
                if path_fields.contains(&f.name()) || matches!(f.kind(), Kind::Message(_)) || f.is_map() {
                    continue;
                }
                // A query parameter a rule requires is documented so.
                let required = rules::Rules::get().of(&f).is_some_and(|r| r.rules.required);
                let mut param = json!({
                    "name": f.name(),
                    "in": "query",
                    "required": required,
                    "schema": field_schema(&f, Direction::Request, Place::Url, &mut schemas),
                });
                if let Some(d) = comment_of_field(&f) {
                    param["description"] = json!(d);
                }
                parameters.push(param);
            }
        }
        if route.method != http::Method::GET {
            parameters.push(json!({
                "name": "Idempotency-Key",
                "in": "header",
                "required": false,
                "description": IDEMPOTENCY_KEY,
                "schema": {"type": "string", "minLength": 1, "maxLength": rules::MAX_KEY_HEADER, "pattern": rules::KEY_HEADER_PATTERN},
            }));
        }
        parameters.push(json!({
            "name": "X-Request-Id",
            "in": "header",
            "required": false,
            "description": "Your id for this request, kept with the job it starts (the trace id when absent).",
            "schema": {"type": "string", "minLength": 1, "maxLength": rules::MAX_KEY_HEADER, "pattern": rules::KEY_HEADER_PATTERN},
        }));

        let mut op = Map::new();
        op.insert("operationId".into(), json!(operation_id));
        op.insert("tags".into(), json!([short_service]));
        op.insert("summary".into(), json!(format!("{short_service}.{method}")));
        if let Some(d) = method_desc.as_ref().and_then(|m| comment(m.parent_file(), m.path())) {
            op.insert("description".into(), json!(d));
        }
        op.insert("x-grpc-method".into(), json!(format!("{service}/{method}")));
        op.insert("parameters".into(), Value::Array(parameters));
        match route.body.as_str() {
            "" => {}
            "*" => {
                let schema = message_schema(&route.input, Direction::Request, &path_fields, &mut schemas);
                let required = schema.get("required").is_some();
                op.insert(
                    "requestBody".into(),
                    json!({"required": required, "content": {"application/json": {"schema": schema}}}),
                );
            }
            field => {
                let f = route.input.get_field_by_name(field);
                let schema = f.as_ref().map_or(json!({}), |f| match f.kind() {
                    // The body is the message itself, never null.
                    Kind::Message(m) => reference(&m, Direction::Request, &mut schemas),
                    _ => field_schema(f, Direction::Request, Place::Body, &mut schemas),
                });
                let required =
                    f.as_ref().and_then(|f| rules::Rules::get().of(f)).is_some_and(|r| r.rules.required);
                op.insert(
                    "requestBody".into(),
                    json!({"required": required, "content": {"application/json": {"schema": schema}}}),
                );
            }
        }
        let success = if route.server_streaming {
            let item = reference(&route.output, Direction::Response, &mut schemas);
            json!({
                "description": format!(
                    "Server-sent events: each `message` event's data is a {} (JSON); an `error` event's data is an Error (JSON), and ends the stream.",
                    schema_name(&route.output, Direction::Response)
                ),
                "content": {"text/event-stream": {"schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["message", "error"]},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"oneOf": [item, {"$ref": "#/components/schemas/Error"}]},
                        },
                        "id": {"type": "string"},
                        "retry": {"type": "integer"},
                    },
                }}},
            })
        } else {
            let schema = reference(&route.output, Direction::Response, &mut schemas);
            let mut content = json!({"application/json": {"schema": schema}});
            if let Some(rows) = &route.csv_rows {
                // `Accept: text/csv`: the rows, a header line of their field names first.
                content["text/csv"] = json!({"schema": {
                    "type": "string",
                    "description": format!("With `Accept: text/csv`: the `{rows}` as CSV (RFC 4180), a header row of their field names first."),
                }});
            }
            json!({"description": route.output.full_name(), "content": content})
        };
        op.insert(
            "responses".into(),
            json!({
                route.success_status.as_str(): success,
                "default": {
                    "description": "An error: the status follows the code (see the README's error table).",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            }),
        );
        paths
            .entry(route.template.as_str().to_owned())
            .or_default()
            .insert(route.method.as_str().to_lowercase(), Value::Object(op));
    }

    let codes: Vec<&str> = hcp_proto::error::ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["code", "message", "details", "trace_id"],
            "properties": {
                "code": {"type": "string", "enum": codes},
                "message": {"type": "string"},
                "details": {
                    "type": "object",
                    "description": "field: the offending field's path (`name`, `networks[0].network`, `metadata.owner`, a header's name); rule: for a broken documented rule, the JSON Schema keyword that states it (required, pattern, minLength, maxLength, maxItems, maxProperties, minimum, maximum, enum, readOnly, type, additionalProperties); job_id: the job in flight that a CONFLICT waits on; capability, retry_after_seconds and others as the code says",
                    "additionalProperties": {"type": "string"},
                },
                "trace_id": {"type": "string"},
            },
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "HCP — Hypervisor Control Plane",
            "version": "v1",
            "description": "Tenant (`/api/hcp/tenant/v1`), common (`/api/hcp/common/v1`) and operator (`/api/hcp/ops/v1`) REST APIs, transcoded from the gRPC services in proto/. Generated by the gateway; do not edit.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": schemas,
        },
    })
}

/// Requests accept more spellings than replies use (64-bit integers as
/// numbers too) and refuse unknown fields; replies carry every field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// Where a request value is: in the JSON body, or in the URL (a path or
/// query parameter, which is never empty: an empty one is refused).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Body,
    Url,
}

/// A short, stable operation id: the method's name in lowerCamelCase,
/// `ops` first for the operators' API, and for a method's further REST
/// bindings `By` and the path variables the first binding lacks.
fn operation_id(
    service: &str,
    method: &str,
    path_fields: &[&str],
    seen: &mut BTreeMap<String, usize>,
) -> String {
    let mut id = String::new();
    if service.starts_with("hcp.ops.") {
        id.push_str("ops");
        id.push_str(method);
    } else {
        let mut chars = method.chars();
        if let Some(first) = chars.next() {
            id.push(first.to_ascii_lowercase());
            id.extend(chars);
        }
    }
    let n = seen.entry(id.clone()).or_insert(0);
    *n += 1;
    if *n > 1 {
        id.push_str("By");
        for f in path_fields.iter().filter(|f| !matches!(**f, "project_id" | "tenant_id")) {
            id.extend(f.split('_').map(|w| {
                let mut c = w.chars();
                c.next().map(|h| h.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            }));
        }
    }
    id
}

/// The leading comment of the element at `path` in `file`, trimmed.
fn comment(file: FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let loc = info.location.iter().find(|l| l.path == path)?;
    let text = loc.leading_comments.as_deref()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let text = lines.join(" ").trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn comment_of_field(f: &FieldDescriptor) -> Option<String> {
    comment(f.parent_file(), f.path())
}

/// A schema's name, short so generated types read naturally: the message's
/// name in its package (`Vm`, `Flavor`), the package first for messages
/// not in the tenants' packages (`OpsProjectQuota`), `Input` last for the request form of a
/// message that is also a reply (`FlavorInput`).
fn schema_name(m: &MessageDescriptor, dir: Direction) -> String {
    let package = m.package_name();
    let local: String = m.full_name().strip_prefix(package).unwrap_or(m.full_name()).split('.').collect();
    // hcp.tenant.v1 and hcp.common.v1 are the tenants' vocabulary; other
    // packages' messages carry the package's name (`OpsHost`,
    // `ProviderCapabilities`).
    let segment = package.strip_prefix("hcp.").and_then(|p| p.split('.').next()).unwrap_or("");
    let prefix = match segment {
        "" | "tenant" | "common" => String::new(),
        other => other[..1].to_ascii_uppercase() + &other[1..],
    };
    let mut name = if local.starts_with(&prefix) { local } else { format!("{prefix}{local}") };
    if dir == Direction::Request {
        name.push_str("Input");
    }
    name
}

/// A `$ref` to `m`'s schema, which is added to `schemas` when missing.
fn reference(m: &MessageDescriptor, dir: Direction, schemas: &mut BTreeMap<String, Value>) -> Value {
    if let Some(wkt) = well_known(m) {
        return wkt;
    }
    let name = schema_name(m, dir);
    if !schemas.contains_key(&name) {
        // A placeholder first: messages may refer to themselves.
        schemas.insert(name.clone(), json!({}));
        let schema = message_schema(m, dir, &[], schemas);
        schemas.insert(name.clone(), schema);
    }
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn message_schema(
    m: &MessageDescriptor,
    dir: Direction,
    skip: &[&str],
    schemas: &mut BTreeMap<String, Value>,
) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for f in m.fields() {
        if skip.contains(&f.name()) {
            continue;
        }
        let rule = rules::Rules::get().of(&f);
        if dir == Direction::Request {
            // Output-only fields are refused in requests: they are not part
            // of the request's shape.
            if rule.is_some_and(|r| r.rules.output_only) {
                continue;
            }
            // A number without presence whose minimum is above 0 must be
            // given (absent is 0).
            let positive =
                !f.supports_presence() && rule.and_then(|r| r.rules.minimum).is_some_and(|m| m > 0.0);
            if rule.is_some_and(|r| r.rules.required) || positive {
                required.push(f.name().to_owned());
            }
        }
        let mut schema = field_schema(&f, dir, Place::Body, schemas);
        if let Some(d) = comment_of_field(&f) {
            describe(&mut schema, d);
        }
        properties.insert(f.name().to_owned(), schema);
    }
    let mut schema = json!({"type": "object", "properties": properties});
    if let Some(d) = comment(m.parent_file(), m.path()) {
        schema["description"] = json!(d);
    }
    if dir == Direction::Request {
        schema["additionalProperties"] = json!(false);
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
    }
    schema
}

/// Adds a description to a schema; a `$ref` is wrapped (siblings of `$ref`
/// are allowed in 3.1, but generators read them unevenly).
fn describe(schema: &mut Value, text: String) {
    if let Some(obj) = schema.as_object_mut() {
        if obj.contains_key("$ref") {
            *schema = json!({"allOf": [schema.clone()], "description": text});
        } else {
            obj.insert("description".into(), json!(text));
        }
    }
}

fn field_schema(
    f: &FieldDescriptor,
    dir: Direction,
    place: Place,
    schemas: &mut BTreeMap<String, Value>,
) -> Value {
    let rule = match dir {
        Direction::Request => rules::Rules::get().of(f),
        Direction::Response => None,
    };
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else { return json!({"type": "object"}) };
        let value_field = entry.map_entry_value_field();
        let mut value = field_schema(&value_field, dir, place, schemas);
        let mut schema = json!({"type": "object"});
        if let Some(rule) = rule {
            apply_string_rules(&mut value, rule, true);
            if rule.rules.max_items > 0 {
                schema["maxProperties"] = json!(rule.rules.max_items);
            }
            let key = rule.key_format();
            if let Some(pattern) = key.pattern() {
                let mut names = json!({"pattern": pattern});
                if let Some(prefix) = key.reserved_prefix() {
                    names["not"] = json!({"pattern": format!("^{}", prefix.replace('.', "\\."))});
                }
                schema["propertyNames"] = names;
            }
        }
        schema["additionalProperties"] = value;
        return schema;
    }
    let mut item = match f.kind() {
        Kind::Message(m) => {
            let r = reference(&m, dir, schemas);
            if f.is_list() || dir == Direction::Request && rule.is_some_and(|r| r.rules.required) {
                r
            } else {
                json!({"anyOf": [r, {"type": "null"}]})
            }
        }
        kind => scalar_schema(&kind, dir),
    };
    if let (Some(rule), Kind::Enum(_)) = (rule, f.kind())
        && rule.rules.required
        && let Some(Value::Array(names)) = item.get_mut("enum")
    {
        // A required enum is never its unspecified value.
        names.retain(|n| !n.as_str().is_some_and(|n| n.ends_with("_UNSPECIFIED")));
    }
    if let (Some(rule), Kind::Message(m)) = (rule, f.kind())
        && m.full_name() == rules::FIELD_MASK
        && !rule.rules.one_of.is_empty()
    {
        // The paths a mask may name, in proto and JSON spelling.
        let names: Vec<String> = rule
            .rules
            .one_of
            .iter()
            .flat_map(|p| {
                let camel = crate::transcode::camel_case(p);
                if camel == *p { vec![p.clone()] } else { vec![p.clone(), camel] }
            })
            .collect();
        let one = format!("({})", names.join("|"));
        return json!({
            "type": "string",
            "pattern": format!("^{one}(,{one})*$"),
            "description": format!("comma-separated: any of {}", rule.rules.one_of.join(", ")),
        });
    }
    if let Some(rule) = rule {
        // List items are checked as given; a single value that is not
        // required may be empty (not given), except in the URL.
        let strict = f.is_list() || rule.rules.required || place == Place::Url;
        let strict = strict && !(f.is_list() && format_allows_empty(rule));
        apply_string_rules(&mut item, rule, strict);
        if let Some(min) = rule.rules.minimum {
            item["minimum"] = number(min);
        }
        if let Some(max) = rule.rules.maximum {
            item["maximum"] = number(max);
        }
    } else if dir == Direction::Request
        && place == Place::Url
        && item["type"] == "string"
        && f.name() != "page_token"
    {
        // An empty query value is refused (leave the parameter out), but
        // an empty page token asks for the first page.
        item["minLength"] = json!(1);
    }
    // An optional scalar may be null in a request (null is "not given").
    if dir == Direction::Request
        && f.supports_presence()
        && !f.is_list()
        && !matches!(f.kind(), Kind::Message(_))
        && let Some(t) = item.get("type").cloned()
    {
        let mut types = match t {
            Value::Array(a) => a,
            t => vec![t],
        };
        types.push(json!("null"));
        item["type"] = Value::Array(types);
    }
    if f.is_list() {
        let mut list = json!({"type": "array", "items": item});
        if let Some(max) = rule.map(|r| r.rules.max_items).filter(|m| *m > 0) {
            list["maxItems"] = json!(max);
        }
        if dir == Direction::Request && rule.is_some_and(|r| r.rules.required) {
            // A required list is refused empty.
            list["minItems"] = json!(1);
        }
        list
    } else {
        item
    }
}

/// Whether a list's items may be empty strings (text without a minimum).
fn format_allows_empty(rule: &Rule) -> bool {
    rule.format() == StringFormat::Text && rule.rules.min_length == 0
}

/// An ECMA 262 pattern for the decimal numbers 0 to `max`, without
/// leading zeros (for 64-bit integers given as strings).
fn decimal_at_most(max: u64) -> String {
    let digits: Vec<u8> = max.to_string().bytes().map(|b| b - b'0').collect();
    let n = digits.len();
    let mut alts = vec!["0".to_owned()];
    if n > 1 {
        alts.push(format!("[1-9][0-9]{{0,{}}}", n - 2));
    }
    // n digits: max's prefix, then a smaller digit, then anything.
    for i in 0..n {
        let low = if i == 0 { 1 } else { 0 };
        if digits[i] > low {
            let prefix: String = digits[..i].iter().map(|d| char::from(b'0' + d)).collect();
            let rest = n - i - 1;
            let tail = if rest > 0 { format!("[0-9]{{{rest}}}") } else { String::new() };
            alts.push(format!("{prefix}[{low}-{}]{tail}", digits[i] - 1));
        }
    }
    alts.push(max.to_string());
    format!("^({})$", alts.join("|"))
}

/// A whole number as an integer, so `maximum: 3600` reads as such.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 { json!(x as i64) } else { json!(x) }
}

/// The string rules of `rule` on a string schema: its grammar, length and
/// allowed values; `strict` when an empty string is not "not given".
fn apply_string_rules(schema: &mut Value, rule: &Rule, strict: bool) {
    if schema["type"] != "string" {
        return;
    }
    let format = rule.format();
    if let Some(pattern) = format.pattern() {
        let pattern =
            if strict || format == StringFormat::Text { pattern.to_owned() } else { format!("^$|{pattern}") };
        schema["pattern"] = json!(pattern);
        if format == StringFormat::Uuid && strict {
            schema["format"] = json!("uuid");
        }
        if let Some(prefix) = format.reserved_prefix() {
            schema["not"] = json!({"pattern": format!("^{}", prefix.replace('.', "\\."))});
        }
    }
    if let Some(max) = rule.max_length() {
        schema["maxLength"] = json!(max);
    }
    if strict && schema.get("enum").is_none() && rule.rules.one_of.is_empty() {
        schema["minLength"] = json!(1);
    }
    if rule.rules.min_length > 0 {
        schema["minLength"] = json!(rule.rules.min_length);
    }
    if !rule.rules.one_of.is_empty() {
        let mut values: Vec<&str> = rule.rules.one_of.iter().map(String::as_str).collect();
        if !strict {
            values.insert(0, "");
        }
        schema["enum"] = json!(values);
    }
}

fn scalar_schema(kind: &Kind, dir: Direction) -> Value {
    let wide = |format: &str, pattern: &str| match dir {
        Direction::Request => json!({"type": ["string", "integer"], "format": format, "pattern": pattern}),
        Direction::Response => json!({"type": "string", "format": format}),
    };
    match kind {
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => wide("int64", "^-?[0-9]{1,18}$"),
        Kind::Uint64 | Kind::Fixed64 => match dir {
            Direction::Request => json!({
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": u64::MAX},
                    {"type": "string", "pattern": decimal_at_most(u64::MAX)},
                ],
                "format": "uint64",
            }),
            Direction::Response => json!({"type": "string", "format": "uint64"}),
        },
        Kind::Float => json!({"type": "number", "format": "float"}),
        Kind::Double => json!({"type": "number", "format": "double"}),
        Kind::Enum(e) => {
            let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(_) => json!({"type": "object"}),
    }
}

/// The JSON forms of the well-known types HCP's messages use.
fn well_known(m: &MessageDescriptor) -> Option<Value> {
    Some(match m.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"}),
        "google.protobuf.FieldMask" => json!({
            "type": "string",
            "description": "comma-separated field names",
            "pattern": "^[a-z][a-zA-Z0-9_]*(,[a-z][a-zA-Z0-9_]*)*$",
        }),
        "google.protobuf.Struct" => json!({"type": "object"}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.Empty" => json!({"type": "object", "additionalProperties": false}),
        "google.protobuf.StringValue" => json!({"type": ["string", "null"]}),
        "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => json!({"type": ["integer", "null"]}),
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({"type": ["string", "integer", "null"]})
        }
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({"type": ["number", "null"]}),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_patterns_take_exactly_the_numbers_up_to_their_maximum() {
        for max in [0u64, 7, 10, 19, 255, 1000, 3600, u64::MAX] {
            let re = regex::Regex::new(&decimal_at_most(max)).unwrap();
            let probe = |n: u128| re.is_match(&n.to_string());
            for n in [0u128, 1, 9, 10, 99, 100, 254, 255, 256, 999, 1000, 1001, 3599, 3600, 3601] {
                assert_eq!(probe(n), n <= u128::from(max), "{n} against {max}");
            }
            assert!(probe(u128::from(max)) && !probe(u128::from(max) + 1), "{max}");
            assert!(!re.is_match("007") || max < 7, "leading zeros");
        }
    }

    /// Short schema names never collide: two messages never share one.
    #[test]
    fn schema_names_are_unique() {
        let pool = prost_reflect::DescriptorPool::decode(hcp_proto::FILE_DESCRIPTOR_SET).unwrap();
        for dir in [Direction::Request, Direction::Response] {
            let mut seen: BTreeMap<String, String> = BTreeMap::new();
            for m in pool.all_messages().filter(|m| m.package_name().starts_with("hcp.")) {
                let name = schema_name(&m, dir);
                if let Some(other) = seen.insert(name.clone(), m.full_name().to_owned()) {
                    panic!("{} and {other} would both be schema {name}", m.full_name());
                }
            }
        }
    }
}
