//! A server answers the unary calls it read together in a few writes, not one write each.
//!
//! Each answer is made by its call's own task, which wakes the connection's task; with one
//! worker, tokio runs that task next, and without coalescing it wrote that one answer
//! (`runmesh_runtime::coalesce`). Answers over 256 bytes also need their writes gathered, as
//! `h2` writes each such DATA frame before it encodes the next. The count comes from the kernel
//! ([`runmesh_testkit::Proc::writes`]).

use std::{io::Cursor, time::Duration};

use futures::future::join_all;
use runmesh_proto::{ping::v1::SendRequest, prost::Message};
use runmesh_testkit::{H2Client, Service};
use tokio::time::timeout;

/// Calls sent at once, in one write of the client's: one round.
const CALLS: usize = 16;
const ROUNDS: usize = 20;

fn quiet(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("AUTH_MODE", "off".to_string()),
        // As on Cloud Run; the answers' tasks then run one after another.
        ("WORKER_THREADS", "1".to_string()),
        // No access log lines, which are writes too.
        ("RUST_LOG", "warn".to_string()),
    ];
    env.extend_from_slice(extra);
    env
}

/// Payload of the larger calls: 4 KiB, as in `just bench`.
const LARGE: usize = 4 << 10;

/// One unary `Send` with `payload` bytes that must be answered OK.
async fn send(client: &H2Client, payload: usize) {
    let request = http::Request::post("http://127.0.0.1/runmesh.ping.v1.PingService/Send")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let message = SendRequest {
        message: "together".into(),
        payload: vec![0x5a; payload],
    }
    .encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&message);

    let mut client = client.clone().ready().await.expect("connection ready");
    let (response, mut stream) = client.send_request(request, false).expect("send");
    stream
        .send_data(Cursor::new(body), true)
        .expect("send body");
    let mut answer = response.await.expect("response").into_body();
    while let Some(chunk) = answer.data().await {
        let chunk = chunk.expect("answer");
        let _ = answer.flow_control().release_capacity(chunk.len());
    }
    let trailers = answer
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
}

/// Write system calls `counted` makes per call while `target` is sent rounds of [`CALLS`]
/// calls at once, each with `payload` bytes.
async fn writes_per_call(target: &Service, counted: &Service, payload: usize) -> f64 {
    let client = target.h2_client().await;
    send(&client, payload).await;
    let before = counted.proc.writes();
    for _ in 0..ROUNDS {
        let round = join_all((0..CALLS).map(|_| send(&client, payload)));
        timeout(Duration::from_secs(10), round)
            .await
            .expect("a round is answered");
    }
    (counted.proc.writes() - before) as f64 / (ROUNDS * CALLS) as f64
}

#[tokio::test]
async fn a_server_writes_the_answers_to_calls_read_together_together() {
    let ping = Service::start("ping", &quiet(&[])).await;
    for payload in [0, LARGE] {
        let per_call = writes_per_call(&ping, &ping, payload).await;
        assert!(
            per_call <= 0.25,
            "ping made {per_call:.2} writes per call for {CALLS} calls of {payload} bytes read at once"
        );
    }
}

#[tokio::test]
async fn a_relay_writes_both_ways_in_batches() {
    let ping = Service::start("ping", &quiet(&[])).await;
    let relay = Service::start(
        "relay",
        &quiet(&[
            ("UPSTREAM_URL", ping.url.clone()),
            ("UPSTREAM_AUTH", "off".to_string()),
            ("UPSTREAM_CONNECTIONS", "1".to_string()),
        ]),
    )
    .await;
    for payload in [0, LARGE] {
        let per_call = writes_per_call(&relay, &relay, payload).await;
        assert!(
            per_call <= 0.5,
            "the relay made {per_call:.2} writes per call of {payload} bytes (upstream and back) for {CALLS} calls at once"
        );
    }
}
