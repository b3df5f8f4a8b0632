//! The REST client of the people-facing commands: where the API is, who
//! is asking, and the API's error taxonomy turned into messages that show
//! the code and name the field.
//!
//! Settings come from, in order of precedence: flags, `HCP_*` environment
//! variables, the chosen profile of the config file (`$HCP_CONFIG`, else
//! `$XDG_CONFIG_HOME/hcp/config.toml` or `~/.config/hcp/config.toml`):
//!
//! ```toml
//! default_profile = "dev"
//! [profiles.dev]
//! endpoint = "http://127.0.0.1:8080"
//! project = "demo"
//! token_command = "hcp token --tenant acme --project demo"   # or token = "..."
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use serde_json::Value;

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The profile used when none is named.
    pub default_profile: Option<String>,
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// Where and as whom.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The gateway, `http(s)://host:port`.
    pub endpoint: Option<String>,
    /// A bearer token.
    pub token: Option<String>,
    /// A shell command that prints a token (run at each invocation).
    pub token_command: Option<String>,
    /// The project of tenant commands.
    pub project: Option<String>,
}

/// The connection settings of one invocation.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectArgs {
    /// Profile of the config file.
    #[arg(long, global = true, env = "HCP_PROFILE")]
    pub profile: Option<String>,
    /// The gateway's URL.
    #[arg(long, global = true, env = "HCP_ENDPOINT")]
    pub endpoint: Option<String>,
    /// A bearer token.
    #[arg(long, global = true, env = "HCP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The project of tenant commands.
    #[arg(long, global = true, env = "HCP_PROJECT")]
    pub project: Option<String>,
}

/// The config file's path.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HCP_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hcp").join("config.toml"))
}

/// An error from the API: its code, message and details.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}{field}", field = self.field.as_deref().map(|f| format!(" (field: {f})")).unwrap_or_default())]
pub struct ApiFailure {
    /// The HTTP status.
    pub status: u16,
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, ...
    pub code: String,
    /// The API's message.
    pub message: String,
    /// The field `details.field` names.
    pub field: Option<String>,
}

/// A client for one invocation.
pub struct Client {
    endpoint: String,
    token: String,
    /// The project of tenant commands ("" when none is set).
    pub project: String,
    http: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Client {
    /// Resolves the settings and builds the client.
    pub fn new(args: &ConnectArgs) -> anyhow::Result<Self> {
        let file: ConfigFile = match config_path() {
            Some(p) if p.exists() => toml::from_str(
                &std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
            )
            .with_context(|| format!("invalid config file {}", p.display()))?,
            _ => ConfigFile::default(),
        };
        let profile = match args.profile.as_ref().or(file.default_profile.as_ref()) {
            Some(name) => file.profiles.get(name).cloned().with_context(|| {
                format!("no profile {name:?} in {}", config_path().unwrap_or_default().display())
            })?,
            None => Profile::default(),
        };
        let endpoint = args
            .endpoint
            .clone()
            .or(profile.endpoint)
            .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned())
            .trim_end_matches('/')
            .to_owned();
        anyhow::ensure!(
            endpoint.starts_with("http://") || endpoint.starts_with("https://"),
            "the endpoint must be an http:// or https:// URL, got {endpoint:?}"
        );
        let token = match (&args.token, profile.token, profile.token_command) {
            (Some(t), _, _) => t.clone(),
            (None, Some(t), _) => t,
            (None, None, Some(cmd)) => {
                let out = std::process::Command::new("sh")
                    .args(["-c", &cmd])
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .with_context(|| format!("cannot run the token command {cmd:?}"))?;
                anyhow::ensure!(out.status.success(), "the token command {cmd:?} failed ({})", out.status);
                String::from_utf8(out.stdout).context("the token command printed no text")?.trim().to_owned()
            }
            (None, None, None) => String::new(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .context("cannot load the system's CA certificates")?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            endpoint,
            token,
            project: args.project.clone().or(profile.project).unwrap_or_default(),
            http: HyperClient::builder(hyper_util::rt::TokioExecutor::new()).build(https),
        })
    }

    /// The project, or an error saying how to set one.
    pub fn project(&self) -> anyhow::Result<&str> {
        anyhow::ensure!(
            !self.project.is_empty(),
            "no project: use --project, HCP_PROJECT or a profile's project"
        );
        Ok(&self.project)
    }

    /// Sends a request and returns the JSON answer, or the API's error.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let (status, bytes) = self.send(method, path, body, "application/json").await?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(failure(status, &value))
    }

    /// Sends a bodiless request asking for `accept` (`text/csv`) and
    /// returns the answer's text, or the API's error.
    pub async fn call_text(&self, method: &str, path: &str, accept: &str) -> anyhow::Result<String> {
        let (status, bytes) = self.send(method, path, None, accept).await?;
        if (200..300).contains(&status) {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Err(failure(status, &value))
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.endpoint))
            .header("accept", accept);
        if !self.token.is_empty() {
            req = req.header("authorization", format!("Bearer {}", self.token));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(serde_json::to_vec(b)?))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self
            .http
            .request(req.body(body)?)
            .await
            .with_context(|| format!("cannot reach HCP at {}", self.endpoint))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.context("the answer was cut short")?.to_bytes();
        Ok((status, bytes))
    }
}

/// The API's error answer as an error.
fn failure(status: u16, value: &Value) -> anyhow::Error {
    ApiFailure {
        status,
        code: value["code"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_owned),
        message: value["message"].as_str().map_or_else(|| value.to_string(), str::to_owned),
        field: value["details"]["field"].as_str().map(str::to_owned),
    }
    .into()
}
