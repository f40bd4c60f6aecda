//! A local stand-in for Google's identity side, so the local mesh runs the production auth code.
//!
//! [`Issuer`] signs tokens shaped like Google's ID tokens (RS256, `kid`, `iss`
//! `https://accounts.google.com`, `aud`, `sub`, `email`, `email_verified`, `iat`, `exp`), so
//! services verify them exactly as in production and only `AUTH_JWKS_URL` differs. [`serve`]
//! puts it on the network:
//!
//! - the **API listener** serves `GET /jwks` (the keys, `Cache-Control: public, max-age=300`),
//!   `GET /token?audience=…&email=…[&lifetime_secs=…]` (an end-user token for `runmesh token`),
//!   `GET /stats` (tokens minted per identity, JWKS fetches) and `GET /healthz`;
//! - each **identity listener** emulates the metadata server of one service identity:
//!   `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=…&format=full`
//!   with `Metadata-Flavor: Google` answers a token for that identity, so each service, pointed
//!   there by `GCE_METADATA_HOST`, gets its own email as google-cloud-auth would on Cloud Run.
//!
//! Every token carries `exp`: google-cloud-auth panics on one without it. This server mints
//! any identity for anyone who asks; it is for local meshes and tests, never for deployment.

use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::future::BoxFuture;
use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{Jwk, PublicKeyUse, ThumbprintHash},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// The issuer Google puts in ID tokens; the local issuer uses it too, so verifiers need no
/// special case.
pub const ISSUER: &str = "https://accounts.google.com";

/// How many keys the JWKS holds: the signing key and the one before it, for rotation.
pub const MAX_KEYS: usize = 2;

/// Lifetime of tokens answered on identity listeners unless changed: Google's hour.
pub const DEFAULT_IDENTITY_LIFETIME: Duration = Duration::from_secs(3600);

/// Longest lifetime `/token` mints.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The metadata server's identity path, the one google-cloud-auth requests.
pub const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

/// The metadata server's email path, used by probes.
pub const EMAIL_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/email";

/// Why an issuer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// RSA key generation failed.
    #[error("cannot generate an RSA key: {0}")]
    KeyGeneration(String),
    /// A key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A key file holds no usable RSA private key.
    #[error("key file {path} holds no usable RSA private key: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The number of key files is not one or two.
    #[error("expected 1 to {MAX_KEYS} key files, got {0}")]
    KeyCount(usize),
}

/// One RSA key: the private half signs, the public half goes into the JWKS.
struct SigningKey {
    kid: String,
    pem: String,
    encoding: EncodingKey,
    public: Jwk,
}

impl SigningKey {
    fn from_pem(pem: String) -> Result<Self, String> {
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let mut public =
            Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(|e| e.to_string())?;
        let kid = public
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| e.to_string())?;
        public.common.key_id = Some(kid.clone());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        // Sign once now so minting later cannot fail on this key.
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &json!({}), &encoding)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            kid,
            pem,
            encoding,
            public,
        })
    }

    fn generate() -> Result<Self, IdpError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .map_err(|e| IdpError::KeyGeneration(e.to_string()))?;
        Self::from_pem(pair.serialize_pem()).map_err(IdpError::KeyGeneration)
    }
}

/// Signs Google-shaped ID tokens and publishes their keys; shared by the HTTP handlers.
pub struct Issuer {
    /// Oldest first; the last one signs.
    keys: RwLock<Vec<SigningKey>>,
    minted: Mutex<HashMap<String, u64>>,
    jwks_fetches: AtomicU64,
    identity_lifetime: Duration,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("kids", &self.kids())
            .field("identity_lifetime", &self.identity_lifetime)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    fn with_keys(keys: Vec<SigningKey>) -> Self {
        Self {
            keys: RwLock::new(keys),
            minted: Mutex::default(),
            jwks_fetches: AtomicU64::new(0),
            identity_lifetime: DEFAULT_IDENTITY_LIFETIME,
        }
    }

    /// An issuer with a fresh RSA-2048 key, for a mesh that lives as long as this process.
    pub fn generate() -> Result<Self, IdpError> {
        Ok(Self::with_keys(vec![SigningKey::generate()?]))
    }

    /// An issuer with keys from PEM files (PKCS#1 or PKCS#8), oldest first; the last signs.
    /// Keys that survive restarts keep already minted tokens valid.
    pub fn from_pem_files(paths: &[PathBuf]) -> Result<Self, IdpError> {
        if paths.is_empty() || paths.len() > MAX_KEYS {
            return Err(IdpError::KeyCount(paths.len()));
        }
        let keys = paths
            .iter()
            .map(|path| load_key(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with_keys(keys))
    }

    /// This issuer with a new signing key; the previous one stays in the JWKS so tokens it
    /// signed still verify, older ones leave.
    pub fn with_rotated_key(self) -> Result<Self, IdpError> {
        self.rotate()?;
        Ok(self)
    }

    /// Rotates the signing key of a running issuer (see [`Issuer::with_rotated_key`]).
    pub fn rotate(&self) -> Result<(), IdpError> {
        let key = SigningKey::generate()?;
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.push(key);
        let excess = keys.len().saturating_sub(MAX_KEYS);
        keys.drain(..excess);
        Ok(())
    }

    /// Changes the lifetime of tokens answered on identity listeners (tests shorten it to see
    /// google-cloud-auth refresh them).
    pub fn with_identity_lifetime(mut self, lifetime: Duration) -> Self {
        self.identity_lifetime = lifetime;
        self
    }

    /// A token for `email` with audience `audience`, valid for `lifetime`, counted per email.
    pub fn mint(&self, audience: &str, email: &str, lifetime: Duration) -> String {
        self.mint_for(audience, email, lifetime, true)
    }

    fn mint_for(
        &self,
        audience: &str,
        email: &str,
        lifetime: Duration,
        with_email: bool,
    ) -> String {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let sub = subject(email);
        let mut claims = json!({
            "iss": ISSUER,
            "aud": audience,
            "azp": sub,
            "sub": sub,
            "iat": iat,
            "exp": iat + lifetime.as_secs(),
        });
        if with_email {
            claims["email"] = json!(email);
            claims["email_verified"] = json!(true);
        }
        *self
            .minted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(email.to_string())
            .or_default() += 1;
        self.sign_claims(&claims)
    }

    /// `claims` signed as they are with the current key; tests build bad tokens with it.
    pub fn sign_claims(&self, claims: &Value) -> String {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = keys.last().expect("an issuer always holds a key");
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .expect("the key signed a probe when it was loaded")
    }

    /// The JWKS document: every key's public half, with `kid`, `alg` and `use`.
    pub fn jwks(&self) -> Value {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let keys: Vec<&Jwk> = keys.iter().map(|k| &k.public).collect();
        json!({ "keys": keys })
    }

    /// The `kid` of the current signing key.
    pub fn kid(&self) -> String {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.last().map(|k| k.kid.clone()).unwrap_or_default()
    }

    /// The `kid`s in the JWKS, oldest first.
    pub fn kids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// The current signing key as PKCS#8 PEM, to keep it across restarts.
    pub fn signing_key_pem(&self) -> String {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.last().map(|k| k.pem.clone()).unwrap_or_default()
    }

    /// How many tokens were minted for `email`; tests count fetches with it.
    pub fn minted(&self, email: &str) -> u64 {
        let minted = self.minted.lock().unwrap_or_else(PoisonError::into_inner);
        minted.get(email).copied().unwrap_or(0)
    }

    /// How many times the JWKS was served over HTTP; tests count verifier fetches with it.
    pub fn jwks_fetches(&self) -> u64 {
        self.jwks_fetches.load(Ordering::Relaxed)
    }

    fn stats(&self) -> Value {
        let minted = self.minted.lock().unwrap_or_else(PoisonError::into_inner);
        let minted: BTreeMap<&String, &u64> = minted.iter().collect();
        json!({ "minted": minted, "jwks_fetches": self.jwks_fetches() })
    }
}

fn load_key(path: &Path) -> Result<SigningKey, IdpError> {
    let pem = std::fs::read_to_string(path).map_err(|source| IdpError::ReadKey {
        path: path.to_path_buf(),
        source,
    })?;
    SigningKey::from_pem(pem).map_err(|reason| IdpError::BadKey {
        path: path.to_path_buf(),
        reason,
    })
}

/// A stable Google-style numeric `sub` for an email (FNV-1a, 21 digits).
fn subject(email: &str) -> String {
    let hash = email.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("1{hash:020}")
}

/// Serves the API on `api` and one metadata-server emulation per `(email, listener)` until
/// `shutdown` completes.
pub async fn serve(
    issuer: Arc<Issuer>,
    api: TcpListener,
    identities: Vec<(String, TcpListener)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let mut servers: Vec<BoxFuture<'static, io::Result<()>>> = Vec::new();
    servers.push(Box::pin(
        axum::serve(api, api_router(issuer.clone()))
            .with_graceful_shutdown(stopped_signal(stopped.clone()))
            .into_future(),
    ));
    for (email, listener) in identities {
        servers.push(Box::pin(
            axum::serve(listener, identity_router(issuer.clone(), email))
                .with_graceful_shutdown(stopped_signal(stopped.clone()))
                .into_future(),
        ));
    }
    futures::future::try_join_all(servers).await.map(|_| ())
}

async fn stopped_signal(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The routes of the API listener.
pub fn api_router(issuer: Arc<Issuer>) -> Router {
    Router::new()
        .route("/jwks", get(jwks))
        .route("/token", get(token))
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(issuer)
}

async fn jwks(State(issuer): State<Arc<Issuer>>) -> Response {
    issuer.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(issuer.jwks()),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    audience: String,
    email: String,
    lifetime_secs: Option<u64>,
}

async fn token(State(issuer): State<Arc<Issuer>>, Query(query): Query<TokenQuery>) -> Response {
    let lifetime = query
        .lifetime_secs
        .map_or(DEFAULT_IDENTITY_LIFETIME, Duration::from_secs);
    if query.audience.is_empty() || query.email.is_empty() {
        return (StatusCode::BAD_REQUEST, "audience and email are required\n").into_response();
    }
    if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
        let reason = format!(
            "lifetime_secs must be 1..={}\n",
            MAX_TOKEN_LIFETIME.as_secs()
        );
        return (StatusCode::BAD_REQUEST, reason).into_response();
    }
    let token = issuer.mint(&query.audience, &query.email, lifetime);
    ([(header::CONTENT_TYPE, "text/plain")], token).into_response()
}

async fn stats(State(issuer): State<Arc<Issuer>>) -> Json<Value> {
    Json(issuer.stats())
}

/// What a metadata-server emulation knows: the issuer and the one identity it speaks for.
#[derive(Debug, Clone)]
struct Identity {
    issuer: Arc<Issuer>,
    email: Arc<str>,
}

/// The routes of one identity listener.
pub fn identity_router(issuer: Arc<Issuer>, email: String) -> Router {
    let identity = Identity {
        issuer,
        email: email.into(),
    };
    Router::new()
        .route("/", get(|| async { "computeMetadata/\n" }))
        .route(IDENTITY_PATH, get(identity_token))
        .route(EMAIL_PATH, get(identity_email))
        .with_state(identity)
        // The metadata server marks every answer; clients probe for the header.
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                response
                    .headers_mut()
                    .insert("metadata-flavor", HeaderValue::from_static("Google"));
                response
            },
        ))
}

fn is_metadata_request(headers: &HeaderMap) -> bool {
    headers
        .get("metadata-flavor")
        .is_some_and(|v| v.as_bytes() == b"Google")
}

fn missing_flavor() -> Response {
    (
        StatusCode::FORBIDDEN,
        "Missing required header \"Metadata-Flavor\": \"Google\"\n",
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct IdentityQuery {
    audience: Option<String>,
    format: Option<String>,
}

async fn identity_token(
    State(identity): State<Identity>,
    headers: HeaderMap,
    Query(query): Query<IdentityQuery>,
) -> Response {
    if !is_metadata_request(&headers) {
        return missing_flavor();
    }
    let Some(audience) = query.audience.filter(|a| !a.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required\n",
        )
            .into_response();
    };
    // Like the real server, only the `full` format carries the email.
    let with_email = query.format.as_deref() == Some("full");
    let token = identity.issuer.mint_for(
        &audience,
        &identity.email,
        identity.issuer.identity_lifetime,
        with_email,
    );
    ([(header::CONTENT_TYPE, "text/plain")], token).into_response()
}

async fn identity_email(State(identity): State<Identity>, headers: HeaderMap) -> Response {
    if !is_metadata_request(&headers) {
        return missing_flavor();
    }
    (
        [(header::CONTENT_TYPE, "text/plain")],
        identity.email.to_string(),
    )
        .into_response()
}

/// A running identity server on loopback ports, for tests and local tooling; stops on drop.
#[derive(Debug)]
pub struct IdentityServer {
    api: SocketAddr,
    identities: Vec<(String, SocketAddr)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl IdentityServer {
    /// Starts [`serve`] on `127.0.0.1:0`, with one identity listener per email.
    pub async fn start(issuer: Arc<Issuer>, emails: &[&str]) -> io::Result<Self> {
        let api = TcpListener::bind("127.0.0.1:0").await?;
        let api_addr = api.local_addr()?;
        let mut listeners = Vec::new();
        let mut identities = Vec::new();
        for email in emails {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            identities.push((email.to_string(), listener.local_addr()?));
            listeners.push((email.to_string(), listener));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(issuer, api, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            api: api_addr,
            identities,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The API listener's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    /// The JWKS URL, for `AUTH_JWKS_URL`.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/jwks", self.api)
    }

    /// `host:port` of `email`'s metadata emulation, for `GCE_METADATA_HOST`.
    pub fn metadata_host(&self, email: &str) -> Option<String> {
        self.identities
            .iter()
            .find(|(e, _)| e == email)
            .map(|(_, addr)| addr.to_string())
    }

    /// `http://host:port` of `email`'s metadata emulation, for [`crate::GoogleIdTokens::new`].
    pub fn metadata_endpoint(&self, email: &str) -> Option<String> {
        self.metadata_host(email).map(|h| format!("http://{h}"))
    }

    /// Stops the listeners and waits for them to finish.
    pub async fn stop(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_stable_google_style_numbers() {
        let a = subject("relay@mesh.iam.gserviceaccount.com");
        assert_eq!(a, subject("relay@mesh.iam.gserviceaccount.com"));
        assert_ne!(a, subject("gateway@mesh.iam.gserviceaccount.com"));
        assert_eq!(a.len(), 21);
        assert!(a.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn minted_tokens_carry_every_google_claim_and_always_exp() {
        let issuer = Issuer::generate().expect("issuer");
        let token = issuer.mint("https://ping", "a@x.iam", Duration::from_secs(60));
        let claims: Value =
            jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("claims");
        for claim in ["iss", "aud", "sub", "email", "email_verified", "iat", "exp"] {
            assert!(claims.get(claim).is_some(), "{claim} missing: {claims}");
        }
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["email_verified"], true);
        assert_eq!(
            claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
            60
        );
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid, Some(issuer.kid()));
        assert_eq!(issuer.minted("a@x.iam"), 1);
    }

    #[test]
    fn rotation_keeps_the_previous_key_and_drops_older_ones() {
        let issuer = Issuer::generate().expect("issuer");
        let first = issuer.kid();
        let issuer = issuer.with_rotated_key().expect("rotate");
        let second = issuer.kid();
        assert_ne!(first, second);
        assert_eq!(issuer.kids(), [first.clone(), second.clone()]);
        issuer.rotate().expect("rotate");
        let kids = issuer.kids();
        assert_eq!(kids.len(), MAX_KEYS);
        assert_eq!(kids[0], second);
        assert!(!kids.contains(&first));
        assert_eq!(issuer.jwks()["keys"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn keys_load_from_pem_files_and_the_last_signs() {
        let a = Issuer::generate().expect("issuer");
        let b = Issuer::generate().expect("issuer");
        let dir = tempfile::tempdir().expect("tempdir");
        let (pa, pb) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        std::fs::write(&pa, a.signing_key_pem()).expect("write");
        std::fs::write(&pb, b.signing_key_pem()).expect("write");
        let loaded = Issuer::from_pem_files(&[pa.clone(), pb]).expect("load");
        assert_eq!(loaded.kids(), [a.kid(), b.kid()]);
        assert_eq!(loaded.kid(), b.kid());
        assert!(matches!(
            Issuer::from_pem_files(&[]),
            Err(IdpError::KeyCount(0))
        ));
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a key").expect("write");
        assert!(matches!(
            Issuer::from_pem_files(&[bad]),
            Err(IdpError::BadKey { .. })
        ));
        assert!(matches!(
            Issuer::from_pem_files(&[dir.path().join("missing.pem")]),
            Err(IdpError::ReadKey { .. })
        ));
    }
}
