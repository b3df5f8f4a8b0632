//! The SPICE link handshake of the console proxy, up to the point where
//! bytes can simply be relayed. SPICE opens one connection per channel
//! (main, display, inputs, cursor, ...); each starts with a link exchange:
//!
//! 1. the client sends a link header (magic `REDQ`, protocol 2.2, the size
//!    of what follows) and its SpiceLinkMess (connection id, channel type
//!    and id, capabilities) — read here first, because whether the
//!    connection opens a session (the main channel) or joins one decides
//!    how core redeems the token;
//! 2. the proxy passes them to the server, whose link header and
//!    SpiceLinkReply (an error code, its RSA public key as a 162-byte
//!    SubjectPublicKeyInfo, its capabilities) go back to the client as
//!    they are;
//! 3. the client chooses SPICE's own authentication (a 4-byte mechanism,
//!    when it announced the auth-selection capability) and sends its
//!    128-byte encrypted ticket, which the proxy reads and drops: the
//!    tenant never knows the password. The proxy sends instead the real
//!    password, NUL-terminated, encrypted with the server's key under
//!    RSA-OAEP with SHA-1, as the protocol defines the ticket;
//! 4. the server's 4-byte link result goes back to the client, and from
//!    then on bytes pass through unchanged.
//!
//! All integers are little-endian. Nothing here trusts sizes from either
//! side beyond [`MAX_LINK_MESSAGE`].

use rsa::pkcs8::DecodePublicKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The link header's magic.
pub const MAGIC: &[u8; 4] = b"REDQ";
/// The protocol's major version; minor versions are compatible.
pub const VERSION_MAJOR: u32 = 2;
/// The largest link message accepted from either side (real ones are
/// well under 200 bytes).
pub const MAX_LINK_MESSAGE: u32 = 4096;
/// The main channel: the one that opens a session.
pub const CHANNEL_MAIN: u8 = 1;
/// Common capability bits.
const CAP_AUTH_SELECTION: u32 = 0;
/// The authentication mechanism "SPICE ticket" (the capability's number).
const AUTH_SPICE: u32 = 1;
/// The server's public key in a SpiceLinkReply (1024-bit RSA as DER).
const PUBKEY_BYTES: usize = 162;
/// The ticket a client sends: RSA-1024's ciphertext.
const TICKET_BYTES: usize = 128;
/// The fixed part of a SpiceLinkMess.
const LINK_MESS_FIXED: usize = 18;
/// The fixed part of a SpiceLinkReply.
const LINK_REPLY_FIXED: usize = 4 + PUBKEY_BYTES + 12;
/// The longest password a SPICE server takes.
const MAX_PASSWORD: usize = 60;

/// Why a SPICE handshake failed; shown to the tenant as the close reason.
#[derive(Debug, thiserror::Error)]
pub enum SpiceError {
    /// A connection failed or closed.
    #[error("console connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The client's link message is not SPICE 2.x or is malformed.
    #[error("console client is not a SPICE client: {0}")]
    BadClient(&'static str),
    /// The client asked for an authentication the proxy does not do.
    #[error("console client asked for authentication mechanism {0}; only SPICE tickets are supported")]
    Mechanism(u32),
    /// The server's link reply is not SPICE 2.x or is malformed.
    #[error("console server is not a SPICE server: {0}")]
    BadServer(&'static str),
    /// The server refused the link (a SPICE link error code).
    #[error("console server refused the connection (SPICE link error {0})")]
    Refused(u32),
    /// The server's public key cannot encrypt the ticket.
    #[error("console server's public key is not usable")]
    Key,
    /// The password does not fit in a ticket (a provider's mistake).
    #[error("the console password is longer than SPICE allows")]
    Password,
    /// The server refused the ticket.
    #[error("console server refused the credentials (SPICE link error {0})")]
    AuthFailed(u32),
}

/// A client's link header and SpiceLinkMess, as read.
#[derive(Debug, Clone)]
pub struct LinkMess {
    /// Header and message, to be passed on unchanged.
    raw: Vec<u8>,
    /// The session a channel joins (0 for a new one).
    pub connection_id: u32,
    /// Main, display, inputs, cursor, ...
    pub channel_type: u8,
    /// The client's common capability words.
    common_caps: Vec<u32>,
}

impl LinkMess {
    /// Whether this connection opens a session (a main channel) rather
    /// than joining one (any other channel).
    pub fn opens_session(&self) -> bool {
        self.channel_type == CHANNEL_MAIN || self.connection_id == 0
    }

    fn auth_selection(&self) -> bool {
        has_cap(&self.common_caps, CAP_AUTH_SELECTION)
    }
}

fn has_cap(words: &[u32], bit: u32) -> bool {
    words.get((bit / 32) as usize).is_some_and(|w| w & (1 << (bit % 32)) != 0)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a link header and the message it announces; `fixed` is the
/// message's least size. Returns (header and message, the message's
/// offset).
async fn read_link_message<S: AsyncRead + Unpin>(s: &mut S, fixed: usize) -> Result<Vec<u8>, &'static str> {
    let mut raw = vec![0u8; 16];
    s.read_exact(&mut raw).await.map_err(|_| "it closed before its link header")?;
    if &raw[..4] != MAGIC {
        return Err("no REDQ magic");
    }
    if u32_at(&raw, 4) != VERSION_MAJOR {
        return Err("not protocol version 2");
    }
    let size = u32_at(&raw, 12);
    if size > MAX_LINK_MESSAGE || (size as usize) < fixed {
        return Err("its link message has an impossible size");
    }
    raw.resize(16 + size as usize, 0);
    s.read_exact(&mut raw[16..]).await.map_err(|_| "it closed inside its link message")?;
    Ok(raw)
}

/// The common capabilities of a link message whose capability count and
/// offset sit at `counts` (offset relative to the message, as SPICE has
/// it).
fn common_caps(msg: &[u8], counts: usize) -> Option<Vec<u32>> {
    let common = u32_at(msg, counts) as usize;
    let channel = u32_at(msg, counts + 4) as usize;
    let offset = u32_at(msg, counts + 8) as usize;
    let end = offset.checked_add(common.checked_add(channel)?.checked_mul(4)?)?;
    if end > msg.len() {
        return None;
    }
    Some((0..common).map(|i| u32_at(msg, offset + 4 * i)).collect())
}

/// Reads the client's link header and SpiceLinkMess.
pub async fn read_client_link<C: AsyncRead + Unpin>(client: &mut C) -> Result<LinkMess, SpiceError> {
    let raw = read_link_message(client, LINK_MESS_FIXED).await.map_err(SpiceError::BadClient)?;
    let msg = &raw[16..];
    let common_caps = common_caps(msg, 6).ok_or(SpiceError::BadClient("its capabilities overrun"))?;
    Ok(LinkMess { connection_id: u32_at(msg, 0), channel_type: msg[4], common_caps, raw })
}

/// Does the server side of the link for `link` (read from `client`):
/// passes the link on, the reply back, replaces the client's ticket with
/// `password` encrypted under the server's key, and passes the server's
/// result back. On success both sides are positioned after the link.
pub async fn link<S, C>(
    server: &mut S,
    client: &mut C,
    link: &LinkMess,
    password: &str,
) -> Result<(), SpiceError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    if password.len() >= MAX_PASSWORD {
        return Err(SpiceError::Password);
    }
    server.write_all(&link.raw).await?;
    server.flush().await?;
    let reply = read_link_message(server, LINK_REPLY_FIXED).await.map_err(SpiceError::BadServer)?;
    // The client hears the server's answer, a refusal too.
    client.write_all(&reply).await?;
    client.flush().await?;
    let msg = &reply[16..];
    let error = u32_at(msg, 0);
    if error != 0 {
        return Err(SpiceError::Refused(error));
    }
    if common_caps(msg, 4 + PUBKEY_BYTES).is_none() {
        return Err(SpiceError::BadServer("its capabilities overrun"));
    }
    let key =
        rsa::RsaPublicKey::from_public_key_der(&msg[4..4 + PUBKEY_BYTES]).map_err(|_| SpiceError::Key)?;
    // A server reads the mechanism when the client announced it can choose.
    if link.auth_selection() {
        let mechanism = client.read_u32_le().await?;
        if mechanism != AUTH_SPICE {
            return Err(SpiceError::Mechanism(mechanism));
        }
        server.write_u32_le(mechanism).await?;
    }
    let mut dropped = [0u8; TICKET_BYTES];
    client.read_exact(&mut dropped).await?;
    server.write_all(&ticket(&key, password)?).await?;
    server.flush().await?;
    let result = server.read_u32_le().await?;
    client.write_u32_le(result).await?;
    client.flush().await?;
    match result {
        0 => Ok(()),
        code => Err(SpiceError::AuthFailed(code)),
    }
}

/// The ticket: the password and a NUL, RSA-OAEP (SHA-1, no label) under
/// the server's key. The `rsa` crate (RustCrypto) rather than OpenSSL: it
/// is pure Rust like the proxy's other primitives (des, sha2), needs no
/// system library, and only its public-key encryption is used.
fn ticket(key: &rsa::RsaPublicKey, password: &str) -> Result<Vec<u8>, SpiceError> {
    let mut plain = Vec::with_capacity(password.len() + 1);
    plain.extend_from_slice(password.as_bytes());
    plain.push(0);
    key.encrypt(&mut rand::thread_rng(), rsa::Oaep::new::<sha1::Sha1>(), &plain).map_err(|_| SpiceError::Key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::traits::PublicKeyParts;

    /// A link header and a SpiceLinkMess with one common capability word.
    fn client_link(connection_id: u32, channel_type: u8, caps: u32) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&connection_id.to_le_bytes());
        msg.push(channel_type);
        msg.push(0);
        for v in [1u32, 0, LINK_MESS_FIXED as u32, caps] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        header_and(msg)
    }

    fn header_and(msg: Vec<u8>) -> Vec<u8> {
        let mut raw = MAGIC.to_vec();
        for v in [VERSION_MAJOR, 2, msg.len() as u32] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        raw.extend(msg);
        raw
    }

    #[tokio::test]
    async fn the_clients_link_says_which_channel_it_opens() {
        for (id, channel, opens) in [(0, CHANNEL_MAIN, true), (7, 2, false), (0, 2, true)] {
            let raw = client_link(id, channel, 1 << CAP_AUTH_SELECTION);
            let link = read_client_link(&mut raw.as_slice()).await.unwrap();
            assert_eq!((link.connection_id, link.channel_type), (id, channel));
            assert_eq!(link.opens_session(), opens, "{id} {channel}");
            assert!(link.auth_selection());
            assert_eq!(link.raw, raw, "passed on unchanged");
        }
    }

    #[tokio::test]
    async fn malformed_links_are_refused() {
        let good = client_link(0, CHANNEL_MAIN, 0);
        let mut bad_magic = good.clone();
        bad_magic[..4].copy_from_slice(b"RFB ");
        let mut bad_version = good.clone();
        bad_version[4] = 3;
        let mut huge = good.clone();
        huge[12..16].copy_from_slice(&(MAX_LINK_MESSAGE + 1).to_le_bytes());
        let mut overrun = good.clone();
        overrun[16 + 6..16 + 10].copy_from_slice(&1000u32.to_le_bytes());
        let short = good[..20].to_vec();
        for (raw, why) in [
            (bad_magic, "REDQ"),
            (bad_version, "version 2"),
            (huge, "impossible size"),
            (overrun, "overrun"),
            (short, "closed"),
        ] {
            let e = read_client_link(&mut raw.as_slice()).await.unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }

    /// A SPICE server of the test's own: answers the link with its key,
    /// decrypts the ticket and checks the password.
    async fn server(
        mut s: tokio::io::DuplexStream,
        key: rsa::RsaPrivateKey,
        password: &str,
        error: u32,
    ) -> std::io::Result<Vec<u8>> {
        let mut header = [0u8; 16];
        s.read_exact(&mut header).await?;
        let mut link = vec![0u8; u32_at(&header, 12) as usize];
        s.read_exact(&mut link).await?;
        let der = key.to_public_key().to_public_key_der().unwrap();
        assert_eq!(der.as_bytes().len(), PUBKEY_BYTES);
        let mut reply = error.to_le_bytes().to_vec();
        reply.extend_from_slice(der.as_bytes());
        for v in [1u32, 0, LINK_REPLY_FIXED as u32, (1 << CAP_AUTH_SELECTION) | (1 << AUTH_SPICE)] {
            reply.extend_from_slice(&v.to_le_bytes());
        }
        s.write_all(&header_and(reply)).await?;
        if error != 0 {
            return Ok(link);
        }
        assert_eq!(s.read_u32_le().await?, AUTH_SPICE);
        let mut ticket = vec![0u8; key.size()];
        s.read_exact(&mut ticket).await?;
        let plain = key.decrypt(rsa::Oaep::new::<sha1::Sha1>(), &ticket).unwrap();
        let ok = plain == [password.as_bytes(), b"\0"].concat();
        s.write_u32_le(if ok { 0 } else { 7 }).await?;
        Ok(link)
    }

    #[tokio::test]
    async fn the_proxy_sends_the_real_password_and_the_client_hears_the_result() {
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
        for (server_pw, proxy_pw, error, want) in [
            ("s3cret-spice", "s3cret-spice", 0, Ok(())),
            ("s3cret-spice", "wrong", 0, Err("credentials (SPICE link error 7)")),
            ("s3cret-spice", "s3cret-spice", 4, Err("refused the connection (SPICE link error 4)")),
        ] {
            let (mut proxy_server, server_end) = tokio::io::duplex(4096);
            let (mut proxy_client, mut client) = tokio::io::duplex(4096);
            let srv = tokio::spawn(server(server_end, key.clone(), server_pw, error));
            let sent = client_link(0, CHANNEL_MAIN, 1 << CAP_AUTH_SELECTION);
            client.write_all(&sent).await.unwrap();
            let link = read_client_link(&mut proxy_client).await.unwrap();
            let browser = tokio::spawn(async move {
                let mut header = [0u8; 16];
                client.read_exact(&mut header).await.unwrap();
                let mut reply = vec![0u8; u32_at(&header, 12) as usize];
                client.read_exact(&mut reply).await.unwrap();
                if u32_at(&reply, 0) != 0 {
                    return None;
                }
                // A ticket encrypted with no password at all.
                client.write_u32_le(AUTH_SPICE).await.unwrap();
                client.write_all(&[0xAA; TICKET_BYTES]).await.unwrap();
                Some(client.read_u32_le().await.unwrap())
            });
            let got = self::link(&mut proxy_server, &mut proxy_client, &link, proxy_pw).await;
            match want {
                Ok(()) => assert!(got.is_ok(), "{got:?}"),
                Err(text) => assert!(got.as_ref().is_err_and(|e| e.to_string().contains(text)), "{got:?}"),
            }
            assert_eq!(srv.await.unwrap().unwrap(), sent[16..], "the link reached the server unchanged");
            let result = browser.await.unwrap();
            assert_eq!(result, (error == 0).then_some(if server_pw == proxy_pw { 0 } else { 7 }));
        }
    }

    #[tokio::test]
    async fn only_spice_tickets_are_accepted() {
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
        let (mut proxy_server, server_end) = tokio::io::duplex(4096);
        let (mut proxy_client, mut client) = tokio::io::duplex(4096);
        let _srv = tokio::spawn(server(server_end, key, "pw", 0));
        let link = LinkMess {
            raw: client_link(0, CHANNEL_MAIN, 1 << CAP_AUTH_SELECTION),
            connection_id: 0,
            channel_type: CHANNEL_MAIN,
            common_caps: vec![1 << CAP_AUTH_SELECTION],
        };
        let browser = tokio::spawn(async move {
            let mut reply = [0u8; 16 + LINK_REPLY_FIXED + 4];
            client.read_exact(&mut reply).await.unwrap();
            client.write_u32_le(2).await.unwrap();
            client
        });
        let e = self::link(&mut proxy_server, &mut proxy_client, &link, "pw").await.unwrap_err();
        assert!(matches!(e, SpiceError::Mechanism(2)), "{e}");
        drop(browser.await.unwrap());
    }
}
