//! Tokens from an identity provider: a local JWKS server that rotates its
//! keys, and the forged tokens an attacker would try. Every refusal is 401
//! (UNAUTHENTICATED); the key set is fetched again for an unknown `kid`, at
//! most once per interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use hcp_core::auth::{KeyError, Verifier};
use hcp_core::config::AuthConfig;
use hcp_proto::error::ErrorCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An EC P-256 key pair: the private key to sign test tokens, the JWK to
/// publish.
struct TestKey {
    kid: String,
    signing: EncodingKey,
    public_pem: String,
    jwk: Value,
}

fn key(kid: &str) -> TestKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let raw = pair.public_key_raw();
    assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed P-256 point");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
        "kid": kid, "alg": "ES256", "use": "sig",
    });
    TestKey { kid: kid.to_owned(), signing, public_pem: pair.public_key_pem(), jwk }
}

/// A JWKS endpoint on 127.0.0.1 that serves whatever set it holds now and
/// counts its requests.
struct Idp {
    url: String,
    set: Arc<std::sync::Mutex<Value>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn idp(keys: &[&TestKey]) -> Idp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let set = Arc::new(std::sync::Mutex::new(
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}),
    ));
    let requests = Arc::new(AtomicUsize::new(0));
    let (s, r) = (set.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            let (s, r) = (s.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = tcp.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                r.fetch_add(1, Ordering::SeqCst);
                let body = s.lock().unwrap().to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: public, max-age=3600\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    Idp { url, set, requests, task }
}

fn config(url: &str) -> AuthConfig {
    AuthConfig { jwks_url: Some(url.to_owned()), jwks_min_refresh_seconds: 2, ..AuthConfig::default() }
}

fn claims() -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": "alice", "iss": "hcp-dev", "aud": "hcp", "exp": now + 300, "iat": now,
        "tenant": "acme", "projects": ["demo"], "roles": ["tenant.member"],
    })
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.signing).unwrap()
}

async fn refused(v: &Verifier, token: &str) -> String {
    let e = v.verify(token).await.expect_err("the token is refused");
    assert_eq!(e.code, ErrorCode::Unauthenticated, "{e}");
    e.message
}

/// Holds the paused clock still until dropped. A paused runtime with
/// nothing to run advances its clock to the next timer, and waiting for
/// the local IdP's answer (real I/O) looks like nothing to run, so the
/// fetch's own timeout could fire; a blocking task in flight stops that
/// auto-advance (see `tokio::time::pause`). Time then moves only by
/// `tokio::time::advance`, and the test is the same on a loaded machine.
fn hold_clock() -> std::sync::mpsc::Sender<()> {
    let (release, held) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = held.recv();
    });
    release
}

#[tokio::test(start_paused = true)]
async fn keys_follow_the_identity_providers_rotation() {
    let _still = hold_clock();
    // The minimum interval between fetches (`config`: 2 s), and a moment.
    let interval = Duration::from_secs(2);
    let tick = Duration::from_millis(1);
    let (k1, k2) = (key("k1"), key("k2"));
    let idp = idp(&[&k1]).await;
    let v = Verifier::from_config(&config(&idp.url)).unwrap();
    assert_eq!(idp.requests.load(Ordering::SeqCst), 0, "nothing is fetched before a token needs it");

    let p = v.verify(&sign(&k1, &claims())).await.unwrap();
    assert_eq!(p.tenant_id.as_deref(), Some("acme"));
    // Cached: a second token costs no fetch.
    v.verify(&sign(&k1, &claims())).await.unwrap();
    assert_eq!(idp.requests.load(Ordering::SeqCst), 1);

    // The provider rotates: k2 replaces k1. Until the minimum interval
    // since the last fetch has passed, a token signed with k2 fetches
    // nothing and is refused; once it has, the token makes one fetch and
    // is accepted without a restart.
    *idp.set.lock().unwrap() = json!({"keys": [k2.jwk.clone()]});
    tokio::time::advance(interval - tick).await;
    assert!(refused(&v, &sign(&k2, &claims())).await.contains("key id is unknown"));
    assert_eq!(idp.requests.load(Ordering::SeqCst), 1, "no fetch within the interval");
    tokio::time::advance(tick).await;
    v.verify(&sign(&k2, &claims())).await.unwrap();
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);

    // k1 is gone. A token naming it, and a flood of made-up kids, fetch at
    // most once per interval: none now, so soon after the last.
    assert!(refused(&v, &sign(&k1, &claims())).await.contains("key id is unknown"));
    for i in 0..50 {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(format!("made-up-{i}"));
        let t = jsonwebtoken::encode(&header, &claims(), &k2.signing).unwrap();
        refused(&v, &t).await;
    }
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2, "unknown kids are rate-limited");
    assert_eq!(v.jwks_fetches(), 2);

    // Just before the interval ends, still nothing; at its end, an unknown
    // kid fetches again (once).
    tokio::time::advance(interval - tick).await;
    refused(&v, &sign(&k1, &claims())).await;
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);
    tokio::time::advance(tick).await;
    refused(&v, &sign(&k1, &claims())).await;
    refused(&v, &sign(&k1, &claims())).await;
    assert_eq!(idp.requests.load(Ordering::SeqCst), 3);
    assert_eq!(v.jwks_fetches(), 3);
}

#[tokio::test]
async fn forged_tokens_are_refused() {
    let k = key("k1");
    let idp = idp(&[&k]).await;
    let v = Verifier::from_config(&config(&idp.url)).unwrap();
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = chrono::Utc::now().timestamp();

    // alg "none", unsigned.
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})), b64(&claims()));
    refused(&v, &none).await;
    // HS/RS confusion: HMAC keyed with the public key the attacker knows.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let confused =
        jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(k.public_pem.as_bytes())).unwrap();
    assert!(refused(&v, &confused).await.contains("algorithm"));
    // Signed by another key under the right kid.
    let imposter = TestKey { kid: "k1".into(), ..key("x") };
    assert!(refused(&v, &sign(&imposter, &claims())).await.contains("signature"));
    // No kid at all.
    let unkeyed = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(), &k.signing).unwrap();
    assert!(refused(&v, &unkeyed).await.contains("kid"));
    // Wrong issuer, wrong audience, expired, not yet valid.
    let with = |patch: Value| {
        let mut c = claims();
        c.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        sign(&k, &c)
    };
    assert!(refused(&v, &with(json!({"iss": "evil"}))).await.contains("issuer"));
    assert!(refused(&v, &with(json!({"aud": "other"}))).await.contains("audience"));
    assert!(refused(&v, &with(json!({"aud": ["other", "another"]}))).await.contains("audience"));
    assert!(refused(&v, &with(json!({"exp": now - 3600}))).await.contains("expired"));
    assert!(refused(&v, &with(json!({"nbf": now + 3600}))).await.contains("not valid yet"));
    // Within the leeway (30 s), nbf is accepted; an array audience holding
    // hcp is accepted.
    v.verify(&with(json!({"nbf": now + 10}))).await.unwrap();
    v.verify(&with(json!({"aud": ["other", "hcp"]}))).await.unwrap();
    // A critical header extension HCP does not understand.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    header.crit = Some(vec!["exp".into()]);
    let crit = jsonwebtoken::encode(&header, &claims(), &k.signing).unwrap();
    assert!(refused(&v, &crit).await.contains("critical"));
}

#[tokio::test]
async fn an_unreachable_identity_provider_is_unavailable_not_a_bad_token() {
    let k = key("k1");
    // A port nothing listens on.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let v = Verifier::from_config(&config(&format!("http://{addr}/jwks.json"))).unwrap();
    let e = v.verify(&sign(&k, &claims())).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
}

#[test]
fn ambiguous_or_unsafe_configurations_are_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("hcp-auth-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let pem = dir.join("key.pem");
    std::fs::write(&pem, key("k").public_pem).unwrap();

    let both = AuthConfig {
        hs256_secret_file: Some(secret.clone()),
        public_key_pem_file: Some(pem.clone()),
        public_key_algorithm: Some("ES256".into()),
        ..AuthConfig::default()
    };
    assert!(matches!(Verifier::from_config(&both), Err(KeyError::Conflicting)));
    let secret_and_jwks = AuthConfig {
        hs256_secret_file: Some(secret.clone()),
        jwks_url: Some("https://idp.example/jwks.json".into()),
        ..AuthConfig::default()
    };
    assert!(matches!(Verifier::from_config(&secret_and_jwks), Err(KeyError::Conflicting)));
    // HMAC with a public key or a JWKS: the confusion attack, refused.
    let hmac_with_key = AuthConfig {
        public_key_pem_file: Some(pem.clone()),
        public_key_algorithm: Some("ES256".into()),
        algorithms: vec!["ES256".into(), "HS256".into()],
        ..AuthConfig::default()
    };
    assert!(matches!(Verifier::from_config(&hmac_with_key), Err(KeyError::Mismatch(_))));
    let hmac_with_jwks = AuthConfig { algorithms: vec!["HS256".into()], ..config("https://idp.example/j") };
    assert!(matches!(Verifier::from_config(&hmac_with_jwks), Err(KeyError::Mismatch(_))));
    let none = AuthConfig { algorithms: vec!["none".into()], ..config("https://idp.example/j") };
    assert!(matches!(Verifier::from_config(&none), Err(KeyError::Algorithm(_))));
    assert!(matches!(Verifier::from_config(&config("ftp://idp/j")), Err(KeyError::Jwks(_))));
    // One source alone is fine.
    let pem_only = AuthConfig { hs256_secret_file: None, ..both };
    Verifier::from_config(&pem_only).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
