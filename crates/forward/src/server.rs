//! The hop's server half of `PingService`: gRPC's framing read and written here, below tonic's
//! codec, around the [`Forwarder`].
//!
//! tonic's generated server copies every DATA chunk of a request into a decode buffer, and frames
//! answers into a buffer that starts at 8 KiB and doubles (copying what it holds) as a stream's
//! ready messages fill it; a third of a relay's instructions per streamed message went to those
//! copies. Here request messages are cut out of the chunks they arrived in and the answers
//! waiting are framed into one buffer of their exact size ([`crate::framing`]).
//!
//! The contract is tonic's, status for status, so a caller cannot tell: a compressed request is
//! `UNIMPLEMENTED` (this hop accepts `identity` only, and says so in `grpc-accept-encoding`), a
//! bad length prefix or a body cut inside a message is `INTERNAL`, a message over the size limit
//! either way is `OUT_OF_RANGE` (which `runtime::status` turns into `RESOURCE_EXHAUSTED`), a
//! unary method's request without a message is `INTERNAL`, and an unknown method
//! `UNIMPLEMENTED`. A failure before the answer starts is a trailers-only response. The one
//! departure: tonic ends a request stream cleanly when its body fails with `CANCELLED`; here
//! every body failure is a failure, so a reset never reaches upstream as a clean half-close.

use std::{
    borrow::Cow,
    convert::Infallible,
    future::poll_fn,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};
use http_body::Frame;
use runmesh_proto::{
    path::{CHAT, COLLECT, SEND, SEND_STREAM},
    raw::Raw,
};
use tonic::{Request, Status, body::Body, metadata::MetadataValue, server::NamedService};
use tower::Service;

use crate::{
    Forwarder,
    forwarder::PongStream,
    framing::{Batch, Deframe},
};

const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";
const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// `PingService` as a hop serves it: each call's messages passed to and from the [`Forwarder`]
/// as they were encoded.
#[derive(Debug, Clone)]
pub struct PingServer {
    /// Shared, not cloned per call: a forwarder holds its URLs and identity as strings.
    forwarder: Arc<Forwarder>,
}

impl PingServer {
    /// Serves `forwarder`, with its limit on the size of messages either way.
    pub fn new(forwarder: Forwarder) -> Self {
        Self {
            forwarder: Arc::new(forwarder),
        }
    }

    /// The answer to `request`: its messages, or the status it failed with.
    async fn answer(self, request: http::Request<Body>) -> Result<Answer, Status> {
        let forwarder = &self.forwarder;
        let max = forwarder.max_message_size();
        match request.uri().path() {
            SEND => {
                let request = unary(request, max).await?;
                Ok(Answer::one(forwarder.send(request).await?, max))
            }
            SEND_STREAM => {
                let request = unary(request, max).await?;
                Ok(Answer::many(forwarder.send_stream(request).await?, max))
            }
            COLLECT => {
                let request = streaming(request, max)?;
                Ok(Answer::one(forwarder.collect(request).await?, max))
            }
            CHAT => {
                let request = streaming(request, max)?;
                Ok(Answer::many(forwarder.chat(request).await?, max))
            }
            _ => Err(Status::unimplemented("")),
        }
    }
}

impl NamedService for PingServer {
    const NAME: &'static str = runmesh_proto::PING_SERVICE_NAME;
}

impl Service<http::Request<Body>> for PingServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(match this.answer(request).await {
                Ok(answer) => {
                    let mut response = http::Response::new(Body::new(answer));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Refuses a request compressed with anything but `identity`: this hop decompresses nothing,
/// and would otherwise pass compressed bytes on as if they were plain.
fn uncompressed(headers: &HeaderMap) -> Result<(), Status> {
    let Some(encoding) = headers.get(GRPC_ENCODING) else {
        return Ok(());
    };
    if encoding == "identity" {
        return Ok(());
    }
    let name = match std::str::from_utf8(encoding.as_bytes()) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(format!("{:?}", encoding.as_bytes())),
    };
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{name}` which isn't supported"
    ));
    status
        .metadata_mut()
        .insert(GRPC_ACCEPT_ENCODING, MetadataValue::from_static("identity"));
    Err(status)
}

/// The one message of a unary method's request, read to the end of its body: further messages
/// are ignored, as tonic ignores them, but a broken one fails the call.
async fn unary(request: http::Request<Body>, max: usize) -> Result<Request<Raw>, Status> {
    uncompressed(request.headers())?;
    let (parts, body) = request.into_parts();
    let mut messages = Deframe::new(body, max);
    let message = poll_fn(|cx| messages.poll_message(cx))
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    while poll_fn(|cx| messages.poll_message(cx)).await?.is_some() {}
    Ok(Request::from_http(http::Request::from_parts(
        parts, message,
    )))
}

/// A streaming method's request, its messages read as the forwarder pulls them.
fn streaming(request: http::Request<Body>, max: usize) -> Result<Request<Inbound>, Status> {
    uncompressed(request.headers())?;
    Ok(Request::from_http(request.map(|body| Inbound {
        messages: Deframe::new(body, max),
        done: false,
    })))
}

/// The caller's request messages; the stream ends after the last one or with the body's failure.
#[derive(Debug)]
pub(crate) struct Inbound {
    messages: Deframe<Body>,
    done: bool,
}

impl Stream for Inbound {
    type Item = Result<Raw, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = std::task::ready!(self.messages.poll_message(cx));
        self.done = !matches!(next, Ok(Some(_)));
        Poll::Ready(next.transpose())
    }
}

/// Where an answer's messages come from.
enum Source {
    /// A unary-shaped method's one answer.
    One(Option<Raw>),
    /// A streaming method's answers, as the upstream sends them.
    Many(PongStream),
}

/// An answer body: the messages waiting framed into one DATA chunk at a time, then the status in
/// trailers. A failure after some messages is sent after them, never in place of them.
pub(crate) struct Answer {
    source: Source,
    max_message_size: usize,
    batch: Batch,
    end: Option<Result<(), Status>>,
    done: bool,
}

impl Answer {
    fn one(message: Raw, max_message_size: usize) -> Self {
        Self::new(Source::One(Some(message)), max_message_size)
    }

    fn many(messages: PongStream, max_message_size: usize) -> Self {
        Self::new(Source::Many(messages), max_message_size)
    }

    fn new(source: Source, max_message_size: usize) -> Self {
        Self {
            source,
            max_message_size,
            batch: Batch::default(),
            end: None,
            done: false,
        }
    }

    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Raw, Status>>> {
        match &mut self.source {
            Source::One(message) => Poll::Ready(message.take().map(Ok)),
            Source::Many(messages) => messages.as_mut().poll_next(cx),
        }
    }
}

/// The trailers ending a call with `end`.
fn trailers(end: Result<(), Status>) -> Result<HeaderMap, Status> {
    let mut map = HeaderMap::with_capacity(1);
    match end {
        Ok(()) => {
            map.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
        }
        Err(status) => status.add_header(&mut map)?,
    }
    Ok(map)
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        while this.end.is_none() && !this.batch.is_full() {
            match this.poll_source(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    if let Err(status) = this.batch.push(message, this.max_message_size) {
                        this.end = Some(Err(status));
                    }
                }
                Poll::Ready(Some(Err(status))) => this.end = Some(Err(status)),
                Poll::Ready(None) => this.end = Some(Ok(())),
                Poll::Pending if this.batch.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if !this.batch.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.batch.take()))));
        }
        this.done = true;
        let end = this.end.take().unwrap_or(Ok(()));
        Poll::Ready(Some(trailers(end).map(Frame::trailers)))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use http_body_util::{BodyExt, Full};
    use tonic::Code;
    use tower::ServiceExt;

    use super::*;
    use crate::{Config, Role, upstream};

    const MAX: usize = 64;

    fn frame(flag: u8, len: usize, message: &[u8]) -> Vec<u8> {
        let mut f = vec![flag];
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    /// A hop whose upstream refuses connections: a call that gets past the framing checks
    /// fails `UNAVAILABLE`, so any other answer was given by the checks.
    fn hop() -> PingServer {
        let config = Config::from_env(
            Role::Relay,
            &[
                ("AUTH_MODE", "off"),
                ("UPSTREAM_AUTH", "off"),
                ("UPSTREAM_URL", "http://127.0.0.1:1"),
                ("MAX_MESSAGE_SIZE", "64"),
            ],
        )
        .unwrap();
        let upstream = upstream::connect(&config).unwrap();
        let forwarder = Forwarder::new(&config, upstream, runmesh_runtime::Drain::default());
        PingServer::new(forwarder)
    }

    /// The status an answer ends with, from its headers (trailers-only) or its trailers, and
    /// the answer's headers.
    async fn status_of(response: http::Response<Body>) -> (Status, HeaderMap) {
        let (parts, body) = response.into_parts();
        if let Some(status) = Status::from_header_map(&parts.headers) {
            return (status, parts.headers);
        }
        let trailers = body.collect().await.unwrap().trailers().cloned();
        let status = Status::from_header_map(&trailers.expect("trailers")).expect("grpc-status");
        (status, parts.headers)
    }

    async fn call(path: &str, encoding: Option<&str>, body: Vec<u8>) -> (Status, HeaderMap) {
        let mut request = http::Request::post(path).header(CONTENT_TYPE, "application/grpc");
        if let Some(encoding) = encoding {
            request = request.header(GRPC_ENCODING, encoding);
        }
        let request = request
            .body(Body::new(Full::new(Bytes::from(body))))
            .unwrap();
        status_of(hop().oneshot(request).await.unwrap()).await
    }

    #[tokio::test]
    async fn a_well_framed_request_reaches_the_forwarder() {
        for path in [SEND, SEND_STREAM] {
            let (status, _) = call(path, None, frame(0, 2, b"\x0a\x00")).await;
            assert_eq!(status.code(), Code::Unavailable, "{path}: {status:?}");
        }
        let (status, _) = call(SEND, Some("identity"), frame(0, 0, b"")).await;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    #[tokio::test]
    async fn each_bad_unary_request_gets_tonics_status_before_anything_goes_upstream() {
        let oversize = vec![0; MAX + 1];
        let mut then_broken = frame(0, 1, b"x");
        then_broken.extend(frame(1, 1, b"y"));
        let cases: [(&str, Vec<u8>, Code, &str); 7] = [
            (
                "compressed flag",
                frame(1, 1, b"x"),
                Code::Internal,
                "compressed-flag",
            ),
            ("unknown flag", frame(7, 1, b"x"), Code::Internal, "flag: 7"),
            (
                "prefix past the body",
                frame(0, 9, b"x"),
                Code::Internal,
                "Unexpected EOF",
            ),
            (
                "cut in the prefix",
                vec![0, 0, 0],
                Code::Internal,
                "Unexpected EOF",
            ),
            (
                "no message",
                vec![],
                Code::Internal,
                "Missing request message.",
            ),
            (
                "over the limit",
                frame(0, oversize.len(), &oversize),
                Code::OutOfRange,
                "decoded message length too large",
            ),
            (
                "a broken second message",
                then_broken,
                Code::Internal,
                "compressed-flag",
            ),
        ];
        for (what, body, code, text) in cases {
            let (status, _) = call(SEND, None, body).await;
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(status.message().contains(text), "{what}: {status:?}");
        }
    }

    #[tokio::test]
    async fn a_compressed_request_is_unimplemented_and_names_what_is_accepted() {
        for path in [SEND, SEND_STREAM, COLLECT, CHAT] {
            let (status, headers) = call(path, Some("gzip"), frame(1, 1, b"x")).await;
            assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
            assert!(status.message().contains("`gzip`"), "{status:?}");
            assert_eq!(headers[GRPC_ACCEPT_ENCODING], "identity");
        }
    }

    #[tokio::test]
    async fn an_unknown_method_is_unimplemented() {
        let path = "/runmesh.ping.v1.PingService/Nope";
        let (status, headers) = call(path, None, frame(0, 0, b"")).await;
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(headers[CONTENT_TYPE], "application/grpc");
    }

    /// Every frame of an answer body: DATA chunks, then the trailers.
    async fn frames(answer: Answer) -> (Vec<Bytes>, HeaderMap) {
        let mut body = std::pin::pin!(answer);
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(data) => chunks.push(data),
                Err(frame) => {
                    assert!(
                        http_body::Body::is_end_stream(&*body),
                        "the trailers end the body"
                    );
                    return (chunks, frame.into_trailers().unwrap());
                }
            }
        }
        panic!("the answer ended without trailers");
    }

    fn raw(bytes: &'static [u8]) -> Raw {
        Raw::new(Bytes::from_static(bytes))
    }

    #[tokio::test]
    async fn messages_waiting_go_out_in_one_chunk_then_ok() {
        let messages = stream::iter([
            Ok(raw(b"one")),
            Ok(raw(b"two").after(Bytes::from_static(b"<"))),
        ]);
        let (chunks, trailers) = frames(Answer::many(Box::pin(messages), MAX)).await;
        let mut expected = frame(0, 3, b"one");
        expected.extend(frame(0, 4, b"<two"));
        assert_eq!(chunks, [Bytes::from(expected)]);
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers.len(), 1);

        let (chunks, trailers) = frames(Answer::one(raw(b"only"), MAX)).await;
        assert_eq!(chunks, [Bytes::from(frame(0, 4, b"only"))]);
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_failure_after_messages_comes_after_them() {
        let messages = stream::iter([
            Ok(raw(b"sent")),
            Err(Status::permission_denied("no more")),
            Ok(raw(b"never")),
        ]);
        let (chunks, trailers) = frames(Answer::many(Box::pin(messages), MAX)).await;
        assert_eq!(chunks, [Bytes::from(frame(0, 4, b"sent"))]);
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "no more");
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_ends_the_call_after_the_messages_before_it() {
        let messages = stream::iter([
            Ok(raw(b"fits")),
            Ok(Raw::new(Bytes::from(vec![0; MAX + 1]))),
        ]);
        let (chunks, trailers) = frames(Answer::many(Box::pin(messages), MAX)).await;
        assert_eq!(chunks, [Bytes::from(frame(0, 4, b"fits"))]);
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(
            runmesh_runtime::status::is_size_limit(&status),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn a_long_stream_is_cut_into_chunks_at_the_yield_threshold() {
        let big = Raw::new(Bytes::from(vec![7; 10 << 10]));
        let messages = stream::iter(vec![Ok(big); 8]);
        let (chunks, _) = frames(Answer::many(Box::pin(messages), 1 << 20)).await;
        let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        let framed = 5 + (10 << 10);
        assert_eq!(
            sizes,
            [4 * framed, 4 * framed],
            "each chunk stops once past 32 KiB"
        );
    }
}
