//! gRPC calls on an upstream connection, with every message left as it was encoded.
//!
//! tonic's client frames each request message in an encode buffer of its own, and copies every
//! DATA chunk of the answer into a decode buffer before it cuts messages out of it. A hop reads
//! no message, so here request messages are framed as they come, and answer messages are cut out
//! of the DATA chunks they arrived in: copied only when one spans two chunks. Leaving tonic's
//! client took a relay from 6.4 k to 4.4 k instructions per streamed 1 KiB message, and from
//! 115 k to 108 k per unary call (callgrind; `docs/profiling.md`). The framing itself is
//! [`crate::framing`], shared with the hop's server half.
//!
//! Failures come out as tonic's client gives them (the same codes, messages and error sources,
//! through [`Status::from_error`]), so [`crate::ForwardError`] sorts them the same way.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{
    HeaderMap, HeaderValue, Method, StatusCode, Uri,
    header::{CONTENT_TYPE, TE},
};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use runmesh_proto::raw::Raw;
use tonic::{Code, Request, Status};
use tower::{Service, ServiceExt};

use super::{ResponseBody, Streaming, UpstreamChannel};
use crate::framing::{Batch, Deframe};

/// The four call shapes of one API on one upstream connection.
#[derive(Debug, Clone)]
pub struct Grpc {
    channel: UpstreamChannel,
    max_message_size: usize,
}

impl Grpc {
    /// Calls on `channel`, refusing messages either way over `max_message_size`.
    pub fn new(channel: UpstreamChannel, max_message_size: usize) -> Self {
        Self {
            channel,
            max_message_size,
        }
    }

    /// One request message, one answer: the answer's first message once its status is OK.
    pub async fn unary(
        &mut self,
        path: &'static str,
        request: Request<Raw>,
    ) -> Result<Raw, Status> {
        let request = request.map(|message| futures::stream::once(async { message }));
        one_answer(self.call(path, request, false).await?).await
    }

    /// One request message; answer messages as they arrive.
    pub async fn server_streaming(
        &mut self,
        path: &'static str,
        request: Request<Raw>,
    ) -> Result<Messages, Status> {
        let request = request.map(|message| futures::stream::once(async { message }));
        self.call(path, request, true).await
    }

    /// Request messages as `request` yields them, one answer.
    pub async fn client_streaming<S>(
        &mut self,
        path: &'static str,
        request: Request<S>,
    ) -> Result<Raw, Status>
    where
        S: Stream<Item = Raw> + Send + 'static,
    {
        one_answer(self.call(path, request, true).await?).await
    }

    /// Request messages as `request` yields them; answer messages as they arrive.
    pub async fn streaming<S>(
        &mut self,
        path: &'static str,
        request: Request<S>,
    ) -> Result<Messages, Status>
    where
        S: Stream<Item = Raw> + Send + 'static,
    {
        self.call(path, request, true).await
    }

    /// Calls `path`; a call that `streams` either way keeps its connection writing at once.
    async fn call<S>(
        &mut self,
        path: &'static str,
        request: Request<S>,
        streams: bool,
    ) -> Result<Messages, Status>
    where
        S: Stream<Item = Raw> + Send + 'static,
    {
        let (metadata, _, messages) = request.into_parts();
        let mut headers = metadata.into_headers();
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let mut request = http::Request::new(Framed {
            messages,
            max_message_size: self.max_message_size,
            batch: Batch::default(),
            done: false,
        });
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(path);
        *request.headers_mut() = headers;
        if streams {
            request.extensions_mut().insert(Streaming);
        }
        let response = ServiceExt::<http::Request<Framed<S>>>::ready(&mut self.channel)
            .await
            .map_err(|e| Status::from_error(Box::new(e)))?
            .call(request)
            .await
            .map_err(|e| Status::from_error(Box::new(e)))?;
        Messages::from_response(response, self.max_message_size)
    }
}

/// The one message of a unary answer, once its status is OK.
async fn one_answer(mut answer: Messages) -> Result<Raw, Status> {
    let message = answer
        .next()
        .await
        .transpose()?
        .ok_or_else(|| Status::internal("Missing response message."))?;
    // The status comes after the message: a failure there fails the call.
    while answer.next().await.transpose()?.is_some() {}
    Ok(message)
}

pin_project! {
    /// A request body: each message framed as it comes, those already waiting in one chunk.
    struct Framed<S> {
        #[pin]
        messages: S,
        max_message_size: usize,
        batch: Batch,
        done: bool,
    }
}

impl<S: Stream<Item = Raw>> Body for Framed<S> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut this = self.project();
        while !*this.done && !this.batch.is_full() {
            match this.messages.as_mut().poll_next(cx) {
                Poll::Ready(Some(message)) => {
                    if let Err(status) = this.batch.push(message, *this.max_message_size) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(None) => *this.done = true,
                Poll::Pending if this.batch.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if this.batch.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(this.batch.take()))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.batch.is_empty()
    }
}

/// The answer's messages, then its status: a stream that ends after OK, or with the failure.
#[derive(Debug)]
pub struct Messages {
    body: Deframe<ResponseBody>,
    http_status: StatusCode,
    done: bool,
}

impl Messages {
    /// Reads the answer's headers: a non-OK status in them (trailers-only) fails the call here.
    fn from_response(
        response: http::Response<ResponseBody>,
        max_message_size: usize,
    ) -> Result<Self, Status> {
        let (parts, body) = response.into_parts();
        let trailers_only = match status_in(&parts.headers) {
            Some(status) => {
                status?;
                true
            }
            None => false,
        };
        Ok(Self {
            body: Deframe::new(body, max_message_size),
            http_status: parts.status,
            done: trailers_only,
        })
    }

    /// The call's status once the body has ended: from the trailers, else from the HTTP status
    /// (gRPC's HTTP-to-status mapping, as tonic applies it).
    fn status(&self) -> Result<(), Status> {
        if let Some(status) = self.body.trailers().and_then(status_in) {
            return status;
        }
        let code = match self.http_status {
            StatusCode::OK => {
                return Err(Status::unknown(
                    "protocol error: missing grpc-status trailer, stream was terminated without a final status",
                ));
            }
            StatusCode::BAD_REQUEST => Code::Internal,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::Unimplemented,
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
            _ => Code::Unknown,
        };
        Err(Status::new(
            code,
            format!(
                "grpc-status header missing, mapped from HTTP status code {}",
                self.http_status.as_u16()
            ),
        ))
    }
}

/// The status `headers` carry, if any. OK, nearly every call's, is read without building a
/// [`Status`] (tonic's reader copies the whole map for its metadata). tonic's reader also panics
/// on details that are not base64: from an upstream they are a protocol error, `INTERNAL` as
/// grpc-go has it, and this hop carries on.
fn status_in(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let code = headers.get(Status::GRPC_STATUS)?;
    if code == "0" {
        return Some(Ok(()));
    }
    if let Some(e) = runmesh_runtime::status::malformed_details(headers) {
        return Some(Err(Status::internal(format!(
            "malformed grpc-status-details-bin from upstream: {e}"
        ))));
    }
    match Status::from_header_map(headers) {
        Some(status) if status.code() == Code::Ok => Some(Ok(())),
        status => status.map(Err),
    }
}

impl Stream for Messages {
    type Item = Result<Raw, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = ready!(self.body.poll_message(cx));
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        Poll::Ready(match next {
            Ok(Some(message)) => Some(Ok(message)),
            Ok(None) => self.status().err().map(Err),
            Err(status) => Some(Err(status)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer's status, read to the end of a body that sent no message.
    async fn status_of(response: http::Response<ResponseBody>) -> Result<(), Status> {
        let mut messages = Messages::from_response(response, 64)?;
        match messages.next().await {
            None => Ok(()),
            Some(Err(status)) => Err(status),
            Some(Ok(m)) => panic!("no message was sent: {m:?}"),
        }
    }

    #[tokio::test]
    async fn an_answer_without_grpc_status_gets_grpcs_code_for_its_http_status() {
        let answer = |status: u16| {
            http::Response::builder()
                .status(status)
                .body(ResponseBody::default())
                .unwrap()
        };
        for (http, code) in [
            (400, Code::Internal),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::Unimplemented),
            (429, Code::Unavailable),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::Unavailable),
            (500, Code::Unknown),
            (200, Code::Unknown),
        ] {
            let err = status_of(answer(http)).await.unwrap_err();
            assert_eq!(err.code(), code, "HTTP {http}: {err:?}");
        }
    }

    #[tokio::test]
    async fn a_trailers_only_answer_is_its_status() {
        let answer = |code: &'static str| {
            http::Response::builder()
                .header("grpc-status", code)
                .header("grpc-message", "from upstream")
                .body(ResponseBody::default())
                .unwrap()
        };
        let err = status_of(answer("7")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), "from upstream");
        assert!(status_of(answer("0")).await.is_ok());
    }

    #[tokio::test]
    async fn status_details_are_kept_and_malformed_ones_are_internal_not_a_panic() {
        let answer = |details: &'static str| {
            http::Response::builder()
                .header("grpc-status", "9")
                .header("grpc-message", "from upstream")
                .header("grpc-status-details-bin", details)
                .body(ResponseBody::default())
                .unwrap()
        };
        for details in ["CAk", "CAk="] {
            let err = status_of(answer(details)).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{details}");
            assert_eq!(err.details(), b"\x08\x09", "{details}");
        }
        let err = status_of(answer("not base64!")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(
            err.message()
                .starts_with("malformed grpc-status-details-bin from upstream"),
            "{}",
            err.message()
        );
    }
}
