//! The client layer with real google-cloud-auth credentials against the local identity
//! server's metadata emulation: one fetch, reused; refreshed before expiry; failures become
//! `UNAVAILABLE` naming the audience, never a panic.

#[path = "support/harness.rs"]
mod harness;

use std::{convert::Infallible, sync::Arc, time::Duration};

use harness::*;
use http::{Request, Response};
use runmesh_auth::{
    AuthMode, GoogleIdTokens, IdTokenLayer, ServerAuthLayer,
    idp::{IdentityServer, Issuer},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::Code;
use tower::{Service, ServiceExt, service_fn, util::BoxCloneService};
use tower_layer::Layer;

/// What the upstream saw of the credentials headers.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    authorization: Option<String>,
    /// `x-serverless-authorization`, where a hop's token travels.
    token: Option<String>,
    /// Whether the token's value was marked sensitive (HPACK would never index it).
    sensitive: bool,
}

/// An upstream that answers with the credentials headers it received, as JSON.
fn upstream() -> BoxCloneService<Request<String>, Response<String>, Infallible> {
    BoxCloneService::new(service_fn(|request: Request<String>| async move {
        let headers = request.headers();
        let token = headers.get("x-serverless-authorization");
        let seen = json!({
            "authorization": headers.get("authorization").map(|v| v.to_str().expect("ascii")),
            "token": token.map(|v| v.to_str().expect("ascii")),
            "sensitive": token.is_some_and(|v| v.is_sensitive()),
        });
        Ok::<_, Infallible>(Response::new(seen.to_string()))
    }))
}

/// Sends one request with `headers` through `service`; `Err` is the gRPC status it answered.
async fn send<S>(service: &mut S, headers: &[(&str, &str)]) -> Result<Seen, tonic::Status>
where
    S: Service<Request<String>, Response = Response<String>, Error = Infallible>,
{
    let mut request = Request::builder().uri("/runmesh.v1.Ping/Ping");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request.body(String::new()).expect("request"))
        .await
        .expect("infallible");
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Err(status);
    }
    let seen: Value = serde_json::from_str(response.body()).expect("json");
    Ok(Seen {
        authorization: seen["authorization"].as_str().map(String::from),
        token: seen["token"].as_str().map(String::from),
        sensitive: seen["sensitive"].as_bool().expect("bool"),
    })
}

/// Credentials for `AUDIENCE` from `email`'s metadata emulation on `server`.
fn tokens_from(server: &IdentityServer, email: &str) -> GoogleIdTokens {
    let endpoint = server.metadata_endpoint(email).expect("identity listener");
    GoogleIdTokens::new(AUDIENCE, Some(&endpoint)).expect("credentials")
}

fn exp_of(bearer: &str) -> u64 {
    let token = bearer.strip_prefix("Bearer ").expect("bearer");
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token).expect("claims");
    claims["exp"].as_u64().expect("exp")
}

#[tokio::test]
async fn the_token_is_fetched_once_and_reused_across_calls() {
    let (issuer, server) = fresh_identity_server(&[RELAY]).await;
    let layer = IdTokenLayer::new(Arc::new(tokens_from(&server, RELAY)));
    let mut service = layer.layer(upstream());
    let first = send(&mut service, &[]).await.expect("first call");
    assert!(
        first
            .token
            .as_deref()
            .is_some_and(|t| t.starts_with("Bearer ey")),
        "{first:?}"
    );
    assert_eq!(
        first.authorization, None,
        "the token is not in authorization"
    );
    assert!(
        !first.sensitive,
        "a sensitive value is never HPACK-indexed, and re-encoded on every call"
    );
    for _ in 0..20 {
        assert_eq!(send(&mut service, &[]).await.expect("call"), first);
    }
    assert_eq!(issuer.minted(RELAY), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_first_calls_cause_one_fetch() {
    let (issuer, server) = fresh_identity_server(&[RELAY]).await;
    let service = IdTokenLayer::new(Arc::new(tokens_from(&server, RELAY))).layer(upstream());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move { send(&mut service, &[]).await })
        })
        .collect();
    for call in futures::future::join_all(calls).await {
        assert!(call.expect("task").expect("call").token.is_some());
    }
    assert_eq!(issuer.minted(RELAY), 1);
}

#[tokio::test]
async fn the_token_is_refreshed_before_it_expires() {
    // google-cloud-auth refreshes 4 minutes before `exp`: 4m02s tokens refresh within seconds.
    let issuer = Issuer::generate()
        .expect("issuer")
        .with_identity_lifetime(Duration::from_secs(242));
    let issuer = Arc::new(issuer);
    let server = IdentityServer::start(issuer.clone(), &[RELAY])
        .await
        .expect("server");
    let mut service = IdTokenLayer::new(Arc::new(tokens_from(&server, RELAY))).layer(upstream());
    let first = send(&mut service, &[]).await.expect("first call");
    let first_token = first.token.expect("token");

    // The issuer counts a token when it serves it, a moment before google-cloud-auth has cached
    // it: so wait for a call that carries a new token, not for the count.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let call = send(&mut service, &[]).await.expect("call");
        if call.token.expect("token") != first_token {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refreshed token used within 10 s (minted {})",
            issuer.minted(RELAY)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(issuer.minted(RELAY) >= 2);
    assert!(
        exp_of(&first_token) > now() + 200,
        "refreshed well before the first token expired"
    );
}

#[tokio::test]
async fn metadata_server_down_is_unavailable_naming_the_audience() {
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let tokens = GoogleIdTokens::new(AUDIENCE, Some(&endpoint)).expect("credentials");
    let mut service = IdTokenLayer::new(Arc::new(tokens)).layer(upstream());
    for _ in 0..2 {
        let status = send(&mut service, &[]).await.expect_err("no token");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains(AUDIENCE), "{}", status.message());
    }
}

#[tokio::test]
async fn a_token_without_exp_fails_the_call_instead_of_panicking() {
    // A metadata server answering a JWT without `exp`: google-cloud-auth panics on it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let no_exp = Issuer::generate()
        .expect("issuer")
        .sign_claims(&json!({"iss": "https://accounts.google.com", "aud": AUDIENCE}));
    let app = axum::Router::new().fallback(move || {
        let token = no_exp.clone();
        async move { ([("metadata-flavor", "Google")], token) }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let tokens = GoogleIdTokens::new(AUDIENCE, Some(&endpoint)).expect("credentials");
    let mut service = IdTokenLayer::new(Arc::new(tokens)).layer(upstream());
    for _ in 0..2 {
        let status = send(&mut service, &[]).await.expect_err("no token");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains(AUDIENCE), "{}", status.message());
    }
}

#[tokio::test]
async fn incoming_credentials_are_replaced_by_this_hops_token() {
    let (_issuer, server) = identity_server(&[RELAY]).await;
    let mut service = IdTokenLayer::new(Arc::new(tokens_from(&server, RELAY))).layer(upstream());
    let seen = send(
        &mut service,
        &[
            ("authorization", "Bearer end-user-token"),
            ("x-serverless-authorization", "Bearer platform-token"),
        ],
    )
    .await
    .expect("call");
    let token = seen.token.expect("token");
    assert!(token.starts_with("Bearer ey"), "{token}");
    assert_eq!(seen.authorization, None, "the end user's token went on");
}

#[tokio::test]
async fn the_off_layer_passes_requests_through_untouched() {
    let mut service = IdTokenLayer::off().layer(upstream());
    assert_eq!(
        send(&mut service, &[]).await.expect("call"),
        Seen {
            authorization: None,
            token: None,
            sensitive: false,
        }
    );
    let seen = send(&mut service, &[("authorization", "Bearer mine")])
        .await
        .expect("call");
    assert_eq!(seen.authorization.as_deref(), Some("Bearer mine"));
}

#[tokio::test]
async fn a_service_identity_token_reaches_the_handler_as_its_caller() {
    let (_issuer, server) = identity_server(&[RELAY, STRANGER]).await;
    let guard = ServerAuthLayer::new(&config(AuthMode::Verify, &server, &[RELAY]));
    let for_relay = IdTokenLayer::new(Arc::new(tokens_from(&server, RELAY)));
    let for_stranger = IdTokenLayer::new(Arc::new(tokens_from(&server, STRANGER)));

    let mut relay = for_relay.layer(guarded_by(&guard));
    let response = relay
        .ready()
        .await
        .expect("ready")
        .call(
            Request::builder()
                .uri("/runmesh.v1.Ping/Ping")
                .body(String::new())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(
        tonic::Status::from_header_map(response.headers()).map(|s| s.code()),
        None
    );
    assert_eq!(response.body(), RELAY);

    let mut stranger = for_stranger.layer(guarded_by(&guard));
    let response = stranger
        .ready()
        .await
        .expect("ready")
        .call(
            Request::builder()
                .uri("/runmesh.v1.Ping/Ping")
                .body(String::new())
                .expect("request"),
        )
        .await
        .expect("infallible");
    let status = tonic::Status::from_header_map(response.headers()).expect("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
}
