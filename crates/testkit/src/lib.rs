//! Dev-only fixtures: run the real service binaries as processes on loopback, with the local
//! identity server, and talk to them.
//!
//! Every process is started with `kill_on_drop`, on an ephemeral port of 127.0.0.1, so a test
//! that fails or panics leaves nothing running.

use std::{
    io::Cursor,
    net::TcpListener as StdListener,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use runmesh_proto::ping::v1::ping_service_client::PingServiceClient;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

/// The service account gateway calls relay as, in the test mesh.
pub const GATEWAY_SA: &str = "gateway@runmesh-test.iam.gserviceaccount.com";
/// The service account relay calls ping as, in the test mesh.
pub const RELAY_SA: &str = "relay@runmesh-test.iam.gserviceaccount.com";
/// The end user of the test mesh.
pub const USER: &str = "user@example.com";

/// Path of a workspace binary (`ping`, `relay`, `gateway`, `runmesh`) built beside the test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (the test command does)",
        path.display()
    );
    path
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process whose stderr (and stdout) lines are kept for assertions.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `program` with `args` and exactly the extra `env` given.
    pub fn spawn(name: &str, program: PathBuf, args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("GCE_METADATA_HOST")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("GOOGLE_CLOUD_PROJECT")
            .env_remove("K_SERVICE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for pipe in [
            Box::new(out) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(err),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    output.lock().unwrap().push(line);
                }
            });
        }
        Self {
            name: name.to_string(),
            child,
            output,
        }
    }

    /// Everything printed so far, one line each.
    pub fn lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    /// Waits until a printed line contains `needle`; returns that line.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Sends `signal` (e.g. `"TERM"`, `"KILL"`, `"STOP"`, `"CONT"`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process still running");
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {pid}");
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn status_kib(&self, key: &str) -> u64 {
        let pid = self.pid().expect("process running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Write system calls the process has made so far (`syscw` in `/proc/PID/io`): what it
    /// really did, however slow or busy the machine is.
    pub fn writes(&self) -> u64 {
        let pid = self.pid().expect("process running");
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|n| n.parse().ok())
            .expect("syscw in /proc/PID/io")
    }

    /// Open file descriptors now.
    pub fn fd_count(&self) -> usize {
        let pid = self.pid().expect("process running");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Whether any printed line reports a panic.
    pub fn panicked(&self) -> bool {
        self.lines().iter().any(|l| l.contains("panicked"))
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// A service binary running on `127.0.0.1:port`.
#[derive(Debug)]
pub struct Service {
    /// The process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
    /// `http://127.0.0.1:port`.
    pub url: String,
}

impl Service {
    /// Starts binary `name` with `env` on `port` and waits until its health says `SERVING`.
    pub async fn start_on(name: &str, port: u16, env: &[(&str, String)]) -> Self {
        let mut all = vec![
            ("HOST", "127.0.0.1".to_string()),
            ("PORT", port.to_string()),
            ("LOG_FORMAT", "json".to_string()),
        ];
        all.extend(env.iter().cloned());
        let proc = Proc::spawn(name, bin(name), &[], &all);
        let service = Self {
            proc,
            port,
            url: format!("http://127.0.0.1:{port}"),
        };
        service.wait_serving(Duration::from_secs(15)).await;
        service
    }

    /// Starts binary `name` on a free port.
    pub async fn start(name: &str, env: &[(&str, String)]) -> Self {
        Self::start_on(name, free_port(), env).await
    }

    /// Waits until health reports `SERVING`, or panics with the service's output.
    pub async fn wait_serving(&self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(true) =
                runmesh_runtime::process::check_health(self.port, Duration::from_millis(500)).await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{} not SERVING after {timeout:?}; output:\n{}",
            self.proc.name,
            self.proc.lines().join("\n")
        );
    }

    /// A client for this service.
    pub async fn client(&self) -> PingServiceClient<Channel> {
        client(&self.url).await
    }

    /// A connection to this service through the `h2` crate, for frames tonic would not send.
    pub async fn h2_client(&self) -> H2Client {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        let (client, connection) = h2::client::Builder::new()
            .handshake::<_, Cursor<Vec<u8>>>(tcp)
            .await
            .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

/// A raw HTTP/2 client ([`Service::h2_client`]).
pub type H2Client = h2::client::SendRequest<Cursor<Vec<u8>>>;

/// A client for `url` (h2c).
pub async fn client(url: &str) -> PingServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_lazy();
    PingServiceClient::new(channel)
}

/// `message` with `authorization: Bearer token`.
pub fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("token header");
    request.metadata_mut().insert("authorization", value);
    request
}

/// The local identity server, run as `runmesh idp`.
#[derive(Debug)]
pub struct Idp {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:port` of its API.
    pub api: String,
    /// Its JWKS URL.
    pub jwks: String,
    /// `host:port` of each identity's emulated metadata server, by email.
    pub identities: Vec<(String, String)>,
}

impl Idp {
    /// Starts `runmesh idp` with a metadata server per email in `identities`.
    pub async fn start(identities: &[&str]) -> Self {
        let mut args = vec!["idp".to_string(), "--api".into(), "127.0.0.1:0".into()];
        for email in identities {
            args.push("--identity".into());
            args.push(format!("{email}=127.0.0.1:0"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn("idp", bin("runmesh"), &args, &[]);
        let line = proc
            .wait_for_line("\"jwks\"", Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("idp did not start: {}", proc.lines().join("\n")));
        let ready: serde_json::Value = serde_json::from_str(&line).expect("idp ready line");
        let identities = ready["identities"]
            .as_object()
            .expect("identities")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        Self {
            api: ready["api"].as_str().expect("api").to_string(),
            jwks: ready["jwks"].as_str().expect("jwks").to_string(),
            identities,
            proc,
        }
    }

    /// `host:port` of the metadata server for `email`, for `GCE_METADATA_HOST`.
    pub fn metadata_host(&self, email: &str) -> String {
        self.identities
            .iter()
            .find(|(e, _)| e == email)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("no identity {email}"))
    }

    /// A user token for `audience`, minted by the identity server.
    pub async fn token(&self, audience: &str, email: &str) -> String {
        reqwest::Client::new()
            .get(format!("{}/token", self.api))
            .query(&[("audience", audience), ("email", email)])
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("mint token")
            .text()
            .await
            .expect("token body")
    }

    /// How many tokens the identity server has minted for `email`.
    pub async fn minted(&self, email: &str) -> u64 {
        let stats: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/stats", self.api))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        stats["minted"][email].as_u64().unwrap_or(0)
    }
}

/// gateway → relay → ping as processes, each with its own identity and allow-list.
#[derive(Debug)]
pub struct Mesh {
    /// The identity server.
    pub idp: Idp,
    /// The backend.
    pub ping: Service,
    /// The internal hop.
    pub relay: Service,
    /// The edge.
    pub gateway: Service,
}

impl Mesh {
    /// Starts the whole authenticated chain.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts the chain with `extra` settings for every service (e.g. telemetry).
    pub async fn start_with(extra: &[(&str, String)]) -> Self {
        Self::around(Idp::start(&[GATEWAY_SA, RELAY_SA]).await, extra).await
    }

    /// Starts ping, relay and gateway against `idp`, which must serve gateway's and relay's
    /// identities, with `extra` settings for every service.
    pub async fn around(idp: Idp, extra: &[(&str, String)]) -> Self {
        let ping = Self::start_ping_with(&idp, free_port(), extra).await;
        let relay_port = free_port();
        let relay_url = format!("http://127.0.0.1:{relay_port}");
        let mut env = vec![
            ("AUTH_AUDIENCE", relay_url.clone()),
            ("AUTH_JWKS_URL", idp.jwks.clone()),
            ("AUTH_ALLOWED_CALLERS", GATEWAY_SA.to_string()),
            ("UPSTREAM_URL", ping.url.clone()),
            ("UPSTREAM_AUDIENCE", ping.url.clone()),
            ("GCE_METADATA_HOST", idp.metadata_host(RELAY_SA)),
        ];
        env.extend_from_slice(extra);
        let relay = Service::start_on("relay", relay_port, &env).await;
        let gateway_port = free_port();
        let gateway_url = format!("http://127.0.0.1:{gateway_port}");
        let mut env = vec![
            ("AUTH_AUDIENCE", gateway_url),
            ("AUTH_JWKS_URL", idp.jwks.clone()),
            ("UPSTREAM_URL", relay.url.clone()),
            ("UPSTREAM_AUDIENCE", relay.url.clone()),
            ("GCE_METADATA_HOST", idp.metadata_host(GATEWAY_SA)),
        ];
        env.extend_from_slice(extra);
        let gateway = Service::start_on("gateway", gateway_port, &env).await;
        Self {
            idp,
            ping,
            relay,
            gateway,
        }
    }

    /// Starts (or restarts) ping on `port`, accepting only relay's identity.
    pub async fn start_ping(idp: &Idp, port: u16) -> Service {
        Self::start_ping_with(idp, port, &[]).await
    }

    /// [`Mesh::start_ping`] with `extra` settings.
    pub async fn start_ping_with(idp: &Idp, port: u16, extra: &[(&str, String)]) -> Service {
        let url = format!("http://127.0.0.1:{port}");
        let mut env = vec![
            ("AUTH_AUDIENCE", url),
            ("AUTH_JWKS_URL", idp.jwks.clone()),
            ("AUTH_ALLOWED_CALLERS", RELAY_SA.to_string()),
        ];
        env.extend_from_slice(extra);
        Service::start_on("ping", port, &env).await
    }

    /// A user token for the gateway.
    pub async fn user_token(&self) -> String {
        self.idp.token(&self.gateway.url, USER).await
    }
}
