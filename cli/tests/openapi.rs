//! The served OpenAPI document is the committed one, and the running API
//! keeps its promises: schemathesis (PyPI; `scripts/services.sh`
//! `ensure_schemathesis`) generates requests from the document for the
//! tenant, common and ops namespaces with valid tokens and checks every
//! answer: no server error, statuses, content types and bodies as
//! documented.

use std::path::{Path, PathBuf};

use hcp_testkit::stack::{StackOptions, TestStack};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

fn schemathesis() -> Option<PathBuf> {
    std::env::var_os("HCP_SCHEMATHESIS").map(PathBuf::from).filter(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_conforms_to_its_openapi_document() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.expect("stack starts");
    let r = s.rest.raw("GET", "/api/hcp/openapi.json", None, None).await.unwrap();
    assert_eq!(r.status, 200);
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert!(r.body == committed, "the gateway serves another document than gateway/openapi.json");
    let r = s.rest.raw("POST", "/api/hcp/openapi.json", None, Some("{}")).await.unwrap();
    assert_eq!((r.status, r.body["code"].as_str()), (405, Some("METHOD_NOT_ALLOWED")), "{}", r.body);
    assert_eq!(r.headers.get("allow").and_then(|v| v.to_str().ok()), Some("GET, HEAD"));

    let Some(st) = schemathesis() else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run schemathesis");
        eprintln!("SKIP: no schemathesis (scripts/services.sh ensure_schemathesis installs it)");
        return;
    };
    let url = format!("http://{}/api/hcp/openapi.json", s.gateway);
    for (namespace, token) in [
        ("tenant", s.tenant_token("acme", &["demo"])),
        ("common", s.tenant_token("acme", &["demo"])),
        ("ops", s.ops_token()),
    ] {
        let out = tokio::process::Command::new(&st)
            .args(["run", &url, "--header", &format!("Authorization: Bearer {token}")])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
            .args(["--max-examples", "20", "--seed", "1", "--include-path-regex", &format!("^/api/hcp/{namespace}/")])
            .env("NO_COLOR", "1")
            .current_dir(s.dir())
            .output()
            .await
            .expect("schemathesis runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{namespace}: schemathesis found failures:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = text.lines().find(|l| l.contains(" generated, ")).unwrap_or_default().trim().to_owned();
        let counts: Vec<u64> =
            summary.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
        assert!(
            counts.len() >= 2 && counts[0] > 100 && counts[0] == counts[1],
            "{namespace}: every generated case must pass: {summary:?}\n{text}"
        );
        println!("{namespace}: {summary}");
    }
}
