//! `stacyvm serve`: one control-plane replica. Opens the store, loads the
//! node's TLS material, starts its Raft replica, bootstraps or joins a cluster
//! (or resumes the one its data directory belongs to), then serves the HTTP
//! API until SIGINT/SIGTERM.
//!
//! With no flags it creates a one-replica cluster in `./stacyvm-data`,
//! generating a cluster CA and node certificate there if none are given.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use sha2::{Digest, Sha256};
use stacyvm_raft::certs::{self, CertPaths, NodeTls};
use stacyvm_raft::replica::{RaftTiming, Replica, ReplicaConfig};
use stacyvm_raft::types::NodeInfo;
use stacyvm_store::{StoreConfig, StoreDriver};

use crate::api::{AppState, JoinRequest, JoinResponse};
use crate::cli::CliError;
use crate::identity::{self, Identity, StartPlan};

/// Flags of `stacyvm serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This replica's node ID (never reuse the ID of a removed replica).
    #[arg(long, env = "STACYVM_NODE_ID", default_value_t = 1)]
    pub id: u64,
    /// Data directory: identity, Raft log, SQLite database, generated certificates.
    #[arg(long, env = "STACYVM_DATA_DIR", default_value = "stacyvm-data")]
    pub data_dir: PathBuf,
    /// QUIC address for Raft traffic (bound; advertised unless
    /// --advertise-raft-addr is given). Raft calls to other replicas leave
    /// from this address's IP when it is a loopback address.
    #[arg(long, env = "STACYVM_RAFT_ADDR", default_value = "127.0.0.1:7000")]
    pub raft_addr: SocketAddr,
    /// HTTP API address (bound; advertised unless --advertise-api-addr is given).
    #[arg(long, env = "STACYVM_API_ADDR", default_value = "127.0.0.1:7423")]
    pub api_addr: SocketAddr,
    /// Raft address other replicas use to reach this one, when it differs
    /// from the bound one (NAT, a proxy such as the chaos harness's).
    #[arg(long, env = "STACYVM_ADVERTISE_RAFT_ADDR")]
    pub advertise_raft_addr: Option<SocketAddr>,
    /// API address workers and other replicas use to reach this one.
    #[arg(long, env = "STACYVM_ADVERTISE_API_ADDR")]
    pub advertise_api_addr: Option<SocketAddr>,
    /// Directory with ca.pem, node-<id>.pem and node-<id>-key.pem
    /// (default: <data-dir>/certs, generated for a one-replica bootstrap).
    #[arg(long, env = "STACYVM_CERTS_DIR")]
    pub certs: Option<PathBuf>,
    /// Create a new cluster (the default when --join is not given).
    #[arg(long)]
    pub bootstrap: bool,
    /// Other initial members for --bootstrap, as ID=RAFT_ADDR=API_ADDR (repeatable).
    #[arg(long = "peer", value_name = "ID=RAFT_ADDR=API_ADDR")]
    pub peers: Vec<String>,
    /// Join the cluster through any member's API address (HOST:PORT).
    #[arg(long, env = "STACYVM_JOIN", conflicts_with = "bootstrap")]
    pub join: Option<String>,
    /// Database driver: sqlite or postgres.
    #[arg(long, env = "STACYVM_DATABASE_DRIVER", default_value = "sqlite")]
    pub database_driver: String,
    /// Postgres DSN (never printed).
    #[arg(long, env = "STACYVM_DATABASE_DSN", hide_env_values = true)]
    pub database_dsn: Option<String>,
    /// Raft heartbeat interval in milliseconds; the election timeout is 3–6
    /// heartbeats. openraft 0.9 also uses the heartbeat interval as the
    /// timeout of each replication RPC, so it cannot be made much shorter
    /// than a large append takes (see ARCHITECTURE.md, "Raft timing").
    #[arg(long, env = "STACYVM_RAFT_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Several replicas share this Postgres database (each Raft entry is
    /// applied once, by whichever replica gets there first).
    #[arg(long, env = "STACYVM_DATABASE_SHARED")]
    pub shared_database: bool,
    #[command(flatten)]
    pub control: ControlArgs,
    /// Configuration file (YAML): credentials (`auth.*`), worker RPC TLS.
    #[arg(long, env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Call workers with `https://` RPC URLs over mutual TLS: the CA that
    /// signs worker certificates...
    #[arg(long, requires_all = ["worker_rpc_client_cert", "worker_rpc_client_key"])]
    pub worker_rpc_ca: Option<PathBuf>,
    /// ...and this replica's client certificate (`stacyvm certs issue client`).
    #[arg(long)]
    pub worker_rpc_client_cert: Option<PathBuf>,
    #[arg(long)]
    pub worker_rpc_client_key: Option<PathBuf>,
}

/// Sandbox control knobs of `stacyvm serve`.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// How often workers heartbeat (ms); three missed beats make a worker stale.
    #[arg(long, env = "STACYVM_WORKER_HEARTBEAT_MS", default_value_t = 1000)]
    pub worker_heartbeat_ms: u64,
    /// Sandbox lease TTL (ms): a worker that cannot renew for this long minus
    /// its safety margin stops its sandboxes.
    #[arg(long, env = "STACYVM_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Extra silence after the lease TTL before a worker is declared offline (ms).
    #[arg(long, env = "STACYVM_OFFLINE_GRACE_MS", default_value_t = 5_000)]
    pub offline_grace_ms: u64,
    /// Sandbox TTL when the spawn names none.
    #[arg(long, env = "STACYVM_DEFAULT_TTL", default_value = "30m")]
    pub default_ttl: String,
    /// Longest TTL a spawn or extend may ask for (an owner quota may lower it).
    #[arg(long, env = "STACYVM_MAX_TTL", default_value = "24h")]
    pub max_ttl: String,
    /// Most live sandboxes in the cluster (0 = unlimited).
    #[arg(long, env = "STACYVM_MAX_SANDBOXES", default_value_t = 0)]
    pub max_sandboxes: i64,
    /// Most live sandboxes per owner (0 = unlimited; an owner quota overrides).
    #[arg(long, env = "STACYVM_MAX_SANDBOXES_PER_OWNER", default_value_t = 0)]
    pub max_sandboxes_per_owner: i64,
    /// Longest exec timeout (also the timeout of an exec that names none).
    #[arg(long, env = "STACYVM_MAX_EXEC_TIMEOUT", default_value = "10m")]
    pub max_exec_timeout: String,
    /// When full, wait this long for room before refusing a spawn (0s = refuse at once).
    #[arg(long, env = "STACYVM_SPAWN_QUEUE_TIMEOUT", default_value = "0s")]
    pub spawn_queue_timeout: String,
    /// How often the leader reconciles every sandbox with its worker.
    #[arg(long, env = "STACYVM_RECONCILE_INTERVAL", default_value = "10s")]
    pub reconcile_interval: String,
    /// Runtime used when a spawn names none.
    #[arg(long, env = "STACYVM_DEFAULT_RUNTIME", default_value = "mock")]
    pub default_runtime: String,
}

impl ControlArgs {
    pub fn config(&self) -> Result<crate::control::ControlConfig, CliError> {
        let d = |flag: &str, v: &str| {
            stacyvm_api::parse_duration(v).map_err(|e| CliError::Usage(format!("--{flag}: {e}")))
        };
        let cfg = crate::control::ControlConfig {
            heartbeat: Duration::from_millis(self.worker_heartbeat_ms.max(10)),
            lease_ttl: Duration::from_millis(self.lease_ttl_ms),
            offline_grace: Duration::from_millis(self.offline_grace_ms),
            default_ttl: d("default-ttl", &self.default_ttl)?,
            max_ttl: d("max-ttl", &self.max_ttl)?,
            max_sandboxes: self.max_sandboxes,
            max_per_owner: self.max_sandboxes_per_owner,
            max_exec_timeout: d("max-exec-timeout", &self.max_exec_timeout)?,
            spawn_queue_timeout: d("spawn-queue-timeout", &self.spawn_queue_timeout)?,
            reconcile_interval: d("reconcile-interval", &self.reconcile_interval)?,
            default_runtime: self.default_runtime.clone(),
            ..Default::default()
        };
        if cfg.lease_ttl < cfg.heartbeat * 3 {
            return Err(CliError::Usage(
                "--lease-ttl-ms must be at least three worker heartbeats".into(),
            ));
        }
        if cfg.default_ttl > cfg.max_ttl {
            return Err(CliError::Usage("--default-ttl is over --max-ttl".into()));
        }
        Ok(cfg)
    }
}

fn parse_peer(spec: &str) -> Result<(u64, NodeInfo), CliError> {
    let parts: Vec<&str> = spec.split('=').collect();
    let bad = || CliError::Usage(format!("--peer {spec:?}: expected ID=RAFT_ADDR=API_ADDR"));
    let [id, raft, api] = parts.as_slice() else {
        return Err(bad());
    };
    let id: u64 = id.parse().map_err(|_| bad())?;
    raft.parse::<SocketAddr>().map_err(|_| bad())?;
    api.parse::<SocketAddr>().map_err(|_| bad())?;
    Ok((
        id,
        NodeInfo {
            raft_addr: (*raft).to_owned(),
            api_addr: (*api).to_owned(),
        },
    ))
}

/// A cluster ID every member of a multi-node bootstrap derives identically.
fn derived_cluster_id(members: &BTreeMap<u64, NodeInfo>) -> String {
    let mut h = Sha256::new();
    for (id, n) in members {
        h.update(format!("{id}={}={};", n.raft_addr, n.api_addr));
    }
    format!("c-{}", &hex_prefix(&h.finalize()))
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn load_tls(args: &ServeArgs, may_generate: bool) -> Result<NodeTls, CliError> {
    let dir = args
        .certs
        .clone()
        .unwrap_or_else(|| args.data_dir.join("certs"));
    let paths = CertPaths::node(&dir, &dir, args.id);
    let missing = !paths.ca_cert.exists() && !paths.cert.exists();
    if missing && may_generate && args.certs.is_none() {
        certs::init_ca(&dir).map_err(|e| CliError::Failed(e.to_string()))?;
        certs::issue_node(&dir, args.id, &dir).map_err(|e| CliError::Failed(e.to_string()))?;
        eprintln!(
            "generated a cluster CA and node {} certificate in {}",
            args.id,
            dir.display()
        );
    }
    NodeTls::load_paths(&paths, args.id).map_err(|e| {
        CliError::Usage(format!(
            "{e}\n  fix: create them with `stacyvm certs init --out {d}` and \
             `stacyvm certs issue node --id {id} --ca {d} --out {d}`, or pass --certs DIR",
            d = dir.display(),
            id = args.id
        ))
    })
}

fn store_config(args: &ServeArgs) -> Result<StoreConfig, CliError> {
    let driver: StoreDriver = args
        .database_driver
        .parse()
        .map_err(|e| CliError::Usage(format!("{e}")))?;
    let cfg = StoreConfig {
        driver,
        path: Some(args.data_dir.join("stacyvm.db")),
        dsn: args.database_dsn.clone(),
        max_connections: None,
    };
    cfg.validate().map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(cfg)
}

/// Asks a member to add this node, retrying while the member starts.
async fn join_via(
    member: &str,
    req: &JoinRequest,
    admin_key: Option<&str>,
) -> Result<JoinResponse, CliError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let url = format!("http://{member}/api/v1/cluster/join");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut b = http.post(&url).json(req);
        if let Some(k) = admin_key {
            b = b.header("x-admin-api-key", k);
        }
        let attempt = b.send().await;
        match attempt {
            Ok(resp) if resp.status().is_success() => {
                return resp
                    .json()
                    .await
                    .map_err(|e| CliError::Failed(format!("bad join answer: {e}")));
            }
            Ok(resp) if resp.status().is_client_error() => {
                let body = resp.text().await.unwrap_or_default();
                return Err(CliError::Refused(format!(
                    "the cluster refused the join: {body}"
                )));
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Ok(resp) => {
                return Err(CliError::Failed(format!(
                    "join failed: HTTP {}",
                    resp.status()
                )));
            }
            Err(e) => return Err(CliError::Failed(format!("cannot reach {member}: {e}"))),
        }
    }
}

/// This start's incarnation: one above the last one recorded in the data
/// directory (1 for a new one), written and synced before it is used.
#[derive(Clone, Debug)]
struct Boot {
    incarnation: u64,
    boot_id: String,
}

const INCARNATION_FILE: &str = "incarnation";

fn bump_incarnation(data_dir: &std::path::Path) -> Result<Boot, CliError> {
    use std::io::Write;
    let path = data_dir.join(INCARNATION_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| {
            CliError::Failed(format!("{} is damaged: {:?}", path.display(), s.trim()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(CliError::Failed(format!("{}: {e}", path.display()))),
    };
    let incarnation = last + 1;
    let tmp = data_dir.join(format!("{INCARNATION_FILE}.tmp"));
    let io = |e: std::io::Error| CliError::Failed(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    writeln!(f, "{incarnation}").map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    let boot_id = format!("{:016x}", rand::random::<u64>());
    Ok(Boot {
        incarnation,
        boot_id,
    })
}

enum Registered {
    Yes,
    /// The cluster knows a newer start of this replica.
    Stale(String),
    /// No member recorded it (none reachable, or no leader).
    NoAnswer,
}

/// Asks the members to record this start. Unreachable members are not
/// waited for; members without a leader are asked again for a few seconds.
async fn register_incarnation(
    members: &[String],
    node_id: u64,
    boot: &Boot,
    admin_key: Option<&str>,
) -> Registered {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    else {
        return Registered::NoAnswer;
    };
    let req = crate::api::IncarnationRequest {
        node_id,
        incarnation: boot.incarnation,
        boot_id: boot.boot_id.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let mut answered = false;
        for m in members {
            let mut b = http
                .post(format!("http://{m}/api/v1/cluster/incarnation"))
                .json(&req);
            if let Some(k) = admin_key {
                b = b.header("x-admin-api-key", k);
            }
            match b.send().await {
                Ok(r) if r.status().is_success() => return Registered::Yes,
                Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => {
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    let msg = body
                        .get("message")
                        .and_then(|m| m.as_str())
                        .unwrap_or("stale incarnation")
                        .to_string();
                    return Registered::Stale(msg);
                }
                Ok(_) => answered = true,
                Err(e) if !e.is_connect() => answered = true,
                Err(_) => {}
            }
        }
        if !answered || Instant::now() > deadline {
            return Registered::NoAnswer;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Records this start through the replica itself once a leader exists;
/// exits the process if the cluster knows a newer start.
async fn register_through(replica: &Replica, node_id: u64, boot: &Boot) {
    use stacyvm_raft::codec::Command;
    use stacyvm_raft::types::Response;
    let (Ok(node), Ok(incarnation)) = (i64::try_from(node_id), i64::try_from(boot.incarnation))
    else {
        return;
    };
    loop {
        let m = stacyvm_store::Mutation::RecordIncarnation {
            node_id: node,
            incarnation,
            boot_id: boot.boot_id.clone(),
            at: stacyvm_store::Ts::now(),
        };
        match replica.write(Command::Store(vec![m])).await {
            Ok(Response::Applied(r)) => match r.into_iter().next() {
                Some(Err(stacyvm_store::StoreError::Conflict { reason, .. })) => {
                    tracing::error!(
                        node_id,
                        "this data directory is older than a start this replica already made ({reason}); stopping: wipe it and add the replica back under a new node id"
                    );
                    std::process::exit(3);
                }
                _ => {
                    tracing::info!(node_id, incarnation, "start recorded by the cluster");
                    return;
                }
            },
            Ok(_) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The cluster ID a member's API reports, if it answers within a few seconds.
async fn remote_cluster_id(member: &str) -> Option<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let status: serde_json::Value = http
        .get(format!("http://{member}/api/v1/cluster/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    status.get("cluster_id")?.as_str().map(str::to_owned)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGKILL.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Runs a replica until it is told to stop.
/// What a replica serves on top of its Raft replica: the HTTP app and the
/// leader loops (used by `serve` and by in-process tests).
#[derive(Debug)]
pub struct Services {
    pub control: Arc<crate::control::Control>,
    pub app: axum::Router,
    pub loops: tokio::task::JoinHandle<()>,
}

/// Builds the control service, event hub and router for `replica`.
pub fn services(
    replica: Arc<Replica>,
    cluster_id: String,
    node_id: u64,
    cfg: crate::control::ControlConfig,
    auth: Arc<crate::config::AuthSources>,
) -> Result<Services, CliError> {
    let control = crate::control::Control::new(replica.clone(), cfg, auth.clone())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let events = crate::events::Events::start(&replica);
    let loops = tokio::spawn(control.clone().run_leader_loops());
    let forwarder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(180))
        .build()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let state = AppState {
        replica,
        cluster_id,
        node_id,
        started: Instant::now(),
        control: control.clone(),
        events,
        forwarder,
        auth,
    };
    Ok(Services {
        control,
        app: crate::api::router(state),
        loops,
    })
}

pub async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.id == 0 {
        return Err(CliError::Usage("--id must be at least 1".into()));
    }
    let mut control_cfg = args.control.config()?;
    let file_cfg = crate::config::FileConfig::load_optional(args.config.as_deref())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let auth = Arc::new(
        crate::config::AuthSources::from_config(&file_cfg)
            .map_err(|e| CliError::Usage(e.to_string()))?,
    );
    let t = &file_cfg.worker.rpc_tls;
    let tls_files = match (
        &args.worker_rpc_ca,
        &args.worker_rpc_client_cert,
        &args.worker_rpc_client_key,
    ) {
        (Some(a), Some(b), Some(c)) => Some((a.clone(), b.clone(), c.clone())),
        _ => match (
            t.enabled,
            &t.ca_file,
            &t.client_cert_file,
            &t.client_key_file,
        ) {
            (true, Some(a), Some(b), Some(c)) => Some((a.into(), b.into(), c.into())),
            (true, ..) => {
                return Err(CliError::Usage(
                    "worker.rpc_tls.enabled needs ca_file, client_cert_file and client_key_file on a replica".into(),
                ));
            }
            _ => None,
        },
    };
    if let Some((ca, cert, key)) = tls_files {
        let c = crate::rpc_tls::RpcTlsClient::load(&ca, &cert, &key)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        control_cfg.rpc_tls = Some(Arc::new(c));
    }
    let admin_key = auth
        .api_keys()
        .ok()
        .and_then(|k| k.admin_api_key)
        .map(|k| k.expose().to_string());
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", args.data_dir.display())))?;
    let found = identity::load(&args.data_dir).map_err(|e| CliError::Failed(e.to_string()))?;
    let joining = args.join.is_some();
    let plan = identity::check(found.as_ref(), args.id, !joining, joining)
        .map_err(|e| CliError::Refused(e.to_string()))?;
    let mut peers = BTreeMap::new();
    for p in &args.peers {
        let (id, node) = parse_peer(p)?;
        peers.insert(id, node);
    }
    let tls = load_tls(&args, plan == StartPlan::Bootstrap && peers.is_empty())?;
    if args.shared_database && args.database_driver != "postgres" {
        return Err(CliError::Usage(
            "--shared-database needs --database-driver postgres".into(),
        ));
    }
    if args.shared_database {
        tracing::warn!(
            "--shared-database is not safe when replicas start apart or restart \
             (a replica can stop serving; ARCHITECTURE.md, known limits): \
             give each replica its own database"
        );
    }
    // Every start is a new incarnation; a resumed replica has it recorded by
    // the cluster before it takes part, so a restart from an older copy of
    // this data directory is refused instead of trusted (its votes and
    // acknowledged entries may be missing from that copy).
    let boot = bump_incarnation(&args.data_dir)?;
    let mut register_after_start = false;
    if let StartPlan::Resume(_) = &plan {
        let mut members: Vec<String> = peers
            .iter()
            .filter(|(id, _)| **id != args.id)
            .map(|(_, n)| n.api_addr.clone())
            .collect();
        members.extend(args.join.iter().cloned());
        match register_incarnation(&members, args.id, &boot, admin_key.as_deref()).await {
            Registered::Yes => {}
            Registered::Stale(why) => {
                return Err(CliError::Refused(format!(
                    "this data directory is older than a start replica {} already made ({why}); \
                     it cannot be trusted: wipe {} and add the replica back under a new node id",
                    args.id,
                    args.data_dir.display()
                )));
            }
            Registered::NoAnswer => register_after_start = true,
        }
    }
    let store = stacyvm_store::open(&store_config(&args)?).await?;
    let me = NodeInfo {
        raft_addr: args
            .advertise_raft_addr
            .unwrap_or(args.raft_addr)
            .to_string(),
        api_addr: args.advertise_api_addr.unwrap_or(args.api_addr).to_string(),
    };
    let timing = RaftTiming {
        heartbeat_ms: args.heartbeat_ms,
        election_min_ms: args.heartbeat_ms * 3,
        election_max_ms: args.heartbeat_ms * 6,
        ..RaftTiming::default()
    };
    let replica = Replica::start(ReplicaConfig {
        id: args.id,
        bind: args.raft_addr,
        advertise: me.clone(),
        tls,
        log_dir: args.data_dir.join("raft"),
        store,
        shared_store: args.shared_database,
        timing,
    })
    .await
    .map_err(|e| CliError::Failed(e.to_string()))?;
    let replica = Arc::new(replica);
    if register_after_start {
        // No member could record it before the start (no leader, say after a
        // whole-cluster restart): record it as soon as a leader exists, and
        // stop at once if the cluster knows a newer start of this replica.
        let (r, id, boot) = (replica.clone(), args.id, boot.clone());
        tokio::spawn(async move { register_through(&r, id, &boot).await });
    }

    let cluster_id = match plan {
        StartPlan::Resume(id) => {
            // A restart that still names a member to join must not mix
            // clusters: if that member answers for another cluster, refuse.
            if let Some(member) = &args.join {
                match remote_cluster_id(member).await {
                    Some(remote) => identity::check_joined(Some(&id), &remote)
                        .map_err(|e| CliError::Refused(e.to_string()))?,
                    None => {
                        tracing::warn!("cannot reach {member} to confirm the cluster id; resuming")
                    }
                }
            }
            id.cluster_id
        }
        StartPlan::Bootstrap => {
            let mut members = peers.clone();
            members.insert(args.id, me.clone());
            let cluster_id = if peers.is_empty() {
                identity::new_cluster_id()
            } else {
                derived_cluster_id(&members)
            };
            // A crash between initialising and saving the identity leaves an
            // initialised log: initialising again is refused, which is fine.
            if let Err(e) = replica.bootstrap(members).await {
                tracing::warn!("bootstrap: {e} (already initialised?)");
            }
            cluster_id
        }
        StartPlan::Join => {
            let member = args.join.clone().unwrap_or_default();
            let req = JoinRequest {
                id: args.id,
                raft_addr: me.raft_addr.clone(),
                api_addr: me.api_addr.clone(),
            };
            join_via(&member, &req, admin_key.as_deref())
                .await?
                .cluster_id
        }
    };
    identity::save(
        &args.data_dir,
        &Identity {
            cluster_id: cluster_id.clone(),
            node_id: args.id,
        },
    )
    .map_err(|e| CliError::Failed(e.to_string()))?;

    let listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .map_err(|e| CliError::Failed(format!("cannot listen on {}: {e}", args.api_addr)))?;
    let services = services(
        replica.clone(),
        cluster_id.clone(),
        args.id,
        control_cfg,
        auth,
    )?;
    eprintln!(
        "stacyvm node {} serving: api http://{} raft {} cluster {}",
        args.id, args.api_addr, args.raft_addr, cluster_id
    );
    let served = axum::serve(listener, services.app)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    services.loops.abort();
    match Arc::try_unwrap(replica) {
        Ok(r) => r.shutdown().await,
        Err(r) => {
            let _ = r.raft().shutdown().await;
        }
    }
    served.map_err(|e| CliError::Failed(format!("HTTP server failed: {e}")))
}
