//! relay reaches an `https://` upstream with TLS, checking the certificate against the system
//! roots (here a test CA given through `SSL_CERT_FILE`) and the URL's host name.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use runmesh_proto::ping::v1::{SendRequest, ping_service_server::PingServiceServer};
use runmesh_runtime::{Drain, Identity};
use runmesh_testkit::Service;
use tokio::net::TcpListener;
use tonic::{
    Code,
    transport::{Server, ServerTlsConfig, server::TcpIncoming},
};

struct TlsPing {
    port: u16,
    ca_file: tempfile::NamedTempFile,
    _server: tokio::task::JoinHandle<()>,
}

/// ping served over TLS with a certificate for `host`, signed by a fresh test CA.
async fn tls_ping(host: &str) -> TlsPing {
    runmesh_auth::install_crypto_provider();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();

    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), ca_cert.pem()).unwrap();

    let identity = tonic::transport::Identity::from_pem(leaf.pem(), leaf_key.serialize_pem());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ping = runmesh_ping::Ping::new(
        Identity {
            service: "ping",
            instance: "tls".into(),
        },
        Drain::default(),
    );
    let server = tokio::spawn(async move {
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(PingServiceServer::new(ping))
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    TlsPing {
        port,
        ca_file,
        _server: server,
    }
}

async fn relay_to(upstream: &TlsPing, url_host: &str) -> Service {
    Service::start(
        "relay",
        &[
            ("AUTH_MODE", "off".into()),
            ("UPSTREAM_AUTH", "off".into()),
            (
                "UPSTREAM_URL",
                format!("https://{url_host}:{}", upstream.port),
            ),
            (
                "SSL_CERT_FILE",
                upstream.ca_file.path().display().to_string(),
            ),
        ],
    )
    .await
}

fn ping() -> SendRequest {
    SendRequest {
        message: "over tls".into(),
        payload: vec![],
    }
}

#[tokio::test]
async fn relay_reaches_a_tls_upstream_signed_by_a_trusted_ca() {
    let upstream = tls_ping("localhost").await;
    let relay = relay_to(&upstream, "localhost").await;
    let pong = relay
        .client()
        .await
        .send(ping())
        .await
        .unwrap()
        .into_inner()
        .pong
        .unwrap();
    assert_eq!(pong.message, "over tls");
    let services: Vec<_> = pong.hops.iter().map(|h| h.service.as_str()).collect();
    assert_eq!(services, ["relay", "ping"]);
}

#[tokio::test]
async fn relay_refuses_a_certificate_for_another_host() {
    let upstream = tls_ping("wrong.example").await;
    let relay = relay_to(&upstream, "localhost").await;
    let err = tokio::time::timeout(Duration::from_secs(10), relay.client().await.send(ping()))
        .await
        .expect("answer in time")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with("relay: upstream https://localhost:"),
        "{}",
        err.message()
    );
}
