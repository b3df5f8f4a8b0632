//! The REST transcoder on arbitrary requests: route matching (path
//! templates, `:verb`), query strings and JSON bodies into the method's
//! input message. It must never panic, and every refusal must be an error
//! within the bounds that keep an HTTP/2 connection healthy.
#![no_main]

use std::sync::OnceLock;

use hcp_gateway::routes::{self, Route};
use hcp_gateway::transcode;
use hcp_proto::error::{MAX_DETAIL_BYTES, MAX_MESSAGE_BYTES};
use libfuzzer_sys::fuzz_target;

fn table() -> &'static [Route] {
    static ROUTES: OnceLock<Vec<Route>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES).expect("routes").1
    })
}

const METHODS: [http::Method; 5] =
    [http::Method::GET, http::Method::POST, http::Method::PUT, http::Method::PATCH, http::Method::DELETE];

// Input: one byte for the method, then path, query and body separated by
// NUL bytes (a path or query cannot hold a raw NUL, so the split is free).
fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(3, |b| *b == 0);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = parts.next().map(String::from_utf8_lossy);
    let body = parts.next().unwrap_or_default();
    let method = &METHODS[usize::from(m) % METHODS.len()];
    let path = format!("/{}", path.trim_start_matches('/'));
    let result = routes::find(table(), method, &path)
        .and_then(|(route, vars)| transcode::request_message(route, vars, query.as_deref(), body).map(|_| ()));
    if let Err(e) = result {
        assert!(e.message.len() <= MAX_MESSAGE_BYTES, "message of {} bytes", e.message.len());
        assert!(e.details.iter().all(|(k, v)| k.len() <= MAX_DETAIL_BYTES && v.len() <= MAX_DETAIL_BYTES));
        let (status, body) = transcode::error_body(&e, None);
        assert!(status.is_client_error(), "{status} for {e}");
        assert!(body.len() < 4096);
    }
});
