//! Usage export over the REST API: a tenant reads its project's usage and
//! an operator any tenant's, as JSON or CSV (`Accept: text/csv`), grouped
//! as asked; bad windows and groupings are refused naming the field; the
//! totals over a known sequence of events at set times are exact to the
//! second.

use std::path::Path;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use hcp_core::store::UsageEvent;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::json;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");

fn rfc3339(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test]
async fn usage_is_exported_as_json_and_csv_and_bad_queries_name_their_field() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let token = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/demo/vms",
            &token,
            &json!({"name": "u", "flavor": "small", "image": "debian-12"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.str("vm_id");
    s.rest.finished_job(&token, &r.str("job_id"), Duration::from_secs(20)).await.unwrap();

    let (from, to) =
        (rfc3339(Utc::now() - chrono::Duration::hours(1)), rfc3339(Utc::now() + chrono::Duration::hours(1)));
    let window = format!("from={}&to={}", from.replace('+', "%2B"), to.replace('+', "%2B"));
    let path = format!("/api/hcp/tenant/v1/projects/demo/usage?{window}&group_by=resource&group_by=flavor");
    let r = s.rest.get(&path, &token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["group_by"], json!(["flavor", "resource"]));
    let rows = r.body["rows"].as_array().unwrap();
    let row =
        rows.iter().find(|row| row["resource_id"] == vm.as_str()).unwrap_or_else(|| panic!("{}", r.body));
    assert_eq!(
        (row["tenant_id"].as_str(), row["project_id"].as_str(), row["flavor"].as_str()),
        (Some("acme"), Some("demo"), Some("small"))
    );
    // 64-bit counts are strings in proto3 JSON; the VM ran a little already
    // and its disk exists.
    let disk: u64 = row["disk_gib_seconds"].as_str().unwrap().parse().unwrap();
    assert!(disk > 0 || row["vm_seconds"] == "0", "{row}");

    // CSV: a header of the row's field names, one line per row.
    let csv = s.rest.raw_with("GET", &path, Some(&token), None, &[("accept", "text/csv")]).await.unwrap();
    assert_eq!(csv.status, 200, "{}", csv.text);
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let lines: Vec<&str> = csv.text.lines().collect();
    assert_eq!(
        lines[0],
        "tenant_id,project_id,flavor,resource_id,day,vm_seconds,vcpu_seconds,memory_mib_seconds,disk_gib_seconds,\
         volume_gib_seconds,vm_hours,vcpu_hours,memory_gib_hours,disk_gib_hours,volume_gib_hours"
    );
    assert!(lines[1..].iter().any(|l| l.starts_with(&format!("acme,demo,small,{vm},,"))), "{}", csv.text);
    assert_eq!(lines.len(), rows.len() + 1);

    // The operator sees every tenant, or the one named.
    let r = s
        .rest
        .get(&format!("/api/hcp/ops/v1/usage?{window}&tenant_id=acme&group_by=tenant"), &ops)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["rows"][0]["tenant_id"], "acme", "{}", r.body);
    let r = s.rest.get(&format!("/api/hcp/ops/v1/usage?{window}&tenant_id=other"), &ops).await.unwrap();
    assert_eq!(r.body["rows"], json!([]), "{}", r.body);
    let r = s.rest.get(&format!("/api/hcp/ops/v1/usage?{window}"), &token).await.unwrap();
    assert_eq!(r.status, 403, "a tenant token reads no other tenant's usage: {}", r.body);
    let r = s.rest.get(&format!("/api/hcp/tenant/v1/projects/other/usage?{window}"), &token).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);

    // Refusals name their field.
    let long_to = rfc3339(Utc::now() + chrono::Duration::days(400));
    for (query, field) in [
        (format!("from={to}&to={from}"), "to"),
        (format!("from={from}&to={long_to}"), "to"),
        (format!("from=yesterday&to={to}"), "from"),
        (format!("{window}&group_by=colour"), "group_by[0]"),
        (format!("to={to}"), "from"),
    ] {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/usage?{query}"), &token).await.unwrap();
        assert_eq!(
            (r.status, r.body["details"]["field"].as_str()),
            (400, Some(field)),
            "{query}: {}",
            r.body
        );
    }
    let r = s.rest.get(&format!("/api/hcp/ops/v1/usage?{window}&project_id=demo"), &ops).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("project_id")), "{}", r.body);
}

/// A VM usage event of VM `vm` in acme/`project` at `at`.
fn event(
    vm: hcp_proto::ids::VmId,
    project: &str,
    at: &str,
    event: &str,
    size: (&str, u32, u32, u32),
) -> UsageEvent {
    UsageEvent {
        id: hcp_proto::ids::EventId::new(),
        at: chrono::DateTime::parse_from_rfc3339(at).unwrap().with_timezone(&Utc),
        tenant_id: "clock".into(),
        project_id: project.into(),
        vm_id: vm,
        event: event.into(),
        flavor: size.0.into(),
        vcpus: size.1,
        memory_mib: size.2,
        disk_gib: size.3,
        job_id: None,
    }
}

#[tokio::test]
async fn the_apis_totals_over_a_known_sequence_are_exact_to_the_second() {
    let opts = StackOptions { backend: hcp_testkit::db::Backend::Postgres, ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    // A known sequence at set times, through the store the stack uses.
    let store = s.db.store().await.unwrap();
    let (a, b) = (hcp_proto::ids::VmId::new(), hcp_proto::ids::VmId::new());
    const SMALL: (&str, u32, u32, u32) = ("small", 1, 512, 10);
    const LARGE: (&str, u32, u32, u32) = ("large", 4, 4096, 40);
    for e in [
        // a: running before the window, resized 10:20:30, stopped 11:00, deleted 11:00:45.
        event(a, "p1", "2021-01-01T09:00:00Z", "started", SMALL),
        event(a, "p1", "2021-01-01T10:20:30Z", "resized", LARGE),
        event(a, "p1", "2021-01-01T11:00:00Z", "stopped", LARGE),
        event(a, "p1", "2021-01-01T11:00:45Z", "deleted", LARGE),
        // b: started 11:59:59.5, still running at the window's end.
        event(b, "p2", "2021-01-01T11:59:59.500Z", "started", SMALL),
    ] {
        store.append_usage_event(&e).await.unwrap();
    }
    let window = "from=2021-01-01T10:00:00Z&to=2021-01-01T12:00:00Z";
    let ops = s.ops_token();
    let r = s
        .rest
        .get(
            &format!("/api/hcp/ops/v1/usage?{window}&tenant_id=clock&group_by=project&group_by=flavor"),
            &ops,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let rows: Vec<(String, String, String, String, String, String)> = r.body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let f = |k: &str| row[k].as_str().unwrap_or_default().to_owned();
            (
                f("project_id"),
                f("flavor"),
                f("vm_seconds"),
                f("vcpu_seconds"),
                f("memory_mib_seconds"),
                f("disk_gib_seconds"),
            )
        })
        .collect();
    let row = |p: &str, f: &str, vm: u64, vcpu: u64, mem: u64, disk: u64| {
        (p.to_owned(), f.to_owned(), vm.to_string(), vcpu.to_string(), mem.to_string(), disk.to_string())
    };
    assert_eq!(
        rows,
        [
            // 10:20:30 to 11:00:00 running large (2370 s), then stopped until 11:00:45.
            row("p1", "large", 2370, 2370 * 4, 2370 * 4096, (2370 + 45) * 40),
            // 10:00:00 to 10:20:30 running small.
            row("p1", "small", 1230, 1230, 1230 * 512, 1230 * 10),
            // Half a second: rounded down to 0 seconds of running...
            row("p2", "small", 0, 0, 256, 5),
        ],
        "{}",
        r.body
    );
    assert_eq!(r.body["rows"][1]["vm_hours"], json!(1230.0 / 3600.0), "{}", r.body);

    // Nothing is used in the future: a window reaching past now ends now,
    // so b, still running, is billed up to the report and no further.
    let (from, to) =
        (chrono::Utc::now() - chrono::Duration::minutes(10), chrono::Utc::now() + chrono::Duration::hours(1));
    let q = format!(
        "from={}&to={}&tenant_id=clock&project_id=p2",
        from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let r = s.rest.get(&format!("/api/hcp/ops/v1/usage?{q}"), &ops).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let end = chrono::DateTime::parse_from_rfc3339(r.body["to"].as_str().unwrap_or_default()).unwrap();
    assert!(
        end <= chrono::Utc::now() && end > chrono::Utc::now() - chrono::Duration::minutes(1),
        "{}",
        r.body
    );
    let billed: u64 = r.body["rows"][0]["vm_seconds"].as_str().unwrap_or("0").parse().unwrap();
    assert!((595..=660).contains(&billed), "about ten minutes, not seventy: {}", r.body);

    // The tenant's view of p1, totals only, as CSV.
    let t = s.tenant_token("clock", &["p1"]);
    let csv = s
        .rest
        .raw_with(
            "GET",
            &format!("/api/hcp/tenant/v1/projects/p1/usage?{window}"),
            Some(&t),
            None,
            &[("accept", "text/csv")],
        )
        .await
        .unwrap();
    let line = csv.text.lines().nth(1).unwrap_or_default().to_owned();
    assert!(
        line.starts_with(&format!(
            ",,,,,3600,{},{},{},0,",
            1230 + 2370 * 4,
            1230 * 512 + 2370 * 4096,
            1230 * 10 + 2415 * 40
        )),
        "{}",
        csv.text
    );
}
