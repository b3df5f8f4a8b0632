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
    write_owner_only(&jwt, "0123456789abcdef0123456789abcdef");
    let keys = dir.path().join("secrets.key");
    write_owner_only(&keys, &format!("{}\nnot-a-key\n", "ab".repeat(32)));
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

/// A secrets key file or an HS256 secret file that its group or others may
/// read is refused at start, naming the file and its mode; at 0600 the
/// same files are taken.
#[test]
fn secret_files_others_may_read_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = hcp_testkit::TempDir::new().unwrap();
    let path = dir.path().join("core.toml");
    let jwt = dir.path().join("jwt-secret");
    write_owner_only(&jwt, "0123456789abcdef0123456789abcdef");
    let keys = dir.path().join("secrets.key");
    write_owner_only(&keys, &"ab".repeat(32));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite::memory:\"\n\
             [auth]\nhs256_secret_file = \"{}\"\n[secrets]\nkey_file = \"{}\"\n",
            jwt.display(),
            keys.display()
        ),
    )
    .unwrap();
    let chmod = |file: &std::path::Path, mode: u32| {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    for (file, mode, says) in [
        (&jwt, 0o644, "the HS256 secret file"),
        (&jwt, 0o640, "the HS256 secret file"),
        (&keys, 0o604, "the secrets key file"),
    ] {
        chmod(file, mode);
        let err = hcp_core::cli::main(["hcp-core", "--config", path.to_str().unwrap()]).unwrap_err();
        let text = hcp_telemetry::error_chain(&err);
        let named = format!("{says} {} is open to its group or others (mode {mode:04o})", file.display());
        assert!(text.contains(&named), "{mode:o}: {text}");
        assert!(text.contains("chmod 600"), "the refusal says how to fix it: {text}");
        chmod(file, 0o600);
    }
    // Both files at 0600: the keys are read, so core gets past them (and
    // this checks the refusals above were the modes and nothing else).
    let verifier = hcp_core::auth::Verifier::from_config(&hcp_core::Config::from_file(&path).unwrap().auth);
    assert!(verifier.is_ok(), "{verifier:?}");
    hcp_core::secrets::SecretKeys::from_file(&keys).unwrap();
}

fn write_owner_only(path: &std::path::Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}
