//! Sends each call to the app's own service or to tonic's router, by its path.
//!
//! tonic's `Routes` is an axum router: every call paid for a path match, a URL-parameter map
//! and two body conversions each way, about 3 k of a relay call's ~100 k instructions. The app
//! has one service of its own, the one every call but health and reflection is for, so its calls
//! go straight to it and only the rest take the router.

use std::{
    convert::Infallible,
    task::{Context, Poll, ready},
};

use futures::future::Either;
use tonic::{body::Body, codegen::Bytes, server::NamedService, service::Routes};
use tower::Service;

/// The app's own service `S` in front of the router that serves everything else.
#[derive(Debug, Clone)]
pub(crate) struct Dispatch<S> {
    own: S,
    rest: Routes,
}

impl<S: NamedService> Dispatch<S> {
    pub(crate) fn new(own: S, rest: Routes) -> Self {
        Self {
            own,
            rest: rest.prepare(),
        }
    }

    /// Whether `path` is `/{S::NAME}/{method}`: the method is the service's to judge, so an
    /// unknown one gets its `UNIMPLEMENTED`, not the router's.
    fn is_own(path: &str) -> bool {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(S::NAME))
            .is_some_and(|method| method.starts_with('/'))
    }
}

impl<S, B> Service<http::Request<B>> for Dispatch<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, <Routes as Service<http::Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready!(self.own.poll_ready(cx))?;
        Service::<http::Request<B>>::poll_ready(&mut self.rest, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if Self::is_own(request.uri().path()) {
            Either::Left(self.own.call(request.map(Body::new)))
        } else {
            Either::Right(self.rest.call(request))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Ready, sync::Arc};

    use tower::ServiceExt;

    use super::*;

    /// Answers every call with `x-served-by: own` and remembers the paths it was given.
    #[derive(Clone, Default)]
    struct Own(Arc<std::sync::Mutex<Vec<String>>>);

    impl NamedService for Own {
        const NAME: &'static str = "runmesh.ping.v1.PingService";
    }

    impl Service<http::Request<Body>> for Own {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            self.0.lock().unwrap().push(request.uri().path().to_owned());
            let mut response = http::Response::new(Body::empty());
            response
                .headers_mut()
                .insert("x-served-by", http::HeaderValue::from_static("own"));
            std::future::ready(Ok(response))
        }
    }

    /// Who answered a call to `path`: the app's own service, or the router (whose fallback
    /// answers `UNIMPLEMENTED`, as there is nothing else to route to here).
    async fn served_by(dispatch: &Dispatch<Own>, path: &str) -> &'static str {
        let request = http::Request::post(path)
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap();
        let response = dispatch.clone().oneshot(request).await.unwrap();
        let header = |name| response.headers().get(name).map(|v| v.to_str().unwrap());
        match (header("x-served-by"), header("grpc-status")) {
            (Some("own"), None) => "own",
            (None, Some("12")) => "router",
            other => panic!("{path}: unexpected answer {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_apps_own_paths_reach_it_and_nothing_else_does() {
        let own = Own::default();
        let seen = own.0.clone();
        let dispatch = Dispatch::new(own, Routes::default());
        for path in [
            "/runmesh.ping.v1.PingService/Send",
            "/runmesh.ping.v1.PingService/Chat",
            // Unknown methods are the service's to refuse.
            "/runmesh.ping.v1.PingService/Nope",
        ] {
            assert_eq!(served_by(&dispatch, path).await, "own", "{path}");
        }
        for path in [
            "/grpc.health.v1.Health/Check",
            "/runmesh.ping.v1.PingServiceX/Send",
            "/runmesh.ping.v1.PingService",
            "/",
        ] {
            assert_eq!(served_by(&dispatch, path).await, "router", "{path}");
        }
        assert_eq!(seen.lock().unwrap().len(), 3);
    }
}
