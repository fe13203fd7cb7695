//! In-process control planes and workers for the sandbox tests: real Raft
//! replicas over QUIC on loopback, the real HTTP API, real worker agents with
//! the mock runtime (real host processes), each on its own loopback port.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stacyvm_client::Client;
use stacyvm_node::agent::{self, Agent, LoopConfig, Mode};
use stacyvm_node::config::AuthSources;
use stacyvm_node::control::{Control, ControlConfig};
use stacyvm_raft::certs::TestCa;
use stacyvm_raft::replica::{RaftTiming, Replica, ReplicaConfig};
use stacyvm_raft::types::NodeInfo;
use stacyvm_runtimes::Runtime;
use stacyvm_runtimes::mock::MockRuntime;
use stacyvm_store::StoreDriver;
use stacyvm_store::testing::TestDb;

pub fn free_port() -> u16 {
    loop {
        let tcp = StdListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Fast timings for tests: 100 ms worker heartbeats, 1.5 s leases.
pub fn fast() -> ControlConfig {
    ControlConfig {
        heartbeat: Duration::from_millis(100),
        lease_ttl: Duration::from_millis(1500),
        offline_grace: Duration::from_millis(500),
        reconcile_interval: Duration::from_secs(3600),
        reaper_interval: Duration::from_millis(200),
        ..ControlConfig::default()
    }
}

/// One in-process replica.
pub struct Cp {
    auth: Arc<AuthSources>,
    pub replica: Option<Arc<Replica>>,
    pub control: Arc<Control>,
    pub api: String,
    server: tokio::task::JoinHandle<()>,
    loops: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    pub db: TestDb,
}

impl Cp {
    /// The worker credential rules this replica checks.
    pub fn control_auth(&self) -> stacyvm_auth::WorkerAuth {
        self.auth.worker_auth().expect("auth")
    }

    pub fn r(&self) -> &Arc<Replica> {
        self.replica.as_ref().expect("replica running")
    }
}

/// A control plane of `n` replicas.
pub struct Plane {
    pub cps: Vec<Cp>,
    _ca: TestCa,
}

impl Plane {
    pub async fn start(n: u64, driver: StoreDriver, cfg: ControlConfig) -> Option<Plane> {
        Self::start_with(n, driver, cfg, Arc::new(AuthSources::default())).await
    }

    /// A plane whose replicas check these credentials.
    pub async fn start_with(
        n: u64,
        driver: StoreDriver,
        cfg: ControlConfig,
        auth: Arc<AuthSources>,
    ) -> Option<Plane> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = TestCa::new().expect("ca");
        let mut members = BTreeMap::new();
        let mut pending = Vec::new();
        for id in 1..=n {
            let db = TestDb::fresh(driver, "sandbox plane").await?;
            let raft_port = free_port();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind api");
            let api = listener.local_addr().expect("addr");
            let info = NodeInfo {
                raft_addr: format!("127.0.0.1:{raft_port}"),
                api_addr: api.to_string(),
            };
            members.insert(id, info.clone());
            pending.push((id, db, raft_port, listener, info));
        }
        let mut cps = Vec::new();
        for (id, db, raft_port, listener, info) in pending {
            let dir = tempfile::tempdir().expect("tempdir");
            let replica = Arc::new(
                Replica::start(ReplicaConfig {
                    id,
                    bind: SocketAddr::from(([127, 0, 0, 1], raft_port)),
                    advertise: info.clone(),
                    tls: ca.node_tls(id).expect("tls"),
                    log_dir: dir.path().join("raft"),
                    store: db.store.clone(),
                    shared_store: false,
                    timing: RaftTiming::default(),
                })
                .await
                .expect("start replica"),
            );
            let svc = stacyvm_node::serve::services(
                replica.clone(),
                "c-test".into(),
                id,
                cfg.clone(),
                auth.clone(),
            )
            .expect("services");
            let app = svc.app;
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            cps.push(Cp {
                auth: auth.clone(),
                replica: Some(replica),
                control: svc.control,
                api: info.api_addr.clone(),
                server,
                loops: svc.loops,
                _dir: dir,
                db,
            });
        }
        cps[0].r().bootstrap(members).await.expect("bootstrap");
        let plane = Plane { cps, _ca: ca };
        plane.wait_leader().await;
        Some(plane)
    }

    /// Index of the leader, waiting for one.
    pub async fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for (i, cp) in self.cps.iter().enumerate() {
                if cp.replica.as_ref().is_some_and(|r| r.is_leader()) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self) -> &Cp {
        let i = self.wait_leader().await;
        &self.cps[i]
    }

    /// API addresses of the replicas still running.
    pub fn apis(&self) -> Vec<String> {
        self.cps
            .iter()
            .filter(|c| c.replica.is_some())
            .map(|c| c.api.clone())
            .collect()
    }

    /// A client over every replica.
    pub fn client(&self) -> Client {
        let all: Vec<String> = self
            .cps
            .iter()
            .map(|c| format!("http://{}", c.api))
            .collect();
        Client::new(&all.join(","), None, Duration::from_secs(60)).expect("client")
    }

    /// A client over one replica only.
    pub fn client_of(&self, i: usize) -> Client {
        Client::new(
            &format!("http://{}", self.cps[i].api),
            None,
            Duration::from_secs(60),
        )
        .expect("client")
    }

    /// Stops replica `i` (its API and its Raft node).
    pub async fn stop(&mut self, i: usize) {
        let cp = &mut self.cps[i];
        cp.server.abort();
        cp.loops.abort();
        if let Some(r) = cp.replica.take() {
            match Arc::try_unwrap(r) {
                Ok(r) => r.shutdown().await,
                Err(r) => {
                    let _ = r.raft().shutdown().await;
                }
            }
        }
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.cps.len() {
            self.stop(i).await;
        }
        for cp in self.cps {
            cp.db.cleanup().await;
        }
    }
}

/// One in-process worker agent with the mock runtime.
/// It runs on its own tokio runtime, so a crash ends every task it has
/// (in-flight connections included), as a killed process would.
pub struct W {
    pub id: String,
    pub rpc_url: String,
    mode: tokio::sync::watch::Sender<Mode>,
    rpc_stop: tokio::sync::watch::Sender<bool>,
    hb: tokio::task::JoinHandle<Result<(), String>>,
    rt: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    pub state: tempfile::TempDir,
}

impl W {
    pub async fn start(id: &str, bootstrap: Vec<String>, safety_margin: Duration) -> W {
        Self::start_in(
            id,
            bootstrap,
            safety_margin,
            tempfile::tempdir().expect("tempdir"),
            None,
        )
        .await
    }

    /// A worker presenting `credential` to the control plane.
    pub async fn start_with_credential(
        id: &str,
        bootstrap: Vec<String>,
        credential: stacyvm_node::config::SecretSource,
    ) -> W {
        let state = tempfile::tempdir().expect("tempdir");
        Self::start_full(
            id,
            bootstrap,
            Duration::from_millis(500),
            state,
            None,
            Some(credential),
            None,
        )
        .await
    }

    /// A worker serving RPC over mutual TLS.
    pub async fn start_tls(id: &str, bootstrap: Vec<String>, tls: Arc<rustls::ServerConfig>) -> W {
        let state = tempfile::tempdir().expect("tempdir");
        Self::start_full(
            id,
            bootstrap,
            Duration::from_millis(500),
            state,
            None,
            None,
            Some(tls),
        )
        .await
    }

    /// Starts on an existing state directory (a restart), optionally on a fixed RPC address.
    pub async fn start_in(
        id: &str,
        bootstrap: Vec<String>,
        safety_margin: Duration,
        state: tempfile::TempDir,
        addr: Option<SocketAddr>,
    ) -> W {
        Self::start_full(id, bootstrap, safety_margin, state, addr, None, None).await
    }

    async fn start_full(
        id: &str,
        bootstrap: Vec<String>,
        safety_margin: Duration,
        state: tempfile::TempDir,
        addr: Option<SocketAddr>,
        credential: Option<stacyvm_node::config::SecretSource>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> W {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("worker runtime");
        let runtimes = agent::build_runtimes(
            &["mock".to_string()],
            state.path(),
            "w",
            &Default::default(),
        )
        .await
        .expect("runtimes");
        let agent = Agent::with_credential(id.to_string(), runtimes, safety_margin, 0, credential);
        let a2 = agent.clone();
        rt.spawn(async move { a2.adopt().await })
            .await
            .expect("adopt");
        let std_listener = StdListener::bind(addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("bind rpc");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let rpc_url = format!("{scheme}://{}", std_listener.local_addr().expect("addr"));
        let (rpc_stop, mut rpc_rx) = tokio::sync::watch::channel(false);
        let served = agent.clone();
        rt.spawn(async move {
            let stop = async move {
                let _ = rpc_rx.wait_for(|stop| *stop).await;
            };
            let _ = agent::serve_rpc(std_listener, served, tls, stop).await;
        });
        let (mode, rx) = tokio::sync::watch::channel(Mode::Run);
        let cfg = LoopConfig {
            source_ip: None,
            bootstrap,
            rpc_url: rpc_url.clone(),
            advertised: vec!["mock".into()],
            heartbeat: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(30),
        };
        let hb = rt.spawn(agent.clone().heartbeat_loop(cfg, rx));
        rt.spawn(agent.clone().fence_loop());
        W {
            id: id.to_string(),
            rpc_url,
            mode,
            rpc_stop,
            hb,
            rt: std::sync::Mutex::new(Some(rt)),
            state,
        }
    }

    /// The worker process "dies": heartbeats and RPC stop at once; whatever
    /// its runtime runs keeps running (as after a crash).
    pub fn crash(&self) {
        if let Some(rt) = self.rt.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
        }
    }

    /// The worker stops heartbeating but keeps serving RPC and fencing (a
    /// partition from the control plane's heartbeat path).
    pub fn stop_heartbeats(&self) {
        self.hb.abort();
    }

    /// The worker's RPC server stops (heartbeats go on).
    pub fn stop_rpc(&self) {
        let _ = self.rpc_stop.send(true);
    }

    pub fn drain(&self) {
        let _ = self.mode.send(Mode::Drain);
    }

    /// What the mock runtime on this worker's host runs.
    pub async fn running_here(&self) -> Vec<String> {
        let rt = MockRuntime::with_event_log(self.state.path().join("mock"), None).expect("mock");
        rt.list()
            .await
            .expect("list")
            .into_iter()
            .map(|s| s.sandbox_id)
            .collect()
    }

    /// Kills whatever is left on this worker's host.
    /// The worker process dies; its state directory (and whatever still
    /// runs there) is handed over for a restart.
    pub fn crash_keep_state(mut self) -> tempfile::TempDir {
        self.crash();
        std::mem::replace(&mut self.state, tempfile::tempdir().expect("tempdir"))
    }

    pub async fn cleanup(self) {
        self.crash();
        let rt = MockRuntime::with_event_log(self.state.path().join("mock"), None).expect("mock");
        for s in rt.list().await.unwrap_or_default() {
            let _ = rt.destroy(&s.sandbox_id).await;
        }
    }
}

impl Drop for W {
    /// A test that panics must not leave keeper processes behind: kill every
    /// sandbox's process group recorded in this worker's state directory.
    fn drop(&mut self) {
        self.crash();
        let Ok(dirs) = std::fs::read_dir(self.state.path().join("mock")) else {
            return;
        };
        for d in dirs.flatten() {
            let Ok(meta) = std::fs::read(d.path().join("meta.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&meta) else {
                continue;
            };
            if let Some(pid) = v["keeper_pid"].as_i64().and_then(|p| i32::try_from(p).ok()) {
                stacyvm_runtimes::sys::kill_group(pid, 9);
            }
        }
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the leader sees `n` workers online.
pub async fn workers_online(client: &Client, n: usize) {
    eventually(Duration::from_secs(10), "workers online", || async {
        client
            .workers()
            .await
            .map(|w| w.iter().filter(|w| w.status == "online").count() >= n)
            .unwrap_or(false)
    })
    .await;
}
