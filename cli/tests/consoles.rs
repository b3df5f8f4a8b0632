//! Serial consoles, the boot log, `web` consoles and how console sessions
//! end, through core and the gateway against the simulator (whose guest
//! has a serial line: a boot banner at every start and a small shell). The
//! same on a real guest is `providers/libvirt/tests/console.rs`.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::console::{self, Closed};
use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use serde_json::json;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const WAIT: Duration = Duration::from_secs(30);
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";

async fn stack(opts: StackOptions) -> TestStack {
    TestStack::start(Path::new(HCP), opts).await.expect("stack starts")
}

/// An ACTIVE VM named `name`; returns its id.
async fn active_vm(rest: &Rest, token: &str, name: &str) -> String {
    let r = rest
        .post(VMS, token, &json!({"name": name, "flavor": "small", "image": "debian-12", "hostname": name}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = rest.finished_job(token, &r.str("job_id"), WAIT).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    r.str("vm_id")
}

async fn job_done(rest: &Rest, token: &str, reply: &hcp_testkit::rest::Reply) {
    assert_eq!(reply.status, 202, "{}", reply.body);
    let job = rest.finished_job(token, &reply.str("job_id"), WAIT).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
}

async fn log(rest: &Rest, token: &str, vm: &str, query: &str) -> hcp_testkit::rest::Reply {
    rest.get(&format!("{VMS}/{vm}/console-log{query}"), token).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serial_console_runs_commands_and_the_boot_log_keeps_what_the_guest_wrote() {
    let s = stack(StackOptions::default()).await;
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s.rest, &t, "serial-1").await;

    // The boot log: the guest's banner, readable through the API.
    let r = log(&s.rest, &t, &vm, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.str("output").contains("HCP-SIM-READY hostname=serial-1"), "{}", r.body);
    assert!(!r.body["truncated"].as_bool().unwrap_or(true), "{}", r.body);

    // A serial session: the shell answers a command typed as bytes, and
    // one typed as a text message (what a terminal page may send).
    let session = s.console(&format!("{VMS}/{vm}"), &t, &json!({"type": "serial"})).await.unwrap();
    assert_eq!(session["type"], "serial");
    assert!(session["web_url"].as_str().unwrap().contains("/console/serial.html?token="), "{session}");
    let mut c = console::open(session["url"].as_str().unwrap(), None).await.unwrap();
    c.read_until("root@serial-1:~# ").await.unwrap().unwrap();
    c.send(b"echo hello from the proxy\r").await.unwrap();
    let out = c.read_until("hello from the proxy\r\nroot@serial-1").await.unwrap().unwrap();
    assert!(out.contains("echo hello from the proxy\r\n"), "the shell echoes: {out:?}");
    c.send_text("hostname\r").await.unwrap();
    c.read_until("hostname\r\nserial-1\r\n").await.unwrap().unwrap();
    c.close().await.unwrap();

    // What the session showed is in the log too; tail_lines cuts it.
    let r = log(&s.rest, &t, &vm, "?tail_lines=2").await;
    assert_eq!((r.status, r.body["lines"].as_u64()), (200, Some(2)), "{}", r.body);
    assert!(r.body["truncated"].as_bool().unwrap(), "{}", r.body);
    assert!(r.str("output").contains("serial-1"), "{}", r.body);
    let whole = log(&s.rest, &t, &vm, "?tail_lines=10000").await;
    assert!(whole.str("output").contains("hello from the proxy"), "{}", whole.body);

    // Stopped, the guest's last words stay readable.
    let stop = s.rest.post(&format!("{VMS}/{vm}:stop"), &t, &json!({})).await.unwrap();
    job_done(&s.rest, &t, &stop).await;
    let r = log(&s.rest, &t, &vm, "?tail_lines=1").await;
    assert_eq!(r.str("output"), "reboot: Power down\r\n", "{}", r.body);
    // And no serial console opens on a stopped VM.
    let r = s.rest.post(&format!("{VMS}/{vm}:console"), &t, &json!({"type": "serial"})).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (409, "CONFLICT"), "{}", r.body);

    // Bad input names the field; another tenant sees nothing.
    for (query, rule) in
        [("?tail_lines=0", "minimum"), ("?tail_lines=10001", "maximum"), ("?tail_lines=x", "")]
    {
        let r = log(&s.rest, &t, &vm, query).await;
        assert_eq!((r.status, r.str("code").as_str()), (400, "INVALID_ARGUMENT"), "{query}: {}", r.body);
        assert_eq!(r.body["details"]["field"], "tail_lines", "{query}: {}", r.body);
        if !rule.is_empty() {
            assert_eq!(r.body["details"]["rule"], rule, "{query}: {}", r.body);
        }
    }
    let other = s.tenant_token("globex", &["demo"]);
    let r = log(&s.rest, &other, &vm, "").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = log(&s.rest, &t, "not-a-uuid", "").await;
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("vm_id")), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_simulators_vnc_console_shows_each_vm_its_own_screen() {
    // What a newcomer on the quick start gets: a VNC server per sim VM,
    // reached through the proxy with the VM's own password.
    let s = stack(StackOptions::default()).await;
    let t = s.tenant_token("acme", &["demo"]);
    let (a, b) = (active_vm(&s.rest, &t, "vnc-a").await, active_vm(&s.rest, &t, "vnc-b").await);
    for (vm, name) in [(&a, "vnc-a"), (&b, "vnc-b")] {
        let session = s.console(&format!("{VMS}/{vm}"), &t, &json!({"type": "vnc"})).await.unwrap();
        let mut c = console::open(session["url"].as_str().unwrap(), None).await.unwrap();
        let init = c.handshake().await.unwrap().unwrap();
        assert_eq!(
            (init.name.as_str(), init.width, init.height),
            (format!("hcp-sim {name}").as_str(), 640, 400)
        );
        c.close().await.unwrap();
    }
    // The console page in Chromium shows it.
    let session = s.console(&format!("{VMS}/{a}"), &t, &json!({"type": "web"})).await.unwrap();
    let shot = console::artifacts().join("console-sim-vnc.png");
    let seen = console::browser(session["url"].as_str().unwrap(), &shot, &["--expect", "connected"]);
    assert_eq!(seen["state"], "connected", "{seen}");
    assert!(seen["non_background_pixels"].as_u64().unwrap_or(0) > 500, "no text on the screen: {seen}");
    // A stopped VM's screen is gone: its password opens nothing.
    let stop = s.rest.post(&format!("{VMS}/{b}:stop"), &t, &json!({})).await.unwrap();
    job_done(&s.rest, &t, &stop).await;
    let r = s.rest.post(&format!("{VMS}/{b}:console"), &t, &json!({"type": "vnc"})).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn open_sessions_end_when_their_vm_stops_or_goes_away() {
    let s = stack(StackOptions::default()).await;
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s.rest, &t, "revoke-1").await;
    let vm_path = format!("{VMS}/{vm}");

    // Stopping the VM ends the open session, with why.
    let session = s.console(&vm_path, &t, &json!({"type": "serial"})).await.unwrap();
    let mut c = console::open(session["url"].as_str().unwrap(), None).await.unwrap();
    c.read_until("# ").await.unwrap().unwrap();
    let stop = s.rest.post(&format!("{vm_path}:stop"), &t, &json!({})).await.unwrap();
    job_done(&s.rest, &t, &stop).await;
    let closed = c.closed().await.unwrap();
    assert_eq!(closed, Closed { code: 4410, reason: "the vm was stopped".into(), rfb: false });

    // Deleting it ends the next one.
    let start = s.rest.post(&format!("{vm_path}:start"), &t, &json!({})).await.unwrap();
    job_done(&s.rest, &t, &start).await;
    let session = s.console(&vm_path, &t, &json!({"type": "serial"})).await.unwrap();
    let mut c = console::open(session["url"].as_str().unwrap(), None).await.unwrap();
    c.read_until("# ").await.unwrap().unwrap();
    let delete = s.rest.delete(&vm_path, &t).await.unwrap();
    job_done(&s.rest, &t, &delete).await;
    let closed = c.closed().await.unwrap();
    assert_eq!((closed.code, closed.reason.as_str()), (4410, "the vm was deleted"));

    // Both ends are in the audit trail with their reasons (the proxy
    // reports an end after closing the websocket).
    let ops = s.ops_token();
    let path = format!("/api/hcp/ops/v1/audit-events?resource_id={vm}&action=vm.console");
    let closes = hcp_testkit::wait_until(WAIT, "both ends audited", || async {
        let audit = s.rest.get(&path, &ops).await?;
        let closes: Vec<String> = audit.body["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["outcome"].as_str().filter(|o| o.starts_with("closed")).map(str::to_owned))
            .collect();
        Ok((closes.len() == 2).then_some(closes))
    })
    .await
    .unwrap();
    assert_eq!(closes, ["closed: the vm was stopped", "closed: the vm was deleted"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_stops_behind_hcps_back_loses_its_open_sessions() {
    // The reconciler adopts what the hypervisor says: a VM powered off out
    // of band is recorded STOPPED, and its open console ends with why.
    let opts = StackOptions {
        core_toml: "[reconciler]\ninterval_seconds = 1\npower = \"adopt\"\n".into(),
        ..Default::default()
    };
    let s = stack(opts).await;
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s.rest, &t, "drift-1").await;
    let session = s.console(&format!("{VMS}/{vm}"), &t, &json!({"type": "serial"})).await.unwrap();
    let mut c = console::open(session["url"].as_str().unwrap(), None).await.unwrap();
    c.read_until("# ").await.unwrap().unwrap();
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await.unwrap());
    sim.set_power_state(hcp_proto::sim::SetPowerStateRequest {
        vm_id: vm.clone(),
        power_state: hcp_proto::provider::PowerState::Shutoff as i32,
    })
    .await
    .unwrap();
    let closed = c.closed().await.unwrap();
    assert_eq!((closed.code, closed.reason.as_str()), (4410, "the vm stopped outside HCP"));
    let r = s.rest.get(&format!("{VMS}/{vm}"), &t).await.unwrap();
    assert_eq!(r.str("status"), "STOPPED", "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn web_consoles_open_the_page_of_what_the_provider_offers() {
    // VNC and serial: web is the VNC page.
    let s = stack(StackOptions::default()).await;
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s.rest, &t, "web-1").await;
    let web = s.console(&format!("{VMS}/{vm}"), &t, &json!({"type": "web"})).await.unwrap();
    assert_eq!(web["type"], "web");
    let url = web["url"].as_str().unwrap();
    assert!(url.starts_with("http://") && url.contains("/console/vnc.html?token="), "{web}");
    assert_eq!(web["url"], web["web_url"], "{web}");
    drop(s);

    // Serial only: web is the terminal page. Neither: refused, naming the
    // flag of the first page type.
    for (caps, page) in [("console_serial", Some("/console/serial.html?token=")), ("cloud_init", None)] {
        let s = stack(StackOptions { sim_capabilities: caps.into(), ..Default::default() }).await;
        let t = s.tenant_token("acme", &["demo"]);
        let vm = active_vm(&s.rest, &t, "web-2").await;
        let r = s.rest.post(&format!("{VMS}/{vm}:console"), &t, &json!({"type": "web"})).await.unwrap();
        match page {
            Some(page) => {
                assert_eq!(r.status, 200, "{}", r.body);
                assert!(r.str("url").contains(page), "{}", r.body);
            }
            None => {
                assert_eq!((r.status, r.str("code").as_str()), (409, "FEATURE_NOT_SUPPORTED"), "{}", r.body);
                assert_eq!(r.body["details"]["capability"], "supports_console_vnc", "{}", r.body);
            }
        }
        // Without supports_console_log the boot log is refused the same way.
        let r = log(&s.rest, &t, &vm, "").await;
        assert_eq!((r.status, r.str("code").as_str()), (409, "FEATURE_NOT_SUPPORTED"), "{}", r.body);
        assert_eq!(r.body["details"]["capability"], "supports_console_log", "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn console_pages_are_not_cached_framed_or_scripted_from_elsewhere_and_big_messages_end_the_session() {
    let s = stack(StackOptions::default()).await;
    for page in ["/console/vnc.html", "/console/serial.html", "/console/serial.js"] {
        let r = s.rest.raw("GET", page, None, None).await.unwrap();
        assert_eq!(r.status, 200, "{page}");
        let h = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert_eq!(h("cache-control"), "no-store", "{page}");
        assert_eq!(h("x-frame-options"), "DENY", "{page}");
        assert_eq!(h("referrer-policy"), "no-referrer", "{page}");
        let csp = h("content-security-policy");
        for directive in
            ["frame-ancestors 'none'", "script-src 'self'", "connect-src 'self'", "default-src 'none'"]
        {
            assert!(csp.contains(directive), "{page}: {directive} not in {csp}");
        }
    }
    // Only the pages' own modules are served from node_modules.
    for path in ["/console/modules/playwright-core/package.json", "/console/modules/@xterm/xterm/../../x"] {
        let r = s.rest.raw("GET", path, None, None).await.unwrap();
        assert_eq!(r.status, 404, "{path}");
    }

    // A client message over 1 MiB ends the session with 1009 and does not
    // reach the guest.
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s.rest, &t, "big-1").await;
    let session = s.console(&format!("{VMS}/{vm}"), &t, &json!({"type": "serial"})).await.unwrap();
    let mut c = console::open(session["url"].as_str().unwrap(), None).await.unwrap();
    c.read_until("# ").await.unwrap().unwrap();
    let mut big = vec![b'a'; (1 << 20) + 1];
    big.extend_from_slice(b"\recho SHOULD-NOT-RUN\r");
    let _ = c.send(&big).await;
    let closed = c.closed().await.unwrap();
    assert_eq!(closed.code, 1009, "{closed:?}");
    let r = log(&s.rest, &t, &vm, "?tail_lines=10000").await;
    assert!(!r.str("output").contains("SHOULD-NOT-RUN"), "{}", r.body);
}
