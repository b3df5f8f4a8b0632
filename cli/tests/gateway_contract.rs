//! The REST contract at the gateway's edge, end to end (issue 27): no rule
//! but the transport bounds is applied before the caller is authenticated
//! (an anonymous or badly signed request gets 401, the same request with a
//! valid token the 400 naming its field), another method on a known path
//! is 405 with `Allow`, `GET /api/hcp/common/v1/caller` says who the
//! caller is, field masks take snake_case paths, integers take integral
//! numbers, and an empty query value is refused naming the parameter.

use std::path::Path;

use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

/// One request the gateway cannot transcode or route.
struct Refused {
    what: &'static str,
    method: &'static str,
    path: String,
    body: Option<String>,
    headers: Vec<(&'static str, String)>,
    /// The answer with a valid token: status and `details.field`.
    status: u16,
    field: Option<&'static str>,
}

fn refused(what: &'static str, method: &'static str, path: String, body: Option<Value>) -> Refused {
    Refused {
        what,
        method,
        path,
        body: body.map(|b| b.to_string()),
        headers: Vec::new(),
        status: 400,
        field: None,
    }
}

impl Refused {
    fn field(mut self, f: &'static str) -> Self {
        self.field = Some(f);
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }
    fn raw_body(mut self, b: &str) -> Self {
        self.body = Some(b.to_owned());
        self
    }
    fn header(mut self, k: &'static str, v: String) -> Self {
        self.headers.push((k, v));
        self
    }
}

async fn send(s: &TestStack, c: &Refused, token: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    s.rest
        .raw_with(c.method, &c.path, token, c.body.as_deref(), &headers)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", c.what))
}

#[tokio::test]
async fn gateway_refusals_come_after_authentication_and_name_the_field() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.expect("stack starts");
    let tenant = s.tenant_token("acme", &["demo"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms".to_owned();
    let vm = format!("{vms}/{}", uuid::Uuid::now_v7());
    let create = json!({"name": "web-1", "flavor": "small", "image": "debian-12"});

    let cases = vec![
        refused("256-byte Idempotency-Key", "POST", vms.clone(), Some(create.clone()))
            .header("idempotency-key", "k".repeat(256))
            .field("Idempotency-Key"),
        refused("256-byte X-Request-Id", "GET", vms.clone(), None)
            .header("x-request-id", "r".repeat(256))
            .field("X-Request-Id"),
        refused("malformed JSON", "POST", vms.clone(), None).raw_body("{not json").field("body"),
        refused("null body", "POST", vms.clone(), None).raw_body("null").field("body"),
        refused("unknown field", "POST", vms.clone(), Some(json!({"name": "a", "bogus": 1}))).field("bogus"),
        refused("wrong type", "POST", vms.clone(), Some(json!({"name": 5}))).field("name"),
        refused("unknown query parameter", "GET", format!("{vms}?bogus=1"), None).field("bogus"),
        refused("empty query value", "GET", "/api/hcp/tenant/v1/projects/demo/jobs?vm_id=".into(), None)
            .field("vm_id"),
        refused("bad page size", "GET", format!("{vms}?page_size=-1"), None).field("page_size"),
        refused("body on a GET", "GET", vms.clone(), Some(json!({}))).field("body"),
        refused("empty field mask path", "PATCH", vm.clone(), Some(json!({"update_mask": "name,"})))
            .field("update_mask"),
        refused(
            "both update_mask and updateMask",
            "PATCH",
            vm.clone(),
            Some(json!({"update_mask": "name", "updateMask": "tags", "name": "a"})),
        )
        .field("update_mask"),
        refused(
            "uint32 out of range",
            "POST",
            format!("{vm}:stop"),
            Some(json!({"timeout_seconds": 5_000_000_000u64})),
        )
        .field("timeout_seconds"),
        refused(
            "uint32 with a fraction",
            "POST",
            format!("{vm}:stop"),
            Some(json!({"timeout_seconds": 30.5})),
        )
        .field("timeout_seconds"),
        refused("TRACE", "TRACE", vms.clone(), None).status(405),
        refused("no such path", "GET", "/api/hcp/tenant/v1/nothing".into(), None).status(404),
    ];
    for c in &cases {
        for (who, token) in [("anonymous", None), ("bad token", Some("not-a-token"))] {
            let r = send(&s, c, token).await;
            assert_eq!(r.status, 401, "{} ({who}): {}", c.what, r.body);
            assert_eq!(r.body["code"], "UNAUTHENTICATED", "{} ({who})", c.what);
        }
        let r = send(&s, c, Some(&tenant)).await;
        assert_eq!(r.status, c.status, "{}: {}", c.what, r.body);
        if let Some(f) = c.field {
            assert_eq!(r.body["details"]["field"], f, "{}: {}", c.what, r.body);
        }
    }

    // 405 lists the methods the path has.
    let r = s.rest.raw("TRACE", &vms, Some(&tenant), None).await.unwrap();
    assert_eq!(r.body["code"], "METHOD_NOT_ALLOWED", "{}", r.body);
    assert_eq!(r.headers.get("allow").and_then(|v| v.to_str().ok()), Some("GET, POST"));
    assert_eq!(r.body["details"]["allow"], "GET, POST");
    // The open paths need no token, so their 405 comes at once.
    for path in ["/healthz", "/api/hcp/openapi.json"] {
        let r = s.rest.raw("POST", path, None, Some("{}")).await.unwrap();
        assert_eq!(r.status, 405, "{path}: {}", r.body);
        assert_eq!(r.body["code"], "METHOD_NOT_ALLOWED", "{path}");
        assert_eq!(r.headers.get("allow").and_then(|v| v.to_str().ok()), Some("GET, HEAD"), "{path}");
    }

    // A transport bound is answered before authentication.
    let big = json!({"name": "a".repeat(2 << 20)}).to_string();
    let r = s.rest.raw("POST", &vms, None, Some(&big)).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body["details"]["field"], "body");

    // Who the caller is.
    let r = s.rest.get("/api/hcp/common/v1/caller", &tenant).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["tenant_id"], "acme", "{}", r.body);
    assert_eq!(r.body["projects"], json!(["demo"]), "{}", r.body);
    assert_eq!(r.body["roles"], json!(["tenant.member"]), "{}", r.body);
    assert_eq!(r.body["subject"], "test-user", "{}", r.body);
    let ops = s.rest.get("/api/hcp/common/v1/caller", &s.ops_token()).await.unwrap();
    assert_eq!(ops.body["tenant_id"], "", "{}", ops.body);
    assert_eq!(ops.body["roles"], json!(["ops.admin"]), "{}", ops.body);
    let r = s.rest.raw("GET", "/api/hcp/common/v1/caller", None, None).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.body);

    // What transcodes reaches core: an integral float for a uint32 (the VM
    // does not exist), and snake_case mask paths, which core judges.
    let r = s.rest.post(&format!("{vm}:stop"), &tenant, &json!({"timeout_seconds": 30.0})).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let r = s.rest.post(&vms, &tenant, &create).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let real = format!("{vms}/{}", r.str("vm_id"));
    let r = s
        .rest
        .raw("PATCH", &real, Some(&tenant), Some(&json!({"update_mask": "vm_id"}).to_string()))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["details"]["field"], "update_mask", "{}", r.body);
    assert!(r.str("message").contains("vm_id"), "{}", r.body);
}
