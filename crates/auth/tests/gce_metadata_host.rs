//! google-cloud-auth's own discovery, for real: Application Default Credentials with no key
//! file fall back to the metadata server, and `GCE_METADATA_HOST` sends them to the local
//! identity server. The environment is process-wide, so the check runs in a child process of
//! this test binary with that variable set, rather than mutating this process's environment.

#[path = "support/harness.rs"]
mod harness;

use std::process::Command;

use harness::*;
use runmesh_auth::{GoogleIdTokens, TokenSource};
use serde_json::Value;

const CHILD_AUDIENCE: &str = "RUNMESH_AUTH_TEST_AUDIENCE";
const CHILD_EMAIL: &str = "RUNMESH_AUTH_TEST_EMAIL";

#[tokio::test]
async fn adc_fetches_the_services_own_token_through_gce_metadata_host() {
    let (issuer, server) = fresh_identity_server(&[RELAY]).await;
    let home = tempfile::tempdir().expect("empty home");
    let child =
        tokio::process::Command::from(Command::new(std::env::current_exe().expect("test binary")))
            .args([
                "--exact",
                "child_process_fetching_tokens_via_adc",
                "--ignored",
                "--nocapture",
            ])
            .env(
                "GCE_METADATA_HOST",
                server.metadata_host(RELAY).expect("listener"),
            )
            .env("HOME", home.path())
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env(CHILD_AUDIENCE, AUDIENCE)
            .env(CHILD_EMAIL, RELAY)
            .output()
            .await
            .expect("child runs");
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
    // One fetch per credentials object: ADC's, and the explicit endpoint's, which the
    // variable overrides.
    assert_eq!(issuer.minted(RELAY), 2);
}

/// Runs only as the child of the test above, which sets the variables it reads.
#[tokio::test]
#[ignore = "run as a child process by adc_fetches_the_services_own_token_through_gce_metadata_host"]
async fn child_process_fetching_tokens_via_adc() {
    let (Ok(audience), Ok(email)) = (std::env::var(CHILD_AUDIENCE), std::env::var(CHILD_EMAIL))
    else {
        panic!("run by adc_fetches_the_services_own_token_through_gce_metadata_host only");
    };
    let adc = GoogleIdTokens::new(&audience, None).expect("ADC credentials");
    let unreachable = GoogleIdTokens::new(&audience, Some("http://127.0.0.1:9")).expect("mds");
    for source in [adc, unreachable] {
        let token = source.token().await.expect("token");
        let claims: Value =
            jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("claims");
        assert_eq!(claims["email"], email.as_str());
        assert_eq!(claims["aud"], audience.as_str());
    }
}
