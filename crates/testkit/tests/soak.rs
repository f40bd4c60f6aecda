//! Mixed calls through the chain for `SOAK_SECS` seconds (default 30; `just soak` runs 600):
//! no error, flat memory, no file-descriptor leak. Ignored by default; `.ci/run` runs it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use runmesh_proto::ping::v1::{SendRequest, SendStreamRequest};
use runmesh_testkit::{Mesh, authed};

fn seconds() -> u64 {
    std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

fn ping(i: u64) -> SendRequest {
    SendRequest {
        message: format!("soak {i}"),
        payload: vec![7; (i % 4096) as usize],
    }
}

#[tokio::test]
#[ignore = "long-running; run by .ci/run and `just soak`"]
async fn mixed_calls_for_a_while_keep_memory_and_descriptors_flat() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let client = mesh.gateway.client().await;
    let services = [&mesh.gateway, &mesh.relay, &mesh.ping];

    // Warm up: connections, token caches, allocator pools.
    let mut warm = client.clone();
    for i in 0..200 {
        warm.send(authed(ping(i), &token)).await.unwrap();
    }
    let start: Vec<(u64, usize)> = services
        .iter()
        .map(|s| (s.proc.rss_kib(), s.proc.fd_count()))
        .collect();

    let until = Instant::now() + Duration::from_secs(seconds());
    let workers = (0..8u64).map(|w| {
        let mut c = client.clone();
        let token = token.clone();
        async move {
            let mut calls = 0u64;
            while Instant::now() < until {
                let i = calls * 8 + w;
                match i % 4 {
                    0 => {
                        c.send(authed(ping(i), &token)).await.map(|_| ())?;
                    }
                    1 => {
                        let req = SendStreamRequest {
                            message: "s".into(),
                            count: 10,
                            interval: None,
                            payload: vec![1; 512],
                        };
                        let mut s = c.send_stream(authed(req, &token)).await?.into_inner();
                        while let Some(item) = s.next().await {
                            item?;
                        }
                    }
                    2 => {
                        let pings = futures::stream::iter((0..10).map(ping));
                        c.collect(authed(pings, &token)).await?;
                    }
                    _ => {
                        let pings = futures::stream::iter((0..10).map(ping));
                        let mut s = c.chat(authed(pings, &token)).await?.into_inner();
                        while let Some(item) = s.next().await {
                            item?;
                        }
                    }
                }
                calls += 1;
            }
            Ok::<u64, tonic::Status>(calls)
        }
    });
    let results = futures::future::join_all(workers).await;
    let total: u64 = results
        .into_iter()
        .map(|r| r.expect("no call fails during the soak"))
        .sum();

    for (s, (rss0, fd0)) in services.iter().zip(start) {
        let (rss1, fd1) = (s.proc.rss_kib(), s.proc.fd_count());
        println!(
            "{}: RSS {rss0} → {rss1} KiB, fds {fd0} → {fd1}",
            s.proc.name
        );
        assert!(
            fd1 <= fd0 + 4,
            "{} leaks descriptors: {fd0} → {fd1}",
            s.proc.name
        );
        assert!(
            rss1 <= rss0 + rss0 / 2 + 8 * 1024,
            "{} memory grew: {rss0} → {rss1} KiB",
            s.proc.name
        );
        assert!(!s.proc.panicked());
    }
    println!("{total} calls in {} s, none failed", seconds());
}
