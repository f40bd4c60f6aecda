//! Arbitrary variable maps against the config parsers of ping, relay and gateway.
//!
//! Each input line is one variable: its first byte picks a real variable name, the rest is the
//! value. Parsing must return `Ok` or `Err`, never panic; an error must name a variable we set
//! (or a missing required one) and quote the value as given; an `Ok` must hold the invariants
//! the services rely on (no zero limits, an audience unless auth is off, an http(s) upstream).

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use runmesh_auth::AuthMode;
use runmesh_config::ConfigError;
use runmesh_forward::Role;
use runmesh_runtime::ServerConfig;

/// Every variable the services read (the README's configuration table), plus `HOSTNAME`.
const VARS: [&str; 21] = [
    "PORT",
    "HOST",
    "SHUTDOWN_GRACE",
    "MAX_MESSAGE_SIZE",
    "MAX_IN_FLIGHT",
    "MAX_CONCURRENT_STREAMS",
    "LOG_FORMAT",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "GOOGLE_CLOUD_PROJECT",
    "AUTH_MODE",
    "AUTH_AUDIENCE",
    "AUTH_JWKS_URL",
    "AUTH_ALLOWED_CALLERS",
    "UPSTREAM_URL",
    "UPSTREAM_AUTH",
    "UPSTREAM_AUDIENCE",
    "UPSTREAM_CONNECTIONS",
    "GCE_METADATA_HOST",
    "K_REVISION",
    "K_SERVICE",
    "HOSTNAME",
];

fuzz_target!(|data: &[u8]| {
    let mut env = HashMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&pick, value)) = line.split_first() else {
            continue;
        };
        let name = VARS[usize::from(pick) % VARS.len()];
        env.insert(
            name.to_string(),
            String::from_utf8_lossy(value).into_owned(),
        );
    }

    match runmesh_ping::Config::from_env(&env) {
        Ok(config) => {
            check_server(&config.server);
            check_auth(&config.auth);
        }
        Err(err) => check_error(&err, &env),
    }
    for role in [Role::Relay, Role::Gateway] {
        match runmesh_forward::Config::from_env(role, &env) {
            Ok(config) => {
                check_server(&config.server);
                check_auth(&config.auth);
                assert!(matches!(config.upstream_url.scheme(), "http" | "https"));
                assert!(config.upstream_url.host_str().is_some());
                if let Some(endpoint) = config.upstream_auth.metadata_endpoint() {
                    assert!(endpoint.starts_with("http://"));
                }
            }
            Err(err) => check_error(&err, &env),
        }
    }
});

fn check_server(server: &ServerConfig) {
    assert!(server.max_message_size >= 1);
    assert!(server.max_in_flight >= 1);
    assert!(server.max_concurrent_streams >= 1);
}

fn check_auth(auth: &runmesh_auth::ServerAuthConfig) {
    if auth.mode != AuthMode::Off {
        assert!(!auth.audiences.is_empty(), "auth on without an audience");
    }
    assert!(auth.audiences.iter().all(|a| !a.trim().is_empty()));
    assert!(auth.jwks_url.starts_with("http://") || auth.jwks_url.starts_with("https://"));
}

/// An error names its variable; an invalid value is quoted exactly as it was set.
fn check_error(err: &ConfigError, env: &HashMap<String, String>) {
    let message = err.to_string();
    match err {
        ConfigError::Missing { var } => {
            assert!(VARS.contains(var), "unknown variable {var}");
            // Unset, empty, or (for a list) nothing but separators and blanks.
            assert!(
                env.get(*var)
                    .is_none_or(|v| v.split(',').all(|item| item.trim().is_empty())),
                "{var} reported missing but set"
            );
            assert!(message.starts_with(var), "{message}");
        }
        ConfigError::Invalid { var, value, .. } => {
            assert!(VARS.contains(var), "unknown variable {var}");
            let set = env.get(*var).map(String::as_str).unwrap_or_default();
            assert!(
                set == value || set.trim() == value,
                "{var}: error quotes {value:?}, set {set:?}"
            );
            assert!(message.starts_with(&format!("{var}=")), "{message}");
        }
    }
}
