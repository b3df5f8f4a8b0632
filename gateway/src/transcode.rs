//! REST to gRPC transcoding, generic over the descriptors: a request's path
//! variables, query parameters and JSON body become one protobuf message of
//! the method's input type; the reply message becomes JSON (proto3 JSON
//! mapping, field names as in the proto). Errors name the offending field.
//!
//! The JSON is checked and normalized against the descriptors before
//! prost-reflect decodes it, so that every refusal names its field: a
//! field given under both its proto and its JSON name, integers (integral
//! numbers such as `3240.0` are accepted, as proto3 JSON allows, within
//! the type's range), and field masks (parsed here: comma-separated
//! paths of snake_case or lowerCamelCase names, always handed on as the
//! proto's snake_case names).

use bytes::{Buf, BufMut, Bytes};
use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::routes::Route;

/// The one query parameter that may be given empty: the first page.
const PAGE_TOKEN: &str = "page_token";

/// Builds the input message of `route` from the request parts. Every
/// refusal names the field and, in `details.rule`, the JSON Schema keyword
/// of the document's rule the request broke (`additionalProperties` for a
/// field the operation does not have, `minLength` for an empty query
/// value, `enum`, `minimum`, `maximum`, `pattern` for a malformed field
/// mask, `type` for any other value of the wrong kind).
pub fn request_message(
    route: &Route,
    path_vars: Vec<(String, String)>,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, ApiError> {
    shape(route, path_vars, query, body).map_err(|e| {
        // What is refused at its source names its rule there; anything
        // else the transcoder refuses is a value of the wrong kind.
        if e.code != ErrorCode::InvalidArgument || e.details.contains_key("rule") {
            e
        } else {
            e.with_detail("rule", "type")
        }
    })
}

fn shape(
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
                    .with_detail("rule", "additionalProperties")
            })?;
            // An empty value would read as "no filter" (`?vm_id=`), hiding
            // a client's bug; only an empty page token has a meaning of its
            // own, the first page (AIP-158), which paging loops send.
            if v.is_empty() && field.name() != PAGE_TOKEN {
                return Err(ApiError::invalid_field(
                    &k,
                    format!("{k} is empty; leave the parameter out rather than give it no value"),
                )
                .with_detail("rule", "minLength"));
            }
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
    // A path variable is given by the path only: the same field in the
    // body or query is refused (the document leaves it out of both), never
    // silently overridden.
    for (name, raw) in path_vars {
        let field = find_field(input, &name).ok_or_else(|| {
            ApiError::invalid_field(&name, format!("unknown path field {}", excerpt(&name)))
        })?;
        let value = scalar_from_text(&field, &name, &raw)?;
        if object.contains_key(field.json_name()) || object.contains_key(field.name()) {
            return Err(ApiError::invalid_field(
                field.name(),
                format!("{} is given by the path; leave it out of the body and the query", field.name()),
            )
            .with_detail("rule", "additionalProperties"));
        }
        object.insert(field.name().to_owned(), value);
    }
    check_object(input, &mut object, "")?;
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

/// Whether a request's `Accept` header asks for CSV.
pub fn wants_csv(headers: &http::HeaderMap) -> bool {
    headers.get_all(http::header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',')
            .any(|item| item.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("text/csv")))
    })
}

/// Renders the repeated message field `rows` of a reply as CSV (RFC 4180):
/// a header row of the row message's field names (proto order), then one
/// line per item with each field as proto3 JSON would give it (64-bit
/// integers as digits, messages and lists as JSON text).
pub fn response_csv(message: &DynamicMessage, rows: &str) -> Result<Vec<u8>, ApiError> {
    let field =
        prost_reflect::ReflectMessage::descriptor(message).get_field_by_name(rows).filter(|f| f.is_list());
    let Some(Kind::Message(row)) = field.map(|f| f.kind()) else {
        tracing::error!(rows, "csv_rows names no repeated message field of the reply");
        return Err(ApiError::internal());
    };
    let json: Value = serde_json::from_slice(&response_json(message)?).map_err(|_| ApiError::internal())?;
    let names: Vec<String> = row.fields().map(|f| f.name().to_owned()).collect();
    let mut out = String::new();
    csv_line(&mut out, names.iter().map(String::as_str));
    for item in json.get(rows).and_then(Value::as_array).into_iter().flatten() {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match item.get(n) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            })
            .collect();
        csv_line(&mut out, cells.iter().map(String::as_str));
    }
    Ok(out.into_bytes())
}

fn csv_line<'a>(out: &mut String, cells: impl Iterator<Item = &'a str>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(cell);
        }
    }
    out.push_str("\r\n");
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
                return Err(bad(&format!("one of {}", names.join(", "))).with_detail("rule", "enum"));
            }
            Value::String(raw.to_owned())
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            raw.parse::<i64>().map_err(|_| bad("an integer"))?;
            Value::String(raw.to_owned())
        }
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => {
            raw.parse::<u64>().map_err(|_| {
                // A negative number is below the field's minimum (0).
                let negative = raw.strip_prefix('-').is_some_and(|d| d.parse::<u64>().is_ok());
                let e = bad("a non-negative integer");
                if negative { e.with_detail("rule", "minimum") } else { e }
            })?;
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
/// name the field with its full path (`networks[0].network`), and rewrites
/// the values prost-reflect would misread (integers given as integral
/// floats or strings, field masks) into the form it reads exactly.
fn check_object(
    desc: &MessageDescriptor,
    object: &mut Map<String, Value>,
    prefix: &str,
) -> Result<(), ApiError> {
    let joined = |name: &str| if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") };
    // Each field once: `update_mask` and `updateMask` are the same field.
    let mut seen: Vec<(u32, &str)> = Vec::new();
    for (key, value) in object.iter_mut() {
        let path = joined(key);
        let field = find_field(desc, key).ok_or_else(|| {
            ApiError::invalid_field(&path, format!("unknown field {}", excerpt(&path)))
                .with_detail("rule", "additionalProperties")
        })?;
        if let Some((_, first)) = seen.iter().find(|(n, _)| *n == field.number()) {
            let name = joined(field.name());
            return Err(ApiError::invalid_field(
                &name,
                format!("{name} is given twice, as {first} and {key}"),
            ));
        }
        seen.push((field.number(), key));
        // proto3 JSON: null is the field's default, as if it were absent.
        if value.is_null() {
            continue;
        }
        if field.is_map() {
            let Value::Object(entries) = value else {
                return Err(ApiError::invalid_field(&path, format!("{path} must be an object")));
            };
            if let Kind::Message(entry) = field.kind() {
                let value_field = entry.map_entry_value_field();
                for (k, v) in entries.iter_mut() {
                    check_value(&value_field, v, &format!("{path}.{k}"))?;
                }
            }
        } else if field.is_list() {
            let Value::Array(items) = value else {
                return Err(ApiError::invalid_field(&path, format!("{path} must be an array")));
            };
            for (i, v) in items.iter_mut().enumerate() {
                check_value(&field, v, &format!("{path}[{i}]"))?;
            }
        } else {
            check_value(&field, value, &path)?;
        }
    }
    Ok(())
}

fn check_value(field: &FieldDescriptor, value: &mut Value, path: &str) -> Result<(), ApiError> {
    let wrong = |what: &str| ApiError::invalid_field(path, format!("{path} must be {what}"));
    match field.kind() {
        Kind::String | Kind::Bytes => value.is_string().then_some(()).ok_or_else(|| wrong("a string")),
        Kind::Bool => value.is_boolean().then_some(()).ok_or_else(|| wrong("true or false")),
        Kind::Enum(e) => match value {
            Value::String(s) if e.get_value_by_name(s).is_some() => Ok(()),
            Value::Number(n)
                if n.as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .is_some_and(|n| e.get_value(n).is_some()) =>
            {
                Ok(())
            }
            _ => {
                let names: Vec<_> = e
                    .values()
                    .map(|v| v.name().to_owned())
                    .filter(|n| !n.ends_with("_UNSPECIFIED"))
                    .collect();
                Err(wrong(&format!("one of {}", names.join(", "))).with_detail("rule", "enum"))
            }
        },
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            value.is_string().then_some(()).ok_or_else(|| wrong("an RFC 3339 timestamp"))
        }
        Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask" => {
            let Value::String(text) = value else {
                return Err(wrong("a comma-separated list of field names"));
            };
            *value = Value::String(field_mask(text, path)?);
            Ok(())
        }
        Kind::Message(m) => match value {
            Value::Object(o) => check_object(&m, o, path),
            _ => Err(wrong("an object")),
        },
        Kind::Uint32 | Kind::Fixed32 => integer(value, path, 0, u32::MAX.into()),
        Kind::Uint64 | Kind::Fixed64 => integer(value, path, 0, u64::MAX.into()),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => integer(value, path, i32::MIN.into(), i32::MAX.into()),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => integer(value, path, i64::MIN.into(), i64::MAX.into()),
        Kind::Float | Kind::Double => {
            let number = match value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.parse::<f64>().ok(),
                _ => None,
            };
            let Some(number) = number else { return Err(wrong("a number")) };
            // A finite double beyond a float's range cannot be stored.
            if field.kind() == Kind::Float && number.is_finite() && number.abs() > f64::from(f32::MAX) {
                return Err(wrong(&format!("a number from {} to {}", f32::MIN, f32::MAX)));
            }
            Ok(())
        }
    }
}

/// Checks an integer field's value, given as a JSON number or a string,
/// and rewrites it as a JSON integer: `3240`, `3240.0`, `"3240"` and
/// `"3.24e3"` are the same value in proto3 JSON. A fraction or a value
/// outside `min..=max` is refused naming the field.
fn integer(value: &mut Value, path: &str, min: i128, max: i128) -> Result<(), ApiError> {
    let range = || ApiError::invalid_field(path, format!("{path} must be an integer from {min} to {max}"));
    let exact = match &*value {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Some(i128::from(i)),
            (None, Some(u), _) => Some(i128::from(u)),
            (None, None, Some(f)) => integral(f),
            (None, None, None) => None,
        },
        Value::String(s) => match s.parse::<i128>() {
            Ok(i) => Some(i),
            Err(_) => match s.parse::<f64>().ok().filter(|f| f.is_finite()).and_then(integral) {
                Some(i) => Some(i),
                // A string that is no number breaks the string form's pattern.
                None => return Err(range().with_detail("rule", "pattern")),
            },
        },
        _ => None,
    };
    let Some(exact) = exact else {
        return Err(range().with_detail("rule", "type"));
    };
    if exact < min {
        return Err(range().with_detail("rule", "minimum"));
    }
    if exact > max {
        return Err(range().with_detail("rule", "maximum"));
    }
    *value = match (i64::try_from(exact), u64::try_from(exact)) {
        (Ok(i), _) => Value::from(i),
        (_, Ok(u)) => Value::from(u),
        _ => return Err(range()),
    };
    Ok(())
}

/// The integer an integral float stands for; `None` for a fraction or a
/// value no integer field holds (beyond ±2^64).
fn integral(f: f64) -> Option<i128> {
    const LIMIT: f64 = 18_446_744_073_709_551_616.0; // 2^64
    (f.is_finite() && f.fract() == 0.0 && f.abs() < LIMIT).then_some(f as i128)
}

/// Parses a field mask's JSON text (`"name,metadata"`) and returns it in
/// the form prost-reflect reads back to exactly these paths. Paths are
/// comma-separated and never empty; each is dot-separated field names in
/// the proto's snake_case (`vm_id`) or lowerCamelCase (`vmId`). Which
/// paths a method takes is core's business.
fn field_mask(text: &str, field: &str) -> Result<String, ApiError> {
    if text.is_empty() {
        return Ok(String::new());
    }
    let mut out = Vec::new();
    for path in text.split(',') {
        if path.is_empty() {
            return Err(ApiError::invalid_field(
                field,
                format!(
                    "{field} has an empty path in {}; separate field names by single commas",
                    excerpt(text)
                ),
            )
            .with_detail("rule", "pattern"));
        }
        let mut wire = Vec::new();
        for name in path.split('.') {
            let snake = snake_case(name).ok_or_else(|| {
                ApiError::invalid_field(
                    field,
                    format!("{field} names {}, which is not a field name", excerpt(path)),
                )
                .with_detail("rule", "pattern")
            })?;
            wire.push(camel_case(&snake));
        }
        out.push(wire.join("."));
    }
    Ok(out.join(","))
}

/// A field name given in snake_case or lowerCamelCase, as snake_case;
/// `None` unless it is lowercase words of letters and digits, each starting
/// with a letter, joined by single underscores (all HCP field names are).
fn snake_case(name: &str) -> Option<String> {
    let mut snake = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
            snake.push(c);
        } else {
            return None;
        }
    }
    let words_ok = snake.split('_').all(|w| w.starts_with(|c: char| c.is_ascii_lowercase()));
    words_ok.then_some(snake)
}

/// A snake_case name in lowerCamelCase, the inverse of [`snake_case`] (as
/// proto3 JSON spells field names).
pub(crate) fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
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
    use serde_json::json;

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

    fn route(suffix: &str) -> Route {
        let (_, routes) =
            crate::routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).unwrap();
        routes.into_iter().find(|r| r.grpc_path.ends_with(suffix)).unwrap()
    }

    fn vm_vars() -> Vec<(String, String)> {
        vec![("project_id".to_owned(), "p1".to_owned()), ("vm_id".to_owned(), "v".to_owned())]
    }

    /// The update mask's paths after transcoding `body`, or the refusal's
    /// field and message.
    fn mask_of(body: &str) -> Result<Vec<String>, (String, String)> {
        let r = route("/UpdateVm");
        match request_message(&r, vm_vars(), None, body.as_bytes()) {
            Ok(m) => {
                let mask = m.get_field_by_name("update_mask").unwrap();
                let paths = mask.as_message().unwrap().get_field_by_name("paths").unwrap();
                Ok(paths.as_list().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect())
            }
            Err(e) => Err((e.details.get("field").cloned().unwrap_or_default(), e.message)),
        }
    }

    #[test]
    fn field_masks_take_snake_and_camel_names_and_refuse_empty_paths() {
        assert_eq!(mask_of(r#"{"update_mask":"name,tags"}"#).unwrap(), ["name", "tags"]);
        assert_eq!(mask_of(r#"{"update_mask":"vm_id,created_at"}"#).unwrap(), ["vm_id", "created_at"]);
        assert_eq!(mask_of(r#"{"updateMask":"vmId,createdAt"}"#).unwrap(), ["vm_id", "created_at"]);
        assert_eq!(mask_of(r#"{"update_mask":"spec.disk_gib"}"#).unwrap(), ["spec.disk_gib"]);
        assert_eq!(mask_of(r#"{"update_mask":""}"#).unwrap(), Vec::<String>::new());
        for bad in ["name,", ",name", "name,,tags", "name, tags", "vm__id", "_name", "Name", "a_1", "ná"] {
            let (field, message) = mask_of(&format!(r#"{{"update_mask":"{bad}"}}"#)).unwrap_err();
            assert_eq!(field, "update_mask", "{bad}: {message}");
        }
        let (field, message) = mask_of(r#"{"update_mask":"name","updateMask":"tags"}"#).unwrap_err();
        assert_eq!(field, "update_mask");
        assert!(message.contains("given twice"), "{message}");
        // The same in the query.
        let r = route("/UpdateVm");
        let e = request_message(&r, vm_vars(), Some("update_mask=name,"), b"{}").unwrap_err();
        assert_eq!(e.details.get("field").map(String::as_str), Some("update_mask"), "{e}");
        let e = request_message(&r, vm_vars(), Some("update_mask=name"), br#"{"updateMask":"tags"}"#)
            .unwrap_err();
        assert_eq!(e.details.get("field").map(String::as_str), Some("update_mask"), "{e}");
    }

    #[test]
    fn integers_take_integral_numbers_within_their_range() {
        let r = route("/StopVm");
        let timeout = |body: &str| {
            request_message(&r, vm_vars(), None, body.as_bytes())
                .map(|m| m.get_field_by_name("timeout_seconds").unwrap().as_u32().unwrap())
        };
        for (body, want) in [
            (r#"{"timeout_seconds":3240}"#, 3240),
            (r#"{"timeout_seconds":3240.0}"#, 3240),
            (r#"{"timeout_seconds":"3240"}"#, 3240),
            (r#"{"timeout_seconds":3.24e3}"#, 3240),
            (r#"{"timeout_seconds":4294967295}"#, u32::MAX),
            (r#"{"timeout_seconds":null}"#, 0),
        ] {
            assert_eq!(timeout(body).unwrap(), want, "{body}");
        }
        for body in [
            r#"{"timeout_seconds":3240.5}"#,
            r#"{"timeout_seconds":4294967296}"#,
            r#"{"timeout_seconds":5000000000}"#,
            r#"{"timeout_seconds":-1}"#,
            r#"{"timeout_seconds":-1.0}"#,
            r#"{"timeout_seconds":1e300}"#,
            r#"{"timeout_seconds":"12abc"}"#,
            r#"{"timeout_seconds":true}"#,
            r#"{"timeout_seconds":5,"timeoutSeconds":5}"#,
        ] {
            let e = timeout(body).unwrap_err();
            assert_eq!(e.details.get("field").map(String::as_str), Some("timeout_seconds"), "{body}: {e}");
        }
        // The ranges of the other integer kinds.
        let check = |v: Value, min: i128, max: i128| {
            let mut v = v;
            integer(&mut v, "f", min, max).map(|()| v)
        };
        assert_eq!(
            check(json!(-2147483648.0), i32::MIN.into(), i32::MAX.into()).unwrap(),
            json!(-2147483648i64)
        );
        assert!(check(json!(2147483648u64), i32::MIN.into(), i32::MAX.into()).is_err());
        assert!(check(json!("-9223372036854775809"), i64::MIN.into(), i64::MAX.into()).is_err());
        assert_eq!(check(json!("18446744073709551615"), 0, u64::MAX.into()).unwrap(), json!(u64::MAX));
        assert!(check(json!("18446744073709551616"), 0, u64::MAX.into()).is_err());
        assert!(check(json!(1.8446744073709552e19), 0, u64::MAX.into()).is_err());
    }

    #[test]
    fn empty_query_values_and_bodies_are_refused_naming_them() {
        let jobs = route("/ListJobs");
        for query in ["vm_id=", "vm_id", "kind=&vm_id=x", "page_size="] {
            let e = request_message(&jobs, vec![("project_id".into(), "p1".into())], Some(query), b"")
                .unwrap_err();
            let field = e.details.get("field").cloned().unwrap_or_default();
            assert!(query.starts_with(&field), "{query}: {e}");
            assert!(e.message.contains("is empty"), "{query}: {e}");
        }
        // An empty page token is the first page.
        request_message(&jobs, vec![("project_id".into(), "p1".into())], Some("page_token="), b"").unwrap();
        assert_eq!(field_of("null"), "body");
        assert_eq!(field_of("\"x\""), "body");
        // Null fields are absent (proto3 JSON).
        let r = create_route();
        let m =
            request_message(&r, vec![("project_id".into(), "p1".into())], None, br#"{"name":null}"#).unwrap();
        assert_eq!(m.get_field_by_name("name").unwrap().as_str(), Some(""));
        // A body on a route without one.
        let e = request_message(&jobs, vec![("project_id".into(), "p1".into())], None, b"{}").unwrap_err();
        assert_eq!(e.details.get("field").map(String::as_str), Some("body"));
    }

    #[test]
    fn path_fields_are_not_given_again_in_the_body() {
        let r = create_route();
        for body in [br#"{"projectId":"evil","name":"a"}"#.as_slice(), br#"{"project_id":"p1","name":"a"}"#] {
            let e = request_message(&r, vec![("project_id".into(), "p1".into())], None, body).unwrap_err();
            assert_eq!(e.details.get("field").map(String::as_str), Some("project_id"), "{e}");
        }
        let m =
            request_message(&r, vec![("project_id".into(), "p1".into())], None, br#"{"name":"a"}"#).unwrap();
        assert_eq!(m.get_field_by_name("project_id").unwrap().as_str(), Some("p1"));
    }

    #[test]
    fn csv_is_asked_for_by_accept_and_renders_the_rows_with_a_header() {
        let accept = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::ACCEPT, v.parse().unwrap());
            wants_csv(&h)
        };
        assert!(accept("text/csv"));
        assert!(accept("application/json;q=0.5, Text/CSV; charset=utf-8"));
        assert!(!accept("application/json"));
        assert!(!wants_csv(&http::HeaderMap::new()));

        let r = route("/GetProjectUsage");
        assert_eq!(r.csv_rows.as_deref(), Some("rows"));
        assert_eq!(route("/GetProjectQuota").csv_rows, None);
        let json = json!({"from": "2026-01-01T00:00:00Z", "rows": [
            {"tenant_id": "acme", "flavor": "a,\"b\"", "vm_seconds": "5400", "vm_hours": 1.5},
            {"day": "2026-01-01"},
        ]});
        let reply = DynamicMessage::deserialize(r.output.clone(), json).unwrap();
        let csv = String::from_utf8(response_csv(&reply, "rows").unwrap()).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "tenant_id,project_id,flavor,resource_id,day,vm_seconds,vcpu_seconds,memory_mib_seconds,\
             disk_gib_seconds,volume_gib_seconds,vm_hours,vcpu_hours,memory_gib_hours,disk_gib_hours,volume_gib_hours"
        );
        assert_eq!(lines[1], "acme,,\"a,\"\"b\"\"\",,,5400,0,0,0,0,1.5,0.0,0.0,0.0,0.0");
        assert_eq!(lines[2], ",,,,2026-01-01,0,0,0,0,0,0.0,0.0,0.0,0.0,0.0");
        assert_eq!(lines[3], "", "every line ends with CRLF");
        assert!(response_csv(&reply, "from").is_err(), "only a repeated message field is rendered");
    }
}
