//! Tenants' SSH key pairs (`hcp.tenant.v1.KeyPairService`): import a public
//! key, list, read and delete; VMs name them at create
//! (`CreateVmRequest.key_names`). HCP never generates or stores a private
//! key.
//!
//! A key is checked once into a [`ValidPublicKey`] (no I/O) with RustCrypto's
//! `ssh-key` crate, which parses OpenSSH public key lines and computes their
//! fingerprints the way `ssh-keygen -l -E sha256` prints them. Accepted:
//! ssh-ed25519, ecdsa-sha2-nistp256/384/521 and ssh-rsa of at least
//! [`MIN_RSA_BITS`]; refused, naming `public_key`: DSA, shorter RSA keys,
//! security-key (`sk-*`) keys, more than one line, and anything that does
//! not parse.

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::tenant::key_pair_service_server::KeyPairService;
use hcp_proto::tenant::{
    CreateKeyPairRequest, DeleteKeyPairResponse, KeyPair, KeyPairRequest, ListKeyPairsRequest,
    ListKeyPairsResponse,
};
use ssh_key::public::KeyData;

use super::idempotency::{self, Key, idempotency_key};
use super::{ApiContext, ApiResult, checked, handle, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert::key_pair_to_tenant;
use crate::error::from_store;
use crate::model::{self, Scope, now};
use crate::store::StoreError;

/// Most key pairs one project holds.
pub const MAX_KEY_PAIRS: u32 = 100;
/// Longest public key accepted, bytes (16 KiB; the proto states the same
/// limit in characters, and a key is ASCII).
pub const MAX_PUBLIC_KEY: usize = 16 * 1024;
/// Shortest RSA modulus accepted.
pub const MIN_RSA_BITS: u32 = 2048;

/// A public key line that parsed and passed the rules: what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPublicKey {
    /// The line, trimmed.
    pub line: String,
    /// The OpenSSH algorithm name.
    pub key_type: String,
    /// Modulus bits (RSA), curve bits (ECDSA), 256 (ed25519).
    pub bits: u32,
    /// `SHA256:<base64 without padding>`.
    pub fingerprint: String,
    /// The line's comment.
    pub comment: String,
}

impl ValidPublicKey {
    /// Checks `text` (the request's `public_key`), naming `field`.
    pub fn parse(field: &str, text: &str) -> Result<Self, ApiError> {
        let bad = |why: String| ApiError::invalid_field(field, format!("{field} {why}"));
        if text.len() > MAX_PUBLIC_KEY {
            return Err(bad(format!("is {} bytes long; at most {MAX_PUBLIC_KEY} are allowed", text.len())));
        }
        let line = text.trim();
        if line.is_empty() {
            return Err(bad("is required".to_owned()));
        }
        if line.lines().count() > 1 {
            return Err(bad("holds more than one line: import one public key per key pair".to_owned()));
        }
        let key = ssh_key::PublicKey::from_openssh(line).map_err(|_| {
            bad(format!(
                "is not an OpenSSH public key line (\"ssh-ed25519 AAAA... comment\"): {}",
                excerpt(line)
            ))
        })?;
        let key_type = key.algorithm().as_str().to_owned();
        let bits = match key.key_data() {
            KeyData::Ed25519(_) => 256,
            KeyData::Ecdsa(k) => match k.curve() {
                ssh_key::EcdsaCurve::NistP256 => 256,
                ssh_key::EcdsaCurve::NistP384 => 384,
                ssh_key::EcdsaCurve::NistP521 => 521,
            },
            KeyData::Rsa(k) => {
                let bits = rsa_bits(k.n.as_positive_bytes().unwrap_or_default());
                if bits < MIN_RSA_BITS {
                    return Err(bad(format!(
                        "is an RSA key of {bits} bits; RSA keys need at least {MIN_RSA_BITS}"
                    )));
                }
                bits
            }
            KeyData::Dsa(_) => {
                return Err(bad(
                    "is a DSA (ssh-dss) key, which OpenSSH no longer accepts; use ed25519, ecdsa or \
                     rsa of at least 2048 bits"
                        .to_owned(),
                ));
            }
            _ => {
                return Err(bad(format!(
                    "is a {key_type} key; accepted are ssh-ed25519, ecdsa-sha2-nistp256/384/521 and \
                     ssh-rsa (security keys, sk-*, are not)"
                )));
            }
        };
        Ok(Self {
            line: line.to_owned(),
            key_type,
            bits,
            fingerprint: key.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
            comment: key.comment().to_owned(),
        })
    }
}

/// The bit length of a big-endian unsigned integer without leading zeros.
fn rsa_bits(n: &[u8]) -> u32 {
    match n.first() {
        None => 0,
        Some(first) => (n.len() as u32) * 8 - first.leading_zeros(),
    }
}

/// Implements `KeyPairService`.
#[derive(Clone)]
pub struct KeyPairApi {
    ctx: ApiContext,
}

impl KeyPairApi {
    /// Creates the service.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    async fn create(
        &self,
        p: &Principal,
        scope: &Scope,
        r: CreateKeyPairRequest,
    ) -> Result<KeyPair, ApiError> {
        validate::label("name", &r.name)?;
        let key = ValidPublicKey::parse("public_key", &r.public_key)?;
        let k = model::KeyPair {
            tenant_id: scope.tenant.clone(),
            project_id: scope.project.clone(),
            name: r.name,
            public_key: key.line,
            fingerprint: key.fingerprint,
            key_type: key.key_type,
            bits: key.bits,
            comment: key.comment,
            created_at: now(),
        };
        let mut audit = self.ctx.audit(
            p,
            AuditAction::KeyPairCreate,
            Resource::KeyPair(&k.name),
            AuditOutcome::Succeeded,
        );
        audit.project_id = scope.project.clone();
        audit.detail = format!("{} {}", k.key_type, k.fingerprint);
        self.ctx.store.create_key_pair(&k, MAX_KEY_PAIRS, &audit).await.map_err(|e| match e {
            StoreError::AlreadyExists { .. } => ApiError::new(
                ErrorCode::AlreadyExists,
                format!("project {} already has a key pair named {}", scope.project, k.name),
            )
            .with_detail("field", "name"),
            StoreError::QuotaExceeded(msg) => {
                ApiError::new(ErrorCode::QuotaExceeded, msg).with_detail("limit", MAX_KEY_PAIRS.to_string())
            }
            e => from_store(e, "key pair"),
        })?;
        Ok(key_pair_to_tenant(&k))
    }

    async fn delete(
        &self,
        p: &Principal,
        scope: &Scope,
        name: &str,
    ) -> Result<DeleteKeyPairResponse, ApiError> {
        let mut audit =
            self.ctx.audit(p, AuditAction::KeyPairDelete, Resource::KeyPair(name), AuditOutcome::Succeeded);
        audit.project_id = scope.project.clone();
        self.ctx
            .store
            .delete_key_pair(scope, name, &audit)
            .await
            .map_err(|e| from_store(e, &format!("key pair {}", excerpt(name))))?;
        Ok(DeleteKeyPairResponse {})
    }

    /// The scope and the key pair's name of a read or delete.
    fn target(p: &Principal, project_id: &str, name: &str, access: Access) -> Result<Scope, ApiError> {
        validate::project_id(project_id)?;
        let scope = p.scope(project_id, access)?;
        validate::label("name", name)?;
        Ok(scope)
    }
}

#[tonic::async_trait]
impl KeyPairService for KeyPairApi {
    async fn create_key_pair(&self, req: tonic::Request<CreateKeyPairRequest>) -> ApiResult<KeyPair> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "CreateKeyPair", &r);
            idempotency::once(&self.ctx, idem, self.create(&p, &scope, r)).await
        })
        .await
    }

    async fn list_key_pairs(
        &self,
        req: tonic::Request<ListKeyPairsRequest>,
    ) -> ApiResult<ListKeyPairsResponse> {
        let p = checked(&req)?;
        let r = req.get_ref();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Read)?;
            let keys = self.ctx.store.list_key_pairs(&scope).await.map_err(|e| from_store(e, "key pairs"))?;
            Ok(ListKeyPairsResponse { key_pairs: keys.iter().map(key_pair_to_tenant).collect() })
        })
        .await
    }

    async fn get_key_pair(&self, req: tonic::Request<KeyPairRequest>) -> ApiResult<KeyPair> {
        let p = checked(&req)?;
        let r = req.get_ref();
        handle(async {
            let scope = Self::target(&p, &r.project_id, &r.name, Access::Read)?;
            let k = self
                .ctx
                .store
                .get_key_pair(&scope, &r.name)
                .await
                .map_err(|e| from_store(e, &format!("key pair {}", r.name)))?;
            Ok(key_pair_to_tenant(&k))
        })
        .await
    }

    async fn delete_key_pair(&self, req: tonic::Request<KeyPairRequest>) -> ApiResult<DeleteKeyPairResponse> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.get_ref();
        handle(async {
            let scope = Self::target(&p, &r.project_id, &r.name, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "DeleteKeyPair", r);
            idempotency::once(&self.ctx, idem, self.delete(&p, &scope, &r.name)).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `ssh-keygen -t ed25519 -C alice@example`; the fingerprint
    /// is what `ssh-keygen -l -E sha256` printed for it.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 alice@example";
    const ED25519_FINGERPRINT: &str = "SHA256:P360S6ynMxE/PhIHTdyP86IQKz7Pmp+xoIkXYmrY110";
    /// `ssh-keygen -t ecdsa -b 384 -C ''`.
    const ECDSA_384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBDPuoSb3sSPhSNThmpbfDtmr6Dwml3hrgZoYP7ohbGqSmmNJFm6Ra7JNo88+DD8rUa89H5VTe7cCNFi0bLELC9VFISBBKfC6pGS+G+dQRXYLEokYYLe2QTlWt/9kaQYleg==";
    /// `ssh-keygen -t rsa -b 2048 -C rsa2048`.
    const RSA_2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC4AbDsKYsbM953G3x30f0l8JCehwMSJbWklx7P7HKJb72WoJJL8SHgq5hfh2fd4xnbLGJdlfmVW7+WkudV/34ABJosbcrX4PzvqJD/2rcfQ8niKcDP48hlETkEdjoM/EBdLyxcRbjzzPNcpx3PovnVumAogubOuQ9t6rulUGWO9yQg5NlHCKx7npZCoqZX0y2wLLULAbHf41Ko/srQvv3ZO06f+zY/DwwzMCoQlDvEOeGY+xCkogAt0mLMhtTI5VJ9CXSFntFt7c9eOOPFWKlQlOGKR4LLkMPM4zFE2twAKyhj04F9aHv7KQJ8tH2LalAa9ffmHRQ0kd2eXWBeFlXd rsa2048";
    /// `ssh-keygen -t rsa -b 1024`.
    const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCfb2ZZ7d59L/9slPoG3g1PipkKsR18Nrde7Akf4rZAhwbJj4G/PpnCC/nRT/g9glZG7YwvVmXqUsb3le/jKB+MpOb9cVmovdOqvR6647xFDl5sc+ICJEPSRKwSNE8RFRugi19LaGoQAB4ACQxxqz9tcn4eiAt1c4HLBH+t3NvxIw== root@vm";
    /// `ssh-keygen -t dsa`.
    const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAMMnIu6hRax4a8NznKAppeUyEEvR494OVQ4U24ZxXMGjshuuGBqI3aYGWfBB9UIT6ygz11s6pnG5BlC/AGbAVv4DJB90SHoUf8kbtjmDKJ0cZ/GGzcjAi9LVAtKZRq4xfyKVOH4Xa3WbNiDctzJhEyecE5/MBFOR18M5s45zEVK9AAAAFQCbFK0JCMTrzCC5duZCJ484zitcjQAAAIBZKyVxxeay4WHoWqrbYuAMglUqw8LVJiX1aFWAKKHSz+tY7xQ1WzDuz3KBgZ3KNAffnF1WDeXuFWoT0bYuElIb1L7vvExGMHWBlOklyW9Do3Ime/HX7IM/0opLQfH5u7InVQCngxQIv5LqFigmxUtNzwJ2u7q8C+QY33f1z4DhnAAAAIAcuLCcY05CdlPcRq1iMxpTTsNTnHcaF2MTN2iBH00vaC1YNcv4kkzUaWF++yv3GZIVKhr+/Dc6cBxi9MOldUtXAYYD64yVwlbrNznQERTonFgFW0exDS9q9AvCYeeHAEbgXSAd6W6r2TFaGhIPJY+fK1TjbEmV0wIh5G8lwso2lw== root@vm";
    /// A security key's public key (ssh-keygen lists it as ED25519-SK).
    const SK_ED25519: &str = "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4fAAAABHNzaDo= yubi";

    #[test]
    fn accepted_keys_are_typed_and_fingerprinted_as_ssh_keygen_does() {
        let k = ValidPublicKey::parse("public_key", &format!("  {ED25519}\n")).unwrap();
        assert_eq!(k.line, ED25519, "trimmed");
        assert_eq!(
            (k.key_type.as_str(), k.bits, k.comment.as_str(), k.fingerprint.as_str()),
            ("ssh-ed25519", 256, "alice@example", ED25519_FINGERPRINT)
        );
        let k = ValidPublicKey::parse("public_key", ECDSA_384).unwrap();
        assert_eq!((k.key_type.as_str(), k.bits, k.comment.as_str()), ("ecdsa-sha2-nistp384", 384, ""));
        assert_eq!(k.fingerprint, "SHA256:K9YekjjFxJZXYKXl3NO1MXUjMCBClPmY4nPsv+CcQSQ");
        let k = ValidPublicKey::parse("public_key", RSA_2048).unwrap();
        assert_eq!((k.key_type.as_str(), k.bits), ("ssh-rsa", 2048));
        assert_eq!(k.fingerprint, "SHA256:B1QJDTkIT/ca4FqKhrgzgVa09NkeB7kFdkwaARAaAvs");
    }

    /// Each row: a refused input and a word the message must hold; every
    /// refusal names `public_key`.
    #[test]
    fn weak_malformed_and_oversized_keys_are_refused_naming_the_field() {
        let two_lines = format!("{ED25519}\n{RSA_2048}");
        let oversized = format!("{ED25519} {}", "x".repeat(MAX_PUBLIC_KEY));
        let truncated = &ED25519[..40];
        let rows: &[(&str, &str)] = &[
            (RSA_1024, "1024 bits"),
            (DSA, "DSA"),
            (SK_ED25519, "sk-"),
            ("garbage", "not an OpenSSH public key"),
            (truncated, "not an OpenSSH public key"),
            ("ssh-ed25519 !!!notbase64", "not an OpenSSH public key"),
            ("", "required"),
            (&two_lines, "more than one line"),
            (&oversized, "at most 16384"),
            (
                "from=\"10.0.0.1\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5",
                "not an OpenSSH",
            ),
        ];
        for (input, word) in rows {
            let err = ValidPublicKey::parse("public_key", input).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{input:.30}");
            assert_eq!(err.details.get("field").map(String::as_str), Some("public_key"), "{input:.30}");
            assert!(err.message.contains(word), "{input:.30}: {}", err.message);
            assert!(err.message.len() < 512, "bounded");
        }
    }

    #[test]
    fn rsa_bits_count_from_the_first_set_bit() {
        assert_eq!(rsa_bits(&[]), 0);
        assert_eq!(rsa_bits(&[0x01]), 1);
        assert_eq!(rsa_bits(&[0x80, 0]), 16);
        assert_eq!(rsa_bits(&[0x7f; 256]), 2047);
    }
}
