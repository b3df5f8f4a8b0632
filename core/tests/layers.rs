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
