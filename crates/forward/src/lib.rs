//! One forwarding implementation of `PingService`, shared by relay and gateway.
//!
//! # Layout
//! - [`Config`]: the service's settings plus `UPSTREAM_URL` and how to authenticate upstream.
//! - [`upstream`]: the shared connections to the next hop (h2c or TLS, lazy, reconnecting,
//!   keepalive), calls spread over them, with the ID-token layer on each.
//! - [`Forwarder`]: the four RPCs, each message passed on as it arrives and as it was encoded,
//!   with this hop prepended to every response's trail.
//! - [`PingServer`]: serves the forwarder, reading and writing gRPC's framing itself (`framing`
//!   holds it, shared with the upstream client).
//! - [`ForwardError`]: the errors this hop raises itself, and their gRPC codes.
//!
//! relay and gateway differ only in [`Role`] and in the allow-lists their deploy gives them.

mod error;
mod forwarder;
mod framing;
mod server;
mod trail;
pub mod upstream;

use std::{future::Future, num::NonZeroUsize};

use runmesh_auth::{ServerAuthConfig, ServerAuthLayer, UpstreamAuthConfig};
use runmesh_config::{ConfigError, Env, http_url, parse_or};
use runmesh_runtime::{App, Drain, Identity, ServeError, ServerConfig, ServiceConfig};
use tokio::net::TcpListener;

pub use error::ForwardError;
pub use forwarder::Forwarder;
pub use server::PingServer;

/// Which hop this process is; only the name in the hop trail and in error messages differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The edge: callers are end users.
    Gateway,
    /// The internal hop: its caller is the gateway.
    Relay,
}

impl Role {
    /// The service name used in `Hop.service` and in status messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Relay => "relay",
        }
    }
}

/// A forwarding service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which hop this is.
    pub role: Role,
    /// `PORT`, `SHUTDOWN_GRACE`, `MAX_MESSAGE_SIZE`, `LOG_FORMAT`.
    pub server: ServerConfig,
    /// `AUTH_*`: who may call this hop.
    pub auth: ServerAuthConfig,
    /// `UPSTREAM_URL`: the next hop, `http://` (h2c) or `https://` (TLS, system roots).
    pub upstream_url: url::Url,
    /// `UPSTREAM_CONNECTIONS`: HTTP/2 connections calls are spread over (default: one per
    /// worker thread). More connections than workers frame no more at once, and each one more
    /// splits the batches its writes coalesce (`runmesh_runtime::coalesce`): a relay with one
    /// worker spent 5 % more CPU a call over two connections than over one.
    pub upstream_connections: NonZeroUsize,
    /// `UPSTREAM_AUTH`, `UPSTREAM_AUDIENCE`: how this hop proves itself upstream.
    pub upstream_auth: UpstreamAuthConfig,
    /// `K_REVISION` or the host name, for the hop trail.
    pub identity: Identity,
}

impl Config {
    /// Reads the config of a `role` hop; errors name the variable and the bad value.
    pub fn from_env(role: Role, env: &impl Env) -> Result<Self, ConfigError> {
        let upstream_url = http_url(env, "UPSTREAM_URL")?;
        let server = ServerConfig::from_env(env)?;
        let upstream_connections = parse_or(env, "UPSTREAM_CONNECTIONS", server.worker_threads)?;
        Ok(Self {
            upstream_connections,
            role,
            server,
            auth: ServerAuthConfig::from_env(env)?,
            upstream_auth: UpstreamAuthConfig::from_env(env, &upstream_url)?,
            upstream_url,
            identity: Identity::from_env(role.name(), env),
        })
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// The hop's service, health names and auth, ready for [`runmesh_runtime::serve()`].
pub fn app(config: &Config, forwarder: Forwarder, drain: Drain) -> App<PingServer> {
    App {
        name: config.role.name(),
        service: PingServer::new(forwarder),
        health_names: vec![runmesh_proto::PING_SERVICE_NAME],
        auth: ServerAuthLayer::new(&config.auth),
        drain,
    }
}

/// Serves a forwarding hop on `listener` until `shutdown`, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let upstream = upstream::connect(&config).map_err(|e| {
        ServeError::Setup(format!(
            "{}: upstream {}: {e}",
            config.role.name(),
            config.upstream_url
        ))
    })?;
    let drain = Drain::default();
    let forwarder = Forwarder::new(&config, upstream, drain.clone());
    let app = app(&config, forwarder, drain);
    runmesh_runtime::serve(&config.server, listener, app, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_is_required_and_must_be_http() {
        let err = Config::from_env(Role::Relay, &[("AUTH_MODE", "off")]).unwrap_err();
        assert_eq!(err.to_string(), "UPSTREAM_URL is required but not set");
        let err = Config::from_env(
            Role::Relay,
            &[("AUTH_MODE", "off"), ("UPSTREAM_URL", "grpc://ping:8080")],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("UPSTREAM_URL=\"grpc://ping:8080\" is invalid"),
            "{err}"
        );
    }

    #[test]
    fn upstream_connections_default_to_the_workers_and_must_be_a_positive_count() {
        let base = [("AUTH_MODE", "off"), ("UPSTREAM_URL", "http://ping:8080")];
        let c = Config::from_env(Role::Relay, &base).unwrap();
        assert_eq!(
            c.upstream_connections,
            std::thread::available_parallelism().unwrap()
        );
        let mut one_worker = base.to_vec();
        one_worker.push(("WORKER_THREADS", "1"));
        let c = Config::from_env(Role::Relay, &one_worker.as_slice()).unwrap();
        assert_eq!(c.upstream_connections.get(), 1);
        let with = |v: &'static str| {
            let mut env = base.to_vec();
            env.push(("UPSTREAM_CONNECTIONS", v));
            Config::from_env(Role::Relay, &env.as_slice())
        };
        assert_eq!(with(" 3 ").unwrap().upstream_connections.get(), 3);
        for bad in ["0", "-1", "two"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("UPSTREAM_CONNECTIONS={bad:?} is invalid")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_upstream_audience_defaults_to_the_url_without_port_or_path() {
        let c = Config::from_env(
            Role::Gateway,
            &[
                ("AUTH_MODE", "off"),
                ("UPSTREAM_URL", "https://relay-abc-uc.a.run.app:443/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream_auth.audience, "https://relay-abc-uc.a.run.app");
        assert_eq!(c.identity.service, "gateway");
    }
}
