//! Typed, strict provider configuration: a TOML file parsed into the
//! provider's own `Config` (unknown keys refused by its
//! `#[serde(deny_unknown_fields)]`), then validated as a whole before the
//! process starts. A value out of range is refused with the field's name
//! and the range, never clamped, so what the file says is what runs.

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{ServeConfig, ServerTls, SocketMode, TlsError, TlsFiles, TlsPart};

/// A provider's configuration, as the kit loads, checks and serves it.
pub trait ProviderConfig: DeserializeOwned {
    /// The gRPC listen address.
    fn listen(&self) -> SocketAddr;

    /// Overrides the listen address (`--listen`).
    fn set_listen(&mut self, listen: SocketAddr);

    /// Checks every field; the first one wrong is the error.
    fn validate(&self) -> Result<(), ConfigError>;

    /// The `[server]` table: unix socket and TLS of the provider's own
    /// gRPC server. None serves plain TCP on [`ProviderConfig::listen`].
    fn server(&self) -> Option<&ServerConfig> {
        None
    }

    /// Whether the file asks for JSON logs (`--json-logs` also does).
    fn json_logs(&self) -> bool {
        false
    }
}

/// The configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid, has unknown keys or values of the wrong type.
    #[error("invalid configuration")]
    Parse(#[source] toml::de::Error),
    /// A number is outside what the provider accepts.
    #[error("{field}: {value} is out of range, allowed {range}")]
    OutOfRange {
        /// The field, e.g. `timing.retry_base_ms`.
        field: String,
        /// The value given.
        value: String,
        /// What is allowed, e.g. `1..=60000`.
        range: String,
    },
    /// A field is wrong otherwise.
    #[error("{field}: {message}")]
    Field {
        /// The field, e.g. `tls.fingerprint` or `networks.lan`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The TLS files a field names cannot be served.
    #[error("{field}")]
    Tls {
        /// The field naming the file at fault, e.g. `server.tls_key_file`.
        field: String,
        /// What is wrong with it.
        #[source]
        source: TlsError,
    },
}

impl ConfigError {
    /// A field that is wrong for `message`.
    pub fn field(field: impl Into<String>, message: impl Display) -> Self {
        Self::Field { field: field.into(), message: message.to_string() }
    }

    /// The field this error names, if it names one.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            Self::OutOfRange { field, .. } | Self::Field { field, .. } | Self::Tls { field, .. } => {
                Some(field)
            }
            Self::Read { .. } | Self::Parse(_) => None,
        }
    }
}

/// Refuses `value` of `field` unless it is within `range`.
pub fn check_range<T: PartialOrd + Display>(
    field: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        field: field.to_owned(),
        value: value.to_string(),
        range: format!("{}..={}", range.start(), range.end()),
    })
}

/// Parses a TOML document into `C` and validates it.
pub fn from_toml<C: ProviderConfig>(text: &str) -> Result<C, ConfigError> {
    let config: C = toml::from_str(text).map_err(ConfigError::Parse)?;
    config.validate()?;
    Ok(config)
}

/// Reads, parses and validates a configuration file.
pub fn load<C: ProviderConfig>(path: &Path) -> Result<C, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    from_toml(&text)
}

/// The `[server]` table of a provider's file: how core reaches the
/// provider when plain TCP on `listen` is not it. The TLS files are checked
/// when the configuration is served ([`serve_config`]), read again every
/// `tls_reload_seconds` while serving, and a changed set that can be
/// served replaces the old one for new connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Serve on this unix socket instead of TCP (core registers it as
    /// `unix:///path`).
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// The socket's permission bits, octal (`"0660"`); default `"0600"`.
    /// Needs `unix_socket`.
    #[serde(default)]
    pub unix_socket_mode: Option<String>,
    /// Serve TLS with this certificate chain (PEM); needs `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM).
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM, may hold
    /// several CAs); needs `tls_cert_file`.
    #[serde(default)]
    pub tls_client_ca_file: Option<PathBuf>,
    /// How often the TLS files are read again, seconds
    /// ([`TLS_RELOAD_SECONDS`]); default 10. Needs `tls_cert_file`.
    #[serde(default)]
    pub tls_reload_seconds: Option<u64>,
}

/// The range of `server.tls_reload_seconds`.
pub const TLS_RELOAD_SECONDS: RangeInclusive<u64> = 1..=3600;

impl ServerConfig {
    /// Checks the table without reading files (`server.` prefixes the
    /// fields named): the TLS files come together, the reload interval is
    /// in [`TLS_RELOAD_SECONDS`], the socket mode is octal up to `0777`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::field("server.tls_key_file", "needed with tls_cert_file"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::field("server.tls_cert_file", "needed with tls_key_file"));
            }
            _ => {}
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(ConfigError::field("server.tls_client_ca_file", "needs tls_cert_file"));
        }
        if let Some(seconds) = self.tls_reload_seconds {
            check_range("server.tls_reload_seconds", seconds, TLS_RELOAD_SECONDS)?;
            if self.tls_cert_file.is_none() {
                return Err(ConfigError::field("server.tls_reload_seconds", "needs tls_cert_file"));
            }
        }
        if self.unix_socket.is_some() && self.tls_cert_file.is_some() {
            return Err(ConfigError::field("server.unix_socket", "TLS is served on TCP only"));
        }
        if self.unix_socket_mode.is_some() && self.unix_socket.is_none() {
            return Err(ConfigError::field("server.unix_socket_mode", "needs unix_socket"));
        }
        self.unix_socket_mode()?;
        Ok(())
    }

    /// The unix socket's mode: `unix_socket_mode`, or `0600`.
    pub fn unix_socket_mode(&self) -> Result<SocketMode, ConfigError> {
        match &self.unix_socket_mode {
            None => Ok(SocketMode::DEFAULT),
            Some(text) => text.parse().map_err(|e| ConfigError::field("server.unix_socket_mode", e)),
        }
    }

    /// The TLS files, when the table has them.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            client_ca: self.tls_client_ca_file.clone(),
            reload_every: self
                .tls_reload_seconds
                .map_or(TlsFiles::DEFAULT_RELOAD, std::time::Duration::from_secs),
        })
    }
}

/// How to serve `config`: its listen address, and its `[server]` table's
/// unix socket (with its mode) and TLS files, which are read and checked
/// here so that a set that cannot be served is refused before the
/// provider starts, naming the field of the file at fault.
pub fn serve_config<C: ProviderConfig>(config: &C) -> Result<ServeConfig, ConfigError> {
    let mut serve = ServeConfig { listen: config.listen(), ..ServeConfig::default() };
    if let Some(server) = config.server() {
        serve.unix_socket = server.unix_socket.clone();
        serve.unix_socket_mode = server.unix_socket_mode()?;
        if let Some(files) = server.tls_files() {
            files.check().map_err(|source| ConfigError::Tls {
                field: match source.part() {
                    Some(TlsPart::Key) => "server.tls_key_file",
                    Some(TlsPart::ClientCa) => "server.tls_client_ca_file",
                    Some(TlsPart::Certificate) | None => "server.tls_cert_file",
                }
                .to_owned(),
                source,
            })?;
            serve.tls = Some(ServerTls::Files(files));
        }
    }
    Ok(serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: SocketAddr,
        #[serde(default)]
        retry_base_ms: u64,
        #[serde(default)]
        server: ServerConfig,
    }

    impl ProviderConfig for Sample {
        fn listen(&self) -> SocketAddr {
            self.listen
        }
        fn set_listen(&mut self, listen: SocketAddr) {
            self.listen = listen;
        }
        fn validate(&self) -> Result<(), ConfigError> {
            check_range("retry_base_ms", self.retry_base_ms, 1..=60_000)?;
            self.server.validate()
        }
        fn server(&self) -> Option<&ServerConfig> {
            Some(&self.server)
        }
    }

    /// The error's field, or its message when it names none.
    fn check(text: &str) -> Result<(), (String, String)> {
        from_toml::<Sample>(&format!("listen = \"127.0.0.1:0\"\n{text}"))
            .map(|_| ())
            .map_err(|e| (e.field_name().unwrap_or_default().to_owned(), e.to_string()))
    }

    #[test]
    fn values_out_of_range_and_unknown_keys_are_refused() {
        // The text after `listen`, and the field and part of the message.
        type Case = (&'static str, Result<(), (&'static str, &'static str)>);
        let cases: [Case; 17] = [
            ("retry_base_ms = 1", Ok(())),
            (
                "retry_base_ms = 0",
                Err(("retry_base_ms", "retry_base_ms: 0 is out of range, allowed 1..=60000")),
            ),
            ("retry_base_ms = 60001", Err(("retry_base_ms", "allowed 1..=60000"))),
            ("colour = 1\nretry_base_ms = 1", Err(("", "invalid configuration"))),
            (
                "retry_base_ms = 1\n[server]\ntls_cert_file = \"/c\"",
                Err(("server.tls_key_file", "needed with tls_cert_file")),
            ),
            (
                "retry_base_ms = 1\n[server]\ntls_client_ca_file = \"/c\"",
                Err(("server.tls_client_ca_file", "needs tls_cert_file")),
            ),
            (
                "retry_base_ms = 1\n[server]\nunix_socket = \"/s\"\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"",
                Err(("server.unix_socket", "TCP only")),
            ),
            (
                "retry_base_ms = 1\n[server]\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"\ntls_reload_seconds = 1",
                Ok(()),
            ),
            (
                "retry_base_ms = 1\n[server]\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"\ntls_reload_seconds = 3600",
                Ok(()),
            ),
            (
                "retry_base_ms = 1\n[server]\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"\ntls_reload_seconds = 0",
                Err(("server.tls_reload_seconds", "0 is out of range, allowed 1..=3600")),
            ),
            (
                "retry_base_ms = 1\n[server]\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"\ntls_reload_seconds = 3601",
                Err(("server.tls_reload_seconds", "allowed 1..=3600")),
            ),
            (
                "retry_base_ms = 1\n[server]\ntls_reload_seconds = 5",
                Err(("server.tls_reload_seconds", "needs tls_cert_file")),
            ),
            ("retry_base_ms = 1\n[server]\nunix_socket = \"/s\"\nunix_socket_mode = \"0660\"", Ok(())),
            (
                "retry_base_ms = 1\n[server]\nunix_socket = \"/s\"\nunix_socket_mode = \"0999\"",
                Err(("server.unix_socket_mode", "not an octal mode")),
            ),
            (
                "retry_base_ms = 1\n[server]\nunix_socket = \"/s\"\nunix_socket_mode = \"1777\"",
                Err(("server.unix_socket_mode", "1777 is above 0777")),
            ),
            (
                "retry_base_ms = 1\n[server]\nunix_socket = \"/s\"\nunix_socket_mode = \"rw\"",
                Err(("server.unix_socket_mode", "not an octal mode")),
            ),
            (
                "retry_base_ms = 1\n[server]\nunix_socket_mode = \"0660\"",
                Err(("server.unix_socket_mode", "needs unix_socket")),
            ),
        ];
        for (text, want) in cases {
            match (check(text), want) {
                (Ok(()), Ok(())) => {}
                (Err((field, message)), Err((want_field, want_message))) => {
                    assert_eq!(field, want_field, "{text}");
                    assert!(message.contains(want_message), "{text}: {message}");
                }
                (got, _) => panic!("{text}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_server_table_becomes_the_serve_config() {
        let plain: Sample = from_toml("listen = \"127.0.0.1:7\"\nretry_base_ms = 1").unwrap();
        let serve = serve_config(&plain).unwrap();
        assert_eq!((serve.listen.port(), serve.unix_socket, serve.tls.is_none()), (7, None, true));
        let socket: Sample =
            from_toml("listen = \"127.0.0.1:7\"\nretry_base_ms = 1\n[server]\nunix_socket = \"/run/p.sock\"")
                .unwrap();
        let serve = serve_config(&socket).unwrap();
        assert_eq!(
            (serve.unix_socket, serve.unix_socket_mode),
            (Some("/run/p.sock".into()), SocketMode::DEFAULT)
        );
        let mode: Sample = from_toml(
            "listen = \"127.0.0.1:7\"\nretry_base_ms = 1\n[server]\nunix_socket = \"/s\"\nunix_socket_mode = \"0660\"",
        )
        .unwrap();
        assert_eq!(serve_config(&mode).unwrap().unix_socket_mode.bits(), 0o660);
    }

    #[test]
    fn the_tls_files_carry_the_reload_interval() {
        let server = |reload: &str| {
            from_toml::<Sample>(&format!(
                "listen = \"127.0.0.1:7\"\nretry_base_ms = 1\n[server]\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"\n{reload}"
            ))
            .unwrap()
            .server
        };
        let files = server("").tls_files().unwrap();
        assert_eq!((files.reload_every, files.client_ca), (TlsFiles::DEFAULT_RELOAD, None));
        assert_eq!(server("tls_reload_seconds = 60").tls_files().unwrap().reload_every.as_secs(), 60);
    }
}
