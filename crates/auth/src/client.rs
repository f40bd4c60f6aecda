//! The client half: a tower layer that adds an ID token for one audience to every call.
//!
//! Tokens come from a [`TokenSource`]; in production that is [`GoogleIdTokens`], one per
//! audience, whose google-cloud-auth credentials cache the token and refresh it in the
//! background four minutes before it expires, so the hot path does not fetch and concurrent
//! first calls share one fetch. A token that cannot be had fails the call with `UNAVAILABLE`
//! naming the audience; it never panics.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use runmesh_auth::{GoogleIdTokens, IdTokenLayer};
//! # use tower_layer::Layer;
//! # async fn doc(channel: tonic::transport::Channel) -> Result<(), runmesh_auth::TokenError> {
//! let tokens = GoogleIdTokens::new("https://ping-abc-uc.a.run.app", None)?;
//! // Cloud Run admits the call only with a token for its URL.
//! let channel = IdTokenLayer::new(Arc::new(tokens)).layer(channel);
//! # let _ = channel;
//! # Ok(())
//! # }
//! ```

use std::{
    fmt,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};
use google_cloud_auth::credentials::idtoken::{self, IDTokenCredentials};
use http::{HeaderValue, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::server::SERVERLESS_AUTHORIZATION;

/// Longest wait for a token before the call fails with `UNAVAILABLE`.
pub const TOKEN_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no token could be had for an audience.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The credentials could not be built (bad ADC file, unsupported credential type).
    #[error("cannot build credentials: {0}")]
    Credentials(String),
    /// The token fetch failed (metadata server down, refused, bad answer).
    #[error("{0}")]
    Fetch(String),
    /// The token fetch took longer than [`TOKEN_FETCH_TIMEOUT`].
    #[error("no token within {0:?}")]
    TimedOut(Duration),
    /// The credentials library panicked (it does on a token without `exp`).
    #[error("the credentials library failed while fetching the token")]
    Panicked,
    /// The token cannot be sent as a header value.
    #[error("the token is not a valid header value")]
    NotAHeaderValue,
}

/// Where ID tokens for one audience come from; implemented by [`GoogleIdTokens`] and by fakes.
pub trait TokenSource: Send + Sync + fmt::Debug + 'static {
    /// The audience the tokens are minted for, named in errors.
    fn audience(&self) -> &str;
    /// A currently valid token; expected to be cached by the source, not fetched per call.
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>>;
}

/// ID tokens from google-cloud-auth for one audience: ADC or an explicit metadata server.
#[derive(Debug, Clone)]
pub struct GoogleIdTokens {
    audience: String,
    credentials: IDTokenCredentials,
    timeout: Duration,
}

impl GoogleIdTokens {
    /// Credentials for `audience`; build one per audience and share it.
    ///
    /// With `metadata_endpoint` (`http://host:port`) tokens come from that metadata server in
    /// the `full` format, which carries the caller's email; without it from Application Default
    /// Credentials (key file, gcloud's file, else the metadata server, which `GCE_METADATA_HOST`
    /// redirects and which takes priority over the endpoint given here). Must be called inside
    /// a tokio runtime: the credentials start their refresh task on construction.
    pub fn new(audience: &str, metadata_endpoint: Option<&str>) -> Result<Self, TokenError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TokenError::Credentials(
                "must be built inside a tokio runtime".into(),
            ));
        }
        let built = match metadata_endpoint {
            Some(endpoint) => idtoken::mds::Builder::new(audience)
                .with_format(idtoken::mds::Format::Full)
                .with_endpoint(endpoint.trim_end_matches('/'))
                .build(),
            None => idtoken::Builder::new(audience).with_include_email().build(),
        };
        let credentials = built.map_err(|e| TokenError::Credentials(with_causes(&e)))?;
        Ok(Self {
            audience: audience.to_string(),
            credentials,
            timeout: TOKEN_FETCH_TIMEOUT,
        })
    }

    /// Changes the longest wait for a token.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl TokenSource for GoogleIdTokens {
    fn audience(&self) -> &str {
        &self.audience
    }

    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(async move {
            let fetch = AssertUnwindSafe(self.credentials.id_token()).catch_unwind();
            match tokio::time::timeout(self.timeout, fetch).await {
                Ok(Ok(Ok(token))) => Ok(token),
                Ok(Ok(Err(err))) => Err(TokenError::Fetch(with_causes(&err))),
                Ok(Err(_panic)) => Err(TokenError::Panicked),
                Err(_elapsed) => Err(TokenError::TimedOut(self.timeout)),
            }
        })
    }
}

/// `err` and its sources, which hold the actual cause (connection refused, HTTP status).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !message.contains(&cause_text) {
            message = format!("{message}: {cause_text}");
        }
        source = cause.source();
    }
    message
}

/// Adds `x-serverless-authorization: Bearer <id token>` to every request (see `Bearer` for why
/// not `authorization`), or nothing when off.
#[derive(Clone)]
pub struct IdTokenLayer {
    bearer: Option<Arc<Bearer>>,
}

impl fmt::Debug for IdTokenLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdTokenLayer")
            .field("source", &self.bearer.as_ref().map(|b| &b.source))
            .finish()
    }
}

impl IdTokenLayer {
    /// Tokens from `source` on every request.
    pub fn new(source: Arc<dyn TokenSource>) -> Self {
        Self {
            bearer: Some(Arc::new(Bearer::new(source))),
        }
    }

    /// Passes requests through untouched, for an upstream that runs with `AUTH_MODE=off`.
    pub fn off() -> Self {
        Self { bearer: None }
    }
}

impl<S> Layer<S> for IdTokenLayer {
    type Service = IdToken<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdToken {
            inner,
            bearer: self.bearer.clone(),
        }
    }
}

/// The service [`IdTokenLayer`] produces.
#[derive(Clone)]
pub struct IdToken<S> {
    inner: S,
    bearer: Option<Arc<Bearer>>,
}

impl<S> fmt::Debug for IdToken<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdToken")
            .field("source", &self.bearer.as_ref().map(|b| &b.source))
            .finish_non_exhaustive()
    }
}

/// A tonic channel that presents an ID token on every call.
pub type AuthedChannel = IdToken<tonic::transport::Channel>;

impl<S, B, ResBody> Service<Request<B>> for IdToken<S>
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
        let Some(bearer) = self.bearer.clone() else {
            return Box::pin(self.inner.call(request));
        };
        // The clone is not ready; keep the instance `poll_ready` readied for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // A token that came in is for this hop, not the next: never pass it on.
            let headers = request.headers_mut();
            headers.remove(http::header::AUTHORIZATION);
            headers.remove(SERVERLESS_AUTHORIZATION);
            match bearer.value().await {
                Ok(value) => {
                    request
                        .headers_mut()
                        .insert(SERVERLESS_AUTHORIZATION, value);
                    inner.call(request).await
                }
                Err(err) => {
                    let audience = bearer.source.audience();
                    tracing::warn!(%audience, reason = %err, "no ID token for the upstream");
                    Ok(tonic::Status::unavailable(format!(
                        "ID token for audience {audience} unavailable: {err}"
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// A token source and the header value made of its latest token.
///
/// The value goes in `x-serverless-authorization`, which Cloud Run accepts as it accepts
/// `authorization` and checks first (as [`crate::ServerAuthLayer`] does), and it is not marked
/// sensitive: HTTP/2 stacks (h2, nghttp2) never enter `authorization` or a sensitive value into
/// the HPACK table, so a hop's ~1 KB token was Huffman-coded by the sender and decoded by the
/// receiver on every call, a fifth of a relay's instructions per call (callgrind). Indexed, it
/// crosses a connection once and then as a table reference. HPACK only matches whole values, so
/// recovering it through the table means guessing all of it, signature included (RFC 7541,
/// section 7.1); never-indexing is for short, guessable values. `SECURITY.md` has the rest.
struct Bearer {
    source: Arc<dyn TokenSource>,
    /// The latest token and its value. A source hands out the same token until it renews it,
    /// and making the value (formatting, checking and copying ~1 KB) was ~2.4 k instructions of
    /// every call; cloning it is a reference count.
    last: Mutex<Option<(String, HeaderValue)>>,
}

impl Bearer {
    fn new(source: Arc<dyn TokenSource>) -> Self {
        Self {
            source,
            last: Mutex::new(None),
        }
    }

    /// `Bearer <token>` for the source's current token.
    async fn value(&self) -> Result<HeaderValue, TokenError> {
        let token = self.source.token().await?;
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((known, value)) = last.as_ref()
            && *known == token
        {
            return Ok(value.clone());
        }
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| TokenError::NotAHeaderValue)?;
        *last = Some((token, value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out whatever token the test last set.
    #[derive(Debug)]
    struct Settable(Mutex<String>);

    impl TokenSource for Settable {
        fn audience(&self) -> &str {
            "http://upstream"
        }
        fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
            let token = self.0.lock().unwrap().clone();
            Box::pin(async move { Ok(token) })
        }
    }

    #[tokio::test]
    async fn the_value_is_made_once_per_token() {
        let source = Arc::new(Settable(Mutex::new("first.token.sig".into())));
        let bearer = Bearer::new(source.clone());
        let a = bearer.value().await.unwrap();
        let b = bearer.value().await.unwrap();
        assert_eq!(a, "Bearer first.token.sig");
        assert_eq!(
            a.as_bytes().as_ptr(),
            b.as_bytes().as_ptr(),
            "the same token reuses the value it made"
        );

        *source.0.lock().unwrap() = "second.token.sig".into();
        let c = bearer.value().await.unwrap();
        assert_eq!(
            c, "Bearer second.token.sig",
            "a renewed token is sent at once"
        );

        *source.0.lock().unwrap() = "bad\ntoken".into();
        for _ in 0..2 {
            assert!(
                matches!(bearer.value().await, Err(TokenError::NotAHeaderValue)),
                "a token that is no header value is refused every time"
            );
        }
    }
}
