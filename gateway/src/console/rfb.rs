//! The two RFB (VNC) handshakes of the console proxy, up to the point
//! where bytes can simply be relayed: as a client towards the hypervisor's
//! VNC server, authenticating with the password the tenant never sees
//! (security type 2, "VNC authentication": the server's 16-byte challenge
//! encrypted with DES under the password), and as a server towards the
//! tenant's browser, offering only security type 1 ("None"). Both speak
//! RFB 3.8 (RFC 6143). After the handshakes, ClientInit/ServerInit and
//! everything else pass through unchanged.

use des::cipher::{BlockEncrypt, KeyInit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The version both sides speak.
pub const VERSION: &[u8; 12] = b"RFB 003.008\n";

const SECURITY_NONE: u8 = 1;
const SECURITY_VNC: u8 = 2;

/// Why a handshake failed; shown to the tenant as the close reason.
#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    /// The connection failed or closed.
    #[error("console server connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer is not an RFB 3.x server.
    #[error("console server is not a VNC server (greeting {0:?})")]
    NotRfb(String),
    /// The server refused the connection, with its reason.
    #[error("console server refused the connection: {0}")]
    Refused(String),
    /// None of the server's security types is one the proxy can do.
    #[error("console server offers no usable authentication (types {0:?})")]
    NoSecurity(Vec<u8>),
    /// Authentication failed.
    #[error("console server refused the credentials: {0}")]
    AuthFailed(String),
    /// The browser spoke something else.
    #[error("console client is not an RFB 3.x client")]
    BadClient,
}

/// The DES key VNC derives from a password: its first 8 bytes, zero padded,
/// each byte's bits in reverse order (a quirk of the original VNC code).
fn vnc_key(password: &str) -> [u8; 8] {
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    key
}

/// The response to a VNC authentication challenge.
pub fn vnc_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let cipher = des::Des::new(&vnc_key(password).into());
    let mut out = [0u8; 16];
    for (half, chunk) in challenge.chunks_exact(8).enumerate() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let mut block = bytes.into();
        cipher.encrypt_block(&mut block);
        out[half * 8..half * 8 + 8].copy_from_slice(&block);
    }
    out
}

async fn read_reason<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, RfbError> {
    let len = s.read_u32().await? as usize;
    let mut buf = vec![0u8; len.min(4096)];
    s.read_exact(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Authenticates to a VNC server as a client, up to (not including)
/// ClientInit.
pub async fn connect_server<S>(server: &mut S, password: &str) -> Result<(), RfbError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 12];
    server.read_exact(&mut greeting).await?;
    if !greeting.starts_with(b"RFB 003.") {
        return Err(RfbError::NotRfb(String::from_utf8_lossy(&greeting).trim().to_owned()));
    }
    server.write_all(VERSION).await?;
    let n = server.read_u8().await?;
    if n == 0 {
        return Err(RfbError::Refused(read_reason(server).await?));
    }
    let mut types = vec![0u8; n as usize];
    server.read_exact(&mut types).await?;
    let chosen = if !password.is_empty() && types.contains(&SECURITY_VNC) {
        SECURITY_VNC
    } else if types.contains(&SECURITY_NONE) {
        SECURITY_NONE
    } else if types.contains(&SECURITY_VNC) {
        SECURITY_VNC
    } else {
        return Err(RfbError::NoSecurity(types));
    };
    server.write_u8(chosen).await?;
    if chosen == SECURITY_VNC {
        let mut challenge = [0u8; 16];
        server.read_exact(&mut challenge).await?;
        server.write_all(&vnc_response(password, &challenge)).await?;
    }
    match server.read_u32().await? {
        0 => Ok(()),
        _ => Err(RfbError::AuthFailed(read_reason(server).await.unwrap_or_default())),
    }
}

/// Greets the tenant's client as a server offering no authentication, up to
/// (not including) ClientInit. `client` is a byte stream over the
/// websocket.
pub async fn accept_client<C>(client: &mut C) -> Result<(), RfbError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    client.write_all(VERSION).await?;
    client.flush().await?;
    let mut version = [0u8; 12];
    client.read_exact(&mut version).await?;
    if !version.starts_with(b"RFB 003.") {
        return Err(RfbError::BadClient);
    }
    // 3.3 clients get the type as a u32 and no result; 3.7/3.8 choose.
    if &version[..11] == b"RFB 003.003" {
        client.write_u32(u32::from(SECURITY_NONE)).await?;
        client.flush().await?;
        return Ok(());
    }
    client.write_all(&[1, SECURITY_NONE]).await?;
    client.flush().await?;
    if client.read_u8().await? != SECURITY_NONE {
        return Err(RfbError::BadClient);
    }
    client.write_u32(0).await?;
    client.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bits_are_reversed_and_padded() {
        assert_eq!(vnc_key("ab"), [0x86, 0x46, 0, 0, 0, 0, 0, 0]);
        assert_eq!(vnc_key("123456789"), vnc_key("12345678"), "only 8 bytes count");
    }

    #[test]
    fn the_response_is_des_of_the_challenge() {
        // DES with the all-zero key (the empty password) of an all-zero
        // block is the well-known 8CA64DE9C1B123A7.
        let r = vnc_response("", &[0u8; 16]);
        assert_eq!(r[..8], [0x8c, 0xa6, 0x4d, 0xe9, 0xc1, 0xb1, 0x23, 0xa7]);
        assert_eq!(r[..8], r[8..], "ECB: equal blocks, equal output");
        assert_ne!(vnc_response("secret", &[0u8; 16]), r);
    }

    /// A VNC server of the test's own that checks the response.
    async fn server(mut s: tokio::io::DuplexStream, password: &str, types: &[u8]) -> std::io::Result<()> {
        s.write_all(VERSION).await?;
        let mut v = [0u8; 12];
        s.read_exact(&mut v).await?;
        s.write_u8(types.len() as u8).await?;
        s.write_all(types).await?;
        let chosen = s.read_u8().await?;
        let ok = if chosen == SECURITY_VNC {
            let challenge = [7u8; 16];
            s.write_all(&challenge).await?;
            let mut resp = [0u8; 16];
            s.read_exact(&mut resp).await?;
            resp == vnc_response(password, &challenge)
        } else {
            true
        };
        if ok {
            s.write_u32(0).await?;
        } else {
            s.write_u32(1).await?;
            let reason = b"Authentication failed";
            s.write_u32(reason.len() as u32).await?;
            s.write_all(reason).await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn authenticates_with_the_password_and_reports_refusals() {
        for (server_pw, proxy_pw, types, want_ok) in [
            ("s3cret", "s3cret", vec![SECURITY_VNC], true),
            ("s3cret", "wrong", vec![SECURITY_VNC], false),
            ("", "", vec![SECURITY_NONE], true),
            ("s3cret", "s3cret", vec![SECURITY_NONE, SECURITY_VNC], true),
        ] {
            let (a, b) = tokio::io::duplex(1024);
            let srv = tokio::spawn(async move { server(b, server_pw, &types).await });
            let mut a = a;
            let r = connect_server(&mut a, proxy_pw).await;
            assert_eq!(r.is_ok(), want_ok, "{server_pw}/{proxy_pw}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("Authentication failed"), "{e}");
            }
            srv.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_vnc() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::spawn(async move { b.write_all(b"HTTP/1.1 400\r\n").await });
        let e = connect_server(&mut a, "x").await.unwrap_err();
        assert!(matches!(e, RfbError::NotRfb(_)), "{e}");
    }

    #[tokio::test]
    async fn offers_the_client_no_authentication() {
        let (mut proxy, mut client) = tokio::io::duplex(1024);
        let c = tokio::spawn(async move {
            let mut v = [0u8; 12];
            client.read_exact(&mut v).await.unwrap();
            assert_eq!(&v, VERSION);
            client.write_all(VERSION).await.unwrap();
            let mut types = [0u8; 2];
            client.read_exact(&mut types).await.unwrap();
            assert_eq!(types, [1, SECURITY_NONE]);
            client.write_u8(SECURITY_NONE).await.unwrap();
            assert_eq!(client.read_u32().await.unwrap(), 0);
        });
        accept_client(&mut proxy).await.unwrap();
        c.await.unwrap();
    }
}
