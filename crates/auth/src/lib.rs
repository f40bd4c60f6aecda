//! Google OIDC ID tokens on every hop: who calls whom, proved on each call.
//!
//! On Cloud Run a caller proves its identity with a Google-signed ID token whose audience is
//! the receiving service's URL. This crate holds both halves as tower layers generic over
//! `http::Request<B>`, so the same code serves `tonic::transport::Server::builder().layer(..)`
//! and wraps a `tonic::transport::Channel`.
//!
//! # Layout
//!
//! - [`config`]: the `AUTH_*` and `UPSTREAM_*` variables.
//! - [`client`]: [`IdTokenLayer`] adds `authorization: Bearer <id token>` for one audience,
//!   tokens from [`GoogleIdTokens`] (google-cloud-auth, cached and refreshed in the background).
//! - [`server`]: [`ServerAuthLayer`] admits a call only with a valid token and hands the
//!   handler its [`Caller`].
//! - [`verify`]: [`Verifier`], the token check itself (JWKS cache, claims, allow-list).
//! - [`idp`]: a local identity server — JWKS, end-user tokens and metadata-server emulation —
//!   so a local mesh runs exactly the production code path.

pub mod client;
pub mod config;
pub mod idp;
pub mod server;
pub mod verify;

pub use client::{AuthedChannel, GoogleIdTokens, IdToken, IdTokenLayer, TokenError, TokenSource};
pub use config::{AuthMode, ServerAuthConfig, UpstreamAuth, UpstreamAuthConfig};
pub use server::{Caller, ServerAuth, ServerAuthLayer};
pub use verify::{VerifiedCaller, Verifier, VerifyError};

/// Makes aws-lc-rs the process's rustls crypto provider.
///
/// Both ring and aws-lc-rs are compiled into rustls here, so rustls cannot pick one itself and
/// a TLS config built without an explicit provider would panic. Call it first thing in `main`;
/// calling it again, or after another provider was installed, changes nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn installing_the_crypto_provider_twice_is_harmless() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
