//! The gateway's listener, which gives the error body to the few answers
//! the HTTP server writes by itself.
//!
//! hyper refuses a request it cannot parse before any handler runs: a
//! request line over 64 KiB (414), a head over its buffer or with too many
//! headers (431), or bytes that are not HTTP/1.1 (400). It writes those
//! answers with an empty body and closes the connection. Every other
//! answer of the gateway carries `{"code","message","details","trace_id"}`,
//! so [`EdgeIo`] recognises exactly those bare answers as hyper writes them
//! (status line, `content-length: 0`, end of head, nothing else) and
//! writes the same status with the error body instead. Nothing else passes
//! through it changed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hcp_proto::error::{ApiError, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Accepts TCP connections with `TCP_NODELAY` set, each wrapped in [`EdgeIo`].
#[derive(Debug)]
pub struct EdgeListener {
    inner: TcpListener,
}

impl EdgeListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl axum::serve::Listener for EdgeListener {
    type Io = EdgeIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Replies leave in several writes; without TCP_NODELAY,
                    // Nagle's algorithm meets the client's delayed ACK and
                    // stalls each reply ~40 ms (hcp-bench P6 measured p50
                    // 48 ms for a 0.3 ms query before this).
                    let _ = stream.set_nodelay(true);
                    return (EdgeIo { inner: stream, pending: Vec::new(), sent: 0 }, addr);
                }
                // Out of file descriptors or similar: wait rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection whose bare parse-error answers get the error body.
#[derive(Debug)]
pub struct EdgeIo {
    inner: TcpStream,
    /// A rewritten answer not yet fully written, and how much of it was.
    pending: Vec<u8>,
    sent: usize,
}

/// The error body for a bare answer hyper wrote, if `head` is one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let bare = head.ends_with(b"\r\n\r\n")
        && head.windows(20).any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r"));
    if !bare {
        return None;
    }
    let (status, err) = if head.starts_with(b"HTTP/1.1 414 ") {
        (
            "414 URI Too Long",
            ApiError::new(ErrorCode::UriTooLong, "the request line is longer than the HTTP server accepts")
                .with_detail("field", "path"),
        )
    } else if head.starts_with(b"HTTP/1.1 431 ") {
        (
            "431 Request Header Fields Too Large",
            ApiError::new(
                ErrorCode::HeadersTooLarge,
                "the request head is larger than the HTTP server accepts",
            ),
        )
    } else if head.starts_with(b"HTTP/1.1 400 ") {
        ("400 Bad Request", ApiError::invalid_field("request", "the request is not valid HTTP/1.1"))
    } else {
        return None;
    };
    let (_, body) = crate::transcode::error_body(&err, None);
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

impl EdgeIo {
    /// Writes what is left of a rewritten answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(answer) = rewrite(buf) {
            // The caller's bytes count as written; ours go out instead.
            self.pending = answer;
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(answer) = rewrite(first)
        {
            self.pending = answer;
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(first.len()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_parse_error_answers_are_rewritten() {
        let bare =
            b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Thu, 26 Nov 2026 15:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(bare).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{out}");
        assert!(out.contains(r#""code":"URI_TOO_LONG""#), "{out}");
        let head_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(String::from_utf8(rewrite(head_431).unwrap()).unwrap().contains("HEADERS_TOO_LARGE"));
        // Our own answers (a body follows, or a content type is set) pass.
        assert!(rewrite(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 120\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite(b"{\"code\":\"x\"}").is_none());
    }
}
