//! RDP consoles: the relay a standard RDP client reaches, and the
//! preconnection PDU that names the VM behind a shared listener.
//!
//! Hyper-V's VMConnect listens on TCP 2179 for every VM of a host; an RDP
//! client says which VM it wants in a preconnection PDU (version 2,
//! [MS-RDPBCGR] 2.2.1.1) sent before any RDP byte, carrying the VM's GUID.
//! HCP's relay (`--console-rdp-listen`) reads the same PDU from the tenant's
//! client, but with the console token where the GUID would be (FreeRDP:
//! `/pcb:<token>`); it redeems the token with core, connects to the
//! endpoint the provider gave, sends a preconnection PDU with the
//! endpoint's blob (the GUID) and from then on copies bytes both ways. The
//! RDP protocol itself (its TLS, CredSSP) runs between the client and the
//! host, untouched: the relay never sees the client's credentials.
//!
//! The websocket route (`/console/rdp?token=…`) relays the same byte stream
//! for clients that tunnel RDP through a websocket; the token is in its URL
//! and the client sends no preconnection PDU.
//!
//! PDUs are encoded and decoded by IronRDP's `ironrdp-pdu` (Devolutions),
//! the codec of a maintained RDP client and server, rather than by hand.

use std::sync::Arc;
use std::time::Duration;

use ironrdp_pdu::pcb::{PcbVersion, PreconnectionBlob};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Console;

/// Largest preconnection PDU the relay reads from a client, bytes: a token
/// is 43 characters, so this leaves room and nothing more.
pub const MAX_PCB: usize = 1024;

/// How long a client has to send its preconnection PDU.
pub const PCB_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that have not yet sent their preconnection PDU; more are
/// closed at once, so silent connections cannot pile up.
pub const MAX_PENDING: usize = 256;

/// Of those, from one peer address: one client cannot take every slot.
pub const MAX_PENDING_PER_PEER: usize = 8;

/// Connections past their preconnection PDU (redeeming or relaying) at
/// once; more are closed before core is asked.
pub const MAX_SESSIONS: usize = 1024;

/// Why a client's preconnection PDU was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcbError {
    /// `cbSize` outside 16..=[`MAX_PCB`].
    #[error("preconnection PDU cbSize {0} is outside 16..={MAX_PCB}")]
    Size(u32),
    /// IronRDP could not decode it (a field names itself).
    #[error("preconnection PDU is malformed: {0}")]
    Malformed(String),
    /// Version 1 carries no string, so no token.
    #[error("preconnection PDU has no string (version 2 with the console token is needed)")]
    NoToken,
    /// The connection ended first.
    #[error("the client closed before its preconnection PDU was complete")]
    Truncated,
    /// Nothing in [`PCB_TIMEOUT`].
    #[error("no preconnection PDU within {PCB_TIMEOUT:?}")]
    Timeout,
}

/// Reads one preconnection PDU from `io` and returns its string (the
/// console token), reading no byte past it.
pub async fn read_token(io: &mut (impl AsyncRead + Unpin)) -> Result<String, PcbError> {
    read_token_within(io, PCB_TIMEOUT).await
}

async fn read_token_within(io: &mut (impl AsyncRead + Unpin), limit: Duration) -> Result<String, PcbError> {
    let read = async {
        let mut size = [0u8; 4];
        io.read_exact(&mut size).await.map_err(|_| PcbError::Truncated)?;
        let cb_size = u32::from_le_bytes(size);
        let len = usize::try_from(cb_size).unwrap_or(usize::MAX);
        if !(PreconnectionBlob::FIXED_PART_SIZE..=MAX_PCB).contains(&len) {
            return Err(PcbError::Size(cb_size));
        }
        let mut pdu = vec![0u8; len];
        pdu[..4].copy_from_slice(&size);
        io.read_exact(&mut pdu[4..]).await.map_err(|_| PcbError::Truncated)?;
        Ok(pdu)
    };
    let pdu = tokio::time::timeout(limit, read).await.map_err(|_| PcbError::Timeout)??;
    let pcb: PreconnectionBlob = ironrdp_pdu::decode(&pdu).map_err(|e| PcbError::Malformed(e.to_string()))?;
    match pcb.v2_payload {
        Some(token) if !token.is_empty() => Ok(token),
        _ => Err(PcbError::NoToken),
    }
}

/// A version 2 preconnection PDU carrying `blob`.
pub fn encode(blob: &str) -> Vec<u8> {
    let pcb = PreconnectionBlob { version: PcbVersion::V2, id: 0, v2_payload: Some(blob.to_owned()) };
    // Encoding fails only for a string of more than 65535 UTF-16 units,
    // which no provider sends; an empty PDU then makes the server refuse.
    ironrdp_pdu::encode_vec(&pcb).unwrap_or_default()
}

/// Sends the endpoint's preconnection PDU to the console server, if it
/// names one.
pub async fn send_blob(server: &mut (impl AsyncWrite + Unpin), blob: &str) -> std::io::Result<()> {
    if blob.is_empty() {
        return Ok(());
    }
    server.write_all(&encode(blob)).await?;
    server.flush().await
}

/// Serves RDP clients on `listener` until the task is dropped: one session
/// per connection.
pub(crate) async fn serve(listener: TcpListener, console: Arc<Console>) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
    let per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "RDP relay cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "RDP relay: {MAX_PENDING} connections are still silent; closing a new one");
            continue;
        };
        let Some(peer_slot) = PeerSlot::take(&per_peer, peer.ip()) else {
            tracing::warn!(%peer, "RDP relay: {MAX_PENDING_PER_PEER} silent connections from this peer; closing a new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (console, sessions) = (console.clone(), sessions.clone());
        tokio::spawn(async move {
            session(console, tcp, (permit, peer_slot), sessions).await;
            tracing::debug!(%peer, "RDP relay connection closed");
        });
    }
}

/// One of a peer's silent-connection slots, given back when dropped.
struct PeerSlot {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self { map: map.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

async fn session(
    console: Arc<Console>,
    mut client: tokio::net::TcpStream,
    pending: (tokio::sync::OwnedSemaphorePermit, PeerSlot),
    sessions: Arc<tokio::sync::Semaphore>,
) {
    let token = read_token(&mut client).await;
    let address = pending.1.ip.to_canonical().to_string();
    drop(pending);
    // Held through redeem and relay: bounds what the relay asks of core.
    let Ok(_session) = sessions.try_acquire_owned() else {
        tracing::warn!("RDP relay: {MAX_SESSIONS} sessions open; closing a new one");
        return;
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            // RDP has no way to say why before its own negotiation: the
            // connection closes and the reason is logged.
            tracing::info!(error = %e, "RDP console refused");
            return;
        }
    };
    let mut s = super::Session::new(address);
    let end = async {
        let (mut server, limit) = match s.open(&console, "rdp", &token).await {
            Ok(o) => o,
            Err(end) => return end,
        };
        tokio::select! {
            end = super::relay(&mut client, &mut server, &s.counters) => end,
            end = limit.reached() => end,
        }
    }
    .await;
    tracing::info!(code = end.code, reason = %end.reason, "RDP console session ended");
    let _ = client.shutdown().await;
    s.report(&console, end).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn token_of(bytes: &[u8]) -> Result<String, PcbError> {
        read_token(&mut &bytes[..]).await
    }

    #[tokio::test]
    async fn a_version_2_pdu_gives_its_string_and_nothing_after_it_is_read() {
        let mut bytes = encode("tok-123_ABC");
        // The PDU is 16 bytes, cchPCB and the UTF-16 string with its NUL.
        assert_eq!(bytes.len(), 16 + 2 + 2 * 12);
        assert_eq!(&bytes[..4], &(bytes.len() as u32).to_le_bytes());
        bytes.extend_from_slice(b"\x03\x00rest");
        let mut reader = &bytes[..];
        assert_eq!(read_token(&mut reader).await.unwrap(), "tok-123_ABC");
        assert_eq!(reader, b"\x03\x00rest", "the relay must not eat the first RDP bytes");
    }

    #[tokio::test]
    async fn bad_pdus_are_refused_with_a_bounded_reason() {
        // Version 1: no string.
        let v1 =
            ironrdp_pdu::encode_vec(&PreconnectionBlob { version: PcbVersion::V1, id: 7, v2_payload: None })
                .unwrap();
        assert_eq!(token_of(&v1).await, Err(PcbError::NoToken));
        // An empty string.
        assert_eq!(token_of(&encode("")).await, Err(PcbError::NoToken));
        // Sizes out of bounds never allocate what they claim.
        assert_eq!(token_of(&u32::MAX.to_le_bytes()).await, Err(PcbError::Size(u32::MAX)));
        assert_eq!(token_of(&8u32.to_le_bytes()).await, Err(PcbError::Size(8)));
        // cchPCB larger than the PDU.
        let mut lying = encode("abc");
        lying[16] = 200;
        assert!(matches!(token_of(&lying).await, Err(PcbError::Malformed(m)) if m.contains("cchPCB")));
        // Cut short.
        let whole = encode("abcdef");
        assert_eq!(token_of(&whole[..whole.len() - 1]).await, Err(PcbError::Truncated));
        // An X.224 connection request where the PDU should be (a client
        // not told to send one): TPKT version 3 reads as a tiny cbSize.
        assert!(matches!(token_of(b"\x03\x00\x00\x13\x0e\xe0\x00\x00").await, Err(PcbError::Size(_))));
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // Half a PDU, then nothing.
        b.write_all(&encode("abcdef")[..10]).await.unwrap();
        assert_eq!(read_token_within(&mut a, Duration::from_millis(50)).await, Err(PcbError::Timeout));
    }
}
