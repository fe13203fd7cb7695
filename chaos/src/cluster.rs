//! The cluster fixture: `stacyvm serve` replicas and `stacyvm worker`s as
//! child processes on loopback, each behind the proxies of [`crate::proxy`],
//! with configs and data in one temporary directory.
//!
//! Replica `i` binds its QUIC and HTTP sockets on 127.0.0.(10+i) and
//! advertises the proxies in front of them; worker `w` binds on
//! 127.0.0.(100+w), advertises its RPC proxy and calls the control plane
//! from that IP. The harness's clients call each replica's API directly
//! from 127.0.0.1. Every child is killed by PID on drop (and the sandbox
//! keepers the workers started, found through the evidence log); each log
//! is appended across restarts and its tail printed by [`Cluster::tails`].

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::{self, Links, Node};

/// Where the replicas keep their system of record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// Embedded SQLite in each replica's data directory (the default).
    Sqlite,
    /// One Postgres database per replica, created on the server `base` names
    /// (a DSN whose database the harness may connect to and create others from).
    Postgres { base: String },
    /// One Postgres database all replicas share (`--shared-database`).
    PostgresShared { base: String },
}

impl Database {
    pub fn name(&self) -> &'static str {
        match self {
            Database::Sqlite => "sqlite",
            Database::Postgres { .. } => "postgres",
            Database::PostgresShared { .. } => "postgres-shared",
        }
    }
}

/// `base` with its database name replaced by `db` (query string kept).
fn dsn_for(base: &str, db: &str) -> Result<String, ClusterError> {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    let after_scheme = head
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| ClusterError::Io("the Postgres DSN has no scheme".into()))?;
    let root = match head[after_scheme..].find('/') {
        Some(i) => &head[..after_scheme + i],
        None => head,
    };
    Ok(match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    })
}

/// libpq environment for a `postgres://user[:password]@host[:port]/db[?sslmode=..]`
/// DSN, so it never sits on a command line.
fn libpq_env(dsn: &str) -> Result<Vec<(&'static str, String)>, ClusterError> {
    let bad = || ClusterError::Io("the Postgres DSN is not postgres://user@host:port/db".into());
    let rest = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
        .ok_or_else(bad)?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let (hostport, db) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    };
    if host.is_empty() {
        return Err(bad());
    }
    let mut env = vec![("PGHOST", host.to_string())];
    if let Some(p) = port {
        env.push(("PGPORT", p.to_string()));
    }
    if !db.is_empty() {
        env.push(("PGDATABASE", db.to_string()));
    }
    if let Some(a) = auth {
        match a.split_once(':') {
            Some((u, pw)) => {
                env.push(("PGUSER", u.to_string()));
                env.push(("PGPASSWORD", pw.to_string()));
            }
            None => env.push(("PGUSER", a.to_string())),
        }
    }
    for kv in query.unwrap_or("").split('&') {
        if let Some(mode) = kv.strip_prefix("sslmode=") {
            env.push(("PGSSLMODE", mode.to_string()));
        }
    }
    Ok(env)
}

/// Runs one SQL statement with `psql` against `dsn` (the DSN goes in the
/// environment, never on a command line or in an error).
fn psql(dsn: &str, sql: &str) -> Result<(), ClusterError> {
    let out = Command::new("psql")
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .envs(libpq_env(dsn)?)
        .stdin(Stdio::null())
        .output()
        .map_err(io("psql"))?;
    if !out.status.success() {
        return Err(ClusterError::Io(format!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Timing and size of a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    pub binary: PathBuf,
    pub replicas: u64,
    pub workers: u32,
    pub raft_heartbeat_ms: u64,
    pub worker_heartbeat_ms: u64,
    pub lease_ttl_ms: u64,
    pub offline_grace_ms: u64,
    pub safety_margin_ms: u64,
    pub reconcile_interval: String,
    pub database: Database,
}

impl Options {
    pub fn new(binary: PathBuf) -> Options {
        Options {
            binary,
            replicas: 3,
            workers: 2,
            raft_heartbeat_ms: 100,
            worker_heartbeat_ms: 300,
            lease_ttl_ms: 3000,
            offline_grace_ms: 1000,
            safety_margin_ms: 1000,
            reconcile_interval: "2s".into(),
            database: Database::Sqlite,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Io(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

fn io(what: &str) -> impl Fn(std::io::Error) -> ClusterError + '_ {
    move |e| ClusterError::Io(format!("{what}: {e}"))
}

/// The `stacyvm` binary: `STACYVM_BIN`, else the target directory's.
pub fn find_binary() -> Result<PathBuf, ClusterError> {
    if let Ok(p) = std::env::var("STACYVM_BIN")
        && !p.is_empty()
    {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    for profile in ["debug", "release"] {
        let p = Path::new(&target).join(profile).join("stacyvm");
        if p.exists() {
            return Ok(p);
        }
    }
    Err(ClusterError::Io(
        "no stacyvm binary: build it (cargo build --bin stacyvm) or set STACYVM_BIN".into(),
    ))
}

/// A free TCP port on `ip` (bound and released; a small race is accepted).
fn free_tcp(ip: std::net::Ipv4Addr) -> Result<SocketAddr, ClusterError> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(io("free port"))?;
    l.local_addr().map_err(io("free port"))
}

fn free_udp(ip: std::net::Ipv4Addr) -> Result<SocketAddr, ClusterError> {
    let s = std::net::UdpSocket::bind((ip, 0)).map_err(io("free port"))?;
    s.local_addr().map_err(io("free port"))
}

/// One replica's addresses.
#[derive(Clone, Debug)]
pub struct ReplicaAddrs {
    pub raft_bind: SocketAddr,
    pub api_bind: SocketAddr,
    pub raft_proxy: SocketAddr,
    pub api_proxy: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct WorkerAddrs {
    pub rpc_bind: SocketAddr,
    pub rpc_proxy: SocketAddr,
}

/// A running (or stopped) child process and its log.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    log: PathBuf,
    paused: bool,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([sig, &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fixture. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    pub opts: Options,
    pub dir: tempfile::TempDir,
    pub links: Links,
    pub replicas: BTreeMap<u64, ReplicaAddrs>,
    pub workers: BTreeMap<u32, WorkerAddrs>,
    procs: BTreeMap<Node, Proc>,
    http: reqwest::Client,
    /// Replica IDs that left the cluster (never reused).
    pub removed: Vec<u64>,
    /// Postgres databases this cluster created (dropped on drop).
    databases: Vec<String>,
}

/// What `/api/v1/cluster/status` says.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Status {
    pub node_id: u64,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub voters: Vec<u64>,
    #[serde(default)]
    pub learners: Vec<u64>,
}

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Digest {
    pub node_id: u64,
    pub applied_index: u64,
    pub digest: String,
    pub sandboxes: usize,
}

impl Cluster {
    /// Writes certificates, starts the proxies, the replicas (one cluster
    /// bootstrapped from all of them) and the workers, and waits until every
    /// replica is ready and every worker is online.
    pub async fn start(opts: Options, links: Links) -> Result<Cluster, ClusterError> {
        // STACYVM_CHAOS_KEEP=1 keeps the directory (configs, data, logs).
        let keep = std::env::var("STACYVM_CHAOS_KEEP").is_ok_and(|v| v == "1");
        let dir = tempfile::Builder::new()
            .prefix("stacyvm-chaos.")
            .disable_cleanup(keep)
            .tempdir()
            .map_err(io("temp dir"))?;
        let certs = dir.path().join("certs");
        run(
            &opts.binary,
            &["certs", "init", "--out", &certs.to_string_lossy()],
        )?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClusterError::Io(e.to_string()))?;
        let mut c = Cluster {
            opts,
            dir,
            links,
            replicas: BTreeMap::new(),
            workers: BTreeMap::new(),
            procs: BTreeMap::new(),
            http,
            removed: Vec::new(),
            databases: Vec::new(),
        };
        for i in 1..=c.opts.replicas {
            c.add_addrs(i).await?;
        }
        for i in 1..=c.opts.replicas {
            c.start_replica(i, false)?;
        }
        if let Err(e) = c.wait_ready(Duration::from_secs(60)).await {
            return Err(ClusterError::Timeout(format!("{e}\n{}", c.tails(20))));
        }
        for w in 1..=c.opts.workers {
            let ip = Node::Worker(w).ip();
            let rpc_bind = free_tcp(ip)?;
            let rpc_proxy = proxy::tcp(c.links.clone(), Node::Worker(w), (ip, 0).into(), rpc_bind)
                .await
                .map_err(io("worker proxy"))?;
            c.workers.insert(
                w,
                WorkerAddrs {
                    rpc_bind,
                    rpc_proxy,
                },
            );
            c.start_worker(w)?;
        }
        if let Err(e) = c.wait_workers_online(Duration::from_secs(30)).await {
            return Err(ClusterError::Timeout(format!("{e}\n{}", c.tails(20))));
        }
        Ok(c)
    }

    async fn add_addrs(&mut self, i: u64) -> Result<(), ClusterError> {
        let ip = Node::Replica(i).ip();
        let certs = self.dir.path().join("certs");
        run(
            &self.opts.binary,
            &[
                "certs",
                "issue",
                "node",
                "--id",
                &i.to_string(),
                "--ca",
                &certs.to_string_lossy(),
                "--out",
                &certs.to_string_lossy(),
            ],
        )?;
        let raft_bind = free_udp(ip)?;
        let api_bind = free_tcp(ip)?;
        let raft_proxy = proxy::udp(
            self.links.clone(),
            Node::Replica(i),
            (ip, 0).into(),
            raft_bind,
        )
        .await
        .map_err(io("raft proxy"))?;
        let api_proxy = proxy::tcp(
            self.links.clone(),
            Node::Replica(i),
            (ip, 0).into(),
            api_bind,
        )
        .await
        .map_err(io("api proxy"))?;
        self.replicas.insert(
            i,
            ReplicaAddrs {
                raft_bind,
                api_bind,
                raft_proxy,
                api_proxy,
            },
        );
        Ok(())
    }

    pub fn data_dir(&self, i: u64) -> PathBuf {
        self.dir.path().join(format!("node-{i}"))
    }

    pub fn log_path(&self, n: Node) -> PathBuf {
        match n {
            Node::Replica(i) => self.dir.path().join(format!("node-{i}.log")),
            Node::Worker(w) => self.dir.path().join(format!("worker-{w}.log")),
            Node::Client => self.dir.path().join("client.log"),
        }
    }

    pub fn evidence_path(&self, w: u32) -> PathBuf {
        self.dir.path().join(format!("evidence-{w}.jsonl"))
    }

    fn spawn(
        &mut self,
        n: Node,
        args: Vec<String>,
        env: &[(&str, String)],
    ) -> Result<(), ClusterError> {
        let log = self.log_path(n);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io("log"))?;
        let err = out.try_clone().map_err(io("log"))?;
        let mut cmd = Command::new(&self.opts.binary);
        cmd.args(&args)
            .env("STACYVM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(io("spawn stacyvm"))?;
        self.procs.insert(
            n,
            Proc {
                child: Some(child),
                log,
                paused: false,
            },
        );
        Ok(())
    }

    fn control_args(&self) -> Vec<String> {
        let o = &self.opts;
        vec![
            format!("--heartbeat-ms={}", o.raft_heartbeat_ms),
            format!("--worker-heartbeat-ms={}", o.worker_heartbeat_ms),
            format!("--lease-ttl-ms={}", o.lease_ttl_ms),
            format!("--offline-grace-ms={}", o.offline_grace_ms),
            format!("--reconcile-interval={}", o.reconcile_interval),
        ]
    }

    /// Arguments and environment that point replica `i` at its database,
    /// creating the database the first time.
    fn database_for(
        &mut self,
        i: u64,
    ) -> Result<(Vec<String>, Vec<(&'static str, String)>), ClusterError> {
        let (base, db, shared) = match &self.opts.database {
            Database::Sqlite => return Ok((Vec::new(), Vec::new())),
            Database::Postgres { base } => (base.clone(), self.db_name(Some(i)), false),
            Database::PostgresShared { base } => (base.clone(), self.db_name(None), true),
        };
        if !self.databases.contains(&db) {
            psql(&base, &format!("CREATE DATABASE {db}"))?;
            self.databases.push(db.clone());
        }
        let mut args = vec!["--database-driver=postgres".to_string()];
        if shared {
            args.push("--shared-database".into());
        }
        Ok((args, vec![("STACYVM_DATABASE_DSN", dsn_for(&base, &db)?)]))
    }

    /// `stacyvm_chaos_<dir suffix>[_<replica>]`: unique per cluster.
    fn db_name(&self, replica: Option<u64>) -> String {
        let tag: String = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        match replica {
            Some(i) => format!("{tag}_{i}"),
            None => tag,
        }
    }

    /// Starts replica `i` on its data directory (again, after a kill).
    /// `join` makes a new replica join through a current member.
    pub fn start_replica(&mut self, i: u64, join: bool) -> Result<(), ClusterError> {
        let a = self.replicas[&i].clone();
        let certs = self.dir.path().join("certs");
        let mut args = vec![
            "serve".to_string(),
            format!("--id={i}"),
            format!("--data-dir={}", self.data_dir(i).display()),
            format!("--certs={}", certs.display()),
            format!("--raft-addr={}", a.raft_bind),
            format!("--api-addr={}", a.api_bind),
            format!("--advertise-raft-addr={}", a.raft_proxy),
            format!("--advertise-api-addr={}", a.api_proxy),
        ];
        args.extend(self.control_args());
        if join {
            let member = self
                .replicas
                .iter()
                .find(|(id, _)| **id != i && !self.removed.contains(id))
                .map(|(_, r)| r.api_bind)
                .ok_or_else(|| ClusterError::Io("no member to join through".into()))?;
            args.push(format!("--join={member}"));
        } else {
            args.push("--bootstrap".into());
            for (id, r) in &self.replicas {
                if *id <= self.opts.replicas {
                    args.push(format!("--peer={id}={}={}", r.raft_proxy, r.api_proxy));
                }
            }
        }
        let (db_args, env) = self.database_for(i)?;
        args.extend(db_args);
        self.spawn(Node::Replica(i), args, &env)
    }

    pub fn start_worker(&mut self, w: u32) -> Result<(), ClusterError> {
        let a = self.workers[&w].clone();
        let bootstrap: Vec<String> = self
            .replicas
            .iter()
            .filter(|(id, _)| !self.removed.contains(id))
            .map(|(_, r)| r.api_proxy.to_string())
            .collect();
        let args = vec![
            "worker".to_string(),
            format!("--id=w{w}"),
            format!("--bootstrap={}", bootstrap.join(",")),
            format!("--rpc-addr={}", a.rpc_bind),
            format!("--advertise-url=http://{}", a.rpc_proxy),
            format!("--source-ip={}", Node::Worker(w).ip()),
            format!(
                "--state-dir={}",
                self.dir.path().join(format!("worker-{w}")).display()
            ),
            "--runtimes=mock".into(),
            format!("--heartbeat-ms={}", self.opts.worker_heartbeat_ms),
            format!("--safety-margin-ms={}", self.opts.safety_margin_ms),
        ];
        let evidence = self.evidence_path(w).display().to_string();
        self.spawn(
            Node::Worker(w),
            args,
            &[("STACYVM_MOCK_EVENT_LOG", evidence)],
        )
    }

    /// SIGKILL (the process is gone until restarted).
    pub fn kill(&mut self, n: Node) {
        if let Some(p) = self.procs.get_mut(&n) {
            p.kill();
        }
    }

    pub fn pause(&mut self, n: Node) {
        if let Some(p) = self.procs.get_mut(&n) {
            p.signal("-STOP");
            p.paused = true;
        }
    }

    pub fn resume(&mut self, n: Node) {
        if let Some(p) = self.procs.get_mut(&n) {
            p.signal("-CONT");
            p.paused = false;
        }
    }

    pub fn is_running(&mut self, n: Node) -> bool {
        self.procs
            .get_mut(&n)
            .is_some_and(|p| p.child.is_some() && p.exited().is_none())
    }

    /// Exit status of a process that exited by itself.
    pub fn exit_status(&mut self, n: Node) -> Option<std::process::ExitStatus> {
        self.procs.get_mut(&n).and_then(Proc::exited)
    }

    /// Replicas that are members and have a process.
    pub fn live_replicas(&self) -> Vec<u64> {
        self.replicas
            .keys()
            .copied()
            .filter(|id| !self.removed.contains(id))
            .filter(|id| {
                self.procs
                    .get(&Node::Replica(*id))
                    .is_some_and(|p| p.child.is_some())
            })
            .collect()
    }

    pub fn members(&self) -> Vec<u64> {
        self.replicas
            .keys()
            .copied()
            .filter(|id| !self.removed.contains(id))
            .collect()
    }

    pub fn api_url(&self, i: u64) -> String {
        format!("http://{}", self.replicas[&i].api_bind)
    }

    /// Every member's API URL, for clients that fail over.
    pub fn api_urls(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .map(|i| self.api_url(i))
            .collect()
    }

    pub async fn status(&self, i: u64) -> Option<Status> {
        let r = self
            .http
            .get(format!("{}/api/v1/cluster/status", self.api_url(i)))
            .timeout(Duration::from_millis(800))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn digest(&self, i: u64) -> Option<Digest> {
        let r = self
            .http
            .get(format!("{}/api/v1/cluster/digest", self.api_url(i)))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// The leader every answering live replica agrees on, if any.
    pub async fn leader(&self) -> Option<u64> {
        let mut seen = None;
        for i in self.live_replicas() {
            let s = self.status(i).await?;
            match (seen, s.leader_id) {
                (_, None) => return None,
                (None, Some(l)) => seen = Some(l),
                (Some(a), Some(b)) if a != b => return None,
                _ => {}
            }
        }
        seen
    }

    pub async fn wait_leader(&self, within: Duration) -> Result<u64, ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout("no leader agreed on".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_ready(&self, within: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + within;
        for i in self.live_replicas() {
            loop {
                let ok = self
                    .http
                    .get(format!("{}/ready", self.api_url(i)))
                    .timeout(Duration::from_millis(800))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ClusterError::Timeout(format!("replica {i} not ready")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Worker states as the leader's API lists them.
    pub async fn worker_states(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for url in self.api_urls() {
            let Ok(r) = self.http.get(format!("{url}/api/v1/workers")).send().await else {
                continue;
            };
            let Ok(v) = r.json::<serde_json::Value>().await else {
                continue;
            };
            let list = v.get("workers").cloned().unwrap_or(v);
            for w in list.as_array().into_iter().flatten() {
                if let (Some(id), Some(state)) = (
                    w.get("id").and_then(|x| x.as_str()),
                    w.get("status").and_then(|x| x.as_str()),
                ) {
                    out.insert(id.to_string(), state.to_string());
                }
            }
            break;
        }
        out
    }

    pub async fn wait_workers_online(&self, within: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            let states = self.worker_states().await;
            let online = (1..=self.opts.workers)
                .all(|w| states.get(&format!("w{w}")).is_some_and(|s| s == "online"));
            if online {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "workers not online: {states:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks the cluster to remove replica `i`, then stops it.
    pub async fn remove_replica(&mut self, i: u64) -> Result<(), ClusterError> {
        let body = serde_json::json!({ "id": i });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for url in self.api_urls() {
                let r = self
                    .http
                    .post(format!("{url}/api/v1/cluster/leave"))
                    .json(&body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    self.removed.push(i);
                    self.kill(Node::Replica(i));
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!("removing replica {i}")));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Adds a new replica `i` (a fresh ID) through a join.
    pub async fn add_replica(&mut self, i: u64) -> Result<(), ClusterError> {
        self.add_addrs(i).await?;
        self.start_replica(i, true)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.status(i).await
                && s.voters.contains(&i)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "replica {i} never became a voter"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last `lines` lines of every log.
    pub fn tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (n, p) in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("----- {n:?} ({})\n", p.log.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Every log file the run wrote.
    pub fn logs(&self) -> Vec<(Node, PathBuf)> {
        self.procs
            .iter()
            .map(|(n, p)| (*n, p.log.clone()))
            .collect()
    }

    /// Kills every child, then any sandbox keeper the evidence log shows
    /// still alive (a SIGKILLed worker leaves its keepers behind).
    pub fn shutdown(&mut self) {
        for p in self.procs.values_mut() {
            p.kill();
        }
        for w in self.workers.keys().copied().collect::<Vec<_>>() {
            let text = std::fs::read_to_string(self.evidence_path(w)).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let Some(pid) = v.get("pid").and_then(|p| p.as_u64()) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("stacyvm-mock-keeper") {
                    let _ = Command::new("kill")
                        .args(["-s", "KILL", "--", &format!("-{pid}")])
                        .stderr(Stdio::null())
                        .status();
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
        // Databases last: one still in use cannot be dropped.
        let base = match &self.opts.database {
            Database::Sqlite => return,
            Database::Postgres { base } | Database::PostgresShared { base } => base.clone(),
        };
        for db in std::mem::take(&mut self.databases) {
            let _ = psql(&base, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
        }
    }
}

fn run(bin: &Path, args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(io("run stacyvm"))?;
    if !out.status.success() {
        return Err(ClusterError::Io(format!(
            "stacyvm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dsn_for;

    #[test]
    fn dsn_names_the_database_and_keeps_the_rest() {
        let cases = [
            (
                "postgres://u@127.0.0.1:5432/postgres",
                "postgres://u@127.0.0.1:5432/x",
            ),
            (
                "postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable",
                "postgres://u:p@127.0.0.1:5432/x?sslmode=disable",
            ),
            (
                "postgres://u@127.0.0.1:5432",
                "postgres://u@127.0.0.1:5432/x",
            ),
        ];
        for (base, want) in cases {
            assert_eq!(dsn_for(base, "x").expect("dsn"), want, "{base}");
        }
        assert!(dsn_for("no-scheme", "x").is_err());
    }

    #[test]
    fn libpq_env_splits_a_dsn() {
        let env =
            super::libpq_env("postgres://u:pw@127.0.0.1:5433/db?sslmode=disable").expect("env");
        let want = [
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", "5433"),
            ("PGDATABASE", "db"),
            ("PGUSER", "u"),
            ("PGPASSWORD", "pw"),
            ("PGSSLMODE", "disable"),
        ];
        assert_eq!(
            env.iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
            want
        );
        assert!(super::libpq_env("mysql://x").is_err());
        assert!(super::libpq_env("postgres:///db").is_err());
    }
}
