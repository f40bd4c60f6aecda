//! ping in-process on an ephemeral port: the API contract, streams, limits, health, drain.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use runmesh_ping::{Config, Ping};
use runmesh_proto::ping::v1::{
    SendRequest, SendStreamRequest, ping_service_client::PingServiceClient,
};
use runmesh_runtime::{Drain, Identity};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

struct Running {
    channel: Channel,
    open_streams: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Running {
    fn client(&self) -> PingServiceClient<Channel> {
        PingServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn shutdown(&mut self) {
        let _ = self.stop.take().expect("running").send(());
    }
}

async fn start(extra: &[(&str, &str)]) -> Running {
    let mut env = vec![("AUTH_MODE", "off"), ("SHUTDOWN_GRACE", "5s")];
    env.extend_from_slice(extra);
    let config = Config::from_env(&env.as_slice()).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain = Drain::default();
    let ping = Ping::new(
        Identity {
            service: "ping",
            instance: "test".into(),
        },
        drain.clone(),
    );
    let open_streams = ping.open_streams();
    let app = runmesh_ping::app(&config, ping, drain);
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        runmesh_runtime::serve(&config.server, listener, app, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Running {
        channel,
        open_streams,
        stop: Some(tx),
        server,
    }
}

async fn wait_zero(counter: &AtomicUsize, within: Duration) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < within {
        if counter.load(Ordering::SeqCst) == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test]
async fn send_echoes_message_and_payload_with_ping_hop() {
    let ping = start(&[]).await;
    let res = ping
        .client()
        .send(SendRequest {
            message: "hello".into(),
            payload: vec![1, 2, 3],
        })
        .await
        .unwrap()
        .into_inner();
    let pong = res.pong.unwrap();
    assert_eq!(pong.index, 0);
    assert_eq!(pong.message, "hello");
    assert_eq!(pong.payload, [1, 2, 3]);
    assert!(pong.received_on.is_some());
    assert_eq!(pong.hops.len(), 1);
    assert_eq!(pong.hops[0].service, "ping");
    assert_eq!(pong.hops[0].instance, "test");
    assert_eq!(pong.hops[0].caller, "", "auth off: no verified caller");
}

#[tokio::test]
async fn send_stream_returns_count_pongs_in_order_interval_apart() {
    let ping = start(&[]).await;
    let start = std::time::Instant::now();
    let pongs: Vec<_> = ping
        .client()
        .send_stream(SendStreamRequest {
            message: "s".into(),
            count: 4,
            interval: Some(Duration::from_millis(30).try_into().unwrap()),
            payload: vec![9; 10],
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "3 pauses of 30 ms"
    );
    let indexes: Vec<i32> = pongs
        .iter()
        .map(|p| p.as_ref().unwrap().pong.as_ref().unwrap().index)
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    for p in &pongs {
        let pong = p.as_ref().unwrap().pong.as_ref().unwrap();
        assert_eq!(pong.message, "s");
        assert_eq!(pong.payload, vec![9; 10]);
    }
    assert!(wait_zero(&ping.open_streams, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn collect_counts_pings_and_sums_payload() {
    let ping = start(&[]).await;
    let pings = futures::stream::iter((0..5).map(|i| SendRequest {
        message: format!("m{i}"),
        payload: vec![0; i],
    }));
    let summary = ping.client().collect(pings).await.unwrap().into_inner();
    assert_eq!(summary.count, 5);
    assert_eq!(summary.payload_bytes, 10);
    assert_eq!(summary.last_message, "m4");
    assert_eq!(summary.hops[0].service, "ping");

    let empty = ping
        .client()
        .collect(futures::stream::empty::<SendRequest>())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((empty.count, empty.last_message.as_str()), (0, ""));
}

#[tokio::test]
async fn chat_answers_each_ping_before_the_next_is_sent() {
    let ping = start(&[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut pongs = ping
        .client()
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(SendRequest {
            message: format!("c{i}"),
            payload: vec![i as u8],
        })
        .await
        .unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(2), pongs.next())
            .await
            .expect("pong arrives while the request stream is still open")
            .unwrap()
            .unwrap()
            .pong
            .unwrap();
        assert_eq!(
            (pong.index, pong.message.as_str()),
            (i, format!("c{i}").as_str())
        );
        assert_eq!(pong.payload, [i as u8]);
    }
    drop(tx);
    assert!(pongs.next().await.is_none(), "half-close ends the chat");
}

#[tokio::test]
async fn endless_stream_stops_on_server_when_client_cancels() {
    let ping = start(&[]).await;
    let mut stream = ping
        .client()
        .send_stream(SendStreamRequest {
            count: 0,
            interval: Some(Duration::from_millis(5).try_into().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(ping.open_streams.load(Ordering::SeqCst), 1);
    drop(stream);
    assert!(
        wait_zero(&ping.open_streams, Duration::from_millis(500)).await,
        "server-side stream still running after cancel"
    );
}

#[tokio::test]
async fn endless_stream_ends_with_deadline_exceeded_and_stops_on_server() {
    let ping = start(&[]).await;
    let mut request = Request::new(SendStreamRequest {
        count: 0,
        interval: Some(Duration::from_millis(10).try_into().unwrap()),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let items: Vec<_> = ping
        .client()
        .send_stream(request)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let status = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_millis(400));
    assert!(items.len() > 3, "pongs flowed until the deadline");
    assert!(wait_zero(&ping.open_streams, Duration::from_millis(500)).await);
}

#[tokio::test]
async fn bad_arguments_are_invalid_argument_naming_the_field() {
    let ping = start(&[]).await;
    let err = ping
        .client()
        .send_stream(SendStreamRequest {
            count: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("count"), "{}", err.message());

    let err = ping
        .client()
        .send_stream(SendStreamRequest {
            count: 1,
            interval: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("interval"), "{}", err.message());
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted_and_the_server_keeps_serving() {
    let ping = start(&[("MAX_MESSAGE_SIZE", "1024")]).await;
    let big = SendRequest {
        message: "big".into(),
        payload: vec![0; 2048],
    };
    let err = ping.client().send(big.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let err = ping
        .client()
        .collect(futures::stream::iter(vec![big.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let mut pongs = ping
        .client()
        .chat(futures::stream::iter(vec![big]))
        .await
        .unwrap()
        .into_inner();
    let err = pongs.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let ok = ping
        .client()
        .send(SendRequest {
            message: "small".into(),
            payload: vec![0; 100],
        })
        .await;
    assert!(ok.is_ok(), "a small message still works: {ok:?}");
}

#[tokio::test]
async fn health_turns_not_serving_when_shutdown_starts() {
    let mut ping = start(&[]).await;
    let mut health = HealthClient::new(ping.channel.clone());
    for service in ["", "runmesh.ping.v1.PingService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    ping.shutdown();
    let next = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("status pushed at once")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    tokio::time::timeout(Duration::from_secs(3), ping.server)
        .await
        .expect("a watcher does not hold the drain open")
        .unwrap();
}

#[tokio::test]
async fn reflection_lists_the_ping_service() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let ping = start(&[]).await;
    let mut client = ServerReflectionClient::new(ping.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let res = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = res.message_response else {
        panic!("unexpected reflection answer {res:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"runmesh.ping.v1.PingService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn a_stream_in_flight_at_shutdown_completes_during_the_drain() {
    let mut ping = start(&[]).await;
    let mut stream = ping
        .client()
        .send_stream(SendStreamRequest {
            message: "drain".into(),
            count: 5,
            interval: Some(Duration::from_millis(100).try_into().unwrap()),
            payload: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    ping.shutdown();
    let rest: Vec<_> = stream.collect().await;
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(rest.iter().all(Result::is_ok), "{rest:?}");
    tokio::time::timeout(Duration::from_secs(3), ping.server)
        .await
        .expect("server exits once the stream is done")
        .unwrap();
}
