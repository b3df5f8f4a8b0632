//! Usage export over the REST API: a tenant reads its project's usage and
//! an operator any tenant's, as JSON or CSV (`Accept: text/csv`), grouped
//! as asked; bad windows and groupings are refused naming the field. (The
//! totals to the second over a controlled clock are the store suite's
//! `usage_totals_follow_a_known_sequence_to_the_second` and the domain's
//! table tests.)

use std::path::Path;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
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
