//! The server half: a tower layer that admits a call only with a valid ID token.
//!
//! It sits in front of a tonic server (`Server::builder().layer(ServerAuthLayer::new(..))`) or
//! any service of `http::Request<B>`. The token is read from `x-serverless-authorization`,
//! else `authorization` (Cloud Run's order), checked by the [`Verifier`], and the verified
//! caller is put into the request's extensions as [`Caller`] for the handler. Refusals are
//! answered here as trailers-only gRPC responses; the handler never sees them. Health and
//! reflection stay open because Cloud Run's probes carry no token.
//!
//! ```no_run
//! # use runmesh_auth::{ServerAuthConfig, ServerAuthLayer};
//! # fn doc(config: ServerAuthConfig) {
//! let server = tonic::transport::Server::builder()
//!     // Every call but health and reflection needs a caller we can name.
//!     .layer(ServerAuthLayer::new(&config));
//! # let _ = server;
//! # }
//! ```

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    config::{AuthMode, ServerAuthConfig},
    verify::{Verifier, VerifyError},
};

/// gRPC services reachable without a token: probes and tooling carry none.
pub const OPEN_PATH_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The header Cloud Run reads first; callers use it when `authorization` is the app's own.
pub const SERVERLESS_AUTHORIZATION: &str = "x-serverless-authorization";

/// The verified caller of a request (its token's email, else its sub), for the handler.
///
/// Absent when auth is off or the path is open, so handlers must not treat it as guaranteed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// Adds token verification to a service; cheap to clone, one [`Verifier`] shared by all.
#[derive(Clone)]
pub struct ServerAuthLayer {
    verifier: Option<Arc<Verifier>>,
}

impl fmt::Debug for ServerAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerAuthLayer")
            .field("verifier", &self.verifier)
            .finish()
    }
}

impl ServerAuthLayer {
    /// The layer for `config`; with `AUTH_MODE=off` it admits everything and says so once.
    pub fn new(config: &ServerAuthConfig) -> Self {
        if config.mode == AuthMode::Off {
            tracing::warn!("AUTH_MODE=off: every call is admitted without a token");
            return Self { verifier: None };
        }
        Self::from_verifier(Arc::new(Verifier::new(config)))
    }

    /// A layer around an existing verifier, to share its caches or tune it in tests.
    pub fn from_verifier(verifier: Arc<Verifier>) -> Self {
        Self {
            verifier: Some(verifier),
        }
    }
}

impl<S> Layer<S> for ServerAuthLayer {
    type Service = ServerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerAuth {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`ServerAuthLayer`] produces: verifies, then calls `S`.
#[derive(Clone)]
pub struct ServerAuth<S> {
    inner: S,
    verifier: Option<Arc<Verifier>>,
}

impl<S> fmt::Debug for ServerAuth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerAuth")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for ServerAuth<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let verifier = match &self.verifier {
            Some(verifier) if !is_open(request.uri().path()) => verifier.clone(),
            _ => return Box::pin(self.inner.call(request)),
        };
        // The clone is not ready; keep the instance `poll_ready` readied for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let verified = match bearer_token(request.headers()) {
                Ok(token) => verifier.verify(token).await,
                Err(err) => Err(err),
            };
            match verified {
                Ok(verified) => {
                    // The RPC span declares `enduser.id` (OpenTelemetry's name for the caller);
                    // recording it here puts the caller on the span and the access-log line.
                    tracing::Span::current().record("enduser.id", verified.caller.as_str());
                    request.extensions_mut().insert(Caller(verified.caller));
                    inner.call(request).await
                }
                Err(err) => Ok(tonic::Status::from(err).into_http()),
            }
        })
    }
}

/// Whether `path` is reachable without a token.
fn is_open(path: &str) -> bool {
    OPEN_PATH_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The bearer token of `x-serverless-authorization`, else of `authorization`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, VerifyError> {
    let value = headers
        .get(SERVERLESS_AUTHORIZATION)
        .or_else(|| headers.get(http::header::AUTHORIZATION))
        .ok_or(VerifyError::NoToken)?;
    let value = value
        .to_str()
        .map_err(|_| VerifyError::Malformed("authorization is not ASCII"))?
        .trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(VerifyError::Malformed("not a bearer token"));
    }
    match token.trim() {
        "" => Err(VerifyError::NoToken),
        token => Ok(token),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn serverless_authorization_is_read_before_authorization() {
        let h = headers(&[
            ("authorization", "Bearer app-token"),
            ("x-serverless-authorization", "Bearer platform-token"),
        ]);
        assert_eq!(bearer_token(&h), Ok("platform-token"));
        let h = headers(&[("authorization", "bearer  t ")]);
        assert_eq!(bearer_token(&h), Ok("t"));
    }

    #[test]
    fn missing_empty_and_non_bearer_credentials_are_refused() {
        assert_eq!(bearer_token(&headers(&[])), Err(VerifyError::NoToken));
        let h = headers(&[("authorization", "Bearer ")]);
        assert_eq!(bearer_token(&h), Err(VerifyError::NoToken));
        let h = headers(&[("authorization", "Bearer")]);
        assert_eq!(bearer_token(&h), Err(VerifyError::NoToken));
        let h = headers(&[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(
            bearer_token(&h),
            Err(VerifyError::Malformed("not a bearer token"))
        );
    }

    #[test]
    fn only_health_and_reflection_are_open() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_open(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/runmesh.v1.Ping/Ping"));
        assert!(!is_open("/grpc.health.v1.HealthX/Check"));
    }
}
