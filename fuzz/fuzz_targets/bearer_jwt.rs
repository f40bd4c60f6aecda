//! Arbitrary bytes against the bearer-token path: the server layer's header parsing and the
//! verifier, in both `verify` and `cloud-run` mode.
//!
//! Keys come from a real local identity server (JWKS over loopback HTTP), started once. Most
//! inputs are spliced into a real minted token, or signed as claims by the real issuer, so the
//! fuzzer reaches the claim checks instead of stopping at base64.
//!
//! Besides "no panic", each input checks what a refusal or an admission must mean: a refusal is
//! UNAUTHENTICATED, PERMISSION_DENIED or UNAVAILABLE and never quotes the token; in `verify`
//! mode only tokens the issuer signed are admitted; anything admitted carries Google's issuer,
//! our audience and an unexpired `exp`.

#![no_main]

use std::{
    convert::Infallible,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderValue, Request, Response};
use libfuzzer_sys::fuzz_target;
use runmesh_auth::{
    AuthMode, Caller, ServerAuthConfig, ServerAuthLayer, Verifier, VerifyError,
    idp::{IdentityServer, Issuer},
    verify::GOOGLE_ISSUERS,
};
use runmesh_proto::tonic::{Code, Status};
use serde_json::{Value, json};
use tower::{Layer, ServiceExt, service_fn};

const AUDIENCE: &str = "https://ping.example";
const USER: &str = "user@example.com";

struct Fixture {
    rt: tokio::runtime::Runtime,
    issuer: Arc<Issuer>,
    /// Index 0: `verify` mode; 1: `cloud-run` mode.
    verifiers: [Arc<Verifier>; 2],
    layers: [ServerAuthLayer; 2],
    /// A valid token for [`USER`] and [`AUDIENCE`].
    token: String,
    _idp: IdentityServer,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let issuer = Arc::new(Issuer::generate().expect("issuer key"));
    let idp = rt
        .block_on(IdentityServer::start(issuer.clone(), &[]))
        .expect("identity server");
    let verifier = |mode| {
        let config = ServerAuthConfig {
            mode,
            audiences: vec![AUDIENCE.to_string()],
            jwks_url: idp.jwks_url(),
            allowed_callers: vec![],
        };
        Arc::new(Verifier::new(&config))
    };
    let verifiers = [verifier(AuthMode::Verify), verifier(AuthMode::CloudRun)];
    let layers = [
        ServerAuthLayer::from_verifier(verifiers[0].clone()),
        ServerAuthLayer::from_verifier(verifiers[1].clone()),
    ];
    let token = issuer.mint(AUDIENCE, USER, Duration::from_secs(24 * 3600));
    // Warm the key cache so the first inputs are not all waiting on the JWKS fetch.
    rt.block_on(verifiers[0].verify(&token))
        .expect("a minted token verifies");
    Fixture {
        rt,
        issuer,
        verifiers,
        layers,
        token,
        _idp: idp,
    }
});

/// The protected service: answers with the admitted caller as its body.
fn inner(request: Request<()>) -> std::future::Ready<Result<Response<String>, Infallible>> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    std::future::ready(Ok(Response::new(caller)))
}

/// How one input is turned into a credential.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// The bytes are the whole header value.
    RawHeader,
    /// `Bearer <bytes>` as the header value.
    BearerHeader,
    /// The bytes, as text, handed to `Verifier::verify`.
    RawToken,
    /// The minted token with one segment replaced by the bytes.
    SegmentReplaced,
    /// The minted token with one segment replaced by the bytes in base64url.
    SegmentEncoded,
    /// The minted token with the bytes inserted at an offset.
    Spliced,
    /// The bytes as JSON claims, signed by the real issuer.
    SignedClaims,
    /// Valid claims with the bytes' JSON object merged over them, signed by the real issuer.
    SignedMerged,
}

const SHAPES: [Shape; 8] = [
    Shape::RawHeader,
    Shape::BearerHeader,
    Shape::RawToken,
    Shape::SegmentReplaced,
    Shape::SegmentEncoded,
    Shape::Spliced,
    Shape::SignedClaims,
    Shape::SignedMerged,
];

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let f = &*FIXTURE;
    let mode = usize::from(control & 1);
    let serverless_header = control & 2 != 0;
    let shape = SHAPES[usize::from(control >> 2) % SHAPES.len()];
    let segment = usize::from(control >> 5) % 3;
    let text = String::from_utf8_lossy(rest);

    let (credential, signed_by_us): (Vec<u8>, bool) = match shape {
        Shape::RawHeader => (rest.to_vec(), false),
        Shape::BearerHeader => ([b"Bearer ", rest].concat(), false),
        Shape::RawToken => {
            check_verify(f, mode, &text, false);
            return;
        }
        Shape::SegmentReplaced | Shape::SegmentEncoded => {
            let replacement = match shape {
                Shape::SegmentEncoded => URL_SAFE_NO_PAD.encode(rest),
                _ => text.to_string(),
            };
            let mut parts: Vec<String> = f.token.split('.').map(String::from).collect();
            parts[segment] = replacement;
            let token = parts.join(".");
            check_verify(f, mode, &token, false);
            (format!("Bearer {token}").into_bytes(), false)
        }
        Shape::Spliced => {
            let (at, bytes) = match rest {
                [a, b, bytes @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), bytes),
                _ => (0, rest),
            };
            let mut token = f.token.as_bytes().to_vec();
            let at = at % (token.len() + 1);
            token.splice(at..at, bytes.iter().copied());
            let token = String::from_utf8_lossy(&token).into_owned();
            check_verify(f, mode, &token, false);
            ([b"Bearer ", token.as_bytes()].concat(), false)
        }
        Shape::SignedClaims | Shape::SignedMerged => {
            let Ok(fuzzed) = serde_json::from_slice::<Value>(rest) else {
                return;
            };
            let claims = match (shape, fuzzed) {
                (Shape::SignedMerged, Value::Object(fields)) => {
                    let mut claims = valid_claims();
                    for (k, v) in fields {
                        claims[k] = v;
                    }
                    claims
                }
                (Shape::SignedMerged, _) => return,
                (_, other) => other,
            };
            let token = f.issuer.sign_claims(&claims);
            check_verify(f, mode, &token, true);
            (format!("Bearer {token}").into_bytes(), true)
        }
    };
    check_layer(f, mode, serverless_header, &credential, signed_by_us);
});

fn valid_claims() -> Value {
    let now = unix_now() as u64;
    json!({
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "sub": "1234567890",
        "email": USER,
        "email_verified": true,
        "iat": now,
        "exp": now + 3600,
    })
}

/// `Verifier::verify` on `token`: an admission must be deserved.
fn check_verify(f: &Fixture, mode: usize, token: &str, signed_by_us: bool) {
    let result = f.rt.block_on(f.verifiers[mode].verify(token));
    match result {
        Ok(verified) => {
            assert_admissible(token.trim());
            if mode == 0 && !signed_by_us {
                assert_eq!(verified.caller, USER, "verify mode admitted a forged token");
            }
        }
        Err(err) => {
            // Only these two carry text that is not a fixed reason (the caller's name, the
            // JWKS fetch error); a fixed reason may contain a short input by coincidence.
            if matches!(
                err,
                VerifyError::Forbidden { .. } | VerifyError::KeysUnavailable(_)
            ) {
                let message = err.to_string();
                let trimmed = token.trim();
                assert!(
                    trimmed.len() < 16 || !message.contains(trimmed),
                    "a refusal quotes the token: {message}"
                );
            }
            let status = Status::from(err);
            assert!(
                matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied | Code::Unavailable
                ),
                "refusal mapped to {:?}",
                status.code()
            );
        }
    }
}

/// The server layer with `credential` as the `authorization` (or `x-serverless-authorization`)
/// header: either the inner service runs with a caller, or a gRPC refusal comes back.
fn check_layer(
    f: &Fixture,
    mode: usize,
    serverless_header: bool,
    credential: &[u8],
    signed_by_us: bool,
) {
    let Ok(value) = HeaderValue::from_bytes(credential) else {
        return;
    };
    let header = if serverless_header {
        "x-serverless-authorization"
    } else {
        "authorization"
    };
    let request = Request::builder()
        .uri("/runmesh.ping.v1.PingService/Send")
        .header(header, value)
        .body(())
        .expect("request");
    let service = f.layers[mode].layer(service_fn(inner));
    let response =
        f.rt.block_on(service.oneshot(request))
            .unwrap_or_else(|never| match never {});
    match response.headers().get("grpc-status") {
        None => {
            let caller = response.body();
            assert!(!caller.is_empty(), "admitted without a caller");
            if mode == 0 && !signed_by_us {
                assert_eq!(caller, USER, "verify mode admitted a forged token");
            }
        }
        Some(code) => {
            assert!(
                matches!(code.as_bytes(), b"16" | b"7" | b"14"),
                "refusal with grpc-status {code:?}"
            );
            let message = response
                .headers()
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                .unwrap_or_default();
            // UNAUTHENTICATED reasons are fixed strings; the others may quote a caller or an
            // error from the JWKS fetch, never the token.
            if code.as_bytes() != b"16" {
                let token = String::from_utf8_lossy(credential);
                let token = token.trim().trim_start_matches("Bearer ").trim();
                assert!(
                    token.len() < 16 || !message.contains(token),
                    "a refusal quotes the token: {message}"
                );
            }
        }
    }
}

/// The claims an admission rests on. Like the verifier, it ignores other fields unread (they
/// may even hold invalid UTF-8 in `cloud-run` mode, where nothing is signed).
#[derive(serde::Deserialize)]
struct Admitted {
    iss: Option<String>,
    aud: Option<Value>,
    exp: Option<f64>,
}

/// An admitted token's claims: Google's issuer, our audience, `exp` not past (within skew).
fn assert_admissible(token: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "admitted a token without three segments");
    let payload = URL_SAFE_NO_PAD
        .decode(parts[1].trim_end_matches('='))
        .expect("admitted a token whose payload is not base64url");
    let claims: Admitted =
        serde_json::from_slice(&payload).expect("admitted a token whose payload is not JSON");
    let iss = claims.iss.unwrap_or_default();
    assert!(
        GOOGLE_ISSUERS.contains(&iss.as_str()),
        "admitted issuer {iss:?}"
    );
    let aud_ok = match &claims.aud {
        Some(Value::String(aud)) => aud == AUDIENCE,
        Some(Value::Array(auds)) => auds.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    assert!(aud_ok, "admitted audience {:?}", claims.aud);
    let exp = claims.exp.expect("admitted a token without a numeric exp");
    assert!(
        exp + 31.0 >= unix_now(),
        "admitted an expired token (exp {exp})"
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}
