//! A hop's ID token crosses its upstream connection once, not on every call: it travels in
//! `x-serverless-authorization`, which HPACK indexes, where `authorization` would be sent in
//! full (Huffman-coded by relay, decoded by ping) on each call. Nor does a deadline passed on
//! make a new header of every call. Measured on the wire, by a counting TCP proxy between relay
//! and ping.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use runmesh_proto::ping::v1::SendRequest;
use runmesh_testkit::{Idp, Mesh, RELAY_SA, Service, USER, authed, free_port};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// Forwards every connection to `upstream`, counting the bytes sent towards it.
struct CountingProxy {
    addr: SocketAddr,
    upstream_bytes: Arc<AtomicU64>,
    /// The accept loop and every connection's pumps; aborted on drop.
    _tasks: JoinSet<()>,
}

impl CountingProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let counter = upstream_bytes.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut pumps = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = TcpStream::connect(upstream).await.expect("upstream");
                inbound.set_nodelay(true).expect("nodelay");
                outbound.set_nodelay(true).expect("nodelay");
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let counter = counter.clone();
                pumps.spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = in_read.read(&mut buf).await {
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if out_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                pumps.spawn(async move {
                    let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                });
            }
        });
        Self {
            addr,
            upstream_bytes,
            _tasks: tasks,
        }
    }

    fn bytes(&self) -> u64 {
        self.upstream_bytes.load(Ordering::Relaxed)
    }
}

/// A relay whose upstream connection to ping goes through a [`CountingProxy`].
struct CountedRelay {
    idp: Idp,
    ping: Service,
    proxy: CountingProxy,
    relay: Service,
    user_token: String,
}

impl CountedRelay {
    async fn start() -> Self {
        let idp = Idp::start(&[RELAY_SA]).await;
        let ping = Mesh::start_ping(&idp, free_port()).await;
        let proxy = CountingProxy::start(([127, 0, 0, 1], ping.port).into()).await;
        let relay_port = free_port();
        let relay_url = format!("http://127.0.0.1:{relay_port}");
        let relay = Service::start_on(
            "relay",
            relay_port,
            &[
                ("AUTH_AUDIENCE", relay_url.clone()),
                ("AUTH_JWKS_URL", idp.jwks.clone()),
                ("AUTH_ALLOWED_CALLERS", USER.to_string()),
                ("UPSTREAM_URL", format!("http://{}", proxy.addr)),
                // The token names ping, whose URL the proxy stands in for.
                ("UPSTREAM_AUDIENCE", ping.url.clone()),
                ("GCE_METADATA_HOST", idp.metadata_host(RELAY_SA)),
            ],
        )
        .await;
        let user_token = idp.token(&relay_url, USER).await;
        Self {
            idp,
            ping,
            proxy,
            relay,
            user_token,
        }
    }

    /// Bytes the relay sent towards ping per call over `calls` calls, each with `timeout` if
    /// any, after one such call that opened the connection and filled the header table.
    async fn upstream_bytes_per_call(&self, calls: u64, timeout: Option<Duration>) -> u64 {
        let mut client = self.relay.client().await;
        let request = || {
            let mut request = authed(
                SendRequest {
                    message: "m".into(),
                    payload: Vec::new(),
                },
                &self.user_token,
            );
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            request
        };
        client.send(request()).await.expect("first call");
        let before = self.proxy.bytes();
        for _ in 0..calls {
            client.send(request()).await.expect("call");
        }
        (self.proxy.bytes() - before) / calls
    }
}

#[tokio::test]
async fn the_hop_token_crosses_the_upstream_connection_once() {
    let relay = CountedRelay::start().await;
    let hop_token = relay.idp.token(&relay.ping.url, RELAY_SA).await;
    let per_call = relay.upstream_bytes_per_call(50, None).await;
    // A Huffman-coded token alone is three quarters of its length; everything else a call
    // sends (headers mostly indexed, a tiny message, frame headers) is far less.
    let token_on_the_wire = hop_token.len() as u64 * 3 / 4;
    eprintln!(
        "relay → ping: {per_call} bytes per call; a token is {} bytes",
        hop_token.len()
    );
    assert!(
        per_call < token_on_the_wire / 2,
        "relay sent {per_call} bytes per call to ping: the {}-byte token goes in full every call",
        hop_token.len()
    );
}

/// The deadline a hop passes on repeats from call to call (`runtime::deadline::time_left`), so
/// HPACK sends it as an index. Exact to the microsecond, each call's was a new literal (7 more
/// bytes), and each entered the header table, pushing the token out to be sent again.
#[tokio::test]
async fn a_forwarded_deadline_is_not_a_new_header_on_every_call() {
    let relay = CountedRelay::start().await;
    let calls = 200;
    let without = relay.upstream_bytes_per_call(calls, None).await;
    let with = relay
        .upstream_bytes_per_call(calls, Some(Duration::from_secs(100)))
        .await;
    eprintln!("relay → ping: {without} bytes per call, {with} with a 100 s deadline");
    // The index of the deadline's table entry is one byte; three significant digits of ~99.9 s
    // make a new value, a literal, once every 100 ms, and these calls take about a millisecond.
    assert!(
        with <= without + 2,
        "a deadline costs {} bytes per call upstream",
        with - without
    );
}
