//! `runmesh bench`: a load generator for any server of the API.
//!
//! Closed loop (default): `--connections` HTTP/2 connections, each with `--concurrency` calls
//! in flight, each starting its next call when the previous one ends. Open loop (`--rate`):
//! calls go out at fixed times whatever the server does, and latency counts from the time a
//! call was due, so a stall shows in every call it delayed (no coordinated omission).
//!
//! Latency is per call: a unary call; a whole server stream or chat of `--stream-count`
//! messages. Streams report messages per second as their throughput. Only calls that start
//! after `--warmup` are counted.

mod client;
mod schedule;
mod stats;

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use runmesh_forward::upstream::{self, Streaming};
use runmesh_proto::{
    ping::v1::{SendRequest, SendStreamRequest},
    raw::Raw,
};
use runmesh_runtime::status::{MalformedDetails, MalformedDetailsLayer, RewriteStatus, code_name};
use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status,
    codegen::http::HeaderValue,
    metadata::{Ascii, MetadataValue},
};
use tower::Layer;

use self::{
    client::{Client, in_order},
    schedule::Schedule,
    stats::{Latency, Tally},
};

/// A connection to the server under load: a hop's own upstream connection
/// ([`upstream::connection`]), so the load generator costs as little per call as a hop's
/// client half, and its requests leave together as a hop's do. Statuses are made safe to read
/// as the other commands' are (`crate::call::Connection`).
type Connection = RewriteStatus<upstream::Connection, MalformedDetails>;

/// A connection to `target`, made before the run starts: h2c for `http://`, TLS with the
/// system roots for `https://`.
async fn connect(target: &str) -> Result<Connection, String> {
    let url = url::Url::parse(target).map_err(|e| format!("bad --target {target:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("bad --target {target:?}: not http:// or https://"));
    }
    let user_agent = HeaderValue::from_static(concat!("runmesh-bench/", env!("CARGO_PKG_VERSION")));
    let connection =
        upstream::connection(&url, user_agent).map_err(|e| format!("--target {target}: {e}"))?;
    connection
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    Ok(MalformedDetailsLayer.layer(connection))
}

/// Which RPC to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BenchKind {
    /// `Send`: one ping, one pong.
    Unary,
    /// `SendStream`: `--stream-count` pongs per call.
    ServerStream,
    /// `Chat`: `--stream-count` pings, each waiting for its pong.
    Bidi,
}

/// Arguments of `runmesh bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Service to load: `http://` for h2c, `https://` for TLS with the system roots.
    #[arg(long, env = "RUNMESH_TARGET", default_value = "http://127.0.0.1:8080")]
    target: String,
    /// ID token sent as `authorization: Bearer` on every call; never printed.
    #[arg(long, env = "RUNMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The RPC to make.
    #[arg(long, value_enum, default_value_t = BenchKind::Unary)]
    kind: BenchKind,
    /// HTTP/2 connections, each its own TCP connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// Calls in flight per connection (closed loop); with `--rate`, the most in flight per
    /// connection before due calls queue (their wait still counts as latency).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Open loop: start this many calls per second, on schedule.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to measure, e.g. `10s` (default 10s unless `--requests` is given).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// How many calls to measure (stops at whichever of `--duration` and this comes first).
    #[arg(long)]
    requests: Option<u64>,
    /// Bytes of payload in every ping (echoed in every pong).
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// Load before measuring, not counted, e.g. `2s`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Messages per server stream or chat; 0 (server stream only) keeps each stream open until
    /// the end of the run.
    #[arg(long, default_value_t = 100)]
    stream_count: u32,
    /// Pause between the pongs of a server stream, e.g. `100ms` (default: none).
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Longest a call may take before it counts as `DEADLINE_EXCEEDED`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Print the result as one JSON object (and no progress bar).
    #[arg(long)]
    json: bool,
}

/// The result of a run, as printed by `--json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    kind: BenchKind,
    target: &'a str,
    connections: u32,
    concurrency: u32,
    rate: Option<f64>,
    payload_size: usize,
    stream_count: u32,
    warmup_s: f64,
    /// Seconds from the end of the warm-up to the last counted call's end.
    elapsed_s: f64,
    /// Successful calls counted.
    calls: u64,
    /// Messages received after the warm-up (one per unary call).
    messages: u64,
    calls_per_s: f64,
    messages_per_s: f64,
    /// The most streams open at once (0 for unary).
    peak_open_streams: u64,
    /// Per-call latency of successful calls, µs.
    latency_us: Latency,
    /// `[percentile, µs]` pairs, for charts.
    spectrum_us: Vec<[f64; 2]>,
    /// Failed calls by gRPC status code.
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    /// CPU this client spent per message received (per call for unary) after the warm-up,
    /// µs: what it took from a service sharing its machine. `None` without `/proc`.
    client_cpu_us: Option<f64>,
}

/// What every call of the run shares.
#[derive(Debug)]
struct Plan {
    kind: BenchKind,
    /// Calls starting (or due) before this are warm-up.
    measure_from: Instant,
    /// No call starts (or is due) at or after this.
    stop_at: Option<Instant>,
    /// Calls to measure, when counted rather than timed.
    requests: Option<u64>,
    timeout: Duration,
    stream_count: u32,
    /// The `SendRequest` of every unary call and every ping of a chat.
    ping: Raw,
    /// The `SendStreamRequest` of every server stream.
    stream: Raw,
    token: Option<MetadataValue<Ascii>>,
}

/// Counts shared by the callers.
#[derive(Debug)]
struct Shared {
    plan: Plan,
    /// Measured calls handed out (for `--requests`).
    tickets: AtomicU64,
    /// Measured calls finished, failed ones included (for the progress bar).
    finished: AtomicU64,
    /// Messages received after the warm-up.
    messages: AtomicU64,
    /// Streams whose response headers have arrived and which have not ended yet.
    open_streams: AtomicU64,
    /// The most streams open at once.
    peak_open_streams: AtomicU64,
    /// Nanoseconds from `measure_from` to the last counted call's end.
    last_end: AtomicU64,
    tally: Mutex<Tally>,
}

/// Latencies a caller keeps before taking the shared lock.
const FLUSH_EVERY: usize = 256;
/// Time for calls in flight at the end of a closed-loop run to finish, beyond `--timeout`.
const END_GRACE: Duration = Duration::from_secs(1);

impl Shared {
    fn past_end(&self, now: Instant) -> bool {
        self.plan.stop_at.is_some_and(|s| now >= s)
    }

    fn take_ticket(&self) -> bool {
        match self.plan.requests {
            None => true,
            Some(n) => self.tickets.fetch_add(1, Ordering::Relaxed) < n,
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.plan.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request.set_timeout(self.plan.timeout);
        if self.plan.kind != BenchKind::Unary {
            // A stream's writes must not wait for other calls' (`runmesh_runtime::coalesce`).
            request.extensions_mut().insert(Streaming);
        }
        request
    }

    /// Counts a stream as open until the returned guard is dropped.
    fn stream_opened(&self) -> OpenStream<'_> {
        let now = self.open_streams.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open_streams.fetch_max(now, Ordering::Relaxed);
        OpenStream(&self.open_streams)
    }

    fn message_arrived(&self) {
        if Instant::now() >= self.plan.measure_from {
            self.messages.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes one call; `Ok(true)` when it ran to its end, `Ok(false)` when an endless stream
    /// was cut at the end of the run.
    async fn call(&self, client: &mut Client) -> Result<bool, Status> {
        let endless = self.plan.kind == BenchKind::ServerStream && self.plan.stream_count == 0;
        let call = async {
            match self.plan.kind {
                BenchKind::Unary => {
                    client.send(self.request(self.plan.ping.clone())).await?;
                    self.message_arrived();
                }
                BenchKind::ServerStream => {
                    let mut request = self.request(self.plan.stream.clone());
                    if endless {
                        // The run's end cuts it, not a deadline.
                        request.metadata_mut().remove("grpc-timeout");
                    }
                    let mut pongs = client.send_stream(request).await?;
                    let _open = self.stream_opened();
                    let mut position = 0;
                    while let Some(pong) = pongs.message().await? {
                        in_order(&pong, position)?;
                        position += 1;
                        self.message_arrived();
                    }
                }
                BenchKind::Bidi => {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    let mut pongs = client.chat(self.request(ReceiverStream::new(rx))).await?;
                    let _open = self.stream_opened();
                    for position in 0..self.plan.stream_count {
                        tx.send(self.plan.ping.clone())
                            .await
                            .map_err(|_| Status::unavailable("the chat ended early"))?;
                        match pongs.message().await? {
                            Some(pong) => in_order(&pong, position)?,
                            None => return Err(Status::unavailable("the chat ended early")),
                        }
                        self.message_arrived();
                    }
                    drop(tx);
                    while pongs.message().await?.is_some() {
                        self.message_arrived();
                    }
                }
            }
            Ok::<_, Status>(())
        };
        if endless {
            let stop = self.plan.stop_at.expect("endless streams need --duration");
            return tokio::select! {
                r = call => r.map(|()| true),
                () = tokio::time::sleep_until(stop.into()) => Ok(false),
            };
        }
        match tokio::time::timeout(self.plan.timeout, call).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Err(Status::deadline_exceeded("no answer within --timeout")),
        }
    }

    /// Counts a measured call that started (or was due) at `start`; its latency goes into
    /// `samples` until there are enough to be worth the shared lock.
    fn count(&self, samples: &mut Vec<Duration>, start: Instant, result: Result<bool, Status>) {
        let end = Instant::now();
        match result {
            Ok(true) => samples.push(end - start),
            Ok(false) => {}
            Err(status) => self
                .tally
                .lock()
                .expect("tally lock")
                .error(code_name(status.code()), status.message()),
        }
        let since = end.saturating_duration_since(self.plan.measure_from);
        self.last_end.fetch_max(
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.finished.fetch_add(1, Ordering::Relaxed);
        if samples.len() >= FLUSH_EVERY {
            self.flush(samples);
        }
    }

    fn flush(&self, samples: &mut Vec<Duration>) {
        let mut tally = self.tally.lock().expect("tally lock");
        for latency in samples.drain(..) {
            tally.record(latency);
        }
    }
}

/// An open stream, counted in [`Shared::open_streams`] while it lives.
#[derive(Debug)]
struct OpenStream<'a>(&'a AtomicU64);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A closed-loop caller: one call at a time, the next as soon as the previous one ends.
async fn closed_loop(shared: Arc<Shared>, mut client: Client) {
    let mut samples = Vec::with_capacity(FLUSH_EVERY);
    loop {
        let start = Instant::now();
        if shared.past_end(start) {
            break;
        }
        let measured = start >= shared.plan.measure_from;
        if measured && !shared.take_ticket() {
            break;
        }
        let result = shared.call(&mut client).await;
        if measured {
            shared.count(&mut samples, start, result);
        }
    }
    shared.flush(&mut samples);
}

/// One open-loop call, due at `due`; waits for a slot on its connection first.
async fn open_call(
    shared: Arc<Shared>,
    mut client: Client,
    slots: Arc<Semaphore>,
    due: Instant,
    measured: bool,
    done: Arc<AtomicU64>,
) {
    if let Ok(_slot) = slots.acquire().await {
        let result = shared.call(&mut client).await;
        if measured {
            let mut samples = Vec::with_capacity(1);
            shared.count(&mut samples, due, result);
            shared.flush(&mut samples);
        }
    }
    done.fetch_add(1, Ordering::Release);
}

/// Sends calls on `rate`'s schedule from a thread of its own (tokio's timer has millisecond
/// granularity; a thread's sleep is precise to tens of microseconds). Returns how many it
/// started.
fn dispatch(
    shared: &Arc<Shared>,
    clients: &[Client],
    slots: &[Arc<Semaphore>],
    schedule: Schedule,
    done: &Arc<AtomicU64>,
    runtime: &tokio::runtime::Handle,
) -> u64 {
    let plan = &shared.plan;
    let first_measured = schedule.first_at_or_after(plan.measure_from);
    let by_time = plan.stop_at.map(|s| schedule.first_at_or_after(s));
    let by_count = plan.requests.map(|n| first_measured.saturating_add(n));
    let end = by_time.into_iter().chain(by_count).min().unwrap_or(0);
    let mut i = 0;
    while i < end {
        let due_now = schedule.due_by(Instant::now()).min(end);
        while i < due_now {
            let conn = (i % clients.len() as u64) as usize;
            runtime.spawn(open_call(
                shared.clone(),
                clients[conn].clone(),
                slots[conn].clone(),
                schedule.due(i),
                i >= first_measured,
                done.clone(),
            ));
            i += 1;
        }
        if i < end {
            let wait = schedule.due(i).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
    }
    end
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

fn progress_bar(args: &BenchArgs, total: Option<Duration>) -> ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match (total, args.requests) {
        (Some(t), _) => ProgressBar::new(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        (None, Some(n)) => ProgressBar::new(n),
        (None, None) => ProgressBar::no_length(),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("valid progress template"),
    );
    bar
}

/// How long the measured part of a run lasted: a run that used up `--requests` ended with its
/// last call, even when a longer `--duration` was also given; a timed run lasted at least its
/// duration.
fn measured_window(duration: Option<Duration>, counted_out: bool, last_end: Duration) -> Duration {
    match duration {
        Some(d) if !counted_out => d.max(last_end),
        _ => last_end,
    }
}

/// Runs the benchmark and prints its result.
pub(crate) async fn run(args: BenchArgs) -> Result<(), String> {
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!("--rate {rate}: must be a positive number"));
    }
    if args.kind == BenchKind::Bidi && args.stream_count == 0 {
        return Err("--kind bidi needs --stream-count of at least 1".to_string());
    }
    let duration = match (args.duration, args.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let endless = args.kind == BenchKind::ServerStream && args.stream_count == 0;
    if endless && duration.is_none() {
        return Err(
            "--stream-count 0 keeps streams open until the run ends: give --duration".into(),
        );
    }
    let token = match &args.token {
        Some(t) => Some(
            format!("Bearer {}", t.trim())
                .parse::<MetadataValue<_>>()
                .map_err(|_| "the token has characters a header cannot carry".to_string())?,
        ),
        None => None,
    };
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let channel = connect(&args.target).await?;
        clients.push(Client::new(channel));
    }

    let start = Instant::now();
    let measure_from = start + args.warmup;
    let shared = Arc::new(Shared {
        plan: Plan {
            kind: args.kind,
            measure_from,
            stop_at: duration.map(|d| measure_from + d),
            requests: args.requests,
            timeout: args.timeout,
            stream_count: args.stream_count,
            ping: Raw::encode(&SendRequest {
                message: "bench".to_string(),
                payload: payload(args.payload_size),
            }),
            stream: Raw::encode(&SendStreamRequest {
                message: "bench".to_string(),
                count: i32::try_from(args.stream_count).unwrap_or(i32::MAX),
                interval: args.interval.map(|d| d.try_into().unwrap_or_default()),
                payload: payload(args.payload_size),
            }),
            token,
        },
        tickets: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        open_streams: AtomicU64::new(0),
        peak_open_streams: AtomicU64::new(0),
        last_end: AtomicU64::new(0),
        tally: Mutex::new(Tally::default()),
    });

    let cpu_at_start = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        cpu_used()
    });
    let bar = progress_bar(&args, duration.map(|d| d + args.warmup));
    let ticker = {
        let (shared, bar) = (shared.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = Instant::now();
                let done = shared.finished.load(Ordering::Relaxed);
                if shared.plan.stop_at.is_some() {
                    bar.set_position(u64::try_from((now - start).as_millis()).unwrap_or(u64::MAX));
                } else {
                    bar.set_position(done);
                }
                let secs = now.saturating_duration_since(measure_from).as_secs_f64();
                bar.set_message(if now < measure_from {
                    "warming up".to_string()
                } else {
                    format!("{done} calls, {:.0}/s", done as f64 / secs.max(1e-3))
                });
            }
        })
    };

    if let Some(rate) = args.rate {
        let done = Arc::new(AtomicU64::new(0));
        let slots: Vec<_> = (0..args.connections)
            .map(|_| Arc::new(Semaphore::new(args.concurrency as usize)))
            .collect();
        let runtime = tokio::runtime::Handle::current();
        let dispatcher = {
            let (shared, done) = (shared.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                dispatch(
                    &shared,
                    &clients,
                    &slots,
                    Schedule::new(start, rate),
                    &done,
                    &runtime,
                )
            })
        };
        let started = dispatcher
            .await
            .map_err(|e| format!("dispatcher failed: {e}"))?;
        // Each call ends within --timeout (an endless stream at the end of the run).
        let give_up = Instant::now() + args.timeout + END_GRACE;
        while done.load(Ordering::Acquire) < started && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        let mut callers = JoinSet::new();
        for client in &clients {
            for _ in 0..args.concurrency {
                callers.spawn(closed_loop(shared.clone(), client.clone()));
            }
        }
        let wait_all = async { while callers.join_next().await.is_some() {} };
        let limit = duration.map(|d| args.warmup + d + args.timeout + END_GRACE);
        match limit {
            Some(limit) => {
                let _ = tokio::time::timeout_at((start + limit).into(), wait_all).await;
            }
            // Counted runs end when the tickets do; every call is bounded by --timeout.
            None => wait_all.await,
        }
        callers.abort_all();
    }
    ticker.abort();
    bar.finish_and_clear();
    let cpu = cpu_at_start
        .await
        .ok()
        .flatten()
        .zip(cpu_used())
        .map(|(start, end)| end.saturating_sub(start));

    let tally = shared.tally.lock().expect("tally lock").clone();
    let counted_out = args
        .requests
        .is_some_and(|n| shared.tickets.load(Ordering::Relaxed) >= n);
    let measured_end = Duration::from_nanos(shared.last_end.load(Ordering::Relaxed));
    let elapsed = measured_window(duration, counted_out, measured_end)
        .as_secs_f64()
        .max(1e-9);
    let messages = shared.messages.load(Ordering::Relaxed);
    let report = Report {
        kind: args.kind,
        target: &args.target,
        connections: args.connections,
        concurrency: args.concurrency,
        rate: args.rate,
        payload_size: args.payload_size,
        stream_count: args.stream_count,
        warmup_s: args.warmup.as_secs_f64(),
        elapsed_s: elapsed,
        calls: tally.calls,
        messages,
        calls_per_s: tally.calls as f64 / elapsed,
        messages_per_s: messages as f64 / elapsed,
        peak_open_streams: shared.peak_open_streams.load(Ordering::Relaxed),
        latency_us: tally.latency(),
        spectrum_us: tally.spectrum(),
        errors: tally.errors.clone(),
        first_error: tally.first_error.clone(),
        client_cpu_us: cpu
            .filter(|_| messages > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / messages as f64),
    };
    print_report(&report, args.json);
    if tally.calls == 0 && messages == 0 {
        return Err(match &report.first_error {
            Some(e) => format!("no call succeeded; first error: {e}"),
            None => "no call was made".to_string(),
        });
    }
    Ok(())
}

/// CPU this process has used, all its threads together, ended ones included; `None` where there
/// is no `/proc`.
fn cpu_used() -> Option<Duration> {
    cpu_of_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// User and system time of a `/proc/PID/stat` line (`proc(5)`: fields 14 and 15, in ticks of
/// 10 ms: `USER_HZ` is 100 on Linux whatever the kernel's own tick).
fn cpu_of_stat(stat: &str) -> Option<Duration> {
    // The command (field 2) may hold spaces and parentheses; field 3 follows its last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    Some(Duration::from_millis((ticks(14)? + ticks(15)?) * 10))
}

fn print_report(r: &Report<'_>, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(r).expect("report serialises")
        );
        return;
    }
    let load = match r.rate {
        Some(rate) => format!("{rate} calls/s on {} connection(s)", r.connections),
        None => format!(
            "{} connection(s) × {} call(s) in flight",
            r.connections, r.concurrency
        ),
    };
    let kind = match r.kind {
        BenchKind::Unary => "unary".to_string(),
        BenchKind::ServerStream => format!("server-stream ({} msgs/call)", r.stream_count),
        BenchKind::Bidi => format!("bidi ({} msgs/call)", r.stream_count),
    };
    let l = &r.latency_us;
    let errors = if r.errors.is_empty() {
        "none".to_string()
    } else {
        r.errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "{kind}, {} B payload, to {}: {load}, {:.1}s measured after {:.1}s warm-up",
        r.payload_size, r.target, r.elapsed_s, r.warmup_s
    );
    let _ = writeln!(
        out,
        "  calls     {:>10}  {:>12.1}/s",
        r.calls, r.calls_per_s
    );
    if r.kind != BenchKind::Unary {
        let _ = writeln!(
            out,
            "  messages  {:>10}  {:>12.1}/s  ({} streams open at most)",
            r.messages, r.messages_per_s, r.peak_open_streams
        );
    }
    let _ = writeln!(
        out,
        "  latency   p50 {:.1} µs  p90 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
        l.p50, l.p90, l.p99, l.p99_9, l.max
    );
    let _ = writeln!(out, "  errors    {errors}");
    if let Some(us) = r.client_cpu_us {
        let per = if r.kind == BenchKind::Unary {
            "call"
        } else {
            "message"
        };
        let _ = writeln!(out, "  client    {us:.2} µs of CPU per {per}");
    }
    if let Some(e) = &r.first_error {
        let _ = writeln!(out, "  first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_used_up_its_requests_is_measured_to_its_last_call() {
        let last = Duration::from_millis(1_500);
        assert_eq!(
            measured_window(Some(Duration::from_secs(600)), true, last),
            last
        );
        assert_eq!(measured_window(None, true, last), last);
    }

    #[test]
    fn cpu_is_user_and_system_time_of_the_stat_line() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 731 269 0 0 20 0 3 0";
        assert_eq!(cpu_of_stat(stat), Some(Duration::from_millis(10_000)));
        assert_eq!(cpu_of_stat("4242 (short) S 1 2"), None);
        assert_eq!(cpu_of_stat("no command"), None);
        assert!(cpu_used().is_some(), "this test runs on Linux");
    }

    #[test]
    fn a_timed_run_lasts_at_least_its_duration() {
        let ten = Duration::from_secs(10);
        assert_eq!(
            measured_window(Some(ten), false, Duration::from_millis(9_990)),
            ten
        );
        let late = Duration::from_millis(10_200);
        assert_eq!(measured_window(Some(ten), false, late), late);
    }
}
