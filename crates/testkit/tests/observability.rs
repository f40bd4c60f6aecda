//! One trace across gateway → relay → ping, exported over OTLP/gRPC to a receiver run here,
//! Cloud Logging trace keys in the JSON logs, and no export at all when none is configured.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::span::SpanKind,
};
use runmesh_proto::ping::v1::{SendRequest, SendStreamRequest};
use runmesh_testkit::{Mesh, Service, authed};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// A span as received, with its service taken from the resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    kind: i32,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        kind: s.kind,
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attributes: attrs(&s.attributes),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut names = self.metrics.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn collector() -> (Collector, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let c = Collector::default();
    let (traces, metrics) = (c.clone(), c.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(traces))
            .add_service(MetricsServiceServer::new(metrics))
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (c, url)
}

fn telemetry_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".to_string()),
        ("GOOGLE_CLOUD_PROJECT", "test-project".to_string()),
    ]
}

fn ping(message: &str) -> SendRequest {
    SendRequest {
        message: message.into(),
        payload: vec![],
    }
}

/// Waits until `n` RPC spans have arrived (health checks are not traced).
async fn wait_spans(c: &Collector, n: usize) -> Vec<Received> {
    let start = Instant::now();
    loop {
        let spans = c.spans.lock().unwrap().clone();
        if spans.len() >= n || start.elapsed() > Duration::from_secs(15) {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_call_is_one_trace_linked_hop_by_hop_with_status_codes() {
    let (collector, endpoint) = collector().await;
    let mesh = Mesh::start_with(&telemetry_env(&endpoint)).await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;

    client.send(authed(ping("unary"), &token)).await.unwrap();
    let stream = SendStreamRequest {
        message: "s".into(),
        count: 3,
        ..Default::default()
    };
    let n = client
        .send_stream(authed(stream, &token))
        .await
        .unwrap()
        .into_inner()
        .count()
        .await;
    assert_eq!(n, 3);
    let pings = futures::stream::iter(vec![ping("a"), ping("b")]);
    client.collect(authed(pings, &token)).await.unwrap();
    let chat = client
        .chat(authed(futures::stream::iter(vec![ping("c")]), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chat.count().await, 1);
    let bad = SendStreamRequest {
        count: -1,
        ..Default::default()
    };
    let err = client.send_stream(authed(bad, &token)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let spans = wait_spans(&collector, 25).await;
    let mut traces: HashMap<String, Vec<Received>> = HashMap::new();
    for s in spans {
        traces.entry(s.trace_id.clone()).or_default().push(s);
    }
    assert_eq!(traces.len(), 5, "one trace per call: {traces:#?}");
    let mut methods = Vec::new();
    for (trace, spans) in &traces {
        let find = |service: &str, kind: SpanKind| {
            let found: Vec<_> = spans
                .iter()
                .filter(|s| s.service == service && s.kind == kind as i32)
                .collect();
            assert_eq!(found.len(), 1, "{service} {kind:?} in {trace}: {spans:#?}");
            found[0].clone()
        };
        let gw_server = find("gateway", SpanKind::Server);
        let gw_client = find("gateway", SpanKind::Client);
        let relay_server = find("relay", SpanKind::Server);
        let relay_client = find("relay", SpanKind::Client);
        let ping_server = find("ping", SpanKind::Server);
        assert_eq!(spans.len(), 5, "{spans:#?}");
        assert_eq!(gw_server.parent, "", "the gateway server span is the root");
        assert_eq!(gw_client.parent, gw_server.span_id);
        assert_eq!(relay_server.parent, gw_client.span_id);
        assert_eq!(relay_client.parent, relay_server.span_id);
        assert_eq!(ping_server.parent, relay_client.span_id);
        for s in spans {
            assert_eq!(s.attributes["rpc.system"], "grpc");
            assert_eq!(s.attributes["rpc.service"], "runmesh.ping.v1.PingService");
            assert!(
                s.name.starts_with("runmesh.ping.v1.PingService/"),
                "{}",
                s.name
            );
        }
        assert_eq!(gw_server.attributes["enduser.id"], runmesh_testkit::USER);
        assert_eq!(
            ping_server.attributes["enduser.id"],
            runmesh_testkit::RELAY_SA
        );
        let method = gw_server.attributes["rpc.method"].clone();
        let code = &gw_server.attributes["rpc.grpc.status_code"];
        methods.push((method, code.clone()));
        for s in spans {
            assert_eq!(&s.attributes["rpc.grpc.status_code"], code, "{s:#?}");
        }
    }
    methods.sort();
    assert_eq!(
        methods,
        [
            ("Chat".to_string(), "0".to_string()),
            ("Collect".into(), "0".into()),
            ("Send".into(), "0".into()),
            ("SendStream".into(), "0".into()),
            ("SendStream".into(), "3".into()),
        ]
    );

    let start = Instant::now();
    let wanted = [
        "rpc.server.duration",
        "rpc.client.duration",
        "rpc.server.active_requests",
    ];
    while start.elapsed() < Duration::from_secs(10) {
        let names = collector.metrics.lock().unwrap().clone();
        if wanted.iter().all(|w| names.iter().any(|n| n == w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("metrics missing: {:?}", collector.metrics.lock().unwrap());
}

fn access_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "rpc finished")
        .collect()
}

#[tokio::test]
async fn a_hop_that_records_no_spans_passes_the_callers_trace_on() {
    let (collector, endpoint) = collector().await;
    let mut env = telemetry_env(&endpoint);
    env.push(("AUTH_MODE", "off".to_string()));
    let ping_service = Service::start("ping", &env).await;
    env.extend([
        ("UPSTREAM_AUTH", "off".to_string()),
        ("UPSTREAM_URL", ping_service.url.clone()),
        // Spans are `info`: this relay records none, yet exports whatever it would record.
        ("RUST_LOG", "warn".to_string()),
    ]);
    let relay = Service::start("relay", &env).await;

    let (trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = Request::new(ping("through a quiet relay"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{caller_span}-01").parse().unwrap(),
    );
    let pong = relay.client().await.send(request).await.unwrap();
    let hops = pong.into_inner().pong.unwrap().hops;
    assert_eq!(hops.len(), 2, "relay and ping answered: {hops:?}");

    let spans = wait_spans(&collector, 1).await;
    let server = spans
        .iter()
        .find(|s| s.service == "ping" && s.kind == SpanKind::Server as i32)
        .unwrap_or_else(|| panic!("ping exported no server span: {spans:#?}"));
    assert_eq!(server.trace_id, trace, "ping joined the caller's trace");
    assert_eq!(
        server.parent, caller_span,
        "the relay added no span between"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay_spans: Vec<_> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.service == "relay")
        .cloned()
        .collect();
    assert!(relay_spans.is_empty(), "{relay_spans:#?}");
}

#[tokio::test]
async fn json_logs_carry_the_trace_id_and_honour_cloud_trace_context() {
    let (collector, endpoint) = collector().await;
    let mesh = Mesh::start_with(&telemetry_env(&endpoint)).await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;

    let mut request = authed(ping("from cloud run"), &token);
    request.metadata_mut().insert(
        "x-cloud-trace-context",
        "105445aa7843bc8bf206b12000100000/1;o=1".parse().unwrap(),
    );
    client.send(request).await.unwrap();
    client.send(authed(ping("plain"), &token)).await.unwrap();

    let spans = wait_spans(&collector, 10).await;
    let cloud = "105445aa7843bc8bf206b12000100000";
    let ping_span = spans
        .iter()
        .find(|s| s.service == "ping" && s.trace_id == cloud)
        .expect("the Cloud Run trace id reached ping's exported span");
    assert_eq!(ping_span.attributes["rpc.method"], "Send");

    tokio::time::sleep(Duration::from_millis(200)).await;
    for service in [&mesh.gateway, &mesh.relay, &mesh.ping] {
        let lines = access_lines(&service.proc.lines());
        assert_eq!(lines.len(), 2, "{}: {lines:#?}", service.proc.name);
        for line in &lines {
            assert_eq!(line["severity"], "INFO");
            assert_eq!(line["grpc.status"], "OK");
            assert!(line["duration_ms"].as_f64().is_some());
            let trace = line["logging.googleapis.com/trace"].as_str().unwrap();
            let id = trace
                .strip_prefix("projects/test-project/traces/")
                .unwrap_or_else(|| panic!("{trace}"));
            assert!(
                spans
                    .iter()
                    .any(|s| s.trace_id == id && s.service == service.proc.name),
                "{} logged trace {id} that it did not export",
                service.proc.name
            );
            assert!(line["logging.googleapis.com/spanId"].is_string());
        }
        assert!(
            lines.iter().any(|l| l["logging.googleapis.com/trace"]
                == format!("projects/test-project/traces/{cloud}")),
            "{}: x-cloud-trace-context not used",
            service.proc.name
        );
    }
    let gateway_lines = access_lines(&mesh.gateway.proc.lines());
    assert_eq!(gateway_lines[0]["enduser.id"], runmesh_testkit::USER);
}

#[tokio::test]
async fn with_no_otlp_endpoint_nothing_is_exported_anywhere() {
    // The OTLP default endpoint: an exporter built without configuration would send here.
    let Ok(default) = std::net::TcpListener::bind("127.0.0.1:4317") else {
        panic!("port 4317 is taken; this test needs it to watch the OTLP default endpoint");
    };
    default.set_nonblocking(true).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                if default.accept().is_ok() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mesh = Mesh::start_with(&[
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100".to_string()),
    ])
    .await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;
    for i in 0..5 {
        client
            .send(authed(ping(&format!("{i}")), &token))
            .await
            .unwrap();
    }
    let lines = access_lines(&mesh.gateway.proc.lines());
    assert_eq!(lines.len(), 5, "calls were served and logged");
    assert!(
        lines[0]["logging.googleapis.com/trace"].is_string(),
        "ids exist without export"
    );
    watcher.join().unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "something connected to the OTLP default"
    );
}
