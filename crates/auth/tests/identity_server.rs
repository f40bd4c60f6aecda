//! The local identity server over HTTP: what google-cloud-auth and `runmesh token` rely on.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use runmesh_auth::{AuthMode, Verifier, idp::IDENTITY_PATH};
use serde_json::Value;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test]
async fn metadata_identity_requires_the_metadata_flavor_header() {
    let (_issuer, server) = identity_server(&[RELAY]).await;
    let url = format!(
        "{}{IDENTITY_PATH}?audience={AUDIENCE}&format=full",
        server.metadata_endpoint(RELAY).expect("listener")
    );
    let refused = client().get(&url).send().await.expect("response");
    assert_eq!(refused.status(), 403);
    let answered = client()
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .expect("response");
    assert_eq!(answered.status(), 200);
    assert_eq!(answered.headers()["metadata-flavor"], "Google");
    let token = answered.text().await.expect("body");
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("jwt");
    assert_eq!(claims["email"], RELAY);
    assert_eq!(claims["aud"], AUDIENCE);
}

#[tokio::test]
async fn each_identity_listener_speaks_for_its_own_service_account() {
    let (_issuer, server) = identity_server(&[RELAY, STRANGER]).await;
    for email in [RELAY, STRANGER] {
        let base = server.metadata_endpoint(email).expect("listener");
        let probe = client()
            .get(format!("{base}/"))
            .send()
            .await
            .expect("probe");
        assert_eq!(probe.headers()["metadata-flavor"], "Google");
        let answer = client()
            .get(format!(
                "{base}/computeMetadata/v1/instance/service-accounts/default/email"
            ))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .expect("email");
        assert_eq!(answer.text().await.expect("body"), email);
    }
}

#[tokio::test]
async fn the_standard_format_omits_the_email_like_the_real_metadata_server() {
    let (_issuer, server) = identity_server(&[RELAY]).await;
    let url = format!(
        "{}{IDENTITY_PATH}?audience={AUDIENCE}",
        server.metadata_endpoint(RELAY).expect("listener")
    );
    let token = client()
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .expect("response")
        .text()
        .await
        .expect("body");
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("jwt");
    assert!(claims.get("email").is_none(), "{claims}");
    assert!(claims["exp"].is_u64(), "{claims}");
}

#[tokio::test]
async fn end_user_tokens_from_the_api_verify_and_are_counted() {
    let (issuer, server) = fresh_identity_server(&[]).await;
    let base = format!("http://{}", server.api_addr());
    let token = client()
        .get(format!("{base}/token"))
        .query(&[
            ("audience", AUDIENCE),
            ("email", "alice@example.com"),
            ("lifetime_secs", "120"),
        ])
        .send()
        .await
        .expect("response")
        .text()
        .await
        .expect("body");
    let verifier = Verifier::new(&config(AuthMode::Verify, &server, &[]));
    let verified = verifier.verify(&token).await.expect("verifies");
    assert_eq!(verified.caller, "alice@example.com");

    let stats: Value = client()
        .get(format!("{base}/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["minted"]["alice@example.com"], 1);
    assert_eq!(stats["jwks_fetches"], 1);
    assert_eq!(issuer.minted("alice@example.com"), 1);
}

#[tokio::test]
async fn token_requests_need_audience_email_and_a_sane_lifetime() {
    let (_issuer, server) = identity_server(&[]).await;
    let url = format!("http://{}/token", server.api_addr());
    for query in [
        vec![("audience", AUDIENCE)],
        vec![("audience", AUDIENCE), ("email", "")],
        vec![
            ("audience", AUDIENCE),
            ("email", "a@b"),
            ("lifetime_secs", "0"),
        ],
        vec![
            ("audience", AUDIENCE),
            ("email", "a@b"),
            ("lifetime_secs", "999999"),
        ],
    ] {
        let response = client()
            .get(&url)
            .query(&query)
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 400, "{query:?}");
    }
}

#[tokio::test]
async fn the_jwks_is_cacheable_and_health_answers() {
    let (issuer, server) = identity_server(&[]).await;
    let base = format!("http://{}", server.api_addr());
    let jwks = client()
        .get(format!("{base}/jwks"))
        .send()
        .await
        .expect("jwks");
    assert_eq!(jwks.headers()["cache-control"], "public, max-age=300");
    let body: Value = jwks.json().await.expect("json");
    assert_eq!(body["keys"][0]["kid"], issuer.kid().as_str());
    assert_eq!(body["keys"][0]["alg"], "RS256");
    assert!(body["keys"][0].get("d").is_none(), "no private parts");
    let health = client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
}
