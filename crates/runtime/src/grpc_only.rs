//! Only gRPC is served: another `content-type` gets HTTP 415, as gRPC over HTTP/2 asks.
//!
//! tonic decodes any body as gRPC whatever its content type; a JSON or form post would be read as
//! length-prefixed protobuf. The spec says a server SHOULD answer 415 (Unsupported Media Type).

use std::task::{Context, Poll};

use futures::future::Either;
use http::{HeaderValue, StatusCode, header::CONTENT_TYPE};
use tower::{Layer, Service};

/// Adds [`GrpcOnly`] to a server.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcOnlyLayer;

impl<S> Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcOnly { inner }
    }
}

/// Refuses requests whose `content-type` is not `application/grpc…`.
#[derive(Debug, Clone)]
pub struct GrpcOnly<S> {
    inner: S,
}

fn is_grpc(value: Option<&HeaderValue>) -> bool {
    value.is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcOnly<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, futures::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if is_grpc(req.headers().get(CONTENT_TYPE)) {
            return Either::Left(self.inner.call(req));
        }
        let mut res = tonic::Status::invalid_argument("only application/grpc is served")
            .into_http::<ResBody>();
        *res.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Either::Right(futures::future::ready(Ok(res)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_and_their_suffixes_pass() {
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web",
        ] {
            assert!(is_grpc(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in ["application/json", "text/plain", "grpc"] {
            assert!(!is_grpc(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_grpc(None));
    }
}
