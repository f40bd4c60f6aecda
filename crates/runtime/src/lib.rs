//! The shared bootstrap every runmesh service runs on.
//!
//! # Layout
//! - [`config`]: `PORT`, `SHUTDOWN_GRACE`, `MAX_MESSAGE_SIZE`, `LOG_FORMAT`, parsed once per service.
//! - [`telemetry`]: JSON logs in Cloud Logging's structured format, or text for a terminal.
//! - [`serve()`]: h2c on an already-bound listener, health, reflection, auth, graceful drain.
//! - [`observe`]: a span, an access-log line and RPC metrics per call, server and client side.
//! - [`guarded`]: a response body that holds a permit or a count until the call is over.
//! - [`limit`]: a bound on calls in flight, refused with `RESOURCE_EXHAUSTED` beyond it.
//! - [`grpc_only`]: HTTP 415 for anything that is not `application/grpc`.
//! - [`deadline`]: the caller's `grpc-timeout`, enforced on streams too (tonic only bounds the
//!   response headers).
//! - [`status`]: maps tonic's message-size `OUT_OF_RANGE` to gRPC's `RESOURCE_EXHAUSTED`, and a
//!   status with details that are not base64 to `INTERNAL` (tonic's client panics on those).
//! - [`coalesce`]: the answers of a connection's unary calls written together, one system call
//!   for many; streams are never held back.
//! - [`process`]: a service binary's whole `main`, and its `healthcheck` subcommand.
//! - [`shutdown`]: SIGTERM / Ctrl-C, and the [`Drain`] signal handlers use to end long streams.

pub mod coalesce;
pub mod config;
pub mod deadline;
mod dispatch;
pub mod grpc_only;
pub mod guarded;
pub mod limit;
pub mod observe;
pub mod process;
pub mod serve;
pub mod shutdown;
pub mod status;
pub mod telemetry;

pub use config::{LogFormat, ServerConfig};
pub use process::{ServiceConfig, run};
pub use serve::{App, ServeError, bind, serve};
pub use shutdown::{Drain, shutdown_signal};

use runmesh_config::Env;
use runmesh_proto::ping::v1::Hop;

/// Which service this process is and which instance of it, for the `Hop` it adds to responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `"gateway"`, `"relay"` or `"ping"`.
    pub service: &'static str,
    /// `K_REVISION` when set (Cloud Run), else the host name.
    pub instance: String,
}

impl Identity {
    /// Names this instance the way the API contract asks: `K_REVISION`, else the host name.
    pub fn from_env(service: &'static str, env: &impl Env) -> Self {
        let instance = env
            .get("K_REVISION")
            .or_else(|| env.get("HOSTNAME"))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "unknown".to_string());
        Self { service, instance }
    }

    /// This service's entry in a response's hop trail.
    pub fn hop(&self, caller: Option<&str>) -> Hop {
        Hop {
            service: self.service.to_string(),
            instance: self.instance.clone(),
            caller: caller.unwrap_or_default().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_prefers_the_cloud_run_revision() {
        let env = [("K_REVISION", "ping-00001-abc"), ("HOSTNAME", "box")];
        assert_eq!(Identity::from_env("ping", &env).instance, "ping-00001-abc");
        let env = [("HOSTNAME", "box")];
        assert_eq!(Identity::from_env("ping", &env).instance, "box");
    }

    #[test]
    fn a_hop_without_auth_has_an_empty_caller() {
        let id = Identity {
            service: "relay",
            instance: "i".into(),
        };
        assert_eq!(id.hop(None).caller, "");
        assert_eq!(id.hop(Some("a@b")).caller, "a@b");
    }
}
