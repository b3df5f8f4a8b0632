//! Page tokens: opaque, tamper-evident and bound to the query that made
//! them. A token is `base64url(last id ‖ tag)`, where the tag is the first
//! 16 bytes of HMAC-SHA256 over the listing's name, the caller's scope and
//! filters, and the last id, under a key every API process shares (kept in
//! the database, made once by the first process that needs it). A token
//! that was edited, forged, or made for another query or another tenant is
//! refused with INVALID_ARGUMENT naming `page_token`.
//!
//! HMAC (the `hmac` crate, RustCrypto's, beside the `sha2` already used)
//! rather than encryption: the last id is not a secret to the caller who
//! read that page; what matters is that nobody can make a token HCP did
//! not issue for that query.

use hcp_proto::error::ApiError;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the MAC kept in a token.
const TAG_LEN: usize = 16;

/// Signs and checks page tokens.
#[derive(Clone)]
pub struct PageTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTokens").finish_non_exhaustive()
    }
}

/// What a page token is bound to: the listing and every filter of the query
/// that made it (not the page size, which may change between pages).
#[derive(Debug, Default)]
pub struct Binding(Vec<u8>);

impl Binding {
    /// Starts a binding for the listing `name` (e.g. `"vms"`).
    pub fn new(name: &str) -> Self {
        let mut b = Self(Vec::new());
        b.push(name);
        b
    }

    /// Adds one part of the query. Parts are length-prefixed, so
    /// `("ab", "c")` and `("a", "bc")` differ.
    pub fn push(&mut self, part: &str) -> &mut Self {
        self.0.extend_from_slice(&(part.len() as u64).to_be_bytes());
        self.0.extend_from_slice(part.as_bytes());
        self
    }
}

impl PageTokens {
    /// Uses `key` (32 random bytes shared by every API process).
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn tag(&self, binding: &Binding, last: uuid::Uuid) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&binding.0);
        mac.update(last.as_bytes());
        mac
    }

    /// The token for the page after `last`.
    pub fn seal(&self, binding: &Binding, last: uuid::Uuid) -> String {
        use base64::Engine;
        let tag = self.tag(binding, last).finalize().into_bytes();
        let mut bytes = Vec::with_capacity(16 + TAG_LEN);
        bytes.extend_from_slice(last.as_bytes());
        bytes.extend_from_slice(&tag[..TAG_LEN]);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The position a token names: `None` for an empty token (the first
    /// page), the last id of the previous page otherwise.
    pub fn open(&self, binding: &Binding, token: &str) -> Result<Option<uuid::Uuid>, ApiError> {
        use base64::Engine;
        if token.is_empty() {
            return Ok(None);
        }
        let refused =
            || ApiError::invalid_field("page_token", "page_token is not one HCP issued for this query");
        // A real token is 43 characters; anything much longer is refused
        // before decoding.
        if token.len() > 64 {
            return Err(refused());
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| refused())?;
        if bytes.len() != 16 + TAG_LEN {
            return Err(refused());
        }
        let last = uuid::Uuid::from_slice(&bytes[..16]).map_err(|_| refused())?;
        self.tag(binding, last).verify_truncated_left(&bytes[16..]).map_err(|_| refused())?;
        Ok(Some(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> PageTokens {
        PageTokens::new([7; 32])
    }

    fn vms(tenant: &str, status: &str) -> Binding {
        let mut b = Binding::new("vms");
        b.push(tenant).push("p1").push(status);
        b
    }

    #[test]
    fn a_token_opens_only_for_its_query() {
        let last = uuid::Uuid::now_v7();
        let t = tokens().seal(&vms("acme", ""), last);
        assert_eq!(tokens().open(&vms("acme", ""), &t).unwrap(), Some(last));
        assert_eq!(tokens().open(&vms("acme", ""), "").unwrap(), None);
        // Another tenant, another filter, another key: refused.
        assert!(tokens().open(&vms("evil", ""), &t).is_err());
        assert!(tokens().open(&vms("acme", "ACTIVE"), &t).is_err());
        assert!(PageTokens::new([8; 32]).open(&vms("acme", ""), &t).is_err());
    }

    #[test]
    fn edited_tokens_are_refused() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let last = uuid::Uuid::now_v7();
        let t = tokens().seal(&vms("acme", ""), last);
        let mut bytes = engine.decode(&t).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let e = tokens().open(&vms("acme", ""), &engine.encode(&bytes)).unwrap_err();
            assert_eq!(e.details.get("field").map(String::as_str), Some("page_token"));
            bytes[i] ^= 1;
        }
        // The unsigned form of earlier releases (the raw last id) is refused.
        assert!(tokens().open(&vms("acme", ""), &engine.encode(last.as_bytes())).is_err());
        assert!(tokens().open(&vms("acme", ""), &"A".repeat(10_000)).is_err());
    }

    #[test]
    fn binding_parts_are_delimited() {
        let last = uuid::Uuid::now_v7();
        let mut a = Binding::new("vms");
        a.push("ab").push("c");
        let mut b = Binding::new("vms");
        b.push("a").push("bc");
        let t = tokens().seal(&a, last);
        assert!(tokens().open(&b, &t).is_err());
    }
}
