//! The `runmesh` binary against a running `ping`, and `runmesh up` end to end.

use std::process::{Command, Output};

use runmesh_testkit::{Service, bin};
use serde_json::Value;

fn runmesh(args: &[&str]) -> Output {
    Command::new(bin("runmesh"))
        .args(args)
        .env_remove("RUNMESH_TOKEN")
        .env_remove("GCE_METADATA_HOST")
        .output()
        .expect("run runmesh")
}

/// `runmesh bench --json` against `target` for `requests` calls, all measured; `extra` flags after.
fn bench(target: &str, requests: u32, extra: &[&str]) -> Output {
    let requests = requests.to_string();
    let mut args = vec![
        "bench",
        "--target",
        target,
        "--requests",
        &requests,
        "--duration",
        "60s",
        "--warmup",
        "0s",
        "--json",
    ];
    args.extend_from_slice(extra);
    runmesh(&args)
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "runmesh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

async fn ping() -> Service {
    Service::start("ping", &[("AUTH_MODE", "off".into())]).await
}

#[tokio::test]
async fn send_prints_the_pong_and_its_hop_trail() {
    let ping = ping().await;
    let out = runmesh(&[
        "send",
        "--target",
        &ping.url,
        "--message",
        "hi",
        "--payload-size",
        "5",
        "--json",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["message"], "hi");
    assert_eq!(lines[0]["payload_bytes"], 5);
    assert_eq!(lines[0]["hops"][0]["service"], "ping");

    let text = runmesh(&["send", "--target", &ping.url, "--message", "hi"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.starts_with("pong #0 \"hi\""), "{stdout}");
    assert!(stdout.contains("via ping (caller -)"), "{stdout}");
}

#[tokio::test]
async fn stream_collect_and_chat_print_every_message_in_order() {
    let ping = ping().await;
    let stream = json_lines(&runmesh(&[
        "stream",
        "--target",
        &ping.url,
        "--count",
        "3",
        "--interval",
        "10ms",
        "--json",
    ]));
    let indexes: Vec<_> = stream
        .iter()
        .map(|l| l["index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2]);

    let collect = json_lines(&runmesh(&[
        "collect",
        "--target",
        &ping.url,
        "--count",
        "4",
        "--payload-size",
        "3",
        "--json",
    ]));
    assert_eq!(collect[0]["count"], 4);
    assert_eq!(collect[0]["payload_bytes"], 12);
    assert_eq!(collect[0]["last_message"], "hello 3");

    let chat = json_lines(&runmesh(&[
        "chat", "--target", &ping.url, "--count", "3", "--json",
    ]));
    let messages: Vec<_> = chat
        .iter()
        .map(|l| l["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(messages, ["hello 0", "hello 1", "hello 2"]);
}

#[tokio::test]
async fn errors_print_the_grpc_code_and_exit_non_zero() {
    let ping = ping().await;
    let out = runmesh(&["stream", "--target", &ping.url, "--count", "-1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: INVALID_ARGUMENT: ping: invalid count"),
        "{err}"
    );

    let out = runmesh(&[
        "stream",
        "--target",
        &ping.url,
        "--count",
        "0",
        "--deadline",
        "300ms",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEADLINE_EXCEEDED"), "{err}");

    let out = runmesh(&["send", "--target", "http://127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to http://127.0.0.1:1"));
}

#[test]
fn up_brings_the_mesh_up_and_chains_all_four_calls() {
    let out = runmesh(&["up", "--port", "0", "--idp-port", "0", "--once"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for call in ["Send (unary)", "SendStream", "Collect", "Chat"] {
        assert!(stdout.contains(call), "{call} missing:\n{stdout}");
    }
    let trail = "via gateway (caller user@example.com) → relay (caller gateway@runmesh-local.iam.gserviceaccount.com) → ping (caller relay@runmesh-local.iam.gserviceaccount.com)";
    assert!(stdout.matches(trail).count() >= 7, "{stdout}");
    assert!(stdout.contains("all four calls went gateway → relay → ping"));
    assert!(stdout.contains("mesh stopped"));
}

#[tokio::test]
async fn a_bench_s_calls_in_flight_are_answered_in_batches() {
    let ping = Service::start(
        "ping",
        &[
            ("AUTH_MODE", "off".into()),
            ("WORKER_THREADS", "1".into()),
            ("RUST_LOG", "warn".into()),
        ],
    )
    .await;
    let calls = 2000;
    let before = ping.proc.writes();
    let out = bench(
        &ping.url,
        calls,
        &["--connections", "1", "--concurrency", "16"],
    );
    let result = &json_lines(&out)[0];
    assert_eq!(result["calls"], calls, "{result}");
    assert_eq!(result["errors"], serde_json::json!({}), "{result}");
    // Requests that arrive together are answered together (`runmesh_runtime::coalesce`).
    let per_call = (ping.proc.writes() - before) as f64 / f64::from(calls);
    assert!(
        per_call <= 0.5,
        "ping made {per_call:.2} writes per call under 16 calls in flight"
    );
}

// `runmesh` runs blocking this test's thread; another worker drains ping's log lines meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bench_s_streams_and_chats_are_answered_in_order_to_the_last_message() {
    let ping = Service::start("ping", &[("AUTH_MODE", "off".into())]).await;
    for kind in ["server-stream", "bidi"] {
        let out = bench(
            &ping.url,
            20,
            &["--kind", kind, "--stream-count", "7", "--concurrency", "4"],
        );
        let result = &json_lines(&out)[0];
        // Each answer's index is checked against its place in the stream: out of order would
        // count the call as INTERNAL.
        assert_eq!(result["errors"], serde_json::json!({}), "{kind}: {result}");
        assert_eq!(result["calls"], 20, "{kind}: {result}");
        assert_eq!(result["messages"], 140, "{kind}: {result}");
        assert!(result["client_cpu_us"].as_f64().is_some(), "{result}");
    }
}

// `runmesh` runs blocking this test's thread; another worker drains ping's log lines meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_errors_by_status_and_refuses_what_it_cannot_load() {
    let ping = Service::start(
        "ping",
        &[
            ("AUTH_AUDIENCE", "http://ping".into()),
            ("AUTH_JWKS_URL", "http://127.0.0.1:1/jwks".into()),
        ],
    )
    .await;
    for kind in ["unary", "server-stream", "bidi"] {
        let out = bench(&ping.url, 50, &["--kind", kind]);
        assert!(!out.status.success(), "{kind}: no call succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no call succeeded; first error: UNAUTHENTICATED: missing bearer token"),
            "{kind}: {err}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the report");
        assert_eq!(
            result["errors"],
            serde_json::json!({"UNAUTHENTICATED": 50}),
            "{kind} without a token: {result}"
        );
    }

    for (target, error) in [
        ("http://127.0.0.1:1", "cannot connect to http://127.0.0.1:1"),
        ("ftp://127.0.0.1:1", "bad --target \"ftp://127.0.0.1:1\""),
        ("127.0.0.1:8080", "bad --target \"127.0.0.1:8080\""),
    ] {
        let out = bench(target, 50, &[]);
        assert!(!out.status.success(), "{target}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(error), "{target}: {err}");
    }
}
