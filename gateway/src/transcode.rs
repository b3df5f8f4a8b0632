//! REST to gRPC transcoding, generic over the descriptors: a request's path
//! variables, query parameters and JSON body become one protobuf message of
//! the method's input type; the reply message becomes JSON (proto3 JSON
//! mapping, field names as in the proto). Errors name the offending field.

use bytes::{Buf, BufMut, Bytes};
use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::routes::Route;

/// Builds the input message of `route` from the request parts.
pub fn request_message(
    route: &Route,
    path_vars: Vec<(String, String)>,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, ApiError> {
    let input = &route.input;
    let mut object = Map::new();
    let body_is_blank = body.iter().all(|b| b.is_ascii_whitespace());
    match route.body.as_str() {
        "" => {
            if !body_is_blank {
                return Err(ApiError::invalid_field("body", "this request takes no body"));
            }
        }
        field => {
            let value: Value = if body_is_blank {
                Value::Object(Map::new())
            } else {
                serde_json::from_slice(body).map_err(|e| {
                    // serde_json's message quotes no input, only a
                    // position and what it expected.
                    ApiError::invalid_field("body", format!("malformed JSON: {e}"))
                })?
            };
            if field == "*" {
                match value {
                    Value::Object(m) => object = m,
                    _ => return Err(ApiError::invalid_field("body", "the body must be a JSON object")),
                }
            } else {
                object.insert(field.to_owned(), value);
            }
        }
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = crate::routes::percent_decode(k)
                .ok_or_else(|| ApiError::invalid_field("query", "malformed query string"))?;
            let v = crate::routes::percent_decode(v)
                .ok_or_else(|| ApiError::invalid_field(&k, "malformed query string"))?;
            let field = find_field(input, &k).ok_or_else(|| {
                ApiError::invalid_field(&k, format!("unknown query parameter {}", excerpt(&k)))
            })?;
            let value = scalar_from_text(&field, &k, &v)?;
            let name = field.name().to_owned();
            if field.is_list() {
                match object.entry(name).or_insert_with(|| Value::Array(Vec::new())) {
                    Value::Array(a) => a.push(value),
                    _ => return Err(ApiError::invalid_field(&k, format!("{k} is given twice"))),
                }
            } else {
                if object.contains_key(&name) {
                    return Err(ApiError::invalid_field(&k, format!("{k} is given twice")));
                }
                object.insert(name, value);
            }
        }
    }
    // Path variables win over the same field in the body or query.
    for (name, raw) in path_vars {
        let field = find_field(input, &name).ok_or_else(|| {
            ApiError::invalid_field(&name, format!("unknown path field {}", excerpt(&name)))
        })?;
        let value = scalar_from_text(&field, &name, &raw)?;
        object.remove(field.json_name());
        object.insert(field.name().to_owned(), value);
    }
    check_object(input, &object, "")?;
    let opts = prost_reflect::DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(input.clone(), Value::Object(object), &opts).map_err(|e| {
        let text = e.to_string();
        let field = backticked(&text).unwrap_or_else(|| "body".to_owned());
        ApiError::invalid_field(&field, format!("invalid request: {text}"))
    })
}

/// Serializes a reply message to JSON.
pub fn response_json(message: &DynamicMessage) -> Result<Vec<u8>, ApiError> {
    let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true).skip_default_fields(false);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    message.serialize_with_options(&mut ser, &opts).map_err(|e| {
        tracing::error!(error = %e, "cannot serialize a reply");
        ApiError::internal()
    })?;
    Ok(out)
}

fn backticked(text: &str) -> Option<String> {
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_owned())
}

fn find_field(desc: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(name).or_else(|| desc.get_field_by_json_name(name))
}

/// Converts a path or query value to the JSON the field expects.
fn scalar_from_text(field: &FieldDescriptor, name: &str, raw: &str) -> Result<Value, ApiError> {
    let bad =
        |what: &str| ApiError::invalid_field(name, format!("{name} must be {what}, got {}", excerpt(raw)));
    Ok(match field.kind() {
        Kind::String | Kind::Bytes => Value::String(raw.to_owned()),
        Kind::Bool => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        Kind::Enum(e) => {
            if e.get_value_by_name(raw).is_none() {
                let names: Vec<_> = e
                    .values()
                    .map(|v| v.name().to_owned())
                    .filter(|n| !n.ends_with("_UNSPECIFIED"))
                    .collect();
                return Err(bad(&format!("one of {}", names.join(", "))));
            }
            Value::String(raw.to_owned())
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            raw.parse::<i64>().map_err(|_| bad("an integer"))?;
            Value::String(raw.to_owned())
        }
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => {
            raw.parse::<u64>().map_err(|_| bad("a non-negative integer"))?;
            Value::String(raw.to_owned())
        }
        Kind::Float | Kind::Double => {
            raw.parse::<f64>().map_err(|_| bad("a number"))?;
            Value::String(raw.to_owned())
        }
        // A field mask is a comma-separated list in JSON and in a URL alike.
        Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask" => Value::String(raw.to_owned()),
        Kind::Message(_) => {
            return Err(ApiError::invalid_field(name, format!("{name} cannot be set from the URL")));
        }
    })
}

/// Checks JSON shapes against the message before decoding, so that errors
/// name the field with its full path (`networks[0].network`).
fn check_object(desc: &MessageDescriptor, object: &Map<String, Value>, prefix: &str) -> Result<(), ApiError> {
    for (key, value) in object {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let field = find_field(desc, key)
            .ok_or_else(|| ApiError::invalid_field(&path, format!("unknown field {}", excerpt(&path))))?;
        if value.is_null() {
            continue;
        }
        if field.is_map() {
            let Value::Object(entries) = value else {
                return Err(ApiError::invalid_field(&path, format!("{path} must be an object")));
            };
            if let Kind::Message(entry) = field.kind() {
                let value_field = entry.map_entry_value_field();
                for (k, v) in entries {
                    check_value(&value_field, v, &format!("{path}.{k}"))?;
                }
            }
        } else if field.is_list() {
            let Value::Array(items) = value else {
                return Err(ApiError::invalid_field(&path, format!("{path} must be an array")));
            };
            for (i, v) in items.iter().enumerate() {
                check_value(&field, v, &format!("{path}[{i}]"))?;
            }
        } else {
            check_value(&field, value, &path)?;
        }
    }
    Ok(())
}

fn check_value(field: &FieldDescriptor, value: &Value, path: &str) -> Result<(), ApiError> {
    let wrong = |what: &str| ApiError::invalid_field(path, format!("{path} must be {what}"));
    match field.kind() {
        Kind::String | Kind::Bytes => value.is_string().then_some(()).ok_or_else(|| wrong("a string")),
        Kind::Bool => value.is_boolean().then_some(()).ok_or_else(|| wrong("true or false")),
        Kind::Enum(e) => match value {
            Value::String(s) if e.get_value_by_name(s).is_some() => Ok(()),
            Value::Number(n) if n.as_i64().is_some_and(|n| e.get_value(n as i32).is_some()) => Ok(()),
            _ => {
                let names: Vec<_> = e
                    .values()
                    .map(|v| v.name().to_owned())
                    .filter(|n| !n.ends_with("_UNSPECIFIED"))
                    .collect();
                Err(wrong(&format!("one of {}", names.join(", "))))
            }
        },
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            value.is_string().then_some(()).ok_or_else(|| wrong("an RFC 3339 timestamp"))
        }
        Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask" => {
            value.is_string().then_some(()).ok_or_else(|| wrong("a comma-separated list of field names"))
        }
        Kind::Message(m) => match value {
            Value::Object(o) => check_object(&m, o, path),
            _ => Err(wrong("an object")),
        },
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => {
            let ok = match value {
                Value::Number(n) => n.as_u64().is_some(),
                Value::String(s) => s.parse::<u64>().is_ok(),
                _ => false,
            };
            ok.then_some(()).ok_or_else(|| wrong("a non-negative integer"))
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            let ok = match value {
                Value::Number(n) => n.as_i64().is_some(),
                Value::String(s) => s.parse::<i64>().is_ok(),
                _ => false,
            };
            ok.then_some(()).ok_or_else(|| wrong("an integer"))
        }
        Kind::Float | Kind::Double => {
            let ok = match value {
                Value::Number(_) => true,
                Value::String(s) => s.parse::<f64>().is_ok(),
                _ => false,
            };
            ok.then_some(()).ok_or_else(|| wrong("a number"))
        }
    }
}

/// Builds the JSON error body `{"code","message","details","trace_id"}`.
pub fn error_body(err: &ApiError, trace_id: Option<String>) -> (http::StatusCode, Vec<u8>) {
    let mut details = err.details.clone();
    let trace = details.remove(hcp_proto::error::DETAIL_TRACE_ID).or(trace_id).unwrap_or_default();
    let body = serde_json::json!({
        "code": err.code.as_str(),
        "message": err.message,
        "details": details,
        "trace_id": trace,
    });
    (err.code.http_status(), serde_json::to_vec(&body).unwrap_or_default())
}

/// Returns NOT_FOUND for a path no route serves.
pub fn no_route(method: &http::Method, path: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no API route for {method} {}", excerpt(path)))
}

/// A codec that passes encoded messages through as bytes, so the gateway
/// can call any method without generated types.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_route() -> Route {
        let (_, routes) =
            crate::routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).unwrap();
        routes.into_iter().find(|r| r.grpc_path.ends_with("/CreateVm")).unwrap()
    }

    fn field_of(body: &str) -> String {
        let r = create_route();
        let e =
            request_message(&r, vec![("project_id".into(), "p1".into())], None, body.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        e.details.get("field").cloned().unwrap_or_default()
    }

    #[test]
    fn bad_bodies_name_the_field() {
        assert_eq!(field_of("{not json"), "body");
        assert_eq!(field_of("[1]"), "body");
        assert_eq!(field_of(r#"{"name":"a","bogus":1}"#), "bogus");
        assert_eq!(field_of(r#"{"name":5}"#), "name");
        assert_eq!(field_of(r#"{"networks":[{"network":1}]}"#), "networks[0].network");
        assert_eq!(field_of(r#"{"networks":[{"nope":"x"}]}"#), "networks[0].nope");
        assert_eq!(field_of(r#"{"metadata":{"k":1}}"#), "metadata.k");
    }

    #[test]
    fn field_masks_are_comma_separated_in_the_body_and_the_query() {
        let (_, routes) =
            crate::routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).unwrap();
        let r = routes.into_iter().find(|r| r.grpc_path.ends_with("/UpdateVm")).unwrap();
        let vars = || vec![("project_id".to_owned(), "p1".to_owned()), ("vm_id".to_owned(), "v".to_owned())];
        for (query, body) in [
            (None, br#"{"name":"a","update_mask":"name,tags"}"#.as_slice()),
            (Some("update_mask=name,tags"), br#"{"name":"a"}"#.as_slice()),
        ] {
            let m = request_message(&r, vars(), query, body).unwrap();
            let mask = m.get_field_by_name("update_mask").unwrap();
            let paths = mask.as_message().unwrap().get_field_by_name("paths").unwrap();
            let paths: Vec<_> =
                paths.as_list().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
            assert_eq!(paths, ["name", "tags"]);
        }
        let e = request_message(&r, vars(), None, br#"{"update_mask":{"paths":1}}"#).unwrap_err();
        assert_eq!(e.details.get("field").map(String::as_str), Some("update_mask"));
    }

    #[test]
    fn path_fields_override_the_body() {
        let r = create_route();
        let m = request_message(
            &r,
            vec![("project_id".into(), "p1".into())],
            None,
            br#"{"projectId":"evil","name":"a"}"#,
        )
        .unwrap();
        let v = m.get_field_by_name("project_id").unwrap();
        assert_eq!(v.as_str(), Some("p1"));
    }
}
