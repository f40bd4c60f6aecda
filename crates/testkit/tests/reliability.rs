//! Faults, drain and overload through the real chain: each ends in a clear status, nothing hangs,
//! nothing panics, and memory stays bounded.

use std::{
    error::Error as _,
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use runmesh_proto::ping::v1::{SendRequest, SendStreamRequest};
use runmesh_testkit::{Mesh, Service, authed, client};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn stream_req(count: i32, interval_ms: u64, payload: usize) -> SendStreamRequest {
    SendStreamRequest {
        message: "r".into(),
        count,
        interval: (interval_ms > 0).then(|| Duration::from_millis(interval_ms).try_into().unwrap()),
        payload: vec![0; payload],
    }
}

fn unary() -> SendRequest {
    SendRequest {
        message: "u".into(),
        payload: vec![],
    }
}

fn alive(services: &[&Service]) {
    for s in services {
        assert!(
            !s.proc.panicked(),
            "{} panicked: {:?}",
            s.proc.name,
            s.proc.lines()
        );
    }
}

#[tokio::test]
async fn ping_killed_under_50_open_streams_gives_every_caller_unavailable_then_recovers() {
    let mut mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let client = mesh.gateway.client().await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut s = client
            .clone()
            .send_stream(authed(stream_req(0, 50, 0), &token))
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }
    let port = mesh.ping.port;
    mesh.ping.proc.signal("KILL");
    let killed = Instant::now();
    let outcomes = join_all(streams.into_iter().map(|mut s| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), s.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(status))) => return Ok((status, killed.elapsed())),
                Ok(None) => return Err("ended without a status".to_string()),
                Err(_) => return Err("hung".to_string()),
            }
        }
    }))
    .await;
    for outcome in outcomes {
        let (status, after) = outcome.unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(after < Duration::from_secs(2), "took {after:?}");
    }
    alive(&[&mesh.gateway, &mesh.relay]);

    mesh.ping = Mesh::start_ping(&mesh.idp, port).await;
    let started = Instant::now();
    let mut c = client.clone();
    while c.send(authed(unary(), &token)).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no recovery in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to `which` hop under load: health flips, finite streams finish, endless ones end with
/// a clear status before the grace period, and the process exits 0 in time.
async fn drains_cleanly(which: &str) {
    let mut mesh = Mesh::start_with(&[("SHUTDOWN_GRACE", "3s".to_string())]).await;
    let token = mesh.user_token().await;
    let target = if which == "relay" {
        &mesh.relay
    } else {
        &mesh.gateway
    };
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(target.url.clone())
            .unwrap()
            .connect_lazy(),
    );
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let gateway = mesh.gateway.client().await;
    let mut finite = Vec::new();
    for _ in 0..5 {
        let mut s = gateway
            .clone()
            .send_stream(authed(stream_req(5, 300, 0), &token))
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        finite.push(s);
    }
    let mut endless = Vec::new();
    for _ in 0..3 {
        let mut s = gateway
            .clone()
            .send_stream(authed(stream_req(0, 100, 0), &token))
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        endless.push(s);
    }

    let target = if which == "relay" {
        &mut mesh.relay
    } else {
        &mut mesh.gateway
    };
    target.proc.signal("TERM");
    let term = Instant::now();
    let flipped = tokio::time::timeout(Duration::from_millis(500), watch.next())
        .await
        .expect("health answered at once")
        .unwrap()
        .unwrap();
    assert_eq!(flipped.status(), ServingStatus::NotServing);

    for mut s in finite {
        let rest: Vec<_> = (&mut s).collect().await;
        assert_eq!(rest.len(), 4, "{rest:?}");
        assert!(
            rest.iter().all(Result::is_ok),
            "accepted stream failed: {rest:?}"
        );
    }
    for mut s in endless {
        let status = loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => break status,
                None => panic!("an endless stream ended without a status"),
            }
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
        assert!(
            term.elapsed() < Duration::from_secs(3),
            "{:?}",
            term.elapsed()
        );
    }
    let exit = target
        .proc
        .wait_exit(Duration::from_secs(4))
        .await
        .expect("exited within the grace period");
    assert!(exit.success(), "{exit:?}");
    assert!(
        term.elapsed() < Duration::from_millis(3500),
        "{:?}",
        term.elapsed()
    );
    assert!(!target.proc.panicked());
}

#[tokio::test]
async fn relay_drains_on_sigterm_and_exits_zero() {
    drains_cleanly("relay").await;
}

#[tokio::test]
async fn gateway_drains_on_sigterm_and_exits_zero() {
    drains_cleanly("gateway").await;
}

#[tokio::test]
async fn a_frozen_upstream_yields_deadlines_keepalive_drops_it_and_calls_recover() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;
    client.send(authed(unary(), &token)).await.unwrap();

    mesh.ping.proc.signal("STOP");
    let frozen = Instant::now();
    // A call with no deadline at all: only keepalive can end it.
    let mut patient = client.clone();
    let patient_token = token.clone();
    let no_deadline = tokio::spawn(async move {
        let r = patient.send(authed(unary(), &patient_token)).await;
        (r, frozen.elapsed())
    });
    let mut answered_by_mesh = 0;
    while frozen.elapsed() < Duration::from_secs(20) {
        let mut req = authed(unary(), &token);
        // The header alone, so the status seen is the mesh's, not this client's own timer.
        req.metadata_mut()
            .insert("grpc-timeout", "1000m".parse().unwrap());
        let started = Instant::now();
        let err = client.send(req).await.unwrap_err();
        // The mesh answers a few ms before the deadline; on a loaded machine this client's own
        // tonic timer (driven by the same header) can fire first. Either way: no hang.
        let own_timer = err.code() == Code::Cancelled && err.source().is_some();
        assert!(
            own_timer || matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable),
            "{err:?}"
        );
        answered_by_mesh += usize::from(!own_timer);
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "{:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("{answered_by_mesh} of the deadline-bound calls were answered by the mesh itself");
    let (result, after) = no_deadline.await.unwrap();
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        after < Duration::from_secs(20),
        "keepalive never fired: {after:?}"
    );

    mesh.ping.proc.signal("CONT");
    let thawed = Instant::now();
    while client.send(authed(unary(), &token)).await.is_err() {
        assert!(
            thawed.elapsed() < Duration::from_secs(5),
            "no recovery in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alive(&[&mesh.gateway, &mesh.relay, &mesh.ping]);
}

#[tokio::test]
async fn calls_beyond_the_in_flight_limit_get_resource_exhausted() {
    let ping = Service::start(
        "ping",
        &[("AUTH_MODE", "off".into()), ("MAX_IN_FLIGHT", "3".into())],
    )
    .await;
    let c = ping.client().await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = c
            .clone()
            .send_stream(stream_req(0, 100, 0))
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        open.push(s);
    }
    let err = c.clone().send(unary()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("ping: overloaded"),
        "{}",
        err.message()
    );
    ping.wait_serving(Duration::from_secs(1)).await;

    drop(open.pop());
    let started = Instant::now();
    while c.clone().send(unary()).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the permit was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_burst_of_5000_calls_leaves_every_service_alive_with_bounded_memory() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let channels: Vec<_> =
        futures::future::join_all((0..10).map(|_| client(&mesh.gateway.url))).await;
    let started = Instant::now();
    let results = join_all((0..5000).map(|i| {
        let mut c = channels[i % channels.len()].clone();
        let token = token.clone();
        async move { c.send(authed(unary(), &token)).await.map(|_| ()) }
    }))
    .await;
    let elapsed = started.elapsed();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(s) = r {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        }
    }
    assert!(ok > 0);
    for s in [&mesh.gateway, &mesh.relay, &mesh.ping] {
        s.wait_serving(Duration::from_secs(2)).await;
        let peak = s.proc.peak_rss_kib();
        println!("{}: peak RSS {} KiB after the burst", s.proc.name, peak);
        assert!(peak < 256 * 1024, "{} peaked at {peak} KiB", s.proc.name);
    }
    println!("5000 calls in {elapsed:?}: {ok} OK, {} refused", 5000 - ok);
    alive(&[&mesh.gateway, &mesh.relay, &mesh.ping]);
}

#[tokio::test]
async fn a_reader_that_stalls_does_not_make_the_hops_buffer_and_slow_upstreams_meet_deadlines() {
    let mesh = Mesh::start().await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;
    let mut flood = client
        .send_stream(authed(stream_req(0, 0, 1024), &token))
        .await
        .unwrap()
        .into_inner();
    flood.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<u64> = [&mesh.gateway, &mesh.relay]
        .iter()
        .map(|s| s.proc.rss_kib())
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (s, before) in [&mesh.gateway, &mesh.relay].iter().zip(before) {
        let after = s.proc.rss_kib();
        println!(
            "{}: RSS {before} KiB → {after} KiB while the reader stalled",
            s.proc.name
        );
        assert!(
            after < before + 16 * 1024,
            "{} grew {before} → {after} KiB",
            s.proc.name
        );
    }
    assert!(
        flood.next().await.unwrap().is_ok(),
        "the stalled stream resumes"
    );
    drop(flood);

    let mut slow = authed(stream_req(3, 10_000, 0), &token);
    slow.set_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let items: Vec<_> = client
        .send_stream(slow)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        items[1].as_ref().unwrap_err().code(),
        Code::DeadlineExceeded
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_draining_upstreams_goaway_leads_to_a_new_connection_not_failed_calls() {
    let mut mesh = Mesh::start_with(&[("SHUTDOWN_GRACE", "5s".to_string())]).await;
    let token = mesh.user_token().await;
    let mut client = mesh.gateway.client().await;
    let port = mesh.ping.port;
    let old_instance = {
        let pong = client
            .send(authed(unary(), &token))
            .await
            .unwrap()
            .into_inner();
        pong.pong.unwrap().hops[2].instance.clone()
    };
    // A call still running on the old connection while ping drains.
    let mut long = client
        .send_stream(authed(stream_req(8, 250, 0), &token))
        .await
        .unwrap()
        .into_inner();
    long.next().await.unwrap().unwrap();

    // Draining ping sends GOAWAY and stops listening; a new ping takes the port.
    mesh.ping.proc.signal("TERM");
    let draining = std::mem::replace(
        &mut mesh.ping,
        loop {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                break Mesh::start_ping_with(
                    &mesh.idp,
                    port,
                    &[("K_REVISION", "ping-replacement".to_string())],
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        },
    );
    for _ in 0..20 {
        let pong = client
            .send(authed(unary(), &token))
            .await
            .expect("a call started after GOAWAY must not fail")
            .into_inner();
        let instance = &pong.pong.unwrap().hops[2].instance;
        assert_eq!(
            instance, "ping-replacement",
            "served by the draining ping ({old_instance})"
        );
    }
    let rest: Vec<_> = long.collect().await;
    assert_eq!(rest.len(), 7, "{rest:?}");
    assert!(
        rest.iter().all(Result::is_ok),
        "the draining ping's stream was cut: {rest:?}"
    );
    drop(draining);
}

/// How many of `want` server streams opened one after another through relay get their first
/// message, when ping allows two streams per connection and relay keeps `connections` to it.
/// Stops at the first stream that is not answered within `patience`; all stay open until then.
async fn streams_relay_holds_open(connections: u32, want: usize, patience: Duration) -> usize {
    let off = ("AUTH_MODE", "off".to_string());
    let ping = Service::start(
        "ping",
        &[off.clone(), ("MAX_CONCURRENT_STREAMS", "2".into())],
    )
    .await;
    let relay = Service::start(
        "relay",
        &[
            off,
            ("UPSTREAM_AUTH", "off".into()),
            ("UPSTREAM_URL", ping.url.clone()),
            ("UPSTREAM_CONNECTIONS", connections.to_string()),
        ],
    )
    .await;
    let c = relay.client().await;
    let mut open = Vec::new();
    for _ in 0..want {
        let first = async {
            let mut s = c
                .clone()
                .send_stream(stream_req(0, 100, 0))
                .await?
                .into_inner();
            s.message().await?;
            Ok::<_, tonic::Status>(s)
        };
        match tokio::time::timeout(patience, first).await {
            Ok(stream) => open.push(stream.expect("an open stream fails")),
            Err(_) => break,
        }
    }
    alive(&[&ping, &relay]);
    open.len()
}

#[tokio::test]
async fn upstream_connections_multiply_the_streams_an_upstream_allows_per_connection() {
    // One connection: the third stream waits in relay for a free HTTP/2 stream upstream.
    let held = streams_relay_holds_open(1, 3, Duration::from_millis(700)).await;
    assert_eq!(held, 2, "ping allows 2 streams on relay's one connection");
    // Three connections, calls round-robin over them: six streams run at once.
    let held = streams_relay_holds_open(3, 6, Duration::from_secs(10)).await;
    assert_eq!(held, 6);
}

/// Names of `pid`'s threads, as the kernel reports them (15 bytes at most).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

#[tokio::test]
async fn worker_threads_sets_how_many_threads_serve_calls() {
    let mut counts = Vec::new();
    for workers in ["1", "3"] {
        let ping = Service::start(
            "ping",
            &[
                ("AUTH_MODE", "off".into()),
                ("WORKER_THREADS", workers.into()),
            ],
        )
        .await;
        ping.client().await.send(unary()).await.unwrap();
        let names = thread_names(ping.proc.pid().unwrap());
        counts.push(names.iter().filter(|n| *n == "ping-worker").count());
    }
    // Any blocking-pool threads are the same in both runs; only the workers differ.
    assert!(counts[0] >= 1, "{counts:?}");
    assert_eq!(counts[1], counts[0] + 2, "{counts:?}");
}
