//! The API contract, exact: clients generated from the OpenAPI document
//! the gateway serves drive a VM's whole life, and schemathesis finds no
//! answer that the document does not promise.
//!
//! The tools come from `scripts/contract-tools.sh` (PyPI and npm, exact
//! versions, cached under `target/contract-tools` and
//! `gateway/clients/ts/node_modules`); the programs they run are in
//! `gateway/clients/`. Generated code lives in the stack's temporary
//! directory and goes with it.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::{Value, json};
use tokio::process::Command;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const PROJECT: &str = "demo";
/// The longest a generator, a compiler or a client program may take.
const STEP: Duration = Duration::from_secs(300);
/// The longest one schemathesis run (one token) may take.
const SCHEMATHESIS: Duration = Duration::from_secs(360);
/// Test cases per operation and phase: enough to reach every operation's
/// success and error paths, few enough for both runs to end in about two
/// minutes on two cores.
const MAX_EXAMPLES: &str = "40";

/// Where the contract tools are.
struct Tools {
    /// The venv's `bin`: python, openapi-python-client, schemathesis, ruff.
    bin: PathBuf,
    /// The TypeScript project, `node_modules` installed.
    ts: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tools, installed when needed. `None` (and a SKIP line) only outside
/// CI when a registry cannot be reached; any other failure fails the test.
async fn tools() -> Option<Tools> {
    let out = Command::new("bash")
        .arg(repo().join("scripts/contract-tools.sh"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("bash runs scripts/contract-tools.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("SKIP: the contract tools cannot be installed (a registry is unreachable):\n{stderr}");
        return None;
    }
    assert!(out.status.success(), "scripts/contract-tools.sh failed ({}):\n{stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("scripts/contract-tools.sh printed no {key}:\n{stdout}"))
    };
    Some(Tools { bin: value("HCP_CONTRACT_BIN"), ts: value("HCP_CONTRACT_TS") })
}

/// What the stack's sim provider can do: everything the tenant API has a
/// route for, so that every operation can reach its success path.
const SIM_CAPABILITIES: &str = "cloud_init,snapshot,snapshot_running,live_migration,cold_migration,\
                                resize,hot_resize,console_vnc,console_spice,console_rdp,console_serial,console_log";

async fn stack() -> TestStack {
    let opts = StackOptions { sim_capabilities: SIM_CAPABILITIES.to_owned(), ..StackOptions::default() };
    TestStack::start(Path::new(HCP), opts).await.expect("stack starts")
}

/// Runs `cmd` to its end within `limit` (killed past it); returns what it
/// printed.
async fn run(what: &str, cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}")),
        Err(_) => panic!("{what}: still running after {limit:?}"),
    }
}

/// Runs `cmd`, which must succeed; returns its standard output.
async fn succeed(what: &str, cmd: &mut Command) -> String {
    let out = run(what, cmd, STEP).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", out.status);
    format!("{stdout}{stderr}")
}

/// The document the gateway serves, saved in the stack's directory.
async fn served_document(s: &TestStack) -> PathBuf {
    let r = s.rest.raw("GET", "/api/hcp/openapi.json", None, None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let path = s.dir().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&r.body).unwrap()).unwrap();
    path
}

/// `PATH` with the venv's `bin` first (openapi-python-client runs ruff).
fn path_with(bin: &Path) -> String {
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_drives_a_vm() {
    let Some(tools) = tools().await else { return };
    let s = stack().await;
    let doc = served_document(&s).await;
    let dir = s.dir().join("python");
    let generated = succeed(
        "openapi-python-client generate",
        Command::new(tools.bin.join("openapi-python-client"))
            .args(["generate", "--meta", "none", "--path"])
            .arg(&doc)
            .arg("--output-path")
            .arg(dir.join("hcp_client"))
            .env("PATH", path_with(&tools.bin)),
    )
    .await;
    // It generates what it can and warns about the rest: a warning means
    // part of the document is unusable for it.
    assert!(
        !generated.to_lowercase().contains("warning"),
        "openapi-python-client could not use all of the document:\n{generated}"
    );
    let out = succeed(
        "vm_life.py",
        Command::new(tools.bin.join("python"))
            .arg(repo().join("gateway/clients/python/vm_life.py"))
            .env("PYTHONPATH", &dir)
            .env("HCP_URL", format!("http://{}", s.gateway))
            .env("HCP_TOKEN", s.tenant_token("acme", &[PROJECT]))
            .env("HCP_PROJECT", PROJECT),
    )
    .await;
    println!("{out}");
    assert!(out.contains("vm life: ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn typescript_client_drives_a_vm() {
    let Some(tools) = tools().await else { return };
    let s = stack().await;
    let doc = served_document(&s).await;
    // The program, its compiler settings and the generated types side by
    // side, with the installed packages linked in.
    let dir = s.dir().join("ts");
    std::fs::create_dir(&dir).unwrap();
    for file in ["vm_life.ts", "tsconfig.json", "package.json"] {
        std::fs::copy(tools.ts.join(file), dir.join(file)).unwrap();
    }
    std::os::unix::fs::symlink(tools.ts.join("node_modules"), dir.join("node_modules")).unwrap();
    let modules = dir.join("node_modules");
    succeed(
        "openapi-typescript",
        Command::new("node")
            .arg(modules.join("openapi-typescript/bin/cli.js"))
            .arg(&doc)
            .args(["--output", "schema.d.ts"])
            .current_dir(&dir),
    )
    .await;
    // Strict type-checking first (no output on any error), so a document
    // whose types no longer fit the program fails here.
    succeed(
        "tsc (type-check and compile vm_life.ts against the generated types)",
        Command::new("node")
            .arg(modules.join("typescript/bin/tsc"))
            .args(["-p", "tsconfig.json"])
            .current_dir(&dir),
    )
    .await;
    let out = succeed(
        "vm_life.js",
        Command::new("node")
            .arg(dir.join("out/vm_life.js"))
            .env("HCP_URL", format!("http://{}", s.gateway))
            .env("HCP_TOKEN", s.tenant_token("acme", &[PROJECT]))
            .env("HCP_PROJECT", PROJECT)
            .current_dir(&dir),
    )
    .await;
    println!("{out}");
    assert!(out.contains("vm life: ok"), "{out}");
}

/// What the schemathesis run is given to use: real ids of real things.
async fn seed(s: &TestStack, tenant: &str, ops: &str) -> Vec<(&'static str, String)> {
    let vms = format!("/api/hcp/tenant/v1/projects/{PROJECT}/vms");
    let accepted = |r: hcp_testkit::rest::Reply, what: &str| {
        assert!(r.status == 202 || r.status == 201, "{what}: {} {}", r.status, r.body);
        r.body
    };
    let finish = |job: Value| async move {
        let job = s.rest.finished_job(tenant, job.as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
        assert_eq!(job["status"], "SUCCEEDED", "{job}");
    };
    let vm = accepted(
        s.rest
            .post(&vms, tenant, &json!({"name": "st-seed", "flavor": "small", "image": "debian-12"}))
            .await
            .unwrap(),
        "create",
    );
    finish(vm["job_id"].clone()).await;
    let vm_id = vm["vm_id"].as_str().unwrap().to_owned();
    let stopped = accepted(
        s.rest
            .post(&vms, tenant, &json!({"name": "st-stopped", "flavor": "small", "image": "debian-12"}))
            .await
            .unwrap(),
        "create",
    );
    finish(stopped["job_id"].clone()).await;
    let stopped_id = stopped["vm_id"].as_str().unwrap().to_owned();
    let stop =
        accepted(s.rest.post(&format!("{vms}/{stopped_id}:stop"), tenant, &json!({})).await.unwrap(), "stop");
    finish(stop["job_id"].clone()).await;
    let snapshot = accepted(
        s.rest.post(&format!("{vms}/{vm_id}/snapshots"), tenant, &json!({"name": "st-snap"})).await.unwrap(),
        "snapshot",
    );
    finish(snapshot["job_id"].clone()).await;
    let group = accepted(
        s.rest
            .post(
                &format!("/api/hcp/tenant/v1/projects/{PROJECT}/placement-groups"),
                tenant,
                &json!({"name": "st-group", "policy": "ANTI_AFFINITY"}),
            )
            .await
            .unwrap(),
        "placement group",
    );
    let providers = s.rest.get("/api/hcp/ops/v1/providers", ops).await.unwrap();
    let provider_id = providers.body["providers"][0]["provider_id"].as_str().unwrap().to_owned();
    let hosts = s.rest.get(&format!("/api/hcp/ops/v1/providers/{provider_id}/hosts"), ops).await.unwrap();
    let host = hosts.body["hosts"][0]["name"].as_str().unwrap().to_owned();
    let id = |v: &Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}")).to_owned();
    vec![
        ("HCP_ST_VM_ID", vm_id),
        ("HCP_ST_STOPPED_VM_ID", stopped_id),
        ("HCP_ST_JOB_ID", id(&vm, "job_id")),
        ("HCP_ST_SNAPSHOT_ID", id(&snapshot, "snapshot_id")),
        ("HCP_ST_PLACEMENT_GROUP_ID", id(&group, "placement_group_id")),
        ("HCP_ST_PROVIDER_ID", provider_id),
        ("HCP_ST_HOST", host),
    ]
}

/// Operations that must have answered with a success in a run: the runs
/// reach the success paths, not only the 400s and 404s.
const MUST_SUCCEED: &[(&str, &str, u16)] = &[
    ("tenant", "POST /api/hcp/tenant/v1/projects/{project_id}/vms", 202),
    ("tenant", "GET /api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}", 200),
    ("tenant", "GET /api/hcp/tenant/v1/projects/{project_id}/vms", 200),
    ("tenant", "GET /api/hcp/tenant/v1/jobs/{job_id}", 200),
    ("tenant", "GET /api/hcp/common/v1/flavors", 200),
    ("ops", "GET /api/hcp/ops/v1/providers", 200),
    ("ops", "GET /api/hcp/ops/v1/vms/{vm_id}", 200),
];

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing() {
    let Some(tools) = tools().await else { return };
    let s = stack().await;
    let (tenant, ops) = (s.tenant_token("acme", &[PROJECT]), s.ops_token());
    let seeded = seed(&s, &tenant, &ops).await;
    // The committed configuration with the seeded ids filled in
    // (schemathesis does not substitute variables in dictionaries).
    let mut config =
        std::fs::read_to_string(repo().join("gateway/clients/schemathesis/schemathesis.toml")).unwrap();
    for (name, value) in &seeded {
        config = config.replace(&format!("${{{name}}}"), value);
    }
    assert!(!config.contains("${"), "a variable of schemathesis.toml is not seeded:\n{config}");
    let config_path = s.dir().join("schemathesis.toml");
    std::fs::write(&config_path, config).unwrap();

    let url = format!("http://{}/api/hcp/openapi.json", s.gateway);
    let mut runs = Vec::new();
    let mut summaries = String::new();
    // Every operation with each token: the tenant's calls to ops routes
    // and the operator's to tenant routes are checked too (403s as
    // documented). The tenant run goes first: the operator's may drain
    // hosts and delete catalog entries.
    for (name, token) in [("tenant", &tenant), ("ops", &ops)] {
        let ndjson = s.dir().join(format!("schemathesis-{name}.ndjson"));
        let out = run(
            &format!("schemathesis ({name} token)"),
            Command::new(tools.bin.join("schemathesis"))
                .arg("--config-file")
                .arg(&config_path)
                .args(["run", &url, "--header", &format!("Authorization: Bearer {token}")])
                // All checks, positive and negative data, every phase
                // (examples, coverage, fuzzing, stateful); an operation's
                // first failure does not end its testing, so every distinct
                // failure is reported and the success paths are reached.
                .args(["--checks", "all", "--mode", "all", "--continue-on-failure"])
                // The one exclusion: `positive_data_acceptance` wants a 2xx
                // (or 401/403/404) for every schema-valid request, but some
                // valid requests are refused for what no schema states (an
                // unknown flavor, a page token HCP did not issue, a key used
                // with another request, a busy VM). In its place the hooks'
                // `documented_rules_accept_valid_data` fails any 400 for a
                // valid request that names a documented rule
                // (gateway/clients/schemathesis/hooks.py).
                .args(["--exclude-checks", "positive_data_acceptance"])
                .env("SCHEMATHESIS_HOOKS", repo().join("gateway/clients/schemathesis/hooks.py"))
                .args(["--max-examples", MAX_EXAMPLES, "--seed", "1", "--generation-database", "none"])
                .args(["--request-timeout", "10", "--no-color", "--output-sanitize", "false"])
                .args(["--report", "ndjson", "--report-ndjson-path"])
                .arg(&ndjson)
                .current_dir(s.dir()),
            SCHEMATHESIS,
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout.split("SUMMARY").nth(1).unwrap_or(&stdout);
        summaries.push_str(&format!("== schemathesis, {name} token: {}\n{summary}\n", out.status));
        println!(
            "{name}: {}",
            stdout.lines().find(|l| l.contains(" generated, ")).unwrap_or_default().trim()
        );
        assert!(
            ndjson.is_file(),
            "schemathesis ({name}) wrote no report:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        runs.push((name, ndjson, out.status.success()));
    }

    let summary_path = s.dir().join("schemathesis-summary.json");
    let catalogue = succeed(
        "report.py",
        Command::new(tools.bin.join("python"))
            .arg(repo().join("gateway/clients/schemathesis/report.py"))
            .arg("--json")
            .arg(&summary_path)
            .args(runs.iter().map(|(name, path, _)| format!("{name}={}", path.display()))),
    )
    .await;
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    let failures = summary["failures"].as_array().map_or(0, Vec::len);
    let errors = summary["errors"].as_array().map_or(0, Vec::len);
    assert!(
        failures == 0 && errors == 0 && runs.iter().all(|(_, _, ok)| *ok),
        "schemathesis found {failures} distinct failures and {errors} errors:\n{catalogue}\n{summaries}"
    );
    for (run, operation, status) in MUST_SUCCEED {
        let seen = &summary["statuses"][run][operation];
        assert!(
            seen.as_array().is_some_and(|s| s.iter().any(|c| c == status)),
            "{run}: {operation} never answered {status} (statuses seen: {seen}); the run must reach its success path"
        );
    }
}
