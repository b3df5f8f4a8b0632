//! The permission bits of a provider's unix socket. Whoever may write to
//! the socket may call the provider, so the mode is the socket's access
//! control: `0600` (the provider's own user) unless the operator widens
//! it, e.g. to `0660` for core running in the socket's group.

use std::fmt;
use std::str::FromStr;

/// Permission bits applied to the unix socket right after it is bound
/// (`rwx` for owner, group and others; no setuid, setgid or sticky bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// `0600`: only the provider's own user may connect.
    pub const DEFAULT: Self = Self(0o600);

    /// The mode of these bits, refused above `0o777`.
    pub fn new(bits: u32) -> Result<Self, SocketModeError> {
        if bits > 0o777 {
            return Err(SocketModeError::TooLarge(bits));
        }
        Ok(Self(bits))
    }

    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Octal with a leading zero, as `chmod` and `ls` show it: `0660`.
impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Parses one to four octal digits, `"0660"` or `"660"`.
impl FromStr for SocketMode {
    type Err = SocketModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(SocketModeError::NotOctal(s.chars().take(16).collect()));
        }
        let bits = u32::from_str_radix(s, 8).map_err(|_| SocketModeError::NotOctal(s.to_owned()))?;
        Self::new(bits)
    }
}

/// A socket mode that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketModeError {
    /// Not one to four octal digits (the text, at most 16 characters of it).
    #[error("{0:?} is not an octal mode like \"0660\"")]
    NotOctal(String),
    /// Above `0777`.
    #[error("{0:04o} is above 0777")]
    TooLarge(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_octal_and_nothing_else() {
        let ok = |s: &str| s.parse::<SocketMode>().map(SocketMode::bits);
        assert_eq!(ok("0660"), Ok(0o660));
        assert_eq!(ok("600"), Ok(0o600));
        assert_eq!(ok("0"), Ok(0));
        assert_eq!(ok("0777"), Ok(0o777));
        assert_eq!(ok("1777"), Err(SocketModeError::TooLarge(0o1777)));
        assert_eq!(ok("7777"), Err(SocketModeError::TooLarge(0o7777)));
        for bad in ["", "0o660", "0x1a", "660 ", "-660", "0680", "06600", "rw-rw----"] {
            assert!(matches!(ok(bad), Err(SocketModeError::NotOctal(_))), "{bad:?}");
        }
        let long = "9".repeat(1000);
        let e = long.parse::<SocketMode>().unwrap_err().to_string();
        assert!(e.len() < 64, "the message is bounded: {e}");
        assert_eq!(SocketMode::DEFAULT.to_string(), "0600");
        assert_eq!(SocketMode::default(), SocketMode::DEFAULT);
    }
}
