//! The simulated guest's serial line: what it writes there (a boot banner
//! at every start, a power-down line at every stop, and everything its
//! shell echoes), kept per VM as the console log; and a small shell behind
//! the serial console, so that `hcp vm console --type serial` and the
//! browser's terminal have something to talk to.

use std::sync::{Arc, Mutex};

use hcp_provider_sdk::serial::{MAX_LOG_BYTES, SerialStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
                    0x7f | 0x08 if line.pop().is_some() => out.push_str("\u{8} \u{8}"),
                    0x7f | 0x08 => {}
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
