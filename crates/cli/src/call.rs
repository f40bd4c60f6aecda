//! The four calls, against any service of the mesh (or any server of the API).

use std::{io::Write, time::Duration};

use clap::Args;
use futures::StreamExt;
use runmesh_proto::ping::v1::{
    SendRequest, SendStreamRequest, ping_service_client::PingServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use runmesh_runtime::{
    serve::MAX_FRAME_SIZE,
    status::{MalformedDetails, MalformedDetailsLayer, RewriteStatus, code_name},
};
use tower::Layer;

use crate::output;

/// Which RPC to make.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Send,
    Stream,
    Collect,
    Chat,
}

/// Arguments shared by the four calls.
#[derive(Debug, Args)]
pub(crate) struct CallArgs {
    /// Service to call: `http://` for h2c, `https://` for TLS with the system roots.
    #[arg(long, env = "RUNMESH_TARGET", default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Text carried by every ping.
    #[arg(long, default_value = "hello")]
    message: String,
    /// Pings to send (collect, chat) or pongs to ask for (stream; 0 = until cancelled).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    count: i32,
    /// Pause between messages, e.g. `100ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Bytes of payload in every ping.
    #[arg(long, default_value_t = 0)]
    payload_size: usize,
    /// ID token sent as `authorization: Bearer`; never printed.
    #[arg(long, env = "RUNMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Give up after this long, e.g. `5s`; sent upstream as `grpc-timeout`.
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

impl CallArgs {
    /// The arguments `runmesh up` uses for its demo calls.
    pub(crate) fn demo(target: &str, token: &str) -> Self {
        Self {
            target: target.to_string(),
            message: "hello".to_string(),
            count: 3,
            interval: None,
            payload_size: 16,
            token: Some(token.to_string()),
            deadline: Some(Duration::from_secs(10)),
            json: false,
        }
    }
}

/// A connection to a server, its statuses made safe to read ([`MalformedDetailsLayer`]): a
/// foreign server's bad `grpc-status-details-bin` is `INTERNAL` here, not a panic in tonic.
pub(crate) type Connection = RewriteStatus<Channel, MalformedDetails>;

/// A connection to `target`: h2c for `http://`, TLS with the system roots for `https://`.
///
/// It takes DATA frames of up to 64 KiB, as the services do: a server's ~32 KiB batch of
/// streamed messages then arrives as one frame, not two or three of HTTP/2's default 16 KiB,
/// which spares the sender and this client the per-frame work.
pub(crate) async fn connect(target: &str) -> Result<Connection, String> {
    let mut endpoint = Endpoint::from_shared(target.to_string())
        .map_err(|e| format!("bad --target {target:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .max_frame_size(MAX_FRAME_SIZE);
    if target.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(|e| format!("TLS for {target}: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    Ok(MalformedDetailsLayer.layer(channel))
}

struct Caller {
    client: PingServiceClient<Connection>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    deadline: Option<Duration>,
}

impl Caller {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        if let Some(d) = self.deadline {
            request.set_timeout(d);
        }
        request
    }
}

fn print(json: bool, text: String, value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(out, "{value}")
    } else {
        writeln!(out, "{text}")
    };
    let _ = out.flush();
}

/// Makes one call of `kind` and prints what comes back.
pub(crate) async fn run(kind: Kind, args: CallArgs) -> Result<(), String> {
    let channel = connect(&args.target).await?;
    let token = match &args.token {
        Some(t) => Some(
            format!("Bearer {}", t.trim())
                .parse::<MetadataValue<_>>()
                .map_err(|_| "the token has characters a header cannot carry".to_string())?,
        ),
        None => None,
    };
    let caller = Caller {
        client: PingServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        token,
        deadline: args.deadline,
    };
    let work = call(kind, &caller, &args);
    let result = match args.deadline {
        // tonic bounds only the wait for response headers; a stream needs the whole call bounded.
        // Biased towards the timer: a stream that is always ready must not starve it.
        Some(d) => tokio::select! {
            biased;
            () = tokio::time::sleep(d) => Err(Status::deadline_exceeded("deadline exceeded (client side)")),
            result = work => result,
        },
        None => work.await,
    };
    result.map_err(|s| format!("{}: {}", code_name(s.code()), s.message()))
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

async fn call(kind: Kind, caller: &Caller, args: &CallArgs) -> Result<(), Status> {
    let mut client = caller.client.clone();
    let ping = |i: i32| SendRequest {
        message: if args.count > 1 {
            format!("{} {i}", args.message)
        } else {
            args.message.clone()
        },
        payload: payload(args.payload_size),
    };
    match kind {
        Kind::Send => {
            let res = client
                .send(caller.request(SendRequest {
                    message: args.message.clone(),
                    payload: payload(args.payload_size),
                }))
                .await?
                .into_inner();
            let pong = res.pong.unwrap_or_default();
            print(
                args.json,
                output::pong_text(&pong),
                output::pong_json(&pong),
            );
        }
        Kind::Stream => {
            let request = SendStreamRequest {
                message: args.message.clone(),
                count: args.count,
                interval: args.interval.map(|d| d.try_into().unwrap_or_default()),
                payload: payload(args.payload_size),
            };
            let mut pongs = client
                .send_stream(caller.request(request))
                .await?
                .into_inner();
            while let Some(res) = pongs.message().await? {
                let pong = res.pong.unwrap_or_default();
                print(
                    args.json,
                    output::pong_text(&pong),
                    output::pong_json(&pong),
                );
            }
        }
        Kind::Collect => {
            let interval = args.interval;
            let pings: Vec<_> = (0..args.count.max(0)).map(ping).collect();
            let outbound = futures::stream::iter(pings).then(move |p| async move {
                if let Some(d) = interval {
                    tokio::time::sleep(d).await;
                }
                p
            });
            let summary = client.collect(caller.request(outbound)).await?.into_inner();
            print(
                args.json,
                output::summary_text(&summary),
                output::summary_json(&summary),
            );
        }
        Kind::Chat => {
            // Lock-step: each ping goes out only after the previous pong came back, which shows
            // the call is truly streaming in both directions.
            let (tx, rx) = mpsc::channel(1);
            let mut pongs = client
                .chat(caller.request(ReceiverStream::new(rx)))
                .await?
                .into_inner();
            for i in 0..args.count.max(0) {
                if i > 0
                    && let Some(d) = args.interval
                {
                    tokio::time::sleep(d).await;
                }
                tx.send(ping(i)).await.map_err(|_| {
                    Status::unavailable("the call ended before all pings were sent")
                })?;
                match pongs.next().await {
                    Some(res) => {
                        let pong = res?.pong.unwrap_or_default();
                        print(
                            args.json,
                            output::pong_text(&pong),
                            output::pong_json(&pong),
                        );
                    }
                    None => return Err(Status::unavailable("the call ended early")),
                }
            }
            drop(tx);
            while let Some(res) = pongs.next().await {
                let pong = res?.pong.unwrap_or_default();
                print(
                    args.json,
                    output::pong_text(&pong),
                    output::pong_json(&pong),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncReadExt, net::TcpListener};

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: u8 = 0x4;
    const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

    /// The settings a client announces first on a connection to a listener that answers nothing.
    async fn announced_settings(listener: TcpListener) -> Vec<(u16, u32)> {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut preface = [0; PREFACE.len()];
        tcp.read_exact(&mut preface).await.unwrap();
        assert_eq!(preface, PREFACE);
        let mut header = [0; 9];
        tcp.read_exact(&mut header).await.unwrap();
        assert_eq!(header[3], SETTINGS, "the first frame is SETTINGS");
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; len];
        tcp.read_exact(&mut payload).await.unwrap();
        payload
            .chunks_exact(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect()
    }

    /// A server of `PingService` whose every answer carries `grpc-status-details-bin` that is
    /// not base64: in the response headers (trailers-only) or, after a message, in trailers.
    #[derive(Clone)]
    struct BadDetails {
        in_trailers: bool,
    }

    impl tonic::server::NamedService for BadDetails {
        const NAME: &'static str = runmesh_proto::PING_SERVICE_NAME;
    }

    impl tower::Service<http::Request<tonic::body::Body>> for BadDetails {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            let mut status = http::HeaderMap::new();
            status.insert("grpc-status", "9".parse().unwrap());
            status.insert("grpc-status-details-bin", "not base64!".parse().unwrap());
            let response = http::Response::builder().header("content-type", "application/grpc");
            let response = if self.in_trailers {
                // An empty `SendResponse`, framed, then the trailers.
                let frames: [Result<_, Status>; 2] = [
                    Ok(http_body::Frame::data(tonic::codegen::Bytes::from_static(
                        &[0; 5],
                    ))),
                    Ok(http_body::Frame::trailers(status)),
                ];
                let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                response.body(tonic::body::Body::new(body))
            } else {
                let mut response = response.body(tonic::body::Body::empty()).unwrap();
                response.headers_mut().extend(status);
                Ok(response)
            };
            std::future::ready(Ok(response.unwrap()))
        }
    }

    #[tokio::test]
    async fn malformed_status_details_from_a_server_are_internal_not_a_panic() {
        for in_trailers in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let target = format!("http://{}", listener.local_addr().unwrap());
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(BadDetails { in_trailers })
                    .serve_with_incoming(incoming),
            );
            let mut client = PingServiceClient::new(connect(&target).await.unwrap());
            let err = client
                .send(SendRequest::default())
                .await
                .expect_err("the server answered FAILED_PRECONDITION");
            server.abort();
            assert_eq!(err.code(), tonic::Code::Internal, "{in_trailers}: {err:?}");
            assert!(
                err.message()
                    .starts_with("malformed grpc-status-details-bin from the server"),
                "{in_trailers}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_client_takes_data_frames_of_up_to_64_kib() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = format!("http://{}", listener.local_addr().unwrap());
        let settings = tokio::spawn(announced_settings(listener));
        // The handshake never completes (nothing answers); the preface is all this test needs.
        let connecting = tokio::spawn(async move { connect(&target).await });
        let settings = settings.await.unwrap();
        connecting.abort();
        assert!(
            settings.contains(&(SETTINGS_MAX_FRAME_SIZE, 64 << 10)),
            "{settings:?}"
        );
    }
}
