//! A synthetic VNC server for HCP's simulators: what a hypervisor's VNC
//! display looks like to a client, without a hypervisor. RFB 3.8 (RFC 6143)
//! with one security type, VNC authentication (the 16-byte challenge
//! encrypted with DES under the password), a ServerInit with the desktop's
//! name, and a framebuffer ([`Screen`]) sent raw in the pixel format the
//! client asks for, for each non-incremental update request. Nothing on a
//! simulated screen changes, so incremental requests wait, as a real server
//! waits for a change.
//!
//! Used by the simulator provider (one listener for all its VMs: the
//! password the client answers with tells which VM's screen it gets) and by
//! the Proxmox simulator (behind `vncwebsocket`).

use std::io;

use des::cipher::{BlockEncrypt, KeyInit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A framebuffer: RGB pixels, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    width: u16,
    height: u16,
    pixels: Vec<[u8; 3]>,
}

/// What a client that authenticated sees.
#[derive(Debug, Clone)]
pub struct Desktop {
    /// The name in ServerInit.
    pub name: String,
    /// The framebuffer.
    pub screen: Screen,
}

impl Screen {
    /// Eight vertical colour bars.
    pub fn bars(width: u16, height: u16) -> Self {
        const BARS: [[u8; 3]; 8] = [
            [255, 255, 255],
            [255, 255, 0],
            [0, 255, 255],
            [0, 255, 0],
            [255, 0, 255],
            [255, 0, 0],
            [0, 0, 255],
            [0, 0, 0],
        ];
        let w = usize::from(width.max(1));
        let pixels =
            (0..usize::from(height)).flat_map(|_| (0..w).map(move |x| BARS[x * BARS.len() / w])).collect();
        Self { width: width.max(1), height, pixels }
    }

    /// Lines of text (ASCII; anything else is shown as '?'), 8x8 pixels a
    /// character, white on `background`, from the top left with a margin.
    pub fn text(width: u16, height: u16, background: [u8; 3], lines: &[&str]) -> Self {
        use font8x8::UnicodeFonts;
        let mut pixels = vec![background; usize::from(width) * usize::from(height)];
        let (w, h) = (usize::from(width), usize::from(height));
        for (row, line) in lines.iter().enumerate() {
            for (col, c) in line.chars().enumerate() {
                let c = if c.is_ascii_graphic() || c == ' ' { c } else { '?' };
                let Some(glyph) = font8x8::BASIC_FONTS.get(c) else { continue };
                for (gy, bits) in glyph.iter().enumerate() {
                    for gx in 0..8 {
                        let (x, y) = (8 + col * 8 + gx, 8 + row * 12 + gy);
                        if bits & (1 << gx) != 0 && x < w && y < h {
                            pixels[y * w + x] = [255, 255, 255];
                        }
                    }
                }
            }
        }
        Self { width, height, pixels }
    }

    /// Width in pixels.
    pub fn width(&self) -> u16 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u16 {
        self.height
    }

    fn encode(&self, pf: &PixelFormat) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pixels.len() * usize::from(pf.bits_per_pixel / 8));
        for rgb in &self.pixels {
            pf.pixel(*rgb, &mut out);
        }
        out
    }
}

/// The response to a VNC authentication challenge under `password`: DES
/// of each half, keyed by the password's first 8 bytes (zero padded), each
/// byte's bits reversed, as the original VNC code does.
pub fn vnc_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = [0u8; 16];
    for (half, chunk) in challenge.chunks_exact(8).enumerate() {
        let mut block = [0u8; 8];
        block.copy_from_slice(chunk);
        let mut block = block.into();
        cipher.encrypt_block(&mut block);
        out[half * 8..half * 8 + 8].copy_from_slice(&block);
    }
    out
}

/// A client's pixel format (RFC 6143 7.4).
#[derive(Debug, Clone, Copy)]
struct PixelFormat {
    bits_per_pixel: u8,
    big_endian: bool,
    max: [u16; 3],
    shift: [u8; 3],
}

impl PixelFormat {
    /// 32 bits, depth 24, little-endian, true colour, red at bit 16.
    const DEFAULT: Self = Self { bits_per_pixel: 32, big_endian: false, max: [255; 3], shift: [16, 8, 0] };

    /// From a SetPixelFormat message's 16 bytes.
    fn from_bytes(bytes: &[u8; 16]) -> Self {
        Self {
            bits_per_pixel: bytes[0],
            big_endian: bytes[2] != 0,
            max: [
                u16::from_be_bytes([bytes[4], bytes[5]]),
                u16::from_be_bytes([bytes[6], bytes[7]]),
                u16::from_be_bytes([bytes[8], bytes[9]]),
            ],
            shift: [bytes[10], bytes[11], bytes[12]],
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let [r, g, b] = self.max.map(u16::to_be_bytes);
        [
            self.bits_per_pixel,
            24,
            u8::from(self.big_endian),
            1,
            r[0],
            r[1],
            g[0],
            g[1],
            b[0],
            b[1],
            self.shift[0],
            self.shift[1],
            self.shift[2],
            0,
            0,
            0,
        ]
    }

    /// One pixel of colour `rgb` (0..=255 each).
    fn pixel(&self, rgb: [u8; 3], out: &mut Vec<u8>) {
        let mut v = 0u32;
        for ((c, max), shift) in rgb.into_iter().zip(self.max).zip(self.shift) {
            v |= (u32::from(c) * u32::from(max) / 255).checked_shl(u32::from(shift)).unwrap_or(0);
        }
        let n = usize::from(self.bits_per_pixel / 8).clamp(1, 4);
        let bytes = v.to_le_bytes();
        if self.big_endian {
            out.extend(bytes[..n].iter().rev());
        } else {
            out.extend_from_slice(&bytes[..n]);
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Serves one RFB connection until either side goes. `authorize` gets the
/// challenge and the client's response and gives the desktop whose
/// password answers it, or nothing (authentication fails).
pub async fn serve<S, F>(s: &mut S, authorize: F) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&[u8; 16], &[u8; 16]) -> Option<Desktop>,
{
    s.write_all(b"RFB 003.008\n").await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    if &version != b"RFB 003.008\n" && &version != b"RFB 003.007\n" {
        return Err(invalid("the client is not an RFB 3.7/3.8 client"));
    }
    // One security type: VNC authentication.
    s.write_all(&[1, 2]).await?;
    if s.read_u8().await? != 2 {
        return Err(invalid("the client chose another security type"));
    }
    let challenge: [u8; 16] = rand::random();
    s.write_all(&challenge).await?;
    let mut response = [0u8; 16];
    s.read_exact(&mut response).await?;
    let Some(desktop) = authorize(&challenge, &response) else {
        let reason = b"Authentication failed";
        s.write_u32(1).await?;
        s.write_u32(reason.len() as u32).await?;
        s.write_all(reason).await?;
        return Err(invalid("wrong VNC password"));
    };
    s.write_u32(0).await?;
    s.read_u8().await?; // ClientInit: shared or not, all the same here.
    let screen = &desktop.screen;
    let mut pf = PixelFormat::DEFAULT;
    let mut init = Vec::new();
    init.extend_from_slice(&screen.width.to_be_bytes());
    init.extend_from_slice(&screen.height.to_be_bytes());
    init.extend_from_slice(&pf.to_bytes());
    init.extend_from_slice(&(desktop.name.len() as u32).to_be_bytes());
    init.extend_from_slice(desktop.name.as_bytes());
    s.write_all(&init).await?;
    loop {
        match s.read_u8().await? {
            // SetPixelFormat
            0 => {
                let mut msg = [0u8; 19];
                s.read_exact(&mut msg).await?;
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&msg[3..]);
                if bytes[3] == 0 {
                    return Err(invalid("colour maps are not simulated"));
                }
                pf = PixelFormat::from_bytes(&bytes);
            }
            // SetEncodings: raw is always allowed.
            2 => {
                s.read_u8().await?;
                let n = s.read_u16().await?;
                let mut skip = vec![0u8; usize::from(n) * 4];
                s.read_exact(&mut skip).await?;
            }
            // FramebufferUpdateRequest
            3 => {
                let incremental = s.read_u8().await? != 0;
                let mut area = [0u8; 8];
                s.read_exact(&mut area).await?;
                if !incremental {
                    let mut update = vec![0, 0, 0, 1, 0, 0, 0, 0];
                    update.extend_from_slice(&screen.width.to_be_bytes());
                    update.extend_from_slice(&screen.height.to_be_bytes());
                    update.extend_from_slice(&0i32.to_be_bytes());
                    update.extend_from_slice(&screen.encode(&pf));
                    s.write_all(&update).await?;
                }
            }
            // KeyEvent, PointerEvent: nothing to do.
            4 => {
                let mut msg = [0u8; 7];
                s.read_exact(&mut msg).await?;
            }
            5 => {
                let mut msg = [0u8; 5];
                s.read_exact(&mut msg).await?;
            }
            // ClientCutText
            6 => {
                let mut pad = [0u8; 3];
                s.read_exact(&mut pad).await?;
                let len = s.read_u32().await?;
                let mut text = vec![0u8; len.min(1 << 20) as usize];
                s.read_exact(&mut text).await?;
            }
            other => return Err(invalid(&format!("unknown client message {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_follow_the_clients_format() {
        let mut out = Vec::new();
        PixelFormat::DEFAULT.pixel([255, 0, 0], &mut out);
        assert_eq!(out, [0, 0, 255, 0], "red at bit 16, little-endian");
        let rgb565 =
            PixelFormat { bits_per_pixel: 16, big_endian: true, max: [31, 63, 31], shift: [11, 5, 0] };
        out.clear();
        rgb565.pixel([255, 255, 255], &mut out);
        assert_eq!(out, [0xff, 0xff]);
        assert_eq!(Screen::bars(64, 48).encode(&rgb565).len(), 64 * 48 * 2);
        let back = PixelFormat::from_bytes(&rgb565.to_bytes());
        assert_eq!(
            (back.bits_per_pixel, back.big_endian, back.max, back.shift),
            (16, true, [31, 63, 31], [11, 5, 0])
        );
    }

    #[test]
    fn the_response_is_des_of_the_challenge() {
        // DES of a zero block under the zero key (empty password).
        assert_eq!(vnc_response("", &[0; 16])[..8], [0x8c, 0xa6, 0x4d, 0xe9, 0xc1, 0xb1, 0x23, 0xa7]);
        assert_ne!(vnc_response("ticket", &[0; 16]), vnc_response("", &[0; 16]));
    }

    #[test]
    fn text_is_drawn_in_white() {
        let blank = Screen::text(80, 24, [0, 0, 128], &[]);
        assert!(blank.pixels.iter().all(|p| *p == [0, 0, 128]));
        let hi = Screen::text(80, 24, [0, 0, 128], &["HI"]);
        let white = hi.pixels.iter().filter(|p| **p == [255, 255, 255]).count();
        assert!(white > 10, "{white} white pixels");
        // Nothing outside the two glyphs' cells.
        for (i, p) in hi.pixels.iter().enumerate() {
            let (x, y) = (i % 80, i / 80);
            if *p == [255, 255, 255] {
                assert!((8..24).contains(&x) && (8..16).contains(&y), "({x}, {y})");
            }
        }
    }
}
