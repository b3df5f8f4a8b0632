//! A tenant's side of the console proxy, for tests: opens
//! `/console/vnc?token=…` like noVNC does (subprotocol `binary`, an
//! optional Origin), completes the RFB handshake the proxy offers (version
//! 3.8, security type None, ClientInit) and reads the ServerInit the VM's
//! console server sent through the proxy; or reads until the proxy closes
//! the websocket, with its close code and reason. For `/console/spice`,
//! [`Console::spice_link`] does a SPICE client's link exchange (with a
//! ticket the proxy must replace).

/// SPICE's main channel type.
pub const SPICE_MAIN: u8 = 1;
/// SPICE's display channel type.
pub const SPICE_DISPLAY: u8 = 2;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Runs the console page at `url` in headless Chromium with
/// `gateway/console/test/screenshot.mjs` (`args`: `--expect ...` and the
/// rest, `--out` given here) and returns its JSON line, with the script's
/// diagnostics (its stderr) added as `"stderr"`.
pub fn browser(url: &str, out: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let script = crate::stack::console_assets_dir().join("test/screenshot.mjs");
    let run = std::process::Command::new("node")
        .arg(&script)
        .args(["--url", url, "--out", &out.display().to_string(), "--timeout-ms", "90000"])
        .args(args)
        .output()
        .expect("node runs (scripts/console-assets.sh installs what it needs)");
    let line = String::from_utf8_lossy(&run.stdout).lines().last().unwrap_or_default().to_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let mut seen: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|_| panic!("no JSON from the browser ({}): {line}\n{stderr}", run.status));
    seen["stderr"] = serde_json::Value::String(stderr);
    seen
}

/// Where tests put what the browser saw (screenshots), created on demand:
/// `artifacts/` at the workspace's root.
pub fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts directory");
    dir
}

/// How long any one wait on the proxy may take.
const WAIT: Duration = Duration::from_secs(120);

/// What the proxy said when it closed the websocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The close code (1005 when the frame had none).
    pub code: u16,
    /// The close reason.
    pub reason: String,
    /// Whether the proxy had greeted with RFB before closing.
    pub rfb: bool,
}

/// The ServerInit of the VM's console server, as relayed by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    /// Framebuffer width.
    pub width: u16,
    /// Framebuffer height.
    pub height: u16,
    /// The desktop name.
    pub name: String,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An open console websocket.
pub struct Console {
    ws: Ws,
    /// Bytes received and not consumed yet.
    got: Vec<u8>,
    /// The proxy greeted with RFB.
    rfb: bool,
}

/// Opens the console websocket at `url` (a `ws://` URL with the token),
/// with `origin` if given. An HTTP refusal (a forbidden origin) is an
/// error; a refused token is a websocket the proxy closes, seen by
/// [`Console::handshake`] or [`Console::closed`].
pub async fn open(url: &str, origin: Option<&str>) -> Result<Console, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("sec-websocket-protocol", "binary".parse().unwrap());
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().map_err(|_| format!("bad origin {o}"))?);
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.map_err(|e| e.to_string())?;
    let protocol = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
    if protocol != Some("binary") {
        return Err(format!("the proxy chose subprotocol {protocol:?}, not binary"));
    }
    Ok(Console { ws, got: Vec::new(), rfb: false })
}

/// Opens the console, completes the RFB handshake when the proxy greets,
/// and reads until the proxy closes (noVNC's view of a whole session).
pub async fn session(url: &str, origin: Option<&str>) -> Result<Closed, String> {
    let mut console = open(url, origin).await?;
    match console.handshake().await? {
        Ok(_) => console.closed().await,
        Err(closed) => Ok(closed),
    }
}

impl Console {
    /// The tenant's RFB handshake: version 3.8, the one security type
    /// (None, which is all the proxy offers), ClientInit (shared), then the
    /// ServerInit. `Ok(Err(closed))` when the proxy closed instead (a
    /// refused token, an unreachable console server).
    pub async fn handshake(&mut self) -> Result<Result<ServerInit, Closed>, String> {
        let greeting = match self.take(12).await? {
            Ok(g) => g,
            Err(closed) => return Ok(Err(closed)),
        };
        if greeting != b"RFB 003.008\n" {
            return Err(format!("the proxy greeted with {:?}", String::from_utf8_lossy(&greeting)));
        }
        self.rfb = true;
        self.send(b"RFB 003.008\n").await?;
        let types = match self.take(2).await? {
            Ok(t) => t,
            Err(closed) => return Ok(Err(closed)),
        };
        if types != [1, 1] {
            return Err(format!("the proxy offered security types {types:?}, not only None"));
        }
        self.send(&[1]).await?;
        match self.take(4).await? {
            Ok(result) if result == [0, 0, 0, 0] => {}
            Ok(result) => return Err(format!("security result {result:?}")),
            Err(closed) => return Ok(Err(closed)),
        }
        self.send(&[1]).await?; // ClientInit: shared
        let head = match self.take(24).await? {
            Ok(h) => h,
            Err(closed) => return Ok(Err(closed)),
        };
        let len = u32::from_be_bytes([head[20], head[21], head[22], head[23]]) as usize;
        let name = match self.take(len).await? {
            Ok(n) => n,
            Err(closed) => return Ok(Err(closed)),
        };
        Ok(Ok(ServerInit {
            width: u16::from_be_bytes([head[0], head[1]]),
            height: u16::from_be_bytes([head[2], head[3]]),
            name: String::from_utf8_lossy(&name).into_owned(),
        }))
    }

    /// A SPICE client's link exchange for channel `channel_type` of session
    /// `connection_id` (0: a new one): link header and SpiceLinkMess (with
    /// the auth-selection capability, as spice-html5 sends), the server's
    /// reply, then the SPICE mechanism and a ticket of 128 bytes of
    /// nothing, which only a proxy that puts the real password in its
    /// place gets past. Returns the server's link result (0 is success;
    /// the reply's error instead when it refused the link), or how the
    /// proxy closed.
    pub async fn spice_link(
        &mut self,
        connection_id: u32,
        channel_type: u8,
    ) -> Result<Result<u32, Closed>, String> {
        let mut msg = connection_id.to_le_bytes().to_vec();
        msg.extend_from_slice(&[channel_type, 0]);
        // One common capability word (auth selection), no channel ones,
        // capabilities right after the 18 fixed bytes.
        for v in [1u32, 0, 18, 1] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        let mut link = b"REDQ".to_vec();
        for v in [2u32, 2, msg.len() as u32] {
            link.extend_from_slice(&v.to_le_bytes());
        }
        link.extend(msg);
        self.send(&link).await?;
        let header = match self.take(16).await? {
            Ok(h) => h,
            Err(closed) => return Ok(Err(closed)),
        };
        if &header[..4] != b"REDQ" {
            return Err(format!("the proxy answered the link with {header:?}"));
        }
        let size = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
        let reply = match self.take(size).await? {
            Ok(r) => r,
            Err(closed) => return Ok(Err(closed)),
        };
        let error = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
        if error != 0 {
            return Ok(Ok(error));
        }
        let mut ticket = 1u32.to_le_bytes().to_vec();
        ticket.extend_from_slice(&[0u8; 128]);
        self.send(&ticket).await?;
        Ok(self.take(4).await?.map(|r| u32::from_le_bytes([r[0], r[1], r[2], r[3]])))
    }

    /// Reads until what came (as text, since the last call) contains
    /// `needle`; returns all of it. For serial consoles.
    pub async fn read_until(&mut self, needle: &str) -> Result<Result<String, Closed>, String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&self.got).into_owned();
            if text.contains(needle) {
                self.got.clear();
                return Ok(Ok(text));
            }
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| format!("{needle:?} did not come in time; got {text:?}"))?;
            match msg {
                Some(Ok(Message::Binary(b))) => self.got.extend_from_slice(&b),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Err(Closed { code, reason, rfb: self.rfb }));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed without a close frame".into()),
            }
        }
    }

    /// Sends `text` in one text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.ws.send(Message::Text(text.into())).await.map_err(|e| e.to_string())
    }

    /// Reads (and drops) whatever comes until the proxy closes.
    pub async fn closed(mut self) -> Result<Closed, String> {
        loop {
            if let Err(closed) = self.take(usize::MAX).await? {
                return Ok(closed);
            }
        }
    }

    /// Closes from the tenant's side and waits for the proxy's answer.
    pub async fn close(mut self) -> Result<Closed, String> {
        self.ws.send(Message::Close(None)).await.map_err(|e| e.to_string())?;
        self.closed().await
    }

    /// Sends `bytes` in one binary message.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.ws.send(Message::Binary(bytes.to_vec().into())).await.map_err(|e| e.to_string())
    }

    /// The next `n` bytes, or how the proxy closed before they came.
    pub async fn take(&mut self, n: usize) -> Result<Result<Vec<u8>, Closed>, String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.got.len() < n {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| "nothing from the proxy in time".to_string())?;
            match msg {
                Some(Ok(Message::Binary(b))) => self.got.extend_from_slice(&b),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Err(Closed { code, reason, rfb: self.rfb }));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed without a close frame".into()),
            }
        }
        Ok(Ok(self.got.drain(..n).collect()))
    }
}
