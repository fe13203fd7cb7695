//! Benchmark, run by hand (not part of the test gate): lease grants and leader
//! failover of a three-replica StacyVM cluster against a three-member etcd 3.4
//! cluster, both on loopback on this machine, in one run.
//!
//! ```text
//! cargo bench -p stacyvm-node --bench cluster              # full run
//! BENCH_QUICK=1 cargo bench -p stacyvm-node --bench cluster # smoke run
//! ```
//!
//! Markdown tables go to stdout, progress to stderr. Needs `/usr/bin/etcd`
//! (Debian `etcd-server`). Every child process is started here and killed by
//! its handle when it is dropped (normal exit, error, panic or Ctrl-C).
//!
//! - Lease grants: each operation acquires a distinct resource `bench-<n>` for
//!   holder `h-<client>` with a 60 s TTL, through the leader. StacyVM: one
//!   `POST /api/v1/leases/acquire`. etcd: `POST /v3/lease/grant`, then
//!   `POST /v3/kv/txn` putting the key with that lease if its
//!   `create_revision` is 0. `concurrency` tokio tasks share one HTTP client
//!   (connection pool); after a warm-up, only operations that start and finish
//!   inside the measured window count.
//! - Failover: one writer acquires one resource at a time through a follower,
//!   retrying errors after 10 ms. The leader is SIGKILLed; the result is the
//!   time from the kill to the acknowledgement of the first write *sent after*
//!   the kill. The member is then restarted on its data directory and the
//!   cluster must agree on a leader and catch up before the next trial. A
//!   request in flight to the dead leader hangs until some timeout, so the
//!   trials run once per client timeout in `BENCH_FAILOVER_TIMEOUTS_MS`
//!   (default `250,10000`: abandon and retry quickly, or leave it to the
//!   server). Each set of trials gets a fresh cluster, so the leases left by
//!   the throughput part (and etcd's revocation of them) do not interfere.
//!
//! Other knobs: `BENCH_DURATION_S` (seconds per throughput row), `BENCH_TRIALS`.

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

const ETCD: &str = "/usr/bin/etcd";
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const TTL_MS: i64 = 60_000;
/// Pause after a failed operation before the next one.
const RETRY_SLEEP: Duration = Duration::from_millis(10);
/// How long a cluster may take to agree on a leader and catch up.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    warmup: Duration,
    duration: Duration,
    trials: usize,
    /// Per-request timeouts of the failover writer, one set of trials each: a
    /// request stuck on the dead leader is abandoned and retried after this long.
    failover_timeouts: Vec<Duration>,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn settings() -> Settings {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let (warmup, duration, trials) = if quick {
        (Duration::from_millis(500), Duration::from_secs(2), 3)
    } else {
        (Duration::from_secs(1), Duration::from_secs(10), 20)
    };
    Settings {
        quick,
        warmup,
        duration: env_u64("BENCH_DURATION_S").map_or(duration, Duration::from_secs),
        trials: env_u64("BENCH_TRIALS").map_or(trials, |t| t as usize),
        failover_timeouts: std::env::var("BENCH_FAILOVER_TIMEOUTS_MS")
            .unwrap_or_else(|_| "250,10000".into())
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .map(Duration::from_millis)
            .collect(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Stacy,
    Etcd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stacy => "StacyVM",
            Kind::Etcd => "etcd 3.4",
        }
    }
}

/// Resource IDs are unique across the whole run.
static NEXT_RESOURCE: AtomicU64 = AtomicU64::new(0);

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

/// One child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
struct Proc {
    program: String,
    args: Vec<String>,
    log: PathBuf,
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
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().context("dup log file")?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {}", self.program))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What one member says about the cluster.
#[derive(Debug, Clone)]
struct View {
    /// Index (into `Cluster::procs`) of the leader this member knows.
    leader: Option<usize>,
    is_leader: bool,
    applied: u64,
    last: u64,
}

/// Three members of one system on loopback.
#[derive(Debug)]
struct Cluster {
    // Declared first so every child dies before the directory is removed.
    procs: Vec<Proc>,
    kind: Kind,
    /// Client base URLs, index-aligned with `procs`.
    urls: Vec<String>,
    /// etcd member IDs (decimal strings), index-aligned with `procs`.
    member_ids: Vec<String>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
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

fn control_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("HTTP client")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

impl Cluster {
    async fn start(kind: Kind) -> Result<Cluster> {
        let mut c = match kind {
            Kind::Stacy => Cluster::start_stacy()?,
            Kind::Etcd => Cluster::start_etcd()?,
        };
        c.wait_healthy().await?;
        if kind == Kind::Etcd {
            for i in 0..c.procs.len() {
                let s = c.etcd_status(i).await?;
                let id = s["header"]["member_id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no member_id in {s}"))?;
                c.member_ids[i] = id.to_owned();
            }
            c.wait_healthy().await?;
        }
        Ok(c)
    }

    fn start_stacy() -> Result<Cluster> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let root = dir.path().to_path_buf();
        let certs = root.join("certs");
        let certs_s = path_str(&certs)?;
        run_ok(&["certs", "init", "--out", certs_s])?;
        for id in 1..=3 {
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
        for _ in 0..3 {
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
        let mut procs = Vec::new();
        let mut urls = Vec::new();
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
                "--bootstrap".into(),
            ];
            args.extend(peers.iter().cloned());
            let mut p = Proc {
                program: stacyvm_bin().to_owned(),
                args,
                log: root.join(format!("stacyvm-{id}.log")),
                child: None,
            };
            p.start()?;
            procs.push(p);
            urls.push(format!("http://{api}"));
        }
        Ok(Cluster {
            procs,
            kind: Kind::Stacy,
            urls,
            member_ids: Vec::new(),
            http: control_client()?,
            _dir: dir,
        })
    }

    fn start_etcd() -> Result<Cluster> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let root = dir.path().to_path_buf();
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push((free_port()?, free_port()?));
        }
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{}=http://127.0.0.1:{peer}", i + 1))
            .collect();
        let initial = initial.join(",");
        let token = format!("bench-{}", std::process::id());
        let mut procs = Vec::new();
        let mut urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{}", i + 1);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args: Vec<String> = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                root.join(format!("etcd-{name}")).display().to_string(),
                "--listen-client-urls".into(),
                client_url.clone(),
                "--advertise-client-urls".into(),
                client_url.clone(),
                "--listen-peer-urls".into(),
                peer_url.clone(),
                "--initial-advertise-peer-urls".into(),
                peer_url,
                "--initial-cluster".into(),
                initial.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
            ];
            let mut p = Proc {
                program: ETCD.to_owned(),
                args,
                log: root.join(format!("etcd-{name}.log")),
                child: None,
            };
            p.start()?;
            procs.push(p);
            urls.push(client_url);
        }
        Ok(Cluster {
            procs,
            kind: Kind::Etcd,
            urls,
            member_ids: vec![String::new(); 3],
            http: control_client()?,
            _dir: dir,
        })
    }

    fn dump_logs(&self) -> String {
        self.procs
            .iter()
            .enumerate()
            .map(|(i, p)| format!("--- {} member {i} ---\n{}", self.kind.name(), p.tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn etcd_status(&self, i: usize) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}/v3/maintenance/status", self.urls[i]))
            .json(&json!({}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("status: HTTP {}", r.status());
        }
        Ok(r.json().await?)
    }

    /// Member `i`'s view, or `None` if it does not answer (or is not ready).
    async fn view(&self, i: usize) -> Option<View> {
        match self.kind {
            Kind::Stacy => {
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
                // The leader's API address must be the one we know it by.
                if let (Some(l), Some(api)) = (leader, s["leader_api"].as_str())
                    && self.urls.get(l).map(String::as_str) != Some(&format!("http://{api}"))
                {
                    return None;
                }
                Some(View {
                    leader,
                    is_leader: s["state"].as_str() == Some("leader"),
                    applied: s["last_applied_index"].as_u64().unwrap_or(0),
                    last: s["last_log_index"].as_u64().unwrap_or(0),
                })
            }
            Kind::Etcd => {
                let s = self.etcd_status(i).await.ok()?;
                let me = s["header"]["member_id"].as_str()?;
                let leader = s["leader"].as_str()?;
                let num = |k: &str| s[k].as_str().and_then(|v| v.parse::<u64>().ok());
                Some(View {
                    leader: self.member_ids.iter().position(|m| m == leader),
                    is_leader: leader == me,
                    applied: num("raftAppliedIndex").unwrap_or(0),
                    last: num("raftIndex").unwrap_or(0),
                })
            }
        }
    }

    /// Waits until every member answers, all agree on one leader that says it
    /// leads, and every member has applied what that leader had logged when
    /// they first agreed. Returns the leader's index.
    async fn wait_healthy(&self) -> Result<usize> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let mut target: Option<u64> = None;
        loop {
            let mut views = Vec::new();
            for i in 0..self.procs.len() {
                views.push(self.view(i).await);
            }
            let etcd_starting =
                self.kind == Kind::Etcd && self.member_ids.iter().any(String::is_empty);
            if views.iter().all(Option::is_some) {
                let views: Vec<View> = views.iter().flatten().cloned().collect();
                if etcd_starting {
                    // Member IDs are not known yet: all answering is enough.
                    return Ok(0);
                }
                let first = views[0].leader;
                if let Some(l) = first
                    && views.iter().all(|v| v.leader == first)
                    && views[l].is_leader
                {
                    let t = *target.get_or_insert(views[l].last);
                    if views.iter().all(|v| v.applied >= t) {
                        return Ok(l);
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} cluster not healthy within {HEALTHY_WITHIN:?}: {views:?}\n{}",
                    self.kind.name(),
                    self.dump_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Standard base64 with padding (etcd's JSON gateway encodes bytes so).
fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(chunk[0]) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let at = |shift: u32| char::from(T[((n >> shift) & 63) as usize]);
        out.push(at(18));
        out.push(at(12));
        out.push(if chunk.len() > 1 { at(6) } else { '=' });
        out.push(if chunk.len() > 2 { at(0) } else { '=' });
    }
    out
}

fn classify(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "client timeout".into()
    } else if e.is_connect() {
        "connect error".into()
    } else {
        "transport error".into()
    }
}

/// POSTs JSON; a non-2xx answer becomes an error class such as
/// `HTTP 503 NO_LEADER` or `HTTP 503 etcdserver: no leader`.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> Result<Value, String> {
    let resp = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| classify(&e))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| classify(&e))?;
    let v: Option<Value> = serde_json::from_slice(&bytes).ok();
    if !status.is_success() {
        let why = v
            .as_ref()
            .and_then(|v| {
                v["code"]
                    .as_str()
                    .or_else(|| v["error"].as_str())
                    .or_else(|| v["message"].as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        return Err(format!("HTTP {} {why}", status.as_u16()));
    }
    v.ok_or_else(|| "unparsable JSON answer".to_string())
}

/// One lease grant for a fresh resource.
async fn acquire(
    kind: Kind,
    http: &reqwest::Client,
    base: &str,
    holder: &str,
) -> Result<(), String> {
    let n = NEXT_RESOURCE.fetch_add(1, Ordering::Relaxed);
    let key = format!("bench-{n}");
    match kind {
        Kind::Stacy => {
            let body = json!({
                "resource_id": key,
                "resource_type": "sandbox",
                "holder_id": holder,
                "ttl_ms": TTL_MS,
            });
            let v = post(http, &format!("{base}/api/v1/leases/acquire"), &body).await?;
            if v["resource_id"].as_str() != Some(key.as_str()) {
                return Err("unexpected lease answer".into());
            }
            Ok(())
        }
        Kind::Etcd => {
            let grant = post(
                http,
                &format!("{base}/v3/lease/grant"),
                &json!({ "TTL": TTL_MS / 1000 }),
            )
            .await?;
            let lease = grant["ID"]
                .as_str()
                .ok_or_else(|| "lease grant without ID".to_string())?;
            let k = b64(key.as_bytes());
            let txn = json!({
                "compare": [{
                    "key": k,
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": "0",
                }],
                "success": [{
                    "request_put": { "key": k, "value": b64(holder.as_bytes()), "lease": lease }
                }],
            });
            let v = post(http, &format!("{base}/v3/kv/txn"), &txn).await?;
            // proto3 JSON omits `false`: a missing field means the compare failed.
            if v["succeeded"].as_bool() != Some(true) {
                return Err("txn compare failed (key exists)".into());
            }
            Ok(())
        }
    }
}

#[derive(Debug, Default)]
struct LoadResult {
    secs: f64,
    /// Latencies of counted successful operations, microseconds, sorted.
    lat_us: Vec<u64>,
    errors: BTreeMap<String, u64>,
    /// CPU used by the three server processes during the window, in cores.
    server_cpu: f64,
    /// CPU used by this benchmark process (the client) during the window, in cores.
    client_cpu: f64,
}

impl LoadResult {
    fn ops_per_sec(&self) -> f64 {
        self.lat_us.len() as f64 / self.secs
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

/// Clock ticks per second for /proc/<pid>/stat.
fn clk_tck() -> f64 {
    first_line("getconf", &["CLK_TCK"])
        .trim()
        .parse()
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
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

fn cpu_of(pids: &[String]) -> u64 {
    pids.iter().map(|p| cpu_ticks(p)).sum()
}

async fn run_load(
    kind: Kind,
    base: &str,
    concurrency: usize,
    server_pids: &[String],
    s: &Settings,
) -> Result<LoadResult> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(concurrency)
        .build()
        .context("HTTP client")?;
    let start = Instant::now() + s.warmup;
    let end = start + s.duration;
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let http = http.clone();
        let base = base.to_owned();
        let holder = format!("h-{c}");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = acquire(kind, &http, &base, &holder).await;
                let t1 = Instant::now();
                match r {
                    Ok(()) if t0 >= start && t1 <= end => {
                        lat.push(u64::try_from((t1 - t0).as_micros()).unwrap_or(u64::MAX));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if t0 >= start {
                            *errors.entry(e).or_default() += 1;
                        }
                        tokio::time::sleep(RETRY_SLEEP).await;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let me = [std::process::id().to_string()];
    tokio::time::sleep_until(start.into()).await;
    let (server0, client0) = (cpu_of(server_pids), cpu_of(&me));
    tokio::time::sleep_until(end.into()).await;
    let (server1, client1) = (cpu_of(server_pids), cpu_of(&me));
    let per_core = clk_tck() * s.duration.as_secs_f64();
    let mut out = LoadResult {
        secs: s.duration.as_secs_f64(),
        server_cpu: server1.saturating_sub(server0) as f64 / per_core,
        client_cpu: client1.saturating_sub(client0) as f64 / per_core,
        ..LoadResult::default()
    };
    for t in tasks {
        let (lat, errors) = t.await.context("load task panicked")?;
        out.lat_us.extend(lat);
        for (k, v) in errors {
            *out.errors.entry(k).or_default() += v;
        }
    }
    out.lat_us.sort_unstable();
    Ok(out)
}

#[derive(Debug, Default)]
struct FailoverResult {
    timeout: Duration,
    /// Kill to the first acknowledged write sent after it, sorted.
    times: Vec<Duration>,
    /// Kill to the moment the writer's member first named a new leader, sorted.
    leader_seen: Vec<Duration>,
    /// Errors the writer saw during the trials, by class.
    errors: BTreeMap<String, u64>,
}

/// One write attempt of the failover writer.
#[derive(Debug)]
struct Attempt {
    sent: Instant,
    done: Instant,
    outcome: Result<(), String>,
}

async fn run_failover(c: &mut Cluster, timeout: Duration, s: &Settings) -> Result<FailoverResult> {
    let mut out = FailoverResult {
        timeout,
        ..FailoverResult::default()
    };
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("HTTP client")?;
    for trial in 1..=s.trials {
        let leader = c.wait_healthy().await?;
        let via = (leader + 1) % c.procs.len();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Instant)>();
        let writer = {
            let http = http.clone();
            let base = c.urls[via].clone();
            let stop = stop.clone();
            let kind = c.kind;
            tokio::spawn(async move {
                let mut attempts = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let outcome = acquire(kind, &http, &base, "h-0").await;
                    let done = Instant::now();
                    if outcome.is_ok() {
                        let _ = tx.send((sent, done));
                    }
                    let failed = outcome.is_err();
                    attempts.push(Attempt {
                        sent,
                        done,
                        outcome,
                    });
                    if failed {
                        tokio::time::sleep(RETRY_SLEEP).await;
                    }
                }
                attempts
            })
        };
        // Steady writes first.
        let mut acked = 0;
        let steady_by = Instant::now() + Duration::from_secs(10);
        while acked < 20 {
            match tokio::time::timeout_at(steady_by.into(), rx.recv()).await {
                Ok(Some(_)) => acked += 1,
                _ => bail!(
                    "{}: writer through member {via} not steady before trial {trial}\n{}",
                    c.kind.name(),
                    c.dump_logs()
                ),
            }
        }
        let killed_at = Instant::now();
        c.procs[leader].kill9();
        let give_up = killed_at + Duration::from_secs(60);
        let ack = async {
            loop {
                match tokio::time::timeout_at(give_up.into(), rx.recv()).await {
                    Ok(Some((sent, acked_at))) if sent >= killed_at => {
                        return Some(acked_at - killed_at);
                    }
                    Ok(Some(_)) => {}
                    _ => return None,
                }
            }
        };
        let cl = &*c;
        let seen = async {
            loop {
                if let Some(v) = cl.view(via).await
                    && v.leader.is_some_and(|l| l != leader)
                {
                    return Some(killed_at.elapsed());
                }
                if Instant::now() >= give_up {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let (took, seen) = tokio::join!(ack, seen);
        stop.store(true, Ordering::Relaxed);
        let attempts = writer.await.context("failover writer panicked")?;
        let (Some(took), Some(seen)) = (took, seen) else {
            bail!(
                "{}: no write acknowledged (or no new leader) within 60 s of killing member {leader}\n{}",
                c.kind.name(),
                c.dump_logs()
            );
        };
        let rel = |t: Instant| t.saturating_duration_since(killed_at).as_millis();
        let around: Vec<String> = attempts
            .iter()
            .filter(|a| a.done >= killed_at && a.sent <= killed_at + took)
            .map(|a| {
                let what = match &a.outcome {
                    Ok(()) => "ok".to_string(),
                    Err(e) => e.clone(),
                };
                let sent = if a.sent < killed_at {
                    format!("-{}", (killed_at - a.sent).as_millis())
                } else {
                    rel(a.sent).to_string()
                };
                format!("[{sent}..{} {what}]", rel(a.done))
            })
            .collect();
        eprintln!(
            "  {} failover (client timeout {} ms) trial {trial}/{}: killed member {leader}, writes via member {via}: new leader seen at {} ms, next ack at {} ms; attempts (ms from kill): {}",
            c.kind.name(),
            timeout.as_millis(),
            s.trials,
            seen.as_millis(),
            took.as_millis(),
            around.join(" ")
        );
        for a in attempts.iter().filter(|a| a.done >= killed_at) {
            if let Err(e) = &a.outcome {
                *out.errors.entry(e.clone()).or_default() += 1;
            }
        }
        out.times.push(took);
        out.leader_seen.push(seen);
        c.procs[leader].start()?;
    }
    c.wait_healthy().await?;
    out.times.sort_unstable();
    out.leader_seen.sort_unstable();
    Ok(out)
}

fn ms_us(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
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

/// p50 / p99 of a 4 KiB overwrite followed by fdatasync, in the directory the
/// clusters use (the temp dir), as context for the per-write latencies.
fn fsync_probe() -> Result<(Duration, Duration)> {
    use std::io::{Seek, Write};
    let dir = tempfile::tempdir().context("temp dir")?;
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

#[derive(Debug, Default)]
struct SystemResults {
    load: Vec<(usize, LoadResult)>,
    failover: Vec<FailoverResult>,
}

async fn bench_system(kind: Kind, s: &Settings) -> Result<SystemResults> {
    let mut out = SystemResults::default();
    eprintln!("{}: starting three members", kind.name());
    let c = Cluster::start(kind).await?;
    let pids: Vec<String> = c
        .procs
        .iter()
        .filter_map(|p| p.child.as_ref().map(|c| c.id().to_string()))
        .collect();
    for conc in CONCURRENCY {
        let leader = c.wait_healthy().await?;
        eprintln!(
            "{}: concurrency {conc} through leader member {leader} ({}), {:?} warm-up + {:?}",
            kind.name(),
            c.urls[leader],
            s.warmup,
            s.duration
        );
        let r = run_load(kind, &c.urls[leader], conc, &pids, s).await?;
        eprintln!(
            "  {:.0} ops/s, p50 {} ms, p99 {} ms, server CPU {:.2} cores, client CPU {:.2} cores, errors {:?}",
            r.ops_per_sec(),
            ms_us(percentile(&r.lat_us, 50.0)),
            ms_us(percentile(&r.lat_us, 99.0)),
            r.server_cpu,
            r.client_cpu,
            r.errors
        );
        out.load.push((conc, r));
    }
    drop(c);
    for &timeout in &s.failover_timeouts {
        eprintln!(
            "{}: fresh three-member cluster for failover, client timeout {timeout:?}",
            kind.name()
        );
        let mut c = Cluster::start(kind).await?;
        out.failover.push(run_failover(&mut c, timeout, s).await?);
    }
    Ok(out)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn print_report(
    s: &Settings,
    stacy: &SystemResults,
    etcd: &SystemResults,
    env: &[(String, String)],
) {
    println!("### Environment\n");
    println!("| | |\n|---|---|");
    for (k, v) in env {
        println!("| {k} | {v} |");
    }
    println!();

    println!(
        "### Lease grants (three members on 127.0.0.1, {} s per row after {} s warm-up)\n",
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64()
    );
    println!(
        "| System | Concurrency | Grants/s | p50 (ms) | p99 (ms) | Errors | Server CPU (cores) | Client CPU (cores) |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|---:|");
    for (name, r) in [("StacyVM", stacy), ("etcd 3.4", etcd)] {
        for (conc, l) in &r.load {
            println!(
                "| {name} | {conc} | {:.0} | {} | {} | {} | {:.2} | {:.2} |",
                l.ops_per_sec(),
                ms_us(percentile(&l.lat_us, 50.0)),
                ms_us(percentile(&l.lat_us, 99.0)),
                errors_cell(&l.errors),
                l.server_cpu,
                l.client_cpu
            );
        }
    }
    println!();

    println!("### StacyVM / etcd\n");
    println!("| Concurrency | Throughput ratio (higher is better) | p99 ratio (lower is better) |");
    println!("|---:|---:|---:|");
    let mut ratios = Vec::new();
    for ((conc, a), (_, b)) in stacy.load.iter().zip(&etcd.load) {
        let tput = a.ops_per_sec() / b.ops_per_sec();
        let p99 = percentile(&a.lat_us, 99.0) as f64 / percentile(&b.lat_us, 99.0) as f64;
        println!("| {conc} | {tput:.2}× | {p99:.2}× |");
        ratios.push((*conc, tput, p99));
    }
    println!();

    println!(
        "### Failover: SIGKILL the leader, time to the next acknowledged write ({} trials per row)\n",
        s.trials
    );
    println!(
        "| System | Client timeout (ms) | Trials | p50 (ms) | p99 (ms) | Max (ms) | New leader seen, p50 / max (ms) | Writer errors after the kill |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (name, r) in [("StacyVM", stacy), ("etcd 3.4", etcd)] {
        for f in &r.failover {
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} / {} | {} |",
                f.timeout.as_millis(),
                f.times.len(),
                ms(percentile(&f.times, 50.0)),
                ms(percentile(&f.times, 99.0)),
                ms(f.times.last().copied().unwrap_or_default()),
                ms(percentile(&f.leader_seen, 50.0)),
                ms(f.leader_seen.last().copied().unwrap_or_default()),
                errors_cell(&f.errors)
            );
        }
    }
    println!();
    println!("| System | Client timeout (ms) | Every trial, sorted (ms) |\n|---|---:|---|");
    for (name, r) in [("StacyVM", stacy), ("etcd 3.4", etcd)] {
        for f in &r.failover {
            let all: Vec<String> = f.times.iter().map(|d| ms(*d)).collect();
            println!(
                "| {name} | {} | {} |",
                f.timeout.as_millis(),
                all.join(", ")
            );
        }
    }
    println!();

    println!("### Targets\n");
    println!("| Target | Result | |\n|---|---|---|");
    for (conc, tput, p99) in &ratios {
        println!(
            "| Throughput ≥ 1.5× etcd at concurrency {conc} | {tput:.2}× | {} |",
            verdict(*tput >= 1.5)
        );
        println!(
            "| p99 ≤ etcd's at concurrency {conc} | {p99:.2}× | {} |",
            verdict(*p99 <= 1.0)
        );
    }
    for f in &stacy.failover {
        let p50 = percentile(&f.times, 50.0);
        let p99 = percentile(&f.times, 99.0);
        let ok = !f.times.is_empty();
        println!(
            "| Failover p50 ≤ 500 ms (client timeout {} ms) | {} ms | {} |",
            f.timeout.as_millis(),
            ms(p50),
            verdict(ok && p50 <= Duration::from_millis(500))
        );
        println!(
            "| Failover p99 ≤ 1500 ms (client timeout {} ms) | {} ms | {} |",
            f.timeout.as_millis(),
            ms(p99),
            verdict(ok && p99 <= Duration::from_millis(1500))
        );
    }
    println!();
    println!(
        "Acquire = one `POST /api/v1/leases/acquire` (StacyVM) or `POST /v3/lease/grant` + \
         `POST /v3/kv/txn` put-if-absent with that lease (etcd, JSON gateway); a distinct \
         resource per operation, TTL 60 s, sent to the leader by concurrent tasks sharing one \
         HTTP/1.1 connection pool. Both systems with default settings (StacyVM: SQLite, Raft \
         log fsync per append, heartbeat 50 ms, election 150–300 ms; etcd: heartbeat 100 ms, \
         election 1000 ms). CPU columns: CPU time of the three server processes and of the \
         benchmark client during the window, divided by its length. Failover: one writer \
         through a follower, retry after 10 ms on error; a request still unanswered after the \
         client timeout is abandoned (an error) and retried. The time runs from SIGKILL to \
         the acknowledgement of the first write sent after it; \"new leader seen\" is when \
         the writer's member first names a new leader (polled every 10 ms). The killed member \
         restarts on its data directory and the cluster catches up between trials; each row \
         uses a fresh cluster. With {} trials, p99 is the largest value (nearest rank).",
        s.trials
    );
}

async fn run() -> Result<()> {
    let s = settings();
    if !Path::new(ETCD).exists() {
        bail!("{ETCD} is missing: apt-get install -y etcd-server etcd-client");
    }
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
        ("etcd".to_string(), first_line(ETCD, &["--version"])),
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
    let (f50, f99) = fsync_probe()?;
    env.push((
        "4 KiB write + fdatasync in the temp dir, p50 / p99".to_string(),
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
    let stacy = bench_system(Kind::Stacy, &s).await?;
    let etcd = bench_system(Kind::Etcd, &s).await?;
    env.push(("Load average at end".to_string(), loadavg()));
    env.push((
        "Wall time".to_string(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    print_report(&s, &stacy, &etcd, &env);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Dropping `run` (Ctrl-C) drops its clusters, which kills every child.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; every child process was killed")),
    }
}
