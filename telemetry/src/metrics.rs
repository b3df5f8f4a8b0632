//! Prometheus metrics for every HCP process: the process-wide recorder
//! (metrics-rs's `metrics` facade with its Prometheus exporter, a
//! well-kept pair that renders the Prometheus text format), the `/metrics`
//! endpoint on a listener of its own, and the gRPC server call metrics
//! [`crate::GrpcTraceLayer`] records.
//!
//! Code anywhere records with `metrics::counter!`, `gauge!` and
//! `histogram!`; names follow Prometheus conventions (`hcp_` prefix, base
//! units, `_total` for counters, `_seconds` histograms with [`BUCKETS`]).
//! Gauges read from a database are set by the process's refresh hook just
//! before each scrape renders, so they are never older than the scrape.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets of every `_seconds` histogram: 1 ms to 60 s.
pub const BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// How long a scrape waits for its refresh.
pub const REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs before each scrape renders (e.g. to set gauges from a database).
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns its handle.
/// Until it is installed, recording is a no-op.
pub fn recorder() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Fails only when another recorder was installed first (a test
        // harness's); ours then renders what it has, nothing.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The current metrics in the Prometheus text format.
pub fn render() -> String {
    let handle = recorder();
    handle.run_upkeep();
    handle.render()
}

/// A `/metrics` listener that could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}")]
pub struct MetricsListenError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A running `/metrics` listener; dropping it stops it.
#[derive(Debug)]
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `GET /metrics` on `listen` (port 0 picks one) until the returned
/// [`Serving`] is dropped; `refresh` runs before each render.
pub async fn serve(
    listen: SocketAddr,
    refresh: Option<Refresh>,
) -> Result<(SocketAddr, Serving), MetricsListenError> {
    recorder();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| MetricsListenError { addr: listen, source })?;
    let addr = listener.local_addr().map_err(|source| MetricsListenError { addr: listen, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let refresh = refresh.clone();
            async move {
                // A database that does not answer must not hang the scrape:
                // what is in memory is rendered anyway.
                if let Some(r) = refresh
                    && tokio::time::timeout(REFRESH_TIMEOUT, r()).await.is_err()
                {
                    tracing::warn!("the metrics refresh timed out; rendering what is in memory");
                    metrics::counter!("hcp_metrics_refresh_errors_total").increment(1);
                }
                ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render())
            }
        }),
    );
    let task = tokio::spawn(async move {
        // Histograms keep their samples until upkeep drains them: run it
        // whether or not anyone scrapes.
        let upkeep = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                recorder().run_upkeep();
            }
        };
        tokio::select! {
            r = axum::serve(listener, app) => if let Err(e) = r {
                tracing::warn!(error = %e, "the metrics listener failed");
            },
            () = upkeep => {}
        }
    });
    tracing::info!(%addr, "metrics at /metrics");
    Ok((addr, Serving(task)))
}

/// The name of a gRPC status code as metrics label it (`OK`,
/// `InvalidArgument`, ...).
pub fn grpc_code_label(status: Option<&http::HeaderValue>) -> &'static str {
    // No status in the headers: the call's status comes in the trailers,
    // after a response, which tonic sends only for calls that succeeded.
    let code = match status {
        None => tonic::Code::Ok,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from),
    };
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Cancelled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_metrics_render_in_the_text_format_with_buckets() {
        recorder();
        metrics::counter!("hcp_test_things_total", "kind" => "a").increment(2);
        metrics::histogram!("hcp_test_wait_seconds").record(0.003);
        let text = render();
        assert!(text.contains("hcp_test_things_total{kind=\"a\"} 2"), "{text}");
        assert!(text.contains("# TYPE hcp_test_wait_seconds histogram"), "{text}");
        assert!(text.contains("hcp_test_wait_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("hcp_test_wait_seconds_bucket{le=\"0.0025\"} 0"), "{text}");
    }

    #[test]
    fn grpc_codes_have_names() {
        assert_eq!(grpc_code_label(None), "OK");
        assert_eq!(grpc_code_label(Some(&http::HeaderValue::from_static("3"))), "InvalidArgument");
        assert_eq!(grpc_code_label(Some(&http::HeaderValue::from_static("junk"))), "Unknown");
    }
}
