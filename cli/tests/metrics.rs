//! Metrics as an operator uses them: a real Prometheus server (Debian's
//! `prometheus`, `scripts/services.sh` `ensure_prometheus`) scrapes a
//! running stack's core, gateway and sim provider every second, and
//! answers PromQL queries about a load the test has just made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const WAIT: Duration = Duration::from_secs(60);

fn prometheus_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HCP_PROMETHEUS") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("prometheus"))
        .find(|p| p.is_file())
}

/// Percent-encodes a PromQL query for a URL's query string.
fn encode(q: &str) -> String {
    hcp_cli::human::enc(q)
}

/// The single value of an instant query, when it has exactly one.
async fn value(prom: &Rest, query: &str) -> anyhow::Result<Option<f64>> {
    let r = prom.get(&format!("/api/v1/query?query={}", encode(query)), "").await?;
    anyhow::ensure!(r.status == 200 && r.body["status"] == "success", "{query}: {} {}", r.status, r.body);
    let result = r.body["data"]["result"].as_array().cloned().unwrap_or_default();
    Ok(match result.as_slice() {
        [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_stack_and_answers_for_the_load_it_saw() {
    let Some(prometheus) = prometheus_binary() else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run the Prometheus test");
        eprintln!("SKIP: no prometheus binary (scripts/services.sh ensure_prometheus installs it)");
        return;
    };
    let s = TestStack::start(Path::new(HCP), StackOptions { sim_metrics: true, ..Default::default() })
        .await
        .expect("stack starts");
    assert_eq!(s.metrics.iter().map(|(j, _)| *j).collect::<Vec<_>>(), ["sim", "core", "gateway"]);

    // Each endpoint answers in the text format before Prometheus is asked.
    for (job, addr) in &s.metrics {
        let r = Rest::new(format!("http://{addr}")).raw("GET", "/metrics", None, None).await.unwrap();
        assert_eq!(r.status, 200, "{job}");
    }

    let dir = s.dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config =
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n".to_owned();
    for (job, addr) in &s.metrics {
        config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"));
    }
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _server = tokio::process::Command::new(&prometheus)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let prom = Rest::new(format!("http://127.0.0.1:{port}"));
    hcp_testkit::wait_until(WAIT, "Prometheus scrapes all three targets", || async {
        Ok(value(&prom, "sum(up)").await.ok().flatten().filter(|n| *n == 3.0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap()));

    // The load: five VMs created and one request refused.
    let t = s.tenant_token("acme", &["demo"]);
    let mut jobs = Vec::new();
    for i in 0..5 {
        let r = s
            .rest
            .post(VMS, &t, &json!({"name": format!("m-{i}"), "flavor": "small", "image": "debian-12"}))
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        jobs.push(r.str("job_id"));
    }
    for job in &jobs {
        let j: Value = s.rest.finished_job(&t, job, WAIT).await.unwrap();
        assert_eq!(j["status"], "SUCCEEDED", "{j}");
    }
    let r =
        s.rest.post(VMS, &t, &json!({"name": "", "flavor": "small", "image": "debian-12"})).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);

    // What Prometheus has seen, asked as an operator would.
    let route = "/api/hcp/tenant/v1/projects/{project_id}/vms";
    let expectations = [
        (format!("sum(hcp_http_requests_total{{job=\"gateway\",route=\"{route}\",method=\"POST\",status=\"202\"}})"), 5.0),
        (format!("sum(hcp_http_requests_total{{job=\"gateway\",route=\"{route}\",method=\"POST\",status=\"400\"}})"), 1.0),
        ("sum(hcp_grpc_server_requests_total{job=\"core\",method=\"/hcp.tenant.v1.VmService/CreateVm\",code=\"OK\"})".to_owned(), 5.0),
        ("sum(hcp_grpc_server_requests_total{job=\"core\",method=\"/hcp.tenant.v1.VmService/CreateVm\",code=\"InvalidArgument\"})".to_owned(), 1.0),
        ("sum(hcp_jobs_finished_total{job=\"core\",kind=\"vm.create\",outcome=\"succeeded\"})".to_owned(), 5.0),
        ("sum(hcp_job_duration_seconds_count{job=\"core\",kind=\"vm.create\"})".to_owned(), 5.0),
        ("hcp_vms{job=\"core\",status=\"ACTIVE\"}".to_owned(), 5.0),
        ("sum(hcp_jobs_open{job=\"core\"})".to_owned(), 0.0),
        ("hcp_quota_used{job=\"core\",tenant=\"acme\",project=\"demo\",resource=\"vms\"}".to_owned(), 5.0),
        ("hcp_provider_up{job=\"core\",provider=\"sim-1\"}".to_owned(), 1.0),
        ("sum(hcp_provider_calls_total{job=\"core\",method=\"/hcp.provider.v1.Compute/CreateVm\",code=\"OK\"})".to_owned(), 5.0),
        ("sum(hcp_grpc_server_requests_total{job=\"sim\",method=\"/hcp.provider.v1.Compute/CreateVm\",code=\"OK\"})".to_owned(), 5.0),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = Vec::new();
        for (q, want) in &expectations {
            let got = value(&prom, q).await.unwrap();
            seen.push((got == Some(*want), format!("{q} = {got:?} (want {want})")));
        }
        if seen.iter().all(|(ok, _)| *ok) {
            break;
        }
        let lines: Vec<&str> = seen.iter().map(|(_, l)| l.as_str()).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus did not see the load:\n{}",
            lines.join("\n")
        );
        // Prometheus scrapes every second.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A latency quantile from the buckets: between the fastest bucket and
    // the job's whole wait.
    let p99 = value(
        &prom,
        "histogram_quantile(0.99, sum by (le) (hcp_job_duration_seconds_bucket{kind=\"vm.create\"}))",
    )
    .await
    .unwrap()
    .expect("a p99 of the create jobs");
    assert!(p99 > 0.0 && p99 <= 60.0, "p99 {p99}");
}

/// Every query of the Grafana dashboard in the repository is valid PromQL
/// to a real Prometheus, and every metric it names is recorded somewhere
/// in HCP's code (so the dashboard cannot drift from the metrics).
#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_queries_metrics_that_exist() {
    let Some(prometheus) = prometheus_binary() else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run the Prometheus test");
        eprintln!("SKIP: no prometheus binary (scripts/services.sh ensure_prometheus installs it)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/hcp-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");

    // The names HCP's code records: string literals starting with hcp_.
    let mut code = String::new();
    for dir in ["core/src", "gateway/src", "telemetry/src", "providers/sdk/src"] {
        for entry in walk(&root.join(dir)) {
            code.push_str(&std::fs::read_to_string(entry).unwrap());
        }
    }
    for expr in &exprs {
        for name in metric_names(expr) {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(code.contains(&format!("\"{base}\"")), "{expr}: no code records {base}");
        }
    }

    // Valid PromQL, as Prometheus parses it.
    // Test support's directory: removed at the end, kept when the test fails.
    let guard = hcp_testkit::TempDir::new().unwrap();
    let dir = guard.path().to_owned();
    std::fs::write(dir.join("prometheus.yml"), "global:\n  scrape_interval: 1s\nscrape_configs: []\n")
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = tokio::process::Command::new(&prometheus)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let prom = Rest::new(format!("http://127.0.0.1:{port}"));
    hcp_testkit::wait_until(WAIT, "Prometheus answers", || async {
        Ok(prom.get("/-/ready", "").await.ok().filter(|r| r.status == 200).map(|_| ()))
    })
    .await
    .unwrap();
    for expr in &exprs {
        let r = prom.get(&format!("/api/v1/query?query={}", encode(expr)), "").await.unwrap();
        assert_eq!((r.status, &r.body["status"]), (200, &json!("success")), "{expr}: {}", r.body);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The `hcp_…` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("hcp_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}
