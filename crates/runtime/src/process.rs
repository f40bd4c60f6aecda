//! What every service binary's `main` does, in one place.

use std::{future::Future, process::ExitCode, time::Duration};

use runmesh_config::{ConfigError, ProcessEnv};
use tokio::net::TcpListener;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{ServeError, ServerConfig, shutdown_signal, telemetry};

/// Exit code for a configuration the service cannot start with (`EX_USAGE` from sysexits.h).
pub const EX_USAGE: u8 = 64;

/// A service's full config, which always holds the shared server part.
pub trait ServiceConfig {
    /// The shared server settings.
    fn server(&self) -> &ServerConfig;
    /// Which service and instance this is, for telemetry.
    fn identity(&self) -> &crate::Identity;
}

/// Runs a service binary: `healthcheck` subcommand, config, logs, bind, serve until SIGTERM.
///
/// `serve` receives the parsed config, the bound listener and the shutdown future. The runtime
/// is built here, once the config says how many worker threads it gets (`WORKER_THREADS`).
pub fn run<C, F, Fut>(
    service: &'static str,
    parse: fn(&ProcessEnv) -> Result<C, ConfigError>,
    serve: F,
) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), ServeError>>,
{
    runmesh_auth::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("healthcheck") => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            return match runtime {
                Ok(runtime) => runtime.block_on(healthcheck(service)),
                Err(e) => runtime_error(service, &e),
            };
        }
        Some(other) => {
            eprintln!("{service}: unknown argument {other:?}; usage: {service} [healthcheck]");
            return ExitCode::from(EX_USAGE);
        }
    }
    let config = match parse(&ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{service}: configuration error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server().worker_threads.get())
        // Named for `top -H` and perf; tokio's blocking threads share the name.
        .thread_name(format!("{service}-worker"))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return runtime_error(service, &e),
    };
    runtime.block_on(async {
        let telemetry =
            telemetry::init(config.server().log_format, config.identity(), &ProcessEnv).await;
        let listener = match crate::serve::bind(config.server()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(port = config.server().port, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let code = match serve(config, listener, Box::pin(shutdown_signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        };
        // Spans of the last calls are flushed before the process exits.
        telemetry.shutdown().await;
        code
    })
}

fn runtime_error(service: &str, e: &std::io::Error) -> ExitCode {
    eprintln!("{service}: cannot start the async runtime: {e}");
    ExitCode::FAILURE
}

/// Checks `grpc.health.v1.Health` on `127.0.0.1:$PORT`: the images carry no `grpc_health_probe`.
async fn healthcheck(service: &'static str) -> ExitCode {
    let port = match runmesh_config::parse_or(&ProcessEnv, "PORT", ServerConfig::DEFAULT_PORT) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{service} healthcheck: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match check_health(port, Duration::from_secs(3)).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{service} healthcheck: NOT_SERVING");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{service} healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the server on `127.0.0.1:port` reports `SERVING` for the whole server (`""`).
pub async fn check_health(port: u16, timeout: Duration) -> Result<bool, String> {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
        let res = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        Ok(res.into_inner().status() == ServingStatus::Serving)
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}
