//! A span, an access-log line and RPC metrics for every call, named per OpenTelemetry's RPC
//! semantic conventions (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`).
//!
//! The server half is a tower layer that sees every call, including those the auth layer
//! refuses; the client half ([`ClientCall`]) wraps a call to the next hop and injects its W3C
//! `traceparent`, so one trace runs gateway server → gateway client → relay server → … → ping.

use std::{
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use futures::{Stream, future::BoxFuture};
use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame};
use opentelemetry::{
    KeyValue,
    metrics::{Histogram, UpDownCounter},
    propagation::{Extractor, Injector},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use pin_project_lite::pin_project;
use tonic::{Code, Status, metadata::MetadataMap, transport::server::TcpConnectInfo};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::status::code_name;

struct Instruments {
    server_duration: Histogram<f64>,
    client_duration: Histogram<f64>,
    in_flight: UpDownCounter<i64>,
}

static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();

/// Header names read on every call, built once rather than parsed from a `&str` each time.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const X_CLOUD_TRACE_CONTEXT: HeaderName = HeaderName::from_static("x-cloud-trace-context");
/// W3C trace context, passed on as it came by a hop that records no span of its own.
const TRACE_CONTEXT: [HeaderName; 2] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Starts recording RPC metrics into the global meter provider; telemetry calls it once metrics
/// are exported. Until then calls build no metric attributes at all: recording into the no-op
/// provider cost a few allocations per call for nothing.
pub fn enable_metrics() {
    INSTRUMENTS.get_or_init(|| {
        let meter = opentelemetry::global::meter("runmesh");
        Instruments {
            server_duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("ms")
                .with_description("Duration of inbound RPCs")
                .build(),
            client_duration: meter
                .f64_histogram("rpc.client.duration")
                .with_unit("ms")
                .with_description("Duration of outbound RPCs")
                .build(),
            in_flight: meter
                .i64_up_down_counter("rpc.server.active_requests")
                .with_description("Inbound RPCs in flight")
                .build(),
        }
    });
}

/// The RPC instruments, once metrics are exported.
fn instruments() -> Option<&'static Instruments> {
    INSTRUMENTS.get()
}

/// The metric attributes of a call to `service`/`method`.
fn rpc_attributes(service: &str, method: &str) -> [KeyValue; 3] {
    [
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_string()),
        KeyValue::new("rpc.method", method.to_string()),
    ]
}

/// Records `ms` with `attributes` and the status code into `histogram`.
fn record_duration(histogram: &Histogram<f64>, ms: f64, attributes: &[KeyValue; 3], code: i32) {
    let mut attrs = attributes.to_vec();
    attrs.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
    histogram.record(ms, &attrs);
}

/// Server-side codes OpenTelemetry counts as errors of the server (the others are the caller's).
fn server_error(code: i32) -> bool {
    matches!(
        Code::from_i32(code),
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Parses Cloud Run's `x-cloud-trace-context: TRACE_ID/SPAN_ID;o=OPTIONS` (span id in decimal).
pub fn parse_cloud_trace_context(value: &str) -> Option<SpanContext> {
    let (trace, rest) = value.split_once('/')?;
    let trace_id = TraceId::from_hex(trace).ok()?;
    let (span, options) = rest.split_once(';').unwrap_or((rest, ""));
    let span_id = SpanId::from_bytes(span.parse::<u64>().ok()?.to_be_bytes());
    let sampled = options.trim() == "o=1";
    let context = SpanContext::new(
        trace_id,
        span_id,
        if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// The caller's trace context: W3C `traceparent`, else Cloud Run's `x-cloud-trace-context`.
pub fn extract_parent(headers: &HeaderMap) -> opentelemetry::Context {
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if cx.span().span_context().is_valid() {
        return cx;
    }
    headers
        .get(&X_CLOUD_TRACE_CONTEXT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_cloud_trace_context)
        .map(|sc| opentelemetry::Context::new().with_remote_span_context(sc))
        .unwrap_or(cx)
}

/// Records the span's OpenTelemetry ids as fields, so log lines inside it carry them.
fn record_ids(span: &Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record(crate::telemetry::TRACE_ID_FIELD, sc.trace_id().to_string());
        span.record(crate::telemetry::SPAN_ID_FIELD, sc.span_id().to_string());
        span.record(crate::telemetry::SAMPLED_FIELD, sc.is_sampled());
    }
}

/// Splits `/pkg.Service/Method` into its service and method.
fn rpc_names(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The caller's address as logged: empty when the transport gave none.
struct Peer(Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// Counts gRPC messages in a byte stream by their 5-byte length prefixes.
#[derive(Debug, Default)]
struct MessageCounter {
    header: [u8; 5],
    header_len: usize,
    body_left: u64,
}

impl MessageCounter {
    /// Messages that started in `data`.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len() as u64) as usize;
                self.body_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                started += 1;
                self.header_len = 0;
                let len = [
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ];
                self.body_left = u64::from(u32::from_be_bytes(len));
            }
        }
        started
    }
}

/// Adds [`RpcTrace`] to a server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// Traces, logs and measures every call but health checks and reflection.
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

/// The end of one inbound call: status, duration, counts, and the access-log line.
struct ServerCall {
    span: Span,
    start: Instant,
    /// `None` while metrics are not exported.
    attributes: Option<[KeyValue; 3]>,
    peer: Peer,
    requests: Arc<AtomicU64>,
    responses: u64,
    finished: bool,
}

impl ServerCall {
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.start.elapsed();
        let ms = elapsed.as_secs_f64() * 1000.0;
        self.span.record("rpc.grpc.status_code", code);
        if server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        if let (Some(i), Some(attributes)) = (instruments(), &self.attributes) {
            record_duration(&i.server_duration, ms, attributes, code);
            i.in_flight.add(-1, attributes);
        }
        let status = code_name(Code::from_i32(code));
        let requests = self.requests.load(Ordering::Relaxed);
        if server_error(code) {
            tracing::event!(target: "runmesh::access", parent: &self.span, tracing::Level::WARN, grpc.status = status, grpc.code = code, duration_ms = ms, peer = %self.peer, requests, responses = self.responses, "rpc finished");
        } else {
            tracing::event!(target: "runmesh::access", parent: &self.span, tracing::Level::INFO, grpc.status = status, grpc.code = code, duration_ms = ms, peer = %self.peer, requests, responses = self.responses, "rpc finished");
        }
    }
}

impl Drop for ServerCall {
    fn drop(&mut self) {
        // The body was dropped before its trailers: the caller went away.
        self.finish(Code::Cancelled as i32);
    }
}

fn status_in(headers: &HeaderMap) -> Option<i32> {
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcTrace<S>
where
    S: Service<http::Request<CountedBody<ReqBody>>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResBody: Body<Data = tonic::codegen::Bytes>,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path();
        if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
            let req = req.map(|b| CountedBody::new(b, None));
            return Box::pin(async move {
                let res = inner.call(req).await?;
                Ok(res.map(|b| TracedBody {
                    inner: b,
                    call: None,
                }))
            });
        }
        let (service, method) = rpc_names(path);
        let peer = Peer(
            req.extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr),
        );
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            client.address = %peer,
            enduser.id = Empty,
            trace_id = Empty,
            span_id = Empty,
            trace_sampled = Empty,
        );
        // A disabled span (`RUST_LOG` above `info`) takes no parent and has no ids; parsing the
        // caller's trace context for it cost ~800 instructions a call for nothing.
        if !span.is_disabled() {
            let _ = span.set_parent(extract_parent(req.headers()));
            record_ids(&span);
        }
        let attributes = instruments().map(|i| {
            let attributes = rpc_attributes(service, method);
            i.in_flight.add(1, &attributes);
            attributes
        });
        let requests = Arc::new(AtomicU64::new(0));
        let mut call = ServerCall {
            span: span.clone(),
            start: Instant::now(),
            attributes,
            peer,
            requests: requests.clone(),
            responses: 0,
            finished: false,
        };
        let req = req.map(|b| CountedBody::new(b, Some(requests)));
        Box::pin(
            async move {
                let res = inner.call(req).await?;
                let (parts, body) = res.into_parts();
                // A trailers-only response (an error before any message) carries its status here.
                if let Some(code) = status_in(&parts.headers) {
                    call.finish(code);
                }
                let body = TracedBody {
                    inner: body,
                    call: Some(Box::new(Tracked {
                        call,
                        counter: MessageCounter::default(),
                    })),
                };
                Ok(http::Response::from_parts(parts, body))
            }
            .instrument(span),
        )
    }
}

struct Tracked {
    call: ServerCall,
    counter: MessageCounter,
}

pin_project! {
    /// A request body that counts the gRPC messages it carries.
    #[derive(Debug)]
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        counter: MessageCounter,
        count: Option<Arc<AtomicU64>>,
    }
}

impl<B> CountedBody<B> {
    fn new(inner: B, count: Option<Arc<AtomicU64>>) -> Self {
        Self {
            inner,
            counter: MessageCounter::default(),
            count,
        }
    }
}

impl<B: Body<Data = tonic::codegen::Bytes>> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let (Some(Ok(f)), Some(count)) = (&frame, this.count.as_ref())
            && let Some(data) = f.data_ref()
        {
            count.fetch_add(this.counter.feed(data), Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A response body that finishes its call's span when the trailers (or the end) go out.
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        call: Option<Box<Tracked>>,
    }
}

impl<B> std::fmt::Debug for TracedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracedBody").finish_non_exhaustive()
    }
}

impl<B: Default> Default for TracedBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            call: None,
        }
    }
}

impl<B: Body<Data = tonic::codegen::Bytes>> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(tracked) = this.call.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        tracked.call.responses += tracked.counter.feed(data);
                    } else if let Some(code) = f.trailers_ref().and_then(status_in) {
                        tracked.call.finish(code);
                    }
                }
                Some(Err(_)) => tracked.call.finish(Code::Internal as i32),
                None => tracked.call.finish(Code::Ok as i32),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One outbound call to the next hop: its client span, duration and status.
#[derive(Debug)]
pub struct ClientCall {
    span: Span,
    start: Instant,
    /// `None` while metrics are not exported.
    attributes: Option<[KeyValue; 3]>,
    finished: bool,
}

impl ClientCall {
    /// Starts the client span for `method` of `service` towards `upstream`, as a child of the
    /// current (server) span.
    pub fn start(service: &str, method: &str, upstream: &url::Url) -> Self {
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            server.address = upstream.host_str().unwrap_or_default(),
            server.port = upstream.port_or_known_default().unwrap_or_default(),
        );
        Self {
            span,
            start: Instant::now(),
            attributes: instruments().map(|_| rpc_attributes(service, method)),
            finished: false,
        }
    }

    /// The client span, to instrument the call with.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Writes this call's `traceparent`/`tracestate` into the `outgoing` metadata. When the
    /// span is disabled (`RUST_LOG` above `info`), this hop records nothing and has no context
    /// of its own to send, so the caller's (`incoming`) goes on as it came: the trace still
    /// joins the hops before and after this one.
    pub fn inject(&self, incoming: &HeaderMap, outgoing: &mut MetadataMap) {
        if self.span.is_disabled() {
            let outgoing = outgoing.as_mut();
            for name in TRACE_CONTEXT {
                if let Some(value) = incoming.get(&name) {
                    outgoing.insert(name, value.clone());
                }
            }
            return;
        }
        let cx = self.span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(outgoing));
        });
    }

    /// Records the call's outcome; later calls are ignored.
    pub fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let code = code as i32;
        self.span.record("rpc.grpc.status_code", code);
        if code != 0 {
            self.span.record("otel.status_code", "ERROR");
        }
        if let (Some(i), Some(attributes)) = (instruments(), &self.attributes) {
            let ms = self.start.elapsed().as_secs_f64() * 1000.0;
            record_duration(&i.client_duration, ms, attributes, code);
        }
    }
}

impl Drop for ClientCall {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

pin_project! {
    /// A response stream from upstream that finishes its [`ClientCall`] when it ends.
    pub struct ObservedStream<S> {
        #[pin]
        inner: S,
        call: ClientCall,
    }
}

impl<S> std::fmt::Debug for ObservedStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedStream").finish_non_exhaustive()
    }
}

impl ClientCall {
    /// Keeps this call open until `stream` ends, then records how it ended.
    pub fn observe<S>(self, stream: S) -> ObservedStream<S> {
        ObservedStream {
            inner: stream,
            call: self,
        }
    }
}

impl<S, T> Stream for ObservedStream<S>
where
    S: Stream<Item = Result<T, Status>>,
{
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let item = ready!(this.inner.poll_next(cx));
        match &item {
            Some(Err(s)) => this.call.finish(s.code()),
            None => this.call.finish(Code::Ok),
            Some(Ok(_)) => {}
        }
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_counted_across_frame_boundaries() {
        let mut c = MessageCounter::default();
        let msg = |len: u8| {
            let mut v = vec![0, 0, 0, 0, len];
            v.extend(std::iter::repeat_n(7, len as usize));
            v
        };
        let mut all = msg(3);
        all.extend(msg(0));
        all.extend(msg(10));
        assert_eq!(c.feed(&all[..2]), 0);
        assert_eq!(c.feed(&all[2..9]), 1, "the first header completes here");
        assert_eq!(
            c.feed(&all[9..]),
            2,
            "the second header completes, the third follows"
        );
    }

    #[test]
    fn cloud_trace_context_parses_like_cloud_run_sends_it() {
        let sc = parse_cloud_trace_context("105445aa7843bc8bf206b12000100000/1;o=1").unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "105445aa7843bc8bf206b12000100000"
        );
        assert_eq!(sc.span_id().to_string(), "0000000000000001");
        assert!(sc.is_sampled());
        assert!(parse_cloud_trace_context("nonsense").is_none());
        assert!(parse_cloud_trace_context("00000000000000000000000000000000/1").is_none());
    }

    #[test]
    fn traceparent_wins_over_cloud_trace_context() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-cloud-trace-context",
            "105445aa7843bc8bf206b12000100000/1;o=1".parse().unwrap(),
        );
        let cx = extract_parent(&h);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "105445aa7843bc8bf206b12000100000"
        );
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = extract_parent(&h);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
