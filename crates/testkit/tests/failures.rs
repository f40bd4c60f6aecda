//! Through the chain: deadlines, cancellation and a lost upstream end in clear statuses.

use std::time::{Duration, Instant};

use futures::StreamExt;
use runmesh_proto::ping::v1::{SendRequest, SendStreamRequest};
use runmesh_testkit::{Mesh, authed};
use tonic::Code;

const STOPPED_EARLY: &str = "stream stopped early";

fn endless() -> SendStreamRequest {
    SendStreamRequest {
        message: "endless".into(),
        count: 0,
        interval: Some(Duration::from_millis(20).try_into().unwrap()),
        payload: vec![],
    }
}

#[tokio::test]
async fn a_client_deadline_ends_an_endless_stream_and_ping_sees_it() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let deadline = Duration::from_millis(600);
    let mut request = authed(endless(), &token);
    request.set_timeout(deadline);
    let started = Instant::now();
    let items: Vec<_> = mesh
        .gateway
        .client()
        .await
        .send_stream(request)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let elapsed = started.elapsed();
    let status = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(elapsed < deadline * 2, "took {elapsed:?}");
    assert!(items.len() > 5, "pongs flowed until the deadline");
    assert!(
        mesh.ping
            .proc
            .wait_for_line(STOPPED_EARLY, Duration::from_secs(1))
            .await
            .is_some(),
        "ping never stopped its stream"
    );
}

#[tokio::test]
async fn a_client_cancel_reaches_ping_within_200ms() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let mut stream = mesh
        .gateway
        .client()
        .await
        .send_stream(authed(endless(), &token))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert!(
        !mesh
            .ping
            .proc
            .lines()
            .iter()
            .any(|l| l.contains(STOPPED_EARLY))
    );
    let cancelled = Instant::now();
    drop(stream);
    let seen = mesh
        .ping
        .proc
        .wait_for_line(STOPPED_EARLY, Duration::from_secs(2))
        .await;
    assert!(seen.is_some(), "ping never saw the cancel");
    let took = cancelled.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "cancel took {took:?} to reach ping"
    );
}

#[tokio::test]
async fn ping_down_is_unavailable_naming_the_hop_and_calls_recover_when_it_returns() {
    let mut mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;
    let req = || {
        authed(
            SendRequest {
                message: "x".into(),
                payload: vec![],
            },
            &token,
        )
    };
    client.send(req()).await.unwrap();

    let port = mesh.ping.port;
    mesh.ping.proc.signal("KILL");
    mesh.ping.proc.wait_exit(Duration::from_secs(5)).await;
    let started = Instant::now();
    let err = client.send(req()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with("relay: upstream http://127.0.0.1:"),
        "{}",
        err.message()
    );

    mesh.ping = Mesh::start_ping(&mesh.idp, port).await;
    let started = Instant::now();
    loop {
        match client.send(req()).await {
            Ok(_) => break,
            Err(e) if started.elapsed() < Duration::from_secs(5) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery within 5 s: {e:?}"),
        }
    }
}
