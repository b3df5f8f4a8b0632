//! The dependency boundary: neither the provider SDK nor the wire types
//! (`hcp-proto`) may pull in a database or a message queue, directly or
//! through anything they depend on. Computed from `cargo metadata`'s
//! resolve graph; a graph that cannot be computed fails too, so the check
//! never passes by not running.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The crates whose normal-dependency closure is checked.
const ROOTS: [&str; 2] = ["hcp-provider-sdk", "hcp-proto"];

/// Whether a package name is one the roots must not depend on.
fn forbidden(name: &str) -> bool {
    name == "sqlx"
        || name.starts_with("sqlx-")
        || name.starts_with("sqlx_")
        || name == "async-nats"
        || name == "async_nats"
}

/// `cargo metadata` of the whole workspace, as the lock file has it.
fn metadata() -> Value {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--manifest-path"])
        .arg(&manifest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cargo metadata printed no JSON: {e}"))
}

/// The names of the packages `root` reaches through normal (not dev, not
/// build) dependencies, `root` included.
fn normal_closure(metadata: &Value, root: &str) -> Result<BTreeSet<String>, String> {
    let packages = metadata["packages"].as_array().ok_or("no packages in the metadata")?;
    let names: HashMap<&str, &str> =
        packages.iter().filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?))).collect();
    let nodes = metadata["resolve"]["nodes"].as_array().ok_or("no resolve graph in the metadata")?;
    let deps: HashMap<&str, Vec<&str>> = nodes
        .iter()
        .filter_map(|n| {
            let normal = n["deps"]
                .as_array()?
                .iter()
                .filter(|d| {
                    d["dep_kinds"].as_array().is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null()))
                })
                .filter_map(|d| d["pkg"].as_str())
                .collect();
            Some((n["id"].as_str()?, normal))
        })
        .collect();
    let mut roots = names.iter().filter(|(_, name)| **name == root).map(|(id, _)| *id);
    let start = roots.next().ok_or_else(|| format!("package {root} is not in the workspace"))?;
    let mut seen = BTreeSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let next = deps.get(id).ok_or_else(|| format!("{id} is missing from the resolve graph"))?;
        todo.extend(next.iter().copied());
    }
    seen.iter()
        .map(|id| {
            names.get(id).map(|n| (*n).to_owned()).ok_or_else(|| format!("{id} is not a known package"))
        })
        .collect()
}

/// What `root`'s closure holds that it must not.
fn violations(metadata: &Value, root: &str) -> Result<Vec<String>, String> {
    Ok(normal_closure(metadata, root)?.into_iter().filter(|n| forbidden(n)).collect())
}

#[test]
fn sdk_and_proto_depend_on_neither_a_database_nor_a_queue() {
    let metadata = metadata();
    for root in ROOTS {
        let closure = normal_closure(&metadata, root).unwrap_or_else(|e| panic!("{root}: {e}"));
        // A closure that missed the graph would pass vacuously: both roots
        // speak gRPC, so tonic must be in it.
        assert!(closure.contains(root) && closure.contains("tonic"), "{root}: {closure:?}");
        let bad: Vec<&String> = closure.iter().filter(|n| forbidden(n)).collect();
        assert!(bad.is_empty(), "{root} depends on {bad:?}; the SDK and the wire types must not");
    }
}

#[test]
fn the_check_sees_forbidden_crates_and_refuses_a_missing_graph() {
    let graph = |deps: &str| -> Value {
        serde_json::from_str(&format!(
            r#"{{"packages": [{{"id": "a", "name": "hcp-provider-sdk"}}, {{"id": "b", "name": "middle"}},
                {{"id": "c", "name": "sqlx-core"}}, {{"id": "d", "name": "async-nats"}}],
               "resolve": {{"nodes": [{deps},
                 {{"id": "c", "deps": []}}, {{"id": "d", "deps": []}}]}}}}"#
        ))
        .unwrap()
    };
    let normal = r#"[{"kind": null, "target": null}]"#;
    let dev = r#"[{"kind": "dev", "target": null}]"#;
    let through = |kinds: &str| {
        graph(&format!(
            r#"{{"id": "a", "deps": [{{"pkg": "b", "dep_kinds": {normal}}}, {{"pkg": "d", "dep_kinds": {dev}}}]}},
               {{"id": "b", "deps": [{{"pkg": "c", "dep_kinds": {kinds}}}]}}"#
        ))
    };
    let root = "hcp-provider-sdk";
    assert_eq!(violations(&through(normal), root), Ok(vec!["sqlx-core".to_owned()]));
    assert_eq!(violations(&through(dev), root), Ok(vec![]), "dev-dependencies are allowed");
    assert!(violations(&through(normal), "hcp-proto").unwrap_err().contains("hcp-proto"));
    let torn = graph(r#"{"id": "a", "deps": [{"pkg": "b", "dep_kinds": [{"kind": null}]}]}"#);
    assert!(violations(&torn, root).unwrap_err().contains("missing from the resolve graph"));
    assert!(violations(&serde_json::json!({}), root).is_err());
}
