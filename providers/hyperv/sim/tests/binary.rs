//! The `hcp-hyperv-sim` binary as system tests run it: it announces its
//! address, writes its certificate (`--cert-out`) and its control address
//! beside it (`.control`), serves WS-Management, and answers the JSON
//! control API on the plain-HTTP control port.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};

/// A plain-HTTP request to the control port.
async fn control(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the control port");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("an answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Stops the binary also when an assertion fails.
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).expect("PEM")
}

#[tokio::test]
async fn the_binary_serves_wsman_and_the_control_api() {
    let dir = std::env::temp_dir().join(format!("hcp-hyperv-sim-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("sim.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hcp-hyperv-sim"))
        .arg("--cert-out")
        .arg(&cert)
        .args(["--control-listen", "127.0.0.1:0", "--user", "admin=pw", "--switch", "lan", "--job-ms", "10"])
        .arg("--disk-dir")
        .arg(dir.join("disks"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let _stop = Stop(child);
    let ready = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.contains("hcp_ready"))
        }),
    )
    .await
    .expect("ready in time")
    .unwrap()
    .expect("a readiness line");
    let addr: std::net::SocketAddr =
        ready.split("\"addr\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap().parse().unwrap();
    let control_addr = std::fs::read_to_string(dir.join("sim.control")).expect("the .control file");
    let mut c = Client::from_parts(addr, pem_to_der(&std::fs::read_to_string(&cert).unwrap()));
    c.user = "admin".into();
    c.password = "pw".into();

    let settings = embedded("Msvm_VirtualSystemSettingData", &[P::S("ElementName", "string", "hcp-bin")]);
    c.expect_done(
        c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>")).await,
    )
    .await;
    assert_eq!(c.query_prop("SELECT * FROM Msvm_VirtualEthernetSwitch", "ElementName").await, ["lan"]);

    let (status, vms) = control(&control_addr, "GET", "/_sim/vms", "").await;
    assert_eq!(status, 200);
    let vms: serde_json::Value = serde_json::from_str(&vms).unwrap();
    assert_eq!(vms[0]["name"], "hcp-bin");
    assert_eq!(vms[0]["state"], 3);
    let (status, _) =
        control(&control_addr, "POST", "/_sim/faults", r#"{"in_use": {"DefineSystem": 1}}"#).await;
    assert_eq!(status, 204);
    let busy =
        c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>")).await;
    assert_eq!(busy.return_value(), 32774);
    let (status, _) = control(&control_addr, "POST", "/_sim/faults", r#"{"no_such_fault": true}"#).await;
    assert_eq!(status, 400);
    let (_, violations) = control(&control_addr, "GET", "/_sim/violations", "").await;
    assert_eq!(violations, "[]");
    let (_, stats) = control(&control_addr, "GET", "/_sim/stats", "").await;
    assert!(stats.contains("\"unauthorized\":0"), "{stats}");

    let _ = std::fs::remove_dir_all(&dir);
}
