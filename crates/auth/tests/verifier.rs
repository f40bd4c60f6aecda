//! The verifier's key and token caches under concurrency: one JWKS fetch for a crowd of cold
//! callers, one shared refetch after a key rotation, none for made-up key ids, and no key
//! needed at all for a token it has already verified.

#[path = "support/harness.rs"]
mod harness;

use std::{sync::Arc, time::Duration};

use harness::*;
use runmesh_auth::{AuthMode, Verifier, VerifyError, idp::Issuer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_first_calls_share_one_jwks_fetch() {
    let (issuer, server) = fresh_identity_server(&[]).await;
    let verifier = Arc::new(Verifier::new(&config(AuthMode::Verify, &server, &[])));
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let email = format!("caller-{i}@mesh.iam.gserviceaccount.com");
            let token = issuer.mint(AUDIENCE, &email, Duration::from_secs(600));
            let verifier = verifier.clone();
            tokio::spawn(async move { (email, verifier.verify(&token).await) })
        })
        .collect();
    for call in futures::future::join_all(calls).await {
        let (email, verified) = call.expect("task");
        assert_eq!(verified.expect("verified").caller, email);
    }
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_key_is_picked_up_by_one_refetch_shared_by_concurrent_callers() {
    let (issuer, server) = fresh_identity_server(&[]).await;
    let verifier = eager_verifier(&config(AuthMode::Verify, &server, &[]));
    let before = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    verifier.verify(&before).await.expect("old key");
    assert_eq!(issuer.jwks_fetches(), 1);

    issuer.rotate().expect("rotate");
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let token = issuer.mint(AUDIENCE, &format!("c{i}@x.iam"), Duration::from_secs(600));
            let verifier = verifier.clone();
            tokio::spawn(async move { verifier.verify(&token).await })
        })
        .collect();
    for call in futures::future::join_all(calls).await {
        call.expect("task").expect("new key");
    }
    assert_eq!(issuer.jwks_fetches(), 2);
}

#[tokio::test]
async fn unknown_kids_cause_no_refetch_within_the_interval() {
    let (issuer, server) = fresh_identity_server(&[]).await;
    let verifier = Verifier::new(&config(AuthMode::Verify, &server, &[]));
    let good = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    verifier.verify(&good).await.expect("good");
    let stranger = Issuer::generate().expect("other issuer");
    for i in 0..10 {
        let token = stranger.mint(AUDIENCE, &format!("c{i}@x.iam"), Duration::from_secs(600));
        assert_eq!(
            verifier.verify(&token).await,
            Err(VerifyError::InvalidToken("unknown signing key"))
        );
    }
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn a_verified_token_is_accepted_again_without_its_key() {
    let (issuer, server) = fresh_identity_server(&[]).await;
    let verifier = eager_verifier(&config(AuthMode::Verify, &server, &[]));
    let steady = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    let unseen = issuer.mint(AUDIENCE, STRANGER, Duration::from_secs(600));
    verifier.verify(&steady).await.expect("first call");

    // Rotate the signing key out of the JWKS and make the verifier learn that.
    issuer.rotate().expect("rotate");
    issuer.rotate().expect("rotate");
    let fresh = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    verifier.verify(&fresh).await.expect("new key");
    assert_eq!(issuer.jwks_fetches(), 2);

    // The steady caller's token is remembered; one never verified needs the key it lacks.
    assert_eq!(
        verifier.verify(&steady).await.expect("cached").caller,
        RELAY
    );
    assert_eq!(
        verifier.verify(&unseen).await,
        Err(VerifyError::InvalidToken("unknown signing key"))
    );
}

#[tokio::test]
async fn an_empty_token_is_no_token() {
    let (_issuer, server) = identity_server(&[]).await;
    let verifier = Verifier::new(&config(AuthMode::Verify, &server, &[]));
    assert_eq!(verifier.verify("  ").await, Err(VerifyError::NoToken));
}
