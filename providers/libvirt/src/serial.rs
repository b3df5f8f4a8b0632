//! The domain's serial port: the pty libvirt gives it (named in the live
//! XML), opened raw for the SDK's serial relay; and its log file (virtlogd
//! writes it, rotating at 2 MiB), which is the boot log.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hcp_provider_sdk::serial::{SerialPorts, SerialStream};
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use rustix::fs::{Mode, OFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Libvirt;
use crate::connection::not_running;

/// The pty of a domain's first serial port, from its live XML.
pub(crate) fn serial_pty_of(xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let serial =
        doc.descendants().find(|n| n.has_tag_name("serial") && n.attribute("type") == Some("pty"))?;
    let source = serial.children().find(|n| n.has_tag_name("source"))?;
    source.attribute("path").map(PathBuf::from)
}

/// A pty opened without becoming the caller's controlling terminal, in raw
/// mode (no echo, no line editing, no CR/LF translation: the guest's shell
/// does all of that), non-blocking under tokio.
pub(crate) struct Pty {
    fd: AsyncFd<std::fs::File>,
}

impl Pty {
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut t = rustix::termios::tcgetattr(&fd)?;
        t.make_raw();
        rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &t)?;
        // `new` is deprecated for types whose descriptor may change under
        // it (its replacement, `register`, is unsafe, and this workspace
        // forbids unsafe code); a `File` owns one descriptor for its whole
        // life, which is exactly what `register`'s contract asks.
        #[allow(deprecated)]
        let fd = AsyncFd::new(std::fs::File::from(fd))?;
        Ok(Self { fd })
    }
}

impl AsyncRead for Pty {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            match guard.try_io(|f| f.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // The other side closed (QEMU went away): the line's end.
                Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[hcp_provider_sdk::async_trait]
impl SerialPorts for Libvirt {
    async fn open_serial(&self, vm_id: &str) -> Result<Box<dyn SerialStream>, ProviderError> {
        let id = vm_id.to_owned();
        let pty = self
            .call(&format!("serial port of vm {vm_id}"), move |c| {
                let d = c.lookup_domain_by_uuid_string(&id)?;
                if !d.is_active()? {
                    return Err(not_running());
                }
                Ok(serial_pty_of(&d.xml_desc(0)?))
            })
            .await?
            .ok_or_else(|| ProviderError::new(ErrorKind::InvalidState, "the vm has no serial pty"))?;
        let port = Pty::open(&pty).map_err(|e| {
            ProviderError::new(
                ErrorKind::Unavailable,
                format!("cannot open the serial port {}: {e}", pty.display()),
            )
        })?;
        Ok(Box::new(port))
    }
}

impl Libvirt {
    /// The serial console: a ticket for the relay.
    pub(crate) fn serial_console(&self, vm_id: &str) -> Result<pb::ConsoleEndpoint, ProviderError> {
        match self.inner.serial.get() {
            Some(relay) => relay.endpoint(vm_id),
            None => Err(ProviderError::new(ErrorKind::Unsupported, "serial consoles are not supported")),
        }
    }

    /// The boot log: the last `tail_lines` lines of what the guest wrote on
    /// its serial port, from at most the last [`hcp_provider_sdk::serial::MAX_LOG_BYTES`].
    pub(crate) async fn console_log(
        &self,
        req: pb::GetConsoleLogRequest,
    ) -> Result<pb::ConsoleLog, ProviderError> {
        let id = req.vm_id.clone();
        let exists = self
            .call(&format!("vm {}", req.vm_id), move |c| Ok(c.lookup_domain_by_uuid_string(&id).is_ok()))
            .await?;
        if !exists {
            return Err(ProviderError::new(ErrorKind::NotFound, format!("vm {} not found", req.vm_id)));
        }
        let path = self.vm_dir(&req.vm_id).join("serial.log");
        hcp_provider_sdk::serial::tail_file(&path, req.tail_lines).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pty_comes_from_the_first_pty_serial() {
        let xml = "<domain><devices><serial type='file'><source path='/x'/></serial>\
                   <serial type='pty'><source path='/dev/pts/7'/><target port='0'/></serial>\
                   <console type='pty'><source path='/dev/pts/7'/></console></devices></domain>";
        assert_eq!(serial_pty_of(xml), Some(PathBuf::from("/dev/pts/7")));
        assert_eq!(serial_pty_of("<domain><devices><serial type='pty'/></devices></domain>"), None);
        assert_eq!(serial_pty_of("not xml"), None);
    }
}
