//! The simulated PVE handlers: authentication, schema validation and
//! recording, fault injection, then the behaviour of each path the QEMU
//! lifecycle uses. Everything a real node would refuse is refused with the
//! same status and message shape; paths the schema knows but the simulator
//! does not model answer 501.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::{
    Effect, Faults, Listener, RequestRecord, Sim, State, Task, Ticket, VNC_LISTEN_WAIT, VNC_TICKET_LIFETIME,
    Violations, Vm, VncProxy,
};

/// The router: one fallback handler sees every request.
pub(crate) fn router(sim: Sim) -> axum::Router {
    // Uploads (`.../upload`) carry whole disk images.
    axum::Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(UPLOAD_LIMIT))
        .with_state(sim)
}

/// The largest request body taken (an uploaded image).
const UPLOAD_LIMIT: usize = 1 << 30;

/// The file part of a `multipart/form-data` upload, as PVE's HTTP server
/// hands it to the `upload` method: its name becomes the `filename`
/// parameter, its bytes a temporary file (here: their size and digest).
pub(crate) struct Upload {
    size: u64,
    sha256: String,
}

/// Splits a `multipart/form-data` body: text parts become parameters, the
/// part named `filename` (which must carry a file name) is the upload. A
/// body that does not parse is PVE's 400.
fn parse_multipart(
    content_type: &str,
    body: &[u8],
    params: &mut BTreeMap<String, String>,
) -> Result<Option<Upload>, String> {
    use sha2::Digest as _;
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
        .ok_or("multipart without boundary")?;
    let delimiter = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..).and_then(|h| h.windows(needle.len()).position(|w| w == needle)).map(|i| i + from)
    };
    let mut at = find(body, delimiter.as_bytes(), 0).ok_or("multipart without a first boundary")?;
    let mut upload = None;
    loop {
        at += delimiter.len();
        if body.get(at..at + 2) == Some(b"--") {
            return Ok(upload);
        }
        let head_start = at + 2;
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or("multipart part without headers")?;
        let head = String::from_utf8_lossy(&body[head_start..head_end]).into_owned();
        let data_start = head_end + 4;
        let next = find(body, format!("\r\n{delimiter}").as_bytes(), data_start)
            .ok_or("multipart part without a closing boundary")?;
        let data = &body[data_start..next];
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .ok_or("multipart part without content-disposition")?;
        let attr = |key: &str| {
            disposition.split(';').find_map(|p| {
                p.trim()
                    .strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_owned())
            })
        };
        let name = attr("name").ok_or("multipart part without a name")?;
        match attr("filename") {
            Some(file) if name == "filename" => {
                params.insert("filename".to_owned(), file);
                upload =
                    Some(Upload { size: data.len() as u64, sha256: hex::encode(sha2::Sha256::digest(data)) });
            }
            _ => {
                params.insert(name, String::from_utf8_lossy(data).into_owned());
            }
        }
        at = next + 2;
    }
}

/// An answer before enveloping.
enum Answer {
    Data(Value),
    Error(u16, String, Option<Violations>),
    /// A 401 without the JSON envelope, sent after the configured delay.
    Unauthorized(String),
    /// A `vncwebsocket` upgrade accepted: serve VNC with this password and
    /// desktop name.
    Vnc {
        password: String,
        name: String,
    },
    /// A `vncwebsocket` upgrade to a termproxy listener: the ticket line it
    /// expects and what `qm terminal` finds.
    Term {
        user: String,
        ticket: String,
        outcome: crate::term::Outcome,
    },
}

fn fail(status: u16, msg: impl Into<String>) -> Answer {
    Answer::Error(status, msg.into(), None)
}

fn reply(answer: Answer, numbers_as_strings: bool) -> Response {
    match answer {
        Answer::Data(mut data) => {
            if numbers_as_strings {
                stringify_numbers(&mut data);
            }
            axum::Json(json!({ "data": data })).into_response()
        }
        Answer::Error(status, msg, errors) => {
            let mut body = json!({"data": null, "message": format!("{msg}\n")});
            if let Some(e) = errors {
                body["errors"] = json!(e);
            }
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            with_reason((code, axum::Json(body)).into_response(), &msg)
        }
        Answer::Unauthorized(msg) => with_reason(StatusCode::UNAUTHORIZED.into_response(), &msg),
        // `handle` upgrades; without an upgrade there is nothing to serve.
        Answer::Vnc { .. } | Answer::Term { .. } => fail_response(400, "websocket upgrade expected"),
    }
}

fn fail_response(status: u16, msg: &str) -> Response {
    reply(fail(status, msg), false)
}

/// PVE puts the message in the HTTP reason phrase.
fn with_reason(mut resp: Response, msg: &str) -> Response {
    let clean: String = msg.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(200).collect();
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(clean.into_bytes()) {
        resp.extensions_mut().insert(reason);
    }
    resp
}

/// Integer fields PVE is known to send as strings.
fn stringify_numbers(v: &mut Value) {
    const KEYS: &[&str] =
        &["vmid", "maxmem", "maxcpu", "cpus", "mem", "maxdisk", "uptime", "port", "template"];
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if KEYS.contains(&k.as_str()) && val.is_number() {
                    *val = Value::String(val.to_string());
                } else {
                    stringify_numbers(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(stringify_numbers),
        _ => {}
    }
}

fn parse_params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> BTreeMap<String, String> {
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    if let Some(q) = uri.query() {
        params.extend(form_urlencoded::parse(q.as_bytes()).into_owned());
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let json = content_type.starts_with("application/json");
    if json {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
            for (k, v) in map {
                let s = match v {
                    Value::String(s) => s,
                    Value::Bool(b) => if b { "1" } else { "0" }.to_owned(),
                    other => other.to_string(),
                };
                params.insert(k, s);
            }
        }
    } else if !body.is_empty() && !content_type.starts_with("multipart/form-data") {
        params.extend(form_urlencoded::parse(body).into_owned());
    }
    params
}

enum Auth {
    Ok(String),
    Denied(String),
}

fn authenticate(s: &mut State, method: &Method, headers: &HeaderMap) -> Auth {
    if let Some(h) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let Some(token) = h.strip_prefix("PVEAPIToken=") else {
            return Auth::Denied("authentication failure".to_owned());
        };
        let Some((id, secret)) = token.split_once('=') else {
            return Auth::Denied("authentication failure".to_owned());
        };
        return if s.config.tokens.iter().any(|(i, sec)| i == id && sec == secret) {
            Auth::Ok(id.to_owned())
        } else {
            Auth::Denied("authentication failure".to_owned())
        };
    }
    let cookie = headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("PVEAuthCookie=").map(str::to_owned));
    let Some(ticket) = cookie else {
        return Auth::Denied("no ticket".to_owned());
    };
    let ticket = percent_encoding::percent_decode_str(&ticket).decode_utf8_lossy().into_owned();
    let lifetime = s.config.ticket_lifetime;
    let Some(t) = s.tickets.get(&ticket).filter(|t| t.issued.elapsed() < lifetime) else {
        return Auth::Denied("authentication failure".to_owned());
    };
    if *method != Method::GET {
        let csrf = headers.get("csrfpreventiontoken").and_then(|v| v.to_str().ok());
        if csrf != Some(t.csrf.as_str()) {
            return Auth::Denied("Permission denied - invalid csrf token".to_owned());
        }
    }
    Auth::Ok(t.user.clone())
}

async fn handle(
    AxState(sim): AxState<Sim>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    if let Some(ctl) = path.strip_prefix("/_sim/") {
        return control(&sim, &method, ctl, &body);
    }
    let Some(api_path) = path.strip_prefix("/api2/json") else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let api_path = api_path.to_owned();
    let mut params = parse_params(&uri, &headers, &body);
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let upload = if content_type.starts_with("multipart/form-data") {
        match parse_multipart(content_type, &body, &mut params) {
            Ok(u) => u,
            Err(e) => return fail_response(400, &format!("malformed multipart body: {e}")),
        }
    } else {
        None
    };
    let route = sim.schema.route(&api_path);
    let mut record = RequestRecord {
        method: method.to_string(),
        path: api_path.clone(),
        template: route.as_ref().map(|r| r.template.clone()),
        params: params.clone(),
        violations: Violations::new(),
        status: 200,
    };
    // Validation: path variables count as parameters, as in PVE.
    if let Some(r) = &route {
        let mut all = params.clone();
        all.extend(r.vars.clone());
        if let Err(v) = sim.schema.validate(&r.template, method.as_str(), &all) {
            record.violations = v;
        }
    }
    let (answer, numbers_as_strings, delay) = {
        let mut s = sim.lock();
        let numbers = s.config.numbers_as_strings;
        let delay = s.config.auth_failure_delay;
        let answer = dispatch(
            &sim,
            &mut s,
            &method,
            &api_path,
            route,
            &headers,
            &params,
            &record.violations,
            upload.as_ref(),
        );
        (answer, numbers, delay)
    };
    // Lock waits happen outside the state lock.
    let answer = match answer {
        Step::Done(a) => a,
        Step::WaitLock(vmid) => wait_for_lock(&sim, vmid, &method, &api_path, &headers, &params).await,
    };
    record.status = match &answer {
        Answer::Data(_) => 200,
        Answer::Error(s, _, _) => *s,
        Answer::Unauthorized(_) => 401,
        Answer::Vnc { .. } | Answer::Term { .. } => 101,
    };
    sim.lock().requests.push(record);
    if let Answer::Vnc { password, name } = answer {
        return match ws {
            Ok(ws) => ws
                .protocols(["binary"])
                .on_upgrade(move |socket| crate::vnc::serve(socket, password, name))
                .into_response(),
            Err(e) => fail_response(400, &format!("websocket upgrade failed: {e}")),
        };
    }
    if let Answer::Term { user, ticket, outcome } = answer {
        return match ws {
            Ok(ws) => ws
                .protocols(["binary"])
                .on_upgrade(move |socket| crate::term::serve(socket, user, ticket, outcome))
                .into_response(),
            Err(e) => fail_response(400, &format!("websocket upgrade failed: {e}")),
        };
    }
    if matches!(answer, Answer::Unauthorized(_)) {
        tokio::time::sleep(delay).await;
    }
    reply(answer, numbers_as_strings)
}

/// Retries a request whose VM config lock was held by a running task until
/// the lock is free or the wait runs out (then PVE's "got timeout").
async fn wait_for_lock(
    sim: &Sim,
    vmid: u32,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: &BTreeMap<String, String>,
) -> Answer {
    let wait = sim.lock().config.lock_wait;
    let deadline = Instant::now() + wait;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut s = sim.lock();
        advance(&mut s);
        if !holds_lock(&s, vmid) {
            let route = sim.schema.route(path);
            return match dispatch(sim, &mut s, method, path, route, headers, params, &Violations::new(), None)
            {
                Step::Done(a) => a,
                Step::WaitLock(_) => lock_timeout(vmid),
            };
        }
        if Instant::now() >= deadline {
            return lock_timeout(vmid);
        }
    }
}

fn lock_timeout(vmid: u32) -> Answer {
    fail(500, format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"))
}

enum Step {
    Done(Answer),
    WaitLock(u32),
}

fn holds_lock(s: &State, vmid: u32) -> bool {
    s.tasks.values().any(|t| t.exit.is_none() && t.vmid == Some(vmid) && t.kind != "vncproxy")
}

#[allow(clippy::too_many_arguments)]
fn dispatch(
    sim: &Sim,
    s: &mut State,
    method: &Method,
    path: &str,
    route: Option<crate::schema::Route>,
    headers: &HeaderMap,
    params: &BTreeMap<String, String>,
    violations: &Violations,
    upload: Option<&Upload>,
) -> Step {
    advance(s);
    if s.faults.expire_tickets {
        s.faults.expire_tickets = false;
        s.tickets.clear();
    }
    if s.faults.revoke_tokens {
        s.faults.revoke_tokens = false;
        s.config.tokens.clear();
    }
    let Some(route) = route else {
        return Step::Done(fail(501, format!("Method '{method} {path}' not implemented")));
    };
    let template = route.template.as_str();
    if sim.schema.method(template, method.as_str()).is_none() {
        return Step::Done(fail(501, format!("Method '{method} {path}' not implemented")));
    }
    let public = template == "/access/ticket";
    let user = if public {
        String::new()
    } else {
        match authenticate(s, method, headers) {
            Auth::Ok(u) => u,
            Auth::Denied(m) => return Step::Done(Answer::Unauthorized(m)),
        }
    };
    if !violations.is_empty() {
        return Step::Done(Answer::Error(
            400,
            "Parameter verification failed.".to_owned(),
            Some(violations.clone()),
        ));
    }
    if !public && s.faults.proxy_errors > 0 {
        s.faults.proxy_errors -= 1;
        return Step::Done(fail(595, "Connection timed out"));
    }
    if !public && *method != Method::GET && s.faults.quorum_loss > 0 {
        s.faults.quorum_loss -= 1;
        return Step::Done(fail(500, "cluster not ready - no quorum?"));
    }
    let p = |k: &str| params.get(k).map(String::as_str);
    let var = |k: &str| route.vars.get(k).cloned().unwrap_or_default();
    let vmid: u32 = var("vmid").parse().unwrap_or(0);
    let node = var("node");
    let mutating = *method != Method::GET && template.starts_with("/nodes/{node}/qemu/{vmid}");
    // The console proxies only read the config; they take no lock.
    let console =
        matches!(template, "/nodes/{node}/qemu/{vmid}/vncproxy" | "/nodes/{node}/qemu/{vmid}/termproxy");
    if mutating && !console {
        if s.faults.lock_timeouts > 0 {
            s.faults.lock_timeouts -= 1;
            return Step::Done(lock_timeout(vmid));
        }
        if holds_lock(s, vmid) {
            return Step::WaitLock(vmid);
        }
    }
    if template.starts_with("/nodes/{node}") && !s.config.nodes.contains(&node) {
        return Step::Done(fail(
            500,
            format!("hostname lookup '{node}' failed - failed to get address info"),
        ));
    }
    if template.starts_with("/nodes/{node}/qemu/{vmid}") {
        match s.vms.get(&vmid) {
            Some(vm) if vm.node == node => {}
            _ => {
                return Step::Done(fail(
                    500,
                    format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"),
                ));
            }
        }
    }
    let answer = match (method.as_str(), template) {
        ("POST", "/access/ticket") => ticket(s, p("username").unwrap_or(""), p("password").unwrap_or("")),
        ("GET", "/version") => Answer::Data(json!({
            "version": s.config.version, "release": s.config.version.rsplit_once('.').map(|x| x.0).unwrap_or("9.1"),
            "repoid": "deadbeef", "console": "html5"
        })),
        ("GET", "/cluster/nextid") => nextid(s, p("vmid")),
        ("GET", "/cluster/resources") => Answer::Data(resources(s, p("type"))),
        ("GET", "/nodes/{node}/qemu") => {
            Answer::Data(Value::Array(s.vms.values().filter(|v| v.node == node).map(vm_summary).collect()))
        }
        ("POST", "/nodes/{node}/qemu") => create_vm(s, &node, &user, params),
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone(s, &node, vmid, &user, params),
        ("POST", "/nodes/{node}/qemu/{vmid}/migrate") => migrate(s, &node, vmid, &user, params),
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => {
            let vm = &s.vms[&vmid];
            let mut cfg: serde_json::Map<String, Value> =
                vm.config.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            cfg.insert("digest".into(), json!(format!("{:040x}", vm.config.len())));
            if let Some(l) = &vm.lock {
                cfg.insert("lock".into(), json!(l));
            }
            Answer::Data(Value::Object(cfg))
        }
        ("PUT", "/nodes/{node}/qemu/{vmid}/config") => match set_config(s, vmid, params) {
            Ok(()) => Answer::Data(Value::Null),
            Err(a) => a,
        },
        ("POST", "/nodes/{node}/qemu/{vmid}/config") => match set_config(s, vmid, params) {
            Ok(()) => Answer::Data(json!(spawn_task(s, &node, "qmconfig", vmid, &user, Effect::None))),
            Err(a) => a,
        },
        ("PUT", "/nodes/{node}/qemu/{vmid}/resize") => match resize(s, vmid, p("disk"), p("size")) {
            Ok(()) => Answer::Data(json!(spawn_task(s, &node, "resize", vmid, &user, Effect::None))),
            Err(a) => a,
        },
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            let vm = &s.vms[&vmid];
            let mut st = json!({
                "status": vm.status, "vmid": vm.vmid, "ha": {"managed": 0},
                "name": vm.config.get("name").cloned().unwrap_or_default(),
                "qmpstatus": vm.status, "cpus": cores(vm), "maxmem": memory_mib(vm) * 1024 * 1024,
                "maxdisk": root_disk_bytes(vm),
            });
            if let Some(l) = &vm.lock {
                st["lock"] = json!(l);
            }
            if let Some(t) = vm.config.get("tags") {
                st["tags"] = json!(t);
            }
            if vm.template {
                st["template"] = json!(1);
            }
            if (0..4).any(|n| vm.config.contains_key(&format!("serial{n}"))) {
                st["serial"] = json!(1);
            }
            Answer::Data(st)
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => {
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.template {
                fail(500, format!("VM {vmid} is a template"))
            } else if vm.status == "running" {
                fail(500, format!("VM {vmid} already running"))
            } else {
                Answer::Data(json!(spawn_task(
                    s,
                    &node,
                    "qmstart",
                    vmid,
                    &user,
                    Effect::Power(vmid, "running")
                )))
            }
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => match locked(&s.vms[&vmid]) {
            Some(a) => a,
            None => Answer::Data(json!(spawn_task(
                s,
                &node,
                "qmstop",
                vmid,
                &user,
                Effect::Power(vmid, "stopped")
            ))),
        },
        ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown") => {
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.status != "running" {
                fail(500, format!("VM {vmid} not running"))
            } else {
                let force = p("forceStop").is_some_and(truthy);
                Answer::Data(json!(spawn_task(
                    s,
                    &node,
                    "qmshutdown",
                    vmid,
                    &user,
                    Effect::Shutdown(vmid, force)
                )))
            }
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot") => {
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.status != "running" {
                fail(500, format!("VM {vmid} not running"))
            } else {
                Answer::Data(json!(spawn_task(s, &node, "qmreboot", vmid, &user, Effect::Reboot(vmid))))
            }
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/reset") => {
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.status != "running" {
                fail(500, format!("VM {vmid} not running"))
            } else {
                Answer::Data(json!(spawn_task(s, &node, "qmreset", vmid, &user, Effect::Reset(vmid))))
            }
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces") => {
            agent_interfaces(&s.vms[&vmid], s.faults.agent_down)
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => {
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.status == "running" {
                fail(500, format!("VM {vmid} is running - destroy failed"))
            } else {
                let unreferenced = p("destroy-unreferenced-disks").is_some_and(truthy);
                let effect = Effect::Destroy(vmid, unreferenced);
                Answer::Data(json!(spawn_task(s, &node, "qmdestroy", vmid, &user, effect)))
            }
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/snapshot") => {
            let vm = &s.vms[&vmid];
            let mut list: Vec<Value> = vm
                .snapshots
                .iter()
                .map(|(name, (desc, vmstate, time))| {
                    json!({"name": name, "description": desc, "vmstate": u8::from(*vmstate), "snaptime": time})
                })
                .collect();
            list.push(json!({"name": "current", "description": "You are here!", "running": u8::from(vm.status == "running")}));
            Answer::Data(Value::Array(list))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/snapshot") => {
            let name = p("snapname").unwrap_or_default().to_owned();
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.snapshots.contains_key(&name) || name == "current" {
                fail(500, format!("snapshot name '{name}' already used"))
            } else {
                let vmstate = p("vmstate").is_some_and(truthy) && vm.status == "running";
                let desc = p("description").unwrap_or_default().to_owned();
                if let Some(v) = s.vms.get_mut(&vmid) {
                    v.lock = Some("snapshot".to_owned());
                }
                Answer::Data(json!(spawn_task(
                    s,
                    &node,
                    "qmsnapshot",
                    vmid,
                    &user,
                    Effect::Snapshot(vmid, name, desc, vmstate)
                )))
            }
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}") => {
            let name = var("snapname");
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if !vm.snapshots.contains_key(&name) {
                fail(500, format!("snapshot '{name}' does not exist"))
            } else {
                if let Some(v) = s.vms.get_mut(&vmid) {
                    v.lock = Some("snapshot-delete".to_owned());
                }
                Answer::Data(json!(spawn_task(
                    s,
                    &node,
                    "qmdelsnapshot",
                    vmid,
                    &user,
                    Effect::DeleteSnapshot(vmid, name)
                )))
            }
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback") => {
            let name = var("snapname");
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if !vm.snapshots.contains_key(&name) {
                fail(500, format!("snapshot '{name}' does not exist"))
            } else {
                let start = p("start").is_some_and(truthy);
                if let Some(v) = s.vms.get_mut(&vmid) {
                    v.lock = Some("rollback".to_owned());
                }
                Answer::Data(json!(spawn_task(
                    s,
                    &node,
                    "qmrollback",
                    vmid,
                    &user,
                    Effect::Rollback(vmid, name, start)
                )))
            }
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/vncproxy") => {
            if s.vms[&vmid].status != "running" {
                fail(500, format!("VM {vmid} not running"))
            } else {
                let (port, ticket) = new_listener(s);
                let upid = spawn_task(s, &node, "vncproxy", vmid, &user, Effect::None);
                let mut data = json!({"user": user, "ticket": ticket, "port": port, "upid": upid, "cert": "-----BEGIN CERTIFICATE-----\nsim\n-----END CERTIFICATE-----\n"});
                // VNC authentication uses the generated password when one
                // is asked for, else the ticket itself.
                let password = if p("generate-password").is_some_and(truthy) {
                    let generated = format!("{:08x}", rand::random::<u32>());
                    data["password"] = json!(generated);
                    generated
                } else {
                    ticket.clone()
                };
                s.vnc_tickets.insert(
                    ticket,
                    VncProxy {
                        vmid,
                        port,
                        user: user.clone(),
                        listener: Listener::Vnc { password },
                        issued: Instant::now(),
                        connected: false,
                    },
                );
                Answer::Data(data)
            }
        }
        // PVE starts termproxy for any VM that exists, running or not, and
        // without looking at its serial ports: `qm terminal`, run once the
        // websocket has authenticated, finds out (`crate::term`).
        ("POST", "/nodes/{node}/qemu/{vmid}/termproxy") => {
            let (port, ticket) = new_listener(s);
            let upid = spawn_task(s, &node, "vncproxy", vmid, &user, Effect::None);
            let listener = Listener::Term { iface: p("serial").map(str::to_owned) };
            let issued = Instant::now();
            let proxy = VncProxy { vmid, port, user: user.clone(), listener, issued, connected: false };
            s.vnc_tickets.insert(ticket.clone(), proxy);
            Answer::Data(json!({"user": user, "ticket": ticket, "port": port, "upid": upid}))
        }
        // The ticket must be one vncproxy issued for this VM, port and
        // user, within its lifetime; the upgrade must come within the
        // listener's wait, and only once (the listener takes one
        // connection). A plain GET only checks the ticket.
        ("GET", "/nodes/{node}/qemu/{vmid}/vncwebsocket") => {
            let ticket = p("vncticket").unwrap_or_default();
            let port: u16 = p("port").and_then(|x| x.parse().ok()).unwrap_or(0);
            let upgrade = headers
                .get("upgrade")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
            match s.vnc_tickets.get_mut(ticket) {
                Some(v)
                    if v.vmid == vmid
                        && v.port == port
                        && v.user == user
                        && v.issued.elapsed() < VNC_TICKET_LIFETIME =>
                {
                    if !upgrade {
                        Answer::Data(json!({"port": port}))
                    } else if v.connected || v.issued.elapsed() >= VNC_LISTEN_WAIT {
                        fail(500, format!("unable to connect to VNC port {port} - connection refused"))
                    } else {
                        v.connected = true;
                        match v.listener.clone() {
                            Listener::Vnc { password } => {
                                Answer::Vnc { password, name: crate::vnc::server_name(vmid) }
                            }
                            Listener::Term { iface } => {
                                let user = v.user.clone();
                                let vm = &s.vms[&vmid];
                                let running = vm.status == "running";
                                let outcome =
                                    crate::term::qm_terminal(vmid, &vm.config, running, iface.as_deref());
                                Answer::Term { user, ticket: ticket.to_owned(), outcome }
                            }
                        }
                    }
                }
                _ => Answer::Unauthorized("authentication failure".to_owned()),
            }
        }
        ("POST", "/nodes/{node}/storage/{storage}/upload") => {
            upload_file(s, &node, &var("storage"), params, upload, &user)
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/template") => {
            let vm = &s.vms[&vmid];
            if let Some(a) = locked(vm) {
                a
            } else if vm.template {
                fail(500, "you can't convert a template to a template")
            } else if vm.status == "running" {
                fail(500, "you can't convert a VM to template if VM is running")
            } else {
                Answer::Data(json!(spawn_task(s, &node, "qmtemplate", vmid, &user, Effect::Template(vmid))))
            }
        }
        ("POST", "/nodes/{node}/storage/{storage}/content") => {
            alloc_volume(s, &node, &var("storage"), params)
        }
        ("GET", "/nodes/{node}/storage/{storage}/content") => {
            list_content(s, &node, &var("storage"), p("content"), p("vmid"))
        }
        ("GET", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            match find_volume(s, &node, &var("storage"), &var("volume")) {
                Ok(v) => Answer::Data(json!({
                    "format": v.format, "size": v.size, "used": v.size,
                    "path": volume_path(s, v),
                })),
                Err(a) => a,
            }
        }
        ("POST", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            copy_volume(s, &node, &var("storage"), &var("volume"), params, &user)
        }
        ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            free_volume(s, &node, &var("storage"), &var("volume"), &user)
        }
        ("GET", "/nodes/{node}/tasks/{upid}/status") => match s.tasks.get(&var("upid")) {
            Some(t) if t.node == node => {
                let mut st = json!({
                    "upid": t.upid, "node": t.node, "pid": t.pid, "pstart": t.pstart, "starttime": t.starttime,
                    "type": t.kind, "id": t.id, "user": t.user,
                    "status": if t.exit.is_some() { "stopped" } else { "running" },
                });
                if let Some(e) = &t.exit {
                    st["exitstatus"] = json!(e);
                }
                if let Some((_, tokenid)) = t.user.split_once('!') {
                    st["tokenid"] = json!(tokenid);
                }
                Answer::Data(st)
            }
            _ => fail(500, format!("no such task '{}'", var("upid"))),
        },
        ("GET", "/nodes/{node}/tasks/{upid}/log") => match s.tasks.get(&var("upid")) {
            Some(t) => {
                let mut lines = vec![json!({"n": 1, "t": format!("task {} started", t.kind)})];
                if let Some(e) = &t.exit {
                    lines.push(json!({"n": 2, "t": if e == "OK" { "TASK OK".to_owned() } else { format!("TASK ERROR: {e}") }}));
                }
                Answer::Data(Value::Array(lines))
            }
            None => fail(500, format!("no such task '{}'", var("upid"))),
        },
        _ => fail(501, format!("Method '{method} {template}' not implemented by the simulator")),
    };
    Step::Done(answer)
}

/// A free listener port (5900..5999, as PVE's `next_vnc_port`) and a
/// fresh `PVEVNC` ticket for it; expired listeners are dropped first.
fn new_listener(s: &mut State) -> (u16, String) {
    s.vnc_tickets.retain(|_, v| v.issued.elapsed() < VNC_TICKET_LIFETIME);
    let taken: Vec<u16> = s.vnc_tickets.values().map(|v| v.port).collect();
    let port = (5900..6000).find(|p| !taken.contains(p)).unwrap_or(5900);
    let ticket = format!("PVEVNC:{:08X}::{}", rand::random::<u32>(), hex::encode(rand::random::<[u8; 16]>()));
    (port, ticket)
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

fn locked(vm: &Vm) -> Option<Answer> {
    vm.lock.as_ref().map(|l| fail(500, format!("VM is locked ({l})")))
}

fn cores(vm: &Vm) -> u32 {
    vm.config.get("cores").and_then(|c| c.parse().ok()).unwrap_or(1)
}

fn memory_mib(vm: &Vm) -> u64 {
    vm.config
        .get("memory")
        .and_then(|m| m.split(',').next())
        .map(|m| m.trim_start_matches("current="))
        .and_then(|m| m.parse().ok())
        .unwrap_or(512)
}

/// The size of the root image in bytes, as PVE reports it in `maxdisk`:
/// the first disk of the `boot` order (else the first of scsi0, virtio0,
/// sata0, ide0) that is not a cdrom.
fn root_disk_bytes(vm: &Vm) -> u64 {
    let order = vm.config.get("boot").and_then(|b| b.strip_prefix("order=")).unwrap_or_default();
    order
        .split(';')
        .chain(["scsi0", "virtio0", "sata0", "ide0"])
        .filter_map(|d| vm.config.get(d))
        .find(|v| !v.contains("media=cdrom"))
        .and_then(|v| v.split(',').find_map(|p| p.strip_prefix("size=")))
        .and_then(size_bytes)
        .map_or(0, |b| b as u64)
}

fn vm_summary(vm: &Vm) -> Value {
    let mut v = json!({
        "id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid, "node": vm.node,
        "name": vm.config.get("name").cloned().unwrap_or_default(), "status": vm.status,
        "template": u8::from(vm.template), "maxcpu": cores(vm), "maxmem": memory_mib(vm) * 1024 * 1024,
        "maxdisk": root_disk_bytes(vm),
        "tags": vm.config.get("tags").cloned().unwrap_or_default(),
    });
    if let Some(l) = &vm.lock {
        v["lock"] = json!(l);
    }
    v
}

fn resources(s: &State, kind: Option<&str>) -> Value {
    let mut out = Vec::new();
    if matches!(kind, None | Some("vm")) {
        out.extend(s.vms.values().map(vm_summary));
    }
    if matches!(kind, None | Some("storage")) {
        for node in &s.config.nodes {
            for (name, shared, content) in &s.config.storages {
                out.push(json!({
                    "id": format!("storage/{node}/{name}"), "type": "storage", "node": node, "storage": name,
                    "shared": u8::from(*shared), "content": content, "status": "available",
                    "plugintype": if name.contains("lvm") { "lvmthin" } else { "dir" },
                }));
            }
        }
    }
    if matches!(kind, None | Some("node")) {
        for node in &s.config.nodes {
            let status = if s.offline_nodes.contains(node) { "offline" } else { "online" };
            out.push(json!({"id": format!("node/{node}"), "type": "node", "node": node, "status": status,
                "maxcpu": 8, "maxmem": 32u64 << 30}));
        }
    }
    Value::Array(out)
}

fn ticket(s: &mut State, username: &str, password: &str) -> Answer {
    let lifetime = s.config.ticket_lifetime;
    let renewing = s.tickets.get(password).filter(|t| t.user == username && t.issued.elapsed() < lifetime);
    let valid = renewing.is_some() || s.config.users.iter().any(|(u, p)| u == username && p == password);
    if !valid {
        return Answer::Unauthorized("authentication failure".to_owned());
    }
    let ticket =
        format!("PVE:{username}:{:08X}::{}", rand::random::<u32>(), hex::encode(rand::random::<[u8; 24]>()));
    let csrf = format!("{:08X}:{}", rand::random::<u32>(), hex::encode(rand::random::<[u8; 12]>()));
    s.tickets.insert(
        ticket.clone(),
        Ticket { user: username.to_owned(), csrf: csrf.clone(), issued: Instant::now() },
    );
    Answer::Data(json!({"ticket": ticket, "CSRFPreventionToken": csrf, "username": username}))
}

fn nextid(s: &State, wanted: Option<&str>) -> Answer {
    if let Some(w) = wanted {
        let id: u32 = w.parse().unwrap_or(0);
        if s.vms.contains_key(&id) {
            return Answer::Error(
                400,
                "Parameter verification failed.".to_owned(),
                Some([("vmid".to_owned(), format!("VM {id} already exists"))].into()),
            );
        }
        // PVE answers the id as a string.
        return Answer::Data(json!(id.to_string()));
    }
    let free = (100u32..).find(|id| !s.vms.contains_key(id)).unwrap_or(100);
    Answer::Data(json!(free.to_string()))
}

fn clone(s: &mut State, node: &str, vmid: u32, user: &str, params: &BTreeMap<String, String>) -> Answer {
    let newid: u32 = params.get("newid").and_then(|v| v.parse().ok()).unwrap_or(0);
    if let Some(target) = params.get("target")
        && target != node
    {
        return fail(500, "clone to another node needs shared storage");
    }
    if s.faults.collisions > 0 && !s.vms.contains_key(&newid) {
        // Someone else took the id between nextid and this clone.
        s.faults.collisions -= 1;
        let mut other = s.vms[&vmid].clone();
        other.vmid = newid;
        other.template = false;
        other.config.remove("template");
        other.config.insert("name".into(), "someone-else".into());
        s.vms.insert(newid, other);
    }
    if s.vms.contains_key(&newid) {
        return fail(
            500,
            format!("unable to create VM {newid} - VM {newid} already exists on node '{node}'"),
        );
    }
    let source = &s.vms[&vmid];
    if !source.template && source.status == "running" && !params.get("full").is_some_and(|f| truthy(f)) {
        return fail(500, "linked clone of a running VM is not possible");
    }
    let mut config = source.config.clone();
    config.remove("template");
    config.remove("tags");
    if let Some(name) = params.get("name") {
        config.insert("name".into(), name.clone());
    }
    if let Some(d) = params.get("description") {
        config.insert("description".into(), d.clone());
    }
    let storage = params.get("storage").cloned().unwrap_or_else(|| "local-lvm".to_owned());
    if let Some(disk) = config.get_mut("scsi0") {
        *disk = format!("{storage}:vm-{newid}-disk-0,size=2G");
    }
    let vm = Vm {
        vmid: newid,
        node: node.to_owned(),
        status: "stopped".to_owned(),
        template: false,
        lock: Some("clone".to_owned()),
        config,
        snapshots: BTreeMap::new(),
        starts: 0,
        stops: 0,
        shutdowns: 0,
        reboots: 0,
        resets: 0,
        migrations: 0,
    };
    s.vms.insert(newid, vm);
    // The task's lock is on the new VM's config.
    Answer::Data(json!(spawn_task(s, node, "qmclone", newid, user, Effect::Cloned(newid))))
}

/// `POST /nodes/{node}/storage/{storage}/upload`: what PVE 9.1's upload
/// does with the file its HTTP server received. The storage must take the
/// content type; an `import` file must end in one of the extensions PVE's
/// import content knows for disk images and archives (`.ova`, `.qcow2`,
/// `.raw`, `.vmdk`); the name is normalized (characters other than
/// `-_.a-zA-Z0-9` become `_`). An `imgcopy` task moves the file into place
/// and, given `checksum`, verifies it first: a mismatch fails the task and
/// nothing is stored. A file of the same name is replaced.
fn upload_file(
    s: &mut State,
    node: &str,
    storage: &str,
    params: &BTreeMap<String, String>,
    upload: Option<&Upload>,
    user: &str,
) -> Answer {
    let Some((shared, content_types, _)) = storage_info(s, storage) else {
        return no_storage(storage);
    };
    let param_error = |key: &str, msg: &str| {
        let mut errors = Violations::new();
        errors.insert(key.to_owned(), msg.to_owned());
        Answer::Error(400, "Parameter verification failed.".to_owned(), Some(errors))
    };
    let Some(upload) = upload else {
        return param_error("filename", "no file uploaded (a multipart/form-data part named 'filename')");
    };
    let content = params.get("content").map(String::as_str).unwrap_or_default();
    if !content_types.split(',').any(|c| c == content) {
        return param_error("content", &format!("storage '{storage}' does not support '{content}' content"));
    }
    let filename: String = params
        .get("filename")
        .map(String::as_str)
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    let ext = filename.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    let (dir, format) = match content {
        "import" if matches!(ext, "ova" | "qcow2" | "raw" | "vmdk") => ("import", ext),
        "iso" if matches!(ext, "iso" | "img") => ("iso", "iso"),
        "vztmpl" if filename.ends_with(".tar.gz") || matches!(ext, "tgz" | "zst" | "xz" | "bz2") => {
            ("vztmpl", "tgz")
        }
        _ => return param_error("filename", "wrong file extension"),
    };
    match (params.get("checksum-algorithm").map(String::as_str), params.get("checksum")) {
        (None, None) => {}
        (Some("sha256"), Some(want)) => {
            if !want.eq_ignore_ascii_case(&upload.sha256) {
                let exit = format!("checksum mismatch: got '{}' != expect '{want}'", upload.sha256);
                s.faults.task_exits.entry("imgcopy".to_owned()).or_insert(exit);
            }
        }
        (Some(_), Some(_)) => return fail(501, "the simulator verifies sha256 checksums only"),
        _ => return param_error("checksum", "checksum and checksum-algorithm go together"),
    }
    let ctime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let file = crate::Volume {
        volid: format!("{storage}:{dir}/{filename}"),
        storage: storage.to_owned(),
        node: if shared { None } else { Some(node.to_owned()) },
        owner: 0,
        format: format.to_owned(),
        size: upload.size,
        ctime,
        content: content.to_owned(),
    };
    Answer::Data(json!(spawn(s, node, "imgcopy", "", None, user, Effect::Uploaded(file))))
}

/// A disk option that imports (`STORAGE:0,import-from=VOLID`): the new
/// image on STORAGE owned by `vmid`, a copy of an existing volume the node
/// sees (an uploaded `import` file or a disk image). The simulator reads no
/// image headers: the new disk's size is the source's size.
fn import_disk(s: &State, node: &str, vmid: u32, value: &str) -> Result<(String, crate::Volume), Answer> {
    let mut parts = value.split(',');
    let target = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let source = rest.iter().find_map(|p| p.strip_prefix("import-from=")).unwrap_or_default();
    let Some((storage, "0")) = target.split_once(':') else {
        return Err(fail(400, format!("import-from needs a disk allocated as STORAGE:0, not '{target}'")));
    };
    let Some((_, content, plugin)) = storage_info(s, storage) else {
        return Err(no_storage(storage));
    };
    if !content.split(',').any(|c| c == "images") {
        return Err(fail(500, format!("storage '{storage}' does not support vm images")));
    }
    let Some(src) = s.volumes.iter().find(|v| v.volid == source && v.visible_on(node)) else {
        return Err(fail(500, format!("volume '{source}' does not exist")));
    };
    if src.content == "import" && src.format == "ova" {
        return Err(fail(500, format!("importing from '{source}' needs the OVA's disk, not the archive")));
    }
    let (format, ext) = if file_based(plugin) { ("qcow2", ".qcow2") } else { ("raw", "") };
    let volid = format!("{storage}:vm-{vmid}-disk-0{ext}");
    let options: Vec<&str> = rest.iter().copied().filter(|p| !p.starts_with("import-from=")).collect();
    let mut drive = format!("{volid},size={}", size_text(src.size));
    for o in options {
        drive.push(',');
        drive.push_str(o);
    }
    let disk = crate::Volume {
        volid,
        storage: storage.to_owned(),
        node: Some(node.to_owned()),
        owner: vmid,
        format: format.to_owned(),
        size: src.size,
        ctime: src.ctime,
        content: "images".to_owned(),
    };
    Ok((drive, disk))
}

/// `POST /nodes/{node}/qemu`: a new VM from its options alone (no disk is
/// allocated: the simulator models only drives naming existing volumes,
/// and disks imported from a volume with `import-from`), locked `create`
/// until its `qmcreate` task ends.
fn create_vm(s: &mut State, node: &str, user: &str, params: &BTreeMap<String, String>) -> Answer {
    let vmid: u32 = params.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0);
    if s.vms.contains_key(&vmid) {
        return fail(500, format!("unable to create VM {vmid} - VM {vmid} already exists on node '{node}'"));
    }
    let mut config: BTreeMap<String, String> = params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "vmid" | "node" | "start" | "unique" | "pool" | "force"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut imported = Vec::new();
    for (key, value) in config.iter_mut() {
        // `STORAGE:cloudinit` allocates the cloud-init drive.
        if is_disk(key)
            && let Some(storage) = value.strip_suffix(":cloudinit")
            && !storage.contains(',')
        {
            *value = format!("{storage}:vm-{vmid}-cloudinit,media=cdrom");
            continue;
        }
        if is_disk(key) && value.contains("import-from=") {
            match import_disk(s, node, vmid, value) {
                Ok((drive, disk)) => {
                    *value = drive;
                    imported.push(disk);
                }
                Err(a) => return a,
            }
        }
    }
    if config.iter().any(|(k, v)| is_disk(k) && !v.contains("media=cdrom") && !v.contains(",size=")) {
        return fail(501, "the simulator creates VMs without disks, or with disks imported from a volume");
    }
    s.volumes.extend(imported);
    let vm = Vm {
        vmid,
        node: node.to_owned(),
        status: "stopped".to_owned(),
        template: false,
        lock: Some("create".to_owned()),
        config,
        snapshots: BTreeMap::new(),
        starts: 0,
        stops: 0,
        shutdowns: 0,
        reboots: 0,
        resets: 0,
        migrations: 0,
    };
    s.vms.insert(vmid, vm);
    Answer::Data(json!(spawn_task(s, node, "qmcreate", vmid, user, Effect::Cloned(vmid))))
}

/// `POST /nodes/{node}/qemu/{vmid}/migrate`: checks what PVE checks before
/// it starts the task (a running VM needs `online`; a live move of disks on
/// storage that is not shared needs `with-local-disks`), then moves the VM
/// to `target` when the `qmigrate` task ends, locked `migrate` meanwhile.
fn migrate(s: &mut State, node: &str, vmid: u32, user: &str, params: &BTreeMap<String, String>) -> Answer {
    let target = params.get("target").cloned().unwrap_or_default();
    if target == node {
        return fail(400, "target is local node.");
    }
    if !s.config.nodes.contains(&target) {
        return fail(500, format!("no such cluster node '{target}'"));
    }
    if s.offline_nodes.contains(&target) {
        return fail(500, format!("target node '{target}' is not online"));
    }
    let vm = &s.vms[&vmid];
    if let Some(a) = locked(vm) {
        return a;
    }
    if vm.template {
        return fail(500, "can't migrate a template with this API");
    }
    let online = params.get("online").is_some_and(|v| truthy(v));
    if vm.status == "running" && !online {
        return fail(500, "can't migrate running VM without --online");
    }
    let local_disks = params.get("with-local-disks").is_some_and(|v| truthy(v));
    if vm.status == "running" && !local_disks {
        for (key, value) in &vm.config {
            let disk = ["scsi", "virtio", "sata"].iter().any(|p| {
                key.strip_prefix(p).is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            }) && !value.contains("media=cdrom");
            let storage = value.split(':').next().unwrap_or_default();
            let shared = s.config.storages.iter().any(|(name, shared, _)| name == storage && *shared);
            if disk && !shared {
                return fail(
                    500,
                    format!(
                        "can't live migrate attached local disks without with-local-disks option ({key})"
                    ),
                );
            }
        }
    }
    let vm = s.vms.get_mut(&vmid).expect("checked above");
    vm.lock = Some("migrate".to_owned());
    Answer::Data(json!(spawn_task(s, node, "qmigrate", vmid, user, Effect::Migrate(vmid, target))))
}

/// Bytes in a PVE size (`2G`, `512M`, `10.5G`; bytes without a unit).
fn size_bytes(text: &str) -> Option<f64> {
    let (num, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 'B'),
    };
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        'B' => 1.0,
        'K' => 1024.0,
        'M' => 1024.0 * 1024.0,
        'G' => 1024.0 * 1024.0 * 1024.0,
        'T' => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * scale)
}

/// `PUT .../resize`: grows a disk the VM has (absolute or `+` relative);
/// refuses to shrink, as PVE does.
fn resize(s: &mut State, vmid: u32, disk: Option<&str>, size: Option<&str>) -> Result<(), Answer> {
    if let Some(a) = locked(&s.vms[&vmid]) {
        return Err(a);
    }
    let (Some(disk), Some(size)) = (disk, size) else {
        return Err(fail(400, "disk and size are required"));
    };
    let vm = s.vms.get_mut(&vmid).expect("routed to an existing vm");
    let Some(value) = vm.config.get(disk).cloned() else {
        return Err(fail(500, format!("disk '{disk}' does not exist")));
    };
    let current = value.split(',').find_map(|p| p.strip_prefix("size=")).and_then(size_bytes).unwrap_or(0.0);
    let wanted = match size.strip_prefix('+') {
        Some(add) => current + size_bytes(add).unwrap_or(0.0),
        None => size_bytes(size).unwrap_or(0.0),
    };
    if wanted < current {
        return Err(fail(500, "shrinking disks is not supported"));
    }
    let gib = (wanted / (1024.0 * 1024.0 * 1024.0)).ceil() as u64;
    let parts: Vec<String> = value
        .split(',')
        .map(|p| if p.starts_with("size=") { format!("size={gib}G") } else { p.to_owned() })
        .collect();
    vm.config.insert(disk.to_owned(), parts.join(","));
    let node = vm.node.clone();
    let volid = drive_volid(&value).to_owned();
    if let Some(v) = s.volumes.iter_mut().find(|v| v.volid == volid && v.visible_on(&node)) {
        v.size = gib << 30;
    }
    Ok(())
}

fn set_config(s: &mut State, vmid: u32, params: &BTreeMap<String, String>) -> Result<(), Answer> {
    if let Some(a) = locked(&s.vms[&vmid]) {
        return Err(a);
    }
    if s.faults.config_failures > 0 {
        s.faults.config_failures -= 1;
        return Err(fail(
            500,
            "update VM {vmid}: unable to write the config (injected)".replace("{vmid}", &vmid.to_string()),
        ));
    }
    if s.faults.cloudinit_denied
        && ["cicustom", "sshkeys", "ciuser", "cipassword", "ipconfig0"]
            .iter()
            .any(|k| params.contains_key(*k))
    {
        return Err(fail(403, format!("Permission check failed (/vms/{vmid}, VM.Config.Cloudinit)")));
    }
    if let Some(custom) = params.get("cicustom") {
        for part in custom.split(',') {
            let Some((_, volume)) = part.split_once('=') else { continue };
            let file = volume.split_once(":snippets/").map(|(_, f)| f);
            let exists = match (file, &s.config.snippets_dir) {
                (Some(f), Some(dir)) => !f.contains('/') && dir.join(f).is_file(),
                _ => false,
            };
            if !exists {
                return Err(fail(500, format!("volume '{volume}' does not exist")));
            }
        }
    }
    let Some(vm) = s.vms.get(&vmid) else {
        return Err(fail(
            500,
            format!("Configuration file 'nodes/pve/qemu-server/{vmid}.conf' does not exist"),
        ));
    };
    let node = vm.node.clone();
    // Disks first: a volume of another owner must exist where the VM runs,
    // and the drive gets its size written in, as PVE does.
    let mut disks: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in params.iter().filter(|(k, _)| is_disk(k)) {
        if v.contains("media=cdrom") {
            continue;
        }
        let volid = drive_volid(v).to_owned();
        let tracked = s.volumes.iter().find(|x| x.volid == volid && x.visible_on(&node));
        let foreign = owner_of(&volid).is_some_and(|o| o != vmid);
        let value = match tracked {
            Some(t) if !v.split(',').any(|p| p.starts_with("size=")) => {
                format!("{v},size={}", size_text(t.size))
            }
            Some(_) => v.clone(),
            None if foreign || s.volumes.iter().any(|x| x.volid == volid) => {
                return Err(fail(500, format!("volume '{volid}' does not exist")));
            }
            None => v.clone(),
        };
        disks.insert(k.clone(), value);
    }
    let Some(vm) = s.vms.get_mut(&vmid) else {
        return Err(fail(
            500,
            format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"),
        ));
    };
    let mut freed: Vec<String> = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "digest" | "skiplock" | "force" | "background_delay" => {}
            "delete" => {
                for key in v.split([',', ';', ' ']).filter(|x| !x.is_empty()) {
                    let Some(old) = vm.config.remove(key) else { continue };
                    // A drive taken out of the config becomes `unusedN` if
                    // the VM owns its volume; one it does not own is only
                    // dropped from the config. Removing an `unusedN` frees
                    // the volume when the VM owns it, and only then.
                    if is_disk(key) && !old.contains("media=cdrom") {
                        register_unused(vm, &old);
                    } else if key.starts_with("unused") && owner_of(drive_volid(&old)) == Some(vmid) {
                        freed.push(drive_volid(&old).to_owned());
                    }
                }
            }
            key if is_disk(key) => {
                let value = disks.get(key).cloned().unwrap_or_else(|| v.clone());
                if let Some(old) = vm.config.insert(k.clone(), value)
                    && drive_volid(&old) != drive_volid(v)
                    && !old.contains("media=cdrom")
                {
                    register_unused(vm, &old);
                }
            }
            "sshkeys" => {
                // PVE stores the keys URL-encoded, as sent.
                vm.config.insert(k.clone(), v.clone());
            }
            key if is_nic(key) => {
                // PVE gives a NIC without a MAC one of its own (BC:24:11
                // prefix), written back as `model=MAC`.
                let value = match v.split(',').next() {
                    Some(model) if !model.contains('=') => {
                        let mac = format!(
                            "BC:24:11:{:02X}:{:02X}:{:02X}",
                            rand::random::<u8>(),
                            rand::random::<u8>(),
                            rand::random::<u8>()
                        );
                        format!("{model}={mac}{}", &v[model.len()..])
                    }
                    _ => v.clone(),
                };
                vm.config.insert(k.clone(), value);
            }
            _ => {
                vm.config.insert(k.clone(), v.clone());
            }
        }
    }
    s.volumes.retain(|v| !(freed.contains(&v.volid) && v.visible_on(&node)));
    Ok(())
}

/// `scsiN`, `virtioN`, `sataN`, `ideN`: a drive key.
fn is_disk(key: &str) -> bool {
    ["scsi", "virtio", "sata", "ide"].iter().any(|bus| {
        key.strip_prefix(bus).is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    })
}

/// The volume of a drive value (`local-lvm:vm-100-disk-0,size=2G`).
fn drive_volid(value: &str) -> &str {
    let first = value.split(',').next().unwrap_or_default();
    first.strip_prefix("file=").or_else(|| first.strip_prefix("volume=")).unwrap_or(first)
}

/// The owner vmid of a volume named `vm-<vmid>-...` or `base-<vmid>-...`.
fn owner_of(volid: &str) -> Option<u32> {
    let name = volid.split_once(':')?.1;
    let rest = name.strip_prefix("vm-").or_else(|| name.strip_prefix("base-"))?;
    rest.split_once('-')?.0.parse().ok()
}

/// A drive leaving the config: `unusedN` when the VM owns its volume.
fn register_unused(vm: &mut Vm, old: &str) {
    let volid = drive_volid(old);
    if owner_of(volid) != Some(vm.vmid) {
        return;
    }
    if vm.config.iter().any(|(k, v)| k.starts_with("unused") && drive_volid(v) == volid) {
        return;
    }
    let n = (0..256).find(|n| !vm.config.contains_key(&format!("unused{n}"))).unwrap_or(255);
    vm.config.insert(format!("unused{n}"), volid.to_owned());
}

/// A size as PVE writes it in a drive (`4G`, `512M`).
fn size_text(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes.is_multiple_of(GIB) {
        format!("{}G", bytes / GIB)
    } else {
        format!("{}M", bytes.div_ceil(1 << 20))
    }
}

/// The simulated storage `name`: (shared, content, plugin type).
fn storage_info(s: &State, name: &str) -> Option<(bool, String, &'static str)> {
    s.config.storages.iter().find(|(n, _, _)| n == name).map(|(n, shared, content)| {
        (*shared, content.clone(), if n.contains("lvm") { "lvmthin" } else { "dir" })
    })
}

/// Whether the storage stores files (a directory, NFS): their images carry
/// the format as extension.
fn file_based(plugin: &str) -> bool {
    matches!(plugin, "dir" | "nfs" | "cifs" | "glusterfs" | "btrfs" | "cephfs")
}

fn no_storage(storage: &str) -> Answer {
    fail(500, format!("storage '{storage}' does not exist"))
}

/// `POST /nodes/{node}/storage/{storage}/content`: allocates a disk image
/// (`filename` must be `vm-<vmid>-*`; a file-based storage wants the
/// format's extension, LVM only raw). Synchronous; answers the volid.
fn alloc_volume(s: &mut State, node: &str, storage: &str, params: &BTreeMap<String, String>) -> Answer {
    let Some((shared, content, plugin)) = storage_info(s, storage) else {
        return no_storage(storage);
    };
    if !content.split(',').any(|c| c == "images") {
        return fail(500, format!("storage '{storage}' does not support vm images"));
    }
    let name = params.get("filename").cloned().unwrap_or_default();
    let owner: u32 = params.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0);
    if !name.starts_with(&format!("vm-{owner}-")) {
        return fail(500, format!("illegal name '{name}' - should be 'vm-{owner}-*'"));
    }
    let ext = [".raw", ".qcow2", ".vmdk"].iter().find(|e| name.ends_with(*e)).map(|e| &e[1..]);
    let format = match (params.get("format").map(String::as_str), ext) {
        (Some(f), Some(e)) if f != e => {
            return Answer::Error(
                400,
                "Parameter verification failed.".to_owned(),
                Some(
                    [(
                        "format".to_owned(),
                        format!("Format mismatch - file has '{e}', but given format is '{f}'"),
                    )]
                    .into(),
                ),
            );
        }
        (Some(f), _) => f.to_owned(),
        (None, Some(e)) => e.to_owned(),
        (None, None) => "raw".to_owned(),
    };
    if file_based(plugin) && ext != Some(format.as_str()) {
        return fail(500, format!("illegal name '{name}' - wrong extension for format ('{format}')"));
    }
    if !file_based(plugin) && format != "raw" {
        return fail(500, format!("unsupported format '{format}'"));
    }
    let size_param = params.get("size").cloned().unwrap_or_default();
    let (digits, unit) = size_param.split_at(size_param.trim_end_matches(['M', 'G']).len());
    let kib: u64 = digits.parse().unwrap_or(0);
    let size = kib
        * 1024
        * match unit {
            "G" => 1024 * 1024,
            "M" => 1024,
            _ => 1,
        };
    let volid = format!("{storage}:{name}");
    let scope = if shared { None } else { Some(node.to_owned()) };
    if s.volumes.iter().any(|v| v.volid == volid && v.visible_on(node)) {
        return fail(500, format!("disk image '{volid}' already exists"));
    }
    let ctime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    s.volumes.push(crate::Volume {
        volid: volid.clone(),
        storage: storage.to_owned(),
        node: scope,
        owner,
        format,
        size,
        ctime,
        content: "images".to_owned(),
    });
    Answer::Data(json!(volid))
}

/// `GET /nodes/{node}/storage/{storage}/content`: the images (and only
/// those: the simulator stores no ISOs or backups) the node sees there.
fn list_content(s: &State, node: &str, storage: &str, content: Option<&str>, vmid: Option<&str>) -> Answer {
    if storage_info(s, storage).is_none() {
        return no_storage(storage);
    }
    let owner: Option<u32> = vmid.and_then(|v| v.parse().ok());
    let items: Vec<Value> = s
        .volumes
        .iter()
        .filter(|v| v.storage == storage && v.visible_on(node) && owner.is_none_or(|o| o == v.owner))
        .filter(|v| content.is_none_or(|c| c == v.content))
        .map(|v| {
            let mut item = json!({"volid": v.volid, "format": v.format, "size": v.size, "used": v.size,
                   "content": v.content, "ctime": v.ctime});
            // Import files belong to no VM.
            if v.owner != 0 {
                item["vmid"] = json!(v.owner);
            }
            item
        })
        .collect();
    Answer::Data(Value::Array(items))
}

/// The volid a `{volume}` path segment names: a whole volid, or a name on
/// the path's storage.
fn volid_of(storage: &str, volume: &str) -> String {
    if volume.contains(':') { volume.to_owned() } else { format!("{storage}:{volume}") }
}

fn find_volume<'a>(
    s: &'a State,
    node: &str,
    storage: &str,
    volume: &str,
) -> Result<&'a crate::Volume, Answer> {
    if storage_info(s, storage).is_none() {
        return Err(no_storage(storage));
    }
    let volid = volid_of(storage, volume);
    s.volumes
        .iter()
        .find(|v| v.volid == volid && v.visible_on(node))
        .ok_or_else(|| fail(500, format!("volume '{volid}' does not exist")))
}

fn volume_path(s: &State, v: &crate::Volume) -> String {
    let name = v.volid.split_once(':').map(|x| x.1).unwrap_or_default();
    match storage_info(s, &v.storage) {
        Some((_, _, "dir")) => format!("/var/lib/vz/images/{}/{name}", v.owner),
        _ => format!("/dev/pve/{name}"),
    }
}

/// `DELETE .../content/{volume}`: an `imgdel` task frees the image. Like
/// PVE it does not look at VM configs (a volume a VM still names is freed
/// all the same); an image that is not there fails the task on LVM and
/// only warns on a directory.
fn free_volume(s: &mut State, node: &str, storage: &str, volume: &str, user: &str) -> Answer {
    let Some((_, _, plugin)) = storage_info(s, storage) else {
        return no_storage(storage);
    };
    let volid = volid_of(storage, volume);
    let owner = owner_of(&volid).map(|o| format!("{o}@")).unwrap_or_default();
    let exists = s.volumes.iter().any(|v| v.volid == volid && v.visible_on(node));
    if !exists {
        let exit = if file_based(plugin) {
            "WARNINGS: 1".to_owned()
        } else {
            format!("lvremove '{volid}' error: Failed to find logical volume")
        };
        s.faults.task_exits.entry("imgdel".to_owned()).or_insert(exit);
    }
    let id = format!("{owner}{storage}");
    Answer::Data(json!(spawn(s, node, "imgdel", &id, None, user, Effect::FreeVolume(volid, node.to_owned()))))
}

/// `POST .../content/{volume}` (`target`, `target_node`): an `imgcopy`
/// task copies a disk image to a new image of the given name, which PVE's
/// schema calls experimental (its worker runs `storage_migrate` to the
/// target node). The source is an image of the storage API or a disk a VM
/// config names (a clone's own disk, which the simulator keeps only in the
/// config); the target must be `vm-<vmid>-*` on a storage with `images`
/// and not exist yet. The copy appears when the task ends well.
fn copy_volume(
    s: &mut State,
    node: &str,
    storage: &str,
    volume: &str,
    params: &BTreeMap<String, String>,
    user: &str,
) -> Answer {
    if storage_info(s, storage).is_none() {
        return no_storage(storage);
    }
    let src = volid_of(storage, volume);
    let target_node = params.get("target_node").cloned().unwrap_or_else(|| node.to_owned());
    let from_api =
        s.volumes.iter().find(|v| v.volid == src && v.visible_on(node)).map(|v| (v.size, v.format.clone()));
    let from_config = || {
        s.vms.values().filter(|vm| vm.node == node).find_map(|vm| {
            vm.config.values().find(|v| drive_volid(v) == src).map(|v| {
                let size =
                    v.split(',').find_map(|p| p.strip_prefix("size=")).and_then(size_bytes).unwrap_or(0.0);
                (size as u64, "raw".to_owned())
            })
        })
    };
    let Some((size, format)) = from_api.or_else(from_config) else {
        return fail(500, format!("volume '{src}' does not exist"));
    };
    let target = volid_of(storage, params.get("target").map(String::as_str).unwrap_or_default());
    let Some((tstorage, tname)) = target.split_once(':') else {
        return fail(500, format!("unable to parse volume ID '{target}'"));
    };
    let Some((shared, content, plugin)) = storage_info(s, tstorage) else {
        return no_storage(tstorage);
    };
    if !content.split(',').any(|c| c == "images") {
        return fail(500, format!("storage '{tstorage}' does not support vm images"));
    }
    let Some(owner) = owner_of(&target).filter(|_| tname.starts_with("vm-")) else {
        return fail(500, format!("illegal name '{tname}' - should be 'vm-<vmid>-*'"));
    };
    if file_based(plugin) != tname.ends_with(".raw") {
        return fail(500, format!("illegal name '{tname}' - wrong extension for format ('raw')"));
    }
    if s.volumes.iter().any(|v| v.volid == target && v.visible_on(&target_node)) {
        return fail(500, format!("disk image '{target}' already exists"));
    }
    let ctime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let copy = crate::Volume {
        volid: target.clone(),
        storage: tstorage.to_owned(),
        node: if shared { None } else { Some(target_node.clone()) },
        owner,
        format,
        size,
        ctime,
        content: "images".to_owned(),
    };
    let id = format!("{owner}@{tstorage}");
    Answer::Data(json!(spawn(s, &target_node, "imgcopy", &id, None, user, Effect::CopyVolume(copy))))
}

/// A destroyed VM takes the disks it owns with it: those its config names
/// (unusedN too), and with `destroy-unreferenced-disks` the others named
/// `vm-<vmid>-` on every storage. Disks of other owners stay.
fn destroy_owned_disks(s: &mut State, vm: &Vm, unreferenced: bool) {
    let named: Vec<&str> = vm.config.values().map(|v| drive_volid(v)).collect();
    s.volumes.retain(|v| {
        let owned = v.owner == vm.vmid && v.visible_on(&vm.node);
        !(owned && (unreferenced || named.contains(&v.volid.as_str())))
    });
}

fn is_nic(key: &str) -> bool {
    key.strip_prefix("net").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// What the guest agent says of the NICs: a loopback and one interface per
/// `netN`, with an address derived from the MAC. Like PVE, a VM whose
/// `agent` option is off, or that is not running, has no agent to ask; and
/// with `agent_down` the agent inside the running guest does not answer
/// (not installed, or not started yet).
fn agent_interfaces(vm: &Vm, agent_down: bool) -> Answer {
    let enabled = vm.config.get("agent").is_some_and(|a| a.split(',').any(|p| p == "1" || p == "enabled=1"));
    if !enabled {
        return fail(500, "No QEMU guest agent configured");
    }
    if vm.status != "running" {
        return fail(500, format!("VM {} is not running", vm.vmid));
    }
    if agent_down {
        return fail(500, "QEMU guest agent is not running");
    }
    let mut out = vec![json!({"name": "lo", "hardware-address": "00:00:00:00:00:00",
        "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]})];
    let mut nics: Vec<(&String, &String)> = vm.config.iter().filter(|(k, _)| is_nic(k)).collect();
    nics.sort_by_key(|(k, _)| k[3..].parse::<u32>().unwrap_or(u32::MAX));
    for (i, (_, value)) in nics.into_iter().enumerate() {
        let Some(mac) =
            value.split(',').find_map(|p| p.split_once('=').map(|(_, m)| m).filter(|m| m.len() == 17))
        else {
            continue;
        };
        let b: Vec<u8> = mac.split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
        if b.len() != 6 {
            continue;
        }
        out.push(json!({
            "name": format!("eth{i}"),
            "hardware-address": mac.to_ascii_lowercase(),
            "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": format!("10.{}.{}.{}", i, b[4], b[5].max(2)), "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": format!("fe80::be24:11ff:fe{:02x}:{:02x}{:02x}", b[3], b[4], b[5]), "prefix": 64},
            ],
        }));
    }
    Answer::Data(json!({"result": out}))
}

fn spawn_task(s: &mut State, node: &str, kind: &str, vmid: u32, user: &str, effect: Effect) -> String {
    spawn(s, node, kind, &vmid.to_string(), Some(vmid), user, effect)
}

/// A task with PVE's UPID; `vmid` is the VM whose config it locks, if any
/// (storage tasks such as `imgdel` lock none and carry `owner@storage`).
fn spawn(
    s: &mut State,
    node: &str,
    kind: &str,
    id: &str,
    vmid: Option<u32>,
    user: &str,
    effect: Effect,
) -> String {
    s.next_pid += 1;
    let pid = s.next_pid;
    let starttime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let pstart = 4_000_000 + pid;
    let upid = format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
    let planned_exit = if let Some(exit) = s.faults.task_exits.remove(kind) {
        exit
    } else if s.faults.task_lock_timeouts > 0 && kind != "vncproxy" {
        s.faults.task_lock_timeouts -= 1;
        format!("can't lock file '/var/lock/qemu-server/lock-{id}.conf' - got timeout")
    } else {
        "OK".to_owned()
    };
    let task = Task {
        upid: upid.clone(),
        node: node.to_owned(),
        kind: kind.to_owned(),
        id: id.to_owned(),
        user: user.to_owned(),
        pid,
        pstart,
        starttime,
        ends_at: Instant::now() + s.config.task_duration,
        exit: None,
        planned_exit,
        effect,
        vmid,
    };
    s.tasks.insert(upid.clone(), task);
    upid
}

/// Finishes tasks whose time is up and applies their effects.
fn advance(s: &mut State) {
    let now = Instant::now();
    let due: Vec<String> =
        s.tasks.values().filter(|t| t.exit.is_none() && t.ends_at <= now).map(|t| t.upid.clone()).collect();
    for upid in due {
        let Some(task) = s.tasks.get(&upid).cloned() else { continue };
        let mut exit = task.planned_exit.clone();
        let ok = exit == "OK" || exit.starts_with("WARNINGS");
        match task.effect {
            Effect::None => {}
            Effect::Cloned(id) => {
                if ok {
                    if let Some(vm) = s.vms.get_mut(&id) {
                        vm.lock = None;
                    }
                } else if let Some(vm) = s.vms.remove(&id) {
                    // A create that failed leaves no imported disk.
                    destroy_owned_disks(s, &vm, true);
                }
            }
            Effect::Power(id, status) if ok => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    if status == "running" {
                        vm.starts += 1;
                    } else if vm.status == "running" {
                        vm.stops += 1;
                    }
                    vm.status = status.to_owned();
                }
            }
            Effect::Shutdown(id, force) if ok => {
                let ignored = s.faults.acpi_ignored;
                if let Some(vm) = s.vms.get_mut(&id) {
                    if ignored && !force {
                        exit = "VM quit/powerdown failed - got timeout".to_owned();
                    } else {
                        vm.shutdowns += 1;
                        vm.status = "stopped".to_owned();
                    }
                }
            }
            Effect::Reboot(id) if ok => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.reboots += 1;
                }
            }
            Effect::Reset(id) if ok => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.resets += 1;
                }
            }
            Effect::Destroy(id, unreferenced) if ok => {
                if let Some(vm) = s.vms.remove(&id) {
                    destroy_owned_disks(s, &vm, unreferenced);
                }
            }
            Effect::FreeVolume(volid, node) if ok => {
                s.volumes.retain(|v| !(v.volid == volid && v.visible_on(&node)));
            }
            Effect::CopyVolume(copy) if ok => {
                s.volumes.push(copy);
            }
            Effect::Uploaded(file) if ok => {
                s.volumes.retain(|v| !(v.volid == file.volid && v.node == file.node));
                s.volumes.push(file);
            }
            Effect::Template(id) if ok => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.template = true;
                    vm.config.insert("template".to_owned(), "1".to_owned());
                }
            }
            Effect::Migrate(id, target) => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.lock = None;
                    if ok {
                        vm.node = target;
                        vm.migrations += 1;
                    }
                }
            }
            Effect::Snapshot(id, name, desc, vmstate) => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.lock = None;
                    if ok {
                        let t = task.starttime;
                        vm.snapshots.insert(name, (desc, vmstate, t));
                    }
                }
            }
            Effect::Rollback(id, name, start) => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.lock = None;
                    if ok {
                        let vmstate = vm.snapshots.get(&name).is_some_and(|s| s.1);
                        vm.status = if vmstate || start { "running" } else { "stopped" }.to_owned();
                    }
                }
            }
            Effect::DeleteSnapshot(id, name) => {
                if let Some(vm) = s.vms.get_mut(&id) {
                    vm.lock = None;
                    if ok {
                        vm.snapshots.remove(&name);
                    }
                }
            }
            _ => {}
        }
        if let Some(t) = s.tasks.get_mut(&upid) {
            t.exit = Some(exit);
        }
    }
}

/// `POST /_sim/nodes`: a node goes offline (its VMs stop, as when it loses
/// power) or comes back.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeState {
    node: String,
    online: bool,
}

/// The control API of the binary: `GET /_sim/requests`, `GET /_sim/vms`,
/// `GET|POST /_sim/faults`, `POST /_sim/nodes`.
fn control(sim: &Sim, method: &Method, path: &str, body: &[u8]) -> Response {
    match (method.as_str(), path) {
        ("GET", "requests") => axum::Json(sim.requests()).into_response(),
        ("GET", "vms") => axum::Json(sim.vms()).into_response(),
        ("GET", "faults") => axum::Json(sim.faults()).into_response(),
        ("POST", "nodes") => match serde_json::from_slice::<NodeState>(body) {
            Ok(n) => {
                sim.set_node_online(&n.node, n.online);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("nodes: {e}")).into_response(),
        },
        ("POST", "faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                sim.set_faults(f);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("faults: {e}")).into_response(),
        },
        _ => (StatusCode::NOT_FOUND, "unknown control path").into_response(),
    }
}
