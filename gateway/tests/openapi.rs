//! The committed OpenAPI document (`gateway/openapi.json`) is the one the
//! gateway generates from the proto; regenerate it with
//! `HCP_UPDATE_OPENAPI=1 cargo test -p hcp-gateway --test openapi`.

use std::path::Path;

use serde_json::Value;

#[test]
fn the_committed_openapi_document_matches_the_proto() {
    let generated = hcp_gateway::openapi_json().expect("the document generates");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    if std::env::var("HCP_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "gateway/openapi.json differs from the proto; run HCP_UPDATE_OPENAPI=1 cargo test -p hcp-gateway --test openapi"
    );
}

#[test]
fn the_document_describes_every_route_with_its_status_and_errors() {
    let doc: Value = serde_json::from_str(&hcp_gateway::openapi_json().unwrap()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let (_, routes) =
        hcp_gateway::routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).unwrap();
    for route in &routes {
        let op = &doc["paths"][route.template.as_str()][route.method.as_str().to_lowercase()];
        assert!(op.is_object(), "{} {} is missing", route.method, route.template.as_str());
        assert!(op["responses"][route.success_status.as_str()].is_object(), "{}", route.template.as_str());
        assert_eq!(
            op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Error"
        );
    }
    let create = &doc["paths"]["/api/hcp/tenant/v1/projects/{project_id}/vms"]["post"];
    assert!(create["responses"]["202"].is_object(), "{create}");
    assert!(
        create["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "Idempotency-Key"),
        "{create}"
    );
    let body = &create["requestBody"]["content"]["application/json"]["schema"];
    assert!(
        body["properties"]["name"].is_object() && body["properties"].get("project_id").is_none(),
        "{body}"
    );
    let watch = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(p, _)| p.ends_with(":watch"))
        .map(|(_, v)| v["get"]["responses"]["200"]["content"].clone())
        .expect("the watch route");
    assert!(watch["text/event-stream"].is_object(), "{watch}");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // Every $ref resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(doc["components"]["schemas"][name].is_object(), "unresolved $ref {name}");
    }
}
