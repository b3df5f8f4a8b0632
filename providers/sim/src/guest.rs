//! The simulated guest's serial line: what it writes there (a boot banner
//! at every start, a power-down line at every stop, and everything its
//! shell echoes), kept per VM as the console log; and a small shell behind
//! the serial console, so that `hcp vm console --type serial` and the
//! browser's terminal have something to talk to.

use std::sync::{Arc, Mutex};

use hcp_provider_sdk::serial::{MAX_LOG_BYTES, SerialStream};
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use hcp_sim_screen::{Desktop, Screen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Sim;

/// The simulated screen's size.
pub(crate) const SCREEN: (u16, u16) = (640, 400);

/// Consoles need a running VM.
pub(crate) fn running(power: pb::PowerState) -> Result<(), ProviderError> {
    if power == pb::PowerState::Running {
        Ok(())
    } else {
        Err(ProviderError::new(ErrorKind::InvalidState, "vm is not running"))
    }
}

/// A VM's VNC password: 8 letters and digits (VNC authentication uses the
/// first 8 bytes).
pub(crate) fn vnc_password() -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(8).map(char::from).collect()
}

/// The simulator's VNC server: one listener for every VM. The password a
/// client answers the challenge with names the VM (each has its own), whose
/// screen it then sees: the VM's facts as text, on a colour of its own.
pub(crate) async fn serve_vnc(listener: tokio::net::TcpListener, sim: Sim) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "simulated VNC server: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let sim = sim.clone();
        tokio::spawn(async move {
            let authorize = |challenge: &[u8; 16], response: &[u8; 16]| {
                let s = sim.lock();
                let (id, vm) = s.vms.iter().find(|(_, vm)| {
                    vm.power == pb::PowerState::Running
                        && !vm.vnc_password.is_empty()
                        && hcp_sim_screen::vnc_response(&vm.vnc_password, challenge) == *response
                })?;
                let bytes = id.as_bytes();
                let shade = |i: usize| bytes.get(i).map_or(32, |b| b % 96);
                let lines = [
                    "HCP simulated VM".to_owned(),
                    String::new(),
                    format!("hostname   {}", vm.hostname),
                    format!("vm         {id}"),
                    format!("native id  {}", vm.native_id),
                    format!("host       {}", vm.host),
                    format!("size       {} vCPU, {} MiB, {} GiB", vm.vcpus, vm.memory_mib, vm.disk_gib),
                    String::new(),
                    format!("HCP-SIM-READY hostname={}", vm.hostname),
                ];
                let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
                Some(Desktop {
                    name: format!("hcp-sim {}", vm.hostname),
                    screen: Screen::text(SCREEN.0, SCREEN.1, [shade(0), shade(1), 64 + shade(2)], &lines),
                })
            };
            if let Err(e) = hcp_sim_screen::serve(&mut conn, authorize).await {
                tracing::debug!(error = %e, "simulated VNC session ended");
            }
        });
    }
}

/// The end of what a guest wrote on its serial port: at most
/// [`MAX_LOG_BYTES`], older bytes dropped first.
#[derive(Debug, Clone, Default)]
pub(crate) struct SerialLog {
    bytes: Vec<u8>,
    /// Whether anything was dropped from the front.
    dropped: bool,
}

impl SerialLog {
    pub(crate) fn write(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > MAX_LOG_BYTES {
            let excess = self.bytes.len() - MAX_LOG_BYTES;
            self.bytes.drain(..excess);
            self.dropped = true;
        }
    }

    pub(crate) fn tail(&self, lines: u32) -> hcp_provider_sdk::pb::ConsoleLog {
        hcp_provider_sdk::serial::tail(&self.bytes, lines, self.dropped)
    }
}

/// What the guest prints when it boots.
pub(crate) fn boot_banner(hostname: &str, native_id: &str) -> String {
    format!(
        "[    0.000000] Linux version 6.1.0-sim (hcp-sim) #1 SMP\r\n\
         [    0.000000] Command line: console=ttyS0\r\n\
         [    0.412000] Run /init as init process\r\n\
         HCP-SIM-READY hostname={hostname} native_id={native_id}\r\n"
    )
}

/// What the guest prints when it powers down.
pub(crate) const POWER_DOWN: &str = "[  OK  ] Reached target Power-Off.\r\nreboot: Power down\r\n";

/// Longest command line the shell keeps.
const MAX_LINE: usize = 4096;

/// Where the shell's output also goes (the VM's console log).
pub(crate) type LogSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Starts the shell for one serial session; returns the session's end of
/// the line. The shell echoes what it is sent (as a terminal's line
/// discipline would), runs `echo`, `hostname`, `uname` and `exit`, and
/// answers anything else as not found.
pub(crate) fn shell(hostname: String, log: LogSink) -> Box<dyn SerialStream> {
    let (session, guest) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut rx, mut tx) = tokio::io::split(guest);
        let say = |text: String| {
            log(text.as_bytes());
            text
        };
        let prompt = format!("root@{hostname}:~# ");
        if tx
            .write_all(say(format!("\r\n{hostname} login: root (automatic login)\r\n{prompt}")).as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut line = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut out = String::new();
            for &b in &buf[..n] {
                match b {
                    b'\r' | b'\n' => {
                        let command = String::from_utf8_lossy(&line).trim().to_owned();
                        line.clear();
                        out.push_str("\r\n");
                        if command == "exit" {
                            let _ = tx.write_all(say(out + "logout\r\n").as_bytes()).await;
                            return;
                        }
                        out.push_str(&run(&command, &hostname));
                        out.push_str(&prompt);
                    }
                    // Backspace (DEL, as terminals send it) and ^H.
                    0x7f | 0x08 => out.push_str(if line.pop().is_some() { "\u{8} \u{8}" } else { "" }),
                    // ^C: the line is dropped.
                    0x03 => {
                        line.clear();
                        out.push_str("^C\r\n");
                        out.push_str(&prompt);
                    }
                    b if b >= 0x20 && line.len() < MAX_LINE => {
                        line.push(b);
                        out.push(char::from(b));
                    }
                    _ => {}
                }
            }
            if !out.is_empty() && tx.write_all(say(out).as_bytes()).await.is_err() {
                return;
            }
        }
    });
    Box::new(session)
}

/// One command's output, lines ending in CR LF.
fn run(command: &str, hostname: &str) -> String {
    let (name, args) = command.split_once(' ').map_or((command, ""), |(n, a)| (n, a.trim()));
    match name {
        "" => String::new(),
        "echo" => format!("{args}\r\n"),
        "hostname" => format!("{hostname}\r\n"),
        "uname" if args == "-a" => format!("Linux {hostname} 6.1.0-sim #1 SMP x86_64 GNU/Linux\r\n"),
        "uname" => "Linux\r\n".to_owned(),
        _ => format!("sh: {}: not found\r\n", name.chars().take(64).collect::<String>()),
    }
}

/// A shared log sink writing into `log` of the VM under `vm_id`.
pub(crate) fn sink<S: Send + 'static>(
    state: Arc<Mutex<S>>,
    vm_id: String,
    log_of: for<'a> fn(&'a mut S, &str) -> Option<&'a mut SerialLog>,
) -> LogSink {
    Arc::new(move |data: &[u8]| {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = log_of(&mut s, &vm_id) {
            log.write(data);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_last_mib() {
        let mut log = SerialLog::default();
        log.write(b"first\n");
        assert!(!log.tail(10).truncated);
        log.write(&vec![b'x'; MAX_LOG_BYTES]);
        let t = log.tail(10);
        assert!(t.truncated && !t.output.contains("first"));
        assert_eq!(t.output.len(), MAX_LOG_BYTES);
    }

    #[tokio::test]
    async fn the_shell_echoes_and_answers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut s = shell("web-1".into(), Arc::new(move |d: &[u8]| log.lock().unwrap().extend_from_slice(d)));
        s.write_all(b"echo hello there\rhostname\rnope\rexit\r").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        for expected in [
            "web-1 login: root",
            "root@web-1:~# echo hello there\r\nhello there\r\n",
            "hostname\r\nweb-1\r\n",
            "sh: nope: not found",
            "logout",
        ] {
            assert!(out.contains(expected), "{expected:?} not in {out:?}");
        }
        assert_eq!(String::from_utf8(seen.lock().unwrap().clone()).unwrap(), out);
    }
}
