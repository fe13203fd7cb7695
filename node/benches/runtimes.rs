//! Benchmark, run by hand (not part of the test gate): spawn-to-first-exec
//! latency through a real StacyVM cluster for each runtime, against the raw
//! runtime on the same machine.
//!
//! ```text
//! source /tmp/rt-exports.sh        # DOCKER_HOST, STACYVM_TEST_DOCKER_IMAGE, STACYVM_TEST_ROOTFS
//! cargo bench -p stacyvm-node --bench runtimes              # 30 runs per side and runtime
//! BENCH_QUICK=1 cargo bench -p stacyvm-node --bench runtimes # 5 runs (smoke)
//! ```
//!
//! The cluster: three `stacyvm serve` replicas (SQLite, sled log) and one
//! `stacyvm worker` offering every runtime selected and available, each a
//! separate process on 127.0.0.1 (free ports, a temp directory), started as
//! `scripts/smoke-remote-worker.sh` and `scripts/certify-runtime.sh` do
//! (`--docker-pull never`, `--proot-image busybox=$STACYVM_TEST_ROOTFS`).
//!
//! One cluster run: `POST /api/v1/sandboxes` (runtime R, its image, network
//! `none`, 512 MB, 1 vCPU: the server's defaults, spelled out) to the leader
//! through the typed client, then `POST .../exec` `echo hi` until the first
//! one that exits 0 with `hi` on stdout; timed from sending the spawn to the
//! parsed exec result. The sandbox is destroyed afterwards (not timed).
//!
//! One raw run, on the same machine, without StacyVM:
//!
//! - `docker` / `gvisor`: the Docker Engine API over `DOCKER_HOST`'s unix
//!   socket, four calls: container create (the same body as
//!   `runtimes/src/docker.rs` sends: same image, keeper entrypoint, user
//!   `1000:1000`, `/workspace` bind mount, all capabilities dropped,
//!   `no-new-privileges`, PID limit 512, network `none`, 512 MB memory without
//!   swap, 1 CPU, OCI runtime `runc` / `runsc`), container start, exec create
//!   (`/bin/sh -c 'echo hi'`, same user and workdir), exec start reading the
//!   multiplexed output to its end. The container is removed afterwards (not
//!   timed). The calls are plain HTTP/1.1 through `reqwest` (the Engine API
//!   bollard wraps): bollard is not a dependency of this package, and adding
//!   it would change `Cargo.lock`.
//! - `proot`: `proot -r $STACYVM_TEST_ROOTFS -b WS:/workspace -b /proc -b /dev
//!   -w /workspace /bin/sh -c 'echo hi'` as one process (the flags the proot
//!   runtime uses), timed until it exited with its output read.
//! - `mock`: no raw runtime; the reference is a host process `sh -c 'echo hi'`.
//!
//! Cluster and raw runs alternate (which goes first alternates too), after
//! unmeasured warm-up runs of both, so a change in the machine's load hits
//! both sides alike. Ratio = cluster percentile / raw percentile.
//!
//! Knobs: `BENCH_RUNS` (measured runs per side and runtime, default 30),
//! `BENCH_QUICK=1` (5 runs), `BENCH_WARMUP` (default 3, quick 1),
//! `BENCH_RUNTIMES` (default `docker,gvisor,proot,mock`), `BENCH_DIR` (where
//! the temp directory goes), `BENCH_KEEP=1` (keep it, with the logs). A
//! runtime that is not available here is skipped with a line saying why.
//!
//! Markdown goes to stdout, progress to stderr. Every child process is
//! started here and stopped by its handle (its PID): the worker gets SIGINT
//! first (it runs with `--destroy-on-exit`) and SIGKILL after a grace period,
//! replicas SIGKILL; on normal exit, error, panic or Ctrl-C alike. Raw
//! containers carry a label with this process's PID and are removed after
//! each run and once more at the end.

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use stacyvm_api::{DurationValue, ExecRequest, SpawnRequest};
use stacyvm_client::{Client, ClientError};

const REPLICAS: usize = 3;
/// How long the cluster may take to agree on a leader, and the worker to register.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);
/// Per-request read timeout of the cluster client and the Engine API client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a run keeps retrying an exec the sandbox is not ready for.
const EXEC_RETRY_FOR: Duration = Duration::from_secs(30);
/// Pause between exec retries, and after a failed run.
const RETRY_SLEEP: Duration = Duration::from_millis(10);
/// How long the worker may take to exit after SIGINT (destroying its sandboxes).
const WORKER_GRACE: Duration = Duration::from_secs(60);
/// The requirement: cluster ≤ 1.15 × raw.
const TARGET_RATIO: f64 = 1.15;
/// The main process of a Docker sandbox (as `runtimes/src/docker.rs`).
const KEEPER: &str = "while :; do sleep 3600; done";
/// Label on every raw container this benchmark creates (value: its PID).
const RAW_LABEL: &str = "stacyvm.bench.raw";
const ALL_RUNTIMES: [&str; 4] = ["docker", "gvisor", "proot", "mock"];
/// Memory and vCPUs of every sandbox, both sides (the server's defaults).
const MEMORY_MB: i64 = 512;
const VCPUS: i64 = 1;

#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    runs: usize,
    warmup: usize,
    runtimes: Vec<String>,
    base_dir: Option<PathBuf>,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn settings() -> Result<Settings> {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let runs = env_u64("BENCH_RUNS")
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(if quick { 5 } else { 30 })
        .max(1);
    let warmup = env_u64("BENCH_WARMUP")
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let runtimes: Vec<String> = match std::env::var("BENCH_RUNTIMES") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect(),
        _ => ALL_RUNTIMES.iter().map(|r| r.to_string()).collect(),
    };
    for r in &runtimes {
        if !ALL_RUNTIMES.contains(&r.as_str()) {
            bail!("BENCH_RUNTIMES: unknown runtime {r:?} (known: {ALL_RUNTIMES:?})");
        }
    }
    Ok(Settings {
        quick,
        runs,
        warmup,
        runtimes,
        base_dir: std::env::var_os("BENCH_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    })
}

fn stacyvm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_stacyvm")
}

/// A loopback port free for both TCP and UDP right now (QUIC needs UDP).
fn free_port() -> Result<u16> {
    for _ in 0..1000 {
        let tcp = TcpListener::bind("127.0.0.1:0").context("bind a TCP port")?;
        let port = tcp.local_addr().context("local address")?.port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port")
}

// ------------------------------------------------------------ child processes

/// One child process, stopped by its handle when dropped: SIGINT and up to
/// `grace` to exit when `grace` is set, then SIGKILL; reaped either way.
#[derive(Debug)]
struct Proc {
    name: String,
    log: PathBuf,
    grace: Option<Duration>,
    child: Option<Child>,
}

impl Proc {
    fn start(
        name: String,
        args: Vec<String>,
        log: PathBuf,
        grace: Option<Duration>,
    ) -> Result<Proc> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = Command::new(stacyvm_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().context("dup log file")?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            name,
            log,
            grace,
            child: Some(child),
        })
    }

    /// Sends SIGINT to this child (by its PID, through `kill(1)`).
    fn interrupt(&mut self) {
        let Some(c) = &mut self.child else {
            return;
        };
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-s", "INT", &c.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Has the child exited (reaping it if so)?
    fn exited(&mut self) -> bool {
        match &mut self.child {
            None => true,
            Some(c) => !matches!(c.try_wait(), Ok(None)),
        }
    }

    /// SIGKILL (by PID, through the handle) and reap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(grace) = self.grace {
            self.interrupt();
            let until = Instant::now() + grace;
            while !self.exited() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !self.exited() {
                eprintln!(
                    "  {} still running {grace:?} after SIGINT; killing it",
                    self.name
                );
            }
        }
        self.kill9();
    }
}

fn run_ok(args: &[&str]) -> Result<()> {
    let out = Command::new(stacyvm_bin())
        .args(args)
        .output()
        .context("run stacyvm")?;
    if !out.status.success() {
        bail!("stacyvm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

fn api_client(url: &str) -> Result<Client> {
    Client::new(url, None, REQUEST_TIMEOUT).map_err(|e| anyhow!("client for {url}: {e}"))
}

// ------------------------------------------------------------------- cluster

/// Three replicas and one worker on loopback.
#[derive(Debug)]
struct Cluster {
    // Field order is drop order: the worker (SIGINT, it destroys its
    // sandboxes), then the replicas, then the directory.
    worker: Option<Proc>,
    replicas: Vec<Proc>,
    /// Replica API base URLs, index-aligned with `replicas`.
    urls: Vec<String>,
    worker_id: String,
    http: reqwest::Client,
    /// `None` only once kept (`BENCH_KEEP=1`).
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The worker first: it destroys its sandboxes while the replicas run.
        drop(self.worker.take());
        if std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("  kept {}", dir.keep().display());
        }
    }
}

impl Cluster {
    /// `worker_extra`: runtime flags of the worker.
    async fn start(runtimes: &[String], worker_extra: &[String], s: &Settings) -> Result<Cluster> {
        let dir = match &s.base_dir {
            Some(base) => tempfile::Builder::new()
                .prefix("stacyvm-bench-rt-")
                .tempdir_in(base),
            None => tempfile::Builder::new()
                .prefix("stacyvm-bench-rt-")
                .tempdir(),
        }
        .context("temp dir")?;
        let root = dir.path().to_path_buf();
        let certs = root.join("certs");
        let certs_s = path_str(&certs)?;
        run_ok(&["certs", "init", "--out", certs_s])?;
        for id in 1..=REPLICAS {
            run_ok(&[
                "certs",
                "issue",
                "node",
                "--id",
                &id.to_string(),
                "--ca",
                certs_s,
                "--out",
                certs_s,
            ])?;
        }
        let mut addrs = Vec::new();
        for _ in 0..REPLICAS {
            addrs.push((
                format!("127.0.0.1:{}", free_port()?),
                format!("127.0.0.1:{}", free_port()?),
            ));
        }
        let mut peers = Vec::new();
        for (i, (raft, api)) in addrs.iter().enumerate() {
            peers.push("--peer".to_string());
            peers.push(format!("{}={raft}={api}", i + 1));
        }
        let mut c = Cluster {
            worker: None,
            replicas: Vec::new(),
            urls: Vec::new(),
            worker_id: "bench-rt-worker".to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .context("HTTP client")?,
            dir: Some(dir),
        };
        for (i, (raft, api)) in addrs.iter().enumerate() {
            let id = i + 1;
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--id".into(),
                id.to_string(),
                "--data-dir".into(),
                root.join(format!("node-{id}")).display().to_string(),
                "--certs".into(),
                certs.display().to_string(),
                "--raft-addr".into(),
                raft.clone(),
                "--api-addr".into(),
                api.clone(),
                "--database-driver".into(),
                "sqlite".into(),
                "--bootstrap".into(),
            ];
            args.extend(peers.iter().cloned());
            c.replicas.push(Proc::start(
                format!("replica {id}"),
                args,
                root.join(format!("node-{id}.log")),
                None,
            )?);
            c.urls.push(format!("http://{api}"));
        }
        c.wait_healthy().await?;

        let bootstrap: Vec<&str> = addrs.iter().map(|(_, api)| api.as_str()).collect();
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--id".into(),
            c.worker_id.clone(),
            "--bootstrap".into(),
            bootstrap.join(","),
            "--rpc-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--state-dir".into(),
            root.join("worker").display().to_string(),
            "--destroy-on-exit".into(),
            "--runtimes".into(),
            runtimes.join(","),
        ];
        args.extend(worker_extra.iter().cloned());
        c.worker = Some(Proc::start(
            format!("worker {}", c.worker_id),
            args,
            root.join("worker.log"),
            Some(WORKER_GRACE),
        )?);
        Ok(c)
    }

    fn dump_logs(&self) -> String {
        self.replicas
            .iter()
            .chain(self.worker.as_ref())
            .map(|p| format!("--- {} ({}) ---\n{}", p.name, p.log.display(), p.tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Adds the children's logs to an error.
    fn with_logs<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| anyhow!("{e:#}\n{}", self.dump_logs()))
    }

    /// Replica `i`'s (leader index, is it the leader), if it is ready.
    async fn view(&self, i: usize) -> Option<(Option<usize>, bool)> {
        let ready = self
            .http
            .get(format!("{}/ready", self.urls[i]))
            .send()
            .await
            .ok()?;
        if !ready.status().is_success() {
            return None;
        }
        let s: Value = self
            .http
            .get(format!("{}/api/v1/cluster/status", self.urls[i]))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let leader = s["leader_id"]
            .as_u64()
            .and_then(|id| usize::try_from(id).ok()?.checked_sub(1));
        Some((leader, s["state"].as_str() == Some("leader")))
    }

    /// Waits until every replica answers and all agree on one leader that
    /// says it leads. Returns the leader's index.
    async fn wait_healthy(&self) -> Result<usize> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let mut views = Vec::new();
            for i in 0..self.replicas.len() {
                views.push(self.view(i).await);
            }
            if let Some(Some((Some(l), _))) = views.first()
                && views
                    .iter()
                    .all(|v| v.is_some_and(|(leader, _)| leader == Some(*l)))
                && views.get(*l).is_some_and(|v| v.is_some_and(|(_, is)| is))
            {
                return Ok(*l);
            }
            if Instant::now() >= deadline {
                bail!(
                    "cluster not healthy within {HEALTHY_WITHIN:?}: {views:?}\n{}",
                    self.dump_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the worker to be online; returns the runtimes it advertises
    /// (those that passed their health check), after giving every one of
    /// `wanted` a moment to show up.
    async fn wait_worker(&self, wanted: &[String]) -> Result<Vec<String>> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let client = api_client(&self.urls.join(","))?;
        let mut online_since: Option<Instant> = None;
        loop {
            let listed = client.workers().await;
            if let Ok(ws) = &listed
                && let Some(w) = ws
                    .iter()
                    .find(|w| w.id == self.worker_id && w.status == "online")
            {
                let since = *online_since.get_or_insert_with(Instant::now);
                if wanted.iter().all(|r| w.runtimes.contains(r))
                    || since.elapsed() >= Duration::from_secs(10)
                {
                    return Ok(w.runtimes.clone());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "worker not online within {HEALTHY_WITHIN:?}: {listed:?}\n{}",
                    self.dump_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// -------------------------------------------------------------- measurements

/// The two halves of one run.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Cluster: sending the spawn → its `201`. Raw: container create + start
    /// (docker, gvisor); zero for a one-process run (proot, host process).
    spawn: Duration,
    /// From there to the first successful exec's output.
    exec: Duration,
}

/// The runs of one side of one runtime.
#[derive(Debug, Default, Clone)]
struct Series {
    /// Microseconds, in run order.
    total: Vec<u64>,
    spawn: Vec<u64>,
    exec: Vec<u64>,
    errors: BTreeMap<String, u64>,
    /// Exec attempts refused before the first successful one (cluster).
    exec_retries: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentile (sorts a copy); 0 when empty.
fn percentile(values: &[u64], p: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl Series {
    fn push(&mut self, t: Timing) {
        self.total.push(micros(t.spawn + t.exec));
        self.spawn.push(micros(t.spawn));
        self.exec.push(micros(t.exec));
    }

    fn error(&mut self, e: String) {
        *self.errors.entry(e).or_default() += 1;
    }

    fn p(&self, pct: f64) -> u64 {
        percentile(&self.total, pct)
    }
}

/// An error class for the tables: the API error code, or the kind of failure.
fn class(e: &ClientError) -> String {
    match e {
        ClientError::Api { status, body } => format!("HTTP {status} {}", body.code),
        ClientError::Transport(m) if m.contains("timed out") => "client timeout".into(),
        ClientError::Transport(_) => "transport error".into(),
        ClientError::Decode(_) => "undecodable answer".into(),
        ClientError::Config(_) => "client config".into(),
    }
}

/// Says what went wrong for the first few failures of a runtime.
fn note_error(shown: &mut usize, what: &str, e: &str) {
    if *shown < 5 {
        *shown += 1;
        eprintln!("    {what} failed: {e}");
    }
}

/// One cluster run: spawn, first successful exec, then destroy (not timed).
async fn cluster_once(
    client: &Client,
    spawn: &SpawnRequest,
    exec: &ExecRequest,
    retries: &mut u64,
    shown: &mut usize,
) -> Result<Timing, String> {
    let t0 = Instant::now();
    let sb = match client.spawn(spawn).await {
        Ok(sb) if sb.state == "running" => sb,
        Ok(sb) => {
            let _ = client.destroy(&sb.id).await;
            return Err(format!("spawn answered state {}", sb.state));
        }
        Err(e) => {
            note_error(shown, "spawn", &e.to_string());
            return Err(format!("spawn: {}", class(&e)));
        }
    };
    let spawned = t0.elapsed();
    let result = loop {
        match client.exec(&sb.id, exec).await {
            Ok(r) if r.exit_code == 0 && r.stdout.trim() == "hi" => break Ok(t0.elapsed()),
            Ok(r) => {
                break Err(format!(
                    "exec: exit {} stdout {:?} stderr {:?}",
                    r.exit_code,
                    r.stdout.trim(),
                    r.stderr.trim()
                ));
            }
            // Not ready yet: the first successful exec is what counts.
            Err(e)
                if matches!(e.code(), Some("SANDBOX_NOT_RUNNING" | "WORKER_UNAVAILABLE"))
                    && t0.elapsed() < EXEC_RETRY_FOR =>
            {
                *retries += 1;
                tokio::time::sleep(RETRY_SLEEP).await;
            }
            Err(e) => {
                note_error(shown, "exec", &e.to_string());
                break Err(format!("exec: {}", class(&e)));
            }
        }
    };
    if let Err(e) = client.destroy(&sb.id).await {
        note_error(shown, "destroy", &e.to_string());
    }
    let done = result?;
    Ok(Timing {
        spawn: spawned,
        exec: done.saturating_sub(spawned),
    })
}

/// The Docker Engine API over a unix socket, spoken directly.
#[derive(Debug)]
struct Engine {
    http: reqwest::Client,
    /// `http://docker/v<API version>`.
    base: String,
    socket: String,
    server_version: String,
}

impl Engine {
    /// Connects to `DOCKER_HOST` (a `unix://` socket; the default socket
    /// when unset) and reads the daemon's API version.
    async fn connect() -> Result<Engine> {
        let host =
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let Some(socket) = host.strip_prefix("unix://") else {
            bail!("DOCKER_HOST={host} is not a unix:// socket");
        };
        if !Path::new(socket).exists() {
            bail!("no Docker socket at {socket}");
        }
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("Engine API client")?;
        let v: Value = http
            .get("http://docker/version")
            .send()
            .await
            .with_context(|| format!("dockerd at {socket}"))?
            .error_for_status()
            .context("GET /version")?
            .json()
            .await
            .context("GET /version: JSON")?;
        let api = v["ApiVersion"]
            .as_str()
            .ok_or_else(|| anyhow!("GET /version: no ApiVersion in {v}"))?;
        Ok(Engine {
            http,
            base: format!("http://docker/v{api}"),
            socket: socket.to_string(),
            server_version: format!("{} (API {api})", v["Version"].as_str().unwrap_or("unknown")),
        })
    }

    /// A request's answer as JSON (an empty body as `null`), or an error
    /// naming the call and dockerd's message.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("{method} {path}: body"))?;
        if !status.is_success() {
            bail!(
                "{method} {path}: HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&bytes).trim()
            );
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: JSON"))
    }

    /// The OCI runtimes dockerd knows.
    async fn oci_runtimes(&self) -> Result<Vec<String>> {
        let info = self.call(reqwest::Method::GET, "/info", None).await?;
        Ok(info["Runtimes"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    async fn has_image(&self, image: &str) -> bool {
        self.call(reqwest::Method::GET, &format!("/images/{image}/json"), None)
            .await
            .is_ok()
    }

    /// Removes a container by name (gone already is fine).
    async fn remove(&self, name: &str) -> Result<()> {
        let path = format!("/containers/{name}?force=1&v=1");
        match self.call(reqwest::Method::DELETE, &path, None).await {
            Ok(_) => Ok(()),
            Err(e) if format!("{e}").contains("HTTP 404") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every container this process labelled (the final sweep).
    async fn remove_leftovers(&self) -> usize {
        let filters = json!({ "label": [format!("{RAW_LABEL}={}", std::process::id())] });
        let path = format!(
            "/containers/json?all=1&filters={}",
            enc(&filters.to_string())
        );
        let Ok(list) = self.call(reqwest::Method::GET, &path, None).await else {
            return 0;
        };
        let mut n = 0;
        for c in list.as_array().into_iter().flatten() {
            if let Some(id) = c["Id"].as_str()
                && self.remove(id).await.is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// One raw run: create, start, exec create, exec start reading the
    /// output. `created_id` gets the container's ID as soon as it exists.
    async fn run(
        &self,
        oci: &str,
        image: &str,
        name: &str,
        workspace: &Path,
        created_id: &mut Option<String>,
    ) -> Result<Timing> {
        let t0 = Instant::now();
        let body = json!({
            "Image": image,
            "Entrypoint": ["/bin/sh", "-c", KEEPER],
            "Cmd": [],
            "Env": [format!("SANDBOX_ID={name}")],
            "Labels": { RAW_LABEL: std::process::id().to_string() },
            "User": "1000:1000",
            "WorkingDir": "/workspace",
            "NetworkDisabled": true,
            "HostConfig": {
                "Binds": [format!("{}:/workspace:rw", workspace.display())],
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "PidsLimit": 512,
                "NetworkMode": "none",
                "Runtime": oci,
                "ReadonlyRootfs": false,
                "Memory": MEMORY_MB * 1024 * 1024,
                "MemorySwap": MEMORY_MB * 1024 * 1024,
                "NanoCpus": VCPUS * 1_000_000_000,
            },
        });
        let created = self
            .call(
                reqwest::Method::POST,
                &format!("/containers/create?name={name}"),
                Some(&body),
            )
            .await?;
        let id = created["Id"]
            .as_str()
            .ok_or_else(|| anyhow!("container create: no Id in {created}"))?
            .to_string();
        *created_id = Some(id.clone());
        self.call(
            reqwest::Method::POST,
            &format!("/containers/{id}/start"),
            None,
        )
        .await?;
        let started = t0.elapsed();
        let exec = json!({
            "Cmd": ["/bin/sh", "-c", "echo hi"],
            "Env": [format!("STACYVM_EXEC_ID=bench-{name}")],
            "User": "1000:1000",
            "WorkingDir": "/workspace",
            "AttachStdin": false,
            "AttachStdout": true,
            "AttachStderr": true,
            "Tty": false,
        });
        let made = self
            .call(
                reqwest::Method::POST,
                &format!("/containers/{id}/exec"),
                Some(&exec),
            )
            .await?;
        let exec_id = made["Id"]
            .as_str()
            .ok_or_else(|| anyhow!("exec create: no Id in {made}"))?;
        // Without an `Upgrade` header dockerd answers 200 and sends the
        // multiplexed stream until the exec ends, then closes.
        let path = format!("/exec/{exec_id}/start");
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&json!({ "Detach": false, "Tty": false }))
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let stream = resp
            .bytes()
            .await
            .with_context(|| format!("POST {path}: stream"))?;
        let done = t0.elapsed();
        if !status.is_success() {
            bail!(
                "POST {path}: HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&stream).trim()
            );
        }
        let (stdout, stderr) = demux(&stream)?;
        if String::from_utf8_lossy(&stdout).trim() != "hi" {
            bail!(
                "exec: stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        Ok(Timing {
            spawn: started,
            exec: done.saturating_sub(started),
        })
    }
}

/// Percent-encodes a query value.
fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Splits Docker's multiplexed stream (8-byte frame headers) into stdout and stderr.
fn demux(mut buf: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while !buf.is_empty() {
        let Some((head, rest)) = buf.split_first_chunk::<8>() else {
            bail!("exec stream: truncated frame header");
        };
        let len = usize::try_from(u32::from_be_bytes([head[4], head[5], head[6], head[7]]))
            .context("frame length")?;
        let Some(payload) = rest.get(..len) else {
            bail!("exec stream: truncated frame");
        };
        match head[0] {
            2 => err.extend_from_slice(payload),
            _ => out.extend_from_slice(payload),
        }
        buf = &rest[len..];
    }
    Ok((out, err))
}

/// The raw counterpart of a runtime.
#[derive(Debug)]
enum Raw<'a> {
    Docker {
        engine: &'a Engine,
        oci: &'static str,
        image: String,
    },
    Proot {
        rootfs: PathBuf,
    },
    /// A host process (the mock's reference).
    Host,
}

impl Raw<'_> {
    fn describe(&self) -> String {
        match self {
            Raw::Docker { oci, .. } => {
                format!("Engine API create + start + exec create + exec start (OCI runtime {oci})")
            }
            Raw::Proot { .. } => "`proot -r ROOTFS ... /bin/sh -c 'echo hi'`".into(),
            Raw::Host => "host process `sh -c 'echo hi'` (no raw runtime)".into(),
        }
    }

    /// One raw run; `n` names its container and workspace; cleanup not timed.
    async fn once(&self, n: usize, scratch: &Path) -> Result<Timing> {
        let workspace = scratch.join(format!("raw-{n}"));
        std::fs::create_dir_all(&workspace)
            .with_context(|| format!("create {}", workspace.display()))?;
        let r = match self {
            Raw::Docker { engine, oci, image } => {
                std::os::unix::fs::chown(&workspace, Some(1000), Some(1000))
                    .with_context(|| format!("chown {}", workspace.display()))?;
                let name = format!("stacyvm-bench-raw-{oci}-{}-{n}", std::process::id());
                let mut id = None;
                let r = engine.run(oci, image, &name, &workspace, &mut id).await;
                if let Err(e) = engine.remove(&name).await {
                    eprintln!("    removing {name}: {e:#}");
                }
                // As the runtime's destroy does (runtimes/src/docker.rs,
                // `reap_leftovers`), let the container's host processes (shim,
                // runsc sandbox and gofer) exit before the next run starts;
                // unlike it, never kill them.
                if let Some(id) = id {
                    wait_processes_gone(&id, Duration::from_secs(3)).await;
                }
                r
            }
            Raw::Proot { rootfs } => {
                let mut cmd = tokio::process::Command::new("proot");
                cmd.arg("-r")
                    .arg(rootfs)
                    .arg("-b")
                    .arg(format!("{}:/workspace", workspace.display()))
                    .args(["-b", "/proc", "-b", "/dev", "-w", "/workspace"])
                    .args(["/bin/sh", "-c", "echo hi"]);
                one_process(cmd).await
            }
            Raw::Host => {
                let mut cmd = tokio::process::Command::new("sh");
                cmd.args(["-c", "echo hi"]).current_dir(&workspace);
                one_process(cmd).await
            }
        };
        let _ = std::fs::remove_dir_all(&workspace);
        r
    }
}

/// Waits up to `limit` until no process's command line names `container_id`.
async fn wait_processes_gone(container_id: &str, limit: Duration) {
    let needle = container_id.as_bytes();
    let until = Instant::now() + limit;
    loop {
        let any = std::fs::read_dir("/proc").is_ok_and(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .any(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
                })
        });
        if !any || Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `cmd` to its end with its output read; the time is all "exec".
async fn one_process(mut cmd: tokio::process::Command) -> Result<Timing> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let t0 = Instant::now();
    let out = cmd.output().await.context("run the raw command")?;
    let took = t0.elapsed();
    if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != "hi" {
        bail!(
            "raw command: {} stdout {:?} stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Timing {
        spawn: Duration::ZERO,
        exec: took,
    })
}

/// What one runtime measured.
#[derive(Debug)]
struct Outcome {
    runtime: String,
    image: String,
    raw_what: String,
    /// Whether the raw side is the runtime itself (not a host-process stand-in).
    comparable: bool,
    cluster: Series,
    raw: Series,
    /// Set when the runtime's runs gave up.
    failed: Option<String>,
    load_before: String,
    load_after: String,
}

/// Alternating cluster and raw runs of one runtime.
async fn bench_runtime(
    c: &Cluster,
    runtime: &str,
    image: &str,
    raw: &Raw<'_>,
    s: &Settings,
    scratch: &Path,
) -> Outcome {
    let mut out = Outcome {
        runtime: runtime.to_string(),
        image: image.to_string(),
        raw_what: raw.describe(),
        comparable: !matches!(raw, Raw::Host),
        cluster: Series::default(),
        raw: Series::default(),
        failed: None,
        load_before: loadavg(),
        load_after: String::new(),
    };
    if let Err(e) = bench_runtime_into(c, runtime, image, raw, s, scratch, &mut out).await {
        eprintln!("  {runtime}: gave up: {e:#}");
        out.failed = Some(e.to_string().lines().next().unwrap_or("").to_string());
    }
    out.load_after = loadavg();
    out
}

async fn bench_runtime_into(
    c: &Cluster,
    runtime: &str,
    image: &str,
    raw: &Raw<'_>,
    s: &Settings,
    scratch: &Path,
    out: &mut Outcome,
) -> Result<()> {
    let leader = c.with_logs(c.wait_healthy().await)?;
    let client = api_client(&c.urls[leader])?;
    let spawn = SpawnRequest {
        image: image.to_string(),
        runtime: runtime.to_string(),
        memory_mb: Some(MEMORY_MB),
        vcpus: Some(VCPUS),
        ttl: Some(DurationValue::Text("10m".into())),
        network_mode: "none".into(),
        ..SpawnRequest::default()
    };
    let exec = ExecRequest {
        command: "echo hi".into(),
        ..ExecRequest::default()
    };
    let total = s.warmup + s.runs;
    let max_errors = s.runs.max(10);
    let (mut done_c, mut done_r, mut errors, mut shown) = (0usize, 0usize, 0usize, 0usize);
    let mut seq = 0usize;
    eprintln!(
        "  {runtime} ({image}): {} + {} warm-up runs per side, leader is replica {}",
        s.runs,
        s.warmup,
        leader + 1
    );
    while done_c < total || done_r < total {
        seq += 1;
        // Which side goes first alternates.
        for side in [seq % 2, (seq + 1) % 2] {
            if side == 0 && done_c < total {
                let mut retries = 0;
                match cluster_once(&client, &spawn, &exec, &mut retries, &mut shown).await {
                    Ok(t) => {
                        if done_c >= s.warmup {
                            out.cluster.push(t);
                            out.cluster.exec_retries += retries;
                        }
                        done_c += 1;
                    }
                    Err(e) => {
                        out.cluster.error(e);
                        errors += 1;
                        tokio::time::sleep(RETRY_SLEEP).await;
                    }
                }
            } else if side == 1 && done_r < total {
                match raw.once(seq, scratch).await {
                    Ok(t) => {
                        if done_r >= s.warmup {
                            out.raw.push(t);
                        }
                        done_r += 1;
                    }
                    Err(e) => {
                        note_error(&mut shown, "raw run", &format!("{e:#}"));
                        out.raw
                            .error(e.to_string().chars().take(120).collect::<String>());
                        errors += 1;
                        tokio::time::sleep(RETRY_SLEEP).await;
                    }
                }
            }
        }
        if errors > max_errors {
            bail!(
                "more than {max_errors} failed runs (cluster {:?}, raw {:?})",
                out.cluster.errors,
                out.raw.errors
            );
        }
    }
    eprintln!(
        "    cluster p50 {} ms p99 {} ms | raw p50 {} ms p99 {} ms",
        ms(out.cluster.p(50.0)),
        ms(out.cluster.p(99.0)),
        ms(out.raw.p(50.0)),
        ms(out.raw.p(99.0))
    );
    Ok(())
}

/// One Raft write alone (a lease grant to the leader), as the control
/// plane's unit cost: p50 and p99 of `n` sequential grants.
async fn raft_write_reference(c: &Cluster, n: usize) -> Result<(u64, u64)> {
    let leader = c.wait_healthy().await?;
    let base = &c.urls[leader];
    let mut lat = Vec::new();
    for i in 0..n + 3 {
        let body = json!({
            "resource_id": format!("bench-rt-lease-{i}"),
            "resource_type": "bench",
            "holder_id": "bench",
            "ttl_ms": 3_600_000,
        });
        let t0 = Instant::now();
        let r = c
            .http
            .post(format!("{base}/api/v1/leases/acquire"))
            .json(&body)
            .send()
            .await
            .context("lease acquire")?;
        let status = r.status();
        r.bytes().await.context("lease acquire: body")?;
        if !status.is_success() {
            bail!("lease acquire: HTTP {}", status.as_u16());
        }
        if i >= 3 {
            lat.push(micros(t0.elapsed()));
        }
    }
    Ok((percentile(&lat, 50.0), percentile(&lat, 99.0)))
}

// -------------------------------------------------------------------- report

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / (b.max(1)) as f64
}

fn errors_cell(e: &BTreeMap<String, u64>) -> String {
    if e.is_empty() {
        return "0".into();
    }
    e.iter()
        .map(|(k, v)| format!("{v}× {k}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn print_report(
    s: &Settings,
    outcomes: &[Outcome],
    skipped: &[(String, String)],
    raft: Option<(u64, u64)>,
    env: &[(String, String)],
) {
    println!("### Environment\n");
    println!("| | |\n|---|---|");
    for (k, v) in env {
        println!("| {k} | {v} |");
    }
    println!();

    println!(
        "### Spawn to first exec, {} runs per side (ms; target: cluster ≤ {TARGET_RATIO}× raw)\n",
        s.runs
    );
    println!(
        "| Runtime | Cluster p50 | Cluster p99 | Raw p50 | Raw p99 | Ratio p50 | Ratio p99 | Target met? |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for o in outcomes {
        if let Some(why) = &o.failed
            && (o.cluster.total.is_empty() || o.raw.total.is_empty())
        {
            println!("| {} | failed: {why} | | | | | | — |", o.runtime);
            continue;
        }
        let (c50, c99, r50, r99) = (
            o.cluster.p(50.0),
            o.cluster.p(99.0),
            o.raw.p(50.0),
            o.raw.p(99.0),
        );
        let (q50, q99) = (ratio(c50, r50), ratio(c99, r99));
        let verdict = if !o.comparable {
            "n/a (no raw runtime)".to_string()
        } else {
            match (q50 <= TARGET_RATIO, q99 <= TARGET_RATIO) {
                (true, true) => "yes".into(),
                (true, false) => "p50 yes, p99 no".into(),
                (false, true) => "p50 no, p99 yes".into(),
                (false, false) => "no".into(),
            }
        };
        let partial = if o.failed.is_some() { " (partial)" } else { "" };
        println!(
            "| {}{partial} | {} | {} | {} | {} | {q50:.2}× | {q99:.2}× | {verdict} |",
            o.runtime,
            ms(c50),
            ms(c99),
            ms(r50),
            ms(r99)
        );
    }
    for (r, why) in skipped {
        println!("| {r} | skipped: {why} | | | | | | — |");
    }
    println!();

    println!("### Where the time goes (p50 of each part, ms)\n");
    println!(
        "| Runtime | Cluster spawn (POST → 201) | Cluster exec | Raw start | Raw exec | Δ p50 (cluster − raw) | Counted cluster / raw | Exec retries | Errors cluster / raw | Load avg before → after |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---|---|");
    for o in outcomes {
        if o.cluster.total.is_empty() && o.raw.total.is_empty() {
            continue;
        }
        let delta = o.cluster.p(50.0) as f64 - o.raw.p(50.0) as f64;
        println!(
            "| {} | {} | {} | {} | {} | {:+.1} | {} / {} | {} | {} / {} | {} → {} |",
            o.runtime,
            ms(percentile(&o.cluster.spawn, 50.0)),
            ms(percentile(&o.cluster.exec, 50.0)),
            ms(percentile(&o.raw.spawn, 50.0)),
            ms(percentile(&o.raw.exec, 50.0)),
            delta / 1000.0,
            o.cluster.total.len(),
            o.raw.total.len(),
            o.cluster.exec_retries,
            errors_cell(&o.cluster.errors),
            errors_cell(&o.raw.errors),
            o.load_before,
            o.load_after
        );
    }
    println!();
    for o in outcomes {
        println!(
            "- {} (image `{}`): raw = {}.",
            o.runtime, o.image, o.raw_what
        );
    }
    println!();

    // The control plane's fixed cost, as far as this run shows it.
    let mock = outcomes
        .iter()
        .find(|o| o.runtime == "mock" && !o.cluster.total.is_empty());
    if let Some((w50, w99)) = raft {
        println!(
            "One Raft write alone (lease grant, 1 client → leader): p50 {} ms, p99 {} ms. \
             A spawn is two Raft writes (placement + lease, then `running`) around the \
             worker RPC, behind one HTTP hop client → leader; an exec is one HTTP hop \
             client → replica plus one RPC hop replica → worker (its log entry goes \
             through Raft off the request path).",
            ms(w50),
            ms(w99)
        );
        println!();
    }
    if let Some(m) = mock {
        let fixed = m.cluster.p(50.0) as f64 - m.raw.p(50.0) as f64;
        println!(
            "Control-plane fixed cost, estimated from the mock (whose runtime work is a \
             directory, a keeper process and a host `sh`): cluster p50 {} ms − host process \
             p50 {} ms ≈ {:.1} ms per spawn + first exec (spawn {} ms, exec {} ms at p50). \
             A runtime meets the {TARGET_RATIO}× target at p50 only if its raw p50 is at \
             least {:.0} ms, i.e. {:.1} / ({TARGET_RATIO} − 1), with the runtime's own \
             extra calls (below) on top of that.",
            ms(m.cluster.p(50.0)),
            ms(m.raw.p(50.0)),
            fixed / 1000.0,
            ms(percentile(&m.cluster.spawn, 50.0)),
            ms(percentile(&m.cluster.exec, 50.0)),
            fixed / 1000.0 / (TARGET_RATIO - 1.0),
            fixed / 1000.0
        );
        println!();
    }
    println!(
        "Besides the control plane, the docker/gvisor runtime makes three Engine API \
         calls the raw run does not (image inspect before create, container inspect \
         before each exec, exec inspect for the exit code) and creates and chowns the \
         sandbox's workspace directory; proot's cluster path also starts a keeper process \
         and writes the sandbox's metadata and log. Cluster and raw runs alternate; \
         destroy/remove is not timed."
    );
}

async fn run() -> Result<()> {
    let s = settings()?;
    let started = Instant::now();
    let mut env = vec![
        (
            "Date (UTC)".to_string(),
            first_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ),
        ("CPU".to_string(), cpu_model()),
        (
            "Cores".to_string(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        (
            "Kernel".to_string(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|v| v.trim().to_owned())
                .unwrap_or_default(),
        ),
        (
            "StacyVM source".to_string(),
            first_line(
                "git",
                &[
                    "-C",
                    env!("CARGO_MANIFEST_DIR"),
                    "describe",
                    "--always",
                    "--dirty",
                ],
            ),
        ),
        ("Load average at start".to_string(), loadavg()),
    ];
    if s.quick {
        env.push((
            "Mode".to_string(),
            "BENCH_QUICK (smoke run, not for the docs)".to_string(),
        ));
    }

    // What is available here, and each runtime's image.
    let mut skipped: Vec<(String, String)> = Vec::new();
    let mut chosen: Vec<(String, String)> = Vec::new(); // (runtime, image)
    let wants_docker = s.runtimes.iter().any(|r| r == "docker" || r == "gvisor");
    let engine = if wants_docker {
        match Engine::connect().await {
            Ok(e) => Some(e),
            Err(e) => {
                for r in s
                    .runtimes
                    .iter()
                    .filter(|r| *r == "docker" || *r == "gvisor")
                {
                    skipped.push((r.clone(), format!("no Docker Engine: {e:#}")));
                }
                None
            }
        }
    } else {
        None
    };
    let docker_image =
        std::env::var("STACYVM_TEST_DOCKER_IMAGE").unwrap_or_else(|_| "busybox".into());
    let rootfs = std::env::var_os("STACYVM_TEST_ROOTFS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(e) = &engine {
        env.push(("dockerd".to_string(), e.server_version.clone()));
        env.push(("Docker socket".to_string(), e.socket.clone()));
    }
    for r in &s.runtimes {
        match r.as_str() {
            "docker" | "gvisor" => {
                let Some(e) = &engine else { continue };
                let oci = if r == "docker" { "runc" } else { "runsc" };
                let oci_runtimes = e.oci_runtimes().await.unwrap_or_default();
                if !oci_runtimes.iter().any(|o| o == oci) {
                    skipped.push((r.clone(), format!("dockerd has no OCI runtime {oci}")));
                } else if !e.has_image(&docker_image).await {
                    skipped.push((
                        r.clone(),
                        format!(
                            "image {docker_image} is not on this host (STACYVM_TEST_DOCKER_IMAGE)"
                        ),
                    ));
                } else {
                    chosen.push((r.clone(), docker_image.clone()));
                }
            }
            "proot" => {
                let version = first_line("proot", &["--version"]);
                if version == "unknown" {
                    skipped.push((r.clone(), "no `proot` binary on PATH".into()));
                } else if !rootfs.as_ref().is_some_and(|d| d.join("bin/sh").exists()) {
                    skipped.push((
                        r.clone(),
                        "STACYVM_TEST_ROOTFS unset or without /bin/sh".into(),
                    ));
                } else {
                    chosen.push((r.clone(), "busybox".into()));
                }
            }
            _ => chosen.push((r.clone(), "busybox".into())),
        }
    }
    if chosen.iter().any(|(r, _)| r == "gvisor") {
        env.push(("runsc".to_string(), first_line("runsc", &["--version"])));
    }
    if chosen.iter().any(|(r, _)| r == "proot") {
        let v = Command::new("proot")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                // The banner ends its logo with the version (`5.1.0`).
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "unknown".into());
        env.push(("proot".to_string(), v));
    }
    for (r, why) in &skipped {
        eprintln!("{r}: skipped: {why}");
    }
    if chosen.is_empty() {
        println!("No runtime to measure: every selected runtime was skipped.\n");
        print_report(&s, &[], &skipped, None, &env);
        return Ok(());
    }

    let names: Vec<String> = chosen.iter().map(|(r, _)| r.clone()).collect();
    let mut worker_extra: Vec<String> = Vec::new();
    if names.iter().any(|r| r == "docker" || r == "gvisor") {
        worker_extra.extend(["--docker-pull".to_string(), "never".to_string()]);
    }
    if names.iter().any(|r| r == "proot")
        && let Some(d) = &rootfs
    {
        worker_extra.push("--proot-image".into());
        worker_extra.push(format!("busybox={}", d.display()));
    }
    eprintln!(
        "starting 3 replicas + 1 worker offering {}",
        names.join(",")
    );
    let c = Cluster::start(&names, &worker_extra, &s).await?;
    let advertised = c.with_logs(c.wait_worker(&names).await)?;
    let scratch = match &s.base_dir {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .context("scratch dir")?;

    let raft = match raft_write_reference(&c, s.runs).await {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("  Raft write reference failed: {e:#}");
            None
        }
    };
    let mut outcomes = Vec::new();
    for (r, image) in &chosen {
        if !advertised.contains(r) {
            let why = "the worker did not advertise it (its health check failed; see worker.log)";
            eprintln!("{r}: skipped: {why}");
            skipped.push((r.clone(), why.into()));
            continue;
        }
        let raw = match r.as_str() {
            "docker" | "gvisor" => match &engine {
                Some(e) => Raw::Docker {
                    engine: e,
                    oci: if r == "docker" { "runc" } else { "runsc" },
                    image: image.clone(),
                },
                None => continue,
            },
            "proot" => match &rootfs {
                Some(d) => Raw::Proot { rootfs: d.clone() },
                None => continue,
            },
            _ => Raw::Host,
        };
        outcomes.push(bench_runtime(&c, r, image, &raw, &s, scratch.path()).await);
    }
    drop(c);
    if let Some(e) = &engine {
        let n = e.remove_leftovers().await;
        if n > 0 {
            eprintln!("removed {n} leftover raw containers");
        }
    }
    env.push(("Load average at end".to_string(), loadavg()));
    env.push((
        "Wall time".to_string(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    print_report(&s, &outcomes, &skipped, raft, &env);
    Ok(())
}

/// Removes raw containers left by an interrupted run (best effort).
async fn sweep_raw_containers() {
    if let Ok(e) = Engine::connect().await {
        let n = e.remove_leftovers().await;
        if n > 0 {
            eprintln!("removed {n} leftover raw containers");
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // reqwest is built without a default TLS crypto provider in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Dropping `run` (Ctrl-C) drops its cluster, which stops every child.
    let r = tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; every child process was stopped")),
    };
    if r.is_err() {
        sweep_raw_containers().await;
    }
    r
}
