//! Token parsing on arbitrary input: the `authorization` header through
//! JWT verification (header, claims, signature), and page tokens. Neither
//! may panic; a refusal is UNAUTHENTICATED (or INVALID_ARGUMENT naming
//! `page_token`) within the error bounds.
#![no_main]

use std::sync::OnceLock;

use hcp_core::api::page::{Binding, PageTokens};
use hcp_core::auth::Verifier;
use hcp_core::config::AuthConfig;
use hcp_proto::error::{ErrorCode, MAX_MESSAGE_BYTES};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::hs256(b"fuzzing-secret-fuzzing-secret-32", &AuthConfig::default()))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match futures::executor::block_on(verifier().verify_header(Some(&text))) {
        Ok(_) => panic!("a token signed without the secret was accepted: {text:?}"),
        Err(e) => {
            assert_eq!(e.code, ErrorCode::Unauthenticated);
            assert!(e.message.len() <= MAX_MESSAGE_BYTES);
        }
    }
    let pages = PageTokens::new([9; 32]);
    if let Err(e) = pages.open(&Binding::new("vms"), &text) {
        assert_eq!(e.details.get("field").map(String::as_str), Some("page_token"));
    }
});
