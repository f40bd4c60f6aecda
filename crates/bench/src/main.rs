//! `runmesh-bench` (`just bench`): runmesh's hops side by side with direct calls and with the
//! hop people would otherwise use, nginx's `grpc_pass`, all in one run on this machine.
//!
//! Scenarios, each loaded by `runmesh bench` with the same connections and calls in flight:
//! direct (client → ping), relay (client → relay → ping), nginx (client → nginx → ping, no auth
//! at nginx) and chain (client → gateway → relay → ping); every runmesh service verifies its
//! caller's token. Workloads: unary with 64 B and 4 KiB payloads, server streaming with 1 KiB
//! messages; then one connection with one call at a time for the latency a hop adds, and
//! `--streams` open streams through the chain for memory. The unary workloads run a second time
//! with nghttp2's h2load as the client, the tool of the reference figures.
//!
//! # Layout
//! - `procs`: the processes, their memory, and stopping them by PID whatever happens;
//! - `nginx`: installing, configuring and starting the reference hop;
//! - `h2load`: the second client, and proof that its answers were pongs;
//! - `machine`: what a wake from one core to another costs here, apart from any service;
//! - `report`: the table, the targets, `results.json` and the SVG latency chart.

mod h2load;
mod machine;
mod nginx;
mod procs;
mod report;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use clap::Parser;
use serde::Serialize;
use serde_json::Value;

use crate::procs::{Proc, Window, free_port};

/// The service account relay calls ping as.
const RELAY_SA: &str = "relay@runmesh-bench.iam.gserviceaccount.com";
/// The service account gateway calls relay as.
const GATEWAY_SA: &str = "gateway@runmesh-bench.iam.gserviceaccount.com";
/// The load generator's column beside the services' in the CPU table.
const CLIENT: &str = "runmesh";
/// The other client of the unary workloads, in the same tables.
const H2LOAD: &str = "h2load";

/// Whether a process's name is a load generator's: one thread, and a column after the services'.
fn is_client(name: &str) -> bool {
    name == CLIENT || name == H2LOAD
}
/// The benchmark's end user.
const USER: &str = "bench@example.com";
/// Longest a service may take to come up before the run fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
#[command(
    name = "runmesh-bench",
    about = "runmesh hops side by side with direct calls and nginx"
)]
struct Args {
    /// Directory of the `ping`, `relay`, `gateway` and `runmesh` binaries [default: the
    /// workspace's target/release].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where results, logs and nginx's files go [default: the workspace's target/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measured time of each run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Load before each run's measurement, not counted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// HTTP/2 connections from the client in the throughput runs.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Calls in flight per connection in the throughput runs.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Open streams through the chain for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    streams: u32,
    /// A quick pass over everything, for CI: short runs whose figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Leave out the nginx scenario.
    #[arg(long)]
    no_nginx: bool,
    /// Leave out the runs with h2load as the client.
    #[arg(long)]
    no_h2load: bool,
    /// Threads each service runs its calls on: `WORKER_THREADS` for ping, relay and gateway,
    /// worker processes for nginx. One is what a Cloud Run instance of the manifests (`cpu:
    /// "1"`) has; here, more than one lets three services and the client contend for two cores,
    /// which costs every process wake-ups and context switches.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Extra `KEY=VALUE` environment for ping, relay and gateway (not nginx, not the client),
    /// e.g. `LD_PRELOAD=…` to try an allocator or `MAX_CONCURRENT_STREAMS=2000`; repeatable.
    #[arg(long = "service-env", value_parser = parse_env)]
    service_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// A load shape, run against every scenario.
#[derive(Debug, Clone, Copy, Serialize)]
struct Workload {
    /// Short name, for results.
    key: &'static str,
    /// What a reader sees.
    title: &'static str,
    /// `runmesh bench --kind`.
    kind: &'static str,
    payload: usize,
    /// Whether throughput is messages rather than calls.
    streaming: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        key: "unary-64",
        title: "unary 64 B",
        kind: "unary",
        payload: 64,
        streaming: false,
    },
    Workload {
        key: "unary-4k",
        title: "unary 4 KiB",
        kind: "unary",
        payload: 4096,
        streaming: false,
    },
    Workload {
        key: "stream-1k",
        title: "server stream 1 KiB",
        kind: "server-stream",
        payload: 1024,
        streaming: true,
    },
];

/// Where a scenario's client connects, with which token.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    target: String,
    token: String,
}

/// One `runmesh bench` run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    workload: &'static str,
    scenario: &'static str,
    /// `runmesh bench --json` output.
    report: Value,
    /// Peak RSS of each service during the run, KiB.
    peak_rss_kib: BTreeMap<String, u64>,
    /// CPU each service (nginx with its workers) spent per call, or per message of a stream,
    /// while the client counted, µs.
    cpu_us: BTreeMap<String, f64>,
    /// Write system calls each service made per call (or message) over the same window.
    writes_per_call: BTreeMap<String, f64>,
    /// Time each service was ready to run but waited for a core, per call (or message), µs.
    waited_us: BTreeMap<String, f64>,
    /// Time the cores were idle, all of them together, per call (or message), µs.
    idle_us: Option<f64>,
    /// Calls (or messages) a second the run would have reached had no core sat idle, at what
    /// each process spent per call ([`Run::no_idle_bound`]).
    no_idle_per_s: Option<f64>,
}

impl Run {
    /// A run of `workload` against `scenario`, with `report` in `runmesh bench`'s JSON shape and
    /// nothing measured of the processes yet.
    fn new(workload: &'static str, scenario: &'static str, report: Value) -> Self {
        Self {
            workload,
            scenario,
            report,
            peak_rss_kib: BTreeMap::new(),
            cpu_us: BTreeMap::new(),
            writes_per_call: BTreeMap::new(),
            waited_us: BTreeMap::new(),
            idle_us: None,
            no_idle_per_s: None,
        }
    }

    /// The CPU the client spent per call (or message), beside the services': it shares the
    /// cores with them, so what it spends is in every row's share of direct. `runmesh bench`
    /// reports its own; the harness measures h2load's.
    fn client_cpu(&mut self) {
        if let Some(us) = self.report["client_cpu_us"].as_f64() {
            let client = self.report["client"].as_str().unwrap_or(CLIENT);
            self.cpu_us.insert(client.to_string(), us);
        }
    }

    /// The throughput the run's CPU per call allows on `cores` with none of them idle: all the
    /// processes share the cores, and none uses more of them than it has threads doing the
    /// work (a client one, a service `workers`). A share of direct mixes what the hops cost
    /// with how the kernel spread the processes over the cores; this bound is the first alone.
    /// `None` without the client's CPU, which would leave the bound too high.
    fn no_idle_bound(&mut self, cores: f64, workers: f64) {
        let total: f64 = self.cpu_us.values().sum();
        if !self.cpu_us.keys().any(|n| is_client(n)) || total <= 0.0 {
            return;
        }
        let threads = |name: &str| if is_client(name) { 1.0 } else { workers };
        let per_s = self
            .cpu_us
            .iter()
            .filter(|(_, us)| **us > 0.0)
            .map(|(name, us)| threads(name) * 1e6 / us)
            .fold(cores * 1e6 / total, f64::min);
        self.no_idle_per_s = Some(per_s);
    }

    /// What `window` measured while the client counted `count` calls (or messages), per call.
    fn per_call(&mut self, window: &Window, count: f64) {
        if count <= 0.0 {
            return;
        }
        let us = |ns: u64| ns as f64 / 1000.0 / count;
        for (name, used) in &window.used {
            self.cpu_us.insert(name.clone(), us(used.cpu_ns));
            self.waited_us.insert(name.clone(), us(used.waited_ns));
            self.writes_per_call
                .insert(name.clone(), used.writes as f64 / count);
        }
        self.idle_us = Some(us(window.idle_ns));
    }
}

/// What was measured about one service process.
#[derive(Debug, Clone, Default, Serialize)]
struct ServiceFacts {
    start_to_serving_ms: f64,
    rss_idle_kib: u64,
    rss_load_peak_kib: u64,
    rss_open_streams_kib: Option<u64>,
}

/// Everything `results.json` holds.
#[derive(Debug, Serialize)]
struct Results {
    machine: BTreeMap<&'static str, Value>,
    settings: BTreeMap<&'static str, Value>,
    services: BTreeMap<String, ServiceFacts>,
    runs: Vec<Run>,
    /// The unary workloads again, h2load as the client.
    h2load_runs: Vec<Run>,
    latency_1x1: Vec<Run>,
    open_streams: Option<Run>,
    targets: Vec<report::Target>,
    smoke_checks: Vec<Run>,
}

/// The running services, stopped when dropped.
#[derive(Debug)]
struct Services {
    idp: Proc,
    /// ping, relay, gateway and (maybe) nginx, with their ports.
    hops: Vec<(Proc, u16)>,
}

impl Services {
    fn pids(&self) -> Vec<(String, u32)> {
        self.hops
            .iter()
            .map(|(p, _)| (p.name.clone(), p.pid()))
            .collect()
    }

    fn check_running(&mut self) -> Result<(), String> {
        self.idp.check_running()?;
        self.hops
            .iter_mut()
            .try_for_each(|(p, _)| p.check_running())
    }

    fn stop(&mut self) {
        // Front to back, so no hop logs its upstream vanishing.
        for (p, _) in self.hops.iter_mut().rev() {
            p.stop(Duration::from_secs(3));
        }
        self.idp.stop(Duration::from_secs(3));
    }
}

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

fn service_cmd(bin: &Path, port: u16, env: &[(&str, String)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin);
    cmd.env_remove("GCE_METADATA_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("LOG_FORMAT", "json")
        // nginx logs no request either (access_log off).
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

struct Harness {
    args: Args,
    bin_dir: PathBuf,
    out: PathBuf,
    logs: PathBuf,
}

impl Harness {
    fn bin(&self, name: &str) -> Result<PathBuf, String> {
        let path = self.bin_dir.join(name);
        if path.exists() {
            Ok(path)
        } else {
            Err(format!(
                "{} is missing: build it first (`just bench` builds release binaries)",
                path.display()
            ))
        }
    }

    /// Starts a service and waits until it is SERVING; returns it with its start time.
    async fn start_service(
        &self,
        name: &str,
        port: u16,
        env: &[(&str, String)],
    ) -> Result<(Proc, Duration), String> {
        let mut cmd = service_cmd(&self.bin(name)?, port, env);
        cmd.env("WORKER_THREADS", self.args.workers.to_string());
        cmd.envs(self.args.service_env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn(name, cmd, &self.logs, "TERM")?;
        let took = proc.wait_serving(port, START_TIMEOUT).await?;
        Ok((proc, took))
    }

    /// The identity server, ping, relay, gateway and nginx, chained; plus the facts measured
    /// while starting them.
    async fn start_all(
        &self,
        nginx_bin: Option<&Path>,
    ) -> Result<
        (
            Services,
            BTreeMap<String, ServiceFacts>,
            BTreeMap<&'static str, String>,
        ),
        String,
    > {
        let runmesh = self.bin("runmesh")?;
        let mut idp_cmd = std::process::Command::new(&runmesh);
        idp_cmd.args(["idp", "--api", "127.0.0.1:0"]);
        for sa in [GATEWAY_SA, RELAY_SA] {
            idp_cmd.args(["--identity", &format!("{sa}=127.0.0.1:0")]);
        }
        let mut idp = Proc::spawn("idp", idp_cmd, &self.logs, "TERM")?;
        let ready: Value =
            serde_json::from_str(&idp.wait_for_line("\"jwks\"", START_TIMEOUT).await?)
                .map_err(|e| format!("idp ready line: {e}"))?;
        let field = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let api = field(&ready["api"]);
        let jwks = field(&ready["jwks"]);
        let metadata = |sa: &str| field(&ready["identities"][sa]);
        let mut services = Services {
            idp,
            hops: Vec::new(),
        };
        let mut facts = BTreeMap::new();
        let mut urls = BTreeMap::new();
        urls.insert("idp", api);

        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let ping_port = free_port()?;
        let (ping, took) = self
            .start_service(
                "ping",
                ping_port,
                &[
                    ("AUTH_AUDIENCE", url(ping_port)),
                    ("AUTH_JWKS_URL", jwks.clone()),
                    ("AUTH_ALLOWED_CALLERS", format!("{USER},{RELAY_SA}")),
                ],
            )
            .await?;
        services.hops.push((ping, ping_port));
        facts.insert("ping".to_string(), started(took));
        urls.insert("ping", url(ping_port));

        let relay_port = free_port()?;
        let (relay, took) = self
            .start_service(
                "relay",
                relay_port,
                &[
                    ("AUTH_AUDIENCE", url(relay_port)),
                    ("AUTH_JWKS_URL", jwks.clone()),
                    ("AUTH_ALLOWED_CALLERS", format!("{USER},{GATEWAY_SA}")),
                    ("UPSTREAM_URL", url(ping_port)),
                    ("UPSTREAM_AUDIENCE", url(ping_port)),
                    ("GCE_METADATA_HOST", metadata(RELAY_SA)),
                ],
            )
            .await?;
        services.hops.push((relay, relay_port));
        facts.insert("relay".to_string(), started(took));
        urls.insert("relay", url(relay_port));

        let gateway_port = free_port()?;
        let (gateway, took) = self
            .start_service(
                "gateway",
                gateway_port,
                &[
                    ("AUTH_AUDIENCE", url(gateway_port)),
                    ("AUTH_JWKS_URL", jwks),
                    ("UPSTREAM_URL", url(relay_port)),
                    ("UPSTREAM_AUDIENCE", url(relay_port)),
                    ("GCE_METADATA_HOST", metadata(GATEWAY_SA)),
                ],
            )
            .await?;
        services.hops.push((gateway, gateway_port));
        facts.insert("gateway".to_string(), started(took));
        urls.insert("gateway", url(gateway_port));

        if let Some(nginx_bin) = nginx_bin {
            let port = free_port()?;
            let mut proc = nginx::start(
                nginx_bin,
                &self.out.join("nginx"),
                &self.logs,
                port,
                ping_port,
                self.args.workers.into(),
            )?;
            // Health passes through nginx to ping: SERVING means the whole hop works.
            let took = proc.wait_serving(port, START_TIMEOUT).await?;
            services.hops.push((proc, port));
            facts.insert("nginx".to_string(), started(took));
            urls.insert("nginx", url(port));
        }

        // Idle: up, connected to nothing yet, after a moment to settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (proc, _) in &services.hops {
            if let Some(f) = facts.get_mut(&proc.name) {
                f.rss_idle_kib = proc.rss_kib();
            }
        }
        Ok((services, facts, urls))
    }

    /// An end-user ID token for `audience` from the identity server.
    async fn token(&self, idp: &str, audience: &str) -> Result<String, String> {
        let out = tokio::process::Command::new(self.bin("runmesh")?)
            .args([
                "token",
                "--idp",
                idp,
                "--audience",
                audience,
                "--email",
                USER,
            ])
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("runmesh token: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "runmesh token: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs `runmesh bench --json` against `scenario` with `warmup` not counted, sampling every
    /// service's RSS and CPU.
    async fn bench(
        &self,
        services: &mut Services,
        scenario: &Scenario,
        flags: &[String],
        warmup: Duration,
        budget: Duration,
    ) -> Result<Run, String> {
        let mut cmd = tokio::process::Command::new(self.bin("runmesh")?);
        cmd.arg("bench")
            .args(["--target", &scenario.target, "--json"])
            .args(flags)
            .env("RUNMESH_TOKEN", &scenario.token)
            // One thread, as h2load runs by default: with a thread per core the client took
            // CPU from a hop on one thread as well, which then spent a quarter of its time
            // waiting to run (2026-12-06: a relay kept 38 % of direct, 51 % under h2load).
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| format!("runmesh bench: {e}"))?;
        let pids = services.pids();
        let mut peaks: BTreeMap<String, u64> = BTreeMap::new();
        let output = procs::usage_during(&pids, warmup, child.wait_with_output());
        tokio::pin!(output);
        let give_up = tokio::time::sleep(budget + Duration::from_secs(30));
        tokio::pin!(give_up);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let (output, used) = loop {
            tokio::select! {
                (out, used) = &mut output => {
                    break (out.map_err(|e| format!("runmesh bench: {e}"))?, used)
                }
                _ = tick.tick() => {
                    for (name, pid) in &pids {
                        let rss = procs::tree_rss_kib(*pid);
                        let peak = peaks.entry(name.clone()).or_default();
                        *peak = (*peak).max(rss);
                    }
                }
                () = &mut give_up => {
                    return Err(format!("runmesh bench against {} did not finish in time", scenario.name));
                }
            }
        };
        services.check_running()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: Value = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| {
                format!(
                    "runmesh bench against {} printed no result: {}",
                    scenario.name,
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        let counted = if report["kind"] == "server-stream" {
            &report["messages"]
        } else {
            &report["calls"]
        };
        let count = counted.as_f64().unwrap_or(0.0);
        let mut run = Run::new("", scenario.name, report);
        run.peak_rss_kib = peaks;
        run.per_call(&used, count);
        run.client_cpu();
        Ok(run)
    }

    /// The unary workloads against every scenario with h2load as the client, at the same
    /// connections and calls in flight; reported in `runmesh bench`'s JSON shape.
    async fn h2load_runs(
        &self,
        h2load_bin: &Path,
        services: &mut Services,
        scenarios: &[Scenario],
    ) -> Result<Vec<Run>, String> {
        let a = &self.args;
        let mut runs = Vec::new();
        for w in WORKLOADS.iter().filter(|w| !w.streaming) {
            for s in scenarios {
                eprintln!("{:<20} {:<7} … (h2load)", w.title, s.name);
                let load = h2load::Load {
                    connections: a.connections,
                    concurrency: a.concurrency,
                    duration: a.duration,
                    warmup: a.warmup,
                    payload: w.payload,
                };
                let run = h2load::run(h2load_bin, &self.out, &s.target, &s.token, load);
                let (r, used) = procs::usage_during(&services.pids(), a.warmup, run).await;
                let r = r?;
                services.check_running()?;
                let report = serde_json::json!({
                    "client": H2LOAD,
                    "calls": r.done,
                    "calls_per_s": r.calls_per_s,
                    "latency_us": { "mean": r.latency_mean_us, "max": r.latency_max_us },
                    "errors": {},
                    "data_bytes": r.data_bytes,
                    "client_cpu_us": r.cpu_ns.map(|ns| ns as f64 / 1000.0 / r.done as f64),
                });
                let mut run = Run::new(w.key, s.name, report);
                run.per_call(&used, r.done as f64);
                run.client_cpu();
                runs.push(run);
            }
        }
        Ok(runs)
    }

    async fn run(&self) -> Result<Results, String> {
        let a = &self.args;
        std::fs::create_dir_all(&self.logs).map_err(|e| format!("{}: {e}", self.logs.display()))?;
        let nginx_bin = if a.no_nginx {
            None
        } else {
            match nginx::ensure_installed() {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("warning: {e}; leaving out the nginx scenario");
                    None
                }
            }
        };
        let h2load_bin = if a.no_h2load {
            None
        } else {
            h2load::ensure_installed()
                .map_err(|e| eprintln!("warning: {e}; leaving out the h2load runs"))
                .ok()
        };
        let mut machine = machine_facts();
        // Before any service runs, so nothing else wants the cores.
        let rounds = if a.smoke { 1_000 } else { 20_000 };
        let wake = tokio::task::spawn_blocking(move || machine::wake_costs(rounds))
            .await
            .unwrap_or_default();
        machine.insert(machine::WAKE_ROUND_TRIP, wake.into());
        if let Some(n) = &nginx_bin {
            machine.insert(
                "nginx",
                nginx::version(n)
                    .map(|(x, y, z)| format!("{x}.{y}.{z}"))
                    .into(),
            );
        }

        let (mut services, mut facts, urls) = self.start_all(nginx_bin.as_deref()).await?;
        let idp = urls["idp"].clone();
        let mut scenarios = Vec::new();
        for (name, front, audience) in [
            ("direct", "ping", "ping"),
            ("relay", "relay", "relay"),
            // nginx checks nothing: ping verifies the caller's token, as in direct.
            ("nginx", "nginx", "ping"),
            ("chain", "gateway", "gateway"),
        ] {
            let Some(target) = urls.get(front) else {
                continue;
            };
            scenarios.push(Scenario {
                name,
                target: target.clone(),
                token: self.token(&idp, &urls[audience]).await?,
            });
        }

        let secs = |d: Duration| format!("{}ms", d.as_millis());
        let budget = a.warmup + a.duration;
        let mut runs = Vec::new();
        for w in WORKLOADS {
            for s in &scenarios {
                eprintln!("{:<20} {:<7} …", w.title, s.name);
                let mut flags = vec![
                    "--kind".to_string(),
                    w.kind.to_string(),
                    "--payload-size".into(),
                    w.payload.to_string(),
                    "--connections".into(),
                    a.connections.to_string(),
                    "--concurrency".into(),
                    a.concurrency.to_string(),
                    "--duration".into(),
                    secs(a.duration),
                    "--warmup".into(),
                    secs(a.warmup),
                ];
                if w.streaming {
                    flags.extend(["--stream-count".into(), "100".into()]);
                }
                let run = self.bench(&mut services, s, &flags, a.warmup, budget);
                runs.push(Run {
                    workload: w.key,
                    ..run.await?
                });
            }
        }

        let mut h2load_runs = match &h2load_bin {
            Some(bin) => self.h2load_runs(bin, &mut services, &scenarios).await?,
            None => Vec::new(),
        };

        let mut latency_1x1 = Vec::new();
        for s in &scenarios {
            eprintln!("{:<20} {:<7} …", "1 conn × 1 call", s.name);
            let flags: Vec<String> = [
                "--kind",
                "unary",
                "--payload-size",
                "64",
                "--connections",
                "1",
                "--concurrency",
                "1",
                "--duration",
                &secs(a.duration / 2),
                "--warmup",
                &secs(a.warmup / 2),
            ]
            .map(String::from)
            .into();
            let run = self.bench(&mut services, s, &flags, a.warmup / 2, budget / 2);
            latency_1x1.push(Run {
                workload: "unary-64-1x1",
                ..run.await?
            });
        }

        let open_streams = match scenarios.iter().find(|s| s.name == "chain") {
            Some(chain) => {
                eprintln!("{} open streams through the chain …", a.streams);
                let per_conn = a.streams.div_ceil(4);
                let hold = Duration::from_secs(3).min(budget);
                let flags: Vec<String> = [
                    "--kind",
                    "server-stream",
                    "--stream-count",
                    "0",
                    "--interval",
                    "100ms",
                    "--payload-size",
                    "64",
                    "--connections",
                    "4",
                    "--concurrency",
                    &per_conn.to_string(),
                    "--duration",
                    &secs(hold),
                    "--warmup",
                    "1s",
                ]
                .map(String::from)
                .into();
                let run = self.bench(&mut services, chain, &flags, Duration::from_secs(1), hold);
                let run = run.await?;
                for (name, kib) in &run.peak_rss_kib {
                    if let Some(f) = facts.get_mut(name) {
                        f.rss_open_streams_kib = Some(*kib);
                    }
                }
                Some(Run {
                    workload: "open-streams",
                    ..run
                })
            }
            None => None,
        };

        // The CLI's other modes, so they cannot rot; their figures are not part of the table.
        let mut smoke_checks = Vec::new();
        if a.smoke {
            let direct = &scenarios[0];
            for flags in [
                "--kind bidi --stream-count 10 --connections 2 --concurrency 2",
                "--kind unary --rate 500 --concurrency 50",
            ] {
                let mut flags: Vec<String> = flags.split(' ').map(String::from).collect();
                flags.extend([
                    "--duration".into(),
                    secs(a.duration),
                    "--warmup".into(),
                    secs(a.warmup),
                ]);
                let run = self.bench(&mut services, direct, &flags, a.warmup, budget);
                smoke_checks.push(Run {
                    workload: "smoke-check",
                    ..run.await?
                });
            }
        }

        services.stop();
        if a.smoke {
            smoke_verdict(
                runs.iter()
                    .chain(&h2load_runs)
                    .chain(&latency_1x1)
                    .chain(&open_streams)
                    .chain(&smoke_checks),
            )?;
        }
        for run in runs.iter().chain(&latency_1x1) {
            for (name, kib) in &run.peak_rss_kib {
                if let Some(f) = facts.get_mut(name) {
                    f.rss_load_peak_kib = f.rss_load_peak_kib.max(*kib);
                }
            }
        }
        machine.insert("loadavg_after", read_loadavg().into());

        let mut settings = BTreeMap::new();
        settings.insert("duration_s", a.duration.as_secs_f64().into());
        settings.insert("warmup_s", a.warmup.as_secs_f64().into());
        settings.insert("connections", a.connections.into());
        settings.insert("concurrency", a.concurrency.into());
        settings.insert("open_streams", a.streams.into());
        settings.insert("smoke", a.smoke.into());
        settings.insert("workers", a.workers.into());
        settings.insert(
            "service_env",
            a.service_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .into(),
        );
        settings.insert(
            "workloads",
            serde_json::to_value(WORKLOADS).unwrap_or_default(),
        );
        let opened = open_streams
            .as_ref()
            .and_then(|r| r.report["peak_open_streams"].as_u64())
            .unwrap_or(0);
        settings.insert("open_streams_reached", opened.into());
        let cores = machine
            .get("cores")
            .and_then(Value::as_f64)
            .filter(|&c| c > 0.0)
            .unwrap_or(1.0);
        for run in runs.iter_mut().chain(&mut h2load_runs) {
            run.no_idle_bound(cores, a.workers.into());
        }
        let targets = report::targets(&runs, &h2load_runs, &latency_1x1, &facts, opened);
        Ok(Results {
            machine,
            settings,
            services: facts,
            runs,
            h2load_runs,
            latency_1x1,
            open_streams,
            targets,
            smoke_checks,
        })
    }
}

/// A smoke run passes when every run got answers and no errors.
fn smoke_verdict<'a>(runs: impl Iterator<Item = &'a Run>) -> Result<(), String> {
    for run in runs {
        let r = &run.report;
        let answered = r["calls"].as_u64().unwrap_or(0) + r["messages"].as_u64().unwrap_or(0);
        let clean = r["errors"].as_object().is_none_or(|e| e.is_empty());
        if answered == 0 || !clean {
            return Err(format!(
                "smoke: {} against {} got {answered} answers, errors {}",
                run.workload, run.scenario, r["errors"]
            ));
        }
    }
    Ok(())
}

fn started(took: Duration) -> ServiceFacts {
    ServiceFacts {
        start_to_serving_ms: took.as_secs_f64() * 1000.0,
        ..ServiceFacts::default()
    }
}

fn read_loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn machine_facts() -> BTreeMap<&'static str, Value> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mut m = BTreeMap::new();
    m.insert(
        "cores",
        std::thread::available_parallelism()
            .map_or(0, usize::from)
            .into(),
    );
    m.insert("cpu", cpu.into());
    m.insert(
        "kernel",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
    );
    m.insert("loadavg_before", read_loadavg().into());
    m
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.smoke {
        args.duration = Duration::from_millis(500);
        args.warmup = Duration::from_millis(200);
        args.connections = 2;
        args.concurrency = 4;
        args.streams = args.streams.min(100);
    }
    let root = workspace_root();
    // nginx resolves paths against its prefix, so a relative `--out` would be taken twice.
    let absolute = |dir: Option<&PathBuf>, default: &str| {
        dir.map_or_else(|| Ok(root.join(default)), std::path::absolute)
    };
    let (out, bin_dir) = match (
        absolute(args.out.as_ref(), "target/bench"),
        absolute(args.bin_dir.as_ref(), "target/release"),
    ) {
        (Ok(out), Ok(bin_dir)) => (out, bin_dir),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("runmesh-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let harness = Harness {
        bin_dir,
        logs: out.join("logs"),
        out,
        args,
    };
    // Dropping the run on Ctrl-C drops its processes, which stops them.
    let result = tokio::select! {
        r = harness.run() => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
    };
    let results = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runmesh-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "\nthreads per service: {} (WORKER_THREADS; nginx worker_processes)",
        harness.args.workers
    );
    print!(
        "{}",
        report::wake_text(
            results
                .machine
                .get(machine::WAKE_ROUND_TRIP)
                .unwrap_or(&Value::Null)
        )
    );
    print!(
        "{}",
        report::table(&results.runs, &results.latency_1x1, &results.services)
    );
    print!("{}", report::h2load_table(&results.h2load_runs));
    let by_client = [
        ("runmesh", results.runs.as_slice()),
        ("h2load", results.h2load_runs.as_slice()),
        ("runmesh", results.latency_1x1.as_slice()),
    ];
    print!("{}", report::cpu_table(&by_client));
    print!("{}", report::writes_table(&by_client));
    print!("{}", report::waits_table(&by_client));
    print!("{}", report::targets_text(&results.targets));
    let json = harness.out.join("results.json");
    let svg = harness.out.join("latency.svg");
    let written = serde_json::to_string_pretty(&results)
        .map_err(|e| e.to_string())
        .and_then(|s| std::fs::write(&json, s).map_err(|e| format!("{}: {e}", json.display())))
        .and_then(|()| report::chart(&svg, &results.runs, &results.latency_1x1));
    if let Err(e) = written {
        eprintln!("runmesh-bench: {e}");
        return ExitCode::FAILURE;
    }
    println!("wrote {} and {}", json.display(), svg.display());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_s_own_cpu_is_a_column_beside_the_services() {
        let report = serde_json::json!({"calls": 100, "client_cpu_us": 10.5});
        let mut run = Run::new("unary-64", "relay", report);
        run.client_cpu();
        assert_eq!(run.cpu_us.get(CLIENT), Some(&10.5));
        // A run h2load made carries what the harness measured of it, under its name.
        let report = serde_json::json!({"client": H2LOAD, "calls": 100, "client_cpu_us": 4.0});
        let mut run = Run::new("unary-64", "relay", report);
        run.client_cpu();
        assert_eq!(run.cpu_us.get(H2LOAD), Some(&4.0));
        // An h2load run that ended in its warm-up has nothing measured.
        let report = serde_json::json!({"client": H2LOAD, "calls": 100, "client_cpu_us": null});
        let mut run = Run::new("unary-64", "relay", report);
        run.client_cpu();
        assert!(run.cpu_us.is_empty());
    }

    fn spent(cpu_us: &[(&str, f64)]) -> Run {
        let mut run = Run::new("unary-64", "chain", serde_json::json!({}));
        run.cpu_us = cpu_us.iter().map(|(n, us)| (n.to_string(), *us)).collect();
        run
    }

    #[test]
    fn with_no_core_idle_the_cores_or_the_busiest_thread_set_the_pace() {
        // 2 cores, 100 µs of CPU a call in all: 20,000 calls a second, no process over a core.
        let mut chain = spent(&[
            ("gateway", 40.0),
            ("relay", 30.0),
            ("ping", 20.0),
            (H2LOAD, 10.0),
        ]);
        chain.no_idle_bound(2.0, 1.0);
        assert_eq!(chain.no_idle_per_s, Some(20_000.0));
        // One thread at 50 µs a call cannot pass 20,000 however idle the other core is.
        let mut direct = spent(&[("ping", 50.0), (CLIENT, 10.0)]);
        direct.no_idle_bound(2.0, 1.0);
        assert_eq!(direct.no_idle_per_s, Some(20_000.0));
        // With two workers ping may use both cores: the cores are the bound.
        direct.no_idle_bound(2.0, 2.0);
        assert_eq!(direct.no_idle_per_s, Some(2e6 / 60.0));
        // A process the scenario does not pass through spends nothing and bounds nothing.
        let mut relay = spent(&[
            ("relay", 25.0),
            ("ping", 0.0),
            ("gateway", 0.0),
            (CLIENT, 25.0),
        ]);
        relay.no_idle_bound(2.0, 1.0);
        assert_eq!(relay.no_idle_per_s, Some(40_000.0));
    }

    #[test]
    fn without_the_client_s_cpu_there_is_no_bound() {
        let mut run = spent(&[("relay", 25.0), ("ping", 10.0)]);
        run.no_idle_bound(2.0, 1.0);
        assert_eq!(run.no_idle_per_s, None);
        let mut run = spent(&[]);
        run.no_idle_bound(2.0, 1.0);
        assert_eq!(run.no_idle_per_s, None);
    }
}
