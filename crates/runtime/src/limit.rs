//! A bound on calls in flight, answered with `RESOURCE_EXHAUSTED` beyond it.
//!
//! A call holds its permit until its response body is done, so an open stream counts for as long
//! as it runs. Refusing at once (rather than queueing) keeps memory flat under a burst and tells
//! the caller to back off, which is what gRPC's `RESOURCE_EXHAUSTED` means.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::guarded::GuardedBody;

/// Adds [`InFlightLimit`] to a server.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
    service: &'static str,
}

impl InFlightLimitLayer {
    /// At most `max` calls at once; `service` names the hop in the refusal.
    pub fn new(max: usize, service: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            service,
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            limit: self.clone(),
        }
    }
}

/// Refuses calls beyond the limit; health and reflection are never refused.
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    limit: InFlightLimitLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for InFlightLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<PermitBody<ResBody>>;
    type Error = S::Error;
    type Future = Either<
        BoxFuture<'static, Result<Self::Response, Self::Error>>,
        futures::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let exempt = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        let permit = if exempt {
            None
        } else {
            match self.limit.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "{}: overloaded: {} calls in flight; retry with backoff",
                        self.limit.service, self.limit.max
                    ));
                    let res = status
                        .into_http::<ResBody>()
                        .map(|inner| PermitBody::new(inner, None));
                    return Either::Right(futures::future::ready(Ok(res)));
                }
            }
        };
        let fut = self.inner.call(req);
        Either::Left(Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|inner| PermitBody::new(inner, permit)))
        }))
    }
}

/// A response body that holds its call's permit until it is dropped.
pub type PermitBody<B> = GuardedBody<B, OwnedSemaphorePermit>;
