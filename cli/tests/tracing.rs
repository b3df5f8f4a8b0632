//! One trace across the processes: a tenant's REST request with its own
//! W3C `traceparent` goes through the gateway, core's API, the job in the
//! worker and the call into the provider process; every process exports
//! its spans over OTLP (OpenTelemetry's `OTEL_EXPORTER_OTLP_ENDPOINT`, no
//! per-process setting) to an OTLP trace receiver served from
//! OpenTelemetry's own protocol definitions (`opentelemetry-proto`), and
//! the spans arrive as one trace, each parented on a span of it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcp_testkit::stack::{StackOptions, TestStack};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";

/// A span as received: its service, name, ids (hex) and parent.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace: hex(&span.trace_id),
                        id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_goes_from_the_gateway_through_core_and_the_worker_into_the_provider() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let opts = StackOptions {
        env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), format!("http://{addr}"))],
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");

    // The tenant's own trace context: its span is the root of the trace.
    let trace = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let client_span = "00f067aa0ba902b7";
    let t = s.tenant_token("acme", &["demo"]);
    let body = json!({"name": "traced", "flavor": "small", "image": "debian-12"}).to_string();
    let traceparent = format!("00-{trace}-{client_span}-01");
    let r = s
        .rest
        .raw_with(
            "POST",
            VMS,
            Some(&t),
            Some(&body),
            &[("traceparent", &traceparent), ("content-type", "application/json")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.str("job_id");
    let j: Value = s.rest.finished_job(&t, &job, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j["status"], "SUCCEEDED", "{j}");

    // Spans are exported in batches (every 5 s by default).
    let services = ["hcp-gateway", "hcp-core", "hcp-provider-sim"];
    let spans =
        hcp_testkit::wait_until(Duration::from_secs(30), "every process's spans of the trace", || async {
            let spans: Vec<Received> =
                receiver.0.lock().unwrap().iter().filter(|s| s.trace == trace).cloned().collect();
            let provider_call = spans.iter().any(|s| s.service == "hcp-provider-sim");
            let all = services.iter().all(|svc| spans.iter().any(|s| s.service == *svc));
            Ok((all && provider_call).then_some(spans))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; received: {:#?}", receiver.0.lock().unwrap()));

    // Every span's parent is a span of the trace, or the tenant's own.
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    for span in &spans {
        assert!(
            span.parent == client_span || by_id.contains_key(span.parent.as_str()),
            "{span:?} has a parent outside the trace: {spans:#?}"
        );
    }
    // The provider's span descends, process by process, from the gateway's.
    let provider = spans.iter().find(|s| s.service == "hcp-provider-sim").unwrap();
    let mut chain = vec![provider.service.clone()];
    let mut at = provider;
    while let Some(parent) = by_id.get(at.parent.as_str()) {
        if chain.last() != Some(&parent.service) {
            chain.push(parent.service.clone());
        }
        at = parent;
    }
    assert_eq!(at.parent, client_span, "the chain ends at the tenant's span: {spans:#?}");
    assert_eq!(chain, ["hcp-provider-sim", "hcp-core", "hcp-gateway"], "{spans:#?}");
    // Inside core, the provider call descends from the worker's job span,
    // which descends from the API call that accepted it.
    let mut names = Vec::new();
    let mut at = provider;
    while let Some(parent) = by_id.get(at.parent.as_str()) {
        names.push(format!("{}:{}", parent.service, parent.name));
        at = parent;
    }
    let job =
        names.iter().position(|n| n == "hcp-core:job").unwrap_or_else(|| panic!("no job span in {names:?}"));
    let api =
        names.iter().position(|n| n == "hcp-core:grpc").unwrap_or_else(|| panic!("no API span in {names:?}"));
    assert!(job < api, "the job runs under the API call's trace: {names:?}");
    drop(s);
    server.abort();
}
