//! Shared fixtures: a local identity server, good claims to spoil, and a layered service to call.

#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    sync::{Arc, LazyLock},
    time::{SystemTime, UNIX_EPOCH},
};

use http::{Request, Response};
use runmesh_auth::{
    AuthMode, Caller, ServerAuthConfig, ServerAuthLayer, Verifier,
    idp::{IdentityServer, Issuer},
};
use serde_json::{Value, json};
use tower::{Service, ServiceExt, service_fn};
use tower_layer::Layer;

/// The audience of the service under test.
pub const AUDIENCE: &str = "https://ping.test";
/// A caller that is on the allow-list when one is set.
pub const RELAY: &str = "relay@mesh.iam.gserviceaccount.com";
/// A caller that is never on the allow-list.
pub const STRANGER: &str = "stranger@example.com";

/// One issuer for tests that do not count its mints or fetches: RSA key generation is slow.
static SHARED_ISSUER: LazyLock<Arc<Issuer>> =
    LazyLock::new(|| Arc::new(Issuer::generate().expect("issuer")));

/// The shared issuer served on loopback ports, with metadata emulations for `identities`.
pub async fn identity_server(identities: &[&str]) -> (Arc<Issuer>, IdentityServer) {
    serve(SHARED_ISSUER.clone(), identities).await
}

/// A fresh issuer, whose counters belong to the calling test, served like [`identity_server`].
pub async fn fresh_identity_server(identities: &[&str]) -> (Arc<Issuer>, IdentityServer) {
    serve(Arc::new(Issuer::generate().expect("issuer")), identities).await
}

async fn serve(issuer: Arc<Issuer>, identities: &[&str]) -> (Arc<Issuer>, IdentityServer) {
    let server = IdentityServer::start(issuer.clone(), identities)
        .await
        .expect("identity server");
    (issuer, server)
}

/// Server auth config for `mode` against `server`'s JWKS.
pub fn config(mode: AuthMode, server: &IdentityServer, allowed: &[&str]) -> ServerAuthConfig {
    ServerAuthConfig {
        mode,
        audiences: vec![AUDIENCE.to_string(), "https://ping.other".to_string()],
        jwks_url: server.jwks_url(),
        allowed_callers: allowed.iter().map(|s| s.to_string()).collect(),
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Claims of a valid token from `email`, to spoil one at a time.
pub fn claims(email: &str) -> Value {
    let now = now();
    json!({
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "sub": "112233445566778899001",
        "email": email,
        "email_verified": true,
        "iat": now,
        "exp": now + 3600,
    })
}

/// A handler behind the server auth layer built from `config`.
pub type Guarded = runmesh_auth::ServerAuth<
    tower::util::ServiceFn<
        fn(Request<String>) -> std::future::Ready<Result<Response<String>, Infallible>>,
    >,
>;

/// The echo handler behind a server auth layer.
pub fn guarded_by(layer: &ServerAuthLayer) -> Guarded {
    fn echo(request: Request<String>) -> std::future::Ready<Result<Response<String>, Infallible>> {
        let caller = request.extensions().get::<Caller>().map(|c| c.0.clone());
        std::future::ready(Ok(Response::new(caller.unwrap_or_default())))
    }
    layer.layer(service_fn(
        echo as fn(Request<String>) -> std::future::Ready<Result<Response<String>, Infallible>>,
    ))
}

/// A verifier for `config` that refetches keys at once on an unknown `kid`.
pub fn eager_verifier(config: &ServerAuthConfig) -> Arc<Verifier> {
    Arc::new(Verifier::new(config).with_min_refetch_interval(std::time::Duration::ZERO))
}

/// Calls `service` on `path` with `headers`; `Ok(caller)` when the handler ran.
pub async fn call_path(
    service: &mut Guarded,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<String, tonic::Status> {
    let mut request = Request::builder().uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(String::new()).expect("request");
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("infallible");
    match tonic::Status::from_header_map(response.headers()) {
        Some(status) => Err(status),
        None => Ok(response.into_body()),
    }
}

/// Calls the ping method with `authorization: Bearer <token>`.
pub async fn call_with_token(service: &mut Guarded, token: &str) -> Result<String, tonic::Status> {
    let value = format!("Bearer {token}");
    call_path(
        service,
        "/runmesh.v1.Ping/Ping",
        &[("authorization", &value)],
    )
    .await
}
