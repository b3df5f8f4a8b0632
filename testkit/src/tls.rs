//! HTTPS receivers for tests: a CA of the test's own and a server
//! certificate for 127.0.0.1 signed by it, so that the code under test
//! trusts the receiver only through the CA file it is given (as an
//! operator's `[egress] ca_file`), never through the system's roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// Writes a new CA named `ca_name` to `dir/ca.pem` and returns that path
/// with a TLS acceptor for 127.0.0.1 whose certificate the CA signed.
pub fn loopback_server(dir: &Path, ca_name: &str) -> anyhow::Result<(PathBuf, tokio_rustls::TlsAcceptor)> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok((ca_file, tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}
