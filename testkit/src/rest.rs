//! A minimal JSON client for the gateway's REST API.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A reply: status and JSON body (`Value::Null` when empty or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Parsed body.
    pub body: Value,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// The body as text (a CSV answer, say).
    pub text: String,
}

impl Reply {
    /// `body[key]` as a string, or "".
    pub fn str(&self, key: &str) -> String {
        self.body.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_owned()
    }
}

/// REST client bound to one base URL.
#[derive(Clone, Debug)]
pub struct Rest {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Rest {
    /// A client for `http://addr`.
    pub fn new(base: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self { base, client: Client::builder(TokioExecutor::new()).build(connector) }
    }

    /// Sends a request; `body` is sent verbatim.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> anyhow::Result<Reply> {
        self.raw_with(method, path, token, body, &[]).await
    }

    /// Sends a request with extra headers.
    pub async fn raw_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))?;
        let resp = self.client.request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(Reply { status, body, headers, text })
    }

    /// GET.
    pub async fn get(&self, path: &str, token: &str) -> anyhow::Result<Reply> {
        self.raw("GET", path, Some(token), None).await
    }

    /// POST a JSON value.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> anyhow::Result<Reply> {
        self.raw("POST", path, Some(token), Some(&body.to_string())).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str, token: &str) -> anyhow::Result<Reply> {
        self.raw("DELETE", path, Some(token), None).await
    }

    /// Waits up to `timeout` for a job to end (SUCCEEDED, FAILED or
    /// CANCELLED) and returns it as the tenant reads it.
    pub async fn finished_job(
        &self,
        token: &str,
        job_id: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Value> {
        crate::wait_until(timeout, &format!("job {job_id} to finish"), || async {
            let r = self.get(&format!("/api/hcp/tenant/v1/jobs/{job_id}"), token).await?;
            anyhow::ensure!(r.status == 200, "GET job {job_id}: {} {}", r.status, r.body);
            let ended = ["SUCCEEDED", "FAILED", "CANCELLED"].contains(&r.str("status").as_str());
            Ok(ended.then_some(r.body))
        })
        .await
    }

    /// Waits up to `timeout` for core to have probed provider `name` as
    /// HEALTHY after `since` (a restart), so that a health record left from
    /// before the restart does not count.
    pub async fn provider_healthy_since(
        &self,
        ops: &str,
        name: &str,
        since: chrono::DateTime<chrono::Utc>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<()> {
        crate::wait_until(timeout, &format!("{name} to be probed healthy"), || async {
            let r = self.get("/api/hcp/ops/v1/providers", ops).await?;
            let fresh = r.body["providers"].as_array().into_iter().flatten().any(|p| {
                let probed =
                    p["last_probe_at"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                p["name"] == name && p["health"] == "HEALTHY" && probed.is_some_and(|t| t > since)
            });
            Ok(fresh.then_some(()))
        })
        .await
    }
}
