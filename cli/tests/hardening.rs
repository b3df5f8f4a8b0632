//! Bad input from the outside, through the REST gateway: every malformed
//! request gets a bounded 4xx naming what is wrong, and none of them
//! disturbs another tenant's requests, which share the gateway's one
//! HTTP/2 connection to core.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

/// The most an error body may weigh: the message and details are bounded
/// (512 and 8 × 256 bytes), plus the JSON around them.
const MAX_ERROR_BODY: usize = 4096;

async fn stack() -> TestStack {
    TestStack::start(Path::new(HCP), StackOptions::default()).await.expect("stack starts")
}

/// One malformed request and what it must get.
struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    token: Option<String>,
    body: Option<String>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    field: Option<&'static str>,
}

fn case(what: &'static str, method: &'static str, path: String, body: Option<Value>, status: u16) -> Case {
    Case {
        what,
        method,
        path,
        token: None,
        body: body.map(|b| b.to_string()),
        headers: Vec::new(),
        status,
        field: None,
    }
}

impl Case {
    fn field(mut self, f: &'static str) -> Self {
        self.field = Some(f);
        self
    }
    fn token(mut self, t: &str) -> Self {
        self.token = Some(t.to_owned());
        self
    }
}

/// Checks a reply to a malformed request: the expected status, an error
/// body of bounded size naming the field, and no echo of the long input.
fn check_reply(c: &Case, r: &Reply, raw_len: usize) {
    assert_eq!(r.status, c.status, "{}: {}", c.what, r.body);
    assert!(r.body["code"].is_string(), "{}: no error body: {}", c.what, r.body);
    assert!(raw_len <= MAX_ERROR_BODY, "{}: error body of {raw_len} bytes", c.what);
    assert!(r.str("message").len() <= 512, "{}", c.what);
    if let Some(f) = c.field {
        assert_eq!(r.body["details"]["field"], f, "{}: {}", c.what, r.body);
    }
}

fn long(n: usize) -> String {
    "a".repeat(n)
}

fn cases(tenant: &str, ops: &str) -> Vec<Case> {
    let vms = "/api/hcp/tenant/v1/projects/demo/vms".to_owned();
    let vm = format!("{vms}/{}", uuid::Uuid::now_v7());
    let create = |patch: Value| {
        let mut body = json!({"name": "web-1", "flavor": "small", "image": "debian-12"});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        Some(body)
    };
    let five_k = long(5000);
    let networks: Vec<Value> = (0..1000).map(|_| json!({"network": "default"})).collect();
    let mut meta_nul = serde_json::Map::new();
    meta_nul.insert("k\u{0}ey".into(), json!("v"));
    vec![
        case("long name", "POST", vms.clone(), create(json!({"name": five_k})), 400).field("name").token(tenant),
        case("long flavor", "POST", vms.clone(), create(json!({"flavor": five_k})), 400).field("flavor").token(tenant),
        case("long image", "POST", vms.clone(), create(json!({"image": long(70_000)})), 400).field("image").token(tenant),
        case("long tag", "POST", vms.clone(), create(json!({"tags": [five_k]})), 400).field("tags[0]").token(tenant),
        case("long metadata key", "POST", vms.clone(), create(json!({"metadata": {five_k.clone(): "v"}})), 400)
            .field("metadata")
            .token(tenant),
        case("long metadata value", "POST", vms.clone(), create(json!({"metadata": {"k": long(70_000)}})), 400)
            .field("metadata.k")
            .token(tenant),
        case("NUL in a metadata key", "POST", vms.clone(), create(json!({"metadata": meta_nul})), 400)
            .field("metadata")
            .token(tenant),
        case("NUL in a metadata value", "POST", vms.clone(), create(json!({"metadata": {"k": "a\u{0}b"}})), 400)
            .field("metadata.k")
            .token(tenant),
        case("long hostname", "POST", vms.clone(), create(json!({"hostname": five_k})), 400)
            .field("hostname")
            .token(tenant),
        case("long network", "POST", vms.clone(), create(json!({"networks": [{"network": five_k}]})), 400)
            .field("networks[0].network")
            .token(tenant),
        case("1000 networks", "POST", vms.clone(), create(json!({"networks": networks})), 400)
            .field("networks")
            .token(tenant),
        case("long zone", "POST", vms.clone(), create(json!({"zone": five_k})), 400).field("zone").token(tenant),
        case("unknown long field", "POST", vms.clone(), create(json!({long(10_000): 1})), 400).token(tenant),
        // A VM that does not exist is named before the body's fields (issue
        // 27's order; contract_replay.rs checks the 400 on a VM that exists).
        case("long snapshot name", "POST", format!("{vm}/snapshots"), Some(json!({"name": five_k})), 404)
            .token(tenant),
        case("long vm id", "GET", format!("{vms}/{}", long(1500)), None, 400).field("vm_id").token(tenant),
        case("long catalog name", "GET", format!("/api/hcp/common/v1/flavors/{}", long(1500)), None, 400)
            .field("name")
            .token(tenant),
        case("long ?tag=", "GET", format!("{vms}?tag={}", long(10_000)), None, 414).field("query").token(tenant),
        case("long tag within the query limit", "GET", format!("{vms}?tag={}", long(3000)), None, 400)
            .field("tag[0]")
            .token(tenant),
        case("long unknown query parameter", "GET", format!("{vms}?{}=1", long(3000)), None, 400).token(tenant),
        case("long path", "GET", format!("{vms}/{}", long(20_000)), None, 414).field("path").token(tenant),
        case("tampered page token", "GET", format!("{vms}?page_token={}", long(43)), None, 400)
            .field("page_token")
            .token(tenant),
        case("body over 1 MiB", "POST", vms.clone(), Some(json!({"name": long(2 << 20)})), 413)
            .field("body")
            .token(tenant),
        case("quota for tenant ..", "PUT", "/api/hcp/ops/v1/tenants/../projects/p1/quota".into(), Some(json!({})), 400)
            .token(ops),
        case("quota for tenant .x", "PUT", "/api/hcp/ops/v1/tenants/.x/projects/p1/quota".into(), Some(json!({})), 400)
            .field("tenant_id")
            .token(ops),
        case(
            "100 KB flavor description",
            "POST",
            "/api/hcp/ops/v1/flavors".into(),
            Some(json!({"name": "f1", "vcpus": 1, "memory_mib": 512, "disk_gib": 1, "description": long(100_000)})),
            400,
        )
        .field("flavor.description")
        .token(ops),
        Case {
            headers: vec![("authorization", format!("Bearer {}", long(64 * 1024)))],
            ..case("64 KB garbage authorization", "GET", "/api/hcp/common/v1/flavors".into(), None, 401)
        },
        Case {
            headers: vec![("idempotency-key", long(5000))],
            ..case("long idempotency key", "POST", vms.clone(), create(json!({})), 400)
                .field("Idempotency-Key")
                .token(tenant)
        },
    ]
}

/// Sends a raw HTTP/1.1 request line of `path` and returns the status and
/// the body: for requests no HTTP client library will build.
async fn raw_get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: hcp\r\n\r\n");
    // The server may answer and close before it has read everything.
    let _ = tcp.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.as_bytes().to_vec()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn malformed_requests_get_bounded_errors_and_spare_other_tenants() {
    let s = stack().await;
    let tenant = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    let victim = s.tenant_token("victim", &["v1"]);

    // Another tenant reads a flavor every 20 ms while the flood runs.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (rest, stop, reads) = (s.rest.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = rest.get("/api/hcp/common/v1/flavors/small", &victim).await;
                statuses.push(r.map(|r| r.status).unwrap_or(0));
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };

    // At least three rounds of every case, four at a time, and as many more
    // as it takes for the other tenant to read ten times during the flood
    // (a fast machine floods in less time than ten reads take).
    let cases = Arc::new(cases(&tenant, &ops));
    let mut round = 0;
    while round < 3 || (reads.load(Ordering::Relaxed) < 10 && round < 100) {
        round += 1;
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..4 {
            let (rest, cases) = (s.rest.clone(), cases.clone());
            tasks.spawn(async move {
                for c in cases.iter().skip(lane).step_by(4) {
                    let headers: Vec<(&str, &str)> =
                        c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    let r = rest
                        .raw_with(c.method, &c.path, c.token.as_deref(), c.body.as_deref(), &headers)
                        .await
                        .unwrap_or_else(|e| panic!("{}: {e}", c.what));
                    let raw_len = r.body.to_string().len();
                    check_reply(c, &r, raw_len);
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a case failed");
        }
        // A request line longer than the HTTP server reads (64 KiB): hyper
        // refuses it itself, and the answer still carries the error body.
        let (status, body) = raw_get(&s.gateway.to_string(), &format!("/{}", long(100_000))).await;
        assert_eq!(status, 414);
        let body: Value = serde_json::from_slice(&body).expect("a JSON error body");
        assert_eq!(body["code"], "URI_TOO_LONG");
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = reader.await.unwrap();
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(statuses.len() >= 10, "the reader ran {} times in {round} rounds", statuses.len());
    assert!(failed.is_empty(), "the other tenant saw {failed:?} of {} reads", statuses.len());
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_query_and_tenant() {
    let s = stack().await;
    let acme = s.tenant_token("acme", &["demo"]);
    let other = s.tenant_token("other", &["demo"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms";
    for i in 0..3 {
        let body =
            json!({"name": format!("web-{i}"), "flavor": "small", "image": "debian-12", "tags": ["t"]});
        let r = s.rest.post(vms, &acme, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let first = s.rest.get(&format!("{vms}?page_size=2&tag=t"), &acme).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    let token = first.str("next_page_token");
    assert!(!token.is_empty());
    let next = s.rest.get(&format!("{vms}?page_size=2&tag=t&page_token={token}"), &acme).await.unwrap();
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(next.body["vms"].as_array().unwrap().len(), 1);
    // The same token with another filter, or for another tenant, is refused.
    for (path, token_of) in [
        (format!("{vms}?page_size=2&page_token={token}"), &acme),
        (format!("{vms}?page_size=2&tag=t&page_token={token}"), &other),
    ] {
        let r = s.rest.get(&path, token_of).await.unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.body["details"]["field"], "page_token");
    }
}

#[tokio::test]
async fn tokens_naming_no_usable_tenant_are_refused() {
    let s = stack().await;
    for tenant in ["", "..", "a/b"] {
        let t = s.token(Some(tenant), &["demo"], &["tenant.member"], 300);
        let r = s.rest.get("/api/hcp/tenant/v1/projects/demo/vms", &t).await.unwrap();
        assert_eq!(r.status, 401, "tenant {tenant:?}: {}", r.body);
    }
}

#[tokio::test]
async fn the_audit_trail_is_chained_and_a_tampered_event_is_named() {
    let s = stack().await;
    let tenant = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    let body = json!({"name": "web-1", "flavor": "small", "image": "debian-12"});
    let r = s.rest.post("/api/hcp/tenant/v1/projects/demo/vms", &tenant, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);

    // The sealer runs every second; wait until everything is sealed.
    let verify = "/api/hcp/ops/v1/audit-events:verify";
    let sealed = hcp_testkit::wait_until(Duration::from_secs(30), "the audit trail to be sealed", || async {
        let r = s.rest.get(verify, &ops).await?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        let done = r.body["unsealed"] == "0" || r.body["unsealed"] == 0;
        Ok((done && r.body["intact"] == true).then_some(r.body))
    })
    .await
    .unwrap();
    assert!(sealed["head_hash"].as_str().unwrap().len() == 64, "{sealed}");

    // A tenant may not ask.
    assert_eq!(s.rest.get(verify, &tenant).await.unwrap().status, 403);

    // `hcp audit verify` agrees, and exits 0.
    let cli = |token: &str| {
        std::process::Command::new(HCP)
            .args(["audit", "verify", "--core", &format!("http://{}", s.core), "--token", token])
            .output()
            .unwrap()
    };
    let out = cli(&ops);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("intact"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Someone with access to the database edits an event.
    let pool = sqlx::SqlitePool::connect(&s.db.url).await.unwrap();
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM audit_events WHERE seq = 1").fetch_one(&pool).await.unwrap();
    sqlx::query("UPDATE audit_events SET actor = 'nobody' WHERE seq = 1").execute(&pool).await.unwrap();
    pool.close().await;

    let r = s.rest.get(verify, &ops).await.unwrap();
    assert_eq!(r.body["intact"], false, "{}", r.body);
    assert_eq!(r.body["problems"][0]["seq"], "1", "{}", r.body);
    let out = cli(&ops);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("BROKEN at 1") && text.contains("changed"), "{text}");
    assert!(text.contains(&id.to_string()), "the event is named: {text}");
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The sealer exports the chain's head to the anchor file; `verify
/// --against` that head (CLI and REST) holds on the untouched chain, and
/// fails naming why once the chain is rewritten under another key or cut
/// off after the head. A malformed anchor is refused naming `against`.
#[tokio::test]
async fn an_exported_head_anchors_audit_verify_against() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let anchors = dir.path().join("anchors");
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            core_toml: format!(
                "[audit]\nanchor_file = \"{}\"\nanchor_interval_seconds = 1\n",
                anchors.display()
            ),
            ..Default::default()
        },
    )
    .await
    .expect("stack starts");
    let tenant = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    let body = json!({"name": "web-1", "flavor": "small", "image": "debian-12"});
    let r = s.rest.post("/api/hcp/tenant/v1/projects/demo/vms", &tenant, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.body["vm_id"].as_str().unwrap().to_owned();

    // Once the VM is running and every event is sealed, the anchor file's
    // last line names the head.
    let verify = "/api/hcp/ops/v1/audit-events:verify";
    let (seq, hash) = hcp_testkit::wait_until(Duration::from_secs(60), "the head exported", || async {
        let v = s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/vms/{vm}"), &tenant).await?;
        let r = s.rest.get(verify, &ops).await?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        let settled = v.body["status"] == "ACTIVE" && r.body["unsealed"] == "0" && r.body["intact"] == true;
        let text = std::fs::read_to_string(&anchors).unwrap_or_default();
        let Some(line) = text.lines().last() else { return Ok(None) };
        let field = |name: &str| {
            line.split(' ').find_map(|f| f.strip_prefix(&format!("{name}="))).unwrap_or_default().to_owned()
        };
        assert!(line.starts_with("audit_head seq="), "{line}");
        assert_eq!(field("key_id"), r.body["head_key_id"].as_str().unwrap(), "{line}");
        let exported = field("seq") == r.body["head_seq"].as_str().unwrap_or_default();
        Ok((settled && exported).then(|| (field("seq"), field("hash"))))
    })
    .await
    .unwrap();
    let against = format!("{seq}:{hash}");
    // The same head is in core's log, as the structured `audit_head` line
    // (without the terminal colours the log is written with).
    hcp_testkit::wait_until(Duration::from_secs(30), "the audit_head log line", || async {
        let log = strip_colours(&s.log("core-api-0"));
        Ok(log
            .lines()
            .any(|l| {
                l.contains("audit_head")
                    && l.contains(&format!("seq={seq}"))
                    && l.contains(&format!("hash={hash}"))
            })
            .then_some(()))
    })
    .await
    .unwrap();

    // Untouched: the anchor holds, through REST and the CLI.
    let r = s.rest.get(&format!("{verify}?against={against}"), &ops).await.unwrap();
    assert_eq!((r.status, &r.body["intact"]), (200, &json!(true)), "{}", r.body);
    let cli = |against: &str| {
        std::process::Command::new(HCP)
            .args(["audit", "verify", "--core", &format!("http://{}", s.core), "--token", &ops])
            .args(["--against", against])
            .output()
            .unwrap()
    };
    let out = cli(&against);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("holds"), "{text}{}", String::from_utf8_lossy(&out.stderr));

    // A malformed anchor is refused, naming the field.
    let r = s.rest.get(&format!("{verify}?against=12:nothex"), &ops).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        (&r.body["code"], &r.body["details"]["field"]),
        (&json!("INVALID_ARGUMENT"), &json!("against"))
    );
    let out = cli("12");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("SEQ:HASH"), "{err}");

    // Rewritten under another key: the links and the anchor are named.
    let store = hcp_core::store::Store::connect(&s.db.url, 2).await.unwrap();
    let forger = hcp_core::audit_chain::AuditKey::derive(&[0xee; 32]);
    let pool = sqlx::SqlitePool::connect(&s.db.url).await.unwrap();
    let mut prev = String::new();
    for c in store.chained_audit_events(0, 10_000).await.unwrap() {
        let h = forger.link(&prev, c.seq, &c.event);
        sqlx::query("UPDATE audit_events SET prev_hash = $1, hash = $2, key_id = $3 WHERE seq = $4")
            .bind(&prev)
            .bind(&h)
            .bind(forger.id())
            .bind(c.seq)
            .execute(&pool)
            .await
            .unwrap();
        prev = h;
    }
    let r = s.rest.get(&format!("{verify}?against={against}"), &ops).await.unwrap();
    assert_eq!(r.body["intact"], false, "{}", r.body);
    let first = r.body["problems"][0]["problem"].as_str().unwrap();
    assert!(r.body["problems"][0]["seq"] == seq.as_str() && first.contains("rewritten"), "{}", r.body);
    let out = cli(&against);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("BROKEN at {seq}")) && text.contains("rewritten"), "{text}");

    // Cut off from the head on: the anchor's event is missing.
    sqlx::query("DELETE FROM audit_events WHERE seq >= $1")
        .bind(seq.parse::<i64>().unwrap())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    store.close().await;
    let out = cli(&against);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("BROKEN at {seq}")) && text.contains("truncated"), "{text}");
}

#[tokio::test]
async fn a_flooding_tenant_is_rate_limited_alone() {
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            core_toml: "[limits]\nrate_per_second = 2.0\nburst = 5.0\n".into(),
            ..Default::default()
        },
    )
    .await
    .expect("stack starts");
    let flooder = s.tenant_token("flooder", &["demo"]);
    let other = s.tenant_token("other", &["demo"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms";
    let mut limited = 0;
    for _ in 0..20 {
        let r = s.rest.get(vms, &flooder).await.unwrap();
        match r.status {
            200 => {}
            429 => {
                limited += 1;
                assert_eq!(r.body["code"], "RATE_LIMITED", "{}", r.body);
                let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=5).contains(&after), "Retry-After: {after}");
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(limited >= 10, "only {limited} of 20 were limited");
    // Another tenant's bucket is its own.
    for _ in 0..5 {
        assert_eq!(s.rest.get(vms, &other).await.unwrap().status, 200);
    }
}

/// The "done when": one tenant flooding two API processes on one
/// PostgreSQL gets one rate limit between them, not one each.
#[tokio::test]
async fn a_tenant_flooding_two_api_processes_gets_one_rate_limit() {
    const RATE: f64 = 5.0;
    const BURST: f64 = 5.0;
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            backend: hcp_testkit::db::Backend::Postgres,
            api_processes: 2,
            core_toml: format!("[limits]\nrate_per_second = {RATE:?}\nburst = {BURST:?}\n"),
            ..Default::default()
        },
    )
    .await
    .expect("stack starts");
    // The most tokens one claim takes (`admission::batch_size`): 1 here.
    let k = hcp_core::admission::batch_size(hcp_core::store::RateLimit::new(RATE, BURST).unwrap());
    let flooder = s.tenant_token("flooder", &["demo"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms";

    // 80 calls, 40 through each API process's gateway, four at a time on each.
    const PER_PROCESS: usize = 40;
    let started = std::time::Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for rest in &s.rests {
        for _ in 0..4 {
            let (rest, token) = (rest.clone(), flooder.clone());
            flood.spawn(async move {
                let mut replies = Vec::new();
                for _ in 0..PER_PROCESS / 4 {
                    replies.push(rest.get(vms, &token).await.expect("an answer"));
                }
                replies
            });
        }
    }
    let mut accepted = 0usize;
    let mut limited = 0usize;
    while let Some(replies) = flood.join_next().await {
        for r in replies.unwrap() {
            match r.status {
                200 => accepted += 1,
                429 => {
                    limited += 1;
                    assert_eq!(r.body["code"], "RATE_LIMITED", "{}", r.body);
                    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                    assert!(after >= 1, "Retry-After: {after}");
                }
                other => panic!("unexpected {other}: {}", r.body),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("{accepted} accepted, {limited} limited in {elapsed:.3} s");
    assert_eq!(accepted + limited, 2 * PER_PROCESS);

    // What one process alone admits in that time; each process was sent
    // more than that, so two buckets (one per process) would have admitted
    // about twice it.
    let one_process = RATE * elapsed + BURST;
    assert!(
        PER_PROCESS as f64 > one_process + f64::from(k),
        "the flood took {elapsed} s: too slow to tell one bucket from two"
    );
    // The documented bound: rate x interval + burst + N x k.
    let bound = (one_process + 2.0 * f64::from(k)).floor() as usize;
    assert!(accepted <= bound, "{accepted} accepted in {elapsed} s; at most {bound}");
    assert!(accepted >= BURST as usize, "the tenant got less than its burst: {accepted}");
    // Both processes claimed from the database all along.
    for core in ["core-api-0", "core-api-1"] {
        assert!(!s.log(core).contains("shared rate buckets cannot be reached"), "{core} fell back");
    }

    // Another tenant's bucket is its own, through either process.
    let other = s.tenant_token("other", &["demo"]);
    for i in 0..BURST as usize {
        let r = s.rests[i % 2].get(vms, &other).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[tokio::test]
async fn core_sheds_load_past_its_concurrency_limit() {
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            core_toml: "[limits]\nmax_concurrent_requests = 1\n".into(),
            sim_args: vec!["--latency-ms".into(), "400".into()],
            ..Default::default()
        },
    )
    .await
    .expect("stack starts");
    let t = s.tenant_token("acme", &["demo"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms";
    let r = s
        .rest
        .post(vms, &t, &json!({"name": "web-1", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.str("vm_id");
    hcp_testkit::wait_until(Duration::from_secs(30), "the vm to be active", || async {
        let r = s.rest.get(&format!("{vms}/{vm}"), &t).await?;
        Ok((r.str("status") == "ACTIVE").then_some(()))
    })
    .await
    .unwrap();
    // A console asks the provider (400 ms here) while holding core's only
    // slot; requests meanwhile are refused at once, not queued.
    let console = format!("{vms}/{vm}:console");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (rest, t, console) = (s.rest.clone(), t.clone(), console.clone());
        tasks.spawn(async move { rest.post(&console, &t, &json!({"type": "vnc"})).await.unwrap() });
    }
    let mut shed = 0;
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        match r.status {
            200 => served += 1,
            503 => {
                shed += 1;
                assert_eq!(r.body["code"], "UNAVAILABLE", "{}", r.body);
                assert_eq!(r.headers["retry-after"], "1");
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(served >= 1 && shed >= 1, "served {served}, shed {shed}");
}

#[tokio::test]
async fn job_watchers_are_bounded_and_end_at_shutdown() {
    let mut s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            core_toml: "[limits]\nmax_job_watchers = 2\n".into(),
            // Jobs that stay RUNNING for the whole test.
            sim_args: vec!["--latency-ms".into(), "120000".into()],
            jobs_toml: "shutdown_grace_seconds = 1\n".into(),
            ..Default::default()
        },
    )
    .await
    .expect("stack starts");
    let t = s.tenant_token("acme", &["demo"]);
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/demo/vms",
            &t,
            &json!({"name": "w", "flavor": "small", "image": "debian-12"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let watch = format!("/api/hcp/tenant/v1/jobs/{}:watch", r.str("job_id"));

    // Watchers are opened one at a time: an admitted one stays open (its
    // stream has no end while the job runs); the first refusal comes back
    // at once. Exactly two are admitted.
    let mut open = Vec::new();
    let third = loop {
        assert!(open.len() <= 2, "more than two watchers were admitted");
        let (rest, t, watch) = (s.rest.clone(), t.clone(), watch.clone());
        let mut w = tokio::spawn(async move { rest.get(&watch, &t).await });
        match tokio::time::timeout(Duration::from_secs(3), &mut w).await {
            Ok(done) => break done.unwrap().unwrap(),
            Err(_) => open.push(w),
        }
    };
    assert_eq!(open.len(), 2);
    assert_eq!(third.status, 503, "{}", third.body);
    assert_eq!(third.body["code"], "UNAVAILABLE", "{}", third.body);
    assert_eq!(third.headers["retry-after"], "1");

    // SIGTERM: the watchers' streams end, and core exits within its grace
    // period instead of waiting an hour for them.
    s.signal("core-api-0", "TERM").unwrap();
    let status = s.wait_exit("core-api-0", Duration::from_secs(30)).await.expect("core exits");
    assert!(status.success(), "core exited with {status}");
    for w in open {
        let r = tokio::time::timeout(Duration::from_secs(10), w).await.expect("the stream ended").unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}

#[tokio::test]
async fn core_bounds_what_one_grpc_call_may_send() {
    use hcp_proto::tenant::vm_service_client::VmServiceClient;
    let s = stack().await;
    let token = s.tenant_token("acme", &["demo"]);
    let call = |user_data: String, extra_header: Option<String>| {
        let (token, channel) = (token.clone(), s.core_channel());
        async move {
            let mut client = VmServiceClient::new(channel.await.unwrap());
            let mut req = tonic::Request::new(hcp_proto::tenant::CreateVmRequest {
                project_id: "demo".into(),
                name: "big".into(),
                flavor: "small".into(),
                image: "debian-12".into(),
                user_data: Some(user_data),
                ..Default::default()
            });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            if let Some(h) = extra_header {
                req.metadata_mut().insert("x-padding", h.parse().unwrap());
            }
            client.create_vm(req).await
        }
    };
    // A 3 MiB message is refused before it is decoded.
    let err = call("a".repeat(3 << 20), None).await.unwrap_err();
    assert!(matches!(err.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{err:?}");
    // A 64 KiB header is refused.
    assert!(call("#cloud-config\n".into(), Some("a".repeat(64 * 1024))).await.is_err());
    // Core still serves: a normal create is accepted.
    let ok = call("#cloud-config\n".into(), None).await.expect("core still serves");
    assert!(!ok.into_inner().vm_id.is_empty());
}
