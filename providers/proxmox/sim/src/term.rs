//! The terminal behind a simulated `termproxy` listener, reached through
//! `vncwebsocket`: what PVE's `termproxy` running `qm terminal` looks like
//! to a client.
//!
//! The session (as pve-xtermjs' `termproxy` implements it): the client's
//! first message is `<user>:<ticket>\n`; a wrong one closes the connection
//! without a byte, a right one is answered `OK`. Then the client sends
//! packets, everything text: `0:<length>:<data>` (data for the terminal,
//! `length` its bytes), `1:<cols>:<rows>:` (a resize) and `2` (a ping,
//! skipped like any other byte that starts no packet). What the server
//! sends is the terminal's output as it is, in binary messages.
//!
//! Behind it runs what `qm terminal <vmid> -iface <serialN> -escape 0`
//! would: a VM without that serial port (or whose port is not a `socket`),
//! or that is not running, gets `qm`'s error on the terminal and the end of
//! the session, after the `OK`: PVE refuses nothing at `termproxy` itself.
//! Otherwise `qm` announces the interface and the guest's shell answers
//! ([`Shell`]: `echo`, `hostname`; the guest echoes what it is typed).

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};

/// What `qm terminal` finds when the session starts: the guest's hostname
/// behind the interface it opened, or its error message.
pub(crate) type Outcome = Result<(String, String), String>;

/// What `qm terminal` finds in a VM's config and state: the interface and
/// hostname, or `qm`'s error message.
pub(crate) fn qm_terminal(
    vmid: u32,
    config: &std::collections::BTreeMap<String, String>,
    running: bool,
    iface: Option<&str>,
) -> Outcome {
    let iface = match iface {
        Some(i) if !config.contains_key(i) => {
            return Err(format!("serial interface '{i}' is not configured"));
        }
        Some(i) if config[i] != "socket" => return Err(format!("wrong serial type on interface '{i}'")),
        Some(i) => i.to_owned(),
        None => ["serial0", "serial1", "serial2", "serial3"]
            .into_iter()
            .find(|k| config.get(*k).is_some_and(|v| v == "socket"))
            .ok_or_else(|| "unable to find a serial interface".to_owned())?
            .to_owned(),
    };
    if !running {
        return Err(format!("VM {vmid} not running"));
    }
    let hostname = config.get("name").cloned().unwrap_or_else(|| format!("vm{vmid}"));
    Ok((iface, hostname))
}

/// One packet from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    /// Bytes for the terminal.
    Data(Vec<u8>),
    /// The terminal's new size.
    Resize(u16, u16),
}

/// Splits the client's byte stream into [`Packet`]s; packets may span
/// websocket messages and a message may hold several.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

/// Most digits a length or size has; a longer run is not a packet.
const MAX_DIGITS: usize = 10;

impl Decoder {
    /// Adds received bytes and returns the packets they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Packet> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            match self.buf.first() {
                None => break,
                Some(b'0') => {
                    let Some((len, at)) = number(&self.buf, 2) else { break };
                    let Some(len) = len else {
                        self.buf.drain(..1);
                        continue;
                    };
                    if self.buf.len() < at + len {
                        break;
                    }
                    out.push(Packet::Data(self.buf[at..at + len].to_vec()));
                    self.buf.drain(..at + len);
                }
                Some(b'1') => {
                    let Some((cols, at)) = number(&self.buf, 2) else { break };
                    let Some((rows, end)) = number(&self.buf, at) else { break };
                    if let (Some(c), Some(r)) = (cols, rows) {
                        out.push(Packet::Resize(c.min(0xffff) as u16, r.min(0xffff) as u16));
                        self.buf.drain(..end);
                    } else {
                        self.buf.drain(..1);
                    }
                }
                // A ping, or a byte that starts nothing.
                Some(_) => {
                    self.buf.drain(..1);
                }
            }
        }
        out
    }
}

/// The decimal number at `from` up to its `:`: `None` while incomplete,
/// `Some((None, _))` when it is not a number; else the number and where
/// the rest begins.
fn number(buf: &[u8], from: usize) -> Option<(Option<usize>, usize)> {
    if buf.len() < from {
        return None;
    }
    if buf.get(from - 1) != Some(&b':') {
        return Some((None, from));
    }
    let digits = &buf[from..];
    match digits.iter().position(|&b| b == b':') {
        Some(end) => {
            let n = std::str::from_utf8(&digits[..end]).ok().and_then(|s| s.parse().ok());
            Some((n.filter(|_| end <= MAX_DIGITS), from + end + 1))
        }
        None if digits.len() > MAX_DIGITS => Some((None, from)),
        None => None,
    }
}

/// The guest's login shell on its serial line: echoes what it is typed (as
/// the guest's tty does), runs `echo` and `hostname`, says any other
/// command is not found.
pub struct Shell {
    hostname: String,
    line: Vec<u8>,
}

/// Longest command line kept.
const MAX_LINE: usize = 1024;

impl Shell {
    /// A shell on `hostname`, and its first prompt.
    pub fn new(hostname: String) -> (Self, String) {
        let prompt = format!("\r\n{hostname} login: root\r\nroot@{hostname}:~# ");
        (Self { hostname, line: Vec::new() }, prompt)
    }

    /// What the guest writes back for `input`.
    pub fn input(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in input {
            match b {
                b'\r' | b'\n' => {
                    let command = String::from_utf8_lossy(&std::mem::take(&mut self.line)).trim().to_owned();
                    out.extend_from_slice(b"\r\n");
                    let (name, args) = command.split_once(' ').unwrap_or((&command, ""));
                    let answer = match name {
                        "" => String::new(),
                        "echo" => format!("{}\r\n", args.trim()),
                        "hostname" => format!("{}\r\n", self.hostname),
                        other => {
                            format!("-sh: {}: not found\r\n", other.chars().take(40).collect::<String>())
                        }
                    };
                    out.extend_from_slice(answer.as_bytes());
                    out.extend_from_slice(format!("root@{}:~# ", self.hostname).as_bytes());
                }
                0x20..=0x7e if self.line.len() < MAX_LINE => {
                    self.line.push(b);
                    out.push(b);
                }
                _ => {}
            }
        }
        out
    }
}

/// Serves one termproxy websocket until either side goes.
pub(crate) async fn serve(socket: WebSocket, user: String, ticket: String, outcome: Outcome) {
    let (mut sink, mut stream) = socket.split();
    // The ticket line, within the listener's 10 s.
    let mut first = Vec::new();
    let wait = tokio::time::sleep(crate::VNC_LISTEN_WAIT);
    tokio::pin!(wait);
    let rest = loop {
        tokio::select! {
            _ = &mut wait => return,
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => first.extend_from_slice(&b),
                Some(Ok(Message::Text(t))) => first.extend_from_slice(t.as_bytes()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            },
        }
        if let Some(nl) = first.iter().position(|&b| b == b'\n') {
            if first[..nl] != *format!("{user}:{ticket}").as_bytes() {
                tracing::debug!("simulated termproxy: wrong ticket line");
                return;
            }
            break first.split_off(nl + 1);
        }
        if first.len() > 4096 {
            return;
        }
    };
    let send = |bytes: Vec<u8>| Message::Binary(bytes.into());
    let (mut shell, greeting) = match outcome {
        Ok((iface, hostname)) => {
            let (shell, prompt) = Shell::new(hostname);
            (shell, format!("OKstarting serial terminal on interface {iface}\r\n{prompt}"))
        }
        Err(message) => {
            let _ = sink.send(send(format!("OK{message}\r\n").into_bytes())).await;
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
    };
    if sink.send(send(greeting.into_bytes())).await.is_err() {
        return;
    }
    let mut decoder = Decoder::default();
    let mut pending = decoder.feed(&rest);
    loop {
        for packet in pending.drain(..) {
            if let Packet::Data(bytes) = packet {
                let out = shell.input(&bytes);
                if !out.is_empty() && sink.send(send(out)).await.is_err() {
                    return;
                }
            }
        }
        match stream.next().await {
            Some(Ok(Message::Binary(b))) => pending = decoder.feed(&b),
            Some(Ok(Message::Text(t))) => pending = decoder.feed(t.as_bytes()),
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_decoded_across_and_within_messages() {
        let mut d = Decoder::default();
        assert_eq!(d.feed(b"0:5:hel"), vec![]);
        assert_eq!(d.feed(b"lo2"), vec![Packet::Data(b"hello".to_vec())]);
        assert_eq!(
            d.feed(b"1:80:24:0:1:\r0:3:\xc3\xa9x"),
            vec![Packet::Resize(80, 24), Packet::Data(b"\r".to_vec()), Packet::Data(b"\xc3\xa9x".to_vec())]
        );
        // Data may hold the framing's own characters.
        assert_eq!(d.feed(b"0:4:0:1:"), vec![Packet::Data(b"0:1:".to_vec())]);
        // Garbage and pings are skipped; what follows still decodes.
        assert_eq!(d.feed(b"222x0:z:0:1:a"), vec![Packet::Data(b"a".to_vec())]);
        assert_eq!(d.feed(b"0:99999999999999:"), vec![]);
        assert_eq!(d.feed(b"0:1:b"), vec![Packet::Data(b"b".to_vec())]);
    }

    #[test]
    fn qm_terminal_refuses_as_pve_does() {
        let cfg = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let with = cfg(&[("serial0", "socket"), ("name", "web")]);
        assert_eq!(qm_terminal(100, &with, true, Some("serial0")), Ok(("serial0".into(), "web".into())));
        assert_eq!(qm_terminal(100, &with, true, None), Ok(("serial0".into(), "web".into())));
        assert_eq!(
            qm_terminal(100, &with, true, Some("serial1")),
            Err("serial interface 'serial1' is not configured".into())
        );
        assert_eq!(qm_terminal(100, &with, false, None), Err("VM 100 not running".into()));
        let tty = cfg(&[("serial0", "/dev/ttyS0")]);
        assert_eq!(
            qm_terminal(100, &tty, true, Some("serial0")),
            Err("wrong serial type on interface 'serial0'".into())
        );
        assert_eq!(qm_terminal(100, &tty, true, None), Err("unable to find a serial interface".into()));
    }

    #[test]
    fn the_shell_echoes_and_answers() {
        let (mut sh, prompt) = Shell::new("web".into());
        assert!(prompt.ends_with("root@web:~# "));
        let out = String::from_utf8(sh.input(b"echo hi there\rhostname\rls\r")).unwrap();
        assert_eq!(
            out,
            "echo hi there\r\nhi there\r\nroot@web:~# hostname\r\nweb\r\nroot@web:~# ls\r\n\
             -sh: ls: not found\r\nroot@web:~# "
        );
    }
}
