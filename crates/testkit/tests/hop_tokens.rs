//! A hop's ID token crosses its upstream connection once, not on every call: it travels in
//! `x-serverless-authorization`, which HPACK indexes, where `authorization` would be sent in
//! full (Huffman-coded by relay, decoded by ping) on each call. Measured on the wire, by a
//! counting TCP proxy between relay and ping.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
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

#[tokio::test]
async fn the_hop_token_crosses_the_upstream_connection_once() {
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
    let hop_token = idp.token(&ping.url, RELAY_SA).await;
    let mut client = relay.client().await;
    let send = || SendRequest {
        message: "m".into(),
        payload: Vec::new(),
    };

    // The first call opens the connection and puts the token in the table.
    client
        .send(authed(send(), &user_token))
        .await
        .expect("first call");
    let before = proxy.bytes();
    let calls = 50u64;
    for _ in 0..calls {
        client
            .send(authed(send(), &user_token))
            .await
            .expect("call");
    }
    let per_call = (proxy.bytes() - before) / calls;
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
