//! `https://host[:port]/path` URLs of hypervisor endpoints, split into what
//! an HTTPS client needs. Only HTTPS is accepted: HCP never sends
//! hypervisor credentials in the clear.

/// The parts of an HTTPS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port, or the default given to [`split_https_url`].
    pub port: u16,
    /// The path from its `/`, or the default given to [`split_https_url`].
    pub path: String,
}

/// The URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Another scheme than `https`.
    #[error("must start with https://, got {url:?}")]
    NotHttps {
        /// The URL.
        url: String,
    },
    /// The port is not a number within 0..=65535.
    #[error("bad port in {url:?}")]
    BadPort {
        /// The URL.
        url: String,
    },
    /// Nothing between `https://` and the port or path.
    #[error("no host in {url:?}")]
    NoHost {
        /// The URL.
        url: String,
    },
}

/// Splits `url`, taking `default_port` and `default_path` for what it
/// leaves out (`https://[::1]:8989` is host `::1`, port 8989).
pub fn split_https_url(url: &str, default_port: u16, default_path: &str) -> Result<HttpsUrl, UrlError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| UrlError::NotHttps { url: url.to_owned() })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, default_path),
    };
    let (host, port) = match authority.rsplit_once(':') {
        // A colon inside brackets belongs to an IPv6 address, not a port.
        Some((h, p)) if !authority.ends_with(']') && (!h.contains(':') || h.starts_with('[')) => {
            (h.trim_matches(['[', ']']), p.parse().map_err(|_| UrlError::BadPort { url: url.to_owned() })?)
        }
        _ => (authority.trim_matches(['[', ']']), default_port),
    };
    if host.is_empty() {
        return Err(UrlError::NoHost { url: url.to_owned() });
    }
    Ok(HttpsUrl { host: host.to_owned(), port, path: path.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        let ok = |host: &str, port, path: &str| Ok(HttpsUrl { host: host.into(), port, path: path.into() });
        let not_https = |u: &str| Err(UrlError::NotHttps { url: u.into() });
        let cases = [
            ("https://vc.example.com/sdk", ok("vc.example.com", 443, "/sdk")),
            ("https://127.0.0.1:8989/sdk", ok("127.0.0.1", 8989, "/sdk")),
            ("https://[::1]:8989", ok("::1", 8989, "/x")),
            ("https://[::1]", ok("::1", 443, "/x")),
            ("https://hv1:5986/wsman", ok("hv1", 5986, "/wsman")),
            ("https://hv1", ok("hv1", 443, "/x")),
            ("http://vc/sdk", not_https("http://vc/sdk")),
            ("vc/sdk", not_https("vc/sdk")),
            ("https://:1/sdk", Err(UrlError::NoHost { url: "https://:1/sdk".into() })),
            ("https:///sdk", Err(UrlError::NoHost { url: "https:///sdk".into() })),
            ("https://vc:http/sdk", Err(UrlError::BadPort { url: "https://vc:http/sdk".into() })),
            ("https://vc:70000", Err(UrlError::BadPort { url: "https://vc:70000".into() })),
        ];
        for (url, want) in cases {
            assert_eq!(split_https_url(url, 443, "/x"), want, "{url}");
        }
    }
}
