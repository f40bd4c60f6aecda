//! Statuses rewritten on their way through, in response headers (trailers-only responses) and
//! in trailers alike.
//!
//! - Message-size errors carry gRPC's code for them: tonic reports a message over the size limit
//!   as `OUT_OF_RANGE`; grpc-go and gRPC's C core say `RESOURCE_EXHAUSTED`, and that is what
//!   clients and the API contract expect ([`SizeLimitStatusLayer`], on every server).
//! - A `grpc-status-details-bin` that is not base64 becomes `INTERNAL`: tonic's client reads it
//!   with an `expect` and panics, so a foreign server's bad trailer would crash the caller
//!   ([`MalformedDetailsLayer`], on the `runmesh` client; a hop's own client checks the same with
//!   [`malformed_details`]).

use std::{
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll},
};

use base64::{
    Engine, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
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
const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// How tonic decodes `grpc-status-details-bin`: standard alphabet, padding optional.
const DETAILS: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why `headers`' `grpc-status-details-bin` cannot be read, if it is there and is not base64.
pub fn malformed_details(headers: &HeaderMap) -> Option<base64::DecodeError> {
    let details = headers.get(&GRPC_STATUS_DETAILS)?;
    DETAILS.decode(details.as_bytes()).err()
}

/// A rewrite of the status a response carries.
pub trait Rewrite: 'static {
    /// Rewrites the status in `headers`, response headers or trailers.
    fn rewrite(headers: &mut HeaderMap);
}

/// tonic's oversize-message `OUT_OF_RANGE` becomes `RESOURCE_EXHAUSTED`.
#[derive(Debug)]
pub enum SizeLimit {}

impl Rewrite for SizeLimit {
    fn rewrite(headers: &mut HeaderMap) {
        let out_of_range = HeaderValue::from_static("11");
        if headers.get(&GRPC_STATUS) != Some(&out_of_range) {
            return;
        }
        let is_size = headers
            .get(&GRPC_MESSAGE)
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
        if is_size {
            headers.insert(GRPC_STATUS, HeaderValue::from_static("8"));
        }
    }
}

/// A status whose `grpc-status-details-bin` is not base64 becomes `INTERNAL` saying so.
#[derive(Debug)]
pub enum MalformedDetails {}

impl Rewrite for MalformedDetails {
    fn rewrite(headers: &mut HeaderMap) {
        let Some(e) = malformed_details(headers) else {
            return;
        };
        headers.remove(&GRPC_STATUS_DETAILS);
        let status = tonic::Status::internal(format!(
            "malformed grpc-status-details-bin from the server: {e}"
        ));
        // Our own message always fits in a header; were it refused, the details would still be
        // gone and the server's status would stand, which tonic reads without panicking.
        let _ = status.add_header(headers);
    }
}

/// [`RewriteStatus`] with [`SizeLimit`], for servers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SizeLimitStatusLayer;

impl<S> Layer<S> for SizeLimitStatusLayer {
    type Service = RewriteStatus<S, SizeLimit>;
    fn layer(&self, inner: S) -> Self::Service {
        RewriteStatus::new(inner)
    }
}

/// [`RewriteStatus`] with [`MalformedDetails`], for a client's channel.
#[derive(Debug, Clone, Copy, Default)]
pub struct MalformedDetailsLayer;

impl<S> Layer<S> for MalformedDetailsLayer {
    type Service = RewriteStatus<S, MalformedDetails>;
    fn layer(&self, inner: S) -> Self::Service {
        RewriteStatus::new(inner)
    }
}

/// Rewrites the status of every response with `R`, in its headers and in its trailers.
#[derive(Debug)]
pub struct RewriteStatus<S, R> {
    inner: S,
    rewrite: PhantomData<fn() -> R>,
}

impl<S, R> RewriteStatus<S, R> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            rewrite: PhantomData,
        }
    }
}

impl<S: Clone, R> Clone for RewriteStatus<S, R> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

/// The response with `R` applied to its headers, and to its trailers once they come.
fn rewritten<B, R: Rewrite>(
    response: http::Response<B>,
) -> http::Response<RewriteStatusBody<B, R>> {
    let (mut parts, body) = response.into_parts();
    R::rewrite(&mut parts.headers);
    http::Response::from_parts(
        parts,
        RewriteStatusBody {
            inner: body,
            rewrite: PhantomData,
        },
    )
}

impl<S, R, Req, B> Service<Req> for RewriteStatus<S, R>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    R: Rewrite,
{
    type Response = http::Response<RewriteStatusBody<B, R>>;
    type Error = S::Error;
    type Future = futures::future::MapOk<
        S::Future,
        fn(http::Response<B>) -> http::Response<RewriteStatusBody<B, R>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures::TryFutureExt;
        self.inner.call(req).map_ok(rewritten::<B, R>)
    }
}

pin_project! {
    /// A response body whose trailers get the same rewrite.
    #[derive(Debug)]
    pub struct RewriteStatusBody<B, R> {
        #[pin]
        inner: B,
        rewrite: PhantomData<fn() -> R>,
    }
}

impl<B: Default, R> Default for RewriteStatusBody<B, R> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            rewrite: PhantomData,
        }
    }
}

impl<B: Body, R: Rewrite> Body for RewriteStatusBody<B, R> {
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
                        R::rewrite(trailers);
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
    fn only_details_that_are_not_base64_make_a_status_internal() {
        let status = |details: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_static("9"));
            h.insert("grpc-message", HeaderValue::from_static("precondition"));
            if let Some(d) = details {
                h.insert("grpc-status-details-bin", HeaderValue::from_static(d));
            }
            MalformedDetails::rewrite(&mut h);
            tonic::Status::from_header_map(&h).expect("a status")
        };
        for kept in [None, Some("CAk"), Some("CAk=")] {
            let s = status(kept);
            assert_eq!(s.code(), Code::FailedPrecondition, "{kept:?}");
            assert_eq!(s.message(), "precondition", "{kept:?}");
        }
        assert_eq!(status(Some("CAk")).details(), b"\x08\x09");
        let s = status(Some("not base64!"));
        assert_eq!(s.code(), Code::Internal);
        assert!(
            s.message()
                .starts_with("malformed grpc-status-details-bin from the server: "),
            "{s:?}"
        );
        assert!(s.details().is_empty());
    }

    #[test]
    fn headers_are_rewritten_only_for_size_errors() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large"),
        );
        SizeLimit::rewrite(&mut h);
        assert_eq!(h["grpc-status"], "8");
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert("grpc-message", HeaderValue::from_static("other"));
        SizeLimit::rewrite(&mut h);
        assert_eq!(h["grpc-status"], "11");
    }
}
