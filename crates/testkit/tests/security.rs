//! Security review, as processes: auth is never off by accident, and tokens never reach a log.
//!
//! - Every service refuses to start (exit 64, naming `AUTH_AUDIENCE`) when no `AUTH_*` is set;
//!   only an explicit `AUTH_MODE=off` starts one without verification, and it says so with a
//!   warning.
//! - Through the whole chain at `RUST_LOG=trace`, with good calls and every kind of bad token —
//!   expired, not yet valid, forged, signed by an unknown key, `alg: none`, wrong audience,
//!   wrong issuer, unverified email, a caller off the allow-list — and with the identity server
//!   killed (JWKS and token fetches failing), no line any process prints contains a token, one
//!   of its segments, or anything shaped like a JWT.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use runmesh_auth::idp::Issuer;
use runmesh_proto::{
    ping::v1::{SendRequest, SendStreamRequest},
    tonic::{Code, Request, metadata::MetadataValue},
};
use runmesh_testkit::{
    GATEWAY_SA, Idp, Mesh, Proc, RELAY_SA, Service, USER, authed, bin, free_port,
};
use serde_json::{Value, json};

/// Services that verify tokens, with the extra settings each needs to get as far as auth.
fn services() -> [(&'static str, Vec<(&'static str, String)>); 3] {
    let upstream = ("UPSTREAM_URL", "http://127.0.0.1:9".to_string());
    [
        ("ping", vec![]),
        ("relay", vec![upstream.clone()]),
        ("gateway", vec![upstream]),
    ]
}

/// Runs `name` with `env` and expects it to refuse to start.
async fn refuses_to_start(name: &str, env: &[(&str, String)]) -> Vec<String> {
    let mut all = vec![
        ("HOST", "127.0.0.1".to_string()),
        ("PORT", free_port().to_string()),
    ];
    all.extend(env.iter().cloned());
    let mut proc = Proc::spawn(name, bin(name), &[], &all);
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{name} started with {env:?}:\n{}", proc.lines().join("\n")));
    // Let the reader tasks drain the pipes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = proc.lines();
    assert_eq!(
        status.code(),
        Some(64),
        "{name}: {status:?}\n{}",
        lines.join("\n")
    );
    lines
}

#[tokio::test]
async fn no_service_starts_without_auth_settings() {
    for (name, env) in services() {
        let lines = refuses_to_start(name, &env).await;
        assert!(
            lines.iter().any(|l| l.contains("AUTH_AUDIENCE")),
            "{name} did not name AUTH_AUDIENCE:\n{}",
            lines.join("\n")
        );
    }
}

#[tokio::test]
async fn only_the_exact_off_switch_turns_auth_off() {
    for (name, env) in services() {
        for (mode, audience) in [
            ("", ""),
            ("verify", ""),
            ("cloud-run", ""),
            ("verify", " , "),
            ("none", ""),
            ("disabled", ""),
            ("false", ""),
            ("of", ""),
        ] {
            let mut env = env.clone();
            env.push(("AUTH_MODE", mode.to_string()));
            env.push(("AUTH_AUDIENCE", audience.to_string()));
            let lines = refuses_to_start(name, &env).await;
            let named = if matches!(mode, "" | "verify" | "cloud-run") {
                "AUTH_AUDIENCE"
            } else {
                "AUTH_MODE"
            };
            assert!(
                lines.iter().any(|l| l.contains(named)),
                "{name} with AUTH_MODE={mode:?}: expected {named} named:\n{}",
                lines.join("\n")
            );
        }
    }
}

#[tokio::test]
async fn auth_off_starts_only_when_asked_and_warns() {
    let upstream = Service::start("ping", &[("AUTH_MODE", "off".into())]).await;
    for (name, extra) in [
        ("ping", vec![]),
        (
            "relay",
            vec![
                ("UPSTREAM_URL", upstream.url.clone()),
                ("UPSTREAM_AUTH", "off".to_string()),
            ],
        ),
        (
            "gateway",
            vec![
                ("UPSTREAM_URL", upstream.url.clone()),
                ("UPSTREAM_AUTH", "off".to_string()),
            ],
        ),
    ] {
        let mut env = vec![("AUTH_MODE", "off".to_string())];
        env.extend(extra);
        let service = Service::start(name, &env).await;
        let warning = service
            .proc
            .wait_for_line("AUTH_MODE=off", Duration::from_secs(5))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{name}: no auth-off line:\n{}",
                    service.proc.lines().join("\n")
                )
            });
        let line: Value = serde_json::from_str(&warning).expect("a JSON log line");
        assert_eq!(line["severity"], "WARNING", "{warning}");
        // And it really is off: a call without a token is answered.
        let pong = service
            .client()
            .await
            .send(SendRequest {
                message: "open".into(),
                payload: vec![],
            })
            .await
            .unwrap_or_else(|s| panic!("{name} with auth off refused a call: {s:?}"));
        assert_eq!(pong.into_inner().pong.expect("pong").message, "open");
    }
}

#[tokio::test]
async fn auth_on_by_default_refuses_a_call_without_a_token() {
    let service = Service::start("ping", &[("AUTH_AUDIENCE", "http://ping".into())]).await;
    assert!(
        !service
            .proc
            .lines()
            .iter()
            .any(|l| l.contains("AUTH_MODE=off")),
        "auth-off warning with auth on"
    );
    let status = service
        .client()
        .await
        .send(SendRequest::default())
        .await
        .expect_err("a call without a token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// The local identity server with a signing key the test also holds, on fixed ports so it can
/// be killed and started again where the services expect it.
struct KeyedIdp {
    key_file: tempfile::NamedTempFile,
    api: String,
    identities: Vec<(String, String)>,
}

impl KeyedIdp {
    fn new() -> (Self, Issuer) {
        let issuer = Issuer::generate().expect("key");
        let key_file = tempfile::NamedTempFile::new().expect("key file");
        std::fs::write(key_file.path(), issuer.signing_key_pem()).expect("write key");
        let same_key = Issuer::from_pem_files(&[key_file.path().to_path_buf()]).expect("reload");
        assert_eq!(same_key.kid(), issuer.kid());
        let mut idp = Self {
            key_file,
            api: String::new(),
            identities: Vec::new(),
        };
        idp.pick_ports();
        (idp, same_key)
    }

    fn pick_ports(&mut self) {
        self.api = format!("127.0.0.1:{}", free_port());
        self.identities = [GATEWAY_SA, RELAY_SA]
            .iter()
            .map(|e| (e.to_string(), format!("127.0.0.1:{}", free_port())))
            .collect();
    }

    /// The first start: a port free a moment ago may have been taken since by another test's
    /// process, and nothing expects these ports yet, so it picks others and tries again.
    async fn first_start(&mut self) -> Idp {
        for _ in 0..4 {
            match self.try_start().await {
                Ok(idp) => return idp,
                Err(output) if output.contains("Address already in use") => self.pick_ports(),
                Err(output) => panic!("idp did not start: {output}"),
            }
        }
        self.start().await
    }

    /// A start on the ports picked before, where the services expect the idp.
    async fn start(&self) -> Idp {
        self.try_start()
            .await
            .unwrap_or_else(|output| panic!("idp did not start: {output}"))
    }

    async fn try_start(&self) -> Result<Idp, String> {
        let mut args = vec![
            "idp".to_string(),
            "--api".into(),
            self.api.clone(),
            "--key-file".into(),
            path_str(self.key_file.path()),
        ];
        for (email, addr) in &self.identities {
            args.push("--identity".into());
            args.push(format!("{email}={addr}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn(
            "idp",
            bin("runmesh"),
            &args,
            &[("RUST_LOG", "trace".into())],
        );
        if proc
            .wait_for_line("\"jwks\"", Duration::from_secs(15))
            .await
            .is_none()
        {
            return Err(proc.lines().join("\n"));
        }
        Ok(Idp {
            proc,
            api: format!("http://{}", self.api),
            jwks: format!("http://{}/jwks", self.api),
            identities: self.identities.clone(),
        })
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 temp path").to_string()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn claims(audience: &str, email: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": "https://accounts.google.com",
        "aud": audience,
        "sub": "109876543210987654321",
        "email": email,
        "email_verified": true,
        "iat": now,
        "exp": now + 3600,
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().expect("object").remove(key);
    claims
}

/// `token` with its payload swapped for `claims`, signature kept: a forgery.
fn forged(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

/// An unsigned token (`alg: none`).
fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// `message` with `header: Bearer token`.
fn with_header(header: &'static str, token: &str) -> Request<SendRequest> {
    let mut request = Request::new(SendRequest {
        message: "secret-check".into(),
        payload: vec![],
    });
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("header value");
    request.metadata_mut().insert(header, value);
    request
}

/// Where `haystack` holds something shaped like a JWT: `eyJ` (base64url of `{"`) and at least
/// 16 more base64url characters.
fn jwt_like(haystack: &str) -> Option<&str> {
    haystack.match_indices("eyJ").find_map(|(at, _)| {
        let run = haystack[at..]
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            .count();
        (run >= 19).then(|| &haystack[at..at + run])
    })
}

/// Fails if any line contains a token, a segment longer than 16 characters, or a JWT shape.
fn assert_no_secret(who: &str, lines: &[String], tokens: &[String]) {
    let mut secrets: Vec<&str> = Vec::new();
    for token in tokens {
        secrets.push(token);
        secrets.extend(token.split('.').filter(|s| s.len() > 16));
    }
    for line in lines {
        for secret in &secrets {
            assert!(
                !line.contains(secret),
                "{who} logged a token (segment {secret:.24}…): {line}"
            );
        }
        if let Some(shape) = jwt_like(line) {
            panic!("{who} logged something shaped like a JWT ({shape:.24}…): {line}");
        }
    }
}

#[tokio::test]
async fn no_token_reaches_any_log_even_on_error_paths() {
    let trace = [("RUST_LOG", "trace".to_string())];
    let (mut keyed, issuer) = KeyedIdp::new();
    let mesh = Mesh::around(keyed.first_start().await, &trace).await;
    let gateway_aud = &mesh.gateway.url;
    let good = mesh.user_token().await;
    let mut tokens = vec![good.clone()];

    // Bad tokens at the gateway, in either header: refused there, nothing forwarded.
    let stranger = Issuer::generate().expect("other key");
    let base = claims(gateway_aud, USER);
    let refused = [
        issuer.sign_claims(&with(base.clone(), "exp", json!(unix_now() - 3600))),
        issuer.sign_claims(&with(base.clone(), "nbf", json!(unix_now() + 3600))),
        issuer.sign_claims(&with(base.clone(), "aud", json!(mesh.relay.url))),
        issuer.sign_claims(&with(base.clone(), "iss", json!("https://evil.example"))),
        issuer.sign_claims(&with(base.clone(), "email_verified", json!(false))),
        issuer.sign_claims(&without(base.clone(), "exp")),
        forged(
            &good,
            &with(base.clone(), "email", json!("admin@example.com")),
        ),
        unsigned(&base),
        format!("{good}.extra-segment-to-break-the-jwt"),
        // An unknown key id: one JWKS refetch, then refused.
        stranger.sign_claims(&base),
        // Minted for another hop.
        mesh.idp.token(&mesh.relay.url, USER).await,
    ];
    for token in &refused {
        for header in ["authorization", "x-serverless-authorization"] {
            let status = mesh
                .gateway
                .client()
                .await
                .send(with_header(header, token))
                .await
                .expect_err("a bad token was admitted");
            assert_eq!(status.code(), Code::Unauthenticated, "{header}: {status:?}");
            assert!(!status.message().contains(token.as_str()), "{status:?}");
        }
        tokens.push(token.clone());
    }

    // A user calling ping directly: valid token for ping, not on its allow-list.
    let direct = mesh.idp.token(&mesh.ping.url, USER).await;
    let status = mesh
        .ping
        .client()
        .await
        .send(authed(SendRequest::default(), &direct))
        .await
        .expect_err("a user skipped two hops");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    tokens.push(direct);

    // A relay whose metadata server is not there: verifies its caller, then has no token to
    // call ping with.
    let port = free_port();
    let tokenless_url = format!("http://127.0.0.1:{port}");
    let mut env = vec![
        ("AUTH_AUDIENCE", tokenless_url.clone()),
        ("AUTH_JWKS_URL", mesh.idp.jwks.clone()),
        ("AUTH_ALLOWED_CALLERS", GATEWAY_SA.to_string()),
        ("UPSTREAM_URL", mesh.ping.url.clone()),
        ("GCE_METADATA_HOST", format!("127.0.0.1:{}", free_port())),
    ];
    env.extend_from_slice(&trace);
    let tokenless = Service::start_on("relay", port, &env).await;
    let token = issuer.sign_claims(&claims(&tokenless_url, GATEWAY_SA));
    let status = tokenless
        .client()
        .await
        .send(authed(SendRequest::default(), &token))
        .await
        .expect_err("no upstream token can be had");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokens.push(token);

    // The identity server dies: key fetches fail.
    let Mesh {
        mut idp,
        ping,
        relay,
        gateway,
    } = mesh;
    idp.proc.signal("KILL");
    idp.proc
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("idp killed");
    let status = gateway
        .client()
        .await
        .send(authed(SendRequest::default(), &good))
        .await
        .expect_err("relay cannot check the gateway's token");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let relay_token = issuer.sign_claims(&claims(&relay.url, GATEWAY_SA));
    let status = relay
        .client()
        .await
        .send(authed(SendRequest::default(), &relay_token))
        .await
        .expect_err("relay has no keys yet");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokens.push(relay_token);
    // The user's gateway token replayed at relay, which cannot fetch keys: refused all the same.
    let status = relay
        .client()
        .await
        .send(authed(SendRequest::default(), &good))
        .await
        .expect_err("relay admitted a token without keys");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // It comes back with the same key: good calls flow again, unary and streaming.
    let idp_again = keyed.start().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match gateway
            .client()
            .await
            .send(authed(SendRequest::default(), &good))
            .await
        {
            Ok(_) => break,
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => panic!("the chain did not recover: {status:?}"),
        }
    }
    let request = SendStreamRequest {
        message: "s".into(),
        count: 3,
        interval: None,
        payload: vec![],
    };
    let mut stream = gateway
        .client()
        .await
        .send_stream(authed(request, &good))
        .await
        .expect("stream")
        .into_inner();
    let mut pongs = 0;
    while let Some(item) = stream.message().await.transpose() {
        item.expect("pong");
        pongs += 1;
    }
    assert_eq!(pongs, 3);
    // And replayed at relay once it has keys: wrong audience.
    let status = relay
        .client()
        .await
        .send(authed(SendRequest::default(), &good))
        .await
        .expect_err("a gateway token admitted at relay");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let procs = [
        &idp.proc,
        &idp_again.proc,
        &ping.proc,
        &relay.proc,
        &gateway.proc,
        &tokenless.proc,
    ];
    for proc in procs {
        let lines = proc.lines();
        assert!(!lines.is_empty(), "{} printed nothing", proc.name);
        assert_no_secret(&proc.name, &lines, &tokens);
        assert!(!proc.panicked(), "{} panicked", proc.name);
    }
    // The error paths really were taken, and logged.
    let all: Vec<String> = procs.iter().flat_map(|p| p.lines()).collect();
    for needle in [
        "call refused",
        "no ID token for the upstream",
        "JWKS fetch failed",
    ] {
        assert!(
            all.iter().any(|l| l.contains(needle)),
            "no {needle:?} line; the error path was not exercised"
        );
    }
}

#[test]
fn the_jwt_detector_finds_a_token_in_a_log_line() {
    let issuer = Issuer::generate().expect("key");
    let token = issuer.mint("http://a", USER, Duration::from_secs(60));
    let line = json!({"message": "header", "value": format!("Bearer {token}")}).to_string();
    assert!(jwt_like(&line).is_some_and(|found| token.starts_with(found)));
    let payload_only = token.split('.').nth(1).expect("payload");
    assert!(jwt_like(payload_only).is_some());
    let clean = r#"{"message":"rpc finished","trace":"a9797ea186168da0e61b46eb42c6a00a","eyJ":1}"#;
    assert_eq!(jwt_like(clean), None);
}
