//! ping: the backend that answers `runmesh.ping.v1.PingService`.
//!
//! Streams are real streams: each pong is produced when it is due and polled by the transport,
//! so a caller that cancels, or whose deadline passes, stops the work at once (the stream is
//! dropped; nothing keeps running in a detached task).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{Stream, stream};
use runmesh_auth::{Caller, ServerAuthConfig};
use runmesh_config::{ConfigError, Env};
use runmesh_proto::ping::v1::{
    CollectResponse, Hop, Pong, SendRequest, SendResponse, SendStreamRequest,
    ping_service_server::{PingService, PingServiceServer},
};
use runmesh_runtime::{
    App, Drain, Identity, ServeError, ServerConfig, ServiceConfig, deadline,
    status::size_limit_to_resource_exhausted,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

/// ping's configuration: the shared server settings and how callers are verified.
#[derive(Debug, Clone)]
pub struct Config {
    /// `PORT`, `SHUTDOWN_GRACE`, `MAX_MESSAGE_SIZE`, `LOG_FORMAT`.
    pub server: ServerConfig,
    /// `AUTH_*`: who may call ping.
    pub auth: ServerAuthConfig,
    /// `K_REVISION` or the host name, for the hop trail.
    pub identity: Identity,
}

impl Config {
    /// Reads ping's config; errors name the variable and the bad value.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_env(env)?,
            auth: ServerAuthConfig::from_env(env)?,
            identity: Identity::from_env("ping", env),
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

/// What ping can refuse; the one place its errors get their gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    /// A request field is out of its allowed range.
    #[error("ping: invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<PingError> for Status {
    fn from(e: PingError) -> Self {
        match e {
            PingError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        }
    }
}

/// The `PingService` implementation.
#[derive(Debug, Clone)]
pub struct Ping {
    identity: Identity,
    drain: Drain,
    open_streams: Arc<AtomicUsize>,
}

type PongStream = Pin<Box<dyn Stream<Item = Result<SendResponse, Status>> + Send>>;

impl Ping {
    /// A ping answering as `identity`, ending its streams when `drain` starts.
    pub fn new(identity: Identity, drain: Drain) -> Self {
        Self {
            identity,
            drain,
            open_streams: Arc::default(),
        }
    }

    /// Server streams currently producing pongs; tests watch it drop when a caller goes away.
    pub fn open_streams(&self) -> Arc<AtomicUsize> {
        self.open_streams.clone()
    }

    fn hops<T>(&self, request: &Request<T>) -> Vec<Hop> {
        let caller = request.extensions().get::<Caller>().map(|c| c.0.as_str());
        vec![self.identity.hop(caller)]
    }

    fn pong(&self, index: i32, message: String, payload: Vec<u8>, hops: Vec<Hop>) -> SendResponse {
        SendResponse {
            pong: Some(Pong {
                index,
                message,
                received_on: Some(SystemTime::now().into()),
                payload,
                hops,
            }),
        }
    }
}

fn interval(value: Option<prost_types::Duration>) -> Result<Duration, PingError> {
    let Some(d) = value else {
        return Ok(Duration::ZERO);
    };
    Duration::try_from(d).map_err(|e| PingError::InvalidArgument {
        field: "interval",
        reason: format!("must be a non-negative duration ({e})"),
    })
}

/// Counts an open stream and logs how it ended, including when it was dropped early.
#[derive(Debug)]
struct StreamGuard {
    rpc: &'static str,
    open: Arc<AtomicUsize>,
    sent: u64,
    finished: bool,
}

impl StreamGuard {
    fn new(rpc: &'static str, open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self {
            rpc,
            open: open.clone(),
            sent: 0,
            finished: false,
        }
    }

    /// The stream ended the way the protocol says it ends, not by being dropped.
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        if self.finished {
            tracing::debug!(rpc = self.rpc, pongs = self.sent, "stream completed");
        } else {
            tracing::info!(
                rpc = self.rpc,
                pongs = self.sent,
                "stream stopped early: caller cancelled, deadline passed or drain"
            );
        }
    }
}

#[tonic::async_trait]
impl PingService for Ping {
    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let hops = self.hops(&request);
        let SendRequest { message, payload } = request.into_inner();
        Ok(Response::new(self.pong(0, message, payload, hops)))
    }

    type SendStreamStream = PongStream;

    async fn send_stream(
        &self,
        request: Request<SendStreamRequest>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let deadline = deadline::deadline(request.metadata());
        let hops = self.hops(&request);
        let req = request.into_inner();
        if req.count < 0 {
            return Err(PingError::InvalidArgument {
                field: "count",
                reason: format!(
                    "must be >= 0 (0 streams until cancelled), got {}",
                    req.count
                ),
            }
            .into());
        }
        let pause = interval(req.interval)?;
        let received_on = Some(SystemTime::now().into());
        let limit = (req.count > 0).then_some(req.count);
        let guard = StreamGuard::new("SendStream", &self.open_streams);
        let state = (0i32, guard);
        let pongs = stream::unfold(state, move |(index, mut guard)| {
            let pong = Pong {
                index,
                message: req.message.clone(),
                received_on,
                payload: req.payload.clone(),
                hops: hops.clone(),
            };
            async move {
                if limit.is_some_and(|n| index >= n) {
                    guard.finish();
                    return None;
                }
                if index > 0 && !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                guard.sent += 1;
                Some((Ok(SendResponse { pong: Some(pong) }), (index + 1, guard)))
            }
        });
        let bounded = deadline::bounded(pongs, deadline, &self.drain, "ping");
        Ok(Response::new(Box::pin(bounded)))
    }

    async fn collect(
        &self,
        request: Request<Streaming<SendRequest>>,
    ) -> Result<Response<CollectResponse>, Status> {
        let hops = self.hops(&request);
        let mut pings = request.into_inner();
        let mut summary = CollectResponse {
            hops,
            ..Default::default()
        };
        while let Some(ping) = pings
            .message()
            .await
            .map_err(size_limit_to_resource_exhausted)?
        {
            summary.count += 1;
            summary.payload_bytes += ping.payload.len() as i64;
            summary.last_message = ping.message;
        }
        Ok(Response::new(summary))
    }

    type ChatStream = PongStream;

    async fn chat(
        &self,
        request: Request<Streaming<SendRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = deadline::deadline(request.metadata());
        let hops = self.hops(&request);
        let this = self.clone();
        let guard = StreamGuard::new("Chat", &self.open_streams);
        let pings = request.into_inner();
        // `None` in the state: the inbound stream failed, so the reply ends after its status.
        let pongs = stream::unfold(Some((pings, 0i32, guard)), move |state| {
            let this = this.clone();
            let hops = hops.clone();
            async move {
                let (mut pings, index, mut guard) = state?;
                match pings.message().await {
                    Ok(Some(p)) => {
                        guard.sent += 1;
                        let pong = this.pong(index, p.message, p.payload, hops);
                        Some((Ok(pong), Some((pings, index + 1, guard))))
                    }
                    Ok(None) => {
                        guard.finish();
                        None
                    }
                    Err(status) => {
                        guard.finish();
                        Some((Err(size_limit_to_resource_exhausted(status)), None))
                    }
                }
            }
        });
        let bounded = deadline::bounded(pongs, deadline, &self.drain, "ping");
        Ok(Response::new(Box::pin(bounded)))
    }
}

/// ping's service, health names and auth, ready for [`runmesh_runtime::serve()`].
pub fn app(config: &Config, ping: Ping, drain: Drain) -> App<PingServiceServer<Ping>> {
    App::ping_service("ping", ping, &config.server, &config.auth, drain)
}

/// Serves ping on `listener` until `shutdown`, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let drain = Drain::default();
    let ping = Ping::new(config.identity.clone(), drain.clone());
    let app = app(&config, ping, drain);
    runmesh_runtime::serve(&config.server, listener, app, shutdown).await
}
