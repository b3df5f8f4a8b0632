//! The API contract of issue 27, at its edges: the OpenAPI document the
//! gateway serves states every request constraint the server enforces, and
//! the two agree. For each documented constraint (path and query parameters,
//! headers, request bodies followed through `$ref`s, arrays, maps and their
//! keys) a value just inside is not refused by that rule, and one just
//! outside is refused with 400 naming the field (`details.field`) and, where
//! the answer carries one, the JSON Schema keyword (`details.rule`).
//!
//! The constraints are read from the document, not listed here; what is
//! written by hand is one baseline request per operation (path parameters
//! that exist, a minimal valid body), so that a probe changes one thing.
//! The test fails once, listing every disagreement; HCP_RULES_VERBOSE=1
//! prints every probe and its answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use regex::Regex;
use serde_json::{Map, Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const WAIT: Duration = Duration::from_secs(30);
/// The longest one request may take (a stream that does not end is a
/// disagreement, not a hung test).
const REQUEST: Duration = Duration::from_secs(15);
const T: &str = "/api/hcp/tenant/v1/projects/demo";
const O: &str = "/api/hcp/ops/v1";
/// Every capability the sim has.
const ALL: &str = "cloud_init,snapshot,snapshot_running,console_vnc,console_spice,console_rdp,\
                   console_serial,console_log,resize,hot_resize,live_migration,cold_migration,volumes,hot_attach,\
                   volume_extend_in_use";
/// An id no resource has.
const NOBODY: &str = "01890000-0000-7000-8000-000000000000";
/// A usage window (usage reports' baselines).
const FROM: &str = "2026-01-01T00:00:00Z";
const TO: &str = "2026-01-02T00:00:00Z";
/// A valid SSH public key (key pairs' baselines).
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 alice@example";
/// Values tried, in order, as just outside a pattern: the first that the
/// pattern does not match is sent.
const OUTSIDE: &[&str] = &["-a", "a b", "a,b", ".x", "hcp.x", "\u{1}", "é", "0", "a_b", "A-", "", "a\u{7f}"];
/// Values tried, in order, as inside a pattern when the baseline has none.
const INSIDE: &[&str] = &["a", "a1", NOBODY, "text", "1", "0", "maxVcpus"];
/// Operations that change what others use, run last and in this order.
const LAST: &[&str] = &[
    "opsDrainHost",
    "opsUndrainHost",
    "opsSetZonePlacement",
    "opsUpdateProjectQuota",
    "opsSetProjectQuota",
    "cancelJob",
    "opsCancelJob",
    "deleteSnapshot",
    "detachVolume",
    "deleteVolume",
    "opsDeleteVolumeType",
    "deleteVm",
    "deletePlacementGroup",
    "deleteKeyPair",
    "deleteWebhook",
    "opsDeleteNetwork",
    "opsRemoveProvider",
    "opsDeleteFlavor",
    "opsDeleteImage",
    "opsDeleteZone",
];

/// One operation's baseline: its path parameters and a valid body.
struct Base {
    params: Vec<(&'static str, String)>,
    body: Option<Value>,
    /// The request field a `body: "<field>"` route puts the body in; the
    /// server names body properties `<field>.<prop>`.
    prefix: Option<&'static str>,
}

fn base(params: &[(&'static str, &str)], body: Option<Value>) -> Base {
    Base { params: params.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(), body, prefix: None }
}

fn prefixed(params: &[(&'static str, &str)], prefix: &'static str, body: Value) -> Base {
    Base { prefix: Some(prefix), ..base(params, Some(body)) }
}

/// What the seed made for the baselines.
struct Seed {
    vm: String,
    snapshot: String,
    group: String,
    doomed_group: String,
    job: String,
    provider: String,
    host: String,
    sim2: String,
    volume: String,
    attached_volume: String,
    doomed_volume: String,
    webhook: String,
    doomed_webhook: String,
    /// A loopback URL (allowed in this stack's `[egress]`) whose port the
    /// test holds and never answers.
    hook_url: String,
    _hold: tokio::net::TcpListener,
}

/// The hand-made table: a baseline per operationId.
fn baseline(op: &str, s: &Seed) -> Option<Base> {
    let vm = s.vm.as_str();
    let demo_vm = [("project_id", "demo"), ("vm_id", vm)];
    let empty = || Some(json!({}));
    Some(match op {
        "getCaller"
        | "listFlavors"
        | "listImages"
        | "listZones"
        | "listNetworks"
        | "opsListProviders"
        | "opsListAuditEvents"
        | "opsVerifyAuditChain"
        | "opsListNetworkDefinitions"
        | "listVolumeTypes" => base(&[], None),
        "opsCreateVolumeType" => prefixed(&[], "volume_type", json!({"name": "vt-b", "max_size_gib": 10})),
        "opsDeleteVolumeType" => base(&[("name", "vt-del")], None),
        "listVolumes" => base(&[("project_id", "demo")], None),
        "createVolume" => base(
            &[("project_id", "demo")],
            Some(json!({"name": "v-b", "size_gib": 1, "volume_type": "standard"})),
        ),
        "getVolume" | "listJobsByVolumeId" => base(&[("project_id", "demo"), ("volume_id", &s.volume)], None),
        "updateVolume" => base(
            &[("project_id", "demo"), ("volume_id", &s.volume)],
            Some(json!({"name": "vol-1", "update_mask": "name,metadata,tags"})),
        ),
        "extendVolume" => {
            base(&[("project_id", "demo"), ("volume_id", &s.volume)], Some(json!({"size_gib": 50})))
        }
        "deleteVolume" => base(&[("project_id", "demo"), ("volume_id", &s.doomed_volume)], None),
        "attachVolume" => base(&demo_vm, Some(json!({"volume_id": s.volume}))),
        "detachVolume" => base(&demo_vm, Some(json!({"volume_id": s.attached_volume}))),
        "getFlavor" => base(&[("name", "small")], None),
        "getImage" => base(&[("name", "debian-12")], None),
        "opsCreateFlavor" => {
            prefixed(&[], "flavor", json!({"name": "f-b", "vcpus": 1, "memory_mib": 512, "disk_gib": 10}))
        }
        "opsDeleteFlavor" => base(&[("name", "f-del")], None),
        "opsCreateImage" => prefixed(&[], "image", json!({"name": "i-b", "source": "base"})),
        "opsDeleteImage" => base(&[("name", "i-del")], None),
        "opsSetImageBacking" => base(
            &[("name", "debian-12"), ("provider", "sim-1")],
            Some(json!({"source": "debian-12-genericcloud"})),
        ),
        // Accepted, or refused for what it means (the provider may not
        // store imports): never by a rule.
        "opsImportImage" => base(
            &[],
            Some(json!({"name": "imp-b", "url": "https://images.example/x.qcow2", "sha256": "0".repeat(64),
                        "format": "qcow2", "providers": ["sim-1"]})),
        ),
        // No private image has this name: a 404 says the request passed
        // its rules.
        "deleteImage" => base(&[("project_id", "demo"), ("name", "no-such-image")], None),
        "captureVm" => base(&demo_vm, Some(json!({"image_name": "cap-b"}))),
        "opsGetJob" | "getJob" | "watchJob" => base(&[("job_id", &s.job)], None),
        "cancelJob" | "opsCancelJob" => base(&[("job_id", &s.job)], empty()),
        // Parameters that are not in the path go in the query.
        "opsGetUsage" => base(&[("from", FROM), ("to", TO)], None),
        "getProjectUsage" => base(&[("project_id", "demo"), ("from", FROM), ("to", TO)], None),
        "opsCreateNetwork" => {
            prefixed(&[], "network", json!({"name": "n-b", "zone": "zone-1", "backings": {}}))
        }
        "opsRegisterProvider" => base(
            &[],
            Some(json!({"name": "p-b", "zone": "zone-1", "endpoint": format!("http://{}", s.sim2)})),
        ),
        // No provider has this id: a 404 says the id passed its rules.
        "opsRemoveProvider" => base(&[("provider_id", NOBODY)], None),
        "opsGetProvider" | "opsListHosts" => base(&[("provider_id", &s.provider)], None),
        "opsDrainHost" | "opsUndrainHost" => {
            base(&[("provider_id", &s.provider), ("host", &s.host)], empty())
        }
        "opsGetProjectQuota" => base(&[("tenant_id", "acme"), ("project_id", "demo")], None),
        "opsUpdateProjectQuota" => base(
            &[("tenant_id", "acme"), ("project_id", "demo")],
            Some(json!({
                "max_instances": 1000, "max_vcpus": 4000, "max_memory_mib": "100000000",
                "update_mask": "maxInstances,maxVcpus,maxMemoryMib"
            })),
        ),
        "opsSetProjectQuota" => {
            base(&[("tenant_id", "acme"), ("project_id", "demo")], Some(json!({"max_instances": 1000})))
        }
        "opsGetVm" => base(&[("vm_id", vm)], None),
        "opsMigrateVm" => base(&[("vm_id", vm)], empty()),
        "opsListVms" | "opsListVmLeftovers" => base(&[], None),
        "opsStartVm" | "opsStopVm" | "opsRebootVm" => base(&[("vm_id", vm)], empty()),
        // No VM has this id: a 404 says the request passed its rules.
        "opsDeleteVm" => base(&[("vm_id", NOBODY)], None),
        "opsResetVmState" => base(&[("vm_id", NOBODY)], Some(json!({"status": "ERROR", "reason": "r"}))),
        "opsForceDeleteVm" => base(&[("vm_id", NOBODY)], Some(json!({"reason": "r"}))),
        "opsCreateZone" => prefixed(&[], "zone", json!({"name": "z-b"})),
        "opsDeleteZone" => base(&[("name", "z-del")], None),
        "opsDeleteNetwork" => base(&[("zone", "zone-1"), ("name", "n-del")], None),
        "opsReplaceNetwork" => base(&[("zone", "zone-1"), ("name", "n-r")], Some(json!({"backings": {}}))),
        "opsGetZonePlacement" => base(&[("zone", "zone-1")], None),
        "opsSetZonePlacement" => base(&[("zone", "zone-1")], Some(json!({"policy": "spread"}))),
        "listJobs" | "listPlacementGroups" | "getProjectQuota" | "listVms" => {
            base(&[("project_id", "demo")], None)
        }
        "createPlacementGroup" => prefixed(
            &[("project_id", "demo")],
            "placement_group",
            json!({"name": "g-b", "policy": "AFFINITY"}),
        ),
        "getPlacementGroup" => base(&[("project_id", "demo"), ("placement_group_id", &s.group)], None),
        "deletePlacementGroup" => {
            base(&[("project_id", "demo"), ("placement_group_id", &s.doomed_group)], None)
        }
        "createVm" => base(
            &[("project_id", "demo")],
            Some(json!({"name": "vm-b", "flavor": "small", "image": "debian-12"})),
        ),
        "listKeyPairs" => base(&[("project_id", "demo")], None),
        "createKeyPair" => base(&[("project_id", "demo")], Some(json!({"name": "kp-b", "public_key": KEY}))),
        "getKeyPair" => base(&[("project_id", "demo"), ("name", "kp-1")], None),
        "deleteKeyPair" => base(&[("project_id", "demo"), ("name", "kp-del")], None),
        "listWebhooks" => base(&[("project_id", "demo")], None),
        "createWebhook" => base(
            &[("project_id", "demo")],
            Some(json!({"url": s.hook_url, "event_types": ["job.finished"], "description": "d"})),
        ),
        "getWebhook" | "listWebhookDeliveries" => {
            base(&[("project_id", "demo"), ("webhook_id", &s.webhook)], None)
        }
        "enableWebhook" => base(&[("project_id", "demo"), ("webhook_id", &s.webhook)], empty()),
        "deleteWebhook" => base(&[("project_id", "demo"), ("webhook_id", &s.doomed_webhook)], None),
        "getVm" | "deleteVm" | "listJobsByVmId" | "listSnapshots" | "getConsoleLog" => base(&demo_vm, None),
        "updateVm" => base(&demo_vm, Some(json!({"name": "web-1", "update_mask": "name,metadata,tags"}))),
        "createSnapshot" => base(&demo_vm, Some(json!({"name": "s-b"}))),
        "deleteSnapshot" => base(&[demo_vm[0], demo_vm[1], ("snapshot_id", &s.snapshot)], None),
        "revertSnapshot" => base(&[demo_vm[0], demo_vm[1], ("snapshot_id", &s.snapshot)], empty()),
        "createConsole" => base(&demo_vm, Some(json!({"type": "vnc"}))),
        "rebootVm" | "startVm" | "stopVm" => base(&demo_vm, empty()),
        "resizeVm" => base(&demo_vm, Some(json!({"flavor": "medium"}))),
        "getVmById" => base(&[("vm_id", vm)], None),
        _ => return None,
    })
}

/// Where a probed value goes.
#[derive(Clone, Debug)]
enum Loc {
    Path(String),
    Query(String),
    Header(String),
    /// Steps from the body's root; `None` as the value removes the last.
    Body(Vec<Step>),
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    /// The first item of an array.
    First,
}

/// One step into the body, with what to put there when the baseline has
/// nothing (a valid value of the step's schema).
#[derive(Clone, Debug)]
struct Step {
    seg: Seg,
    fill: Value,
}

/// One documented constraint: where, the keyword, a value just outside
/// (`None`: the property left out) and values just inside.
struct Constraint {
    loc: Loc,
    field: String,
    keyword: &'static str,
    /// Rules an outside value may be refused by: the keyword, and others
    /// the same value also breaks (a too-long name breaks its pattern too).
    rules: Vec<&'static str>,
    outside: Option<Value>,
    inside: Vec<Value>,
}

/// The OpenAPI document, to resolve `$ref`s.
struct Doc<'a>(&'a Value);

impl Doc<'_> {
    /// The schema itself: `$ref` followed, `anyOf [X, null]` taken as X.
    fn resolve<'b>(&'b self, schema: &'b Value) -> &'b Value {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap();
            return self.resolve(&self.0["components"]["schemas"][name]);
        }
        if let Some(any) = schema["anyOf"].as_array()
            && let Some(x) = any.iter().find(|x| x["type"] != "null")
        {
            return self.resolve(x);
        }
        schema
    }

    /// A valid value of `schema` (what a container is filled with).
    fn sample(&self, schema: &Value) -> Value {
        let schema = self.resolve(schema);
        if let Some(e) = schema["enum"].as_array() {
            return e.iter().find(|v| v.as_str() != Some("")).cloned().unwrap_or(json!(""));
        }
        if schema["properties"].is_object() {
            let mut obj = Map::new();
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                obj.insert(r.to_owned(), self.sample(&schema["properties"][r]));
            }
            return Value::Object(obj);
        }
        match kind(schema) {
            "integer" => json!(schema["minimum"].as_i64().unwrap_or(0)),
            "number" => json!(schema["minimum"].as_f64().unwrap_or(1.0)),
            "boolean" => json!(false),
            "array" => json!([]),
            "object" => json!({}),
            _ => json!(inside_string(schema, None).unwrap_or_else(|| "a".into())),
        }
    }

    /// The constraints of a body `schema` at `steps` (named `field`);
    /// `have` is what the baseline has there.
    fn body(
        &self,
        schema: &Value,
        steps: &[Step],
        field: &str,
        have: Option<&Value>,
        out: &mut Vec<Constraint>,
    ) {
        let schema = self.resolve(schema);
        let join = |k: &str| if field.is_empty() { k.to_owned() } else { format!("{field}.{k}") };
        let at = |seg: Seg, fill: Value| {
            let mut s = steps.to_vec();
            s.push(Step { seg, fill });
            s
        };
        if let Some(props) = schema["properties"].as_object() {
            let required: Vec<&str> =
                schema["required"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            for (name, prop) in props {
                let child = have.and_then(|h| h.get(name));
                let steps = at(Seg::Key(name.clone()), self.sample(prop));
                if required.contains(&name.as_str()) {
                    out.push(Constraint {
                        loc: Loc::Body(steps.clone()),
                        field: join(name),
                        keyword: "required",
                        rules: vec!["required"],
                        outside: None,
                        inside: child.cloned().into_iter().collect(),
                    });
                }
                self.body(prop, &steps, &join(name), child, out);
            }
        }
        if let Some(values) =
            schema["additionalProperties"].as_object().map(|_| &schema["additionalProperties"])
        {
            // A map: its keys, its size, its values (under the key "k").
            let values = self.resolve(values);
            let entry = self.sample(values);
            let names = &schema["propertyNames"];
            let key_ok = |k: &str| {
                names["pattern"].as_str().is_none_or(|p| re(p).is_match(k))
                    && names["not"]["pattern"].as_str().is_none_or(|p| !re(p).is_match(k))
            };
            let whole = Loc::Body(steps.to_vec());
            let map = |keys: &[String]| {
                Value::Object(keys.iter().map(|k| (k.clone(), entry.clone())).collect::<Map<_, _>>())
            };
            if let Some(p) = names["pattern"].as_str()
                && let Some(bad) = OUTSIDE.iter().find(|c| !re(p).is_match(c))
            {
                out.push(Constraint {
                    loc: whole.clone(),
                    field: field.to_owned(),
                    keyword: "pattern",
                    rules: vec!["pattern"],
                    outside: Some(map(&[bad.to_string()])),
                    inside: vec![map(&["k".into()])],
                });
            }
            if let Some(p) = names["not"]["pattern"].as_str()
                && let Some(bad) = OUTSIDE.iter().find(|c| re(p).is_match(c))
            {
                out.push(Constraint {
                    loc: whole.clone(),
                    field: field.to_owned(),
                    keyword: "pattern",
                    rules: vec!["pattern", "not"],
                    outside: Some(map(&[bad.to_string()])),
                    inside: vec![map(&["k".into()])],
                });
            }
            if let Some(n) = schema["maxProperties"].as_u64() {
                let keys: Vec<String> = (0..=n).map(|i| format!("k{i}")).filter(|k| key_ok(k)).collect();
                out.push(Constraint {
                    loc: whole,
                    field: field.to_owned(),
                    keyword: "maxProperties",
                    rules: vec!["maxProperties"],
                    outside: Some(map(&keys)),
                    inside: vec![map(&keys[..n as usize])],
                });
            }
            let steps = at(Seg::Key("k".into()), entry);
            self.scalar(values, Loc::Body(steps), &join("k"), None, out);
        }
        if kind(schema) == "array" {
            let items = &schema["items"];
            let item = self.sample(items);
            if let Some(n) = schema["maxItems"].as_u64() {
                let list = |n: u64| Value::Array((0..n).map(|_| item.clone()).collect());
                out.push(Constraint {
                    loc: Loc::Body(steps.to_vec()),
                    field: field.to_owned(),
                    keyword: "maxItems",
                    rules: vec!["maxItems"],
                    outside: Some(list(n + 1)),
                    inside: vec![list(n)],
                });
            }
            let first = have.and_then(|h| h.get(0));
            let steps = at(Seg::First, item);
            self.body(items, &steps, &format!("{field}[0]"), first, out);
        }
        if !schema["properties"].is_object() && kind(schema) != "array" && kind(schema) != "object" {
            self.scalar(schema, Loc::Body(steps.to_vec()), field, have, out);
        }
    }

    /// The constraints of a string, number or enum `schema` at `loc`.
    fn scalar(&self, schema: &Value, loc: Loc, field: &str, have: Option<&Value>, out: &mut Vec<Constraint>) {
        let schema = self.resolve(schema);
        let header = matches!(loc, Loc::Header(_));
        // A header value can carry only visible ASCII and spaces.
        let sendable = |v: &str| !header || v.bytes().all(|b| (0x20..0x7f).contains(&b));
        let pattern = schema["pattern"].as_str().map(re);
        let matches = |v: &str| pattern.as_ref().is_none_or(|p| p.is_match(v));
        let max_len = schema["maxLength"].as_u64().map(|n| n as usize);
        let push = |out: &mut Vec<Constraint>, keyword, rules: Vec<&'static str>, outside: Value, inside| {
            out.push(Constraint {
                loc: loc.clone(),
                field: field.to_owned(),
                keyword,
                rules,
                outside: Some(outside),
                inside,
            })
        };
        if let Some(e) = schema["enum"].as_array() {
            push(out, "enum", vec!["enum"], json!("NOPE"), e.clone());
            return;
        }
        let inside = inside_string(schema, have).filter(|v| sendable(v)).map(Value::from);
        if pattern.is_some() {
            let bad = OUTSIDE
                .iter()
                .find(|c| !matches(c) && max_len.is_none_or(|n| c.chars().count() <= n) && sendable(c));
            if let Some(bad) = bad {
                let mut rules = vec!["pattern"];
                if bad.is_empty() {
                    rules.extend(["minLength", "required"]);
                }
                push(out, "pattern", rules, json!(bad), inside.clone().into_iter().collect());
            }
        }
        if let Some(n) = max_len {
            let ok = "a".repeat(n);
            let is_uuid = schema["format"] == "uuid";
            let long = "a".repeat(n + 1);
            let mut rules = vec!["maxLength"];
            if !matches(&long) {
                rules.push("pattern");
            }
            let inside = if matches(&ok) && !is_uuid { vec![json!(ok)] } else { vec![] };
            push(out, "maxLength", rules, json!(long), inside);
        }
        if let Some(n) = schema["minLength"].as_u64().filter(|n| *n > 1) {
            let short = "a".repeat(n as usize - 1);
            let inside = "a".repeat(n as usize);
            let mut rules = vec!["minLength"];
            if !matches(&short) {
                rules.push("pattern");
            }
            let inside = if matches(&inside) { vec![json!(inside)] } else { vec![] };
            push(out, "minLength", rules, json!(short), inside);
        }
        let integer = kind(schema) == "integer";
        let step = if integer { 1.0 } else { 0.5 };
        let num = |x: f64| if integer { json!(x as i64) } else { json!(x) };
        let as_param = |v: Value| if matches!(loc, Loc::Body(_)) { v } else { json!(v.to_string()) };
        if let Some(min) = schema["minimum"].as_f64() {
            // proto3 cannot tell 0 from a field left out: a required number
            // whose minimum is 1 is refused at 0 as required.
            let rules = if min - step == 0.0 { vec!["minimum", "required"] } else { vec!["minimum"] };
            push(out, "minimum", rules, as_param(num(min - step)), vec![as_param(num(min))]);
        }
        // The maximum of a 64-bit integer (2^64 - 1) is the edge of the
        // field itself: just outside it is not a number the probe can write
        // exactly, and the gateway's own range check is tested elsewhere
        // (gateway/src/transcode.rs).
        if let Some(max) = schema["maximum"].as_f64().filter(|m| *m < 9.0e15) {
            push(out, "maximum", vec!["maximum"], as_param(num(max + step)), vec![as_param(num(max))]);
        }
    }
}

fn kind(schema: &Value) -> &str {
    match &schema["type"] {
        Value::String(s) => s,
        Value::Array(a) => a.iter().filter_map(|t| t.as_str()).find(|t| *t != "null").unwrap_or(""),
        _ => "",
    }
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("the document's pattern {pattern:?}: {e}"))
}

/// A value `schema` accepts: the baseline's when it has one, else the first
/// candidate its pattern and lengths allow.
fn inside_string(schema: &Value, have: Option<&Value>) -> Option<String> {
    let pattern = schema["pattern"].as_str().map(re);
    let ok = |v: &str| {
        pattern.as_ref().is_none_or(|p| p.is_match(v))
            && schema["maxLength"].as_u64().is_none_or(|n| v.chars().count() as u64 <= n)
            && schema["minLength"].as_u64().is_none_or(|n| v.chars().count() as u64 >= n)
    };
    if let Some(v) = have.and_then(|h| h.as_str()).filter(|v| ok(v)) {
        return Some(v.to_owned());
    }
    INSIDE.iter().find(|c| ok(c)).map(|c| (*c).to_owned())
}

/// Puts `value` at `steps` in `body` (or removes what is there).
fn apply(cur: &mut Value, steps: &[Step], value: Option<Value>) {
    let Some((step, rest)) = steps.split_first() else { return };
    match &step.seg {
        Seg::Key(k) => {
            if !cur.is_object() {
                *cur = json!({});
            }
            let obj = cur.as_object_mut().unwrap();
            if rest.is_empty() {
                match value {
                    Some(v) => obj.insert(k.clone(), v),
                    None => obj.remove(k),
                };
                return;
            }
            let child = obj.entry(k.clone()).or_insert_with(|| step.fill.clone());
            if child.is_null() {
                *child = step.fill.clone();
            }
            apply(child, rest, value);
        }
        Seg::First => {
            if cur.as_array().is_none_or(|a| a.is_empty()) {
                *cur = json!([step.fill.clone()]);
            }
            let arr = cur.as_array_mut().unwrap();
            if rest.is_empty() {
                match value {
                    Some(v) => arr[0] = v,
                    None => {
                        arr.remove(0);
                    }
                }
                return;
            }
            apply(&mut arr[0], rest, value);
        }
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One operation of the document.
struct Op {
    id: String,
    method: String,
    path: String,
    constraints: Vec<Constraint>,
    has_body: bool,
    base: Option<Base>,
}

/// The document's operations, each with its baseline (when the table has
/// one) and the constraints derived from its parameters and body.
fn operations(doc: &Value, seed: &Seed) -> Vec<Op> {
    let d = Doc(doc);
    let mut ops = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, op) in methods.as_object().unwrap() {
            let Some(id) = op["operationId"].as_str() else { continue };
            let base = baseline(id, seed);
            let mut constraints = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let p = d.resolve(p);
                let name = p["name"].as_str().unwrap().to_owned();
                let loc = match p["in"].as_str().unwrap() {
                    "path" => Loc::Path(name.clone()),
                    "query" => Loc::Query(name.clone()),
                    "header" => Loc::Header(name.clone()),
                    other => panic!("{id}: a parameter in {other}"),
                };
                let have = base
                    .as_ref()
                    .and_then(|b| b.params.iter().find(|(k, _)| *k == name))
                    .map(|(_, v)| json!(v));
                d.scalar(&p["schema"], loc, &name, have.as_ref(), &mut constraints);
            }
            let body = &op["requestBody"]["content"]["application/json"]["schema"];
            if !body.is_null() {
                let have = base.as_ref().and_then(|b| b.body.as_ref());
                d.body(body, &[], "", have, &mut constraints);
            }
            ops.push(Op {
                id: id.to_owned(),
                method: method.to_uppercase(),
                path: path.clone(),
                constraints,
                has_body: !body.is_null(),
                base,
            });
        }
    }
    ops
}

/// A value as a path, query or header string.
fn text(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())
}

struct Probe<'a> {
    op: &'a Op,
    base: &'a Base,
    c: &'a Constraint,
}

impl Probe<'_> {
    /// Sends the baseline with the constraint's location set to `value`.
    async fn send(&self, s: &TestStack, token: &str, value: Option<&Value>) -> Reply {
        let (op, c) = (self.op, self.c);
        let mut path = op.path.clone();
        let mut params = self.base.params.clone();
        if let (Loc::Path(name), Some(v)) = (&c.loc, value) {
            params.retain(|(k, _)| k != name);
            path = path.replace(&format!("{{{name}}}"), &encode(&text(v)));
        }
        // A baseline parameter the path does not name is a query parameter
        // (unless it is the one probed).
        let mut query = Vec::new();
        for (k, v) in &params {
            let var = format!("{{{k}}}");
            if path.contains(&var) {
                path = path.replace(&var, &encode(v));
            } else if !matches!(&c.loc, Loc::Query(name) if name == k) {
                query.push(format!("{k}={}", encode(v)));
            }
        }
        assert!(!path.contains('{'), "{}: no baseline value for a parameter of {path}", op.id);
        if let (Loc::Query(name), Some(v)) = (&c.loc, value) {
            query.push(format!("{name}={}", encode(&text(v))));
        }
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        let mut body = self.base.body.clone().or_else(|| op.has_body.then(|| json!({})));
        if let Loc::Body(steps) = &c.loc {
            let b = body.get_or_insert_with(|| json!({}));
            apply(b, steps, value.cloned());
        }
        let header;
        let headers: Vec<(&str, &str)> = match (&c.loc, value) {
            (Loc::Header(name), Some(v)) => {
                header = (name.clone(), text(v));
                vec![(header.0.as_str(), header.1.as_str())]
            }
            _ => vec![],
        };
        let body = body.map(|b| b.to_string());
        let send = s.rest.raw_with(&op.method, &path, Some(token), body.as_deref(), &headers);
        match tokio::time::timeout(REQUEST, send).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("{} {path}: {e:#}", op.method)),
            Err(_) => Reply {
                status: 0,
                body: json!("no answer in time"),
                headers: Default::default(),
                text: String::new(),
            },
        }
    }

    /// The field as the server names it.
    fn field(&self) -> String {
        match (&self.c.loc, self.base.prefix) {
            (Loc::Body(_), Some(p)) => format!("{p}.{}", self.c.field),
            _ => self.c.field.clone(),
        }
    }
}

/// Sends; a 409 naming a job in flight waits for the job and sends again.
async fn settle(s: &TestStack, token: &str, t: &str, p: &Probe<'_>, value: Option<&Value>) -> Reply {
    let mut r = p.send(s, token, value).await;
    for _ in 0..5 {
        let Some(job) = r.body["details"]["job_id"].as_str().filter(|_| r.status == 409) else { break };
        s.rest.finished_job(t, job, WAIT).await.expect("the job in flight finishes");
        r = p.send(s, token, value).await;
    }
    r
}

fn excerpt(v: &str) -> String {
    let mut e: String = v.chars().take(40).collect();
    if v.chars().count() > 40 {
        e.push_str(&format!("…({} chars)", v.chars().count()));
    }
    e
}

/// Creates what the baselines need.
async fn seed(s: &mut TestStack, t: &str, ops: &str) -> Seed {
    let ok =
        |r: &Reply, what: &str| assert!((200..300).contains(&r.status), "{what}: {} {}", r.status, r.body);
    let vm = s
        .rest
        .post(&format!("{T}/vms"), t, &json!({"name": "web-1", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    ok(&vm, "the VM");
    s.rest.finished_job(t, &vm.str("job_id"), WAIT).await.unwrap();
    let id = vm.str("vm_id");
    let snap = s.rest.post(&format!("{T}/vms/{id}/snapshots"), t, &json!({"name": "s1"})).await.unwrap();
    ok(&snap, "the snapshot");
    s.rest.finished_job(t, &snap.str("job_id"), WAIT).await.unwrap();
    let mut groups = Vec::new();
    for name in ["g-1", "g-del"] {
        let body = json!({"name": name, "policy": "ANTI_AFFINITY"});
        let r = s.rest.post(&format!("{T}/placement-groups"), t, &body).await.unwrap();
        ok(&r, name);
        groups.push(r.str("placement_group_id"));
    }
    for name in ["kp-1", "kp-del"] {
        let r = s
            .rest
            .post(&format!("{T}/key-pairs"), t, &json!({"name": name, "public_key": KEY}))
            .await
            .unwrap();
        ok(&r, name);
    }
    let hold = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("https://127.0.0.1:{}/hook", hold.local_addr().unwrap().port());
    let mut hooks = Vec::new();
    for _ in 0..2 {
        let body = json!({"url": hook_url, "event_types": ["job.finished"]});
        let r = s.rest.post(&format!("{T}/webhooks"), t, &body).await.unwrap();
        ok(&r, "a webhook");
        hooks.push(r.body["webhook"]["id"].as_str().unwrap().to_owned());
    }
    for (path, body) in [
        ("flavors", json!({"name": "f-del", "vcpus": 1, "memory_mib": 512, "disk_gib": 10})),
        ("images", json!({"name": "i-del", "source": "base"})),
        ("zones", json!({"name": "z-del"})),
        ("networks", json!({"name": "n-del", "zone": "zone-1", "backings": {}})),
        ("networks", json!({"name": "n-r", "zone": "zone-1", "backings": {}})),
    ] {
        let r = s.rest.post(&format!("{O}/{path}"), ops, &body).await.unwrap();
        ok(&r, &format!("{path} {body}"));
    }
    let providers = s.rest.get(&format!("{O}/providers"), ops).await.unwrap();
    let provider = providers.body["providers"][0]["provider_id"].as_str().unwrap().to_owned();
    let hosts = s.rest.get(&format!("{O}/providers/{provider}/hosts"), ops).await.unwrap();
    let host = hosts.body["hosts"][0]["name"].as_str().expect("the sim has hosts").to_owned();
    let sim2 = s.start_sim("sim-2", "cloud_init").await.unwrap().to_string();
    for body in
        [json!({"name": "standard", "max_size_gib": 100}), json!({"name": "vt-del", "max_size_gib": 1})]
    {
        let r = s.rest.post(&format!("{O}/volume-types"), ops, &body).await.unwrap();
        ok(&r, &format!("volume type {body}"));
    }
    let mut volumes = Vec::new();
    for name in ["vol-1", "vol-att", "vol-del"] {
        let body = json!({"name": name, "size_gib": 1, "volume_type": "standard"});
        let r = s.rest.post(&format!("{T}/volumes"), t, &body).await.unwrap();
        ok(&r, name);
        s.rest.finished_job(t, &r.str("job_id"), WAIT).await.unwrap();
        volumes.push(r.str("volume_id"));
    }
    let r = s.rest.post(&format!("{T}/vms/{id}:attach"), t, &json!({"volume_id": volumes[1]})).await.unwrap();
    ok(&r, "the attachment");
    s.rest.finished_job(t, &r.str("job_id"), WAIT).await.unwrap();
    Seed {
        volume: volumes[0].clone(),
        attached_volume: volumes[1].clone(),
        doomed_volume: volumes[2].clone(),
        webhook: hooks[0].clone(),
        doomed_webhook: hooks[1].clone(),
        hook_url,
        _hold: hold,
        vm: id,
        snapshot: snap.str("snapshot_id"),
        group: groups[0].clone(),
        doomed_group: groups[1].clone(),
        job: vm.str("job_id"),
        provider,
        host,
        sim2,
    }
}

#[tokio::test]
async fn every_documented_constraint_holds_at_its_edges() {
    let mut s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            sim_capabilities: ALL.into(),
            core_toml: "[egress]\nallow_networks = [\"127.0.0.0/8\"]\n".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ops_token = s.ops_token();
    let t = s.tenant_token("acme", &["demo"]);
    let seed = seed(&mut s, &t, &ops_token).await;
    let doc = s.rest.raw("GET", "/api/hcp/openapi.json", None, None).await.unwrap();
    assert_eq!(doc.status, 200, "the document: {}", doc.body);
    let mut operations = operations(&doc.body, &seed);
    let rank = |o: &Op| LAST.iter().position(|l| *l == o.id).map_or(0, |i| i + 1);
    operations.sort_by_key(rank);
    eprintln!("operations: {}", operations.iter().map(|o| o.id.as_str()).collect::<Vec<_>>().join(" "));

    // HCP_RULES_VERBOSE=1 prints every probe and its answer.
    let verbose = std::env::var_os("HCP_RULES_VERBOSE").is_some();
    let log = |p: &Probe<'_>, what: &str, value: Option<&Value>, r: &Reply| {
        if verbose {
            let value = value.map_or("(left out)".to_owned(), |v| excerpt(&text(v)));
            eprintln!("{} {} {} {what} {value:?}: {} {}", p.op.id, p.field(), p.c.keyword, r.status, r.body);
        }
    };
    let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    let mut uncovered = Vec::new();
    for op in &operations {
        if op.constraints.is_empty() {
            continue;
        }
        let Some(base) = &op.base else {
            uncovered.push(op.id.clone());
            continue;
        };
        let token = if op.path.starts_with(O) { &ops_token } else { &t };
        let probes: Vec<Probe<'_>> = op.constraints.iter().map(|c| Probe { op, base, c }).collect();
        let mut report = |p: &Probe<'_>, what: &str, value: Option<&Value>, r: &Reply| {
            let value = value.map_or("(left out)".to_owned(), |v| excerpt(&text(v)));
            // The same answer from many operations is one line naming them all.
            let mut body = r.body.clone();
            if let Some(b) = body.as_object_mut() {
                b.remove("trace_id");
            }
            let body: String = body.to_string().chars().take(300).collect();
            let line = format!("{}: {} {what} {value:?}: {} {body}", p.field(), p.c.keyword, r.status);
            problems.entry(line).or_default().push(p.op.id.clone());
        };
        // Outside values first: they change nothing, so a delete's target
        // is still there for them.
        for p in &probes {
            let r = settle(&s, token, &t, p, p.c.outside.as_ref()).await;
            log(p, "outside", p.c.outside.as_ref(), &r);
            let rule = r.body["details"]["rule"].as_str();
            let refused = r.status == 400
                && r.body["details"]["field"].as_str() == Some(p.field().as_str())
                && rule.is_none_or(|rule| p.c.rules.contains(&rule));
            if !refused {
                report(p, "outside", p.c.outside.as_ref(), &r);
            }
        }
        for p in &probes {
            for v in &p.c.inside {
                let r = settle(&s, token, &t, p, Some(v)).await;
                log(p, "inside", Some(v), &r);
                let by_rule = r.status == 400
                    && r.body["details"]["field"].as_str() == Some(p.field().as_str())
                    && !r.body["details"]["rule"].is_null();
                // A value the rules let through may still be refused for
                // what it means (unknown flavor, 404, 409, no provider), but
                // it never breaks the server.
                let broke = r.status == 0 || r.body["code"] == "INTERNAL";
                if by_rule || broke {
                    report(p, "inside", Some(v), &r);
                }
            }
        }
        counts.insert(op.id.clone(), op.constraints.len());
    }
    let total: usize = counts.values().sum();
    for (op, n) in &counts {
        eprintln!("{op}: {n} constraints");
    }
    eprintln!("{total} constraints checked in {} operations", counts.len());
    assert!(uncovered.is_empty(), "operations with constraints and no baseline: {uncovered:?}");
    assert!(total > 150, "only {total} constraints found in the document");
    let n: usize = problems.values().map(Vec::len).sum();
    let list: Vec<String> =
        problems.iter().map(|(line, ops)| format!("{line}\n    in {}", ops.join(" "))).collect();
    assert!(problems.is_empty(), "{n} disagreements:\n{}", list.join("\n"));
}
