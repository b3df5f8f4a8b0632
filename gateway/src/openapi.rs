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

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::routes::Route;

/// The document for `routes`.
pub fn document(routes: &[Route]) -> Value {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut operation_ids: BTreeMap<String, usize> = BTreeMap::new();
    for route in routes {
        let (service, method) = route.grpc_path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
        let n = operation_ids.entry(format!("{service}.{method}")).or_insert(0);
        *n += 1;
        let operation_id =
            if *n == 1 { format!("{service}.{method}") } else { format!("{service}.{method}_{n}") };
        let path_fields: Vec<&str> = route.template.variables().collect();

        let mut parameters = Vec::new();
        for name in &path_fields {
            let schema = route
                .input
                .get_field_by_name(name)
                .map_or(json!({"type": "string"}), |f| field_schema(&f, Direction::Request, &mut schemas));
            parameters.push(json!({"name": name, "in": "path", "required": true, "schema": schema}));
        }
        if route.body.is_empty() {
            for f in route.input.fields() {
                if path_fields.contains(&f.name()) || matches!(f.kind(), Kind::Message(_)) || f.is_map() {
                    continue;
                }
                parameters.push(json!({
                    "name": f.name(),
                    "in": "query",
                    "required": false,
                    "schema": field_schema(&f, Direction::Request, &mut schemas),
                }));
            }
        }
        if route.method == http::Method::POST {
            parameters.push(json!({
                "name": "Idempotency-Key",
                "in": "header",
                "required": false,
                "description": "A retried request with the same key and body gets the first answer (24 h); with another body, 409 IDEMPOTENCY_KEY_REUSED.",
                "schema": {"type": "string", "minLength": 1, "maxLength": crate::MAX_KEY_HEADER},
            }));
        }

        let mut op = Map::new();
        op.insert("operationId".into(), json!(operation_id));
        op.insert("tags".into(), json!([service.rsplit('.').next().unwrap_or(service)]));
        op.insert("summary".into(), json!(format!("{service}.{method}")));
        op.insert("parameters".into(), Value::Array(parameters));
        match route.body.as_str() {
            "" => {}
            "*" => {
                let schema = message_schema(&route.input, Direction::Request, &path_fields, &mut schemas);
                op.insert(
                    "requestBody".into(),
                    json!({"required": false, "content": {"application/json": {"schema": schema}}}),
                );
            }
            field => {
                let schema = route
                    .input
                    .get_field_by_name(field)
                    .map_or(json!({}), |f| field_schema(&f, Direction::Request, &mut schemas));
                op.insert(
                    "requestBody".into(),
                    json!({"required": false, "content": {"application/json": {"schema": schema}}}),
                );
            }
        }
        let success = if route.server_streaming {
            json!({
                "description": format!("Server-sent events: each `message` event's data is a {} (JSON).", route.output.full_name()),
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            })
        } else {
            let schema = reference(&route.output, Direction::Response, &mut schemas);
            json!({"description": route.output.full_name(), "content": {"application/json": {"schema": schema}}})
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
                    "description": "field names the offending field; capability, retry_after_seconds and others as the code says",
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

fn schema_name(m: &MessageDescriptor, dir: Direction) -> String {
    match dir {
        Direction::Request => format!("{}.Input", m.full_name()),
        Direction::Response => m.full_name().to_owned(),
    }
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
    for f in m.fields() {
        if skip.contains(&f.name()) {
            continue;
        }
        properties.insert(f.name().to_owned(), field_schema(&f, dir, schemas));
    }
    let mut schema = json!({"type": "object", "properties": properties});
    if dir == Direction::Request {
        schema["additionalProperties"] = json!(false);
    }
    schema
}

fn field_schema(f: &FieldDescriptor, dir: Direction, schemas: &mut BTreeMap<String, Value>) -> Value {
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else { return json!({"type": "object"}) };
        let value = field_schema(&entry.map_entry_value_field(), dir, schemas);
        return json!({"type": "object", "additionalProperties": value});
    }
    let item = match f.kind() {
        Kind::Message(m) => {
            let r = reference(&m, dir, schemas);
            if f.is_list() { r } else { json!({"anyOf": [r, {"type": "null"}]}) }
        }
        // Ids core checks as UUIDs (`validate::id`); in replies they may be
        // empty where they do not apply.
        Kind::String if dir == Direction::Request && UUID_FIELDS.contains(&f.name()) => {
            json!({"type": "string", "format": "uuid"})
        }
        kind => scalar_schema(&kind, dir),
    };
    if f.is_list() { json!({"type": "array", "items": item}) } else { item }
}

/// Request fields core accepts only as UUIDs.
const UUID_FIELDS: &[&str] = &["vm_id", "job_id", "snapshot_id", "provider_id"];

fn scalar_schema(kind: &Kind, dir: Direction) -> Value {
    let wide = |format: &str| match dir {
        Direction::Request => json!({"type": ["string", "integer"], "format": format}),
        Direction::Response => json!({"type": "string", "format": format}),
    };
    match kind {
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => wide("int64"),
        Kind::Uint64 | Kind::Fixed64 => wide("uint64"),
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
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "comma-separated field paths"})
        }
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
