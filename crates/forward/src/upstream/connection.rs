//! One HTTP/2 connection to the upstream, driven with `h2` directly.
//!
//! tonic's `Channel` puts a `tower::buffer` worker and hyper's dispatch task between a call and
//! its connection, and hyper spawns one more task per call to wait for the response: four task
//! hand-offs and a spawn per call, a third of a relay's CPU per call (perf, callgrind; see
//! `docs/profiling.md`). Here the calling task opens the stream and queues its message itself,
//! so the connection task writes HEADERS and DATA together, and it wakes the caller directly when
//! the response comes. A request body that is still streaming when the response starts (client
//! streaming, bidi) is the only case that gets a task of its own.
//!
//! The connection is made on first use and again after it fails or the upstream closes it
//! (GOAWAY); keepalive PINGs drop a connection that went silent, so the next call reconnects
//! instead of hanging on it.

use std::{
    future::{Future, poll_fn},
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use h2::{
    Ping, Reason, RecvStream, SendStream,
    client::{ResponseFuture, SendRequest},
};
use http::{
    HeaderValue, Uri,
    header::USER_AGENT,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body::{Body, Frame};
use runmesh_runtime::coalesce::{CoalescedIo, OpenCall, OpenCalls};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tower::{BoxError, Service};

/// How long a connection attempt (TCP, TLS and the HTTP/2 preface) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Ping interval that notices a dead connection well within a typical deadline.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's client windows: a stream may have 2 MiB in flight, the connection 5 MiB.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
/// Request bytes a stream may queue before the sender waits for the upstream's window, so a
/// fast caller cannot buffer without bound in the hop.
const UNCONFIRMED_SEND: usize = 64 << 10;

/// Marks a request (in its extensions) whose call streams either way, so its connection writes
/// at once while it is open instead of coalescing the calls' writes
/// ([`runmesh_runtime::coalesce`]).
#[derive(Debug, Clone, Copy)]
pub struct Streaming;

/// Why a call could not be made or finished on the connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connection, TLS handshake or HTTP/2 preface failed.
    #[error("connecting to {authority}: {source}")]
    Connect {
        /// The upstream's host and port.
        authority: Authority,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// The connection attempt took longer than `CONNECT_TIMEOUT`.
    #[error("connecting to {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(Authority),
    /// The call was refused before the upstream saw it: the connection was closing or closed,
    /// or the upstream refused the stream unprocessed. Sending it again cannot run it twice.
    #[error("call not sent: {0}")]
    NotSent(#[source] h2::Error),
    /// The stream failed after it was sent.
    #[error("{0}")]
    Stream(#[source] h2::Error),
    /// The caller's request body failed; the upstream stream was reset.
    #[error("request body: {0}")]
    Body(#[source] BoxError),
}

impl TransportError {
    /// Whether the call provably never reached the upstream.
    pub fn is_not_sent(&self) -> bool {
        matches!(self, Self::NotSent(_))
    }

    /// A stream error, recognised as unprocessed when the upstream said so: `REFUSED_STREAM`, or
    /// a GOAWAY whose last stream id is below this one (RFC 9113, section 6.8).
    fn from_stream(e: h2::Error) -> Self {
        let refused = e.reason() == Some(Reason::REFUSED_STREAM);
        if refused || (e.is_go_away() && e.is_remote()) {
            Self::NotSent(e)
        } else {
            Self::Stream(e)
        }
    }
}

/// Where and how to connect; shared by a hop's connections.
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    user_agent: HeaderValue,
}

impl Target {
    /// `url`'s origin, with TLS through `tls` for `https://`.
    pub fn new(
        url: &url::Url,
        tls: Option<TlsConnector>,
        user_agent: HeaderValue,
    ) -> Result<Self, BoxError> {
        let host = url
            .host_str()
            .ok_or("upstream URL has no host")?
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or("upstream URL has no port")?;
        let https = url.scheme() == "https";
        let tls = match (https, tls) {
            (true, Some(connector)) => {
                // SNI and certificate name come from the URL, as Cloud Run's front end expects.
                let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())?;
                Some((connector, name))
            }
            (true, None) => return Err("https upstream without a TLS configuration".into()),
            (false, _) => None,
        };
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        Ok(Self {
            scheme: if https { Scheme::HTTPS } else { Scheme::HTTP },
            authority: authority.parse()?,
            host,
            port,
            tls,
            user_agent,
        })
    }

    /// TCP (and TLS) to the upstream, then the HTTP/2 handshake; writes are coalesced as
    /// `calls` says.
    async fn connect(
        &self,
        calls: OpenCalls,
    ) -> Result<(SendRequest<Bytes>, h2::client::Connection<Io, Bytes>), BoxError> {
        let host = self.host.trim_matches(['[', ']']);
        let tcp = TcpStream::connect((host, self.port)).await?;
        tcp.set_nodelay(true)?;
        let io: Io = match &self.tls {
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err("upstream did not agree to HTTP/2 (ALPN h2)".into());
                }
                Box::pin(CoalescedIo::new(tls, calls))
            }
            None => Box::pin(CoalescedIo::new(tcp, calls)),
        };
        Ok(h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(runmesh_runtime::serve::MAX_FRAME_SIZE)
            .handshake(io)
            .await?)
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The byte stream under a connection: plain TCP or TLS over it.
type Io = Pin<Box<dyn AsyncReadWrite>>;

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}

impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// One upstream connection, made lazily and remade after it closes; cloning shares it.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Arc<Target>,
    /// The live connection's handle; `None` before the first call and after it closed.
    live: Mutex<Live>,
    /// One connection attempt at a time; callers arriving meanwhile wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Live {
    generation: u64,
    send: Option<(SendRequest<Bytes>, OpenCalls)>,
}

impl Connection {
    /// A connection to `target`, not yet made.
    pub fn lazy(target: Arc<Target>) -> Self {
        Self {
            inner: Arc::new(Inner {
                target,
                live: Mutex::default(),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Makes the connection now rather than at the first call, for a client that would rather
    /// fail at once.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.inner.handle().await.map(|_| ())
    }
}

impl Inner {
    fn live(&self) -> Option<(u64, SendRequest<Bytes>, OpenCalls)> {
        let live = self.live.lock().expect("connection slot poisoned");
        live.send
            .clone()
            .map(|(send, calls)| (live.generation, send, calls))
    }

    /// Forgets connection `generation`, so the next call makes a new one.
    fn forget(&self, generation: u64) {
        let mut live = self.live.lock().expect("connection slot poisoned");
        if live.generation == generation {
            live.send = None;
        }
    }

    async fn handle(
        self: &Arc<Self>,
    ) -> Result<(u64, SendRequest<Bytes>, OpenCalls), TransportError> {
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let _one = self.connecting.lock().await;
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let target = &self.target;
        let calls = OpenCalls::client();
        let (send, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, target.connect(calls.clone()))
                .await
                .map_err(|_| TransportError::ConnectTimeout(target.authority.clone()))?
                .map_err(|source| TransportError::Connect {
                    authority: target.authority.clone(),
                    source,
                })?;
        let generation = {
            let mut live = self.live.lock().expect("connection slot poisoned");
            live.generation += 1;
            live.send = Some((send.clone(), calls.clone()));
            live.generation
        };
        tokio::spawn(drive(connection, Arc::downgrade(self), generation));
        tracing::debug!(upstream = %target.authority, generation, "upstream connection made");
        Ok((generation, send, calls))
    }

    async fn call<B>(
        self: Arc<Self>,
        request: http::Request<B>,
    ) -> Result<http::Response<ResponseBody>, TransportError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from_parts({
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(self.target.scheme.clone());
            uri.authority = Some(self.target.authority.clone());
            uri.path_and_query = Some(path);
            uri
        })
        .expect("scheme, authority and path make a URI");
        parts
            .headers
            .entry(USER_AGENT)
            .or_insert_with(|| self.target.user_agent.clone());

        let streams = parts.extensions.remove::<Streaming>().is_some();
        let (generation, mut send, calls) = self.handle().await?;
        let open = calls.open(streams);
        let end = body.is_end_stream();
        let (response, stream) = send
            .send_request(http::Request::from_parts(parts, ()), end)
            .map_err(|e| {
                self.forget(generation);
                TransportError::NotSent(e)
            })?;
        let mut pipe = (!end).then(|| Box::pin(pipe(body, stream)));
        let mut failed = None;
        let mut response = pin!(response);
        let response = poll_fn(|cx| {
            if let Some(p) = pipe.as_mut()
                && let Poll::Ready(result) = p.as_mut().poll(cx)
            {
                pipe = None;
                failed = result.err();
            }
            ResponseFuture::poll(response.as_mut(), cx)
        })
        .await;
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                if e.is_go_away() && e.is_remote() {
                    self.forget(generation);
                }
                return Err(failed.unwrap_or_else(|| TransportError::from_stream(e)));
            }
        };
        let sending = pipe.map(|p| AbortOnDrop(tokio::spawn(p)));
        Ok(response.map(|recv| ResponseBody {
            recv: Some(recv),
            data_done: false,
            _sending: sending,
            _open: Some(open),
        }))
    }
}

/// Drives connection `generation` until it closes or stops answering PINGs, then forgets it.
async fn drive(
    mut connection: h2::client::Connection<Io, Bytes>,
    owner: std::sync::Weak<Inner>,
    generation: u64,
) {
    let pings = connection.ping_pong();
    let keepalive = async move {
        let Some(mut pings) = pings else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(KEEPALIVE_INTERVAL).await;
            match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
                Err(_) => return format!("keepalive ping unanswered for {KEEPALIVE_TIMEOUT:?}"),
            }
        }
    };
    tokio::select! {
        result = &mut connection => match result {
            Ok(()) => tracing::debug!(generation, "upstream connection closed"),
            Err(e) => tracing::debug!(generation, error = %e, "upstream connection failed"),
        },
        reason = keepalive => tracing::warn!(generation, %reason, "upstream connection dropped"),
    }
    if let Some(owner) = owner.upgrade() {
        owner.forget(generation);
    }
}

/// Sends the request body on `stream`. Messages are queued as they come, so a one-message call
/// leaves in the same write as its HEADERS; past [`UNCONFIRMED_SEND`] queued bytes the next
/// message waits for the upstream's flow-control window.
async fn pipe<B>(body: B, mut stream: SendStream<Bytes>) -> Result<(), TransportError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut unconfirmed = 0usize;
    loop {
        if unconfirmed >= UNCONFIRMED_SEND {
            stream.reserve_capacity(1);
            while stream.capacity() == 0 {
                match poll_fn(|cx| stream.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(TransportError::from_stream(e)),
                    None => return Ok(()),
                }
            }
            unconfirmed = 0;
        }
        let frame = poll_fn(|cx| {
            // The upstream reset the stream: nothing more goes out, and the response says why.
            if let Poll::Ready(reason) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reason));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match frame {
            Err(_) => return Ok(()),
            Ok(None) => {
                return stream
                    .send_data(Bytes::new(), true)
                    .map_err(TransportError::from_stream);
            }
            Ok(Some(Err(e))) => {
                stream.send_reset(Reason::CANCEL);
                return Err(TransportError::Body(e.into()));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                unconfirmed += data.len();
                stream
                    .send_data(data, end)
                    .map_err(TransportError::from_stream)?;
                if end {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return stream
                        .send_trailers(trailers)
                        .map_err(TransportError::from_stream);
                }
            }
        }
    }
}

/// Aborts the request body's task when the response is dropped: the stream is then reset, so
/// the upstream sees the cancellation.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<Result<(), TransportError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The upstream's response body: its DATA frames, then its trailers.
#[derive(Debug, Default)]
pub struct ResponseBody {
    /// `None` for a response made locally (e.g. a refusal by a layer above).
    recv: Option<RecvStream>,
    data_done: bool,
    _sending: Option<AbortOnDrop>,
    /// Holds the call's place in its connection's count until the answer is dropped.
    _open: Option<OpenCall>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let Some(recv) = this.recv.as_mut() else {
            return Poll::Ready(None);
        };
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The caller has the bytes: let the upstream send as much again.
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(match ready!(recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().is_none_or(RecvStream::is_end_stream)
    }
}

impl<B> Service<http::Request<B>> for Connection
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody>;
    type Error = TransportError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Streams beyond the upstream's limit wait in h2 until one closes.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        Box::pin(self.inner.clone().call(request))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;

    use super::*;

    /// An h2c server on 127.0.0.1 that hands its first call to `answer`, and its URL.
    async fn one_call_server<F, Fut>(answer: F) -> (url::Url, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
            + Send
            + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let (request, respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            answer(request, respond).await;
        });
        (url.parse().unwrap(), server)
    }

    /// Answers one call with the request's origin and body echoed back, then `grpc-status: 0`
    /// in the trailers.
    async fn echo_server() -> (url::Url, tokio::task::JoinHandle<()>) {
        one_call_server(|request, mut respond| async move {
            let (parts, mut body) = request.into_parts();
            let mut received = Vec::new();
            while let Some(chunk) = body.data().await {
                received.extend_from_slice(&chunk.unwrap());
            }
            let origin = format!(
                "{} {} {}",
                parts.uri,
                parts.headers[USER_AGENT].to_str().unwrap(),
                String::from_utf8(received).unwrap()
            );
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from(origin), false).unwrap();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            send.send_trailers(trailers).unwrap();
        })
        .await
    }

    #[tokio::test]
    async fn the_upstream_may_send_data_frames_of_up_to_64_kib() {
        let (url, server) = one_call_server(|_, mut respond| async move {
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // h2 cuts what it sends into frames no larger than the peer allows.
            send.send_data(Bytes::from(vec![7; 40 << 10]), true)
                .unwrap();
        })
        .await;
        let target = Target::new(&url, None, HeaderValue::from_static("runmesh-test/1")).unwrap();
        let mut connection = Connection::lazy(Arc::new(target));
        let request = http::Request::post("/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut body = connection.call(request).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), 40 << 10, "the answer came as one frame");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_call_goes_to_the_upstream_origin_and_its_answer_and_trailers_come_back() {
        let (url, server) = echo_server().await;
        let target = Target::new(&url, None, HeaderValue::from_static("runmesh-test/1")).unwrap();
        let mut connection = Connection::lazy(Arc::new(target));
        let request = http::Request::builder()
            .method("POST")
            .uri("/runmesh.ping.v1.PingService/Send")
            .body(Full::new(Bytes::from_static(b"ping")))
            .unwrap();
        let response = connection.call(request).await.unwrap();
        let (_, _, calls) = connection.inner.live().unwrap();
        assert_eq!(
            calls.counts(),
            (1, 0),
            "a unary call counts, and not as a stream"
        );
        let body = response.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().unwrap();
        assert_eq!(
            body.to_bytes(),
            format!(
                "{}/runmesh.ping.v1.PingService/Send runmesh-test/1 ping",
                url.as_str().trim_end_matches('/')
            )
        );
        assert_eq!(trailers["grpc-status"], "0");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_streaming_call_keeps_its_connection_writing_at_once_until_its_answer_is_gone() {
        let (url, server) = echo_server().await;
        let target = Target::new(&url, None, HeaderValue::from_static("t")).unwrap();
        let mut connection = Connection::lazy(Arc::new(target));
        let mut request = http::Request::post("/runmesh.ping.v1.PingService/Chat")
            .body(Full::new(Bytes::from_static(b"ping")))
            .unwrap();
        request.extensions_mut().insert(Streaming);
        let response = connection.call(request).await.unwrap();
        let (_, _, calls) = connection.inner.live().unwrap();
        assert_eq!(calls.counts(), (1, 1));
        let body = response.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(
            calls.counts(),
            (0, 0),
            "the call no longer counts once answered"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error_naming_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: url::Url = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let target = Target::new(&url, None, HeaderValue::from_static("t")).unwrap();
        let request = http::Request::new(Full::new(Bytes::new()));
        let err = Connection::lazy(Arc::new(target))
            .call(request)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
        assert!(!err.is_not_sent());
        assert!(err.to_string().contains(url.authority()), "{err}");
    }

    #[test]
    fn only_streams_the_upstream_refused_unprocessed_count_as_not_sent() {
        let refused = TransportError::from_stream(h2::Error::from(Reason::REFUSED_STREAM));
        assert!(refused.is_not_sent());
        let reset = TransportError::from_stream(h2::Error::from(Reason::CANCEL));
        assert!(!reset.is_not_sent());
    }

    #[test]
    fn https_needs_a_tls_configuration() {
        let url: url::Url = "https://ping.example:443".parse().unwrap();
        let err = Target::new(&url, None, HeaderValue::from_static("t")).unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }
}
