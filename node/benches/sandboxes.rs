//! Benchmark, run by hand (not part of the test gate): sandbox spawn latency,
//! spawn throughput and replica memory of a real StacyVM cluster: three
//! `stacyvm serve` replicas and two `stacyvm worker`s with the mock runtime,
//! every one a separate process on 127.0.0.1 (free ports, temp directories).
//!
//! ```text
//! cargo bench -p stacyvm-node --bench sandboxes              # full run
//! BENCH_QUICK=1 cargo bench -p stacyvm-node --bench sandboxes # smoke run
//! ```
//!
//! Markdown tables go to stdout, progress to stderr. Every child process is
//! started here and stopped by its handle: workers get SIGINT first (they run
//! with `--destroy-on-exit`) and SIGKILL after a grace period, replicas
//! SIGKILL; on normal exit, error, panic or Ctrl-C alike.
//!
//! Three clusters, one after the other:
//!
//! 1. Workers with `STACYVM_MOCK_KEEPER=0` (lite mock sandboxes: no keeper
//!    process, Running while their directory exists). In order: one Raft
//!    write alone (`POST /api/v1/leases/acquire`, sequential, to the leader)
//!    as a reference; sequential spawns to the leader; sequential spawns to a
//!    follower (which forwards the HTTP request to the leader); 20 concurrent
//!    clients to the leader for a fixed window; destroying every sandbox so
//!    far (20 concurrent clients).
//! 2. A fresh lite cluster for memory (`BENCH_FILL_HEARTBEAT_MS`,
//!    `BENCH_FILL_LEASE_TTL_MS`): spawning (`BENCH_FILL_CLIENTS` concurrent
//!    clients) until `BENCH_LIVE` sandboxes are live (10,000 fit on a small
//!    machine only without keepers), then sampling every replica's `VmRSS`,
//!    then sequential spawns to the leader with that many live.
//! 3. Workers with the default mock (a keeper process per sandbox): sequential
//!    spawns to the leader and to a follower, each row's sandboxes destroyed
//!    after it. Skipped with `BENCH_KEEPER=0`.
//!
//! A spawn is `POST /api/v1/sandboxes {"image":"busybox"}` through the typed
//! client (`stacyvm-client`, one client and connection pool per simulated
//! client); its latency runs from sending the request to the parsed `201`
//! answer, which the server sends once the sandbox runs on a worker. A spawn
//! that fails is counted under its error code and retried after 10 ms.
//!
//! The replicas reconcile every 30 s (`BENCH_RECONCILE_INTERVAL`), so the
//! memory row includes whatever a reconcile pass over 10,000 sandboxes keeps
//! in memory. The benchmark checks that the workers really run what the
//! leader counts and says so otherwise.
//!
//! Knobs: `BENCH_SPAWNS` (measured sequential spawns per row),
//! `BENCH_DURATION_S` (concurrent window), `BENCH_LIVE` (live sandboxes for
//! the memory row), `BENCH_KEEPER=0` (skip the keeper cluster),
//! `BENCH_RECONCILE_INTERVAL` (default `30s`), `BENCH_DIR` (where the temp
//! directories go; default `$TMPDIR`), `BENCH_KEEP=1` (keep them, with the
//! children's logs). `STACYVM_LOG` is passed on to the children (their logs
//! are printed on failure).

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use stacyvm_api::SpawnRequest;
use stacyvm_client::{Client, ClientError};

const REPLICAS: usize = 3;
const WORKERS: usize = 2;
const CONCURRENCY: usize = 20;
/// How long the cluster may take to agree on a leader, and workers to register.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);
/// Pause after a failed operation before the next one.
const RETRY_SLEEP: Duration = Duration::from_millis(10);
/// Per-request read timeout of the benchmark's clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A phase gives up (with the children's logs) after this many failed operations.
const MAX_ERRORS: u64 = 200;

#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    /// Unmeasured sequential spawns before each measured sequential row.
    warmup: usize,
    /// Measured sequential operations per row.
    sequential: usize,
    /// Measured sequential spawns with `live` sandboxes live.
    sequential_at_live: usize,
    conc_warmup: Duration,
    window: Duration,
    live: usize,
    /// Wait after reaching `live` before sampling RSS (heartbeats renew every lease).
    settle: Duration,
    rss_samples: usize,
    rss_every: Duration,
    keeper_rows: bool,
    /// `--reconcile-interval` of the replicas.
    reconcile_interval: String,
    /// `--worker-heartbeat-ms` and `--lease-ttl-ms` of the memory cluster.
    fill_heartbeat_ms: u64,
    fill_lease_ttl_ms: u64,
    /// Concurrent clients while filling.
    fill_clients: usize,
    /// How long a worker may take to exit after SIGINT (destroying its sandboxes).
    worker_grace: Duration,
    base_dir: Option<PathBuf>,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn settings() -> Settings {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut s = if quick {
        Settings {
            quick,
            warmup: 10,
            sequential: 50,
            sequential_at_live: 30,
            conc_warmup: Duration::from_millis(500),
            window: Duration::from_secs(2),
            live: 1_000,
            settle: Duration::from_secs(2),
            rss_samples: 4,
            rss_every: Duration::from_millis(500),
            keeper_rows: true,
            reconcile_interval: String::new(),
            fill_heartbeat_ms: 3_000,
            fill_lease_ttl_ms: 30_000,
            fill_clients: CONCURRENCY,
            worker_grace: Duration::from_secs(60),
            base_dir: None,
        }
    } else {
        Settings {
            quick,
            warmup: 30,
            sequential: 300,
            sequential_at_live: 100,
            conc_warmup: Duration::from_secs(2),
            window: Duration::from_secs(10),
            live: 10_000,
            settle: Duration::from_secs(5),
            rss_samples: 20,
            rss_every: Duration::from_millis(500),
            keeper_rows: true,
            reconcile_interval: String::new(),
            fill_heartbeat_ms: 3_000,
            fill_lease_ttl_ms: 30_000,
            fill_clients: CONCURRENCY,
            worker_grace: Duration::from_secs(180),
            base_dir: None,
        }
    };
    if let Some(n) = env_u64("BENCH_SPAWNS") {
        s.sequential = usize::try_from(n).unwrap_or(s.sequential).max(1);
    }
    if let Some(n) = env_u64("BENCH_DURATION_S") {
        s.window = Duration::from_secs(n.max(1));
    }
    if let Some(n) = env_u64("BENCH_LIVE") {
        s.live = usize::try_from(n).unwrap_or(s.live);
    }
    if env_u64("BENCH_KEEPER") == Some(0) {
        s.keeper_rows = false;
    }
    if let Some(n) = env_u64("BENCH_FILL_HEARTBEAT_MS") {
        s.fill_heartbeat_ms = n.max(10);
    }
    if let Some(n) = env_u64("BENCH_FILL_LEASE_TTL_MS") {
        s.fill_lease_ttl_ms = n.max(1_000);
    }
    if let Some(n) = env_u64("BENCH_FILL_CLIENTS") {
        s.fill_clients = usize::try_from(n).unwrap_or(CONCURRENCY).max(1);
    }
    s.reconcile_interval = std::env::var("BENCH_RECONCILE_INTERVAL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "30s".into());
    s.base_dir = std::env::var_os("BENCH_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    s
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

/// One child process, stopped by its handle when dropped: SIGINT and up to
/// `grace` to exit when `grace` is set, then SIGKILL; reaped either way.
#[derive(Debug)]
struct Proc {
    name: String,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    grace: Option<Duration>,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().context("dup log file")?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {} ({})", self.program, self.name))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// SIGKILL and reap.
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
        }
        self.kill9();
    }
}

/// SIGINT to every process first, then waits up to `grace` for all of them.
fn interrupt_all(procs: &mut [Proc], grace: Duration) -> bool {
    for p in procs.iter_mut() {
        p.interrupt();
    }
    let until = Instant::now() + grace;
    loop {
        if procs.iter_mut().all(Proc::exited) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
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

/// What one replica says about the cluster.
#[derive(Debug, Clone)]
struct View {
    /// Index of the leader this replica knows.
    leader: Option<usize>,
    is_leader: bool,
    applied: u64,
    last: u64,
}

/// Three replicas and two workers on loopback.
#[derive(Debug)]
struct Cluster {
    // Field order is drop order: workers (SIGINT, they destroy their
    // sandboxes), then replicas, then the directory.
    workers: Vec<Proc>,
    replicas: Vec<Proc>,
    /// Replica API base URLs, index-aligned with `replicas`.
    urls: Vec<String>,
    worker_ids: Vec<String>,
    /// Each worker's mock state directory (one subdirectory per sandbox).
    worker_mock_dirs: Vec<PathBuf>,
    keeper: bool,
    worker_grace: Duration,
    http: reqwest::Client,
    /// `None` only once kept (`BENCH_KEEP=1`).
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.workers.is_empty() && !interrupt_all(&mut self.workers, self.worker_grace) {
            eprintln!(
                "  workers still running {:?} after SIGINT; killing them",
                self.worker_grace
            );
        }
        if std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1") {
            // Debugging: keep the logs and data directories.
            if let Some(dir) = self.dir.take() {
                eprintln!("  kept {}", dir.keep().display());
            }
        }
    }
}

impl Cluster {
    /// `serve_extra`: more `stacyvm serve` flags (control knobs).
    async fn start(keeper: bool, serve_extra: &[String], s: &Settings) -> Result<Cluster> {
        let dir = match &s.base_dir {
            Some(base) => tempfile::Builder::new()
                .prefix("stacyvm-bench-")
                .tempdir_in(base),
            None => tempfile::Builder::new().prefix("stacyvm-bench-").tempdir(),
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
            workers: Vec::new(),
            replicas: Vec::new(),
            urls: Vec::new(),
            worker_ids: Vec::new(),
            worker_mock_dirs: Vec::new(),
            keeper,
            worker_grace: s.worker_grace,
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
                root.join(format!("data-{id}")).display().to_string(),
                "--raft-addr".into(),
                raft.clone(),
                "--api-addr".into(),
                api.clone(),
                "--certs".into(),
                certs.display().to_string(),
                "--reconcile-interval".into(),
                s.reconcile_interval.clone(),
                "--bootstrap".into(),
            ];
            args.extend(serve_extra.iter().cloned());
            args.extend(peers.iter().cloned());
            let mut p = Proc {
                name: format!("replica {id}"),
                program: stacyvm_bin().to_owned(),
                args,
                env: Vec::new(),
                log: root.join(format!("replica-{id}.log")),
                grace: None,
                child: None,
            };
            p.start()?;
            c.replicas.push(p);
            c.urls.push(format!("http://{api}"));
        }
        c.wait_healthy().await?;

        let bootstrap: Vec<&str> = addrs.iter().map(|(_, api)| api.as_str()).collect();
        let bootstrap = bootstrap.join(",");
        let tag = if keeper { "keeper" } else { "lite" };
        for i in 1..=WORKERS {
            let id = format!("bench-{tag}-{i}");
            let state = root.join(format!("worker-{i}"));
            let args: Vec<String> = vec![
                "worker".into(),
                "--id".into(),
                id.clone(),
                "--bootstrap".into(),
                bootstrap.clone(),
                "--rpc-addr".into(),
                format!("127.0.0.1:{}", free_port()?),
                "--state-dir".into(),
                state.display().to_string(),
                "--runtimes".into(),
                "mock".into(),
                "--destroy-on-exit".into(),
            ];
            let mut p = Proc {
                name: format!("worker {id}"),
                program: stacyvm_bin().to_owned(),
                args,
                env: vec![(
                    "STACYVM_MOCK_KEEPER".to_string(),
                    if keeper { "1" } else { "0" }.to_string(),
                )],
                log: root.join(format!("worker-{i}.log")),
                grace: Some(s.worker_grace),
                child: None,
            };
            p.start()?;
            c.workers.push(p);
            c.worker_ids.push(id);
            c.worker_mock_dirs.push(state.join("mock"));
        }
        c.wait_workers_online().await?;
        Ok(c)
    }

    fn dump_logs(&self) -> String {
        self.replicas
            .iter()
            .chain(&self.workers)
            .map(|p| format!("--- {} ({}) ---\n{}", p.name, p.log.display(), p.tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Adds the children's logs to an error.
    fn with_logs<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| anyhow!("{e:#}\n{}", self.dump_logs()))
    }

    fn replica_pids(&self) -> Vec<u32> {
        self.replicas.iter().filter_map(Proc::pid).collect()
    }

    /// Replica `i`'s view, or `None` if it does not answer (or is not ready).
    async fn view(&self, i: usize) -> Option<View> {
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
        Some(View {
            leader,
            is_leader: s["state"].as_str() == Some("leader"),
            applied: s["last_applied_index"].as_u64().unwrap_or(0),
            last: s["last_log_index"].as_u64().unwrap_or(0),
        })
    }

    /// Waits until every replica answers, all agree on one leader that says
    /// it leads, and every replica has applied what that leader had logged
    /// when they first agreed. Returns the leader's index.
    async fn wait_healthy(&self) -> Result<usize> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let mut target: Option<u64> = None;
        loop {
            let mut views = Vec::new();
            for i in 0..self.replicas.len() {
                views.push(self.view(i).await);
            }
            if views.iter().all(Option::is_some) {
                let views: Vec<View> = views.iter().flatten().cloned().collect();
                let first = views[0].leader;
                if let Some(l) = first
                    && views.iter().all(|v| v.leader == first)
                    && views.get(l).is_some_and(|v| v.is_leader)
                {
                    let t = *target.get_or_insert(views[l].last);
                    if views.iter().all(|v| v.applied >= t) {
                        return Ok(l);
                    }
                }
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

    async fn wait_workers_online(&self) -> Result<()> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let client = api_client(&self.urls[0])?;
        loop {
            let listed = client.workers().await;
            if let Ok(ws) = &listed
                && self.worker_ids.iter().all(|id| {
                    ws.iter()
                        .any(|w| &w.id == id && w.status == "online" && !w.runtimes.is_empty())
                })
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "workers not online within {HEALTHY_WITHIN:?}: {listed:?}\n{}",
                    self.dump_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader's `stacyvm_sandboxes_active` gauge (sandboxes holding a slot).
    /// Only the leader exports it; every replica is asked, through an election.
    async fn active_sandboxes(&self) -> Result<u64> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            for url in &self.urls {
                let Ok(resp) = self.http.get(format!("{url}/metrics")).send().await else {
                    continue;
                };
                let Ok(text) = resp.text().await else {
                    continue;
                };
                if let Some(n) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("stacyvm_sandboxes_active "))
                    .and_then(|v| v.trim().parse().ok())
                {
                    return Ok(n);
                }
            }
            if Instant::now() >= deadline {
                bail!("no replica exported stacyvm_sandboxes_active for {HEALTHY_WITHIN:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The current leader (after waiting for a healthy cluster) and its term.
    async fn leader(&self) -> Result<(usize, u64)> {
        let l = self.wait_healthy().await?;
        let s: Value = self
            .http
            .get(format!("{}/api/v1/cluster/status", self.urls[l]))
            .send()
            .await
            .context("cluster status")?
            .json()
            .await
            .context("cluster status JSON")?;
        Ok((l, s["term"].as_u64().unwrap_or(0)))
    }

    /// Sandbox directories on the workers' disks right now.
    fn sandbox_dirs(&self) -> usize {
        self.worker_mock_dirs
            .iter()
            .map(|d| {
                std::fs::read_dir(d)
                    .map(|e| e.flatten().count())
                    .unwrap_or(0)
            })
            .sum()
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

/// Logs the first few full error messages of a run.
fn note_error(seen: &AtomicUsize, what: &str, e: &str) {
    if seen.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("  {what} failed: {e}");
    }
}

static ERRORS_SHOWN: AtomicUsize = AtomicUsize::new(0);

fn spawn_request() -> SpawnRequest {
    SpawnRequest {
        image: "busybox".into(),
        ..SpawnRequest::default()
    }
}

/// One spawn; the new sandbox's ID, or an error class.
async fn spawn_one(c: &Client, req: &SpawnRequest) -> Result<String, String> {
    match c.spawn(req).await {
        Ok(sb) if sb.state == "running" => Ok(sb.id),
        Ok(sb) => Err(format!("answered state {}", sb.state)),
        Err(e) => {
            note_error(&ERRORS_SHOWN, "spawn", &e.to_string());
            Err(class(&e))
        }
    }
}

async fn destroy_one(c: &Client, id: &str) -> Result<(), String> {
    c.destroy(id).await.map(|_| ()).map_err(|e| {
        note_error(&ERRORS_SHOWN, "destroy", &e.to_string());
        class(&e)
    })
}

/// One lease grant (a single Raft write) for a fresh resource.
async fn acquire_one(http: &reqwest::Client, base: &str, n: usize) -> Result<(), String> {
    let body = json!({
        "resource_id": format!("bench-lease-{n}"),
        "resource_type": "bench",
        "holder_id": "bench",
        "ttl_ms": 3_600_000,
    });
    let r = http
        .post(format!("{base}/api/v1/leases/acquire"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status().as_u16()));
    }
    r.bytes().await.map_err(|e| format!("transport: {e}"))?;
    Ok(())
}

/// Process CPU use during a window, from /proc, in cores.
#[derive(Debug, Clone, Copy, Default)]
struct CpuShare {
    leader: f64,
    /// Both followers together.
    followers: f64,
    /// Both workers together.
    workers: f64,
    /// This benchmark process (the clients).
    client: f64,
}

/// CPU ticks of (leader, followers, workers, this process) right now.
fn cpu_split(c: &Cluster, leader: usize) -> [u64; 4] {
    let mut out = [0; 4];
    for (i, p) in c.replicas.iter().enumerate() {
        let t = p.pid().map_or(0, cpu_ticks);
        if i == leader {
            out[0] += t;
        } else {
            out[1] += t;
        }
    }
    out[2] = cpu_of(&c.workers.iter().filter_map(Proc::pid).collect::<Vec<_>>());
    out[3] = cpu_ticks(std::process::id());
    out
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which ends at the last ')': state is
    // field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn cpu_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

fn clk_tck() -> f64 {
    first_line("getconf", &["CLK_TCK"])
        .trim()
        .parse()
        .unwrap_or(100.0)
}

/// VmRSS of a process in KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// One row of the latency table.
#[derive(Debug, Default, Clone)]
struct Row {
    what: String,
    keeper: bool,
    /// Latencies of the counted operations, microseconds, sorted.
    lat_us: Vec<u64>,
    /// Operations per second: counted operations over the measured time.
    rate: f64,
    errors: BTreeMap<String, u64>,
    cpu: Option<CpuShare>,
}

impl Row {
    fn p(&self, pct: f64) -> u64 {
        percentile(&self.lat_us, pct)
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `warmup` unmeasured then `n` measured operations, one at a time, from one
/// client. `op` gets a sequence number and returns a sandbox ID to remember
/// (spawns) or `None`.
async fn sequential<F, Fut>(
    what: &str,
    keeper: bool,
    warmup: usize,
    n: usize,
    ids: &mut Vec<String>,
    mut op: F,
) -> Result<Row>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, String>>,
{
    let mut row = Row {
        what: what.to_string(),
        keeper,
        ..Row::default()
    };
    let mut done = 0;
    let mut seq = 0;
    let mut busy = Duration::ZERO;
    let mut failed = 0u64;
    while done < warmup + n {
        seq += 1;
        let t0 = Instant::now();
        let r = op(seq).await;
        let took = t0.elapsed();
        match r {
            Ok(id) => {
                ids.extend(id);
                if done >= warmup {
                    row.lat_us.push(micros(took));
                    busy += took;
                }
                done += 1;
            }
            Err(e) => {
                *row.errors.entry(e).or_default() += 1;
                failed += 1;
                if failed > MAX_ERRORS {
                    bail!("{what}: more than {MAX_ERRORS} failures: {:?}", row.errors);
                }
                tokio::time::sleep(RETRY_SLEEP).await;
            }
        }
    }
    row.lat_us.sort_unstable();
    row.rate = row.lat_us.len() as f64 / busy.as_secs_f64().max(1e-9);
    Ok(row)
}

/// `CONCURRENCY` clients spawning through `base` for `warmup` then `window`.
/// Latency: spawns that started and finished inside the window. Rate: spawns
/// answered inside the window, over its length.
async fn concurrent_spawns(
    c: &Cluster,
    leader: usize,
    s: &Settings,
    ids: &mut Vec<String>,
) -> Result<Row> {
    let base = c.urls[leader].as_str();
    let start = Instant::now() + s.conc_warmup;
    let end = start + s.window;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let client = api_client(base)?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let req = spawn_request();
            let mut lat = Vec::new();
            let mut in_window = 0usize;
            let mut ids = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end || stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = spawn_one(&client, &req).await;
                let t1 = Instant::now();
                match r {
                    Ok(id) => {
                        ids.push(id);
                        if t1 >= start && t1 <= end {
                            in_window += 1;
                        }
                        if t0 >= start && t1 <= end {
                            lat.push(micros(t1 - t0));
                        }
                    }
                    Err(e) => {
                        *errors.entry(e).or_default() += 1;
                        if errors.values().sum::<u64>() > MAX_ERRORS {
                            stop.store(true, Ordering::Relaxed);
                        }
                        tokio::time::sleep(RETRY_SLEEP).await;
                    }
                }
            }
            (lat, in_window, ids, errors)
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let t0 = cpu_split(c, leader);
    tokio::time::sleep_until(end.into()).await;
    let t1 = cpu_split(c, leader);
    let per_core = clk_tck() * s.window.as_secs_f64();
    let cores = |i: usize| t1[i].saturating_sub(t0[i]) as f64 / per_core;
    let mut row = Row {
        what: format!(
            "{CONCURRENCY} concurrent clients → leader, {} s window",
            s.window.as_secs_f64()
        ),
        keeper: c.keeper,
        cpu: Some(CpuShare {
            leader: cores(0),
            followers: cores(1),
            workers: cores(2),
            client: cores(3),
        }),
        ..Row::default()
    };
    let mut answered = 0;
    for t in tasks {
        let (lat, in_window, task_ids, errors) = t.await.context("spawn task panicked")?;
        row.lat_us.extend(lat);
        answered += in_window;
        ids.extend(task_ids);
        for (k, v) in errors {
            *row.errors.entry(k).or_default() += v;
        }
    }
    if stop.load(Ordering::Relaxed) {
        bail!("concurrent spawns: too many failures: {:?}", row.errors);
    }
    row.lat_us.sort_unstable();
    row.rate = answered as f64 / s.window.as_secs_f64();
    Ok(row)
}

/// Destroys `ids` with `CONCURRENCY` clients; every destroy is measured.
async fn destroy_all(base: &str, keeper: bool, ids: Vec<String>) -> Result<Row> {
    let total = ids.len();
    let queue = Arc::new(std::sync::Mutex::new(ids));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let client = api_client(base)?;
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(id) = next else {
                    break;
                };
                let t0 = Instant::now();
                match destroy_one(&client, &id).await {
                    Ok(()) => lat.push(micros(t0.elapsed())),
                    // Not retried: a destroy that failed once is reported.
                    Err(e) => *errors.entry(e).or_default() += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut row = Row {
        what: format!("Destroy ({CONCURRENCY} concurrent clients → leader, {total} sandboxes)"),
        keeper,
        ..Row::default()
    };
    for t in tasks {
        let (lat, errors) = t.await.context("destroy task panicked")?;
        row.lat_us.extend(lat);
        for (k, v) in errors {
            *row.errors.entry(k).or_default() += v;
        }
    }
    row.lat_us.sort_unstable();
    row.rate = row.lat_us.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(row)
}

/// Spawns through `base` with `clients` clients until `target` more spawns
/// succeeded. Returns the time taken and the failures.
async fn fill(
    base: &str,
    target: usize,
    clients: usize,
) -> Result<(Duration, BTreeMap<String, u64>)> {
    let claimed = Arc::new(AtomicUsize::new(0));
    let succeeded = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = api_client(base)?;
        let (claimed, succeeded, stop) = (claimed.clone(), succeeded.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let req = spawn_request();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                if claimed.fetch_add(1, Ordering::SeqCst) >= target {
                    claimed.fetch_sub(1, Ordering::SeqCst);
                    break;
                }
                match spawn_one(&client, &req).await {
                    Ok(_) => {
                        succeeded.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        claimed.fetch_sub(1, Ordering::SeqCst);
                        *errors.entry(e).or_default() += 1;
                        if errors.values().sum::<u64>() > MAX_ERRORS {
                            stop.store(true, Ordering::Relaxed);
                        }
                        tokio::time::sleep(RETRY_SLEEP).await;
                    }
                }
            }
            errors
        }));
    }
    let progress = {
        let succeeded = succeeded.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = succeeded.load(Ordering::Relaxed);
                eprintln!(
                    "  {now}/{target} spawned, {:.0}/s over the last 5 s",
                    (now - last) as f64 / 5.0
                );
                last = now;
            }
        })
    };
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.context("fill task panicked")? {
            *errors.entry(k).or_default() += v;
        }
    }
    progress.abort();
    let took = started.elapsed();
    if stop.load(Ordering::Relaxed) {
        bail!(
            "filling: too many failures after {} spawns: {errors:?}",
            succeeded.load(Ordering::Relaxed)
        );
    }
    Ok((took, errors))
}

/// Per-replica memory figures, KiB.
#[derive(Debug, Clone, Default)]
struct Memory {
    leader: usize,
    /// VmRSS of the fresh cluster (workers registered, 0 live), per replica.
    at_start: Vec<u64>,
    /// Peak VmRSS over the samples with `live` sandboxes, per replica.
    at_live: Vec<u64>,
    /// Peak VmRSS of each worker over the same samples.
    workers_at_live: Vec<u64>,
    live: u64,
    /// Sandbox directories on the workers right after filling, and after sampling.
    dirs: usize,
    dirs_after: usize,
    fill_time: Duration,
    filled: usize,
    fill_errors: BTreeMap<String, u64>,
}

fn rss_all(pids: &[u32]) -> Vec<u64> {
    pids.iter().map(|p| vm_rss_kib(*p).unwrap_or(0)).collect()
}

/// Everything measured on one cluster.
#[derive(Debug, Default)]
struct Results {
    rows: Vec<Row>,
    memory: Option<Memory>,
    /// Leader changes seen (there should be none).
    notes: Vec<String>,
}

/// The lite cluster with default control flags: the latency rows.
async fn bench_lite(s: &Settings, out: &mut Results) -> Result<()> {
    eprintln!("lite mock (STACYVM_MOCK_KEEPER=0): starting 3 replicas + 2 workers");
    let c = Cluster::start(false, &[], s).await?;
    let r = bench_lite_on(&c, s, out).await;
    c.with_logs(r)?;
    eprintln!(
        "lite cluster: stopping (SIGINT to the workers, which destroy {} sandboxes)",
        c.sandbox_dirs()
    );
    drop(c);
    Ok(())
}

/// A fresh lite cluster for the memory figures (see `Settings::fill_heartbeat_ms`).
async fn bench_memory(s: &Settings, out: &mut Results) -> Result<()> {
    let extra = vec![
        "--worker-heartbeat-ms".to_string(),
        s.fill_heartbeat_ms.to_string(),
        "--lease-ttl-ms".to_string(),
        s.fill_lease_ttl_ms.to_string(),
    ];
    eprintln!(
        "lite mock, memory: starting 3 replicas ({}) + 2 workers",
        extra.join(" ")
    );
    let c = Cluster::start(false, &extra, s).await?;
    let r = bench_memory_on(&c, s, out).await;
    c.with_logs(r)?;
    eprintln!(
        "memory cluster: stopping (SIGINT to the workers, which destroy {} sandboxes)",
        c.sandbox_dirs()
    );
    drop(c);
    Ok(())
}

/// Tracks the leader across phases; an election between phases is noted.
#[derive(Debug)]
struct LeaderWatch {
    leader: usize,
    term: u64,
    phase: String,
}

impl LeaderWatch {
    async fn new(c: &Cluster) -> Result<LeaderWatch> {
        let (leader, term) = c.leader().await?;
        Ok(LeaderWatch {
            leader,
            term,
            phase: "the start".into(),
        })
    }

    /// The leader for `phase` (waiting for a healthy cluster first).
    async fn before(&mut self, c: &Cluster, phase: &str, out: &mut Results) -> Result<usize> {
        let (leader, term) = c.leader().await?;
        if (leader, term) != (self.leader, self.term) {
            out.notes.push(format!(
                "Election between {} and {phase}: leader replica {} (term {}) → replica {} (term {term}).",
                self.phase,
                self.leader + 1,
                self.term,
                leader + 1
            ));
        }
        self.leader = leader;
        self.term = term;
        self.phase = phase.to_string();
        Ok(leader)
    }
}

async fn bench_lite_on(c: &Cluster, s: &Settings, out: &mut Results) -> Result<()> {
    let mut watch = LeaderWatch::new(c).await?;
    let mut ids = Vec::new();

    let what = "Raft write alone (lease grant), 1 client → leader";
    let leader = watch.before(c, what, out).await?;
    eprintln!("  {what}: {} + {} warm-up", s.sequential, s.warmup);
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let (http_ref, url_ref) = (&http, c.urls[leader].as_str());
    let row = sequential(
        what,
        false,
        s.warmup,
        s.sequential,
        &mut ids,
        move |n| async move { acquire_one(http_ref, url_ref, n).await.map(|()| None) },
    )
    .await?;
    print_row_progress(&row);
    out.rows.push(row);

    for (what, hop) in [
        ("Spawn, 1 client → leader", 0),
        ("Spawn, 1 client → follower (forwarded)", 1),
    ] {
        let leader = watch.before(c, what, out).await?;
        eprintln!("  {what}: {} + {} warm-up", s.sequential, s.warmup);
        let client = api_client(&c.urls[(leader + hop) % REPLICAS])?;
        let req = spawn_request();
        let (client, req) = (&client, &req);
        let row = sequential(
            what,
            false,
            s.warmup,
            s.sequential,
            &mut ids,
            move |_| async move { spawn_one(client, req).await.map(Some) },
        )
        .await?;
        print_row_progress(&row);
        out.rows.push(row);
    }

    let leader = watch.before(c, "the concurrent spawns", out).await?;
    eprintln!(
        "  {CONCURRENCY} concurrent clients → leader: {:?} warm-up + {:?}",
        s.conc_warmup, s.window
    );
    let row = concurrent_spawns(c, leader, s, &mut ids).await?;
    print_row_progress(&row);
    out.rows.push(row);

    let leader = watch.before(c, "the destroys", out).await?;
    eprintln!("  destroying the {} sandboxes spawned so far", ids.len());
    let row = destroy_all(&c.urls[leader], false, std::mem::take(&mut ids)).await?;
    print_row_progress(&row);
    out.rows.push(row);
    watch.before(c, "the end of the latency run", out).await?;
    Ok(())
}

async fn bench_memory_on(c: &Cluster, s: &Settings, out: &mut Results) -> Result<()> {
    let mut watch = LeaderWatch::new(c).await?;
    let mut ids = Vec::new();
    let leader = watch.before(c, "filling", out).await?;
    let at_start = rss_all(&c.replica_pids());
    let active = c.active_sandboxes().await?;
    let target = s.live.saturating_sub(usize::try_from(active).unwrap_or(0));
    eprintln!(
        "  filling to {} live ({active} live now, {target} to spawn, {} clients)",
        s.live, s.fill_clients
    );
    let (fill_time, fill_errors) = fill(&c.urls[leader], target, s.fill_clients).await?;
    let live = c.active_sandboxes().await?;
    let dirs = c.sandbox_dirs();
    eprintln!(
        "  {live} live (leader's gauge), {dirs} sandbox directories on the workers, after {:.1} s; settling {:?}",
        fill_time.as_secs_f64(),
        s.settle
    );
    if live < s.live as u64 || dirs < s.live {
        bail!(
            "{live} sandboxes live (leader's gauge) and {dirs} on the workers after filling to {}",
            s.live
        );
    }
    tokio::time::sleep(s.settle).await;
    let leader = watch.before(c, "the memory samples", out).await?;
    let replica_pids = c.replica_pids();
    let worker_pids: Vec<u32> = c.workers.iter().filter_map(Proc::pid).collect();
    let mut at_live = vec![0; replica_pids.len()];
    let mut workers_at_live = vec![0; worker_pids.len()];
    for _ in 0..s.rss_samples {
        for (peak, now) in at_live.iter_mut().zip(rss_all(&replica_pids)) {
            *peak = (*peak).max(now);
        }
        for (peak, now) in workers_at_live.iter_mut().zip(rss_all(&worker_pids)) {
            *peak = (*peak).max(now);
        }
        tokio::time::sleep(s.rss_every).await;
    }
    let dirs_after = c.sandbox_dirs();
    if dirs_after < s.live {
        out.notes.push(format!(
            "The workers ran only {dirs_after} sandboxes after the memory samples while the \
             leader counted {live} live."
        ));
    }
    eprintln!(
        "  VmRSS with {live} live: replicas {:?} KiB (leader is #{}), workers {:?} KiB",
        at_live,
        leader + 1,
        workers_at_live
    );
    out.memory = Some(Memory {
        leader,
        at_start,
        at_live,
        workers_at_live,
        live,
        dirs,
        dirs_after,
        fill_time,
        filled: target,
        fill_errors,
    });

    let what = format!("Spawn, 1 client → leader, {live} live (memory cluster)");
    let leader = watch.before(c, &what, out).await?;
    eprintln!("  {what}: {}", s.sequential_at_live);
    let client = api_client(&c.urls[leader])?;
    let req = spawn_request();
    let (client, req) = (&client, &req);
    let row = sequential(
        &what,
        false,
        0,
        s.sequential_at_live,
        &mut ids,
        move |_| async move { spawn_one(client, req).await.map(Some) },
    )
    .await?;
    print_row_progress(&row);
    out.rows.push(row);
    watch.before(c, "the end of the memory run", out).await?;
    Ok(())
}

/// The keeper cluster: sequential rows with the default mock.
async fn bench_keeper(s: &Settings, out: &mut Results) -> Result<()> {
    eprintln!("default mock (a keeper process per sandbox): starting 3 replicas + 2 workers");
    let c = Cluster::start(true, &[], s).await?;
    let r = bench_keeper_on(&c, s, out).await;
    c.with_logs(r)?;
    drop(c);
    Ok(())
}

async fn bench_keeper_on(c: &Cluster, s: &Settings, out: &mut Results) -> Result<()> {
    let mut watch = LeaderWatch::new(c).await?;
    for (what, hop) in [
        ("Spawn, 1 client → leader", 0),
        ("Spawn, 1 client → follower (forwarded)", 1),
    ] {
        let leader = watch.before(c, what, out).await?;
        eprintln!(
            "  {what} (keeper on): {} + {} warm-up",
            s.sequential, s.warmup
        );
        let client = api_client(&c.urls[(leader + hop) % REPLICAS])?;
        let req = spawn_request();
        let mut ids = Vec::new();
        let (client, req) = (&client, &req);
        let row = sequential(
            what,
            true,
            s.warmup,
            s.sequential,
            &mut ids,
            move |_| async move { spawn_one(client, req).await.map(Some) },
        )
        .await?;
        print_row_progress(&row);
        out.rows.push(row);
        // Keepers are host processes: destroy them before the next row.
        let leader = watch.before(c, "the keeper destroys", out).await?;
        let row = destroy_all(&c.urls[leader], true, ids).await?;
        if !row.errors.is_empty() {
            out.notes.push(format!(
                "Destroying the keeper sandboxes failed for some: {}",
                errors_cell(&row.errors)
            ));
        }
    }
    watch.before(c, "the end of the keeper run", out).await?;
    Ok(())
}

fn print_row_progress(r: &Row) {
    eprintln!(
        "    p50 {} ms, p99 {} ms, max {} ms, {:.0}/s, errors {:?}",
        ms_us(r.p(50.0)),
        ms_us(r.p(99.0)),
        ms_us(r.lat_us.last().copied().unwrap_or(0)),
        r.rate,
        r.errors
    );
}

fn ms_us(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn mb(kib: u64) -> String {
    format!("{:.1}", kib as f64 * 1024.0 / 1e6)
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
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
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

/// p50 / p99 of a 4 KiB overwrite followed by fdatasync where the clusters
/// keep their data, as context for the per-write latencies.
fn fsync_probe(s: &Settings) -> Result<(Duration, Duration)> {
    use std::io::{Seek, Write};
    let dir = match &s.base_dir {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .context("temp dir")?;
    let mut f = std::fs::File::create(dir.path().join("probe")).context("probe file")?;
    let block = [7u8; 4096];
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.seek(std::io::SeekFrom::Start(0)).context("seek")?;
        f.write_all(&block).context("write")?;
        f.sync_data().context("fdatasync")?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    Ok((percentile(&times, 50.0), percentile(&times, 99.0)))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn find<'a>(rows: &'a [Row], what: &str, keeper: bool) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.keeper == keeper && r.what.starts_with(what))
}

fn print_report(s: &Settings, res: &Results, env: &[(String, String)]) {
    println!("### Environment\n");
    println!("| | |\n|---|---|");
    for (k, v) in env {
        println!("| {k} | {v} |");
    }
    println!();

    println!("### Spawn latency and throughput (3 replicas + 2 mock workers on 127.0.0.1)\n");
    println!(
        "| Operation | Mock keeper | Counted | p50 (ms) | p99 (ms) | Max (ms) | Ops/s | Errors | CPU: leader / followers / workers / client (cores) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|---:|");
    for r in &res.rows {
        let cpu = r
            .cpu
            .map(|c| {
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2}",
                    c.leader, c.followers, c.workers, c.client
                )
            })
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {cpu} |",
            r.what,
            if r.keeper { "on" } else { "off (lite)" },
            r.lat_us.len(),
            ms_us(r.p(50.0)),
            ms_us(r.p(99.0)),
            ms_us(r.lat_us.last().copied().unwrap_or(0)),
            r.rate,
            errors_cell(&r.errors)
        );
    }
    println!();

    if let Some(m) = &res.memory {
        println!(
            "### Replica memory with {} live sandboxes (VmRSS, MB = 10⁶ bytes)\n",
            m.live
        );
        println!(
            "| Replica | Role | Fresh cluster, 0 live | With {} live (peak of {} samples) |",
            m.live, s.rss_samples
        );
        println!("|---|---|---:|---:|");
        for i in 0..m.at_live.len() {
            println!(
                "| {} | {} | {} | {} |",
                i + 1,
                if i == m.leader { "leader" } else { "follower" },
                mb(m.at_start.get(i).copied().unwrap_or(0)),
                mb(m.at_live[i])
            );
        }
        println!();
        println!("| | |\n|---|---|");
        println!(
            "| Time to reach {} live ({} spawns, {} clients → leader) | {:.1} s ({:.0} spawns/s) |",
            m.live,
            m.filled,
            s.fill_clients,
            m.fill_time.as_secs_f64(),
            m.filled as f64 / m.fill_time.as_secs_f64().max(1e-9)
        );
        println!(
            "| Spawn failures while filling | {} |",
            errors_cell(&m.fill_errors)
        );
        println!(
            "| Sandbox directories on the workers, after filling / after sampling | {} / {} |",
            m.dirs, m.dirs_after
        );
        println!(
            "| Worker VmRSS with {} live (peak, each) | {} MB |",
            m.live,
            m.workers_at_live
                .iter()
                .map(|k| mb(*k))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        println!();
    }

    println!("### Targets (reported, not asserted)\n");
    println!("| Target | Result | |\n|---|---|---|");
    let seq = |what: &str, keeper: bool| find(&res.rows, what, keeper);
    for keeper in [false, true] {
        let mode = if keeper { "keeper on" } else { "lite" };
        for (what, label) in [
            ("Spawn, 1 client → leader", "leader"),
            ("Spawn, 1 client → follower", "follower"),
        ] {
            if let Some(r) = seq(what, keeper).filter(|r| !r.what.contains(" live")) {
                println!(
                    "| Spawn p50 ≤ 5 ms, 1 client → {label} ({mode}) | {} ms | {} |",
                    ms_us(r.p(50.0)),
                    verdict(r.p(50.0) <= 5_000)
                );
                println!(
                    "| Spawn p99 ≤ 20 ms, 1 client → {label} ({mode}) | {} ms | {} |",
                    ms_us(r.p(99.0)),
                    verdict(r.p(99.0) <= 20_000)
                );
            }
        }
    }
    if let (Some(one), Some(many)) = (
        seq("Spawn, 1 client → leader", false),
        find(&res.rows, &format!("{CONCURRENCY} concurrent"), false),
    ) {
        let ratio = many.p(50.0) as f64 / one.p(50.0).max(1) as f64;
        println!(
            "| {CONCURRENCY}-concurrent p50 ≤ 2× single-client p50 (lite) | {} ms vs {} ms = {ratio:.2}× | {} |",
            ms_us(many.p(50.0)),
            ms_us(one.p(50.0)),
            verdict(ratio <= 2.0)
        );
        println!(
            "| ≥ 500 spawns/s, {CONCURRENCY} concurrent clients (lite) | {:.0} spawns/s | {} |",
            many.rate,
            verdict(many.rate >= 500.0)
        );
    }
    if let Some(m) = &res.memory {
        let max = m.at_live.iter().copied().max().unwrap_or(0);
        let leader = m.at_live.get(m.leader).copied().unwrap_or(0);
        println!(
            "| Replica RSS ≤ 150 MB with {} live | leader {} MB, max {} MB | {} |",
            m.live,
            mb(leader),
            mb(max),
            verdict(max as f64 * 1024.0 <= 150e6)
        );
    }
    println!();
    println!(
        "Spawn = `POST /api/v1/sandboxes {{\"image\":\"busybox\"}}` through `stacyvm-client` (one \
         client and HTTP/1.1 connection pool per simulated client), timed from sending to the \
         parsed `201` (the sandbox runs on a worker by then); the leader and the follower are \
         addressed directly (a follower forwards the HTTP request to the leader). Sequential \
         rows: {} unmeasured spawns first; Ops/s = 1 / mean latency. Concurrent row: {} clients, \
         {} s warm-up; latency of spawns that started and ended in the window, Ops/s = spawns \
         answered in the window / its length; CPU = CPU time of the leader, the 2 followers, the \
         2 workers and this benchmark process in the window / its length (2 cores in all). The lease-grant \
         row is one Raft write (`POST /api/v1/leases/acquire`), for reference: a spawn is two \
         Raft writes (sandbox + lease; placement + running) around the worker RPC. Mock keeper \
         off (lite, `STACYVM_MOCK_KEEPER=0` on the workers: no `sh`+`sleep` per sandbox, \
         Running while its directory exists) for every row of the first cluster, including \
         the memory figures; on (the default mock) for the rows so marked, from a second \
         cluster whose sandboxes are destroyed after each row. Filling: {} clients → leader \
         after destroying every earlier sandbox; live = the leader's `stacyvm_sandboxes_active` \
         gauge; VmRSS from `/proc/<pid>/status`, sampled every {} ms for {} samples after \
         {} s of settling (heartbeats carrying every lease). Replicas: SQLite, Raft log \
         in sled flushed before every acknowledgement, default flags except `--reconcile-interval {}` (see the notes).",
        s.warmup,
        CONCURRENCY,
        s.conc_warmup.as_secs_f64(),
        CONCURRENCY,
        s.rss_every.as_millis(),
        s.rss_samples,
        s.settle.as_secs_f64(),
        s.reconcile_interval
    );
    for n in &res.notes {
        println!();
        println!("{n}");
    }
}

async fn run() -> Result<()> {
    let s = settings();
    let started = Instant::now();
    let mut env = vec![
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
    let (f50, f99) = fsync_probe(&s)?;
    env.push((
        "4 KiB write + fdatasync in the data directory, p50 / p99".to_string(),
        format!(
            "{:.2} / {:.2} ms",
            f50.as_secs_f64() * 1000.0,
            f99.as_secs_f64() * 1000.0
        ),
    ));
    if s.quick {
        env.push((
            "Mode".to_string(),
            "BENCH_QUICK (smoke run, not for the docs)".to_string(),
        ));
    }
    let mut res = Results::default();
    bench_lite(&s, &mut res).await?;
    bench_memory(&s, &mut res).await?;
    if s.keeper_rows
        && let Err(e) = bench_keeper(&s, &mut res).await
    {
        eprintln!("keeper run failed: {e:#}");
        res.notes.push(format!(
            "The keeper-on run failed: {}",
            e.to_string().lines().next().unwrap_or("")
        ));
    }
    env.push(("Load average at end".to_string(), loadavg()));
    env.push((
        "Wall time".to_string(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    print_report(&s, &res, &env);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    // reqwest is built without a default TLS crypto provider in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Dropping `run` (Ctrl-C) drops its clusters, which stops every child.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; every child process was stopped")),
    }
}
