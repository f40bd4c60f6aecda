//! The server layer against tokens from the local issuer: one accepted case, then every way a
//! token can be wrong, each refused with its gRPC code before the handler runs.

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use harness::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use runmesh_auth::{AuthMode, ServerAuthLayer, idp::Issuer};
use serde_json::json;
use tonic::Code;

/// A verifying layer in front of the echo handler, with its issuer and identity server.
async fn verifying(
    allowed: &[&str],
) -> (
    std::sync::Arc<Issuer>,
    runmesh_auth::idp::IdentityServer,
    Guarded,
) {
    let (issuer, server) = identity_server(&[]).await;
    let layer = ServerAuthLayer::new(&config(AuthMode::Verify, &server, allowed));
    (issuer, server, guarded_by(&layer))
}

fn assert_code(result: Result<String, tonic::Status>, code: Code) -> tonic::Status {
    match result {
        Err(status) if status.code() == code => status,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn b64(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

#[tokio::test]
async fn valid_token_is_admitted_and_the_handler_sees_its_caller() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let token = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    assert_eq!(
        call_with_token(&mut service, &token)
            .await
            .expect("admitted"),
        RELAY
    );
}

#[tokio::test]
async fn token_for_a_second_configured_audience_is_admitted() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let token = issuer.mint("https://ping.other", RELAY, Duration::from_secs(600));
    assert_eq!(
        call_with_token(&mut service, &token)
            .await
            .expect("admitted"),
        RELAY
    );
}

#[tokio::test]
async fn token_without_email_names_its_sub() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let mut claims = claims(RELAY);
    claims.as_object_mut().expect("object").remove("email");
    claims
        .as_object_mut()
        .expect("object")
        .remove("email_verified");
    let token = issuer.sign_claims(&claims);
    let caller = call_with_token(&mut service, &token)
        .await
        .expect("admitted");
    assert_eq!(caller, "112233445566778899001");
}

#[tokio::test]
async fn no_authorization_header_is_unauthenticated() {
    let (_issuer, _server, mut service) = verifying(&[]).await;
    let status = assert_code(
        call_path(&mut service, "/runmesh.v1.Ping/Ping", &[]).await,
        Code::Unauthenticated,
    );
    assert_eq!(status.message(), "missing bearer token");
}

#[tokio::test]
async fn empty_bearer_is_unauthenticated() {
    let (_issuer, _server, mut service) = verifying(&[]).await;
    let result = call_path(
        &mut service,
        "/runmesh.v1.Ping/Ping",
        &[("authorization", "Bearer ")],
    )
    .await;
    assert_code(result, Code::Unauthenticated);
}

#[tokio::test]
async fn non_jwt_bearer_is_unauthenticated() {
    let (_issuer, _server, mut service) = verifying(&[]).await;
    let status = assert_code(
        call_with_token(&mut service, "not-a-jwt").await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("not a JWT"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn alg_none_token_is_unauthenticated() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let header = json!({"alg": "none", "typ": "JWT", "kid": issuer.kid()});
    let token = format!("{}.{}.", b64(&header), b64(&claims(RELAY)));
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("algorithm"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn hs256_token_signed_with_a_shared_secret_is_unauthenticated() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(issuer.kid());
    // The classic confusion: the "secret" is public, here the key's own modulus.
    let modulus = issuer.jwks()["keys"][0]["n"]
        .as_str()
        .expect("n")
        .to_string();
    let token = jsonwebtoken::encode(
        &header,
        &claims(RELAY),
        &EncodingKey::from_secret(modulus.as_bytes()),
    )
    .expect("hs256");
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("algorithm"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn token_with_an_unknown_kid_is_unauthenticated() {
    let (_issuer, server, mut service) = verifying(&[]).await;
    let other = Issuer::generate().expect("other issuer");
    let token = other.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("unknown signing key"),
        "{}",
        status.message()
    );
    drop(server);
}

#[tokio::test]
async fn forged_signature_under_a_known_kid_is_unauthenticated() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let forger = Issuer::generate().expect("forger");
    let forged = forger.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    let genuine = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    // The genuine header (known kid) over the forger's payload and signature.
    let header = genuine.split('.').next().expect("header");
    let rest = forged.split_once('.').expect("jwt").1;
    let token = format!("{header}.{rest}");
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("bad signature"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn tampered_payload_is_unauthenticated() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let token = issuer.mint(AUDIENCE, STRANGER, Duration::from_secs(600));
    let parts: Vec<&str> = token.split('.').collect();
    let token = format!("{}.{}.{}", parts[0], b64(&claims(RELAY)), parts[2]);
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unauthenticated,
    );
    assert!(
        status.message().contains("bad signature"),
        "{}",
        status.message()
    );
}

/// Signs `claims(RELAY)` after `spoil` and expects `UNAUTHENTICATED` mentioning `reason`.
async fn refused_claims(spoil: impl FnOnce(&mut serde_json::Value), reason: &str) {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let mut claims = claims(RELAY);
    spoil(&mut claims);
    let token = issuer.sign_claims(&claims);
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unauthenticated,
    );
    assert!(status.message().contains(reason), "{}", status.message());
}

#[tokio::test]
async fn expired_token_is_unauthenticated() {
    refused_claims(|c| c["exp"] = json!(now() - 300), "expired").await;
}

#[tokio::test]
async fn token_with_nbf_in_the_future_is_unauthenticated() {
    refused_claims(|c| c["nbf"] = json!(now() + 600), "not yet valid").await;
}

#[tokio::test]
async fn wrong_audience_is_unauthenticated() {
    refused_claims(
        |c| c["aud"] = json!("https://gateway.test"),
        "wrong audience",
    )
    .await;
}

#[tokio::test]
async fn wrong_issuer_is_unauthenticated() {
    refused_claims(|c| c["iss"] = json!("https://evil.example"), "wrong issuer").await;
}

#[tokio::test]
async fn token_without_aud_is_unauthenticated() {
    refused_claims(
        |c| drop(c.as_object_mut().expect("object").remove("aud")),
        "no aud",
    )
    .await;
}

#[tokio::test]
async fn token_without_iss_is_unauthenticated() {
    refused_claims(
        |c| drop(c.as_object_mut().expect("object").remove("iss")),
        "no iss",
    )
    .await;
}

#[tokio::test]
async fn token_without_exp_is_unauthenticated() {
    refused_claims(
        |c| drop(c.as_object_mut().expect("object").remove("exp")),
        "no exp",
    )
    .await;
}

#[tokio::test]
async fn unverified_email_is_unauthenticated() {
    refused_claims(|c| c["email_verified"] = json!(false), "email not verified").await;
}

#[tokio::test]
async fn email_without_email_verified_is_unauthenticated() {
    refused_claims(
        |c| drop(c.as_object_mut().expect("object").remove("email_verified")),
        "email not verified",
    )
    .await;
}

#[tokio::test]
async fn caller_not_on_the_allow_list_is_permission_denied() {
    let (issuer, _server, mut service) = verifying(&[RELAY]).await;
    let allowed = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    assert_eq!(
        call_with_token(&mut service, &allowed)
            .await
            .expect("admitted"),
        RELAY
    );
    let token = issuer.mint(AUDIENCE, STRANGER, Duration::from_secs(600));
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::PermissionDenied,
    );
    assert!(status.message().contains(STRANGER), "{}", status.message());
}

#[tokio::test]
async fn serverless_authorization_is_read_before_authorization() {
    let (issuer, _server, mut service) = verifying(&[]).await;
    let good = format!(
        "Bearer {}",
        issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600))
    );
    // The app's own `authorization` is ignored when Cloud Run's header is there.
    let result = call_path(
        &mut service,
        "/runmesh.v1.Ping/Ping",
        &[
            ("x-serverless-authorization", &good),
            ("authorization", "Bearer junk"),
        ],
    )
    .await;
    assert_eq!(result.expect("admitted"), RELAY);
    let result = call_path(
        &mut service,
        "/runmesh.v1.Ping/Ping",
        &[
            ("x-serverless-authorization", "Bearer junk"),
            ("authorization", &good),
        ],
    )
    .await;
    assert_code(result, Code::Unauthenticated);
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let (_issuer, _server, mut service) = verifying(&[RELAY]).await;
    for path in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        assert_eq!(call_path(&mut service, path, &[]).await.expect(path), "");
    }
}

#[tokio::test]
async fn jwks_down_is_unavailable() {
    let (issuer, server, _service) = verifying(&[]).await;
    let mut config = config(AuthMode::Verify, &server, &[]);
    server.stop().await.expect("stop");
    config.jwks_url = config.jwks_url.replace("/jwks", "/gone");
    let mut service = guarded_by(&ServerAuthLayer::new(&config));
    let token = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    let status = assert_code(
        call_with_token(&mut service, &token).await,
        Code::Unavailable,
    );
    assert!(
        status.message().contains("signing keys unavailable"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn auth_off_admits_calls_without_a_caller() {
    let config = runmesh_auth::ServerAuthConfig::from_env(&[("AUTH_MODE", "off")]).expect("config");
    let mut service = guarded_by(&ServerAuthLayer::new(&config));
    assert_eq!(
        call_path(&mut service, "/runmesh.v1.Ping/Ping", &[])
            .await
            .expect("admitted"),
        ""
    );
}

/// A token as Cloud Run forwards it after checking it: signature segment replaced.
fn as_forwarded_by_cloud_run(token: &str) -> String {
    let (signed, _signature) = token.rsplit_once('.').expect("jwt");
    format!("{signed}.SIGNATURE_REMOVED_BY_GOOGLE")
}

#[tokio::test]
async fn cloud_run_mode_admits_a_token_whose_signature_cloud_run_removed() {
    let (issuer, server) = fresh_identity_server(&[]).await;
    let layer = ServerAuthLayer::new(&config(AuthMode::CloudRun, &server, &[RELAY]));
    let mut service = guarded_by(&layer);
    let token = as_forwarded_by_cloud_run(&issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600)));
    let value = format!("Bearer {token}");
    let result = call_path(
        &mut service,
        "/runmesh.v1.Ping/Ping",
        &[("x-serverless-authorization", &value)],
    )
    .await;
    assert_eq!(result.expect("admitted"), RELAY);
    assert_eq!(issuer.jwks_fetches(), 0, "cloud-run mode needs no keys");
}

#[tokio::test]
async fn cloud_run_mode_still_enforces_audience_expiry_and_allow_list() {
    let (issuer, server) = identity_server(&[]).await;
    let layer = ServerAuthLayer::new(&config(AuthMode::CloudRun, &server, &[RELAY]));
    let mut service = guarded_by(&layer);
    let wrong_audience = issuer.mint("https://gateway.test", RELAY, Duration::from_secs(600));
    let mut expired = claims(RELAY);
    expired["exp"] = json!(now() - 300);
    let mut no_iss = claims(RELAY);
    no_iss.as_object_mut().expect("object").remove("iss");
    let mut unverified = claims(RELAY);
    unverified["email_verified"] = json!(false);
    for (token, code) in [
        (wrong_audience, Code::Unauthenticated),
        (issuer.sign_claims(&expired), Code::Unauthenticated),
        (issuer.sign_claims(&no_iss), Code::Unauthenticated),
        (issuer.sign_claims(&unverified), Code::Unauthenticated),
        (
            issuer.mint(AUDIENCE, STRANGER, Duration::from_secs(600)),
            Code::PermissionDenied,
        ),
    ] {
        let result = call_with_token(&mut service, &as_forwarded_by_cloud_run(&token)).await;
        assert_code(result, code);
    }
    assert_code(
        call_with_token(&mut service, "garbage").await,
        Code::Unauthenticated,
    );
}
