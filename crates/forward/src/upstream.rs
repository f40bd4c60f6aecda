//! The connections each hop keeps to its upstream, shared by every call.
//!
//! HTTP/2 multiplexes calls over each connection, but a connection carries at most as many calls
//! at once as the upstream advertises (`SETTINGS_MAX_CONCURRENT_STREAMS`; further calls wait in
//! the hop), and one task at each end frames all of its traffic. So the hop spreads its calls
//! round-robin over `UPSTREAM_CONNECTIONS` of them. Each connects lazily (a hop starts even
//! while its upstream is still coming up) and reconnects on demand after a failure. HTTP/2
//! keepalive pings detect a connection that went silent (a reset behind a load balancer leaves
//! a channel answering nothing otherwise), so the next call reconnects instead of hanging.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use runmesh_auth::{GoogleIdTokens, IdToken, IdTokenLayer, TokenError, UpstreamAuth};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::Layer;

use crate::Config;

/// The upstream channel with this hop's ID token added to every call.
pub type UpstreamChannel = IdToken<Channel>;

/// Why the upstream channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL or TLS settings were refused by the transport.
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    /// The token source could not be built (e.g. a broken credentials file).
    #[error("{0}")]
    Token(#[from] TokenError),
}

/// How long a connection attempt may take before the call fails `UNAVAILABLE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Ping interval that notices a dead connection well within a typical deadline.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The transport endpoint for `url`: h2c for `http://`, TLS with the system roots for `https://`.
pub fn endpoint(url: &url::Url) -> Result<Endpoint, tonic::transport::Error> {
    let mut endpoint = Endpoint::from_shared(url.as_str().trim_end_matches('/').to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if url.scheme() == "https" {
        let host = url.host_str().unwrap_or_default();
        // SNI and certificate name come from the URL, as Cloud Run's front end expects.
        let tls = ClientTlsConfig::new()
            .with_native_roots()
            .domain_name(host.to_string());
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint)
}

/// The hop's upstream connections, each with the ID-token layer; cloning shares them.
#[derive(Debug, Clone)]
pub struct Upstream {
    channels: Arc<[UpstreamChannel]>,
    next: Arc<AtomicUsize>,
}

impl Upstream {
    /// The connection for the next call, in turn.
    pub fn pick(&self) -> UpstreamChannel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
}

/// Builds the shared upstream connections; must run inside the tokio runtime (the token source
/// starts its background refresh there). One token source serves them all.
pub fn connect(config: &Config) -> Result<Upstream, UpstreamError> {
    let endpoint = endpoint(&config.upstream_url)?;
    let layer = match config.upstream_auth.mode {
        UpstreamAuth::Google => {
            let metadata = config
                .upstream_auth
                .metadata_host
                .as_ref()
                .map(|h| format!("http://{h}"));
            let source = GoogleIdTokens::new(&config.upstream_auth.audience, metadata.as_deref())?;
            IdTokenLayer::new(Arc::new(source))
        }
        UpstreamAuth::Off => {
            tracing::warn!(
                upstream = %config.upstream_url,
                "UPSTREAM_AUTH=off: calls upstream carry no ID token"
            );
            IdTokenLayer::off()
        }
    };
    let channels = (0..config.upstream_connections.get())
        .map(|_| layer.layer(endpoint.connect_lazy()))
        .collect();
    Ok(Upstream {
        channels,
        next: Arc::default(),
    })
}
