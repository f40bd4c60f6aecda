//! Settings every service shares, read from the environment Cloud Run gives a container.

use std::{num::NonZeroUsize, time::Duration};

use runmesh_config::{ConfigError, Env, choice, count_or_cores, duration_or, parse_or};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line in Cloud Logging's structured format.
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// The server half of a service's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `HOST`: the interface to listen on; every interface (`0.0.0.0`), as a container must,
    /// unless a local run narrows it to loopback.
    pub host: std::net::IpAddr,
    /// `PORT`: where to listen; Cloud Run sets it, 8080 otherwise.
    pub port: u16,
    /// `SHUTDOWN_GRACE`: how long in-flight calls may run after SIGTERM (Cloud Run gives 10 s).
    pub grace: Duration,
    /// `MAX_MESSAGE_SIZE`: largest message accepted or sent, in bytes, both directions.
    pub max_message_size: usize,
    /// `LOG_FORMAT`: `json` (default) or `text`.
    pub log_format: LogFormat,
    /// `MAX_IN_FLIGHT`: calls served at once (streams count while open); more get
    /// `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// `MAX_CONCURRENT_STREAMS`: HTTP/2 streams per connection the server advertises.
    pub max_concurrent_streams: u32,
    /// `WORKER_THREADS`: threads serving calls (default: one per core this process may use).
    /// Match it to the CPUs the instance gets: a worker more than there are cores to run it
    /// wakes and hands calls to the others for nothing (`README.md`, Performance).
    pub worker_threads: NonZeroUsize,
}

impl ServerConfig {
    /// Cloud Run's default port.
    pub const DEFAULT_PORT: u16 = 8080;
    /// gRPC's usual default, as in grpc-go and the C core.
    pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
    /// Well above Cloud Run's maximum concurrency per instance (1000).
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 2000;
    /// Cloud Run's front end multiplexes many calls on one connection; 1000 keeps it unqueued.
    pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1000;

    /// Reads the shared settings; errors name the variable and the value.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let host = parse_or(env, "HOST", std::net::IpAddr::from([0, 0, 0, 0]))?;
        let port = parse_or(env, "PORT", Self::DEFAULT_PORT)?;
        let grace = duration_or(env, "SHUTDOWN_GRACE", Duration::from_secs(10))?;
        let max_message_size = parse_or(env, "MAX_MESSAGE_SIZE", Self::DEFAULT_MAX_MESSAGE_SIZE)?;
        if max_message_size == 0 {
            return Err(zero(env, "MAX_MESSAGE_SIZE"));
        }
        let log_format = choice(
            env,
            "LOG_FORMAT",
            &[("json", LogFormat::Json), ("text", LogFormat::Text)],
            LogFormat::Json,
        )?;
        let max_in_flight = parse_or(env, "MAX_IN_FLIGHT", Self::DEFAULT_MAX_IN_FLIGHT)?;
        if max_in_flight == 0 {
            return Err(zero(env, "MAX_IN_FLIGHT"));
        }
        let max_concurrent_streams = parse_or(
            env,
            "MAX_CONCURRENT_STREAMS",
            Self::DEFAULT_MAX_CONCURRENT_STREAMS,
        )?;
        if max_concurrent_streams == 0 {
            return Err(zero(env, "MAX_CONCURRENT_STREAMS"));
        }
        let worker_threads = count_or_cores(env, "WORKER_THREADS")?;
        Ok(Self {
            worker_threads,
            max_in_flight,
            max_concurrent_streams,
            host,
            port,
            grace,
            max_message_size,
            log_format,
        })
    }
}

/// A limit set to zero, quoting the value as it was written.
fn zero(env: &impl Env, var: &'static str) -> ConfigError {
    ConfigError::invalid(var, env.get(var).unwrap_or_default(), "must be at least 1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_cloud_run() {
        let c = ServerConfig::from_env(&[("UNRELATED", "1")]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.max_message_size, 4 * 1024 * 1024);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.worker_threads,
            std::thread::available_parallelism().unwrap()
        );
    }

    #[test]
    fn worker_threads_are_a_positive_count() {
        let c = ServerConfig::from_env(&[("WORKER_THREADS", "1")]).unwrap();
        assert_eq!(c.worker_threads.get(), 1);
        for bad in ["0", "-2", "all"] {
            let err = ServerConfig::from_env(&[("WORKER_THREADS", bad)]).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("WORKER_THREADS={bad:?} is invalid")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_port_names_the_variable_and_the_value() {
        for (bad, why) in [
            ("http", "invalid digit"),
            ("70000", "too large"),
            ("-1", "invalid digit"),
        ] {
            let err = ServerConfig::from_env(&[("PORT", bad)]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("PORT={bad:?} is invalid")) && msg.contains(why),
                "{msg}"
            );
        }
    }

    #[test]
    fn bad_grace_size_and_format_are_refused() {
        assert!(ServerConfig::from_env(&[("SHUTDOWN_GRACE", "ten")]).is_err());
        assert!(ServerConfig::from_env(&[("MAX_MESSAGE_SIZE", "0")]).is_err());
        let err = ServerConfig::from_env(&[("MAX_IN_FLIGHT", " 000")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MAX_IN_FLIGHT=\" 000\" is invalid: must be at least 1"
        );
        assert!(ServerConfig::from_env(&[("MAX_CONCURRENT_STREAMS", "-3")]).is_err());
        let err = ServerConfig::from_env(&[("LOG_FORMAT", "xml")]).unwrap_err();
        assert!(err.to_string().contains("json, text"), "{err}");
    }
}
