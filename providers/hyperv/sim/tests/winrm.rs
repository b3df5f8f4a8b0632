//! An independent client against the simulator: pywinrm (the Python WinRM
//! library) builds the headers and frames the HTTPS exchange, and
//! `winrm_check.py` checks that Get, Enumerate/Pull, an Invoke with its job,
//! a fault and a bad password come back the way pywinrm understands them.
//!
//! pywinrm lives in a venv (`scripts/services.sh` `ensure_python_winrm`
//! makes it; this test makes it too when it is missing). Without Python or
//! PyPI the test says SKIP, except under CI=true, where it must run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The venv `ensure_python_winrm` makes.
fn venv_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("HCP_WINRM_VENV") {
        return dir.into();
    }
    let cache = std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())).join(".cache")
    });
    cache.join("hcp").join("winrm-venv")
}

fn has_winrm(python: &Path) -> bool {
    Command::new(python).args(["-c", "import winrm, xmltodict"]).output().is_ok_and(|o| o.status.success())
}

/// A python with pywinrm: `HCP_WINRM_PYTHON`, the venv, or a new venv.
fn python_with_winrm() -> Result<PathBuf, String> {
    let venv = venv_dir();
    let in_venv = venv.join("bin").join("python");
    let candidates: Vec<PathBuf> =
        std::env::var("HCP_WINRM_PYTHON").map(PathBuf::from).into_iter().chain([in_venv.clone()]).collect();
    if let Some(p) = candidates.iter().find(|p| has_winrm(p)) {
        return Ok(p.clone());
    }
    let made = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !made.status.success() {
        return Err(format!("python3 -m venv {}: {}", venv.display(), String::from_utf8_lossy(&made.stderr)));
    }
    let pip = Command::new(&in_venv)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "pywinrm"])
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() || !has_winrm(&in_venv) {
        return Err(format!("pip install pywinrm: {}", String::from_utf8_lossy(&pip.stderr)));
    }
    Ok(in_venv)
}

#[tokio::test]
async fn pywinrm_reads_the_simulator() {
    let python = match tokio::task::spawn_blocking(python_with_winrm).await.expect("the venv task") {
        Ok(p) => p,
        Err(msg) => {
            let msg = format!("python3 with pywinrm is not available: {msg}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}");
            }
            println!("SKIP pywinrm_reads_the_simulator: {msg}");
            eprintln!("SKIP pywinrm_reads_the_simulator: {msg}");
            return;
        }
    };
    let (sim, _client) = common::start().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/winrm_check.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(sim.endpoint())
        .arg("hcp")
        .arg("s3cret")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the check ends in time")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("winrm-check: ok"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // pywinrm's envelopes follow the contract: the one violation is the
    // Get the script sends without CreationClassName on purpose.
    let violations = sim.sim.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].contains("InvalidSelectors"), "{violations:#?}");
    assert!(sim.sim.vm("hcp-pywinrm").is_some());
    // Refused: the bad Basic password (one request); under NTLM, pywinrm's
    // first request of each session, sent without credentials to learn the
    // schemes (two), and the bad password's AUTHENTICATE_MESSAGE (one). The
    // good NTLM session's AUTHENTICATE was accepted.
    assert_eq!(sim.sim.stats().unauthorized, 4);
}
