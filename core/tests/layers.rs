//! Core's modules form no import loop: every file's `crate::` references
//! (outside comments and `#[cfg(test)]` code) point one way, so each part
//! can be read, tested and moved on its own. The SQL lives in `hcp-store`
//! and the rules in `hcp-domain`, which core's manifest enforces; this test
//! keeps the rest layered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`api::tenant`) -> source of its file.
fn modules(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("core/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            modules(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under root").with_extension("");
            let name = rel.to_string_lossy().replace("/mod", "").replace('/', "::");
            out.insert(name, std::fs::read_to_string(&path).expect("a source file"));
        }
    }
}

/// The modules of `names` that `source` (module `me`) refers to.
fn references(me: &str, source: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = BTreeSet::new();
    let parent = me.rsplit_once("::").map(|(p, _)| p);
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let words: Vec<&str> =
            line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).collect();
        for word in words {
            let path = word.trim_matches(':');
            let candidates: Vec<String> = if let Some(rest) = path.strip_prefix("crate::") {
                let mut parts = rest.split("::");
                let first = parts.next().unwrap_or_default().to_owned();
                let second = parts.next().map(|s| format!("{first}::{s}"));
                second.into_iter().chain([first]).collect()
            } else if let (Some(rest), Some(parent)) = (path.strip_prefix("super::"), parent) {
                let first = rest.split("::").next().unwrap_or_default();
                vec![format!("{parent}::{first}")]
            } else {
                continue;
            };
            if let Some(found) = candidates.into_iter().find(|c| names.contains(c) && c != me) {
                out.insert(found);
            }
        }
        // `use crate::{a, b::C}` names modules inside braces.
        if let Some(group) = line.split("use crate::{").nth(1) {
            for item in group.split([',', '{', '}', ' ', ';']).map(|i| i.trim_matches(':')) {
                let mut parts = item.split("::");
                let first = parts.next().unwrap_or_default().to_owned();
                let second = parts.next().map(|s| format!("{first}::{s}"));
                if let Some(found) = second.into_iter().chain([first]).find(|c| names.contains(c) && c != me)
                {
                    out.insert(found);
                }
            }
        }
    }
    out
}

/// A cycle through `start`, if any, as the modules on it.
fn cycle_from(
    node: &str,
    graph: &BTreeMap<String, BTreeSet<String>>,
    stack: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = stack.iter().position(|n| n == node) {
        let mut cycle = stack[at..].to_vec();
        cycle.push(node.to_owned());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    stack.push(node.to_owned());
    for next in &graph[node] {
        if let Some(cycle) = cycle_from(next, graph, stack, done) {
            return Some(cycle);
        }
    }
    stack.pop();
    done.insert(node.to_owned());
    None
}

#[test]
fn core_modules_form_no_import_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    modules(&root, &root, &mut sources);
    assert!(sources.len() > 20, "found only {} modules under {}", sources.len(), root.display());
    let names: BTreeSet<String> = sources.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> =
        sources.iter().map(|(m, s)| (m.clone(), references(m, s, &names))).collect();
    assert!(graph["server"].contains("jobs"), "the reference scan finds nothing: {:?}", graph["server"]);
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = cycle_from(node, &graph, &mut Vec::new(), &mut done) {
            panic!("core's modules import each other in a loop: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_scan_sees_a_loop_when_there_is_one() {
    let names: BTreeSet<String> = ["a", "b", "api::x", "api::y"].map(String::from).into();
    let a = references("a", "use crate::b::Thing;\n// crate::api::x in a comment\n", &names);
    let b = references("b", "use crate::{a, api::y};\n#[cfg(test)]\nuse crate::api::x;\n", &names);
    let x = references("api::x", "use super::y::Z;\n", &names);
    assert_eq!(a, ["b".to_owned()].into());
    assert_eq!(b, ["a".to_owned(), "api::y".to_owned()].into());
    assert_eq!(x, ["api::y".to_owned()].into());
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", a), ("b", b), ("api::x", x), ("api::y", BTreeSet::new())]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
    let cycle = cycle_from("a", &graph, &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(cycle, Some(vec!["a".to_owned(), "b".to_owned(), "a".to_owned()]));
}

/// Whether `word` is a name from one of the domain's name tables: a VM,
/// job, snapshot or host state, a job kind, a step, an error code or a
/// usage event.
fn domain_name(word: &str) -> bool {
    use hcp_core::lifecycle::{Metering, Step};
    use hcp_core::model::{HostState, JobKind, JobStatus, LeftoverCleanup, SnapshotStatus, VmStatus};
    use hcp_proto::error::ErrorCode;
    VmStatus::parse(word).is_some()
        || JobStatus::parse(word).is_some()
        || SnapshotStatus::parse(word).is_some()
        || HostState::parse(word).is_some()
        || JobKind::parse(word).is_some()
        || Step::parse(word).is_some()
        || ErrorCode::ALL.iter().any(|c| c.as_str() == word)
        || Metering::ALL.iter().any(|m| m.as_str() == word)
        || LeftoverCleanup::parse(word).is_some()
}

/// The string literals (`"..."`) and SQL literals (`'...'`) of a source's
/// non-test, non-comment code that spell a domain name.
fn spelled_names(source: &str) -> Vec<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        for quote in ['"', '\''] {
            let parts: Vec<&str> = line.split(quote).collect();
            for word in parts.iter().skip(1).step_by(2) {
                if domain_name(word) {
                    found.push(format!("line {}: {quote}{word}{quote}", n + 1));
                }
            }
        }
    }
    found
}

/// States, job kinds, steps, error codes and usage events are spelled only
/// in `hcp-domain`'s name tables (and `hcp-proto`'s for error codes):
/// core, the store and the gateway name them through the enums, SQL too.
#[test]
fn domain_names_are_spelled_only_in_the_domain() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offenders = Vec::new();
    let mut files = 0;
    for dir in ["src", "store/src", "../gateway/src"] {
        let dir = root.join(dir);
        let mut sources = BTreeMap::new();
        modules(&dir, &dir, &mut sources);
        for (module, source) in sources {
            files += 1;
            for hit in spelled_names(&source) {
                offenders.push(format!("{}/{module}: {hit}", dir.display()));
            }
        }
    }
    assert!(files > 40, "scanned only {files} files");
    assert!(offenders.is_empty(), "domain names spelled outside the domain: {offenders:#?}");
}

#[test]
fn the_name_scan_finds_states_in_code_and_sql() {
    assert_eq!(
        spelled_names("let s = \"ACTIVE\";\nsql(\"... status <> 'DELETED'\");\n// \"QUEUED\" in a comment\n"),
        ["line 1: \"ACTIVE\"", "line 2: 'DELETED'"]
    );
    assert_eq!(
        spelled_names("audit(\"vm.create\", \"provider.start\", \"stopped\", \"NOT_FOUND\")"),
        [
            "line 1: \"vm.create\"",
            "line 1: \"provider.start\"",
            "line 1: \"stopped\"",
            "line 1: \"NOT_FOUND\""
        ]
    );
    assert!(spelled_names("tracing::info!(\"vm started\"); let x = 'a';").is_empty());
}
