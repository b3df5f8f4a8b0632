//! The served OpenAPI document is the committed one. That the running API
//! keeps its promises is `contract.rs` (schemathesis with every check) and
//! `contract_rules.rs` (every documented constraint at its edges).

use std::path::Path;

use hcp_testkit::stack::{StackOptions, TestStack};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_the_committed_document() {
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
}
