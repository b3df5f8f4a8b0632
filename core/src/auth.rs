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
    /// Audience: one string or an array (RFC 7519 4.1.3); must contain
    /// the configured audience.
    pub aud: Audience,
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

/// A token's `aud`: identity providers issue both forms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "hcp"`.
    One(String),
    /// `"aud": ["hcp", "other"]`.
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(a: &str) -> Self {
        Audience::One(a.to_owned())
    }
}

impl From<String> for Audience {
    fn from(a: String) -> Self {
        Audience::One(a)
    }
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

    /// Returns the scope (tenant, `project_id`) if the principal may act on
    /// the project with `access`; PERMISSION_DENIED otherwise.
    pub fn scope(&self, project_id: &str, access: Access) -> Result<crate::model::Scope, ApiError> {
        let tenant = self.tenant_project(project_id, access)?;
        Ok(crate::model::Scope::new(tenant, project_id))
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
    /// No key source is configured.
    #[error("auth needs one of hs256_secret_file, public_key_pem_file and jwks_url")]
    Missing,
    /// More than one key source is configured; HCP would have to pick one
    /// silently.
    #[error(
        "auth names more than one of hs256_secret_file, public_key_pem_file and jwks_url: set exactly one"
    )]
    Conflicting,
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
    /// An HS256 secret file its group or others may access.
    #[error(
        "the HS256 secret file {path} is open to its group or others (mode {mode:04o}): \
         make it readable by its owner alone (chmod 600), or pass it as a systemd credential"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// An HS256 secret shorter than 32 bytes.
    #[error("the HS256 secret in {path} is shorter than 32 bytes")]
    WeakSecret {
        /// The file.
        path: String,
    },
    /// An unsupported algorithm name.
    #[error(
        "unsupported algorithm {0:?} (use HS256 with a secret; RS256, RS384, RS512, PS256, ES256, ES384 or EdDSA with a public key)"
    )]
    Algorithm(String),
    /// An algorithm that does not fit the key source (HMAC with a public
    /// key or JWKS, or a public-key algorithm with a shared secret).
    #[error("algorithm {0} cannot be used with this key source")]
    Mismatch(String),
    /// The JWKS endpoint is unusable.
    #[error("cannot use the JWKS endpoint")]
    Jwks(#[source] crate::jwks::JwksError),
}

/// Where verification keys come from.
#[derive(Clone)]
enum KeySource {
    /// One key: a shared secret or a public key from a PEM file.
    Static(Arc<DecodingKey>),
    /// An identity provider's key set, by `kid`.
    Jwks(Arc<crate::jwks::JwksCache>),
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    source: KeySource,
    /// The `alg` values accepted.
    algorithms: Arc<Vec<Algorithm>>,
    validation: Arc<Validation>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("algorithms", &self.algorithms).finish_non_exhaustive()
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

/// Reads an HS256 secret file, trimming a trailing newline. Like the
/// secrets key, a file its group or others may access is refused
/// ([`crate::secrets::read_owner_only`]): whoever reads it can mint tokens.
pub fn read_hs256_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    use crate::secrets::OwnerOnlyError;
    let named = || path.display().to_string();
    let mut secret = crate::secrets::read_owner_only(path).map_err(|e| match e {
        OwnerOnlyError::Read(source) => KeyError::Read { path: named(), source },
        OwnerOnlyError::Exposed { mode } => KeyError::Exposed { path: named(), mode },
    })?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.len() < 32 {
        return Err(KeyError::WeakSecret { path: path.display().to_string() });
    }
    Ok(secret)
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The configured allow-list, or `default` when none is configured;
/// refuses algorithms that do not fit the key source.
fn allowed(
    config: &AuthConfig,
    default: &[Algorithm],
    hmac_source: bool,
) -> Result<Vec<Algorithm>, KeyError> {
    let algorithms = if config.algorithms.is_empty() {
        default.to_vec()
    } else {
        config
            .algorithms
            .iter()
            .map(|a| a.parse::<Algorithm>().map_err(|_| KeyError::Algorithm(a.clone())))
            .collect::<Result<Vec<_>, _>>()?
    };
    if let Some(bad) = algorithms.iter().find(|a| is_hmac(**a) != hmac_source) {
        return Err(KeyError::Mismatch(format!("{bad:?}")));
    }
    Ok(algorithms)
}

impl Verifier {
    /// Builds a verifier from configuration: exactly one key source, and
    /// an algorithm allow-list that fits it.
    pub fn from_config(config: &AuthConfig) -> Result<Self, KeyError> {
        let sources = [
            config.hs256_secret_file.is_some(),
            config.public_key_pem_file.is_some(),
            config.jwks_url.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => return Err(KeyError::Missing),
            1 => {}
            _ => return Err(KeyError::Conflicting),
        }
        if let Some(path) = &config.hs256_secret_file {
            let algorithms = allowed(config, &[Algorithm::HS256], true)?;
            let key = DecodingKey::from_secret(&read_hs256_secret(path)?);
            return Ok(Self::new(KeySource::Static(Arc::new(key)), algorithms, config));
        }
        if let Some(path) = &config.public_key_pem_file {
            let pem = read_key(path)?;
            let parse_err = |source| KeyError::Parse { path: path.display().to_string(), source };
            let named = config.public_key_algorithm.as_deref().unwrap_or("RS256");
            let alg: Algorithm = named.parse().map_err(|_| KeyError::Algorithm(named.to_owned()))?;
            let key = match alg {
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem).map_err(parse_err)?,
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem).map_err(parse_err)?,
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem).map_err(parse_err)?,
                other => return Err(KeyError::Mismatch(format!("{other:?}"))),
            };
            let algorithms = allowed(config, &[alg], false)?;
            return Ok(Self::new(KeySource::Static(Arc::new(key)), algorithms, config));
        }
        let url = config.jwks_url.as_deref().unwrap_or_default();
        let algorithms = allowed(config, &[Algorithm::RS256, Algorithm::ES256], false)?;
        let cache =
            crate::jwks::JwksCache::new(url, std::time::Duration::from_secs(config.jwks_min_refresh_seconds))
                .map_err(KeyError::Jwks)?;
        Ok(Self::new(KeySource::Jwks(Arc::new(cache)), algorithms, config))
    }

    /// Builds a verifier for an HS256 secret held in memory.
    pub fn hs256(secret: &[u8], config: &AuthConfig) -> Self {
        Self::new(
            KeySource::Static(Arc::new(DecodingKey::from_secret(secret))),
            vec![Algorithm::HS256],
            config,
        )
    }

    fn new(source: KeySource, algorithms: Vec<Algorithm>, config: &AuthConfig) -> Self {
        let mut validation = Validation::new(algorithms[0]);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway_seconds;
        Self { source, algorithms: Arc::new(algorithms), validation: Arc::new(validation) }
    }

    /// How many times the JWKS endpoint was fetched (0 without one).
    pub fn jwks_fetches(&self) -> u64 {
        match &self.source {
            KeySource::Jwks(c) => c.fetches(),
            KeySource::Static(_) => 0,
        }
    }

    /// Verifies a token and returns its principal. Every failure is
    /// UNAUTHENTICATED with a message saying which check failed, except
    /// that an identity provider whose keys cannot be fetched is
    /// UNAVAILABLE.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let refuse = |why: &str| ApiError::new(ErrorCode::Unauthenticated, why);
        // The header first: which algorithm and key the token claims, and
        // whether it asks for extensions HCP does not understand (RFC 7515
        // 4.1.11: a recipient must refuse unknown `crit` names; HCP knows
        // none).
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("the token is malformed"))?;
        if header.crit.is_some() {
            return Err(refuse("the token has critical header parameters HCP does not understand"));
        }
        if !self.algorithms.contains(&header.alg) {
            return Err(refuse("the token algorithm is not accepted"));
        }
        let key = match &self.source {
            KeySource::Static(key) => key.clone(),
            KeySource::Jwks(cache) => {
                let kid = header.kid.as_deref().ok_or_else(|| refuse("the token has no key id (kid)"))?;
                if kid.is_empty() || kid.len() > 256 {
                    return Err(refuse("the token's key id is malformed"));
                }
                let found = cache.key(kid).await.map_err(|e| match e {
                    crate::jwks::LookupError::UnknownKid => refuse("the token's key id is unknown"),
                    crate::jwks::LookupError::Unavailable => ApiError::new(
                        ErrorCode::Unavailable,
                        "the identity provider's signing keys cannot be fetched; retry later",
                    ),
                })?;
                if found.algorithm.is_some_and(|a| a != header.alg) {
                    return Err(refuse("the token algorithm does not match its key"));
                }
                found.key
            }
        };
        let mut validation = (*self.validation).clone();
        validation.algorithms = vec![header.alg];
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
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
            refuse(why)
        })?;
        let c = data.claims;
        // The claims name a scope; one HCP could not store or compare as an
        // id (an empty or `..` tenant, a subject of control characters)
        // makes the token unusable, not a scope of its own.
        if c.sub.trim().is_empty() || crate::api::validate::text("sub", &c.sub, 256).is_err() {
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
    pub async fn verify_header(&self, value: Option<&str>) -> Result<Principal, ApiError> {
        let value = value
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "missing authorization bearer token"))?;
        let token =
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthenticated, "authorization must be a bearer token")
            })?;
        self.verify(token.trim()).await
    }
}

/// Signs HS256 tokens; used by the dev tooling and tests, never by the API.
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))
}

/// Paths served without a token: health checks for load balancers and
/// server reflection for tooling.
const OPEN_PATHS: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The tower layer that verifies the bearer token of every call but the
/// open ones and stores the [`Principal`] in the request's extensions,
/// where handlers find it ([`principal`]). Verification may fetch an
/// identity provider's keys, so it is asynchronous, unlike tonic's
/// interceptors.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
}

impl AuthLayer {
    /// Wraps a verifier.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier: Arc::new(verifier) }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, verifier: self.verifier.clone() }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is not ready; the one that was polled ready serves.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if OPEN_PATHS.iter().any(|p| req.uri().path().starts_with(p)) {
            return Box::pin(inner.call(req));
        }
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let header = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            match verifier.verify_header(header).await {
                Ok(principal) => {
                    req.extensions_mut().insert(principal);
                    inner.call(req).await
                }
                Err(e) => Ok(crate::error::status(e).into_http()),
            }
        })
    }
}

/// Returns the principal [`AuthLayer`] stored.
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

    /// The principal, or the refusal's message.
    fn check(token: &str) -> Result<Principal, Refused> {
        let v = Verifier::hs256(SECRET, &AuthConfig::default());
        futures::executor::block_on(v.verify(token)).map_err(|e| Refused(e.message))
    }

    /// A refusal's message, compared with the literal text tenants read.
    #[derive(Debug, PartialEq)]
    struct Refused(String);

    impl std::ops::Deref for Refused {
        type Target = str;
        fn deref(&self) -> &str {
            &self.0
        }
    }

    impl PartialEq<&str> for Refused {
        fn eq(&self, other: &&str) -> bool {
            self.0 == *other
        }
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
        c.aud = Audience::Many(vec!["other".into(), "hcp".into()]);
        assert!(check(&sign_hs256(SECRET, &c).unwrap()).is_ok(), "an array holding hcp is accepted");
        c.aud = Audience::Many(vec!["other".into()]);
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
