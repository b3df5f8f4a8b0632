//! HCP gateway: the HTTP edge in front of core. It holds no state.
//!
//! - REST: every northbound RPC is reachable at the path its
//!   `google.api.http` annotation names; requests are transcoded to gRPC
//!   calls on core ([`transcode`]) with the caller's `authorization` header,
//!   a W3C `traceparent` for the gateway's span, and `idempotency-key`
//!   forwarded as metadata. Errors come back as
//!   `{"code","message","details","trace_id"}` with the HTTP status of the
//!   code (the one mapping in `hcp_proto::error`).
//! - gRPC-web: browser clients call `/hcp.<pkg>.<Service>/<Method>`;
//!   tonic-web turns the call into gRPC and it is proxied to core as is.
//! - Consoles: `/console/vnc?token=…` is the websocket console proxy and
//!   `/console/vnc.html?token=…` the noVNC page (`spice` and `serial` the
//!   same with their pages); `/console/rdp?token=…`
//!   carries RDP, and `--console-rdp-listen` a relay for native RDP clients
//!   ([`console`]).
//! - `GET /healthz` for load balancers.
//!
//! The gateway checks no tokens itself: core is the one place that does.
//! Only the transport bounds ([`MAX_PATH`], [`MAX_QUERY`], [`MAX_HEADERS`],
//! [`MAX_AUTHORIZATION`], [`MAX_BODY`]) are answered before the caller is
//! known; every other refusal of the gateway's own (no route, another
//! method, a request that does not transcode) is answered only after core
//! said who the caller is (`hcp.common.v1.CallerService/GetCaller`), so a
//! caller without valid credentials gets 401 first.

pub mod cli;
pub mod console;
pub mod edge;
pub mod openapi;
pub mod routes;
pub mod transcode;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hcp_proto::error::ApiError;
use http_body_util::BodyExt;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::routes::Route;
use crate::transcode::BytesCodec;

/// Headers copied from the REST request to gRPC metadata.
const FORWARDED_HEADERS: &[&str] = &["authorization", "idempotency-key", "x-request-id"];

/// Largest request body accepted, bytes (413 beyond).
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest request path, bytes (414 beyond).
pub const MAX_PATH: usize = 2048;
/// Longest query string, bytes (414 beyond).
pub const MAX_QUERY: usize = 4096;
/// Largest `authorization` header, bytes (401 beyond: no token is that long).
pub const MAX_AUTHORIZATION: usize = 8192;
/// Longest `idempotency-key` or `x-request-id` header, bytes (400 beyond,
/// after authentication: core checks the idempotency key, the gateway the
/// request id); the one limit `hcp_proto::rules` states.
pub use hcp_proto::rules::MAX_KEY_HEADER;
/// The call that tells who the caller is, asked before the gateway refuses
/// a request on its own.
const CALLER_PATH: &str = "/hcp.common.v1.CallerService/GetCaller";
/// Largest sum of all header names and values, bytes (431 beyond).
pub const MAX_HEADERS: usize = 16 * 1024;

/// Gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address; port 0 picks one.
    pub listen: SocketAddr,
    /// Core's gRPC endpoint, e.g. `http://127.0.0.1:50051`.
    pub core_endpoint: String,
    /// Deadline for one call to core (504 past it).
    pub timeout: Duration,
    /// Requests handled at once; past it, 503 with `Retry-After`.
    pub max_concurrent_requests: NonZeroUsize,
    /// HTTP/2 connections to core, calls spread over them in turn.
    pub core_connections: NonZeroUsize,
    /// The console proxy.
    pub console: console::ConsoleConfig,
    /// Where `/metrics` (Prometheus) is served, on a listener of its own
    /// (never the tenants' port); none without it.
    pub metrics_listen: Option<SocketAddr>,
}

/// The gateway failed to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The descriptors do not give a usable route table.
    #[error("cannot build routes")]
    Routes(#[source] routes::RouteError),
    /// The core endpoint is not a valid URI.
    #[error("invalid core endpoint {0:?}")]
    Endpoint(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener could not start.
    #[error(transparent)]
    Metrics(#[from] hcp_telemetry::metrics::MetricsListenError),
    /// The server failed.
    #[error("http server failed")]
    Serve(#[source] std::io::Error),
}

struct Gateway {
    routes: Vec<Route>,
    core: Cores,
}

impl Gateway {
    /// The answer to a request the gateway refuses on its own (`err`: no
    /// route, another method, a malformed request): core is asked who the
    /// caller is first, and a caller it does not authenticate gets core's
    /// 401 instead, so no rule but the transport bounds is applied to a
    /// caller who has not authenticated. Any other failure of that call
    /// (core down, rate limited) leaves `err` the answer: the request is
    /// refused either way.
    async fn refusal(&self, headers: &http::HeaderMap, err: ApiError) -> ApiError {
        let mut request = tonic::Request::new(Bytes::new());
        if let Some(v) = headers.get(http::header::AUTHORIZATION)
            && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
        {
            request.metadata_mut().insert("authorization", v);
        }
        hcp_telemetry::inject_request(&mut request);
        let mut client = tonic::client::Grpc::new(self.core.pick());
        if let Err(e) = client.ready().await {
            tracing::warn!(error = %e, refusal = %err, "core is unavailable; refusing without knowing the caller");
            return err;
        }
        let path = http::uri::PathAndQuery::from_static(CALLER_PATH);
        match client.unary(request, path, BytesCodec).await {
            Ok(_) => err,
            Err(status) => {
                let answer = ApiError::from_status(&status);
                if answer.code == hcp_proto::error::ErrorCode::Unauthenticated {
                    return answer;
                }
                tracing::warn!(error = %answer, refusal = %err, "cannot learn the caller; refusing as is");
                err
            }
        }
    }
}

/// The connections to core. HTTP/2 multiplexes every call on one
/// connection, but one connection is one task framing all of them (the
/// gateway's profile under load showed it); calls take the connections in
/// turn.
#[derive(Clone)]
struct Cores {
    channels: Arc<[Channel]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Cores {
    /// `n` connections to `endpoint`, each made when first used and remade
    /// when lost, so the gateway starts (and answers 503) while core is
    /// down.
    fn lazy(endpoint: &Endpoint, n: NonZeroUsize) -> Self {
        let channels: Vec<Channel> = (0..n.get()).map(|_| endpoint.connect_lazy()).collect();
        Self { channels: channels.into(), next: Arc::default() }
    }

    fn pick(&self) -> Channel {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
}

/// Where a running gateway listens.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// REST, gRPC-web and the websocket consoles.
    pub http: SocketAddr,
    /// The RDP relay, when configured.
    pub rdp: Option<SocketAddr>,
    /// `/metrics`, when configured.
    pub metrics: Option<SocketAddr>,
}

/// The OpenAPI document of the REST API this build serves, as the gateway
/// serves it at `/api/hcp/openapi.json` (pretty-printed, ending in a
/// newline).
pub fn openapi_json() -> Result<String, routes::RouteError> {
    let (_pool, routes) = routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES)?;
    let mut text = serde_json::to_string_pretty(&openapi::document(&routes)).unwrap_or_default();
    text.push('\n');
    Ok(text)
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(Listening) + Send,
) -> Result<(), StartError> {
    let (_pool, routes) = routes::build(hcp_proto::FILE_DESCRIPTOR_SET, hcp_proto::NORTHBOUND_SERVICES)
        .map_err(StartError::Routes)?;
    let endpoint = Endpoint::from_shared(config.core_endpoint.clone())
        .map_err(|_| StartError::Endpoint(config.core_endpoint.clone()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(config.timeout);
    let core = Cores::lazy(&endpoint, config.core_connections);
    let openapi = {
        let mut text = serde_json::to_string_pretty(&openapi::document(&routes)).unwrap_or_default();
        text.push('\n');
        bytes::Bytes::from(text)
    };
    let state = Arc::new(Gateway { routes, core: core.clone() });

    let grpc_web = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebLayer::new())
        .service(GrpcProxy { core: core.clone() });
    let consoles = console::Console::new(config.console.clone(), core.pick());
    let console_routes = axum::Router::new()
        .route("/console/novnc/{*path}", axum::routing::get(console::novnc))
        .route("/console/modules/{*path}", axum::routing::get(console::modules))
        .route("/console/spice-html5/{*path}", axum::routing::get(console::spice_html5))
        .route("/console/{name}", axum::routing::get(console::entry))
        .with_state(consoles.clone());
    // Both are open to anyone (no token), so another method is refused at
    // once: 405 with `Allow`, and the error body.
    let get_only = |method: http::Method, uri: http::Uri| async move {
        error_response(&routes::method_not_allowed(&method, uri.path(), &["GET", "HEAD"]))
    };
    let mut app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }).fallback(get_only))
        .route(
            "/api/hcp/openapi.json",
            axum::routing::get(move || {
                let body = openapi.clone();
                async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
            })
            .fallback(get_only),
        );
    for service in hcp_proto::NORTHBOUND_SERVICES {
        app = app.route_service(&format!("/{service}/{{method}}"), grpc_web.clone());
    }
    let app = app.fallback(rest).with_state(state).merge(console_routes);
    // Read top to bottom: the first layer sees a request first.
    let app = app.layer(
        tower::ServiceBuilder::new()
            // 1. Turn a shed request into the error body (503, Retry-After).
            .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
            // 2. Refuse at once when no slot is free, rather than queue.
            .layer(tower::load_shed::LoadShedLayer::new())
            // 3. At most this many requests at once.
            .layer(tower::limit::ConcurrencyLimitLayer::new(config.max_concurrent_requests.get())),
    );

    let rdp = match config.console.rdp_listen {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| StartError::Bind { addr: at, source })?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: at, source })?;
            Some((addr, listener))
        }
        None => None,
    };
    let (metrics, _metrics_task) = match config.metrics_listen {
        Some(at) => {
            let (addr, serving) = hcp_telemetry::metrics::serve(at, None).await?;
            (Some(addr), Some(serving))
        }
        None => (None, None),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    ready(Listening { http: addr, rdp: rdp.as_ref().map(|(a, _)| *a), metrics });
    tracing::info!(%addr, rdp = ?rdp.as_ref().map(|(a, _)| a), core = %config.core_endpoint, "gateway listening");
    // The relay lives as long as the HTTP server.
    let _relay = rdp.map(|(_, l)| AbortOnDrop(tokio::spawn(console::rdp::serve(l, consoles))));
    let listener = edge::EdgeListener::new(listener);
    // Connection info: the console proxy stores the client's address with
    // a SPICE session, whose further channels must come from it.
    axum::serve(listener, app.into_make_service_with_connect_info::<console::Peer>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(StartError::Serve)
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The REST fallback: finds the route and transcodes.
async fn rest(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let span = tracing::info_span!(
        "rest",
        method = %req.method(),
        path = %req.uri().path(),
        trace_id = tracing::field::Empty,
    );
    hcp_telemetry::set_parent_from_headers(&span, req.headers());
    if let Some(t) = hcp_telemetry::trace_id_of(&span) {
        span.record("trace_id", t);
    }
    let method = match *req.method() {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let mut route = "unmatched";
    let resp = async {
        match handle(&gw, req, &mut route).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        }
    }
    .instrument(span)
    .await;
    // Streams (the SSE job watch) count to their headers.
    let status = status_label(resp.status());
    metrics::counter!("hcp_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("hcp_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// An HTTP status as a metric label: a static string (no allocation per
/// request); the strings for 100..=999 are made once.
fn status_label(status: http::StatusCode) -> &'static str {
    static LABELS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let labels =
        LABELS.get_or_init(|| (100..1000u16).map(|c| &*Box::leak(c.to_string().into_boxed_str())).collect());
    labels.get(usize::from(status.as_u16()).saturating_sub(100)).copied().unwrap_or("other")
}

/// The answer to a request shed at the concurrency limit.
async fn overloaded(err: tower::BoxError) -> Response {
    tracing::warn!(error = %err, "gateway at its concurrency limit; shedding a request");
    error_response(
        &ApiError::new(hcp_proto::error::ErrorCode::Unavailable, "the gateway is overloaded; retry later")
            .with_detail("retry_after_seconds", "1"),
    )
}

fn error_response(err: &ApiError) -> Response {
    let (status, body) = transcode::error_body(err, hcp_telemetry::current_trace_id());
    let mut resp = (status, [(http::header::CONTENT_TYPE, "application/json")], body).into_response();
    // 503 and 429 say when to come back (RFC 9110 10.2.3).
    use hcp_proto::error::ErrorCode;
    if matches!(err.code, ErrorCode::Unavailable | ErrorCode::ProviderUnavailable | ErrorCode::RateLimited) {
        let secs = err.details.get("retry_after_seconds").and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
        resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    if err.code == ErrorCode::MethodNotAllowed
        && let Some(allow) = err.details.get(hcp_proto::error::DETAIL_ALLOW)
        && let Ok(allow) = http::HeaderValue::from_str(allow)
    {
        resp.headers_mut().insert(http::header::ALLOW, allow);
    }
    if err.code == hcp_proto::error::ErrorCode::PayloadTooLarge {
        // The rest of the body was never read: the connection cannot carry
        // another request, and the client must not reuse it.
        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    resp
}

/// Checks the request's size before anything else reads it (the transport
/// bounds, the only refusals made before the caller is known): every limit
/// here is lower than what the HTTP server itself refuses (hyper answers a
/// path over 64 KiB with a bare 414, which [`edge`] gives the error body),
/// and lower than what core's HTTP/2 server accepts in headers, so a
/// request either fails here with an error naming the part, or reaches core
/// in a shape that cannot break the connection other tenants' requests share.
fn check_limits(parts: &http::request::Parts) -> Result<(), ApiError> {
    use hcp_proto::error::ErrorCode;
    let path = parts.uri.path();
    if path.len() > MAX_PATH {
        return Err(ApiError::new(
            ErrorCode::UriTooLong,
            format!("the path is {} bytes; at most {MAX_PATH} are allowed", path.len()),
        )
        .with_detail("field", "path"));
    }
    if let Some(q) = parts.uri.query()
        && q.len() > MAX_QUERY
    {
        return Err(ApiError::new(
            ErrorCode::UriTooLong,
            format!("the query is {} bytes; at most {MAX_QUERY} are allowed", q.len()),
        )
        .with_detail("field", "query"));
    }
    if let Some(v) = parts.headers.get(http::header::AUTHORIZATION)
        && v.len() > MAX_AUTHORIZATION
    {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            format!("the authorization header is {} bytes; no valid token is that long", v.len()),
        )
        .with_detail("field", "authorization"));
    }
    let total: usize = parts.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if total > MAX_HEADERS {
        return Err(ApiError::new(
            ErrorCode::HeadersTooLarge,
            format!("the headers are {total} bytes; at most {MAX_HEADERS} are allowed"),
        ));
    }
    Ok(())
}

/// Checks `x-request-id`: 1 to [`MAX_KEY_HEADER`] visible ASCII characters,
/// as core keeps it with a job. (`idempotency-key` is core's to check.)
fn check_request_id(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get("x-request-id") else { return Ok(()) };
    if !hcp_proto::rules::key_header_ok(v.as_bytes()) {
        return Err(hcp_proto::rules::violation(
            "X-Request-Id",
            hcp_proto::rules::key_header_keyword(v.as_bytes()),
            format!(
                "X-Request-Id must be 1 to {MAX_KEY_HEADER} visible ASCII characters; it is {} bytes",
                v.len()
            ),
        ));
    }
    Ok(())
}

async fn handle(gw: &Gateway, req: Request, matched: &mut &'static str) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    check_limits(&parts)?;
    let (route, vars) = match routes::find(&gw.routes, &parts.method, parts.uri.path()) {
        Ok(found) => found,
        Err(e) => return Err(gw.refusal(&parts.headers, e).await),
    };
    *matched = route.label;
    let body = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                hcp_proto::error::ErrorCode::PayloadTooLarge,
                format!("the body is larger than {MAX_BODY} bytes"),
            )
            .with_detail("field", "body")
        })?
        .to_bytes();
    let input = match check_request_id(&parts.headers)
        .and_then(|()| transcode::request_message(route, vars, parts.uri.query(), &body))
    {
        Ok(input) => input,
        Err(e) => return Err(gw.refusal(&parts.headers, e).await),
    };

    let mut request = tonic::Request::new(Bytes::from(prost::Message::encode_to_vec(&input)));
    for name in FORWARDED_HEADERS {
        if let Some(v) = parts.headers.get(*name)
            && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
        {
            request.metadata_mut().insert(*name, v);
        }
    }
    hcp_telemetry::inject_request(&mut request);
    let mut client = tonic::client::Grpc::new(gw.core.pick());
    client.ready().await.map_err(|e| {
        tracing::warn!(error = %e, "core is unavailable");
        ApiError::new(hcp_proto::error::ErrorCode::Unavailable, "core is unavailable; retry later")
    })?;
    let grpc_path =
        http::uri::PathAndQuery::try_from(route.grpc_path.as_str()).map_err(|_| ApiError::internal())?;
    if route.server_streaming {
        return stream_events(client, request, grpc_path, route.output.clone()).await;
    }
    let reply = client
        .unary(request, grpc_path, BytesCodec)
        .await
        .map_err(|status| ApiError::from_status(&status))?
        .into_inner();
    let message = prost_reflect::DynamicMessage::decode(route.output.clone(), reply).map_err(|e| {
        tracing::error!(error = %e, "core sent an undecodable reply");
        ApiError::internal()
    })?;
    if let Some(rows) = route.csv_rows.as_deref()
        && transcode::wants_csv(&parts.headers)
    {
        let csv = transcode::response_csv(&message, rows)?;
        return Ok((route.success_status, [(http::header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv)
            .into_response());
    }
    let json = transcode::response_json(&message)?;
    Ok((route.success_status, [(http::header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// Serves a server-streaming RPC as server-sent events: each reply is an
/// event `message` with the JSON message as data; a failure mid-stream is
/// an event `error` with the usual error body, and ends the stream.
async fn stream_events(
    mut client: tonic::client::Grpc<Channel>,
    request: tonic::Request<Bytes>,
    path: http::uri::PathAndQuery,
    output: prost_reflect::MessageDescriptor,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    // An error before the first message (not found, unauthenticated) is an
    // ordinary error response.
    let stream = client
        .server_streaming(request, path, BytesCodec)
        .await
        .map_err(|status| ApiError::from_status(&status))?
        .into_inner();
    let trace = hcp_telemetry::current_trace_id();
    let events = stream
        .map(move |item| {
            let event = match item {
                Ok(bytes) => match prost_reflect::DynamicMessage::decode(output.clone(), bytes)
                    .map_err(|_| ApiError::internal())
                    .and_then(|m| transcode::response_json(&m))
                {
                    Ok(json) => Event::default().event("message").data(String::from_utf8_lossy(&json)),
                    Err(e) => error_event(&e, trace.clone()),
                },
                Err(status) => error_event(&ApiError::from_status(&status), trace.clone()),
            };
            Ok::<_, std::convert::Infallible>(event)
        })
        .boxed();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

fn error_event(err: &ApiError, trace: Option<String>) -> axum::response::sse::Event {
    let (_, body) = transcode::error_body(err, trace);
    axum::response::sse::Event::default().event("error").data(String::from_utf8_lossy(&body))
}

/// Forwards gRPC calls (already converted from gRPC-web) to core.
#[derive(Clone)]
struct GrpcProxy {
    core: Cores,
}

impl tower::Service<http::Request<tonic::body::Body>> for GrpcProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let mut core = self.core.pick();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            hcp_telemetry::inject_headers(&mut parts.headers);
            // Re-target the request at core's authority.
            let req = http::Request::from_parts(parts, body);
            use tower::ServiceExt;
            match core.ready().await {
                Ok(ready) => match ready.call(req).await {
                    Ok(resp) => Ok(resp.map(tonic::body::Body::new)),
                    Err(e) => Ok(grpc_unavailable(&e.to_string())),
                },
                Err(e) => Ok(grpc_unavailable(&e.to_string())),
            }
        })
    }
}

fn grpc_unavailable(why: &str) -> http::Response<tonic::body::Body> {
    tonic::Status::unavailable(format!("core is unavailable: {why}")).into_http()
}
