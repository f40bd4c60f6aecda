//! The processes the benchmark runs: started with their output in log files, watched for
//! memory, and always stopped by PID — on success, on error and on Ctrl-C alike (drop).

use std::{
    collections::BTreeMap,
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::{
    resource::{UsageWho, getrusage},
    time::TimeVal,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The binary `find` locates, installing Debian's `package` with apt-get first if there is
/// none; `Err` says why there is still none.
pub(crate) fn ensure_package(
    package: &str,
    find: impl Fn() -> Option<PathBuf>,
) -> Result<PathBuf, String> {
    if let Some(path) = find() {
        return Ok(path);
    }
    eprintln!("{package} is missing: installing Debian's package with apt-get");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // A fresh machine has no package lists yet.
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdout(Stdio::null())
            .status();
        install();
    }
    find().ok_or_else(|| format!("{package} could not be installed with apt-get"))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A process this run started; killed when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    /// What it is, for messages and results.
    pub(crate) name: String,
    child: Child,
    /// Where its stdout and stderr go.
    pub(crate) log: PathBuf,
    /// When it was spawned.
    pub(crate) started: Instant,
    /// Signal that asks it to stop (nginx stops cleanly on `QUIT`, services on `TERM`).
    stop_signal: &'static str,
}

impl Proc {
    /// Starts `cmd` with its output in `logs/<name>.log`.
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        logs: &Path,
        stop_signal: &'static str,
    ) -> Result<Self, String> {
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
            started,
            stop_signal,
        })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process and its children, KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        tree_rss_kib(self.pid())
    }

    /// Fails with the end of its log if it has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); its log {} ends:\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// The last lines of its log.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits up to `timeout` for a log line containing `needle`.
    pub(crate) async fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let give_up = Instant::now() + timeout;
        while Instant::now() < give_up {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            self.check_running()?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "{} printed no {needle:?} within {timeout:?}; log:\n{}",
            self.name,
            self.log_tail()
        ))
    }

    /// Waits until its gRPC health on `127.0.0.1:port` says `SERVING`; returns the time from
    /// spawning it. Polls every millisecond, so the figure is within about a millisecond.
    pub(crate) async fn wait_serving(
        &mut self,
        port: u16,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let give_up = self.started + timeout;
        while Instant::now() < give_up {
            if serving(port).await {
                return Ok(self.started.elapsed());
            }
            self.check_running()?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err(format!(
            "{} not SERVING within {timeout:?}; log:\n{}",
            self.name,
            self.log_tail()
        ))
    }

    /// Asks it to stop, then kills it (and its children) by PID if it has not within `grace`.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let family = family(self.pid());
        signal(self.stop_signal, self.pid());
        let give_up = Instant::now() + grace;
        while Instant::now() < give_up {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // nginx workers outlive a killed master; they are ours too.
        for pid in family.into_iter().skip(1) {
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal("KILL", pid);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

fn signal(name: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `pid` and its children (nginx's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    pids.extend(children(pid));
    pids
}

/// Resident memory of `pid` and its children, KiB (`VmRSS` in `/proc/PID/status`).
pub(crate) fn tree_rss_kib(pid: u32) -> u64 {
    family(pid).into_iter().map(rss_kib).sum()
}

/// What a process and its children (nginx's workers) have used so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// CPU time, ns: every thread's run time from `/proc/PID/task/TID/schedstat`, which counts
    /// nanoseconds where `stat` counts 10 ms ticks.
    pub(crate) cpu_ns: u64,
    /// Time its threads were ready to run but waited for a core, ns (`schedstat`'s second
    /// field): what the processes sharing the cores cost each other.
    pub(crate) waited_ns: u64,
    /// Write system calls (`syscw` in `/proc/PID/io`): how the work was written out, which a
    /// slow or busy machine does not change.
    pub(crate) writes: u64,
}

impl Usage {
    /// What `pid` and its children have used.
    fn of_tree(pid: u32) -> Self {
        family(pid)
            .into_iter()
            .map(|pid| {
                let (cpu_ns, waited_ns) = sched_ns(pid);
                Self {
                    cpu_ns,
                    waited_ns,
                    writes: writes(pid),
                }
            })
            .fold(Self::default(), |a, b| Self {
                cpu_ns: a.cpu_ns + b.cpu_ns,
                waited_ns: a.waited_ns + b.waited_ns,
                writes: a.writes + b.writes,
            })
    }

    /// What was used between `start` and `self`.
    fn since(self, start: Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns.saturating_sub(start.cpu_ns),
            waited_ns: self.waited_ns.saturating_sub(start.waited_ns),
            writes: self.writes.saturating_sub(start.writes),
        }
    }
}

/// Run and wait time, ns, of all of `pid`'s threads.
fn sched_ns(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| parse_schedstat(&s))
        .fold((0, 0), |(run, wait), (r, w)| (run + r, wait + w))
}

/// CPU time of all of `pid`'s threads so far, ns.
pub(crate) fn cpu_ns(pid: u32) -> u64 {
    sched_ns(pid).0
}

/// CPU time of this process's children that have exited and been reaped, ns: what is left of a
/// child's CPU once `/proc` no longer has it.
pub(crate) fn reaped_children_cpu_ns() -> u64 {
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0, |u| {
        let ns = |t: TimeVal| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_usec()).unwrap_or(0) * 1_000
        };
        ns(u.user_time()) + ns(u.system_time())
    })
}

/// The run and wait times, ns, of a `schedstat` line (`<run ns> <wait ns> <timeslices>`).
pub(crate) fn parse_schedstat(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace().map(str::parse);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

/// Time the machine's cores were idle, ns, from `/proc/stat`.
fn idle_ns() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_idle_ticks(&s))
        .map_or(0, |ticks| ticks * NS_PER_TICK)
}

/// `/proc/stat` counts in `USER_HZ` ticks, which Linux fixes at 100 a second for user space.
const NS_PER_TICK: u64 = 10_000_000;

/// The idle and I/O-wait ticks of all cores, from the `cpu` line of a `/proc/stat` text.
pub(crate) fn parse_idle_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find_map(|l| l.strip_prefix("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some(ticks.get(3)? + ticks.get(4)?)
}

fn writes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| parse_syscw(&io))
        .unwrap_or(0)
}

/// The count of write system calls in a `/proc/PID/io`.
pub(crate) fn parse_syscw(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))?
        .trim()
        .parse()
        .ok()
}

/// What a measured window held: each process's usage, and the cores' idle time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Window {
    pub(crate) used: BTreeMap<String, Usage>,
    /// Time no process used of all the cores, ns.
    pub(crate) idle_ns: u64,
}

/// Runs `run` to its end, taking `sample` once `warmup` has passed, when a load generator starts
/// counting; no sample when `run` ended first.
pub(crate) async fn after_warmup<F: Future, S>(
    warmup: Duration,
    run: F,
    sample: impl FnOnce() -> S,
) -> (F::Output, Option<S>) {
    tokio::pin!(run);
    tokio::select! {
        out = &mut run => (out, None),
        () = tokio::time::sleep(warmup) => {
            let taken = sample();
            (run.await, Some(taken))
        }
    }
}

/// Runs `run` and measures what each of `pids` uses, and how long the cores were idle, from
/// `warmup` after the start (when a load generator starts counting) until `run` ends.
pub(crate) async fn usage_during<F: Future>(
    pids: &[(String, u32)],
    warmup: Duration,
    run: F,
) -> (F::Output, Window) {
    let sample = || -> (BTreeMap<String, Usage>, u64) {
        let used = pids
            .iter()
            .map(|(name, pid)| (name.clone(), Usage::of_tree(*pid)))
            .collect();
        (used, idle_ns())
    };
    let (out, start) = after_warmup(warmup, run, sample).await;
    // A run over before its warm-up measured nothing.
    let (start, idle_start) = start.unwrap_or_else(sample);
    let (end, idle_end) = sample();
    let used = end
        .into_iter()
        .map(|(name, end)| {
            let used = end.since(start.get(&name).copied().unwrap_or(end));
            (name, used)
        })
        .collect();
    let window = Window {
        used,
        idle_ns: idle_end.saturating_sub(idle_start),
    };
    (out, window)
}

/// Direct children of `pid`, from `/proc/PID/task/*/children`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// `VmRSS` of `pid` in KiB; 0 when it is gone.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vm_rss(&s))
        .unwrap_or(0)
}

/// The `VmRSS:` line of a `/proc/PID/status` text, in KiB.
pub(crate) fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Whether a gRPC health check of the whole server on `127.0.0.1:port` answers `SERVING`.
async fn serving(port: u16) -> bool {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let res = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(res.into_inner().status() == ServingStatus::Serving)
    };
    tokio::time::timeout(Duration::from_millis(500), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\tping\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tping\n"), None);
    }

    #[tokio::test]
    async fn a_sample_is_taken_after_the_warm_up_only_if_the_run_lasts_that_long() {
        let warmup = Duration::from_millis(50);
        let quick = async { 1 };
        assert_eq!(after_warmup(warmup, quick, || "taken").await, (1, None));
        let started = Instant::now();
        let slow = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            2
        };
        let (out, at) = after_warmup(warmup, slow, || started.elapsed()).await;
        assert_eq!(out, 2);
        let at = at.expect("a sample once the warm-up passed");
        assert!(at >= warmup && at < Duration::from_millis(500), "{at:?}");
    }

    #[test]
    fn a_child_s_cpu_is_still_counted_once_it_is_reaped() {
        let before = reaped_children_cpu_ns();
        let started = Instant::now();
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let spent = reaped_children_cpu_ns() - before;
        // Other tests' children may be reaped meanwhile, but no process outruns the cores.
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as u128;
        let most = started.elapsed().as_nanos() * cores + u128::from(NS_PER_TICK);
        assert!(spent > 0, "the loop's CPU was lost");
        assert!(u128::from(spent) <= most, "{spent} ns in {most} ns");
    }

    #[test]
    fn schedstat_holds_the_run_then_the_wait_time() {
        assert_eq!(
            parse_schedstat("123456789 2000 17\n"),
            Some((123_456_789, 2000))
        );
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("5"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
        assert_eq!(parse_schedstat("1 x 2"), None);
    }

    #[test]
    fn idle_is_the_idle_and_iowait_ticks_of_all_cores() {
        let stat = "cpu  36762 46809 12266 68209 366 0 4469 39 0 0\n\
                    cpu0 18000 23000 6000 34000 180 0 2200 20 0 0\n";
        assert_eq!(parse_idle_ticks(stat), Some(68209 + 366));
        assert_eq!(
            parse_idle_ticks("cpu0 1 2 3 4 5\n"),
            None,
            "not the cores' sum"
        );
        assert_eq!(parse_idle_ticks("cpu  1 2 3\n"), None);
        assert_eq!(parse_idle_ticks("cpu  1 2 3 x 5\n"), None);
    }

    #[test]
    fn syscw_is_the_count_of_write_calls() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 42\nread_bytes: 0\n";
        assert_eq!(parse_syscw(io), Some(42));
        assert_eq!(parse_syscw("syscr: 3\n"), None);
        assert_eq!(parse_syscw("syscw: x\n"), None);
    }

    #[tokio::test]
    async fn usage_is_counted_from_the_end_of_the_warmup_to_the_end_of_the_run() {
        // Spins, and writes a line to /dev/null every pass through its loop.
        let mut busy = Command::new("sh")
            .args(["-c", "while :; do echo >/dev/null; done"])
            .spawn()
            .unwrap();
        let pids = vec![("sh".to_string(), busy.id())];
        let window = |warmup_ms, run_ms| {
            usage_during(
                &pids,
                Duration::from_millis(warmup_ms),
                tokio::time::sleep(Duration::from_millis(run_ms)),
            )
        };
        let ((), long) = window(100, 500).await;
        let ((), short) = window(450, 500).await;
        busy.kill().unwrap();
        busy.wait().unwrap();
        let ms = |window: &Window| window.used["sh"].cpu_ns / 1_000_000;
        // 400 ms of a spinning process, given at least 30 % of a core on a busy machine.
        assert!((120..=450).contains(&ms(&long)), "{} ms", ms(&long));
        // 50 ms of wall time cannot hold more than 50 ms of one thread's CPU, plus sampling slop.
        assert!(ms(&short) <= 90, "{} ms", ms(&short));
        // The writes are counted over the same windows.
        assert!(
            long.used["sh"].writes > short.used["sh"].writes,
            "{long:?} {short:?}"
        );
        // So is the cores' idle time: at most all of them for the window, plus a tick each.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let most = |window_ms: u64| cores * (window_ms * 1_000_000 + 2 * NS_PER_TICK);
        assert!(long.idle_ns <= most(450), "{long:?}");
        assert!(short.idle_ns <= most(100), "{short:?}");
    }

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(rss_kib(std::process::id()) > 0);
    }
}
