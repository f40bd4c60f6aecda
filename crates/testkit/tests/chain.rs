//! gateway → relay → ping as real processes with the local identity server: all four call
//! types end to end, each hop's verified caller, and who may call what.

use std::time::Duration;

use futures::StreamExt;
use runmesh_proto::ping::v1::{Hop, SendRequest, SendStreamRequest};
use runmesh_testkit::{GATEWAY_SA, Mesh, RELAY_SA, USER, authed};
use tonic::Code;

fn trail(hops: &[Hop]) -> Vec<(String, String)> {
    hops.iter()
        .map(|h| (h.service.clone(), h.caller.clone()))
        .collect()
}

fn expected() -> Vec<(String, String)> {
    [("gateway", USER), ("relay", GATEWAY_SA), ("ping", RELAY_SA)]
        .iter()
        .map(|(s, c)| (s.to_string(), c.to_string()))
        .collect()
}

#[tokio::test]
async fn all_four_call_types_chain_with_each_hops_verified_caller() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;

    let pong = client
        .send(authed(
            SendRequest {
                message: "unary".into(),
                payload: b"abc".to_vec(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .pong
        .unwrap();
    assert_eq!(
        (pong.message.as_str(), pong.payload.as_slice()),
        ("unary", &b"abc"[..])
    );
    assert_eq!(trail(&pong.hops), expected());

    let pongs: Vec<_> = client
        .send_stream(authed(
            SendStreamRequest {
                message: "server".into(),
                count: 5,
                interval: None,
                payload: vec![7; 1000],
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().pong.unwrap())
        .collect()
        .await;
    assert_eq!(
        pongs.iter().map(|p| p.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    for p in &pongs {
        assert_eq!(p.payload, vec![7; 1000]);
        assert_eq!(trail(&p.hops), expected());
    }

    let pings = futures::stream::iter((0..4).map(|i| SendRequest {
        message: format!("c{i}"),
        payload: vec![1; 10],
    }));
    let summary = client
        .collect(authed(pings, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.count, summary.payload_bytes), (4, 40));
    assert_eq!(summary.last_message, "c3");
    assert_eq!(trail(&summary.hops), expected());
}

#[tokio::test]
async fn bidi_through_the_chain_answers_each_ping_before_the_next_is_sent() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut pongs = mesh
        .gateway
        .client()
        .await
        .chat(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        tx.send(SendRequest {
            message: format!("b{i}"),
            payload: vec![i as u8; 3],
        })
        .await
        .unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(3), pongs.next())
            .await
            .expect("the pong comes back while the request stream stays open")
            .unwrap()
            .unwrap()
            .pong
            .unwrap();
        assert_eq!(pong.index, i);
        assert_eq!(pong.message, format!("b{i}"));
        assert_eq!(pong.payload, vec![i as u8; 3]);
        assert_eq!(trail(&pong.hops), expected());
    }
    drop(tx);
    assert!(
        pongs.next().await.is_none(),
        "half-close reaches ping and ends the call"
    );
}

#[tokio::test]
async fn a_user_token_sent_straight_to_relay_or_ping_is_refused() {
    let mesh = Mesh::start().await;
    let ping_req = || SendRequest {
        message: "sneaky".into(),
        payload: vec![],
    };
    // A token minted for the gateway is for the wrong audience anywhere else.
    let gateway_token = mesh.user_token().await;
    for service in [&mesh.relay, &mesh.ping] {
        let err = service
            .client()
            .await
            .send(authed(ping_req(), &gateway_token))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "{}: {err:?}",
            service.proc.name
        );
    }
    // A valid token for relay's or ping's own audience still names a caller not on the list.
    for service in [&mesh.relay, &mesh.ping] {
        let token = mesh.idp.token(&service.url, USER).await;
        let err = service
            .client()
            .await
            .send(authed(ping_req(), &token))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{}: {err:?}",
            service.proc.name
        );
    }
    // No token at all.
    let err = mesh
        .gateway
        .client()
        .await
        .send(ping_req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn service_tokens_are_fetched_once_and_reused_across_calls() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;
    for i in 0..20 {
        client
            .send(authed(
                SendRequest {
                    message: format!("{i}"),
                    payload: vec![],
                },
                &token,
            ))
            .await
            .unwrap();
    }
    assert_eq!(
        mesh.idp.minted(GATEWAY_SA).await,
        1,
        "gateway minted per call"
    );
    assert_eq!(mesh.idp.minted(RELAY_SA).await, 1, "relay minted per call");
}
