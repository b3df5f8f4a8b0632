//! `hcp vm console --type serial`: the VM's serial console in the user's own
//! terminal. The command asks for a console session, opens its websocket
//! (the gateway's console proxy relays the serial line), puts the terminal
//! in raw mode (restored on every exit) and copies keys to the guest and
//! the guest's output to the screen, byte for byte, until the session ends
//! or the user presses Ctrl-] (as `virsh console` and telnet do).

use std::io::Write;

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// The key that ends the session: Ctrl-].
pub const ESCAPE: u8 = 0x1d;

/// How the session ended.
#[derive(Debug)]
pub enum Ended {
    /// The user pressed the escape key (or stdin ended).
    ByUser,
    /// The console proxy closed the session, with its code and reason.
    ByServer(u16, String),
}

/// The terminal in raw mode while this lives (stdin is a terminal), else
/// nothing: input from a pipe is sent as it is.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enable() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        if !rustix::termios::isatty(&stdin) {
            return Ok(Self(None));
        }
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(Self(Some(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ =
                rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, saved);
        }
    }
}

/// Runs a serial console session on the websocket `url` (a console
/// session's `url`, with its token).
#[allow(clippy::print_stderr)]
pub async fn session(url: &str) -> anyhow::Result<Ended> {
    let mut request = url.into_client_request().context("the console url")?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", http::HeaderValue::from_static("binary"));
    let (ws, _) = tokio_tungstenite::connect_async(request).await.context("connecting to the console")?;
    let (mut sink, mut stream) = ws.split();
    eprint!("Connected to the serial console. Press Ctrl-] to leave.\r\n");
    let _raw = RawMode::enable()?;
    let mut stdin = tokio::io::stdin();
    let mut keys = [0u8; 1024];
    let mut stdout = std::io::stdout();
    let ended = loop {
        tokio::select! {
            n = stdin.read(&mut keys) => {
                let n = n.context("reading the terminal")?;
                let typed = &keys[..n];
                let (send, leave) = match typed.iter().position(|&b| b == ESCAPE) {
                    Some(i) => (&typed[..i], true),
                    None => (typed, n == 0),
                };
                if !send.is_empty() {
                    sink.send(Message::Binary(bytes::Bytes::copy_from_slice(send)))
                        .await
                        .context("sending to the console")?;
                }
                if leave {
                    let _ = sink.send(Message::Close(Some(CloseFrame {
                        code: 1000.into(),
                        reason: "client closed".into(),
                    }))).await;
                    break Ended::ByUser;
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b).and_then(|()| stdout.flush()).context("writing the terminal")?;
                }
                Some(Ok(Message::Text(t))) => {
                    stdout.write_all(t.as_bytes()).and_then(|()| stdout.flush()).context("writing the terminal")?;
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                    break Ended::ByServer(code, reason);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("the console connection failed"),
                None => break Ended::ByServer(1006, "the connection closed".into()),
            },
        }
    };
    Ok(ended)
}
