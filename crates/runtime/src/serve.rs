//! Serving a service the way Cloud Run expects: h2c on `$PORT`, health, reflection, drain.

use std::{convert::Infallible, future::Future, pin::Pin, time::Duration};

use futures::{Stream, StreamExt, TryStreamExt};
use runmesh_auth::{ServerAuthConfig, ServerAuthLayer};
use runmesh_proto::ping::v1::ping_service_server::{PingService, PingServiceServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status,
    body::Body,
    server::NamedService,
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

use crate::{
    Drain, ServerConfig,
    coalesce::{CoalescedIo, CountCallsLayer, OpenCalls, StreamingPaths},
    dispatch::Dispatch,
    limit::InFlightLimitLayer,
    status::SizeLimitStatusLayer,
};

/// The largest HTTP/2 DATA frame a runmesh process accepts, on its server connections, on a
/// hop's upstream connections and on the `runmesh` client's (HTTP/2's default is 16 KiB). tonic and the hops hand messages on
/// in batches of up to ~32 KiB; a peer may then send each batch as one frame instead of two or
/// three, which saves a frame's bookkeeping in `h2` and a read-buffer reallocation per frame.
/// Measured on a relay's 1 KiB server stream: −13 % instructions per message, −9 % CPU.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;

/// The APIs a runmesh server serves, for reflection and for telling its streaming calls apart.
const DESCRIPTOR_SETS: [&[u8]; 2] = [
    runmesh_proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
];

/// What a service brings to [`serve`]: its gRPC service and how callers are authenticated.
#[derive(Debug)]
pub struct App<S> {
    /// The service's name, for refusals raised by the server itself.
    pub name: &'static str,
    /// The service's own gRPC service, called for every path under its name; health and
    /// reflection are served beside it.
    pub service: S,
    /// Full gRPC names reported by health (besides the overall `""`).
    pub health_names: Vec<&'static str>,
    /// Verifies callers of the app's service; health and reflection stay open.
    pub auth: ServerAuthLayer,
    /// Started when long streams must end; the app's handlers hold clones.
    pub drain: Drain,
}

impl<P: PingService> App<PingServiceServer<P>> {
    /// `PingService` answered by `service`, with the message-size limit applied both ways.
    pub fn ping_service(
        name: &'static str,
        service: P,
        server: &ServerConfig,
        auth: &ServerAuthConfig,
        drain: Drain,
    ) -> Self {
        let max = server.max_message_size;
        let server = PingServiceServer::new(service)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        Self {
            name,
            service: server,
            health_names: vec![runmesh_proto::PING_SERVICE_NAME],
            auth: ServerAuthLayer::new(auth),
            drain,
        }
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP/2 server failed.
    #[error("server error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener could not be configured.
    #[error("listener error: {0}")]
    Listener(#[from] std::io::Error),
    /// The service could not be set up (e.g. its upstream channel).
    #[error("{0}")]
    Setup(String),
}

/// Binds `$HOST:$PORT`.
pub async fn bind(config: &ServerConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind((config.host, config.port)).await
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
///
/// The drain flips health to `NOT_SERVING`, stops accepting, lets in-flight calls finish, tells
/// endless streams to end shortly before the grace period is over ([`Drain`]), and returns when
/// the last call has finished or the grace period has passed, whichever is first.
pub async fn serve<S>(
    config: &ServerConfig,
    listener: TcpListener,
    app: App<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let reporter = HealthReporter::new();
    let names: Vec<&'static str> = std::iter::once("").chain(app.health_names).collect();
    for name in &names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let stopping = CancellationToken::new();
    let health = HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        stopping: stopping.clone(),
    });

    let reflection = || {
        DESCRIPTOR_SETS.iter().fold(
            tonic_reflection::server::Builder::configure(),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // grpcurl 1.8 and many tools still speak only v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let routes = Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    // Reflection's own method streams too.
    let streaming = StreamingPaths::from_descriptor_sets(DESCRIPTOR_SETS.into_iter().chain([
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]))
    .map_err(|e| std::io::Error::other(e.to_string()))?;

    let local = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(|tcp| CoalescedIo::new(tcp, OpenCalls::server()));

    let grace = config.grace;
    let drain = app.drain.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!(grace = ?grace, "draining: health NOT_SERVING, no new connections");
        for name in &names {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        stopping.cancel();
        tokio::spawn(async move {
            tokio::time::sleep(Drain::stream_cutoff(grace)).await;
            drain.start();
        });
        let _ = started_tx.send(());
    };

    tracing::info!(addr = %local, "serving h2c");
    let server = Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_frame_size(MAX_FRAME_SIZE)
        // Outermost: it hands the layers below the `TcpConnectInfo` they expect.
        .layer(CountCallsLayer::new(streaming))
        // Oversize messages get RESOURCE_EXHAUSTED, as gRPC's other implementations answer.
        .layer(SizeLimitStatusLayer)
        // tonic would read any body as gRPC; other content types get 415, as the spec asks.
        .layer(crate::grpc_only::GrpcOnlyLayer)
        // Outside auth, so refused calls are traced and logged with their status too.
        .layer(crate::observe::RpcTraceLayer)
        // Beyond the limit a call is refused before it costs a token check or an upstream call.
        .layer(InFlightLimitLayer::new(config.max_in_flight, app.name))
        // Every call but health and reflection needs a verified caller.
        .layer(app.auth)
        .serve_with_incoming_shutdown(Dispatch::new(app.service, routes), incoming, signal);
    tokio::pin!(server);
    let grace_over = async {
        if started_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            futures::future::pending::<()>().await;
        }
    };
    tokio::select! {
        res = &mut server => {
            res?;
            tracing::info!("drained; all calls finished");
        }
        () = grace_over => {
            tracing::warn!("grace period over with calls still open; exiting");
        }
    }
    Ok(())
}

/// Health that ends `Watch` streams once shutdown starts (after they see `NOT_SERVING`), so a
/// watching client cannot hold the drain open until the grace period runs out.
struct DrainingHealth {
    inner: HealthService,
    stopping: CancellationToken,
}

/// How long a watcher gets to receive `NOT_SERVING` before its stream ends.
const WATCH_LINGER: Duration = Duration::from_millis(100);

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = self.inner.watch(request).await?.into_inner();
        let stopping = self.stopping.clone();
        let stop = async move {
            stopping.cancelled().await;
            tokio::time::sleep(WATCH_LINGER).await;
        };
        Ok(Response::new(Box::pin(stream.take_until(stop))))
    }
}
