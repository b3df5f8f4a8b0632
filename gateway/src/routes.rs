//! The REST routing table, built at start from the `google.api.http`
//! annotations in HCP's descriptor set (no route is written by hand), and
//! the path-template matcher that reads `{field}` variables and `:verb`
//! suffixes.

use prost_reflect::{DescriptorPool, ExtensionDescriptor, MessageDescriptor, Value};

/// One REST binding of a gRPC method.
#[derive(Debug, Clone)]
pub struct Route {
    /// HTTP method.
    pub method: http::Method,
    /// Path template.
    pub template: PathTemplate,
    /// `*` (all fields not in the path), a field name, or empty (no body).
    pub body: String,
    /// Status on success (from `hcp.common.v1.http_success_status`).
    pub success_status: http::StatusCode,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    /// Request message.
    pub input: MessageDescriptor,
    /// Response message.
    pub output: MessageDescriptor,
    /// The method streams replies: served as server-sent events.
    pub server_streaming: bool,
    /// The reply's repeated message field served as CSV to a request that
    /// asks for `text/csv` (from `hcp.common.v1.csv_rows`).
    pub csv_rows: Option<String>,
    /// The path template's text, for metrics labels (built once per
    /// process, so it lives as long).
    pub label: &'static str,
}

/// A parsed path template such as `/v1/projects/{project_id}/vms/{vm_id}:start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    verb: Option<String>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Variable(String),
}

/// The descriptors do not describe a usable REST API.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The descriptor set does not decode.
    #[error("invalid descriptor set")]
    Descriptors(#[source] prost_reflect::DescriptorError),
    /// A northbound service is missing from the descriptors.
    #[error("service {0} is not in the descriptor set")]
    MissingService(String),
    /// A template does not parse.
    #[error("invalid path template {template:?} on {method}: {why}")]
    Template {
        /// The template.
        template: String,
        /// The gRPC method.
        method: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Two bindings claim the same method and template.
    #[error("duplicate binding {0}")]
    Duplicate(String),
}

impl PathTemplate {
    /// Parses a template: literal segments, `{field}` variables (a whole
    /// segment each) and an optional `:verb` after the last segment.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let path = text.strip_prefix('/').ok_or("must start with '/'")?;
        let (path, verb) = match path.rfind(':') {
            Some(i) if !path[i..].contains('/') && !path[i..].contains('}') => {
                (&path[..i], Some(path[i + 1..].to_owned()))
            }
            _ => (path, None),
        };
        let mut segments = Vec::new();
        for seg in path.split('/') {
            if seg.is_empty() {
                return Err("empty segment");
            }
            if let Some(inner) = seg.strip_prefix('{') {
                let name = inner.strip_suffix('}').ok_or("unclosed variable")?;
                if name.is_empty() || name.contains(['=', '*', '.', '{']) {
                    return Err("only {field} variables of top-level fields are supported");
                }
                segments.push(Segment::Variable(name.to_owned()));
            } else if seg.contains(['{', '}', '*']) {
                return Err("wildcards and partial variables are not supported");
            } else {
                segments.push(Segment::Literal(seg.to_owned()));
            }
        }
        Ok(Self { segments, verb, text: text.to_owned() })
    }

    /// Matches a request path; returns the variables (percent-decoded) or
    /// `None` when the path does not match.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut vars = Vec::new();
        for (seg, part) in self.segments.iter().zip(parts) {
            match seg {
                Segment::Literal(l) => {
                    if l != part {
                        return None;
                    }
                }
                Segment::Variable(name) => {
                    // A variable is one non-empty segment; a verb-less
                    // template must not swallow a ":verb" of another route.
                    if part.is_empty() || (self.verb.is_none() && part.contains(':')) {
                        return None;
                    }
                    vars.push((name.clone(), percent_decode(part)?));
                }
            }
        }
        Some(vars)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The names of its `{field}` variables, in order.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Variable(v) => Some(v.as_str()),
            Segment::Literal(_) => None,
        })
    }
}

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if bytes[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `{field}` variables of a matched path, in template order.
pub type PathVars = Vec<(String, String)>;

/// Finds the route serving `method` on `path` and reads its path variables;
/// NOT_FOUND when no route has the path, METHOD_NOT_ALLOWED listing the
/// methods it has (`details.allow`) when routes have it for other methods.
pub fn find<'r>(
    routes: &'r [Route],
    method: &http::Method,
    path: &str,
) -> Result<(&'r Route, PathVars), hcp_proto::error::ApiError> {
    let mut allowed: Vec<&http::Method> = Vec::new();
    for route in routes {
        if let Some(vars) = route.template.matches(path) {
            if route.method == method {
                return Ok((route, vars));
            }
            if !allowed.contains(&&route.method) {
                allowed.push(&route.method);
            }
        }
    }
    if allowed.is_empty() {
        return Err(crate::transcode::no_route(method, path));
    }
    allowed.sort_by_key(|m| METHOD_ORDER.iter().position(|o| o == *m));
    let allowed: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
    Err(method_not_allowed(method, path, &allowed))
}

/// The order methods are listed in `Allow`.
const METHOD_ORDER: [http::Method; 6] = [
    http::Method::GET,
    http::Method::HEAD,
    http::Method::POST,
    http::Method::PUT,
    http::Method::PATCH,
    http::Method::DELETE,
];

/// METHOD_NOT_ALLOWED for `method` on `path`, which has the methods
/// `allowed` (the `Allow` header's value is `details.allow`).
pub fn method_not_allowed(method: &http::Method, path: &str, allowed: &[&str]) -> hcp_proto::error::ApiError {
    use hcp_proto::error::{ApiError, DETAIL_ALLOW, ErrorCode, excerpt};
    let allow = allowed.join(", ");
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} does not take {}; it takes {allow}", excerpt(path), excerpt(method.as_str())),
    )
    .with_detail(DETAIL_ALLOW, allow)
}

/// Builds the routing table for `services` from the encoded descriptor set.
pub fn build(descriptor_set: &[u8], services: &[&str]) -> Result<(DescriptorPool, Vec<Route>), RouteError> {
    let pool = DescriptorPool::decode(descriptor_set).map_err(RouteError::Descriptors)?;
    let http_ext = pool.get_extension_by_name("google.api.http");
    let status_ext = pool.get_extension_by_name("hcp.common.v1.http_success_status");
    let csv_ext = pool.get_extension_by_name("hcp.common.v1.csv_rows");
    let mut routes: Vec<Route> = Vec::new();
    for name in services {
        let service =
            pool.get_service_by_name(name).ok_or_else(|| RouteError::MissingService((*name).to_owned()))?;
        for method in service.methods() {
            let options = method.options();
            let Some(rule) = http_ext.as_ref().and_then(|e| extension_message(&options, e)) else {
                continue;
            };
            let success_status = status_ext
                .as_ref()
                .filter(|e| options.has_extension(e))
                .and_then(|e| options.get_extension(e).as_i32())
                .and_then(|s| http::StatusCode::from_u16(u16::try_from(s).ok()?).ok())
                .unwrap_or(http::StatusCode::OK);
            let csv_rows = csv_ext
                .as_ref()
                .filter(|e| options.has_extension(e))
                .and_then(|e| options.get_extension(e).as_str().map(str::to_owned))
                .filter(|f| !f.is_empty());
            let grpc_path = format!("/{}/{}", service.full_name(), method.name());
            let mut rules = vec![rule.clone()];
            if let Some(Value::List(extra)) =
                rule.get_field_by_name("additional_bindings").map(|v| v.into_owned())
            {
                rules.extend(extra.into_iter().filter_map(|v| v.as_message().cloned()));
            }
            for rule in rules {
                let Some((verb, template)) = pattern(&rule) else { continue };
                let template = PathTemplate::parse(&template).map_err(|why| RouteError::Template {
                    template: template.clone(),
                    method: grpc_path.clone(),
                    why,
                })?;
                let body = rule
                    .get_field_by_name("body")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                if routes.iter().any(|r| r.method == verb && r.template == template) {
                    return Err(RouteError::Duplicate(format!("{verb} {}", template.as_str())));
                }
                let label: &'static str = Box::leak(template.text.clone().into_boxed_str());
                routes.push(Route {
                    label,
                    method: verb,
                    template,
                    body,
                    success_status,
                    grpc_path: grpc_path.clone(),
                    input: method.input(),
                    output: method.output(),
                    server_streaming: method.is_server_streaming(),
                    csv_rows: csv_rows.clone(),
                });
            }
        }
    }
    Ok((pool, routes))
}

fn extension_message(
    options: &prost_reflect::DynamicMessage,
    ext: &ExtensionDescriptor,
) -> Option<prost_reflect::DynamicMessage> {
    if !options.has_extension(ext) {
        return None;
    }
    options.get_extension(ext).as_message().cloned()
}

fn pattern(rule: &prost_reflect::DynamicMessage) -> Option<(http::Method, String)> {
    for (field, method) in [
        ("get", http::Method::GET),
        ("post", http::Method::POST),
        ("put", http::Method::PUT),
        ("delete", http::Method::DELETE),
        ("patch", http::Method::PATCH),
    ] {
        if rule.has_field_by_name(field) {
            return rule.get_field_by_name(field).and_then(|v| v.as_str().map(|s| (method, s.to_owned())));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(template: &str, path: &str, expect: Option<&[(&str, &str)]>) {
        let t = PathTemplate::parse(template).unwrap();
        let got = t.matches(path);
        let want = expect.map(|e| e.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>());
        assert_eq!(got, want, "{template} vs {path}");
    }

    #[test]
    fn templates_match_paths() {
        check("/v1/p/{project_id}/vms", "/v1/p/a/vms", Some(&[("project_id", "a")]));
        check("/v1/p/{project_id}/vms", "/v1/p/a/vms/", None);
        check(
            "/v1/p/{project_id}/vms/{vm_id}",
            "/v1/p/a/vms/b",
            Some(&[("project_id", "a"), ("vm_id", "b")]),
        );
        check("/v1/p/{project_id}/vms/{vm_id}", "/v1/p/a/vms/b:start", None);
        check(
            "/v1/p/{project_id}/vms/{vm_id}:start",
            "/v1/p/a/vms/b:start",
            Some(&[("project_id", "a"), ("vm_id", "b")]),
        );
        check("/v1/p/{project_id}/vms/{vm_id}:start", "/v1/p/a/vms/b:stop", None);
        check("/v1/p/{project_id}/vms/{vm_id}:start", "/v1/p/a/vms/:start", None);
        check("/v1/flavors/{name}", "/v1/flavors/a%20b", Some(&[("name", "a b")]));
        check("/v1/flavors/{name}", "/v1/flavors/%zz", None);
    }

    #[test]
    fn other_methods_on_a_known_path_are_405_listing_the_methods() {
        use hcp_proto::error::ErrorCode;
        let (_, routes) = build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).unwrap();
        let vms = "/api/hcp/tenant/v1/projects/p1/vms";
        for (method, path, code, allow) in [
            ("TRACE", vms, ErrorCode::MethodNotAllowed, "GET, POST"),
            ("PUT", vms, ErrorCode::MethodNotAllowed, "GET, POST"),
            ("HEAD", "/api/hcp/common/v1/flavors", ErrorCode::MethodNotAllowed, "GET"),
            ("GET", "/api/hcp/tenant/v1/projects/p1/nothing", ErrorCode::NotFound, ""),
            ("TRACE", "/nothing", ErrorCode::NotFound, ""),
        ] {
            let m = http::Method::from_bytes(method.as_bytes()).unwrap();
            let e = find(&routes, &m, path).unwrap_err();
            assert_eq!(e.code, code, "{method} {path}: {e}");
            assert_eq!(e.details.get("allow").map(String::as_str).unwrap_or(""), allow, "{method} {path}");
        }
    }

    #[test]
    fn every_northbound_method_has_a_route() {
        let (_, routes) = build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).unwrap();
        let create = routes.iter().find(|r| r.grpc_path == "/hcp.tenant.v1.VmService/CreateVm").unwrap();
        assert_eq!(create.method, http::Method::POST);
        assert_eq!(create.success_status, http::StatusCode::ACCEPTED);
        assert_eq!(create.body, "*");
        let pool = DescriptorPool::decode(hcp_proto::FILE_DESCRIPTOR_SET).unwrap();
        for name in hcp_proto::NORTHBOUND_SERVICES {
            for m in pool.get_service_by_name(name).unwrap().methods() {
                let path = format!("/{}/{}", name, m.name());
                assert!(routes.iter().any(|r| r.grpc_path == path), "{path} has no REST binding");
            }
        }
    }
}
