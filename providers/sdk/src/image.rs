//! The bytes of an ImportImage stream, checked as they arrive.
//!
//! Core streams an image as a header and then data messages. Every
//! provider would check the same things (the header comes first and is
//! well formed, the bytes add up to the announced size, their SHA-256 is
//! the announced one), so the SDK checks them once: [`ImageUpload::chunk`]
//! hands out the data and answers an error instead of the end of the
//! stream when the bytes were short, long or not the announced ones. A
//! provider therefore writes chunks where its hypervisor takes them and
//! commits (renames, registers, marks as a template) only after `chunk`
//! answered `Ok(None)`; on an error it removes what it wrote.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::{ErrorKind, ProviderError, pb};

/// The largest data message a provider accepts (core sends at most 4 MiB).
pub const MAX_CHUNK_BYTES: usize = 4 << 20;

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::ImportImageChunk, tonic::Status>> + Send>>;

/// An ImportImage stream after its header: the bytes, checked.
pub struct ImageUpload {
    header: pb::ImportImageHeader,
    format: pb::DiskFormat,
    chunks: Chunks,
    received: u64,
    digest: Sha256,
    done: bool,
}

impl std::fmt::Debug for ImageUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageUpload")
            .field("header", &self.header)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidArgument, message)
}

impl ImageUpload {
    /// Reads and checks the header: the first message must be one, with an
    /// image id that is a UUID, a known format and a 64-digit hex SHA-256.
    pub async fn start(
        chunks: impl Stream<Item = Result<pb::ImportImageChunk, tonic::Status>> + Send + 'static,
    ) -> Result<Self, ProviderError> {
        let mut chunks: Chunks = Box::pin(chunks);
        let first = chunks
            .next()
            .await
            .ok_or_else(|| invalid("an ImportImage stream must start with a header"))?
            .map_err(|s| invalid(format!("the ImportImage stream failed: {}", s.message())))?;
        let Some(pb::import_image_chunk::Part::Header(header)) = first.part else {
            return Err(invalid("an ImportImage stream must start with a header"));
        };
        if header.image_id.len() != 36 || header.image_id.parse::<uuid::Uuid>().is_err() {
            return Err(invalid(format!("image_id must be a UUID, got {:?}", header.image_id)));
        }
        let format = pb::DiskFormat::try_from(header.format)
            .ok()
            .filter(|f| *f != pb::DiskFormat::Unspecified)
            .ok_or_else(|| invalid(format!("format {} is not a disk format", header.format)))?;
        if header.sha256.len() != 64
            || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(invalid("sha256 must be 64 lower-case hex digits"));
        }
        Ok(Self { header, format, chunks, received: 0, digest: Sha256::new(), done: false })
    }

    /// The header as core sent it.
    pub fn header(&self) -> &pb::ImportImageHeader {
        &self.header
    }

    /// The format of the bytes.
    pub fn format(&self) -> pb::DiskFormat {
        self.format
    }

    /// Bytes handed out so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next piece of the image; `Ok(None)` once every announced byte
    /// arrived and matched the digest. A second header, a stream that ends
    /// short, runs past `size_bytes` or hashes to something else is
    /// INVALID_ARGUMENT; a stream core broke off is UNAVAILABLE.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ProviderError> {
        if self.done {
            return Ok(None);
        }
        let size = self.header.size_bytes;
        match self.chunks.next().await {
            Some(Ok(pb::ImportImageChunk { part: Some(pb::import_image_chunk::Part::Data(data)) })) => {
                if data.len() > MAX_CHUNK_BYTES {
                    return Err(invalid(format!(
                        "a data message holds {} bytes, more than {MAX_CHUNK_BYTES}",
                        data.len()
                    )));
                }
                self.received += data.len() as u64;
                if self.received > size {
                    return Err(invalid(format!("the image runs past its announced {size} bytes")));
                }
                self.digest.update(&data);
                Ok(Some(Bytes::from(data)))
            }
            Some(Ok(_)) => Err(invalid("an ImportImage stream has one header, first")),
            Some(Err(status)) => Err(ProviderError::new(
                ErrorKind::Unavailable,
                format!("the ImportImage stream broke off: {}", status.message()),
            )),
            None => {
                if self.received != size {
                    return Err(invalid(format!(
                        "the image ended after {} of its announced {size} bytes",
                        self.received
                    )));
                }
                let got = hex::encode(std::mem::take(&mut self.digest).finalize());
                if got != self.header.sha256 {
                    return Err(invalid(format!(
                        "the image's sha256 is {got}, not the announced {}",
                        self.header.sha256
                    )));
                }
                self.done = true;
                Ok(None)
            }
        }
    }

    /// Reads the rest without keeping it (an image already stored), still
    /// checking it, so core learns of a broken stream all the same.
    pub async fn drain(&mut self) -> Result<(), ProviderError> {
        while self.chunk().await?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64, data: &[u8]) -> pb::ImportImageChunk {
        pb::ImportImageChunk {
            part: Some(pb::import_image_chunk::Part::Header(pb::ImportImageHeader {
                image_id: "01a24900-f3eb-7455-b04c-16ad213edb3e".into(),
                name: "tiny".into(),
                format: pb::DiskFormat::Raw as i32,
                size_bytes: size,
                sha256: hex::encode(Sha256::digest(data)),
                min_disk_gib: 1,
            })),
        }
    }

    fn data(b: &[u8]) -> pb::ImportImageChunk {
        pb::ImportImageChunk { part: Some(pb::import_image_chunk::Part::Data(b.to_vec())) }
    }

    async fn read(messages: Vec<pb::ImportImageChunk>) -> Result<Vec<u8>, ProviderError> {
        let mut up = ImageUpload::start(futures::stream::iter(messages.into_iter().map(Ok))).await?;
        let mut all = Vec::new();
        while let Some(c) = up.chunk().await? {
            all.extend_from_slice(&c);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn the_announced_bytes_pass_and_anything_else_is_refused() {
        let ok = read(vec![header(6, b"abcdef"), data(b"abc"), data(b"def")]).await.unwrap();
        assert_eq!(ok, b"abcdef");
        let short = read(vec![header(6, b"abcdef"), data(b"abc")]).await.unwrap_err();
        assert!(short.message.contains("after 3 of its announced 6"), "{short}");
        let long = read(vec![header(6, b"abcdef"), data(b"abcdefg")]).await.unwrap_err();
        assert!(long.message.contains("runs past"), "{long}");
        let wrong = read(vec![header(6, b"abcdef"), data(b"abcxyz")]).await.unwrap_err();
        assert!(wrong.message.contains("not the announced"), "{wrong}");
        let headless = read(vec![data(b"abc")]).await.unwrap_err();
        assert!(headless.message.contains("start with a header"), "{headless}");
        let twice = read(vec![header(6, b"abcdef"), header(6, b"abcdef")]).await.unwrap_err();
        assert!(twice.message.contains("one header"), "{twice}");
        for e in [short, long, wrong, headless, twice] {
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
        }
    }
}
