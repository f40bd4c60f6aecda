//! Tokens are credentials: whatever a call does, accepted or refused, no token — nor any of
//! its segments — may reach the logs, even at trace level.

#[path = "support/harness.rs"]
mod harness;

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use harness::*;
use http::Request;
use runmesh_auth::{
    AuthMode, GoogleIdTokens, IdTokenLayer, ServerAuthConfig, ServerAuthLayer, TokenSource,
};
use serde_json::json;
use tower::{Service, ServiceExt};
use tower_layer::Layer;
use tracing_subscriber::fmt::MakeWriter;

/// Everything logged, in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Captures this thread's logs at every level; the tests run on a current-thread runtime.
fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

fn assert_no_token_in(logs: &str, tokens: &[String]) {
    for token in tokens {
        assert!(
            !logs.contains(token.as_str()),
            "a token was logged:\n{logs}"
        );
        for segment in token.split('.').filter(|s| s.len() > 16) {
            assert!(
                !logs.contains(segment),
                "a token segment was logged:\n{logs}"
            );
        }
    }
}

#[tokio::test]
async fn good_and_bad_calls_log_no_token() {
    let (captured, _guard) = capture();
    let (issuer, server) = identity_server(&[RELAY]).await;
    let guard = ServerAuthLayer::new(&config(AuthMode::Verify, &server, &[RELAY]));
    let mut service = guarded_by(&guard);

    let good = issuer.mint(AUDIENCE, RELAY, Duration::from_secs(600));
    let stranger = issuer.mint(AUDIENCE, STRANGER, Duration::from_secs(600));
    let mut expired = claims(RELAY);
    expired["exp"] = json!(now() - 600);
    let expired = issuer.sign_claims(&expired);
    let wrong_audience = issuer.mint("https://elsewhere.test", RELAY, Duration::from_secs(600));
    let (head, _) = good.rsplit_once('.').expect("jwt");
    let forged = format!("{head}.c2lnbmF0dXJlLWZvcmdlZC1ieS1zb21lb25lLWVsc2U");
    let tokens = vec![good, stranger, expired, wrong_audience, forged];
    for token in &tokens {
        let _ = call_with_token(&mut service, token).await;
    }

    // The client half too: a token fetched through google-cloud-auth, and a failed fetch.
    let tokens_for_relay = GoogleIdTokens::new(
        AUDIENCE,
        Some(&server.metadata_endpoint(RELAY).expect("listener")),
    )
    .expect("credentials");
    let client_token = tokens_for_relay.token().await.expect("token");
    let mut client = IdTokenLayer::new(Arc::new(tokens_for_relay)).layer(guarded_by(&guard));
    let request = Request::builder()
        .uri("/runmesh.v1.Ping/Ping")
        .body(String::new())
        .expect("request");
    let response = client
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("call");
    assert_eq!(response.body(), RELAY);
    let closed = GoogleIdTokens::new(AUDIENCE, Some("http://127.0.0.1:9")).expect("credentials");
    let mut failing = IdTokenLayer::new(Arc::new(closed)).layer(guarded_by(&guard));
    let request = Request::builder()
        .uri("/runmesh.v1.Ping/Ping")
        .body(String::new())
        .expect("request");
    let _ = failing.ready().await.expect("ready").call(request).await;

    let mut all = tokens;
    all.push(client_token);
    let logs = captured.text();
    assert!(
        logs.contains("call refused"),
        "refusals are logged:\n{logs}"
    );
    assert!(
        logs.contains("no ID token"),
        "fetch failures are logged:\n{logs}"
    );
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{logs}");
    }
    assert_no_token_in(&logs, &all);
}

#[tokio::test]
async fn auth_off_is_logged_as_a_warning() {
    let (captured, _guard) = capture();
    let config = ServerAuthConfig::from_env(&[("AUTH_MODE", "off")]).expect("config");
    let _layer = ServerAuthLayer::new(&config);
    let logs = captured.text();
    assert!(
        logs.contains("WARN") && logs.contains("AUTH_MODE=off"),
        "{logs}"
    );
}
