//! The VNC server behind a simulated `vncwebsocket`: what QEMU's VNC
//! display, reached through PVE's vncproxy listener, looks like to a
//! client. The simulators' synthetic RFB server ([`hcp_sim_screen`]: VNC
//! authentication under the password vncproxy issued, a ServerInit named
//! after the VM, [`server_name`], and a small screen of colour bars) inside
//! binary websocket messages.

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
pub use hcp_sim_screen::vnc_response;
use hcp_sim_screen::{Desktop, Screen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The framebuffer's size.
pub const WIDTH: u16 = 64;
/// The framebuffer's height.
pub const HEIGHT: u16 = 48;

/// The desktop name the simulated VNC server gives for a VM.
pub fn server_name(vmid: u32) -> String {
    format!("pve-sim vm {vmid}")
}

/// Serves one websocket: RFB until either side goes.
pub(crate) async fn serve(socket: WebSocket, password: String, name: String) {
    let (rfb_end, pump_end) = tokio::io::duplex(64 * 1024);
    let (mut from_rfb, mut into_rfb) = tokio::io::split(pump_end);
    let (mut sink, mut stream) = socket.split();
    // Each future owns its end of the pipe, so the one that finishes first
    // closes it and the other sees the end.
    let server = async move {
        let mut rfb_end = rfb_end;
        let authorize = |challenge: &[u8; 16], response: &[u8; 16]| {
            (*response == vnc_response(&password, challenge))
                .then(|| Desktop { name, screen: Screen::bars(WIDTH, HEIGHT) })
        };
        if let Err(e) = hcp_sim_screen::serve(&mut rfb_end, authorize).await {
            tracing::debug!(error = %e, "simulated VNC session ended");
        }
    };
    let pump = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        if into_rfb.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                n = from_rfb.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                        if sink.send(Message::Binary(chunk)).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    tokio::join!(server, pump);
}
