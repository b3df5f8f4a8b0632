//! Tracing for every HCP process: one subscriber set-up (text or JSON logs,
//! an OpenTelemetry layer so every span has a W3C trace id, OTLP export when
//! an endpoint is configured) and the helpers that carry the trace context
//! across process boundaries in gRPC metadata and HTTP headers.
//!
//! One trace follows a request from the gateway to core, into the job that
//! core stores, to the worker that runs it and the provider call it makes.
//! Nothing is exported unless `otlp_endpoint` is set.
//!
//! [`metrics`] is the other half of observability: Prometheus metrics and
//! their `/metrics` listener.

pub mod metrics;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The W3C trace-context header (and gRPC metadata key).
pub const TRACEPARENT: &str = "traceparent";

/// OpenTelemetry's environment variable for the OTLP endpoint.
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How a process logs and traces. Part of every process's config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `tracing` filter directives; `RUST_LOG` wins when set. Default `info`.
    pub log_filter: Option<String>,
    /// Log one JSON object per line instead of text.
    pub json_logs: bool,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. When unset,
    /// OpenTelemetry's standard `OTEL_EXPORTER_OTLP_ENDPOINT` is used, so
    /// every process (providers included) exports without code; nothing is
    /// exported when neither is set.
    pub otlp_endpoint: Option<String>,
}

/// Failed to set up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter did not parse.
    #[error("invalid log filter {filter:?}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// Why it did not parse.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// The exporter's error.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps the tracer provider alive; flushes spans when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Shutdown blocks on the export of pending spans; it is bounded by
        // the exporter's own timeout.
        let _ = self.provider.shutdown();
    }
}

/// Installs the global subscriber and propagator for `service`. Call once,
/// inside the tokio runtime, at the start of `main`.
pub fn init(service: &str, config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let endpoint = config
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var(ENV_OTLP_ENDPOINT).ok().filter(|e| !e.is_empty()));
    if let Some(endpoint) = &endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|source| TelemetryError::Exporter { endpoint: endpoint.clone(), source })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer("hcp");

    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => config.log_filter.clone().unwrap_or_else(|| "info".to_owned()),
    };
    let filter = EnvFilter::try_new(&filter)
        .map_err(|source| TelemetryError::Filter { filter: filter.clone(), source })?;
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // `try_init` fails only when a subscriber is already set (tests that
    // start several servers in one process); the first one stays.
    if config.json_logs {
        let fmt = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr);
        let _ = registry.with(fmt).try_init();
    } else {
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let _ = registry.with(fmt).try_init();
    }
    Ok(TelemetryGuard { provider })
}

/// Returns the trace id of the current span as 32 lowercase hex digits, or
/// `None` when there is no valid trace (telemetry not initialised).
pub fn current_trace_id() -> Option<String> {
    trace_id_of(&tracing::Span::current())
}

/// Returns the trace id of `span`.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Returns the `traceparent` value for the current span, to store with a job
/// or send to another process.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes the trace described by `traceparent` the parent of `span`. An absent
/// or malformed value leaves `span` as the root of a new trace.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let mut carrier = std::collections::HashMap::new();
        carrier.insert(TRACEPARENT.to_owned(), tp.to_owned());
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}

/// Makes the trace context carried by `headers` the parent of `span`.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's trace context into outgoing HTTP headers (and
/// so into gRPC metadata, which travels as HTTP/2 headers).
pub fn inject_headers(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Writes the current span's trace context into a tonic request.
pub fn inject_request<T>(request: &mut tonic::Request<T>) {
    if let Some(tp) = current_traceparent()
        && let Ok(value) = tp.parse()
    {
        request.metadata_mut().insert(TRACEPARENT, value);
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// Resolves on SIGTERM or ctrl-c: the shutdown trigger of every HCP binary.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Prints the readiness line on stdout: one JSON object
/// `{"hcp_ready":{"service":..,"addr":..}}`. Supervisors and tests read it to
/// learn the bound address when the process was given port 0.
pub fn announce_ready(service: &str, addr: impl std::fmt::Display) {
    announce_ready_with(service, addr, &[]);
}

/// [`announce_ready`] with more addresses beside `addr` (e.g. the
/// gateway's `rdp_addr`), each a string field of the same object.
#[allow(clippy::print_stdout)]
pub fn announce_ready_with(service: &str, addr: impl std::fmt::Display, more: &[(&str, String)]) {
    use std::io::Write;
    let mut line = format!("{{\"hcp_ready\":{{\"service\":{service:?},\"addr\":\"{addr}\"");
    for (key, value) in more {
        line.push_str(&format!(",{key:?}:{value:?}"));
    }
    line.push_str("}}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A tower layer for gRPC servers: one span per call, named after the
/// server's role, parented on the caller's W3C trace context and carrying
/// `method` and `trace_id` for every log line beneath it; and per call
/// `hcp_grpc_server_requests_total{role,method,code}` and
/// `hcp_grpc_server_request_duration_seconds{role,method}` (to the response
/// headers, for streams). Methods the layer was not told of
/// ([`GrpcTraceLayer::with_methods`]) are labelled `other`, so a client
/// cannot make up label values.
#[derive(Clone, Copy, Debug)]
pub struct GrpcTraceLayer {
    role: &'static str,
    known: fn(&str) -> Option<&'static str>,
}

impl GrpcTraceLayer {
    /// Creates the layer; `role` appears as the span's `role` field and the
    /// metrics' `role` label.
    pub fn new(role: &'static str) -> Self {
        Self { role, known: |_| None }
    }

    /// Labels calls whose path `known` accepts by the label it gives (a
    /// static string: no allocation per call).
    pub fn with_methods(self, known: fn(&str) -> Option<&'static str>) -> Self {
        Self { known, ..self }
    }
}

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraceService { inner, role: self.role, known: self.known }
    }
}

/// The service of [`GrpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct GrpcTraceService<S> {
    inner: S,
    role: &'static str,
    known: fn(&str) -> Option<&'static str>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcTraceService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let path = req.uri().path();
        let method = (self.known)(path).unwrap_or("other");
        let span = tracing::info_span!(
            "grpc",
            role = self.role,
            method = %path,
            trace_id = tracing::field::Empty,
        );
        set_parent_from_headers(&span, req.headers());
        if let Some(t) = trace_id_of(&span) {
            span.record("trace_id", t);
        }
        // Interceptors run inside `call`, so the span is entered for it too.
        let fut = span.in_scope(|| self.inner.call(req)).instrument(span);
        let role = self.role;
        let started = std::time::Instant::now();
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(resp) => metrics::grpc_code_label(resp.headers().get("grpc-status")),
                Err(_) => "transport",
            };
            ::metrics::counter!("hcp_grpc_server_requests_total", "role" => role, "method" => method, "code" => code)
                .increment(1);
            ::metrics::histogram!("hcp_grpc_server_request_duration_seconds", "role" => role, "method" => method)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// A process's exit: success, or its error printed with every cause on
/// stderr (`error: core failed: cannot listen on ...: address in use`) and
/// exit status 1. The thin `main` of each HCP binary ends with this.
pub fn exit_with<E: std::error::Error>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its sources, joined by `: `.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
