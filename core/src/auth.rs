//! Authentication and role checks. Every northbound call carries
//! `authorization: Bearer <JWT>`; the token is verified here (signature,
//! `exp`, `iss`, `aud`) and becomes a [`Principal`] that handlers ask for the
//! scope they need. Core is the only place tokens are checked: the gateway
//! forwards them untouched.
//!
//! Roles: `tenant.member` (read and change the token's projects),
//! `tenant.viewer` (read only), `ops.admin` (the ops namespace),
//! `ops.viewer` (ops reads).

use std::path::Path;
use std::sync::Arc;

use hcp_proto::error::{ApiError, ErrorCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

/// Tenant role that may read and change resources in its projects.
pub const ROLE_TENANT_MEMBER: &str = "tenant.member";
/// Tenant role that may only read.
pub const ROLE_TENANT_VIEWER: &str = "tenant.viewer";
/// Operator role with full access to the ops namespace.
pub const ROLE_OPS_ADMIN: &str = "ops.admin";
/// Operator role that may only read the ops namespace.
pub const ROLE_OPS_VIEWER: &str = "ops.viewer";
/// HCP's own console proxy (the gateway's service account): may redeem
/// console tokens and learn hypervisor console endpoints. Never give it to
/// a person.
pub const ROLE_CONSOLE_PROXY: &str = "console.proxy";

/// The claims HCP reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Subject: who is calling.
    pub sub: String,
    /// Issuer; must equal the configured issuer.
    pub iss: String,
    /// Audience; must contain the configured audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default)]
    pub iat: u64,
    /// Tenant the subject acts for (absent for operators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Projects of the tenant the subject may use.
    #[serde(default)]
    pub projects: Vec<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// JWT subject.
    pub subject: String,
    /// Tenant, for tenant principals.
    pub tenant_id: Option<String>,
    /// Projects the principal may use.
    pub projects: Vec<String>,
    /// Roles.
    pub roles: Vec<String>,
}

/// Whether an action reads or changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only.
    Read,
    /// Changes state.
    Write,
}

impl Principal {
    fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Checks that this is HCP's console proxy.
    pub fn console_proxy(&self) -> Result<(), ApiError> {
        if self.has(ROLE_CONSOLE_PROXY) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::PermissionDenied, format!("needs role {ROLE_CONSOLE_PROXY}")))
        }
    }

    /// Returns the tenant id if the principal may act on `project_id` with
    /// `access`; PERMISSION_DENIED otherwise.
    pub fn tenant_project(&self, project_id: &str, access: Access) -> Result<&str, ApiError> {
        let tenant = self.tenant()?;
        let role_ok = match access {
            Access::Read => self.has(ROLE_TENANT_MEMBER) || self.has(ROLE_TENANT_VIEWER),
            Access::Write => self.has(ROLE_TENANT_MEMBER),
        };
        if !role_ok {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "role {} is required",
                    match access {
                        Access::Read => "tenant.viewer or tenant.member",
                        Access::Write => ROLE_TENANT_MEMBER,
                    }
                ),
            ));
        }
        if !self.projects.iter().any(|p| p == project_id) {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("the token does not grant project {project_id}"),
            ));
        }
        Ok(tenant)
    }

    /// Returns the tenant id of a tenant principal with any tenant role.
    pub fn tenant(&self) -> Result<&str, ApiError> {
        match &self.tenant_id {
            Some(t) if self.has(ROLE_TENANT_MEMBER) || self.has(ROLE_TENANT_VIEWER) => Ok(t),
            _ => Err(ApiError::new(ErrorCode::PermissionDenied, "a tenant token is required")),
        }
    }

    /// Succeeds if the principal may use the ops namespace with `access`.
    pub fn ops(&self, access: Access) -> Result<(), ApiError> {
        let ok = match access {
            Access::Read => self.has(ROLE_OPS_ADMIN) || self.has(ROLE_OPS_VIEWER),
            Access::Write => self.has(ROLE_OPS_ADMIN),
        };
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "role {} is required",
                    match access {
                        Access::Read => "ops.viewer or ops.admin",
                        Access::Write => ROLE_OPS_ADMIN,
                    }
                ),
            ))
        }
    }
}

/// Key material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither a secret nor a public key is configured.
    #[error("auth needs hs256_secret_file or public_key_pem_file")]
    Missing,
    /// A key file could not be read.
    #[error("cannot read key file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file did not parse.
    #[error("invalid key in {path}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// An HS256 secret shorter than 32 bytes.
    #[error("the HS256 secret in {path} is shorter than 32 bytes")]
    WeakSecret {
        /// The file.
        path: String,
    },
    /// An unsupported algorithm name.
    #[error("unsupported public key algorithm {0:?} (use RS256 or ES256)")]
    Algorithm(String),
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

/// Reads an HS256 secret file, trimming a trailing newline.
pub fn read_hs256_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let mut secret = read_key(path)?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.len() < 32 {
        return Err(KeyError::WeakSecret { path: path.display().to_string() });
    }
    Ok(secret)
}

impl Verifier {
    /// Builds a verifier from configuration.
    pub fn from_config(config: &AuthConfig) -> Result<Self, KeyError> {
        let (key, alg) = if let Some(path) = &config.hs256_secret_file {
            (DecodingKey::from_secret(&read_hs256_secret(path)?), Algorithm::HS256)
        } else if let Some(path) = &config.public_key_pem_file {
            let pem = read_key(path)?;
            let parse_err = |source| KeyError::Parse { path: path.display().to_string(), source };
            match config.public_key_algorithm.as_deref().unwrap_or("RS256") {
                "RS256" => (DecodingKey::from_rsa_pem(&pem).map_err(parse_err)?, Algorithm::RS256),
                "ES256" => (DecodingKey::from_ec_pem(&pem).map_err(parse_err)?, Algorithm::ES256),
                other => return Err(KeyError::Algorithm(other.to_owned())),
            }
        } else {
            return Err(KeyError::Missing);
        };
        Ok(Self::new(key, alg, config))
    }

    /// Builds a verifier for an HS256 secret held in memory.
    pub fn hs256(secret: &[u8], config: &AuthConfig) -> Self {
        Self::new(DecodingKey::from_secret(secret), Algorithm::HS256, config)
    }

    fn new(key: DecodingKey, alg: Algorithm, config: &AuthConfig) -> Self {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = config.leeway_seconds;
        Self { key: Arc::new(key), validation: Arc::new(validation) }
    }

    /// Verifies a token and returns its principal. Every failure is
    /// UNAUTHENTICATED with a message saying which check failed.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::InvalidSignature => "the token signature is invalid",
                ErrorKind::InvalidIssuer => "the token issuer is not accepted",
                ErrorKind::InvalidAudience => "the token audience is not accepted",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidAlgorithm => "the token algorithm is not accepted",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
                _ => "the token is malformed",
            };
            ApiError::new(ErrorCode::Unauthenticated, why)
        })?;
        let c = data.claims;
        // The claims name a scope; one HCP could not store or compare as an
        // id (an empty or `..` tenant, a subject of control characters)
        // makes the token unusable, not a scope of its own.
        let refuse = |why: &str| ApiError::new(ErrorCode::Unauthenticated, why);
        if c.sub.trim().is_empty()
            || c.sub.len() > 256
            || crate::api::validate::text("sub", &c.sub, 256).is_err()
        {
            return Err(refuse("the token's subject must be 1 to 256 characters of text"));
        }
        if let Some(t) = &c.tenant
            && crate::api::validate::scope_id("tenant", t).is_err()
        {
            return Err(refuse("the token's tenant claim is not a valid tenant id"));
        }
        if c.projects.len() > 256 || c.projects.iter().any(|p| crate::api::validate::project_id(p).is_err()) {
            return Err(refuse("the token's projects claim holds an invalid project id"));
        }
        if c.roles.len() > 64 || c.roles.iter().any(|r| r.is_empty() || r.len() > 64) {
            return Err(refuse("the token's roles claim is malformed"));
        }
        Ok(Principal { subject: c.sub, tenant_id: c.tenant, projects: c.projects, roles: c.roles })
    }

    /// Verifies the `authorization` header value (`Bearer <token>`).
    pub fn verify_header(&self, value: Option<&str>) -> Result<Principal, ApiError> {
        let value = value
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "missing authorization bearer token"))?;
        let token =
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthenticated, "authorization must be a bearer token")
            })?;
        self.verify(token.trim())
    }
}

/// Signs HS256 tokens; used by the dev tooling and tests, never by the API.
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))
}

/// A tonic interceptor that verifies the bearer token and stores the
/// [`Principal`] in the request extensions.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    verifier: Verifier,
}

impl AuthInterceptor {
    /// Wraps a verifier.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match self.verifier.verify_header(header) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                Ok(req)
            }
            Err(e) => Err(crate::error::status(e)),
        }
    }
}

/// Returns the principal the interceptor stored.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| crate::error::status(ApiError::new(ErrorCode::Unauthenticated, "not authenticated")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(exp_offset: i64) -> Claims {
        let now = chrono::Utc::now().timestamp();
        Claims {
            sub: "alice".into(),
            iss: "hcp-dev".into(),
            aud: "hcp".into(),
            exp: (now + exp_offset) as u64,
            iat: now as u64,
            tenant: Some("acme".into()),
            projects: vec!["p1".into()],
            roles: vec![ROLE_TENANT_MEMBER.into()],
        }
    }

    fn check(token: &str) -> Result<Principal, String> {
        let v = Verifier::hs256(SECRET, &AuthConfig::default());
        v.verify(token).map_err(|e| e.message)
    }

    #[test]
    fn accepts_a_valid_token() {
        let t = sign_hs256(SECRET, &claims(60)).unwrap();
        let p = check(&t).unwrap();
        assert_eq!(p.tenant_project("p1", Access::Write).unwrap(), "acme");
        assert!(p.tenant_project("p2", Access::Read).is_err());
        assert!(p.ops(Access::Read).is_err());
    }

    #[test]
    fn rejects_bad_tokens_with_the_reason() {
        let expired = sign_hs256(SECRET, &claims(-3600)).unwrap();
        assert_eq!(check(&expired).unwrap_err(), "the token has expired");
        let forged = sign_hs256(b"another-secret-another-secret-xx", &claims(60)).unwrap();
        assert_eq!(check(&forged).unwrap_err(), "the token signature is invalid");
        let mut c = claims(60);
        c.aud = "other".into();
        assert_eq!(
            check(&sign_hs256(SECRET, &c).unwrap()).unwrap_err(),
            "the token audience is not accepted"
        );
        let mut c = claims(60);
        c.iss = "evil".into();
        assert_eq!(check(&sign_hs256(SECRET, &c).unwrap()).unwrap_err(), "the token issuer is not accepted");
        assert_eq!(check("garbage").unwrap_err(), "the token is malformed");
    }

    #[test]
    fn rejects_claims_that_name_no_usable_scope() {
        let with = |f: &dyn Fn(&mut Claims)| {
            let mut c = claims(60);
            f(&mut c);
            check(&sign_hs256(SECRET, &c).unwrap())
        };
        assert!(with(&|c| c.tenant = Some(String::new())).unwrap_err().contains("tenant"));
        assert!(with(&|c| c.tenant = Some("..".into())).unwrap_err().contains("tenant"));
        assert!(with(&|c| c.tenant = Some("a".repeat(65))).unwrap_err().contains("tenant"));
        assert!(with(&|c| c.sub = String::new()).unwrap_err().contains("subject"));
        assert!(with(&|c| c.sub = "a\0b".into()).unwrap_err().contains("subject"));
        assert!(with(&|c| c.projects = vec![String::new()]).unwrap_err().contains("project"));
        assert!(with(&|c| c.projects = vec!["../x".into()]).unwrap_err().contains("project"));
        // Operators carry no tenant at all, which stays valid.
        assert!(with(&|c| c.tenant = None).is_ok());
    }

    #[test]
    fn viewer_reads_but_does_not_write() {
        let p = Principal {
            subject: "v".into(),
            tenant_id: Some("acme".into()),
            projects: vec!["p1".into()],
            roles: vec![ROLE_TENANT_VIEWER.into()],
        };
        assert!(p.tenant_project("p1", Access::Read).is_ok());
        assert_eq!(p.tenant_project("p1", Access::Write).unwrap_err().code, ErrorCode::PermissionDenied);
    }
}
