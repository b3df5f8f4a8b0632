//! Repository hygiene that review would otherwise repeat: every Rust file
//! opens with a `//!` comment saying why it exists, and every crate takes
//! the workspace lints.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "target" || name.starts_with('.') || name == "node_modules" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_comment() {
    let mut files = Vec::new();
    rust_files(&root(), &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.strip_prefix(root()).unwrap_or(f).display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a leading //! comment: {missing:#?}");
}

#[test]
fn every_crate_uses_the_workspace_lints() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("workspace manifest");
    let members: Vec<&str> = manifest
        .lines()
        .skip_while(|l| !l.starts_with("members"))
        .skip(1)
        .take_while(|l| !l.starts_with(']'))
        .map(|l| l.trim().trim_matches(|c| c == '"' || c == ','))
        .collect();
    assert!(members.len() >= 6, "{members:?}");
    for m in members {
        let text = std::fs::read_to_string(root().join(m).join("Cargo.toml")).expect("crate manifest");
        assert!(text.contains("[lints]\nworkspace = true"), "{m} does not take the workspace lints");
        assert!(
            !text.contains("version = \"") || m == ".",
            "{m} names a dependency version outside the workspace"
        );
    }
}
