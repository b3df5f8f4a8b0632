//! Outbound HTTP(S) to URLs tenants and operators give (webhook deliveries,
//! [`EgressClient::post`]; image imports, [`EgressClient::download`]): the
//! one place that decides where core may connect.
//!
//! A URL is untrusted input. [`EgressPolicy::check_url`] parses it
//! (https only, http when the operator allows it — `hcp up`'s development
//! mode —, no userinfo, a host, any port) and refuses a literal address in
//! a denied range. [`EgressClient`] then resolves the name itself (through
//! an injectable [`Resolve`]), checks every address it got, and connects
//! only to a checked address: the check is made on the address actually
//! connected to, at each request, so a name that resolves elsewhere later
//! (DNS rebinding) does not get through, and an IP literal goes through
//! the same check (hyper's own connector would skip the resolver for it).
//!
//! Denied by default: loopback, RFC 1918, CGNAT (100.64/10), link-local
//! (169.254/16, where cloud metadata lives), unique-local and link-local
//! IPv6, unspecified, multicast, broadcast and reserved, the documentation
//! and benchmarking ranges, NAT64 and IPv4-mapped IPv6 forms of all of
//! these. An operator opts a range back in with `[egress] allow_networks`.
//!
//! TLS is rustls verifying the URL's host name against the system's roots
//! plus an optional operator CA file. A webhook delivery follows no
//! redirect (a 3xx is a failed attempt naming the status); an image
//! download follows at most `[images] max_redirects`, each target checked
//! like the first URL. Connect time, total time and the response body read
//! are bounded (a delivery's by `[egress]`, a download's by `[images]`).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Longest URL accepted, bytes.
pub const MAX_URL_LEN: usize = 2048;

/// A network in CIDR form (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::y/n` (a bare address is a /32 or /128).
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { addr, prefix })
    }

    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Self { addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Self { addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix }
    }

    /// Whether `ip` lies in this network (an IPv4 network never holds an
    /// IPv6 address: callers unmap first).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The ranges refused unless the operator allows them, with what each is.
const DENIED: &[(Cidr, &str)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), "\"this network\" (0.0.0.0/8)"),
    (Cidr::v4(10, 0, 0, 0, 8), "private (10.0.0.0/8)"),
    (Cidr::v4(100, 64, 0, 0, 10), "shared carrier-grade NAT (100.64.0.0/10)"),
    (Cidr::v4(127, 0, 0, 0, 8), "loopback (127.0.0.0/8)"),
    (Cidr::v4(169, 254, 0, 0, 16), "link-local, where cloud metadata lives (169.254.0.0/16)"),
    (Cidr::v4(172, 16, 0, 0, 12), "private (172.16.0.0/12)"),
    (Cidr::v4(192, 0, 0, 0, 24), "IETF protocol assignments (192.0.0.0/24)"),
    (Cidr::v4(192, 0, 2, 0, 24), "documentation (192.0.2.0/24)"),
    (Cidr::v4(192, 168, 0, 0, 16), "private (192.168.0.0/16)"),
    (Cidr::v4(198, 18, 0, 0, 15), "benchmarking (198.18.0.0/15)"),
    (Cidr::v4(198, 51, 100, 0, 24), "documentation (198.51.100.0/24)"),
    (Cidr::v4(203, 0, 113, 0, 24), "documentation (203.0.113.0/24)"),
    (Cidr::v4(224, 0, 0, 0, 4), "multicast (224.0.0.0/4)"),
    (Cidr::v4(240, 0, 0, 0, 4), "reserved or broadcast (240.0.0.0/4)"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified (::)"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback (::1)"),
    (Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), "NAT64 (64:ff9b::/96)"),
    (Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local NAT64 (64:ff9b:1::/48)"),
    (Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard (100::/64)"),
    (Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation (2001:db8::/32)"),
    (Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local (fc00::/7)"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local (fe80::/10)"),
    (Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (fec0::/10)"),
    (Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast (ff00::/8)"),
];

/// Where outbound requests may go, and their bounds (`[egress]` in core's
/// configuration, made ready by [`EgressPolicy::new`]).
#[derive(Clone)]
pub struct EgressPolicy {
    allow_http: bool,
    allow_networks: Vec<Cidr>,
    connect_timeout: Duration,
    total_timeout: Duration,
    max_response_bytes: usize,
    tls: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressPolicy")
            .field("allow_http", &self.allow_http)
            .field("allow_networks", &self.allow_networks)
            .finish_non_exhaustive()
    }
}

/// What [`EgressPolicy::new`] is made from.
#[derive(Debug, Clone, Default)]
pub struct EgressSettings {
    /// Plain http allowed (development mode only).
    pub allow_http: bool,
    /// Ranges the operator opts into, as CIDR text.
    pub allow_networks: Vec<String>,
    /// A PEM file of CA certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Time to connect (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time for the whole request, resolution to the body read.
    pub total_timeout: Duration,
    /// Most response body bytes read.
    pub max_response_bytes: usize,
}

impl From<&crate::config::EgressConfig> for EgressSettings {
    fn from(c: &crate::config::EgressConfig) -> Self {
        Self {
            allow_http: c.allow_http,
            allow_networks: c.allow_networks.clone(),
            ca_file: c.ca_file.clone(),
            connect_timeout: Duration::from_secs(c.connect_timeout_seconds),
            total_timeout: Duration::from_secs(c.timeout_seconds),
            max_response_bytes: usize::try_from(c.max_response_bytes).unwrap_or(usize::MAX),
        }
    }
}

/// The egress policy could not be built from configuration.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// An `allow_networks` entry is not a CIDR.
    #[error("egress.allow_networks holds {0:?}, which is not an address range like 127.0.0.0/8")]
    Network(String),
    /// The CA file cannot be read or holds no certificate.
    #[error("cannot load egress.ca_file {path}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The system's roots cannot be read.
    #[error("cannot read the system's CA certificates")]
    Roots(#[source] io::Error),
}

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not an absolute http(s) URL HCP may call.
    #[error("{0}")]
    Syntax(String),
    /// The host is, or resolves to, an address the policy denies.
    #[error(
        "{host} {how} {addr}, which is {what}; an operator may allow the range in [egress] allow_networks"
    )]
    Denied {
        /// The URL's host.
        host: String,
        /// "is" or "resolves to".
        how: &'static str,
        /// The address.
        addr: IpAddr,
        /// The range's description.
        what: String,
    },
    /// The name does not resolve.
    #[error("{host} does not resolve: {why}")]
    Unresolved {
        /// The URL's host.
        host: String,
        /// The resolver's answer.
        why: String,
    },
}

/// A URL that passed [`EgressPolicy::check_url`]: scheme, host and port
/// split out, and the path with query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUrl {
    /// The URL as given.
    pub text: String,
    /// TLS.
    pub https: bool,
    /// The host: a DNS name, or an IP address without brackets.
    pub host: String,
    /// The port (443 or 80 when absent).
    pub port: u16,
    /// Path and query (`/` when absent).
    pub path: String,
}

impl CheckedUrl {
    /// `location` (a redirect's) as an absolute URL: as it is when
    /// absolute, else on this URL's scheme, host and port (a path from the
    /// root, or one relative to this URL's directory).
    pub fn join(&self, location: &str) -> Option<String> {
        if location.contains("://") {
            return Some(location.to_owned());
        }
        let origin = format!("{}://{}", if self.https { "https" } else { "http" }, self.authority());
        if let Some(rest) = location.strip_prefix("//") {
            return Some(format!("{}://{rest}", if self.https { "https" } else { "http" }));
        }
        if location.starts_with('/') {
            return Some(format!("{origin}{location}"));
        }
        let path = self.path.split('?').next().unwrap_or("/");
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        Some(format!("{origin}{}{location}", if dir.is_empty() { "/" } else { dir }))
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == default { host } else { format!("{host}:{}", self.port) }
    }
}

impl EgressPolicy {
    /// The policy `settings` describe.
    pub fn new(settings: &EgressSettings) -> Result<Self, PolicyError> {
        let allow_networks = settings
            .allow_networks
            .iter()
            .map(|n| Cidr::parse(n).ok_or_else(|| PolicyError::Network(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot use is skipped, as
            // browsers do.
            let _ = roots.add(cert);
        }
        if let Some(path) = &settings.ca_file {
            let ca = |source| PolicyError::Ca { path: path.clone(), source };
            let pem = std::fs::read(path).map_err(ca)?;
            let mut added = 0;
            for cert in rustls_pemfile_certs(&pem).map_err(ca)? {
                roots.add(cert).map_err(|e| ca(io::Error::other(e)))?;
                added += 1;
            }
            if added == 0 {
                return Err(ca(io::Error::other("no certificate in the file")));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PolicyError::Roots(io::Error::other(e)))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            allow_http: settings.allow_http,
            allow_networks,
            connect_timeout: settings.connect_timeout,
            total_timeout: settings.total_timeout,
            max_response_bytes: settings.max_response_bytes,
            tls: Arc::new(tls),
        })
    }

    /// Parses and checks `text` as a URL HCP may call: syntax, scheme and,
    /// for an IP literal, its address. A name is checked by
    /// [`EgressClient::check_resolves`] and again at every request.
    pub fn check_url(&self, text: &str) -> Result<CheckedUrl, UrlError> {
        let bad = |why: &str| UrlError::Syntax(why.to_owned());
        if text.len() > MAX_URL_LEN {
            return Err(bad(&format!("is longer than {MAX_URL_LEN} bytes")));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) || text.contains('#') {
            return Err(bad("holds whitespace, control characters or a fragment"));
        }
        if let Some((scheme, _)) = text.split_once(':')
            && !scheme.is_empty()
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
        {
            return Err(bad(&format!("has scheme {}; only https is allowed", scheme.to_ascii_lowercase())));
        }
        let uri: http::Uri = text.parse().map_err(|_| bad("is not an absolute URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if self.allow_http => false,
            Some("http") => {
                return Err(bad("must use https (plain http is allowed only in development mode)"));
            }
            Some(other) => return Err(bad(&format!("has scheme {other}; only https is allowed"))),
            None => return Err(bad("is not an absolute URL (https://host/path)")),
        };
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry a user name or password"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        if port == 0 {
            return Err(bad("names port 0"));
        }
        let path = uri.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned());
        let url = CheckedUrl { text: text.to_owned(), https, host, port, path };
        if let Ok(ip) = url.host.parse::<IpAddr>() {
            self.check_addr(&url.host, "is", ip)?;
        }
        Ok(url)
    }

    /// The bound on one whole request.
    pub fn total_timeout(&self) -> Duration {
        self.total_timeout
    }

    /// Whether core may connect to `ip` (named `host` in the error).
    pub fn check_addr(&self, host: &str, how: &'static str, ip: IpAddr) -> Result<(), UrlError> {
        let ip = unmap(ip);
        if self.allow_networks.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        match denied(ip) {
            None => Ok(()),
            Some(what) => {
                Err(UrlError::Denied { host: host.to_owned(), how, addr: ip, what: what.to_owned() })
            }
        }
    }
}

/// What range `ip` (unmapped) falls in, when it is denied by default.
pub fn denied(ip: IpAddr) -> Option<&'static str> {
    DENIED.iter().find(|(net, _)| net.contains(ip)).map(|(_, what)| *what)
}

/// An IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible (`::a.b.c.d`)
/// IPv6 address as the IPv4 address it carries; anything else unchanged.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                // ::a.b.c.d, deprecated but still routed by some stacks;
                // :: and ::1 stay as they are.
                if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
                    IpAddr::V4(Ipv4Addr::from(u32::from(s[6]) << 16 | u32::from(s[7])))
                } else {
                    ip
                }
            }
        },
        v4 => v4,
    }
}

/// Reads the certificates of a PEM text.
fn rustls_pemfile_certs(pem: &[u8]) -> io::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// A boxed resolution.
pub type Resolution<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Turns a host name into addresses. Injectable, so tests decide what a
/// name resolves to without any network.
pub trait Resolve: Send + Sync {
    /// The addresses of `host`.
    fn resolve<'a>(&'a self, host: &'a str) -> Resolution<'a>;
}

/// The system's resolver (getaddrinfo, on the blocking pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> Resolution<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Why a request failed; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The URL, or an address its host resolved to, is refused: no
    /// connection was attempted.
    #[error("refused before connecting")]
    Refused(#[source] UrlError),
    /// Connecting failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The (checked) address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (certificate, name, protocol).
    #[error("TLS handshake with {host} failed")]
    Tls {
        /// The URL's host.
        host: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// A time bound passed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The answer was a redirect, which is never followed.
    #[error("answered {0} (a redirect, which is not followed)")]
    Redirect(u16),
    /// The request could not be built.
    #[error("cannot build the request: {0}")]
    Request(String),
}

/// The bounds of a [`EgressClient::download`].
#[derive(Debug, Clone, Copy)]
pub struct DownloadLimits {
    /// Most bytes.
    pub max_bytes: u64,
    /// Time for everything, redirects included.
    pub total: Duration,
    /// Longest wait for the next bytes.
    pub stall: Duration,
    /// Most redirects followed.
    pub max_redirects: u8,
}

/// What a download fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Bytes written.
    pub bytes: u64,
    /// Their SHA-256, lower-case hex.
    pub sha256: String,
    /// The address the file came from.
    pub addr: SocketAddr,
    /// The URL it came from (after redirects).
    pub url: String,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Refused, or the connection or exchange failed.
    #[error(transparent)]
    Egress(EgressError),
    /// The server answered another status than 200.
    #[error("the server answered {0}")]
    Status(u16),
    /// More redirects than allowed.
    #[error("more than {0} redirects")]
    Redirects(u8),
    /// A redirect's Location is not a URL.
    #[error("a redirect names {0:?}, which is not a URL")]
    Location(String),
    /// Past the size bound.
    #[error("the file is larger than the {limit} bytes allowed{}", announced.map(|n| format!(" (it announces {n})")).unwrap_or_default())]
    TooLarge {
        /// The bound.
        limit: u64,
        /// The Content-Length, when it said so.
        announced: Option<u64>,
    },
    /// The body ended before its Content-Length.
    #[error("the download ended after {got} of its announced {announced} bytes")]
    Truncated {
        /// Bytes read.
        got: u64,
        /// Content-Length.
        announced: u64,
    },
    /// No bytes came for too long.
    #[error("the server sent nothing for {stall:?} (after {after} bytes)")]
    Stalled {
        /// Bytes read before.
        after: u64,
        /// The bound.
        stall: Duration,
    },
    /// The whole download took too long.
    #[error("the download took longer than {0:?}")]
    Timeout(Duration),
    /// The file could not be written.
    #[error("cannot write the downloaded file")]
    Io(#[source] io::Error),
}

impl DownloadError {
    /// Whether trying again later may succeed (the network, a server
    /// error); a refusal, a wrong size or a missing file will not.
    pub fn retryable(&self) -> bool {
        match self {
            DownloadError::Egress(
                EgressError::Refused(_) | EgressError::Request(_) | EgressError::Redirect(_),
            ) => false,
            DownloadError::Egress(_) | DownloadError::Timeout(_) | DownloadError::Stalled { .. } => true,
            DownloadError::Truncated { .. } => true,
            DownloadError::Status(s) => *s >= 500 || *s == 429 || *s == 408,
            DownloadError::Io(_) => true,
            DownloadError::Redirects(_) | DownloadError::Location(_) | DownloadError::TooLarge { .. } => {
                false
            }
        }
    }
}

/// What the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body, at most the policy's bound (longer ones are cut).
    pub body: Bytes,
    /// The address connected to.
    pub addr: SocketAddr,
}

/// Sends requests under an [`EgressPolicy`].
#[derive(Clone)]
pub struct EgressClient {
    policy: Arc<EgressPolicy>,
    resolver: Arc<dyn Resolve>,
}

impl fmt::Debug for EgressClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressClient").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl EgressClient {
    /// A client resolving through `resolver`.
    pub fn new(policy: EgressPolicy, resolver: Arc<dyn Resolve>) -> Self {
        Self { policy: Arc::new(policy), resolver }
    }

    /// The policy.
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Checks `text` ([`EgressPolicy::check_url`]) and, for a name, that it
    /// resolves to addresses the policy allows — all of them. Nothing is
    /// connected to.
    pub async fn check_resolves(&self, text: &str) -> Result<CheckedUrl, UrlError> {
        let url = self.policy.check_url(text)?;
        self.addresses(&url).await?;
        Ok(url)
    }

    /// The checked addresses of `url`'s host: refused when any is denied,
    /// so a name with one private address is refused whichever the
    /// connection would take.
    async fn addresses(&self, url: &CheckedUrl) -> Result<Vec<SocketAddr>, UrlError> {
        let ips = match url.host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let found =
                    tokio::time::timeout(self.policy.connect_timeout, self.resolver.resolve(&url.host))
                        .await
                        .map_err(|_| UrlError::Unresolved {
                            host: url.host.clone(),
                            why: "timed out".into(),
                        })?;
                found.map_err(|e| UrlError::Unresolved { host: url.host.clone(), why: e.to_string() })?
            }
        };
        if ips.is_empty() {
            return Err(UrlError::Unresolved { host: url.host.clone(), why: "no address".into() });
        }
        let how = if url.host.parse::<IpAddr>().is_ok() { "is" } else { "resolves to" };
        for ip in &ips {
            self.policy.check_addr(&url.host, how, *ip)?;
        }
        Ok(ips.into_iter().map(|ip| SocketAddr::new(unmap(ip), url.port)).collect())
    }

    /// POSTs `body` to `url` with `headers`, under the policy's checks and
    /// bounds. A 3xx is an error; any other status is the caller's to judge.
    pub async fn post(
        &self,
        url: &CheckedUrl,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, EgressError> {
        let total = self.policy.total_timeout;
        tokio::time::timeout(total, self.post_unbounded(url, headers, body))
            .await
            .map_err(|_| EgressError::Timeout(total))?
    }

    async fn post_unbounded(
        &self,
        url: &CheckedUrl,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, EgressError> {
        let mut request = http::Request::post(url.path.as_str())
            .header(http::header::HOST, url.authority())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "HCP-Webhooks/1");
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request.body(Full::new(body)).map_err(|e| EgressError::Request(e.to_string()))?;
        let (response, addr) = self.send(url, request).await?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(EgressError::Redirect(status));
        }
        // The body is read up to the bound; a longer one is cut, not an
        // error (the status is what counts).
        let limit = self.policy.max_response_bytes;
        let mut body = Limited::new(response.into_body(), limit);
        let mut read = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        read.extend_from_slice(&data);
                    }
                }
                Err(_) => break,
            }
        }
        read.truncate(limit);
        Ok(Answer { status, body: Bytes::from(read), addr })
    }

    /// Sends `request` to `url`'s host: the URL checked again (the policy
    /// may have changed since it was stored, and the addresses are those of
    /// now), a checked address connected to, TLS verified for https.
    async fn send(
        &self,
        url: &CheckedUrl,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(http::Response<hyper::body::Incoming>, SocketAddr), EgressError> {
        let url = self.policy.check_url(&url.text).map_err(EgressError::Refused)?;
        let addrs = self.addresses(&url).await.map_err(EgressError::Refused)?;
        let (tcp, addr) = self.connect(&addrs).await?;
        let response = if url.https {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| EgressError::Tls { host: url.host.clone(), source: io::Error::other(e) })?;
            let connector = tokio_rustls::TlsConnector::from(self.policy.tls.clone());
            let tls = tokio::time::timeout(self.policy.connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| EgressError::Timeout(self.policy.connect_timeout))?
                .map_err(|source| EgressError::Tls { host: url.host.clone(), source })?;
            exchange(TokioIo::new(tls), request).await?
        } else {
            exchange(TokioIo::new(tcp), request).await?
        };
        Ok((response, addr))
    }

    /// GETs `url` into the file `to`, following at most
    /// `limits.max_redirects` redirects (each target checked by the same
    /// policy as the first URL, at the address actually connected to),
    /// hashing the bytes as they arrive. Bounded: at most `max_bytes`
    /// (an announced Content-Length above it is refused before reading),
    /// `total` for everything, `stall` without a byte. A status other than
    /// 200 is an error naming it; `to` is removed on any error.
    pub async fn download(
        &self,
        url: &str,
        to: &std::path::Path,
        limits: &DownloadLimits,
    ) -> Result<Download, DownloadError> {
        let result = tokio::time::timeout(limits.total, self.download_unbounded(url, to, limits))
            .await
            .unwrap_or(Err(DownloadError::Timeout(limits.total)));
        if result.is_err() {
            let _ = tokio::fs::remove_file(to).await;
        }
        result
    }

    async fn download_unbounded(
        &self,
        first: &str,
        to: &std::path::Path,
        limits: &DownloadLimits,
    ) -> Result<Download, DownloadError> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let mut url =
            self.policy.check_url(first).map_err(|e| DownloadError::Egress(EgressError::Refused(e)))?;
        let mut redirects = 0;
        loop {
            let request = http::Request::get(url.path.as_str())
                .header(http::header::HOST, url.authority())
                .header(http::header::USER_AGENT, "HCP-Images/1")
                .body(Full::new(Bytes::new()))
                .map_err(|e| DownloadError::Egress(EgressError::Request(e.to_string())))?;
            let (response, addr) = self.send(&url, request).await.map_err(DownloadError::Egress)?;
            let status = response.status().as_u16();
            if (300..400).contains(&status) {
                if redirects >= limits.max_redirects {
                    return Err(DownloadError::Redirects(limits.max_redirects));
                }
                redirects += 1;
                let location = response
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or(DownloadError::Status(status))?;
                let next = url.join(location).ok_or_else(|| DownloadError::Location(location.to_owned()))?;
                url = self
                    .policy
                    .check_url(&next)
                    .map_err(|e| DownloadError::Egress(EgressError::Refused(e)))?;
                continue;
            }
            if status != 200 {
                return Err(DownloadError::Status(status));
            }
            let announced = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(n) = announced.filter(|n| *n > limits.max_bytes) {
                return Err(DownloadError::TooLarge { limit: limits.max_bytes, announced: Some(n) });
            }
            let mut file = tokio::fs::File::create(to).await.map_err(DownloadError::Io)?;
            let mut body = response.into_body();
            let mut digest = sha2::Sha256::new();
            let mut bytes: u64 = 0;
            loop {
                let frame = match tokio::time::timeout(limits.stall, body.frame()).await {
                    Err(_) => return Err(DownloadError::Stalled { after: bytes, stall: limits.stall }),
                    Ok(None) => break,
                    // A connection that ends before the announced length
                    // is a truncated file, whatever hyper calls it.
                    Ok(Some(Err(_))) if announced.is_some_and(|n| bytes < n) => {
                        return Err(DownloadError::Truncated {
                            got: bytes,
                            announced: announced.unwrap_or(0),
                        });
                    }
                    Ok(Some(frame)) => frame.map_err(|e| DownloadError::Egress(EgressError::Http(e)))?,
                };
                let Ok(data) = frame.into_data() else { continue };
                bytes += data.len() as u64;
                if bytes > limits.max_bytes {
                    return Err(DownloadError::TooLarge { limit: limits.max_bytes, announced: None });
                }
                digest.update(&data);
                file.write_all(&data).await.map_err(DownloadError::Io)?;
            }
            if let Some(n) = announced.filter(|n| *n != bytes) {
                return Err(DownloadError::Truncated { got: bytes, announced: n });
            }
            file.sync_all().await.map_err(DownloadError::Io)?;
            return Ok(Download { bytes, sha256: hex::encode(digest.finalize()), addr, url: url.text });
        }
    }

    /// Connects to the first of `addrs` that answers, each within the
    /// connect bound.
    async fn connect(
        &self,
        addrs: &[SocketAddr],
    ) -> Result<(tokio::net::TcpStream, SocketAddr), EgressError> {
        let started = Instant::now();
        let mut last = None;
        for addr in addrs {
            let left = self.policy.connect_timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    // The address connected to is the one checked.
                    if tcp.peer_addr().ok().map(|p| unmap(p.ip())) != Some(addr.ip()) {
                        return Err(EgressError::Connect {
                            addr: *addr,
                            source: io::Error::other("connected to an unexpected peer"),
                        });
                    }
                    return Ok((tcp, *addr));
                }
                Ok(Err(source)) => last = Some(EgressError::Connect { addr: *addr, source }),
                Err(_) => last = Some(EgressError::Timeout(self.policy.connect_timeout)),
            }
        }
        Err(last.unwrap_or(EgressError::Timeout(self.policy.connect_timeout)))
    }
}

/// One HTTP/1.1 request over `io`.
async fn exchange<T>(
    io: TokioIo<T>,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, EgressError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(EgressError::Http)?;
    tokio::spawn(async move {
        // The connection ends with the exchange; its error, if any, is the
        // request's.
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(EgressError::Http)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_http: bool, allow: &[&str]) -> EgressPolicy {
        EgressPolicy::new(&EgressSettings {
            allow_http,
            allow_networks: allow.iter().map(|s| (*s).to_owned()).collect(),
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(2),
            max_response_bytes: 1024,
        })
        .unwrap()
    }

    /// A resolver answering from a table; counts its calls.
    struct Table(Vec<(&'static str, Vec<IpAddr>)>, std::sync::Mutex<u32>);

    impl Resolve for Table {
        fn resolve<'a>(&'a self, host: &'a str) -> Resolution<'a> {
            *self.1.lock().unwrap() += 1;
            let found = self.0.iter().find(|(h, _)| *h == host).map(|(_, a)| a.clone());
            Box::pin(
                async move { found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host")) },
            )
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Each row: an address and whether it is denied by default.
    #[test]
    fn default_ranges_deny_internal_addresses() {
        let rows: &[(&str, bool)] = &[
            ("127.0.0.1", true),
            ("127.255.0.9", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("100.64.0.1", true),
            ("100.128.0.1", false),
            ("169.254.169.254", true),
            ("0.0.0.0", true),
            ("255.255.255.255", true),
            ("224.0.0.1", true),
            ("192.0.2.1", true),
            ("198.51.100.7", true),
            ("203.0.113.9", true),
            ("198.18.0.1", true),
            ("8.8.8.8", false),
            ("93.184.216.34", false),
            ("::1", true),
            ("::", true),
            ("fe80::1", true),
            ("fd00::1", true),
            ("fc00::1", true),
            ("ff02::1", true),
            ("2001:db8::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:10.0.0.1", true),
            ("::10.0.0.1", true),
            ("64:ff9b::a00:1", true),
            ("::ffff:8.8.8.8", false),
            ("2606:4700::1111", false),
        ];
        let p = policy(false, &[]);
        for (addr, refused) in rows {
            let got = p.check_addr("h", "is", ip(addr)).is_err();
            assert_eq!(got, *refused, "{addr}");
        }
    }

    #[test]
    fn an_allowed_network_opens_only_itself() {
        let p = policy(false, &["127.0.0.0/8"]);
        assert!(p.check_addr("h", "is", ip("127.0.0.1")).is_ok());
        assert!(p.check_addr("h", "is", ip("::ffff:127.0.0.2")).is_ok(), "mapped form too");
        assert!(p.check_addr("h", "is", ip("::1")).is_err(), "IPv6 loopback is another range");
        assert!(p.check_addr("h", "is", ip("10.0.0.1")).is_err());
        assert!(p.check_addr("h", "is", ip("169.254.169.254")).is_err());
        assert!(matches!(
            EgressPolicy::new(&EgressSettings {
                allow_networks: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
            Err(PolicyError::Network(_))
        ));
    }

    /// Each row: a URL and a word of the refusal.
    #[test]
    fn urls_are_checked_before_anything_resolves() {
        let p = policy(false, &[]);
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        let rows: &[(&str, &str)] = &[
            ("http://example.com/hook", "https"),
            ("file:///etc/passwd", "scheme file"),
            ("ftp://example.com/", "scheme ftp"),
            ("https://user:pw@example.com/", "user name"),
            ("https://user@example.com/", "user name"),
            ("example.com/hook", "absolute"),
            ("/hook", "absolute"),
            ("https:///hook", "absolute URL"),
            ("https://example.com/a b", "whitespace"),
            ("https://example.com/#x", "fragment"),
            ("https://127.0.0.1/", "loopback"),
            ("https://169.254.169.254/latest/meta-data", "cloud metadata"),
            ("https://10.0.0.5:8443/", "private"),
            ("https://[::1]/", "loopback"),
            ("https://[::ffff:7f00:1]/", "loopback"),
            ("https://[fe80::1]/", "link-local"),
            (&long, "longer than"),
        ];
        for (url, word) in rows {
            let err = p.check_url(url).unwrap_err().to_string();
            assert!(err.contains(word), "{url}: {err}");
        }
        let ok = p.check_url("https://Hooks.Example.com:8443/in?x=1").unwrap();
        assert_eq!(
            (ok.https, ok.host.as_str(), ok.port, ok.path.as_str()),
            (true, "hooks.example.com", 8443, "/in?x=1")
        );
        assert_eq!(ok.authority(), "hooks.example.com:8443");
        let dev = policy(true, &[]);
        assert!(!dev.check_url("http://example.com/").unwrap().https, "development mode allows http");
        assert!(dev.check_url("http://127.0.0.1/").is_err(), "but not loopback");
    }

    /// DNS rebinding: a name that resolved to a public address when the
    /// endpoint was registered and to a private one at delivery is refused
    /// at delivery, before any connection (the address is never dialled:
    /// 10.255.255.1 would hang until the connect bound).
    #[tokio::test]
    async fn a_name_resolving_inward_at_delivery_is_refused_without_connecting() {
        let registration = EgressClient::new(
            policy(false, &[]),
            Arc::new(Table(vec![("hooks.example", vec![ip("93.184.216.34")])], Default::default())),
        );
        let url = registration.check_resolves("https://hooks.example/in").await.unwrap();
        let rebound = Arc::new(Table(
            vec![("hooks.example", vec![ip("93.184.216.34"), ip("10.255.255.1")])],
            Default::default(),
        ));
        let delivery = EgressClient::new(policy(false, &[]), rebound.clone());
        let started = Instant::now();
        let err = delivery.post(&url, &[], Bytes::from_static(b"{}")).await.unwrap_err();
        match &err {
            EgressError::Refused(UrlError::Denied { addr, how, .. }) => {
                assert_eq!((*addr, *how), (ip("10.255.255.1"), "resolves to"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(500), "no connection was attempted");
        assert_eq!(*rebound.1.lock().unwrap(), 1, "resolved once, at delivery");
        let localhost = EgressClient::new(
            policy(false, &[]),
            Arc::new(Table(vec![("localhost", vec![ip("127.0.0.1")])], Default::default())),
        );
        assert!(matches!(
            localhost.check_resolves("https://localhost:9/x").await,
            Err(UrlError::Denied { how: "resolves to", .. })
        ));
        let nowhere = EgressClient::new(policy(false, &[]), Arc::new(Table(vec![], Default::default())));
        assert!(matches!(
            nowhere.check_resolves("https://nx.example/").await,
            Err(UrlError::Unresolved { .. })
        ));
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.255.0.1")) && !n.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        assert_eq!(Cidr::parse("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert!(Cidr::parse("nope/8").is_none() && Cidr::parse("::1/129").is_none());
    }
}
