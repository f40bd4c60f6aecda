//! Message-size errors carry gRPC's code for them.
//!
//! tonic reports a message over the size limit as `OUT_OF_RANGE`; grpc-go and gRPC's C core say
//! `RESOURCE_EXHAUSTED`, and that is what clients and the API contract expect. The rewrite happens
//! here, once, for the status in response headers (trailers-only responses) and in trailers.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};

/// gRPC's name for a status code, as grpcurl and the other gRPC tools print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// True for the status tonic raises when a message exceeds the configured size limit.
pub fn is_size_limit(status: &tonic::Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains("message length too large")
}

/// The same status, with the code gRPC uses for an oversize message.
pub fn size_limit_to_resource_exhausted(status: tonic::Status) -> tonic::Status {
    if is_size_limit(&status) {
        tonic::Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

/// Header names used on every call, built once: a `&str` name is parsed and validated on each
/// lookup.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

fn rewrite(headers: &mut HeaderMap) {
    let out_of_range = HeaderValue::from_static("11");
    if headers.get(&GRPC_STATUS) != Some(&out_of_range) {
        return;
    }
    let is_size = headers
        .get(&GRPC_MESSAGE)
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| {
            m.contains("message%20length%20too%20large") || m.contains("message length too large")
        });
    if is_size {
        headers.insert(GRPC_STATUS, HeaderValue::from_static("8"));
    }
}

/// Applies [`SizeLimitStatus`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct SizeLimitStatusLayer;

impl<S> Layer<S> for SizeLimitStatusLayer {
    type Service = SizeLimitStatus<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SizeLimitStatus { inner }
    }
}

/// Rewrites tonic's oversize-message `OUT_OF_RANGE` into `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone)]
pub struct SizeLimitStatus<S> {
    inner: S,
}

impl<S, Req, B> Service<Req> for SizeLimitStatus<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = tonic::codegen::Bytes> + Send + 'static,
{
    type Response = http::Response<SizeLimitBody<B>>;
    type Error = S::Error;
    type Future = futures::future::MapOk<
        S::Future,
        fn(http::Response<B>) -> http::Response<SizeLimitBody<B>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures::TryFutureExt;
        self.inner.call(req).map_ok(|res| {
            let (mut parts, body) = res.into_parts();
            rewrite(&mut parts.headers);
            http::Response::from_parts(parts, SizeLimitBody { inner: body })
        })
    }
}

pin_project! {
    /// A response body whose trailers get the same rewrite.
    #[derive(Debug)]
    pub struct SizeLimitBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B: Default> Default for SizeLimitBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
        }
    }
}

impl<B: Body> Body for SizeLimitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx).map(|frame| {
            frame.map(|res| {
                res.map(|mut f| {
                    if let Some(trailers) = f.trailers_mut() {
                        rewrite(trailers);
                    }
                    f
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_size_limit_errors_are_rewritten() {
        let size = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
        );
        assert_eq!(
            size_limit_to_resource_exhausted(size).code(),
            Code::ResourceExhausted
        );
        let other = tonic::Status::out_of_range("index past the end");
        assert_eq!(
            size_limit_to_resource_exhausted(other).code(),
            Code::OutOfRange
        );
    }

    #[test]
    fn headers_are_rewritten_only_for_size_errors() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large"),
        );
        rewrite(&mut h);
        assert_eq!(h["grpc-status"], "8");
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert("grpc-message", HeaderValue::from_static("other"));
        rewrite(&mut h);
        assert_eq!(h["grpc-status"], "11");
    }
}
