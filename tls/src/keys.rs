//! Certificates refused for their key, explained. rustls checks signatures
//! with webpki and ring, which take RSA keys of 2048 to 8192 bits only, and
//! refuses a certificate with a smaller key (an old vCenter's or ESXi
//! host's RSA-1024 one) as `BadSignature`: true, but naming neither the
//! certificate nor its key. [`crate::client_config`] wraps the verifier a
//! [`crate::Trust`] names; when that refuses a signature, the wrapper reads
//! the keys of the certificates involved, and one rustls does not take
//! turns the refusal into an [`UnacceptedKey`] that says which certificate
//! it is and what its key is ([`UnacceptedKey::of_handshake`] finds it in a
//! failed handshake's error).

use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use x509_cert::der::asn1::{ObjectIdentifier, UintRef};
use x509_cert::der::{Decode, Reader, SliceReader};

/// The RSA key sizes, in bits, whose signatures rustls checks.
pub const RSA_BITS: RangeInclusive<usize> = 2048..=8192;

/// Which certificate of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateRole {
    /// The server's own (end-entity) certificate.
    Server,
    /// An intermediate certificate the server sent with its own.
    Intermediate,
    /// A CA certificate of the configured trust.
    TrustedCa,
}

impl fmt::Display for CertificateRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Server => "the server's certificate",
            Self::Intermediate => "an intermediate certificate the server sent",
            Self::TrustedCa => "the trusted CA certificate",
        })
    }
}

/// A certificate whose RSA key rustls does not take, so that nothing it
/// signs (a handshake, or another certificate) can be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UnacceptedKey {
    /// Which certificate.
    pub role: CertificateRole,
    /// Its subject (RFC 4514, e.g. `CN=vc1.example.net,O=Example`).
    pub subject: String,
    /// The size of its RSA key, in bits.
    pub bits: usize,
}

impl fmt::Display for UnacceptedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (size, fix) =
            if self.bits < *RSA_BITS.start() { ("too small", "larger") } else { ("too large", "smaller") };
        let subject = if self.subject.is_empty() { "no subject" } else { &self.subject };
        write!(
            f,
            "{} ({subject}) has a {}-bit RSA key, {size}: only RSA keys of {} to {} bits are accepted; \
             replace the certificate with one whose key is {fix}",
            self.role,
            self.bits,
            RSA_BITS.start(),
            RSA_BITS.end(),
        )
    }
}

impl UnacceptedKey {
    /// The key a failed TLS handshake was refused for, if that was why.
    /// rustls shows it only with `Debug` (as `Other(OtherError(..))`), so
    /// whoever reports a handshake error looks here first.
    pub fn of_handshake(e: &std::io::Error) -> Option<&Self> {
        match e.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
                other.downcast_ref::<Self>()
            }
            _ => None,
        }
    }
}

/// The certificate's RSA key if its size is outside [`RSA_BITS`]; None for
/// an accepted key, another kind of key, or DER that does not parse (the
/// original refusal then stands).
pub fn unaccepted_key(role: CertificateRole, der: &[u8]) -> Option<UnacceptedKey> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let tbs = cert.tbs_certificate();
    let bits = rsa_bits(tbs.subject_public_key_info())?;
    (!RSA_BITS.contains(&bits)).then(|| UnacceptedKey { role, subject: tbs.subject().to_string(), bits })
}

/// `rsaEncryption` and `id-RSASSA-PSS` (RFC 8017).
const RSA_KEYS: [ObjectIdentifier; 2] = [
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1"),
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10"),
];

/// The modulus size of an RSA public key; None for other keys.
fn rsa_bits(spki: &x509_cert::spki::SubjectPublicKeyInfoOwned) -> Option<usize> {
    if !RSA_KEYS.contains(&spki.algorithm.oid) {
        return None;
    }
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    let mut reader = SliceReader::new(spki.subject_public_key.as_bytes()?).ok()?;
    let modulus = reader
        .sequence(|r| {
            let modulus = UintRef::decode(r)?;
            UintRef::decode(r)?;
            Ok::<_, x509_cert::der::Error>(modulus)
        })
        .ok()?;
    // Leading zero bytes are already stripped.
    let bytes = modulus.as_bytes();
    let first = *bytes.first()?;
    Some(bytes.len() * 8 - first.leading_zeros() as usize)
}

/// Whether rustls refused a signature (the refusal a key it does not take
/// ends in).
fn refused_signature(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::BadSignature
                | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. }
        )
    )
}

/// A verifier that explains refusals caused by a key rustls does not take.
#[derive(Debug)]
pub(crate) struct Explained {
    /// The verifier of the trust (webpki with the CA certificates, or the
    /// pinned fingerprint).
    pub(crate) inner: Arc<dyn ServerCertVerifier>,
    /// The trusted CA certificates (none with a pinned fingerprint).
    pub(crate) roots: Vec<CertificateDer<'static>>,
}

impl Explained {
    /// `e`, or the first of `candidates` whose key explains it.
    fn explain<'a>(
        &self,
        e: rustls::Error,
        mut candidates: impl Iterator<Item = (CertificateRole, &'a [u8])>,
    ) -> rustls::Error {
        if !refused_signature(&e) {
            return e;
        }
        match candidates.find_map(|(role, der)| unaccepted_key(role, der)) {
            Some(key) => {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(key))))
            }
            None => e,
        }
    }
}

impl ServerCertVerifier for Explained {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now).map_err(|e| {
            let chain = std::iter::once((CertificateRole::Server, end_entity.as_ref()))
                .chain(intermediates.iter().map(|c| (CertificateRole::Intermediate, c.as_ref())))
                .chain(self.roots.iter().map(|c| (CertificateRole::TrustedCa, c.as_ref())));
            self.explain(e, chain)
        })
    }

    // The handshake is signed with the server's own key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls12_signature(message, cert, dss)
            .map_err(|e| self.explain(e, std::iter::once((CertificateRole::Server, cert.as_ref()))))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .map_err(|e| self.explain(e, std::iter::once((CertificateRole::Server, cert.as_ref()))))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unaccepted_key_says_which_certificate_and_what_to_do() {
        let key = |role, subject: &str, bits| UnacceptedKey { role, subject: subject.into(), bits };
        let cases = [
            (
                key(CertificateRole::Server, "CN=vc1", 1024),
                "the server's certificate (CN=vc1) has a 1024-bit RSA key, too small: only RSA keys of 2048 to \
                 8192 bits are accepted; replace the certificate with one whose key is larger",
            ),
            (
                key(CertificateRole::Intermediate, "", 512),
                "an intermediate certificate the server sent (no subject) has a 512-bit RSA key, too small: only \
                 RSA keys of 2048 to 8192 bits are accepted; replace the certificate with one whose key is larger",
            ),
            (
                key(CertificateRole::TrustedCa, "CN=Huge CA", 16384),
                "the trusted CA certificate (CN=Huge CA) has a 16384-bit RSA key, too large: only RSA keys of \
                 2048 to 8192 bits are accepted; replace the certificate with one whose key is smaller",
            ),
        ];
        for (key, want) in cases {
            assert_eq!(key.to_string(), want);
        }
    }

    #[test]
    fn keys_rustls_takes_and_unreadable_certificates_explain_nothing() {
        // rcgen (with ring) makes ECDSA P-256 keys: not RSA, nothing to say.
        let ec = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert_eq!(unaccepted_key(CertificateRole::Server, ec.cert.der()), None);
        assert_eq!(unaccepted_key(CertificateRole::Server, b"not a certificate"), None);
        // Other refusals than a signature's are left as they are.
        assert!(!refused_signature(&rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)));
        assert!(refused_signature(&rustls::Error::InvalidCertificate(CertificateError::BadSignature)));
    }
}
