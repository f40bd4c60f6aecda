//! The connections each hop keeps to its upstream, shared by every call.
//!
//! HTTP/2 multiplexes calls over each connection, but a connection carries at most as many calls
//! at once as the upstream advertises (`SETTINGS_MAX_CONCURRENT_STREAMS`; further calls wait in
//! the hop), and one task at each end frames all of its traffic. So the hop spreads its calls
//! round-robin over `UPSTREAM_CONNECTIONS` of them. Each connects lazily (a hop starts even
//! while its upstream is still coming up) and reconnects on demand after a failure. HTTP/2
//! keepalive pings detect a connection that went silent (a reset behind a load balancer leaves
//! a channel answering nothing otherwise), so the next call reconnects instead of hanging.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use http::HeaderValue;
use runmesh_auth::{GoogleIdTokens, IdToken, IdTokenLayer, TokenError, UpstreamAuth};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore},
};
use tower::{BoxError, Layer};

use crate::Config;

mod connection;
mod grpc;

pub use connection::{Connection, ResponseBody, Streaming, Target, TransportError};
pub use grpc::{Grpc, Messages};

/// The upstream connection with this hop's ID token added to every call.
pub type UpstreamChannel = IdToken<Connection>;

/// Why the upstream connections could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL or TLS settings were refused.
    #[error("upstream {url}: {source}")]
    Target {
        /// The upstream URL.
        url: url::Url,
        /// What was wrong with it.
        #[source]
        source: BoxError,
    },
    /// The token source could not be built (e.g. a broken credentials file).
    #[error("{0}")]
    Token(#[from] TokenError),
}

/// TLS with the system's roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), offering only h2.
fn tls_connector() -> Result<TlsConnector, BoxError> {
    runmesh_auth::install_crypto_provider();
    let native = rustls_native_certs::load_native_certs();
    if native.certs.is_empty() {
        return Err(format!("no system root certificates found: {:?}", native.errors).into());
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(native.certs);
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Where `url` is and how to reach it: TLS with the system's roots for `https://`.
fn target(url: &url::Url, user_agent: HeaderValue) -> Result<Target, BoxError> {
    let tls = if url.scheme() == "https" {
        Some(tls_connector()?)
    } else {
        None
    };
    Target::new(url, tls, user_agent)
}

/// A connection to `url` with no token layer, for a client that is not a hop: `runmesh bench`
/// loads services through it, so that what it costs per call is a hop's client half, not
/// tonic's `Channel` (a `tower::buffer` task, hyper's dispatch task, a task per call, a write
/// per request).
pub fn connection(url: &url::Url, user_agent: HeaderValue) -> Result<Connection, BoxError> {
    Ok(Connection::lazy(Arc::new(target(url, user_agent)?)))
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
    let user_agent = format!(
        "runmesh-{}/{}",
        config.role.name(),
        env!("CARGO_PKG_VERSION")
    );
    let target = HeaderValue::from_str(&user_agent)
        .map_err(BoxError::from)
        .and_then(|user_agent| target(&config.upstream_url, user_agent))
        .map_err(|source| UpstreamError::Target {
            url: config.upstream_url.clone(),
            source,
        })?;
    let target = Arc::new(target);
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
        .map(|_| layer.layer(Connection::lazy(target.clone())))
        .collect();
    Ok(Upstream {
        channels,
        next: Arc::default(),
    })
}
