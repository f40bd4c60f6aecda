//! The four RPCs, forwarded message by message, each message passed on as it was encoded
//! ([`runmesh_proto::raw`]): a hop reads none of them and adds itself to an answer's trail by
//! prefixing bytes.
//!
//! Nothing is buffered beyond what HTTP/2 flow control allows: inbound messages are pulled from
//! the caller only as the upstream request body is polled, and upstream responses only as the
//! caller's response body is. Dropping the caller's call drops the upstream call, which resets
//! its HTTP/2 stream, so cancellation reaches ping at once.

use std::{pin::Pin, sync::Arc};

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use http::{Extensions, HeaderMap, HeaderName};
use runmesh_auth::Caller;
use runmesh_proto::{
    path::{CHAT, COLLECT, SEND, SEND_STREAM},
    raw::Raw,
};
use runmesh_runtime::{
    Drain,
    deadline::{self, bounded},
    observe::ClientCall,
};
use tokio::{sync::oneshot, time::Instant};
use tonic::{Request, Status, metadata::MetadataMap};
use tracing::Instrument;

use crate::{
    Config, ForwardError,
    server::Inbound,
    trail::{Entry, Trail},
    upstream::{Grpc, Messages, Upstream},
};

/// Metadata passed on upstream as it came. Never `authorization`; `traceparent`/`tracestate`
/// are written afresh for this hop's client span, so the trace links hop by hop. Names, not
/// `&str`s: a `&str` is parsed again on every lookup.
const FORWARDED: [HeaderName; 2] = [
    HeaderName::from_static("x-cloud-trace-context"),
    HeaderName::from_static("x-request-id"),
];

/// The service part of every method path, for span names.
const SERVICE: &str = runmesh_proto::PING_SERVICE_NAME;

/// The answers of a streaming method, this hop already in each one's trail.
pub(crate) type PongStream = Pin<Box<dyn Stream<Item = Result<Raw, Status>> + Send>>;

/// `PingService` answered by calling the same method upstream; the `server` module serves it.
#[derive(Debug, Clone)]
pub struct Forwarder {
    hop: &'static str,
    trail: Arc<Trail>,
    url: String,
    upstream_url: url::Url,
    upstream: Upstream,
    max_message_size: usize,
    drain: Drain,
}

impl Forwarder {
    /// A forwarder for `config`'s hop over the shared `upstream` connections.
    pub fn new(config: &Config, upstream: Upstream, drain: Drain) -> Self {
        Self {
            hop: config.role.name(),
            trail: Arc::new(Trail::new(config.identity.clone())),
            url: config
                .upstream_url
                .as_str()
                .trim_end_matches('/')
                .to_string(),
            upstream_url: config.upstream_url.clone(),
            upstream,
            max_message_size: config.server.max_message_size,
            drain,
        }
    }

    /// `MAX_MESSAGE_SIZE`: the limit on messages either way, at both halves of the hop.
    pub(crate) fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// A client on the next upstream connection.
    fn client(&self) -> Grpc {
        Grpc::new(self.upstream.pick(), self.max_message_size)
    }

    /// This hop's entry in the trail of the answer to `request`.
    fn my_hop<T>(&self, request: &Request<T>) -> Arc<Entry> {
        let caller = request.extensions().get::<Caller>().map(|c| c.0.as_str());
        self.trail.entry(caller)
    }

    fn error(&self, status: Status) -> Status {
        ForwardError::classify(self.hop, &self.url, status).into()
    }

    fn deadline_error(&self) -> Status {
        ForwardError::DeadlineExceeded {
            hop: self.hop,
            url: self.url.clone(),
        }
        .into()
    }

    /// Wraps `message` for upstream with the forwarded metadata, this call's trace context and
    /// the time left.
    fn upstream<T>(
        &self,
        incoming: &MetadataMap,
        deadline: Option<Instant>,
        call: &ClientCall,
        message: T,
    ) -> Request<T> {
        let mut headers = HeaderMap::new();
        for name in FORWARDED {
            if let Some(value) = incoming.as_ref().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        let mut request = Request::from_parts(
            MetadataMap::from_headers(headers),
            Extensions::default(),
            message,
        );
        call.inject(incoming.as_ref(), request.metadata_mut());
        if let Some(deadline) = deadline {
            request.set_timeout(deadline::time_left(deadline));
        }
        request
    }

    /// One attempt of `call` against the caller's deadline, in the client span; failures are
    /// returned as the transport raised them.
    async fn attempt<T>(
        &self,
        deadline: Option<Instant>,
        client: &ClientCall,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let call = call.instrument(client.span().clone());
        match deadline {
            Some(d) => match tokio::time::timeout_at(d, call).await {
                Ok(r) => r,
                Err(_) => Err(self.deadline_error()),
            },
            None => call.await,
        }
    }

    /// Runs `call` once, mapping failures at this hop; a stream's client span ends with the
    /// stream, a failed call's ends here.
    async fn call<T>(
        &self,
        deadline: Option<Instant>,
        client: &mut ClientCall,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let result = self
            .attempt(deadline, client, call)
            .await
            .map_err(|s| self.error(s));
        if let Err(status) = &result {
            client.finish(status.code());
        }
        result
    }

    /// Calls `method` with a one-message request, once more on a fresh connection if the first
    /// attempt never reached the upstream (its connection was closing, e.g. after the upstream's
    /// GOAWAY while it drains): gRPC's transparent retry, safe because nothing was processed.
    async fn call_retrying<M, T, F, Fut>(
        &self,
        metadata: &MetadataMap,
        deadline: Option<Instant>,
        method: &'static str,
        message: M,
        mut make: F,
    ) -> Result<(T, ClientCall), Status>
    where
        M: Clone,
        F: FnMut(Request<M>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut client = ClientCall::start(SERVICE, method, &self.upstream_url);
        let request = self.upstream(metadata, deadline, &client, message.clone());
        let mut result = self.attempt(deadline, &client, make(request)).await;
        if let Err(status) = &result
            && ForwardError::never_sent(status)
        {
            tracing::debug!(
                method,
                "upstream connection closed before the call was sent; retrying"
            );
            client.finish(status.code());
            client = ClientCall::start(SERVICE, method, &self.upstream_url);
            let request = self.upstream(metadata, deadline, &client, message);
            result = self.attempt(deadline, &client, make(request)).await;
        }
        match result {
            Ok(t) => Ok((t, client)),
            Err(status) => {
                let status = self.error(status);
                client.finish(status.code());
                Err(status)
            }
        }
    }

    /// The upstream response stream with this hop prepended, bounded by deadline and drain.
    fn pongs(
        &self,
        upstream: Messages,
        client: ClientCall,
        prefix: Bytes,
        deadline: Option<Instant>,
        inbound_failed: Option<oneshot::Receiver<Status>>,
    ) -> PongStream {
        let this = self.clone();
        let upstream = client.observe(upstream);
        let pongs = upstream.map(move |item| {
            item.map(|pong| pong.after(prefix.clone()))
                .map_err(|s| this.error(s))
        });
        let pongs: PongStream = match inbound_failed {
            None => Box::pin(pongs),
            Some(failed) => Box::pin(end_on_inbound_failure(pongs, failed)),
        };
        Box::pin(bounded(pongs, deadline, &self.drain, self.hop))
    }
}

/// Passes the caller's messages upstream as they arrive. A failed inbound stream must not look
/// like a clean half-close upstream (ping would answer as if all was sent): the stream stalls
/// instead, and the status goes to the returned receiver, whose handler then drops the call.
fn inbound(
    pings: Inbound,
) -> (
    impl Stream<Item = Raw> + Send + 'static,
    oneshot::Receiver<Status>,
) {
    let (tx, rx) = oneshot::channel();
    let stream = stream::unfold((pings, Some(tx)), |(mut pings, tx)| async move {
        match pings.next().await {
            Some(Ok(ping)) => Some((ping, (pings, tx))),
            // The caller half-closed: upstream sees END_STREAM.
            None => None,
            Some(Err(status)) => {
                if let Some(tx) = tx {
                    let _ = tx.send(status);
                }
                std::future::pending().await
            }
        }
    });
    (stream, rx)
}

/// Ends the response stream with the inbound failure, if the caller's stream fails first.
fn end_on_inbound_failure(
    pongs: impl Stream<Item = Result<Raw, Status>> + Send + 'static,
    failed: oneshot::Receiver<Status>,
) -> impl Stream<Item = Result<Raw, Status>> + Send + 'static {
    enum Next {
        Item(Option<Result<Raw, Status>>),
        Failed(Status),
        InboundDone,
    }
    let state = (Box::pin(pongs), Some(failed), false);
    stream::unfold(state, |(mut pongs, mut failed, done)| async move {
        if done {
            return None;
        }
        let next = match failed.as_mut() {
            Some(rx) => tokio::select! {
                r = rx => match r {
                    Ok(status) => Next::Failed(status),
                    Err(_) => Next::InboundDone,
                },
                item = pongs.next() => Next::Item(item),
            },
            None => Next::Item(pongs.next().await),
        };
        match next {
            Next::Failed(status) => Some((Err(status), (pongs, None, true))),
            Next::InboundDone => {
                let item = pongs.next().await?;
                Some((item, (pongs, None, false)))
            }
            Next::Item(item) => Some((item?, (pongs, failed, false))),
        }
    })
}

/// The four methods, as [`crate::server`] calls them once the request is read.
impl Forwarder {
    pub(crate) async fn send(&self, request: Request<Raw>) -> Result<Raw, Status> {
        let deadline = deadline::deadline(request.metadata());
        let hop = self.my_hop(&request);
        let (metadata, _, message) = request.into_parts();
        let (res, mut span) = self
            .call_retrying(&metadata, deadline, "Send", message, |req| {
                let mut client = self.client();
                async move { client.unary(SEND, req).await }
            })
            .await?;
        span.finish(tonic::Code::Ok);
        Ok(res.after(hop.pong.clone()))
    }

    pub(crate) async fn send_stream(&self, request: Request<Raw>) -> Result<PongStream, Status> {
        let deadline = deadline::deadline(request.metadata());
        let hop = self.my_hop(&request);
        let (metadata, _, message) = request.into_parts();
        let (pongs, span) = self
            .call_retrying(&metadata, deadline, "SendStream", message, |req| {
                let mut client = self.client();
                async move { client.server_streaming(SEND_STREAM, req).await }
            })
            .await?;
        Ok(self.pongs(pongs, span, hop.pong.clone(), deadline, None))
    }

    pub(crate) async fn collect(&self, request: Request<Inbound>) -> Result<Raw, Status> {
        let deadline = deadline::deadline(request.metadata());
        let hop = self.my_hop(&request);
        let (metadata, _, pings) = request.into_parts();
        let (outbound, failed) = inbound(pings);
        let mut span = ClientCall::start(SERVICE, "Collect", &self.upstream_url);
        let upstream = self.upstream(&metadata, deadline, &span, outbound);
        let mut client = self.client();
        let summary = {
            let call = self.call(
                deadline,
                &mut span,
                client.client_streaming(COLLECT, upstream),
            );
            tokio::pin!(call);
            tokio::select! {
                res = &mut call => res?,
                Ok(status) = failed => return Err(status),
            }
        };
        span.finish(tonic::Code::Ok);
        Ok(summary.after(hop.summary.clone()))
    }

    pub(crate) async fn chat(&self, request: Request<Inbound>) -> Result<PongStream, Status> {
        let deadline = deadline::deadline(request.metadata());
        let hop = self.my_hop(&request);
        let (metadata, _, pings) = request.into_parts();
        let (outbound, failed) = inbound(pings);
        let mut span = ClientCall::start(SERVICE, "Chat", &self.upstream_url);
        let upstream = self.upstream(&metadata, deadline, &span, outbound);
        let mut client = self.client();
        let pongs = self
            .call(deadline, &mut span, client.streaming(CHAT, upstream))
            .await?;
        Ok(self.pongs(pongs, span, hop.pong.clone(), deadline, Some(failed)))
    }
}
