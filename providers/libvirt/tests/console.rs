//! Tenant consoles end to end with a real guest: the API issues a
//! single-use token, the gateway's console proxy redeems it, authenticates
//! to the guest's VNC server with the password the tenant never sees, and
//! relays RFB to headless Chromium running noVNC (the console page), whose
//! screenshot must show the guest's screen. Then every way a token must be
//! refused, and the maximum session time. The same for SPICE (spice-html5
//! in Chromium, one websocket per channel under one token), the serial
//! console and the `web` type.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Kvm, VMS, provider_console};
use hcp_testkit::console::{SPICE_DISPLAY, SPICE_MAIN, artifacts, session};
use hcp_testkit::stack::StackOptions;
use serde_json::{Value, json};

/// An ACTIVE tiny VM whose guest has booted (its banner is on the screen).
async fn booted_vm(kvm: &Kvm, name: &str) -> String {
    let (vm, job) = kvm.create(name, json!({"hostname": name})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&vm, "HCP-GUEST-READY", 1).await;
    vm
}

/// Asks for a console as `token`'s tenant; returns the reply body, with the
/// URLs pointed at the test's gateway.
async fn console(kvm: &Kvm, token: &str, vm: &str) -> Value {
    kvm.stack.console(&format!("{VMS}/{vm}"), token, &json!({"type": "vnc"})).await.unwrap()
}

/// The console page in Chromium, waiting for `expect`.
fn browser(url: &str, out: &Path, expect: &str) -> Value {
    hcp_testkit::console::browser(url, out, &["--expect", expect])
}

/// The stack's log lines about consoles (the gateway's proxy and core's
/// broker), the last `n`: what a failed browser check is read with.
fn console_log(kvm: &Kvm, n: usize) -> String {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(kvm.stack.dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        lines.extend(text.lines().filter(|l| l.contains("console")).map(|l| format!("{name}: {l}")));
    }
    lines.split_off(lines.len().saturating_sub(n)).join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_page_shows_the_guest_screen_in_chromium() {
    let kvm = Kvm::start("").await;
    let vm = booted_vm(&kvm, "console-1").await;
    let session = console(&kvm, &kvm.tenant, &vm).await;
    assert_eq!(session["type"], "vnc");
    let page = session["web_url"].as_str().unwrap().to_owned();

    let shot = artifacts().join("console-vnc.png");
    let seen = browser(&page, &shot, "connected");
    assert_eq!(seen["state"], "connected", "{seen}\n{}", console_log(&kvm, 40));
    assert!(seen["canvas"]["width"].as_u64().unwrap_or(0) >= 640, "{seen}");
    // Text on the guest's screen: thousands of pixels off the background,
    // and the guest's own banner (white on blue, written into the VGA text
    // buffer after it booted) besides the firmware's grey text on black.
    assert!(seen["non_background_pixels"].as_u64().unwrap_or(0) > 1000, "{seen}");
    assert!(seen["distinct_colours"].as_u64().unwrap_or(0) >= 3, "no guest banner on the screen: {seen}");
    assert!(
        std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 0,
        "no screenshot at {}",
        shot.display()
    );

    // The same page again: the token was used, and the page says so.
    let again = browser(&page, &artifacts().join("console-vnc-reused.png"), "refused");
    assert_eq!(
        (again["state"].as_str(), again["reason"].as_str()),
        (Some("refused"), Some("console token already used")),
        "{again}"
    );

    // Audited: issued, opened, refused, closed.
    let audit = kvm
        .stack
        .rest
        .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={vm}"), &kvm.ops)
        .await
        .unwrap()
        .body;
    let outcomes: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "vm.console")
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    for want in ["issued", "opened", "refused: console token already used"] {
        assert!(outcomes.contains(&want), "no {want:?} in {outcomes:?}");
    }
    common::wait_until_audit(&kvm, &vm, "closed: ").await;

    // The VNC password appears in no API answer and in no log.
    let password = provider_console(&kvm, &vm, "vnc").await.password;
    assert_eq!(password.len(), 8);
    let answers = format!("{session}{audit}");
    assert!(!answers.contains(&password), "the password leaked into an API answer");
    for entry in std::fs::read_dir(kvm.stack.dir()).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(!text.contains(&password), "the password is in {}", entry.path().display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn console_tokens_are_refused_when_they_must_be() {
    let opts = StackOptions {
        console_toml: "max_session_seconds = 3\ntoken_ttl_seconds = 5\n".into(),
        ..Default::default()
    };
    let kvm = Kvm::start_with(opts).await;
    let vm = booted_vm(&kvm, "console-2").await;

    // A good token opens an RFB session without a password prompt, which
    // the proxy closes at the maximum session time.
    let url = console(&kvm, &kvm.tenant, &vm).await["url"].as_str().unwrap().to_owned();
    let closed = session(&url, None).await.unwrap();
    assert!(closed.rfb, "{closed:?}");
    assert_eq!((closed.code, closed.reason.as_str()), (4408, "maximum console session time reached"));
    // Once is once.
    let closed = session(&url, None).await.unwrap();
    assert_eq!(
        (closed.code, closed.reason.as_str(), closed.rfb),
        (4403, "console token already used", false)
    );

    // Unknown tokens, and a browser on another site.
    let bogus = format!("ws://{}/console/vnc?token=bogus", kvm.stack.gateway);
    let closed = session(&bogus, None).await.unwrap();
    assert_eq!((closed.code, closed.reason.as_str()), (4403, "unknown console token"));
    let url = console(&kvm, &kvm.tenant, &vm).await["url"].as_str().unwrap().to_owned();
    let err = session(&url, Some("http://evil.example")).await.unwrap_err();
    assert!(err.contains("403"), "{err}");
    // The refused origin did not spend the token.
    assert!(session(&url, Some(&format!("http://{}", kvm.stack.gateway))).await.unwrap().rfb);

    // Past expires_at.
    let expiring = console(&kvm, &kvm.tenant, &vm).await;
    let expires: chrono::DateTime<chrono::Utc> = expiring["expires_at"].as_str().unwrap().parse().unwrap();
    hcp_testkit::wait_until(Duration::from_secs(120), "the token to expire", || async {
        Ok((chrono::Utc::now() > expires).then_some(()))
    })
    .await
    .unwrap();
    let closed = session(expiring["url"].as_str().unwrap(), None).await.unwrap();
    assert_eq!((closed.code, closed.reason.as_str()), (4403, "console token expired"));

    // Another tenant cannot get a console of this VM at all.
    let evil = kvm.stack.tenant_token("evil", &["demo"]);
    let r = kvm.stack.rest.post(&format!("{VMS}/{vm}:console"), &evil, &json!({})).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);

    // Deleting the VM revokes its unused tokens.
    let pending = console(&kvm, &kvm.tenant, &vm).await["url"].as_str().unwrap().to_owned();
    let r = kvm.stack.rest.delete(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
    let closed = session(&pending, None).await.unwrap();
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4403, "console token revoked: the vm was stopped, moved or deleted")
    );
}

/// The audit outcomes of the VM's console events.
async fn console_outcomes(kvm: &Kvm, vm: &str) -> Vec<String> {
    let audit = kvm
        .stack
        .rest
        .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={vm}"), &kvm.ops)
        .await
        .unwrap()
        .body;
    audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "vm.console")
        .filter_map(|e| e["outcome"].as_str().map(str::to_owned))
        .collect()
}

/// Redeems `token` with core's console broker as the gateway's proxy
/// would, for a SPICE channel joining its session from `client_address`.
async fn join_channel(kvm: &Kvm, token: &str, client_address: &str) -> Result<(), tonic::Status> {
    let proxy = kvm.stack.token(None, &[], &["console.proxy"], 300);
    let mut broker = hcp_proto::console::console_broker_service_client::ConsoleBrokerServiceClient::new(
        kvm.stack.core_channel().await.unwrap(),
    );
    let mut req = tonic::Request::new(hcp_proto::console::RedeemConsoleRequest {
        token: token.to_owned(),
        protocol: "spice".into(),
        client_address: client_address.to_owned(),
        channel: true,
    });
    req.metadata_mut().insert("authorization", format!("Bearer {proxy}").parse().unwrap());
    broker.redeem_console(req).await.map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spice_console_shows_the_guest_screen_and_admits_one_session() {
    let kvm = Kvm::start("").await;
    let vm = booted_vm(&kvm, "console-4").await;

    // The provider's SPICE server: its own port and password, beside VNC's.
    let spice = provider_console(&kvm, &vm, "spice").await;
    let vnc = provider_console(&kvm, &vm, "vnc").await;
    assert_eq!((spice.protocol.as_str(), spice.host.as_str()), ("spice", vnc.host.as_str()));
    assert_ne!(spice.port, vnc.port);
    assert_eq!(spice.password.len(), 24, "a generated SPICE password");

    // spice-html5 in Chromium: the main channel opens the session, the
    // display, inputs and cursor channels join it with the same token, and
    // the guest's screen (its banner) shows on the page's canvas.
    let session =
        kvm.stack.console(&format!("{VMS}/{vm}"), &kvm.tenant, &json!({"type": "spice"})).await.unwrap();
    assert_eq!(session["type"], "spice");
    let page = session["web_url"].as_str().unwrap().to_owned();
    assert!(page.contains("/console/spice.html?token="), "{session}");
    let shot = artifacts().join("console-spice.png");
    let seen = browser(&page, &shot, "connected");
    assert_eq!(
        seen["state"],
        "connected",
        "{seen}
{}",
        console_log(&kvm, 60)
    );
    assert!(seen["canvas"]["width"].as_u64().unwrap_or(0) >= 640, "{seen}");
    assert!(seen["non_background_pixels"].as_u64().unwrap_or(0) > 1000, "{seen}");
    assert!(seen["distinct_colours"].as_u64().unwrap_or(0) >= 3, "no guest banner on the screen: {seen}");
    assert!(
        std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 0,
        "no screenshot at {}",
        shot.display()
    );

    // Chromium is gone, so the session ended (every channel's end is
    // audited): the token opens no second session, and no channel joins
    // the ended one.
    hcp_testkit::wait_until(Duration::from_secs(30), "every channel's end audited", || async {
        let outcomes = console_outcomes(&kvm, &vm).await;
        let opened = outcomes.iter().filter(|o| *o == "opened").count();
        let closed = outcomes.iter().filter(|o| o.starts_with("closed: ")).count();
        Ok((opened > 0 && closed == opened).then_some(()))
    })
    .await
    .unwrap();
    let url = session["url"].as_str().unwrap().to_owned();
    let mut again = hcp_testkit::console::open(&url, None).await.unwrap();
    let closed = again.spice_link(0, SPICE_MAIN).await.unwrap().unwrap_err();
    assert_eq!((closed.code, closed.reason.as_str()), (4403, "console token already used"));
    let mut late = hcp_testkit::console::open(&url, None).await.unwrap();
    let closed = late.spice_link(7, SPICE_DISPLAY).await.unwrap().unwrap_err();
    assert_eq!((closed.code, closed.reason.as_str()), (4403, "console channel refused: its session ended"));

    // Each channel was audited: the main one and those that joined it.
    let outcomes = console_outcomes(&kvm, &vm).await;
    let opened = outcomes.iter().filter(|o| *o == "opened").count();
    assert!(opened >= 3, "main, display and inputs channels at least: {outcomes:?}");
    assert!(outcomes.iter().any(|o| o == "refused: console token already used"), "{outcomes:?}");

    // A second session: the proxy's ticket opens it (the client's is
    // empty) and, while it is open, a channel from this client is admitted
    // and one from another address is not; a second main channel is a
    // second session and is refused.
    let session =
        kvm.stack.console(&format!("{VMS}/{vm}"), &kvm.tenant, &json!({"type": "spice"})).await.unwrap();
    let (url, token) = (session["url"].as_str().unwrap(), session["token"].as_str().unwrap());
    let mut main = hcp_testkit::console::open(url, None).await.unwrap();
    assert_eq!(
        main.spice_link(0, SPICE_MAIN).await.unwrap(),
        Ok(0),
        "the SPICE server took the proxy's ticket"
    );
    let refused = join_channel(&kvm, token, "198.51.100.9").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refused.message(), "console channel refused: it comes from another client than its session");
    join_channel(&kvm, token, "127.0.0.1").await.unwrap();
    let mut second = hcp_testkit::console::open(url, None).await.unwrap();
    let closed = second.spice_link(0, SPICE_MAIN).await.unwrap().unwrap_err();
    assert_eq!((closed.code, closed.reason.as_str()), (4403, "console token already used"));
    // Its main channel closed, the session ended: no channel joins it now.
    main.close().await.unwrap();
    hcp_testkit::wait_until(Duration::from_secs(30), "the session to end with its main channel", || async {
        Ok(join_channel(&kvm, token, "127.0.0.1")
            .await
            .err()
            .filter(|e| e.message() == "console channel refused: its session ended")
            .map(drop))
    })
    .await
    .unwrap();

    // The SPICE password appears in no API answer and in no log.
    let answers = format!("{session}{outcomes:?}");
    assert!(!answers.contains(&spice.password), "the password leaked into an API answer");
    for entry in std::fs::read_dir(kvm.stack.dir()).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(!text.contains(&spice.password), "the password is in {}", entry.path().display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_serial_console_boot_log_and_web_console_of_a_real_guest() {
    let kvm = Kvm::start("").await;
    let vm = booted_vm(&kvm, "console-3").await;

    // The boot log through the API: what the real guest printed as it booted.
    let path = format!("{VMS}/{vm}/console-log?tail_lines=200");
    let r = kvm.stack.rest.get(&path, &kvm.tenant).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let boot = r.str("output");
    assert!(boot.contains("HCP-GUEST-READY hostname=console-3"), "{}", r.body);
    assert!(boot.contains("HCP-GUEST: seed"), "{}", r.body);
    // The same through the CLI.
    let cli = std::process::Command::new(common::hcp_exe())
        .args(["vm", "console-log", &vm, "--tail", "5"])
        .env("HCP_ENDPOINT", format!("http://{}", kvm.stack.gateway))
        .env("HCP_TOKEN", &kvm.tenant)
        .env("HCP_PROJECT", "demo")
        .env("HCP_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success() && printed.contains("HCP-GUEST-READY hostname=console-3"), "{printed}");

    // The serial console in the browser: a command typed on the page runs
    // in the guest's shell, and its answer comes back to the page.
    let session =
        kvm.stack.console(&format!("{VMS}/{vm}"), &kvm.tenant, &json!({"type": "serial"})).await.unwrap();
    assert_eq!(session["type"], "serial");
    let page = session["web_url"].as_str().unwrap().to_owned();
    let seen = hcp_testkit::console::browser(
        &page,
        &artifacts().join("console-serial.png"),
        &["--expect", "typed", "--type", "echo $((6*7))-serial-ok", "--until", "42-serial-ok"],
    );
    assert_eq!(seen["error"], Value::Null, "{seen}\n{}", console_log(&kvm, 40));
    assert!(seen["terminal"].as_str().unwrap().contains("42-serial-ok"), "{seen}");
    // What the session printed is in the boot log too (one serial line).
    common::wait_until_audit(&kvm, &vm, "closed: ").await;
    let r = kvm.stack.rest.get(&path, &kvm.tenant).await.unwrap();
    assert!(r.str("output").contains("42-serial-ok"), "{}", r.body);

    // `web`: the page of the VNC console, showing the guest's screen.
    let web = kvm.stack.console(&format!("{VMS}/{vm}"), &kvm.tenant, &json!({"type": "web"})).await.unwrap();
    assert_eq!(web["type"], "web");
    let url = web["url"].as_str().unwrap();
    assert!(url.contains("/console/vnc.html?token="), "{web}");
    let seen = browser(url, &artifacts().join("console-web.png"), "connected");
    assert_eq!(seen["state"], "connected", "{seen}\n{}", console_log(&kvm, 40));

    // Stopped, the boot log still reads, with the guest's last words.
    let r = kvm.stack.rest.post(&format!("{VMS}/{vm}:stop"), &kvm.tenant, &json!({})).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
    let r = kvm.stack.rest.get(&path, &kvm.tenant).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.str("output").contains("HCP-GUEST: power button, powering off"), "{}", r.body);
}
