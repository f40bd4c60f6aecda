//! The auth variables of the configuration table (`AUTH_*`, `UPSTREAM_AUTH`, `UPSTREAM_AUDIENCE`).

use runmesh_config::{ConfigError, Env, choice, http_url, list};

/// Google's JWKS: the keys that sign Google ID tokens.
pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";

/// How a server decides whether a call may enter (`AUTH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Verify the token's signature against the JWKS and all its claims (the default).
    Verify,
    /// Trust Cloud Run's own IAM check of the token (whose signature it strips) and only check
    /// the forwarded claims; see [`crate::verify`] for the finding this rests on.
    CloudRun,
    /// Admit every call without a token; logged as a warning at startup.
    Off,
}

/// The server half's configuration: who may call this service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAuthConfig {
    /// How tokens are checked (`AUTH_MODE`).
    pub mode: AuthMode,
    /// Audiences this service accepts, usually its own URLs (`AUTH_AUDIENCE`).
    pub audiences: Vec<String>,
    /// Where the signing keys are published (`AUTH_JWKS_URL`).
    pub jwks_url: String,
    /// Emails or subs allowed to call; empty admits any verified caller (`AUTH_ALLOWED_CALLERS`).
    pub allowed_callers: Vec<String>,
}

impl ServerAuthConfig {
    /// Reads `AUTH_MODE`, `AUTH_AUDIENCE`, `AUTH_JWKS_URL` and `AUTH_ALLOWED_CALLERS`.
    ///
    /// `AUTH_AUDIENCE` is required unless the mode is `off`: a verifier without an audience
    /// would either accept tokens meant for any service or refuse them all.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let mode = choice(
            env,
            "AUTH_MODE",
            &[
                ("verify", AuthMode::Verify),
                ("cloud-run", AuthMode::CloudRun),
                ("off", AuthMode::Off),
            ],
            AuthMode::Verify,
        )?;
        let audiences = list(env, "AUTH_AUDIENCE");
        if audiences.is_empty() && mode != AuthMode::Off {
            return Err(ConfigError::Missing {
                var: "AUTH_AUDIENCE",
            });
        }
        let jwks_url = match env.get("AUTH_JWKS_URL") {
            Some(_) => http_url(env, "AUTH_JWKS_URL")?.to_string(),
            None => GOOGLE_JWKS_URL.to_string(),
        };
        Ok(Self {
            mode,
            audiences,
            jwks_url,
            allowed_callers: list(env, "AUTH_ALLOWED_CALLERS"),
        })
    }
}

/// Whether calls to the upstream carry an ID token (`UPSTREAM_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// ID tokens from google-cloud-auth's Application Default Credentials (the default).
    Google,
    /// No token; only for an upstream that runs with `AUTH_MODE=off`.
    Off,
}

/// The client half's configuration: which token to present to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAuthConfig {
    /// Whether to add a token (`UPSTREAM_AUTH`).
    pub mode: UpstreamAuth,
    /// The audience the token is minted for (`UPSTREAM_AUDIENCE`).
    pub audience: String,
    /// `host:port` of the metadata server when it is not Google's (`GCE_METADATA_HOST`, the
    /// variable google-cloud-auth itself reads); the local mesh points it at the identity server.
    pub metadata_host: Option<String>,
}

impl UpstreamAuthConfig {
    /// Reads `UPSTREAM_AUTH`, `UPSTREAM_AUDIENCE` and `GCE_METADATA_HOST`.
    ///
    /// The audience defaults to `upstream_url`'s scheme and host without port or path, which is
    /// the audience Cloud Run accepts for a service URL.
    pub fn from_env(env: &impl Env, upstream_url: &url::Url) -> Result<Self, ConfigError> {
        let mode = choice(
            env,
            "UPSTREAM_AUTH",
            &[("google", UpstreamAuth::Google), ("off", UpstreamAuth::Off)],
            UpstreamAuth::Google,
        )?;
        let audience = match env.get("UPSTREAM_AUDIENCE") {
            Some(audience) => audience.trim().to_string(),
            None => default_audience(upstream_url),
        };
        let metadata_host = env.get("GCE_METADATA_HOST").map(|h| h.trim().to_string());
        if let Some(host) = &metadata_host {
            let valid = !host.contains('/')
                && url::Url::parse(&format!("http://{host}")).is_ok_and(|u| u.host().is_some());
            if !valid {
                return Err(ConfigError::invalid(
                    "GCE_METADATA_HOST",
                    host,
                    "expected host:port without a scheme",
                ));
            }
        }
        Ok(Self {
            mode,
            audience,
            metadata_host,
        })
    }

    /// The metadata server's base URL (`http://host:port`) when `GCE_METADATA_HOST` is set.
    pub fn metadata_endpoint(&self) -> Option<String> {
        self.metadata_host.as_ref().map(|h| format!("http://{h}"))
    }
}

/// Cloud Run's audience for a service URL: scheme and host, no port, no path.
fn default_audience(url: &url::Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_is_the_default_and_needs_an_audience() {
        let err = ServerAuthConfig::from_env(&[("X", "1")]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::Missing {
                var: "AUTH_AUDIENCE"
            }
        );
        let config = ServerAuthConfig::from_env(&[("AUTH_AUDIENCE", "https://a, https://b")])
            .expect("valid");
        assert_eq!(config.mode, AuthMode::Verify);
        assert_eq!(config.audiences, ["https://a", "https://b"]);
        assert_eq!(config.jwks_url, GOOGLE_JWKS_URL);
        assert!(config.allowed_callers.is_empty());
    }

    #[test]
    fn cloud_run_mode_needs_an_audience_and_off_does_not() {
        let err = ServerAuthConfig::from_env(&[("AUTH_MODE", "cloud-run")]).unwrap_err();
        assert!(err.to_string().contains("AUTH_AUDIENCE"), "{err}");
        let config = ServerAuthConfig::from_env(&[("AUTH_MODE", "off")]).expect("valid");
        assert_eq!(config.mode, AuthMode::Off);
    }

    #[test]
    fn jwks_url_must_be_http_and_callers_are_a_list() {
        let env = [
            ("AUTH_AUDIENCE", "https://ping"),
            ("AUTH_JWKS_URL", "ftp://keys"),
        ];
        let err = ServerAuthConfig::from_env(&env).unwrap_err();
        assert!(err.to_string().starts_with("AUTH_JWKS_URL="), "{err}");
        let env = [
            ("AUTH_AUDIENCE", "https://ping"),
            ("AUTH_JWKS_URL", "http://idp:8080/jwks"),
            ("AUTH_ALLOWED_CALLERS", "relay@x.iam, gateway@x.iam"),
            ("AUTH_MODE", "Cloud-Run"),
        ];
        let config = ServerAuthConfig::from_env(&env).expect("valid");
        assert_eq!(config.jwks_url, "http://idp:8080/jwks");
        assert_eq!(config.allowed_callers, ["relay@x.iam", "gateway@x.iam"]);
        assert_eq!(config.mode, AuthMode::CloudRun);
        let err = ServerAuthConfig::from_env(&[("AUTH_MODE", "none")]).unwrap_err();
        assert!(err.to_string().contains("verify, cloud-run, off"), "{err}");
    }

    #[test]
    fn upstream_audience_defaults_to_scheme_and_host_only() {
        let url = url::Url::parse("https://ping-abc-uc.a.run.app:443/some/path").expect("url");
        let config = UpstreamAuthConfig::from_env(&[("X", "1")], &url).expect("valid");
        assert_eq!(config.mode, UpstreamAuth::Google);
        assert_eq!(config.audience, "https://ping-abc-uc.a.run.app");
        let url = url::Url::parse("http://ping:8080").expect("url");
        let config = UpstreamAuthConfig::from_env(&[("X", "1")], &url).expect("valid");
        assert_eq!(config.audience, "http://ping");
        assert_eq!(config.metadata_host, None);
    }

    #[test]
    fn upstream_audience_and_metadata_host_can_be_set() {
        let url = url::Url::parse("http://ping:8080").expect("url");
        let env = [
            ("UPSTREAM_AUTH", "off"),
            ("UPSTREAM_AUDIENCE", "https://ping.example"),
            ("GCE_METADATA_HOST", "idp:9001"),
        ];
        let config = UpstreamAuthConfig::from_env(&env, &url).expect("valid");
        assert_eq!(config.mode, UpstreamAuth::Off);
        assert_eq!(config.audience, "https://ping.example");
        assert_eq!(config.metadata_host.as_deref(), Some("idp:9001"));
        assert_eq!(
            config.metadata_endpoint().as_deref(),
            Some("http://idp:9001")
        );
        let err = UpstreamAuthConfig::from_env(&[("GCE_METADATA_HOST", "http://idp:9001")], &url)
            .unwrap_err();
        assert!(err.to_string().starts_with("GCE_METADATA_HOST="), "{err}");
    }
}
