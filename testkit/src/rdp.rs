//! The first steps of a native RDP client, for tests of RDP consoles: what
//! FreeRDP sends with `/pcb:<blob>` (a preconnection PDU, version 2, then
//! the X.224 Connection Request offering TLS and CredSSP) and the
//! server's Connection Confirm it reads back. PDUs come from IronRDP's
//! `ironrdp-pdu`, a codec independent of both the gateway's relay and the
//! Hyper-V simulator's VMConnect stand-in.

use std::time::Duration;

use anyhow::Context;
use ironrdp_pdu::nego::{ConnectionConfirm, ConnectionRequest, RequestFlags, SecurityProtocol};
use ironrdp_pdu::pcb::{PcbVersion, PreconnectionBlob};
use ironrdp_pdu::x224::X224;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(30);

/// What the server answered the Connection Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// `RDP_NEG_RSP` with the selected protocol (2: CredSSP).
    Selected(u32),
    /// `RDP_NEG_FAILURE` with its code (5: CredSSP required).
    Failed(u32),
}

/// `PROTOCOL_HYBRID` (CredSSP), what VMConnect selects.
pub const CREDSSP: u32 = 2;

/// A preconnection PDU, version 2, carrying `blob`.
pub fn preconnection_pdu(blob: &str) -> Vec<u8> {
    let pcb = PreconnectionBlob { version: PcbVersion::V2, id: 0, v2_payload: Some(blob.to_owned()) };
    ironrdp_pdu::encode_vec(&pcb).expect("a short blob encodes")
}

/// The X.224 Connection Request a current client sends: TLS or CredSSP.
pub fn connection_request() -> Vec<u8> {
    let request = ConnectionRequest {
        nego_data: None,
        flags: RequestFlags::empty(),
        protocol: SecurityProtocol::SSL | SecurityProtocol::HYBRID,
        correlation_info: None,
    };
    ironrdp_pdu::encode_vec(&X224(request)).expect("the request encodes")
}

/// Reads one X.224 Connection Confirm (a TPKT frame) from `io`.
pub async fn read_confirm(io: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<Negotiation> {
    let read = async {
        let mut header = [0u8; 4];
        io.read_exact(&mut header).await.context("the server closed before its Connection Confirm")?;
        anyhow::ensure!(header[0] == 3, "not a TPKT header: {header:02x?}");
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        anyhow::ensure!((11..=1024).contains(&len), "TPKT length {len}");
        let mut frame = vec![0u8; len];
        frame[..4].copy_from_slice(&header);
        io.read_exact(&mut frame[4..]).await.context("the Connection Confirm was cut short")?;
        parse_confirm(&frame)
    };
    tokio::time::timeout(WAIT, read).await.context("no Connection Confirm in time")?
}

/// Decodes a Connection Confirm frame.
pub fn parse_confirm(frame: &[u8]) -> anyhow::Result<Negotiation> {
    let X224(confirm) = ironrdp_pdu::decode::<X224<ConnectionConfirm>>(frame)
        .map_err(|e| anyhow::anyhow!("not a Connection Confirm: {e}"))?;
    Ok(match confirm {
        ConnectionConfirm::Response { protocol, .. } => Negotiation::Selected(protocol.bits()),
        ConnectionConfirm::Failure { code } => Negotiation::Failed(u32::from(code)),
    })
}

/// Connects to `addr` as FreeRDP does with `/pcb:<blob>`, and returns the
/// server's answer to the Connection Request with the open connection.
pub async fn connect(addr: &str, blob: &str) -> anyhow::Result<(Negotiation, TcpStream)> {
    let mut tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("cannot connect to {addr}"))?;
    let negotiation = handshake(&mut tcp, Some(blob)).await?;
    Ok((negotiation, tcp))
}

/// Sends the preconnection PDU (when given) and the Connection Request on
/// `io` and reads the Connection Confirm.
pub async fn handshake(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    blob: Option<&str>,
) -> anyhow::Result<Negotiation> {
    if let Some(blob) = blob {
        io.write_all(&preconnection_pdu(blob)).await?;
    }
    io.write_all(&connection_request()).await?;
    io.flush().await?;
    read_confirm(io).await
}

/// Opens the websocket console at `url` (`/console/rdp?token=…`), sends
/// the Connection Request in it (no preconnection PDU: the token is in the
/// URL) and reads the Connection Confirm; `Ok(Err(closed))` when the proxy
/// closed instead.
pub async fn over_websocket(url: &str) -> anyhow::Result<Result<Negotiation, crate::console::Closed>> {
    let mut ws = crate::console::open(url, None).await.map_err(anyhow::Error::msg)?;
    ws.send(&connection_request()).await.map_err(anyhow::Error::msg)?;
    let header = match ws.take(4).await.map_err(anyhow::Error::msg)? {
        Ok(h) => h,
        Err(closed) => return Ok(Err(closed)),
    };
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    anyhow::ensure!(header[0] == 3 && (11..=1024).contains(&len), "not a TPKT header: {header:02x?}");
    let rest = match ws.take(len - 4).await.map_err(anyhow::Error::msg)? {
        Ok(r) => r,
        Err(closed) => return Ok(Err(closed)),
    };
    Ok(Ok(parse_confirm(&[header, rest].concat())?))
}
