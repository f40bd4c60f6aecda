//! Checks a Google ID token and names its caller; the server layer's decision in one place.
//!
//! A token is valid when its RS256 signature verifies against a key of the JWKS (looked up by
//! `kid`), its issuer is Google's, its audience is one of this service's, `exp` and `nbf` hold
//! within [`CLOCK_SKEW`], and, when the caller is named by `email`, `email_verified` is true.
//! `aud`, `iss` and `exp` are required: `jsonwebtoken` would otherwise only check the ones
//! present. google-cloud-auth's own `idtoken::verifier` is not used: its key cache fails
//! concurrent first calls, ignores `Cache-Control`, it skips `nbf` and it panics on a token
//! without `email_verified`.
//!
//! Keys are cached for the JWKS response's `Cache-Control: max-age`. A token with an unknown
//! `kid` (Google rotated its keys) triggers one refetch shared by every caller waiting for it,
//! and at most one per [`DEFAULT_MIN_REFETCH_INTERVAL`]. Verified tokens are remembered until
//! their `exp` in a bounded LRU, so a steady caller costs a hash lookup, not an RSA verify.
//!
//! # Cloud Run (`AUTH_MODE=cloud-run`)
//!
//! A Cloud Run service that requires authentication (`--no-allow-unauthenticated`) checks the
//! ID token itself — signature, audience, expiry and the caller's `run.routes.invoke`
//! permission — before the request reaches the container. It then forwards the header it
//! checked (`x-serverless-authorization` when present, else `authorization`) with the JWT's
//! signature segment replaced by the literal `SIGNATURE_REMOVED_BY_GOOGLE`, as Google's Cloud
//! Run documentation and users' reports describe; the container cannot verify that token
//! again, so `verify` mode would reject every call there. In `cloud-run` mode the signature is
//! therefore not checked, stripped or not: the platform's check is trusted (so the deploy must
//! require authentication, or anyone could forge claims) and the forwarded claims are still
//! held to issuer, audience, `exp`/`nbf`, `email_verified` and the allow-list.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, Jwk},
};
use lru::LruCache;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{AuthMode, ServerAuthConfig};

/// The issuers of Google ID tokens; both spellings occur.
pub const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];

/// Clock skew tolerated on `exp` and `nbf` between the issuer's clock and ours.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The least time between two JWKS fetches caused by an unknown `kid`, so a stream of tokens
/// with made-up key ids cannot turn this service into a load generator against the JWKS.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// How many verified tokens are remembered.
const VERIFIED_CAPACITY: NonZeroUsize = NonZeroUsize::new(4096).expect("non-zero");
/// Key lifetime when the JWKS response carries no `max-age`.
const DEFAULT_KEYS_TTL: Duration = Duration::from_secs(300);
/// Floor on the key lifetime, so `no-cache` does not mean a fetch per call.
const MIN_KEYS_TTL: Duration = Duration::from_secs(10);
/// Ceiling on the key lifetime, so a removed key stops being trusted within a day.
const MAX_KEYS_TTL: Duration = Duration::from_secs(24 * 3600);
/// Pause after a failed JWKS fetch before the next one.
const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(5);
/// Time limit on one JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The caller a token proved, and until when that proof holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCaller {
    /// The token's `email` (verified), else its `sub`.
    pub caller: String,
    /// The token's `exp`.
    pub expires_at: SystemTime,
}

/// Why a call was refused. Reasons are short and fixed: they never quote the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No bearer token in the request.
    #[error("missing bearer token")]
    NoToken,
    /// Something that is not a JWT.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// A JWT that fails a check.
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// A valid token whose caller is not on the allow-list.
    #[error("caller {caller} is not allowed")]
    Forbidden {
        /// The verified caller that was refused.
        caller: String,
    },
    /// The JWKS could not be fetched, so no token can be checked.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl From<VerifyError> for tonic::Status {
    /// The one place that picks each refusal's gRPC code and log level.
    fn from(err: VerifyError) -> Self {
        let message = err.to_string();
        match err {
            VerifyError::NoToken | VerifyError::Malformed(_) | VerifyError::InvalidToken(_) => {
                tracing::debug!(reason = %message, "call refused: unauthenticated");
                tonic::Status::unauthenticated(message)
            }
            VerifyError::Forbidden { .. } => {
                tracing::info!(reason = %message, "call refused: permission denied");
                tonic::Status::permission_denied(message)
            }
            VerifyError::KeysUnavailable(_) => {
                tracing::warn!(reason = %message, "call refused: cannot check tokens");
                tonic::Status::unavailable(message)
            }
        }
    }
}

/// Checks tokens for one service; share it (`Arc`) so its caches are shared.
pub struct Verifier {
    trust_platform: bool,
    audiences: HashSet<String>,
    allowed: HashSet<String>,
    validation: Validation,
    keys: KeyCache,
    verified: Mutex<LruCache<String, VerifiedCaller>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("trust_platform", &self.trust_platform)
            .field("audiences", &self.audiences)
            .field("allowed", &self.allowed)
            .field("jwks_url", &self.keys.url)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `config`; [`AuthMode::CloudRun`] skips the signature (see the module
    /// doc), any other mode checks it. Fetches no keys until the first token arrives.
    pub fn new(config: &ServerAuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_audience(&config.audiences);
        validation.set_issuer(&GOOGLE_ISSUERS);
        Self {
            trust_platform: config.mode == AuthMode::CloudRun,
            audiences: config.audiences.iter().cloned().collect(),
            allowed: config.allowed_callers.iter().cloned().collect(),
            validation,
            keys: KeyCache::new(config.jwks_url.clone()),
            verified: Mutex::new(LruCache::new(VERIFIED_CAPACITY)),
        }
    }

    /// Changes the least time between unknown-`kid` refetches (tests rotate keys at once).
    pub fn with_min_refetch_interval(mut self, interval: Duration) -> Self {
        self.keys.min_refetch = interval;
        self
    }

    /// Checks `bearer_token` (the part after `Bearer `) and names its caller.
    pub async fn verify(&self, bearer_token: &str) -> Result<VerifiedCaller, VerifyError> {
        let token = bearer_token.trim();
        if token.is_empty() {
            return Err(VerifyError::NoToken);
        }
        if let Some(hit) = self.remembered(token) {
            return Ok(hit);
        }
        let claims = if self.trust_platform {
            self.forwarded_claims(token)?
        } else {
            self.verified_claims(token).await?
        };
        let verified = self.admit(claims)?;
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(token.to_string(), verified.clone());
        Ok(verified)
    }

    /// A previously verified token that has not expired yet.
    fn remembered(&self, token: &str) -> Option<VerifiedCaller> {
        let mut cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        match cache.get(token) {
            Some(hit) if hit.expires_at > SystemTime::now() => Some(hit.clone()),
            Some(_) => {
                cache.pop(token);
                None
            }
            None => None,
        }
    }

    /// Claims of a token whose signature and standard claims check out.
    async fn verified_claims(&self, token: &str) -> Result<Claims, VerifyError> {
        let [header, _, _] = segments(token)?;
        let header: JoseHeader = decode_segment(header, "header is not base64url JSON")?;
        if header.alg != "RS256" {
            return Err(VerifyError::InvalidToken("algorithm not accepted"));
        }
        let kid = header.kid.ok_or(VerifyError::InvalidToken("no key id"))?;
        let key = self.keys.key(&kid).await?;
        jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| reject(e.kind()))
    }

    /// Claims of a token Cloud Run has checked: no signature to verify, the rest still holds.
    fn forwarded_claims(&self, token: &str) -> Result<Claims, VerifyError> {
        let [_, payload, _] = segments(token)?;
        let claims: Claims = decode_segment(payload, "payload is not base64url JSON")?;
        let iss = claims
            .iss
            .as_deref()
            .ok_or(VerifyError::InvalidToken("no iss claim"))?;
        if !GOOGLE_ISSUERS.contains(&iss) {
            return Err(VerifyError::InvalidToken("wrong issuer"));
        }
        let audience_ok = match &claims.aud {
            None => return Err(VerifyError::InvalidToken("no aud claim")),
            Some(Value::String(aud)) => self.audiences.contains(aud),
            Some(Value::Array(auds)) => auds
                .iter()
                .any(|a| a.as_str().is_some_and(|a| self.audiences.contains(a))),
            Some(_) => return Err(VerifyError::InvalidToken("bad claim format")),
        };
        if !audience_ok {
            return Err(VerifyError::InvalidToken("wrong audience"));
        }
        let now = unix_now();
        let skew = CLOCK_SKEW.as_secs_f64();
        let exp = claims
            .exp
            .ok_or(VerifyError::InvalidToken("no exp claim"))?;
        if exp + skew < now {
            return Err(VerifyError::InvalidToken("expired"));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + skew) {
            return Err(VerifyError::InvalidToken("not yet valid"));
        }
        Ok(claims)
    }

    /// Names the caller of checked claims and applies the allow-list.
    fn admit(&self, claims: Claims) -> Result<VerifiedCaller, VerifyError> {
        let caller = match claims.email {
            Some(email) if is_true(claims.email_verified.as_ref()) => email,
            Some(_) => return Err(VerifyError::InvalidToken("email not verified")),
            None => claims
                .sub
                .clone()
                .ok_or(VerifyError::InvalidToken("no email or sub claim"))?,
        };
        let allowed = self.allowed.is_empty()
            || self.allowed.contains(&caller)
            || claims.sub.is_some_and(|sub| self.allowed.contains(&sub));
        if !allowed {
            return Err(VerifyError::Forbidden { caller });
        }
        let exp = claims
            .exp
            .ok_or(VerifyError::InvalidToken("no exp claim"))?;
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::try_from_secs_f64(exp).unwrap_or_default())
            .unwrap_or(UNIX_EPOCH);
        Ok(VerifiedCaller { caller, expires_at })
    }
}

/// The claims this crate reads; everything optional so absence is reported, not a parse error.
#[derive(Debug, Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Value>,
    exp: Option<f64>,
    nbf: Option<f64>,
    sub: Option<String>,
    email: Option<String>,
    email_verified: Option<Value>,
}

/// The JOSE header fields that pick the key.
#[derive(Debug, Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
}

/// Google sends `email_verified` as a boolean; some older tokens carry the string `"true"`.
fn is_true(value: Option<&Value>) -> bool {
    matches!(value, Some(Value::Bool(true)))
        || matches!(value, Some(Value::String(s)) if s == "true")
}

/// The three dot-separated segments of a compact JWS.
fn segments(token: &str) -> Result<[&str; 3], VerifyError> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() => Ok([h, p, s]),
        _ => Err(VerifyError::Malformed("not a JWT")),
    }
}

/// A base64url JSON segment decoded into `T`.
fn decode_segment<T: serde::de::DeserializeOwned>(
    segment: &str,
    reason: &'static str,
) -> Result<T, VerifyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| VerifyError::Malformed(reason))?;
    serde_json::from_slice(&bytes).map_err(|_| VerifyError::Malformed(reason))
}

/// A short, token-free reason for a `jsonwebtoken` refusal.
fn reject(kind: &ErrorKind) -> VerifyError {
    let reason = match kind {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAlgorithm => "algorithm not accepted",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "aud" => "no aud claim",
            "iss" => "no iss claim",
            "exp" => "no exp claim",
            _ => "missing claim",
        },
        ErrorKind::InvalidClaimFormat(_) => "bad claim format",
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => return VerifyError::Malformed("undecodable"),
        _ => "rejected",
    };
    VerifyError::InvalidToken(reason)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The JWKS, cached per its `Cache-Control`, refetched once for all callers at a time.
#[derive(Debug)]
struct KeyCache {
    url: String,
    client: reqwest::Client,
    min_refetch: Duration,
    state: RwLock<KeyState>,
    /// Held while fetching: callers that find a fetch under way wait for its result.
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct KeyState {
    keys: HashMap<String, Arc<DecodingKey>>,
    fresh_until: Option<Instant>,
    last_fetch: Option<Instant>,
    /// Counts fetches, so a waiter can tell that one finished while it waited.
    generation: u64,
    last_error: Option<String>,
}

enum Lookup {
    Found(Arc<DecodingKey>),
    Refused(VerifyError),
    Fetch { generation: u64 },
}

impl KeyState {
    fn lookup(&self, kid: &str, min_refetch: Duration) -> Lookup {
        let now = Instant::now();
        if self.fresh_until.is_some_and(|until| now < until) {
            if let Some(key) = self.keys.get(kid) {
                return Lookup::Found(key.clone());
            }
            if self
                .last_fetch
                .is_some_and(|at| now.duration_since(at) < min_refetch)
            {
                return Lookup::Refused(self.missing());
            }
        }
        Lookup::Fetch {
            generation: self.generation,
        }
    }

    fn answer(&self, kid: &str) -> Result<Arc<DecodingKey>, VerifyError> {
        self.keys.get(kid).cloned().ok_or_else(|| self.missing())
    }

    fn missing(&self) -> VerifyError {
        match (&self.last_error, self.keys.is_empty()) {
            (Some(err), true) => VerifyError::KeysUnavailable(err.clone()),
            (None, true) => VerifyError::KeysUnavailable("the JWKS has no usable key".into()),
            (_, false) => VerifyError::InvalidToken("unknown signing key"),
        }
    }
}

impl KeyCache {
    fn new(url: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            url,
            client,
            min_refetch: DEFAULT_MIN_REFETCH_INTERVAL,
            state: RwLock::default(),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, VerifyError> {
        let generation = match self.read().lookup(kid, self.min_refetch) {
            Lookup::Found(key) => return Ok(key),
            Lookup::Refused(err) => return Err(err),
            Lookup::Fetch { generation } => generation,
        };
        let _fetching = self.refresh.lock().await;
        if self.read().generation == generation {
            self.refetch().await;
        }
        self.read().answer(kid)
    }

    async fn refetch(&self) {
        let started = Instant::now();
        let result = self.fetch().await;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.generation += 1;
        state.last_fetch = Some(Instant::now());
        match result {
            Ok((keys, ttl)) => {
                tracing::debug!(url = %self.url, keys = keys.len(), ttl_secs = ttl.as_secs(), "fetched JWKS");
                state.keys = keys;
                state.fresh_until = Some(started + ttl);
                state.last_error = None;
            }
            Err(reason) => {
                tracing::warn!(url = %self.url, %reason, "JWKS fetch failed; keeping the keys cached before");
                state.fresh_until = Some(Instant::now() + FAILED_FETCH_BACKOFF);
                state.last_error = Some(reason);
            }
        }
    }

    async fn fetch(&self) -> Result<(HashMap<String, Arc<DecodingKey>>, Duration), String> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        if !response.status().is_success() {
            return Err(format!("GET {}: HTTP {}", self.url, response.status()));
        }
        let ttl = cache_ttl(response.headers());
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        let keys = rsa_keys(&body);
        if keys.is_empty() {
            return Err(format!("GET {}: no RSA signing key with a kid", self.url));
        }
        Ok((keys, ttl))
    }
}

/// The RS256-usable keys of a JWKS document, by `kid`; other keys are skipped, not fatal.
fn rsa_keys(jwks: &Value) -> HashMap<String, Arc<DecodingKey>> {
    let Some(entries) = jwks.get("keys").and_then(Value::as_array) else {
        return HashMap::new();
    };
    entries
        .iter()
        .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
        .filter(|jwk| matches!(jwk.algorithm, AlgorithmParameters::RSA(_)))
        .filter(|jwk| {
            jwk.common
                .key_algorithm
                .is_none_or(|alg| matches!(Algorithm::try_from(alg), Ok(Algorithm::RS256)))
        })
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((kid, Arc::new(key)))
        })
        .collect()
}

/// How long a JWKS response may be used: `max-age` less `Age`, within sane bounds.
fn cache_ttl(headers: &http::HeaderMap) -> Duration {
    let directives: Vec<String> = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    if directives
        .iter()
        .any(|d| d == "no-store" || d == "no-cache")
    {
        return MIN_KEYS_TTL;
    }
    let max_age = directives.iter().find_map(|d| {
        d.strip_prefix("max-age=")?
            .trim_matches('"')
            .parse::<u64>()
            .ok()
    });
    let Some(max_age) = max_age else {
        return DEFAULT_KEYS_TTL;
    };
    let age = headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_secs(max_age.saturating_sub(age)).clamp(MIN_KEYS_TTL, MAX_KEYS_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn key_lifetime_follows_max_age_less_age() {
        let h = headers(&[("cache-control", "public, max-age=19800, must-revalidate")]);
        assert_eq!(cache_ttl(&h), Duration::from_secs(19800));
        let h = headers(&[("cache-control", "public, max-age=600"), ("age", "100")]);
        assert_eq!(cache_ttl(&h), Duration::from_secs(500));
    }

    #[test]
    fn key_lifetime_is_bounded_and_has_a_default() {
        assert_eq!(cache_ttl(&headers(&[])), DEFAULT_KEYS_TTL);
        let h = headers(&[("cache-control", "no-cache")]);
        assert_eq!(cache_ttl(&h), MIN_KEYS_TTL);
        let h = headers(&[("cache-control", "max-age=99999999")]);
        assert_eq!(cache_ttl(&h), MAX_KEYS_TTL);
    }

    #[test]
    fn jwks_entries_that_are_not_rs256_keys_are_skipped() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "alg": "RS256", "n": "sXch", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"weird": true},
        ]});
        assert!(rsa_keys(&jwks).is_empty());
        assert!(rsa_keys(&serde_json::json!({"nokeys": 1})).is_empty());
    }

    #[test]
    fn email_verified_accepts_true_and_the_string_true_only() {
        assert!(is_true(Some(&Value::Bool(true))));
        assert!(is_true(Some(&Value::String("true".into()))));
        assert!(!is_true(Some(&Value::Bool(false))));
        assert!(!is_true(Some(&Value::String("false".into()))));
        assert!(!is_true(None));
    }

    #[test]
    fn refusals_map_to_their_grpc_codes() {
        use tonic::Code;
        let cases = [
            (VerifyError::NoToken, Code::Unauthenticated),
            (VerifyError::Malformed("not a JWT"), Code::Unauthenticated),
            (VerifyError::InvalidToken("expired"), Code::Unauthenticated),
            (
                VerifyError::Forbidden {
                    caller: "a@b".into(),
                },
                Code::PermissionDenied,
            ),
            (
                VerifyError::KeysUnavailable("down".into()),
                Code::Unavailable,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(tonic::Status::from(err).code(), code);
        }
    }
}
