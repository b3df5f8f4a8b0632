//! HTTP: `POST /wsman` with Basic authentication and the SOAP content type
//! (WinRM's listener), and the JSON control API for the binary's separate
//! plain-HTTP port.

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::{Faults, RequestRecord, Sim, wsman};

/// The WS-Management listener: one fallback handler sees every request.
pub(crate) fn router(sim: Sim) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(sim)
}

/// The content type WinRM takes and gives.
const SOAP_CONTENT_TYPE: &str = "application/soap+xml;charset=UTF-8";

fn record(sim: &Sim, status: u16, outcome: &str, violation: Option<String>) {
    let mut s = sim.lock();
    s.log.push(RequestRecord {
        action: String::new(),
        resource_uri: String::new(),
        status,
        outcome: outcome.to_owned(),
    });
    if let Some(v) = violation {
        s.violations.push(v);
    }
}

enum Auth {
    Ok,
    Challenge(Vec<u8>),
    Denied,
}

/// Basic on every request, or NTLM under `Negotiate` once per connection.
fn authenticate(sim: &Sim, headers: &HeaderMap, conn: &crate::ntlm::ConnAuth) -> Auth {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match value.and_then(|v| v.split_once(' ')) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("Negotiate") => {
            let Ok(token) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else {
                return Auth::Denied;
            };
            let Some((user, password)) = sim.lock().config.users.first().cloned() else {
                return Auth::Denied;
            };
            match conn.step(&token, &user, &password) {
                crate::ntlm::Step::Challenge(t) => Auth::Challenge(t),
                crate::ntlm::Step::Done => Auth::Ok,
                crate::ntlm::Step::Denied(e) => {
                    tracing::info!(why = hcp_telemetry::error_chain(&e), "NTLM refused");
                    Auth::Denied
                }
            }
        }
        Some(_) if authorized(sim, headers) => Auth::Ok,
        None if conn.authenticated() => Auth::Ok,
        _ => Auth::Denied,
    }
}

fn authorized(sim: &Sim, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some((scheme, token)) = value.split_once(' ') else { return false };
    if !scheme.eq_ignore_ascii_case("Basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else { return false };
    let Ok(text) = String::from_utf8(decoded) else { return false };
    let Some((user, password)) = text.split_once(':') else { return false };
    sim.lock().config.users.iter().any(|(u, p)| u == user && p == password)
}

/// Whether the content type is SOAP 1.2 in UTF-8 (parameters may carry
/// spaces; names and values compare without case).
fn soap_content_type(headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let mut parts = v.split(';').map(str::trim);
    if !parts.next().is_some_and(|m| m.eq_ignore_ascii_case("application/soap+xml")) {
        return false;
    }
    parts.any(|p| {
        p.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("charset")
                && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        })
    })
}

async fn handle(
    AxState(sim): AxState<Sim>,
    axum::Extension(conn): axum::Extension<crate::ntlm::ConnAuth>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = {
        let mut s = sim.lock();
        s.stats.requests += 1;
        s.faults.delay_ms
    };
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    if uri.path() != "/wsman" {
        record(&sim, 404, "not found", Some(format!("{method} {}: only /wsman is served", uri.path())));
        return StatusCode::NOT_FOUND.into_response();
    }
    if method != Method::POST {
        record(&sim, 405, "method not allowed", Some(format!("{method} /wsman: only POST is served")));
        return (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response();
    }
    match authenticate(&sim, &headers, &conn) {
        Auth::Ok => {}
        Auth::Challenge(token) => {
            record(&sim, 401, "negotiate challenge", None);
            let value = format!("Negotiate {}", base64::engine::general_purpose::STANDARD.encode(token));
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, value)]).into_response();
        }
        Auth::Denied => {
            sim.lock().stats.unauthorized += 1;
            record(&sim, 401, "unauthorized", None);
            // WinRM lists the schemes it has enabled: Negotiate and Basic.
            let mut resp = StatusCode::UNAUTHORIZED.into_response();
            resp.headers_mut().append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
            resp.headers_mut()
                .append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"WSMAN\""));
            return resp;
        }
    }
    if !soap_content_type(&headers) {
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
        record(
            &sim,
            415,
            "unsupported media type",
            Some(format!("POST /wsman: Content-Type {ct}, not {SOAP_CONTENT_TYPE}")),
        );
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        record(&sim, 400, "not UTF-8", Some("POST /wsman: the body is not UTF-8".to_owned()));
        return StatusCode::BAD_REQUEST.into_response();
    };
    let reply = {
        let mut s = sim.lock();
        s.advance();
        let reply = wsman::handle(&mut s, text);
        s.log.push(RequestRecord {
            action: reply.action.clone(),
            resource_uri: reply.resource_uri.clone(),
            status: reply.status,
            outcome: reply.outcome.clone(),
        });
        reply
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, reply.body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(SOAP_CONTENT_TYPE));
    resp
}

/// The control API.
pub(crate) fn control_router(sim: Sim) -> axum::Router {
    axum::Router::new().fallback(control).with_state(sim)
}

async fn control(AxState(sim): AxState<Sim>, method: Method, uri: Uri, body: Bytes) -> Response {
    let Some(path) = uri.path().strip_prefix("/_sim/") else {
        return (StatusCode::NOT_FOUND, "unknown control path").into_response();
    };
    let parts: Vec<&str> = path.split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["vms"]) => axum::Json(sim.vms()).into_response(),
        ("GET", ["jobs"]) => axum::Json(sim.jobs()).into_response(),
        ("GET", ["files"]) => axum::Json(sim.files()).into_response(),
        ("GET", ["violations"]) => axum::Json(sim.violations()).into_response(),
        ("GET", ["requests"]) => axum::Json(sim.requests()).into_response(),
        ("GET", ["stats"]) => axum::Json(sim.stats()).into_response(),
        ("GET", ["faults"]) => axum::Json(sim.faults()).into_response(),
        ("GET", ["vmconnect"]) => axum::Json(sim.vmconnect_sessions()).into_response(),
        ("POST", ["faults"]) => match serde_json::from_slice::<Faults>(&body) {
            Ok(f) => {
                sim.set_faults(f);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("faults: {e}")).into_response(),
        },
        ("POST", ["vms", guid, "state"]) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                state: u16,
            }
            match serde_json::from_slice::<Body>(&body) {
                Ok(b) if sim.set_power_state(guid, b.state) => StatusCode::NO_CONTENT.into_response(),
                Ok(_) => (StatusCode::NOT_FOUND, "no such VM").into_response(),
                Err(e) => (StatusCode::BAD_REQUEST, format!("state: {e}")).into_response(),
            }
        }
        _ => (StatusCode::NOT_FOUND, "unknown control path").into_response(),
    }
}
