//! The second client of the unary runs: nghttp2's `h2load`, the tool the reference
//! figures were measured with, installed from Debian when missing.
//!
//! It spends far less CPU per call than `runmesh bench` (C, no protobuf, no async runtime), and
//! on two shared cores the client's cost hides part of a hop's: the cheaper the client, the more
//! a hop's share of direct throughput says about the hop itself. Both clients' figures are
//! reported.
//!
//! h2load knows nothing of gRPC: it posts the same framed `SendRequest` on every call, and a
//! gRPC error is still HTTP 200 to it. So a run only counts when the bytes it received prove the
//! answers: every `SendResponse` echoes the request's payload, an error carries no message.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use runmesh_proto::{ping::v1::SendRequest, prost::Message as _};
use serde::Serialize;

use crate::procs;

/// The h2load binary, installing Debian's `nghttp2-client` if there is none.
pub(crate) fn ensure_installed() -> Result<PathBuf, String> {
    procs::ensure_package("nghttp2-client", || {
        ["/usr/bin/h2load", "/usr/local/bin/h2load"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    })
}

/// One `Send` request as it goes on the wire: the gRPC length-prefixed message.
pub(crate) fn request_body(payload: usize) -> Vec<u8> {
    let message = SendRequest {
        message: "bench".into(),
        payload: vec![0x5a; payload],
    }
    .encode_to_vec();
    let len = u32::try_from(message.len()).expect("a bench payload fits a gRPC frame");
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&message);
    body
}

/// What one h2load run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Report {
    pub(crate) calls_per_s: f64,
    pub(crate) done: u64,
    pub(crate) failed: u64,
    pub(crate) errored: u64,
    /// Response body bytes received (DATA frames).
    pub(crate) data_bytes: u64,
    pub(crate) latency_mean_us: f64,
    pub(crate) latency_max_us: f64,
    /// CPU h2load spent from the end of its warm-up, when it starts counting, to its exit, ns;
    /// `None` when it exited during the warm-up.
    pub(crate) cpu_ns: Option<u64>,
}

/// `12.3us`, `1.20ms`, `2.5s` in µs.
fn micros(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (text.strip_suffix('s')?, 1e6)
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// The figures of h2load's summary.
pub(crate) fn parse(out: &str) -> Result<Report, String> {
    let line = |prefix: &str| {
        out.lines()
            .map(str::trim_start)
            .find_map(|l| l.strip_prefix(prefix))
            .ok_or_else(|| format!("h2load printed no {prefix:?} line:\n{out}"))
    };
    // "finished in 10.00s, 52345.60 req/s, 5.12MB/s"
    let finished = line("finished in ")?;
    let calls_per_s = finished
        .split(", ")
        .find_map(|f| f.strip_suffix(" req/s"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no req/s in {finished:?}"))?;
    // "requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, 0 errored, 0 timeout"
    let requests = line("requests: ")?;
    let count = |what: &str| {
        requests
            .split(", ")
            .find_map(|f| f.strip_suffix(what)?.trim().parse().ok())
            .ok_or_else(|| format!("no {what:?} count in {requests:?}"))
    };
    // "traffic: 5.12MB (5368709) total, 1.00KB (1024) headers (space savings 90%), 4.00MB (4194304) data"
    let traffic = line("traffic: ")?;
    let data_bytes = traffic
        .split(", ")
        .find(|f| f.ends_with(" data"))
        .and_then(|f| f.split_once('(')?.1.split_once(')')?.0.parse().ok())
        .ok_or_else(|| format!("no data bytes in {traffic:?}"))?;
    // "time for request:   190us   12.34ms   1.20ms   400us   70.00%": min, max, mean, sd, ±sd
    let times: Vec<f64> = line("time for request:")?
        .split_whitespace()
        .filter_map(micros)
        .collect();
    let [_, max, mean, ..] = times[..] else {
        return Err(format!("no request times in:\n{out}"));
    };
    Ok(Report {
        calls_per_s,
        done: count(" done")?,
        failed: count(" failed")?,
        errored: count(" errored")?,
        data_bytes,
        latency_mean_us: mean,
        latency_max_us: max,
        cpu_ns: None,
    })
}

/// What one load shape asks of h2load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) connections: u32,
    pub(crate) concurrency: u32,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) payload: usize,
}

/// Runs h2load against `PingService/Send` at `target` with `token`; `Err` when it fails or the
/// answers cannot all have been pongs.
pub(crate) async fn run(
    h2load: &Path,
    dir: &Path,
    target: &str,
    token: &str,
    load: Load,
) -> Result<Report, String> {
    let body = dir.join(format!("send-{}.bin", load.payload));
    std::fs::write(&body, request_body(load.payload))
        .map_err(|e| format!("{}: {e}", body.display()))?;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let reaped_before = procs::reaped_children_cpu_ns();
    let child = tokio::process::Command::new(h2load)
        .arg(format!(
            "{}/{}/Send",
            target.trim_end_matches('/'),
            runmesh_proto::PING_SERVICE_NAME
        ))
        .args(["-c", &load.connections.to_string()])
        .args(["-m", &load.concurrency.to_string()])
        .args(["-D", &ms(load.duration)])
        .args(["--warm-up-time", &ms(load.warmup)])
        .arg("-d")
        .arg(&body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("h2load: {e}"))?;
    let pid = child.id();
    // h2load counts from the end of its warm-up. Its CPU until then is in /proc; once it has
    // exited and been reaped, all of it is only in the kernel's sum over reaped children.
    let (output, warmed_up) = procs::after_warmup(load.warmup, child.wait_with_output(), || {
        pid.map(procs::cpu_ns)
    })
    .await;
    let output = output.map_err(|e| format!("h2load: {e}"))?;
    let warmed_up = warmed_up.flatten();
    let cpu_ns = warmed_up.map(|warm| {
        procs::reaped_children_cpu_ns()
            .saturating_sub(reaped_before)
            .saturating_sub(warm)
    });
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "h2load against {target}: {}\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let report = Report {
        cpu_ns,
        ..parse(&text)?
    };
    verify(&report, load.payload).map_err(|e| format!("h2load against {target}: {e}"))?;
    Ok(report)
}

/// Whether every call of `report` was answered with a pong carrying `payload` bytes.
fn verify(report: &Report, payload: usize) -> Result<(), String> {
    if report.done == 0 || report.failed > 0 || report.errored > 0 {
        return Err(format!(
            "{} done, {} failed, {} errored",
            report.done, report.failed, report.errored
        ));
    }
    let least = report.done * (5 + payload as u64);
    if report.data_bytes < least {
        return Err(format!(
            "{} calls brought {} bytes, fewer than their pongs' {least}: gRPC errors, not pongs",
            report.done, report.data_bytes
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As nghttp2 1.52 prints it.
    const SUMMARY: &str = "\
finished in 2.00s, 41234.50 req/s, 6.02MB/s
requests: 82469 total, 82469 started, 82469 done, 82469 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 82469 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 12.04MB (12624566) total, 2.91MB (3051353) headers (space savings 93.80%), 8.18MB (8576776) data
                     min         max         mean         sd        +/- sd
time for request:      190us     12.34ms      1.20ms       400us    70.00%
time for connect:      111us       203us       157us        46us    50.00%
";

    #[test]
    fn the_summary_is_read() {
        let r = parse(SUMMARY).unwrap();
        assert_eq!(
            r,
            Report {
                calls_per_s: 41234.5,
                done: 82469,
                failed: 0,
                errored: 0,
                data_bytes: 8_576_776,
                latency_mean_us: 1200.0,
                latency_max_us: 12340.0,
                cpu_ns: None,
            }
        );
        assert_eq!(verify(&r, 64), Ok(()));
    }

    /// A gRPC error is HTTP 200 with no message: h2load calls it a success.
    #[test]
    fn answers_without_their_pongs_are_refused() {
        let r = parse(SUMMARY).unwrap();
        let err = verify(&r, 4096).unwrap_err();
        assert!(err.contains("gRPC errors, not pongs"), "{err}");
        let failed = Report { failed: 1, ..r };
        assert!(verify(&failed, 64).is_err());
    }

    #[test]
    fn the_request_is_one_grpc_frame() {
        let body = request_body(64);
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        assert_eq!((body[0], len), (0, body.len() - 5));
        let decoded = SendRequest::decode(&body[5..]).unwrap();
        assert_eq!(decoded.payload.len(), 64);
    }
}
