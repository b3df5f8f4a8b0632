//! Core refuses at start a configuration value outside its allowed range,
//! naming the field and the range, instead of silently changing it.

#[test]
fn a_value_out_of_range_is_refused_at_start_naming_the_field() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let path = dir.path().join("core.toml");
    for (file, says) in [
        ("[jobs]\nlease_seconds = 1\n", "jobs.lease_seconds must be between 2 and 3600, got 1"),
        ("[limits]\nrate_per_second = 0.0\n", "limits.rate_per_second must be a number above 0, got 0"),
        ("[drain]\ninterval_ms = 10\n", "drain.interval_ms must be between 50 and 3600000, got 10"),
    ] {
        std::fs::write(&path, file).unwrap();
        let err = hcp_core::cli::main(["hcp-core", "--config", path.to_str().unwrap()]).unwrap_err();
        let text = hcp_telemetry::error_chain(&err);
        assert!(text.contains("core.toml") && text.contains(says), "{file}: {text}");
    }
}

/// The README's configuration reference is the table [`bounds`] gives.
///
/// [`bounds`]: hcp_core::config::bounds
#[test]
fn the_readme_lists_every_bound_as_the_code_applies_it() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let (_, rest) = readme.split_once("<!-- config-bounds: begin -->\n").expect("the begin marker");
    let (table, _) = rest.split_once("<!-- config-bounds: end -->").expect("the end marker");
    let expected = hcp_core::config::bounds_table();
    assert_eq!(table, expected, "README.md's configuration table is stale; replace it with:\n{expected}");
}

/// An anchor file the sealer cannot append to, and a secrets key file with
/// a bad line, are refused at start, naming the setting or the line.
#[test]
fn a_bad_anchor_file_or_key_file_is_refused_at_start() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let path = dir.path().join("core.toml");
    let jwt = dir.path().join("jwt-secret");
    std::fs::write(&jwt, "0123456789abcdef0123456789abcdef").unwrap();
    let keys = dir.path().join("secrets.key");
    std::fs::write(&keys, format!("{}\nnot-a-key\n", "ab".repeat(32))).unwrap();
    let head = format!(
        "listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite::memory:\"\n[auth]\nhs256_secret_file = \"{}\"\n",
        jwt.display()
    );
    let no_dir = dir.path().join("no-such-dir").join("anchors");
    for (file, says) in [
        (format!("[audit]\nanchor_file = \"{}\"\n", no_dir.display()), "cannot append to audit.anchor_file"),
        (format!("[secrets]\nkey_file = \"{}\"\n", keys.display()), "line 2 of the secrets key file"),
    ] {
        std::fs::write(&path, format!("{head}{file}")).unwrap();
        let err = hcp_core::cli::main(["hcp-core", "--config", path.to_str().unwrap()]).unwrap_err();
        let text = hcp_telemetry::error_chain(&err);
        assert!(text.contains(says), "{file}: {text}");
    }
}
